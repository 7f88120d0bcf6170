//! The limit policy of a version: probability of default → grade → decision and credit limit.
//!
//! Every number lives in the bundle's manifest, so a version fixes the model and the policy
//! together, and a recorded decision can be re-derived from its bundle alone.

use serde::{Deserialize, Serialize};

/// What a decision tells the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Approve,
    Review,
    Decline,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approve => "approve",
            Outcome::Review => "review",
            Outcome::Decline => "decline",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        [Outcome::Approve, Outcome::Review, Outcome::Decline]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// One grade band: probabilities of default in `[pd_min, pd_max)` (the last band also takes 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Band {
    pub grade: String,
    pub pd_min: f64,
    pub pd_max: f64,
    pub decision: Outcome,
    /// The current limit is multiplied by this: above 1 raises, 1 holds, below 1 cuts, 0 withdraws.
    pub limit_factor: f64,
    /// The limit granted when the caller gives no current limit (a new customer).
    pub starting_limit: i64,
}

/// Grade bands covering `[0, 1]` in order, a cap and a rounding unit for limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// No limit granted exceeds this.
    pub limit_cap: i64,
    /// Granted limits are rounded to a multiple of this.
    pub limit_rounding: i64,
    #[serde(rename = "band")]
    pub bands: Vec<Band>,
}

/// What the policy made of one probability of default.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub grade: String,
    pub band: usize,
    pub decision: Outcome,
    pub granted_limit: i64,
}

impl Policy {
    /// The policy the trainer writes unless told otherwise: six grades for credit limits.
    pub fn credit_limit_default() -> Self {
        let band = |grade: &str, pd_min, pd_max, decision, limit_factor, starting_limit| Band {
            grade: grade.into(),
            pd_min,
            pd_max,
            decision,
            limit_factor,
            starting_limit,
        };
        Policy {
            limit_cap: 1_000_000,
            limit_rounding: 1_000,
            bands: vec![
                band("A", 0.0, 0.05, Outcome::Approve, 1.2, 100_000),
                band("B", 0.05, 0.10, Outcome::Approve, 1.1, 60_000),
                band("C", 0.10, 0.20, Outcome::Approve, 1.0, 30_000),
                band("D", 0.20, 0.35, Outcome::Review, 0.8, 10_000),
                band("E", 0.35, 0.50, Outcome::Review, 0.5, 0),
                band("F", 0.50, 1.0, Outcome::Decline, 0.0, 0),
            ],
        }
    }

    /// Checks that the bands are ordered, contiguous and cover `[0, 1]`, and that every
    /// number is usable. Returns the first problem found.
    pub fn check(&self) -> Result<(), String> {
        if self.bands.is_empty() {
            return Err("the policy has no bands".into());
        }
        if self.limit_cap < 0 || self.limit_rounding <= 0 {
            return Err("limit_cap must be ≥ 0 and limit_rounding > 0".into());
        }
        let mut expected_min = 0.0;
        for b in &self.bands {
            if b.pd_min != expected_min {
                return Err(format!(
                    "band {} starts at {} but the previous band ends at {expected_min} \
                     (bands must be contiguous from 0)",
                    b.grade, b.pd_min
                ));
            }
            if b.pd_max.partial_cmp(&b.pd_min) != Some(std::cmp::Ordering::Greater) {
                return Err(format!("band {} is empty or reversed", b.grade));
            }
            if !(b.limit_factor.is_finite() && b.limit_factor >= 0.0) {
                return Err(format!(
                    "band {}: limit_factor must be finite and ≥ 0",
                    b.grade
                ));
            }
            if b.starting_limit < 0 {
                return Err(format!("band {}: starting_limit must be ≥ 0", b.grade));
            }
            expected_min = b.pd_max;
        }
        if expected_min != 1.0 {
            return Err(format!("the bands end at {expected_min}, not 1"));
        }
        Ok(())
    }

    /// Applies the policy. `pd` must be in `[0, 1]` (a sigmoid output always is).
    pub fn apply(&self, pd: f64, current_limit: Option<i64>) -> Applied {
        let last = self.bands.len() - 1;
        let band = self
            .bands
            .iter()
            .position(|b| pd < b.pd_max)
            .unwrap_or(last);
        let b = &self.bands[band];
        let raw = match current_limit {
            Some(current) => current as f64 * b.limit_factor,
            None => b.starting_limit as f64,
        };
        let unit = self.limit_rounding as f64;
        let rounded = ((raw / unit).round() * unit).clamp(0.0, self.limit_cap as f64);
        Applied {
            grade: b.grade.clone(),
            band,
            decision: b.decision,
            granted_limit: rounded as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_sound() {
        Policy::credit_limit_default().check().unwrap();
    }

    #[test]
    fn limits_raise_hold_cut_withdraw_and_cap() {
        let p = Policy::credit_limit_default();
        assert_eq!(p.apply(0.01, Some(100_000)).granted_limit, 120_000);
        assert_eq!(p.apply(0.15, Some(100_000)).granted_limit, 100_000);
        assert_eq!(p.apply(0.25, Some(100_000)).granted_limit, 80_000);
        let worst = p.apply(0.9, Some(100_000));
        assert_eq!((worst.granted_limit, worst.decision), (0, Outcome::Decline));
        assert_eq!(p.apply(1.0, None).grade, "F");
        assert_eq!(p.apply(0.0, Some(990_000)).granted_limit, 1_000_000);
        assert_eq!(p.apply(0.07, None).granted_limit, 60_000);
    }

    #[test]
    fn gaps_and_short_coverage_are_refused() {
        let mut p = Policy::credit_limit_default();
        p.bands[2].pd_min = 0.11;
        assert!(p.check().unwrap_err().contains("contiguous"));
        let mut p = Policy::credit_limit_default();
        p.bands.pop();
        assert!(p.check().unwrap_err().contains("not 1"));
    }
}
