//! The recorder: turns a decision into its record, queues it on the decision log, and once
//! it is durable counts it for its rollout's guardrails. Score, ScoreBatch, the inference
//! protocol and the shadow worker all record through it, so a decision is counted only once
//! it is durable, and the raw customer id goes no further than here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::ScoreError;
use super::decision::{Decision, ScoreRequest};
use crate::bundle::Bundle;
use crate::customer::CustomerKeys;
use crate::decision_log::{
    AppendFuture, Appended, DecisionLog, LogError, RecordBody, RecordedReason,
};
use crate::rollout::Route;
use crate::schema::RawValue;

/// A decision made on one version, with what its record needs; not yet recorded.
pub struct Decided {
    pub route: Route,
    pub bundle: Arc<Bundle>,
    /// The vector as scored, in the bundle's schema order (imputed values included).
    pub x: Vec<f64>,
    pub decision: Decision,
    /// From validation to the decision: what the rollout's latency guardrail judges.
    pub latency: Duration,
}

/// A decision queued for the log, not yet durable.
pub struct Pending {
    decided: Decided,
    durable: AppendFuture,
}

impl Pending {
    /// The route the decision took.
    pub fn route(&self) -> &Route {
        &self.decided.route
    }

    /// Waits until the record is durable, then counts it for the guardrails. A retry of a
    /// recorded request gets the decision first answered, and is not counted again.
    pub async fn durable(self) -> Result<Decision, ScoreError> {
        match self.durable.await? {
            Appended::New { .. } => {
                let d = self.decided;
                d.route.observe(d.decision.observation(d.latency));
                Ok(d.decision)
            }
            Appended::Existing(record) => Ok(Decision::from_record(&record)?),
        }
    }
}

/// Records decisions in the decision log.
#[derive(Clone)]
pub struct Recorder {
    log: Arc<dyn DecisionLog>,
    keys: CustomerKeys,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(log: Arc<dyn DecisionLog>, keys: CustomerKeys) -> Self {
        Recorder { log, keys }
    }

    /// Queues one decision's record; it shares a commit with whatever else is queued.
    pub fn queue(&self, req: &ScoreRequest, decided: Decided) -> Pending {
        let body = self.body(req, &decided);
        Pending {
            durable: self.log.append(body),
            decided,
        }
    }

    /// Records every decision in one group, all or none, and counts them once durable. A
    /// failure names the request it was about (a reused id), or the first.
    pub async fn record_all(
        &self,
        reqs: &[ScoreRequest],
        decided: Vec<Decided>,
    ) -> Result<Vec<Decision>, (usize, ScoreError)> {
        let bodies = reqs
            .iter()
            .zip(&decided)
            .map(|(r, d)| self.body(r, d))
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
        for (i, (d, appended)) in decided.into_iter().zip(appended).enumerate() {
            out.push(match appended {
                Appended::New { .. } => {
                    d.route.observe(d.decision.observation(d.latency));
                    d.decision
                }
                Appended::Existing(record) => {
                    Decision::from_record(&record).map_err(|e| (i, e.into()))?
                }
            });
        }
        Ok(out)
    }

    /// The record of a decision: what the log stores, hashes and chains. The customer id
    /// becomes its keyed pseudonym here.
    fn body(&self, req: &ScoreRequest, d: &Decided) -> RecordBody {
        let customer = self.keys.current(&req.customer_id);
        let decision = &d.decision;
        RecordBody {
            decision_id: decision.decision_id.to_string(),
            recorded_at: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            request_id: req.request_id.clone(),
            request_hash: request_hash(req, &customer.value),
            customer_ref: customer.value,
            key_id: customer.key_id,
            model: decision.model.clone(),
            version: decision.version.clone(),
            digest: decision.digest.to_string(),
            rollout_id: decision.rollout_id.clone(),
            arm: decision.arm.as_str().to_string(),
            features: d
                .bundle
                .schema
                .features()
                .iter()
                .zip(&d.x)
                .map(|(f, v)| (f.name.clone(), *v))
                .collect(),
            probability_of_default: decision.probability_of_default,
            grade: decision.grade.clone(),
            decision: decision.outcome.as_str().to_string(),
            current_limit: decision.current_limit,
            granted_limit: decision.granted_limit,
            reasons: decision
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
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        }
    }
}

/// What makes two requests "the same" for an idempotent retry: the customer (as a ref),
/// the model, the features exactly as sent, and the current limit, as canonical JSON (keys
/// sorted; each feature `{"number": x}`, `{"integer": i}`, `{"text": s}`, `{"flag": b}` or
/// null). Written straight from typed fields, which gives the same bytes as building a
/// `serde_json::Value` did in earlier releases at a fraction of the allocations, so a retry
/// across an upgrade still matches its recorded hash.
fn request_hash(req: &ScoreRequest, customer_ref: &str) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Tagged<'a> {
        Number(f64),
        Integer(i64),
        Text(&'a str),
        Flag(bool),
    }
    /// Fields in sorted order: the canonical key order.
    #[derive(serde::Serialize)]
    struct Canonical<'a> {
        current_limit: Option<i64>,
        customer_ref: &'a str,
        features: BTreeMap<&'a str, Option<Tagged<'a>>>,
        model: &'a str,
    }
    let canonical = Canonical {
        current_limit: req.current_limit,
        customer_ref,
        features: req
            .features
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    RawValue::Number(x) => Some(Tagged::Number(*x)),
                    RawValue::Integer(i) => Some(Tagged::Integer(*i)),
                    RawValue::Text(s) => Some(Tagged::Text(s)),
                    RawValue::Flag(b) => Some(Tagged::Flag(*b)),
                    RawValue::Empty => None,
                };
                (k.as_str(), v)
            })
            .collect(),
        model: &req.model,
    };
    let bytes = serde_json::to_vec(&canonical).expect("a request always serialises");
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash as earlier releases computed it, through `serde_json::Value`.
    fn request_hash_by_value(req: &ScoreRequest, customer_ref: &str) -> String {
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

    #[test]
    fn the_request_hash_is_the_one_earlier_releases_recorded() {
        let values = [
            RawValue::Number(0.1 + 0.2),
            RawValue::Number(-1e300),
            RawValue::Number(3.0),
            RawValue::Integer(-42),
            RawValue::Text("a \"quoted\" ünïcode\n".into()),
            RawValue::Flag(true),
            RawValue::Empty,
        ];
        for limit in [None, Some(0), Some(250_000)] {
            let req = ScoreRequest {
                request_id: "r".into(),
                customer_id: "c".into(),
                model: "credit-limit".into(),
                features: values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("F{i}"), v.clone()))
                    .collect(),
                current_limit: limit,
                caller: None,
                deadline: None,
                trace_id: None,
            };
            assert_eq!(
                request_hash(&req, "ref"),
                request_hash_by_value(&req, "ref")
            );
        }
    }
}
