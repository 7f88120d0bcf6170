//! Which spans of the query view's customer index may hold a customer: a Bloom filter of the
//! customer keys of each complete span, so that a history lookup seeks in the spans the
//! customer was decided in rather than in every span of the log (at 10 M decisions that was
//! 38 seeks a lookup; view.rs says why customers are indexed per span).
//!
//! A span is complete once the view holds a row after it. Rows arrive in seq order and are
//! never added to an earlier span, only deleted (retention), so a complete span's filter
//! stays a superset of its keys for good: a filter can send a lookup to a span that no longer
//! holds the customer, never past one that does. The indexer builds each filter from the
//! span's index entries, stores it in the view (`customer_filters`, so that a start need not
//! rebuild them) and publishes it here for the readers. A span without a filter is always
//! searched: the newest, still filling, and any that a release before filters completed,
//! until the indexer has caught up on them (one after each batch, and all while it is idle).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use rusqlite::Connection;

use super::LogError;
use super::bloom::Bloom;
use super::view::{SPAN_BITS, query_err};

/// The filters of the complete spans, shared by the indexer (which adds them) and the
/// readers.
#[derive(Debug, Default)]
pub struct CustomerFilters {
    spans: RwLock<HashMap<i64, Arc<Bloom>>>,
}

/// A customer key as the filters hash it: splitmix64's finalizer over the key (FNV-1a of the
/// ref, whose high bits alone are poorly mixed). Stored filters depend on it: never change it.
fn hash(customer_key: i64) -> u64 {
    let mut z = customer_key as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl CustomerFilters {
    /// False if `span` certainly holds no row of `customer_key`; true if it may (or has no
    /// filter).
    pub fn may_hold(&self, span: i64, customer_key: i64) -> bool {
        self.spans
            .read()
            .expect("customer filters poisoned")
            .get(&span)
            .is_none_or(|f| f.may_contain(hash(customer_key)))
    }

    fn publish(&self, span: i64, filter: Bloom) {
        self.spans
            .write()
            .expect("customer filters poisoned")
            .insert(span, Arc::new(filter));
    }

    /// Drops the filters of spans below `span` (retention removed their rows).
    pub fn forget_below(&self, span: i64) {
        self.spans
            .write()
            .expect("customer filters poisoned")
            .retain(|s, _| *s >= span);
    }

    fn has(&self, span: i64) -> bool {
        self.spans
            .read()
            .expect("customer filters poisoned")
            .contains_key(&span)
    }
}

/// The view's first and last seq, or None when it is empty. (Two subqueries: SQLite reads
/// a lone MIN or MAX off the end of the table, but scans it for both in one.)
fn seq_range(conn: &Connection) -> Result<Option<(i64, i64)>, LogError> {
    conn.prepare_cached(
        "SELECT (SELECT MIN(seq) FROM decision_rows), (SELECT MAX(seq) FROM decision_rows)",
    )
    .map_err(query_err)?
    .query_row([], |r| {
        Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
    })
    .map_err(query_err)
}

/// The first and last span a lookup searches, or None when the view is empty.
pub(super) fn span_range(conn: &Connection) -> Result<Option<(i64, i64)>, LogError> {
    Ok(seq_range(conn)?.map(|(first, last)| (first >> SPAN_BITS, last >> SPAN_BITS)))
}

/// The complete spans that have no filter yet, oldest first, and where completeness ends.
#[derive(Debug, Default)]
pub(super) struct Pending {
    spans: VecDeque<i64>,
    /// Spans below this one are complete: filtered, or in `spans`.
    complete_end: i64,
}

impl Pending {
    /// Notes the spans completed by a batch of rows `first..=last` (seqs).
    pub fn note(&mut self, first: i64, last: i64) {
        // Spans before the batch's first that are not complete yet hold no row at all (the
        // view starts after a retention anchor): nothing to filter, and no lookup searches
        // below the view's first row.
        let from = self.complete_end.max(first >> SPAN_BITS);
        let end = (last + 1) >> SPAN_BITS;
        self.spans.extend(from..end);
        self.complete_end = self.complete_end.max(end);
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    #[cfg(test)]
    pub fn spans(&self) -> Vec<i64> {
        self.spans.iter().copied().collect()
    }
}

/// Loads the stored filters into `filters` and returns the complete spans that have none,
/// for [`build_one`]. A stored filter that does not read is rebuilt.
pub(super) fn load(conn: &Connection, filters: &CustomerFilters) -> Result<Pending, LogError> {
    let mut stored = conn
        .prepare("SELECT span, filter FROM customer_filters")
        .map_err(query_err)?;
    let mut rows = stored.query([]).map_err(query_err)?;
    while let Some(row) = rows.next().map_err(query_err)? {
        let span: i64 = row.get(0).map_err(query_err)?;
        let bytes = row.get_ref(1).map_err(query_err)?.as_blob().ok();
        match bytes.and_then(Bloom::from_bytes) {
            Some(f) => filters.publish(span, f),
            None => tracing::warn!(
                span,
                "a stored customer filter does not read; rebuilding it"
            ),
        }
    }
    let Some((first, last)) = seq_range(conn)? else {
        return Ok(Pending::default());
    };
    let complete_end = (last + 1) >> SPAN_BITS;
    Ok(Pending {
        spans: ((first >> SPAN_BITS)..complete_end)
            .filter(|s| !filters.has(*s))
            .collect(),
        complete_end,
    })
}

/// Builds, stores and publishes the filter of the oldest pending span.
pub(super) fn build_one(
    conn: &Connection,
    filters: &CustomerFilters,
    pending: &mut Pending,
) -> Result<(), LogError> {
    let Some(&span) = pending.spans.front() else {
        return Ok(());
    };
    // The span's entries of the customer index (the expression must read as the index's).
    let mut keys: Vec<i64> = conn
        .prepare_cached(&format!(
            "SELECT customer_key FROM decision_rows WHERE (seq >> {SPAN_BITS}) = ?1"
        ))
        .map_err(query_err)?
        .query_map([span], |r| r.get(0))
        .map_err(query_err)?
        .collect::<Result<_, _>>()
        .map_err(query_err)?;
    keys.sort_unstable();
    keys.dedup();
    let mut filter = Bloom::with_capacity(keys.len());
    for k in keys {
        filter.insert(hash(k));
    }
    conn.prepare_cached("INSERT OR REPLACE INTO customer_filters (span, filter) VALUES (?1, ?2)")
        .map_err(query_err)?
        .execute(rusqlite::params![span, filter.to_bytes()])
        .map_err(query_err)?;
    filters.publish(span, filter);
    pending.spans.pop_front();
    Ok(())
}

/// Deletes the stored filters of the spans retention emptied (every seq through `seq`).
pub(super) fn delete_through(conn: &Connection, seq: i64) -> Result<i64, LogError> {
    let below = (seq + 1) >> SPAN_BITS;
    conn.execute("DELETE FROM customer_filters WHERE span < ?1", [below])
        .map_err(query_err)?;
    Ok(below)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: i64 = 1 << SPAN_BITS;

    #[test]
    fn batches_list_each_span_they_complete_once_and_none_before_the_first_row() {
        let mut p = Pending::default();
        // A view that starts after a retention anchor, in span 3: spans 0 to 2 hold nothing.
        p.note(3 * SPAN + 5, 3 * SPAN + 9);
        assert!(p.is_empty());
        // The batch that ends on a span's last seq completes it.
        p.note(3 * SPAN + 10, 4 * SPAN - 1);
        assert_eq!(p.spans(), [3]);
        // Within span 4, nothing more; a batch across two boundaries completes both.
        p.note(4 * SPAN, 4 * SPAN + 1);
        p.note(4 * SPAN + 2, 6 * SPAN);
        assert_eq!(p.spans(), [3, 4, 5]);
        p.note(6 * SPAN + 1, 6 * SPAN + 2);
        assert_eq!(p.spans(), [3, 4, 5]);
    }

    #[test]
    fn a_span_without_a_filter_may_hold_anyone_and_one_with_a_filter_only_its_keys() {
        let filters = CustomerFilters::default();
        let mut f = Bloom::with_capacity(100);
        for k in 0..100 {
            f.insert(hash(k));
        }
        filters.publish(7, f);
        assert!((0..100).all(|k| filters.may_hold(7, k)));
        let strangers = (1_000..11_000).filter(|&k| filters.may_hold(7, k)).count();
        assert!(
            strangers < 300,
            "{strangers} of 10,000 keys not in the span"
        );
        assert!(
            filters.may_hold(8, 5_000),
            "no filter: the span is searched"
        );
        filters.forget_below(8);
        assert!(filters.may_hold(7, 5_000), "forgotten: searched again");
    }
}
