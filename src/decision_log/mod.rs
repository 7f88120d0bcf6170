//! The decision log: every decision, durable before it is answered, in a hash chain.
//!
//! A [`DecisionLog`] takes decisions from the request path and says when each is durable;
//! the request answers only then. The embedded backend is [`JournalLog`]: decisions are
//! acknowledged from an append-only [`journal`] of compact binary records ([`record`]), one
//! write and one fdatasync per group of concurrent decisions ([`writer`]), and queried from
//! a SQLite view ([`view`]) that reviewers can open with any SQLite tool, built off the
//! request path; what the view does not hold yet is served from memory ([`tail`]). Each
//! record carries the hash of the one before it, so [`chain`] can tell an edited, deleted,
//! inserted or reordered record from an intact log. [`migrate`] owns the directory's
//! formats.

mod blocks;
mod bloom;
pub mod chain;
mod customer_filter;
mod group;
pub mod journal;
mod journaled;
mod migrate;
mod names;
pub mod postgres;
pub mod record;
mod seen;
mod tail;
mod view;
mod writer;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The maps the writer keeps by request id, one insert or lookup per decision on the
/// acknowledgement path: foldhash (randomly seeded per map, as hashbrown's default) hashes a
/// short key several times faster than the standard library's SipHash.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use chain::{Break, BreakKind, VerifyReport};
pub use journaled::{JournalLog, LogFiles, LogOptions, scan_offline, verify_offline};
pub use postgres::{PgLog, PgLogOptions};

/// How hard a commit is pushed to disk before its requests are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: each group commit is fsynced before anyone is answered. Nothing
    /// acknowledged is lost on a process crash, an OS crash or a power loss.
    #[default]
    Sync,
    /// `synchronous=NORMAL`: commits are written but fsynced only at WAL checkpoints. Nothing
    /// acknowledged is lost when the process dies; an OS crash or power loss can lose every
    /// decision committed since the last checkpoint (up to 16,384 pages, 64 MiB, of WAL).
    Async,
}

/// A principal reason as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedReason {
    pub feature: String,
    pub contribution: f64,
    pub value: f64,
}

/// Everything recorded of a decision except its place in the chain. Field order is the
/// canonical order hashed by the chain; never reorder, only append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordBody {
    pub decision_id: String,
    /// RFC 3339, UTC, microseconds: sorts as text in time order.
    pub recorded_at: String,
    pub request_id: String,
    /// sha256 of the request's inputs, for idempotent retries.
    pub request_hash: String,
    /// HMAC of the customer id; the raw id is never stored.
    pub customer_ref: String,
    /// Which customer key made `customer_ref`.
    pub key_id: String,
    pub model: String,
    pub version: String,
    pub digest: String,
    pub rollout_id: Option<String>,
    pub arm: String,
    /// The vector exactly as scored, by feature name (imputed values included).
    pub features: BTreeMap<String, f64>,
    pub probability_of_default: f64,
    pub grade: String,
    pub decision: String,
    pub current_limit: Option<i64>,
    pub granted_limit: i64,
    pub reasons: Vec<RecordedReason>,
    pub caller: Option<String>,
    pub trace_id: Option<String>,
    // Remediation only (issue 18). Absent, they are left out of the JSON, so every record
    // written before them keeps its bytes and its hash; a body with any of them set is not
    // format 3 (`record::encode` refuses it) and is stored as its JSON (format 1).
    /// The harmful decision a remediation restores the limit of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediates: Option<String>,
    /// The limit the remediation was decided on: the customer's limit before the harmful
    /// decision (its `current_limit` is the harmed limit). Replay decides on this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_harm_limit: Option<i64>,
    /// Why the operator applied the remediation, in their words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RecordBody {
    /// The limit the decision was made on: the pre-harm limit of a remediation, the current
    /// limit the caller gave otherwise.
    pub fn decided_on_limit(&self) -> Option<i64> {
        self.pre_harm_limit.or(self.current_limit)
    }
}

/// A decision on its way into the log: compact, as the recorder makes it (stored as format 3),
/// or in text form (stored as format 3 if it is canonical, else as its JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum NewBody {
    Compact(record::CompactBody),
    Text(RecordBody),
}

impl From<RecordBody> for NewBody {
    fn from(b: RecordBody) -> Self {
        NewBody::Text(b)
    }
}

impl From<record::CompactBody> for NewBody {
    fn from(c: record::CompactBody) -> Self {
        NewBody::Compact(c)
    }
}

impl NewBody {
    pub fn request_id(&self) -> &str {
        match self {
            NewBody::Compact(c) => &c.request_id,
            NewBody::Text(b) => &b.request_id,
        }
    }

    /// A shadow decision is never an answer to its request id.
    pub fn is_shadow(&self) -> bool {
        match self {
            NewBody::Compact(c) => c.is_shadow(),
            NewBody::Text(b) => b.arm == "shadow",
        }
    }

    /// Whether `r` was recorded for the same request: the same request hash.
    pub fn same_request(&self, r: &DecisionRecord) -> bool {
        match self {
            NewBody::Compact(c) => {
                let mut hex = [0u8; 64];
                hex::encode_to_slice(c.request_hash, &mut hex).expect("64 digits");
                r.body.request_hash.as_bytes() == hex
            }
            NewBody::Text(b) => b.request_hash == r.body.request_hash,
        }
    }
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRecord {
    /// Position in the chain, from 1.
    pub seq: i64,
    pub body: RecordBody,
    pub prev_hash: String,
    pub hash: String,
    /// The replica whose chain holds it, on a shared store; none on the embedded store.
    pub replica: Option<String>,
}

/// What became of an appended decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Recorded now, at this seq.
    New { seq: i64 },
    /// The request id was already recorded with the same inputs: the earlier decision stands.
    Existing(Box<DecisionRecord>),
}

/// Why the log refused or could not serve.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log cannot be written now; nothing of this decision was acknowledged.
    #[error("decision log unavailable: {0}")]
    Unavailable(String),
    /// The request id was recorded before with different inputs.
    #[error("request_id {0} was already used for a different request")]
    RequestIdReused(String),
    /// The log's file is not what the writer left (replaced, truncated, or corrupt).
    #[error("decision log is damaged: {0}")]
    Damaged(String),
    #[error("decision log query failed: {0}")]
    Query(String),
}

/// A decision on its way to disk.
pub type AppendFuture = Pin<Box<dyn Future<Output = Result<Appended, LogError>> + Send>>;

/// Resolves when a group of decisions is durable (all of them) or failed (none of them).
pub type AppendAllFuture = Pin<Box<dyn Future<Output = Result<Vec<Appended>, LogError>> + Send>>;

/// Aggregates of what one version decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionStats {
    pub decisions: u64,
    pub approve: u64,
    pub review: u64,
    pub decline: u64,
    /// Granted above the current limit.
    pub raised: u64,
    pub held: u64,
    /// Granted below the current limit, but above zero.
    pub cut: u64,
    /// Granted zero while the current limit was above zero.
    pub withdrawn: u64,
    /// No current limit was given.
    pub new_customers: u64,
}

/// Bins of the PD histograms: equal widths over [0, 1].
pub const PD_BINS: usize = 20;

/// What one arm of a rollout decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmSummary {
    /// champion, candidate, shadow or remediation.
    pub arm: String,
    pub stats: VersionStats,
    /// Decisions by probability of default, in [`PD_BINS`] equal bins.
    pub pd_histogram: Vec<u64>,
}

/// Decisions per arm in one stretch of time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmTraffic {
    /// Start of the stretch, RFC 3339.
    pub start: String,
    pub champion: u64,
    pub candidate: u64,
    pub shadow: u64,
}

/// What the guardrails read of one recorded decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionOutcome {
    pub decision: crate::policy::Outcome,
    pub pd: f64,
    pub current_limit: Option<i64>,
    pub granted_limit: i64,
}

/// A rollout's latest decisions across every replica, for guardrails judged on all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentByArm {
    /// The champion arm's latest decisions, newest first.
    pub champion: Vec<DecisionOutcome>,
    /// The candidate's, served or in the shadow, newest first.
    pub candidate: Vec<DecisionOutcome>,
    /// Decisions since the asked time, by arm name.
    pub since: Vec<(String, u64)>,
}

/// A rollout's decisions in aggregate, for its report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutDecisions {
    /// Arms in the order champion, candidate, shadow, then the rollout's remediations
    /// (recorded after it closed); an arm without decisions is absent.
    pub arms: Vec<ArmSummary>,
    /// Decisions per arm over time, oldest first, at the finest of second, minute, hour or
    /// day that keeps the series within a few hundred points.
    pub traffic: Vec<ArmTraffic>,
    /// The length of one stretch in seconds.
    pub stretch_secs: u64,
}

impl RolloutDecisions {
    /// Puts the arms in report order: champion, candidate, shadow, remediation.
    pub(crate) fn sort_arms(&mut self) {
        let order = |a: &str| {
            ["champion", "candidate", "shadow", "remediation"]
                .iter()
                .position(|x| *x == a)
        };
        self.arms.sort_by_key(|a| order(&a.arm));
    }

    /// Chooses the stretch of the traffic series for records from `first_us` to `last_us`
    /// (µs since the epoch): the finest of second, minute, hour or day that keeps it within
    /// 600 points. Returns it in seconds.
    pub(crate) fn choose_stretch(&mut self, first_us: i64, last_us: i64) -> u64 {
        // Whole seconds between the first and the last, as the stretch is chosen from.
        let secs = (last_us.div_euclid(1_000_000) - first_us.div_euclid(1_000_000)).max(0) as u64;
        const MOST: u64 = 600;
        self.stretch_secs = if secs <= MOST {
            1
        } else if secs <= MOST * 60 {
            60
        } else if secs <= MOST * 3_600 {
            3_600
        } else {
            86_400
        };
        self.stretch_secs
    }

    /// Adds `n` decisions of `arm` in stretch number `bucket` (µs since the epoch divided by
    /// the stretch); buckets come in ascending order.
    pub(crate) fn add_traffic(&mut self, bucket: i64, arm: &str, n: u64) {
        let start = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(bucket.max(0) as u64 * self.stretch_secs),
        )
        .to_string();
        if self.traffic.last().is_none_or(|t| t.start != start) {
            self.traffic.push(ArmTraffic {
                start,
                ..ArmTraffic::default()
            });
        }
        let t = self.traffic.last_mut().expect("pushed above");
        match arm {
            "champion" => t.champion += n,
            "candidate" => t.candidate += n,
            "shadow" => t.shadow += n,
            // Remediations restore limits after the rollout; they are not its traffic.
            _ => {}
        }
    }
}

/// An inclusive-exclusive time window over `recorded_at` (RFC 3339 text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub since: Option<String>,
    pub until: Option<String>,
}

/// A store of decisions. Appends are asynchronous (they resolve once durable); reads are
/// blocking and belong on a blocking thread.
pub trait DecisionLog: Send + Sync + 'static {
    /// Queues a decision for the next group commit. The queueing happens in this call; the
    /// future resolves when the decision is durable, was found recorded already, or failed.
    fn append(&self, body: NewBody) -> AppendFuture;

    /// Queues decisions that are recorded all together or not at all: one commit, and if any
    /// of them cannot be recorded (a request id reused with other inputs), none is.
    fn append_all(&self, bodies: Vec<NewBody>) -> AppendAllFuture;

    /// Whether writes currently succeed; false from the first failure until a probe write
    /// succeeds again.
    fn healthy(&self) -> watch::Receiver<bool>;

    /// Stops the writer after it has committed everything queued.
    fn close(&self);

    fn get(&self, decision_id: &str) -> Result<Option<DecisionRecord>, LogError>;

    /// A customer's records (under any of their refs), oldest first.
    fn by_customer(&self, refs: &[String]) -> Result<Vec<DecisionRecord>, LogError>;

    /// The customer's latest served (non-shadow) decision before `seq`.
    fn previous(&self, refs: &[String], seq: i64) -> Result<Option<DecisionRecord>, LogError>;

    fn version_stats(
        &self,
        model: &str,
        version: &str,
        window: &Window,
    ) -> Result<VersionStats, LogError>;

    /// The decisions a rollout made, in aggregate, from `since` (its start) on.
    fn rollout_decisions(
        &self,
        rollout_id: &str,
        since: &str,
    ) -> Result<RolloutDecisions, LogError>;

    /// Visits the records in the window in chain order until `visit` returns false.
    fn scan(
        &self,
        window: &Window,
        visit: &mut dyn FnMut(DecisionRecord) -> bool,
    ) -> Result<(), LogError>;

    /// Walks the whole chain.
    fn verify(&self) -> Result<VerifyReport, LogError>;

    /// A rollout's latest `limit` decisions per arm from every replica, and how many each
    /// arm made since `since_us` (µs since the epoch), when the log is shared by replicas.
    /// `None` for the log of one server, whose guardrails see each decision as it is made.
    fn recent_by_arm(
        &self,
        _rollout_id: &str,
        _limit: usize,
        _since_us: i64,
    ) -> Result<Option<RecentByArm>, LogError> {
        Ok(None)
    }

    /// Durable decisions the query view does not hold yet, which readers are served from
    /// memory meanwhile; `None` for a log without a view built behind its writes.
    fn view_lag(&self) -> Option<u64> {
        None
    }
}

/// Records nothing and says every decision is durable. Only the baseline of the logging
/// benchmark uses it (`serve --unrecorded-benchmark-only`, a hidden flag): it breaks the rule
/// that no decision is answered before it is recorded.
#[derive(Debug)]
pub struct Unrecorded {
    healthy: watch::Receiver<bool>,
}

impl Default for Unrecorded {
    fn default() -> Self {
        Unrecorded {
            healthy: watch::channel(true).1,
        }
    }
}

impl DecisionLog for Unrecorded {
    fn append(&self, body: NewBody) -> AppendFuture {
        let _ = body;
        Box::pin(async move { Ok(Appended::New { seq: 0 }) })
    }

    fn append_all(&self, bodies: Vec<NewBody>) -> AppendAllFuture {
        Box::pin(async move {
            Ok(bodies
                .into_iter()
                .map(|_| Appended::New { seq: 0 })
                .collect())
        })
    }

    fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    fn close(&self) {}

    fn get(&self, _: &str) -> Result<Option<DecisionRecord>, LogError> {
        Ok(None)
    }

    fn by_customer(&self, _: &[String]) -> Result<Vec<DecisionRecord>, LogError> {
        Ok(Vec::new())
    }

    fn previous(&self, _: &[String], _: i64) -> Result<Option<DecisionRecord>, LogError> {
        Ok(None)
    }

    fn version_stats(&self, _: &str, _: &str, _: &Window) -> Result<VersionStats, LogError> {
        Ok(VersionStats::default())
    }

    fn rollout_decisions(&self, _: &str, _: &str) -> Result<RolloutDecisions, LogError> {
        Ok(RolloutDecisions::default())
    }

    fn scan(&self, _: &Window, _: &mut dyn FnMut(DecisionRecord) -> bool) -> Result<(), LogError> {
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, LogError> {
        Err(LogError::Query(
            "this server records nothing (benchmark baseline)".into(),
        ))
    }
}

/// Sets the calling thread's nice value (Linux: PRIO_PROCESS with who = 0 is this thread).
/// Raising priority back needs CAP_SYS_NICE or a soft RLIMIT_NICE that allows it; without, the
/// call fails and the thread keeps its priority, which the indexer logs once.
fn set_nice(nice: i32) -> bool {
    // SAFETY: setpriority on the calling thread has no memory effects.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}
