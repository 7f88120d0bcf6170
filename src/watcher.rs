//! The bundle watcher: notices new bundle directories under models/ and loads them.
//!
//! It polls rather than subscribing to file-system events: a poll every half second meets the
//! two-second promise on every file system (network mounts and containers included) and
//! needs no platform code. A directory that fails to load is tried again only once its
//! contents change, which is how a bundle caught half-written loads when it is complete.
//! The watcher never makes a version serve unless `auto_serve` is configured.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, VersionState, check_name};

/// The names, sizes and modification times of a directory's files.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// Watches `registry.models_dir()` until `shutdown` is cancelled.
pub async fn run(
    registry: Arc<Registry>,
    interval: Duration,
    auto_serve: bool,
    shutdown: CancellationToken,
) {
    let mut failed: BTreeMap<(String, String), Fingerprint> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (model, version, fingerprint) in scan(registry.models_dir()) {
            let key = (model.clone(), version.clone());
            match registry.knows(&model, &version) {
                Some(VersionState::Failed) | None => {}
                Some(_) => {
                    failed.remove(&key);
                    continue;
                }
            }
            if failed.get(&key) == Some(&fingerprint) {
                continue;
            }
            match registry.load(&model, &version).await {
                Ok(_) => {
                    failed.remove(&key);
                    if auto_serve && let Err(e) = registry.serve(&model, &version) {
                        tracing::warn!(%model, %version, error = %e, "auto-serve failed");
                    }
                }
                Err(_) => {
                    // The registry logged why; wait for the directory to change.
                    failed.insert(key, fingerprint);
                }
            }
        }
    }
}

/// Every `<model>/<version>` directory with a valid name, and its fingerprint. Hidden entries
/// (a trainer's staging directory among them) are skipped.
pub fn scan(models_dir: &Path) -> Vec<(String, String, Fingerprint)> {
    let mut found = Vec::new();
    for (model, model_dir) in subdirs(models_dir) {
        for (version, dir) in subdirs(&model_dir) {
            found.push((model.clone(), version, fingerprint(&dir)));
        }
    }
    found
}

fn subdirs(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            check_name("name", &name).ok()?;
            Some((name, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut fp: Fingerprint = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let meta = e.metadata().ok();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        meta.as_ref().map_or(0, |m| m.len()),
                        meta.and_then(|m| m.modified().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    fp.sort();
    fp
}
