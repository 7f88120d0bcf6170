//! Customer pseudonymisation: the raw customer id never reaches storage or logs.
//!
//! A customer ref is HMAC-SHA256 of the id under a secret key. Several keys may be configured
//! for rotation: the first signs new decisions, every key is tried when looking a customer up,
//! and each record names the key (by id) that made its ref.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("customer key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "customer key file {0} holds fewer than 32 bytes (hex-encode at least 32 random bytes)"
    )]
    TooShort(PathBuf),
    #[error(
        "no customer key configured: set customer_key_files (RISKSERVE_CUSTOMER_KEY_FILES); only a server on loopback may generate a development key"
    )]
    Missing,
    #[error(
        "a shared store needs customer_key_files (RISKSERVE_CUSTOMER_KEY_FILES): every replica \
         must turn a customer into the same reference, so none may make its own development key"
    )]
    NotShared,
}

/// One key: its id (the first 8 hex digits of its sha256) and its bytes.
#[derive(Clone)]
struct Key {
    id: String,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id) // never the bytes
    }
}

/// A customer's pseudonym under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRef {
    pub key_id: String,
    /// The HMAC as lowercase hex: the ref as records and lookups name it.
    pub value: String,
    /// The same HMAC's bytes.
    pub bytes: [u8; 32],
}

/// The configured keys; the first is current.
#[derive(Debug, Clone)]
pub struct CustomerKeys {
    keys: Vec<Key>,
}

impl CustomerKeys {
    /// Keys from raw bytes, current first.
    pub fn from_bytes(keys: Vec<Vec<u8>>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Missing);
        }
        Ok(CustomerKeys {
            keys: keys
                .into_iter()
                .map(|bytes| Key {
                    id: hex::encode(&Sha256::digest(&bytes)[..4]),
                    bytes,
                })
                .collect(),
        })
    }

    /// Reads key files (hex text, or raw bytes if not hex), current first.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let keys = paths
            .iter()
            .map(|p| read_key(p))
            .collect::<Result<_, _>>()?;
        Self::from_bytes(keys)
    }

    /// Reads `path`, creating it with a fresh random key first if it does not exist.
    /// For development servers on loopback only.
    pub fn dev_key(path: &Path) -> Result<Self, KeyError> {
        if !path.exists() {
            let key: [u8; 32] = rand::random();
            let err = |source| KeyError::Read {
                path: path.to_owned(),
                source,
            };
            std::fs::write(path, hex::encode(key)).map_err(err)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(err)?;
            }
        }
        Self::from_files(&[path.to_owned()])
    }

    /// The ref new records carry.
    pub fn current(&self, customer_id: &str) -> CustomerRef {
        pseudonym(&self.keys[0], customer_id)
    }

    /// The customer's ref under every configured key, for lookups across rotations.
    pub fn all(&self, customer_id: &str) -> Vec<CustomerRef> {
        self.keys
            .iter()
            .map(|k| pseudonym(k, customer_id))
            .collect()
    }
}

fn pseudonym(key: &Key, customer_id: &str) -> CustomerRef {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.bytes).expect("HMAC takes any key length");
    mac.update(customer_id.as_bytes());
    let bytes: [u8; 32] = mac.finalize().into_bytes().into();
    let mut hex = [0u8; 64];
    hex::encode_to_slice(bytes, &mut hex).expect("64 digits");
    CustomerRef {
        key_id: key.id.clone(),
        value: std::str::from_utf8(&hex).expect("hex").to_string(),
        bytes,
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    let raw = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&raw);
    let bytes = hex::decode(text.trim()).unwrap_or(raw);
    if bytes.len() < MIN_KEY_BYTES {
        return Err(KeyError::TooShort(path.to_owned()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_keyed_and_lookups_span_rotations() {
        let old = CustomerKeys::from_bytes(vec![vec![1; 32]]).unwrap();
        let rotated = CustomerKeys::from_bytes(vec![vec![2; 32], vec![1; 32]]).unwrap();
        let before = old.current("customer-42");
        assert_ne!(rotated.current("customer-42"), before);
        assert!(rotated.all("customer-42").contains(&before));
        assert!(!before.value.contains("customer-42"));
        assert_eq!(before.value.len(), 64);
        assert_eq!(before.value, hex::encode(before.bytes));
    }
}
