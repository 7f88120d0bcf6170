//! Model bundles: the immutable directory `models/<model>/<version>/` that fixes a version.
//!
//! A bundle holds `manifest.toml` (feature schema, limit policy, provenance and metrics), the
//! model, optionally `reason_codes.toml` (the customer-facing words of each feature, for
//! adverse-action notices; see [`crate::reason_codes`]), and `bundle.sha256`, the digest over
//! a canonical form of every other file. The model is `parameters.toml` for a logistic
//! regression riskserve trained, or the imported model file itself, byte for byte (XGBoost
//! JSON, LightGBM text), for a tree ensemble; the manifest's `[source]` says which, and its
//! `reason_codes` key whether there is a table. The digest is the bundle's identity in every record.
//! [`Bundle::load`] reads, verifies the digest, parses and validates; a bundle that fails any
//! step is refused whole, which is also what keeps a half-written bundle from ever loading.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::trees::{Ensemble, TreeError, lightgbm, xgboost};
use crate::model::{LogisticModel, Model, Scored};
use crate::policy::{Applied, Policy};
use crate::reason_codes::{REASON_CODES_FILE, ReasonCodeError, ReasonCodes};
use crate::schema::{FeatureSpec, Schema};

pub const MANIFEST_FILE: &str = "manifest.toml";
pub const PARAMETERS_FILE: &str = "parameters.toml";
/// Names the model file of an imported bundle in errors (`model.json` or `model.txt`).
const MODEL_FILE: &str = "the model file";
/// Holds the digest; written last, so its presence marks a complete bundle.
pub const DIGEST_FILE: &str = "bundle.sha256";
/// The manifest format this build reads and writes.
pub const FORMAT: u32 = 1;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("bundle is incomplete: {0} is missing")]
    Incomplete(&'static str),
    #[error("digest mismatch: {DIGEST_FILE} says {expected} but the files hash to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{file} does not parse: {message}")]
    Parse { file: &'static str, message: String },
    #[error("invalid bundle: {0}")]
    Invalid(String),
    /// Boxed: the table's errors name the entry and field, and would otherwise make every
    /// `Result` that carries a bundle error larger.
    #[error("{REASON_CODES_FILE}: {0}")]
    ReasonCodes(Box<ReasonCodeError>),
}

impl BundleError {
    fn io(path: &Path, source: io::Error) -> Self {
        BundleError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What a version decided for one vector: the model's score and the policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub scored: Scored,
    pub applied: Applied,
}

/// A bundle's identity: `sha256:` and the hex digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BundleDigest(String);

impl BundleDigest {
    /// A digest as recorded elsewhere (a decision record); not checked against any bundle.
    pub fn recorded(digest: String) -> Self {
        BundleDigest(digest)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BundleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the training data came from, so a version can be reproduced and audited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub data_file: String,
    /// sha256 of the data file's bytes.
    pub data_sha256: String,
    pub rows: u64,
    pub label: String,
    pub excluded: Vec<String>,
    pub holdout_fraction: f64,
    pub seed: u64,
}

/// Quality on the stratified holdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub holdout_rows: u64,
    pub holdout_defaults: u64,
    pub auc: f64,
    pub ks: f64,
    pub gini: f64,
    pub brier: f64,
}

/// The file format of an imported model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// XGBoost's JSON model (`Booster.save_model("x.json")`).
    Xgboost,
    /// LightGBM's text model (`Booster.save_model("x.txt")`).
    Lightgbm,
}

impl SourceFormat {
    /// The name of the model file inside a bundle.
    pub fn file_name(self) -> &'static str {
        match self {
            SourceFormat::Xgboost => "model.json",
            SourceFormat::Lightgbm => "model.txt",
        }
    }

    /// Reads a model file of this format.
    pub fn parse(self, bytes: &[u8]) -> Result<Ensemble, String> {
        match self {
            SourceFormat::Xgboost => xgboost::parse(bytes),
            SourceFormat::Lightgbm => match std::str::from_utf8(bytes) {
                Ok(text) => lightgbm::parse(text),
                Err(_) => Err(TreeError::Malformed(
                    "LightGBM",
                    "the file is not UTF-8".into(),
                )),
            },
        }
        .map_err(|e| e.to_string())
    }
}

/// A data file by name and content, as evaluated on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    pub file: String,
    pub sha256: String,
    pub rows: u64,
    /// The 0/1 outcome column the metrics were computed against.
    pub label: String,
}

/// Where an imported model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub format: SourceFormat,
    /// The model file in the bundle, byte for byte the one imported.
    pub file: String,
    /// sha256 of that file, hex: the file the data scientist holds hashes to it.
    pub sha256: String,
    /// The data the metrics were computed on by riskserve's own scorer, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_on: Option<DataFile>,
}

/// The human-readable description of a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub model: String,
    pub version: String,
    /// RFC 3339; given to the trainer so that a retrain reproduces the digest.
    pub created_at: String,
    pub trainer: String,
    /// The reason-code table's file (`reason_codes.toml`), when the bundle has one. Absent
    /// in bundles made before tables existed (the shipped v1), whose notices use riskserve's
    /// default wording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_codes: Option<String>,
    /// Present for an imported model; absent for one riskserve trained (`parameters.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Present for a model riskserve trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
    /// The holdout's (trained) or the evaluation data's (imported, with `--data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(rename = "feature")]
    pub features: Vec<FeatureSpec>,
    pub policy: Policy,
}

/// A verified, validated version, ready to score.
#[derive(Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    /// The manifest exactly as stored, for people who ask to see it.
    pub manifest_text: String,
    pub schema: Schema,
    pub model: Box<dyn Model>,
    /// The customer-facing words of each feature, checked against the model's features.
    pub reason_codes: Option<ReasonCodes>,
    pub digest: BundleDigest,
}

impl Bundle {
    pub fn model_name(&self) -> &str {
        &self.manifest.model
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// Reads a bundle directory: verify the digest, parse, validate. `expect` names the model
    /// and version the directory stands for; a manifest that says otherwise is refused.
    pub fn load(dir: &Path, expect: Option<(&str, &str)>) -> Result<Bundle, BundleError> {
        let files = read_files(dir)?;
        let recorded = match files.iter().find(|(name, _)| name == DIGEST_FILE) {
            Some((_, bytes)) => String::from_utf8_lossy(bytes).trim().to_string(),
            None => return Err(BundleError::Incomplete(DIGEST_FILE)),
        };
        let digest = digest_of(&files);
        if recorded != digest.0 {
            return Err(BundleError::DigestMismatch {
                expected: recorded,
                actual: digest.0,
            });
        }
        Bundle::parse(&files, digest, expect)
    }

    /// Parses and validates a bundle's files (name and bytes), its digest already checked.
    /// Kept apart from the file reading so that it can be fuzzed on its own.
    pub fn parse(
        files: &[(String, Vec<u8>)],
        digest: BundleDigest,
        expect: Option<(&str, &str)>,
    ) -> Result<Bundle, BundleError> {
        let bytes = |file: &str| {
            files
                .iter()
                .find(|(name, _)| name == file)
                .map(|(_, b)| b.as_slice())
        };
        let text = |file: &'static str| -> Result<&str, BundleError> {
            let b = bytes(file).ok_or(BundleError::Incomplete(file))?;
            std::str::from_utf8(b).map_err(|_| BundleError::Parse {
                file,
                message: "not UTF-8".into(),
            })
        };
        let manifest_text = text(MANIFEST_FILE)?.to_string();
        let manifest: Manifest =
            toml::from_str(&manifest_text).map_err(|e| BundleError::Parse {
                file: MANIFEST_FILE,
                message: e.message().to_string(),
            })?;
        let model: Box<dyn Model> = match &manifest.source {
            None => {
                let m: LogisticModel =
                    toml::from_str(text(PARAMETERS_FILE)?).map_err(|e| BundleError::Parse {
                        file: PARAMETERS_FILE,
                        message: e.message().to_string(),
                    })?;
                m.check().map_err(BundleError::Invalid)?;
                Box::new(m)
            }
            Some(source) => {
                let file = source.format.file_name();
                if source.file != file {
                    return Err(BundleError::Invalid(format!(
                        "a {:?} model is stored as {file}, not {:?}",
                        source.format, source.file
                    )));
                }
                let b = bytes(file).ok_or(BundleError::Incomplete(file))?;
                let actual = hex::encode(Sha256::digest(b));
                if actual != source.sha256 {
                    return Err(BundleError::Invalid(format!(
                        "{file} hashes to {actual}, the manifest says {}",
                        source.sha256
                    )));
                }
                Box::new(
                    source
                        .format
                        .parse(b)
                        .map_err(|message| BundleError::Parse {
                            file: MODEL_FILE,
                            message,
                        })?,
                )
            }
        };
        let reason_codes = match (&manifest.reason_codes, bytes(REASON_CODES_FILE)) {
            (None, None) => None,
            (Some(listed), _) if listed != REASON_CODES_FILE => {
                return Err(BundleError::Invalid(format!(
                    "the manifest lists reason codes as {listed:?}; the table is always \
                     {REASON_CODES_FILE}"
                )));
            }
            (Some(_), None) => return Err(BundleError::Incomplete(REASON_CODES_FILE)),
            // A table the manifest does not list would be covered by the digest but invisible
            // to whoever reads the manifest: refuse rather than guess whether it counts.
            (None, Some(_)) => {
                return Err(BundleError::Invalid(format!(
                    "{REASON_CODES_FILE} is in the bundle but the manifest does not list it \
                     (reason_codes = \"{REASON_CODES_FILE}\")"
                )));
            }
            (Some(_), Some(_)) => Some(
                ReasonCodes::parse(text(REASON_CODES_FILE)?)
                    .map_err(|e| BundleError::ReasonCodes(Box::new(e)))?,
            ),
        };
        let bundle = Bundle {
            schema: Schema::new(manifest.features.clone()),
            manifest,
            manifest_text,
            model,
            reason_codes,
            digest,
        };
        bundle.validate(expect)?;
        Ok(bundle)
    }

    /// Everything a bundle must satisfy beyond parsing.
    fn validate(&self, expect: Option<(&str, &str)>) -> Result<(), BundleError> {
        let m = &self.manifest;
        if m.format != FORMAT {
            return Err(BundleError::Invalid(format!(
                "manifest format {} is not the supported {FORMAT}",
                m.format
            )));
        }
        if let Some((model, version)) = expect
            && (m.model != model || m.version != version)
        {
            return Err(BundleError::Invalid(format!(
                "manifest says {}/{} but the bundle sits at {model}/{version}",
                m.model, m.version
            )));
        }
        self.schema.check().map_err(BundleError::Invalid)?;
        let schema_names = self.schema.features().iter().map(|f| f.name.as_str());
        if !schema_names.eq(self.model.feature_names()) {
            return Err(BundleError::Invalid(format!(
                "the schema's features do not match the {}'s features (names and order)",
                self.model.kind()
            )));
        }
        for (i, spec) in self.schema.features().iter().enumerate() {
            if spec.allows_missing() && !self.model.handles_missing() {
                return Err(BundleError::Invalid(format!(
                    "feature {}: missing = \"allowed\" needs a model that routes missing \
                     values, and a {} does not",
                    spec.name,
                    self.model.kind()
                )));
            }
            if let Some(direction) = spec.monotone {
                self.model.check_monotone(i, direction).map_err(|e| {
                    BundleError::Invalid(format!(
                        "feature {} is declared {direction}, but {e}",
                        spec.name
                    ))
                })?;
            }
        }
        m.policy
            .check()
            .map_err(|e| BundleError::Invalid(format!("policy: {e}")))?;
        if let Some(table) = &self.reason_codes {
            table
                .check(&self.model.feature_names())
                .map_err(|e| BundleError::ReasonCodes(Box::new(e)))?;
        }
        Ok(())
    }

    /// What this version decides for a validated vector: its model's PD and reasons, and
    /// its policy's grade, decision and limit. The one place score and policy are put
    /// together, for serving, shadow, replay, backtest and warm-up alike.
    pub fn decide(&self, x: &[f64], current_limit: Option<i64>) -> Verdict {
        let scored = self.model.score(x);
        let applied = self
            .manifest
            .policy
            .apply(scored.probability_of_default, current_limit);
        Verdict { scored, applied }
    }

    /// Scores sample vectors drawn from the schema (each range's corners and middle, and
    /// every feature missing that may be) and checks every answer is a usable probability,
    /// before the version may serve.
    pub fn warm_up(&self) -> Result<(), BundleError> {
        let specs = self.schema.features();
        let lows: Vec<f64> = specs.iter().map(|s| s.min).collect();
        let highs: Vec<f64> = specs.iter().map(|s| s.max).collect();
        let middles: Vec<f64> = specs
            .iter()
            .map(|s| s.min + (s.max - s.min) / 2.0)
            .collect();
        let missing: Vec<f64> = specs
            .iter()
            .map(|s| if s.allows_missing() { f64::NAN } else { s.min })
            .collect();
        for sample in [middles, lows, highs, missing] {
            let pd = self
                .decide(&sample, Some(100_000))
                .scored
                .probability_of_default;
            if !(0.0..=1.0).contains(&pd) {
                return Err(BundleError::Invalid(format!(
                    "warm-up scored a probability of {pd}"
                )));
            }
        }
        Ok(())
    }
}

/// The regular files of a bundle directory, sorted by name. Subdirectories are refused:
/// a bundle is flat so that its canonical form is obvious.
fn read_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| BundleError::io(dir, e))? {
        let entry = entry.map_err(|e| BundleError::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| BundleError::io(&path, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !kind.is_file() {
            return Err(BundleError::Invalid(format!(
                "{name} is not a regular file; bundles are flat directories"
            )));
        }
        let bytes = fs::read(&path).map_err(|e| BundleError::io(&path, e))?;
        files.push((name, bytes));
    }
    files.sort();
    Ok(files)
}

/// sha256 over every file but the digest file, sorted by name, each framed as
/// `name NUL length(u64 LE) bytes`, so that no two different bundles share a stream.
fn digest_of(files: &[(String, Vec<u8>)]) -> BundleDigest {
    let mut h = Sha256::new();
    for (name, bytes) in files.iter().filter(|(n, _)| n != DIGEST_FILE) {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    BundleDigest(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Computes the digest of a bundle directory's files and writes it to `bundle.sha256`.
///
/// For tools that assemble a bundle by hand (and for tests that build broken ones); the
/// trainer seals through [`write`].
pub fn seal(dir: &Path) -> Result<BundleDigest, BundleError> {
    let digest = digest_of(&read_files(dir)?);
    let path = dir.join(DIGEST_FILE);
    fs::write(&path, format!("{digest}\n")).map_err(|e| BundleError::io(&path, e))?;
    Ok(digest)
}

/// The `parameters.toml` of a logistic model, for [`write`].
pub fn parameters_file(model: &LogisticModel) -> Result<(&'static str, Vec<u8>), BundleError> {
    Ok((PARAMETERS_FILE, to_toml(PARAMETERS_FILE, model)?))
}

/// A bundle file's TOML text, as bytes.
fn to_toml(file: &'static str, value: &impl Serialize) -> Result<Vec<u8>, BundleError> {
    toml::to_string_pretty(value)
        .map(String::into_bytes)
        .map_err(|e| BundleError::Parse {
            file,
            message: e.to_string(),
        })
}

/// Writes a new bundle at `models_dir/<model>/<version>` atomically: its manifest, its model
/// file (name and bytes) and its reason-code table if it has one into a hidden sibling first,
/// the digest file last, then read back as the server would load it and only then renamed
/// into place. An existing version is never overwritten: bundles are immutable. A table the
/// manifest does not list, or a listed one not given, fails the read-back like any other
/// fault.
pub fn write(
    models_dir: &Path,
    manifest: &Manifest,
    (model_file, model_bytes): (&str, Vec<u8>),
    reason_codes: Option<&ReasonCodes>,
) -> Result<(PathBuf, BundleDigest), BundleError> {
    let parent = models_dir.join(&manifest.model);
    let dest = parent.join(&manifest.version);
    if dest.exists() {
        return Err(BundleError::Invalid(format!(
            "{} already exists; bundles are immutable, pick a new version",
            dest.display()
        )));
    }
    let mut files = vec![
        (MANIFEST_FILE.to_string(), to_toml(MANIFEST_FILE, manifest)?),
        (model_file.to_string(), model_bytes),
    ];
    if let Some(table) = reason_codes {
        files.push((
            REASON_CODES_FILE.to_string(),
            to_toml(REASON_CODES_FILE, table)?,
        ));
    }
    let staging = parent.join(format!(
        ".{}.partial-{}",
        manifest.version,
        std::process::id()
    ));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| BundleError::Io { path: p, source: e }
    };
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    for (name, bytes) in &files {
        fs::write(staging.join(name), bytes).map_err(io(&staging))?;
    }
    // Read back through the loader before it takes its place (digest, validation, monotone
    // directions, warm-up), so that nothing the server would refuse is ever left there.
    let checked = seal(&staging).and_then(|digest| {
        Bundle::load(&staging, Some((&manifest.model, &manifest.version)))?.warm_up()?;
        Ok(digest)
    });
    let digest = match checked {
        Ok(digest) => digest,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    fs::rename(&staging, &dest).map_err(io(&dest))?;
    Ok((dest, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_separates_names_from_contents() {
        let a = digest_of(&[("ab".into(), b"c".to_vec())]);
        let b = digest_of(&[("a".into(), b"bc".to_vec())]);
        assert_ne!(a, b);
        let with_digest_file = digest_of(&[
            ("ab".into(), b"c".to_vec()),
            (DIGEST_FILE.into(), b"x".to_vec()),
        ]);
        assert_eq!(a, with_digest_file);
    }
}
