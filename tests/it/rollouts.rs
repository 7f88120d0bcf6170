//! Rollouts with the real server and Taiwan customers as traffic: sticky assignment, the
//! incident (a flawed candidate caught before it reaches 1% of customers), a sound candidate
//! advancing to 100%, and a restart mid-rollout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use riskserve::rollout::is_candidate;

/// A plan of these shares (basis points), the first in shadow, without waiting: no bake
/// time, 200 decisions per step, auto-advance, guardrails judged from 200 decisions.
fn fast_plan(shares: &[u32]) -> String {
    let mut plan = String::from("auto_advance = true\n");
    for (i, share) in shares.iter().enumerate() {
        plan.push_str(&format!(
            "[[steps]]\nshare_bp = {share}\nshadow = {}\nmin_bake_secs = 0\nmin_decisions = 200\n",
            i == 0
        ));
    }
    plan + "[guardrails]\nmin_sample = 200\n"
}

/// Steps as the default plan.
fn default_steps() -> String {
    fast_plan(&[0, 100, 500, 2500, 5000, 10000])
}

fn fast_config(models: &Path, data: &Path) -> riskserve::Config {
    riskserve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models.to_owned(),
        data_dir: data.to_owned(),
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        rollout_eval_interval_ms: 20,
        ..riskserve::Config::default()
    }
}

/// Scores customers [from, from+n) (wrapping) in one batch; returns (customer id, arm) pairs.
async fn traffic(
    channel: &tonic::transport::Channel,
    tag: &str,
    from: usize,
    n: usize,
) -> Vec<(String, i32)> {
    let all = customers();
    let mut items = Vec::new();
    let mut client = riskserve::grpc::pb::scoring_client::ScoringClient::new(channel.clone());
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(1_000) {
        let requests = chunk
            .iter()
            .map(|i| request(&all[i % all.len()], &format!("{tag}-{i}")))
            .collect();
        items.extend(
            client
                .score_batch(pb::ScoreBatchRequest { requests })
                .await
                .unwrap()
                .into_inner()
                .items,
        );
    }
    (from..from + n)
        .zip(items)
        .map(|(i, item)| match item.outcome {
            Some(pb::score_batch_item::Outcome::Response(r)) => {
                (all[i % all.len()].id.clone(), r.arm)
            }
            other => panic!("request {i} failed: {other:?}"),
        })
        .collect()
}

/// Sends traffic in batches of 500 (request ids `<tag>-<i>`) until the rollout is no longer
/// active, reaches `last_step`, or `max` requests have gone; its status then, and how many.
async fn drive(
    server: &TestServer,
    tag: &str,
    last_step: u32,
    max: usize,
) -> (pb::RolloutStatus, usize) {
    let mut from = 0;
    loop {
        traffic(&server.channel, tag, from, 500).await;
        from += 500;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let s = rollout_status(&server.channel).await;
        if s.state != "active" || s.step == last_step || from >= max {
            return (s, from);
        }
    }
}

/// Promotes the open rollout and checks that `version` then serves every customer.
async fn promote_and_check(server: &TestServer, version: &str) -> pb::ScoreResponse {
    let promoted = RolloutsClient::new(server.channel.clone())
        .promote(rollout_ref(MODEL))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted.state, "promoted");
    let r = server
        .scoring()
        .score(request(&customers()[0], "after-promote"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.version.as_str(), r.arm),
        (version, pb::Arm::Champion as i32)
    );
    r
}

#[test]
fn assignment_is_sticky_monotone_and_proportional_over_the_taiwan_customers() {
    let ids: Vec<&str> = customers().iter().map(|c| c.id.as_str()).collect();
    for rollout in ["0192-rollout-a", "0192-rollout-b"] {
        let at_5 = ids
            .iter()
            .filter(|id| is_candidate(rollout, id, 500))
            .count();
        let share = at_5 as f64 / ids.len() as f64;
        assert!((share - 0.05).abs() <= 0.005, "{rollout}: {share}");
        for id in &ids {
            let arms: Vec<bool> = [0, 100, 500, 2_500, 5_000, 10_000]
                .iter()
                .map(|s| is_candidate(rollout, id, *s))
                .collect();
            assert!(
                arms.windows(2).all(|w| w[1] || !w[0]),
                "{id} left the candidate: {arms:?}"
            );
            assert!(!arms[0] && arms[5]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flawed_candidate_is_rolled_back_before_it_reaches_one_percent_of_customers() {
    let models = scratch_models();
    flawed_candidate(models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fast_config(models.path(), data.path())).await;
    let started = start_rollout_gated(&server.channel, "v9", &default_steps(), true).await;
    assert_eq!(
        (started.state.as_str(), started.step, started.shadow),
        ("active", 0, true)
    );

    let mut seen = BTreeSet::new();
    let mut got_candidate = BTreeSet::new();
    let mut from = 0;
    let final_status = loop {
        for (id, arm) in traffic(&server.channel, "incident", from, 250).await {
            if arm == pb::Arm::Candidate as i32 {
                got_candidate.insert(id.clone());
            }
            seen.insert(id);
        }
        from += 250;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let s = rollout_status(&server.channel).await;
        if s.state != "active" || from >= customers().len() {
            break s;
        }
    };
    assert_eq!(final_status.state, "rolled_back", "{final_status:?}");
    assert!(
        final_status.step <= 1,
        "caught in shadow or at 1%, not at step {}",
        final_status.step + 1
    );
    assert!(
        got_candidate.len() * 100 <= seen.len(),
        "{} of {} customers got a candidate decision",
        got_candidate.len(),
        seen.len()
    );
    let rollback = final_status.transitions.last().unwrap();
    eprintln!(
        "rolled back at step {} after {} customers ({} got the candidate): {}",
        final_status.step + 1,
        seen.len(),
        got_candidate.len(),
        rollback.reason
    );
    assert_eq!(
        (rollback.to_state.as_str(), rollback.actor.as_str()),
        ("rolled_back", "guardrail")
    );
    let breached: Vec<_> = rollback.figures.iter().filter(|g| g.breached).collect();
    assert!(
        !breached.is_empty(),
        "the rollback record carries the figures"
    );
    assert!(
        rollback.reason.contains(&breached[0].name),
        "{}",
        rollback.reason
    );
    assert_eq!(final_status.share_bp, 0);

    // After the rollback nobody gets the candidate, and the shadow decisions were recorded.
    for (_, arm) in traffic(&server.channel, "after", 0, 500).await {
        assert_eq!(arm, pb::Arm::Champion as i32);
    }
    let mut shadow = 0;
    let mut export = server
        .trace()
        .export(pb::ExportRequest::default())
        .await
        .unwrap()
        .into_inner();
    while let Some(r) = tokio_stream::StreamExt::next(&mut export).await {
        let r = r.unwrap();
        if r.arm == pb::Arm::Shadow as i32 {
            assert_eq!(
                (r.version.as_str(), r.rollout_id.as_str()),
                ("v9", final_status.id.as_str())
            );
            shadow += 1;
        }
    }
    assert!(shadow >= 200, "{shadow} shadow records");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sound_candidate_advances_to_everyone_and_is_promoted() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fast_config(models_v1_v2(), data.path())).await;
    start_rollout_gated(&server.channel, "v2", &default_steps(), true).await;
    let (final_status, from) = drive(&server, "sound", 5, 90_000).await;
    eprintln!("reached 100% after {from} requests");
    // 200 candidate decisions at 1% take about 20,000 requests: no step was skipped.
    assert!(from >= 15_000, "reached 100% after only {from} requests");
    assert_eq!(
        (final_status.state.as_str(), final_status.step),
        ("active", 5),
        "{final_status:?}"
    );
    assert_eq!(final_status.share_bp, 10_000);
    assert!(
        final_status
            .transitions
            .iter()
            .all(|t| t.to_state != "rolled_back")
    );
    assert_eq!(
        final_status
            .transitions
            .iter()
            .filter(|t| t.actor == "auto-advance")
            .count(),
        5
    );

    // At 100% every customer gets v2; promotion makes it the serving version.
    for (_, arm) in traffic(&server.channel, "full", 0, 200).await {
        assert_eq!(arm, pb::Arm::Candidate as i32);
    }
    promote_and_check(&server, "v2").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_the_same_step_with_the_same_customers_in_the_same_arms() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let server = ChildServer::start_with(models_v1_v2(), data.path(), &log).await;
    // The child serves the highest version unless told: serve v1 explicitly.
    let mut admin = riskserve::grpc::pb::models_client::ModelsClient::new(server.channel.clone());
    admin
        .serve_version(pb::VersionRef {
            model: MODEL.into(),
            version: "v1".into(),
        })
        .await
        .unwrap();
    let plan = default_steps().replace("auto_advance = true", "auto_advance = false");
    let started = start_rollout_gated(&server.channel, "v2", &plan, true).await;
    let mut control = RolloutsClient::new(server.channel.clone());
    control.advance(rollout_ref(MODEL)).await.unwrap();
    control.advance(rollout_ref(MODEL)).await.unwrap();
    let before: BTreeMap<String, i32> = traffic(&server.channel, "before", 0, 2_000)
        .await
        .into_iter()
        .collect();
    let candidates = before
        .values()
        .filter(|a| **a == pb::Arm::Candidate as i32)
        .count();
    assert!(
        (50..=150).contains(&candidates),
        "about 5% of 2,000: {candidates}"
    );
    for (id, arm) in &before {
        assert_eq!(
            *arm == pb::Arm::Candidate as i32,
            is_candidate(&started.id, id, 500),
            "{id}"
        );
    }
    server.kill();

    let server = ChildServer::start_with(models_v1_v2(), data.path(), &log).await;
    let s = rollout_status(&server.channel).await;
    assert_eq!(
        (s.id.as_str(), s.state.as_str(), s.step, s.share_bp),
        (started.id.as_str(), "active", 2, 500)
    );
    let after: BTreeMap<String, i32> = traffic(&server.channel, "after", 0, 2_000)
        .await
        .into_iter()
        .collect();
    assert_eq!(
        before, after,
        "every customer in the same arm after the restart"
    );
    server.kill();
}

/// An XGBoost ensemble (the fixture of tests/fixtures/trees, imported) as the candidate
/// against the logistic champion, on the same customers. A new model family moves the PD
/// distribution: the default PSI guardrail sees it and rolls back. An operator who expects
/// that shift raises max_psi for this rollout; the harm guardrails stay at their defaults,
/// and the candidate advances to everyone and is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_candidate_is_guarded_and_promoted_against_the_logistic_champion() {
    let models = scratch_models();
    let fixtures = repo().join("tests/fixtures/trees");
    riskserve::import::import(&riskserve::import::ImportSpec {
        format: riskserve::bundle::SourceFormat::Xgboost,
        file: fixtures.join("xgboost.json"),
        model: MODEL.into(),
        version: "v3".into(),
        schema: Some(fixtures.join("schema.toml")),
        policy: None,
        data: None,
        label: None,
        models_dir: models.path().to_owned(),
        created_at: "2026-12-01T00:00:00Z".into(),
        reason_codes: None,
    })
    .unwrap();
    let plan = fast_plan(&[0, 2500, 10000]);
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fast_config(models.path(), data.path())).await;
    start_rollout_gated(&server.channel, "v3", &plan, true).await;
    let (shifted, _) = drive(&server, "tree-psi", u32::MAX, 10_000).await;
    assert_eq!(shifted.state, "rolled_back", "{shifted:?}");
    let breached: Vec<&str> = shifted
        .guardrails
        .iter()
        .filter(|g| g.breached)
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(breached, ["psi"], "{shifted:?}");

    let plan = plan.replace("min_sample = 200", "min_sample = 200\nmax_psi = 0.6");
    start_rollout_gated(&server.channel, "v3", &plan, true).await;
    let (final_status, _) = drive(&server, "tree", 2, 20_000).await;
    assert_eq!(
        (final_status.state.as_str(), final_status.step),
        ("active", 2),
        "{final_status:?}"
    );
    let advanced = final_status
        .transitions
        .iter()
        .filter(|t| t.actor == "auto-advance")
        .count();
    assert_eq!(advanced, 2, "{final_status:?}");
    // The tree version now serves, with its Shapley values as the reasons.
    let r = promote_and_check(&server, "v3").await;
    assert!(!r.reasons.is_empty());
    server.stop().await.unwrap();
}
