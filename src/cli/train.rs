//! The commands that make things to deploy: `riskserve train` (fit a version and write its
//! bundle, with a progress bar and the holdout metrics), `riskserve import` (a bundle of an
//! XGBoost or LightGBM model file) and `riskserve token` (a bearer token and its config entry).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;

use crate::bundle::{Metrics, SourceFormat};
use crate::import::ImportSpec;
use crate::train::{self, ReasonCodesFrom, Stage, TrainSpec};

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
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
    /// Reason-code table (TOML `[[reason]]` feature, code, text) for adverse-action
    /// notices; default: riskserve's wording for the features (edit a bundle's
    /// reason_codes.toml and pass it here for the next version).
    #[arg(long, conflicts_with = "no_reason_codes")]
    reason_codes: Option<PathBuf>,
    /// Write no reason-code table, as bundles made before tables (reproduces the shipped v1).
    #[arg(long)]
    no_reason_codes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The caller's name, recorded with every decision and transition they make.
    #[arg(long)]
    name: String,
    /// Roles: scorer (Scoring), operator (Models, Rollouts), reviewer (Trace).
    #[arg(long = "role", required = true, value_parser = ["scorer", "operator", "reviewer"])]
    roles: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// The model file's format: XGBoost's JSON model or LightGBM's text model.
    #[arg(value_parser = ["xgboost", "lightgbm"])]
    format: String,
    /// The model file, as the library saved it (`save_model`).
    file: PathBuf,
    #[arg(long)]
    model: String,
    #[arg(long)]
    version: String,
    /// Feature schema (types, ranges, missing rules, monotone directions) by name.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Limit policy (TOML); default: the built-in credit-limit policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// A CSV of customers: observed ranges without --schema; metrics with --label.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The 0/1 outcome column of --data (1 = defaulted), for AUC, KS, Gini and Brier.
    #[arg(long)]
    label: Option<String>,
    /// Where bundles are written.
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Creation time for the manifest (RFC 3339). Default: $SOURCE_DATE_EPOCH if set, else now.
    #[arg(long)]
    created_at: Option<String>,
    /// Reason-code table (TOML `[[reason]]` feature, code, text) for adverse-action notices,
    /// one entry per model feature; without it the bundle has none.
    #[arg(long)]
    reason_codes: Option<PathBuf>,
}

/// The manifest's creation time: as given, else `$SOURCE_DATE_EPOCH`, else now.
fn created_at(given: Option<String>) -> anyhow::Result<String> {
    if let Some(t) = given {
        return Ok(t);
    }
    let when = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(secs) => {
            let secs: u64 = secs.parse().context("SOURCE_DATE_EPOCH is not a number")?;
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
        }
        Err(_) => SystemTime::now(),
    };
    Ok(humantime::format_rfc3339_seconds(when).to_string())
}

pub(crate) fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let format = match args.format.as_str() {
        "xgboost" => SourceFormat::Xgboost,
        _ => SourceFormat::Lightgbm,
    };
    let spec = ImportSpec {
        format,
        file: args.file,
        model: args.model,
        version: args.version,
        schema: args.schema,
        policy: args.policy,
        data: args.data,
        label: args.label,
        models_dir: args.models,
        created_at: created_at(args.created_at)?,
        reason_codes: args.reason_codes,
    };
    let report = crate::import::import(&spec)?;
    let m = &report.manifest;
    println!(
        "imported {}/{} in {}",
        m.model,
        m.version,
        report.dir.display()
    );
    println!();
    let source = m.source.as_ref().expect("an import records its source");
    let mut rows = vec![
        ("digest", report.digest.to_string()),
        (
            "source",
            format!("{} sha256:{}", spec.file.display(), source.sha256),
        ),
        (
            "trees",
            format!("{} (depth up to {})", report.trees, report.max_depth),
        ),
        ("features", m.features.len().to_string()),
    ];
    let monotone: Vec<String> = m
        .features
        .iter()
        .filter_map(|f| f.monotone.map(|d| format!("{} {d}", f.name)))
        .collect();
    if !monotone.is_empty() {
        rows.push(("monotone", monotone.join(", ")));
    }
    if let Some(metrics) = &m.metrics {
        rows.extend(metric_rows(metrics, "rows scored"));
    }
    rows.push(("created at", m.created_at.clone()));
    rows.push((
        "reason codes",
        reason_codes_row(report.reason_codes.as_ref()),
    ));
    print_rows(&rows);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let created_at = created_at(args.created_at)?;
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
        reason_codes: match (args.reason_codes, args.no_reason_codes) {
            (Some(file), _) => ReasonCodesFrom::File(file),
            (None, true) => ReasonCodesFrom::Omitted,
            (None, false) => ReasonCodesFrom::Default,
        },
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
    let excluded = m.training.as_ref().map(|t| t.excluded.join(", "));
    let mut rows = vec![
        ("digest", report.digest.to_string()),
        ("features", m.features.len().to_string()),
        ("excluded", excluded.unwrap_or_default()),
        ("train rows", report.train_rows.to_string()),
    ];
    rows.extend(metric_rows(&report.metrics, "holdout rows"));
    rows.push(("created at", m.created_at.clone()));
    rows.push((
        "reason codes",
        reason_codes_row(report.reason_codes.as_ref()),
    ));
    print_rows(&rows);
    Ok(ExitCode::SUCCESS)
}

/// What a new bundle's reason-code table is, and which features still have generic words
/// (someone should word them before the version serves customers).
fn reason_codes_row(table: Option<&crate::reason_codes::ReasonCodes>) -> String {
    let Some(table) = table else {
        return "none (notices use the default wording)".into();
    };
    let generic = table.generic_features();
    if generic.is_empty() {
        format!(
            "{} ({} features)",
            crate::reason_codes::REASON_CODES_FILE,
            table.reasons.len()
        )
    } else {
        format!(
            "{} ({} features; generic words for {}: edit them and retrain with --reason-codes)",
            crate::reason_codes::REASON_CODES_FILE,
            table.reasons.len(),
            generic.join(", ")
        )
    }
}

/// The metrics of a version as `name value` rows, the rows scored named `scored`.
pub(crate) fn metric_rows(m: &Metrics, scored: &'static str) -> Vec<(&'static str, String)> {
    vec![
        (
            scored,
            format!("{} ({} defaults)", m.holdout_rows, m.holdout_defaults),
        ),
        ("AUC", format!("{:.4}", m.auc)),
        ("KS", format!("{:.4}", m.ks)),
        ("Gini", format!("{:.4}", m.gini)),
        ("Brier", format!("{:.4}", m.brier)),
    ]
}

pub(crate) fn print_rows(rows: &[(&str, String)]) {
    for (k, v) in rows {
        println!("  {k:<13} {v}");
    }
}

pub(crate) fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    use rand::RngCore;
    let TokenArgs { name, roles } = args;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("rs_{}", hex::encode(secret));
    let entry = crate::grpc::gate::auth::TokenEntry {
        name: name.clone(),
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
