//! The query view: the SQLite file reviewers open with any SQLite tool, built from the
//! journal off the request path (issue 16, item 4).
//!
//! Layout 4. The rows live in `decision_rows`, kept narrow because the indexer writes one
//! per decision: ids and hashes as bytes, the time as µs, the model, version, digest,
//! rollout and arm as one small integer into `arms`, the vector as a JSON array of numbers
//! in the order of its bundle's names (`feature_names`), reasons as `[index, contribution]`
//! pairs. The `decisions` view shows the same rows with the columns and text forms of the
//! earlier layouts (features and reasons as JSON objects by name), so reviewers' queries
//! keep working. A record the journal holds in format 1 (migrated, or not canonical) keeps
//! its JSON in `body_json`, which the view and the readers then take as it is.
//!
//! Customers, whose keys arrive in random order, are indexed per span of the log
//! (`seq >> SPAN_BITS`), so that inserts stay in a small, cached subtree; a lookup seeks in
//! each span whose filter ([`super::customer_filter`]) may hold the customer.
//!
//! `prev_hash` is stored only where it is not the hash of the row before (the first row,
//! the first after a retention cut, a broken link): every other row's is that hash.
//!
//! `journal_checkpoint` says which journal record the view holds up to, written in the same
//! transaction as the rows, so that after a crash the indexer resumes exactly after it. The
//! view is a cache of the journal: it is written without fsync (`synchronous = OFF`, and a
//! view a machine crash may have damaged is rebuilt: see "Durability" below), any row it
//! lacks is re-read from the journal on start, and a file of an older layout is dropped and
//! rebuilt. Queries here
//! see only what the view holds; [`super::JournalLog`] adds the tail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, ToSql, params};

use super::blocks;
use super::customer_filter::{self, CustomerFilters};
use super::journal::Position;
use super::journaled::LogFiles;
use super::names::FeatureNames;
use super::record::{self, Fields};
use super::tail::Entry;
use super::{
    ArmSummary, DecisionRecord, LogError, PD_BINS, RecordBody, RecordedReason, RolloutDecisions,
    VersionStats, Window, chain,
};

/// `PRAGMA user_version` of a file in this layout. 0 is the log before the journal (its
/// `decisions` table was the log itself, with `chain_head`), 2 the first view of the journal
/// (one wide `decisions` table), 3 and 4 the narrow rows with per-row indexes by time, arm
/// and decision id, 5 the block summaries without `block_ids`; see [`super::migrate`].
pub const USER_VERSION: i64 = 6;

/// log2 of the seqs per span of the customer index; the schema's index expression
/// (`seq >> 18`) and the lookups' must match it, character for character, for SQLite to use
/// the index.
pub(super) const SPAN_BITS: u32 = 18;

/// A served request id's record: ?1 its key, ?2 the id.
fn by_request_sql() -> String {
    format!("{SELECT} WHERE d.request_key = ?1 AND d.request_id = ?2 AND a.arm != 'shadow' LIMIT 1")
}

/// A customer ref's records in span ?3: ?1 its key, ?2 the ref.
fn by_customer_sql() -> String {
    format!(
        "{SELECT} WHERE (d.seq >> {SPAN_BITS}) = ?3 AND d.customer_key = ?1 \
         AND d.customer_ref = ?2"
    )
}

/// A customer ref's latest served record before ?3 in span ?4: ?1 its key, ?2 the ref.
fn previous_sql() -> String {
    format!(
        "{SELECT} WHERE (d.seq >> {SPAN_BITS}) = ?4 AND d.customer_key = ?1 \
         AND d.customer_ref = ?2 AND d.seq < ?3 AND a.arm != 'shadow' \
         ORDER BY d.seq DESC LIMIT 1"
    )
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS arms (
    id          INTEGER PRIMARY KEY,
    model       TEXT NOT NULL,
    version     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    rollout_id  TEXT,
    arm         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feature_names (
    digest  TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    name    TEXT NOT NULL,
    PRIMARY KEY (digest, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decision_rows (
    seq            INTEGER PRIMARY KEY,
    decision_id    BLOB NOT NULL,
    at             INTEGER NOT NULL,
    request_id     TEXT NOT NULL,
    request_key    INTEGER NOT NULL,
    request_hash   BLOB NOT NULL,
    customer_ref   BLOB NOT NULL,
    customer_key   INTEGER NOT NULL,
    key_id         TEXT NOT NULL,
    arm_id         INTEGER NOT NULL REFERENCES arms(id),
    features       TEXT NOT NULL,
    pd             REAL NOT NULL,
    grade          TEXT NOT NULL,
    decision       TEXT NOT NULL,
    current_limit  INTEGER,
    granted_limit  INTEGER NOT NULL,
    reasons        TEXT NOT NULL,
    caller         TEXT,
    trace_id       BLOB,
    prev_hash      BLOB,
    hash           BLOB NOT NULL,
    body_json      TEXT
);
-- Customers are indexed per span of 2^18 seqs (`seq >> 18`, SPAN_BITS below): their keys
-- arrive in random order, and per span new entries go into the newest span's small subtree,
-- which stays in the page cache, instead of anywhere in one index as large as the log; a
-- lookup probes each span. Request ids keep one index: the writer looks one up on the
-- acknowledgement path (when the Bloom filter says maybe), where one probe must do.
CREATE INDEX IF NOT EXISTS decision_rows_customer_span ON decision_rows(seq >> 18, customer_key);
CREATE INDEX IF NOT EXISTS decision_rows_request ON decision_rows(request_key);
-- Time windows, arms and decision ids are found through per-block summaries (blocks.rs)
-- rather than an index entry per row: a block is 1,024 seqs (`seq >> 10`).
CREATE TABLE IF NOT EXISTS blocks (
    block     INTEGER PRIMARY KEY,
    first_at  INTEGER NOT NULL,
    last_at   INTEGER NOT NULL,
    id_min    INTEGER NOT NULL,
    id_max    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS block_arms (
    arm_id  INTEGER NOT NULL,
    block   INTEGER NOT NULL,
    PRIMARY KEY (arm_id, block)
) WITHOUT ROWID;
-- Blocks by the milliseconds of their v7 decision ids, in buckets of a few widths (the
-- width in the bits above 48), so that a lookup by id reads a handful of summaries.
CREATE TABLE IF NOT EXISTS block_ids (
    bucket  INTEGER NOT NULL,
    block   INTEGER NOT NULL,
    PRIMARY KEY (bucket, block)
) WITHOUT ROWID;
-- Decision ids that are not UUIDv7 (whose time the blocks cannot place): a migrated log's.
CREATE TABLE IF NOT EXISTS other_ids (
    decision_id  NOT NULL PRIMARY KEY,
    seq          INTEGER NOT NULL
) WITHOUT ROWID;
-- Retention deletes from these two by block and by seq, the oldest first; without these
-- indexes it read each table whole on every pass. Added to a layout 6 file as it opens
-- (no new layout: a release that does not know them reads and writes the file the same).
CREATE INDEX IF NOT EXISTS block_ids_block ON block_ids(block);
CREATE INDEX IF NOT EXISTS other_ids_seq ON other_ids(seq);
-- A Bloom filter of the customer keys of each complete span (customer_filter.rs), so that a
-- lookup seeks only in the spans that may hold the customer.
CREATE TABLE IF NOT EXISTS customer_filters (
    span    INTEGER PRIMARY KEY,
    filter  BLOB NOT NULL
);
-- The journal record the view holds up to (seq, and where the journal has it).
CREATE TABLE IF NOT EXISTS journal_checkpoint (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    seq     INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset  INTEGER NOT NULL
);
CREATE VIEW IF NOT EXISTS decisions AS
SELECT
    d.seq AS seq,
    CASE WHEN d.body_json IS NULL THEN lower(
        substr(hex(d.decision_id), 1, 8) || '-' || substr(hex(d.decision_id), 9, 4) || '-' ||
        substr(hex(d.decision_id), 13, 4) || '-' || substr(hex(d.decision_id), 17, 4) || '-' ||
        substr(hex(d.decision_id), 21, 12))
        ELSE json_extract(d.body_json, '$.decision_id') END AS decision_id,
    CASE WHEN d.body_json IS NULL THEN
        strftime('%Y-%m-%dT%H:%M:%S', d.at / 1000000, 'unixepoch') || '.' ||
        printf('%06d', d.at % 1000000) || 'Z'
        ELSE json_extract(d.body_json, '$.recorded_at') END AS recorded_at,
    d.request_id AS request_id,
    CASE WHEN d.body_json IS NULL THEN lower(hex(d.request_hash))
        ELSE json_extract(d.body_json, '$.request_hash') END AS request_hash,
    CASE WHEN d.body_json IS NULL THEN lower(hex(d.customer_ref))
        ELSE json_extract(d.body_json, '$.customer_ref') END AS customer_ref,
    d.key_id AS key_id,
    a.model AS model,
    a.version AS version,
    a.digest AS digest,
    a.rollout_id AS rollout_id,
    a.arm AS arm,
    CASE WHEN d.body_json IS NULL THEN (
        SELECT json_group_object(name, value) FROM (
            SELECT n.name AS name, j.value AS value FROM json_each(d.features) j
            JOIN feature_names n ON n.digest = a.digest AND n.idx = j.key ORDER BY n.name))
        ELSE json_extract(d.body_json, '$.features') END AS features,
    d.pd AS pd,
    d.grade AS grade,
    d.decision AS decision,
    d.current_limit AS current_limit,
    d.granted_limit AS granted_limit,
    CASE WHEN d.body_json IS NULL THEN (
        SELECT json_group_array(json(reason)) FROM (
            SELECT json_object(
                'feature', n.name,
                'contribution', json_extract(r.value, '$[1]'),
                'value', json_extract(d.features, '$[' || json_extract(r.value, '$[0]') || ']'))
                AS reason
            FROM json_each(d.reasons) r
            JOIN feature_names n ON n.digest = a.digest AND n.idx = json_extract(r.value, '$[0]')
            ORDER BY r.key))
        ELSE json_extract(d.body_json, '$.reasons') END AS reasons,
    d.caller AS caller,
    CASE WHEN d.body_json IS NOT NULL THEN json_extract(d.body_json, '$.trace_id')
        WHEN d.trace_id IS NOT NULL THEN lower(hex(d.trace_id)) END AS trace_id,
    CASE WHEN typeof(d.prev_hash) = 'text' THEN d.prev_hash
        ELSE lower(hex(COALESCE(d.prev_hash,
            (SELECT p.hash FROM decision_rows p WHERE p.seq = d.seq - 1)))) END AS prev_hash,
    lower(hex(d.hash)) AS hash,
    -- A remediation's link, the limit it restores from, its reason (kept in its JSON).
    json_extract(d.body_json, '$.remediates') AS remediates,
    json_extract(d.body_json, '$.pre_harm_limit') AS pre_harm_limit,
    json_extract(d.body_json, '$.reason') AS reason
FROM decision_rows d JOIN arms a ON a.id = d.arm_id;
";

/// What the readers select: the row, its arm, and the hash of the row before.
const SELECT: &str = "SELECT d.seq, d.decision_id, d.at, d.request_id, d.request_hash, \
    d.customer_ref, d.key_id, a.model, a.version, a.digest, a.rollout_id, a.arm, d.features, \
    d.pd, d.grade, d.decision, d.current_limit, d.granted_limit, d.reasons, d.caller, \
    d.trace_id, COALESCE(d.prev_hash, (SELECT p.hash FROM decision_rows p WHERE p.seq = d.seq - 1)), \
    d.hash, d.body_json FROM decision_rows d JOIN arms a ON a.id = d.arm_id";

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
    // temp_store = MEMORY: statement journals stay off the disk. A larger checkpoint
    // interval checkpoints each index page once per many batches rather than once per batch.
    // synchronous = OFF: see "Durability" below.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA busy_timeout = 5000; \
         PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY; \
         PRAGMA wal_autocheckpoint = 16384;",
    )
    .map_err(|e| LogError::Unavailable(format!("configuring {}: {e}", path.display())))?;
    Ok(conn)
}

// Durability. The view is written without any fsync (`synchronous = OFF`): a checkpoint's
// flush of tens of MB queued in front of the journal's fdatasync and put 40-55 ms stalls
// into p99.9 (BENCHMARKS.md). A crash of the process loses nothing (the kernel holds every
// write); a crash of the machine can leave the file damaged, not just behind. So while the
// view has writes no fsync covered, `decisions.db.unsynced` holds the boot id they were
// made under: a start that finds it with another boot id removes the view, and the journal
// rebuilds it. A clean close syncs the view and removes the mark. Nothing else lives in
// this file (the rollout store has its own), so nothing is lost with it.

/// This boot's id (Linux); None where the system has none, which counts as another boot.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// An SQLite database at `path` and the files beside it: the database, its WAL, its
/// shared-memory index.
pub(super) fn sqlite_files(path: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|suffix| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    })
}

/// Removes the view if it had unsynced writes when the machine last went down.
pub(super) fn distrust_after_reboot(files: &LogFiles) -> Result<(), LogError> {
    let marked = match std::fs::read_to_string(&files.view_unsynced) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unsynced_err(&files.view_unsynced, e)),
    };
    if boot_id().is_some_and(|now| now == marked) {
        return Ok(());
    }
    tracing::warn!(
        view = %files.view.display(),
        "the machine went down while the query view had unsynced writes; rebuilding it from the journal"
    );
    for path in sqlite_files(&files.view) {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unsynced_err(&path, e)),
        }
    }
    sync_parent(&files.view)?;
    std::fs::remove_file(&files.view_unsynced)
        .map_err(|e| unsynced_err(&files.view_unsynced, e))?;
    sync_parent(&files.view_unsynced)
}

/// Marks the view as written without fsync under this boot (durably, before any write).
pub(super) fn mark_unsynced(files: &LogFiles) -> Result<(), LogError> {
    let path = &files.view_unsynced;
    let tmp = path.with_extension("unsynced.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, boot_id().unwrap_or_default().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| unsynced_err(path, e))?;
    sync_parent(path)
}

/// fsyncs the view's files and removes the mark. Only when nothing writes the view.
pub(super) fn sync_and_unmark(files: &LogFiles) -> Result<(), LogError> {
    // The database and its WAL (the shared-memory index holds nothing durable).
    for path in &sqlite_files(&files.view)[..2] {
        match std::fs::File::open(path) {
            Ok(f) => f.sync_all().map_err(|e| unsynced_err(path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unsynced_err(path, e)),
        }
    }
    std::fs::remove_file(&files.view_unsynced)
        .map_err(|e| unsynced_err(&files.view_unsynced, e))?;
    sync_parent(&files.view_unsynced)
}

/// fsyncs the directory holding `path` (a rename or removal in it made durable).
pub(super) fn sync_parent(path: &Path) -> Result<(), LogError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| unsynced_err(dir, e))
}

fn unsynced_err(path: &Path, e: std::io::Error) -> LogError {
    LogError::Unavailable(format!("{}: {e}", path.display()))
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

/// A text field as the view stores it: its bytes when it is the canonical text of `N`
/// bytes (lowercase hex, or a lowercase hyphenated UUID when `N` is 16), the text itself
/// otherwise. The same text always gives the same value and different texts different
/// values, so lookups convert their argument the same way.
pub(super) enum Key<'a> {
    Bytes(Vec<u8>),
    /// Bytes already at hand (a binary record's).
    Slice(&'a [u8]),
    Text(&'a str),
}

impl<'a> Key<'a> {
    pub fn hex<const N: usize>(s: &'a str) -> Key<'a> {
        let mut out = [0u8; N];
        if s.len() == 2 * N
            && !s.bytes().any(|b| b.is_ascii_uppercase())
            && hex::decode_to_slice(s, &mut out).is_ok()
        {
            Key::Bytes(out.to_vec())
        } else {
            Key::Text(s)
        }
    }

    pub fn uuid(s: &'a str) -> Key<'a> {
        match uuid::Uuid::parse_str(s) {
            Ok(id) if id.hyphenated().to_string() == s => Key::Bytes(id.as_bytes().to_vec()),
            _ => Key::Text(s),
        }
    }

    /// The milliseconds of a decision id stored as these bytes, if it is a UUIDv7: whether
    /// the block summaries find it, or `other_ids` (see [`super::blocks`]).
    pub fn millis(&self) -> Option<i64> {
        match self {
            Key::Bytes(b) => blocks::v7_millis(b),
            Key::Slice(b) => blocks::v7_millis(b),
            Key::Text(_) => None,
        }
    }
}

impl ToSql for Key<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Key::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Key::Slice(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Key::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// The text a [`Key`] was made from.
fn key_text(v: ValueRef<'_>, uuid: bool) -> rusqlite::Result<String> {
    match v {
        ValueRef::Blob(b) if uuid => uuid::Uuid::from_slice(b)
            .map(|u| u.to_string())
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, v.data_type(), Box::new(e))),
        ValueRef::Blob(b) => {
            // encode_to_slice: `hex::encode` collects chars one by one, a few % of a lookup.
            let mut text = vec![0; b.len() * 2];
            hex::encode_to_slice(b, &mut text).expect("twice the bytes");
            Ok(String::from_utf8(text).expect("hex digits are ASCII"))
        }
        ValueRef::Text(t) => Ok(String::from_utf8_lossy(t).into_owned()),
        other => Err(rusqlite::Error::InvalidColumnType(
            0,
            "key".into(),
            other.data_type(),
        )),
    }
}

/// The index key of a request id or customer ref: FNV-1a of its text, 64 bits. An integer
/// key makes a far smaller and cheaper index than the text or its bytes; stable across
/// releases (it is stored), and a collision only costs a comparison.
pub(super) fn text_key(text: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// µs since the epoch of an RFC 3339 time (as the log writes it, or a window bound).
pub(super) fn micros_of(t: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(t).ok()?;
    i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
}

fn rfc3339_micros(us: i64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us.max(0) as u64))
        .to_string()
}

/// A JSON array of numbers, each as ryu writes it (its shortest round-trip form).
fn json_numbers(out: &mut String, values: impl Iterator<Item = f64>) {
    out.push('[');
    let mut buf = ryu::Buffer::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // A missing value (NaN, for a feature that allows it) is JSON's null.
        if v.is_nan() {
            out.push_str("null");
        } else {
            push_number(out, v, &mut buf);
        }
    }
    out.push(']');
}

/// One finite number as ryu writes it. An integral value below 1e15 in
/// magnitude (most of a credit vector: amounts, counts, months late) goes through its
/// integer, which gives ryu's text ("20000.0") several times faster than ryu's search for
/// the shortest digits; ryu took a quarter of the indexer's time. The ".0" stays although
/// it costs two bytes a value: without it SQLite reads the value as an INTEGER, and a
/// reviewer's `json_extract(features, '$[0]') / json_extract(features, '$[1]')` would
/// divide as integers.
fn push_number(out: &mut String, v: f64, buf: &mut ryu::Buffer) {
    if v.fract() != 0.0 || v.abs() >= 1e15 || (v == 0.0 && v.is_sign_negative()) {
        out.push_str(buf.format(v));
        return;
    }
    let mut digits = [0u8; 20];
    let mut n = (v as i64).unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0.0 {
        out.push('-');
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
    out.push_str(".0");
}

/// The FNV-1a key ([`text_key`]) of the lowercase hex text of `bytes`, without the text.
fn hex_text_key(bytes: &[u8]) -> i64 {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        for d in [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]] {
            h ^= u64::from(d);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h as i64
}

/// model, version, digest, rollout id, arm: what an `arms` row stands for.
type ArmKey = (String, String, String, Option<String>, String);

/// The same for a binary record, as its bytes say it.
type CompactArmKey = (String, String, [u8; 32], Option<[u8; 16]>, u8);

/// The indexer's side of the view: writes batches of journal records as rows.
pub(super) struct ViewWriter {
    conn: Connection,
    names: Arc<FeatureNames>,
    /// `arms.id` by (model, version, digest, rollout_id, arm).
    arms: Vec<(ArmKey, i64)>,
    /// `arms.id` of binary records, by their bytes.
    compact_arms: Vec<(CompactArmKey, i64)>,
    /// Digests whose names `feature_names` holds.
    named: std::collections::HashSet<String>,
    /// The view's last row: its seq and hash, so a row whose prev_hash is that hash need
    /// not store it.
    last: Option<(i64, Option<[u8; 32]>)>,
    /// The customer filters of complete spans, and the complete spans that have none yet.
    filters: Arc<CustomerFilters>,
    unfiltered: customer_filter::Pending,
}

impl ViewWriter {
    pub fn new(
        conn: Connection,
        names: Arc<FeatureNames>,
        filters: Arc<CustomerFilters>,
    ) -> Result<ViewWriter, LogError> {
        let last = conn
            .query_row(
                "SELECT seq, hash FROM decision_rows ORDER BY seq DESC LIMIT 1",
                [],
                |r| {
                    let hash = r.get_ref(1)?.as_blob().ok().and_then(|b| b.try_into().ok());
                    Ok((r.get(0)?, hash))
                },
            )
            .optional()
            .map_err(query_err)?;
        let unfiltered = customer_filter::load(&conn, &filters)?;
        Ok(ViewWriter {
            conn,
            names,
            arms: Vec::new(),
            compact_arms: Vec::new(),
            named: std::collections::HashSet::new(),
            last,
            filters,
            unfiltered,
        })
    }

    /// The connection, for reads while the log opens.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The arm row of `key`, added (with its bundle's names) if new.
    fn arm_id(
        tx: &rusqlite::Transaction<'_>,
        names: &FeatureNames,
        named: &mut std::collections::HashSet<String>,
        arms: &mut Vec<(ArmKey, i64)>,
        key: (&str, &str, &str, Option<&str>, &str),
    ) -> Result<i64, LogError> {
        let (model, version, digest, rollout_id, arm) = key;
        // A handful of arms exist at a time: a scan compares in place, where a map lookup
        // would first clone five strings per row.
        if let Some((_, id)) = arms.iter().find(|(k, _)| {
            k.0 == model
                && k.1 == version
                && k.2 == digest
                && k.3.as_deref() == rollout_id
                && k.4 == arm
        }) {
            return Ok(*id);
        }
        let found: Option<i64> = tx
            .query_row(
                "SELECT id FROM arms WHERE model = ?1 AND version = ?2 AND digest = ?3 \
                 AND rollout_id IS ?4 AND arm = ?5",
                params![model, version, digest, rollout_id, arm],
                |r| r.get(0),
            )
            .optional()
            .map_err(query_err)?;
        let id = match found {
            Some(id) => id,
            None => {
                tx.execute(
                    "INSERT INTO arms (model, version, digest, rollout_id, arm) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![model, version, digest, rollout_id, arm],
                )
                .map_err(query_err)?;
                tx.last_insert_rowid()
            }
        };
        if !named.contains(digest) {
            if let Some(list) = names.get(digest) {
                let mut put = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO feature_names (digest, idx, name) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(query_err)?;
                for (i, n) in list.iter().enumerate() {
                    put.execute(params![digest, i as i64, n])
                        .map_err(query_err)?;
                }
            }
            named.insert(digest.to_string());
        }
        let key = (
            model.to_string(),
            version.to_string(),
            digest.to_string(),
            rollout_id.map(str::to_string),
            arm.to_string(),
        );
        arms.push((key, id));
        Ok(id)
    }

    /// The arm row of a binary record.
    fn compact_arm_id(
        tx: &rusqlite::Transaction<'_>,
        names: &FeatureNames,
        named: &mut std::collections::HashSet<String>,
        arms: &mut Vec<(ArmKey, i64)>,
        compact_arms: &mut Vec<(CompactArmKey, i64)>,
        f: &Fields<'_>,
    ) -> Result<i64, LogError> {
        if let Some((_, id)) = compact_arms.iter().find(|(k, _)| {
            k.0 == f.model
                && k.1 == f.version
                && k.2 == *f.digest
                && k.3.as_ref() == f.rollout_id
                && k.4 == f.arm
        }) {
            return Ok(*id);
        }
        let rollout = f
            .rollout_id
            .map(|id| uuid::Uuid::from_bytes(*id).to_string());
        let id = Self::arm_id(
            tx,
            names,
            named,
            arms,
            (
                f.model,
                f.version,
                &f.digest_text(),
                rollout.as_deref(),
                record::ARMS[usize::from(f.arm)],
            ),
        )?;
        let key = (
            f.model.to_string(),
            f.version.to_string(),
            *f.digest,
            f.rollout_id.copied(),
            f.arm,
        );
        compact_arms.push((key, id));
        Ok(id)
    }

    /// Writes a batch of records and the new checkpoint in one transaction, then the
    /// customer filter of one complete span that lacks it, if any.
    pub fn insert(&mut self, batch: &[Arc<Entry>]) -> Result<(), LogError> {
        let written = self.insert_batch(batch);
        if written.is_err() {
            // The transaction rolled back, and with it any arm or names it added: forget
            // what was learnt in it, or later rows would point at arms that do not exist.
            self.arms.clear();
            self.compact_arms.clear();
            self.named.clear();
            return written;
        }
        if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
            self.unfiltered.note(first.seq(), last.seq());
        }
        self.build_filter();
        Ok(())
    }

    /// Builds the customer filter of one complete span that lacks it. False if none lacks
    /// one, or building failed: a span without its filter is searched by every lookup, which
    /// is slower, not wrong, so a failure is logged and retried later.
    pub fn build_filter(&mut self) -> bool {
        if self.unfiltered.is_empty() {
            return false;
        }
        match customer_filter::build_one(&self.conn, &self.filters, &mut self.unfiltered) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not build a customer filter; trying again later");
                false
            }
        }
    }

    fn insert_batch(&mut self, batch: &[Arc<Entry>]) -> Result<(), LogError> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(query_err)?;
        let mut prev_row = self.last;
        let mut summaries = blocks::Summaries::default();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO decision_rows (seq, decision_id, at, request_id, request_key, \
                     request_hash, customer_ref, customer_key, key_id, arm_id, features, pd, grade, \
                     decision, current_limit, granted_limit, reasons, caller, trace_id, prev_hash, \
                     hash, body_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
                     ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
                )
                .map_err(query_err)?;
            let mut features = String::with_capacity(512);
            let mut reasons = String::with_capacity(256);
            for e in batch {
                let seq = e.seq();
                let hash = e.hash();
                let prev = e.prev_hash();
                // Stored only where the row before does not say it.
                let prev_is_row_before = matches!(
                    &prev_row,
                    Some((s, Some(h))) if *s == seq - 1 && h == prev
                );
                // Genesis is stored as the text the chain hashes.
                let prev = if prev.iter().all(|&b| b == 0) {
                    Key::Text(chain::GENESIS)
                } else {
                    Key::Slice(prev)
                };
                match e.fields() {
                    Some(f) => {
                        let arm = Self::compact_arm_id(
                            &tx,
                            &self.names,
                            &mut self.named,
                            &mut self.arms,
                            &mut self.compact_arms,
                            &f,
                        )?;
                        features.clear();
                        json_numbers(&mut features, f.features());
                        reasons.clear();
                        reasons.push('[');
                        let mut buf = ryu::Buffer::new();
                        use std::fmt::Write as _;
                        for (i, (idx, contribution)) in f.reasons().enumerate() {
                            if i > 0 {
                                reasons.push(',');
                            }
                            let _ = write!(reasons, "[{idx},{}", buf.format(contribution));
                            reasons.push(']');
                        }
                        reasons.push(']');
                        let millis = blocks::v7_millis(&f.decision_id[..]);
                        if millis.is_none() {
                            blocks::note_other_id(&tx, &&f.decision_id[..], seq)?;
                        }
                        summaries.note(seq, f.recorded_at, millis, arm);
                        insert
                            .execute(params![
                                seq,
                                &f.decision_id[..],
                                f.recorded_at,
                                f.request_id,
                                text_key(f.request_id),
                                &f.request_hash[..],
                                &f.customer_ref[..],
                                hex_text_key(f.customer_ref),
                                f.key_id,
                                arm,
                                features,
                                f.probability_of_default,
                                f.grade,
                                record::DECISIONS[usize::from(f.decision)],
                                f.current_limit,
                                f.granted_limit,
                                reasons,
                                f.caller,
                                f.trace_id.map(|t| &t[..]),
                                (!prev_is_row_before).then_some(prev),
                                &hash[..],
                                None::<&str>,
                            ])
                            .map_err(query_err)?;
                    }
                    None => {
                        // Format 1: the record keeps its JSON, and the columns their text.
                        let r = e.decode(&self.names)?;
                        let b = &r.body;
                        let arm = Self::arm_id(
                            &tx,
                            &self.names,
                            &mut self.named,
                            &mut self.arms,
                            (
                                &b.model,
                                &b.version,
                                &b.digest,
                                b.rollout_id.as_deref(),
                                &b.arm,
                            ),
                        )?;
                        let body_json =
                            serde_json::to_string(b).expect("a record body always serialises");
                        let id = Key::uuid(&b.decision_id);
                        let millis = id.millis();
                        if millis.is_none() {
                            blocks::note_other_id(&tx, &id, seq)?;
                        }
                        let at = micros_of(&b.recorded_at).unwrap_or(0);
                        summaries.note(seq, at, millis, arm);
                        insert
                            .execute(params![
                                seq,
                                id,
                                at,
                                b.request_id,
                                text_key(&b.request_id),
                                Key::hex::<32>(&b.request_hash),
                                Key::hex::<32>(&b.customer_ref),
                                text_key(&b.customer_ref),
                                b.key_id,
                                arm,
                                "[]",
                                b.probability_of_default,
                                b.grade,
                                b.decision,
                                b.current_limit,
                                b.granted_limit,
                                "[]",
                                b.caller,
                                b.trace_id.as_deref().map(Key::hex::<16>),
                                (!prev_is_row_before).then_some(prev),
                                &hash[..],
                                body_json,
                            ])
                            .map_err(query_err)?;
                    }
                }
                prev_row = Some((seq, Some(*hash)));
            }
        }
        summaries.write(&tx)?;
        set_checkpoint(&tx, last.position)?;
        tx.commit().map_err(query_err)?;
        self.last = prev_row;
        Ok(())
    }
}

fn select_one(
    c: &Connection,
    names: &FeatureNames,
    filter: &str,
    p: impl rusqlite::Params,
) -> Result<Option<DecisionRecord>, LogError> {
    c.prepare_cached(&format!("{SELECT} WHERE {filter}"))
        .map_err(query_err)?
        .query_row(p, |r| row_to_record(r, names))
        .optional()
        .map_err(query_err)
}

pub(super) fn get(
    c: &Connection,
    names: &FeatureNames,
    decision_id: &str,
) -> Result<Option<DecisionRecord>, LogError> {
    let id = Key::uuid(decision_id);
    let Some(millis) = id.millis() else {
        return select_one(
            c,
            names,
            "d.seq = (SELECT seq FROM other_ids WHERE decision_id = ?1)",
            [id],
        );
    };
    for b in blocks::of_id(c, millis)? {
        let found = select_one(
            c,
            names,
            "d.seq >= ?2 AND d.seq <= ?3 AND d.decision_id = ?1",
            params![id, blocks::first_seq(b), blocks::last_seq(b)],
        )?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The served record of a request id.
pub(super) fn by_request(
    c: &Connection,
    names: &FeatureNames,
    request_id: &str,
) -> Result<Option<DecisionRecord>, LogError> {
    c.prepare_cached(&by_request_sql())
        .map_err(query_err)?
        .query_row(params![text_key(request_id), request_id], |r| {
            row_to_record(r, names)
        })
        .optional()
        .map_err(query_err)
}

/// Every served request id, for the writer's filter.
pub(super) fn each_request_id(c: &Connection, mut each: impl FnMut(&str)) -> Result<(), LogError> {
    let mut stmt = c
        .prepare(
            "SELECT d.request_id FROM decision_rows d JOIN arms a ON a.id = d.arm_id \
             WHERE a.arm != 'shadow'",
        )
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

/// The time (µs) and hash of the record `seq`, if the view holds it.
pub(super) fn time_and_hash(c: &Connection, seq: i64) -> Result<Option<(i64, String)>, LogError> {
    c.prepare_cached("SELECT at, hash FROM decision_rows WHERE seq = ?1")
        .map_err(query_err)?
        .query_row([seq], |r| Ok((r.get(0)?, key_text(r.get_ref(1)?, false)?)))
        .optional()
        .map_err(query_err)
}

/// Deletes the rows through `seq` (retention), a few thousand per transaction so that the
/// indexer is never held up for long. Returns how many went.
pub(super) fn delete_through(c: &Connection, seq: i64) -> Result<usize, LogError> {
    // The first row kept says its prev_hash itself once the row before it is gone; rows go
    // newest first, so every row kept meanwhile still has the one before it.
    c.execute(
        "UPDATE decision_rows SET prev_hash = (SELECT hash FROM decision_rows WHERE seq = ?1) \
         WHERE seq = ?1 + 1 AND prev_hash IS NULL",
        [seq],
    )
    .map_err(query_err)?;
    let mut deleted = 0;
    loop {
        let n = c
            .prepare_cached(
                "DELETE FROM decision_rows WHERE seq IN \
                 (SELECT seq FROM decision_rows WHERE seq <= ?1 ORDER BY seq DESC LIMIT 5000)",
            )
            .map_err(query_err)?
            .execute([seq])
            .map_err(query_err)?;
        if n == 0 {
            blocks::delete_through(c, seq)?;
            return Ok(deleted);
        }
        deleted += n;
    }
}

/// The seq of the record with `hash`, for classifying a broken link (a full scan: rare).
pub(super) fn seq_of_hash(c: &Connection, hash: &str) -> Option<i64> {
    c.prepare_cached("SELECT seq FROM decision_rows WHERE hash = ?1 LIMIT 1")
        .ok()?
        .query_row([Key::hex::<32>(hash)], |r| r.get(0))
        .optional()
        .ok()
        .flatten()
}

pub(super) fn by_customer(
    c: &Connection,
    names: &FeatureNames,
    filters: &CustomerFilters,
    refs: &[String],
) -> Result<Vec<DecisionRecord>, LogError> {
    let mut out = Vec::new();
    let Some((first, last)) = customer_filter::span_range(c)? else {
        return Ok(out);
    };
    let mut stmt = c.prepare_cached(&by_customer_sql()).map_err(query_err)?;
    for r in refs {
        // Converted once per ref, not once per span sought.
        let (key, bytes) = (text_key(r), Key::hex::<32>(r));
        for span in (first..=last).filter(|s| filters.may_hold(*s, key)) {
            let rows = stmt
                .query_map(params![key, bytes, span], |row| row_to_record(row, names))
                .map_err(query_err)?;
            for row in rows {
                out.push(row.map_err(query_err)?);
            }
        }
    }
    out.sort_by_key(|r| r.seq);
    Ok(out)
}

pub(super) fn previous(
    c: &Connection,
    names: &FeatureNames,
    filters: &CustomerFilters,
    refs: &[String],
    seq: i64,
) -> Result<Option<DecisionRecord>, LogError> {
    let Some((first, last)) = customer_filter::span_range(c)? else {
        return Ok(None);
    };
    let mut stmt = c.prepare_cached(&previous_sql()).map_err(query_err)?;
    // Each ref's index key and stored form, converted once rather than once per span.
    let keys: Vec<(i64, Key<'_>)> = refs
        .iter()
        .map(|r| (text_key(r), Key::hex::<32>(r)))
        .collect();
    // Span by span from the one `seq` is in, newest first: the first span that has one of
    // the customer's records has the latest.
    let from = ((seq - 1).max(0) >> SPAN_BITS).min(last);
    for span in (first..=from).rev() {
        let mut best: Option<DecisionRecord> = None;
        for (key, bytes) in &keys {
            if !filters.may_hold(span, *key) {
                continue;
            }
            let found = stmt
                .query_row(params![key, bytes, seq, span], |row| {
                    row_to_record(row, names)
                })
                .optional()
                .map_err(query_err)?;
            if let Some(f) = found
                && best.as_ref().is_none_or(|b| f.seq > b.seq)
            {
                best = Some(f);
            }
        }
        if best.is_some() {
            return Ok(best);
        }
    }
    Ok(None)
}

/// A window's bounds in µs (inclusive, exclusive).
pub(super) fn bounds(w: &Window) -> Result<(i64, i64), LogError> {
    let bound = |s: &Option<String>, open: i64| match s {
        None => Ok(open),
        Some(t) => {
            micros_of(t).ok_or_else(|| LogError::Query(format!("not an RFC 3339 time: {t}")))
        }
    };
    Ok((bound(&w.since, i64::MIN)?, bound(&w.until, i64::MAX)?))
}

/// A version's served decisions in a window: ?1 model, ?2 version, ?3 since, ?4 until (µs).
fn version_stats_sql() -> String {
    let (with, from) = blocks::by_arms(
        "SELECT id FROM arms WHERE model = ?1 AND version = ?2 AND arm != 'shadow'",
        "?3",
        "?4",
    );
    format!("{with} SELECT {STATS} {from}")
}

pub(super) fn version_stats(
    c: &Connection,
    model: &str,
    version: &str,
    window: &Window,
) -> Result<VersionStats, LogError> {
    let (since, until) = bounds(window)?;
    c.query_row(
        &version_stats_sql(),
        params![model, version, since, until],
        |r| stats_from_row(r, 0),
    )
    .map_err(query_err)
}

pub(super) fn rollout_decisions(
    c: &Connection,
    rollout_id: &str,
    since: &str,
) -> Result<RolloutDecisions, LogError> {
    let since = micros_of(since)
        .ok_or_else(|| LogError::Query(format!("not an RFC 3339 time: {since}")))?;
    c.execute_batch("BEGIN").map_err(query_err)?;
    let result = rollout_snapshot(c, rollout_id, since);
    let _ = c.execute_batch("COMMIT");
    result
}

pub(super) fn scan(
    c: &Connection,
    names: &FeatureNames,
    window: &Window,
    visit: &mut dyn FnMut(DecisionRecord) -> bool,
) -> Result<(), LogError> {
    let (since, until) = bounds(window)?;
    let mut stmt = c
        .prepare(&format!(
            "{SELECT} WHERE d.seq >= ?1 AND d.seq <= ?2 AND d.at >= ?3 AND d.at < ?4 \
             ORDER BY d.seq"
        ))
        .map_err(query_err)?;
    for (first, last) in blocks::in_window(c, since, until)? {
        let rows = stmt
            .query_map(params![first, last, since, until], |r| {
                row_to_record(r, names)
            })
            .map_err(query_err)?;
        for row in rows {
            if !visit(row.map_err(query_err)?) {
                return Ok(());
            }
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
    rollout_id: &str,
    since: i64,
) -> Result<RolloutDecisions, LogError> {
    // Every query reads the rollout's arms from its start on.
    let (with, scope) = blocks::by_arms(
        "SELECT id FROM arms WHERE rollout_id = ?2",
        "?1",
        &i64::MAX.to_string(),
    );
    let mut out = RolloutDecisions::default();
    let mut stmt = c
        .prepare(&format!(
            "{with} SELECT a.arm, {STATS} {scope} GROUP BY a.arm"
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
    out.sort_arms();

    let mut stmt = c
        .prepare(&format!(
            "{with} SELECT a.arm, MIN(MAX(CAST(d.pd * {PD_BINS} AS INTEGER), 0), {last}), \
             COUNT(*) {scope} GROUP BY 1, 2",
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

    let span: Option<(i64, i64)> = c
        .query_row(
            &format!("{with} SELECT MIN(d.at), MAX(d.at) {scope}"),
            params![since, rollout_id],
            |r| Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?)),
        )
        .map_err(query_err)?;
    let Some((first, last)) = span else {
        return Ok(out);
    };
    let stretch = out.choose_stretch(first, last);
    let mut stmt = c
        .prepare(&format!(
            "{with} SELECT d.at / ?3, a.arm, COUNT(*) {scope} GROUP BY 1, 2 ORDER BY 1"
        ))
        .map_err(query_err)?;
    let rows = stmt
        .query_map(
            params![since, rollout_id, stretch as i64 * 1_000_000],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .map_err(query_err)?;
    for row in rows {
        let (bucket, arm, n) = row.map_err(query_err)?;
        out.add_traffic(bucket, &arm, n as u64);
    }
    Ok(out)
}

fn conversion(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

/// A row of [`SELECT`] as the record it holds.
fn row_to_record(r: &Row<'_>, names: &FeatureNames) -> rusqlite::Result<DecisionRecord> {
    let seq: i64 = r.get(0)?;
    let prev_hash = match r.get_ref(21)? {
        ValueRef::Null => super::chain::GENESIS.to_string(),
        v => key_text(v, false)?,
    };
    let hash = key_text(r.get_ref(22)?, false)?;
    if let Some(json) = r.get_ref(23)?.as_str_or_null()? {
        return Ok(DecisionRecord {
            seq,
            body: serde_json::from_str(json).map_err(|e| conversion(23, e))?,
            prev_hash,
            hash,
            replica: None,
        });
    }
    let digest: String = r.get(9)?;
    let schema = names.get(&digest).ok_or_else(|| {
        conversion(
            9,
            std::io::Error::other(format!("no feature names are stored for {digest}")),
        )
    })?;
    let x: Vec<Option<f64>> =
        serde_json::from_str(r.get_ref(12)?.as_str()?).map_err(|e| conversion(12, e))?;
    let x: Vec<f64> = x.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    if x.len() != schema.len() {
        return Err(conversion(
            12,
            std::io::Error::other(format!(
                "{} features, the bundle has {}",
                x.len(),
                schema.len()
            )),
        ));
    }
    let pairs: Vec<(usize, f64)> =
        serde_json::from_str(r.get_ref(18)?.as_str()?).map_err(|e| conversion(18, e))?;
    let reasons = pairs
        .into_iter()
        .map(|(i, contribution)| {
            let feature = schema.get(i).ok_or_else(|| {
                conversion(18, std::io::Error::other(format!("feature index {i}")))
            })?;
            Ok(RecordedReason {
                feature: feature.clone(),
                contribution,
                value: x[i],
            })
        })
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let trace_id = match r.get_ref(20)? {
        ValueRef::Null => None,
        v => Some(key_text(v, false)?),
    };
    Ok(DecisionRecord {
        seq,
        body: RecordBody {
            decision_id: key_text(r.get_ref(1)?, true)?,
            recorded_at: rfc3339_micros(r.get(2)?),
            request_id: r.get(3)?,
            request_hash: key_text(r.get_ref(4)?, false)?,
            customer_ref: key_text(r.get_ref(5)?, false)?,
            key_id: r.get(6)?,
            model: r.get(7)?,
            version: r.get(8)?,
            digest,
            rollout_id: r.get(10)?,
            arm: r.get(11)?,
            features: schema.iter().cloned().zip(x).collect(),
            probability_of_default: r.get(13)?,
            grade: r.get(14)?,
            decision: r.get(15)?,
            current_limit: r.get(16)?,
            granted_limit: r.get(17)?,
            reasons,
            caller: r.get(19)?,
            trace_id,
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        },
        prev_hash,
        hash,
        replica: None,
    })
}

#[cfg(test)]
mod tests_support {
    pub(super) use super::*;
    pub(super) use crate::decision_log::record::tests::{body, schema};

    pub(super) struct Fixture {
        pub _dir: tempfile::TempDir,
        pub path: std::path::PathBuf,
        pub names: Arc<FeatureNames>,
    }

    pub(super) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.db");
        let conn = open_rw(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let names = Arc::new(FeatureNames::open(&dir.path().join("names")).unwrap());
        Fixture {
            _dir: dir,
            path,
            names,
        }
    }

    /// The journal entry of `body` at `seq` after `prev` (a hash, or genesis), with the
    /// hash `{seq:064x}`: binary if `compact` (its names stored), else its JSON; and the
    /// record a reader must get back.
    pub(super) fn entry(
        names: &FeatureNames,
        seq: i64,
        body: RecordBody,
        prev: &str,
        compact: bool,
    ) -> (Arc<Entry>, DecisionRecord) {
        let hash = format!("{seq:064x}");
        let mut hash_bytes = [0u8; 32];
        hex::decode_to_slice(&hash, &mut hash_bytes).unwrap();
        let bytes = if compact {
            record::encode(&body, &names.get(&body.digest).unwrap()).unwrap()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let entry = Entry::new(
            Position {
                seq: seq as u64,
                segment: 1,
                offset: 64 * seq as u64,
            },
            record::encode_entry(prev, &hash_bytes, &bytes),
            (body.arm != "shadow").then(|| body.request_id.clone()),
        );
        let record = DecisionRecord {
            seq,
            body,
            prev_hash: prev.to_string(),
            hash,
            replica: None,
        };
        (Arc::new(entry), record)
    }

    /// Records of every shape the journal holds: compact ones, one kept as JSON because its
    /// text is not canonical, one after a broken link, one without optional fields; their
    /// entries and what readers must get back.
    pub(super) fn records(names: &FeatureNames) -> (Vec<Arc<Entry>>, Vec<DecisionRecord>) {
        let schema = schema();
        let mut sorted = schema.clone();
        sorted.sort();
        let mut b = body(&schema);
        // Reasons keep their order (by weight), which is not the order of their names.
        b.reasons.reverse();
        names.ensure(&b.digest, sorted).unwrap();
        let bare = RecordBody {
            rollout_id: None,
            current_limit: None,
            caller: None,
            trace_id: None,
            reasons: Vec::new(),
            arm: "champion".into(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            ..b.clone()
        };
        let odd = RecordBody {
            customer_ref: "0F".repeat(32),
            recorded_at: "2026-12-02T10:00:00.5Z".into(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            ..b.clone()
        };
        let later = RecordBody {
            decision_id: uuid::Uuid::now_v7().to_string(),
            request_id: "req-000124".into(),
            ..b.clone()
        };
        [
            entry(names, 1, b, crate::decision_log::chain::GENESIS, true),
            entry(names, 2, bare, &format!("{:064x}", 1), true),
            entry(names, 3, odd, &format!("{:064x}", 2), false),
            entry(names, 4, later, &"ee".repeat(32), true),
        ]
        .into_iter()
        .unzip()
    }

    /// `n` compact records of one bundle, distinct ids and request ids, of `customers`
    /// customers in turn.
    pub(super) fn many_of(names: &FeatureNames, n: usize, customers: i64) -> Vec<Arc<Entry>> {
        let first = records(names).1.remove(0);
        (1..=n as i64)
            .map(|seq| {
                let mut b = first.body.clone();
                b.decision_id = uuid::Uuid::now_v7().to_string();
                b.request_id = format!("req-{seq}");
                b.recorded_at = rfc3339_micros(1_800_000_000_000_000 + seq * 150);
                b.customer_ref = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                    (seq % customers).to_le_bytes(),
                ));
                let prev = if seq == 1 {
                    crate::decision_log::chain::GENESIS.to_string()
                } else {
                    format!("{:064x}", seq - 1)
                };
                entry(names, seq, b, &prev, true).0
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use crate::decision_log::migrate;

    #[test]
    fn numbers_and_keys_are_written_as_the_general_forms_write_them() {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            20_000.0,
            -2.0,
            1e14,
            999_999_999_999_999.0,
            1e15,
            -1e15,
            1e16,
            1e300,
            5e-324,
            f64::MAX,
            f64::MIN,
            123.456,
            -0.1,
        ];
        let mut x = 1.0f64;
        for _ in 0..200 {
            x = x * 3.7 + 1.0;
            values.extend([x.floor(), -x.floor(), x, x.trunc() / 8.0]);
        }
        let mut buf = ryu::Buffer::new();
        for v in values {
            let mut out = String::new();
            push_number(&mut out, v, &mut buf);
            assert_eq!(out, ryu::Buffer::new().format(v), "{v:e}");
            // JSON that reads back as the same number.
            let back: f64 = serde_json::from_str(&out).unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v:e}");
        }
        // A REAL to SQLite, never an INTEGER: reviewers' arithmetic on the JSON stays real.
        for (v, text) in [
            (20000.0, "20000.0"),
            (-3.0, "-3.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.35, "0.35"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e16"),
        ] {
            let mut out = String::new();
            push_number(&mut out, v, &mut buf);
            assert_eq!(out, text);
        }
        for n in [0usize, 1, 16, 32] {
            let bytes: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(hex_text_key(&bytes), text_key(&hex::encode(&bytes)));
        }
    }

    #[test]
    fn lookups_find_records_in_every_span_of_the_log() {
        // The schema's index expressions are the ones the lookups use.
        let f = fixture();
        // Each lookup searches its index; none scans the rows.
        let plan = |sql: String, index: &str| {
            let c = open_ro(&f.path).unwrap();
            let mut s = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let n = s.parameter_count();
            let steps: Vec<String> = s
                .query_map(rusqlite::params_from_iter(vec![1i64; n]), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                steps
                    .iter()
                    .any(|p| p.starts_with(&format!("SEARCH d USING INDEX {index}"))),
                "{steps:?}"
            );
        };
        plan(by_request_sql(), "decision_rows_request");
        plan(by_customer_sql(), "decision_rows_customer_span");
        plan(previous_sql(), "decision_rows_customer_span");
        let first = records(&f.names).1.remove(0);
        let span = 1i64 << SPAN_BITS;
        // One customer's records in spans 0, 2 and 5 (none in 1, 3, 4), a shadow decision
        // in the newest; each with its own request id.
        let seqs = [3, 2 * span + 7, 5 * span - 1, 5 * span + 1];
        let entries: Vec<Arc<Entry>> = seqs
            .iter()
            .map(|&seq| {
                let mut b = first.body.clone();
                b.decision_id = uuid::Uuid::now_v7().to_string();
                b.request_id = format!("span-{seq}");
                if seq == 5 * span + 1 {
                    b.arm = "shadow".into();
                }
                entry(&f.names, seq, b, &format!("{:064x}", seq - 1), true).0
            })
            .collect();
        let filters = Arc::new(CustomerFilters::default());
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), filters.clone()).unwrap();
        w.insert(&entries).unwrap();
        // Spans 0 to 4 are complete; each insert builds one filter, so 4 are still to come.
        assert_eq!(w.unfiltered.spans(), [1, 2, 3, 4]);
        while w.build_filter() {}
        assert!(w.unfiltered.is_empty());
        let key = text_key(&first.body.customer_ref);
        let held: Vec<bool> = (0..6).map(|s| filters.may_hold(s, key)).collect();
        // Filters rule out the empty spans; the newest, still filling, has none.
        assert_eq!(held, [true, false, true, false, true, true]);
        // A later start loads them; one whose filters are gone (written before filters)
        // lists those spans to build again.
        let loaded = Arc::new(CustomerFilters::default());
        let again =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), loaded.clone()).unwrap();
        assert!(again.unfiltered.is_empty());
        assert!(!loaded.may_hold(3, key) && loaded.may_hold(2, key));
        again
            .conn
            .execute("DELETE FROM customer_filters WHERE span >= 3", [])
            .unwrap();
        let mut rebuilt = ViewWriter::new(again.conn, f.names.clone(), Arc::default()).unwrap();
        assert_eq!(rebuilt.unfiltered.spans(), [3, 4]);
        while rebuilt.build_filter() {}
        let c = open_ro(&f.path).unwrap();
        let customer = [first.body.customer_ref.clone()];
        let found: Vec<i64> = by_customer(&c, &f.names, &filters, &customer)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(found, seqs);
        for &seq in &seqs[..3] {
            let r = by_request(&c, &f.names, &format!("span-{seq}")).unwrap();
            assert_eq!(r.map(|r| r.seq), Some(seq));
        }
        // A shadow decision is not the answer to its request id.
        assert_eq!(
            by_request(&c, &f.names, &format!("span-{}", seqs[3])).unwrap(),
            None
        );
        // The latest served decision before a seq, across empty spans; the shadow one never.
        let before = |seq: i64| {
            previous(&c, &f.names, &filters, &customer, seq)
                .unwrap()
                .map(|r| r.seq)
        };
        assert_eq!(before(i64::MAX), Some(seqs[2]));
        assert_eq!(before(seqs[2]), Some(seqs[1]));
        assert_eq!(before(4 * span), Some(seqs[1]));
        assert_eq!(before(seqs[1]), Some(seqs[0]));
        assert_eq!(before(seqs[0]), None);
        // Retention through span 2: its filters go, and lookups start at the first row kept.
        let w = open_rw(&f.path).unwrap();
        delete_through(&w, 3 * span - 1).unwrap();
        assert_eq!(
            customer_filter::delete_through(&w, 3 * span - 1).unwrap(),
            3
        );
        let stored: Vec<i64> = w
            .prepare("SELECT span FROM customer_filters ORDER BY span")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored, [3, 4]);
        filters.forget_below(3);
        assert!(filters.may_hold(1, key), "no filter is left for span 1");
        let c = open_ro(&f.path).unwrap();
        assert_eq!(customer_filter::span_range(&c).unwrap(), Some((4, 5)));
        let found: Vec<i64> = by_customer(&c, &f.names, &filters, &customer)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(found, seqs[2..]);
    }

    #[test]
    fn every_record_reads_back_as_it_was_written() {
        let f = fixture();
        let (records, want) = records(&f.names);
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(&records[..2]).unwrap();
        // A second writer resumes from the file, as the indexer does after a restart.
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(&records[2..]).unwrap();
        let c = open_ro(&f.path).unwrap();
        assert_eq!(indexed_seq(&c).unwrap(), 4);
        let mut all = Vec::new();
        scan(&c, &f.names, &Window::default(), &mut |r| {
            all.push(r);
            true
        })
        .unwrap();
        assert_eq!(all, want);
        for r in &want {
            let got = get(&c, &f.names, &r.body.decision_id).unwrap();
            assert_eq!(got.as_ref(), Some(r));
        }
        let customer = by_customer(
            &c,
            &f.names,
            &Default::default(),
            &[want[0].body.customer_ref.clone()],
        )
        .unwrap();
        assert_eq!(
            customer.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        let odd = by_customer(
            &c,
            &f.names,
            &Default::default(),
            &[want[2].body.customer_ref.clone()],
        )
        .unwrap();
        assert_eq!(odd, [want[2].clone()]);
        assert_eq!(
            by_request(&c, &f.names, "req-000124")
                .unwrap()
                .map(|r| r.seq),
            Some(4)
        );
        assert_eq!(
            previous(
                &c,
                &f.names,
                &Default::default(),
                &[want[0].body.customer_ref.clone()],
                4
            )
            .unwrap()
            .map(|r| r.seq),
            Some(2)
        );
        assert_eq!(seq_of_hash(&c, &format!("{:064x}", 3)), Some(3));
        // Only the first row and the one after the broken link store their prev_hash.
        let stored: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM decision_rows WHERE prev_hash IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 2);
    }

    #[test]
    fn a_missing_value_is_null_in_the_view_and_missing_again_when_read() {
        let f = fixture();
        let mut body = records(&f.names).1.remove(0).body;
        // A reason's feature, so that the reason's value (the vector's) is missing too.
        let name = body.reasons[0].feature.clone();
        *body.features.get_mut(&name).unwrap() = f64::NAN;
        body.reasons[0].value = f64::NAN;
        let id = body.decision_id.clone();
        let (e, written) = entry(&f.names, 1, body, crate::decision_log::chain::GENESIS, true);
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(std::slice::from_ref(&e)).unwrap();
        let c = open_ro(&f.path).unwrap();
        let missing: i64 = c
            .query_row(
                &format!(
                    "SELECT COUNT(*) FROM decisions WHERE json_type(features, '$.{name}') = 'null'"
                ),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(missing, 1, "reviewers' SQL sees the value as null");
        let mut got = get(&c, &f.names, &id).unwrap().unwrap();
        assert!(got.body.features[&name].is_nan());
        assert!(got.body.reasons[0].value.is_nan());
        // Otherwise the record is as written.
        let mut want = written;
        for r in [&mut got, &mut want] {
            r.body.features.insert(name.clone(), 0.0);
            r.body.reasons[0].value = 0.0;
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_batch_that_fails_leaves_no_arm_behind_that_later_rows_would_miss() {
        let f = fixture();
        let (records, _) = records(&f.names);
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(&records[..1]).unwrap();
        // Record 2 brings a new arm (no rollout, champion); seq 1 again fails the batch.
        let failing = [records[1].clone(), records[0].clone()];
        assert!(w.insert(&failing).is_err());
        w.insert(&records[1..]).unwrap();
        let c = open_ro(&f.path).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 4);
    }

    #[test]
    fn the_decisions_view_shows_the_columns_and_text_of_the_wide_layout() {
        let f = fixture();
        let (records, want) = records(&f.names);
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(&records).unwrap();
        let c = open_ro(&f.path).unwrap();
        let rows: Vec<DecisionRecord> = c
            .prepare(&format!(
                "SELECT {} FROM decisions ORDER BY seq",
                migrate::LEGACY_COLUMNS
            ))
            .unwrap()
            .query_map([], migrate::legacy_record)
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows, want);
        // Features read by name, as reviewers' queries do.
        let name = want[0].body.features.keys().nth(1).unwrap().clone();
        let v: f64 = c
            .query_row(
                &format!("SELECT json_extract(features, '$.{name}') FROM decisions WHERE seq = 1"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, want[0].body.features[&name]);
    }

    #[test]
    fn window_bounds_and_rollout_aggregates_use_the_time_column() {
        let f = fixture();
        let (records, want) = records(&f.names);
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        w.insert(&records).unwrap();
        let c = open_ro(&f.path).unwrap();
        let rollout = want[0].body.rollout_id.clone().unwrap();
        let r = rollout_decisions(&c, &rollout, "2000-01-01T00:00:00Z").unwrap();
        let arms: Vec<(&str, u64)> = r
            .arms
            .iter()
            .map(|a| (a.arm.as_str(), a.stats.decisions))
            .collect();
        // Rows 1, 3 and 4 are the candidate arm of the rollout; row 2 has no rollout.
        assert_eq!(arms, [("candidate", 3)]);
        assert_eq!(r.traffic.iter().map(|t| t.candidate).sum::<u64>(), 3);
        let odd = Window {
            since: Some("2026-12-02T10:00:00.000000Z".into()),
            until: Some("2026-12-02T10:00:01.000000Z".into()),
        };
        let mut seen = Vec::new();
        scan(&c, &f.names, &odd, &mut |r| {
            seen.push(r.seq);
            true
        })
        .unwrap();
        assert_eq!(seen, [3]);
        let stats = version_stats(&c, "credit-limit", "v1", &Window::default()).unwrap();
        assert_eq!(stats.decisions, 4);
        assert!(matches!(
            bounds(&Window {
                since: Some("yesterday".into()),
                until: None
            }),
            Err(LogError::Query(_))
        ));
    }

    #[test]
    fn the_tail_selects_by_its_keys_what_the_decoded_records_say() {
        use crate::decision_log::tail::Select;
        let f = fixture();
        let (mut entries, mut want) = records(&f.names);
        let shadow = RecordBody {
            arm: "shadow".into(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            request_id: "req-shadow".into(),
            ..want[0].body.clone()
        };
        let (e, r) = entry(&f.names, 5, shadow, &want[3].hash, true);
        entries.push(e);
        want.push(r);
        // Every id and ref the records hold, as they are and in capitals, and nobody's.
        let capitals = |v: Vec<String>| -> Vec<String> {
            let upper: Vec<String> = v.iter().map(|t| t.to_uppercase()).collect();
            v.into_iter().chain(upper).collect()
        };
        let mut ids = capitals(want.iter().map(|r| r.body.decision_id.clone()).collect());
        ids.push(uuid::Uuid::now_v7().to_string());
        let mut refs = capitals(want.iter().map(|r| r.body.customer_ref.clone()).collect());
        refs.extend(["ab".repeat(32), "not hex".into()]);
        for (e, r) in entries.iter().zip(&want) {
            for id in &ids {
                let got = Select::Decision(id).matcher().selects(e, &f.names);
                assert_eq!(got, r.body.decision_id == *id, "seq {} by id {id}", r.seq);
            }
            for one in &refs {
                let set = [refs[refs.len() - 1].clone(), one.clone()];
                for before in [None, Some(3), Some(6)] {
                    let select = Select::Customer { refs: &set, before };
                    let expected = before.is_none_or(|b| r.seq < b)
                        && (before.is_none() || r.body.arm != "shadow")
                        && set.contains(&r.body.customer_ref);
                    assert_eq!(
                        select.matcher().selects(e, &f.names),
                        expected,
                        "seq {} by ref {one}, before {before:?}",
                        r.seq
                    );
                }
            }
        }

        // The tail finds the same records through its maps, after any checkpoint it holds.
        let tail = crate::decision_log::tail::Tail::new(0, 0);
        tail.push(entries.clone());
        // A record repeating an id (only a damaged or hand-made log has one): the first
        // answers, as in the view.
        let repeat = RecordBody {
            request_id: "req-repeat".into(),
            ..want[3].body.clone()
        };
        tail.push(vec![entry(&f.names, 6, repeat, &want[4].hash, true).0]);
        let found = |after: i64, select: &Select<'_>| {
            tail.after(after, &select.matcher(), &f.names)
                .map(|v| v.iter().map(|e| e.seq()).collect::<Vec<_>>())
        };
        let everyone: Vec<String> = want.iter().map(|r| r.body.customer_ref.clone()).collect();
        let customers = Select::Customer {
            refs: &everyone,
            before: Some(5),
        };
        assert_eq!(found(0, &customers), Some(vec![1, 2, 3, 4]));
        assert_eq!(found(2, &customers), Some(vec![3, 4]));
        let odd = [want[2].body.customer_ref.clone()];
        let only_odd = Select::Customer {
            refs: &odd,
            before: None,
        };
        assert_eq!(found(0, &only_odd), Some(vec![3]));
        assert_eq!(
            found(0, &Select::Decision(&want[4].body.decision_id)),
            Some(vec![5])
        );
        assert_eq!(
            found(0, &Select::Decision(&want[2].body.decision_id)),
            Some(vec![3])
        );
        assert_eq!(
            found(0, &Select::Decision(&want[3].body.decision_id)),
            Some(vec![4])
        );
        tail.indexed_to(3);
        assert_eq!(found(1, &customers), None, "trimmed past the checkpoint");
        assert_eq!(found(3, &customers), Some(vec![4]));
        tail.indexed_to(6);
        assert_eq!(tail.keys_held(), (0, 0, 0), "nothing left behind");
    }

    #[test]
    fn an_indexer_waiting_for_records_is_woken_once_enough_are_pushed() {
        use crate::decision_log::tail::Tail;
        let f = fixture();
        let (entries, _) = records(&f.names);
        let tail = Arc::new(Tail::new(0, 0));
        let (done, batches) = std::sync::mpsc::channel();
        // As the indexer does: a batch (of 16 at most, so 2 are enough), then indexed.
        std::thread::spawn({
            let tail = tail.clone();
            move || {
                for _ in 0..2 {
                    let batch = tail.next_batch(16, Duration::from_secs(600));
                    tail.indexed_to(batch.last().map_or(0, |e| e.seq()));
                    let _ = done.send(batch.len());
                }
            }
        });
        let wait = |what: &str| {
            batches
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the indexer was not woken for {what}"))
        };
        std::thread::sleep(Duration::from_millis(50));
        tail.push(entries[..2].to_vec());
        assert_eq!(wait("its first records"), 2);
        // One record wakes it from waiting for any; it then lingers until a second comes.
        std::thread::sleep(Duration::from_millis(50));
        tail.push(entries[2..3].to_vec());
        std::thread::sleep(Duration::from_millis(50));
        tail.push(entries[3..4].to_vec());
        assert_eq!(wait("enough records"), 2);
    }

    #[test]
    fn time_windows_arms_and_decision_ids_are_found_through_the_block_summaries() {
        let f = fixture();
        let first = records(&f.names).1.remove(0).body;
        let block = 1i64 << blocks::BLOCK_BITS;
        let n = 5 * block - 120;
        // Block 3 is version v2's; one decision id is a UUIDv4 (as a migrated log may hold).
        let mut v4 = *uuid::Uuid::now_v7().as_bytes();
        v4[6] = 0x40 | (v4[6] & 0x0f);
        let v4 = uuid::Uuid::from_bytes(v4).to_string();
        let mut ids: Vec<String> = Vec::new();
        let mut prev = chain::GENESIS.to_string();
        let mut entries = Vec::new();
        for seq in 1..=n {
            let mut b = first.clone();
            // Seqs 2001 and 3000 repeat an id (only a damaged or hand-made log does): the
            // first row of an id answers, whichever kind it is.
            b.decision_id = match seq {
                2000 | 2001 => v4.clone(),
                3000 => ids[99].clone(),
                _ => uuid::Uuid::now_v7().to_string(),
            };
            b.request_id = format!("req-{seq}");
            b.recorded_at = rfc3339_micros(1_800_000_000_000_000 + seq * 150);
            if seq >> blocks::BLOCK_BITS == 3 {
                b.version = "v2".into();
            }
            ids.push(b.decision_id.clone());
            let (e, r) = entry(&f.names, seq, b, &prev, true);
            prev = r.hash;
            entries.push(e);
        }
        let mut w =
            ViewWriter::new(open_rw(&f.path).unwrap(), f.names.clone(), Arc::default()).unwrap();
        // Batches that end inside blocks, so that a block's summary is merged from two.
        for batch in entries.chunks(700) {
            w.insert(batch).unwrap();
        }
        let c = open_ro(&f.path).unwrap();
        let get_seq = |c: &Connection, seq: i64| {
            get(c, &f.names, &ids[seq as usize - 1])
                .unwrap()
                .map(|r| r.seq)
        };
        for seq in [1, 100, 699, 700, 701, 1023, 1024, 2000, 3500, n] {
            assert_eq!(get_seq(&c, seq), Some(seq), "decision {seq}");
        }
        assert_eq!(
            get_seq(&c, 2001),
            Some(2000),
            "the first row of a repeated v4 id"
        );
        assert_eq!(
            get_seq(&c, 3000),
            Some(100),
            "the first row of a repeated v7 id"
        );
        assert!(
            get(&c, &f.names, &uuid::Uuid::now_v7().to_string())
                .unwrap()
                .is_none()
        );

        let at = |seq: i64| rfc3339_micros(1_800_000_000_000_000 + seq * 150);
        let window = Window {
            since: Some(at(1000)),
            until: Some(at(2101)),
        };
        let mut seen = Vec::new();
        scan(&c, &f.names, &window, &mut |r| {
            seen.push(r.seq);
            true
        })
        .unwrap();
        assert_eq!(seen, (1000..=2100).collect::<Vec<_>>());
        let mut first_three = Vec::new();
        scan(&c, &f.names, &window, &mut |r| {
            first_three.push(r.seq);
            first_three.len() < 3
        })
        .unwrap();
        assert_eq!(first_three, [1000, 1001, 1002]);

        let stats = |c: &Connection, version: &str, window: &Window| {
            version_stats(c, "credit-limit", version, window)
                .unwrap()
                .decisions
        };
        assert_eq!(stats(&c, "v2", &Window::default()), block as u64);
        assert_eq!(stats(&c, "v1", &Window::default()), (n - block) as u64);
        assert_eq!(stats(&c, "v2", &window), 0);
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {}", version_stats_sql()))
            .unwrap()
            .query_map(params!["credit-limit", "v2", 0, i64::MAX], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.starts_with("SEARCH d USING INTEGER PRIMARY KEY")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|p| p.starts_with("SCAN d")), "{plan:?}");

        // Retention through seq 2500: blocks 0 and 1 go with their rows, block 2 keeps its
        // summary for the rows it still has.
        let rw = open_rw(&f.path).unwrap();
        delete_through(&rw, 2500).unwrap();
        for seq in [1, 1024, 2000, 2500] {
            assert_eq!(get_seq(&c, seq), None, "decision {seq}");
        }
        for seq in [2501, 3000, n] {
            assert_eq!(get_seq(&c, seq), Some(seq), "decision {seq}");
        }
        let left: i64 = rw
            .query_row("SELECT MIN(block) FROM blocks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 2);
        assert_eq!(
            stats(&c, "v1", &Window::default()),
            (n - block - 2500) as u64
        );
    }
}

#[cfg(test)]
mod speed {
    use super::tests_support::*;

    /// Not a test: `cargo test --release --lib view::speed -- --ignored --nocapture` prints
    /// the indexer's cost per row on this machine, alone on a core, overall and for each
    /// tenth of the run (the cost as the view grows); `ROWS=n` rows (100,000) of
    /// `CUSTOMERS=n` customers (5,000); `DROP_INDEXES=a,b` drops those indexes first, to see
    /// what each costs.
    #[test]
    #[ignore]
    fn rows_per_second_alone() {
        let f = fixture();
        let n = std::env::var("ROWS").map_or(100_000, |r| r.parse().expect("ROWS is a count"));
        let customers = std::env::var("CUSTOMERS").map_or(5_000, |c| c.parse().expect("a count"));
        let rows = many_of(&f.names, n, customers);
        let conn = open_rw(&f.path).unwrap();
        if let Ok(drop) = std::env::var("DROP_INDEXES") {
            for i in drop.split(',') {
                conn.execute_batch(&format!("DROP INDEX {i}")).unwrap();
            }
        }
        let mut w = ViewWriter::new(conn, f.names.clone(), Arc::default()).unwrap();
        let t = std::time::Instant::now();
        let mut last = (t, 0);
        for (i, chunk) in rows.chunks(8192).enumerate() {
            w.insert(chunk).unwrap();
            // Each tenth of the run on its own: the cost per row as the view grows.
            let done = (i + 1) * 8192;
            if done - last.1 >= rows.len() / 10 {
                let us = last.0.elapsed().as_secs_f64() * 1e6 / (done - last.1) as f64;
                eprintln!("  rows {}..{done}: {us:.2} µs per row", last.1);
                last = (std::time::Instant::now(), done);
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / rows.len() as f64;
        eprintln!("{us:.2} µs per row ({} rows)", rows.len());
    }
}
