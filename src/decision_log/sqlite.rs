//! The embedded decision log: one SQLite file in WAL mode, one writer thread, group commit.
//!
//! The writer takes the first queued decision, then everything else already queued (up to
//! `max_batch`), and writes them all in one transaction: one commit, one fsync. Each request
//! is answered only after that commit returned. If a commit fails, every request of the batch
//! gets an error, and the writer closes the file, reopens it, checks that its last record is
//! the one the writer last committed, and proves the disk takes writes again (a probe commit)
//! before it accepts decisions; until then the log reports itself unhealthy.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::{oneshot, watch};

use super::chain::{self, GENESIS, Verifier};
use super::{
    AppendAllFuture, AppendFuture, Appended, ArmSummary, ArmTraffic, DecisionLog, DecisionRecord,
    Durability, LogError, PD_BINS, RecordBody, RolloutDecisions, VerifyReport, VersionStats,
    Window,
};

/// How long an unhealthy writer waits between recovery attempts when no decision arrives.
const PROBE_EVERY: Duration = Duration::from_millis(250);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS decisions (
    seq            INTEGER PRIMARY KEY,
    decision_id    TEXT NOT NULL UNIQUE,
    recorded_at    TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    request_hash   TEXT NOT NULL,
    customer_ref   TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    model          TEXT NOT NULL,
    version        TEXT NOT NULL,
    digest         TEXT NOT NULL,
    rollout_id     TEXT,
    arm            TEXT NOT NULL,
    features       TEXT NOT NULL,
    pd             REAL NOT NULL,
    grade          TEXT NOT NULL,
    decision       TEXT NOT NULL,
    current_limit  INTEGER,
    granted_limit  INTEGER NOT NULL,
    reasons        TEXT NOT NULL,
    caller         TEXT,
    trace_id       TEXT,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS decisions_request ON decisions(request_id) WHERE arm != 'shadow';
CREATE INDEX IF NOT EXISTS decisions_customer ON decisions(customer_ref, seq);
CREATE INDEX IF NOT EXISTS decisions_version ON decisions(model, version, recorded_at);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions(recorded_at);
-- The writer's last commit, updated in the same transaction: a log cut short shows.
CREATE TABLE IF NOT EXISTS chain_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
-- Retention: the seq and hash of the last record removed; verification starts here.
CREATE TABLE IF NOT EXISTS chain_anchor (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    pruned_at TEXT NOT NULL
);
-- Written by recovery probes only.
CREATE TABLE IF NOT EXISTS writer_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at TEXT NOT NULL
);
";

const COLUMNS: &str = "seq, decision_id, recorded_at, request_id, request_hash, customer_ref, \
    key_id, model, version, digest, rollout_id, arm, features, pd, grade, decision, \
    current_limit, granted_limit, reasons, caller, trace_id, prev_hash, hash";

/// What a job is answered: every decision of its group, or why none was recorded.
type GroupAnswer = Result<Vec<Appended>, LogError>;

/// Decisions to record together: one for `append`, several for `append_all`, which are
/// recorded all or none.
struct Job {
    bodies: Vec<RecordBody>,
    reply: oneshot::Sender<GroupAnswer>,
}

enum Msg {
    Append(Box<Job>),
    Close,
}

/// The SQLite decision log.
pub struct SqliteLog {
    path: PathBuf,
    queue: SyncSender<Msg>,
    healthy: watch::Receiver<bool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLog")
            .field("path", &self.path)
            .finish()
    }
}

fn query_err(e: rusqlite::Error) -> LogError {
    LogError::Query(e.to_string())
}

impl SqliteLog {
    /// Opens (creating if needed) the log at `path` and starts its writer.
    pub fn open(
        path: &Path,
        durability: Durability,
        max_batch: usize,
        queue_capacity: usize,
    ) -> Result<Arc<Self>, LogError> {
        let conn = open_writer(path, durability, true)?;
        conn.execute_batch(SCHEMA).map_err(query_err)?;
        let head = read_head(&conn)?;
        let (queue, rx) = std::sync::mpsc::sync_channel(queue_capacity);
        let (healthy_tx, healthy) = watch::channel(true);
        let mut writer = Writer {
            path: path.to_owned(),
            durability,
            file: file_identity(path),
            conn: Some(conn),
            head,
            healthy: healthy_tx,
            max_batch: max_batch.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("decision-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Unavailable(format!("starting the writer: {e}")))?;
        Ok(Arc::new(SqliteLog {
            path: path.to_owned(),
            queue,
            healthy,
            writer: Mutex::new(Some(handle)),
            readers: Mutex::new(Vec::new()),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled read-only connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, LogError>) -> Result<T, LogError> {
        let pooled = self.readers.lock().expect("reader pool poisoned").pop();
        let conn = match pooled {
            Some(c) => c,
            None => Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(query_err)?,
        };
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(query_err)?;
        let result = f(&conn);
        self.readers
            .lock()
            .expect("reader pool poisoned")
            .push(conn);
        result
    }
}

impl DecisionLog for SqliteLog {
    fn append(&self, body: RecordBody) -> AppendFuture {
        let group = self.append_all(vec![body]);
        Box::pin(async move {
            let mut appended = group.await?;
            Ok(appended.pop().expect("one answer for one decision"))
        })
    }

    fn append_all(&self, bodies: Vec<RecordBody>) -> AppendAllFuture {
        let (reply, rx) = oneshot::channel();
        let queued = self
            .queue
            .try_send(Msg::Append(Box::new(Job { bodies, reply })));
        Box::pin(async move {
            match queued {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(LogError::Unavailable("the writer stopped".into()))),
                Err(TrySendError::Full(_)) => {
                    Err(LogError::Unavailable("the write queue is full".into()))
                }
                Err(TrySendError::Disconnected(_)) => {
                    Err(LogError::Unavailable("the writer stopped".into()))
                }
            }
        })
    }

    fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    fn close(&self) {
        // A full queue still drains: this send waits for room.
        let _ = self.queue.send(Msg::Close);
        if let Some(handle) = self.writer.lock().expect("writer handle poisoned").take() {
            let _ = handle.join();
        }
    }

    fn get(&self, decision_id: &str) -> Result<Option<DecisionRecord>, LogError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM decisions WHERE decision_id = ?1"),
                [decision_id],
                row_to_record,
            )
            .optional()
            .map_err(query_err)
        })
    }

    fn by_customer(&self, refs: &[String]) -> Result<Vec<DecisionRecord>, LogError> {
        self.read(|c| {
            let mut out = Vec::new();
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM decisions WHERE customer_ref = ?1 ORDER BY seq"
                ))
                .map_err(query_err)?;
            for r in refs {
                let rows = stmt.query_map([r], row_to_record).map_err(query_err)?;
                for row in rows {
                    out.push(row.map_err(query_err)?);
                }
            }
            out.sort_by_key(|r| r.seq);
            Ok(out)
        })
    }

    fn previous(&self, refs: &[String], seq: i64) -> Result<Option<DecisionRecord>, LogError> {
        self.read(|c| {
            let mut best: Option<DecisionRecord> = None;
            for r in refs {
                let found = c
                    .query_row(
                        &format!(
                            "SELECT {COLUMNS} FROM decisions WHERE customer_ref = ?1 AND seq < ?2 \
                             AND arm != 'shadow' ORDER BY seq DESC LIMIT 1"
                        ),
                        params![r, seq],
                        row_to_record,
                    )
                    .optional()
                    .map_err(query_err)?;
                if let Some(f) = found
                    && best.as_ref().is_none_or(|b| f.seq > b.seq)
                {
                    best = Some(f);
                }
            }
            Ok(best)
        })
    }

    fn version_stats(
        &self,
        model: &str,
        version: &str,
        window: &Window,
    ) -> Result<VersionStats, LogError> {
        self.read(|c| {
            c.query_row(
                &format!(
                    "SELECT {STATS} FROM decisions
                     WHERE model = ?1 AND version = ?2 AND arm != 'shadow'
                       AND recorded_at >= ?3 AND recorded_at < ?4"
                ),
                params![model, version, since(window), until(window)],
                |r| stats_from_row(r, 0),
            )
            .map_err(query_err)
        })
    }

    fn rollout_decisions(
        &self,
        rollout_id: &str,
        since: &str,
    ) -> Result<RolloutDecisions, LogError> {
        // Every query reads the time index from the rollout's start, then filters by id.
        const SCOPE: &str = "recorded_at >= ?1 AND rollout_id = ?2";
        self.read(|c| {
            c.execute_batch("BEGIN").map_err(query_err)?;
            let result = rollout_snapshot(c, SCOPE, rollout_id, since);
            let _ = c.execute_batch("COMMIT");
            result
        })
    }

    fn scan(
        &self,
        window: &Window,
        visit: &mut dyn FnMut(DecisionRecord) -> bool,
    ) -> Result<(), LogError> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM decisions WHERE recorded_at >= ?1 AND recorded_at < ?2 \
                     ORDER BY seq"
                ))
                .map_err(query_err)?;
            let rows = stmt
                .query_map(params![since(window), until(window)], row_to_record)
                .map_err(query_err)?;
            for row in rows {
                if !visit(row.map_err(query_err)?) {
                    break;
                }
            }
            Ok(())
        })
    }

    fn verify(&self) -> Result<VerifyReport, LogError> {
        self.read(|c| {
            // One read transaction: the head, the anchor and the records from one snapshot,
            // so a commit landing mid-walk is not mistaken for a cut-short log.
            c.execute_batch("BEGIN").map_err(query_err)?;
            let report = verify_snapshot(c);
            let _ = c.execute_batch("COMMIT");
            report
        })
    }
}

/// Walks the chain inside the caller's read transaction.
fn verify_snapshot(c: &Connection) -> Result<VerifyReport, LogError> {
    let head = read_head(c)?;

    // Only consulted once, at a broken link: a full scan there is fine.
    let mut lookup = c
        .prepare("SELECT seq FROM decisions WHERE hash = ?1 LIMIT 1")
        .map_err(query_err)?;
    let mut find = |hash: &str| {
        lookup
            .query_row([hash], |r| r.get::<_, i64>(0))
            .optional()
            .ok()
            .flatten()
    };
    let anchor = c
        .query_row("SELECT seq, hash FROM chain_anchor WHERE id = 1", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .optional()
        .map_err(query_err)?;
    let mut verifier = Verifier::new(&mut find, anchor);
    let mut stmt = c
        .prepare(&format!("SELECT {COLUMNS} FROM decisions ORDER BY seq"))
        .map_err(query_err)?;
    let mut rows = stmt.query([]).map_err(query_err)?;
    while let Some(row) = rows.next().map_err(query_err)? {
        let record = match row_to_record(row) {
            Ok(r) => r,
            // A field edited into something unreadable is an edit too.
            Err(e) => {
                let seq: i64 = row.get(0).unwrap_or_default();
                return Ok(VerifyReport {
                    records: 0,
                    head_hash: String::new(),
                    first_break: Some(super::Break {
                        seq,
                        decision_id: row.get(1).unwrap_or_default(),
                        kind: super::BreakKind::Edited,
                        detail: format!("record seq {seq} was edited into an unreadable form: {e}"),
                    }),
                });
            }
        };
        if !verifier.push(record) {
            break;
        }
    }
    let head = (head.seq > 0).then_some((head.seq, head.hash));
    Ok(verifier.finish(head))
}

/// The aggregate columns of [`VersionStats`], in its field order.
const STATS: &str = "COUNT(*),
    COALESCE(SUM(decision = 'approve'), 0),
    COALESCE(SUM(decision = 'review'), 0),
    COALESCE(SUM(decision = 'decline'), 0),
    COALESCE(SUM(current_limit IS NOT NULL AND granted_limit > current_limit), 0),
    COALESCE(SUM(current_limit IS NOT NULL AND granted_limit = current_limit), 0),
    COALESCE(SUM(granted_limit < current_limit AND granted_limit > 0), 0),
    COALESCE(SUM(granted_limit = 0 AND current_limit > 0), 0),
    COALESCE(SUM(current_limit IS NULL), 0)";

fn stats_from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<VersionStats> {
    let n = |i: usize| r.get::<_, i64>(at + i).map(|v| v as u64);
    Ok(VersionStats {
        decisions: n(0)?,
        approve: n(1)?,
        review: n(2)?,
        decline: n(3)?,
        raised: n(4)?,
        held: n(5)?,
        cut: n(6)?,
        withdrawn: n(7)?,
        new_customers: n(8)?,
    })
}

/// A rollout's aggregates from one read transaction, so that the arms, histograms and
/// series agree with each other.
fn rollout_snapshot(
    c: &Connection,
    scope: &str,
    rollout_id: &str,
    since: &str,
) -> Result<RolloutDecisions, LogError> {
    let mut out = RolloutDecisions::default();
    let mut stmt = c
        .prepare(&format!(
            "SELECT arm, {STATS} FROM decisions WHERE {scope} GROUP BY arm"
        ))
        .map_err(query_err)?;
    let rows = stmt
        .query_map(params![since, rollout_id], |r| {
            Ok((r.get::<_, String>(0)?, stats_from_row(r, 1)?))
        })
        .map_err(query_err)?;
    for row in rows {
        let (arm, stats) = row.map_err(query_err)?;
        out.arms.push(ArmSummary {
            arm,
            stats,
            pd_histogram: vec![0; PD_BINS],
        });
    }
    let order = |a: &str| {
        ["champion", "candidate", "shadow"]
            .iter()
            .position(|x| *x == a)
    };
    out.arms.sort_by_key(|a| order(&a.arm));

    let mut stmt = c
        .prepare(&format!(
            "SELECT arm, MIN(MAX(CAST(pd * {PD_BINS} AS INTEGER), 0), {last}), COUNT(*)
             FROM decisions WHERE {scope} GROUP BY 1, 2",
            last = PD_BINS - 1
        ))
        .map_err(query_err)?;
    let rows = stmt
        .query_map(params![since, rollout_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(query_err)?;
    for row in rows {
        let (arm, bin, n) = row.map_err(query_err)?;
        if let Some(a) = out.arms.iter_mut().find(|a| a.arm == arm) {
            a.pd_histogram[bin as usize] += n as u64;
        }
    }

    let span: Option<(String, String)> = c
        .query_row(
            &format!("SELECT MIN(recorded_at), MAX(recorded_at) FROM decisions WHERE {scope}"),
            params![since, rollout_id],
            |r| {
                Ok(r.get::<_, Option<String>>(0)?
                    .zip(r.get::<_, Option<String>>(1)?))
            },
        )
        .map_err(query_err)?;
    let Some((first, last)) = span else {
        return Ok(out);
    };
    let secs = match (
        humantime::parse_rfc3339(&first),
        humantime::parse_rfc3339(&last),
    ) {
        (Ok(a), Ok(b)) => b.duration_since(a).map_or(0, |d| d.as_secs()),
        _ => 0,
    };
    // recorded_at is fixed-width RFC 3339, so a prefix is a stretch of time: up to the
    // seconds (19 characters), minutes (16), hours (13) or the day (10).
    const MOST: u64 = 600;
    let (prefix, pad, stretch) = if secs <= MOST {
        (19, "Z", 1)
    } else if secs <= MOST * 60 {
        (16, ":00Z", 60)
    } else if secs <= MOST * 3_600 {
        (13, ":00:00Z", 3_600)
    } else {
        (10, "T00:00:00Z", 86_400)
    };
    out.stretch_secs = stretch;
    let mut stmt = c
        .prepare(&format!(
            "SELECT substr(recorded_at, 1, {prefix}), arm, COUNT(*)
             FROM decisions WHERE {scope} GROUP BY 1, 2 ORDER BY 1"
        ))
        .map_err(query_err)?;
    let rows = stmt
        .query_map(params![since, rollout_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(query_err)?;
    for row in rows {
        let (start, arm, n) = row.map_err(query_err)?;
        let start = format!("{start}{pad}");
        if out.traffic.last().is_none_or(|t| t.start != start) {
            out.traffic.push(ArmTraffic {
                start,
                ..ArmTraffic::default()
            });
        }
        let t = out.traffic.last_mut().expect("pushed above");
        match arm.as_str() {
            "champion" => t.champion += n as u64,
            "candidate" => t.candidate += n as u64,
            _ => t.shadow += n as u64,
        }
    }
    Ok(out)
}

fn since(w: &Window) -> String {
    w.since.clone().unwrap_or_default()
}

fn until(w: &Window) -> String {
    // Every RFC 3339 timestamp sorts below this.
    w.until.clone().unwrap_or_else(|| "9999".into())
}

/// The writer's view of the end of the chain.
#[derive(Debug, Clone, PartialEq)]
struct Head {
    seq: i64,
    hash: String,
}

fn read_head(conn: &Connection) -> Result<Head, LogError> {
    let head = conn
        .query_row("SELECT seq, hash FROM chain_head WHERE id = 1", [], |r| {
            Ok(Head {
                seq: r.get(0)?,
                hash: r.get(1)?,
            })
        })
        .optional()
        .map_err(query_err)?;
    Ok(head.unwrap_or(Head {
        seq: 0,
        hash: GENESIS.to_string(),
    }))
}

fn open_writer(path: &Path, durability: Durability, create: bool) -> Result<Connection, LogError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| LogError::Unavailable(format!("opening {}: {e}", path.display())))?;
    let sync = match durability {
        Durability::Sync => "FULL",
        Durability::Async => "NORMAL",
    };
    // A larger checkpoint interval and a 16 MiB page cache: each decision dirties a few
    // random index pages (customer ref, request id), and checkpointing them every 1,000 WAL
    // pages (the default) doubled the writes and the served p99 (measured, BENCHMARKS.md).
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000; \
         PRAGMA wal_autocheckpoint = 16384; PRAGMA cache_size = -16384;"
    ))
    .map_err(|e| LogError::Unavailable(format!("configuring {}: {e}", path.display())))?;
    Ok(conn)
}

/// The file's (device, inode): a log file removed or replaced under the writer shows.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).ok().map(|_| (0, 0))
    }
}

struct Writer {
    path: PathBuf,
    durability: Durability,
    file: Option<(u64, u64)>,
    /// `None` while the log is unusable.
    conn: Option<Connection>,
    head: Head,
    healthy: watch::Sender<bool>,
    max_batch: usize,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let first = if self.conn.is_some() {
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(PROBE_EVERY) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.recover();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut batch = Vec::new();
            let mut closing = false;
            match first {
                Msg::Append(job) => batch.push(*job),
                Msg::Close => closing = true,
            }
            // Gather what is queued; when the queue runs dry, yield once so that requests
            // already on their way (on this core or another) can join this commit.
            let mut yielded = false;
            while !closing && batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Append(job)) => batch.push(*job),
                    Ok(Msg::Close) => closing = true,
                    Err(_) if !yielded => {
                        yielded = true;
                        std::thread::yield_now();
                    }
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
            if closing {
                // Whatever was queued before Close is committed; refuse the rest.
                while let Ok(Msg::Append(job)) = rx.try_recv() {
                    let _ = job.reply.send(Err(LogError::Unavailable(
                        "the server is shutting down".into(),
                    )));
                }
                if let Some(conn) = self.conn.take() {
                    let _ = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);");
                }
                return;
            }
        }
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        if self.conn.is_none() {
            self.recover();
        }
        let Some(conn) = self.conn.as_mut() else {
            for job in batch {
                let _ = job.reply.send(Err(LogError::Unavailable(
                    "the log cannot be written; waiting for the disk to recover".into(),
                )));
            }
            return;
        };
        let started = std::time::Instant::now();
        let outcome = write_batch(conn, &self.head, &batch);
        let outcome = outcome.and_then(|(answers, head)| {
            // Committed, but to the file we opened? A file removed or replaced underneath
            // took these decisions with it.
            if file_identity(&self.path) != self.file {
                return Err(LogError::Damaged(format!(
                    "{} was removed or replaced while open",
                    self.path.display()
                )));
            }
            Ok((answers, head))
        });
        match outcome {
            Ok((answers, head)) => {
                let decisions: usize = batch.iter().map(|job| job.bodies.len()).sum();
                tracing::trace!(batch = decisions, elapsed = ?started.elapsed(), "group commit");
                crate::telemetry::metrics().log_commit(decisions, started.elapsed());
                self.head = head;
                for (job, answer) in batch.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "decision log commit failed; failing the batch");
                for job in batch {
                    let _ = job.reply.send(Err(LogError::Unavailable(e.to_string())));
                }
                self.conn = None;
                self.set_healthy(false);
                self.recover();
            }
        }
    }

    /// Reopens the file, checks it ends where the writer's last commit ended, and proves it
    /// takes a write. Healthy again only if all three hold.
    fn recover(&mut self) {
        self.conn = None;
        let attempt = (|| {
            let conn = open_writer(&self.path, self.durability, false)?;
            let found = read_head(&conn).map_err(|e| LogError::Damaged(e.to_string()))?;
            if found != self.head {
                return Err(LogError::Damaged(format!(
                    "the log's last commit is seq {} but the writer's was seq {}; \
                     the file was replaced or cut short",
                    found.seq, self.head.seq
                )));
            }
            let probe = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
            conn.execute(
                "INSERT INTO writer_probe (id, at) VALUES (1, ?1) \
                 ON CONFLICT(id) DO UPDATE SET at = excluded.at",
                [probe],
            )
            .map_err(|e| LogError::Unavailable(format!("probe write: {e}")))?;
            Ok(conn)
        })();
        match attempt {
            Ok(conn) => {
                tracing::info!(path = %self.path.display(), "decision log writable again");
                self.file = file_identity(&self.path);
                self.conn = Some(conn);
                self.set_healthy(true);
            }
            Err(e) => {
                tracing::debug!(error = %e, "decision log still unavailable");
                self.set_healthy(false);
            }
        }
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }
}

/// Writes one batch in one transaction. Returns each job's answer and the new head, or an
/// error (after which nothing of the batch may be acknowledged).
fn write_batch(
    conn: &mut Connection,
    head: &Head,
    batch: &[Job],
) -> Result<(Vec<GroupAnswer>, Head), LogError> {
    let unavailable = |e: rusqlite::Error| LogError::Unavailable(e.to_string());
    // IMMEDIATE: take the write lock up front (waiting out the rollout store's short writes
    // under busy_timeout) rather than failing to upgrade a read snapshot mid-transaction.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let mut head = head.clone();
    let mut answers = Vec::with_capacity(batch.len());
    {
        let mut find = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM decisions WHERE request_id = ?1 AND arm != 'shadow'"
            ))
            .map_err(unavailable)?;
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO decisions (seq, decision_id, recorded_at, request_id, request_hash, \
                 customer_ref, key_id, model, version, digest, rollout_id, arm, features, pd, \
                 grade, decision, current_limit, granted_limit, reasons, caller, trace_id, \
                 prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
                 ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )
            .map_err(unavailable)?;
        for job in batch {
            // A group is all or none: a savepoint undoes its inserts if one of them is refused.
            let grouped = job.bodies.len() > 1;
            if grouped {
                tx.execute_batch("SAVEPOINT decision_group")
                    .map_err(unavailable)?;
            }
            let before = head.clone();
            let mut appended = Vec::with_capacity(job.bodies.len());
            let mut refused = None;
            for b in &job.bodies {
                if b.arm != "shadow" {
                    // Sees this batch's own inserts too: they are in the same transaction.
                    let existing = find
                        .query_row([&b.request_id], row_to_record)
                        .optional()
                        .map_err(unavailable)?;
                    if let Some(existing) = existing {
                        if existing.body.request_hash == b.request_hash {
                            appended.push(Appended::Existing(existing));
                            continue;
                        }
                        refused = Some(LogError::RequestIdReused(b.request_id.clone()));
                        break;
                    }
                }
                let seq = head.seq + 1;
                let hash = chain::link_hash(&head.hash, b);
                let features = serde_json::to_string(&b.features).expect("features serialise");
                let reasons = serde_json::to_string(&b.reasons).expect("reasons serialise");
                insert
                    .execute(params![
                        seq,
                        b.decision_id,
                        b.recorded_at,
                        b.request_id,
                        b.request_hash,
                        b.customer_ref,
                        b.key_id,
                        b.model,
                        b.version,
                        b.digest,
                        b.rollout_id,
                        b.arm,
                        features,
                        b.probability_of_default,
                        b.grade,
                        b.decision,
                        b.current_limit,
                        b.granted_limit,
                        reasons,
                        b.caller,
                        b.trace_id,
                        head.hash,
                        hash,
                    ])
                    .map_err(unavailable)?;
                appended.push(Appended::New(DecisionRecord {
                    seq,
                    body: b.clone(),
                    prev_hash: head.hash.clone(),
                    hash: hash.clone(),
                }));
                head = Head { seq, hash };
            }
            match refused {
                Some(e) => {
                    if grouped {
                        tx.execute_batch("ROLLBACK TO decision_group; RELEASE decision_group")
                            .map_err(unavailable)?;
                    }
                    head = before;
                    answers.push(Err(e));
                }
                None => {
                    if grouped {
                        tx.execute_batch("RELEASE decision_group")
                            .map_err(unavailable)?;
                    }
                    answers.push(Ok(appended));
                }
            }
        }
    }
    tx.execute(
        "INSERT INTO chain_head (id, seq, hash) VALUES (1, ?1, ?2) \
         ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        params![head.seq, head.hash],
    )
    .map_err(unavailable)?;
    tx.commit().map_err(unavailable)?;
    Ok((answers, head))
}

fn json<T: serde::de::DeserializeOwned>(i: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn row_to_record(r: &Row<'_>) -> rusqlite::Result<DecisionRecord> {
    Ok(DecisionRecord {
        seq: r.get(0)?,
        body: RecordBody {
            decision_id: r.get(1)?,
            recorded_at: r.get(2)?,
            request_id: r.get(3)?,
            request_hash: r.get(4)?,
            customer_ref: r.get(5)?,
            key_id: r.get(6)?,
            model: r.get(7)?,
            version: r.get(8)?,
            digest: r.get(9)?,
            rollout_id: r.get(10)?,
            arm: r.get(11)?,
            features: json(12, r.get(12)?)?,
            probability_of_default: r.get(13)?,
            grade: r.get(14)?,
            decision: r.get(15)?,
            current_limit: r.get(16)?,
            granted_limit: r.get(17)?,
            reasons: json(18, r.get(18)?)?,
            caller: r.get(19)?,
            trace_id: r.get(20)?,
        },
        prev_hash: r.get(21)?,
        hash: r.get(22)?,
    })
}
