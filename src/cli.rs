//! The `riskserve` command line: `serve`, `train`, `score`, `models`, `rollout`, `backtest`,
//! `trace`, `report`, `demo` and `bench`.
//!
//! Arguments are parsed by clap into typed structs before any work starts; every command
//! returns `anyhow::Result`, and `main` prints errors with their whole cause chain. Client
//! commands talk to a running server (`--server`, default the local one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::bench::{self, BenchArgs};
use crate::bundle::Manifest;
use crate::config::Config;
use crate::grpc::pb;
use crate::grpc::pb::models_client::ModelsClient;
use crate::grpc::pb::scoring_client::ScoringClient;
use crate::train::{self, Stage, TrainSpec};

#[derive(Debug, Parser)]
#[command(
    name = "riskserve",
    version,
    about = "Serve, roll out and audit credit-risk models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Train a new model version from a CSV file and write its bundle.
    Train(TrainArgs),
    /// Score one customer on a running server.
    Score(ScoreArgs),
    /// List, show, load, serve or unload model versions on a running server.
    Models {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Roll a candidate version out in steps, watch its guardrails, promote or roll back.
    Rollout {
        #[command(flatten)]
        server: ServerArg,
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Preview what a candidate would do to recently decided customers, before any sees it.
    Backtest {
        #[command(flatten)]
        server: ServerArg,
        model: String,
        #[arg(long)]
        candidate: String,
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
        /// At most this many customers (or decisions); the server holds at most its
        /// `backtest_max_sample` either way.
        #[arg(long)]
        sample: Option<u64>,
        /// Every decision in the window, not each customer's latest.
        #[arg(long)]
        all_decisions: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ask the decision log: a decision, a customer's history, explain, replay, verify.
    Trace {
        #[command(flatten)]
        server: ServerArg,
        /// Print JSON lines instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        query: TraceQuery,
    },
    /// Write a rollout's or a customer's history as one self-contained HTML page.
    Report {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        what: ReportKind,
    },
    /// The incident end to end on a private server: a flawed version caught and rolled back,
    /// the affected customer traced, a sound version rolled out to everyone.
    Demo(crate::demo::DemoArgs),
    /// Make a bearer token for a caller: prints the token once, and the config entry that
    /// holds only its hash.
    Token {
        /// The caller's name, recorded with every decision and transition they make.
        #[arg(long)]
        name: String,
        /// Roles: scorer (Scoring), operator (Models, Rollouts), reviewer (Trace).
        #[arg(long = "role", required = true, value_parser = ["scorer", "operator", "reviewer"])]
        roles: Vec<String>,
    },
    /// Closed-loop load generator against a running server; prints one JSON line.
    Bench(BenchArgs),
    /// Fill a data directory's decision log with scored decisions, for lookup benchmarks.
    #[command(hide = true)]
    BenchFillLog {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        decisions: u64,
        #[arg(long)]
        customers: u64,
        #[arg(long, default_value = "models/credit-limit/v1")]
        bundle: PathBuf,
        #[arg(long, default_value = "data/taiwan_credit_default.csv")]
        csv: PathBuf,
    },
    /// A server whose Score does no work: the ceiling for `bench` on the same machine.
    #[command(hide = true)]
    BenchEmptyServer {
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
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
    /// Benchmark baseline: answer decisions without recording them.
    #[arg(long, hide = true)]
    unrecorded_benchmark_only: bool,
}

#[derive(Debug, Subcommand)]
enum RolloutAction {
    /// Start rolling CANDIDATE out against the serving version.
    Start {
        model: String,
        #[arg(long)]
        candidate: String,
        /// A plan (TOML: steps, guardrails, auto_advance); default plan without it.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Start without the backtest gate (recorded with your name).
        #[arg(long)]
        skip_backtest: bool,
    },
    /// Step, share, per-arm counts and every guardrail against its threshold.
    Status { model: String },
    /// Move to the next step now.
    Advance {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop advancing (guardrails still watch).
    Pause {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Advance on its own again after a pause.
    Resume {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Candidate share to 0 now.
    Rollback {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make the candidate the serving version.
    Promote {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every rollout, newest first.
    List,
}

#[derive(Debug, Subcommand)]
enum TraceQuery {
    /// The whole record of one decision.
    Decision { decision_id: String },
    /// A customer's decisions, oldest first, with each limit change marked.
    Customer { customer_id: String },
    /// What differs from the customer's previous decision.
    Explain { decision_id: String },
    /// Re-score the recorded inputs with the recorded bundle and compare bit for bit.
    Replay { decision_id: String },
    /// Walk the hash chain and report the first broken link.
    Verify,
    /// What one version decided: counts, decline rate, limits raised, cut, withdrawn.
    ByVersion {
        model: String,
        version: String,
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
    },
    /// Every record in a window, for analysts.
    Export {
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum ReportKind {
    /// A rollout: step timeline, arm shares, guardrails against thresholds, PD distributions.
    Rollout {
        /// The rollout's id (see `rollout list`); without it, `--model`'s open or latest one.
        id: Option<String>,
        #[arg(long, required_unless_present = "id")]
        model: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A customer's limit over time, each change marked with the version and arm that made it.
    Customer {
        customer_id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// The training CSV (numeric columns with a header).
    #[arg(long)]
    data: PathBuf,
    /// The 0/1 label column (1 = defaulted).
    #[arg(long)]
    label: String,
    #[arg(long)]
    model: String,
    #[arg(long)]
    version: String,
    /// Columns not to train on (ids, prohibited bases).
    #[arg(long, num_args = 1..)]
    exclude: Vec<String>,
    /// Share of each class held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Feature schema (types, ranges, missing rules); default: observed ranges.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Limit policy (TOML); default: the built-in credit-limit policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Where bundles are written.
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Creation time for the manifest (RFC 3339); fix it to reproduce a digest.
    /// Default: $SOURCE_DATE_EPOCH if set, else now.
    #[arg(long)]
    created_at: Option<String>,
}

#[derive(Debug, Clone, Args)]
struct ServerArg {
    /// The riskserve server to talk to.
    #[arg(
        long,
        global = true,
        env = "RISKSERVE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
}

#[derive(Debug, Args)]
struct ScoreArgs {
    #[command(flatten)]
    server: ServerArg,
    #[arg(long, default_value = "credit-limit")]
    model: String,
    /// The customer's id (default with --csv: the row's USER_ID).
    #[arg(long)]
    customer: Option<String>,
    #[arg(long)]
    current_limit: Option<i64>,
    /// A feature value, NAME=VALUE; repeat for each feature.
    #[arg(long = "feature", value_name = "NAME=VALUE")]
    features: Vec<String>,
    /// Take features (and current limit, customer id) from a CSV file...
    #[arg(long, requires = "row")]
    csv: Option<PathBuf>,
    /// ...at this data row (1 = the first row after the header).
    #[arg(long, requires = "csv")]
    row: Option<usize>,
    /// Request id; default: a fresh UUIDv7. Reuse one to retry.
    #[arg(long)]
    request_id: Option<String>,
    /// Print the response as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Every model and version with its state.
    List,
    /// A version's manifest.
    Show { model: String, version: String },
    /// Load models/<MODEL>/<VERSION> (verify, validate, warm up).
    Load { model: String, version: String },
    /// Make a loaded version serve.
    Serve { model: String, version: String },
    /// Unload a version that does not serve.
    Unload { model: String, version: String },
}

/// Runs the command line and turns errors into a message and exit code 2.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("riskserve: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Train(args) => train_cmd(args),
        Command::Score(args) => runtime.block_on(score(args)),
        Command::Models { server, action } => runtime.block_on(models(server, action)),
        Command::Rollout {
            server,
            json,
            action,
        } => runtime.block_on(rollout_cmd(&server.server, json, action)),
        Command::Backtest {
            server,
            model,
            candidate,
            since,
            until,
            sample,
            all_decisions,
            json,
        } => runtime.block_on(backtest_cmd(
            &server.server,
            pb::BacktestRequest {
                model,
                candidate,
                since,
                until,
                sample: sample.unwrap_or(0),
                all_decisions,
            },
            json,
        )),
        Command::Trace {
            server,
            json,
            query,
        } => runtime.block_on(crate::cli_trace::run(
            &server.server,
            json,
            query_args(query),
        )),
        Command::Report { server, what } => runtime.block_on(report_cmd(&server.server, what)),
        Command::Demo(args) => runtime
            .block_on(crate::demo::run(args))
            .map(|_| ExitCode::SUCCESS),
        Command::Token { name, roles } => token_cmd(&name, &roles),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::BenchEmptyServer { listen } => runtime.block_on(bench::empty_server(listen)),
        Command::BenchFillLog {
            data,
            decisions,
            customers,
            bundle,
            csv,
        } => runtime.block_on(bench::fill_log(&data, decisions, customers, &bundle, &csv)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
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

fn train_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let created_at = match args.created_at {
        Some(t) => t,
        None => {
            let when = match std::env::var("SOURCE_DATE_EPOCH") {
                Ok(secs) => {
                    let secs: u64 = secs.parse().context("SOURCE_DATE_EPOCH is not a number")?;
                    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
                }
                Err(_) => SystemTime::now(),
            };
            humantime::format_rfc3339_seconds(when).to_string()
        }
    };
    let spec = TrainSpec {
        data: args.data,
        label: args.label,
        model: args.model,
        version: args.version,
        exclude: args.exclude,
        holdout: args.holdout,
        seed: args.seed,
        schema: args.schema,
        policy: args.policy,
        models_dir: args.models,
        created_at,
    };
    let bar = indicatif::ProgressBar::new(Stage::ALL.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:20}] {pos}/{len} {msg} ({elapsed})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut started = 0;
    let report = train::train(&spec, &mut |stage| {
        bar.set_position(started);
        bar.set_message(stage.describe());
        started += 1;
    });
    bar.finish_and_clear();
    let report = report?;
    let m = &report.manifest;
    println!(
        "trained {}/{} in {}",
        m.model,
        m.version,
        report.dir.display()
    );
    println!();
    let rows = [
        ("digest", report.digest.to_string()),
        ("features", m.features.len().to_string()),
        ("excluded", m.training.excluded.join(", ")),
        ("train rows", report.train_rows.to_string()),
        (
            "holdout rows",
            format!(
                "{} ({} defaults)",
                m.metrics.holdout_rows, m.metrics.holdout_defaults
            ),
        ),
        ("AUC", format!("{:.4}", m.metrics.auc)),
        ("KS", format!("{:.4}", m.metrics.ks)),
        ("Gini", format!("{:.4}", m.metrics.gini)),
        ("Brier", format!("{:.4}", m.metrics.brier)),
        ("created at", m.created_at.clone()),
    ];
    for (k, v) in rows {
        println!("  {k:<13} {v}");
    }
    Ok(ExitCode::SUCCESS)
}

fn token_cmd(name: &str, roles: &[String]) -> anyhow::Result<ExitCode> {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("rs_{}", hex::encode(secret));
    let entry = crate::grpc::gate::auth::TokenEntry {
        name: name.into(),
        roles: roles
            .iter()
            .map(|r| toml::Value::String(r.clone()).try_into())
            .collect::<Result<_, _>>()
            .context("unknown role")?,
        sha256: crate::grpc::gate::auth::token_sha256(&token),
    };
    eprintln!("give this token to {name} (it is shown only now; callers set RISKSERVE_TOKEN):");
    println!("{token}");
    eprintln!("\nand add this to the server's config file:\n");
    eprintln!(
        "[[auth.tokens]]\n{}",
        toml::to_string(&entry).context("writing the entry")?
    );
    Ok(ExitCode::SUCCESS)
}

/// A refusal from the server as a CLI error: the gRPC code and the server's message.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A connection to the server that sends the caller's credentials with every request.
pub type Conn = InterceptedService<Channel, Credentials>;

/// The bearer token from `RISKSERVE_TOKEN`, if set (kept off the command line, where any
/// user of the machine could read it).
#[derive(Debug, Clone)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Connects to `--server`, accepting a bare `host:port`. `https://` uses TLS, trusting
/// `RISKSERVE_CA_CERT` (PEM) if set, and presents `RISKSERVE_CLIENT_CERT` and
/// `RISKSERVE_CLIENT_KEY` for mutual TLS; `RISKSERVE_TOKEN` is sent as a bearer token.
pub async fn connect(server: &str) -> anyhow::Result<Conn> {
    let uri = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let mut endpoint = Channel::from_shared(uri.clone())
        .with_context(|| format!("bad server address {server}"))?
        .connect_timeout(Duration::from_secs(5));
    if uri.starts_with("https://") {
        let read = |var: &str| -> anyhow::Result<Option<Vec<u8>>> {
            match std::env::var_os(var) {
                Some(path) => std::fs::read(&path)
                    .map(Some)
                    .with_context(|| format!("reading {var}={}", Path::new(&path).display())),
                None => Ok(None),
            }
        };
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = read("RISKSERVE_CA_CERT")? {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        match (
            read("RISKSERVE_CLIENT_CERT")?,
            read("RISKSERVE_CLIENT_KEY")?,
        ) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
            (None, None) => {}
            _ => bail!("RISKSERVE_CLIENT_CERT and RISKSERVE_CLIENT_KEY go together"),
        }
        endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let token = match std::env::var("RISKSERVE_TOKEN") {
        Ok(t) if !t.is_empty() => Some(
            format!("Bearer {t}")
                .parse()
                .context("RISKSERVE_TOKEN holds characters a header cannot carry")?,
        ),
        _ => None,
    };
    Ok(InterceptedService::new(channel, Credentials(token)))
}

async fn serving_manifest(channel: Conn, model: &str) -> anyhow::Result<Manifest> {
    let mut client = ModelsClient::new(channel);
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await?
        .into_inner();
    let Some(entry) = models.models.iter().find(|m| m.name == model) else {
        bail!("the server has no model {model}");
    };
    if entry.serving_version.is_empty() {
        bail!("model {model} has no serving version");
    }
    let manifest = client
        .get_manifest(pb::VersionRef {
            model: model.into(),
            version: entry.serving_version.clone(),
        })
        .await?
        .into_inner();
    toml::from_str(&manifest.manifest_toml).context("parsing the serving manifest")
}

/// One CSV row as header → cell.
pub fn csv_row(path: &Path, row: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let record = reader
        .records()
        .nth(row.checked_sub(1).context("--row counts from 1")?)
        .with_context(|| format!("{} has no row {row}", path.display()))??;
    Ok(headers
        .iter()
        .map(String::from)
        .zip(record.iter().map(String::from))
        .collect())
}

fn feature_value(text: &str) -> pb::FeatureValue {
    use pb::feature_value::Kind;
    let kind = if let Ok(i) = text.parse::<i64>() {
        Kind::Integer(i)
    } else if let Ok(x) = text.parse::<f64>() {
        Kind::Number(x)
    } else if let Ok(b) = text.parse::<bool>() {
        Kind::Flag(b)
    } else {
        Kind::Text(text.to_string())
    };
    pb::FeatureValue { kind: Some(kind) }
}

async fn score(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let channel = connect(&args.server.server).await?;
    let mut features = BTreeMap::new();
    let mut customer = args.customer;
    let mut current_limit = args.current_limit;
    if let (Some(path), Some(row)) = (&args.csv, args.row) {
        let cells = csv_row(path, row)?;
        let manifest = serving_manifest(channel.clone(), &args.model).await?;
        for spec in &manifest.features {
            if let Some(cell) = cells.get(&spec.name) {
                features.insert(spec.name.clone(), feature_value(cell));
            }
        }
        customer = customer.or_else(|| cells.get("USER_ID").cloned());
        if current_limit.is_none() {
            current_limit = cells
                .get("CREDIT_LIMIT")
                .and_then(|c| c.parse::<f64>().ok())
                .map(|c| c as i64);
        }
    }
    for pair in &args.features {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("--feature {pair}: expected NAME=VALUE"))?;
        features.insert(name.to_string(), feature_value(value));
    }
    let customer = customer.context("--customer is required (or --csv with a USER_ID column)")?;
    let request = pb::ScoreRequest {
        request_id: args
            .request_id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        customer_id: customer,
        model: args.model,
        features,
        current_limit,
    };
    let response = ScoringClient::new(channel)
        .score(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        println!("{}", response_json(&response));
        return Ok(ExitCode::SUCCESS);
    }
    let decision = pb::Decision::try_from(response.decision)
        .map(|d| d.as_str_name().trim_start_matches("DECISION_").to_string())
        .unwrap_or_default();
    let arm = pb::Arm::try_from(response.arm)
        .map(|a| a.as_str_name().trim_start_matches("ARM_").to_lowercase())
        .unwrap_or_default();
    let limit = match response.current_limit {
        Some(c) => format!("{c} → {}", response.granted_limit),
        None => format!("{} (new customer)", response.granted_limit),
    };
    println!(
        "decision  {}  (request {})",
        response.decision_id, response.request_id
    );
    println!(
        "model     {} {}  {}",
        response.model, response.version, response.digest
    );
    println!(
        "result    {decision}, grade {}, probability of default {:.4}",
        response.grade, response.probability_of_default
    );
    println!("limit     {limit}");
    println!("arm       {arm}");
    println!("reasons   (what pushed the probability of default up most)");
    if response.reasons.is_empty() {
        println!("          none: every feature lowered it");
    }
    for (i, r) in response.reasons.iter().enumerate() {
        println!(
            "          {}. {:<16} {:+.4} log-odds  (value {})",
            i + 1,
            r.feature,
            r.contribution,
            r.value
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn response_json(r: &pb::ScoreResponse) -> serde_json::Value {
    serde_json::json!({
        "decision_id": r.decision_id,
        "request_id": r.request_id,
        "model": r.model,
        "version": r.version,
        "digest": r.digest,
        "probability_of_default": r.probability_of_default,
        "grade": r.grade,
        "decision": pb::Decision::try_from(r.decision).map(|d| d.as_str_name()).unwrap_or("?"),
        "current_limit": r.current_limit,
        "granted_limit": r.granted_limit,
        "arm": pb::Arm::try_from(r.arm).map(|a| a.as_str_name()).unwrap_or("?"),
        "reasons": r.reasons.iter().map(|x| serde_json::json!({
            "feature": x.feature, "contribution": x.contribution, "value": x.value
        })).collect::<Vec<_>>(),
    })
}

async fn models(server: ServerArg, action: ModelsAction) -> anyhow::Result<ExitCode> {
    let mut client = ModelsClient::new(connect(&server.server).await?);
    let status = status_error;
    let print_version = |v: &pb::VersionStatus| {
        let state = pb::VersionState::try_from(v.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("VERSION_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        println!(
            "  {:<10} {:<8} {:<20} {}",
            v.version,
            state,
            v.created_at,
            if v.error.is_empty() {
                &v.digest
            } else {
                &v.error
            }
        );
    };
    match action {
        ModelsAction::List => {
            let list = client
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status)?;
            for m in list.into_inner().models {
                let serving = if m.serving_version.is_empty() {
                    "none"
                } else {
                    &m.serving_version
                };
                println!("{}  (serving: {serving})", m.name);
                for v in &m.versions {
                    print_version(v);
                }
            }
        }
        ModelsAction::Show { model, version } => {
            let m = client
                .get_manifest(pb::VersionRef { model, version })
                .await
                .map_err(status)?
                .into_inner();
            println!("# {}/{}  {}", m.model, m.version, m.digest);
            print!("{}", m.manifest_toml);
        }
        ModelsAction::Load { model, version } => {
            let v = client
                .load_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
        ModelsAction::Serve { model, version } => {
            let v = client
                .serve_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
        ModelsAction::Unload { model, version } => {
            let v = client
                .unload_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn query_args(q: TraceQuery) -> crate::cli_trace::Query {
    use crate::cli_trace::Query;
    match q {
        TraceQuery::Decision { decision_id } => Query::Decision(decision_id),
        TraceQuery::Customer { customer_id } => Query::Customer(customer_id),
        TraceQuery::Explain { decision_id } => Query::Explain(decision_id),
        TraceQuery::Replay { decision_id } => Query::Replay(decision_id),
        TraceQuery::Verify => Query::Verify,
        TraceQuery::ByVersion {
            model,
            version,
            since,
            until,
        } => Query::ByVersion {
            model,
            version,
            since,
            until,
        },
        TraceQuery::Export {
            since,
            until,
            format,
        } => Query::Export {
            since,
            until,
            csv: format == "csv",
        },
    }
}

fn who() -> String {
    std::env::var("USER").unwrap_or_else(|_| "cli".into())
}

async fn rollout_cmd(server: &str, json: bool, action: RolloutAction) -> anyhow::Result<ExitCode> {
    use crate::grpc::pb::rollouts_client::RolloutsClient;
    let mut client = RolloutsClient::new(connect(server).await?);
    let status = status_error;
    let r = |model: String, reason: String| pb::RolloutRef {
        model,
        actor: who(),
        reason,
    };
    let shown = match action {
        RolloutAction::Start {
            model,
            candidate,
            plan,
            skip_backtest,
        } => {
            let plan_toml = match plan {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => String::new(),
            };
            vec![
                client
                    .start(pb::StartRolloutRequest {
                        model,
                        candidate,
                        plan_toml,
                        actor: who(),
                        skip_backtest,
                    })
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Status { model } => {
            vec![
                client
                    .status(r(model, String::new()))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Advance { model, reason } => {
            vec![
                client
                    .advance(r(model, reason))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Pause { model, reason } => {
            vec![
                client
                    .pause(r(model, reason))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Resume { model, reason } => {
            vec![
                client
                    .resume(r(model, reason))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Rollback { model, reason } => {
            vec![
                client
                    .rollback(r(model, reason))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::Promote { model, reason } => {
            vec![
                client
                    .promote(r(model, reason))
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
        RolloutAction::List => {
            client
                .list(pb::ListRolloutsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .rollouts
        }
    };
    for s in &shown {
        if json {
            println!("{}", crate::cli_trace::rollout_json(s));
        } else {
            crate::cli_trace::print_rollout(s);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn backtest_cmd(
    server: &str,
    request: pb::BacktestRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = fetch_backtest(server, request).await?;
    if json {
        println!("{}", crate::cli_trace::backtest_json(&report));
    } else {
        crate::cli_trace::print_backtest(&report);
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs a backtest on the server with a progress bar and returns its report.
pub(crate) async fn fetch_backtest(
    server: &str,
    request: pb::BacktestRequest,
) -> anyhow::Result<pb::BacktestReport> {
    use crate::grpc::pb::rollouts_client::RolloutsClient;
    use tokio_stream::StreamExt;
    let status = status_error;
    let mut stream = RolloutsClient::new(connect(server).await?)
        .backtest(request)
        .await
        .map_err(status)?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "re-scoring {bar:30} {pos}/{len} decisions ({elapsed})",
        )
        .expect("static template"),
    );
    let mut report = None;
    while let Some(update) = stream.next().await {
        let update = update.map_err(status)?;
        bar.set_length(update.total);
        match update.update {
            Some(pb::backtest_progress::Update::Done(done)) => bar.set_position(done),
            Some(pb::backtest_progress::Update::Report(r)) => report = Some(r),
            None => {}
        }
    }
    bar.finish_and_clear();
    report.context("the server ended the backtest without a report")
}

async fn report_cmd(server: &str, what: ReportKind) -> anyhow::Result<ExitCode> {
    match what {
        ReportKind::Rollout { id, model, out } => {
            let h = crate::cli_report::rollout(
                server,
                id.as_deref().unwrap_or(""),
                model.as_deref().unwrap_or(""),
                &out,
            )
            .await?;
            let s = h.status.unwrap_or_default();
            println!(
                "wrote {} (rollout {} of {} {}: {})",
                out.display(),
                s.id,
                s.model,
                s.candidate,
                s.state
            );
        }
        ReportKind::Customer { customer_id, out } => {
            let records = crate::cli_report::customer(server, &customer_id, &out).await?;
            println!(
                "wrote {} ({} decisions of customer {customer_id})",
                out.display(),
                records.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
