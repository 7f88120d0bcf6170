//! Training: fits a logistic regression with linfa on standardised features, evaluates it on
//! a stratified holdout, and writes a new immutable bundle.
//!
//! Deterministic by construction: the split comes from a seeded ChaCha stream, the fit from
//! linfa's deterministic L-BFGS, the files from ordered serialisation, and the creation time
//! is an input. The same data, seed and time give the same digest.

use std::collections::BTreeSet;
use std::path::PathBuf;

use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest as _, Sha256};

use crate::bundle::{self, BundleDigest, BundleError, FORMAT, Manifest, Metrics, Training};
use crate::inputs::{EmptyCells, InputError, SchemaFile, Table, read_file, read_policy, read_toml};
use crate::model::{LogisticModel, Model as _, Term};
use crate::reason_codes::{REASON_CODES_FILE, ReasonCodes};
use crate::schema::FeatureSpec;

/// Names the training procedure in manifests. It changes only when the procedure does, so a
/// new release of riskserve still reproduces the digests of the bundles it shipped.
pub const TRAINER: &str = "riskserve-train 1 (linfa-logistic 0.8, L-BFGS, standardised features)";

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub data: PathBuf,
    pub label: String,
    pub model: String,
    pub version: String,
    pub exclude: Vec<String>,
    /// Share of rows held out for evaluation, per class.
    pub holdout: f64,
    pub seed: u64,
    /// A TOML file of `[[feature]]` specs; without it every remaining column is a number with
    /// its observed range.
    pub schema: Option<PathBuf>,
    /// A TOML file holding a `Policy`; without it the default credit-limit policy.
    pub policy: Option<PathBuf>,
    pub models_dir: PathBuf,
    /// RFC 3339.
    pub created_at: String,
    /// The bundle's reason-code table.
    pub reason_codes: ReasonCodesFrom,
}

/// Where a trained bundle's reason-code table comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasonCodesFrom {
    /// riskserve's wording for the features ([`ReasonCodes::default_for`]).
    Default,
    /// A table file, checked against the features (an edited default, say).
    File(PathBuf),
    /// No table, as bundles made before tables existed: reproduces their digests (the
    /// shipped v1's), and notices of such a version use the default wording.
    Omitted,
}

/// The steps of a run, reported as they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Reading,
    Splitting,
    Fitting,
    Evaluating,
    Writing,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Reading,
        Stage::Splitting,
        Stage::Fitting,
        Stage::Evaluating,
        Stage::Writing,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Stage::Reading => "reading data",
            Stage::Splitting => "stratified holdout split",
            Stage::Fitting => "fitting logistic regression (L-BFGS)",
            Stage::Evaluating => "evaluating on the holdout",
            Stage::Writing => "writing the bundle",
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct TrainReport {
    pub dir: PathBuf,
    pub digest: BundleDigest,
    pub manifest: Manifest,
    pub model: LogisticModel,
    pub metrics: Metrics,
    pub train_rows: usize,
    /// The table written into the bundle, if any.
    pub reason_codes: Option<ReasonCodes>,
}

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("fit: {0}")]
    Fit(String),
    #[error("reason codes: {0}")]
    ReasonCodes(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Trains one version and writes its bundle under `spec.models_dir`.
pub fn train(spec: &TrainSpec, progress: &mut dyn FnMut(Stage)) -> Result<TrainReport, TrainError> {
    if !(spec.holdout > 0.0 && spec.holdout < 1.0) {
        return Err(TrainError::Data("--holdout must be between 0 and 1".into()));
    }
    humantime::parse_rfc3339(&spec.created_at)
        .map_err(|e| TrainError::Data(format!("created_at {:?}: {e}", spec.created_at)))?;
    crate::registry::check_name("model", &spec.model)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    crate::registry::check_name("version", &spec.version)
        .map_err(|e| TrainError::Data(e.to_string()))?;

    progress(Stage::Reading);
    let bytes = read_file(&spec.data)?;
    let table = Table::parse(&bytes, &spec.data, EmptyCells::Refused)?;
    let (specs, excluded) = feature_specs(spec, &table)?;
    // Before the fit, so that a table that does not fit the features fails in a second.
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let reason_codes = match &spec.reason_codes {
        ReasonCodesFrom::Default => Some(ReasonCodes::default_for(&names)),
        ReasonCodesFrom::File(path) => {
            Some(ReasonCodes::read(path, &names).map_err(TrainError::ReasonCodes)?)
        }
        ReasonCodesFrom::Omitted => None,
    };
    let y = table.labels(&spec.label)?;
    let vectors = table.vectors(&specs)?;

    progress(Stage::Splitting);
    let (train_idx, holdout_idx) = stratified_split(&y, spec.holdout, spec.seed);
    if train_idx.is_empty() || holdout_idx.is_empty() {
        return Err(TrainError::Data("too few rows for a holdout split".into()));
    }
    let matrix = |idx: &[usize]| -> Array2<f64> {
        Array2::from_shape_fn((idx.len(), specs.len()), |(r, c)| vectors[idx[r]][c])
    };
    let x_train = matrix(&train_idx);
    let (means, scales) = standardisation(&x_train);

    progress(Stage::Fitting);
    let mut z = x_train.clone();
    for mut row in z.rows_mut() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - means[j]) / scales[j];
        }
    }
    let y_train: Array1<bool> = train_idx.iter().map(|&i| y[i]).collect();
    let fitted = LogisticRegression::default()
        .max_iterations(500)
        .fit(&Dataset::new(z, y_train))
        .map_err(|e| TrainError::Fit(e.to_string()))?;
    // linfa's positive class is the larger one; riskserve's probability is of default (true).
    let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
    let model = LogisticModel {
        intercept: sign * fitted.intercept(),
        terms: specs
            .iter()
            .enumerate()
            .map(|(j, s)| Term {
                name: s.name.clone(),
                mean: means[j],
                scale: scales[j],
                coefficient: sign * fitted.params()[j],
            })
            .collect(),
    };
    model.check().map_err(TrainError::Fit)?;

    progress(Stage::Evaluating);
    let x_holdout = matrix(&holdout_idx);
    let scored: Vec<(f64, bool)> = x_holdout
        .rows()
        .into_iter()
        .zip(&holdout_idx)
        .map(|(row, &i)| {
            (
                model
                    .score(row.as_slice().expect("row-major"))
                    .probability_of_default,
                y[i],
            )
        })
        .collect();
    let metrics = evaluate(&scored);

    progress(Stage::Writing);
    let policy = read_policy(spec.policy.as_deref())?;
    let manifest = Manifest {
        format: FORMAT,
        model: spec.model.clone(),
        version: spec.version.clone(),
        created_at: spec.created_at.clone(),
        trainer: TRAINER.to_string(),
        reason_codes: reason_codes.as_ref().map(|_| REASON_CODES_FILE.to_string()),
        source: None,
        training: Some(Training {
            data_file: spec
                .data
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            data_sha256: hex::encode(Sha256::digest(&bytes)),
            rows: table.rows.len() as u64,
            label: spec.label.clone(),
            excluded,
            holdout_fraction: spec.holdout,
            seed: spec.seed,
        }),
        metrics: Some(metrics.clone()),
        features: specs,
        policy,
    };
    let (dir, digest) = bundle::write(
        &spec.models_dir,
        &manifest,
        bundle::parameters_file(&model)?,
        reason_codes.as_ref(),
    )?;
    Ok(TrainReport {
        dir,
        digest,
        manifest,
        model,
        metrics,
        train_rows: train_idx.len(),
        reason_codes,
    })
}

/// The features to train on, and the columns left out (listed in the manifest).
fn feature_specs(
    spec: &TrainSpec,
    table: &Table,
) -> Result<(Vec<FeatureSpec>, Vec<String>), TrainError> {
    for name in spec.exclude.iter().chain([&spec.label]) {
        table.column(name)?;
    }
    let specs: Vec<FeatureSpec> = match &spec.schema {
        Some(path) => {
            let file: SchemaFile = read_toml(path)?;
            if let Some(f) = file
                .feature
                .iter()
                .find(|f| spec.exclude.contains(&f.name) || f.name == spec.label)
            {
                return Err(TrainError::Data(format!(
                    "{} is both in the schema and excluded (or the label)",
                    f.name
                )));
            }
            file.feature
        }
        None => table
            .headers
            .iter()
            .enumerate()
            .filter(|(_, h)| **h != spec.label && !spec.exclude.contains(h))
            .map(|(c, _)| table.observed(c))
            .collect(),
    };
    crate::schema::Schema::new(specs.clone())
        .check()
        .map_err(TrainError::Data)?;
    let used: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let excluded = table
        .headers
        .iter()
        .filter(|h| **h != spec.label && !used.contains(h.as_str()))
        .cloned()
        .collect();
    Ok((specs, excluded))
}

/// Holds out `fraction` of each class, chosen by a seeded shuffle. Indices come back sorted.
fn stratified_split(y: &[bool], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut holdout) = (Vec::new(), Vec::new());
    for class in [false, true] {
        let mut idx: Vec<usize> = (0..y.len()).filter(|&i| y[i] == class).collect();
        idx.shuffle(&mut rng);
        let n_hold = (idx.len() as f64 * fraction).round() as usize;
        holdout.extend_from_slice(&idx[..n_hold]);
        train.extend_from_slice(&idx[n_hold..]);
    }
    train.sort_unstable();
    holdout.sort_unstable();
    (train, holdout)
}

/// Column means and population standard deviations (1 for a constant column).
fn standardisation(x: &Array2<f64>) -> (Vec<f64>, Vec<f64>) {
    let n = x.nrows() as f64;
    x.columns()
        .into_iter()
        .map(|col| {
            let mean = col.iter().sum::<f64>() / n;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let sd = var.sqrt();
            (mean, if sd > 0.0 { sd } else { 1.0 })
        })
        .unzip()
}

/// AUC (with ties counted half), KS, Gini and Brier score of (probability, defaulted) pairs.
pub fn evaluate(scored: &[(f64, bool)]) -> Metrics {
    let positives = scored.iter().filter(|(_, y)| *y).count() as f64;
    let negatives = scored.len() as f64 - positives;
    let mut sorted = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Mann–Whitney: sum of the positives' mid-ranks.
    let (mut rank_sum, mut i) = (0.0, 0);
    let (mut ks, mut tp, mut fp) = (0.0f64, 0.0, 0.0);
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let mid_rank = (i + j + 1) as f64 / 2.0;
        for &(_, y) in &sorted[i..j] {
            if y {
                rank_sum += mid_rank;
                tp += 1.0;
            } else {
                fp += 1.0;
            }
        }
        // Cumulative shares below the threshold, positives against negatives.
        ks = ks.max((fp / negatives - tp / positives).abs());
        i = j;
    }
    let auc = (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives);
    let brier = scored
        .iter()
        .map(|(p, y)| (p - if *y { 1.0 } else { 0.0 }).powi(2))
        .sum::<f64>()
        / scored.len() as f64;
    Metrics {
        holdout_rows: scored.len() as u64,
        holdout_defaults: positives as u64,
        auc,
        ks,
        gini: 2.0 * auc - 1.0,
        brier,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_a_perfect_and_a_useless_ranking() {
        let perfect = evaluate(&[(0.1, false), (0.2, false), (0.8, true), (0.9, true)]);
        assert_eq!((perfect.auc, perfect.ks, perfect.gini), (1.0, 1.0, 1.0));
        let ties = evaluate(&[(0.5, false), (0.5, true)]);
        assert_eq!((ties.auc, ties.ks), (0.5, 0.0));
        assert_eq!(ties.brier, 0.25);
    }

    #[test]
    fn split_is_stratified_and_seeded() {
        let y: Vec<bool> = (0..1000).map(|i| i % 5 == 0).collect();
        let (train, hold) = stratified_split(&y, 0.2, 7);
        assert_eq!(hold.len(), 200);
        assert_eq!(hold.iter().filter(|&&i| y[i]).count(), 40);
        assert_eq!(train.len() + hold.len(), 1000);
        assert_eq!(stratified_split(&y, 0.2, 7).1, hold);
        assert_ne!(stratified_split(&y, 0.2, 8).1, hold);
    }
}
