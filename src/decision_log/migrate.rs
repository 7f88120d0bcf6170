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
//!   (The rows it kept are dropped again at once by the step to layout 3, below.)
//! - 2: the journal's first view, one wide `decisions` table. The view is a cache of the
//!   journal, so the step to layout 3 drops it (and its checkpoint) and the indexer rebuilds
//!   it from the journal on this start.
//! - 3: the rows of layout 4, with the customer index over the whole log and a `decisions`
//!   view without the remediation columns. The step to layout 4 drops both and builds the
//!   per-span index over the rows in place (no rebuild from the journal) and the new view.
//! - 4: the rows of layout 5 with three more indexes, by time, arm and decision id. The
//!   step to layout 5 drops them and builds the block summaries that replace them
//!   ([`super::blocks`]) from the rows in place.
//! - 0 without one: a new directory; 5: the current layout. Anything newer was written by a
//!   later release and is refused rather than guessed at.

use rusqlite::{Connection, OptionalExtension};

use super::journal::{Journal, JournalOptions};
use super::journaled::LogFiles;
use super::record::encode_entry;
use super::{DecisionRecord, LogError, blocks, view};

/// Records copied per journal group during a migration.
const MIGRATE_GROUP: usize = 4_096;

/// The rollout store's tables, oldest first (the order they reference each other in).
const ROLLOUT_TABLES: [&str; 3] = ["rollouts", "rollout_transitions", "rollout_readings"];

/// Moves the rollout store's tables out of the view's file into `rollouts.db` (up to this
/// release they shared it; the view is now written without fsync and may be rebuilt, which
/// the rollouts, not derived from the journal, must never be). The copy is made under a
/// temporary name, synced and renamed; only then are the tables dropped from the view's
/// file, so an interruption anywhere leaves one complete copy, and the next open finishes.
pub(super) fn move_rollouts(conn: &Connection, files: &LogFiles) -> Result<(), LogError> {
    let q = view::query_err;
    let has = |table: &str| -> Result<bool, LogError> {
        conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .map_err(q)
    };
    if !has("rollouts")? {
        return Ok(());
    }
    if !files.rollouts.exists() {
        tracing::info!(to = %files.rollouts.display(), "moving the rollout store out of the query view's file");
        let tmp = files.rollouts.with_extension("db.tmp");
        for leftover in view::sqlite_files(&tmp) {
            let _ = std::fs::remove_file(leftover);
        }
        let unavailable = |e: String| LogError::Unavailable(format!("{}: {e}", tmp.display()));
        // The store makes its own schema (and brings older tables' columns up to date).
        crate::rollout::store::RolloutStore::open(&tmp).map_err(|e| unavailable(e.to_string()))?;
        conn.execute("ATTACH DATABASE ?1 AS moved", [tmp.to_string_lossy()])
            .map_err(q)?;
        let copied = (|| -> Result<(), LogError> {
            conn.execute_batch("BEGIN").map_err(q)?;
            for table in ROLLOUT_TABLES {
                if !has(table)? {
                    continue;
                }
                // The columns both have, by name: an older store may lack later ones.
                let columns: Vec<String> = conn
                    .prepare(&format!(
                        "SELECT name FROM pragma_table_info('{table}', 'main') \
                         WHERE name IN (SELECT name FROM pragma_table_info('{table}', 'moved'))"
                    ))
                    .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                    .map_err(q)?;
                let columns = columns.join(", ");
                conn.execute_batch(&format!(
                    "INSERT INTO moved.{table} ({columns}) SELECT {columns} FROM main.{table}"
                ))
                .map_err(q)?;
            }
            conn.execute_batch("COMMIT").map_err(q)
        })();
        if copied.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let _ = conn.execute_batch("DETACH DATABASE moved");
        copied?;
        let io = |e: std::io::Error| unavailable(e.to_string());
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &files.rollouts).map_err(io)?;
        view::sync_parent(&files.rollouts)?;
    }
    for table in ROLLOUT_TABLES.iter().rev() {
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {table}"))
            .map_err(q)?;
    }
    Ok(())
}

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
        return migrate_v0(conn, files);
    }
    if version == 2 {
        tracing::info!("dropping the wide query view of layout 2; it is rebuilt from the journal");
    }
    // Layout 2's wide table and its checkpoint go (a cache of the journal) in the same
    // transaction as the new layout: interrupted, this starts over.
    let tx = conn.transaction().map_err(q)?;
    if version == 2 {
        tx.execute_batch(
            "DROP TABLE IF EXISTS decisions; DROP TABLE IF EXISTS journal_checkpoint;",
        )
        .map_err(q)?;
    }
    if version == 3 {
        tracing::info!("layout 3 to 4: indexing customers per span of the log");
        // The `decisions` view gains the remediation columns: made anew below.
        tx.execute_batch(
            "DROP INDEX IF EXISTS decision_rows_customer; DROP VIEW IF EXISTS decisions;",
        )
        .map_err(q)?;
    }
    tx.execute_batch(view::SCHEMA).map_err(q)?;
    if version == 3 || version == 4 {
        tx.execute_batch(
            "DROP INDEX IF EXISTS decision_rows_id; DROP INDEX IF EXISTS decision_rows_arm; \
             DROP INDEX IF EXISTS decision_rows_time;",
        )
        .map_err(q)?;
        let rows = blocks::build_in_place(&tx)?;
        tracing::info!(
            rows,
            "layout {version} to {}: block summaries in place of the time, arm and decision-id indexes",
            view::USER_VERSION
        );
    }
    if version == 5 {
        let blocks = blocks::list_ids_in_place(&tx)?;
        tracing::info!(
            blocks,
            "layout 5 to 6: blocks listed by their decision ids' times"
        );
    }
    tx.execute_batch(&format!("PRAGMA user_version = {}", view::USER_VERSION))
        .map_err(q)?;
    tx.commit().map_err(q)
}

/// The columns of the `decisions` table of layouts 0 and 2, in the order [`legacy_record`]
/// reads them.
pub(super) const LEGACY_COLUMNS: &str = "seq, decision_id, recorded_at, request_id, request_hash, \
    customer_ref, key_id, model, version, digest, rollout_id, arm, features, pd, grade, \
    decision, current_limit, granted_limit, reasons, caller, trace_id, prev_hash, hash";

fn legacy_json<T: serde::de::DeserializeOwned>(i: usize, text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A row of a layout-0 or layout-2 `decisions` table (features and reasons as JSON), or of
/// layout 3's `decisions` view, which shows the same columns.
pub(super) fn legacy_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<DecisionRecord> {
    Ok(DecisionRecord {
        seq: r.get(0)?,
        body: super::RecordBody {
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
            features: legacy_json(12, r.get(12)?)?,
            probability_of_default: r.get(13)?,
            grade: r.get(14)?,
            decision: r.get(15)?,
            current_limit: r.get(16)?,
            granted_limit: r.get(17)?,
            reasons: legacy_json(18, r.get(18)?)?,
            caller: r.get(19)?,
            trace_id: r.get(20)?,
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        },
        prev_hash: r.get(21)?,
        hash: r.get(22)?,
        replica: None,
    })
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
    let mut copied = 0u64;
    {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {LEGACY_COLUMNS} FROM decisions ORDER BY seq"
            ))
            .map_err(q)?;
        let mut rows = stmt.query([]).map_err(q)?;
        let mut group: Vec<Vec<u8>> = Vec::with_capacity(MIGRATE_GROUP);
        let mut expected = first_seq;
        let flush = |group: &mut Vec<Vec<u8>>, journal: &mut Journal| -> Result<(), LogError> {
            if !group.is_empty() {
                journal
                    .append(group)
                    .map_err(|e| LogError::Unavailable(format!("migrating the log: {e}")))?;
                group.clear();
            }
            Ok(())
        };
        while let Some(row) = rows.next().map_err(q)? {
            let r: DecisionRecord = legacy_record(row)
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
            if group.len() == MIGRATE_GROUP {
                flush(&mut group, &mut journal)?;
            }
        }
        flush(&mut group, &mut journal)?;
    }
    // The journal is trusted once this commits: the old table goes, and the view is built
    // from the journal on this start.
    let tx = conn.transaction().map_err(q)?;
    tx.execute_batch(
        "DROP INDEX IF EXISTS decisions_request; DROP TABLE IF EXISTS chain_head; \
         DROP TABLE IF EXISTS writer_probe; DROP TABLE IF EXISTS decisions; \
         DROP TABLE IF EXISTS journal_checkpoint;",
    )
    .map_err(q)?;
    tx.execute_batch(view::SCHEMA).map_err(q)?;
    tx.execute_batch(&format!("PRAGMA user_version = {}", view::USER_VERSION))
        .map_err(q)?;
    tx.commit().map_err(q)?;
    tracing::info!(
        records = copied,
        "migrated the decision log into the journal"
    );
    Ok(())
}
