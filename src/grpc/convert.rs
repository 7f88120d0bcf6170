//! Conversions between wire messages and domain types, checked where they enter.

use std::time::{Duration, Instant};

use crate::decision_log::{DecisionRecord, VerifyReport, VersionStats};
use crate::grpc::pb;
use crate::model::Contribution;
use crate::notice::Notice;
use crate::policy::Band;
use crate::policy::{AdverseAction, Outcome};
use crate::registry::{VersionInfo, VersionState};
use crate::remediation::{Harm, HarmStatus, REMEDIATION_ARM, RemediateSpec, Survey};
use crate::rollout::Arm;
use crate::rollout::store::Transition;
use crate::schema::RawValue;
use crate::scoring::{Decision, ScoreRequest};
use crate::trace::{Complaint, Explanation, Replay};

/// Longest request id or customer id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A request field that broke a rule of the API itself (before any schema is consulted).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct RequestError {
    pub field: String,
    pub rule: String,
}

impl RequestError {
    /// `field` broke `rule`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> RequestError {
        RequestError {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// `field` was left empty.
    pub fn required(field: &str) -> RequestError {
        RequestError::new(field, "is required")
    }
}

pub(crate) fn required_id(field: &str, value: String) -> Result<String, RequestError> {
    let rule = if value.is_empty() {
        "is required"
    } else if value.len() > MAX_ID_LEN {
        "must be at most 128 bytes"
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(value);
    };
    Err(RequestError::new(field, rule))
}

impl TryFrom<pb::ScoreRequest> for ScoreRequest {
    type Error = RequestError;

    fn try_from(req: pb::ScoreRequest) -> Result<Self, Self::Error> {
        let current_limit = current_limit("current_limit", req.current_limit)?;
        if req.model.is_empty() {
            return Err(RequestError::required("model"));
        }
        Ok(ScoreRequest {
            request_id: required_id("request_id", req.request_id)?,
            customer_id: required_id("customer_id", req.customer_id)?,
            model: req.model,
            features: req
                .features
                .into_iter()
                .map(|(name, value)| (name, raw_value(value)))
                .collect(),
            current_limit,
            // Set by the service from the request's credentials and metadata.
            caller: None,
            deadline: None,
            trace_id: None,
        })
    }
}

/// A current credit limit: absent for a new customer, never negative.
pub(crate) fn current_limit(field: &str, limit: Option<i64>) -> Result<Option<i64>, RequestError> {
    match limit {
        Some(limit) if limit < 0 => Err(RequestError {
            field: field.into(),
            rule: format!("must be ≥ 0, got {limit}"),
        }),
        other => Ok(other),
    }
}

/// What the edge adds to each request from the call itself, whatever the protocol.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The authenticated caller, put in the request's extensions by the auth gate.
    pub caller: Option<String>,
    /// When the caller stops waiting, from its grpc-timeout.
    pub deadline: Option<Instant>,
    /// The trace the call belongs to: its span's when traces are exported (the caller's,
    /// continued, or a new one), else the caller's from its traceparent.
    pub trace_id: Option<String>,
}

impl CallContext {
    pub fn of<T>(request: &tonic::Request<T>, span: &tracing::Span) -> CallContext {
        CallContext {
            caller: request
                .extensions()
                .get::<crate::grpc::gate::auth::Caller>()
                .map(|c| c.name.clone()),
            deadline: deadline(request.metadata(), Instant::now()),
            trace_id: crate::grpc::telemetry::span_trace_id(span)
                .or_else(|| trace_id(request.metadata())),
        }
    }

    pub fn apply(&self, req: ScoreRequest) -> ScoreRequest {
        ScoreRequest {
            caller: self.caller.clone(),
            deadline: self.deadline,
            trace_id: self.trace_id.clone(),
            ..req
        }
    }
}

fn raw_value(v: pb::FeatureValue) -> RawValue {
    use pb::feature_value::Kind;
    match v.kind {
        Some(Kind::Number(x)) => RawValue::Number(x),
        Some(Kind::Integer(i)) => RawValue::Integer(i),
        Some(Kind::Text(s)) => RawValue::Text(s),
        Some(Kind::Flag(b)) => RawValue::Flag(b),
        None => RawValue::Empty,
    }
}

impl From<Outcome> for pb::Decision {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Approve => pb::Decision::Approve,
            Outcome::Review => pb::Decision::Review,
            Outcome::Decline => pb::Decision::Decline,
        }
    }
}

impl From<Arm> for pb::Arm {
    fn from(a: Arm) -> Self {
        match a {
            Arm::Champion => pb::Arm::Champion,
            Arm::Candidate => pb::Arm::Candidate,
            Arm::Shadow => pb::Arm::Shadow,
        }
    }
}

/// A recorded arm on the wire: a rollout's three, or a remediation (not a rollout arm, so
/// not an [`Arm`]).
fn arm_i32(arm: &str) -> i32 {
    match Arm::parse(arm) {
        Some(a) => pb::Arm::from(a) as i32,
        None if arm == REMEDIATION_ARM => pb::Arm::Remediation as i32,
        None => pb::Arm::Unspecified as i32,
    }
}

impl From<Contribution> for pb::Reason {
    fn from(c: Contribution) -> Self {
        pb::Reason {
            feature: c.feature,
            contribution: c.contribution,
            value: c.value,
        }
    }
}

impl From<Decision> for pb::ScoreResponse {
    fn from(d: Decision) -> Self {
        pb::ScoreResponse {
            decision_id: d.decision_id.to_string(),
            request_id: d.request_id,
            model: d.model,
            version: d.version,
            digest: d.digest.to_string(),
            probability_of_default: d.probability_of_default,
            grade: d.grade,
            decision: pb::Decision::from(d.outcome).into(),
            granted_limit: d.granted_limit,
            current_limit: d.current_limit,
            reasons: d.reasons.into_iter().map(Into::into).collect(),
            arm: pb::Arm::from(d.arm).into(),
        }
    }
}

impl From<VersionState> for pb::VersionState {
    fn from(s: VersionState) -> Self {
        match s {
            VersionState::Loading => pb::VersionState::Loading,
            VersionState::Ready => pb::VersionState::Ready,
            VersionState::Serving => pb::VersionState::Serving,
            VersionState::Failed => pb::VersionState::Failed,
        }
    }
}

impl From<VersionInfo> for pb::VersionStatus {
    fn from(v: VersionInfo) -> Self {
        pb::VersionStatus {
            state: pb::VersionState::from(v.state).into(),
            digest: v
                .bundle
                .as_ref()
                .map(|b| b.digest.to_string())
                .unwrap_or_default(),
            created_at: v
                .bundle
                .as_ref()
                .map(|b| b.manifest.created_at.clone())
                .unwrap_or_default(),
            kind: v
                .bundle
                .as_ref()
                .map(|b| b.model.kind().to_string())
                .unwrap_or_default(),
            error: v.error.unwrap_or_default(),
            model: v.model,
            version: v.version,
        }
    }
}

fn outcome_i32(decision: &str) -> i32 {
    crate::policy::Outcome::parse(decision)
        .map(|o| pb::Decision::from(o) as i32)
        .unwrap_or(pb::Decision::Unspecified as i32)
}

impl From<DecisionRecord> for pb::DecisionRecord {
    fn from(r: DecisionRecord) -> Self {
        let b = r.body;
        pb::DecisionRecord {
            seq: r.seq,
            arm: arm_i32(&b.arm),
            decision: outcome_i32(&b.decision),
            decision_id: b.decision_id,
            recorded_at: b.recorded_at,
            request_id: b.request_id,
            request_hash: b.request_hash,
            customer_ref: b.customer_ref,
            key_id: b.key_id,
            model: b.model,
            version: b.version,
            digest: b.digest,
            rollout_id: b.rollout_id.unwrap_or_default(),
            features: b.features,
            probability_of_default: b.probability_of_default,
            grade: b.grade,
            current_limit: b.current_limit,
            granted_limit: b.granted_limit,
            reasons: b
                .reasons
                .into_iter()
                .map(|x| pb::Reason {
                    feature: x.feature,
                    contribution: x.contribution,
                    value: x.value,
                })
                .collect(),
            caller: b.caller.unwrap_or_default(),
            trace_id: b.trace_id.unwrap_or_default(),
            prev_hash: r.prev_hash,
            hash: r.hash,
            remediates: b.remediates.unwrap_or_default(),
            pre_harm_limit: b.pre_harm_limit,
            reason: b.reason.unwrap_or_default(),
            replica_id: r.replica.unwrap_or_default(),
        }
    }
}

impl From<Band> for pb::Band {
    fn from(b: Band) -> Self {
        pb::Band {
            grade: b.grade,
            pd_min: b.pd_min,
            pd_max: b.pd_max,
            decision: pb::Decision::from(b.decision) as i32,
            limit_factor: b.limit_factor,
        }
    }
}

impl From<Explanation> for pb::Explanation {
    fn from(e: Explanation) -> Self {
        pb::Explanation {
            decision: Some(e.decision.into()),
            previous: e.previous.map(Into::into),
            band: e.band.map(Into::into),
            previous_band: e.previous_band.map(Into::into),
            moved: e
                .moved
                .into_iter()
                .map(|(feature, before, after)| pb::FeatureChange {
                    feature,
                    before,
                    after,
                })
                .collect(),
        }
    }
}

impl From<Replay> for pb::ReplayResult {
    fn from(r: Replay) -> Self {
        pb::ReplayResult {
            identical: r.differences.is_empty(),
            recorded: Some(r.recorded.into()),
            probability_of_default: r.probability_of_default,
            grade: r.grade,
            decision: pb::Decision::from(r.outcome) as i32,
            granted_limit: r.granted_limit,
            reasons: r.reasons.into_iter().map(Into::into).collect(),
            differences: r.differences,
        }
    }
}

impl From<VerifyReport> for pb::VerifyResult {
    fn from(r: VerifyReport) -> Self {
        pb::VerifyResult {
            records: r.records,
            head_hash: r.head_hash,
            ok: r.first_break.is_none(),
            first_break: r.first_break.map(|b| pb::ChainBreak {
                seq: b.seq,
                decision_id: b.decision_id,
                kind: b.kind.as_str().to_string(),
                detail: b.detail,
            }),
        }
    }
}

/// A version's aggregates, with its decline rate.
pub fn version_summary(model: String, version: String, s: VersionStats) -> pb::VersionSummary {
    pb::VersionSummary {
        model,
        version,
        decisions: s.decisions,
        approve: s.approve,
        review: s.review,
        decline: s.decline,
        decline_rate: if s.decisions == 0 {
            0.0
        } else {
            s.decline as f64 / s.decisions as f64
        },
        raised: s.raised,
        held: s.held,
        cut: s.cut,
        withdrawn: s.withdrawn,
        new_customers: s.new_customers,
    }
}

impl From<crate::rollout::GuardrailReading> for pb::Guardrail {
    fn from(g: crate::rollout::GuardrailReading) -> Self {
        pb::Guardrail {
            name: g.name,
            value: g.value,
            threshold: g.threshold,
            p_value: g.p_value,
            candidate_n: g.candidate_n as u64,
            champion_n: g.champion_n as u64,
            breached: g.breached,
            note: g.note,
        }
    }
}

impl From<Transition> for pb::RolloutTransition {
    fn from(t: Transition) -> Self {
        pb::RolloutTransition {
            at: t.at,
            from_state: t
                .from_state
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            to_state: t.to_state.as_str().into(),
            from_step: t.from_step.map_or(-1, |s| s as i32),
            to_step: t.to_step as u32,
            actor: t.actor,
            reason: t.reason,
            figures: t.figures.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<AdverseAction> for pb::AdverseAction {
    fn from(a: AdverseAction) -> Self {
        match a {
            AdverseAction::Withdrawal => pb::AdverseAction::Withdrawal,
            AdverseAction::Cut => pb::AdverseAction::Cut,
            AdverseAction::Decline => pb::AdverseAction::Decline,
        }
    }
}

impl From<Notice> for pb::AdverseActionNotice {
    fn from(n: Notice) -> Self {
        let (required, action, not_needed) = match &n.action {
            Ok(a) => (true, pb::AdverseAction::from(*a), String::new()),
            Err(why) => (false, pb::AdverseAction::Unspecified, why.describe()),
        };
        pb::AdverseActionNotice {
            decision: Some(n.decision.into()),
            required,
            action: action as i32,
            not_needed,
            reasons: n
                .reasons
                .into_iter()
                .map(|r| pb::NoticeReason {
                    rank: r.rank as u32,
                    feature: r.feature,
                    code: r.code.unwrap_or_default(),
                    text: r.text,
                    contribution: r.contribution,
                    value: r.value,
                })
                .collect(),
            wording: if required {
                n.wording.as_str().into()
            } else {
                String::new()
            },
            text: n.text,
        }
    }
}

impl From<Complaint> for pb::ComplaintAnswer {
    fn from(c: Complaint) -> Self {
        let (rollout_id, rollout_state, rollback) = match c.rollout {
            Some(r) => (
                r.id,
                r.state.as_str().to_string(),
                r.rollback.map(Into::into),
            ),
            None => (String::new(), String::new(), None),
        };
        pb::ComplaintAnswer {
            decisions: c.decisions as u32,
            change: c.change.map(Into::into),
            rollout_id,
            rollout_state,
            rolled_back: c.rolled_back,
            rollback,
            remediated: c.remediation.is_some(),
            remediation: c.remediation.map(Into::into),
        }
    }
}

impl From<crate::rollout::RolloutStatus> for pb::RolloutStatus {
    fn from(s: crate::rollout::RolloutStatus) -> Self {
        let r = s.record;
        pb::RolloutStatus {
            id: r.id,
            model: r.model,
            champion: r.champion,
            candidate: r.candidate,
            state: r.state.as_str().into(),
            step: r.step as u32,
            steps: r.plan.steps.len() as u32,
            share_bp: s.share_bp,
            shadow: s.shadow,
            step_started_at: r.step_started_at,
            step_decisions: s.step_decisions,
            champion_decisions: s.counts.champion,
            candidate_decisions: s.counts.candidate,
            shadow_decisions: s.counts.shadow,
            candidate_errors: s.counts.errors,
            shadow_dropped: s.shadow_dropped,
            guardrails: s.readings.into_iter().map(Into::into).collect(),
            transitions: s.transitions.into_iter().map(Into::into).collect(),
            plan_toml: toml::to_string_pretty(&r.plan).unwrap_or_default(),
            created_at: r.created_at,
            backtest: r.backtest.map(Into::into),
        }
    }
}

impl From<crate::backtest::LimitMoves> for pb::LimitMoves {
    fn from(m: crate::backtest::LimitMoves) -> Self {
        pb::LimitMoves {
            raised: m.raised,
            held: m.held,
            cut: m.cut,
            withdrawn: m.withdrawn,
            new_customers: m.new_customers,
            amount_raised: m.amount_raised,
            amount_cut: m.amount_cut,
        }
    }
}

impl From<crate::backtest::BacktestReport> for pb::BacktestReport {
    fn from(r: crate::backtest::BacktestReport) -> Self {
        pb::BacktestReport {
            passed: r.breached().is_empty(),
            model: r.model,
            candidate: r.candidate,
            candidate_digest: r.candidate_digest,
            compared: r.compared,
            unscorable: r.unscorable,
            decision_matrix: r.decision_matrix.into_iter().collect(),
            champion_limits: Some(r.champion_limits.into()),
            candidate_limits: Some(r.candidate_limits.into()),
            psi: r.psi,
            segments: r
                .segments
                .into_iter()
                .map(|s| pb::Segment {
                    feature: s.feature,
                    low: s.low,
                    high: s.high,
                    customers: s.customers,
                    withdrawn_share: s.withdrawn_share,
                    cut_share: s.cut_share,
                    champion_withdrawn_share: s.champion_withdrawn_share,
                    champion_cut_share: s.champion_cut_share,
                })
                .collect(),
            guardrails: r.guardrails.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<crate::rollout::RolloutHistory> for pb::RolloutHistory {
    fn from(h: crate::rollout::RolloutHistory) -> Self {
        let record = &h.status.record;
        // A remediation is made by the champion's side (the serving version), never the
        // candidate's.
        let version_of = |arm: &str| match Arm::parse(arm) {
            Some(Arm::Champion) => record.champion.clone(),
            None if arm == REMEDIATION_ARM => record.champion.clone(),
            _ => record.candidate.clone(),
        };
        let arms = h
            .decisions
            .arms
            .into_iter()
            .map(|a| pb::ArmSummary {
                arm: arm_i32(&a.arm),
                summary: Some(version_summary(
                    record.model.clone(),
                    version_of(&a.arm),
                    a.stats,
                )),
                pd_histogram: a.pd_histogram,
            })
            .collect();
        pb::RolloutHistory {
            snapshots: h
                .snapshots
                .into_iter()
                .map(|s| pb::GuardrailSnapshot {
                    at: s.at,
                    step: s.step as u32,
                    share_bp: s.share_bp,
                    figures: s.figures.into_iter().map(Into::into).collect(),
                })
                .collect(),
            arms,
            traffic: h
                .decisions
                .traffic
                .into_iter()
                .map(|t| pb::ArmTraffic {
                    start: t.start,
                    champion: t.champion,
                    candidate: t.candidate,
                    shadow: t.shadow,
                })
                .collect(),
            stretch_secs: h.decisions.stretch_secs,
            status: Some(h.status.into()),
        }
    }
}

/// The deadline a `grpc-timeout` header sets, counted from `received`. A malformed header is
/// ignored, as gRPC servers do.
pub fn deadline(metadata: &tonic::metadata::MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3_600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    received.checked_add(timeout)
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when
/// absent or malformed (an all-zero id is invalid), as the Trace Context spec says to ignore it.
pub fn trace_id(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("traceparent")?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then(|| trace.to_string())
}

/// A Remediate request as the domain asks it; `actor` is who the credentials say called.
pub(crate) fn remediate_spec(
    r: pb::RemediateRequest,
    actor: String,
) -> Result<RemediateSpec, RequestError> {
    let rollout_id = required_id("rollout_id", r.rollout_id)?;
    let with_version = match r.with_version.is_empty() {
        true => None,
        false => Some(required_id("with_version", r.with_version)?),
    };
    if r.reason.chars().count() > 1024 {
        return Err(RequestError::new(
            "reason",
            "must be at most 1024 characters",
        ));
    }
    if !r.apply && !r.reason.is_empty() {
        return Err(RequestError::new(
            "reason",
            "is recorded with applied remediations only: set apply, or leave it out",
        ));
    }
    Ok(RemediateSpec {
        rollout_id,
        with_version,
        apply: r.apply,
        reason: (!r.reason.is_empty()).then_some(r.reason),
        actor,
    })
}

impl From<&Harm> for pb::HarmedCustomer {
    fn from(h: &Harm) -> Self {
        let b = &h.harmful.body;
        let (restored_by, remediation) = match &h.status {
            HarmStatus::Restored { decision_id } => (decision_id.clone(), String::new()),
            HarmStatus::Remediated { decision_id } => (String::new(), decision_id.clone()),
            HarmStatus::ToRestore | HarmStatus::ChampionAgrees => (String::new(), String::new()),
        };
        pb::HarmedCustomer {
            customer_ref: b.customer_ref.clone(),
            harmful_decision_id: b.decision_id.clone(),
            harmed_at: b.recorded_at.clone(),
            candidate_version: b.version.clone(),
            limit_before: h.limit_before(),
            candidate_limit: h.candidate_limit(),
            limit_move: h.movement.as_str().to_string(),
            champion_limit: h.champion_limit,
            champion_version: h.champion_version.clone(),
            status: h.status.as_str().to_string(),
            restored_by_decision_id: restored_by,
            remediation_decision_id: remediation,
        }
    }
}

impl From<&Survey> for pb::RemediationSummary {
    fn from(s: &Survey) -> Self {
        let t = s.totals();
        pb::RemediationSummary {
            rollout_id: s.rollout.id.clone(),
            model: s.rollout.model.clone(),
            candidate: s.rollout.candidate.clone(),
            state: s.rollout.state.as_str().to_string(),
            champion: s.champion.version().to_string(),
            champion_digest: s.champion.digest.to_string(),
            customers: s.harms.iter().map(Into::into).collect(),
            totals: Some(pb::RemediationTotals {
                customers: t.customers,
                amount_lowered: t.amount_lowered,
                to_restore: t.to_restore,
                amount_to_restore: t.amount_to_restore,
                remediated: t.remediated,
                amount_remediated: t.amount_remediated,
                restored: t.restored,
                champion_agrees: t.champion_agrees,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    fn metadata(key: &'static str, value: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert(key, value.parse().unwrap());
        m
    }

    #[test]
    fn traceparent_gives_its_trace_id_and_malformed_ones_are_ignored() {
        let with = |v: &str| super::trace_id(&metadata("traceparent", v));
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            with(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            with("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(with(&format!("00-{id}-00f067aa0ba902b7")), None);
        assert_eq!(
            with(&format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase())),
            None
        );
        assert_eq!(with(&format!("00-{id}-00f067aa0ba902b7-01-extra")), None);
        assert_eq!(super::trace_id(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn grpc_timeout_sets_a_deadline_and_a_malformed_one_none() {
        let now = Instant::now();
        let at = |v: &str| super::deadline(&metadata("grpc-timeout", v), now);
        assert_eq!(at("250m"), Some(now + Duration::from_millis(250)));
        assert_eq!(at("2S"), Some(now + Duration::from_secs(2)));
        assert_eq!(at("1H"), Some(now + Duration::from_secs(3_600)));
        assert_eq!(at("10x"), None);
        assert_eq!(at("m"), None);
        assert_eq!(at(""), None);
    }
}
