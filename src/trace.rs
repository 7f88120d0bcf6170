//! What reviewers ask of the decision log: a decision, a customer's history, why a limit
//! changed, a bit-for-bit replay, the chain's integrity, a version's record, an export, a
//! decision's adverse-action notice, and a customer's complaint answered in one step.
//!
//! Everything here reads; nothing writes. Calls block (SQLite reads, bundle loads) and belong
//! on a blocking thread. Replays use the bundle named by the record's digest, loaded from the
//! registry or found under `models/` even if it no longer serves, so a decision is reproduced
//! by the exact version that made it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::bundle::Bundle;
use crate::customer::CustomerKeys;
use crate::decision_log::{
    DecisionLog, DecisionRecord, LogError, VerifyReport, VersionStats, Window,
};
use crate::model::Contribution;
use crate::notice::{self, Notice};
use crate::policy::{Band, LimitMove, Outcome};
use crate::registry::Registry;
use crate::rollout::store::{RolloutStore, StoreError, Transition};
use crate::rollout::{Arm, State};

/// The arm of a decision recorded after a rollback to restore a limit the rolled-back
/// version lowered ([`crate::remediation`] records them); a complaint reports the first one
/// after the change it is about.
pub const REMEDIATION_ARM: &str = "remediation";

/// Why a trace query failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no decision {0} in the log")]
    NoDecision(String),
    #[error("decision_id {0:?} is not a UUID")]
    BadDecisionId(String),
    #[error("no bundle with digest {0} is loaded or under the models directory")]
    NoBundle(String),
    #[error("bundle {digest}: {reason}")]
    Bundle { digest: String, reason: String },
    #[error("{field}: {value:?} is not an RFC 3339 time or a YYYY-MM-DD date")]
    BadTime { field: &'static str, value: String },
    /// The id is not in the message: it is personal data, and statuses reach logs.
    #[error("no decisions are recorded for this customer under any configured key")]
    NoCustomer,
    #[error("decision {decision_id}: {reason}")]
    BadRecord { decision_id: String, reason: String },
    #[error(transparent)]
    Rollouts(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// A decision next to the customer's previous one.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: DecisionRecord,
    pub previous: Option<DecisionRecord>,
    pub band: Option<Band>,
    pub previous_band: Option<Band>,
    /// Features whose value differs: (name, before, after).
    pub moved: Vec<(String, Option<f64>, Option<f64>)>,
}

/// A recorded decision re-made by its bundle.
#[derive(Debug, Clone)]
pub struct Replay {
    pub recorded: DecisionRecord,
    pub probability_of_default: f64,
    pub grade: String,
    pub outcome: Outcome,
    pub granted_limit: i64,
    pub reasons: Vec<Contribution>,
    /// Empty when bit-identical.
    pub differences: Vec<String>,
}

/// The rollout that routed a decision, as it stands now.
#[derive(Debug, Clone)]
pub struct RolloutOfDecision {
    pub id: String,
    pub state: State,
    /// The transition that rolled the rollout back, when it was.
    pub rollback: Option<Transition>,
}

/// "Why did my limit change?", answered from the log and the rollout store.
#[derive(Debug, Clone)]
pub struct Complaint {
    /// The customer's decisions on record, every arm.
    pub decisions: usize,
    /// The notice (or why none is needed) of the customer's latest served decision that
    /// changed an existing limit, remediations aside; `None` when no decision changed it.
    pub change: Option<Notice>,
    /// The rollout that routed that decision, if one did.
    pub rollout: Option<RolloutOfDecision>,
    /// Whether that decision came from the candidate of a rollout since rolled back.
    pub rolled_back: bool,
    /// The first later decision of arm [`REMEDIATION_ARM`], if any.
    pub remediation: Option<DecisionRecord>,
}

/// Answers reviewers' questions from a decision log.
pub struct Tracer {
    log: Arc<dyn DecisionLog>,
    registry: Arc<Registry>,
    keys: CustomerKeys,
    rollouts: Arc<RolloutStore>,
    /// Bundles read from disk for replays, by digest.
    bundles: Mutex<BTreeMap<String, Arc<Bundle>>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").finish_non_exhaustive()
    }
}

impl Tracer {
    pub fn new(
        log: Arc<dyn DecisionLog>,
        registry: Arc<Registry>,
        keys: CustomerKeys,
        rollouts: Arc<RolloutStore>,
    ) -> Self {
        Tracer {
            log,
            registry,
            keys,
            rollouts,
            bundles: Mutex::default(),
        }
    }

    pub fn decision(&self, decision_id: &str) -> Result<DecisionRecord, TraceError> {
        if uuid::Uuid::parse_str(decision_id).is_err() {
            return Err(TraceError::BadDecisionId(decision_id.to_string()));
        }
        self.log
            .get(decision_id)?
            .ok_or_else(|| TraceError::NoDecision(decision_id.to_string()))
    }

    /// The customer's decisions, oldest first, under every configured key.
    pub fn customer(&self, customer_id: &str) -> Result<Vec<DecisionRecord>, TraceError> {
        Ok(self.log.by_customer(&self.refs(customer_id))?)
    }

    fn refs(&self, customer_id: &str) -> Vec<String> {
        self.keys
            .all(customer_id)
            .into_iter()
            .map(|r| r.value)
            .collect()
    }

    /// What differs from the same customer's previous served decision.
    pub fn explain(&self, decision_id: &str) -> Result<Explanation, TraceError> {
        let decision = self.decision(decision_id)?;
        // The record holds the ref, not the id: look up under that very ref.
        let refs = [decision.body.customer_ref.clone()];
        let previous = self.log.previous(&refs, decision.seq)?;
        let band = self.band_of(&decision);
        let previous_band = previous.as_ref().and_then(|p| self.band_of(p));
        let moved = match &previous {
            None => Vec::new(),
            Some(p) => {
                let names: BTreeSet<&String> = p
                    .body
                    .features
                    .keys()
                    .chain(decision.body.features.keys())
                    .collect();
                names
                    .into_iter()
                    .filter_map(|n| {
                        let before = p.body.features.get(n).copied();
                        let after = decision.body.features.get(n).copied();
                        // By bits, so that a value missing both times (NaN) has not moved.
                        let same = before.map(f64::to_bits) == after.map(f64::to_bits);
                        (!same).then(|| (n.clone(), before, after))
                    })
                    .collect()
            }
        };
        Ok(Explanation {
            decision,
            previous,
            band,
            previous_band,
            moved,
        })
    }

    fn band_of(&self, r: &DecisionRecord) -> Option<Band> {
        let bundle = self.bundle(&r.body.digest).ok()?;
        let applied = bundle
            .manifest
            .policy
            .apply(r.body.probability_of_default, r.body.current_limit);
        bundle.manifest.policy.bands.get(applied.band).cloned()
    }

    /// Re-scores the recorded inputs with the recorded bundle and compares bit for bit.
    pub fn replay(&self, decision_id: &str) -> Result<Replay, TraceError> {
        let recorded = self.decision(decision_id)?;
        let b = &recorded.body;
        let bundle = self.bundle(&b.digest)?;
        let x = bundle
            .schema
            .recorded_vector(&b.features)
            .map_err(|name| TraceError::Bundle {
                digest: b.digest.clone(),
                reason: format!("the record has no value for {name}"),
            })?;
        // A remediation was decided on the pre-harm limit, not its current (harmed) one.
        let verdict = bundle.decide(&x, b.decided_on_limit());
        let (scored, applied) = (verdict.scored, verdict.applied);

        let mut differences = Vec::new();
        if scored.probability_of_default.to_bits() != b.probability_of_default.to_bits() {
            differences.push(format!(
                "probability of default: recorded {:e}, replayed {:e}",
                b.probability_of_default, scored.probability_of_default
            ));
        }
        if applied.grade != b.grade {
            differences.push(format!(
                "grade: recorded {}, replayed {}",
                b.grade, applied.grade
            ));
        }
        if applied.decision.as_str() != b.decision {
            differences.push(format!(
                "decision: recorded {}, replayed {}",
                b.decision,
                applied.decision.as_str()
            ));
        }
        if applied.granted_limit != b.granted_limit {
            differences.push(format!(
                "granted limit: recorded {}, replayed {}",
                b.granted_limit, applied.granted_limit
            ));
        }
        let same_reasons = scored.reasons.len() == b.reasons.len()
            && scored.reasons.iter().zip(&b.reasons).all(|(s, r)| {
                s.feature == r.feature
                    && s.contribution.to_bits() == r.contribution.to_bits()
                    && s.value.to_bits() == r.value.to_bits()
            });
        if !same_reasons {
            differences.push("reasons differ".into());
        }
        Ok(Replay {
            probability_of_default: scored.probability_of_default,
            grade: applied.grade,
            outcome: applied.decision,
            granted_limit: applied.granted_limit,
            reasons: scored.reasons,
            differences,
            recorded,
        })
    }

    /// The adverse-action notice of a decision, worded by the bundle that made it (found by
    /// its digest), or why it needs none.
    pub fn notice(&self, decision_id: &str) -> Result<Notice, TraceError> {
        let record = self.decision(decision_id)?;
        self.notice_of(record)
    }

    fn notice_of(&self, record: DecisionRecord) -> Result<Notice, TraceError> {
        let outcome =
            Outcome::parse(&record.body.decision).ok_or_else(|| TraceError::BadRecord {
                decision_id: record.body.decision_id.clone(),
                reason: format!("unknown decision {:?}", record.body.decision),
            })?;
        match notice::needed(&record, outcome) {
            Err(why) => Ok(Notice::not_needed(record, why)),
            Ok(action) => {
                // Only an adverse decision needs its bundle: the words are the version's.
                let bundle = self.bundle(&record.body.digest)?;
                Ok(Notice::adverse(
                    record,
                    action,
                    bundle.reason_codes.as_ref(),
                ))
            }
        }
    }

    /// The customer's latest limit change: its notice, the version and arm (in the record),
    /// whether its rollout rolled that version back, and whether a remediation followed.
    pub fn complaint(&self, customer_id: &str) -> Result<Complaint, TraceError> {
        let records = self.customer(customer_id)?;
        if records.is_empty() {
            return Err(TraceError::NoCustomer);
        }
        let changed = records.iter().rposition(|r| {
            let b = &r.body;
            // A shadow decision never reached the customer, and a remediation is the answer
            // to a change, not the change asked about.
            b.arm != REMEDIATION_ARM
                && Arm::parse(&b.arm).is_some_and(|a| a != Arm::Shadow)
                && LimitMove::of(b.current_limit, b.granted_limit).is_change()
        });
        let Some(at) = changed else {
            return Ok(Complaint {
                decisions: records.len(),
                change: None,
                rollout: None,
                rolled_back: false,
                remediation: None,
            });
        };
        let remediation = records[at + 1..]
            .iter()
            .find(|r| r.body.arm == REMEDIATION_ARM)
            .cloned();
        let record = records[at].clone();
        let rollout = match &record.body.rollout_id {
            None => None,
            Some(id) => self.rollouts.get(id)?.map(|r| {
                let rollback = match r.state {
                    State::RolledBack => self.rollouts.transitions(id).map(|ts| {
                        ts.into_iter()
                            .rev()
                            .find(|t| t.to_state == State::RolledBack)
                    }),
                    _ => Ok(None),
                };
                rollback.map(|rollback| RolloutOfDecision {
                    id: r.id,
                    state: r.state,
                    rollback,
                })
            }),
        }
        .transpose()?;
        let rolled_back = Arm::parse(&record.body.arm) == Some(Arm::Candidate)
            && rollout
                .as_ref()
                .is_some_and(|r| r.state == State::RolledBack);
        Ok(Complaint {
            decisions: records.len(),
            change: Some(self.notice_of(record)?),
            rollout,
            rolled_back,
            remediation,
        })
    }

    pub fn verify(&self) -> Result<VerifyReport, TraceError> {
        Ok(self.log.verify()?)
    }

    pub fn by_version(
        &self,
        model: &str,
        version: &str,
        window: &Window,
    ) -> Result<VersionStats, TraceError> {
        Ok(self.log.version_stats(model, version, window)?)
    }

    pub fn export(
        &self,
        window: &Window,
        visit: &mut dyn FnMut(DecisionRecord) -> bool,
    ) -> Result<(), TraceError> {
        Ok(self.log.scan(window, visit)?)
    }

    /// The bundle with this digest: loaded in the registry, cached, or found on disk.
    fn bundle(&self, digest: &str) -> Result<Arc<Bundle>, TraceError> {
        if let Some(b) = self.registry.find_by_digest(digest) {
            return Ok(b);
        }
        if let Some(b) = self
            .bundles
            .lock()
            .expect("bundle cache poisoned")
            .get(digest)
        {
            return Ok(b.clone());
        }
        let dir = find_bundle_dir(self.registry.models_dir(), digest)
            .ok_or_else(|| TraceError::NoBundle(digest.to_string()))?;
        let bundle = Bundle::load(&dir, None).map_err(|e| TraceError::Bundle {
            digest: digest.to_string(),
            reason: e.to_string(),
        })?;
        let bundle = Arc::new(bundle);
        self.bundles
            .lock()
            .expect("bundle cache poisoned")
            .insert(digest.to_string(), bundle.clone());
        Ok(bundle)
    }
}

/// The bundle directory under `models_dir` whose recorded digest is `digest`.
fn find_bundle_dir(models_dir: &std::path::Path, digest: &str) -> Option<PathBuf> {
    crate::watcher::scan(models_dir)
        .into_iter()
        .map(|(model, version, _)| models_dir.join(model).join(version))
        .find(|dir| {
            std::fs::read_to_string(dir.join(crate::bundle::DIGEST_FILE))
                .is_ok_and(|d| d.trim() == digest)
        })
}

/// Parses a `--since`/`--until` bound: RFC 3339, or a date taken as its midnight UTC.
pub fn parse_bound(field: &'static str, value: &str) -> Result<Option<String>, TraceError> {
    if value.is_empty() {
        return Ok(None);
    }
    let full = if value.len() == 10 {
        format!("{value}T00:00:00Z")
    } else {
        value.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full).map_err(|_| TraceError::BadTime {
        field,
        value: value.to_string(),
    })?;
    Ok(Some(humantime::format_rfc3339_micros(t).to_string()))
}
