//! `riskserve bench`: a closed-loop load generator, and the empty server that gives its ceiling.
//!
//! Each of `--concurrency` tasks sends one Score at a time over one of `--connections`
//! channels, with customers taken round-robin from the Taiwan CSV. Latencies go into an HDR
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

use crate::bundle::Bundle;
use crate::cli::connect;
use crate::grpc::pb;
use crate::grpc::pb::models_client::ModelsClient;
use crate::grpc::pb::scoring_client::ScoringClient;

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
    let requests = Arc::new(requests(&args)?);
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args.server).await?);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..args.concurrency.max(1) {
        let mut client = ScoringClient::new(channels[t % channels.len()].clone());
        let (requests, measuring, stop, errors) = (
            requests.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let mut req = requests[i % requests.len()].clone();
                req.request_id = format!("bench-{t}-{i}");
                i += args_stride();
                let start = Instant::now();
                let ok = client.score(req).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        hist.saturating_record(start.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
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
    for t in tasks {
        hist.add(t.await?)?;
    }
    let swaps = match swapper {
        Some(s) => s.await??,
        None => 0,
    };
    let line = serde_json::json!({
        "label": args.label,
        "mode": if swaps > 0 { "score+swaps" } else { "score" },
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration_s": elapsed,
        "requests": hist.len(),
        "errors": errors.load(Ordering::Relaxed),
        "throughput_rps": hist.len() as f64 / elapsed,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
        "swaps": swaps,
    });
    println!("{line}");
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tasks step through the customers with a prime stride so they rarely send the same row.
fn args_stride() -> usize {
    7919
}

/// One request per CSV row, with the features the bundle's schema names.
fn requests(args: &BenchArgs) -> anyhow::Result<Vec<pb::ScoreRequest>> {
    let bundle = Bundle::load(&args.bundle, None)
        .with_context(|| format!("reading the schema from {}", args.bundle.display()))?;
    let mut reader = csv::Reader::from_path(&args.data)
        .with_context(|| format!("opening {}", args.data.display()))?;
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
            model: args.model.clone(),
            features,
            current_limit: limit_col.map(|c| num(c) as i64),
        });
    }
    anyhow::ensure!(!out.is_empty(), "{} has no rows", args.data.display());
    Ok(out)
}

async fn swap_storm(
    channel: tonic::transport::Channel,
    args: &BenchArgs,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
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
