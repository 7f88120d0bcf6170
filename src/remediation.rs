//! Remediation: undoing what a closed rollout's candidate did to customers' limits (issue 18).
//!
//! A rollback stops new harm but leaves the harm done: every later decision for a customer
//! whose limit the candidate withdrew starts from the withdrawn limit and holds it. This
//! module finds each customer whose limit a decision of the candidate arm lowered
//! ([`LimitMove::is_lowered`]), re-decides them with the champion (the serving version, or
//! another the operator names) on the same recorded inputs and the limit they had before, and
//! says where each stands: still to restore, restored since by a later decision, already
//! remediated, or not harmed by the champion's standard (it would have lowered them too).
//!
//! Applying records, for each customer still to restore, a decision of arm
//! [`REMEDIATION_ARM`] through the ordinary log append (hash-chained, durable before it is
//! reported): made by the champion's bundle (its digest recorded, so `trace replay` re-makes
//! it), its current limit the harmed one, its granted limit the champion's answer on the
//! pre-harm limit (recorded as `pre_harm_limit`, which replay decides on), linked to the
//! harmful decision (`remediates`), with the actor and reason. Its request id is
//! `remediate:<rollout>:<harmful decision>` and its request hash covers only what names that
//! harm, so the log's exactly-once-by-request-id makes a second apply, or two at once,
//! record nothing new.
//!
//! A remediation is not a rollout arm and does not go through the router, the scorer or the
//! recorder: nothing is routed, no guardrail counts it, and [`crate::rollout::Arm`] keeps
//! the three arms a rollout routes to. Its record is built here, the one place that makes
//! one, and stored as format 1 (JSON), which is why its extra fields need no binary layout.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::bundle::Bundle;
use crate::decision_log::{
    Appended, DecisionLog, DecisionRecord, LogError, NewBody, RecordBody, RecordedReason, Window,
};
use crate::policy::LimitMove;
use crate::registry::{Registry, RegistryError};
use crate::rollout::Arm;
use crate::rollout::store::{RolloutRecord, RolloutStore, StoreError};
pub use crate::trace::REMEDIATION_ARM;

/// Remediations queued on the log at once: one group commit each, and well below the log's
/// queue, which refuses rather than waits when full.
const CHUNK: usize = 64;

/// Why a remediation could not be previewed or applied.
#[derive(Debug, thiserror::Error)]
pub enum RemediationError {
    #[error("no rollout has the id {0}")]
    UnknownRollout(String),
    #[error(
        "rollout {id} is {state}: a rollout is remediated only once closed (rolled back or promoted), when its candidate no longer decides"
    )]
    Open { id: String, state: &'static str },
    #[error(
        "decision {decision_id} recorded no value of {feature}, which {version} needs to re-decide it"
    )]
    Inputs {
        decision_id: String,
        version: String,
        feature: String,
    },
    /// The version asked to re-decide with cannot (unknown, not loadable).
    #[error("with_version: {0}")]
    WithVersion(RegistryError),
    /// The model has no serving version to re-decide with.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The blocking survey panicked or was cancelled.
    #[error("the remediation survey failed: {0}")]
    Task(String),
}

/// What the caller asks for, checked at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct RemediateSpec {
    pub rollout_id: String,
    /// The version that re-decides; the model's serving version when `None`.
    pub with_version: Option<String>,
    /// Record the remediations (otherwise preview only).
    pub apply: bool,
    pub reason: Option<String>,
    /// Who applies it (the authenticated caller).
    pub actor: String,
}

/// Where a harmed customer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HarmStatus {
    /// The champion grants more than the candidate left them, and nothing has restored it.
    ToRestore,
    /// A remediation decision of this rollout is recorded for the harm.
    Remediated { decision_id: String },
    /// A later served decision granted at least what the champion would.
    Restored { decision_id: String },
    /// The champion grants no more than the candidate did: nothing to restore.
    ChampionAgrees,
}

impl HarmStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            HarmStatus::ToRestore => "to_restore",
            HarmStatus::Remediated { .. } => "remediated",
            HarmStatus::Restored { .. } => "restored",
            HarmStatus::ChampionAgrees => "champion_agrees",
        }
    }
}

/// One customer whose limit a candidate decision lowered.
#[derive(Debug, Clone)]
pub struct Harm {
    /// The customer's first candidate decision in the rollout that lowered the limit: its
    /// current limit is the one they had before the candidate.
    pub harmful: DecisionRecord,
    pub movement: LimitMove,
    /// What the champion grants for the same inputs on the pre-harm limit; for a harm
    /// already remediated, what its remediation granted.
    pub champion_limit: i64,
    /// The version behind `champion_limit`.
    pub champion_version: String,
    pub status: HarmStatus,
}

impl Harm {
    /// The limit before the candidate's decision.
    pub fn limit_before(&self) -> i64 {
        // A lowered limit always had a current limit (LimitMove::New is never lowered).
        self.harmful.body.current_limit.unwrap_or(0)
    }

    /// What the candidate left the customer.
    pub fn candidate_limit(&self) -> i64 {
        self.harmful.body.granted_limit
    }

    /// What a remediation gives back on top of the candidate's limit.
    pub fn restores(&self) -> i64 {
        (self.champion_limit - self.candidate_limit()).max(0)
    }
}

/// Every harmed customer of a rollout, as things stand.
#[derive(Debug, Clone)]
pub struct Survey {
    pub rollout: RolloutRecord,
    /// The version that re-decided.
    pub champion: Arc<Bundle>,
    /// Oldest harm first.
    pub harms: Vec<Harm>,
}

/// A survey's sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub customers: u64,
    pub amount_lowered: i64,
    pub to_restore: u64,
    pub amount_to_restore: i64,
    pub remediated: u64,
    pub amount_remediated: i64,
    pub restored: u64,
    pub champion_agrees: u64,
}

impl Survey {
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            customers: self.harms.len() as u64,
            ..Totals::default()
        };
        for h in &self.harms {
            t.amount_lowered += h.limit_before() - h.candidate_limit();
            match h.status {
                HarmStatus::ToRestore => {
                    t.to_restore += 1;
                    t.amount_to_restore += h.restores();
                }
                HarmStatus::Remediated { .. } => {
                    t.remediated += 1;
                    t.amount_remediated += h.restores();
                }
                HarmStatus::Restored { .. } => t.restored += 1,
                HarmStatus::ChampionAgrees => t.champion_agrees += 1,
            }
        }
        t
    }
}

/// Previews and applies remediations over the server's log, registry and rollout store.
pub struct Remediator {
    log: Arc<dyn DecisionLog>,
    registry: Arc<Registry>,
    rollouts: Arc<RolloutStore>,
}

impl std::fmt::Debug for Remediator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remediator").finish_non_exhaustive()
    }
}

impl Remediator {
    pub fn new(
        log: Arc<dyn DecisionLog>,
        registry: Arc<Registry>,
        rollouts: Arc<RolloutStore>,
    ) -> Self {
        Remediator {
            log,
            registry,
            rollouts,
        }
    }

    /// Every customer the closed rollout's candidate harmed, re-decided by the champion.
    pub async fn survey(&self, spec: &RemediateSpec) -> Result<Survey, RemediationError> {
        let rollout = self
            .rollouts
            .get(&spec.rollout_id)?
            .ok_or_else(|| RemediationError::UnknownRollout(spec.rollout_id.clone()))?;
        if rollout.state.is_open() {
            return Err(RemediationError::Open {
                id: rollout.id,
                state: rollout.state.as_str(),
            });
        }
        let champion = match &spec.with_version {
            None => self.registry.serving(&rollout.model)?,
            Some(v) => self
                .registry
                .load_bundle(&rollout.model, v)
                .await
                .map_err(RemediationError::WithVersion)?,
        };
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || survey(log.as_ref(), rollout, champion))
            .await
            .map_err(|e| RemediationError::Task(e.to_string()))?
    }

    /// Surveys, then records a remediation for every customer still to restore; `applied`
    /// sees each one once it is durable. Returns the survey as it stands afterwards. A harm
    /// someone else remediated meanwhile is marked remediated, and not reported as applied.
    pub async fn apply(
        &self,
        spec: &RemediateSpec,
        mut applied: impl FnMut(&Harm),
    ) -> Result<Survey, RemediationError> {
        let mut survey = self.survey(spec).await?;
        let todo: Vec<usize> = (0..survey.harms.len())
            .filter(|&i| survey.harms[i].status == HarmStatus::ToRestore)
            .collect();
        for chunk in todo.chunks(CHUNK) {
            let bodies: Vec<RecordBody> = chunk
                .iter()
                .map(|&i| {
                    remediation_body(&survey.rollout, &survey.champion, &survey.harms[i], spec)
                })
                .collect::<Result<_, _>>()?;
            let ids: Vec<String> = bodies.iter().map(|b| b.decision_id.clone()).collect();
            // One commit for the chunk: all of it durable, or none of it.
            let outcomes = self
                .log
                .append_all(bodies.into_iter().map(NewBody::from).collect())
                .await?;
            for ((&i, id), outcome) in chunk.iter().zip(ids).zip(outcomes) {
                let harm = &mut survey.harms[i];
                match outcome {
                    Appended::New { .. } => {
                        harm.status = HarmStatus::Remediated { decision_id: id };
                        applied(harm);
                    }
                    Appended::Existing(earlier) => {
                        harm.champion_limit = earlier.body.granted_limit;
                        harm.champion_version = earlier.body.version;
                        harm.status = HarmStatus::Remediated {
                            decision_id: earlier.body.decision_id,
                        };
                    }
                }
            }
        }
        Ok(survey)
    }
}

/// The request id of the remediation of one harmful decision: the same on every apply.
pub fn request_id(rollout_id: &str, harmful_decision_id: &str) -> String {
    format!("remediate:{rollout_id}:{harmful_decision_id}")
}

/// Reads the log (blocking): the rollout's harmful candidate decisions and its
/// remediations, then each harmed customer's later decisions.
fn survey(
    log: &dyn DecisionLog,
    rollout: RolloutRecord,
    champion: Arc<Bundle>,
) -> Result<Survey, RemediationError> {
    let mut first_harm: BTreeMap<String, DecisionRecord> = BTreeMap::new();
    // Harmful decision id → its remediation (the first recorded).
    let mut remediations: BTreeMap<String, DecisionRecord> = BTreeMap::new();
    let window = Window {
        since: Some(rollout.created_at.clone()),
        until: None,
    };
    log.scan(&window, &mut |r| {
        if r.body.rollout_id.as_deref() != Some(rollout.id.as_str()) {
            return true;
        }
        if r.body.arm == REMEDIATION_ARM {
            if let Some(harmful) = r.body.remediates.clone() {
                remediations.entry(harmful).or_insert(r);
            }
        } else if Arm::parse(&r.body.arm) == Some(Arm::Candidate)
            && LimitMove::of(r.body.current_limit, r.body.granted_limit).is_lowered()
        {
            // The first lowering is the one whose current limit is the customer's own.
            first_harm.entry(r.body.customer_ref.clone()).or_insert(r);
        }
        true
    })?;
    let mut harmful: Vec<DecisionRecord> = first_harm.into_values().collect();
    harmful.sort_by_key(|r| r.seq);

    let mut harms = Vec::with_capacity(harmful.len());
    for record in harmful {
        let candidate_limit = record.body.granted_limit;
        if let Some(done) = remediations.remove(&record.body.decision_id) {
            harms.push(Harm {
                movement: LimitMove::of(record.body.current_limit, candidate_limit),
                harmful: record,
                champion_limit: done.body.granted_limit,
                champion_version: done.body.version,
                status: HarmStatus::Remediated {
                    decision_id: done.body.decision_id,
                },
            });
            continue;
        }
        let x = inputs(&record, &champion)?;
        let champion_limit = champion
            .decide(&x, record.body.current_limit)
            .applied
            .granted_limit;
        let status = if champion_limit <= candidate_limit {
            HarmStatus::ChampionAgrees
        } else {
            let later = log.by_customer(std::slice::from_ref(&record.body.customer_ref))?;
            later
                .into_iter()
                .find(|l| {
                    l.seq > record.seq
                        && l.body.arm != Arm::Shadow.as_str()
                        && l.body.granted_limit >= champion_limit
                })
                .map_or(HarmStatus::ToRestore, |l| HarmStatus::Restored {
                    decision_id: l.body.decision_id,
                })
        };
        harms.push(Harm {
            movement: LimitMove::of(record.body.current_limit, candidate_limit),
            harmful: record,
            champion_limit,
            champion_version: champion.version().to_string(),
            status,
        });
    }
    Ok(Survey {
        rollout,
        champion,
        harms,
    })
}

/// The harmful decision's recorded vector in the champion's schema order.
fn inputs(record: &DecisionRecord, champion: &Bundle) -> Result<Vec<f64>, RemediationError> {
    champion
        .schema
        .recorded_vector(&record.body.features)
        .map_err(|feature| RemediationError::Inputs {
            decision_id: record.body.decision_id.clone(),
            version: champion.version().to_string(),
            feature: feature.to_string(),
        })
}

/// The record of one remediation: the champion's decision on the pre-harm limit, recorded
/// against the harmed one.
fn remediation_body(
    rollout: &RolloutRecord,
    champion: &Bundle,
    harm: &Harm,
    spec: &RemediateSpec,
) -> Result<RecordBody, RemediationError> {
    let h = &harm.harmful.body;
    let features = champion.schema.features();
    let names: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
    let x = inputs(&harm.harmful, champion)?;
    let pre_harm = h.current_limit;
    let verdict = champion.decide(&x, pre_harm);
    Ok(RecordBody {
        decision_id: uuid::Uuid::now_v7().to_string(),
        recorded_at: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        request_id: request_id(&rollout.id, &h.decision_id),
        request_hash: request_hash(rollout, h),
        customer_ref: h.customer_ref.clone(),
        key_id: h.key_id.clone(),
        model: champion.model_name().to_string(),
        version: champion.version().to_string(),
        digest: champion.digest.to_string(),
        rollout_id: Some(rollout.id.clone()),
        arm: REMEDIATION_ARM.to_string(),
        features: names
            .iter()
            .map(|n| n.to_string())
            .zip(x.iter().copied())
            .collect(),
        probability_of_default: verdict.scored.probability_of_default,
        grade: verdict.applied.grade,
        decision: verdict.applied.decision.as_str().to_string(),
        current_limit: Some(h.granted_limit),
        granted_limit: verdict.applied.granted_limit,
        reasons: verdict
            .scored
            .reasons
            .into_iter()
            .map(|r| RecordedReason {
                feature: r.feature,
                contribution: r.contribution,
                value: r.value,
            })
            .collect(),
        caller: Some(spec.actor.clone()),
        trace_id: None,
        remediates: Some(h.decision_id.clone()),
        pre_harm_limit: pre_harm,
        reason: spec.reason.clone(),
    })
}

/// What makes two remediation requests "the same": the harm they remedy (rollout, harmful
/// decision, customer, model), not who re-decides it or why, so a second apply with another
/// version or reason finds the first one recorded rather than a clash.
fn request_hash(rollout: &RolloutRecord, harmful: &RecordBody) -> String {
    #[derive(serde::Serialize)]
    struct Canonical<'a> {
        customer_ref: &'a str,
        model: &'a str,
        remediates: &'a str,
        rollout_id: &'a str,
    }
    let canonical = Canonical {
        customer_ref: &harmful.customer_ref,
        model: &rollout.model,
        remediates: &harmful.decision_id,
        rollout_id: &rollout.id,
    };
    let bytes = serde_json::to_vec(&canonical).expect("a remediation request always serialises");
    hex::encode(Sha256::digest(&bytes))
}
