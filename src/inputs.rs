//! The files an operator hands to `train` and `import`: a numeric CSV table of customers, and
//! TOML files holding a feature schema or a limit policy.
//!
//! Shared so that a trained and an imported version read their data, infer observed ranges and
//! judge every row against a schema the same way.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::schema::{FeatureSpec, FeatureType, Missing, MissingRule};

/// Why an input file was refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("data: {0}")]
    Data(String),
}

/// What an empty cell of a table means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyCells {
    /// Refused: every cell must be a finite number (training a logistic model).
    Refused,
    /// A missing value, read as NaN (data for a model that routes missing values).
    Missing,
}

/// A numeric CSV: header names and rows of numbers (NaN where a cell was empty, if allowed).
#[derive(Debug)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<f64>>,
}

impl Table {
    pub fn parse(bytes: &[u8], path: &Path, empty: EmptyCells) -> Result<Table, InputError> {
        let err = |message: String| InputError::Read {
            path: path.to_owned(),
            message,
        };
        let mut reader = csv::Reader::from_reader(bytes);
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| err(e.to_string()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let mut rows = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let record = record.map_err(|e| err(e.to_string()))?;
            let row = record
                .iter()
                .zip(&headers)
                .map(|(cell, h)| {
                    let cell = cell.trim();
                    if cell.is_empty() && empty == EmptyCells::Missing {
                        return Ok(f64::NAN);
                    }
                    cell.parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| {
                            err(format!(
                                "row {}: {h} = {cell:?} is not a finite number",
                                i + 2
                            ))
                        })
                })
                .collect::<Result<Vec<f64>, _>>()?;
            rows.push(row);
        }
        if rows.is_empty() {
            return Err(err("no rows".into()));
        }
        Ok(Table { headers, rows })
    }

    pub fn column(&self, name: &str) -> Result<usize, InputError> {
        self.headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| InputError::Data(format!("no column named {name}")))
    }

    /// A feature spec for column `c` from the values it holds: a number in their observed
    /// range, required unless some are missing (then allowed).
    pub fn observed(&self, c: usize) -> FeatureSpec {
        // f64::min and max skip NaN, so missing cells do not widen the range.
        let (min, max) = self
            .rows
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r[c]), hi.max(r[c]))
            });
        let missing = match self.rows.iter().any(|r| r[c].is_nan()) {
            true => MissingRule::Allowed,
            false => MissingRule::Required,
        };
        FeatureSpec {
            name: self.headers[c].clone(),
            kind: FeatureType::Number,
            min,
            max,
            missing: Missing::Rule(missing),
            monotone: None,
        }
    }

    /// The label column as outcomes: 1 is a default, 0 is not, anything else is refused.
    pub fn labels(&self, label: &str) -> Result<Vec<bool>, InputError> {
        let c = self.column(label)?;
        self.rows
            .iter()
            .enumerate()
            .map(|(i, r)| match r[c] {
                0.0 => Ok(false),
                1.0 => Ok(true),
                v => Err(InputError::Data(format!(
                    "row {}: label {label} is {v}, expected 0 or 1",
                    i + 2
                ))),
            })
            .collect()
    }

    /// The rows as vectors in the order of `specs`, each value checked against its spec (its
    /// range, integrality, and whether it may be missing). Names the first row that breaks one.
    pub fn vectors(&self, specs: &[FeatureSpec]) -> Result<Vec<Vec<f64>>, InputError> {
        let columns: Vec<usize> = specs
            .iter()
            .map(|s| self.column(&s.name))
            .collect::<Result<_, _>>()?;
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                specs
                    .iter()
                    .zip(&columns)
                    .map(|(s, &c)| {
                        let v = row[c];
                        if v.is_nan() && s.allows_missing() {
                            return Ok(v);
                        }
                        let integral_ok = s.kind == FeatureType::Number || v.fract() == 0.0;
                        if !(s.min..=s.max).contains(&v) || !integral_ok {
                            let v = if v.is_nan() {
                                "missing".into()
                            } else {
                                v.to_string()
                            };
                            return Err(InputError::Data(format!(
                                "row {}: {} = {v} breaks the schema ({:?} in [{}, {}], {})",
                                i + 2,
                                s.name,
                                s.kind,
                                s.min,
                                s.max,
                                if s.allows_missing() {
                                    "missing allowed"
                                } else {
                                    "required"
                                }
                            )));
                        }
                        Ok(v)
                    })
                    .collect()
            })
            .collect()
    }
}

/// A schema file: `[[feature]]` tables, as in a manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaFile {
    pub feature: Vec<FeatureSpec>,
}

/// The limit policy in a TOML file, or the default credit-limit policy.
pub fn read_policy(path: Option<&Path>) -> Result<crate::policy::Policy, InputError> {
    match path {
        Some(path) => read_toml(path),
        None => Ok(crate::policy::Policy::credit_limit_default()),
    }
}

/// Reads a file whole, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, InputError> {
    std::fs::read(path).map_err(|e| InputError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads a TOML file into `T`, naming the file in the error.
pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, InputError> {
    let err = |message: String| InputError::Read {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &[u8] = b"A,B,Y\n1,,0\n2,5.5,1\n3,-1,0\n";

    #[test]
    fn empty_cells_are_missing_only_when_allowed() {
        let path = Path::new("t.csv");
        let err = Table::parse(CSV, path, EmptyCells::Refused).unwrap_err();
        assert!(err.to_string().contains("row 2: B = \"\""), "{err}");
        let t = Table::parse(CSV, path, EmptyCells::Missing).unwrap();
        let b = t.observed(1);
        assert_eq!((b.min, b.max, b.allows_missing()), (-1.0, 5.5, true));
        assert!(!t.observed(0).allows_missing());
        assert_eq!(t.labels("Y").unwrap(), [false, true, false]);
        let x = t.vectors(&[t.observed(1), t.observed(0)]).unwrap();
        assert!(x[0][0].is_nan() && x[0][1] == 1.0);
        let mut required = t.observed(1);
        required.missing = Missing::Rule(MissingRule::Required);
        let err = t.vectors(&[required]).unwrap_err().to_string();
        assert!(err.contains("row 2: B = missing"), "{err}");
    }
}
