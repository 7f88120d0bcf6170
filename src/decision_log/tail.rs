//! The tail: durable records the query view does not hold yet, in memory, so that every
//! acknowledged decision can be read at once (read-your-writes) and a retry of one is found.
//!
//! The writer pushes each durable group; the indexer takes batches from the front, and once
//! they are committed to the view, [`Tail::indexed_to`] drops them. A reader queries the
//! view in one read transaction, learns the view's checkpoint `c` there, and takes from the
//! tail what comes after `c`; if the tail was trimmed past `c` meanwhile (the indexer
//! committed in between), the reader simply asks again.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::journal::Position;
use super::names::FeatureNames;
use super::record::{self, Fields};
use super::{DecisionRecord, FastMap, LogError, RecordBody};

/// A durable record as the journal holds it: its bytes, read only when somebody asks.
#[derive(Debug)]
pub struct Entry {
    pub position: Position,
    /// The journal's payload: prev_hash (32) | hash (32) | record.
    payload: Vec<u8>,
    /// The request id, if this is a served (non-shadow) decision: the answer to a retry.
    pub request_id: Option<String>,
    /// What readers select a binary record by; None for format 1 (decoded to tell).
    keys: Option<Keys>,
}

/// What readers select a binary record by, read from its head once as it enters the tail,
/// so that a lookup compares bytes instead of parsing each record it passes. Parsing every
/// one made a history lookup take 81 ms at p99 while batch scoring kept tens of thousands
/// of records ahead of the view (BENCHMARKS.md, session 20).
#[derive(Debug, Clone, Copy)]
struct Keys {
    decision_id: [u8; 16],
    customer_ref: [u8; 32],
    shadow: bool,
}

impl Entry {
    /// The entry of a journal payload at `position`; `request_id` as the field says.
    pub fn new(position: Position, payload: Vec<u8>, request_id: Option<String>) -> Entry {
        let record = payload.get(64..).unwrap_or_default();
        let keys = record::is_binary(record.first())
            .then(|| record::Head::read(record).ok())
            .flatten()
            .map(|h| Keys {
                decision_id: *h.decision_id,
                customer_ref: *h.customer_ref,
                shadow: h.is_shadow(),
            });
        Entry {
            position,
            payload,
            request_id,
            keys,
        }
    }

    /// The journal's payload: prev_hash (32) | hash (32) | record.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    pub fn seq(&self) -> i64 {
        self.position.seq as i64
    }

    /// The bytes the chain hashes: binary (format 3, or 2), or format 1's JSON.
    pub fn record_bytes(&self) -> &[u8] {
        &self.payload[64..]
    }

    pub fn prev_hash(&self) -> &[u8; 32] {
        self.payload[..32].try_into().expect("32 bytes")
    }

    pub fn hash(&self) -> &[u8; 32] {
        self.payload[32..64].try_into().expect("32 bytes")
    }

    /// The record's fields in place, if it is binary (else its JSON must be decoded).
    pub fn fields(&self) -> Option<Fields<'_>> {
        if !record::is_binary(self.record_bytes().first()) {
            return None;
        }
        Fields::read(self.record_bytes()).ok()
    }

    /// The record, decoded.
    pub fn decode(&self, names: &FeatureNames) -> Result<DecisionRecord, LogError> {
        let damaged = |what: String| {
            LogError::Damaged(format!(
                "record seq {} (segment {}, offset {}): {what}",
                self.position.seq, self.position.segment, self.position.offset
            ))
        };
        let e = record::decode_entry(&self.payload).map_err(|e| damaged(e.to_string()))?;
        let body =
            record::decode_body(e.record, |d| names.get(d)).map_err(|e| damaged(e.to_string()))?;
        Ok(DecisionRecord {
            seq: self.seq(),
            body,
            prev_hash: e.prev_hash,
            hash: e.hash,
            replica: None,
        })
    }

    /// An entry read back from the journal, checked: a binary record must parse and have
    /// its feature names stored, a format-1 record must decode.
    pub fn read(
        position: Position,
        payload: Vec<u8>,
        names: &FeatureNames,
    ) -> Result<Entry, LogError> {
        if payload.len() <= 64 {
            return Err(LogError::Damaged(format!(
                "record seq {} (segment {}, offset {}): {} bytes, too short for an entry",
                position.seq,
                position.segment,
                position.offset,
                payload.len()
            )));
        }
        let mut e = Entry::new(position, payload, None);
        e.request_id = match e.fields() {
            Some(f) => {
                let digest = f.digest_text();
                match names.get(&digest) {
                    Some(n) if n.len() == f.feature_count() => {}
                    _ => {
                        return Err(e.decode(names).err().unwrap_or_else(|| {
                            LogError::Damaged(format!(
                                "record seq {}: no feature names fit {digest}",
                                position.seq
                            ))
                        }));
                    }
                }
                (!f.is_shadow()).then(|| f.request_id.to_string())
            }
            None => {
                let r = e.decode(names)?;
                (r.body.arm != "shadow").then_some(r.body.request_id)
            }
        };
        Ok(e)
    }
}

/// What a reader selects from the tail, compared on the bytes of binary records.
pub enum Select<'a> {
    /// The record of this decision id.
    Decision(&'a str),
    /// The records of these customer refs; with `before`, only served decisions before it.
    Customer {
        refs: &'a [String],
        before: Option<i64>,
    },
}

/// A [`Select`] with its ids as the bytes binary records hold, converted once per lookup.
pub struct Matcher<'a> {
    select: &'a Select<'a>,
    /// The decision id's bytes, if its text is the canonical form of some.
    decision_id: Option<[u8; 16]>,
    /// The refs that are canonical hex (lowercase, 64 digits): only those are in binary
    /// records, whose refs read back as such text.
    customer_refs: Vec<[u8; 32]>,
}

impl<'a> Select<'a> {
    pub fn matcher(&'a self) -> Matcher<'a> {
        let (mut decision_id, mut customer_refs) = (None, Vec::new());
        match self {
            Select::Decision(id) => {
                decision_id = uuid::Uuid::parse_str(id)
                    .ok()
                    .filter(|u| u.hyphenated().to_string() == *id)
                    .map(|u| *u.as_bytes());
            }
            Select::Customer { refs, .. } => {
                customer_refs = refs
                    .iter()
                    .filter(|r| !r.bytes().any(|b| b.is_ascii_uppercase()))
                    .filter_map(|r| {
                        let mut b = [0u8; 32];
                        hex::decode_to_slice(r, &mut b).ok().map(|()| b)
                    })
                    .collect();
            }
        }
        Matcher {
            select: self,
            decision_id,
            customer_refs,
        }
    }
}

impl Matcher<'_> {
    /// Whether `e` is selected; a format-1 record is decoded to tell.
    pub fn selects(&self, e: &Entry, names: &FeatureNames) -> bool {
        if let Select::Customer {
            before: Some(seq), ..
        } = self.select
            && e.seq() >= *seq
        {
            return false;
        }
        match &e.keys {
            Some(k) => match self.select {
                Select::Decision(_) => self.decision_id == Some(k.decision_id),
                Select::Customer { before, .. } => {
                    !(before.is_some() && k.shadow) && self.customer_refs.contains(&k.customer_ref)
                }
            },
            None => match e.decode(names) {
                Ok(r) => self.selects_body(&r.body),
                Err(_) => false,
            },
        }
    }

    fn selects_body(&self, b: &RecordBody) -> bool {
        match self.select {
            Select::Decision(id) => b.decision_id == *id,
            Select::Customer { refs, before } => {
                (before.is_none() || b.arm != "shadow") && refs.contains(&b.customer_ref)
            }
        }
    }
}

struct Inner {
    /// In seq order: every durable record after the view's checkpoint, and perhaps a few
    /// before it not yet dropped.
    records: VecDeque<Arc<Entry>>,
    /// Served (non-shadow) request ids of `records`, to their seq.
    by_request: FastMap<String, i64>,
    /// The binary records of `records` by customer ref (their seqs, in order) and by
    /// decision id, so that a lookup reads the few it wants rather than every record: the
    /// tail can hold tens of thousands under load, and a scan of them under this lock held
    /// the writer and the indexer up as well.
    by_customer: FastMap<[u8; 32], VecDeque<i64>>,
    by_decision: FastMap<[u8; 16], i64>,
    /// The seqs of records without keys (format 1, kept as JSON): decoded to be selected.
    unkeyed: VecDeque<i64>,
    /// The last seq the view holds.
    indexed: i64,
    /// The last durable seq.
    head: i64,
    /// Readers waiting for the view to reach a seq: the indexer then does not linger.
    waiting: usize,
    /// While the indexer waits for records: how many pending records it waits for (0: it
    /// is not waiting). A push wakes it only once there are that many, not on every group:
    /// each wake-up was a context switch on the core the requests share.
    wake_at: usize,
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
                by_request: FastMap::default(),
                by_customer: FastMap::default(),
                by_decision: FastMap::default(),
                unkeyed: VecDeque::new(),
                indexed,
                head,
                waiting: 0,
                wake_at: 0,
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
            if let Some(id) = &e.request_id {
                t.by_request.insert(id.clone(), e.seq());
            }
            match &e.keys {
                Some(k) => {
                    t.by_customer
                        .entry(k.customer_ref)
                        .or_default()
                        .push_back(e.seq());
                    // The first record of an id answers, as in the view (only a damaged
                    // or hand-made log repeats one).
                    t.by_decision.entry(k.decision_id).or_insert(e.seq());
                }
                None => t.unkeyed.push_back(e.seq()),
            }
            t.head = e.seq();
            t.records.push_back(e);
        }
        let pending = (t.head - t.indexed).max(0) as usize;
        let wake = t.wake_at > 0 && pending >= t.wake_at;
        drop(t);
        if wake {
            self.changed.notify_all();
        }
    }

    /// The served record of a request id, if the tail has it.
    pub fn find_request(&self, request_id: &str) -> Option<Arc<Entry>> {
        let t = self.lock();
        let seq = *t.by_request.get(request_id)?;
        let first = t.records.front()?.seq();
        t.records.get((seq - first) as usize).cloned()
    }

    /// The records after `c` that `m` selects, in seq order, or None if the tail no longer
    /// holds all of them (trimmed past `c`: read the view again). Only the records the maps
    /// name (and any without keys) are looked at.
    pub fn after(&self, c: i64, m: &Matcher<'_>, names: &FeatureNames) -> Option<Vec<Arc<Entry>>> {
        let t = self.lock();
        let kept_from = t.records.front().map_or(t.head + 1, |e| e.seq());
        if kept_from > c + 1 {
            return None;
        }
        let mut seqs: Vec<i64> = t.unkeyed.iter().copied().filter(|&s| s > c).collect();
        match m.select {
            Select::Decision(_) => {
                seqs.extend(m.decision_id.and_then(|id| t.by_decision.get(&id).copied()));
            }
            Select::Customer { .. } => {
                for r in &m.customer_refs {
                    seqs.extend(t.by_customer.get(r).into_iter().flatten().copied());
                }
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        Some(
            seqs.into_iter()
                .filter(|&s| s > c)
                .filter_map(|s| t.records.get((s - kept_from) as usize))
                .filter(|e| m.selects(e, names))
                .cloned()
                .collect(),
        )
    }

    /// How many keys the lookup maps hold (customers, decision ids, unkeyed records).
    #[cfg(test)]
    pub fn keys_held(&self) -> (usize, usize, usize) {
        let t = self.lock();
        (t.by_customer.len(), t.by_decision.len(), t.unkeyed.len())
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
            t.wake_at = 1;
            t = self.changed.wait(t).expect("decision log tail poisoned");
        }
        let until = Instant::now() + linger;
        let enough = (max / 8).max(1);
        loop {
            let pending = (t.head - t.indexed).max(0) as usize;
            let now = Instant::now();
            if t.closed || t.waiting > 0 || pending >= enough || now >= until {
                break;
            }
            t.wake_at = enough;
            t = self
                .changed
                .wait_timeout(t, until - now)
                .expect("decision log tail poisoned")
                .0;
        }
        t.wake_at = 0;
        let first = match t.records.front() {
            Some(e) => e.seq(),
            None => return Vec::new(),
        };
        let skip = (t.indexed + 1 - first).max(0) as usize;
        t.records.iter().skip(skip).take(max).cloned().collect()
    }

    /// The view holds everything up to `seq` now: drop it from the tail.
    pub fn indexed_to(&self, seq: i64) {
        let mut t = self.lock();
        t.indexed = t.indexed.max(seq);
        while t.records.front().is_some_and(|e| e.seq() <= seq) {
            let e = t.records.pop_front().expect("front");
            if let Some(id) = &e.request_id
                && t.by_request.get(id) == Some(&e.seq())
            {
                t.by_request.remove(id);
            }
            match &e.keys {
                // Seqs leave in the order they came, so each is the front of its list.
                Some(k) => {
                    if let Some(seqs) = t.by_customer.get_mut(&k.customer_ref) {
                        if seqs.front() == Some(&e.seq()) {
                            seqs.pop_front();
                        }
                        if seqs.is_empty() {
                            t.by_customer.remove(&k.customer_ref);
                        }
                    }
                    if t.by_decision.get(&k.decision_id) == Some(&e.seq()) {
                        t.by_decision.remove(&k.decision_id);
                    }
                }
                None => {
                    if t.unkeyed.front() == Some(&e.seq()) {
                        t.unkeyed.pop_front();
                    }
                }
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
