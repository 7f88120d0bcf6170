//! The path of one scoring request: validate → route → score → policy → record → respond.
//!
//! Domain types only: the gRPC edge turns wire messages into a [`ScoreRequest`] (checking the
//! request's own fields) and a [`Decision`] back into a response. Here the features are judged
//! against the schema of the version the request was routed to, because the schema belongs to
//! the version, and that version is held (one `Arc`) until the decision is made. A decision
//! is returned only once the decision log says it is durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::bundle::{Bundle, BundleDigest};
use crate::customer::CustomerKeys;
use crate::decision_log::{
    AppendFuture, Appended, DecisionLog, DecisionRecord, LogError, RecordBody, RecordedReason,
};
use crate::model::Contribution;
use crate::policy::Outcome;
use crate::registry::{Registry, RegistryError};
use crate::rollout::{Rollouts, Route};
use crate::schema::{FeatureError, RawValue};

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

    pub fn parse(s: &str) -> Option<Arm> {
        [Arm::Champion, Arm::Candidate, Arm::Shadow]
            .into_iter()
            .find(|a| a.as_str() == s)
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
}

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Route(#[from] RegistryError),
    #[error(transparent)]
    Feature(#[from] FeatureError),
    #[error(transparent)]
    Record(#[from] LogError),
    #[error("the caller's deadline passed before scoring; nothing was decided or recorded")]
    DeadlinePassed,
}

/// Scores requests with the serving versions of a registry and records every decision.
#[derive(Clone)]
pub struct Scorer {
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    log: Arc<dyn DecisionLog>,
    keys: CustomerKeys,
}

impl std::fmt::Debug for Scorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scorer").finish_non_exhaustive()
    }
}

/// A decision made on one version, not yet observed or queued for the log.
struct Decided {
    route: Route,
    bundle: Arc<Bundle>,
    x: Vec<f64>,
    decision: Decision,
    /// From validation to the decision: what the rollout's latency guardrail judges.
    latency: std::time::Duration,
}

/// A decision made and queued for the log, not yet durable.
struct Pending {
    decision: Decision,
    durable: AppendFuture,
}

impl Scorer {
    pub fn new(
        registry: Arc<Registry>,
        rollouts: Arc<Rollouts>,
        log: Arc<dyn DecisionLog>,
        keys: CustomerKeys,
    ) -> Self {
        Scorer {
            registry,
            rollouts,
            log,
            keys,
        }
    }

    /// Makes one decision and returns it once recorded.
    pub async fn score(&self, req: &ScoreRequest) -> Result<Decision, ScoreError> {
        self.score_many(std::slice::from_ref(req))
            .await
            .pop()
            .expect("one result per request")
    }

    /// Makes many decisions, each succeeding or failing on its own; all are queued before
    /// any is awaited, so they share commits.
    pub async fn score_many(&self, reqs: &[ScoreRequest]) -> Vec<Result<Decision, ScoreError>> {
        let decided = self.decide(reqs);
        self.record(reqs, decided).await
    }

    /// Decides every request or none. When any is refused, nothing is recorded and the first
    /// refusal comes back with its index; the decisions are recorded in one group, all or
    /// none, and only then counted for their rollouts. For protocols with no per-item errors
    /// (the inference protocol's ModelInfer), where a decision recorded for a batch the caller
    /// was told had failed would be a limit change nobody saw. (Refusals are counted for the
    /// guardrails as they happen, as on every path.)
    pub async fn score_all(
        &self,
        reqs: &[ScoreRequest],
    ) -> Result<Vec<Decision>, (usize, ScoreError)> {
        let mut decided = Vec::with_capacity(reqs.len());
        for (i, d) in self.decide(reqs).into_iter().enumerate() {
            decided.push(d.map_err(|e| (i, e))?);
        }
        let record = async {
            let bodies = reqs
                .iter()
                .zip(&decided)
                .map(|(req, d)| {
                    let rollout_id = d.route.rollout_id.clone();
                    record_body(&self.keys, req, &d.bundle, &d.x, &d.decision, rollout_id)
                })
                .collect();
            let appended = self.log.append_all(bodies).await.map_err(|e| {
                // A reused id names its row; any other failure is the whole group's.
                let row = match &e {
                    LogError::RequestIdReused(id) => {
                        reqs.iter().position(|r| &r.request_id == id).unwrap_or(0)
                    }
                    _ => 0,
                };
                (row, ScoreError::from(e))
            })?;
            let mut out = Vec::with_capacity(decided.len());
            for (i, ((req, d), appended)) in reqs.iter().zip(decided).zip(appended).enumerate() {
                self.rollouts
                    .observe(&d.route, Some(&d.decision), d.latency);
                self.rollouts.shadow(&d.route, req);
                out.push(match appended {
                    Appended::New(_) => d.decision,
                    Appended::Existing(record) => {
                        Decision::from_record(&record).map_err(|e| (i, e.into()))?
                    }
                });
            }
            Ok(out)
        };
        record.instrument(phase("record")).await
    }

    /// Route, validate, score and policy, each phase over every request, so that a call has
    /// one span per phase whatever its size. Nothing is observed or recorded yet.
    fn decide(&self, reqs: &[ScoreRequest]) -> Vec<Result<Decided, ScoreError>> {
        let routed: Vec<Result<(Route, Arc<Bundle>), ScoreError>> = phase("route").in_scope(|| {
            reqs.iter()
                .map(|req| {
                    // The customer's arm in the model's rollout, if one is open.
                    let route = self.rollouts.route(&req.model, &req.customer_id);
                    let bundle = match &route.candidate {
                        Some(candidate) => candidate.clone(),
                        None => self.registry.serving(&req.model)?,
                    };
                    Ok((route, bundle))
                })
                .collect()
        });
        let validated: Vec<_> = phase("validate").in_scope(|| {
            reqs.iter()
                .zip(routed)
                .map(|(req, routed)| {
                    let (route, bundle) = routed?;
                    let started = std::time::Instant::now();
                    // A caller that has stopped waiting gets no decision: one recorded but
                    // never seen would be a limit change nobody was told of.
                    if req.deadline.is_some_and(|d| started >= d) {
                        return Err(ScoreError::DeadlinePassed);
                    }
                    // The schema of the version that will decide judges the features.
                    match bundle.schema.vector(&req.features) {
                        Ok(x) => Ok((route, bundle, x, started.elapsed())),
                        Err(e) => {
                            // A refusal counts for the arm whose schema refused: the error
                            // guardrail compares the candidate's refusals with the champion's.
                            // The shadow sees refused requests too, or its refusal rate would
                            // leave out the input both versions refuse.
                            self.rollouts.observe(&route, None, started.elapsed());
                            self.rollouts.shadow(&route, req);
                            Err(e.into())
                        }
                    }
                })
                .collect()
        });
        phase("score").in_scope(|| {
            reqs.iter()
                .zip(validated)
                .map(|(req, validated)| {
                    let (route, bundle, x, validating) = validated?;
                    let started = std::time::Instant::now();
                    let decision = Decision {
                        rollout_id: route.rollout_id.clone(),
                        ..decide(&bundle, req, &x, route.arm)
                    };
                    Ok(Decided {
                        latency: validating + started.elapsed(),
                        route,
                        bundle,
                        x,
                        decision,
                    })
                })
                .collect()
        })
    }

    /// Counts each decision for its rollout, hands it to the shadow, queues its record, and
    /// answers it once durable.
    async fn record(
        &self,
        reqs: &[ScoreRequest],
        decided: Vec<Result<Decided, ScoreError>>,
    ) -> Vec<Result<Decision, ScoreError>> {
        let record = async {
            let pending: Vec<_> = reqs
                .iter()
                .zip(decided)
                .map(|(req, d)| d.map(|d| self.queue(req, d)))
                .collect();
            // Await them all before answering, so that a failed commit is reported only
            // once every request's fate is known.
            let mut out = Vec::with_capacity(pending.len());
            for p in pending {
                out.push(match p {
                    Ok(p) => finish(p).await,
                    Err(e) => Err(e),
                });
            }
            out
        };
        record.instrument(phase("record")).await
    }

    fn queue(&self, req: &ScoreRequest, d: Decided) -> Pending {
        self.rollouts
            .observe(&d.route, Some(&d.decision), d.latency);
        self.rollouts.shadow(&d.route, req);
        let body = record_body(
            &self.keys,
            req,
            &d.bundle,
            &d.x,
            &d.decision,
            d.route.rollout_id,
        );
        Pending {
            durable: self.log.append(body),
            decision: d.decision,
        }
    }
}

/// The span of one phase of the request path, a child of the RPC's.
fn phase(name: &'static str) -> tracing::Span {
    tracing::debug_span!(target: crate::telemetry::SPAN_TARGET, "phase", otel.name = name)
}

/// The record of a decision: what the log stores, hashes and chains.
pub fn record_body(
    keys: &CustomerKeys,
    req: &ScoreRequest,
    bundle: &Bundle,
    x: &[f64],
    d: &Decision,
    rollout_id: Option<String>,
) -> RecordBody {
    let customer = keys.current(&req.customer_id);
    RecordBody {
        decision_id: d.decision_id.to_string(),
        recorded_at: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        request_id: req.request_id.clone(),
        request_hash: request_hash(req, &customer.value),
        customer_ref: customer.value,
        key_id: customer.key_id,
        model: d.model.clone(),
        version: d.version.clone(),
        digest: d.digest.to_string(),
        rollout_id,
        arm: d.arm.as_str().to_string(),
        features: bundle
            .schema
            .features()
            .iter()
            .zip(x)
            .map(|(f, v)| (f.name.clone(), *v))
            .collect(),
        probability_of_default: d.probability_of_default,
        grade: d.grade.clone(),
        decision: d.outcome.as_str().to_string(),
        current_limit: d.current_limit,
        granted_limit: d.granted_limit,
        reasons: d
            .reasons
            .iter()
            .map(|r| RecordedReason {
                feature: r.feature.clone(),
                contribution: r.contribution,
                value: r.value,
            })
            .collect(),
        caller: req.caller.clone(),
        trace_id: req.trace_id.clone(),
    }
}

async fn finish(p: Pending) -> Result<Decision, ScoreError> {
    match p.durable.await? {
        Appended::New(_) => Ok(p.decision),
        Appended::Existing(record) => Ok(Decision::from_record(&record)?),
    }
}

/// What makes two requests "the same" for an idempotent retry: the customer (as a ref),
/// the model, the features exactly as sent, and the current limit.
fn request_hash(req: &ScoreRequest, customer_ref: &str) -> String {
    let features: BTreeMap<&str, serde_json::Value> = req
        .features
        .iter()
        .map(|(k, v)| {
            let v = match v {
                RawValue::Number(x) => serde_json::json!({ "number": x }),
                RawValue::Integer(i) => serde_json::json!({ "integer": i }),
                RawValue::Text(s) => serde_json::json!({ "text": s }),
                RawValue::Flag(b) => serde_json::json!({ "flag": b }),
                RawValue::Empty => serde_json::Value::Null,
            };
            (k.as_str(), v)
        })
        .collect();
    let canonical = serde_json::json!({
        "customer_ref": customer_ref,
        "model": req.model,
        "features": features,
        "current_limit": req.current_limit,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
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
        rollout_id: None,
    }
}
