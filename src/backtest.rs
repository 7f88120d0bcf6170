//! Impact preview: what a candidate version would do to the customers the champion recently
//! decided, computed offline from the decision log before any customer sees the candidate.
//!
//! The recorded inputs (exactly as scored) are re-scored with the candidate bundle; nothing is
//! recorded and the serving path is not touched (the work runs on a blocking thread over a
//! read connection). Deterministic: records are taken in chain order, a sample keeps the
//! customers with the smallest refs (refs are HMACs, so that is a uniform, repeatable pick).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::decision_log::{DecisionLog, DecisionRecord, LogError, Window};
use crate::policy::{LimitMove, Outcome};
use crate::registry::{Registry, RegistryError};
use crate::rollout::guardrails::{
    ArmWindow, GuardrailReading, Observation, Thresholds, evaluate, psi,
};

/// What to preview.
#[derive(Debug, Clone, PartialEq)]
pub struct BacktestSpec {
    pub model: String,
    pub window: Window,
    /// At most this many customers (or decisions, with `all_decisions`).
    pub sample: Option<usize>,
    /// Every decision in the window instead of each customer's latest.
    pub all_decisions: bool,
    /// The most decisions the backtest may hold: a window with more fails, unless a sample
    /// no larger is given. Bounds the server's memory (about 650 bytes a decision).
    pub held_at_most: usize,
}

/// How limits would move, counted against each customer's current limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitMoves {
    pub raised: u64,
    pub held: u64,
    pub cut: u64,
    pub withdrawn: u64,
    pub new_customers: u64,
    /// Sum of (granted − current) over raised limits, and over cut or withdrawn ones.
    pub amount_raised: i64,
    pub amount_cut: i64,
}

/// A quantile band of one feature and what the candidate does to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub feature: String,
    pub low: f64,
    pub high: f64,
    pub customers: u64,
    /// Share of the band whose limit the candidate withdraws.
    pub withdrawn_share: f64,
    /// Share of the band whose limit the candidate lowers (withdrawals included).
    pub cut_share: f64,
    /// The same shares for what the champion decided.
    pub champion_withdrawn_share: f64,
    pub champion_cut_share: f64,
}

/// The preview.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacktestReport {
    pub model: String,
    pub candidate: String,
    pub candidate_digest: String,
    pub compared: u64,
    /// Records the candidate could not score (a feature its schema needs was not recorded).
    pub unscorable: u64,
    /// (champion decision, candidate decision) → count.
    pub decision_matrix: BTreeMap<String, u64>,
    /// What the champion did, and what the candidate would do, to the same current limits.
    pub champion_limits: LimitMoves,
    pub candidate_limits: LimitMoves,
    pub psi: f64,
    /// The bands the candidate hits hardest beyond the champion (by the rise in withdrawn
    /// share, then in cut share), at most ten.
    pub segments: Vec<Segment>,
    pub guardrails: Vec<GuardrailReading>,
}

impl BacktestReport {
    pub fn breached(&self) -> Vec<&GuardrailReading> {
        self.guardrails.iter().filter(|g| g.breached).collect()
    }
}

/// Why a backtest failed.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("no recorded decisions of model {0} in the window")]
    Empty(String),
    #[error(
        "none of the {1} recorded decisions of model {0} carry the features the candidate needs"
    )]
    Unscorable(String, u64),
    #[error(
        "the window holds more than {0} decisions to re-score (backtest_max_sample): \
         give a sample of at most {0}, or a narrower window"
    )]
    TooLarge(usize),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Candidate(#[from] RegistryError),
    #[error("the backtest thread: {0}")]
    Thread(String),
}

/// Runs backtests for the server: the Backtest RPC's previews and the rollout start gate.
/// Each runs on a thread of its own at the lowest CPU priority.
pub struct Backtester {
    registry: Arc<Registry>,
    log: Arc<dyn DecisionLog>,
    /// The most decisions one backtest may hold (`backtest_max_sample`).
    max_sample: usize,
}

impl std::fmt::Debug for Backtester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backtester")
            .field("max_sample", &self.max_sample)
            .finish_non_exhaustive()
    }
}

impl Backtester {
    pub fn new(registry: Arc<Registry>, log: Arc<dyn DecisionLog>, max_sample: usize) -> Self {
        Backtester {
            registry,
            log,
            max_sample,
        }
    }

    /// The most decisions one backtest may hold.
    pub fn max_sample(&self) -> usize {
        self.max_sample
    }

    /// Previews version `candidate` of `spec.model`, loading it first if need be.
    pub async fn preview(
        &self,
        candidate: &str,
        spec: BacktestSpec,
        thresholds: Thresholds,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<BacktestReport, BacktestError> {
        let bundle = self.registry.load_bundle(&spec.model, candidate).await?;
        self.run(bundle, spec, thresholds, progress).await
    }

    /// Previews `candidate` on the model's recorded decisions, offline.
    pub async fn run(
        &self,
        candidate: Arc<Bundle>,
        spec: BacktestSpec,
        thresholds: Thresholds,
        mut progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<BacktestReport, BacktestError> {
        let log = self.log.clone();
        // A thread of its own at the lowest CPU priority, so that a preview yields to the
        // requests being served (and no pooled thread keeps the lowered priority).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("backtest".into())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                // SAFETY: setpriority on the calling thread (who = 0) has no memory effects.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                let _ = tx.send(run(&log, &candidate, &spec, &thresholds, &mut progress));
            })
            .map_err(|e| BacktestError::Thread(format!("starting: {e}")))?;
        rx.await
            .map_err(|_| BacktestError::Thread("it stopped".into()))?
    }
}

fn moved(current: Option<i64>, granted: i64, m: &mut LimitMoves) {
    let delta = granted - current.unwrap_or(granted);
    match LimitMove::of(current, granted) {
        LimitMove::New => m.new_customers += 1,
        LimitMove::Raised => {
            m.raised += 1;
            m.amount_raised += delta;
        }
        LimitMove::Held => m.held += 1,
        LimitMove::Cut => {
            m.cut += 1;
            m.amount_cut += delta;
        }
        LimitMove::Withdrawn => {
            m.withdrawn += 1;
            m.amount_cut += delta;
        }
    }
}

fn observation(outcome: Outcome, pd: f64, current: Option<i64>, granted: i64) -> Observation {
    Observation::of(outcome, pd, current, granted, std::time::Duration::ZERO)
}

/// What a backtest keeps of a sampled decision: the candidate's inputs and the champion's
/// answer, about a tenth of the whole record's memory.
struct Sampled {
    /// The recorded vector in the candidate's feature order; `None` if it lacks one of them.
    x: Option<Box<[f64]>>,
    pd: f64,
    decision: Box<str>,
    current_limit: Option<i64>,
    granted_limit: i64,
}

impl Sampled {
    fn of(r: &DecisionRecord, candidate: &Bundle) -> Sampled {
        let b = &r.body;
        Sampled {
            x: candidate
                .schema
                .features()
                .iter()
                .map(|f| b.features.get(&f.name).copied())
                .collect(),
            pd: b.probability_of_default,
            decision: b.decision.as_str().into(),
            current_limit: b.current_limit,
            granted_limit: b.granted_limit,
        }
    }
}

/// Runs a backtest. `progress(done, total)` is called as records are re-scored.
pub fn run(
    log: &Arc<dyn DecisionLog>,
    candidate: &Bundle,
    spec: &BacktestSpec,
    thresholds: &Thresholds,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BacktestReport, BacktestError> {
    // The champion's served decisions of this model in the window, keyed by (customer ref,
    // seq): refs are HMACs, so the smallest keys are a uniform and repeatable sample. Only the
    // sample is held in memory, however long the log, and only what re-scoring needs of it.
    let cap = spec.sample.unwrap_or(usize::MAX);
    let mut chosen: BTreeMap<(String, i64), Sampled> = BTreeMap::new();
    let mut too_large = false;
    log.scan(&spec.window, &mut |r| {
        if r.body.model != spec.model || r.body.arm != "champion" {
            return true;
        }
        // Each customer's latest decision: a later record replaces the earlier one.
        let seq = if spec.all_decisions { r.seq } else { 0 };
        if chosen.len() >= cap
            && chosen
                .last_key_value()
                .is_some_and(|((last, last_seq), _)| {
                    (r.body.customer_ref.as_str(), seq) > (last.as_str(), *last_seq)
                })
        {
            return true; // outside the sample, now and for the rest of the scan
        }
        let sampled = Sampled::of(&r, candidate);
        chosen.insert((r.body.customer_ref, seq), sampled);
        if chosen.len() > cap {
            chosen.pop_last();
        }
        too_large = chosen.len() > spec.held_at_most;
        !too_large
    })?;
    if too_large {
        return Err(BacktestError::TooLarge(spec.held_at_most));
    }
    let records: Vec<Sampled> = chosen.into_values().collect();
    if records.is_empty() {
        return Err(BacktestError::Empty(spec.model.clone()));
    }

    let total = records.len() as u64;
    let mut matrix = BTreeMap::new();
    let (mut champion_limits, mut candidate_limits) =
        (LimitMoves::default(), LimitMoves::default());
    let (mut champion_window, mut candidate_window) = (ArmWindow::default(), ArmWindow::default());
    let (mut champion_pds, mut candidate_pds) = (Vec::new(), Vec::new());
    // Per scored record: its inputs, and what the candidate and the champion did to its limit.
    let mut scored: Vec<(&[f64], Observation, Observation)> = Vec::new();
    let mut unscorable = 0;
    let window_cap = records.len();
    for (i, r) in records.iter().enumerate() {
        if i % 1_000 == 0 {
            progress(i as u64, total);
        }
        let Some(x) = r.x.as_deref() else {
            unscorable += 1;
            continue;
        };
        let verdict = candidate.decide(x, r.current_limit);
        let (s, applied) = (verdict.scored, verdict.applied);
        let champion_outcome = Outcome::parse(&r.decision).unwrap_or(Outcome::Review);
        *matrix
            .entry(format!("{}→{}", r.decision, applied.decision.as_str()))
            .or_insert(0) += 1;
        moved(r.current_limit, r.granted_limit, &mut champion_limits);
        moved(
            r.current_limit,
            applied.granted_limit,
            &mut candidate_limits,
        );
        let cand = observation(
            applied.decision,
            s.probability_of_default,
            r.current_limit,
            applied.granted_limit,
        );
        let champ = observation(champion_outcome, r.pd, r.current_limit, r.granted_limit);
        champion_window.push(champ, window_cap);
        candidate_window.push(cand, window_cap);
        champion_pds.push(r.pd);
        candidate_pds.push(s.probability_of_default);
        scored.push((x, cand, champ));
    }
    progress(total, total);
    if scored.is_empty() {
        // Nothing the candidate could score is no evidence at all: not a pass.
        return Err(BacktestError::Unscorable(spec.model.clone(), unscorable));
    }

    Ok(BacktestReport {
        model: spec.model.clone(),
        candidate: candidate.version().to_string(),
        candidate_digest: candidate.digest.to_string(),
        compared: scored.len() as u64,
        unscorable,
        decision_matrix: matrix,
        champion_limits,
        candidate_limits,
        psi: psi(&champion_pds, &candidate_pds),
        segments: segments(candidate, &scored),
        // Latency is not measured offline: that guardrail has nothing to say here.
        guardrails: evaluate(thresholds, &champion_window, &candidate_window)
            .into_iter()
            .filter(|g| g.name != "p99_latency_ms")
            .collect(),
    })
}

/// Each feature cut into quintile bands of the backtest population; the ten bands where the
/// candidate withdraws (then cuts) the most beyond what the champion did, among bands of at
/// least 1% of customers.
fn segments(candidate: &Bundle, scored: &[(&[f64], Observation, Observation)]) -> Vec<Segment> {
    #[derive(Default, Clone)]
    struct Band {
        low: f64,
        high: f64,
        n: u64,
        withdrawn: u64,
        cut: u64,
        champion_withdrawn: u64,
        champion_cut: u64,
    }
    let n = scored.len();
    let mut out = Vec::new();
    for (j, f) in candidate.schema.features().iter().enumerate() {
        // Bands are quantiles of the values present; a missing value (NaN, for a feature
        // that allows it) is in no band.
        let mut values: Vec<f64> = scored
            .iter()
            .map(|(x, _, _)| x[j])
            .filter(|v| !v.is_nan())
            .collect();
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        let m = values.len();
        let mut cuts: Vec<f64> = (1..5).map(|q| values[q * m / 5]).collect();
        cuts.dedup();
        let empty = Band {
            low: f64::INFINITY,
            high: f64::NEG_INFINITY,
            ..Band::default()
        };
        let mut bands = vec![empty; cuts.len() + 1];
        for (x, cand, champ) in scored {
            let v = x[j];
            if v.is_nan() {
                continue;
            }
            let b = &mut bands[cuts.iter().take_while(|c| v >= **c).count()];
            b.low = b.low.min(v);
            b.high = b.high.max(v);
            b.n += 1;
            b.withdrawn += u64::from(cand.withdrawn);
            b.cut += u64::from(cand.cut);
            b.champion_withdrawn += u64::from(champ.withdrawn);
            b.champion_cut += u64::from(champ.cut);
        }
        for b in bands {
            if b.n == 0 || (b.n as usize) * 100 < n {
                continue;
            }
            let share = |x: u64| x as f64 / b.n as f64;
            out.push(Segment {
                feature: f.name.clone(),
                low: b.low,
                high: b.high,
                customers: b.n,
                withdrawn_share: share(b.withdrawn),
                cut_share: share(b.cut),
                champion_withdrawn_share: share(b.champion_withdrawn),
                champion_cut_share: share(b.champion_cut),
            });
        }
    }
    let rise = |s: &Segment| {
        (
            s.withdrawn_share - s.champion_withdrawn_share,
            s.cut_share - s.champion_cut_share,
        )
    };
    out.sort_by(|a, b| {
        let (ra, rb) = (rise(a), rise(b));
        rb.0.total_cmp(&ra.0)
            .then(rb.1.total_cmp(&ra.1))
            .then(a.feature.cmp(&b.feature))
            .then(a.low.total_cmp(&b.low))
    });
    out.truncate(10);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision_log::RecordBody;

    fn record(features: BTreeMap<String, f64>) -> DecisionRecord {
        DecisionRecord {
            seq: 7,
            body: RecordBody {
                decision_id: "d7".into(),
                recorded_at: "2026-11-01T00:00:00Z".into(),
                request_id: "r7".into(),
                request_hash: String::new(),
                customer_ref: "c".into(),
                key_id: "k".into(),
                model: "credit-limit".into(),
                version: "v1".into(),
                digest: "sha256:x".into(),
                rollout_id: None,
                arm: "champion".into(),
                features,
                probability_of_default: 0.2,
                grade: "C".into(),
                decision: "review".into(),
                current_limit: Some(5_000),
                granted_limit: 4_000,
                reasons: vec![],
                caller: None,
                trace_id: None,
                remediates: None,
                pre_harm_limit: None,
                reason: None,
            },
            prev_hash: String::new(),
            hash: String::new(),
            replica: None,
        }
    }

    #[test]
    fn a_sampled_decision_keeps_the_candidates_inputs_in_its_order_or_none() {
        let candidate = Bundle::load(std::path::Path::new("models/credit-limit/v1"), None).unwrap();
        let names = candidate.schema.names();
        // Recorded by name, with one feature the candidate does not use.
        let mut features: BTreeMap<String, f64> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as f64))
            .collect();
        features.insert("NOT_IN_THE_SCHEMA".into(), -1.0);
        let sampled = Sampled::of(&record(features.clone()), &candidate);
        let expected: Vec<f64> = (0..names.len()).map(|i| i as f64).collect();
        assert_eq!(sampled.x.as_deref(), Some(&expected[..]));
        assert_eq!(
            (
                sampled.pd,
                &*sampled.decision,
                sampled.current_limit,
                sampled.granted_limit
            ),
            (0.2, "review", Some(5_000), 4_000)
        );
        // A vector lacking one of the candidate's features cannot be re-scored.
        features.remove(&names[3]);
        assert_eq!(Sampled::of(&record(features), &candidate).x, None);
    }
}
