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
use crate::policy::Outcome;
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
    pub withdrawn_share: f64,
    pub cut_share: f64,
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
    /// The bands hit hardest (by withdrawn share, then cut share), at most ten.
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
    #[error(transparent)]
    Log(#[from] LogError),
}

fn moved(current: Option<i64>, granted: i64, m: &mut LimitMoves) {
    match current {
        None => m.new_customers += 1,
        Some(c) if granted > c => {
            m.raised += 1;
            m.amount_raised += granted - c;
        }
        Some(c) if granted == c => m.held += 1,
        Some(c) => {
            if granted == 0 && c > 0 {
                m.withdrawn += 1;
            } else {
                m.cut += 1;
            }
            m.amount_cut += granted - c;
        }
    }
}

fn observation(outcome: Outcome, pd: f64, current: Option<i64>, granted: i64) -> Observation {
    Observation {
        declined: outcome == Outcome::Decline,
        cut: current.is_some_and(|c| granted < c),
        withdrawn: current.is_some_and(|c| c > 0 && granted == 0),
        pd,
        latency_us: 0,
        error: false,
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
    // sample is held in memory, however long the log.
    let cap = spec.sample.unwrap_or(usize::MAX);
    let mut chosen: BTreeMap<(String, i64), DecisionRecord> = BTreeMap::new();
    log.scan(&spec.window, &mut |r| {
        if r.body.model != spec.model || r.body.arm != "champion" {
            return true;
        }
        // Each customer's latest decision: a later record replaces the earlier one.
        let seq = if spec.all_decisions { r.seq } else { 0 };
        let key = (r.body.customer_ref.clone(), seq);
        if chosen.len() >= cap && chosen.last_key_value().is_some_and(|(last, _)| &key > last) {
            return true; // outside the sample, now and for the rest of the scan
        }
        chosen.insert(key, r);
        if chosen.len() > cap {
            chosen.pop_last();
        }
        true
    })?;
    let records: Vec<DecisionRecord> = chosen.into_values().collect();
    if records.is_empty() {
        return Err(BacktestError::Empty(spec.model.clone()));
    }

    let total = records.len() as u64;
    let mut matrix = BTreeMap::new();
    let (mut champion_limits, mut candidate_limits) =
        (LimitMoves::default(), LimitMoves::default());
    let (mut champion_window, mut candidate_window) = (ArmWindow::default(), ArmWindow::default());
    let (mut champion_pds, mut candidate_pds) = (Vec::new(), Vec::new());
    // Per scored record: its candidate features and what the candidate did.
    let mut scored: Vec<(&DecisionRecord, bool, bool)> = Vec::new();
    let mut unscorable = 0;
    let window_cap = records.len();
    for (i, r) in records.iter().enumerate() {
        if i % 1_000 == 0 {
            progress(i as u64, total);
        }
        let b = &r.body;
        let x: Option<Vec<f64>> = candidate
            .schema
            .features()
            .iter()
            .map(|f| b.features.get(&f.name).copied())
            .collect();
        let Some(x) = x else {
            unscorable += 1;
            continue;
        };
        let s = candidate.model.score(&x);
        let applied = candidate
            .manifest
            .policy
            .apply(s.probability_of_default, b.current_limit);
        let champion_outcome = Outcome::parse(&b.decision).unwrap_or(Outcome::Review);
        *matrix
            .entry(format!("{}→{}", b.decision, applied.decision.as_str()))
            .or_insert(0) += 1;
        moved(b.current_limit, b.granted_limit, &mut champion_limits);
        moved(
            b.current_limit,
            applied.granted_limit,
            &mut candidate_limits,
        );
        let cand = observation(
            applied.decision,
            s.probability_of_default,
            b.current_limit,
            applied.granted_limit,
        );
        champion_window.push(
            observation(
                champion_outcome,
                b.probability_of_default,
                b.current_limit,
                b.granted_limit,
            ),
            window_cap,
        );
        candidate_window.push(cand, window_cap);
        champion_pds.push(b.probability_of_default);
        candidate_pds.push(s.probability_of_default);
        scored.push((r, cand.withdrawn, cand.cut));
    }
    progress(total, total);

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
        guardrails: evaluate(thresholds, &champion_window, &candidate_window),
    })
}

/// Each feature cut into quintile bands of the backtest population; the ten bands where the
/// candidate withdraws (then cuts) the largest share, among bands of at least 1% of customers.
fn segments(candidate: &Bundle, scored: &[(&DecisionRecord, bool, bool)]) -> Vec<Segment> {
    let n = scored.len();
    let mut out = Vec::new();
    for f in candidate.schema.features() {
        let mut values: Vec<f64> = scored
            .iter()
            .map(|(r, _, _)| r.body.features[&f.name])
            .collect();
        values.sort_by(f64::total_cmp);
        let mut cuts: Vec<f64> = (1..5).map(|q| values[q * n / 5]).collect();
        cuts.dedup();
        let mut bands: Vec<(f64, f64, u64, u64, u64)> = (0..=cuts.len())
            .map(|_| (f64::INFINITY, f64::NEG_INFINITY, 0, 0, 0))
            .collect();
        for (r, withdrawn, cut) in scored {
            let v = r.body.features[&f.name];
            let band = &mut bands[cuts.iter().take_while(|c| v >= **c).count()];
            band.0 = band.0.min(v);
            band.1 = band.1.max(v);
            band.2 += 1;
            band.3 += u64::from(*withdrawn);
            band.4 += u64::from(*cut);
        }
        for (low, high, customers, withdrawn, cut) in bands {
            if customers == 0 || (customers as usize) * 100 < n {
                continue;
            }
            out.push(Segment {
                feature: f.name.clone(),
                low,
                high,
                customers,
                withdrawn_share: withdrawn as f64 / customers as f64,
                cut_share: cut as f64 / customers as f64,
            });
        }
    }
    out.sort_by(|a, b| {
        b.withdrawn_share
            .total_cmp(&a.withdrawn_share)
            .then(b.cut_share.total_cmp(&a.cut_share))
            .then(a.feature.cmp(&b.feature))
            .then(a.low.total_cmp(&b.low))
    });
    out.truncate(10);
    out
}
