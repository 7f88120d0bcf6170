//! Reads LightGBM's text model format (`Booster.save_model("model.txt")`, versions v3 and
//! v4) into an [`Ensemble`]: binary objective with the default sigmoid, numerical splits.
//!
//! LightGBM stores a tree as parallel arrays of internal nodes, a child being an internal
//! node's index or, negative, `!leaf`; the reader lays each tree out root first so that every
//! child comes after its parent. The first tree's leaves already hold the initial score
//! (`boost_from_average`), so the base margin is 0. What it refuses, each by name: another
//! objective or sigmoid, several classes, averaged output (random forest mode), linear trees
//! and categorical splits.

use std::collections::HashMap;

use super::{Comparison, Ensemble, Missing, Node, Tree, TreeError};
use crate::schema::Monotone;

const FORMAT: &str = "LightGBM";

fn malformed(what: impl Into<String>) -> TreeError {
    TreeError::Malformed(FORMAT, what.into())
}

fn unsupported(what: impl Into<String>) -> TreeError {
    TreeError::Unsupported(FORMAT, what.into())
}

/// `key=value` lines of one section (the header, or one tree).
struct Section<'a> {
    name: String,
    fields: HashMap<&'a str, &'a str>,
}

impl<'a> Section<'a> {
    fn get(&self, key: &str) -> Result<&'a str, String> {
        self.fields
            .get(key)
            .copied()
            .ok_or_else(|| format!("{} has no {key}", self.name))
    }

    fn list<T: std::str::FromStr>(&self, key: &str, len: usize) -> Result<Vec<T>, String> {
        let v = self.get(key)?;
        let items = v
            .split_whitespace()
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("{} {key}: {s:?} is not a number", self.name))
            })
            .collect::<Result<Vec<T>, _>>()?;
        if items.len() != len {
            return Err(format!(
                "{} {key} has {} entries, not {len}",
                self.name,
                items.len()
            ));
        }
        Ok(items)
    }

    fn one<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        let v = self.get(key)?;
        v.trim()
            .parse()
            .map_err(|_| format!("{} {key}: {v:?} is not a number", self.name))
    }
}

/// Splits the file into its header and tree sections; stops at `end of trees`.
fn sections(text: &str) -> Result<(Section<'_>, Vec<Section<'_>>), TreeError> {
    let mut header = Section {
        name: "the header".into(),
        fields: HashMap::new(),
    };
    let mut trees: Vec<Section> = Vec::new();
    let mut ended = false;
    for line in text.lines() {
        let line = line.trim_end();
        if line == "end of trees" {
            ended = true;
            break;
        }
        if line.is_empty() {
            continue;
        }
        if let Some(k) = line.strip_prefix("Tree=") {
            if k.parse::<usize>().ok() != Some(trees.len()) {
                return Err(malformed(format!(
                    "tree {k:?} where tree {} was expected",
                    trees.len()
                )));
            }
            trees.push(Section {
                name: format!("tree {k}"),
                fields: HashMap::new(),
            });
            continue;
        }
        let section = trees.last_mut().unwrap_or(&mut header);
        match line.split_once('=') {
            Some((k, v)) => {
                section.fields.insert(k, v);
            }
            // A flag without a value (`average_output`).
            None => {
                section.fields.insert(line, "");
            }
        }
    }
    if !ended {
        return Err(malformed("the file ends before \"end of trees\""));
    }
    Ok((header, trees))
}

/// Parses a model file's text.
pub fn parse(text: &str) -> Result<Ensemble, TreeError> {
    if text.lines().next().map(str::trim_end) != Some("tree") {
        return Err(malformed("the first line is not \"tree\""));
    }
    let (h, sections) = sections(text)?;
    let objective = h.get("objective").map_err(malformed)?;
    let mut words = objective.split_whitespace();
    if words.next() != Some("binary") {
        return Err(unsupported(format!(
            "objective {objective:?} (only binary)"
        )));
    }
    if let Some(s) = words.find_map(|w| w.strip_prefix("sigmoid:"))
        && s.parse::<f64>() != Ok(1.0)
    {
        return Err(unsupported(format!("sigmoid:{s} (only sigmoid:1)")));
    }
    for key in ["num_class", "num_tree_per_iteration"] {
        let n: usize = h.one(key).map_err(malformed)?;
        if n != 1 {
            return Err(unsupported(format!("{key}={n} (only one binary output)")));
        }
    }
    if h.fields.contains_key("average_output") {
        return Err(unsupported("average_output (random forest mode)"));
    }
    let max_idx: usize = h.one("max_feature_idx").map_err(malformed)?;
    let n_features = max_idx + 1;
    let feature_names: Vec<String> = h
        .get("feature_names")
        .map_err(malformed)?
        .split_whitespace()
        .map(String::from)
        .collect();
    if feature_names.len() != n_features {
        return Err(malformed(format!(
            "{} feature names for max_feature_idx={max_idx}",
            feature_names.len()
        )));
    }
    // Written only when the model was trained with constraints.
    let declared_monotone = match h.fields.contains_key("monotone_constraints") {
        false => Vec::new(),
        true => h
            .list::<i8>("monotone_constraints", n_features)
            .map_err(malformed)?
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                1 => Some(Ok((i, Monotone::Increasing))),
                -1 => Some(Ok((i, Monotone::Decreasing))),
                0 => None,
                c => Some(Err(malformed(format!(
                    "monotone constraint {c} of feature {i}"
                )))),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let trees = sections
        .iter()
        .map(|s| tree(s, n_features).map_err(malformed))
        .collect::<Result<Vec<_>, _>>()?;
    if trees.is_empty() {
        return Err(malformed("the model has no trees"));
    }
    Ok(Ensemble {
        feature_names,
        trees,
        base_margin: 0.0,
        comparison: Comparison::LessOrEqualF64,
        declared_monotone,
    })
}

/// Marks `seen[k]`; a second visit (or one out of range) means the arrays do not form a tree.
fn first_visit(seen: &mut [bool], k: usize, what: &str, tree: &str) -> Result<(), String> {
    match seen.get_mut(k) {
        None => Err(format!(
            "{tree}: a child points to {what} {k} of {}",
            seen.len()
        )),
        Some(true) => Err(format!("{tree}: {what} {k} has two parents")),
        Some(v) => {
            *v = true;
            Ok(())
        }
    }
}

/// Where a LightGBM child points: an internal node, or (negative) `!leaf`.
#[derive(Clone, Copy)]
enum Ref {
    Split(usize),
    Leaf(usize),
}

impl Ref {
    fn of(c: i64) -> Ref {
        if c >= 0 {
            Ref::Split(c as usize)
        } else {
            Ref::Leaf(!c as usize)
        }
    }
}

fn tree(s: &Section, n_features: usize) -> Result<Tree, String> {
    let leaves: usize = s.one("num_leaves")?;
    if leaves == 0 {
        return Err(format!("{} has no leaves", s.name));
    }
    if s.fields.get("is_linear").is_some_and(|v| v.trim() != "0") {
        return Err(format!("{} is a linear tree, not supported", s.name));
    }
    if s.fields.get("num_cat").is_some_and(|v| v.trim() != "0") {
        return Err(format!("{} has categorical splits, not supported", s.name));
    }
    let value: Vec<f64> = s.list("leaf_value", leaves)?;
    if leaves == 1 {
        let root = Node::leaf(value[0], 1.0);
        return Tree::new(vec![root], n_features).map_err(|e| format!("{}: {e}", s.name));
    }
    let splits = leaves - 1;
    let feature: Vec<usize> = s.list("split_feature", splits)?;
    let threshold: Vec<f64> = s.list("threshold", splits)?;
    let decision: Vec<u8> = s.list("decision_type", splits)?;
    let left: Vec<i64> = s.list("left_child", splits)?;
    let right: Vec<i64> = s.list("right_child", splits)?;
    let leaf_count: Vec<f64> = s.list("leaf_count", leaves)?;
    let internal_count: Vec<f64> = s.list("internal_count", splits)?;

    // Root first, each child after its parent: (what, where its index goes in its parent).
    let mut nodes: Vec<Node> = Vec::with_capacity(2 * leaves - 1);
    let mut seen = (vec![false; splits], vec![false; leaves]);
    let mut stack: Vec<(Ref, Option<(usize, bool)>)> = vec![(Ref::Split(0), None)];
    while let Some((r, parent)) = stack.pop() {
        let index = nodes.len() as u32;
        if let Some((p, is_left)) = parent {
            let p = &mut nodes[p];
            *(if is_left { &mut p.left } else { &mut p.right }) = index;
        }
        let node = match r {
            Ref::Leaf(k) => {
                first_visit(&mut seen.1, k, "leaf", &s.name)?;
                Node::leaf(value[k], leaf_count[k])
            }
            Ref::Split(k) => {
                first_visit(&mut seen.0, k, "node", &s.name)?;
                let d = decision[k];
                if d & 1 != 0 {
                    return Err(format!(
                        "{}: node {k} is a categorical split, not supported",
                        s.name
                    ));
                }
                let missing = match (d >> 2) & 3 {
                    0 => Missing::None,
                    1 => Missing::Zero,
                    2 => Missing::Nan,
                    m => return Err(format!("{}: node {k} has missing type {m}", s.name)),
                };
                let me = nodes.len();
                stack.push((Ref::of(right[k]), Some((me, false))));
                stack.push((Ref::of(left[k]), Some((me, true))));
                Node {
                    feature: feature[k],
                    threshold: threshold[k],
                    // Set when the children are laid out.
                    left: 0,
                    right: 0,
                    missing,
                    default_left: d & 2 != 0,
                    value: 0.0,
                    cover: internal_count[k],
                }
            }
        };
        nodes.push(node);
    }
    if nodes.len() != 2 * leaves - 1 {
        return Err(format!(
            "{}: {} of its {} nodes are reachable from the root",
            s.name,
            nodes.len(),
            2 * leaves - 1
        ));
    }
    Tree::new(nodes, n_features).map_err(|e| format!("{}: {e}", s.name))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{DIR, assert_matches_library};
    use super::*;

    fn text() -> String {
        std::fs::read_to_string(format!("{DIR}/lightgbm.txt")).unwrap()
    }

    #[test]
    fn scores_and_contributions_match_lightgbm_for_every_row() {
        let e = parse(&text()).unwrap();
        assert_eq!(e.trees.len(), 40);
        assert_matches_library(&e, "lightgbm_expected.csv");
    }

    fn edited(from: &str, to: &str) -> Result<Ensemble, TreeError> {
        let t = text();
        assert!(t.contains(from), "{from}");
        parse(&t.replacen(from, to, 1))
    }

    #[test]
    fn what_cannot_be_scored_exactly_is_refused_by_name() {
        let msg = |r: Result<Ensemble, TreeError>| r.unwrap_err().to_string();
        let m = msg(edited("objective=binary sigmoid:1", "objective=regression"));
        assert!(m.contains("regression"), "{m}");
        let m = msg(edited(
            "objective=binary sigmoid:1",
            "objective=binary sigmoid:2",
        ));
        assert!(m.contains("sigmoid:2"), "{m}");
        let m = msg(edited("num_class=1", "num_class=3"));
        assert!(m.contains("num_class=3"), "{m}");
        let m = msg(edited("decision_type=2 2 2 2 8", "decision_type=3 2 2 2 8"));
        assert!(m.contains("tree 0") && m.contains("categorical"), "{m}");
        let m = msg(edited(
            "Tree=1\nnum_leaves=15\nnum_cat=0",
            "Tree=1\nnum_leaves=15\nnum_cat=2",
        ));
        assert!(m.contains("tree 1") && m.contains("categorical"), "{m}");
        let m = msg(edited("left_child=1 2 4 5 12", "left_child=1 2 4 5 0"));
        assert!(m.contains("tree 0") && m.contains("two parents"), "{m}");
        let m = msg(edited("split_feature=3 4 17", "split_feature=3 4 99"));
        assert!(m.contains("tree 0") && m.contains("feature 99"), "{m}");
        let m = msg(edited("is_linear=0", "is_linear=1"));
        assert!(m.contains("linear"), "{m}");
        let m = msg(edited("end of trees", "end of tree"));
        assert!(m.contains("end of trees"), "{m}");
        let t = text();
        let cut = &t[..t.find("Tree=3").unwrap() + 40];
        assert!(parse(cut).is_err());
    }
}
