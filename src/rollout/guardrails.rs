//! Guardrails: the candidate (or shadow) arm against the champion on a sliding window.
//!
//! Each arm keeps its last `window` observations. A guardrail breaches only with a minimum
//! sample on both arms and, for rates, a one-sided two-proportion z-test at `alpha`, so that
//! noise at a 1% share does not roll a sound candidate back. PSI compares the candidate's PD
//! distribution with the champion's over ten bins cut at the champion's deciles.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::policy::{LimitMove, Outcome};

/// Decisions each arm needs before PSI is judged, whatever the plan's `min_sample`.
pub const PSI_MIN_SAMPLE: usize = 200;

/// Candidate decisions needed before the p99 latency is judged: on fewer, the p99 is one of
/// the few slowest, and one scoring descheduled for a moment would roll a sound version back.
pub const P99_MIN_SAMPLE: usize = 1_000;

/// Guardrail thresholds; part of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Candidate decline rate minus champion's, at most.
    pub max_decline_rate_diff: f64,
    /// Share of limits cut (granted < current) on the candidate minus champion's, at most.
    pub max_cut_rate_diff: f64,
    /// Share of limits withdrawn (granted 0, current > 0), candidate minus champion, at most.
    pub max_withdrawal_rate_diff: f64,
    /// PSI of the candidate's PD distribution against the champion's, at most.
    pub max_psi: f64,
    /// Share of requests the candidate's schema refused minus the champion's, at most.
    pub max_error_rate: f64,
    /// The candidate arm's p99 scoring latency, at most (milliseconds).
    pub max_p99_latency_ms: f64,
    /// Observations each arm needs before any guardrail may breach.
    pub min_sample: usize,
    /// A rate guardrail breaches when the candidate is worse by more than its threshold with
    /// confidence 1 − alpha. Guardrails are re-evaluated every second on a sliding window, so
    /// one rollout looks many times: 0.001 keeps the chance of a false rollback over a whole
    /// rollout small, and large harm still clears it within a few dozen decisions.
    pub alpha: f64,
    /// Observations kept per arm.
    pub window: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_decline_rate_diff: 0.05,
            max_cut_rate_diff: 0.05,
            max_withdrawal_rate_diff: 0.02,
            max_psi: 0.25,
            max_error_rate: 0.01,
            max_p99_latency_ms: 50.0,
            min_sample: 200,
            alpha: 0.001,
            window: 10_000,
        }
    }
}

impl Thresholds {
    pub fn check(&self) -> Result<(), String> {
        let fractions = [
            self.max_decline_rate_diff,
            self.max_cut_rate_diff,
            self.max_withdrawal_rate_diff,
            self.max_error_rate,
        ];
        if fractions.iter().any(|f| !(0.0..=1.0).contains(f)) {
            return Err("rate thresholds must be between 0 and 1".into());
        }
        if !(self.max_psi > 0.0 && self.max_p99_latency_ms > 0.0) {
            return Err("max_psi and max_p99_latency_ms must be positive".into());
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return Err("alpha must be between 0 and 0.5".into());
        }
        if self.min_sample == 0 || self.window < self.min_sample {
            return Err("min_sample must be ≥ 1 and window ≥ min_sample".into());
        }
        Ok(())
    }
}

/// One decision (or failure) seen on an arm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub declined: bool,
    pub cut: bool,
    pub withdrawn: bool,
    pub pd: f64,
    pub latency_us: u32,
    pub error: bool,
}

impl Observation {
    /// What the guardrails read of one decision: its outcome, PD and move of the limit, and
    /// how long it took to decide.
    pub fn of(
        outcome: Outcome,
        pd: f64,
        current_limit: Option<i64>,
        granted_limit: i64,
        latency: std::time::Duration,
    ) -> Observation {
        let moved = LimitMove::of(current_limit, granted_limit);
        Observation {
            declined: outcome == Outcome::Decline,
            cut: moved.is_lowered(),
            withdrawn: moved == LimitMove::Withdrawn,
            pd,
            latency_us: latency.as_micros().min(u128::from(u32::MAX)) as u32,
            error: false,
        }
    }

    /// A request the arm's schema refused.
    pub const REFUSED: Observation = Observation {
        declined: false,
        cut: false,
        withdrawn: false,
        pd: 0.0,
        latency_us: 0,
        error: true,
    };
}

/// An arm's last observations.
#[derive(Debug, Clone, Default)]
pub struct ArmWindow {
    seen: VecDeque<Observation>,
}

impl ArmWindow {
    pub fn push(&mut self, o: Observation, cap: usize) {
        if self.seen.len() >= cap {
            self.seen.pop_front();
        }
        self.seen.push_back(o);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn decided(&self) -> impl Iterator<Item = &Observation> {
        self.seen.iter().filter(|o| !o.error)
    }

    fn count(&self, f: impl Fn(&Observation) -> bool) -> (usize, usize) {
        let n = self.decided().count();
        (self.decided().filter(|o| f(o)).count(), n)
    }
}

/// One guardrail's value against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardrailReading {
    pub name: String,
    /// Candidate's figure minus champion's (the rates, refusals included), or the candidate's
    /// own (latency, PSI).
    pub value: f64,
    pub threshold: f64,
    /// One-sided p-value, for rate differences.
    pub p_value: Option<f64>,
    pub candidate_n: usize,
    pub champion_n: usize,
    pub breached: bool,
    /// Why it cannot judge yet, when the samples are too small.
    pub note: String,
}

/// Reads every guardrail; `candidate` is the candidate or shadow arm.
pub fn evaluate(
    t: &Thresholds,
    champion: &ArmWindow,
    candidate: &ArmWindow,
) -> Vec<GuardrailReading> {
    let enough =
        candidate.decided().count() >= t.min_sample && champion.decided().count() >= t.min_sample;
    let note = if enough {
        String::new()
    } else {
        format!("waiting for {} decisions on each arm", t.min_sample)
    };
    let rate = |name: &str, threshold: f64, f: &dyn Fn(&Observation) -> bool| {
        let (xc, nc) = candidate.count(f);
        let (xh, nh) = champion.count(f);
        GuardrailReading {
            note: note.clone(),
            ..rate_reading(name, threshold, t.alpha, enough, (xc, nc), (xh, nh))
        }
    };
    let mut readings = vec![
        rate("decline_rate_diff", t.max_decline_rate_diff, &|o| {
            o.declined
        }),
        rate("cut_rate_diff", t.max_cut_rate_diff, &|o| o.cut),
        rate("withdrawal_rate_diff", t.max_withdrawal_rate_diff, &|o| {
            o.withdrawn
        }),
    ];
    let psi_value = psi(
        &champion.decided().map(|o| o.pd).collect::<Vec<_>>(),
        &candidate.decided().map(|o| o.pd).collect::<Vec<_>>(),
    );
    // PSI has no significance test: on a small sample, chance alone leaves a decile nearly
    // empty and inflates it. It is judged only on samples where that noise stays well under
    // any sensible threshold.
    let psi_min = t.min_sample.max(PSI_MIN_SAMPLE);
    let psi_enough =
        candidate.decided().count() >= psi_min && champion.decided().count() >= psi_min;
    readings.push(GuardrailReading {
        name: "psi".into(),
        value: psi_value,
        threshold: t.max_psi,
        p_value: None,
        candidate_n: candidate.decided().count(),
        champion_n: champion.decided().count(),
        breached: psi_enough && psi_value > t.max_psi,
        note: if psi_enough {
            String::new()
        } else {
            format!("waiting for {psi_min} decisions on each arm")
        },
    });
    // Requests each arm refused by its own schema. Against the champion's rate, so that bad
    // input both arms refuse (a misbehaving client) is not held against the candidate.
    let refused = |w: &ArmWindow| (w.seen.iter().filter(|o| o.error).count(), w.len());
    let (on_candidate, on_champion) = (refused(candidate), refused(champion));
    let errors_enough = on_candidate.1 >= t.min_sample && on_champion.1 >= t.min_sample;
    readings.push(GuardrailReading {
        note: if errors_enough {
            String::new()
        } else {
            format!("waiting for {} requests on each arm", t.min_sample)
        },
        ..rate_reading(
            "error_rate_diff",
            t.max_error_rate,
            t.alpha,
            errors_enough,
            on_candidate,
            on_champion,
        )
    });
    let p99_ms = p99(candidate.decided().map(|o| o.latency_us)) / 1000.0;
    let p99_min = t.min_sample.max(P99_MIN_SAMPLE);
    let p99_enough = candidate.decided().count() >= p99_min;
    readings.push(GuardrailReading {
        name: "p99_latency_ms".into(),
        value: p99_ms,
        threshold: t.max_p99_latency_ms,
        p_value: None,
        candidate_n: candidate.decided().count(),
        champion_n: champion.decided().count(),
        breached: p99_enough && p99_ms > t.max_p99_latency_ms,
        note: if p99_enough {
            String::new()
        } else {
            format!("waiting for {p99_min} candidate decisions")
        },
    });
    readings
}

/// The guardrails that only this server can read: refusals and latency, which the log does
/// not record.
const LOCAL_ONLY: [&str; 2] = ["error_rate_diff", "p99_latency_ms"];

/// Readings judged on every replica's recorded decisions (`shared`), with the guardrails
/// only this server can read taken from `local`.
pub fn with_local(
    shared: Vec<GuardrailReading>,
    local: &[GuardrailReading],
) -> Vec<GuardrailReading> {
    shared
        .into_iter()
        .map(|r| {
            match local
                .iter()
                .find(|l| l.name == r.name && LOCAL_ONLY.contains(&r.name.as_str()))
            {
                Some(l) => l.clone(),
                None => r,
            }
        })
        .collect()
}

/// A guardrail on a rate, candidate (`x` of `n`) against champion. It breaches only when the
/// candidate is worse by more than `threshold` with confidence 1 − `alpha`: the lower end of
/// the difference's confidence interval is above the threshold. (Testing "any difference"
/// and then comparing the point estimate with the threshold rolled back a sound version
/// whose true difference sat just under it, as soon as noise pushed the estimate over.)
fn rate_reading(
    name: &str,
    threshold: f64,
    alpha: f64,
    enough: bool,
    (xc, nc): (usize, usize),
    (xh, nh): (usize, usize),
) -> GuardrailReading {
    let lower = diff_lower_bound(xc, nc, xh, nh, alpha);
    GuardrailReading {
        name: name.into(),
        value: ratio(xc, nc) - ratio(xh, nh),
        threshold,
        p_value: Some(one_sided_p(xc, nc, xh, nh)),
        candidate_n: nc,
        champion_n: nh,
        breached: enough && lower > threshold,
        note: String::new(),
    }
}

/// The lower end of a one-sided 1 − `alpha` confidence interval for x1/n1 − x2/n2: Newcombe's
/// hybrid score interval, built from each rate's Wilson interval, which keeps its coverage
/// for small samples and rates near 0 where the normal approximation does not.
pub fn diff_lower_bound(x1: usize, n1: usize, x2: usize, n2: usize, alpha: f64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return f64::NEG_INFINITY;
    }
    let z = normal_quantile(1.0 - alpha);
    let (p1, p2) = (ratio(x1, n1), ratio(x2, n2));
    let (l1, _) = wilson(x1, n1, z);
    let (_, u2) = wilson(x2, n2, z);
    p1 - p2 - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt()
}

/// Wilson's score interval for x/n at `z`.
fn wilson(x: usize, n: usize, z: f64) -> (f64, f64) {
    let (p, n) = (x as f64 / n as f64, n as f64);
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (centre - half, centre + half)
}

/// Φ⁻¹(p), the standard normal quantile, for 0 < p < 1 (Acklam's rational approximation,
/// relative error below 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.024_25;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

fn ratio(x: usize, n: usize) -> f64 {
    if n == 0 { 0.0 } else { x as f64 / n as f64 }
}

/// P(candidate's rate is this high above the champion's by chance): Fisher's exact test,
/// one-sided. Exact at any size: the normal approximation of a z-test calls one withdrawal in
/// 36 against none in 364 significant (p ≈ 7e-4, which rolled a sound demo version back);
/// the exact p is 0.09.
pub fn one_sided_p(x1: usize, n1: usize, x2: usize, n2: usize) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    // Under no difference, the candidate's count is hypergeometric: `k` events drawn into
    // `n1` of `n` observations, `events` of which are events.
    let (n, events) = (n1 + n2, x1 + x2);
    let (lo, hi) = (n1.saturating_sub(n - events), n1.min(events));
    let ln_p = |k: usize| ln_choose(events, k) + ln_choose(n - events, n1 - k) - ln_choose(n, n1);
    let mean = n1 as f64 * events as f64 / n as f64;
    // Sum the tail that moves away from the mode, so terms only shrink and the sum can stop
    // once they no longer count.
    let tail = |from: usize, up: bool| {
        let (mut sum, mut k) = (0.0, from);
        loop {
            let term = ln_p(k).exp();
            sum += term;
            if term < sum * 1e-17 || (up && k == hi) || (!up && k == lo) {
                return sum;
            }
            k = if up { k + 1 } else { k - 1 };
        }
    };
    let p = if x1 as f64 >= mean {
        tail(x1, true)
    } else if x1 == lo {
        1.0
    } else {
        1.0 - tail(x1 - 1, false)
    };
    p.clamp(0.0, 1.0)
}

fn ln_choose(n: usize, k: usize) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// ln Γ(x) for x ≥ 1 (Lanczos, g = 7, nine terms; relative error below 1e-13).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Population Stability Index of `actual` against `expected`, over ten bins cut at the
/// deciles of `expected`. Empty bins count as 0.0001 so that the logarithm stays finite.
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    if expected.is_empty() || actual.is_empty() {
        return 0.0;
    }
    let mut sorted = expected.to_vec();
    sorted.sort_by(f64::total_cmp);
    let cuts: Vec<f64> = (1..10).map(|i| sorted[i * sorted.len() / 10]).collect();
    let shares = |xs: &[f64]| {
        let mut bins = [0usize; 10];
        for x in xs {
            bins[cuts.iter().take_while(|c| x >= c).count()] += 1;
        }
        // Half a count added to every bin (Jeffreys): an empty bin stays finite without a
        // floor so small that one empty decile alone would read as a large shift.
        bins.map(|b| (b as f64 + 0.5) / (xs.len() as f64 + 5.0))
    };
    let (e, a) = (shares(expected), shares(actual));
    e.iter().zip(&a).map(|(e, a)| (a - e) * (a / e).ln()).sum()
}

fn p99(latencies: impl Iterator<Item = u32>) -> f64 {
    let mut v: Vec<u32> = latencies.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    f64::from(v[(v.len() * 99 / 100).min(v.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(declined: bool, withdrawn: bool, pd: f64) -> Observation {
        Observation {
            declined,
            cut: withdrawn,
            withdrawn,
            pd,
            latency_us: 100,
            error: false,
        }
    }

    fn window(n: usize, every: usize, pd: impl Fn(usize) -> f64) -> ArmWindow {
        let mut w = ArmWindow::default();
        for i in 0..n {
            let bad = every > 0 && i % every == 0;
            w.push(obs(bad, bad, pd(i)), 100_000);
        }
        w
    }

    #[test]
    fn shared_readings_keep_this_servers_refusals_and_latency() {
        let t = Thresholds::default();
        let mut champion = ArmWindow::default();
        let mut candidate = ArmWindow::default();
        for i in 0..300 {
            champion.push(obs(false, false, 0.1), t.window);
            candidate.push(obs(i % 2 == 0, false, 0.1), t.window);
        }
        let shared = evaluate(&t, &champion, &candidate);
        let mut local_candidate = ArmWindow::default();
        for _ in 0..300 {
            local_candidate.push(Observation::REFUSED, t.window);
        }
        let local = evaluate(&t, &champion, &local_candidate);
        let merged = with_local(shared.clone(), &local);
        let by_name =
            |rs: &[GuardrailReading], n: &str| rs.iter().find(|r| r.name == n).unwrap().clone();
        assert_eq!(merged.len(), shared.len());
        for name in ["decline_rate_diff", "cut_rate_diff", "psi"] {
            assert_eq!(by_name(&merged, name), by_name(&shared, name), "{name}");
        }
        for name in LOCAL_ONLY {
            assert_eq!(by_name(&merged, name), by_name(&local, name), "{name}");
        }
        assert!(by_name(&merged, "decline_rate_diff").breached);
        assert!(by_name(&merged, "error_rate_diff").breached);
    }

    #[test]
    fn normal_quantiles_and_the_difference_bound_match_published_values() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_964),
            (0.999, 3.090_232),
            (0.01, -2.326_348),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "Φ⁻¹({p})");
        }
        // Newcombe (1998), table II, example (a): 56/70 against 48/80, 95% two-sided, that is
        // a one-sided 97.5% lower bound of 0.0524.
        let lower = diff_lower_bound(56, 70, 48, 80, 0.025);
        assert!((lower - 0.0524).abs() < 5e-4, "{lower}");
    }

    #[test]
    fn a_candidate_just_under_a_threshold_is_not_rolled_back_by_noise() {
        // Like the demo's sound v3, live: 6 points more declines on 346 candidate decisions
        // than on 2,434 champion ones (11% against 5%). That there is a difference is
        // significant; that it exceeds the 5-point threshold is not.
        let t = Thresholds::default();
        let r = rate_reading(
            "decline_rate_diff",
            0.05,
            t.alpha,
            true,
            (38, 346),
            (122, 2_434),
        );
        assert!(
            r.value > 0.05 && r.p_value.unwrap() < 0.001 && !r.breached,
            "{r:?}"
        );
        // Twenty points more on the same sample is known to exceed it.
        let r = rate_reading(
            "decline_rate_diff",
            0.05,
            t.alpha,
            true,
            (107, 346),
            (122, 2_434),
        );
        assert!(r.breached, "{r:?}");
    }

    #[test]
    fn p_values_are_fishers_exact_ones() {
        assert!(ln_gamma(1.0).abs() < 1e-12);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        // The lady tasting tea: 3 of 4 against 1 of 4, P = 17/70.
        assert!((one_sided_p(3, 4, 1, 4) - 17.0 / 70.0).abs() < 1e-12);
        // One withdrawal in 36 against none in 364: P = 36/400.
        assert!((one_sided_p(1, 36, 0, 364) - 0.09).abs() < 1e-12);
        assert!(one_sided_p(30, 100, 10, 100) < 0.001);
        assert!(one_sided_p(12, 100, 10, 100) > 0.2);
        assert!(one_sided_p(0, 100, 10, 100) > 0.999);
        // Large windows stay cheap and sane.
        assert!(one_sided_p(700, 10_000, 500, 10_000) < 1e-8);
        assert!(one_sided_p(505, 10_000, 500, 10_000) > 0.4);
    }

    #[test]
    fn psi_is_zero_for_one_distribution_and_large_for_a_shift() {
        let a: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        assert!(psi(&a, &a) < 1e-9);
        let shifted: Vec<f64> = a.iter().map(|x| (x + 0.3).min(1.0)).collect();
        assert!(psi(&a, &shifted) > 0.25);
    }

    #[test]
    fn psi_of_a_small_sample_from_the_same_distribution_stays_under_the_threshold() {
        // 200 draws from the champion's own distribution, in a fixed pseudo-random order.
        let champion: Vec<f64> = (0..5000).map(|i| i as f64 / 5000.0).collect();
        let sample: Vec<f64> = (0..PSI_MIN_SAMPLE)
            .map(|i| ((i * 7919) % 5000) as f64 / 5000.0)
            .collect();
        assert!(psi(&champion, &sample) < 0.1, "{}", psi(&champion, &sample));
    }

    #[test]
    fn one_slow_scoring_in_a_small_sample_is_no_latency_breach_and_a_slow_version_is() {
        let t = Thresholds {
            min_sample: 100,
            ..Thresholds::default()
        };
        let champion = window(5_000, 0, |i| (i % 100) as f64 / 100.0);
        let p99 = |w: &ArmWindow| {
            evaluate(&t, &champion, w)
                .into_iter()
                .find(|r| r.name == "p99_latency_ms")
                .unwrap()
        };
        // 100 decisions, one of them descheduled for 80 ms: its p99 is that one.
        let mut few = window(99, 0, |i| (i % 100) as f64 / 100.0);
        few.push(
            Observation {
                latency_us: 80_000,
                ..obs(false, false, 0.5)
            },
            100_000,
        );
        let r = p99(&few);
        assert!(r.value > t.max_p99_latency_ms && !r.breached, "{r:?}");
        // A version slow on 2% of 1,000 decisions is.
        let mut slow = window(980, 0, |i| (i % 100) as f64 / 100.0);
        for _ in 0..20 {
            slow.push(
                Observation {
                    latency_us: 80_000,
                    ..obs(false, false, 0.5)
                },
                100_000,
            );
        }
        assert!(p99(&slow).breached);
    }

    #[test]
    fn a_small_noisy_sample_never_breaches_and_a_real_harm_does() {
        let t = Thresholds::default();
        let champion = window(5_000, 10, |i| (i % 100) as f64 / 100.0);
        // 50 candidate decisions, half withdrawn: alarming, but below the minimum sample.
        let few = window(50, 2, |i| (i % 100) as f64 / 100.0);
        assert!(evaluate(&t, &champion, &few).iter().all(|r| !r.breached));
        // Same rates as the champion on a full sample: no breach.
        let same = window(2_000, 10, |i| (i % 100) as f64 / 100.0);
        assert!(evaluate(&t, &champion, &same).iter().all(|r| !r.breached));
        // Half of 400 withdrawn: breach, named.
        let harm = window(400, 2, |i| (i % 100) as f64 / 100.0);
        let breached: Vec<_> = evaluate(&t, &champion, &harm)
            .into_iter()
            .filter(|r| r.breached)
            .map(|r| r.name)
            .collect();
        assert!(
            breached.contains(&"withdrawal_rate_diff".to_string()),
            "{breached:?}"
        );
    }

    #[test]
    fn refusals_count_against_the_candidate_only_beyond_the_champions() {
        let t = Thresholds::default();
        let with_errors = |n: usize, every: usize| {
            let mut w = window(n, 0, |i| (i % 100) as f64 / 100.0);
            for i in 0..n {
                if i % every == 0 {
                    w.push(
                        Observation {
                            error: true,
                            ..obs(false, false, 0.5)
                        },
                        100_000,
                    );
                }
            }
            w
        };
        let error_reading = |champion: &ArmWindow, candidate: &ArmWindow| {
            evaluate(&t, champion, candidate)
                .into_iter()
                .find(|r| r.name == "error_rate_diff")
                .unwrap()
        };
        // A client sending bad input to both arms: 5% refused on each. No breach.
        let noisy = error_reading(&with_errors(4_000, 20), &with_errors(1_000, 20));
        assert!(!noisy.breached && noisy.value.abs() < 0.01, "{noisy:?}");
        // The candidate refusing 5% that the champion accepts: breach.
        let clean = window(4_000, 0, |i| (i % 100) as f64 / 100.0);
        let strict = error_reading(&clean, &with_errors(1_000, 20));
        assert!(strict.breached, "{strict:?}");
    }
}
