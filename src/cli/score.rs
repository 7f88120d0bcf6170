//! `riskserve score`: one customer's features from flags or a CSV row, scored on a running
//! server, printed for people or as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

use super::connect::{Conn, ServerArg, connect, status_error};
use super::output::{arm_name, reasons_json};
use crate::bundle::Manifest;
use crate::grpc::pb;
use crate::grpc::pb::models_client::ModelsClient;
use crate::grpc::pb::scoring_client::ScoringClient;

#[derive(Debug, Args)]
pub(crate) struct ScoreArgs {
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
fn csv_row(path: &Path, row: usize) -> anyhow::Result<BTreeMap<String, String>> {
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

pub(crate) async fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
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
    let arm = arm_name(response.arm);
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
        "reasons": reasons_json(&r.reasons),
    })
}
