//! The decision log shared by replicas, in PostgreSQL ([`crate::postgres`] owns the schema).
//!
//! Each replica keeps its own hash chain, `(replica_id, seq)`, so replicas never wait for
//! each other's commits; the chain's first link is bound to the replica's id (its
//! `prev_hash` is [`replica_start`]), so records cannot be moved between chains unseen. A
//! writer task group-commits: it takes whatever decisions are queued, looks their request
//! ids up across all replicas, chains the new ones and writes them with the replica's new
//! head in one statement; a decision is answered once that statement has committed
//! (`synchronous_commit` as the server has it: on by default). A request id that another
//! replica commits in the meantime makes the insert fail on the unique index; the group is
//! then planned again and the retry answered with the first decision.
//!
//! The writer's connection holds a session advisory lock on the replica id, so two running
//! servers cannot write one chain. On a failed or uncertain commit the writer turns
//! unhealthy, drops its connection, and accepts nothing until it has reconnected, taken the
//! lock again, re-read its head from the database and committed a write.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, Row};

use super::chain::{Verifier, link_hash_bytes};
use super::group::{self, Chainer, Encoder, Head, Job};
use super::names::FeatureNames;
use super::record::{self, ARMS, DECISIONS};
use super::view::{bounds, micros_of};
use super::{
    AppendAllFuture, AppendFuture, ArmSummary, DecisionLog, DecisionOutcome, DecisionRecord,
    LogError, NewBody, PD_BINS, RecentByArm, RolloutDecisions, VerifyReport, VersionStats, Window,
};
use crate::policy::Outcome;
use crate::postgres::{Pg, PgError, describe};

/// How long a commit may take before its outcome counts as unknown (and it fails).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle or unhealthy writer checks its connection.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long a starting replica waits for its id's lock.
const CLAIM_WAIT: Duration = Duration::from_secs(10);
/// Rows fetched per page by scans and verification.
const PAGE: i64 = 5_000;
/// Times a group is planned again after another replica took one of its request ids.
const REPLANS: usize = 5;

/// How the shared log is set up.
#[derive(Debug, Clone)]
pub struct PgLogOptions {
    /// This replica's name: its chain, and the lock that keeps it to one server.
    pub replica_id: String,
    /// Most decisions in one group.
    pub max_batch: usize,
    /// Jobs waiting for the writer before new ones are refused.
    pub queue_capacity: usize,
}

/// The first `prev_hash` of a replica's chain.
pub fn replica_start(replica_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"riskserve replica\n");
    h.update(replica_id.as_bytes());
    hex::encode(h.finalize())
}

/// The advisory lock key of a replica id.
fn replica_lock(replica_id: &str) -> i64 {
    let d = Sha256::digest(format!("riskserve replica lock\n{replica_id}"));
    i64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn unavailable(e: PgError) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn query_err(e: tokio_postgres::Error) -> LogError {
    LogError::Query(describe(&e))
}

/// The decision log of one replica, over the shared store.
pub struct PgLog {
    pg: Arc<Pg>,
    names: Arc<FeatureNames>,
    queue: mpsc::Sender<Job>,
    healthy: watch::Receiver<bool>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Dropped at close: the writer commits what is queued and stops.
    closing: Mutex<Option<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for PgLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLog").field("pg", &self.pg).finish()
    }
}

impl PgLog {
    /// Opens this replica's log on the store: takes the replica's lock, finds its chain's
    /// head, and starts the writer. Refused if another running server holds the replica id,
    /// or the chain ends before the head its last commit recorded.
    pub async fn open(pg: Arc<Pg>, options: PgLogOptions) -> Result<Arc<PgLog>, LogError> {
        let names = Arc::new(FeatureNames::detached());
        let client = pg.connect().await.map_err(unavailable)?;
        let head = claim(&client, &options.replica_id).await?;
        load_names(&client, &names, None).await?;
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let (healthy_tx, healthy) = watch::channel(true);
        let (closing, closed) = oneshot::channel();
        let writer = PgWriter {
            pg: pg.clone(),
            client: Some(client),
            replica: options.replica_id,
            head,
            encoder: Encoder::new(names.clone()),
            healthy: healthy_tx,
            down: None,
            max_batch: options.max_batch.max(1),
        };
        let writer = tokio::spawn(writer.run(rx, closed));
        Ok(Arc::new(PgLog {
            pg,
            names,
            queue,
            healthy,
            writer: Mutex::new(Some(writer)),
            closing: Mutex::new(Some(closing)),
        }))
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.pg.block(f)
    }

    /// Rows of `sql` on a pooled connection, decoded into records.
    fn records(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<DecisionRecord>, LogError> {
        self.block(async {
            let client = self.pg.pooled().await.map_err(unavailable)?;
            let rows = client.query(sql, params).await.map_err(query_err)?;
            decode_rows(&client, &self.names, &rows).await
        })
    }

    fn verify_replica(
        &self,
        replica: &str,
        head: Option<(i64, String)>,
    ) -> Result<VerifyReport, LogError> {
        let mut find = |hash: &str| -> Option<i64> {
            let hash = hex::decode(hash).ok()?;
            self.block(async {
                let c = self.pg.pooled().await.ok()?;
                let row = c
                    .query_opt(
                        "SELECT seq FROM decisions WHERE replica_id = $1 AND hash = $2",
                        &[&replica, &hash],
                    )
                    .await
                    .ok()??;
                Some(row.get::<_, i64>(0))
            })
        };
        let mut verifier = Verifier::new(&mut find, Some((0, replica_start(replica))));
        let mut after = 0i64;
        loop {
            let page: Vec<(DecisionRecord, String)> = self.block(async {
                let client = self.pg.pooled().await.map_err(unavailable)?;
                let rows = client
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM decisions WHERE replica_id = $1 AND seq > $2 \
                             ORDER BY seq LIMIT {PAGE}"
                        ),
                        &[&replica, &after],
                    )
                    .await
                    .map_err(query_err)?;
                let records = decode_rows(&client, &self.names, &rows).await?;
                Ok::<_, LogError>(
                    rows.iter()
                        .zip(records)
                        .map(|(row, mut r)| {
                            let prev: &[u8] = row.get(3);
                            let bytes: &[u8] = row.get(5);
                            let actual = hex::encode(link_hash_bytes(&hex::encode(prev), bytes));
                            // The chain's own position, which the verifier follows.
                            r.seq = row.get(2);
                            (r, actual)
                        })
                        .collect(),
                )
            })?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = last.seq;
            let full = page.len() as i64 == PAGE;
            for (r, actual) in page {
                if !verifier.push_hashed(r, &actual) {
                    return Ok(verifier.finish(None));
                }
            }
            if !full {
                break;
            }
        }
        Ok(verifier.finish(head))
    }
}

/// The columns a record is read from, in this order.
const COLUMNS: &str = "gseq, replica_id, seq, prev_hash, hash, record";

/// Decodes rows of [`COLUMNS`], fetching the feature names of digests not cached yet.
async fn decode_rows(
    client: &Client,
    names: &FeatureNames,
    rows: &[Row],
) -> Result<Vec<DecisionRecord>, LogError> {
    let mut missing: Vec<String> = Vec::new();
    for row in rows {
        let bytes: &[u8] = row.get(5);
        if record::is_binary(bytes.first())
            && let Ok(d) = record::digest_of(bytes)
            && names.get(&d).is_none()
            && !missing.contains(&d)
        {
            missing.push(d);
        }
    }
    if !missing.is_empty() {
        load_names(client, names, Some(&missing)).await?;
    }
    rows.iter()
        .map(|row| {
            let (gseq, replica, seq): (i64, &str, i64) = (row.get(0), row.get(1), row.get(2));
            let damaged = |what: String| {
                LogError::Damaged(format!("replica {replica}, record seq {seq}: {what}"))
            };
            let prev: &[u8] = row.get(3);
            let hash: &[u8] = row.get(4);
            let body = record::decode_body(row.get(5), |d| names.get(d))
                .map_err(|e| damaged(e.to_string()))?;
            Ok(DecisionRecord {
                seq: gseq,
                body,
                prev_hash: hex::encode(prev),
                hash: hex::encode(hash),
                replica: Some(replica.to_string()),
            })
        })
        .collect()
}

/// Loads stored feature names into the cache: all of them, or those of `digests`.
async fn load_names(
    client: &Client,
    names: &FeatureNames,
    digests: Option<&[String]>,
) -> Result<(), LogError> {
    let rows = match digests {
        None => client
            .query("SELECT digest, names::text FROM feature_names", &[])
            .await
            .map_err(query_err)?,
        Some(d) => client
            .query(
                "SELECT digest, names::text FROM feature_names WHERE digest = ANY($1)",
                &[&d],
            )
            .await
            .map_err(query_err)?,
    };
    for row in rows {
        let digest: &str = row.get(0);
        let list: Vec<String> = serde_json::from_str(row.get(1))
            .map_err(|e| LogError::Damaged(format!("feature names of {digest}: {e}")))?;
        names.remember(digest, list);
    }
    Ok(())
}

/// Takes the replica's lock on `client`'s session and returns its chain's head. The lock
/// may still be held for a while by the session of a server that was just killed (until
/// PostgreSQL notices its connection is gone), so a restart waits for it, up to
/// [`CLAIM_WAIT`].
async fn claim(client: &Client, replica: &str) -> Result<Head, LogError> {
    let asked = tokio::time::Instant::now();
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&replica_lock(replica)])
            .await
            .map_err(query_err)?
            .get(0);
        if locked {
            break;
        }
        if asked.elapsed() >= CLAIM_WAIT {
            return Err(LogError::Unavailable(format!(
                "replica id {replica:?} is in use by another running server (waited {}s); \
                 give each replica its own --replica-id",
                CLAIM_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .execute(
            "INSERT INTO replicas (replica_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&replica],
        )
        .await
        .map_err(query_err)?;
    let committed: i64 = client
        .query_one(
            "SELECT head_seq FROM replicas WHERE replica_id = $1",
            &[&replica],
        )
        .await
        .map_err(query_err)?
        .get(0);
    let last = client
        .query_opt(
            "SELECT seq, hash FROM decisions WHERE replica_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&replica],
        )
        .await
        .map_err(query_err)?;
    let head = match last {
        None => Head::new(0, replica_start(replica)),
        Some(row) => Head::new(row.get(0), hex::encode(row.get::<_, &[u8]>(1))),
    };
    if head.seq != committed {
        return Err(LogError::Damaged(format!(
            "replica {replica}'s chain ends at seq {} but its last commit was seq {committed}: \
             records were removed from the shared store",
            head.seq
        )));
    }
    Ok(head)
}

/// A new record and the columns queries use.
struct Row2 {
    seq: i64,
    /// prev_hash (32) | hash (32) | record.
    payload: Vec<u8>,
    request_id: String,
    served: bool,
    decision_id: String,
    recorded_us: i64,
    customer_ref: Vec<u8>,
    model: String,
    version: String,
    rollout_id: Option<String>,
    arm: String,
    pd: f64,
    decision: String,
    current_limit: Option<i64>,
    granted_limit: i64,
}

/// The columns of a body, before it is moved into its record.
fn columns(body: &NewBody) -> Row2 {
    let (request_id, served) = (body.request_id().to_string(), !body.is_shadow());
    match body {
        NewBody::Compact(c) => Row2 {
            seq: 0,
            payload: Vec::new(),
            request_id,
            served,
            decision_id: uuid::Uuid::from_bytes(c.decision_id).to_string(),
            recorded_us: c.recorded_at,
            customer_ref: c.customer_ref.to_vec(),
            model: c.model.clone(),
            version: c.version.clone(),
            rollout_id: c.rollout_id.map(|r| uuid::Uuid::from_bytes(r).to_string()),
            arm: ARMS[usize::from(c.arm).min(ARMS.len() - 1)].to_string(),
            pd: c.probability_of_default,
            decision: DECISIONS[usize::from(c.decision).min(DECISIONS.len() - 1)].to_string(),
            current_limit: c.current_limit,
            granted_limit: c.granted_limit,
        },
        NewBody::Text(b) => Row2 {
            seq: 0,
            payload: Vec::new(),
            request_id,
            served,
            decision_id: b.decision_id.clone(),
            recorded_us: micros_of(&b.recorded_at).unwrap_or(0),
            customer_ref: hex::decode(&b.customer_ref)
                .unwrap_or_else(|_| b.customer_ref.as_bytes().to_vec()),
            model: b.model.clone(),
            version: b.version.clone(),
            rollout_id: b.rollout_id.clone(),
            arm: b.arm.clone(),
            pd: b.probability_of_default,
            decision: b.decision.clone(),
            current_limit: b.current_limit,
            granted_limit: b.granted_limit,
        },
    }
}

/// Plans one group against the request ids found recorded (by any replica).
struct Planner<'a> {
    encoder: &'a mut Encoder,
    existing: &'a HashMap<String, DecisionRecord>,
}

impl Chainer for Planner<'_> {
    type Entry = Row2;

    fn recorded_before(&self, request_id: &str) -> Result<Option<DecisionRecord>, LogError> {
        Ok(self.existing.get(request_id).cloned())
    }

    fn decode(&self, entry: &Row2) -> Result<DecisionRecord, LogError> {
        let e = record::decode_entry(&entry.payload)
            .map_err(|e| LogError::Damaged(format!("a record of this group: {e}")))?;
        Ok(DecisionRecord {
            seq: entry.seq,
            body: record::decode_body(e.record, |d| self.encoder.names.get(d))
                .map_err(|e| LogError::Damaged(format!("a record of this group: {e}")))?,
            prev_hash: e.prev_hash,
            hash: e.hash,
            replica: None,
        })
    }

    fn chain(&mut self, head: &mut Head, body: NewBody) -> Row2 {
        let mut row = columns(&body);
        row.payload.reserve(64 + 512);
        group::link(self.encoder, head, body, &mut row.payload);
        row.seq = head.seq;
        row
    }

    fn request_id(entry: &Row2) -> Option<&str> {
        entry.served.then_some(entry.request_id.as_str())
    }
}

/// The writer task of one replica.
struct PgWriter {
    pg: Arc<Pg>,
    /// None after a failure, until a reconnect.
    client: Option<Client>,
    replica: String,
    head: Head,
    encoder: Encoder,
    healthy: watch::Sender<bool>,
    /// Why the writer accepts nothing, while it does not.
    down: Option<String>,
    max_batch: usize,
}

/// Why a commit did not happen.
enum Failed {
    /// Another replica committed one of the group's request ids first: plan again.
    Raced,
    /// The store did not take it (or its outcome is unknown).
    Store(String),
}

const INSERT: &str = "
WITH ins AS (
  INSERT INTO decisions (replica_id, seq, decision_id, recorded_us, request_id, customer_ref,
    model, version, rollout_id, arm, pd, decision, current_limit, granted_limit,
    prev_hash, hash, record)
  SELECT $1, * FROM unnest($2::int8[], $3::text[], $4::int8[], $5::text[], $6::bytea[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::float8[], $12::text[], $13::int8[],
    $14::int8[], $15::bytea[], $16::bytea[], $17::bytea[])
  RETURNING 1
)
UPDATE replicas SET head_seq = $18, head_hash = $19, last_write = now()
WHERE replica_id = $1";

impl PgWriter {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, mut closed: oneshot::Receiver<()>) {
        let mut closing = false;
        loop {
            let first = if closing {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => job,
                        None => return,
                    },
                    _ = &mut closed, if !closing => {
                        closing = true;
                        continue;
                    }
                    _ = tokio::time::sleep(CHECK_EVERY) => {
                        self.check().await;
                        continue;
                    }
                }
            };
            let mut batch = vec![first];
            let mut decisions = batch[0].bodies.len();
            while decisions < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        decisions += job.bodies.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
        }
    }

    /// An idle or unhealthy writer: recover, or notice a lost connection before a decision
    /// does (readiness turns NOT_SERVING while the store is unreachable).
    async fn check(&mut self) {
        if self.down.is_some() {
            self.recover().await;
            return;
        }
        let alive = match &self.client {
            Some(c) => tokio::time::timeout(COMMIT_TIMEOUT, c.simple_query("SELECT 1"))
                .await
                .is_ok_and(|r| r.is_ok()),
            None => false,
        };
        if !alive {
            self.go_down("the connection to PostgreSQL was lost".into());
            self.recover().await;
        }
    }

    fn go_down(&mut self, why: String) {
        tracing::error!(replica = %self.replica, error = %why, "shared decision log unavailable");
        self.client = None;
        self.down = Some(why);
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, false));
    }

    /// Reconnects, takes the replica's lock, re-reads the head (a commit whose outcome was
    /// unknown may have landed) and proves a write commits; healthy again only then.
    async fn recover(&mut self) {
        let attempt = async {
            let client = self.pg.connect().await?;
            let head = claim(&client, &self.replica)
                .await
                .map_err(|e| PgError::Query(e.to_string()))?;
            client
                .execute(
                    "UPDATE replicas SET last_write = now() WHERE replica_id = $1",
                    &[&self.replica],
                )
                .await?;
            Ok::<_, PgError>((client, head))
        };
        match tokio::time::timeout(COMMIT_TIMEOUT, attempt).await {
            Ok(Ok((client, head))) => {
                tracing::info!(replica = %self.replica, head = head.seq, "shared decision log writable again");
                self.client = Some(client);
                self.head = head;
                self.down = None;
                self.healthy
                    .send_if_modified(|h| !std::mem::replace(h, true));
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "shared decision log still unavailable"),
            Err(_) => tracing::debug!("shared decision log still unavailable: timed out"),
        }
    }

    async fn commit(&mut self, mut batch: Vec<Job>) {
        if self.down.is_some() {
            self.recover().await;
        }
        if let Some(why) = &self.down {
            let why = format!("the shared store cannot be written: {why}");
            for job in batch {
                let _ = job.reply.send(Err(LogError::Unavailable(why.clone())));
            }
            return;
        }
        let started = Instant::now();
        // Kept to plan again after a race: planning moves the bodies into records.
        let kept: Vec<Vec<NewBody>> = batch.iter().map(|j| j.bodies.clone()).collect();
        let mut attempt = 0;
        loop {
            match self.try_commit(&mut batch).await {
                Ok(()) => {
                    let decisions: usize = kept.iter().map(Vec::len).sum();
                    crate::telemetry::metrics().log_commit(decisions, started.elapsed());
                    return;
                }
                Err(Failed::Raced) if attempt < REPLANS => {
                    attempt += 1;
                    for (job, bodies) in batch.iter_mut().zip(&kept) {
                        job.bodies = bodies.clone();
                    }
                }
                Err(Failed::Raced) => {
                    let why = "request ids of this group kept being recorded by other replicas";
                    for job in batch {
                        let _ = job.reply.send(Err(LogError::Unavailable(why.into())));
                    }
                    return;
                }
                Err(Failed::Store(e)) => {
                    // Unhealthy before anyone hears of the failure.
                    self.go_down(e.clone());
                    for job in batch {
                        let _ = job.reply.send(Err(LogError::Unavailable(e.clone())));
                    }
                    return;
                }
            }
        }
    }

    /// Plans and writes one group, answering its jobs once it has committed.
    async fn try_commit(&mut self, batch: &mut Vec<Job>) -> Result<(), Failed> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Failed::Store("not connected".into()))?;
        let timed = |what: &'static str| Failed::Store(format!("{what} timed out"));
        // Request ids recorded already, by any replica.
        let mut ids: Vec<&str> = batch
            .iter()
            .flat_map(|j| j.bodies.iter())
            .filter(|b| !b.is_shadow())
            .map(NewBody::request_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let rows = tokio::time::timeout(
            COMMIT_TIMEOUT,
            client.query(
                &format!(
                    "SELECT {COLUMNS}, request_id FROM decisions \
                     WHERE request_id = ANY($1) AND arm <> 'shadow'"
                ),
                &[&ids],
            ),
        )
        .await
        .map_err(|_| timed("looking up request ids"))?
        .map_err(|e| Failed::Store(describe(&e)))?;
        // The names of bundles new to this replica, stored before any record needs them.
        self.store_names(batch).await?;
        let client = self.client.as_ref().expect("checked above");
        let records = decode_rows(client, &self.encoder.names, &rows)
            .await
            .map_err(|e| Failed::Store(e.to_string()))?;
        let existing: HashMap<String, DecisionRecord> = rows
            .iter()
            .map(|r| r.get::<_, String>(6))
            .zip(records)
            .collect();
        let mut head = self.head.clone();
        let (fresh, answers) = group::plan(
            &mut Planner {
                encoder: &mut self.encoder,
                existing: &existing,
            },
            &mut head,
            batch,
        );
        if !fresh.is_empty() {
            let col = |f: fn(&Row2) -> &[u8]| fresh.iter().map(f).collect::<Vec<&[u8]>>();
            let seqs: Vec<i64> = fresh.iter().map(|r| r.seq).collect();
            let ids: Vec<&str> = fresh.iter().map(|r| r.decision_id.as_str()).collect();
            let at: Vec<i64> = fresh.iter().map(|r| r.recorded_us).collect();
            let requests: Vec<&str> = fresh.iter().map(|r| r.request_id.as_str()).collect();
            let refs = col(|r| &r.customer_ref);
            let models: Vec<&str> = fresh.iter().map(|r| r.model.as_str()).collect();
            let versions: Vec<&str> = fresh.iter().map(|r| r.version.as_str()).collect();
            let rollouts: Vec<Option<&str>> =
                fresh.iter().map(|r| r.rollout_id.as_deref()).collect();
            let arms: Vec<&str> = fresh.iter().map(|r| r.arm.as_str()).collect();
            let pds: Vec<f64> = fresh.iter().map(|r| r.pd).collect();
            let decisions: Vec<&str> = fresh.iter().map(|r| r.decision.as_str()).collect();
            let current: Vec<Option<i64>> = fresh.iter().map(|r| r.current_limit).collect();
            let granted: Vec<i64> = fresh.iter().map(|r| r.granted_limit).collect();
            let prev = col(|r| &r.payload[..32]);
            let hashes = col(|r| &r.payload[32..64]);
            let bytes = col(|r| &r.payload[64..]);
            let head_hash = hex::decode(&head.hash).expect("the head is hex");
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 19] = [
                &self.replica,
                &seqs,
                &ids,
                &at,
                &requests,
                &refs,
                &models,
                &versions,
                &rollouts,
                &arms,
                &pds,
                &decisions,
                &current,
                &granted,
                &prev,
                &hashes,
                &bytes,
                &head.seq,
                &head_hash,
            ];
            let insert = client.execute(INSERT, &params);
            match tokio::time::timeout(COMMIT_TIMEOUT, insert).await {
                Err(_) => return Err(timed("the commit")),
                Ok(Err(e)) => {
                    return Err(match e.as_db_error() {
                        Some(db)
                            if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                                && db.constraint() == Some("decisions_request") =>
                        {
                            Failed::Raced
                        }
                        _ => Failed::Store(describe(&e)),
                    });
                }
                Ok(Ok(updated)) if updated != 1 => {
                    return Err(Failed::Store(format!(
                        "replica {} has no row in the replicas table",
                        self.replica
                    )));
                }
                Ok(Ok(_)) => {}
            }
        }
        self.head = head;
        let answers = group::answers(answers, |i| fresh[i].seq);
        for (job, answer) in batch.drain(..).zip(answers) {
            let _ = job.reply.send(answer);
        }
        Ok(())
    }

    /// Stores the feature names of the group's bundles that the cache does not know.
    async fn store_names(&self, batch: &[Job]) -> Result<(), Failed> {
        let mut new: Vec<(String, Vec<String>)> = Vec::new();
        for body in batch.iter().flat_map(|j| j.bodies.iter()) {
            let (digest, list) = match body {
                NewBody::Compact(c) => (format!("sha256:{}", hex::encode(c.digest)), None),
                NewBody::Text(b) => (b.digest.clone(), Some(b)),
            };
            if self.encoder.names.get(&digest).is_some() || new.iter().any(|(d, _)| *d == digest) {
                continue;
            }
            let names = match (body, list) {
                (NewBody::Compact(c), _) => c.names.to_vec(),
                (_, Some(b)) => b.features.keys().cloned().collect(),
                _ => continue,
            };
            new.push((digest, names));
        }
        let Some(client) = &self.client else {
            return Err(Failed::Store("not connected".into()));
        };
        for (digest, list) in new {
            let json = serde_json::to_string(&list).expect("names serialise");
            let stored = async {
                client
                    .execute(
                        "INSERT INTO feature_names (digest, names) VALUES ($1, $2::text::jsonb) \
                         ON CONFLICT DO NOTHING",
                        &[&digest, &json],
                    )
                    .await?;
                client
                    .query_one(
                        "SELECT names::text FROM feature_names WHERE digest = $1",
                        &[&digest],
                    )
                    .await
            };
            let row = tokio::time::timeout(COMMIT_TIMEOUT, stored)
                .await
                .map_err(|_| Failed::Store("storing feature names timed out".into()))?
                .map_err(|e| Failed::Store(describe(&e)))?;
            let stored: Vec<String> = serde_json::from_str(row.get(0))
                .map_err(|e| Failed::Store(format!("feature names of {digest}: {e}")))?;
            self.encoder.names.remember(&digest, stored);
        }
        Ok(())
    }
}

/// The aggregate columns of [`VersionStats`], in its field order.
const STATS: &str = "COUNT(*),
    COUNT(*) FILTER (WHERE decision = 'approve'),
    COUNT(*) FILTER (WHERE decision = 'review'),
    COUNT(*) FILTER (WHERE decision = 'decline'),
    COUNT(*) FILTER (WHERE current_limit IS NOT NULL AND granted_limit > current_limit),
    COUNT(*) FILTER (WHERE current_limit IS NOT NULL AND granted_limit = current_limit),
    COUNT(*) FILTER (WHERE granted_limit < current_limit AND granted_limit > 0),
    COUNT(*) FILTER (WHERE granted_limit = 0 AND current_limit > 0),
    COUNT(*) FILTER (WHERE current_limit IS NULL)";

fn stats_from_row(r: &Row, at: usize) -> VersionStats {
    let n = |i: usize| r.get::<_, i64>(at + i) as u64;
    VersionStats {
        decisions: n(0),
        approve: n(1),
        review: n(2),
        decline: n(3),
        raised: n(4),
        held: n(5),
        cut: n(6),
        withdrawn: n(7),
        new_customers: n(8),
    }
}

impl DecisionLog for PgLog {
    fn append(&self, body: NewBody) -> AppendFuture {
        let group = self.append_all(vec![body]);
        Box::pin(async move {
            let mut appended = group.await?;
            Ok(appended.pop().expect("one answer for one decision"))
        })
    }

    fn append_all(&self, bodies: Vec<NewBody>) -> AppendAllFuture {
        let (reply, rx) = oneshot::channel();
        let queued = self.queue.try_send(Job { bodies, reply });
        Box::pin(async move {
            match queued {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(LogError::Unavailable("the writer stopped".into()))),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Err(LogError::Unavailable("the write queue is full".into()))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    Err(LogError::Unavailable("the writer stopped".into()))
                }
            }
        })
    }

    fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    fn close(&self) {
        drop(self.closing.lock().expect("closing poisoned").take());
        if let Some(handle) = self.writer.lock().expect("writer poisoned").take() {
            let _ = self.block(handle);
        }
    }

    fn get(&self, decision_id: &str) -> Result<Option<DecisionRecord>, LogError> {
        Ok(self
            .records(
                &format!("SELECT {COLUMNS} FROM decisions WHERE decision_id = $1"),
                &[&decision_id],
            )?
            .pop())
    }

    fn by_customer(&self, refs: &[String]) -> Result<Vec<DecisionRecord>, LogError> {
        let refs: Vec<Vec<u8>> = refs.iter().filter_map(|r| hex::decode(r).ok()).collect();
        self.records(
            &format!("SELECT {COLUMNS} FROM decisions WHERE customer_ref = ANY($1) ORDER BY gseq"),
            &[&refs],
        )
    }

    fn previous(&self, refs: &[String], seq: i64) -> Result<Option<DecisionRecord>, LogError> {
        let refs: Vec<Vec<u8>> = refs.iter().filter_map(|r| hex::decode(r).ok()).collect();
        Ok(self
            .records(
                &format!(
                    "SELECT {COLUMNS} FROM decisions WHERE customer_ref = ANY($1) AND gseq < $2 \
                     AND arm <> 'shadow' ORDER BY gseq DESC LIMIT 1"
                ),
                &[&refs, &seq],
            )?
            .pop())
    }

    fn version_stats(
        &self,
        model: &str,
        version: &str,
        window: &Window,
    ) -> Result<VersionStats, LogError> {
        let (since, until) = bounds(window)?;
        self.block(async {
            let c = self.pg.pooled().await.map_err(unavailable)?;
            let row = c
                .query_one(
                    &format!(
                        "SELECT {STATS} FROM decisions WHERE model = $1 AND version = $2 \
                         AND arm <> 'shadow' AND recorded_us >= $3 AND recorded_us < $4"
                    ),
                    &[&model, &version, &since, &until],
                )
                .await
                .map_err(query_err)?;
            Ok(stats_from_row(&row, 0))
        })
    }

    fn rollout_decisions(
        &self,
        rollout_id: &str,
        since: &str,
    ) -> Result<RolloutDecisions, LogError> {
        let since = micros_of(since)
            .ok_or_else(|| LogError::Query(format!("not an RFC 3339 time: {since}")))?;
        const SCOPE: &str = "FROM decisions WHERE rollout_id = $1 AND recorded_us >= $2";
        self.block(async {
            let mut c = self.pg.pooled().await.map_err(unavailable)?;
            // One snapshot, so that the arms, histograms and series agree.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(query_err)?;
            let mut out = RolloutDecisions::default();
            for row in tx
                .query(
                    &format!("SELECT arm, {STATS} {SCOPE} GROUP BY arm"),
                    &[&rollout_id, &since],
                )
                .await
                .map_err(query_err)?
            {
                out.arms.push(ArmSummary {
                    arm: row.get(0),
                    stats: stats_from_row(&row, 1),
                    pd_histogram: vec![0; PD_BINS],
                });
            }
            out.sort_arms();
            for row in tx
                .query(
                    &format!(
                        "SELECT arm, LEAST(GREATEST(floor(pd * {PD_BINS})::int8, 0), {last}), \
                         COUNT(*) {SCOPE} GROUP BY 1, 2",
                        last = PD_BINS - 1
                    ),
                    &[&rollout_id, &since],
                )
                .await
                .map_err(query_err)?
            {
                let (arm, bin, n): (&str, i64, i64) = (row.get(0), row.get(1), row.get(2));
                if let Some(a) = out.arms.iter_mut().find(|a| a.arm == arm) {
                    a.pd_histogram[bin as usize] += n as u64;
                }
            }
            let span = tx
                .query_one(
                    &format!("SELECT MIN(recorded_us), MAX(recorded_us) {SCOPE}"),
                    &[&rollout_id, &since],
                )
                .await
                .map_err(query_err)?;
            let (Some(first), Some(last)) = (span.get::<_, Option<i64>>(0), span.get(1)) else {
                return Ok(out);
            };
            let stretch = out.choose_stretch(first, last) as i64 * 1_000_000;
            for row in tx
                .query(
                    &format!(
                        "SELECT recorded_us / $3, arm, COUNT(*) {SCOPE} GROUP BY 1, 2 ORDER BY 1"
                    ),
                    &[&rollout_id, &since, &stretch],
                )
                .await
                .map_err(query_err)?
            {
                out.add_traffic(row.get(0), row.get(1), row.get::<_, i64>(2) as u64);
            }
            let _ = tx.commit().await;
            Ok(out)
        })
    }

    fn scan(
        &self,
        window: &Window,
        visit: &mut dyn FnMut(DecisionRecord) -> bool,
    ) -> Result<(), LogError> {
        let (since, until) = bounds(window)?;
        let mut after = 0i64;
        loop {
            let page = self.records(
                &format!(
                    "SELECT {COLUMNS} FROM decisions WHERE gseq > $1 AND recorded_us >= $2 \
                     AND recorded_us < $3 ORDER BY gseq LIMIT {PAGE}"
                ),
                &[&after, &since, &until],
            )?;
            let full = page.len() as i64 == PAGE;
            for r in page {
                after = r.seq;
                if !visit(r) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn recent_by_arm(
        &self,
        rollout_id: &str,
        limit: usize,
        since_us: i64,
    ) -> Result<Option<RecentByArm>, LogError> {
        let limit = limit as i64;
        self.block(async {
            let c = self.pg.pooled().await.map_err(unavailable)?;
            let rows = c
                .query(
                    "(SELECT false, decision, pd, current_limit, granted_limit FROM decisions \
                      WHERE rollout_id = $1 AND arm = 'champion' \
                      ORDER BY recorded_us DESC LIMIT $2) \
                     UNION ALL \
                     (SELECT true, decision, pd, current_limit, granted_limit FROM decisions \
                      WHERE rollout_id = $1 AND arm IN ('candidate', 'shadow') \
                      ORDER BY recorded_us DESC LIMIT $2)",
                    &[&rollout_id, &limit],
                )
                .await
                .map_err(query_err)?;
            let mut recent = RecentByArm::default();
            for row in rows {
                let decision: &str = row.get(1);
                let outcome = DecisionOutcome {
                    decision: Outcome::parse(decision).ok_or_else(|| {
                        LogError::Damaged(format!("a stored decision reads {decision:?}"))
                    })?,
                    pd: row.get(2),
                    current_limit: row.get(3),
                    granted_limit: row.get(4),
                };
                if row.get::<_, bool>(0) {
                    recent.candidate.push(outcome);
                } else {
                    recent.champion.push(outcome);
                }
            }
            for row in c
                .query(
                    "SELECT arm, COUNT(*) FROM decisions WHERE rollout_id = $1 \
                     AND recorded_us >= $2 GROUP BY arm",
                    &[&rollout_id, &since_us],
                )
                .await
                .map_err(query_err)?
            {
                recent.since.push((row.get(0), row.get::<_, i64>(1) as u64));
            }
            Ok(Some(recent))
        })
    }

    /// Every replica's chain, in replica order; the first break found is reported, naming
    /// its replica. The head hash lists each chain's head.
    fn verify(&self) -> Result<VerifyReport, LogError> {
        let replicas: Vec<(String, i64, Option<Vec<u8>>)> = self.block(async {
            let c = self.pg.pooled().await.map_err(unavailable)?;
            let rows = c
                .query(
                    "SELECT replica_id, head_seq, head_hash FROM replicas ORDER BY replica_id",
                    &[],
                )
                .await
                .map_err(query_err)?;
            Ok::<_, LogError>(
                rows.iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect(),
            )
        })?;
        let mut total = VerifyReport {
            records: 0,
            head_hash: String::new(),
            first_break: None,
        };
        let mut heads = Vec::new();
        for (replica, head_seq, head_hash) in replicas {
            let head = head_hash.map(|h| (head_seq, hex::encode(h)));
            let report = self.verify_replica(&replica, head)?;
            total.records += report.records;
            heads.push(format!("{replica}:{}", report.head_hash));
            if total.first_break.is_none()
                && let Some(mut b) = report.first_break
            {
                b.detail = format!("replica {replica}: {}", b.detail);
                total.first_break = Some(b);
            }
        }
        total.head_hash = heads.join(" ");
        Ok(total)
    }
}
