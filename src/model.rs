//! The models a version can hold, behind the one [`Model`] interface the rest of riskserve
//! scores through: the logistic regression riskserve trains itself (here), and the tree
//! ensembles credit teams train with XGBoost or LightGBM ([`trees`]).
//!
//! A model turns a vector in schema order into a probability of default and its principal
//! reasons: the features whose exact additive share of the log-odds pushed it up. For the
//! logistic model those shares are its own terms (plain arithmetic in schema order, so anyone
//! holding `parameters.toml` can recompute a score bit for bit); for trees they are the
//! features' exact Shapley values.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::schema::Monotone;

pub mod trees;

/// What every kind of model offers: its features, its answer for a vector, and the
/// properties a bundle's manifest may declare about it, checked at load.
pub trait Model: Send + Sync + fmt::Debug {
    /// The model's family, for manifests, logs and error messages.
    fn kind(&self) -> &'static str;
    /// The features in the order [`Model::score`] reads a vector.
    fn feature_names(&self) -> Vec<&str>;
    /// Whether a missing value (NaN in the vector) has a meaning to this model.
    fn handles_missing(&self) -> bool;
    /// Checks that the probability of default moves in `direction` with feature `feature`
    /// (an index into the vector) whatever the other features are; names where it does not.
    fn check_monotone(&self, feature: usize, direction: Monotone) -> Result<(), String>;
    /// The probability of default and the principal reasons for a vector.
    fn score(&self, x: &[f64]) -> Scored;
}

/// The principal reasons among per-feature shares of the log-odds: the positive ones,
/// largest first, at most [`MAX_REASONS`]. Ties keep schema order (the sort is stable), so
/// reasons are reproducible.
pub fn principal_reasons<'a>(
    names: impl Iterator<Item = &'a str>,
    shares: &[f64],
    x: &[f64],
) -> Vec<Contribution> {
    let mut reasons: Vec<Contribution> = names
        .zip(shares.iter().zip(x))
        .filter(|(_, (share, _))| **share > 0.0)
        .map(|(name, (&contribution, &value))| Contribution {
            feature: name.to_string(),
            contribution,
            value,
        })
        .collect();
    reasons.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
    reasons.truncate(MAX_REASONS);
    reasons
}

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
}

impl Model for LogisticModel {
    fn kind(&self) -> &'static str {
        "logistic regression"
    }

    fn feature_names(&self) -> Vec<&str> {
        self.terms.iter().map(|t| t.name.as_str()).collect()
    }

    fn handles_missing(&self) -> bool {
        false
    }

    fn check_monotone(&self, feature: usize, direction: Monotone) -> Result<(), String> {
        let c = self.terms[feature].coefficient;
        match direction {
            Monotone::Increasing if c < 0.0 => Err(format!("its coefficient is {c} < 0")),
            Monotone::Decreasing if c > 0.0 => Err(format!("its coefficient is {c} > 0")),
            _ => Ok(()),
        }
    }

    /// Scores a vector laid out in the order of the terms (the schema's order).
    fn score(&self, x: &[f64]) -> Scored {
        debug_assert_eq!(x.len(), self.terms.len());
        let mut logit = self.intercept;
        let mut shares = [0.0; 64];
        let mut owned = Vec::new();
        // Most schemas are small: keep the shares on the stack unless they are not.
        let shares: &mut [f64] = if x.len() <= shares.len() {
            &mut shares[..x.len()]
        } else {
            owned.resize(x.len(), 0.0);
            &mut owned
        };
        for ((t, &value), share) in self.terms.iter().zip(x).zip(shares.iter_mut()) {
            *share = t.coefficient * ((value - t.mean) / t.scale);
            logit += *share;
        }
        Scored {
            probability_of_default: sigmoid(logit),
            reasons: principal_reasons(self.terms.iter().map(|t| t.name.as_str()), shares, x),
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
