//! Model directories: the repository's paths, the shipped v1's training run, a v2 trained
//! once per test process, scratch copies a test may change, and bundle copies.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use riskserve::train::{self, ReasonCodesFrom, TrainSpec};
use tempfile::TempDir;

pub const MODEL: &str = "credit-limit";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn taiwan_csv() -> PathBuf {
    repo().join("data/taiwan_credit_default.csv")
}

/// Copies a bundle directory with one text of its manifest replaced (its name or version),
/// not yet sealed.
pub fn copy_bundle(from: &Path, to: &Path, (old, new): (&str, &str)) {
    copy_dir(from, to);
    let manifest = std::fs::read_to_string(to.join("manifest.toml")).unwrap();
    std::fs::write(to.join("manifest.toml"), manifest.replace(old, new)).unwrap();
}

/// Copies a flat directory tree (bundles are flat: model/version/files).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// The training run that reproduces the shipped v1 (the command in the README). v1 predates
/// reason-code tables, so the run writes none.
pub fn v1_spec(models_dir: &Path) -> TrainSpec {
    TrainSpec {
        data: taiwan_csv(),
        label: "DID_DEFAULT_PAYMENT".into(),
        model: MODEL.into(),
        version: "v1".into(),
        exclude: vec!["USER_ID".into(), "SEX".into(), "MARITALSTATUS".into()],
        holdout: 0.2,
        seed: 7,
        schema: Some(repo().join("data/taiwan_schema.toml")),
        policy: None,
        models_dir: models_dir.to_owned(),
        created_at: "2026-11-28T00:00:00Z".into(),
        reason_codes: ReasonCodesFrom::Omitted,
    }
}

/// A bundle directory holding the shipped v1 (no reason-code table) and a v2 trained here on
/// another seed and holdout (so its coefficients and digest differ) with the default table. Trained once per test process and
/// shared by every test: read it, serve from it, copy from it, never write to it (use
/// [`scratch_models`] for that).
pub fn models_v1_v2() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("models"), dir.path());
        let spec = TrainSpec {
            version: "v2".into(),
            seed: 11,
            holdout: 0.3,
            reason_codes: ReasonCodesFrom::Default,
            ..v1_spec(dir.path())
        };
        train::train(&spec, &mut |_| {}).expect("training v2");
        dir
    })
    .path()
}

/// A fresh copy of `models_v1_v2()` that a test may change.
pub fn scratch_models() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(models_v1_v2(), dir.path());
    dir
}

/// A copy of v1 whose AGE coefficient makes young customers look like defaulters: a
/// candidate that would withdraw the limits of a large segment.
pub fn flawed_candidate(models: &Path) {
    let dir = models.join(MODEL).join("v9");
    copy_bundle(
        &models.join(MODEL).join("v1"),
        &dir,
        ("version = \"v1\"", "version = \"v9\""),
    );
    let params = std::fs::read_to_string(dir.join("parameters.toml")).unwrap();
    let at = params.find("name = \"AGE\"").unwrap();
    let coef = at + params[at..].find("coefficient = ").unwrap() + "coefficient = ".len();
    let end = coef + params[coef..].find('\n').unwrap();
    std::fs::write(
        dir.join("parameters.toml"),
        format!("{}-4.0{}", &params[..coef], &params[end..]),
    )
    .unwrap();
    riskserve::bundle::seal(&dir).unwrap();
}
