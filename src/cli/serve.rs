//! `riskserve serve`: flags and environment over the config file, logging, the listener,
//! and shutdown on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::config::Config;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "RISKSERVE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Directory of model bundles [default: models].
    #[arg(long, env = "RISKSERVE_MODELS")]
    models: Option<PathBuf>,
    /// Directory for the server's state [default: riskserve-data].
    #[arg(long, env = "RISKSERVE_DATA")]
    data: Option<PathBuf>,
    /// A TOML configuration file; flags and RISKSERVE_* variables override it.
    #[arg(long, env = "RISKSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Make every bundle the watcher loads serve at once.
    #[arg(long, env = "RISKSERVE_AUTO_SERVE")]
    auto_serve: Option<bool>,
    /// Log format.
    #[arg(long, env = "RISKSERVE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Decision log durability: sync (fsync per group commit) or async.
    #[arg(long, env = "RISKSERVE_DURABILITY", value_parser = ["sync", "async"])]
    durability: Option<String>,
    /// Customer HMAC key files, current first, comma-separated.
    #[arg(long, env = "RISKSERVE_CUSTOMER_KEY_FILES", value_delimiter = ',')]
    customer_key_files: Vec<PathBuf>,
    /// Serve plaintext beyond loopback (only behind something that encrypts).
    #[arg(long, env = "RISKSERVE_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
    /// The shared store of several replicas: postgres://USER@HOST:PORT/DB (password also
    /// from PGPASSWORD) [default: the embedded store in the data directory].
    #[arg(long, env = "RISKSERVE_STORE")]
    store: Option<String>,
    /// This replica's name in the shared store [default: host name:port].
    #[arg(long, env = "RISKSERVE_REPLICA_ID")]
    replica_id: Option<String>,
    /// Benchmark baseline: answer decisions without recording them.
    #[arg(long, hide = true)]
    unrecorded_benchmark_only: bool,
}

/// Runs the server until a signal, then flushes the telemetry.
pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let telemetry = crate::telemetry::Telemetry::from_env()?;
    init_logging(&args.log_format, &telemetry);
    tracing::info!(exporting = %telemetry.describe(), "OpenTelemetry");
    let served = serve_until_signal(args).await;
    // Flush the spans and metrics still queued; blocking, so off the runtime's workers.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    served
}

/// Logs to stderr (filtered by RISKSERVE_LOG, default info) and, when traces are exported,
/// the request spans to OpenTelemetry.
fn init_logging(format: &str, telemetry: &crate::telemetry::Telemetry) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    // The request spans are for OpenTelemetry only: even at RISKSERVE_LOG=debug the log
    // leaves them off, so that they stay free unless exported.
    let filter = tracing_subscriber::EnvFilter::try_from_env("RISKSERVE_LOG")
        .unwrap_or_else(|_| "info".into())
        .add_directive(
            format!("{}=off", crate::telemetry::SPAN_TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let otel = telemetry.tracer().map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target() == crate::telemetry::SPAN_TARGET
            }))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
}

async fn serve_until_signal(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(models) = args.models {
        config.models_dir = models;
    }
    if let Some(data) = args.data {
        config.data_dir = data;
    }
    if let Some(auto) = args.auto_serve {
        config.auto_serve = auto;
    }
    if let Some(d) = &args.durability {
        config.durability = match d.as_str() {
            "async" => crate::decision_log::Durability::Async,
            _ => crate::decision_log::Durability::Sync,
        };
    }
    if args.store.is_some() {
        config.store = args.store.clone();
    }
    if args.replica_id.is_some() {
        config.replica_id = args.replica_id.clone();
    }
    config.unrecorded_benchmark_only = args.unrecorded_benchmark_only;
    config.allow_plaintext |= args.allow_plaintext;
    if !args.customer_key_files.is_empty() {
        config.customer_key_files = args.customer_key_files.clone();
    }
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    // For scripts and tests that asked for port 0: the one line riskserve prints on stdout.
    println!("listening on {}", listener.local_addr()?);
    // A write past a file-size limit must fail as an I/O error the decision log handles,
    // not kill the process with SIGXFSZ.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    crate::serve(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
