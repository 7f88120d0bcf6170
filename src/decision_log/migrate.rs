//! The data directory's formats, and the one way from each old one to the current.
//!
//! `decisions.db`'s `PRAGMA user_version` says which layout it has:
//! - 0 with a `chain_head` table: the log before the journal (release of issue 15), where
//!   the `decisions` table was the log itself. Migration copies every record, in seq order,
//!   into the journal as a format-1 entry (its canonical JSON, its stored prev_hash and hash:
//!   nothing is re-hashed, so a record edited before the migration still shows as edited),
//!   keeps the rows as the query view, and sets the checkpoint and `user_version = 2` in one
//!   transaction at the end. Interrupted, it starts over on the next open: the journal is
//!   only trusted once `user_version` says so.
//! - 0 without one: a new directory; 2: the current layout. Anything newer was written by a
//!   later release and is refused rather than guessed at.

use rusqlite::{Connection, OptionalExtension};

use super::journal::{Journal, JournalOptions, Position};
use super::journaled::LogFiles;
use super::record::encode_entry;
use super::{DecisionRecord, LogError, view};

/// Records copied per journal group during a migration.
const MIGRATE_GROUP: usize = 4_096;

/// Brings the view's file (and the journal beside it) to the current layout.
pub(super) fn prepare(conn: &mut Connection, files: &LogFiles) -> Result<(), LogError> {
    let q = view::query_err;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(q)?;
    if version > view::USER_VERSION {
        return Err(LogError::Damaged(format!(
            "{} has layout {version}; this release reads up to {}: it was written by a newer release",
            files.view.display(),
            view::USER_VERSION
        )));
    }
    if version == view::USER_VERSION {
        return conn.execute_batch(view::SCHEMA).map_err(q);
    }
    let old_log: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'chain_head'",
            [],
            |r| r.get(0),
        )
        .map_err(q)?;
    if old_log {
        migrate_v0(conn, files)?;
    }
    conn.execute_batch(view::SCHEMA).map_err(q)?;
    conn.execute_batch(view::REQUEST_INDEX).map_err(q)?;
    conn.execute_batch(&format!("PRAGMA user_version = {}", view::USER_VERSION))
        .map_err(q)
}

/// The previous release's log → journal + view.
fn migrate_v0(conn: &mut Connection, files: &LogFiles) -> Result<(), LogError> {
    let q = view::query_err;
    // A journal left by an interrupted migration is not trusted: start over.
    if files.journal.exists() {
        std::fs::remove_dir_all(&files.journal).map_err(|e| {
            LogError::Unavailable(format!("clearing {}: {e}", files.journal.display()))
        })?;
    }
    let anchor: Option<(i64, String)> = conn
        .query_row("SELECT seq, hash FROM chain_anchor WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(q)?;
    let first: Option<i64> = conn
        .query_row("SELECT MIN(seq) FROM decisions", [], |r| r.get(0))
        .map_err(q)?;
    let first_seq = first.unwrap_or_else(|| anchor.as_ref().map_or(1, |(s, _)| s + 1));
    if let Some((seq, hash)) = &anchor {
        files.write_anchor(*seq, hash)?;
    }
    let options = JournalOptions {
        first_seq: first_seq.max(1) as u64,
        ..JournalOptions::default()
    };
    let (mut journal, _) = Journal::open(&files.journal, options, None)
        .map_err(|e| LogError::Unavailable(e.to_string()))?;
    let mut last: Option<Position> = None;
    let mut copied = 0u64;
    {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {} FROM decisions ORDER BY seq",
                view::COLUMNS
            ))
            .map_err(q)?;
        let mut rows = stmt.query([]).map_err(q)?;
        let mut group: Vec<Vec<u8>> = Vec::with_capacity(MIGRATE_GROUP);
        let mut expected = first_seq;
        let flush = |group: &mut Vec<Vec<u8>>,
                     journal: &mut Journal|
         -> Result<Option<Position>, LogError> {
            if group.is_empty() {
                return Ok(None);
            }
            let positions = journal
                .append(group)
                .map_err(|e| LogError::Unavailable(format!("migrating the log: {e}")))?;
            group.clear();
            Ok(positions.last().copied())
        };
        while let Some(row) = rows.next().map_err(q)? {
            let r: DecisionRecord = view::row_to_record(row)
                .map_err(|e| LogError::Damaged(format!("migrating: a row is unreadable: {e}")))?;
            if r.seq != expected {
                return Err(LogError::Damaged(format!(
                    "migrating: the log jumps from seq {} to seq {}; it was edited, so it \
                     cannot be carried over as it is (verify it with the previous release)",
                    expected - 1,
                    r.seq
                )));
            }
            expected += 1;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&r.hash, &mut hash).map_err(|_| {
                LogError::Damaged(format!("migrating: record seq {} has no valid hash", r.seq))
            })?;
            let json = serde_json::to_vec(&r.body).expect("a record body always serialises");
            if r.prev_hash != super::chain::GENESIS && r.prev_hash.len() != 64 {
                return Err(LogError::Damaged(format!(
                    "migrating: record seq {} has no valid prev_hash",
                    r.seq
                )));
            }
            group.push(encode_entry(&r.prev_hash, &hash, &json));
            copied += 1;
            if group.len() == MIGRATE_GROUP
                && let Some(p) = flush(&mut group, &mut journal)?
            {
                last = Some(p);
            }
        }
        if let Some(p) = flush(&mut group, &mut journal)? {
            last = Some(p);
        }
    }
    let tx = conn.transaction().map_err(q)?;
    tx.execute_batch(
        "DROP INDEX IF EXISTS decisions_request; DROP TABLE IF EXISTS chain_head; \
         DROP TABLE IF EXISTS writer_probe;",
    )
    .map_err(q)?;
    tx.execute_batch(view::SCHEMA).map_err(q)?;
    tx.execute_batch(view::REQUEST_INDEX).map_err(q)?;
    if let Some(p) = last {
        view::set_checkpoint(&tx, p)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {}", view::USER_VERSION))
        .map_err(q)?;
    tx.commit().map_err(q)?;
    tracing::info!(
        records = copied,
        "migrated the decision log into the journal"
    );
    Ok(())
}
