//! The query view: the SQLite file reviewers open with any SQLite tool, built from the
//! journal off the request path. Its `decisions` table has one row per durable record with
//! every field readable (features and reasons as JSON); `journal_checkpoint` says which
//! journal record it holds up to, written in the same transaction as the rows, so that after
//! a crash the indexer resumes exactly after it.
//!
//! The view is a cache of the journal: it is written without fsync (`synchronous = NORMAL`;
//! a power loss can only take rows the journal still has), and any row it lacks is re-read
//! from the journal on start. Queries here see only what the view holds; [`super::JournalLog`]
//! adds the tail.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::journal::Position;
use super::tail::Entry;
use super::{
    ArmSummary, ArmTraffic, DecisionRecord, LogError, PD_BINS, RecordBody, RolloutDecisions,
    VersionStats, Window,
};

/// `PRAGMA user_version` of a file in this layout. 0 is the log before the journal (its
/// `decisions` table was the log itself, with `chain_head`); see [`super::migrate`].
pub const USER_VERSION: i64 = 2;

pub(super) const SCHEMA: &str = "
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
CREATE INDEX IF NOT EXISTS decisions_customer ON decisions(customer_ref, seq);
CREATE INDEX IF NOT EXISTS decisions_version ON decisions(model, version, recorded_at);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions(recorded_at);
-- The journal record the view holds up to (seq, and where the journal has it).
CREATE TABLE IF NOT EXISTS journal_checkpoint (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    seq     INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset  INTEGER NOT NULL
);
";

/// Request ids are unique among served records, but the journal's writer enforces that; the
/// view's index only finds them (a unique index here could wedge the indexer on a row the
/// journal already holds).
pub(super) const REQUEST_INDEX: &str = "CREATE INDEX IF NOT EXISTS decisions_request_id ON decisions(request_id) WHERE arm != 'shadow';";

pub(super) const COLUMNS: &str = "seq, decision_id, recorded_at, request_id, request_hash, customer_ref, \
    key_id, model, version, digest, rollout_id, arm, features, pd, grade, decision, \
    current_limit, granted_limit, reasons, caller, trace_id, prev_hash, hash";

pub(super) fn query_err(e: rusqlite::Error) -> LogError {
    LogError::Query(e.to_string())
}

/// Opens the view for writing (the indexer, migration, the rollout store share the file).
pub(super) fn open_rw(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| LogError::Unavailable(format!("opening {}: {e}", path.display())))?;
    // temp_store = MEMORY: an INSERT into a table with unique indexes keeps a statement
    // journal, which on disk was 30% of the indexer's time (perf). A larger checkpoint
    // interval checkpoints each index page once per many batches rather than once per batch.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; \
         PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY; \
         PRAGMA wal_autocheckpoint = 16384;",
    )
    .map_err(|e| LogError::Unavailable(format!("configuring {}: {e}", path.display())))?;
    Ok(conn)
}

/// A read-only connection for queries.
pub(super) fn open_ro(path: &Path) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(query_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(query_err)?;
    Ok(conn)
}

/// Where the view ends: None when it holds no journal record yet.
pub(super) fn checkpoint(c: &Connection) -> Result<Option<Position>, LogError> {
    c.query_row(
        "SELECT seq, segment, offset FROM journal_checkpoint WHERE id = 1",
        [],
        |r| {
            Ok(Position {
                seq: r.get::<_, i64>(0)? as u64,
                segment: r.get::<_, i64>(1)? as u64,
                offset: r.get::<_, i64>(2)? as u64,
            })
        },
    )
    .optional()
    .map_err(query_err)
}

/// The last seq the view holds, 0 if none.
pub(super) fn indexed_seq(c: &Connection) -> Result<i64, LogError> {
    Ok(checkpoint(c)?.map_or(0, |p| p.seq as i64))
}

/// Writes a batch of records and the new checkpoint in one transaction.
pub(super) fn insert(
    conn: &mut Connection,
    batch: &[std::sync::Arc<Entry>],
) -> Result<(), LogError> {
    let Some(last) = batch.last() else {
        return Ok(());
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(query_err)?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO decisions (seq, decision_id, recorded_at, request_id, \
                 request_hash, customer_ref, key_id, model, version, digest, rollout_id, arm, \
                 features, pd, grade, decision, current_limit, granted_limit, reasons, caller, \
                 trace_id, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
                 ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )
            .map_err(query_err)?;
        for e in batch {
            let r = &e.record;
            let b = &r.body;
            insert
                .execute(params![
                    r.seq,
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
                    serde_json::to_string(&b.features).expect("features serialise"),
                    b.probability_of_default,
                    b.grade,
                    b.decision,
                    b.current_limit,
                    b.granted_limit,
                    serde_json::to_string(&b.reasons).expect("reasons serialise"),
                    b.caller,
                    b.trace_id,
                    r.prev_hash,
                    r.hash,
                ])
                .map_err(query_err)?;
        }
    }
    set_checkpoint(&tx, last.position)?;
    tx.commit().map_err(query_err)
}

pub(super) fn set_checkpoint(c: &Connection, p: Position) -> Result<(), LogError> {
    c.execute(
        "INSERT INTO journal_checkpoint (id, seq, segment, offset) VALUES (1, ?1, ?2, ?3) \
         ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, segment = excluded.segment, \
         offset = excluded.offset",
        params![p.seq as i64, p.segment as i64, p.offset as i64],
    )
    .map_err(query_err)?;
    Ok(())
}

pub(super) fn get(c: &Connection, decision_id: &str) -> Result<Option<DecisionRecord>, LogError> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM decisions WHERE decision_id = ?1"
    ))
    .map_err(query_err)?
    .query_row([decision_id], row_to_record)
    .optional()
    .map_err(query_err)
}

/// The served record of a request id.
pub(super) fn by_request(
    c: &Connection,
    request_id: &str,
) -> Result<Option<DecisionRecord>, LogError> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM decisions WHERE request_id = ?1 AND arm != 'shadow' LIMIT 1"
    ))
    .map_err(query_err)?
    .query_row([request_id], row_to_record)
    .optional()
    .map_err(query_err)
}

/// Every served request id, for the writer's filter.
pub(super) fn each_request_id(c: &Connection, mut each: impl FnMut(&str)) -> Result<(), LogError> {
    let mut stmt = c
        .prepare("SELECT request_id FROM decisions WHERE arm != 'shadow'")
        .map_err(query_err)?;
    let mut rows = stmt.query([]).map_err(query_err)?;
    while let Some(row) = rows.next().map_err(query_err)? {
        each(
            row.get_ref(0)
                .map_err(query_err)?
                .as_str()
                .map_err(|e| LogError::Query(e.to_string()))?,
        );
    }
    Ok(())
}

pub(super) fn by_customer(
    c: &Connection,
    refs: &[String],
) -> Result<Vec<DecisionRecord>, LogError> {
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
}

pub(super) fn previous(
    c: &Connection,
    refs: &[String],
    seq: i64,
) -> Result<Option<DecisionRecord>, LogError> {
    let mut best: Option<DecisionRecord> = None;
    let mut stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM decisions WHERE customer_ref = ?1 AND seq < ?2 \
             AND arm != 'shadow' ORDER BY seq DESC LIMIT 1"
        ))
        .map_err(query_err)?;
    for r in refs {
        let found = stmt
            .query_row(params![r, seq], row_to_record)
            .optional()
            .map_err(query_err)?;
        if let Some(f) = found
            && best.as_ref().is_none_or(|b| f.seq > b.seq)
        {
            best = Some(f);
        }
    }
    Ok(best)
}

pub(super) fn version_stats(
    c: &Connection,
    model: &str,
    version: &str,
    window: &Window,
) -> Result<VersionStats, LogError> {
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
}

pub(super) fn rollout_decisions(
    c: &Connection,
    rollout_id: &str,
    since: &str,
) -> Result<RolloutDecisions, LogError> {
    // Every query reads the time index from the rollout's start, then filters by id.
    const SCOPE: &str = "recorded_at >= ?1 AND rollout_id = ?2";
    c.execute_batch("BEGIN").map_err(query_err)?;
    let result = rollout_snapshot(c, SCOPE, rollout_id, since);
    let _ = c.execute_batch("COMMIT");
    result
}

pub(super) fn scan(
    c: &Connection,
    window: &Window,
    visit: &mut dyn FnMut(DecisionRecord) -> bool,
) -> Result<(), LogError> {
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
}

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

fn json<T: serde::de::DeserializeOwned>(i: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn row_to_record(r: &Row<'_>) -> rusqlite::Result<DecisionRecord> {
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
