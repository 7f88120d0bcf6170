//! Assembles and runs the server: registry, bundle watcher, health, reflection and the gRPC
//! services, on a listener the caller has already bound, until `shutdown` resolves.
//!
//! Shutdown order: health turns NOT_SERVING at once, the server stops accepting and drains
//! in-flight requests, for at most the grace period, then background tasks are stopped and
//! awaited. Readiness ("" and `riskserve.v1.Scoring` in grpc.health.v1) is SERVING only while
//! every model has a serving version; `liveness` is SERVING from start to shutdown, whatever
//! happens to loads.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::backtest::Backtester;
use crate::config::{Config, ConfigError, TlsConfig};
use crate::customer::{CustomerKeys, KeyError};
use crate::decision_log::{
    DecisionLog, JournalLog, LogError, LogOptions, PgLog, PgLogOptions, Unrecorded,
};
use crate::grpc::gate::GateLayer;
use crate::grpc::gate::admission::Admission;
use crate::grpc::gate::auth::Authorizer;
use crate::grpc::pb::models_server::ModelsServer;
use crate::grpc::pb::rollouts_server::RolloutsServer;
use crate::grpc::pb::scoring_server::ScoringServer;
use crate::grpc::pb::trace_server::TraceServer;
use crate::grpc::v2::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::grpc::{
    InferenceService, ModelsService, RolloutsService, ScoringService, TraceService, pb,
};
use crate::registry::{Registry, RegistryError};
use crate::remediation::Remediator;
use crate::rollout::store::{RolloutStore, StoreError};
use crate::rollout::{Control, Evaluator, Follower, History, RolloutError, Router};
use crate::scoring::{Recorder, Scorer, Shadow};
use crate::trace::Tracer;
use crate::watcher;

/// Health service names, besides the per-service ones.
pub const LIVENESS: &str = "liveness";
const SCORING: &str = "riskserve.v1.Scoring";
const MODELS: &str = "riskserve.v1.Models";
/// How often a replica re-reads the shared store besides the changes announced to it.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the server could not start or stopped with an error. A wrapped error is the
/// `source`, not repeated in the message: the CLI prints the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("opening the decision log")]
    DecisionLog(#[from] LogError),
    #[error("opening the shared store")]
    Store(#[from] crate::postgres::PgError),
    #[error(transparent)]
    RolloutStore(#[from] StoreError),
    #[error("resuming rollouts")]
    Rollouts(#[from] RolloutError),
    #[error("building reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport")]
    Transport(#[from] tonic::transport::Error),
    #[error("reading TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs riskserve on `listener` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    let keys = customer_keys(&config)?;
    // The shared store, when replicas share one: decisions, rollouts and serving choices.
    let pg = match &config.store {
        Some(url) => Some(crate::postgres::Pg::open(url).await?),
        None => None,
    };
    let log: Arc<dyn DecisionLog> = if config.unrecorded_benchmark_only {
        tracing::warn!("RECORDING NOTHING: benchmark baseline; never run this in production");
        Arc::new(Unrecorded::default())
    } else if let Some(pg) = &pg {
        let replica_id = config.replica_id(listener.local_addr().map_or(0, |a| a.port()));
        tracing::info!(store = %pg.shown(), replica = %replica_id, "decision log in the shared store");
        PgLog::open(
            pg.clone(),
            PgLogOptions {
                replica_id,
                max_batch: config.log_batch,
                queue_capacity: config.log_queue,
            },
        )
        .await?
    } else {
        JournalLog::open(
            &config.data_dir,
            LogOptions {
                durability: config.durability,
                max_batch: config.log_batch,
                queue_capacity: config.log_queue,
                segment_bytes: config.log_segment_bytes,
                min_free_bytes: config.log_min_free_bytes,
                retention: config.log_retention()?,
                max_view_lag: config.log_max_view_lag,
            },
        )?
    };

    let registry = Arc::new(Registry::new(
        config.models_dir.clone(),
        Some(config.data_dir.join("serving.toml")),
    ));
    for (model, version, _) in watcher::scan(&config.models_dir) {
        // A refused bundle is logged and listed as failed; it must not stop the others.
        let _ = registry.load(&model, &version).await;
    }
    let store = Arc::new(match &pg {
        Some(pg) => RolloutStore::shared(pg.clone()),
        None => RolloutStore::open(&crate::decision_log::LogFiles::of(&config.data_dir).rollouts)?,
    });
    // What the replicas serve, unless pinned here.
    let mut serving = store.serving()?;
    serving.extend(config.serving.clone());
    registry.choose_initial_serving(&serving).await?;

    let stop = CancellationToken::new();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(MODELS, ServingStatus::Serving)
        .await;
    // Set at shutdown, under its lock, once health turns NOT_SERVING for good.
    let health_closed = Arc::new(tokio::sync::Mutex::new(false));
    let health_task = tokio::spawn(follow_readiness(
        reporter.clone(),
        registry.clone(),
        log.healthy(),
        health_closed.clone(),
        stop.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Rollouts, one part per job: the request path's router, control operations behind the
    // backtest gate, the guardrail evaluator, and the history.
    let router = Arc::new(Router::new());
    let backtester = Arc::new(Backtester::new(
        registry.clone(),
        log.clone(),
        config.backtest_max_sample,
    ));
    let control = Arc::new(Control::open(
        store.clone(),
        registry.clone(),
        router.clone(),
        backtester.clone(),
    )?);
    let history = Arc::new(History::new(router.clone(), store.clone(), log.clone()));
    // Among replicas, one at a time judges the guardrails: the follower's lease says which.
    let (lease, follower_task) = match &pg {
        Some(pg) => {
            let (follower, lease) = Follower::new(pg.clone(), control.clone(), FOLLOW_EVERY);
            (lease, Some(tokio::spawn(follower.run(stop.clone()))))
        }
        None => (watch::channel(true).1, None),
    };
    let evaluator = Evaluator::new(
        router.clone(),
        control.clone(),
        store.clone(),
        log.clone(),
        lease,
        std::time::Duration::from_millis(config.rollout_snapshot_interval_ms),
    );
    let evaluator_task = tokio::spawn(evaluator.run(
        std::time::Duration::from_millis(config.rollout_eval_interval_ms),
        stop.clone(),
    ));
    let watcher_task = tokio::spawn(watcher::run(
        registry.clone(),
        control.clone(),
        config.watch_interval(),
        config.auto_serve,
        stop.clone(),
    ));
    let recorder = Recorder::new(log.clone(), keys.clone());
    let (shadow, shadow_worker) =
        Shadow::new(config.shadow_queue, router.clone(), recorder.clone());
    let shadow_task = tokio::spawn(shadow_worker.run(stop.clone()));
    let scorer = Scorer::new(registry.clone(), router.clone(), recorder, shadow);
    // Kept until the server stops: the gauges report while their handles live.
    let _gauges = crate::telemetry::observe_state(registry.clone(), router, log.clone());
    let inference = InferenceService::new(
        scorer.clone(),
        registry.clone(),
        log.healthy(),
        stop.clone(),
        config.max_batch,
    );
    let scoring = ScoringService::new(scorer, config.max_batch);
    let remediator = Arc::new(Remediator::new(
        log.clone(),
        registry.clone(),
        store.clone(),
    ));
    let trace = TraceService::new(Tracer::new(log.clone(), registry.clone(), keys, store));
    let max_message = config.max_message_bytes;
    let authorizer = Arc::new(Authorizer::new(&config.auth, config.listen));
    let keepalive = std::time::Duration::from_secs(config.http2_keepalive_secs);
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive));
    if let Some(tls) = tls_config(&config.tls)? {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .layer(
            tower::ServiceBuilder::new()
                .layer(GateLayer(authorizer))
                .layer(GateLayer(Admission::new(
                    config.max_concurrent_requests,
                    std::time::Duration::from_millis(config.overload_pushback_ms),
                ))),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ScoringServer::new(scoring).max_decoding_message_size(max_message))
        .add_service(
            GrpcInferenceServiceServer::new(inference).max_decoding_message_size(max_message),
        )
        .add_service(
            ModelsServer::new(ModelsService::new(registry.clone(), control.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            RolloutsServer::new(RolloutsService::new(
                control, history, backtester, remediator,
            ))
            .max_decoding_message_size(max_message),
        )
        .add_service(TraceServer::new(trace).max_decoding_message_size(max_message));

    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, models = %config.models_dir.display(), "riskserve listening");

    let signal = {
        let (stop, reporter, closed) = (stop.clone(), reporter.clone(), health_closed.clone());
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            // Under the lock readiness updates take: none can land after these.
            let mut closed = closed.lock().await;
            *closed = true;
            for name in ["", SCORING, MODELS, LIVENESS] {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            drop(closed);
            stop.cancel();
        }
    };
    // Small request/response pairs: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
    // hold each answer for tens of milliseconds.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    let grace = config.grace_period();
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period over with requests still in flight; closing");
            Ok(())
        }
    };
    stop.cancel();
    let _ = tokio::join!(watcher_task, health_task, evaluator_task, shadow_task);
    if let Some(task) = follower_task {
        let _ = task.await;
    }
    // Everything answered is already durable; this commits what was queued but unanswered.
    let _ = tokio::task::spawn_blocking(move || log.close()).await;
    tracing::info!("riskserve stopped");
    result
}

/// The rustls configuration from the `[tls]` files; `None` for plaintext.
fn tls_config(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>, ServeError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(!tls.client_cert_required);
    }
    Ok(Some(config))
}

/// The customer keys: configured files, or on loopback only and without a shared store, a
/// development key kept in the data directory.
fn customer_keys(config: &Config) -> Result<CustomerKeys, ServeError> {
    if !config.customer_key_files.is_empty() {
        return Ok(CustomerKeys::from_files(&config.customer_key_files)?);
    }
    if !config.listen.ip().is_loopback() {
        return Err(KeyError::Missing.into());
    }
    if config.store.is_some() {
        return Err(KeyError::NotShared.into());
    }
    let path = config.data_dir.join("customer-dev.key");
    tracing::warn!(
        path = %path.display(),
        "no customer_key_files configured: using a development key (loopback only)"
    );
    Ok(CustomerKeys::dev_key(&path)?)
}

/// Mirrors readiness (every model serving, and the decision log writable) into the health
/// service until shutdown.
async fn follow_readiness(
    reporter: HealthReporter,
    registry: Arc<Registry>,
    mut log_healthy: watch::Receiver<bool>,
    closed: Arc<tokio::sync::Mutex<bool>>,
    stop: CancellationToken,
) {
    let mut ready = registry.subscribe_ready();
    loop {
        let status = if registry.is_ready() && *log_healthy.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        {
            // Checked and written under one lock, so shutdown's NOT_SERVING is the last word.
            let closed = closed.lock().await;
            if *closed {
                return;
            }
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SCORING, status).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = ready.changed() => if changed.is_err() { return },
            changed = log_healthy.changed() => if changed.is_err() { return },
        }
    }
}
