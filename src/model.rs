//! The fitted logistic model of a version: standardise, weigh, sum, squash.
//!
//! Scoring is deliberately plain arithmetic in schema order, so that anyone holding a bundle's
//! `parameters.toml` can recompute a probability of default bit for bit, and so that the
//! reasons are the exact terms the version summed.

use serde::{Deserialize, Serialize};

pub mod trees;

/// How many principal reasons a decision carries at most (the usual adverse-action count).
pub const MAX_REASONS: usize = 4;

/// One term of the model: `coefficient * (x - mean) / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Term {
    pub name: String,
    pub mean: f64,
    pub scale: f64,
    pub coefficient: f64,
}

/// The fitted parameters, as stored in a bundle's `parameters.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticModel {
    pub intercept: f64,
    #[serde(rename = "feature")]
    pub terms: Vec<Term>,
}

/// A feature's share of one score.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub feature: String,
    /// Its term in the log-odds of default, against the average training customer.
    pub contribution: f64,
    pub value: f64,
}

/// The model's answer for one vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub probability_of_default: f64,
    /// The features that pushed the probability up, largest first, at most [`MAX_REASONS`].
    pub reasons: Vec<Contribution>,
}

impl LogisticModel {
    /// Checks every parameter is finite and every scale positive.
    pub fn check(&self) -> Result<(), String> {
        if !self.intercept.is_finite() {
            return Err("the intercept is not finite".into());
        }
        for t in &self.terms {
            if !t.mean.is_finite() || !t.coefficient.is_finite() {
                return Err(format!("parameters of {} are not finite", t.name));
            }
            if !(t.scale.is_finite() && t.scale > 0.0) {
                return Err(format!("scale of {} must be finite and positive", t.name));
            }
        }
        Ok(())
    }

    /// Scores a vector laid out in the order of the terms (the schema's order).
    pub fn score(&self, x: &[f64]) -> Scored {
        debug_assert_eq!(x.len(), self.terms.len());
        let mut logit = self.intercept;
        let mut reasons = Vec::with_capacity(self.terms.len());
        for (t, &value) in self.terms.iter().zip(x) {
            let contribution = t.coefficient * ((value - t.mean) / t.scale);
            logit += contribution;
            if contribution > 0.0 {
                reasons.push(Contribution {
                    feature: t.name.clone(),
                    contribution,
                    value,
                });
            }
        }
        // Largest first; ties keep schema order (the sort is stable), so reasons are reproducible.
        reasons.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
        reasons.truncate(MAX_REASONS);
        Scored {
            probability_of_default: sigmoid(logit),
            reasons,
        }
    }
}

/// The logistic function, written so that it neither overflows nor loses the tails.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> LogisticModel {
        LogisticModel {
            intercept: -1.0,
            terms: ["A", "B", "C", "D", "E", "F"]
                .iter()
                .enumerate()
                .map(|(i, n)| Term {
                    name: n.to_string(),
                    mean: 1.0,
                    scale: 2.0,
                    coefficient: i as f64 - 2.0,
                })
                .collect(),
        }
    }

    #[test]
    fn reasons_are_positive_largest_first_and_at_most_four() {
        let s = model().score(&[3.0; 6]);
        let names: Vec<_> = s.reasons.iter().map(|r| r.feature.as_str()).collect();
        assert_eq!(names, ["F", "E", "D"]);
        let logit = -1.0 + (-2.0 - 1.0 + 0.0 + 1.0 + 2.0 + 3.0);
        assert_eq!(s.probability_of_default, sigmoid(logit));
    }

    #[test]
    fn sigmoid_tails_are_finite() {
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn check_refuses_nan_and_zero_scale() {
        let mut m = model();
        m.terms[2].coefficient = f64::NAN;
        assert!(m.check().unwrap_err().contains("C"));
        let mut m = model();
        m.terms[0].scale = 0.0;
        assert!(m.check().is_err());
    }
}
