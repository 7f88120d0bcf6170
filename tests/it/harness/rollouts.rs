//! The Rollouts calls several areas make: start one past the gate, read its status, run a
//! backtest or a remediation to its end.

use riskserve::grpc::pb;
use riskserve::grpc::pb::remediate_update::Update;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::fixtures::MODEL;
use super::server::TestServer;

/// Starts a rollout of `candidate` on [`MODEL`] with `plan` (actor "test"), past the
/// backtest gate.
pub async fn start_rollout(server: &TestServer, candidate: &str, plan: &str) -> pb::RolloutStatus {
    start_rollout_gated(&server.channel, candidate, plan, false).await
}

/// Starts a rollout as [`start_rollout`] through the server on `channel`, through the
/// backtest gate when `gated`.
pub async fn start_rollout_gated(
    channel: &Channel,
    candidate: &str,
    plan: &str,
    gated: bool,
) -> pb::RolloutStatus {
    RolloutsClient::new(channel.clone())
        .start(pb::StartRolloutRequest {
            model: MODEL.into(),
            candidate: candidate.into(),
            plan_toml: plan.into(),
            actor: "test".into(),
            skip_backtest: !gated,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A reference to `model`'s rollout, by the actor "test".
pub fn rollout_ref(model: &str) -> pb::RolloutRef {
    pb::RolloutRef {
        model: model.into(),
        actor: "test".into(),
        reason: String::new(),
    }
}

/// [`MODEL`]'s open or latest rollout, as the server on `channel` reports it.
pub async fn rollout_status(channel: &Channel) -> pb::RolloutStatus {
    RolloutsClient::new(channel.clone())
        .status(rollout_ref(MODEL))
        .await
        .unwrap()
        .into_inner()
}

/// Backtests `candidate` on [`MODEL`]'s recorded traffic (`sample` customers, 0 for all):
/// the report, and how many progress updates came before it.
pub async fn backtest(
    server: &TestServer,
    candidate: &str,
    sample: u64,
) -> (pb::BacktestReport, usize) {
    let mut stream = RolloutsClient::new(server.channel.clone())
        .backtest(pb::BacktestRequest {
            model: MODEL.into(),
            candidate: candidate.into(),
            sample,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut report, mut updates) = (None, 0);
    while let Some(u) = stream.next().await {
        match u.unwrap().update {
            Some(pb::backtest_progress::Update::Report(r)) => report = Some(r),
            Some(pb::backtest_progress::Update::Done(_)) => updates += 1,
            None => {}
        }
    }
    (report.expect("a report"), updates)
}

/// Calls Remediate: what it streamed as applied, and its summary.
pub async fn run_remediation(
    server: &TestServer,
    request: pb::RemediateRequest,
) -> Result<(Vec<pb::HarmedCustomer>, pb::RemediationSummary), tonic::Status> {
    let mut stream = RolloutsClient::new(server.channel.clone())
        .remediate(request)
        .await?
        .into_inner();
    let (mut applied, mut summary) = (Vec::new(), None);
    while let Some(update) = stream.next().await {
        match update?.update {
            Some(Update::Applied(h)) => applied.push(h),
            Some(Update::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    Ok((applied, summary.expect("a summary ends every call")))
}
