//! The hash chain over decision records, and its verification.
//!
//! `hash = sha256(prev_hash ‖ "\n" ‖ the record's bytes)`: for the journal's records the
//! binary record of [`super::record`] (format 3, or 2 before it), for format 1 (a log
//! written before the journal) the canonical JSON of the body. The first record's
//! `prev_hash` is [`GENESIS`]. The sequence number is not hashed, so a swap of two records
//! shows as broken links rather than as edits, and verification can say which it was.
//!
//! Retention: records older than a cut-off may be removed together with writing an *anchor*
//! (the seq and hash of the last removed record); verification then starts from the anchor
//! instead of genesis, so the remaining chain still verifies and any other removal shows.

use sha2::{Digest as _, Sha256};

use super::{DecisionRecord, RecordBody};

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "genesis";

/// The hash a format-1 record (canonical JSON) with this body must carry after `prev_hash`.
pub fn link_hash(prev_hash: &str, body: &RecordBody) -> String {
    let canonical = serde_json::to_vec(body).expect("a record body always serialises");
    hex::encode(link_hash_bytes(prev_hash, &canonical))
}

/// The hash of a record whose stored bytes are `record`, after `prev_hash`.
pub fn link_hash_bytes(prev_hash: &str, record: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(record);
    h.finalize().into()
}

/// What is wrong at the first broken link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// A record's contents no longer match its hash.
    Edited,
    /// A record is missing.
    Deleted,
    /// A record that the chain does not link through.
    Inserted,
    /// Records are out of their chain order.
    Reordered,
    /// The stored bytes fail their checksum or cannot be read.
    Corrupt,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::Edited => "edited",
            BreakKind::Deleted => "deleted",
            BreakKind::Inserted => "inserted",
            BreakKind::Reordered => "reordered",
            BreakKind::Corrupt => "corrupt",
        }
    }
}

/// The first broken link of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Break {
    pub seq: i64,
    pub decision_id: String,
    pub kind: BreakKind,
    pub detail: String,
}

/// The outcome of a walk over the whole log.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub records: u64,
    /// The last record's hash: anchor it elsewhere to detect a rewritten tail.
    pub head_hash: String,
    pub first_break: Option<Break>,
}

/// Walks records in seq order, keeping only a window of three, so that a log of any size
/// verifies in constant memory.
pub struct Verifier<'a> {
    /// What the first record must link to: genesis, or the retention anchor.
    start: String,
    records: u64,
    before_prev: Option<DecisionRecord>,
    prev: Option<DecisionRecord>,
    /// A record whose link is broken, waiting for its successor to classify the break.
    pending: Option<DecisionRecord>,
    first_break: Option<Break>,
    /// The seq of the record carrying this hash, if any.
    find_seq: &'a mut dyn FnMut(&str) -> Option<i64>,
}

impl<'a> Verifier<'a> {
    /// `anchor` is the (seq, hash) of the last record removed by retention, if any.
    pub fn new(
        find_seq: &'a mut dyn FnMut(&str) -> Option<i64>,
        anchor: Option<(i64, String)>,
    ) -> Self {
        Verifier {
            start: anchor.map_or_else(|| GENESIS.to_string(), |(_, hash)| hash),
            records: 0,
            before_prev: None,
            prev: None,
            pending: None,
            first_break: None,
            find_seq,
        }
    }

    /// Feeds the next record (a format-1 one, its hash recomputed from the body); returns
    /// false once the first break is known.
    pub fn push(&mut self, record: DecisionRecord) -> bool {
        let actual = link_hash(&record.prev_hash, &record.body);
        self.push_hashed(record, &actual)
    }

    /// Feeds the next record with `actual`, the hash its stored bytes have after its
    /// `prev_hash`; returns false once the first break is known.
    pub fn push_hashed(&mut self, record: DecisionRecord, actual: &str) -> bool {
        self.records += 1;
        if let Some(pending) = self.pending.take() {
            self.first_break = Some(self.classify(&pending, Some(&record)));
            return false;
        }
        if actual != record.hash {
            self.first_break = Some(Break {
                seq: record.seq,
                decision_id: record.body.decision_id.clone(),
                kind: BreakKind::Edited,
                detail: format!(
                    "record seq {} (decision {}) was edited: its contents do not match its hash",
                    record.seq, record.body.decision_id
                ),
            });
            return false;
        }
        let expected = self
            .prev
            .as_ref()
            .map_or(self.start.as_str(), |p| p.hash.as_str());
        if record.prev_hash != expected {
            self.pending = Some(record);
            return true;
        }
        self.before_prev = self.prev.replace(record);
        true
    }

    /// Ends the walk at a record that cannot be read: `seq` and `detail` name it.
    pub fn corrupt(mut self, seq: i64, detail: String) -> VerifyReport {
        if self.first_break.is_none() {
            self.first_break = Some(Break {
                seq,
                decision_id: String::new(),
                kind: BreakKind::Corrupt,
                detail,
            });
        }
        self.finish(None)
    }

    /// Ends the walk. `head` is the (seq, hash) the writer last committed, if recorded.
    pub fn finish(mut self, head: Option<(i64, String)>) -> VerifyReport {
        if let Some(pending) = self.pending.take() {
            self.first_break = Some(self.classify(&pending, None));
        }
        let last = self.prev.as_ref();
        if self.first_break.is_none()
            && let Some((head_seq, head_hash)) = head
            && last.is_none_or(|l| l.seq != head_seq || l.hash != head_hash)
        {
            self.first_break = Some(Break {
                seq: last.map_or(0, |l| l.seq),
                decision_id: last.map(|l| l.body.decision_id.clone()).unwrap_or_default(),
                kind: BreakKind::Deleted,
                detail: format!(
                    "the log ends at seq {} but the writer's last commit was seq {head_seq}: \
                     records at the end were removed",
                    last.map_or(0, |l| l.seq)
                ),
            });
        }
        VerifyReport {
            records: self.records,
            head_hash: self
                .prev
                .as_ref()
                .map_or_else(|| self.start.clone(), |p| p.hash.clone()),
            first_break: self.first_break,
        }
    }

    /// `r` does not link to the record before it; say why, looking one record around, and
    /// name the record at fault.
    fn classify(&mut self, r: &DecisionRecord, next: Option<&DecisionRecord>) -> Break {
        let prev_hash = self
            .prev
            .as_ref()
            .map_or(self.start.as_str(), |p| p.hash.as_str());
        let before_prev_hash = self.before_prev.as_ref().map(|p| p.hash.as_str());
        let at = |rec: &DecisionRecord, kind, detail: String| Break {
            seq: rec.seq,
            decision_id: rec.body.decision_id.clone(),
            kind,
            detail,
        };
        let id = &r.body.decision_id;
        if next.is_some_and(|n| n.prev_hash == prev_hash) {
            // The chain runs from prev straight to next: r does not belong.
            return at(
                r,
                BreakKind::Inserted,
                format!(
                    "record seq {} (decision {id}) was inserted: the chain does not pass through it",
                    r.seq
                ),
            );
        }
        if let Some(p) = &self.prev
            && Some(r.prev_hash.as_str()) == before_prev_hash
        {
            // The chain skips prev.
            return at(
                p,
                BreakKind::Inserted,
                format!(
                    "record seq {} (decision {}) was inserted: the chain does not pass through it",
                    p.seq, p.body.decision_id
                ),
            );
        }
        match (self.find_seq)(&r.prev_hash) {
            Some(seq) if seq > r.seq => {
                return at(
                    r,
                    BreakKind::Reordered,
                    format!(
                        "record seq {} (decision {id}) is out of order: the record it follows sits later, at seq {seq}",
                        r.seq
                    ),
                );
            }
            Some(seq) => {
                return at(
                    r,
                    BreakKind::Inserted,
                    format!(
                        "record seq {} (decision {id}) was inserted: it links to seq {seq}, which already has a successor",
                        r.seq
                    ),
                );
            }
            None => {}
        }
        let prev_seq = self.prev.as_ref().map_or(0, |p| p.seq);
        at(
            r,
            BreakKind::Deleted,
            format!(
                "a record is missing between seq {prev_seq} and seq {} (decision {id}): deleted",
                r.seq
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn chain(n: usize) -> Vec<DecisionRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let body = RecordBody {
                    decision_id: format!("d{i}"),
                    recorded_at: format!("2026-01-01T00:00:{i:02}Z"),
                    request_id: format!("r{i}"),
                    request_hash: String::new(),
                    customer_ref: "c".into(),
                    key_id: "k".into(),
                    model: "m".into(),
                    version: "v1".into(),
                    digest: "sha256:x".into(),
                    rollout_id: None,
                    arm: "champion".into(),
                    features: BTreeMap::from([("A".into(), i as f64)]),
                    probability_of_default: 0.1,
                    grade: "A".into(),
                    decision: "approve".into(),
                    current_limit: Some(1000),
                    granted_limit: 1000,
                    reasons: vec![],
                    caller: None,
                    trace_id: None,
                    remediates: None,
                    pre_harm_limit: None,
                    reason: None,
                };
                let hash = link_hash(&prev, &body);
                let r = DecisionRecord {
                    seq: i as i64,
                    body,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                    replica: None,
                };
                prev = hash;
                r
            })
            .collect()
    }

    fn verify(records: &[DecisionRecord], head: Option<(i64, String)>) -> VerifyReport {
        let all = records.to_vec();
        let mut find = |h: &str| all.iter().find(|r| r.hash == h).map(|r| r.seq);
        let mut v = Verifier::new(&mut find, None);
        for r in records {
            if !v.push(r.clone()) {
                break;
            }
        }
        v.finish(head)
    }

    fn kind(report: &VerifyReport) -> Option<(i64, BreakKind)> {
        report.first_break.as_ref().map(|b| (b.seq, b.kind))
    }

    #[test]
    fn an_intact_chain_verifies() {
        let c = chain(5);
        let report = verify(&c, Some((5, c[4].hash.clone())));
        assert_eq!(report.first_break, None);
        assert_eq!(report.records, 5);
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let c = chain(8);
        let mut edited = c.clone();
        edited[3].body.granted_limit = 0;
        assert_eq!(kind(&verify(&edited, None)), Some((4, BreakKind::Edited)));

        let mut deleted = c.clone();
        deleted.remove(3);
        assert_eq!(kind(&verify(&deleted, None)), Some((5, BreakKind::Deleted)));

        let mut swapped = c.clone();
        let (a, b) = (swapped[2].clone(), swapped[5].clone());
        swapped[2] = DecisionRecord { seq: 3, ..b };
        swapped[5] = DecisionRecord { seq: 6, ..a };
        assert_eq!(
            kind(&verify(&swapped, None)),
            Some((3, BreakKind::Reordered))
        );

        let mut inserted = c.clone();
        let mut forged = c[3].clone();
        forged.body.decision_id = "forged".into();
        forged.hash = link_hash(&forged.prev_hash, &forged.body);
        inserted.insert(4, forged);
        for (i, r) in inserted.iter_mut().enumerate() {
            r.seq = i as i64 + 1;
        }
        let report = verify(&inserted, None);
        assert_eq!(
            report.first_break.as_ref().unwrap().kind,
            BreakKind::Inserted
        );
        assert!(report.first_break.unwrap().detail.contains("forged"));

        let mut appended = c.clone();
        let mut forged = c[2].clone();
        forged.body.decision_id = "forged-at-end".into();
        forged.hash = link_hash(&forged.prev_hash, &forged.body);
        forged.seq = 9;
        appended.push(forged);
        assert_eq!(
            kind(&verify(&appended, None)),
            Some((9, BreakKind::Inserted))
        );

        // Retention: the first three removed behind an anchor still verify; without the
        // anchor, the removal shows.
        let mut find = |_: &str| None;
        let mut v = Verifier::new(&mut find, Some((3, c[2].hash.clone())));
        for r in &c[3..] {
            assert!(v.push(r.clone()));
        }
        assert_eq!(v.finish(None).first_break, None);
        assert_eq!(kind(&verify(&c[3..], None)), Some((4, BreakKind::Deleted)));

        let tail = &c[..6];
        let report = verify(tail, Some((8, c[7].hash.clone())));
        assert_eq!(kind(&report), Some((6, BreakKind::Deleted)));
    }
}
