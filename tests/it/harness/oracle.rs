//! The PD oracle: a bundle's parameters read and applied independently of riskserve's
//! types, to check the scores the server returns.

use std::collections::BTreeMap;
use std::path::Path;

/// What a bundle's parameters.toml says, parsed here independently of riskserve's types.
pub struct Offline {
    pub digest: String,
    intercept: f64,
    terms: Vec<(String, f64, f64, f64)>,
}

impl Offline {
    pub fn read(bundle_dir: &Path) -> Offline {
        let text = std::fs::read_to_string(bundle_dir.join("parameters.toml")).unwrap();
        let p: toml::Value = toml::from_str(&text).unwrap();
        let terms = p["feature"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_string(),
                    f["mean"].as_float().unwrap(),
                    f["scale"].as_float().unwrap(),
                    f["coefficient"].as_float().unwrap(),
                )
            })
            .collect();
        let digest = std::fs::read_to_string(bundle_dir.join("bundle.sha256"))
            .unwrap()
            .trim()
            .to_string();
        Offline {
            digest,
            intercept: p["intercept"].as_float().unwrap(),
            terms,
        }
    }

    /// Each feature's term in the log-odds, in the bundle's order.
    pub fn contributions(&self, values: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
        self.terms
            .iter()
            .map(|(name, mean, scale, coef)| (name.clone(), coef * ((values[name] - mean) / scale)))
            .collect()
    }

    pub fn pd(&self, values: &BTreeMap<String, f64>) -> f64 {
        let logit = self.intercept
            + self
                .contributions(values)
                .iter()
                .map(|(_, c)| c)
                .sum::<f64>();
        1.0 / (1.0 + (-logit).exp())
    }
}
