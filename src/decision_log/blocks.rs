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
//!
//! So that a lookup by id does not read every summary (0.7 ms at 13 M decisions, growing
//! with the log), `block_ids` lists each block under the buckets of milliseconds its ids
//! span: at the finest of a few widths where that span touches at most two buckets. A
//! lookup probes the bucket of its id at each width, a handful of seeks, and reads the
//! summaries of the blocks listed there.

use std::collections::BTreeMap;

use rusqlite::types::Value;
use rusqlite::{Connection, params};

use super::LogError;
use super::view::query_err;

/// log2 of the seqs per block; `decision_rows.seq >> BLOCK_BITS` is a row's block.
pub(super) const BLOCK_BITS: u32 = 10;

/// The first seq of `block`.
pub(super) fn first_seq(block: i64) -> i64 {
    block << BLOCK_BITS
}

/// The last seq of `block`.
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

/// The widths of the id buckets, as log2 of milliseconds, finest first: about a second,
/// a minute, an hour, three days, half a year, 35 years, and one bucket for every id (the
/// 48 bits a v7 id carries).
const ID_WIDTHS: [u32; 7] = [10, 16, 22, 28, 34, 40, 48];

/// The bucket of `ms` at width `level` (an index into [`ID_WIDTHS`]): the level in the
/// bits above the 48 a v7 id's time can use, so that the levels never share a bucket.
fn id_bucket(level: usize, ms: i64) -> i64 {
    ((level as i64) << 48) | (ms >> ID_WIDTHS[level])
}

/// The buckets a block whose ids' milliseconds span `[lo, hi]` is listed under: one or two
/// at the finest width where the span touches at most two. Every `ms` in the span falls in
/// one of them, which is what a lookup relies on.
fn id_buckets(lo: i64, hi: i64) -> [i64; 2] {
    let level = (0..ID_WIDTHS.len())
        .find(|&l| (hi >> ID_WIDTHS[l]) - (lo >> ID_WIDTHS[l]) <= 1)
        .unwrap_or(ID_WIDTHS.len() - 1);
    [id_bucket(level, lo), id_bucket(level, hi)]
}

/// Lists a block under the buckets of its id span, if it has one (a block whose ids are
/// none of them v7 has not).
fn list_ids(c: &Connection, block: i64, lo: i64, hi: i64) -> Result<(), LogError> {
    if lo > hi {
        return Ok(());
    }
    let mut insert = c
        .prepare_cached("INSERT OR IGNORE INTO block_ids (bucket, block) VALUES (?1, ?2)")
        .map_err(query_err)?;
    let [first, last] = id_buckets(lo, hi);
    insert.execute([first, block]).map_err(query_err)?;
    if last != first {
        insert.execute([last, block]).map_err(query_err)?;
    }
    Ok(())
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
    /// earlier batch began), lists each block under the buckets of the id span of the rows
    /// noted (every row's id is then in a span its block is listed for), and forgets them.
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
            list_ids(c, b, s.id_min, s.id_max)?;
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
    // Rows arrive in seq order: an id seen again (only a damaged or hand-made log has one)
    // keeps its first row, as a v7 id's lookup finds the first too.
    c.prepare_cached("INSERT OR IGNORE INTO other_ids (decision_id, seq) VALUES (?1, ?2)")
        .map_err(query_err)?
        .execute(params![decision_id, seq])
        .map_err(query_err)?;
    Ok(())
}

/// The blocks listed under the buckets ?2..?8 of the id time ?1 whose summaries hold it.
const OF_ID: &str = "SELECT DISTINCT b.block FROM block_ids i JOIN blocks b ON b.block = i.block \
    WHERE i.bucket IN (?2, ?3, ?4, ?5, ?6, ?7, ?8) AND b.id_min <= ?1 AND b.id_max >= ?1 \
    ORDER BY b.block";

/// The blocks that may hold the v7 decision id of `millis`, in order.
pub(super) fn of_id(c: &Connection, millis: i64) -> Result<Vec<i64>, LogError> {
    let mut args = [millis; ID_WIDTHS.len() + 1];
    for (level, arg) in args.iter_mut().enumerate().skip(1) {
        *arg = id_bucket(level - 1, millis);
    }
    c.prepare_cached(OF_ID)
        .map_err(query_err)?
        .query_map(args, |r| r.get(0))
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
                note_other_id(c, &id, seq)?;
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
    Ok(rows)
}

/// Lists the blocks of a view that has summaries but no `block_ids` (layout 5) under the
/// buckets of their id spans.
pub(super) fn list_ids_in_place(c: &Connection) -> Result<u64, LogError> {
    let mut stmt = c
        .prepare("SELECT block, id_min, id_max FROM blocks")
        .map_err(query_err)?;
    let mut it = stmt.query([]).map_err(query_err)?;
    let mut blocks = 0;
    while let Some(r) = it.next().map_err(query_err)? {
        let block = r.get(0).map_err(query_err)?;
        list_ids(
            c,
            block,
            r.get(1).map_err(query_err)?,
            r.get(2).map_err(query_err)?,
        )?;
        blocks += 1;
    }
    Ok(blocks)
}

/// What retention deletes once it has deleted the rows: the blocks before ?1, the first it
/// keeps. Each statement seeks by an index (`block_arms` by arm, then block), so that a pass
/// reads what it deletes rather than the whole table.
const DELETE_BLOCKS: [&str; 3] = [
    "DELETE FROM block_arms WHERE arm_id IN (SELECT id FROM arms) AND block < ?1",
    "DELETE FROM block_ids WHERE block < ?1",
    "DELETE FROM blocks WHERE block < ?1",
];
/// The other ids of the rows through seq ?1.
const DELETE_OTHER_IDS: &str = "DELETE FROM other_ids WHERE seq <= ?1";

/// Deletes the summaries of the blocks retention emptied (every seq through `seq`), and the
/// other ids of the rows it deleted.
pub(super) fn delete_through(c: &Connection, seq: i64) -> Result<(), LogError> {
    let below = (seq + 1) >> BLOCK_BITS;
    for sql in DELETE_BLOCKS {
        c.execute(sql, [below]).map_err(query_err)?;
    }
    c.execute(DELETE_OTHER_IDS, [seq]).map_err(query_err)?;
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
    fn every_millisecond_of_a_span_falls_in_a_bucket_its_block_is_listed_under() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |bound: i64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % bound as u64) as i64
        };
        let now = 1_800_000_000_000_i64;
        for _ in 0..20_000 {
            // Spans from a millisecond to years, anywhere in the 48 bits.
            let lo = if next(4) == 0 {
                next(1 << 48)
            } else {
                now + next(1 << 30)
            };
            let bits = next(44) + 1;
            let hi = (lo + next(1 << bits)).min((1 << 48) - 1);
            let listed = id_buckets(lo, hi);
            for x in [lo, hi, lo + (hi - lo) / 2, lo + next(hi - lo + 1)] {
                let probed: Vec<i64> = (0..ID_WIDTHS.len()).map(|l| id_bucket(l, x)).collect();
                assert!(
                    listed.iter().any(|b| probed.contains(b)),
                    "{x} in [{lo}, {hi}] listed under {listed:?}"
                );
            }
        }
        // A block's second of ids is listed at the finest width; a day's, coarser.
        assert_eq!(
            id_buckets(now, now + 900),
            [id_bucket(0, now), id_bucket(0, now + 900)]
        );
        assert_eq!(id_buckets(now, now + 86_400_000)[0], id_bucket(3, now));
    }

    #[test]
    fn a_lookup_by_id_reads_the_summaries_of_its_buckets_only() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(crate::decision_log::view::SCHEMA).unwrap();
        // 3,000 blocks of 20 ms each, then one block spanning a day, written in batches
        // that end inside blocks (a block's span grows after it was first listed).
        let start = 1_800_000_000_000_i64;
        let mut s = Summaries::default();
        for seq in 0..3_000_i64 << BLOCK_BITS {
            s.note(seq, seq, Some(start + seq / 51), 1);
            if seq % 70_001 == 0 {
                s.write(&c).unwrap();
            }
        }
        let day = 3_000_i64;
        s.note(first_seq(day), 0, Some(start), 2);
        s.note(last_seq(day), 0, Some(start + 86_400_000), 2);
        s.write(&c).unwrap();
        let listed: i64 = c
            .query_row("SELECT COUNT(*) FROM block_ids", [], |r| r.get(0))
            .unwrap();
        assert!(listed <= 2 * 3_001, "{listed} listings");
        for block in [0, 1, 1_234, 2_999] {
            // The block's rows' ids, and the day-long block, which spans them all.
            let ms = start + (first_seq(block) + 500) / 51;
            assert_eq!(of_id(&c, ms).unwrap(), [block, day], "block {block}");
        }
        assert_eq!(of_id(&c, start + 86_400_001).unwrap(), Vec::<i64>::new());
        assert_eq!(of_id(&c, start - 1).unwrap(), Vec::<i64>::new());
        // SQLite seeks the buckets rather than reading every summary.
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {OF_ID}"))
            .unwrap()
            .query_map([0_i64; 8], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().all(|p| !p.starts_with("SCAN")), "{plan:?}");

        // Retention of the first 1,000 blocks takes their summaries, listings and arms,
        // seeking rather than reading the tables whole.
        c.execute_batch(
            "INSERT INTO arms (id, model, version, digest, arm) VALUES \
             (1, 'credit-limit', 'v1', 'd1', 'stable'), (2, 'credit-limit', 'v2', 'd2', 'candidate')",
        )
        .unwrap();
        delete_through(&c, last_seq(999)).unwrap();
        let count = |table: &str, cond: &str| -> i64 {
            c.query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE {cond}"),
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        for table in ["blocks", "block_ids", "block_arms"] {
            assert_eq!(count(table, "block < 1000"), 0, "{table}");
            assert!(count(table, "block >= 1000") >= 2_001, "{table}");
        }
        assert_eq!(
            of_id(&c, start + (first_seq(1_234) + 500) / 51).unwrap(),
            [1_234, day]
        );
        for sql in DELETE_BLOCKS.iter().chain([&DELETE_OTHER_IDS]) {
            let plan: Vec<String> = c
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([0_i64], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|p| !p.starts_with("SCAN")),
                "{sql}: {plan:?}"
            );
        }
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
