//! The registry: every loaded version of every model, and the one that serves each model.
//!
//! The serving version of a model sits behind an [`ArcSwapOption`]: a request takes its
//! `Arc<Bundle>` once and finishes on it, however many swaps happen meanwhile, and a swap is a
//! single atomic pointer store. Loading runs off the async runtime and walks
//! read → verify digest → validate → warm up before a version is READY; only a READY version
//! can be made to serve. A refused bundle is kept as FAILED with its error and changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::bundle::{Bundle, BundleError};

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model {0} is not known")]
    UnknownModel(String),
    #[error("model {model} has no version {version} loaded")]
    UnknownVersion { model: String, version: String },
    #[error("model {0} has no serving version")]
    NoServingVersion(String),
    #[error("{model}/{version} is {state}, not ready; load it first")]
    NotReady {
        model: String,
        version: String,
        state: &'static str,
    },
    #[error("{model}/{version} is serving; serve another version before unloading it")]
    UnloadServing { model: String, version: String },
    #[error("{model}/{version} is already loading")]
    AlreadyLoading { model: String, version: String },
    #[error(
        "{field} {value:?} is not a valid name (letters, digits, '.', '_', '-'; not starting with '.')"
    )]
    InvalidName { field: &'static str, value: String },
    #[error("no bundle directory at {0}")]
    NoBundle(PathBuf),
    #[error("loading {model}/{version}: {source}")]
    Load {
        model: String,
        version: String,
        #[source]
        source: BundleError,
    },
    #[error("{model}/{version} is {state}: {why}")]
    Unusable {
        model: String,
        version: String,
        state: &'static str,
        why: String,
    },
    #[error("saving the serving choice to {path}: {message}")]
    Persist { path: PathBuf, message: String },
}

/// The life of a version in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Loading,
    Ready,
    Serving,
    Failed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Loading => "loading",
            VersionState::Ready => "ready",
            VersionState::Serving => "serving",
            VersionState::Failed => "failed",
        }
    }
}

/// What the registry says of one version.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub model: String,
    pub version: String,
    pub state: VersionState,
    pub bundle: Option<Arc<Bundle>>,
    pub error: Option<String>,
}

/// What the registry says of one model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub serving: Option<String>,
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug)]
enum Entry {
    Loading,
    Loaded(Arc<Bundle>),
    Failed(String),
}

#[derive(Debug, Default)]
struct Slot {
    serving: ArcSwapOption<Bundle>,
    versions: Mutex<BTreeMap<String, Entry>>,
}

/// All models and their versions. Shared by the gRPC services and the bundle watcher.
#[derive(Debug)]
pub struct Registry {
    models_dir: PathBuf,
    /// Where the serving choice of each model is kept across restarts; `None` keeps nothing.
    choices_file: Option<PathBuf>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    ready: watch::Sender<bool>,
    persisting: Mutex<()>,
}

impl Registry {
    pub fn new(models_dir: PathBuf, choices_file: Option<PathBuf>) -> Self {
        Registry {
            models_dir,
            choices_file,
            slots: RwLock::default(),
            ready: watch::Sender::new(false),
            persisting: Mutex::new(()),
        }
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// The version serving `model`, taken once: the caller scores on it to the end.
    pub fn serving(&self, model: &str) -> Result<Arc<Bundle>, RegistryError> {
        let slot = self.slot(model)?;
        slot.serving
            .load_full()
            .ok_or_else(|| RegistryError::NoServingVersion(model.to_string()))
    }

    /// Ready means every known model has a serving version (and at least one model exists).
    pub fn is_ready(&self) -> bool {
        let slots = self.slots.read().expect("registry lock poisoned");
        !slots.is_empty() && slots.values().all(|s| s.serving.load().is_some())
    }

    /// Follows readiness as it changes.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn refresh_ready(&self) {
        let ready = self.is_ready();
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    fn slot(&self, model: &str) -> Result<Arc<Slot>, RegistryError> {
        self.slots
            .read()
            .expect("registry lock poisoned")
            .get(model)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownModel(model.to_string()))
    }

    fn slot_or_create(&self, model: &str) -> Arc<Slot> {
        let mut slots = self.slots.write().expect("registry lock poisoned");
        slots.entry(model.to_string()).or_default().clone()
    }

    /// Loads `models_dir/<model>/<version>`; on success the version is READY (or stays as it
    /// was if it is already loaded: a bundle is immutable). A refused bundle is kept as
    /// FAILED with its error, and the error is returned.
    pub async fn load(
        self: &Arc<Self>,
        model: &str,
        version: &str,
    ) -> Result<VersionInfo, RegistryError> {
        check_name("model", model)?;
        check_name("version", version)?;
        let dir = self.models_dir.join(model).join(version);
        if !dir.is_dir() {
            return Err(RegistryError::NoBundle(dir));
        }
        let slot = self.slot_or_create(model);
        {
            let mut versions = slot.versions.lock().expect("versions lock poisoned");
            match versions.get(version) {
                Some(Entry::Loaded(_)) => {
                    drop(versions);
                    return self.info(model, version);
                }
                Some(Entry::Loading) => {
                    return Err(RegistryError::AlreadyLoading {
                        model: model.into(),
                        version: version.into(),
                    });
                }
                Some(Entry::Failed(_)) | None => {
                    versions.insert(version.to_string(), Entry::Loading);
                }
            }
        }
        let (m, v) = (model.to_string(), version.to_string());
        let loaded = tokio::task::spawn_blocking(move || {
            let bundle = Bundle::load(&dir, Some((&m, &v)))?;
            bundle.warm_up()?;
            Ok::<_, BundleError>(bundle)
        })
        .await
        .unwrap_or_else(|join| Err(BundleError::Invalid(format!("loader panicked: {join}"))));

        let mut versions = slot.versions.lock().expect("versions lock poisoned");
        match loaded {
            Ok(bundle) => {
                tracing::info!(model, version, digest = %bundle.digest, "version loaded");
                crate::telemetry::metrics().version_load(model, true);
                versions.insert(version.to_string(), Entry::Loaded(Arc::new(bundle)));
                drop(versions);
                self.info(model, version)
            }
            Err(source) => {
                tracing::warn!(model, version, error = %source, "version refused");
                crate::telemetry::metrics().version_load(model, false);
                versions.insert(version.to_string(), Entry::Failed(source.to_string()));
                Err(RegistryError::Load {
                    model: model.into(),
                    version: version.into(),
                    source,
                })
            }
        }
    }

    /// Makes a READY version the serving one, atomically, and remembers the choice.
    ///
    /// The swap is one pointer store; saving the choice is file I/O, done on a blocking
    /// thread so that it never holds up a scoring request.
    pub async fn serve(
        self: &Arc<Self>,
        model: &str,
        version: &str,
    ) -> Result<VersionInfo, RegistryError> {
        let slot = self.slot(model)?;
        let bundle = {
            let versions = slot.versions.lock().expect("versions lock poisoned");
            match versions.get(version) {
                Some(Entry::Loaded(b)) => b.clone(),
                Some(other) => {
                    return Err(RegistryError::NotReady {
                        model: model.into(),
                        version: version.into(),
                        state: entry_state(other).as_str(),
                    });
                }
                None => {
                    return Err(RegistryError::UnknownVersion {
                        model: model.into(),
                        version: version.into(),
                    });
                }
            }
        };
        let previous = slot.serving.swap(Some(bundle));
        if previous.as_ref().map(|b| b.version()) != Some(version) {
            tracing::info!(
                model,
                version,
                previous = previous.as_ref().map(|b| b.version()),
                "serving version switched"
            );
            let registry = self.clone();
            tokio::task::spawn_blocking(move || registry.persist_choices())
                .await
                .unwrap_or_else(|join| {
                    Err(RegistryError::Persist {
                        path: PathBuf::new(),
                        message: join.to_string(),
                    })
                })?;
        }
        self.refresh_ready();
        self.info(model, version)
    }

    /// Drops a loaded or failed version. The serving version is refused.
    pub fn unload(&self, model: &str, version: &str) -> Result<VersionInfo, RegistryError> {
        let slot = self.slot(model)?;
        let mut versions = slot.versions.lock().expect("versions lock poisoned");
        if slot.serving.load().as_ref().map(|b| b.version()) == Some(version) {
            return Err(RegistryError::UnloadServing {
                model: model.into(),
                version: version.into(),
            });
        }
        match versions.get(version) {
            Some(Entry::Loading) => Err(RegistryError::AlreadyLoading {
                model: model.into(),
                version: version.into(),
            }),
            None => Err(RegistryError::UnknownVersion {
                model: model.into(),
                version: version.into(),
            }),
            Some(_) => {
                let info = version_info(model, version, versions.get(version), None);
                versions.remove(version);
                tracing::info!(model, version, "version unloaded");
                Ok(info)
            }
        }
    }

    /// Everything the registry holds, models and versions in name order.
    pub fn list(&self) -> Vec<ModelInfo> {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots
            .read()
            .expect("registry lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        slots
            .into_iter()
            .map(|(name, slot)| {
                let serving = slot.serving.load_full();
                let versions = slot.versions.lock().expect("versions lock poisoned");
                ModelInfo {
                    serving: serving.as_ref().map(|b| b.version().to_string()),
                    versions: versions
                        .iter()
                        .map(|(v, e)| version_info(&name, v, Some(e), serving.as_deref()))
                        .collect(),
                    name,
                }
            })
            .collect()
    }

    /// One version as the registry sees it.
    pub fn info(&self, model: &str, version: &str) -> Result<VersionInfo, RegistryError> {
        let slot = self.slot(model)?;
        let serving = slot.serving.load_full();
        let versions = slot.versions.lock().expect("versions lock poisoned");
        match versions.get(version) {
            None => Err(RegistryError::UnknownVersion {
                model: model.into(),
                version: version.into(),
            }),
            entry => Ok(version_info(model, version, entry, serving.as_deref())),
        }
    }

    /// The bundle of a loaded version; a version that failed to load (or is still loading)
    /// is refused with its state and error.
    pub fn bundle(&self, model: &str, version: &str) -> Result<Arc<Bundle>, RegistryError> {
        let info = self.info(model, version)?;
        info.bundle.ok_or_else(|| RegistryError::Unusable {
            model: model.into(),
            version: version.into(),
            state: info.state.as_str(),
            why: info.error.unwrap_or_else(|| "no bundle loaded".into()),
        })
    }

    /// Loads a version (if it is not loaded yet) and returns its bundle.
    pub async fn load_bundle(
        self: &Arc<Self>,
        model: &str,
        version: &str,
    ) -> Result<Arc<Bundle>, RegistryError> {
        self.load(model, version).await?;
        self.bundle(model, version)
    }

    /// A loaded version with this digest, whichever model or state.
    pub fn find_by_digest(&self, digest: &str) -> Option<Arc<Bundle>> {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .read()
            .expect("registry lock poisoned")
            .values()
            .cloned()
            .collect();
        slots.iter().find_map(|slot| {
            let versions = slot.versions.lock().expect("versions lock poisoned");
            versions.values().find_map(|e| match e {
                Entry::Loaded(b) if b.digest.as_str() == digest => Some(b.clone()),
                _ => None,
            })
        })
    }

    /// Whether the registry already holds this version (loaded, loading or failed).
    pub fn knows(&self, model: &str, version: &str) -> Option<VersionState> {
        let slot = self.slot(model).ok()?;
        let versions = slot.versions.lock().expect("versions lock poisoned");
        versions.get(version).map(entry_state)
    }

    /// Chooses what serves each model at start: the pinned version if configured, else the
    /// choice saved by the last run, else the highest version by natural order. Only READY
    /// versions qualify; a model with none stays without a serving version (not ready).
    pub async fn choose_initial_serving(
        self: &Arc<Self>,
        pinned: &BTreeMap<String, String>,
    ) -> Result<(), RegistryError> {
        let saved = self.saved_choices();
        for model in self.list() {
            let loaded: Vec<&str> = model
                .versions
                .iter()
                .filter(|v| v.bundle.is_some())
                .map(|v| v.version.as_str())
                .collect();
            let wanted = pinned
                .get(&model.name)
                .or_else(|| saved.get(&model.name))
                .map(String::as_str)
                .filter(|v| loaded.contains(v));
            let choice = wanted.or_else(|| loaded.iter().copied().max_by(|a, b| natural_cmp(a, b)));
            match choice {
                Some(version) => {
                    self.serve(&model.name, version).await?;
                }
                None => {
                    tracing::error!(model = %model.name, "no loadable version; model not ready")
                }
            }
        }
        self.refresh_ready();
        Ok(())
    }

    fn saved_choices(&self) -> BTreeMap<String, String> {
        let Some(path) = &self.choices_file else {
            return BTreeMap::new();
        };
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable serving choices");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        }
    }

    /// Writes what serves now, for every model, over the saved choices. Writers take turns
    /// and each writes the current state, so the file ends with the last swap whatever order
    /// concurrent swaps finish in.
    fn persist_choices(&self) -> Result<(), RegistryError> {
        let Some(path) = &self.choices_file else {
            return Ok(());
        };
        let _turn = self.persisting.lock().expect("persist lock poisoned");
        let mut choices = self.saved_choices();
        for model in self.list() {
            if let Some(version) = model.serving {
                choices.insert(model.name, version);
            }
        }
        let err = |message: String| RegistryError::Persist {
            path: path.clone(),
            message,
        };
        let text = toml::to_string(&choices).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}

fn entry_state(entry: &Entry) -> VersionState {
    match entry {
        Entry::Loading => VersionState::Loading,
        Entry::Loaded(_) => VersionState::Ready,
        Entry::Failed(_) => VersionState::Failed,
    }
}

fn version_info(
    model: &str,
    version: &str,
    entry: Option<&Entry>,
    serving: Option<&Bundle>,
) -> VersionInfo {
    let mut state = entry.map(entry_state).unwrap_or(VersionState::Failed);
    let (bundle, error) = match entry {
        Some(Entry::Loaded(b)) => {
            if serving.is_some_and(|s| std::ptr::eq(s, b.as_ref())) {
                state = VersionState::Serving;
            }
            (Some(b.clone()), None)
        }
        Some(Entry::Failed(e)) => (None, Some(e.clone())),
        _ => (None, None),
    };
    VersionInfo {
        model: model.into(),
        version: version.into(),
        state,
        bundle,
        error,
    }
}

/// Model and version names become path components; keep them to a safe alphabet.
pub fn check_name(field: &'static str, value: &str) -> Result<(), RegistryError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName {
            field,
            value: value.to_string(),
        })
    }
}

/// Orders "v2" before "v10": runs of digits compare as numbers.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then(ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len()).then(a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["v10", "v2", "v1", "v2b"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["v1", "v2", "v2b", "v10"]);
    }

    #[test]
    fn names_are_path_safe() {
        assert!(check_name("version", "v1.2-rc_1").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "v 1"] {
            assert!(check_name("version", bad).is_err(), "{bad}");
        }
    }
}
