//! The shared store: one PostgreSQL database that every replica of a deployment uses for its
//! decisions (and, through them, for trace, backtest, reports and remediation). This module
//! owns the connection settings and the schema: it is created and migrated by the server,
//! step by step, each step once, under an advisory lock so that replicas starting together
//! migrate it exactly once.
//!
//! Connections are plaintext (tokio-postgres with `NoTls`): run PostgreSQL on a private
//! network or behind a TLS-terminating proxy.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// How long connecting may take before the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pooled connections for reads (trace, reports); the writer has its own.
const POOL_SIZE: usize = 8;
/// The advisory lock key migrations hold (an arbitrary constant: "riskserv" in ASCII).
const MIGRATION_LOCK: i64 = 0x7269_736b_7365_7276;

/// The schema, one step per version; step i takes version i to i + 1. Never edit a step
/// that has shipped: add one.
const STEPS: &[&str] = &[
    // 1: the shared decision log. Each replica keeps its own chain, (replica_id, seq);
    // `gseq` orders all replicas' records for readers. A served request id is unique across
    // replicas (a retry that lands elsewhere gets the first decision); a shadow decision
    // shares its request's id. `record` holds the bytes the chain hashes (binary, format 3
    // or the format 2 before it, or a format-1 JSON body), the other columns what queries
    // filter and aggregate on.
    "CREATE TABLE decisions (
        gseq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        replica_id    text NOT NULL,
        seq           bigint NOT NULL,
        decision_id   text NOT NULL,
        recorded_us   bigint NOT NULL,
        request_id    text NOT NULL,
        customer_ref  bytea NOT NULL,
        model         text NOT NULL,
        version       text NOT NULL,
        rollout_id    text,
        arm           text NOT NULL,
        pd            double precision NOT NULL,
        decision      text NOT NULL,
        current_limit bigint,
        granted_limit bigint NOT NULL,
        prev_hash     bytea NOT NULL,
        hash          bytea NOT NULL,
        record        bytea NOT NULL,
        UNIQUE (replica_id, seq)
    );
    CREATE UNIQUE INDEX decisions_id ON decisions (decision_id);
    CREATE UNIQUE INDEX decisions_request ON decisions (request_id) WHERE arm <> 'shadow';
    CREATE INDEX decisions_customer ON decisions (customer_ref, gseq);
    CREATE INDEX decisions_version ON decisions (model, version, recorded_us);
    CREATE INDEX decisions_rollout ON decisions (rollout_id, recorded_us)
        WHERE rollout_id IS NOT NULL;
    CREATE INDEX decisions_time ON decisions (recorded_us);
    -- The feature names of each bundle with binary records, in their stored order.
    CREATE TABLE feature_names (
        digest text PRIMARY KEY,
        names  jsonb NOT NULL
    );
    -- Each replica's chain head as of its last commit (verify tells a cut tail by it).
    CREATE TABLE replicas (
        replica_id text PRIMARY KEY,
        head_seq   bigint NOT NULL DEFAULT 0,
        head_hash  bytea,
        first_seen timestamptz NOT NULL DEFAULT now(),
        last_write timestamptz
    );",
    // 2: rollouts and the serving choice, shared so that every replica routes alike. At
    // most one open rollout per model, whichever replica starts it. Plans, backtests and
    // figures are the same versioned JSON the embedded store keeps.
    "CREATE TABLE rollouts (
        id              text PRIMARY KEY,
        model           text NOT NULL,
        champion        text NOT NULL,
        candidate       text NOT NULL,
        plan            text NOT NULL,
        state           text NOT NULL,
        step            integer NOT NULL,
        step_started_at text NOT NULL,
        created_at      text NOT NULL,
        backtest        text
    );
    CREATE UNIQUE INDEX rollouts_open ON rollouts (model) WHERE state IN ('active', 'paused');
    CREATE INDEX rollouts_model ON rollouts (model, created_at);
    CREATE TABLE rollout_transitions (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rollout_id text NOT NULL REFERENCES rollouts (id),
        at         text NOT NULL,
        from_state text,
        to_state   text NOT NULL,
        from_step  integer,
        to_step    integer NOT NULL,
        actor      text NOT NULL,
        reason     text NOT NULL,
        figures    text NOT NULL
    );
    CREATE INDEX rollout_transitions_rollout ON rollout_transitions (rollout_id, id);
    CREATE TABLE rollout_readings (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rollout_id text NOT NULL REFERENCES rollouts (id),
        at         text NOT NULL,
        step       integer NOT NULL,
        share_bp   integer NOT NULL,
        figures    text NOT NULL
    );
    CREATE INDEX rollout_readings_rollout ON rollout_readings (rollout_id, id);
    CREATE TABLE serving (
        model      text PRIMARY KEY,
        version    text NOT NULL,
        changed_at timestamptz NOT NULL DEFAULT now()
    );",
    // 3: no new table. Records are now written in binary format 3, which a release before
    // it cannot read: this step makes such a replica refuse the store ("schema version 3;
    // this release knows up to 2") instead of reporting the new records as damage.
    "COMMENT ON COLUMN decisions.record IS 'the bytes the chain hashes: binary format 3 \
     (or 2, written before it) or format-1 JSON'",
];

/// The channel a change of rollouts or serving choices is announced on (LISTEN/NOTIFY).
pub const CHANGES: &str = "riskserve_changes";

/// The schema version this release writes.
pub const SCHEMA_VERSION: i32 = STEPS.len() as i32;

/// Why the shared store cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgError {
    #[error("store: {0}")]
    Url(String),
    #[error("PostgreSQL at {at} is unreachable: {why}")]
    Unreachable { at: String, why: String },
    #[error("PostgreSQL: {0}")]
    Query(String),
    #[error(
        "the database has schema version {found}; this release knows up to {SCHEMA_VERSION} \
         (was it migrated by a newer release?)"
    )]
    Newer { found: i32 },
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Query(describe(&e))
    }
}

/// A PostgreSQL error with its server message, which tokio-postgres's Display leaves out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        // "error connecting to server" says little without its cause (refused, timed out).
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The store's connection settings and a pool of connections for readers.
pub struct Pg {
    config: tokio_postgres::Config,
    pool: Pool,
    /// The runtime the store was opened on, for blocking callers.
    runtime: tokio::runtime::Handle,
    /// host:port/db, without credentials, for messages.
    shown: String,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg").field("at", &self.shown).finish()
    }
}

impl Pg {
    /// Parses a `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` URL (or key=value settings);
    /// a password missing from it comes from `PGPASSWORD`.
    pub fn config(url: &str) -> Result<tokio_postgres::Config, PgError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(PgError::Url(format!(
                "{:?} is not a postgres:// URL (leave `store` unset for the embedded store)",
                redact(url)
            )));
        }
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| PgError::Url(format!("{}: {e}", redact(url))))?;
        if config.get_dbname().is_none() {
            return Err(PgError::Url(format!(
                "{} names no database (postgres://USER@HOST:PORT/DB)",
                redact(url)
            )));
        }
        if config.get_password().is_none()
            && let Ok(p) = std::env::var("PGPASSWORD")
        {
            config.password(p);
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("riskserve");
        Ok(config)
    }

    /// Connects to the store at `url` and brings its schema to this release's version.
    pub async fn open(url: &str) -> Result<Arc<Pg>, PgError> {
        let config = Pg::config(url)?;
        let shown = shown(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| PgError::Url(e.to_string()))?;
        let pg = Arc::new(Pg {
            config,
            pool,
            runtime: tokio::runtime::Handle::current(),
            shown,
        });
        let mut client = pg.connect().await?;
        migrate(&mut client).await?;
        Ok(pg)
    }

    /// A connection of its own (the writer's: its session holds the replica's lock).
    pub async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.unreachable(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A connection of its own that listens on `channel`: each notification's payload comes
    /// out of the receiver, which ends when the connection does.
    pub async fn listen(
        &self,
        channel: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<String>), PgError> {
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Polling for messages also drives the connection's queries.
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "PostgreSQL listening connection ended");
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| self.unreachable(&e))?;
        Ok((client, rx))
    }

    fn unreachable(&self, e: &tokio_postgres::Error) -> PgError {
        PgError::Unreachable {
            at: self.shown.clone(),
            why: describe(e),
        }
    }

    /// A pooled connection, for reads.
    pub async fn pooled(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::Unreachable {
            at: self.shown.clone(),
            why: match e {
                deadpool_postgres::PoolError::Backend(e) => describe(&e),
                other => other.to_string(),
            },
        })
    }

    /// Where the store is, without credentials.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs `f` to completion for a blocking caller (the log's readers and the rollout
    /// store are synchronous), off the runtime's workers when called from one.
    pub fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.runtime.block_on(f))
            }
            _ => self.runtime.block_on(f),
        }
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], in one transaction under an advisory lock:
/// a replica starting at the same time waits, then finds the work done.
async fn migrate(client: &mut Client) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS riskserve_schema (version integer NOT NULL);
         INSERT INTO riskserve_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM riskserve_schema);",
    )
    .await?;
    let found: i32 = tx
        .query_one("SELECT version FROM riskserve_schema", &[])
        .await?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(PgError::Newer { found });
    }
    for (i, step) in STEPS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(step)
            .await
            .map_err(|e| PgError::Query(format!("schema step {}: {}", i + 1, describe(&e))))?;
        tracing::info!(version = i + 1, "migrated the shared store's schema");
    }
    tx.execute(
        "UPDATE riskserve_schema SET version = $1",
        &[&SCHEMA_VERSION],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// host:port/db of a configuration, for messages.
fn shown(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default)")
    )
}

/// A URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert!(matches!(
            Pg::config("sqlite:///tmp/x"),
            Err(PgError::Url(m)) if m.contains("not a postgres:// URL")
        ));
        assert!(matches!(
            Pg::config("postgres://u@h:5432"),
            Err(PgError::Url(m)) if m.contains("names no database")
        ));
        let c = Pg::config("postgres://rs:secret@db.internal:6543/risk").unwrap();
        assert_eq!(shown(&c), "db.internal:6543/risk");
        assert_eq!(c.get_password(), Some(&b"secret"[..]));
        assert_eq!(
            redact("postgres://rs:secret@db:1/x"),
            "postgres://rs:***@db:1/x"
        );
        let e = Pg::config("postgres://rs:secret@db:notaport/x").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
