//! The path of one scoring request: validate → route → score → policy → record → respond.
//!
//! Domain types only: the gRPC edge turns wire messages into a [`ScoreRequest`] (checking the
//! request's own fields) and a [`Decision`] back into a response. Here the features are judged
//! against the schema of the version the request was routed to, because the schema belongs to
//! the version, and that version is held (one `Arc`) until the decision is made.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::bundle::{Bundle, BundleDigest};
use crate::model::Contribution;
use crate::policy::Outcome;
use crate::registry::{Registry, RegistryError};
use crate::schema::{FeatureError, RawValue};

/// A request whose own fields are well formed; its features are not yet judged.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    pub request_id: String,
    pub customer_id: String,
    pub model: String,
    pub features: BTreeMap<String, RawValue>,
    pub current_limit: Option<i64>,
}

/// Which side of a rollout served a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Champion,
    Candidate,
    Shadow,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Champion => "champion",
            Arm::Candidate => "candidate",
            Arm::Shadow => "shadow",
        }
    }
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
}

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Route(#[from] RegistryError),
    #[error(transparent)]
    Feature(#[from] FeatureError),
}

/// Scores requests with the serving versions of a registry.
#[derive(Debug, Clone)]
pub struct Scorer {
    registry: Arc<Registry>,
}

impl Scorer {
    pub fn new(registry: Arc<Registry>) -> Self {
        Scorer { registry }
    }

    /// Makes one decision.
    pub fn score(&self, req: &ScoreRequest) -> Result<Decision, ScoreError> {
        // Route: until rollouts exist, the champion (the serving version) takes everyone.
        let bundle = self.registry.serving(&req.model)?;
        let arm = Arm::Champion;
        // Validate the features against the schema of the version that will decide.
        let x = bundle.schema.vector(&req.features)?;
        Ok(decide(&bundle, req, &x, arm))
        // Record: the decision log (a later step) writes the decision here, before it returns.
    }
}

/// Score and policy: what `bundle` decides for a validated vector.
pub fn decide(bundle: &Bundle, req: &ScoreRequest, x: &[f64], arm: Arm) -> Decision {
    let scored = bundle.model.score(x);
    let applied = bundle
        .manifest
        .policy
        .apply(scored.probability_of_default, req.current_limit);
    Decision {
        decision_id: Uuid::now_v7(),
        request_id: req.request_id.clone(),
        model: bundle.model_name().to_string(),
        version: bundle.version().to_string(),
        digest: bundle.digest.clone(),
        probability_of_default: scored.probability_of_default,
        grade: applied.grade,
        outcome: applied.decision,
        current_limit: req.current_limit,
        granted_limit: applied.granted_limit,
        reasons: scored.reasons,
        arm,
    }
}
