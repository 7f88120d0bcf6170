//! One group commit's plan, the same for every backend: which decisions of the queued jobs
//! become new records of the chain, which are retries of a recorded request (the first
//! decision stands), and which jobs are refused whole (all or none). The backend says how a
//! request id is looked up outside the group and how a record is chained; it then writes
//! the new records and answers each job with [`answers`].

use std::sync::Arc;

use tokio::sync::oneshot;

use super::names::FeatureNames;
use super::record::{self, CompactBody, StoredOrder};
use super::{Appended, DecisionRecord, FastMap, LogError, NewBody, RecordBody};

/// What a job is answered: every decision of its group, or why none was recorded.
pub(super) type GroupAnswer = Result<Vec<Appended>, LogError>;

/// Decisions to record together: one for `append`, several for `append_all`, which are
/// recorded all or none.
pub(super) struct Job {
    pub bodies: Vec<NewBody>,
    pub reply: oneshot::Sender<GroupAnswer>,
}

/// The end of a chain.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub seq: i64,
    /// As the next link hashes it: 64 hex digits, or the genesis text.
    pub hash: String,
    /// The same hash as bytes, once a link of this writer made it, so that the next link
    /// need not decode it.
    bytes: Option<[u8; 32]>,
}

impl Head {
    pub fn new(seq: i64, hash: String) -> Head {
        Head {
            seq,
            hash,
            bytes: None,
        }
    }
}

/// An answer before the group's records are written.
pub(super) enum Answer {
    /// The i-th new record of the group.
    New(usize),
    /// A retry of a recorded request (in this group or before): the first decision stands.
    Existing(Box<DecisionRecord>),
}

/// A job's plan: an answer per decision, or why the job is refused whole.
pub(super) type Planned = Result<Vec<Answer>, LogError>;

/// How a backend looks up and chains records.
pub(super) trait Chainer {
    /// A new record, ready to be written.
    type Entry;

    /// The record a served request id was recorded with before this group, if any.
    fn recorded_before(&self, request_id: &str) -> Result<Option<DecisionRecord>, LogError>;

    /// A new record of this group, read back (a retry within the group is answered with it).
    fn decode(&self, entry: &Self::Entry) -> Result<DecisionRecord, LogError>;

    /// The next record of the chain after `head`, which moves on to it.
    fn chain(&mut self, head: &mut Head, body: NewBody) -> Self::Entry;

    /// The request id a new record answers (None for a shadow decision).
    fn request_id(entry: &Self::Entry) -> Option<&str>;
}

/// The group's new records and each job's answer, with `head` moved past the new records.
/// The jobs' bodies move into the records: nothing is copied.
pub(super) fn plan<C: Chainer>(
    chainer: &mut C,
    head: &mut Head,
    jobs: &mut [Job],
) -> (Vec<C::Entry>, Vec<Planned>) {
    // Served request ids new in this group, to their record (a retry within the group).
    let mut in_group: FastMap<String, usize> = FastMap::default();
    let mut fresh: Vec<C::Entry> = Vec::new();
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (job_head, job_fresh) = (head.clone(), fresh.len());
        let mut out = Vec::with_capacity(job.bodies.len());
        let mut refused = None;
        for body in std::mem::take(&mut job.bodies) {
            if !body.is_shadow() {
                let id = body.request_id();
                let before = match in_group.get(id) {
                    Some(&i) => chainer.decode(&fresh[i]).map(Some),
                    None => chainer.recorded_before(id),
                };
                match before {
                    Ok(Some(r)) if body.same_request(&r) => {
                        out.push(Answer::Existing(Box::new(r)));
                        continue;
                    }
                    Ok(Some(_)) => {
                        refused = Some(LogError::RequestIdReused(id.to_string()));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            let entry = chainer.chain(head, body);
            if let Some(id) = C::request_id(&entry) {
                in_group.insert(id.to_string(), fresh.len());
            }
            out.push(Answer::New(fresh.len()));
            fresh.push(entry);
        }
        match refused {
            Some(e) => {
                // All or none: undo what this job added.
                *head = job_head;
                for f in fresh.drain(job_fresh..) {
                    if let Some(id) = C::request_id(&f) {
                        in_group.remove(id);
                    }
                }
                answers.push(Err(e));
            }
            None => answers.push(Ok(out)),
        }
    }
    (fresh, answers)
}

/// Each job's answer once its group is written; `seq` gives the i-th new record's seq.
pub(super) fn answers(planned: Vec<Planned>, seq: impl Fn(usize) -> i64) -> Vec<GroupAnswer> {
    planned
        .into_iter()
        .map(|answer| {
            answer.map(|list| {
                list.into_iter()
                    .map(|a| match a {
                        Answer::New(i) => Appended::New { seq: seq(i) },
                        Answer::Existing(r) => Appended::Existing(r),
                    })
                    .collect()
            })
        })
        .collect()
}

/// Puts a chain link together: `prev_hash (32) | hash (32) | record`, the record's bytes as
/// [`Encoder`] makes them, the hash over them after `head`, which moves on to it. Returns
/// the served request id, if any.
pub(super) fn link(
    encoder: &mut Encoder,
    head: &mut Head,
    body: NewBody,
    payload: &mut Vec<u8>,
) -> Option<String> {
    match &head.bytes {
        Some(prev) => payload.extend_from_slice(prev),
        None => record::put_prev_hash(payload, &head.hash),
    }
    // The hash goes here once the record after it is written.
    let at = payload.len();
    payload.extend_from_slice(&[0u8; 32]);
    let request_id = encoder.put(body, payload);
    let hash = super::chain::link_hash_bytes(&head.hash, &payload[at + 32..]);
    payload[at..at + 32].copy_from_slice(&hash);
    head.seq += 1;
    let mut digits = [0u8; 64];
    hex::encode_to_slice(hash, &mut digits).expect("64 digits");
    head.hash.clear();
    head.hash
        .push_str(std::str::from_utf8(&digits).expect("hex is ASCII"));
    head.bytes = Some(hash);
    request_id
}

/// Turns bodies into the bytes a record is stored and hashed as: format 3 where the
/// bundle's feature names are stored (or can be) and the body fits, else its JSON.
pub(super) struct Encoder {
    pub names: Arc<FeatureNames>,
    /// How each bundle's stored names order its vectors, by digest (None: they do not fit).
    orders: FastMap<[u8; 32], Option<Arc<StoredOrder>>>,
}

impl Encoder {
    pub fn new(names: Arc<FeatureNames>) -> Encoder {
        Encoder {
            names,
            orders: FastMap::default(),
        }
    }

    /// Appends `body`'s record bytes to `out`; returns the request id it answers unless it
    /// is a shadow decision.
    pub fn put(&mut self, body: NewBody, out: &mut Vec<u8>) -> Option<String> {
        match body {
            NewBody::Compact(c) => {
                let compact = self
                    .order(&c)
                    .is_some_and(|order| record::encode_compact(&c, &order, out).is_ok());
                if !compact {
                    self.put_text(&c.body(), out);
                }
                (!c.is_shadow()).then_some(c.request_id)
            }
            NewBody::Text(b) => {
                self.put_text(&b, out);
                (b.arm != "shadow").then_some(b.request_id)
            }
        }
    }

    /// How the stored names of a compact body's bundle order its vector (storing the names
    /// of a bundle first seen, in its schema order); None when they do not fit its schema,
    /// and the record is then stored as JSON.
    fn order(&mut self, c: &CompactBody) -> Option<Arc<StoredOrder>> {
        if let Some(order) = self.orders.get(&c.digest) {
            return order.clone();
        }
        let digest = format!("sha256:{}", hex::encode(c.digest));
        match self.names.ensure(&digest, c.names.to_vec()) {
            Ok(stored) => {
                let order = StoredOrder::new(&stored, &c.names).map(Arc::new);
                self.orders.insert(c.digest, order.clone());
                order
            }
            Err(e) => {
                // Not remembered: the next record tries to store the names again.
                tracing::warn!(error = %e, digest, "feature names not stored; recording as JSON");
                None
            }
        }
    }

    /// Appends a text body's bytes: format 3 if its names are stored (or can be) and it is
    /// canonical, else its JSON (still chained and verifiable, only larger).
    fn put_text(&self, body: &RecordBody, out: &mut Vec<u8>) {
        let names = match self.names.get(&body.digest) {
            Some(n) => Some(n),
            None => match self
                .names
                .ensure(&body.digest, body.features.keys().cloned().collect())
            {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, digest = %body.digest, "feature names not stored; recording as JSON");
                    None
                }
            },
        };
        out.extend_from_slice(&record::body_bytes(
            body,
            names.as_deref().map(|n| n.as_slice()),
        ));
    }
}
