//! Impact preview: a candidate re-scored on recorded Taiwan traffic before any customer sees
//! it, the gate it puts in front of `rollout start`, and its figures against what a real
//! rollout of the same customers records.

use crate::harness::*;
use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use tokio_stream::StreamExt;
use tonic::Code;

fn config(models: &std::path::Path, data: &std::path::Path) -> riskserve::Config {
    riskserve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models.to_owned(),
        data_dir: data.to_owned(),
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        ..riskserve::Config::default()
    }
}

fn start_request(candidate: &str, plan: &str) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        model: MODEL.into(),
        candidate: candidate.into(),
        plan_toml: plan.into(),
        actor: "test".into(),
        skip_backtest: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_names_the_harmed_segment_and_the_gate_refuses_the_flawed_candidate() {
    let models = scratch_models();
    flawed_candidate(models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config(models.path(), data.path())).await;
    record_traffic(&server, "v1", 3_000).await;

    let (flawed, updates) = backtest(&server, "v9", 0).await;
    assert_eq!(flawed.compared, 3_000);
    assert!(updates >= 1, "progress was streamed");
    assert!(!flawed.passed);
    let withdrawal = flawed
        .guardrails
        .iter()
        .find(|g| g.name == "withdrawal_rate_diff")
        .unwrap();
    assert!(withdrawal.breached, "{withdrawal:?}");
    let worst = &flawed.segments[0];
    assert_eq!(worst.feature, "AGE", "{:?}", flawed.segments);
    assert!(
        worst.high <= 30.0 && worst.withdrawn_share > 0.5,
        "{worst:?}"
    );
    let cand = flawed.candidate_limits.unwrap();
    let champ = flawed.champion_limits.unwrap();
    assert!(
        cand.withdrawn > champ.withdrawn + 300,
        "{champ:?} → {cand:?}"
    );
    assert!(
        flawed
            .decision_matrix
            .keys()
            .any(|k| k.ends_with("→decline"))
    );

    let mut control = RolloutsClient::new(server.channel.clone());
    let refused = control.start(start_request("v9", "")).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("withdrawal_rate_diff"),
        "{}",
        refused.message()
    );
    assert_eq!(
        control
            .list(pb::ListRolloutsRequest {})
            .await
            .unwrap()
            .into_inner()
            .rollouts
            .len(),
        0
    );

    let (sound, _) = backtest(&server, "v2", 0).await;
    assert!(sound.passed, "{:?}", sound.guardrails);
    let started = control
        .start(start_request("v2", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, "active");
    let stored = started
        .backtest
        .expect("the preview is stored with the rollout");
    assert_eq!(stored.compared, 3_000);
    assert!(stored.passed);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_equals_what_a_rollout_to_everyone_records_and_is_deterministic() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config(models_v1_v2(), data.path())).await;
    record_traffic(&server, "v1", 2_000).await;

    let (a, _) = backtest(&server, "v2", 500).await;
    let (b, _) = backtest(&server, "v2", 500).await;
    assert_eq!(a, b, "same window, bundles and sample: same numbers");
    assert_eq!(a.compared, 500);

    let (preview, _) = backtest(&server, "v2", 0).await;
    let everyone = "auto_advance = false\n[[steps]]\nshare_bp = 10000\n";
    RolloutsClient::new(server.channel.clone())
        .start(start_request("v2", everyone))
        .await
        .unwrap();
    // The same customers, same inputs and current limits, now all decided by v2.
    record_traffic(&server, "v2", 2_000).await;
    let recorded = server
        .trace()
        .by_version(pb::ByVersionRequest {
            model: MODEL.into(),
            version: "v2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cand = preview.candidate_limits.unwrap();
    assert_eq!(recorded.decisions, preview.compared);
    assert_eq!(
        (
            recorded.raised,
            recorded.held,
            recorded.cut,
            recorded.withdrawn
        ),
        (cand.raised, cand.held, cand.cut, cand.withdrawn)
    );
    let count = |to: &str| -> u64 {
        preview
            .decision_matrix
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("→{to}")))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        (recorded.approve, recorded.review, recorded.decline),
        (count("approve"), count("review"), count("decline"))
    );
    server.stop().await.unwrap();
}

/// The status a backtest ends with, whether the call or its stream refuses it.
async fn backtest_refusal(server: &TestServer, sample: u64) -> tonic::Status {
    let call = RolloutsClient::new(server.channel.clone())
        .backtest(pb::BacktestRequest {
            model: MODEL.into(),
            candidate: "v2".into(),
            sample,
            all_decisions: true,
            ..Default::default()
        })
        .await;
    let mut stream = match call {
        Err(status) => return status,
        Ok(stream) => stream.into_inner(),
    };
    while let Some(u) = stream.next().await {
        if let Err(status) = u {
            return status;
        }
    }
    panic!("the backtest of sample {sample} was not refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtest_holds_no_more_decisions_than_the_server_allows() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        backtest_max_sample: 50,
        ..config(models_v1_v2(), data.path())
    })
    .await;
    record_traffic(&server, "v1", 80).await;

    // The whole window (80 decisions) would exceed the bound: refused, naming the sample.
    let whole = backtest_refusal(&server, 0).await;
    assert_eq!(whole.code(), Code::FailedPrecondition, "{whole:?}");
    assert!(whole.message().contains("more than 50"), "{whole:?}");
    assert_eq!(violation_field(&whole), "sample");
    // A sample above the bound is refused before any work.
    let over = backtest_refusal(&server, 51).await;
    assert_eq!(over.code(), Code::InvalidArgument, "{over:?}");
    assert!(over.message().contains("at most 50"), "{over:?}");
    assert_eq!(violation_field(&over), "sample");
    // Within it, the preview runs.
    let (report, _) = backtest(&server, "v2", 50).await;
    assert_eq!(report.compared + report.unscorable, 50);
    // The start gate keeps to the bound too: it previews 50 customers, not all 80.
    let started = RolloutsClient::new(server.channel.clone())
        .start(start_request("v2", ""))
        .await
        .unwrap()
        .into_inner();
    let gate = started.backtest.expect("the gate's preview");
    assert_eq!(gate.compared + gate.unscorable, 50);
    server.stop().await.unwrap();
}
