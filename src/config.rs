//! Server configuration: embedded defaults, then a TOML file, then environment variables and
//! flags (the CLI merges those two through clap, flags winning).
//!
//! Everything is parsed and checked here, before any port is bound or any bundle read, so a
//! bad setting stops the server at once with a message naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decision_log::Durability;
use crate::grpc::gate::auth::AuthConfig;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole server configuration. Field names are the keys of the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC port.
    pub listen: SocketAddr,
    /// Where bundles live: `<models_dir>/<model>/<version>/`.
    pub models_dir: PathBuf,
    /// Where the server keeps its state (serving choices now; the decision log later).
    pub data_dir: PathBuf,
    /// How often the watcher looks for new bundles.
    pub watch_interval_ms: u64,
    /// Whether a bundle the watcher loads is made to serve at once. Off: new versions wait
    /// for an operator.
    pub auto_serve: bool,
    /// How long shutdown waits for in-flight requests.
    pub grace_period_secs: u64,
    /// Most requests in one ScoreBatch.
    pub max_batch: usize,
    /// Versions pinned to serve at start, by model; overrides the saved choice.
    pub serving: BTreeMap<String, String>,
    /// How hard each group commit of the decision log is pushed to disk.
    pub durability: Durability,
    /// Most decisions in one group commit.
    pub log_batch: usize,
    /// Decisions waiting for the writer before new ones are refused (UNAVAILABLE).
    pub log_queue: usize,
    /// Size each journal segment is preallocated to (bytes); retention removes whole
    /// segments.
    pub log_segment_bytes: u64,
    /// After a failed write, the writer is healthy again only once a probe of the failed
    /// group's size succeeds and, if this is set, the file system has this many bytes free.
    pub log_min_free_bytes: u64,
    /// Retention of the decision log, e.g. "7years" or "400days": whole journal segments
    /// whose decisions are all older are removed, with their rows in the query view; the
    /// chain stays verifiable from the anchor. Unset keeps every decision.
    pub log_retention: Option<String>,
    /// Durable decisions the SQLite query view may trail the journal by (held in memory
    /// meanwhile, ~0.6 KB each); at this many, new decisions are refused (UNAVAILABLE) and
    /// readiness is NOT_SERVING until the view has caught up to half of it.
    pub log_max_view_lag: u64,
    /// Files holding the customer HMAC keys, current first (older ones for lookups after a
    /// rotation). Empty: a server on loopback generates a development key in the data
    /// directory; any other server refuses to start.
    pub customer_key_files: Vec<PathBuf>,
    /// How often rollout guardrails are evaluated.
    pub rollout_eval_interval_ms: u64,
    /// How often the guardrail readings are kept for a rollout's history (its report charts).
    pub rollout_snapshot_interval_ms: u64,
    /// Shadow scorings waiting for the shadow worker; more are dropped and counted.
    pub shadow_queue: usize,
    /// Requests in flight at once (health aside); more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// How long a refused client is asked to wait before retrying (`grpc-retry-pushback-ms`,
    /// jittered to ½–1½×, honoured by gRPC retry policies); 0 asks nothing.
    pub overload_pushback_ms: u64,
    /// The most decisions one backtest may hold in memory (about 650 bytes each); a larger
    /// window needs a sample.
    pub backtest_max_sample: usize,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive: a ping after this many idle seconds; a peer silent for as long again
    /// is dropped.
    pub http2_keepalive_secs: u64,
    /// Who may call, and with which roles (`[auth]`).
    pub auth: AuthConfig,
    /// TLS on the gRPC port (`[tls]`); required beyond loopback unless `allow_plaintext`.
    pub tls: TlsConfig,
    /// Serve plaintext on an address beyond loopback (only behind something that encrypts).
    pub allow_plaintext: bool,
    /// The shared store several replicas use, `postgres://USER@HOST:PORT/DB`; unset keeps
    /// the embedded store in `data_dir`.
    pub store: Option<String>,
    /// This replica's name in the shared store, recorded in every decision it makes;
    /// unset: the host name and the listening port.
    pub replica_id: Option<String>,
    /// Benchmark baseline only: answer without recording. Not settable from a file.
    #[serde(skip)]
    pub unrecorded_benchmark_only: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            models_dir: PathBuf::from("models"),
            data_dir: PathBuf::from("riskserve-data"),
            watch_interval_ms: 500,
            auto_serve: false,
            grace_period_secs: 10,
            max_batch: 1_000,
            serving: BTreeMap::new(),
            durability: Durability::Sync,
            log_batch: 512,
            log_queue: 16_384,
            log_segment_bytes: 64 << 20,
            log_min_free_bytes: 0,
            log_retention: None,
            log_max_view_lag: 1_000_000,
            customer_key_files: Vec::new(),
            rollout_eval_interval_ms: 1_000,
            rollout_snapshot_interval_ms: 10_000,
            shadow_queue: 1_024,
            max_concurrent_requests: 256,
            overload_pushback_ms: 10,
            backtest_max_sample: 2_000_000,
            max_message_bytes: 4 * 1024 * 1024,
            http2_keepalive_secs: 30,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            allow_plaintext: false,
            store: None,
            replica_id: None,
            unrecorded_benchmark_only: false,
        }
    }
}

/// The `[tls]` section: PEM files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// A CA whose client certificates are accepted (mutual TLS); their common names map to
    /// roles in `[[auth.clients]]`.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse a connection without a client certificate (otherwise a
    /// bearer token may stand in for it).
    pub client_cert_required: bool,
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Checks the values that parsing alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(10..=60_000).contains(&self.watch_interval_ms) {
            return Err(ConfigError::Invalid(
                "watch_interval_ms must be between 10 and 60000".into(),
            ));
        }
        if self.max_batch == 0 || self.max_batch > 100_000 {
            return Err(ConfigError::Invalid(
                "max_batch must be between 1 and 100000".into(),
            ));
        }
        if !(10..=60_000).contains(&self.rollout_eval_interval_ms) || self.shadow_queue == 0 {
            return Err(ConfigError::Invalid(
                "rollout_eval_interval_ms must be 10–60000 and shadow_queue at least 1".into(),
            ));
        }
        if !(100..=3_600_000).contains(&self.rollout_snapshot_interval_ms) {
            return Err(ConfigError::Invalid(
                "rollout_snapshot_interval_ms must be 100–3600000".into(),
            ));
        }
        if self.log_segment_bytes < 64 << 10 {
            return Err(ConfigError::Invalid(
                "log_segment_bytes must be at least 65536".into(),
            ));
        }
        self.log_retention()?;
        if self.log_batch == 0 || self.log_queue == 0 || self.log_max_view_lag == 0 {
            return Err(ConfigError::Invalid(
                "log_batch, log_queue and log_max_view_lag must be at least 1".into(),
            ));
        }
        if !(1..=100_000).contains(&self.max_concurrent_requests)
            || !(1_024..=256 * 1024 * 1024).contains(&self.max_message_bytes)
            || !(1..=3_600).contains(&self.http2_keepalive_secs)
            || self.overload_pushback_ms > 60_000
            || self.backtest_max_sample == 0
        {
            return Err(ConfigError::Invalid(
                "max_concurrent_requests must be 1–100000, max_message_bytes 1 KiB–256 MiB, \
                 http2_keepalive_secs 1–3600, overload_pushback_ms 0–60000 and \
                 backtest_max_sample at least 1"
                    .into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key go together".into(),
            ));
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return Err(ConfigError::Invalid(
                "tls.client_ca needs tls.cert and tls.key".into(),
            ));
        }
        if !self.auth.clients.is_empty() && self.tls.client_ca.is_none() {
            return Err(ConfigError::Invalid(
                "auth.clients are client certificates: they need tls.client_ca".into(),
            ));
        }
        if !self.listen.ip().is_loopback() && self.tls.cert.is_none() && !self.allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "listening on {} beyond loopback needs [tls] cert and key, or allow_plaintext = \
                 true (--allow-plaintext) behind something that encrypts",
                self.listen
            )));
        }
        self.auth.check(self.listen).map_err(ConfigError::Invalid)?;
        if let Some(url) = &self.store {
            crate::postgres::Pg::config(url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if let Some(id) = &self.replica_id
            && (id.is_empty() || id.len() > 200 || id.chars().any(char::is_control))
        {
            return Err(ConfigError::Invalid(
                "replica_id must be 1–200 characters, none of them control characters".into(),
            ));
        }
        if self.grace_period_secs > 3_600 {
            return Err(ConfigError::Invalid(
                "grace_period_secs must be at most 3600".into(),
            ));
        }
        Ok(())
    }

    /// `log_retention` as a duration (at least a second), if set.
    pub fn log_retention(&self) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = &self.log_retention else {
            return Ok(None);
        };
        match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
            _ => Err(ConfigError::Invalid(format!(
                "log_retention must be a duration of at least 1s, e.g. \"7years\" or \"400days\" (got {text:?})"
            ))),
        }
    }

    pub fn watch_interval(&self) -> Duration {
        Duration::from_millis(self.watch_interval_ms)
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    /// This replica's name: `replica_id`, else the host name and the listening port (unique
    /// per machine, and stable across restarts on the same port).
    pub fn replica_id(&self, port: u16) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:6000\"\n[serving]\ncredit-limit = \"v1\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.serving["credit-limit"], "v1");
        assert_eq!(c.watch_interval_ms, 500);

        std::fs::write(&path, "lisen = \"0.0.0.0:6000\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn log_retention_is_a_duration_of_at_least_a_second() {
        let with = |r: &str| Config {
            log_retention: Some(r.into()),
            ..Config::default()
        };
        assert_eq!(Config::default().log_retention().unwrap(), None);
        assert_eq!(
            with("400days").log_retention().unwrap(),
            Some(Duration::from_secs(400 * 86_400))
        );
        for bad in ["forever", "500ms", ""] {
            let err = with(bad).validate().unwrap_err().to_string();
            assert!(err.contains("log_retention"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_view_lag_limit_is_read_from_the_file_and_may_not_be_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "log_max_view_lag = 5000\n").unwrap();
        assert_eq!(Config::from_file(&path).unwrap().log_max_view_lag, 5000);
        assert_eq!(Config::default().log_max_view_lag, 1_000_000);
        let zero = Config {
            log_max_view_lag: 0,
            ..Config::default()
        };
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("log_max_view_lag"), "{err}");
    }
}
