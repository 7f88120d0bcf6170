//! Import: makes an immutable bundle of a tree ensemble trained elsewhere (XGBoost's JSON
//! model, LightGBM's text model), so that it is served, recorded, replayed and rolled out like
//! a version riskserve trained.
//!
//! The model file goes into the bundle byte for byte, with its sha256 in the manifest, so that
//! the file a data scientist holds can be matched to the version that decided. Its feature
//! names and their order come from the file; their types, ranges and missing-value rules from
//! a schema file, or from the ranges observed in a data file. A file that cannot be scored
//! exactly as its library does is refused before anything is written, and the bundle is read
//! back through the loader (monotone constraints verified, warm-up scored) before it takes its
//! place.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::bundle::{
    self, BundleDigest, BundleError, DataFile, FORMAT, Manifest, Metrics, Source, SourceFormat,
};
use crate::inputs::{EmptyCells, InputError, SchemaFile, Table, read_file, read_policy, read_toml};
use crate::model::Model as _;
use crate::model::trees::Ensemble;
use crate::reason_codes::{REASON_CODES_FILE, ReasonCodes};
use crate::schema::{FeatureSpec, Schema};

/// Everything an import needs.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    pub format: SourceFormat,
    pub file: PathBuf,
    pub model: String,
    pub version: String,
    /// `[[feature]]` specs by name, for every feature of the model file.
    pub schema: Option<PathBuf>,
    /// A TOML `Policy`; without it the default credit-limit policy.
    pub policy: Option<PathBuf>,
    /// A CSV of customers: observed ranges without a schema, and metrics with `label`.
    pub data: Option<PathBuf>,
    /// The 0/1 outcome column of `data`.
    pub label: Option<String>,
    pub models_dir: PathBuf,
    /// RFC 3339.
    pub created_at: String,
    /// A reason-code table for the model's features. Without one the bundle has none (and
    /// its notices use the default wording): an imported model's feature names are whatever
    /// its author chose, so riskserve does not pretend to have words for them.
    pub reason_codes: Option<PathBuf>,
}

/// What an import produced.
#[derive(Debug)]
pub struct ImportReport {
    pub dir: PathBuf,
    pub digest: BundleDigest,
    pub manifest: Manifest,
    pub trees: usize,
    pub max_depth: usize,
    /// The table written into the bundle, if one was given.
    pub reason_codes: Option<ReasonCodes>,
}

/// Why an import was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("schema: {0}")]
    Schema(String),
    #[error("reason codes: {0}")]
    ReasonCodes(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Names the import procedure in manifests.
fn importer(format: SourceFormat) -> &'static str {
    match format {
        SourceFormat::Xgboost => "riskserve-import 1 (XGBoost JSON model)",
        SourceFormat::Lightgbm => "riskserve-import 1 (LightGBM text model)",
    }
}

/// Imports one model file as a new version under `spec.models_dir`.
pub fn import(spec: &ImportSpec) -> Result<ImportReport, ImportError> {
    humantime::parse_rfc3339(&spec.created_at)
        .map_err(|e| ImportError::Schema(format!("created_at {:?}: {e}", spec.created_at)))?;
    for (what, name) in [("model", &spec.model), ("version", &spec.version)] {
        crate::registry::check_name(what, name).map_err(|e| ImportError::Schema(e.to_string()))?;
    }
    if spec.label.is_some() && spec.data.is_none() {
        return Err(ImportError::Schema("--label needs --data".into()));
    }
    let model_err = |message: String| ImportError::Model {
        path: spec.file.clone(),
        message,
    };
    let bytes = std::fs::read(&spec.file).map_err(|e| model_err(e.to_string()))?;
    let ensemble = spec.format.parse(&bytes).map_err(model_err)?;

    let data = match &spec.data {
        None => None,
        Some(path) => {
            let raw = read_file(path)?;
            let table = Table::parse(&raw, path, EmptyCells::Missing)?;
            Some((path, hex::encode(Sha256::digest(&raw)), table))
        }
    };
    let features = feature_specs(
        &ensemble,
        spec.schema.as_deref(),
        data.as_ref().map(|(_, _, t)| t),
    )?;
    Schema::new(features.clone())
        .check()
        .map_err(ImportError::Schema)?;
    let reason_codes = match &spec.reason_codes {
        None => None,
        Some(path) => {
            let names: Vec<&str> = ensemble.feature_names.iter().map(String::as_str).collect();
            Some(ReasonCodes::read(path, &names).map_err(ImportError::ReasonCodes)?)
        }
    };

    // Metrics by riskserve's own scorer, on the data as given (all of it is held out: the
    // model was trained elsewhere).
    let mut evaluated_on = None;
    let mut metrics: Option<Metrics> = None;
    if let (Some((path, sha256, table)), Some(label)) = (&data, &spec.label) {
        let y = table.labels(label)?;
        let x = table.vectors(&features)?;
        let scored: Vec<(f64, bool)> = x
            .iter()
            .zip(y)
            .map(|(x, y)| (ensemble.score(x).probability_of_default, y))
            .collect();
        metrics = Some(crate::train::evaluate(&scored));
        evaluated_on = Some(DataFile {
            file: file_name(path),
            sha256: sha256.clone(),
            rows: table.rows.len() as u64,
            label: label.clone(),
        });
    } else if let Some((_, _, table)) = &data {
        table.vectors(&features)?;
    }

    let policy = read_policy(spec.policy.as_deref())?;
    let manifest = Manifest {
        format: FORMAT,
        model: spec.model.clone(),
        version: spec.version.clone(),
        created_at: spec.created_at.clone(),
        trainer: importer(spec.format).to_string(),
        reason_codes: reason_codes.as_ref().map(|_| REASON_CODES_FILE.to_string()),
        source: Some(Source {
            format: spec.format,
            file: spec.format.file_name().to_string(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            evaluated_on,
        }),
        training: None,
        metrics,
        features,
        policy,
    };
    let (dir, digest) = bundle::write(
        &spec.models_dir,
        &manifest,
        (spec.format.file_name(), bytes),
        reason_codes.as_ref(),
    )?;
    Ok(ImportReport {
        dir,
        digest,
        manifest,
        trees: ensemble.trees.len(),
        max_depth: ensemble.trees.iter().map(|t| t.depth()).max().unwrap_or(0),
        reason_codes,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The model's features, in its order, specified by the schema file (matched by name) or
/// observed in the data; with the monotone directions the model file declares added, and
/// any that contradict the schema's refused.
fn feature_specs(
    ensemble: &Ensemble,
    schema: Option<&Path>,
    data: Option<&Table>,
) -> Result<Vec<FeatureSpec>, ImportError> {
    let names = &ensemble.feature_names;
    let mut specs: Vec<FeatureSpec> = match (schema, data) {
        (Some(path), _) => {
            let file: SchemaFile = read_toml(path)?;
            if let Some(extra) = file.feature.iter().find(|f| !names.contains(&f.name)) {
                return Err(ImportError::Schema(format!(
                    "{} in {} is not a feature of the model file",
                    extra.name,
                    path.display()
                )));
            }
            names
                .iter()
                .map(|name| {
                    file.feature
                        .iter()
                        .find(|f| &f.name == name)
                        .cloned()
                        .ok_or_else(|| {
                            ImportError::Schema(format!(
                                "the model's feature {name} is not in {}",
                                path.display()
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(table)) => names
            .iter()
            .map(|name| Ok(table.observed(table.column(name)?)))
            .collect::<Result<_, InputError>>()?,
        (None, None) => {
            return Err(ImportError::Schema(
                "the model file holds no valid ranges or missing-value rules: give --schema \
                 or --data"
                    .into(),
            ));
        }
    };
    for &(i, direction) in &ensemble.declared_monotone {
        let spec = &mut specs[i];
        match spec.monotone {
            None => spec.monotone = Some(direction),
            Some(d) if d == direction => {}
            Some(d) => {
                return Err(ImportError::Schema(format!(
                    "feature {}: the schema declares it {d}, the model was trained {direction}",
                    spec.name
                )));
            }
        }
    }
    Ok(specs)
}
