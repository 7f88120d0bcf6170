//! The feature names of each bundle the journal has records of: a binary record stores its
//! vector as bare numbers, in the order of the names stored here for its bundle's digest.
//!
//! One small JSON file per digest, `DIR/<hex>.json` (a sorted array of names), written
//! (temp file, fsync, rename, fsync of the directory) before the first record that needs it
//! is appended, so that every durable record can be read back, also from a backup of the
//! data directory alone.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The names by digest (`sha256:<hex>`), loaded once and added to as bundles appear.
#[derive(Debug)]
pub struct FeatureNames {
    /// Where the lists are stored; None when another store keeps them (PostgreSQL's
    /// `feature_names` table) and this is only its cache.
    dir: Option<PathBuf>,
    known: RwLock<HashMap<String, Arc<Vec<String>>>>,
}

impl FeatureNames {
    /// Loads every stored list under `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<FeatureNames> {
        fs::create_dir_all(dir)?;
        let mut known = HashMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(hex) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let names: Vec<String> = serde_json::from_slice(&fs::read(&path)?)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            known.insert(format!("sha256:{hex}"), Arc::new(names));
        }
        Ok(FeatureNames {
            dir: Some(dir.to_path_buf()),
            known: RwLock::new(known),
        })
    }

    /// A cache of names another store keeps: [`FeatureNames::remember`] fills it once they
    /// are stored there, and [`FeatureNames::ensure`] stores nothing.
    pub fn detached() -> FeatureNames {
        FeatureNames {
            dir: None,
            known: RwLock::new(HashMap::new()),
        }
    }

    /// Adds names stored elsewhere (a detached cache's store); a digest known already keeps
    /// the names it had.
    pub fn remember(&self, digest: &str, names: Vec<String>) -> Arc<Vec<String>> {
        self.known
            .write()
            .expect("feature names poisoned")
            .entry(digest.to_string())
            .or_insert_with(|| Arc::new(names))
            .clone()
    }

    pub fn get(&self, digest: &str) -> Option<Arc<Vec<String>>> {
        self.known
            .read()
            .expect("feature names poisoned")
            .get(digest)
            .cloned()
    }

    /// The stored names of `digest`; stores `names` first if there are none yet. A stored
    /// list that differs from `names` is returned as it is: the caller's record then cannot
    /// use format 3.
    pub fn ensure(&self, digest: &str, names: Vec<String>) -> std::io::Result<Arc<Vec<String>>> {
        if let Some(found) = self.get(digest) {
            return Ok(found);
        }
        let Some(dir) = &self.dir else {
            return Err(std::io::Error::other(format!(
                "the feature names of {digest} are not stored yet"
            )));
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(std::io::Error::other(format!("not a digest: {digest}")));
        }
        let path = dir.join(format!("{hex}.json"));
        let tmp = dir.join(format!("{hex}.json.tmp"));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&names).expect("names serialise"))?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()?;
        let names = Arc::new(names);
        self.known
            .write()
            .expect("feature names poisoned")
            .insert(digest.to_string(), names.clone());
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_survive_a_reopen_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let names = FeatureNames::open(dir.path()).unwrap();
        assert!(names.get(&digest).is_none());
        let a = vec!["AGE".to_string(), "LIMIT".to_string()];
        assert_eq!(*names.ensure(&digest, a.clone()).unwrap(), a);
        assert_eq!(*names.ensure(&digest, vec!["X".into()]).unwrap(), a);
        let reopened = FeatureNames::open(dir.path()).unwrap();
        assert_eq!(*reopened.get(&digest).unwrap(), a);
        assert!(names.ensure("sha256:../x", a).is_err());
    }
}
