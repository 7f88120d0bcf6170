//! The bundle watcher: notices new bundle directories under models/ and loads them.
//!
//! It polls rather than subscribing to file-system events: a poll every half second meets the
//! two-second promise on every file system (network mounts and containers included) and
//! needs no platform code. Each directory is tried once per state of its contents: one that
//! fails is tried again only when it changes (how a bundle caught half-written loads once
//! complete), and one an operator unloaded is not loaded back behind their back.
//! The watcher never makes a version serve unless `auto_serve` is configured, and not even then
//! while a rollout of that model is open.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, VersionState, check_name};
use crate::rollout::{Control, RolloutError};

/// The names, sizes and modification times of a directory's files.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// Watches `registry.models_dir()` until `shutdown` is cancelled.
///
/// What is on disk when this is called counts as handled: the start-up load tried every
/// directory there. Taken here, before the returned future first runs, so that a version an
/// operator unloads right after start is not loaded back by the watcher's first look.
pub fn run(
    registry: Arc<Registry>,
    control: Arc<Control>,
    interval: Duration,
    auto_serve: bool,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let handled = scan(registry.models_dir())
        .into_iter()
        .map(|(model, version, fingerprint)| ((model, version), fingerprint))
        .collect();
    watch(registry, control, interval, auto_serve, shutdown, handled)
}

async fn watch(
    registry: Arc<Registry>,
    control: Arc<Control>,
    interval: Duration,
    auto_serve: bool,
    shutdown: CancellationToken,
    // What each directory looked like when it was last handled.
    mut handled: BTreeMap<(String, String), Fingerprint>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (model, version, fingerprint) in scan(registry.models_dir()) {
            let key = (model.clone(), version.clone());
            let known = registry.knows(&model, &version);
            let retry = match handled.insert(key, fingerprint.clone()) {
                // Unchanged since last handled.
                Some(previous) if previous == fingerprint => false,
                // Changed: worth another try unless a version is already loaded from it.
                Some(_) => matches!(known, Some(VersionState::Failed) | None),
                // First sight (it appeared after start): new unless an operator already
                // tried it.
                None => known.is_none(),
            };
            if !retry {
                continue;
            }
            // A refusal is logged by the registry and listed as failed.
            if registry.load(&model, &version).await.is_err() || !auto_serve {
                continue;
            }
            // An open rollout decides what serves its model; auto-serve must not cut across it.
            // The switch waits its turn behind a rollout's start (and its backtest); shutdown
            // does not wait for it.
            let served = tokio::select! {
                _ = shutdown.cancelled() => return,
                served = control.serve_unless_rolling_out(&model, &version) => served,
            };
            match served {
                Ok(_) => {}
                Err(RolloutError::DecidedByRollout(_)) => {
                    tracing::info!(%model, %version, "loaded; not auto-served during a rollout");
                }
                Err(e) => tracing::warn!(%model, %version, error = %e, "auto-serve failed"),
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
