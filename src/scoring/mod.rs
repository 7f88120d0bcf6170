//! The path of one scoring request: validate → route → score → policy → record → respond.
//!
//! Domain types only: the gRPC edge turns wire messages into a [`ScoreRequest`] (checking the
//! request's own fields) and a [`Decision`] back into a response. Here the features are judged
//! against the schema of the version the request was routed to, because the schema belongs to
//! the version, and that version is held (one `Arc`) until the decision is made. A decision
//! is returned only once the decision log says it is durable.
//!
//! - [`decision`]: the request and decision types, and `decide` (score + policy on a route).
//! - [`recorder`]: decision → record → durable → counted for the guardrails.
//! - [`shadow`]: the candidate scoring champion traffic off the response path.

pub mod decision;
pub mod recorder;
pub mod shadow;

use std::sync::Arc;

use tracing::Instrument as _;

pub use decision::{Decision, ScoreRequest, decide};
pub use recorder::{Decided, Recorder};
pub use shadow::{Shadow, ShadowWorker};

use crate::bundle::Bundle;
use crate::decision_log::LogError;
use crate::registry::{Registry, RegistryError};
use crate::rollout::{Observation, Route, Router};
use crate::schema::FeatureError;

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
#[derive(Debug, Clone)]
pub struct Scorer {
    registry: Arc<Registry>,
    router: Arc<Router>,
    recorder: Recorder,
    shadow: Shadow,
}

impl Scorer {
    pub fn new(
        registry: Arc<Registry>,
        router: Arc<Router>,
        recorder: Recorder,
        shadow: Shadow,
    ) -> Self {
        Scorer {
            registry,
            router,
            recorder,
            shadow,
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
        let record = async {
            let pending: Vec<_> = reqs
                .iter()
                .zip(decided)
                .map(|(req, d)| d.map(|d| (req, self.recorder.queue(req, d))))
                .collect();
            // Await them all before answering, so that a failed commit is reported only
            // once every request's fate is known.
            let mut out = Vec::with_capacity(pending.len());
            for p in pending {
                out.push(match p {
                    Ok((req, p)) => {
                        let route = p.route().clone();
                        let decision = p.durable(req).await;
                        if decision.is_ok() {
                            self.shadow.offer(&route, req);
                        }
                        decision
                    }
                    Err(e) => Err(e),
                });
            }
            out
        };
        record.instrument(phase("record")).await
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
        let routes: Vec<Route> = decided.iter().map(|d| d.route.clone()).collect();
        let record = async {
            let decisions = self.recorder.record_all(reqs, decided).await?;
            for (req, route) in reqs.iter().zip(&routes) {
                self.shadow.offer(route, req);
            }
            Ok(decisions)
        };
        record.instrument(phase("record")).await
    }

    /// Route, validate, score and policy, each phase over every request, so that a call has
    /// one span per phase whatever its size. Nothing is recorded yet.
    fn decide(&self, reqs: &[ScoreRequest]) -> Vec<Result<Decided, ScoreError>> {
        let routed: Vec<Result<(Route, Arc<Bundle>), ScoreError>> = phase("route").in_scope(|| {
            reqs.iter()
                .map(|req| {
                    // The customer's arm in the model's rollout, if one is open.
                    let route = self.router.route(&req.model, &req.customer_id);
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
                            route.observe(Observation::REFUSED);
                            self.shadow.offer(&route, req);
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
                    let decision = decide(&bundle, req, &x, &route);
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
}

/// The span of one phase of the request path, a child of the RPC's.
fn phase(name: &'static str) -> tracing::Span {
    tracing::debug_span!(target: crate::telemetry::SPAN_TARGET, "phase", otel.name = name)
}
