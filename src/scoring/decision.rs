//! The request and decision of the scoring path, in domain types, and [`decide`]: what a
//! version decides for a validated vector.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::bundle::{Bundle, BundleDigest};
use crate::decision_log::{DecisionRecord, LogError};
use crate::model::Contribution;
use crate::policy::Outcome;
use crate::rollout::{Arm, Observation, Route};
use crate::schema::RawValue;

/// A request whose own fields are well formed; its features are not yet judged.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    pub request_id: String,
    pub customer_id: String,
    pub model: String,
    pub features: BTreeMap<String, RawValue>,
    pub current_limit: Option<i64>,
    /// Who asked (the authenticated identity), recorded with the decision.
    pub caller: Option<String>,
    /// When the caller stops waiting (its grpc-timeout); past it, nothing is decided.
    pub deadline: Option<std::time::Instant>,
    /// The caller's W3C trace id (from `traceparent`), recorded so that a reviewer can go
    /// from a decision to the caller's trace.
    pub trace_id: Option<String>,
}

/// What one version decided for one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub decision_id: Uuid,
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub digest: BundleDigest,
    pub probability_of_default: f64,
    pub grade: String,
    pub outcome: Outcome,
    pub current_limit: Option<i64>,
    pub granted_limit: i64,
    pub reasons: Vec<Contribution>,
    pub arm: Arm,
    /// The rollout that routed the decision, when one was open.
    pub rollout_id: Option<String>,
}

impl Decision {
    /// The decision a record holds (for an idempotent retry, the one first answered).
    pub fn from_record(r: &DecisionRecord) -> Result<Decision, LogError> {
        let b = &r.body;
        let damaged = |what: &str| LogError::Damaged(format!("record seq {}: bad {what}", r.seq));
        Ok(Decision {
            decision_id: Uuid::parse_str(&b.decision_id).map_err(|_| damaged("decision_id"))?,
            request_id: b.request_id.clone(),
            model: b.model.clone(),
            version: b.version.clone(),
            digest: BundleDigest::recorded(b.digest.clone()),
            probability_of_default: b.probability_of_default,
            grade: b.grade.clone(),
            outcome: Outcome::parse(&b.decision).ok_or_else(|| damaged("decision"))?,
            current_limit: b.current_limit,
            granted_limit: b.granted_limit,
            reasons: b
                .reasons
                .iter()
                .map(|x| Contribution {
                    feature: x.feature.clone(),
                    contribution: x.contribution,
                    value: x.value,
                })
                .collect(),
            arm: Arm::parse(&b.arm).ok_or_else(|| damaged("arm"))?,
            rollout_id: b.rollout_id.clone(),
        })
    }

    /// What the rollout guardrails read of this decision, decided in `latency`.
    pub fn observation(&self, latency: std::time::Duration) -> Observation {
        Observation::of(
            self.outcome,
            self.probability_of_default,
            self.current_limit,
            self.granted_limit,
            latency,
        )
    }
}

/// Score and policy: what `bundle` decides for a validated vector, on the arm (and in the
/// rollout) the request was routed to.
pub fn decide(bundle: &Bundle, req: &ScoreRequest, x: &[f64], route: &Route) -> Decision {
    let verdict = bundle.decide(x, req.current_limit);
    Decision {
        decision_id: Uuid::now_v7(),
        request_id: req.request_id.clone(),
        model: bundle.model_name().to_string(),
        version: bundle.version().to_string(),
        digest: bundle.digest.clone(),
        probability_of_default: verdict.scored.probability_of_default,
        grade: verdict.applied.grade,
        outcome: verdict.applied.decision,
        current_limit: req.current_limit,
        granted_limit: verdict.applied.granted_limit,
        reasons: verdict.scored.reasons,
        arm: route.arm,
        rollout_id: route.rollout_id.clone(),
    }
}
