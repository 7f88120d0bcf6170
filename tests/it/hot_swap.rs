//! Hot swap: a swap storm under load, refused corrupt bundles, and the bundle watcher.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;
use riskserve::grpc::pb;
use tonic::Code;

fn version_ref(version: &str) -> pb::VersionRef {
    pb::VersionRef {
        model: MODEL.into(),
        version: version.into(),
    }
}

async fn serving_version(server: &TestServer) -> String {
    let list = server
        .models()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    list.models
        .into_iter()
        .find(|m| m.name == MODEL)
        .unwrap()
        .serving_version
}

async fn version_status(server: &TestServer, version: &str) -> Option<pb::VersionStatus> {
    let list = server
        .models()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    list.models
        .into_iter()
        .find(|m| m.name == MODEL)?
        .versions
        .into_iter()
        .find(|v| v.version == version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_storm_loses_no_request_and_every_answer_is_consistent() {
    let models = models_v1_v2();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models, data.path()).await;
    server
        .models()
        .load_version(version_ref("v2"))
        .await
        .unwrap();
    let offline: BTreeMap<String, Offline> = ["v1", "v2"]
        .iter()
        .map(|v| (v.to_string(), Offline::read(&models.join(MODEL).join(v))))
        .collect();
    assert_ne!(offline["v1"].digest, offline["v2"].digest);

    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let mut client = server.scoring();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = c;
            while !done.load(Ordering::Relaxed) {
                let customer = &customers()[i % customers().len()];
                let r = client
                    .score(request(customer, &format!("storm-{c}-{i}")))
                    .await
                    .map(|r| r.into_inner());
                answers.push((i % customers().len(), r));
                i += 8;
            }
            answers
        }));
    }
    let mut admin = server.models();
    for swap in 0..200 {
        let version = if swap % 2 == 0 { "v2" } else { "v1" };
        admin.serve_version(version_ref(version)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(true, Ordering::Relaxed);

    let mut per_version = BTreeMap::<String, usize>::new();
    for client in clients {
        for (row, answer) in client.await.unwrap() {
            let r = answer.expect("no request fails during a swap storm");
            let o = &offline[&r.version];
            assert_eq!(r.digest, o.digest, "version and digest belong together");
            let pd = o.pd(&customers()[row].values);
            assert!(
                (r.probability_of_default - pd).abs() < 1e-12,
                "PD matches its version"
            );
            *per_version.entry(r.version).or_default() += 1;
        }
    }
    assert!(
        per_version.get("v1").copied().unwrap_or(0) > 0
            && per_version.get("v2").copied().unwrap_or(0) > 0,
        "both versions served: {per_version:?}"
    );
    assert_eq!(serving_version(&server).await, "v1");
    server.stop().await.unwrap();
}

/// Rewrites one file of a copied bundle; `reseal` recomputes the digest (so the content
/// check, not the digest check, must refuse it).
fn corrupt(dir: &Path, file: &str, edit: impl Fn(String) -> String, reseal: bool) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    if reseal {
        riskserve::bundle::seal(dir).unwrap();
    }
}

#[tokio::test]
async fn corrupt_bundles_are_refused_and_the_serving_version_keeps_answering() {
    let models = scratch_models();
    let v1 = models.path().join(MODEL).join("v1");
    let make = |name: &str| {
        let dir = models.path().join(MODEL).join(name);
        copy_dir(&v1, &dir);
        // The manifest must name the directory it sits in.
        corrupt(
            &dir,
            "manifest.toml",
            |t| t.replace("version = \"v1\"", &format!("version = \"{name}\"")),
            true,
        );
        dir
    };
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "truncated",
            Box::new(|d| corrupt(d, "parameters.toml", |t| t[..t.len() / 2].to_string(), true)),
            "parameters.toml does not parse",
        ),
        (
            "truncated-unsealed",
            Box::new(|d| {
                corrupt(
                    d,
                    "parameters.toml",
                    |t| t[..t.len() / 2].to_string(),
                    false,
                )
            }),
            "digest mismatch",
        ),
        (
            "wrong-digest",
            Box::new(|d| {
                std::fs::write(
                    d.join("bundle.sha256"),
                    format!("sha256:{}\n", "0".repeat(64)),
                )
                .unwrap()
            }),
            "digest mismatch",
        ),
        (
            "nan-coefficient",
            Box::new(|d| {
                corrupt(
                    d,
                    "parameters.toml",
                    |t| {
                        let at = t.find("coefficient = ").unwrap() + "coefficient = ".len();
                        let end = at + t[at..].find('\n').unwrap();
                        format!("{}nan{}", &t[..at], &t[end..])
                    },
                    true,
                )
            }),
            "not finite",
        ),
        (
            "schema-mismatch",
            Box::new(|d| {
                corrupt(
                    d,
                    "parameters.toml",
                    |t| t.replace("name = \"AGE\"", "name = \"AGE_YEARS\""),
                    true,
                )
            }),
            "do not match",
        ),
        (
            "band-gap",
            Box::new(|d| {
                corrupt(
                    d,
                    "manifest.toml",
                    |t| t.replace("pd_min = 0.1\n", "pd_min = 0.12\n"),
                    true,
                )
            }),
            "contiguous",
        ),
        (
            "no-digest",
            Box::new(|d| std::fs::remove_file(d.join("bundle.sha256")).unwrap()),
            "incomplete",
        ),
    ];
    for (name, _, _) in &cases {
        make(name);
    }
    for (name, break_it, _) in &cases {
        break_it(&models.path().join(MODEL).join(name));
    }
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models.path(), data.path()).await;
    let mut admin = server.models();
    for (name, _, why) in &cases {
        let status = admin.load_version(version_ref(name)).await.expect_err(name);
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{name}: {}",
            status.message()
        );
        assert!(
            status.message().contains(why),
            "{name}: {}",
            status.message()
        );
        let listed = version_status(&server, name).await.expect("listed");
        assert_eq!(listed.state, pb::VersionState::Failed as i32, "{name}");
        assert!(listed.error.contains(why), "{name}: {}", listed.error);
        let status = admin
            .serve_version(version_ref(name))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::FailedPrecondition);

        assert_eq!(serving_version(&server).await, "v1");
        let r = server
            .scoring()
            .score(request(&customers()[7], &format!("after-{name}")))
            .await
            .expect("the serving version keeps answering")
            .into_inner();
        assert_eq!(r.version, "v1");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_watcher_loads_a_new_bundle_once_complete_and_does_not_serve_it() {
    let models = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("models"), models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models.path(), data.path()).await;
    assert_eq!(serving_version(&server).await, "v1");

    // A bundle caught half-written: files present, digest file not yet.
    let v2_src = models_v1_v2().join(MODEL).join("v2");
    let v2 = models.path().join(MODEL).join("v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::copy(v2_src.join("manifest.toml"), v2.join("manifest.toml")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = version_status(&server, "v2").await;
    assert!(
        seen.as_ref()
            .is_none_or(|v| v.state == pb::VersionState::Failed as i32),
        "a half-written bundle never loads: {seen:?}"
    );

    // Completed: the watcher loads it within 2 s and leaves v1 serving.
    let completed = Instant::now();
    // Every file but the digest, then the digest last: the order a bundle writer keeps.
    for f in std::fs::read_dir(&v2_src).unwrap() {
        let name = f.unwrap().file_name();
        if name != "manifest.toml" && name != "bundle.sha256" {
            std::fs::copy(v2_src.join(&name), v2.join(&name)).unwrap();
        }
    }
    std::fs::copy(v2_src.join("bundle.sha256"), v2.join("bundle.sha256")).unwrap();
    loop {
        if let Some(v) = version_status(&server, "v2").await
            && v.state == pb::VersionState::Ready as i32
        {
            break;
        }
        assert!(
            completed.elapsed() < Duration::from_secs(2),
            "v2 not loaded within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(serving_version(&server).await, "v1");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn serve_and_unload_follow_the_version_lifecycle() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut admin = server.models();

    let status = admin.unload_version(version_ref("v1")).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    let status = admin.serve_version(version_ref("v9")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin.load_version(version_ref("../v1")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let v2 = admin
        .load_version(version_ref("v2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.state, pb::VersionState::Ready as i32);
    assert!(v2.digest.starts_with("sha256:"));
    let manifest = admin
        .get_manifest(version_ref("v2"))
        .await
        .unwrap()
        .into_inner();
    assert!(manifest.manifest_toml.contains("version = \"v2\""));

    let served = admin
        .serve_version(version_ref("v2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.state, pb::VersionState::Serving as i32);
    let r = server
        .scoring()
        .score(request(&customers()[0], "after-swap"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().version, "v2");
    admin.unload_version(version_ref("v1")).await.unwrap();
    // The watcher (polling every 100 ms here) does not load an unloaded version back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(version_status(&server, "v1").await.is_none());
    server.stop().await.unwrap();
}

/// The watcher starts from what the start-up load saw: a version unloaded the moment the
/// server is up stays unloaded (it used to be loaded back when the unload beat the watcher's
/// first look).
#[tokio::test]
async fn a_version_unloaded_right_after_start_stays_unloaded() {
    for round in 0..5 {
        let data = tempfile::tempdir().unwrap();
        let server = TestServer::start(models_v1_v2(), data.path()).await;
        server
            .models()
            .unload_version(version_ref("v2"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            version_status(&server, "v2").await.is_none(),
            "round {round}: the watcher loaded v2 back"
        );
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn auto_serve_serves_new_bundles_but_never_during_a_rollout() {
    let models = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("models"), models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models.path().to_owned(),
        data_dir: data.path().to_owned(),
        watch_interval_ms: 100,
        auto_serve: true,
        ..riskserve::Config::default()
    })
    .await;
    let wait_for = |version: &'static str, state: pb::VersionState| {
        let server = &server;
        async move {
            let start = Instant::now();
            loop {
                if version_status(server, version)
                    .await
                    .is_some_and(|v| v.state == state as i32)
                {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "{version} never {state:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    copy_dir(
        &models_v1_v2().join(MODEL).join("v2"),
        &models.path().join(MODEL).join("v2"),
    );
    wait_for("v2", pb::VersionState::Serving).await;

    // With a rollout open, a new bundle is loaded but the rollout keeps deciding what serves.
    riskserve::grpc::pb::rollouts_client::RolloutsClient::new(server.channel.clone())
        .start(pb::StartRolloutRequest {
            model: MODEL.into(),
            candidate: "v1".into(),
            plan_toml: String::new(),
            actor: "test".into(),
            skip_backtest: true,
        })
        .await
        .unwrap();
    let v3 = models.path().join(MODEL).join("v3");
    copy_bundle(
        &models_v1_v2().join(MODEL).join("v2"),
        &v3,
        ("version = \"v2\"", "version = \"v3\""),
    );
    riskserve::bundle::seal(&v3).unwrap();
    wait_for("v3", pb::VersionState::Ready).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(serving_version(&server).await, "v2");
    server.stop().await.unwrap();
}

/// A caller that gives up on LoadVersion (its deadline passes mid-load) stops waiting, not
/// the load: the version ends READY, never stuck LOADING, and loading it again works.
#[tokio::test]
async fn a_load_whose_caller_gives_up_still_finishes() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut models = server.models();
    // Deadlines from before the handler runs to past the end of the load, so that some
    // expire while the bundle is being read, verified and warmed up.
    models.unload_version(version_ref("v2")).await.unwrap();
    let t = Instant::now();
    models.load_version(version_ref("v2")).await.unwrap();
    let load_micros = t.elapsed().as_micros() as u64;
    for micros in (1..=40).map(|i| load_micros * i / 20) {
        // A request whose deadline passed on the client may still reach the server and load
        // after the previous round ended: wait that load out (ABORTED while it runs).
        let start = Instant::now();
        loop {
            match models.unload_version(version_ref("v2")).await {
                Ok(_) => break,
                Err(s)
                    if s.code() == Code::Aborted && start.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(s) => panic!("unloading v2 after a {micros} µs deadline: {s:?}"),
            }
        }
        let mut req = tonic::Request::new(version_ref("v2"));
        req.set_timeout(Duration::from_micros(micros));
        let _ = models.load_version(req).await;
        let start = Instant::now();
        loop {
            let state = version_status(&server, "v2").await.map(|v| v.state);
            if state != Some(pb::VersionState::Loading as i32) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "v2 stuck LOADING after a {micros} µs deadline"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let again = models.load_version(version_ref("v2")).await;
        assert_eq!(
            again.map(|r| r.into_inner().state).ok(),
            Some(pb::VersionState::Ready as i32),
            "loading again after a {micros} µs deadline"
        );
    }
    server.stop().await.unwrap();
}

/// Scores `n` customers through ScoreBatch: recorded decisions for a start-up backtest.
async fn seed_decisions(server: &TestServer, n: usize) {
    let mut scoring = server.scoring();
    for (chunk, rows) in customers()[..n].chunks(1_000).enumerate() {
        let requests = rows
            .iter()
            .enumerate()
            .map(|(i, c)| request(c, &format!("seed-{chunk}-{i}")))
            .collect();
        scoring
            .score_batch(pb::ScoreBatchRequest { requests })
            .await
            .unwrap();
    }
}

/// Starts rolling v2 out with its start-up backtest, in the background. The plan's
/// thresholds are ones no retrain breaches, so that the start is sure to succeed.
fn start_with_backtest(
    server: &TestServer,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::RolloutStatus>, tonic::Status>> {
    let plan = "[guardrails]\nmax_decline_rate_diff = 1.0\nmax_cut_rate_diff = 1.0\n\
                max_withdrawal_rate_diff = 1.0\nmax_psi = 100.0\n";
    let mut rollouts =
        riskserve::grpc::pb::rollouts_client::RolloutsClient::new(server.channel.clone());
    tokio::spawn(async move {
        rollouts
            .start(pb::StartRolloutRequest {
                model: MODEL.into(),
                candidate: "v2".into(),
                plan_toml: plan.into(),
                actor: "test".into(),
                skip_backtest: false,
            })
            .await
    })
}

/// A switch of the serving version sent while a rollout start is backtesting waits for the
/// start and is then refused: the rollout's champion is the version that serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_during_a_rollout_start_waits_and_cannot_change_its_champion() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    seed_decisions(&server, 4_000).await;
    let start = start_with_backtest(&server);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let switched = server.models().serve_version(version_ref("v2")).await;
    let started = start
        .await
        .unwrap()
        .expect("the rollout starts")
        .into_inner();
    assert!(
        started.backtest.is_some(),
        "the start backtested the candidate"
    );
    let refused = switched.expect_err("the switch came after the start, during a rollout");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(started.champion, "v1");
    assert_eq!(serving_version(&server).await, "v1");
    server.stop().await.unwrap();
}

/// An unload of the candidate sent while a rollout start is backtesting it waits for the
/// start and is then refused: a rollout never runs on a candidate the registry dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_during_a_rollout_start_waits_and_cannot_remove_its_candidate() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    seed_decisions(&server, 4_000).await;
    let start = start_with_backtest(&server);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let unloaded = server.models().unload_version(version_ref("v2")).await;
    let started = start
        .await
        .unwrap()
        .expect("the rollout starts")
        .into_inner();
    assert_eq!(started.candidate, "v2");
    let refused = unloaded.expect_err("the unload came after the start, during a rollout");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("open rollout"),
        "{}",
        refused.message()
    );
    assert_eq!(
        version_status(&server, "v2").await.map(|v| v.state),
        Some(pb::VersionState::Ready as i32),
        "the candidate stays loaded"
    );
    server.stop().await.unwrap();
}

/// Another model's switch does not wait for that backtest: control turns are per model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_models_switch_does_not_wait_for_a_rollout_start() {
    let models = scratch_models();
    let other = models.path().join("other-model").join("v1");
    copy_bundle(
        &models_v1_v2().join(MODEL).join("v1"),
        &other,
        ("model = \"credit-limit\"", "model = \"other-model\""),
    );
    riskserve::bundle::seal(&other).unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models.path(), data.path()).await;
    seed_decisions(&server, 8_000).await;

    let began = Instant::now();
    let start = start_with_backtest(&server);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let asked = Instant::now();
    server
        .models()
        .serve_version(pb::VersionRef {
            model: "other-model".into(),
            version: "v1".into(),
        })
        .await
        .expect("the other model's switch");
    let switch_took = asked.elapsed();
    start.await.unwrap().expect("the rollout starts");
    let start_took = began.elapsed();
    // Waiting for the start would have taken the rest of its backtest.
    assert!(
        switch_took * 4 < start_took,
        "the switch took {switch_took:?} of the start's {start_took:?}"
    );
    server.stop().await.unwrap();
}
