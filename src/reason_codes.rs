//! Reason codes: a version's table from feature to a code and the words a customer reads in
//! an adverse-action notice ("PAYMENTDELAY_1" → "R01", "Timeliness of your payment last
//! month").
//!
//! The table is a file of the bundle (`reason_codes.toml`, listed in the manifest and covered
//! by the digest), so the words a notice uses are fixed by the version that decided, like
//! its model and policy. It names every feature of the model exactly once, so that any
//! principal reason a decision can carry has words; codes are unique, so a code read back
//! from a notice names one feature. `train` writes [`ReasonCodes::default_for`] its features;
//! `train` and `import` take an edited table with `--reason-codes`. Pure data and checks; no
//! I/O but [`ReasonCodes::read`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The table's file name inside a bundle.
pub const REASON_CODES_FILE: &str = "reason_codes.toml";

/// Longest text accepted, in characters: a notice states each reason in one short line.
const MAX_TEXT_CHARS: usize = 200;
/// Longest code accepted, in characters.
const MAX_CODE_CHARS: usize = 16;

/// One feature's code and customer-facing words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonCode {
    pub feature: String,
    pub code: String,
    pub text: String,
}

/// A version's reason-code table, as stored in `reason_codes.toml` (`[[reason]]` tables).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonCodes {
    #[serde(rename = "reason")]
    pub reasons: Vec<ReasonCode>,
}

/// Why a reason-code table was refused; each names the entry and field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReasonCodeError {
    #[error("does not parse: {0}")]
    Parse(String),
    #[error("reason {index} (feature {feature:?}): {field} is empty")]
    Empty {
        index: usize,
        feature: String,
        field: &'static str,
    },
    #[error("reason {index} (feature {feature:?}): {field} {problem}")]
    Malformed {
        index: usize,
        feature: String,
        field: &'static str,
        problem: String,
    },
    #[error("reason {index}: feature {feature:?} is not a feature of the model")]
    UnknownFeature { index: usize, feature: String },
    #[error("feature {feature:?} has two reasons (entries {first} and {second})")]
    DuplicateFeature {
        feature: String,
        first: usize,
        second: usize,
    },
    #[error("code {code:?} is used for both {first:?} and {second:?}")]
    DuplicateCode {
        code: String,
        first: String,
        second: String,
    },
    #[error("feature {0:?} of the model has no reason (every feature needs words)")]
    MissingFeature(String),
}

impl ReasonCodes {
    /// Parses a table's TOML text. Structure only; [`ReasonCodes::check`] judges it against a
    /// model's features.
    pub fn parse(text: &str) -> Result<ReasonCodes, ReasonCodeError> {
        toml::from_str(text).map_err(|e| ReasonCodeError::Parse(e.message().to_string()))
    }

    /// Reads and checks a table file given to `train` or `import`.
    pub fn read(path: &Path, features: &[&str]) -> Result<ReasonCodes, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let table = ReasonCodes::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        table
            .check(features)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(table)
    }

    /// Checks the table against the model's features: every entry's fields are present and
    /// printable on one line, every feature is the model's and has exactly one entry, and
    /// every code is unique. Returns the first problem, in entry order (entries count from 1).
    pub fn check(&self, features: &[&str]) -> Result<(), ReasonCodeError> {
        let mut by_feature: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_code: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, r) in self.reasons.iter().enumerate() {
            let index = i + 1;
            for (field, value, max) in [
                ("feature", &r.feature, usize::MAX),
                ("code", &r.code, MAX_CODE_CHARS),
                ("text", &r.text, MAX_TEXT_CHARS),
            ] {
                let malformed = |problem: String| ReasonCodeError::Malformed {
                    index,
                    feature: r.feature.clone(),
                    field,
                    problem,
                };
                if value.trim().is_empty() {
                    return Err(ReasonCodeError::Empty {
                        index,
                        feature: r.feature.clone(),
                        field,
                    });
                }
                if value.trim() != value {
                    return Err(malformed("has leading or trailing spaces".into()));
                }
                // A notice prints each reason on one line, and a control character could
                // make it print something else.
                if value.chars().any(char::is_control) {
                    return Err(malformed(
                        "holds a control character (a line break?)".into(),
                    ));
                }
                let chars = value.chars().count();
                if chars > max {
                    return Err(malformed(format!("has {chars} characters; at most {max}")));
                }
            }
            if !features.contains(&r.feature.as_str()) {
                return Err(ReasonCodeError::UnknownFeature {
                    index,
                    feature: r.feature.clone(),
                });
            }
            if let Some(first) = by_feature.insert(&r.feature, index) {
                return Err(ReasonCodeError::DuplicateFeature {
                    feature: r.feature.clone(),
                    first,
                    second: index,
                });
            }
            if let Some(first) = by_code.insert(&r.code, &r.feature) {
                return Err(ReasonCodeError::DuplicateCode {
                    code: r.code.clone(),
                    first: first.to_string(),
                    second: r.feature.clone(),
                });
            }
        }
        match features.iter().find(|f| !by_feature.contains_key(*f)) {
            Some(f) => Err(ReasonCodeError::MissingFeature(f.to_string())),
            None => Ok(()),
        }
    }

    /// The entry of a feature.
    pub fn get(&self, feature: &str) -> Option<&ReasonCode> {
        self.reasons.iter().find(|r| r.feature == feature)
    }

    /// The table `train` writes unless given one: riskserve's wording for the Taiwan data's
    /// features (under their names in `data/` and the UCI originals), and a generic wording
    /// naming the feature for any other, to be replaced by whoever owns the model.
    ///
    /// The words name the factor, not a direction ("Balance on your statement last month",
    /// not "… is too high"): a reason is a feature that pushed this customer's risk up, and
    /// which way its value did so depends on the model (v1's BILL_AMT1 coefficient is
    /// negative), so a directional default would be false for some customers.
    pub fn default_for(features: &[&str]) -> ReasonCodes {
        let mut generic = 0;
        let reasons = features
            .iter()
            .map(|&feature| match known(feature) {
                Some((code, text)) => ReasonCode {
                    feature: feature.to_string(),
                    code,
                    text,
                },
                None => {
                    generic += 1;
                    ReasonCode {
                        feature: feature.to_string(),
                        code: format!("X{generic:02}"),
                        text: generic_text(feature),
                    }
                }
            })
            .collect();
        ReasonCodes { reasons }
    }

    /// The features whose entry is still the generic default wording.
    pub fn generic_features(&self) -> Vec<&str> {
        self.reasons
            .iter()
            .filter(|r| r.text == generic_text(&r.feature))
            .map(|r| r.feature.as_str())
            .collect()
    }
}

/// The words for a feature riskserve has no wording for: they name it, so a notice is still
/// specific, and [`ReasonCodes::generic_features`] can tell them from edited ones.
pub fn generic_text(feature: &str) -> String {
    format!("The value of {feature} in your credit record")
}

/// Riskserve's code and words for a Taiwan-data feature, by either of its names.
fn known(feature: &str) -> Option<(String, String)> {
    // "last month" is month 1, the latest the data holds; the data counts back to month 6.
    let ago = |k: u32| match k {
        1 => "last month".to_string(),
        k => format!("{k} months ago"),
    };
    let month = |prefix: &str| -> Option<u32> {
        let k: u32 = feature.strip_prefix(prefix)?.parse().ok()?;
        (1..=6).contains(&k).then_some(k)
    };
    let (code, text) = match feature {
        "CREDIT_LIMIT" | "LIMIT_BAL" => (31, "Your current credit limit".to_string()),
        "AGE" => (41, "Your age".to_string()),
        "EDUCATION" => (42, "Your level of education".to_string()),
        // The UCI data names the latest month's payment status PAY_0 and has no PAY_1.
        "PAY_0" => (1, format!("Timeliness of your payment {}", ago(1))),
        _ => {
            if let Some(k) = month("PAYMENTDELAY_").or_else(|| month("PAY_").filter(|k| *k > 1)) {
                (k, format!("Timeliness of your payment {}", ago(k)))
            } else if let Some(k) = month("BILL_AMT") {
                (10 + k, format!("Balance on your statement {}", ago(k)))
            } else if let Some(k) = month("PAID_AMT").or_else(|| month("PAY_AMT")) {
                (20 + k, format!("Amount you paid {}", ago(k)))
            } else {
                return None;
            }
        }
    };
    Some((format!("R{code:02}"), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: [&str; 4] = ["CREDIT_LIMIT", "AGE", "PAYMENTDELAY_1", "BILL_AMT2"];

    fn table() -> ReasonCodes {
        ReasonCodes::default_for(&FEATURES)
    }

    #[test]
    fn the_default_table_words_the_taiwan_features_and_passes_its_own_check() {
        let t = table();
        t.check(&FEATURES).unwrap();
        let p = t.get("PAYMENTDELAY_1").unwrap();
        assert_eq!(
            (p.code.as_str(), p.text.as_str()),
            ("R01", "Timeliness of your payment last month")
        );
        assert_eq!(t.get("BILL_AMT2").unwrap().code, "R12");
        assert!(t.generic_features().is_empty());
        // The UCI names get the same words as the renamed columns.
        let uci = ReasonCodes::default_for(&["PAY_0", "PAY_2", "PAY_AMT3", "LIMIT_BAL"]);
        let codes: Vec<&str> = uci.reasons.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(codes, ["R01", "R02", "R23", "R31"]);
        assert_eq!(
            uci.reasons[1].text,
            "Timeliness of your payment 2 months ago"
        );
    }

    #[test]
    fn unknown_features_get_generic_words_and_unique_codes() {
        let features = ["f0", "AGE", "f1", "PAY_1", "BILL_AMT7"];
        let t = ReasonCodes::default_for(&features);
        t.check(&features).unwrap();
        assert_eq!(t.generic_features(), ["f0", "f1", "PAY_1", "BILL_AMT7"]);
        assert_eq!(t.get("f1").unwrap().code, "X02");
        assert_eq!(
            t.get("f0").unwrap().text,
            "The value of f0 in your credit record"
        );
    }

    #[test]
    fn the_stored_text_reads_back_as_the_same_table() {
        let t = table();
        let text = toml::to_string_pretty(&t).unwrap();
        assert!(text.contains("[[reason]]"), "{text}");
        assert_eq!(ReasonCodes::parse(&text).unwrap(), t);
        let err = ReasonCodes::parse("[[reason]]\nfeature = \"AGE\"\ncode = \"R1\"\n").unwrap_err();
        assert!(
            matches!(err, ReasonCodeError::Parse(ref m) if m.contains("text")),
            "{err}"
        );
        let err = ReasonCodes::parse(&format!("{text}\nextra = 1\n")).unwrap_err();
        assert!(matches!(err, ReasonCodeError::Parse(_)), "{err}");
    }

    #[test]
    fn a_table_that_does_not_fit_the_model_is_refused_naming_the_entry() {
        let refused = |edit: &dyn Fn(&mut ReasonCodes)| {
            let mut t = table();
            edit(&mut t);
            t.check(&FEATURES).unwrap_err()
        };
        assert_eq!(
            refused(&|t| t.reasons[1].feature = "INCOME".into()),
            ReasonCodeError::UnknownFeature {
                index: 2,
                feature: "INCOME".into()
            }
        );
        assert_eq!(
            refused(&|t| t.reasons[2].text = "  ".into()),
            ReasonCodeError::Empty {
                index: 3,
                feature: "PAYMENTDELAY_1".into(),
                field: "text"
            }
        );
        assert_eq!(
            refused(&|t| t.reasons[0].code = String::new()),
            ReasonCodeError::Empty {
                index: 1,
                feature: "CREDIT_LIMIT".into(),
                field: "code"
            }
        );
        assert_eq!(
            refused(&|t| t.reasons[3].code = "R01".into()),
            ReasonCodeError::DuplicateCode {
                code: "R01".into(),
                first: "PAYMENTDELAY_1".into(),
                second: "BILL_AMT2".into()
            }
        );
        assert_eq!(
            refused(&|t| t.reasons[3].feature = "AGE".into()),
            ReasonCodeError::DuplicateFeature {
                feature: "AGE".into(),
                first: 2,
                second: 4
            }
        );
        assert_eq!(
            refused(&|t| {
                t.reasons.pop();
            }),
            ReasonCodeError::MissingFeature("BILL_AMT2".into())
        );
        let err = refused(&|t| t.reasons[2].text = "Late\nand more".into());
        assert!(
            err.to_string()
                .starts_with("reason 3 (feature \"PAYMENTDELAY_1\"): text holds a control"),
            "{err}"
        );
        let err = refused(&|t| t.reasons[2].text = "x".repeat(201));
        assert!(
            err.to_string().contains("201 characters; at most 200"),
            "{err}"
        );
        let err = refused(&|t| t.reasons[2].code = " R01".into());
        assert!(err.to_string().contains("code has leading"), "{err}");
    }
}
