//! Reads XGBoost's JSON model format (`Booster.save_model("model.json")`, XGBoost 1.6 and
//! later) into an [`Ensemble`]: binary logistic gbtree models with numerical splits only.
//!
//! What it refuses, each by name: another objective, booster or class count, more than one
//! target, categorical splits (which would need XGBoost's category sets), vector leaves, and a
//! tree whose arrays disagree or whose nodes do not form a tree.

use serde::Deserialize;

use super::{Comparison, Ensemble, Missing, Node, Tree, TreeError};

const FORMAT: &str = "XGBoost";

#[derive(Deserialize)]
struct File {
    learner: Learner,
}

#[derive(Deserialize)]
struct Learner {
    #[serde(default)]
    feature_names: Vec<String>,
    learner_model_param: ModelParam,
    objective: Objective,
    gradient_booster: Booster,
}

#[derive(Deserialize)]
struct ModelParam {
    base_score: String,
    num_feature: String,
    #[serde(default)]
    num_class: Option<String>,
    #[serde(default)]
    num_target: Option<String>,
}

#[derive(Deserialize)]
struct Objective {
    name: String,
}

#[derive(Deserialize)]
struct Booster {
    name: String,
    #[serde(default)]
    model: Option<GbTree>,
}

#[derive(Deserialize)]
struct GbTree {
    trees: Vec<JsonTree>,
    #[serde(default)]
    tree_info: Vec<i64>,
}

#[derive(Deserialize)]
struct JsonTree {
    left_children: Vec<i64>,
    right_children: Vec<i64>,
    split_indices: Vec<i64>,
    split_conditions: Vec<f64>,
    default_left: Vec<u8>,
    sum_hessian: Vec<f64>,
    #[serde(default)]
    split_type: Vec<u8>,
    tree_param: TreeParam,
}

#[derive(Deserialize)]
struct TreeParam {
    #[serde(default)]
    size_leaf_vector: Option<String>,
}

fn malformed(what: impl Into<String>) -> TreeError {
    TreeError::Malformed(FORMAT, what.into())
}

fn unsupported(what: impl Into<String>) -> TreeError {
    TreeError::Unsupported(FORMAT, what.into())
}

/// Parses a model file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Ensemble, TreeError> {
    let file: File = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let l = file.learner;
    if l.objective.name != "binary:logistic" {
        return Err(unsupported(format!(
            "objective {:?} (only binary:logistic)",
            l.objective.name
        )));
    }
    if l.gradient_booster.name != "gbtree" {
        return Err(unsupported(format!(
            "booster {:?} (only gbtree)",
            l.gradient_booster.name
        )));
    }
    let p = &l.learner_model_param;
    for (field, value) in [("num_class", &p.num_class), ("num_target", &p.num_target)] {
        if let Some(v) = value
            && !matches!(v.as_str(), "0" | "1")
        {
            return Err(unsupported(format!(
                "{field} = {v} (only one binary target)"
            )));
        }
    }
    let n_features: usize = p
        .num_feature
        .parse()
        .map_err(|_| malformed(format!("num_feature {:?} is not a count", p.num_feature)))?;
    let feature_names = if l.feature_names.is_empty() {
        // Trained without names: XGBoost's own default names.
        (0..n_features).map(|i| format!("f{i}")).collect()
    } else if l.feature_names.len() != n_features {
        return Err(malformed(format!(
            "{} feature names for num_feature = {n_features}",
            l.feature_names.len()
        )));
    } else {
        l.feature_names
    };
    let base_score = parse_base_score(&p.base_score)?;
    let model = l
        .gradient_booster
        .model
        .ok_or_else(|| malformed("gradient_booster has no model"))?;
    if model.tree_info.iter().any(|&g| g != 0) {
        return Err(unsupported("trees of more than one output group"));
    }
    let trees = model
        .trees
        .into_iter()
        .enumerate()
        .map(|(i, t)| tree(t, n_features).map_err(|what| malformed(format!("tree {i}: {what}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ensemble {
        feature_names,
        trees,
        base_margin: logit_f32(base_score),
        comparison: Comparison::LessThanF32,
        declared_monotone: Vec::new(),
    })
}

/// `"5E-1"`, or `"[5E-1]"` since XGBoost 3 (one value per target).
fn parse_base_score(s: &str) -> Result<f32, TreeError> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let v: f32 = inner
        .trim()
        .parse()
        .map_err(|_| malformed(format!("base_score {s:?} is not one number")))?;
    if !(v > 0.0 && v < 1.0) {
        return Err(malformed(format!(
            "base_score {s:?} is not a probability strictly between 0 and 1"
        )));
    }
    Ok(v)
}

/// The margin of a base score, as XGBoost computes it (in float32).
fn logit_f32(p: f32) -> f64 {
    f64::from(-(1.0f32 / p - 1.0).ln())
}

fn tree(t: JsonTree, n_features: usize) -> Result<Tree, String> {
    let n = t.left_children.len();
    let lens = [
        ("right_children", t.right_children.len()),
        ("split_indices", t.split_indices.len()),
        ("split_conditions", t.split_conditions.len()),
        ("default_left", t.default_left.len()),
        ("sum_hessian", t.sum_hessian.len()),
    ];
    if let Some((name, len)) = lens.iter().find(|(_, len)| *len != n) {
        return Err(format!("{name} has {len} entries for {n} nodes"));
    }
    if let Some(size) = &t.tree_param.size_leaf_vector
        && !matches!(size.as_str(), "0" | "1")
    {
        return Err(format!(
            "vector leaves (size_leaf_vector = {size}) are not supported"
        ));
    }
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let (left, right) = (t.left_children[i], t.right_children[i]);
        let node = if left == -1 {
            // XGBoost keeps a leaf's value (learning rate applied) in split_conditions.
            Node::leaf(f64::from(t.split_conditions[i] as f32), t.sum_hessian[i])
        } else {
            if t.split_type.get(i).copied().unwrap_or(0) != 0 {
                return Err(format!("node {i} is a categorical split, not supported"));
            }
            let child = |c: i64| u32::try_from(c).map_err(|_| format!("node {i} has child {c}"));
            let feature = usize::try_from(t.split_indices[i])
                .map_err(|_| format!("node {i} splits on feature {}", t.split_indices[i]))?;
            Node {
                feature,
                threshold: f64::from(t.split_conditions[i] as f32),
                left: child(left)?,
                right: child(right)?,
                missing: Missing::Nan,
                default_left: t.default_left[i] != 0,
                value: 0.0,
                cover: t.sum_hessian[i],
            }
        };
        nodes.push(node);
    }
    Tree::new(nodes, n_features)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::{DIR, assert_matches_library};

    fn model() -> (Vec<u8>, Ensemble) {
        let bytes = std::fs::read(format!("{DIR}/xgboost.json")).unwrap();
        let e = parse(&bytes).unwrap();
        (bytes, e)
    }

    #[test]
    fn scores_and_contributions_match_xgboost_for_every_row() {
        let (_, e) = model();
        assert_eq!(e.trees.len(), 40);
        assert_matches_library(&e, "xgboost_expected.csv");
    }

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Ensemble, TreeError> {
        let (bytes, _) = model();
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        edit(&mut v);
        parse(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn what_cannot_be_scored_exactly_is_refused_by_name() {
        let e = edited(|v| v["learner"]["objective"]["name"] = "multi:softprob".into());
        assert!(e.unwrap_err().to_string().contains("multi:softprob"));
        let e = edited(|v| v["learner"]["gradient_booster"]["name"] = "dart".into());
        assert!(e.unwrap_err().to_string().contains("dart"));
        let e = edited(|v| v["learner"]["learner_model_param"]["num_class"] = "3".into());
        assert!(e.unwrap_err().to_string().contains("num_class = 3"));
        let e = edited(|v| {
            v["learner"]["gradient_booster"]["model"]["trees"][2]["split_type"][0] = 1.into()
        });
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("tree 2") && msg.contains("categorical"),
            "{msg}"
        );
        let e = edited(|v| {
            v["learner"]["gradient_booster"]["model"]["trees"][5]["split_indices"][0] = 40.into()
        });
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("tree 5") && msg.contains("feature 40"),
            "{msg}"
        );
        let e = edited(|v| {
            v["learner"]["gradient_booster"]["model"]["trees"][1]["sum_hessian"] =
                serde_json::json!([1.0])
        });
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("sum_hessian has 1 entries")
        );
        let e = edited(|v| v["learner"]["feature_names"] = serde_json::json!(["a", "b"]));
        assert!(e.unwrap_err().to_string().contains("2 feature names"));
        assert!(matches!(
            parse(b"{\"learner\": 3"),
            Err(TreeError::Malformed(..))
        ));
    }

    #[test]
    fn base_scores_of_both_generations_parse() {
        assert_eq!(parse_base_score("5E-1").unwrap(), 0.5);
        assert_eq!(parse_base_score("[2.2074074E-1]").unwrap(), 0.220_740_74);
        assert!(parse_base_score("[0.1,0.2]").is_err());
        assert!(parse_base_score("1").is_err());
    }
}
