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

/// What a decision did to a customer's limit, against the current limit the caller gave.
/// The one classification behind guardrails, backtests, metrics, traces and notices, so that
/// "cut" means the same in a guardrail breach as in a customer's notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMove {
    /// No current limit was given: a new customer.
    New,
    /// Granted above the current limit.
    Raised,
    /// Granted exactly the current limit (a current limit of 0 kept at 0 included).
    Held,
    /// Granted below the current limit, but above zero.
    Cut,
    /// Granted zero while the current limit was above zero.
    Withdrawn,
}

impl LimitMove {
    pub fn of(current_limit: Option<i64>, granted_limit: i64) -> LimitMove {
        match current_limit {
            None => LimitMove::New,
            Some(c) if granted_limit > c => LimitMove::Raised,
            Some(c) if granted_limit == c => LimitMove::Held,
            Some(c) if granted_limit == 0 && c > 0 => LimitMove::Withdrawn,
            Some(_) => LimitMove::Cut,
        }
    }

    /// Whether an existing limit moved (a new customer's first limit is not a change).
    pub fn is_change(self) -> bool {
        matches!(
            self,
            LimitMove::Raised | LimitMove::Cut | LimitMove::Withdrawn
        )
    }

    /// Whether the limit went down (withdrawals included).
    pub fn is_lowered(self) -> bool {
        matches!(self, LimitMove::Cut | LimitMove::Withdrawn)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitMove::New => "new",
            LimitMove::Raised => "raised",
            LimitMove::Held => "held",
            LimitMove::Cut => "cut",
            LimitMove::Withdrawn => "withdrawn",
        }
    }
}

/// An adverse action, the kind of decision the customer must be told the principal reasons
/// of (ECOA / Regulation B): the limit withdrawn or cut, or the request declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdverseAction {
    Withdrawal,
    Cut,
    Decline,
}

impl AdverseAction {
    /// The adverse action a decision is, if any. Named by what happened to the limit first
    /// (a decline that zeroes an existing limit is a withdrawal to the customer), then by
    /// the outcome. A review that keeps or raises the limit is not adverse: it is not final.
    pub fn of(
        outcome: Outcome,
        current_limit: Option<i64>,
        granted_limit: i64,
    ) -> Option<AdverseAction> {
        match (LimitMove::of(current_limit, granted_limit), outcome) {
            (LimitMove::Withdrawn, _) => Some(AdverseAction::Withdrawal),
            (LimitMove::Cut, _) => Some(AdverseAction::Cut),
            (_, Outcome::Decline) => Some(AdverseAction::Decline),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AdverseAction::Withdrawal => "withdrawal",
            AdverseAction::Cut => "cut",
            AdverseAction::Decline => "decline",
        }
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
    fn limit_moves_and_adverse_actions() {
        use AdverseAction as A;
        use LimitMove as M;
        let cases = [
            (None, 10, Outcome::Approve, M::New, None),
            (None, 0, Outcome::Decline, M::New, Some(A::Decline)),
            (Some(10), 20, Outcome::Approve, M::Raised, None),
            (Some(10), 10, Outcome::Review, M::Held, None),
            (Some(10), 10, Outcome::Decline, M::Held, Some(A::Decline)),
            (Some(0), 0, Outcome::Decline, M::Held, Some(A::Decline)),
            (Some(10), 5, Outcome::Review, M::Cut, Some(A::Cut)),
            (
                Some(10),
                0,
                Outcome::Decline,
                M::Withdrawn,
                Some(A::Withdrawal),
            ),
            (
                Some(10),
                0,
                Outcome::Review,
                M::Withdrawn,
                Some(A::Withdrawal),
            ),
        ];
        for (current, granted, outcome, mv, adverse) in cases {
            assert_eq!(
                LimitMove::of(current, granted),
                mv,
                "{current:?} → {granted}"
            );
            assert_eq!(AdverseAction::of(outcome, current, granted), adverse);
        }
        assert!(M::Withdrawn.is_lowered() && M::Cut.is_lowered() && !M::Held.is_lowered());
        assert!(!M::New.is_change() && !M::Held.is_change() && M::Raised.is_change());
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
