//! The feature schema of a version, and the validation of a request's features against it.
//!
//! A schema is part of a bundle's manifest. It turns the named, loosely typed feature values of
//! a request into the dense vector the model scores, in the schema's order, or refuses them with
//! a [`FeatureError`] that names the feature and the rule it broke. Nothing is ever scored from
//! a value that failed a rule.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of number a feature holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureType {
    /// Whole numbers only (counts, codes, months of delay).
    Integer,
    /// Any finite number (amounts).
    Number,
}

/// What happens when a request leaves a feature out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Missing {
    /// The value written in the manifest is scored in its place.
    Impute(f64),
    /// The request is refused. Written `"required"` in a manifest.
    Rule(MissingRule),
}

/// The named missing-value rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingRule {
    Required,
    /// The value reaches the model as missing (NaN), for models that route missing values
    /// (trees, by each split's default direction). Refused at load for a model that cannot.
    Allowed,
}

/// A declared direction of the probability of default in a feature, verified at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Monotone {
    /// More of the feature never lowers the probability of default.
    Increasing,
    /// More of the feature never raises it.
    Decreasing,
}

/// One feature of a schema: its name, type, valid range (inclusive) and missing-value rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FeatureType,
    pub min: f64,
    pub max: f64,
    pub missing: Missing,
    /// How the probability of default must move with this feature, when declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monotone: Option<Monotone>,
}

impl FeatureSpec {
    /// Whether a request may leave this feature out and have it scored as missing.
    pub fn allows_missing(&self) -> bool {
        self.missing == Missing::Rule(MissingRule::Allowed)
    }
}

/// A feature value as a caller sent it, before the schema has judged it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    Number(f64),
    Integer(i64),
    Text(String),
    Flag(bool),
    /// The caller sent the key with no value set.
    Empty,
}

impl RawValue {
    fn kind_name(&self) -> &'static str {
        match self {
            RawValue::Number(_) => "number",
            RawValue::Integer(_) => "integer",
            RawValue::Text(_) => "text",
            RawValue::Flag(_) => "flag",
            RawValue::Empty => "no value",
        }
    }
}

impl fmt::Display for Monotone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Monotone::Increasing => "increasing",
            Monotone::Decreasing => "decreasing",
        })
    }
}

/// The rule a feature value broke.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// A required feature is absent.
    Missing,
    /// The schema has no feature of this name.
    Unknown,
    /// The value is not of the feature's type.
    WrongType { expected: FeatureType, got: String },
    /// NaN or an infinity.
    NonFinite,
    /// Outside the schema's inclusive range.
    OutOfRange { value: f64, min: f64, max: f64 },
}

/// A feature that broke a rule of the schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("feature {feature}: {rule}")]
pub struct FeatureError {
    pub feature: String,
    pub rule: Rule,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Missing => write!(f, "is required but missing"),
            Rule::Unknown => write!(f, "is not in the model's schema"),
            Rule::WrongType { expected, got } => {
                let expected = match expected {
                    FeatureType::Integer => "an integer",
                    FeatureType::Number => "a number",
                };
                write!(f, "must be {expected}, got {got}")
            }
            Rule::NonFinite => write!(f, "must be finite"),
            Rule::OutOfRange { value, min, max } => {
                write!(f, "value {value} is outside the valid range [{min}, {max}]")
            }
        }
    }
}

/// The ordered features a version scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    features: Vec<FeatureSpec>,
}

impl Schema {
    /// A schema of these features, in this order. Checked by [`Schema::check`] at bundle load.
    pub fn new(features: Vec<FeatureSpec>) -> Self {
        Schema { features }
    }

    pub fn features(&self) -> &[FeatureSpec] {
        &self.features
    }

    /// The feature names in order: the columns of a tensor of this schema's vectors.
    pub fn names(&self) -> Vec<String> {
        self.features.iter().map(|f| f.name.clone()).collect()
    }

    /// A recorded vector (the values as scored, by name) in this schema's order, to decide
    /// it again with this version; the first of the schema's features the record lacks.
    pub fn recorded_vector<'a>(
        &'a self,
        recorded: &BTreeMap<String, f64>,
    ) -> Result<Vec<f64>, &'a str> {
        self.features
            .iter()
            .map(|f| recorded.get(&f.name).copied().ok_or(f.name.as_str()))
            .collect()
    }

    /// Checks that the schema itself is sound: unique names, finite ordered ranges, and
    /// imputed values inside their range. Returns the first problem found.
    pub fn check(&self) -> Result<(), String> {
        if self.features.is_empty() {
            return Err("the schema has no features".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for spec in &self.features {
            if spec.name.is_empty() {
                return Err("a feature has an empty name".into());
            }
            if !seen.insert(spec.name.as_str()) {
                return Err(format!("feature {} appears twice", spec.name));
            }
            if !spec.min.is_finite() || !spec.max.is_finite() || spec.min > spec.max {
                return Err(format!(
                    "feature {}: range [{}, {}] is not a finite ordered range",
                    spec.name, spec.min, spec.max
                ));
            }
            if let Missing::Impute(v) = spec.missing
                && !(spec.min..=spec.max).contains(&v)
            {
                return Err(format!(
                    "feature {}: imputed value {v} is outside its range",
                    spec.name
                ));
            }
        }
        Ok(())
    }

    /// Turns a request's features into the vector to score, in schema order; a feature that
    /// allows missing values and was left out is NaN.
    ///
    /// Unknown names are reported first (in name order), then the schema's features in order,
    /// so the same bad request always gets the same answer.
    pub fn vector(&self, given: &BTreeMap<String, RawValue>) -> Result<Vec<f64>, FeatureError> {
        for name in given.keys() {
            if !self.features.iter().any(|f| &f.name == name) {
                return Err(FeatureError {
                    feature: name.clone(),
                    rule: Rule::Unknown,
                });
            }
        }
        self.features
            .iter()
            .map(|spec| match given.get(&spec.name) {
                None => match spec.missing {
                    Missing::Impute(v) => Ok(v),
                    Missing::Rule(MissingRule::Allowed) => Ok(f64::NAN),
                    Missing::Rule(MissingRule::Required) => Err(FeatureError {
                        feature: spec.name.clone(),
                        rule: Rule::Missing,
                    }),
                },
                Some(raw) => spec.judge(raw).map_err(|rule| FeatureError {
                    feature: spec.name.clone(),
                    rule,
                }),
            })
            .collect()
    }
}

impl FeatureSpec {
    fn judge(&self, raw: &RawValue) -> Result<f64, Rule> {
        let wrong = || Rule::WrongType {
            expected: self.kind,
            got: raw.kind_name().to_string(),
        };
        let value = match (self.kind, raw) {
            (_, RawValue::Integer(i)) => *i as f64,
            (_, RawValue::Number(x)) if !x.is_finite() => return Err(Rule::NonFinite),
            (FeatureType::Number, RawValue::Number(x)) => *x,
            // An integral double is an integer: JSON and many clients cannot tell them apart.
            (FeatureType::Integer, RawValue::Number(x)) if x.fract() == 0.0 => *x,
            (FeatureType::Integer, RawValue::Number(x)) => {
                return Err(Rule::WrongType {
                    expected: FeatureType::Integer,
                    got: format!("the fraction {x}"),
                });
            }
            (_, RawValue::Text(_) | RawValue::Flag(_) | RawValue::Empty) => return Err(wrong()),
        };
        if value < self.min || value > self.max {
            return Err(Rule::OutOfRange {
                value,
                min: self.min,
                max: self.max,
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            FeatureSpec {
                name: "AGE".into(),
                kind: FeatureType::Integer,
                min: 18.0,
                max: 120.0,
                missing: Missing::Rule(MissingRule::Required),
                monotone: None,
            },
            FeatureSpec {
                name: "PAID".into(),
                kind: FeatureType::Number,
                min: 0.0,
                max: 1e6,
                missing: Missing::Impute(0.0),
                monotone: None,
            },
        ])
    }

    fn req(pairs: &[(&str, RawValue)]) -> BTreeMap<String, RawValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn imputes_and_orders() {
        let v = schema()
            .vector(&req(&[("AGE", RawValue::Integer(30))]))
            .unwrap();
        assert_eq!(v, vec![30.0, 0.0]);
        let v = schema()
            .vector(&req(&[
                ("PAID", RawValue::Number(12.5)),
                ("AGE", RawValue::Number(40.0)),
            ]))
            .unwrap();
        assert_eq!(v, vec![40.0, 12.5]);
    }

    #[test]
    fn each_rule_names_the_feature() {
        let cases = [
            (req(&[]), "AGE", Rule::Missing),
            (
                req(&[("AGE", RawValue::Integer(30)), ("X", RawValue::Integer(1))]),
                "X",
                Rule::Unknown,
            ),
            (
                req(&[("AGE", RawValue::Number(f64::NAN))]),
                "AGE",
                Rule::NonFinite,
            ),
            (
                req(&[("AGE", RawValue::Integer(7))]),
                "AGE",
                Rule::OutOfRange {
                    value: 7.0,
                    min: 18.0,
                    max: 120.0,
                },
            ),
            (
                req(&[("AGE", RawValue::Text("thirty".into()))]),
                "AGE",
                Rule::WrongType {
                    expected: FeatureType::Integer,
                    got: "text".into(),
                },
            ),
        ];
        for (given, feature, rule) in cases {
            let err = schema().vector(&given).unwrap_err();
            assert_eq!((err.feature.as_str(), &err.rule), (feature, &rule));
        }
    }

    #[test]
    fn schema_check_refuses_bad_ranges() {
        let mut s = schema();
        s.features[1].missing = Missing::Impute(-1.0);
        assert!(s.check().unwrap_err().contains("imputed"));
        let mut s = schema();
        s.features[0].max = f64::INFINITY;
        assert!(s.check().is_err());
    }
}
