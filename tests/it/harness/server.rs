//! riskserve served from this process on 127.0.0.1:0 (`TestServer`), its configuration, and
//! the field a refusal names.

use std::net::SocketAddr;
use std::path::Path;

use riskserve::Config;
use riskserve::grpc::pb;
use riskserve::grpc::pb::models_client::ModelsClient;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use riskserve::grpc::pb::trace_client::TraceClient;
use riskserve::server::ServeError;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::fixtures::MODEL;

/// The field a refusal names in its BadRequest details (panics if it names none).
pub fn violation_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    let details = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no field violation in {status:?}"));
    details.field_violations[0].field.clone()
}

/// The tests' server configuration: 127.0.0.1:0, these models with v1 pinned to serve
/// (otherwise the highest version would), state in `data`.
pub fn config(models_dir: &Path, data: &Path) -> Config {
    Config {
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models_dir.to_owned(),
        data_dir: data.to_owned(),
        watch_interval_ms: 100,
        grace_period_secs: 5,
        ..Config::default()
    }
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// Starts riskserve on 127.0.0.1:0 with these models, state in `data`, and v1 pinned to
    /// serve (otherwise the highest version would).
    pub async fn start(models_dir: &Path, data: &Path) -> TestServer {
        TestServer::start_with(config(models_dir, data)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let mut handle = tokio::spawn(riskserve::serve(listener, config, async {
            let _ = rx.await;
        }));
        // A server that stops before it answers says why, rather than leaving a refused
        // connection to puzzle over.
        tokio::task::yield_now().await;
        if handle.is_finished() {
            let why = (&mut handle).await;
            panic!("the server stopped as it started: {why:?}");
        }
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // serve() loads bundles before it accepts; wait until it answers.
        let mut models = ModelsClient::new(channel.clone());
        for _ in 0..200 {
            if models.list_models(pb::ListModelsRequest {}).await.is_ok() {
                break;
            }
            if handle.is_finished() {
                let why = (&mut handle).await;
                panic!("the server stopped as it started: {why:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        TestServer {
            addr,
            channel,
            shutdown: Some(tx),
            handle,
        }
    }

    pub fn scoring(&self) -> ScoringClient<Channel> {
        ScoringClient::new(self.channel.clone())
    }

    pub fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel.clone())
    }

    /// How many decisions the log holds, once its chain has verified.
    pub async fn records(&self) -> u64 {
        let verified = self
            .trace()
            .verify(pb::VerifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(verified.ok, "the decision log verifies: {verified:?}");
        verified.records
    }

    pub fn trace(&self) -> TraceClient<Channel> {
        TraceClient::new(self.channel.clone())
    }

    /// Signals shutdown and waits for serve() to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.handle).await.unwrap()
    }
}

/// Scores test customers `range` (request ids `<tag>-<i>`) in one ScoreBatch; their
/// answers, in order.
pub async fn score_range(
    server: &TestServer,
    tag: &str,
    range: std::ops::Range<usize>,
) -> Vec<pb::ScoreResponse> {
    let all = super::customers::customers();
    let requests = range
        .clone()
        .map(|i| super::customers::request(&all[i], &format!("{tag}-{i}")))
        .collect();
    let items = server
        .scoring()
        .score_batch(pb::ScoreBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .items;
    range
        .zip(items)
        .map(|(i, item)| match item.outcome {
            Some(pb::score_batch_item::Outcome::Response(r)) => r,
            other => panic!("customer {i}: {other:?}"),
        })
        .collect()
}

/// Records decisions for the first `n` test customers, 1,000 per ScoreBatch (request ids
/// `<tag>-<i>`); their answers, in order.
pub async fn record_traffic(server: &TestServer, tag: &str, n: usize) -> Vec<pb::ScoreResponse> {
    let mut answers = Vec::with_capacity(n);
    for from in (0..n).step_by(1_000) {
        answers.extend(score_range(server, tag, from..n.min(from + 1_000)).await);
    }
    answers
}
