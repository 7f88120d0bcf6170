//! `riskserve bench`: a closed-loop load generator, and the empty server that gives its ceiling.
//!
//! Each of `--concurrency` tasks sends one Score (or, with `--protocol v2`, one ModelInfer)
//! at a time over one of `--connections` channels, with customers taken round-robin from the
//! Taiwan CSV. Latencies go into an HDR
//! histogram after a warm-up; the result is one JSON line. Optional side loads run during the
//! measured window: a swap storm (`--swap A,B`) or load/unload churn (`--churn-cycles`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use tonic::{Request, Response, Status};

use super::connect::{Conn, connect};
use crate::bundle::Bundle;
use crate::grpc::pb;
use crate::grpc::pb::models_client::ModelsClient;
use crate::grpc::pb::scoring_client::ScoringClient;
use crate::grpc::pb::trace_client::TraceClient;
use crate::grpc::v2;
use crate::grpc::v2::grpc_inference_service_client::GrpcInferenceServiceClient;

/// How the load asks for a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// riskserve.v1.Scoring/Score.
    Score,
    /// inference.GRPCInferenceService/ModelInfer (KServe v2).
    V2,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(
        long,
        env = "RISKSERVE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Requests in flight at once (one per task).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// HTTP/2 connections shared by the tasks.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Measured time, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured time before, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long, default_value = "credit-limit")]
    model: String,
    /// The bundle whose schema names the features to send.
    #[arg(long, default_value = "models/credit-limit/v1")]
    bundle: PathBuf,
    /// Customers to send.
    #[arg(long, default_value = "data/taiwan_credit_default.csv")]
    data: PathBuf,
    /// During the measured window, switch the serving version between these two, e.g. v1,v2.
    #[arg(long, value_delimiter = ',')]
    swap: Vec<String>,
    /// Pause between swaps, milliseconds.
    #[arg(long, default_value_t = 10)]
    swap_every_ms: u64,
    /// Instead of scoring, load and unload `--churn-version` this many times.
    #[arg(long)]
    churn_cycles: Option<u64>,
    #[arg(long, default_value = "v2")]
    churn_version: String,
    /// Instead of scoring, ask CustomerHistory for random customers `fill-0` … `fill-(N-1)`
    /// (as written by `bench-fill-log`).
    #[arg(long)]
    history_customers: Option<u64>,
    /// After a RESOURCE_EXHAUSTED refusal, wait this long before the next request (as a
    /// well-behaved client backs off); 0 retries at once.
    #[arg(long, default_value_t = 0)]
    backoff_ms: u64,
    /// After a refusal, wait as long as the server asks (`grpc-retry-pushback-ms`), as a gRPC
    /// retry policy does; overrides `--backoff-ms` when the server asks.
    #[arg(long)]
    honour_pushback: bool,
    /// The protocol the load speaks: riskserve's Score, or the inference protocol's
    /// ModelInfer (one row per call, as Score, unless `--batch`).
    #[arg(long, value_enum, default_value_t = Protocol::Score)]
    protocol: Protocol,
    /// Rows per ModelInfer call (`--protocol v2` only): consecutive customers in one
    /// `[batch, n_features]` tensor, decided and recorded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// A free-form label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

/// Runs the benchmark and prints one JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Some(cycles) = args.churn_cycles {
        return churn(&args, cycles).await;
    }
    anyhow::ensure!(
        args.swap.is_empty() || args.swap.len() == 2,
        "--swap takes two versions, e.g. v1,v2"
    );
    let requests = Arc::new(match args.history_customers {
        Some(_) => Vec::new(),
        None => requests(&args.bundle, &args.data, &args.model)?,
    });
    anyhow::ensure!(
        args.batch >= 1 && (args.batch == 1 || args.protocol == Protocol::V2),
        "--batch takes a number of rows from 1, with --protocol v2"
    );
    let batch = args.batch;
    let inference = Arc::new(match args.protocol {
        Protocol::V2 => {
            let columns = schema_columns(&args.bundle)?;
            // Each customer once: the calls step through the CSV `batch` rows at a time.
            (0..requests.len().div_ceil(batch))
                .map(|i| {
                    let rows: Vec<&pb::ScoreRequest> = (0..batch)
                        .map(|k| &requests[(i * batch + k) % requests.len()])
                        .collect();
                    infer_request(&rows, &columns)
                })
                .collect()
        }
        Protocol::Score => Vec::new(),
    });
    let (history, protocol) = (args.history_customers, args.protocol);
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args.server).await?);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let (backoff, honour_pushback) = (Duration::from_millis(args.backoff_ms), args.honour_pushback);
    for t in 0..args.concurrency.max(1) {
        let channel = channels[t % channels.len()].clone();
        let mut client = ScoringClient::new(channel.clone());
        let mut v2client = GrpcInferenceServiceClient::new(channel.clone());
        let mut trace = TraceClient::new(channel);
        let (requests, inference, measuring, stop, errors) = (
            requests.clone(),
            inference.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            // Requests the server shed (RESOURCE_EXHAUSTED): how fast the refusal came.
            let mut shed = hist.clone();
            let mut i = t;
            // Request ids unique across runs against the same log.
            let run = uuid::Uuid::now_v7();
            while !stop.load(Ordering::Relaxed) {
                i += args_stride();
                let start = Instant::now();
                let mut refused = false;
                let mut wait = backoff;
                let ok = match history {
                    Some(n) => {
                        let customer_id = format!("fill-{}", (i as u64 * 2_654_435_761) % n);
                        trace
                            .customer_history(pb::CustomerRef { customer_id })
                            .await
                            .is_ok_and(|r| !r.into_inner().records.is_empty())
                    }
                    None => {
                        let id = format!("bench-{run}-{t}-{i}");
                        let answer = match protocol {
                            Protocol::Score => {
                                let mut req = requests[i % requests.len()].clone();
                                req.request_id = id;
                                client.score(req).await.map(drop)
                            }
                            Protocol::V2 => {
                                let mut req = inference[i % inference.len()].clone();
                                req.id = id;
                                v2client.model_infer(req).await.map(drop)
                            }
                        };
                        match answer {
                            Ok(()) => true,
                            Err(s) => {
                                refused = s.code() == tonic::Code::ResourceExhausted;
                                if let Some(asked) = pushback(&s).filter(|_| honour_pushback) {
                                    wait = asked;
                                }
                                false
                            }
                        }
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        hist.saturating_record(start.elapsed().as_micros() as u64);
                    } else if refused {
                        shed.saturating_record(start.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if refused && wait > Duration::ZERO {
                    tokio::time::sleep(wait).await;
                }
            }
            (hist, shed)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let swapper = (args.swap.len() == 2).then(|| {
        let (channel, stop, args) = (channels[0].clone(), stop.clone(), args.clone());
        tokio::spawn(async move { swap_storm(channel, &args, &stop).await })
    });
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut shed = hist.clone();
    for t in tasks {
        let (h, s) = t.await?;
        hist.add(h)?;
        shed.add(s)?;
    }
    let swaps = match swapper {
        Some(s) => s.await??,
        None => 0,
    };
    let line = serde_json::json!({
        "label": args.label,
        "mode": match (history, swaps) {
            (Some(_), _) => "history",
            (None, 0) => "score",
            (None, _) => "score+swaps",
        },
        "protocol": match protocol {
            Protocol::Score => "score",
            Protocol::V2 => "v2",
        },
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration_s": elapsed,
        "requests": hist.len(),
        "batch": batch,
        "errors": errors.load(Ordering::Relaxed),
        "throughput_rps": hist.len() as f64 / elapsed,
        "rows_per_s": (hist.len() * batch as u64) as f64 / elapsed,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
        "swaps": swaps,
        "backoff_ms": args.backoff_ms,
        "honour_pushback": args.honour_pushback,
        "shed": shed.len(),
        "shed_p50_us": shed.value_at_quantile(0.50),
        "shed_p99_us": shed.value_at_quantile(0.99),
    });
    println!("{line}");
    Ok(std::process::ExitCode::SUCCESS)
}

/// The wait a refusal asks for, if it asks.
fn pushback(status: &tonic::Status) -> Option<Duration> {
    let ms = status
        .metadata()
        .get(crate::grpc::status::PUSHBACK_HEADER)?;
    Some(Duration::from_millis(ms.to_str().ok()?.parse().ok()?))
}

/// Tasks step through the customers with a prime stride so they rarely send the same row.
fn args_stride() -> usize {
    7919
}

/// The features a bundle scores, in its schema's order: the inference protocol's columns.
fn schema_columns(bundle_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let bundle = Bundle::load(bundle_dir, None)
        .with_context(|| format!("reading the schema from {}", bundle_dir.display()))?;
    Ok(bundle.schema.names())
}

/// The same customers' requests as one ModelInfer call: an FP64 `[rows, n_features]` tensor
/// in schema order; the customer and current limit as single-row parameters for one row, as
/// the `customer_ids` and `current_limits` JSON arrays for more.
fn infer_request(rows: &[&pb::ScoreRequest], columns: &[String]) -> v2::ModelInferRequest {
    use v2::infer_parameter::ParameterChoice;
    let value = |req: &pb::ScoreRequest, name: &String| match req
        .features
        .get(name)
        .and_then(|v| v.kind.clone())
    {
        Some(pb::feature_value::Kind::Number(x)) => x,
        _ => f64::NAN,
    };
    let raw = rows
        .iter()
        .flat_map(|r| columns.iter().flat_map(|c| value(r, c).to_le_bytes()))
        .collect();
    let string = |s: String| v2::InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s)),
    };
    let mut parameters = BTreeMap::new();
    if let [req] = rows {
        parameters.insert("customer_id".to_string(), string(req.customer_id.clone()));
        if let Some(limit) = req.current_limit {
            parameters.insert(
                "current_limit".to_string(),
                v2::InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(limit)),
                },
            );
        }
    } else {
        let ids: Vec<&str> = rows.iter().map(|r| r.customer_id.as_str()).collect();
        let limits: Vec<Option<i64>> = rows.iter().map(|r| r.current_limit).collect();
        parameters.insert(
            "customer_ids".to_string(),
            string(serde_json::to_string(&ids).expect("strings serialise")),
        );
        parameters.insert(
            "current_limits".to_string(),
            string(serde_json::to_string(&limits).expect("numbers serialise")),
        );
    }
    v2::ModelInferRequest {
        model_name: rows[0].model.clone(),
        parameters,
        inputs: vec![v2::model_infer_request::InferInputTensor {
            name: "features".into(),
            datatype: "FP64".into(),
            shape: vec![rows.len() as i64, columns.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// One request per CSV row, with the features the bundle's schema names.
pub(crate) fn requests(
    bundle_dir: &std::path::Path,
    data: &std::path::Path,
    model: &str,
) -> anyhow::Result<Vec<pb::ScoreRequest>> {
    let bundle = Bundle::load(bundle_dir, None)
        .with_context(|| format!("reading the schema from {}", bundle_dir.display()))?;
    let mut reader =
        csv::Reader::from_path(data).with_context(|| format!("opening {}", data.display()))?;
    let headers = reader.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let wanted: Vec<(String, usize)> = bundle
        .schema
        .features()
        .iter()
        .filter_map(|f| Some((f.name.clone(), col(&f.name)?)))
        .collect();
    let (id_col, limit_col) = (col("USER_ID"), col("CREDIT_LIMIT"));
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record?;
        let num = |c: usize| record[c].parse::<f64>().unwrap_or(f64::NAN);
        let features: BTreeMap<String, pb::FeatureValue> = wanted
            .iter()
            .map(|(name, c)| {
                let kind = pb::feature_value::Kind::Number(num(*c));
                (name.clone(), pb::FeatureValue { kind: Some(kind) })
            })
            .collect();
        out.push(pb::ScoreRequest {
            request_id: String::new(),
            customer_id: id_col.map_or_else(|| i.to_string(), |c| record[c].to_string()),
            model: model.to_string(),
            features,
            current_limit: limit_col.map(|c| num(c) as i64),
        });
    }
    anyhow::ensure!(!out.is_empty(), "{} has no rows", data.display());
    Ok(out)
}

async fn swap_storm(channel: Conn, args: &BenchArgs, stop: &AtomicBool) -> anyhow::Result<u64> {
    let mut client = ModelsClient::new(channel);
    let mut swaps = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let version = args.swap[(swaps % 2) as usize].clone();
        client
            .serve_version(pb::VersionRef {
                model: args.model.clone(),
                version,
            })
            .await
            .context("swap")?;
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(args.swap_every_ms)).await;
    }
    Ok(swaps)
}

async fn churn(args: &BenchArgs, cycles: u64) -> anyhow::Result<std::process::ExitCode> {
    let mut client = ModelsClient::new(connect(&args.server).await?);
    let started = Instant::now();
    for _ in 0..cycles {
        let r = pb::VersionRef {
            model: args.model.clone(),
            version: args.churn_version.clone(),
        };
        client.load_version(r.clone()).await.context("load")?;
        client.unload_version(r).await.context("unload")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "mode": "churn", "cycles": cycles,
            "duration_s": elapsed, "cycles_per_s": cycles as f64 / elapsed,
        })
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// The hidden `bench-fill-log` command's arguments (see [`fill_log`]).
#[derive(Debug, Args)]
pub(crate) struct FillLogArgs {
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[arg(long)]
    pub(crate) decisions: u64,
    #[arg(long)]
    pub(crate) customers: u64,
    #[arg(long, default_value = "models/credit-limit/v1")]
    pub(crate) bundle: PathBuf,
    #[arg(long, default_value = "data/taiwan_credit_default.csv")]
    pub(crate) csv: PathBuf,
}

/// The hidden `bench-empty-server` command's arguments (see [`empty_server`]).
#[derive(Debug, Args)]
pub(crate) struct EmptyServerArgs {
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub(crate) listen: std::net::SocketAddr,
}

/// A Scoring service that decodes the request and answers an empty response.
#[derive(Debug, Default)]
struct EmptyScoring;

#[tonic::async_trait]
impl pb::scoring_server::Scoring for EmptyScoring {
    async fn score(
        &self,
        _: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        Ok(Response::new(pb::ScoreResponse::default()))
    }

    async fn score_batch(
        &self,
        _: Request<pb::ScoreBatchRequest>,
    ) -> Result<Response<pb::ScoreBatchResponse>, Status> {
        Ok(Response::new(pb::ScoreBatchResponse::default()))
    }
}

/// Serves [`EmptyScoring`] until interrupted: the throughput ceiling of tonic on this setup.
pub async fn empty_server(listen: std::net::SocketAddr) -> anyhow::Result<std::process::ExitCode> {
    tonic::transport::Server::builder()
        .add_service(pb::scoring_server::ScoringServer::new(EmptyScoring))
        .serve_with_shutdown(listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Writes `decisions` synthetic but really scored decisions (Taiwan rows through the bundle)
/// for customers `fill-0` … `fill-(customers-1)`, round-robin, into `data_dir`'s decision log
/// through the real writer, keyed with the directory's development key, so that a server
/// started on the directory finds them. Prints one JSON line with the size on disk.
pub async fn fill_log(
    data_dir: &std::path::Path,
    decisions: u64,
    customers: u64,
    bundle_dir: &std::path::Path,
    csv_path: &std::path::Path,
) -> anyhow::Result<std::process::ExitCode> {
    use crate::decision_log::{DecisionLog, Durability, JournalLog, LogOptions};
    use crate::rollout::Route;
    use crate::schema::RawValue;
    use crate::scoring::{Decided, Recorder, ScoreRequest, decide};

    std::fs::create_dir_all(data_dir)?;
    let keys = crate::customer::CustomerKeys::dev_key(&data_dir.join("customer-dev.key"))?;
    // Async durability: the fill measures nothing, and fsyncs would only slow it.
    let log = JournalLog::open(
        data_dir,
        LogOptions {
            durability: Durability::Async,
            max_batch: 20_000,
            queue_capacity: 200_000,
            ..LogOptions::default()
        },
    )?;
    let bundle = std::sync::Arc::new(Bundle::load(bundle_dir, None)?);
    let recorder = Recorder::new(log.clone(), keys);
    let rows: Vec<(Vec<f64>, Option<i64>)> = requests(bundle_dir, csv_path, bundle.model_name())?
        .into_iter()
        .map(|r| {
            let x = bundle
                .schema
                .features()
                .iter()
                .map(
                    |f| match r.features.get(&f.name).and_then(|v| v.kind.clone()) {
                        Some(pb::feature_value::Kind::Number(x)) => x,
                        _ => 0.0,
                    },
                )
                .collect();
            (x, r.current_limit)
        })
        .collect();
    let bar = indicatif::ProgressBar::new(decisions);
    let started = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..decisions {
        let (x, limit) = &rows[(i % rows.len() as u64) as usize];
        let req = ScoreRequest {
            request_id: format!("fill-req-{i}"),
            customer_id: format!("fill-{}", i % customers),
            model: bundle.model_name().to_string(),
            features: bundle
                .schema
                .features()
                .iter()
                .zip(x)
                .map(|(f, v)| (f.name.clone(), RawValue::Number(*v)))
                .collect(),
            current_limit: *limit,
            caller: Some("bench-fill-log".into()),
            deadline: None,
            trace_id: None,
        };
        let route = Route::champion();
        let decided = Decided {
            decision: decide(&bundle, &req, x, &route),
            route,
            bundle: bundle.clone(),
            x: x.clone(),
            latency: Duration::ZERO,
        };
        let pending = recorder.queue(&req, decided);
        inflight.push_back(async move { pending.durable(&req).await });
        if inflight.len() >= 100_000 {
            inflight.pop_front().expect("non-empty").await?;
        }
        if i % 10_000 == 0 {
            bar.set_position(i);
        }
    }
    for f in inflight {
        f.await?;
    }
    tokio::task::spawn_blocking({
        let log = log.clone();
        move || log.close()
    })
    .await?;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let files = log.files();
    let view_bytes: u64 = ["decisions.db", "decisions.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    // Segments are preallocated: count the frames, not the files' sizes.
    let mut journal_bytes = 0u64;
    crate::decision_log::journal::read_only(&files.journal, |r| {
        journal_bytes += r.payload.len() as u64 + 16;
        true
    })?;
    let bytes = view_bytes + journal_bytes;
    println!(
        "{}",
        serde_json::json!({
            "label": "fill", "decisions": decisions, "customers": customers,
            "duration_s": elapsed, "decisions_per_s": decisions as f64 / elapsed,
            "bytes_on_disk": bytes, "bytes_per_decision": bytes as f64 / decisions as f64,
            "journal_bytes_per_decision": journal_bytes as f64 / decisions as f64,
            "view_bytes_per_decision": view_bytes as f64 / decisions as f64,
        })
    );
    Ok(std::process::ExitCode::SUCCESS)
}
