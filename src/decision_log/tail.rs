//! The tail: durable records the query view does not hold yet, in memory, so that every
//! acknowledged decision can be read at once (read-your-writes) and a retry of one is found.
//!
//! The writer pushes each durable group; the indexer takes batches from the front, and once
//! they are committed to the view, [`Tail::indexed_to`] drops them. A reader queries the
//! view in one read transaction, learns the view's checkpoint `c` there, and takes from the
//! tail what comes after `c`; if the tail was trimmed past `c` meanwhile (the indexer
//! committed in between), the reader simply asks again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::DecisionRecord;
use super::journal::Position;

/// A durable record and where the journal holds it.
#[derive(Debug)]
pub struct Entry {
    pub record: DecisionRecord,
    pub position: Position,
    /// Stored in format 2: its fields are in canonical form, so the view keeps them as
    /// bytes and numbers (a format-1 record keeps its JSON there).
    pub compact: bool,
}

struct Inner {
    /// In seq order: every durable record after the view's checkpoint, and perhaps a few
    /// before it not yet dropped.
    records: VecDeque<Arc<Entry>>,
    /// Served (non-shadow) request ids of `records`, to their seq.
    by_request: HashMap<String, i64>,
    /// The last seq the view holds.
    indexed: i64,
    /// The last durable seq.
    head: i64,
    /// Readers waiting for the view to reach a seq: the indexer then does not linger.
    waiting: usize,
    closed: bool,
}

pub struct Tail {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Tail {
    /// A tail after `indexed` (the view's checkpoint), the journal's last record at `head`.
    pub fn new(indexed: i64, head: i64) -> Tail {
        Tail {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                by_request: HashMap::new(),
                indexed,
                head,
                waiting: 0,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("decision log tail poisoned")
    }

    /// Adds a durable group (in seq order).
    pub fn push(&self, entries: Vec<Arc<Entry>>) {
        let mut t = self.lock();
        for e in entries {
            if e.record.body.arm != "shadow" {
                t.by_request
                    .insert(e.record.body.request_id.clone(), e.record.seq);
            }
            t.head = e.record.seq;
            t.records.push_back(e);
        }
        drop(t);
        self.changed.notify_all();
    }

    /// The served record of a request id, if the tail has it.
    pub fn find_request(&self, request_id: &str) -> Option<Arc<Entry>> {
        let t = self.lock();
        let seq = *t.by_request.get(request_id)?;
        let first = t.records.front()?.record.seq;
        t.records.get((seq - first) as usize).cloned()
    }

    /// The records after `c` that `keep` selects, or None if the tail no longer holds all of
    /// them (trimmed past `c`: read the view again).
    pub fn after(
        &self,
        c: i64,
        mut keep: impl FnMut(&DecisionRecord) -> bool,
    ) -> Option<Vec<Arc<Entry>>> {
        let t = self.lock();
        let kept_from = t.records.front().map_or(t.head + 1, |e| e.record.seq);
        if kept_from > c + 1 {
            return None;
        }
        let skip = (c + 1 - kept_from) as usize;
        Some(
            t.records
                .iter()
                .skip(skip)
                .filter(|e| keep(&e.record))
                .cloned()
                .collect(),
        )
    }

    /// The last durable seq.
    pub fn head(&self) -> i64 {
        self.lock().head
    }

    /// Whether a reader waits for the view to reach a seq.
    pub fn readers_waiting(&self) -> bool {
        self.lock().waiting > 0
    }

    /// How many durable records the view does not hold yet.
    pub fn lag(&self) -> i64 {
        let t = self.lock();
        t.head - t.indexed
    }

    /// For the indexer: up to `max` records after the view's checkpoint. Waits for the first
    /// one; then, unless a reader is waiting, up to `linger` for a batch of at least `max / 8`.
    /// Empty once closed and drained.
    pub fn next_batch(&self, max: usize, linger: Duration) -> Vec<Arc<Entry>> {
        let mut t = self.lock();
        loop {
            let pending = (t.head - t.indexed).max(0) as usize;
            if pending > 0 || t.closed {
                break;
            }
            t = self.changed.wait(t).expect("decision log tail poisoned");
        }
        let until = Instant::now() + linger;
        loop {
            let pending = (t.head - t.indexed).max(0) as usize;
            let now = Instant::now();
            if t.closed || t.waiting > 0 || pending >= max / 8 || now >= until {
                break;
            }
            t = self
                .changed
                .wait_timeout(t, until - now)
                .expect("decision log tail poisoned")
                .0;
        }
        let first = match t.records.front() {
            Some(e) => e.record.seq,
            None => return Vec::new(),
        };
        let skip = (t.indexed + 1 - first).max(0) as usize;
        t.records.iter().skip(skip).take(max).cloned().collect()
    }

    /// The view holds everything up to `seq` now: drop it from the tail.
    pub fn indexed_to(&self, seq: i64) {
        let mut t = self.lock();
        t.indexed = t.indexed.max(seq);
        while t.records.front().is_some_and(|e| e.record.seq <= seq) {
            let e = t.records.pop_front().expect("front");
            let r = &e.record;
            if r.body.arm != "shadow" && t.by_request.get(&r.body.request_id) == Some(&r.seq) {
                t.by_request.remove(&r.body.request_id);
            }
        }
        drop(t);
        self.changed.notify_all();
    }

    /// Waits until the view holds `seq`; false on timeout or once closed.
    pub fn wait_indexed(&self, seq: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut t = self.lock();
        t.waiting += 1;
        self.changed.notify_all();
        let reached = loop {
            if t.indexed >= seq {
                break true;
            }
            let now = Instant::now();
            if t.closed || now >= deadline {
                break false;
            }
            t = self
                .changed
                .wait_timeout(t, deadline - now)
                .expect("decision log tail poisoned")
                .0;
        };
        t.waiting -= 1;
        reached
    }

    /// Whether [`Tail::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// No more pushes: the indexer drains what is left and stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}
