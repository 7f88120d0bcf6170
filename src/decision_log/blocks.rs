//! Block summaries: for each block of 1,024 consecutive seqs of the query view, the range of
//! its decision times, the range of the milliseconds in its decision ids, and the arms it
//! holds. They stand in for three indexes that had an entry per decision (time, arm and
//! decision id), which together took a fifth of the indexer's time per row: the indexer
//! now writes a summary per block a batch touches, and a query by time window, arm or
//! decision id reads the summaries first, then only the seq ranges of the blocks that may
//! match, by the rows' primary key.
//!
//! Finding a decision id this way needs the id to carry its time: a UUIDv7 (every id this
//! release makes) does, in its first 48 bits. Any other id (a migrated log's, or a format-1
//! record's text) gets an entry in `other_ids` instead; which of the two holds an id is
//! decided by its stored bytes alone, the same way when writing and when looking up.
//!
//! A summary is a superset of its rows: rows only arrive in seq order, and retention only
//! deletes. A block whose rows retention thinned keeps its summary until the whole block is
//! gone, so a query may read a block for nothing, never miss one.

use std::collections::BTreeMap;

use rusqlite::types::Value;
use rusqlite::{Connection, params};

use super::LogError;
use super::view::query_err;

/// log2 of the seqs per block; `decision_rows.seq >> BLOCK_BITS` is a row's block.
pub(super) const BLOCK_BITS: u32 = 10;

/// The first seq of block `b`.
pub(super) fn first_seq(block: i64) -> i64 {
    block << BLOCK_BITS
}

/// The last seq of block `b`.
pub(super) fn last_seq(block: i64) -> i64 {
    ((block + 1) << BLOCK_BITS) - 1
}

/// The milliseconds a UUIDv7 carries in its first 48 bits; None for any other id (another
/// version, another variant, or not 16 bytes).
pub(super) fn v7_millis(id: &[u8]) -> Option<i64> {
    let id: &[u8; 16] = id.try_into().ok()?;
    if id[6] >> 4 != 7 || id[8] & 0xc0 != 0x80 {
        return None;
    }
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&id[..6]);
    Some(i64::from_be_bytes(ms))
}

/// What one block's rows span.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    first_at: i64,
    last_at: i64,
    /// The range of its v7 decision ids' milliseconds; empty (MAX, MIN) if it has none.
    id_min: i64,
    id_max: i64,
    arms: Vec<i64>,
}

/// The summaries a batch adds to, written in the batch's transaction.
#[derive(Debug, Default)]
pub(super) struct Summaries {
    blocks: BTreeMap<i64, Summary>,
}

impl Summaries {
    /// Notes a row: its seq, time (µs), decision id's milliseconds if it is a v7 id, arm.
    pub fn note(&mut self, seq: i64, at: i64, id_millis: Option<i64>, arm_id: i64) {
        let s = self
            .blocks
            .entry(seq >> BLOCK_BITS)
            .or_insert_with(|| Summary {
                first_at: at,
                last_at: at,
                id_min: i64::MAX,
                id_max: i64::MIN,
                arms: Vec::new(),
            });
        s.first_at = s.first_at.min(at);
        s.last_at = s.last_at.max(at);
        if let Some(ms) = id_millis {
            s.id_min = s.id_min.min(ms);
            s.id_max = s.id_max.max(ms);
        }
        // A handful of arms at a time: a scan beats a set.
        if !s.arms.contains(&arm_id) {
            s.arms.push(arm_id);
        }
    }

    /// Merges the noted summaries into the stored ones (a batch may continue a block an
    /// earlier batch began) and forgets them.
    pub fn write(&mut self, c: &Connection) -> Result<(), LogError> {
        let mut block = c
            .prepare_cached(
                "INSERT INTO blocks (block, first_at, last_at, id_min, id_max) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (block) DO UPDATE SET \
                 first_at = min(first_at, excluded.first_at), \
                 last_at = max(last_at, excluded.last_at), \
                 id_min = min(id_min, excluded.id_min), id_max = max(id_max, excluded.id_max)",
            )
            .map_err(query_err)?;
        let mut arm = c
            .prepare_cached("INSERT OR IGNORE INTO block_arms (arm_id, block) VALUES (?1, ?2)")
            .map_err(query_err)?;
        for (b, s) in std::mem::take(&mut self.blocks) {
            block
                .execute(params![b, s.first_at, s.last_at, s.id_min, s.id_max])
                .map_err(query_err)?;
            for a in s.arms {
                arm.execute(params![a, b]).map_err(query_err)?;
            }
        }
        Ok(())
    }
}

/// Records that a row's decision id is not a v7 id, so that a lookup finds it.
pub(super) fn note_other_id(
    c: &Connection,
    decision_id: &dyn rusqlite::ToSql,
    seq: i64,
) -> Result<(), LogError> {
    c.prepare_cached("INSERT OR REPLACE INTO other_ids (decision_id, seq) VALUES (?1, ?2)")
        .map_err(query_err)?
        .execute(params![decision_id, seq])
        .map_err(query_err)?;
    Ok(())
}

/// The blocks that may hold the v7 decision id of `millis`.
pub(super) fn of_id(c: &Connection, millis: i64) -> Result<Vec<i64>, LogError> {
    c.prepare_cached("SELECT block FROM blocks WHERE id_min <= ?1 AND id_max >= ?1")
        .map_err(query_err)?
        .query_map([millis], |r| r.get(0))
        .map_err(query_err)?
        .collect::<Result<_, _>>()
        .map_err(query_err)
}

/// The seq ranges (inclusive, in order, adjacent blocks joined) that may hold rows with a
/// time in `[since, until)`.
pub(super) fn in_window(
    c: &Connection,
    since: i64,
    until: i64,
) -> Result<Vec<(i64, i64)>, LogError> {
    let blocks: Vec<i64> = c
        .prepare_cached(
            "SELECT block FROM blocks WHERE last_at >= ?1 AND first_at < ?2 ORDER BY block",
        )
        .map_err(query_err)?
        .query_map([since, until], |r| r.get(0))
        .map_err(query_err)?
        .collect::<Result<_, _>>()
        .map_err(query_err)?;
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for b in blocks {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == first_seq(b) => *last = last_seq(b),
            _ => ranges.push((first_seq(b), last_seq(b))),
        }
    }
    Ok(ranges)
}

/// A query's scope: the rows of the arms `arms` (an SQL subquery of `arms.id`) with a time
/// in `[since, until)` (SQL expressions), read only in the blocks whose summaries hold one
/// of those arms in that time. Returns the common table `r` of those blocks' first seqs, to
/// put before the SELECT, and its FROM and WHERE (as `d`, the rows, and `a`, their arms),
/// which read the rows by their primary key's range.
pub(super) fn by_arms(arms: &str, since: &str, until: &str) -> (String, String) {
    (
        format!(
            "WITH r(lo) AS (SELECT DISTINCT ba.block << {BLOCK_BITS} FROM block_arms ba \
             JOIN blocks b ON b.block = ba.block WHERE ba.arm_id IN ({arms}) \
             AND b.last_at >= {since} AND b.first_at < {until})"
        ),
        format!(
            "FROM r JOIN decision_rows d ON d.seq >= r.lo AND d.seq < r.lo + {rows} \
             JOIN arms a ON a.id = d.arm_id \
             WHERE d.arm_id IN ({arms}) AND d.at >= {since} AND d.at < {until}",
            rows = 1 << BLOCK_BITS
        ),
    )
}

/// Builds the summaries of rows already in the view (a layout without them), in one pass in
/// seq order.
pub(super) fn build_in_place(c: &Connection) -> Result<u64, LogError> {
    let mut summaries = Summaries::default();
    let mut others: Vec<(Value, i64)> = Vec::new();
    let mut rows = 0;
    {
        let mut stmt = c
            .prepare("SELECT seq, at, decision_id, arm_id FROM decision_rows ORDER BY seq")
            .map_err(query_err)?;
        let mut it = stmt.query([]).map_err(query_err)?;
        while let Some(r) = it.next().map_err(query_err)? {
            let seq: i64 = r.get(0).map_err(query_err)?;
            let id: Value = r.get(2).map_err(query_err)?;
            let millis = match &id {
                Value::Blob(b) => v7_millis(b),
                _ => None,
            };
            if millis.is_none() {
                others.push((id, seq));
            }
            summaries.note(
                seq,
                r.get(1).map_err(query_err)?,
                millis,
                r.get(3).map_err(query_err)?,
            );
            rows += 1;
        }
    }
    summaries.write(c)?;
    for (id, seq) in &others {
        note_other_id(c, id, *seq)?;
    }
    Ok(rows)
}

/// Deletes the summaries of the blocks retention emptied (every seq through `seq`), and the
/// other ids of the rows it deleted.
pub(super) fn delete_through(c: &Connection, seq: i64) -> Result<(), LogError> {
    let below = (seq + 1) >> BLOCK_BITS;
    c.execute("DELETE FROM block_arms WHERE block < ?1", [below])
        .map_err(query_err)?;
    c.execute("DELETE FROM blocks WHERE block < ?1", [below])
        .map_err(query_err)?;
    c.execute("DELETE FROM other_ids WHERE seq <= ?1", [seq])
        .map_err(query_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_v7_id_gives_its_milliseconds() {
        let id = uuid::Uuid::now_v7();
        let (secs, nanos) = id.get_timestamp().expect("v7").to_unix();
        let ms = secs as i64 * 1000 + i64::from(nanos) / 1_000_000;
        assert_eq!(v7_millis(id.as_bytes()), Some(ms));
        let mut v4 = *id.as_bytes();
        v4[6] = 0x40 | (v4[6] & 0x0f);
        assert_eq!(v7_millis(&v4), None);
        assert_eq!(v7_millis(&id.as_bytes()[..15]), None);
        // Version 7 with another variant is not a v7 UUID.
        let mut other = *id.as_bytes();
        other[8] &= 0x3f;
        assert_eq!(v7_millis(&other), None);
    }

    #[test]
    fn a_summary_spans_its_rows_and_lists_each_arm_once() {
        let mut s = Summaries::default();
        s.note(1023, 50, Some(7), 1);
        s.note(1024, 40, None, 2);
        s.note(1025, 60, Some(9), 2);
        s.note(1026, 45, Some(3), 1);
        let b1 = &s.blocks[&1];
        assert_eq!(
            (b1.first_at, b1.last_at, b1.id_min, b1.id_max),
            (40, 60, 3, 9)
        );
        assert_eq!(b1.arms, [2, 1]);
        let b0 = &s.blocks[&0];
        assert_eq!(
            (b0.first_at, b0.last_at, b0.id_min, b0.id_max),
            (50, 50, 7, 7)
        );
    }
}
