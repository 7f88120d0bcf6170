//! The recorder: turns a decision into its record, queues it on the decision log, and once
//! it is durable counts it for its rollout's guardrails. Score, ScoreBatch, the inference
//! protocol and the shadow worker all record through it, so a decision is counted only once
//! it is durable, and the raw customer id goes no further than here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use sha2::{Digest as _, Sha256};

use super::ScoreError;
use super::decision::{Decision, ScoreRequest};
use crate::bundle::Bundle;
use crate::customer::{CustomerKeys, CustomerRef};
use crate::decision_log::record::{self, CompactBody};
use crate::decision_log::{
    AppendFuture, Appended, DecisionLog, LogError, NewBody, RecordBody, RecordedReason,
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
pub struct Pending<'r> {
    recorder: &'r Recorder,
    decided: Decided,
    durable: AppendFuture,
}

impl Pending<'_> {
    /// The route the decision took.
    pub fn route(&self) -> &Route {
        &self.decided.route
    }

    /// Waits until the record is durable, then counts it for the guardrails. A retry of a
    /// recorded request (`req`, the one queued) gets the decision first answered, and is not
    /// counted again.
    pub async fn durable(self, req: &ScoreRequest) -> Result<Decision, ScoreError> {
        let recorder = self.recorder;
        let appended = or_json_hash(self.durable.await, || {
            recorder
                .log
                .append(recorder.new_body(req, &self.decided, HashScheme::Json))
        })
        .await?;
        match appended {
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
    bundles: Arc<BundleKeys>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(log: Arc<dyn DecisionLog>, keys: CustomerKeys) -> Self {
        Recorder {
            log,
            keys,
            bundles: Arc::default(),
        }
    }

    /// Queues one decision's record; it shares a commit with whatever else is queued.
    pub fn queue(&self, req: &ScoreRequest, decided: Decided) -> Pending<'_> {
        let body = self.new_body(req, &decided, HashScheme::Binary);
        Pending {
            recorder: self,
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
        let bodies = |scheme| {
            reqs.iter()
                .zip(&decided)
                .map(|(r, d)| self.new_body(r, d, scheme))
                .collect()
        };
        // On a reused id the whole group is tried again with JSON hashes, as a retried batch
        // is likely an earlier release's too.
        let first = self.log.append_all(bodies(HashScheme::Binary)).await;
        let appended = or_json_hash(first, || self.log.append_all(bodies(HashScheme::Json)))
            .await
            .map_err(|e| {
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
    /// becomes its keyed pseudonym here. Compact (typed, written as format 3 without any
    /// text parsed back) whenever format 3 can hold it, which is always for what a server
    /// of this release decides; else the text form, stored as its JSON.
    fn new_body(&self, req: &ScoreRequest, d: &Decided, scheme: HashScheme) -> NewBody {
        let customer = self.keys.current(&req.customer_id);
        let hash = match scheme {
            HashScheme::Binary => request_hash(req, &customer.value),
            HashScheme::Json => json_request_hash(req, &customer.value),
        };
        let recorded_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_micros() as i64);
        match self.compact(req, d, &customer, hash, recorded_at) {
            Some(c) => NewBody::Compact(c),
            None => NewBody::Text(text_body(req, d, customer, hash, recorded_at)),
        }
    }

    fn compact(
        &self,
        req: &ScoreRequest,
        d: &Decided,
        customer: &CustomerRef,
        request_hash: [u8; 32],
        recorded_at: i64,
    ) -> Option<CompactBody> {
        let decision = &d.decision;
        let bundle = self.bundles.of(&d.bundle)?;
        let reasons = decision
            .reasons
            .iter()
            .map(|r| {
                let i = bundle.names.iter().position(|n| *n == r.feature)?;
                // A reason's value is the vector's, or the record could not say it.
                (d.x.get(i)?.to_bits() == r.value.to_bits()).then_some((i as u16, r.contribution))
            })
            .collect::<Option<Vec<_>>>()?;
        let rollout_id = match &decision.rollout_id {
            None => None,
            Some(id) => Some(canonical_uuid(id)?),
        };
        let trace_id = match &req.trace_id {
            None => None,
            Some(t) => Some(canonical_hex16(t)?),
        };
        Some(CompactBody {
            decision_id: decision.decision_id.into_bytes(),
            recorded_at,
            request_id: req.request_id.clone(),
            request_hash,
            customer_ref: customer.bytes,
            key_id: customer.key_id.clone(),
            model: decision.model.clone(),
            version: decision.version.clone(),
            digest: bundle.digest,
            rollout_id,
            arm: record::ARMS
                .iter()
                .position(|a| *a == decision.arm.as_str())? as u8,
            names: bundle.names.clone(),
            x: d.x.clone(),
            probability_of_default: decision.probability_of_default,
            grade: decision.grade.clone(),
            decision: record::DECISIONS
                .iter()
                .position(|o| *o == decision.outcome.as_str())? as u8,
            current_limit: decision.current_limit,
            granted_limit: decision.granted_limit,
            reasons,
            caller: req.caller.clone(),
            trace_id,
        })
    }
}

/// The text form of a decision's record, for what the compact form cannot hold.
fn text_body(
    req: &ScoreRequest,
    d: &Decided,
    customer: CustomerRef,
    request_hash: [u8; 32],
    recorded_at: i64,
) -> RecordBody {
    let decision = &d.decision;
    let at = std::time::UNIX_EPOCH + Duration::from_micros(recorded_at.max(0) as u64);
    RecordBody {
        decision_id: decision.decision_id.to_string(),
        recorded_at: humantime::format_rfc3339_micros(at).to_string(),
        request_id: req.request_id.clone(),
        request_hash: hex::encode(request_hash),
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

/// What the compact records of a bundle's decisions need: its digest as bytes and its
/// feature names in schema order, worked out once per bundle rather than per decision.
struct BundleKey {
    digest_text: String,
    digest: [u8; 32],
    names: Arc<[String]>,
}

/// The bundles seen so far (a handful: one per version that decided), read without a lock.
#[derive(Default)]
struct BundleKeys(ArcSwap<Vec<Arc<BundleKey>>>);

impl BundleKeys {
    /// The key of `bundle`; None if its digest is not `sha256:` and 64 lowercase hex digits.
    fn of(&self, bundle: &Bundle) -> Option<Arc<BundleKey>> {
        let digest_text = bundle.digest.as_str();
        if let Some(k) = self.0.load().iter().find(|k| k.digest_text == digest_text) {
            return Some(k.clone());
        }
        let hex = digest_text.strip_prefix("sha256:")?;
        let mut digest = [0u8; 32];
        if hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        hex::decode_to_slice(hex, &mut digest).ok()?;
        let key = Arc::new(BundleKey {
            digest_text: digest_text.to_string(),
            digest,
            names: bundle
                .schema
                .features()
                .iter()
                .map(|f| f.name.clone())
                .collect(),
        });
        self.0.rcu(|known| {
            let mut known = (**known).clone();
            if !known.iter().any(|k| k.digest_text == digest_text) {
                known.push(key.clone());
            }
            known
        });
        Some(key)
    }
}

/// The bytes of a UUID written as a lowercase hyphenated one (as the server writes them).
fn canonical_uuid(s: &str) -> Option<[u8; 16]> {
    let id = uuid::Uuid::try_parse(s).ok()?;
    let mut buf = [0u8; 36];
    (*id.hyphenated().encode_lower(&mut buf) == *s).then(|| id.into_bytes())
}

/// The bytes of 32 lowercase hex digits (a W3C trace id).
fn canonical_hex16(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    (s.len() == 32 && !s.bytes().any(|b| b.is_ascii_uppercase()))
        .then(|| hex::decode_to_slice(s, &mut out).ok())
        .flatten()
        .map(|()| out)
}

/// `first`, unless it refused a reused request id: that id's record may be an earlier
/// release's, its request hash over JSON, so `again` (the same records with JSON hashes) is
/// tried once before the id counts as reused.
async fn or_json_hash<T, F>(
    first: Result<T, LogError>,
    again: impl FnOnce() -> F,
) -> Result<T, LogError>
where
    F: std::future::Future<Output = Result<T, LogError>>,
{
    match first {
        Err(LogError::RequestIdReused(_)) => again().await,
        other => other,
    }
}

/// How a record's request hash was computed: what a retry's hash is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashScheme {
    /// This release's: over the request's binary form.
    Binary,
    /// Earlier releases': over its canonical JSON. Tried only when a retry's binary hash
    /// does not match the record its id names, which may have been written by them.
    Json,
}

/// What makes two requests "the same" for an idempotent retry: the customer (as a ref),
/// the model, the features exactly as sent (name, type and value; a number by its bits),
/// and the current limit. Hashed over a binary form, each field length-prefixed and typed,
/// behind a domain tag; earlier releases hashed canonical JSON ([`json_request_hash`]),
/// which cost a fifth of a request's CPU on the request path (float formatting, a map
/// built and dropped).
fn request_hash(req: &ScoreRequest, customer_ref: &str) -> [u8; 32] {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::with_capacity(64 + req.features.len() * 40);
    out.extend_from_slice(b"riskserve request hash 2\0");
    text(&mut out, &req.model);
    text(&mut out, customer_ref);
    match req.current_limit {
        None => out.push(0),
        Some(l) => {
            out.push(1);
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    out.extend_from_slice(&(req.features.len() as u64).to_le_bytes());
    // In name order: the map's order.
    for (name, v) in &req.features {
        text(&mut out, name);
        match v {
            RawValue::Empty => out.push(0),
            RawValue::Number(x) => {
                out.push(1);
                out.extend_from_slice(&x.to_bits().to_le_bytes());
            }
            RawValue::Integer(i) => {
                out.push(2);
                out.extend_from_slice(&i.to_le_bytes());
            }
            RawValue::Text(t) => {
                out.push(3);
                text(&mut out, t);
            }
            RawValue::Flag(b) => out.extend_from_slice(&[4, u8::from(*b)]),
        }
    }
    Sha256::digest(&out).into()
}

/// The request hash as releases before the binary one recorded it: canonical JSON (keys
/// sorted; each feature `{"number": x}`, `{"integer": i}`, `{"text": s}`, `{"flag": b}` or
/// null), written straight from typed fields with the same bytes as building a
/// `serde_json::Value` gave, so a retry across an upgrade still matches its recorded hash.
fn json_request_hash(req: &ScoreRequest, customer_ref: &str) -> [u8; 32] {
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
    Sha256::digest(&bytes).into()
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
                hex::encode(json_request_hash(&req, "ref")),
                request_hash_by_value(&req, "ref")
            );
        }
    }

    #[test]
    fn the_binary_request_hash_tells_apart_every_way_two_requests_differ() {
        let req = |features: &[(&str, RawValue)], limit: Option<i64>| ScoreRequest {
            request_id: "r".into(),
            customer_id: "c".into(),
            model: "credit-limit".into(),
            features: features
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            current_limit: limit,
            caller: None,
            deadline: None,
            trace_id: None,
        };
        use RawValue::*;
        let base = [("AGE", Number(30.0)), ("PAY_0", Integer(1))];
        let variants = [
            req(&base, Some(1_000)),
            req(&base, None),
            req(&base, Some(0)),
            req(
                &[("AGE", Number(30.000000000000004)), ("PAY_0", Integer(1))],
                Some(1_000),
            ),
            req(&[("AGE", Integer(30)), ("PAY_0", Integer(1))], Some(1_000)),
            req(
                &[("AGE", Text("30".into())), ("PAY_0", Integer(1))],
                Some(1_000),
            ),
            req(&[("AGE", Number(-0.0)), ("PAY_0", Integer(1))], Some(1_000)),
            req(&[("AGE", Number(0.0)), ("PAY_0", Integer(1))], Some(1_000)),
            req(&[("AGE", Empty), ("PAY_0", Integer(1))], Some(1_000)),
            req(&[("PAY_0", Integer(1))], Some(1_000)),
            req(&[("AGE", Flag(true)), ("PAY_0", Integer(1))], Some(1_000)),
            req(&[("AGE", Flag(false)), ("PAY_0", Integer(1))], Some(1_000)),
            req(
                &[("AGE", Number(1.0)), ("PAY_0", Number(30.0))],
                Some(1_000),
            ),
            // Length prefixes: a name's end and a text's start cannot trade bytes.
            req(&[("AGEx", Text("".into()))], Some(1_000)),
            req(&[("AGE", Text("x".into()))], Some(1_000)),
        ];
        let hashes: Vec<[u8; 32]> = variants.iter().map(|r| request_hash(r, "ref")).collect();
        for (i, a) in hashes.iter().enumerate() {
            for (j, b) in hashes.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "variants {i} and {j}");
            }
        }
        // The same request hashes alike; the customer and the model are part of it.
        assert_eq!(request_hash(&variants[0], "ref"), hashes[0]);
        assert_ne!(request_hash(&variants[0], "other"), hashes[0]);
        let mut other_model = req(&base, Some(1_000));
        other_model.model = "credit-limit-2".into();
        assert_ne!(request_hash(&other_model, "ref"), hashes[0]);
        // Neither the request id, the caller nor the trace is: a retry may differ in them.
        let mut retry = req(&base, Some(1_000));
        retry.request_id = "another".into();
        retry.caller = Some("svc".into());
        assert_eq!(request_hash(&retry, "ref"), hashes[0]);
    }
}
