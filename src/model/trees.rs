//! Gradient-boosted tree ensembles as XGBoost and LightGBM write them: the sum of every
//! tree's leaf for a vector, on the log-odds scale, and each feature's exact Shapley share of
//! that sum (path-dependent TreeSHAP, Lundberg et al. 2018) as the decision's reasons.
//!
//! Scoring follows the library that trained the model, not an idealised tree: XGBoost compares
//! in float32 (`x < threshold`), LightGBM in float64 (`x <= threshold`), and a missing value
//! goes where the split's default direction says. The reader of each file format lives in its
//! own submodule and produces the one [`Ensemble`] type; everything after loading is shared.
//!
//! TreeSHAP is written here rather than taken from a crate: none on crates.io is maintained
//! that works on an arbitrary ensemble's own cover statistics, and the algorithm is short. It
//! is tested against brute-force Shapley values of the same conditional expectation (every
//! subset of features) and against the libraries' own `pred_contribs` output.

mod leaf_tables;
pub mod lightgbm;
mod monotone;
pub mod xgboost;

use super::{Model, Scored, principal_reasons};
use crate::schema::Monotone;

/// Why a model file cannot be served exactly.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TreeError {
    /// The file is not what its format says (bad JSON, a missing field, a broken tree).
    #[error("{0} model: {1}")]
    Malformed(&'static str, String),
    /// A valid model this server cannot score exactly as the library does.
    #[error("{0} model: {1} is not supported")]
    Unsupported(&'static str, String),
}

/// How a split compares a feature value with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// XGBoost: `(x as f32) < (threshold as f32)` goes left.
    LessThanF32,
    /// LightGBM: `x <= threshold` goes left.
    LessOrEqualF64,
}

/// A node of a tree: a split, or a leaf when `left` is [`LEAF`].
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub feature: usize,
    pub threshold: f64,
    pub left: u32,
    pub right: u32,
    /// Which values count as missing at this split, and where they go.
    pub missing: Missing,
    pub default_left: bool,
    /// The leaf's value on the log-odds scale (learning rate applied); unused for a split.
    pub value: f64,
    /// How much training data reached the node (XGBoost's hessian sum, LightGBM's count):
    /// the weights of TreeSHAP's expectation.
    pub cover: f64,
}

/// What a split treats as missing (sent the default way), as LightGBM defines it; XGBoost's
/// splits are all [`Missing::Nan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// NaN is missing.
    Nan,
    /// Zero (and NaN, which is read as zero) is missing.
    Zero,
    /// Nothing is missing: NaN is read as zero and compared.
    None,
}

/// LightGBM's zero: |x| within 1e-35.
const ZERO_THRESHOLD: f64 = 1e-35;

/// The deepest tree served: far beyond what boosting makes (XGBoost's default depth is 6),
/// and it bounds the recursion and TreeSHAP's O(depth²) path buffer.
pub const MAX_DEPTH: usize = 64;

/// `left` of a leaf.
pub const LEAF: u32 = u32::MAX;

impl Node {
    pub fn leaf(value: f64, cover: f64) -> Node {
        Node {
            feature: 0,
            threshold: 0.0,
            left: LEAF,
            right: LEAF,
            missing: Missing::Nan,
            default_left: false,
            value,
            cover,
        }
    }

    pub fn is_leaf(&self) -> bool {
        self.left == LEAF
    }
}

/// One tree, its root at index 0; every child's index is greater than its parent's, so
/// walking down always ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// The cover-weighted mean of its leaves: what the tree adds knowing nothing.
    expected: f64,
    depth: usize,
    /// Per-leaf TreeSHAP tables, for a tree whose paths have few distinct features.
    leaf_tables: Option<leaf_tables::Tables>,
}

impl Tree {
    /// Checks the structure (children in range and after their parent, features in range,
    /// finite values, positive cover at the root) and computes what TreeSHAP needs.
    pub fn new(nodes: Vec<Node>, n_features: usize) -> Result<Tree, String> {
        if nodes.is_empty() {
            return Err("a tree has no nodes".into());
        }
        for (i, n) in nodes.iter().enumerate() {
            if !(n.cover.is_finite() && n.cover >= 0.0) {
                return Err(format!("node {i} has cover {}", n.cover));
            }
            if n.is_leaf() {
                if !n.value.is_finite() {
                    return Err(format!("leaf {i} has value {}", n.value));
                }
                continue;
            }
            for child in [n.left, n.right] {
                if child as usize <= i || child as usize >= nodes.len() {
                    return Err(format!("node {i} has child {child} out of order or range"));
                }
            }
            if n.feature >= n_features {
                return Err(format!(
                    "node {i} splits on feature {} of {n_features}",
                    n.feature
                ));
            }
            if n.threshold.is_nan() {
                return Err(format!("node {i} has threshold NaN"));
            }
        }
        if !nodes[0].is_leaf() && nodes[0].cover == 0.0 {
            return Err("the root has no cover".into());
        }
        // Every node but the root is the child of exactly one node, and no path is longer
        // than TreeSHAP's buffer and the recursion are meant for.
        let mut depth = vec![None; nodes.len()];
        depth[0] = Some(0);
        for (i, n) in nodes.iter().enumerate() {
            let Some(d) = depth[i] else {
                return Err(format!("node {i} is not reachable from the root"));
            };
            if n.is_leaf() {
                continue;
            }
            if d + 1 > MAX_DEPTH {
                return Err(format!("node {i} is deeper than {MAX_DEPTH} splits"));
            }
            for child in [n.left, n.right] {
                if depth[child as usize].replace(d + 1).is_some() {
                    return Err(format!("node {child} has two parents"));
                }
            }
        }
        // Children come after their parents, so one pass from the end has both children's
        // means ready at every split.
        let mut mean = vec![0.0; nodes.len()];
        for (i, n) in nodes.iter().enumerate().rev() {
            mean[i] = if n.is_leaf() {
                n.value
            } else if n.cover > 0.0 {
                let (l, r) = (n.left as usize, n.right as usize);
                (mean[l] * nodes[l].cover + mean[r] * nodes[r].cover) / n.cover
            } else {
                0.0
            };
        }
        Ok(Tree {
            expected: mean[0],
            depth: depth.into_iter().flatten().max().unwrap_or(0),
            leaf_tables: leaf_tables::build(&nodes),
            nodes,
        })
    }

    /// The cover-weighted mean of the leaves.
    pub fn expected(&self) -> f64 {
        self.expected
    }

    /// The longest root-to-leaf path, in splits.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The heap bytes the tree holds: its nodes, and its TreeSHAP tables if it has them.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.leaf_tables.as_ref().map_or(0, leaf_tables::heap_bytes)
    }
}

/// A binary-logistic tree ensemble: margin = base + the leaf of every tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    /// The features, in the model file's order: the order vectors are given in.
    pub feature_names: Vec<String>,
    pub trees: Vec<Tree>,
    /// The margin before any tree (XGBoost's base score, LightGBM's init score as logit).
    pub base_margin: f64,
    pub comparison: Comparison,
    /// The monotone constraints the model file says it was trained with (LightGBM writes
    /// them; XGBoost's JSON does not), as feature indices and directions.
    pub declared_monotone: Vec<(usize, Monotone)>,
}

/// One vector's exact Shapley values on the log-odds scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    pub margin: f64,
    /// Per feature, in the ensemble's order.
    pub contributions: Vec<f64>,
    /// The margin knowing nothing: `expected + Σ contributions == margin`.
    pub expected: f64,
}

impl Ensemble {
    /// Whether a vector goes to the left child of split `n`.
    fn goes_left(&self, n: &Node, x: f64) -> bool {
        let x = match n.missing {
            Missing::Nan if x.is_nan() => return n.default_left,
            Missing::Nan => x,
            Missing::Zero | Missing::None if x.is_nan() => 0.0,
            Missing::Zero | Missing::None => x,
        };
        if n.missing == Missing::Zero && x > -ZERO_THRESHOLD && x <= ZERO_THRESHOLD {
            return n.default_left;
        }
        match self.comparison {
            Comparison::LessThanF32 => (x as f32) < (n.threshold as f32),
            Comparison::LessOrEqualF64 => x <= n.threshold,
        }
    }

    fn leaf<'t>(&self, tree: &'t Tree, x: &[f64]) -> &'t Node {
        let mut n = &tree.nodes[0];
        while !n.is_leaf() {
            let next = if self.goes_left(n, x[n.feature]) {
                n.left
            } else {
                n.right
            };
            n = &tree.nodes[next as usize];
        }
        n
    }

    /// The log-odds of default for a vector in `feature_names` order (NaN is missing).
    pub fn margin(&self, x: &[f64]) -> f64 {
        debug_assert_eq!(x.len(), self.feature_names.len());
        // Summed in the same order as `explain`, so that both give the same margin.
        self.trees
            .iter()
            .fold(self.base_margin, |m, t| m + self.leaf(t, x).value)
    }

    /// The heap bytes of the loaded ensemble (its trees and their TreeSHAP tables).
    pub fn heap_bytes(&self) -> usize {
        self.trees.iter().map(Tree::heap_bytes).sum()
    }

    /// The probability of default.
    pub fn probability(&self, x: &[f64]) -> f64 {
        super::sigmoid(self.margin(x))
    }

    /// The margin and every feature's exact path-dependent Shapley value.
    pub fn explain(&self, x: &[f64]) -> Explained {
        self.explain_by(x, true)
    }

    /// [`Ensemble::explain`], from the leaf tables where a tree has them when `tables`, else
    /// by the recursion for every tree (the two are tested against each other).
    fn explain_by(&self, x: &[f64], tables: bool) -> Explained {
        debug_assert_eq!(x.len(), self.feature_names.len());
        let mut phi = vec![0.0; x.len()];
        let depth = self.trees.iter().map(Tree::depth).max().unwrap_or(0);
        // One segment per level of the recursion, each one element longer than the last.
        let mut path = vec![PathElement::default(); (depth + 2) * (depth + 3) / 2];
        let mut margin = self.base_margin;
        let mut expected = self.base_margin;
        let mut scratch = leaf_tables::Scratch::default();
        for tree in &self.trees {
            expected += tree.expected;
            if let Some(leaves) = tree.leaf_tables.as_ref().filter(|_| tables) {
                let goes_left = |i: usize| {
                    let n = &tree.nodes[i];
                    self.goes_left(n, x[n.feature])
                };
                let reached = leaf_tables::explain(leaves, goes_left, &mut scratch, &mut phi);
                debug_assert!(std::ptr::eq(&tree.nodes[reached], self.leaf(tree, x)));
                margin += tree.nodes[reached].value;
                continue;
            }
            margin += self.leaf(tree, x).value;
            let mut walk = Walk {
                ensemble: self,
                tree,
                x,
                phi: &mut phi,
                path: &mut path,
            };
            walk.node(0, 0, 0, 1.0, 1.0, NO_FEATURE);
        }
        Explained {
            margin,
            contributions: phi,
            expected,
        }
    }
}

impl Model for Ensemble {
    fn kind(&self) -> &'static str {
        match self.comparison {
            Comparison::LessThanF32 => "XGBoost tree ensemble",
            Comparison::LessOrEqualF64 => "LightGBM tree ensemble",
        }
    }

    fn feature_names(&self) -> Vec<&str> {
        self.feature_names.iter().map(String::as_str).collect()
    }

    fn handles_missing(&self) -> bool {
        true
    }

    fn check_monotone(&self, feature: usize, direction: Monotone) -> Result<(), String> {
        monotone::check(self, feature, direction)
    }

    /// The probability of default, with the features' exact Shapley values as the shares
    /// the principal reasons are chosen from.
    fn score(&self, x: &[f64]) -> Scored {
        let e = self.explain(x);
        Scored {
            probability_of_default: super::sigmoid(e.margin),
            reasons: principal_reasons(
                self.feature_names.iter().map(String::as_str),
                &e.contributions,
                x,
            ),
        }
    }
}

const NO_FEATURE: usize = usize::MAX;

/// A feature on the path to a node: the fraction of the expectation that goes this way when
/// the feature is unknown (`zero`), whether x goes this way (`one`), and the permutation
/// weight of the subsets of this length.
#[derive(Debug, Clone, Copy, Default)]
struct PathElement {
    feature: usize,
    zero: f64,
    one: f64,
    weight: f64,
}

/// One tree's walk for one vector, adding to `phi`.
struct Walk<'a> {
    ensemble: &'a Ensemble,
    tree: &'a Tree,
    x: &'a [f64],
    phi: &'a mut [f64],
    path: &'a mut [PathElement],
}

impl Walk<'_> {
    /// Visits node `i` with the path so far in `path[start..start + depth]`, after extending
    /// it by the split that led here.
    fn node(&mut self, i: usize, start: usize, depth: usize, zero: f64, one: f64, feature: usize) {
        let n = &self.tree.nodes[i];
        let seg = &mut self.path[start..];
        extend(seg, depth, zero, one, feature);
        if n.is_leaf() {
            for k in 1..=depth {
                let e = seg[k];
                let w = unwound_sum(seg, depth, k);
                self.phi[e.feature] += w * (e.one - e.zero) * n.value;
            }
            return;
        }
        let left = self.ensemble.goes_left(n, self.x[n.feature]);
        let (hot, cold) = if left {
            (n.left, n.right)
        } else {
            (n.right, n.left)
        };
        // A feature met again on the path is taken out and re-entered with both splits'
        // fractions combined.
        let (mut incoming_zero, mut incoming_one) = (1.0, 1.0);
        let mut depth = depth;
        if let Some(k) = (1..=depth).find(|&k| seg[k].feature == n.feature) {
            incoming_zero = seg[k].zero;
            incoming_one = seg[k].one;
            unwind(seg, depth, k);
            depth -= 1;
        }
        let next = start + depth + 1;
        for (child, one) in [(hot, incoming_one), (cold, 0.0)] {
            let c = &self.tree.nodes[child as usize];
            let zero = if n.cover > 0.0 {
                incoming_zero * c.cover / n.cover
            } else {
                0.0
            };
            // A branch neither x nor the data takes adds nothing (and would divide by zero).
            if zero == 0.0 && one == 0.0 {
                continue;
            }
            self.path.copy_within(start..start + depth + 1, next);
            self.node(child as usize, next, depth + 1, zero, one, n.feature);
        }
    }
}

/// Adds a feature to the path at `depth`, updating the weights of every subset length.
fn extend(path: &mut [PathElement], depth: usize, zero: f64, one: f64, feature: usize) {
    path[depth] = PathElement {
        feature,
        zero,
        one,
        weight: if depth == 0 { 1.0 } else { 0.0 },
    };
    let d1 = (depth + 1) as f64;
    for i in (0..depth).rev() {
        path[i + 1].weight += one * path[i].weight * (i + 1) as f64 / d1;
        path[i].weight = zero * path[i].weight * (depth - i) as f64 / d1;
    }
}

/// Takes element `k` out of the path (the inverse of [`extend`]).
fn unwind(path: &mut [PathElement], depth: usize, k: usize) {
    let (one, zero) = (path[k].one, path[k].zero);
    let d1 = (depth + 1) as f64;
    let mut next = path[depth].weight;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let kept = path[i].weight;
            path[i].weight = next * d1 / ((i + 1) as f64 * one);
            next = kept - path[i].weight * zero * (depth - i) as f64 / d1;
        } else {
            path[i].weight = path[i].weight * d1 / (zero * (depth - i) as f64);
        }
    }
    for i in k..depth {
        path[i].feature = path[i + 1].feature;
        path[i].zero = path[i + 1].zero;
        path[i].one = path[i + 1].one;
    }
}

/// The total weight of the path with element `k` taken out, without changing it.
fn unwound_sum(path: &[PathElement], depth: usize, k: usize) -> f64 {
    let (one, zero) = (path[k].one, path[k].zero);
    let d1 = (depth + 1) as f64;
    let mut next = path[depth].weight;
    let mut total = 0.0;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let w = next * d1 / ((i + 1) as f64 * one);
            total += w;
            next = path[i].weight - w * zero * (depth - i) as f64 / d1;
        } else {
            total += path[i].weight * d1 / (zero * (depth - i) as f64);
        }
    }
    total
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trees");

    /// Compares an ensemble with what its library said for every row of `file` (made by
    /// `tests/fixtures/trees/make.py`): the inputs (empty = missing), the library's PD, every
    /// contribution and, last, its expected value.
    pub fn assert_matches_library(e: &Ensemble, file: &str) {
        let n = e.feature_names.len();
        let text = std::fs::read_to_string(format!("{DIR}/{file}")).unwrap();
        let num = |s: &str| {
            if s.is_empty() {
                f64::NAN
            } else {
                s.parse().unwrap()
            }
        };
        let (mut rows, mut missing) = (0, 0);
        for line in text.lines().skip(1) {
            let cells: Vec<f64> = line.split(',').map(num).collect();
            assert_eq!(cells.len(), 2 * n + 2);
            let (x, pd, phi) = (&cells[..n], cells[n], &cells[n + 1..]);
            missing += x.iter().filter(|v| v.is_nan()).count();
            let got = e.explain(x);
            // The recursion agrees with the tables wherever the tree has them.
            let recursive = e.explain_by(x, false);
            for (a, b) in got.contributions.iter().zip(&recursive.contributions) {
                assert!((a - b).abs() < 1e-12, "{file}: tables {a}, recursion {b}");
            }
            let p = e.probability(x);
            assert!((p - pd).abs() < 1e-6, "{file}: pd {p} vs {pd} for {x:?}");
            for (j, (g, w)) in got.contributions.iter().zip(phi).enumerate() {
                let name = &e.feature_names[j];
                assert!((g - w).abs() < 1e-5, "{file}: {name}: {g} vs {w} for {x:?}");
            }
            assert!((got.expected - phi[n]).abs() < 1e-5);
            assert_tables_add_the_recorded_bits(e, x);
            rows += 1;
        }
        assert_eq!(rows, 300);
        assert!(missing > 20, "{file} has rows with missing values");
    }

    /// Each tree's shares from its tables carry the same bits, added in the same order (leaves
    /// left first, a leaf's path features in path order), as the releases that found U and
    /// derived the shares per vector computed: decisions they recorded replay identically.
    fn assert_tables_add_the_recorded_bits(e: &Ensemble, x: &[f64]) {
        fn walk(
            e: &Ensemble,
            nodes: &[Node],
            i: usize,
            x: &[f64],
            path: &mut Vec<(usize, bool)>,
            phi: &mut [f64],
        ) {
            let n = &nodes[i];
            if !n.is_leaf() {
                for (child, left) in [(n.left, true), (n.right, false)] {
                    path.push((i, left));
                    walk(e, nodes, child as usize, x, path, phi);
                    path.pop();
                }
                return;
            }
            let (mut features, mut z, mut agrees) = (Vec::new(), Vec::<f64>::new(), Vec::new());
            for &(j, left) in path.iter() {
                let split = &nodes[j];
                let child = &nodes[if left { split.left } else { split.right } as usize];
                let k = features
                    .iter()
                    .position(|&f| f == split.feature)
                    .unwrap_or_else(|| {
                        features.push(split.feature);
                        z.push(1.0);
                        agrees.push(true);
                        features.len() - 1
                    });
                z[k] *= if split.cover > 0.0 {
                    child.cover / split.cover
                } else {
                    0.0
                };
                agrees[k] &= e.goes_left(split, x[split.feature]) == left;
            }
            let u: usize = agrees
                .iter()
                .enumerate()
                .map(|(k, &a)| usize::from(a) << k)
                .sum();
            let (v, all) = (n.value, (1 << z.len()) - 1);
            let a = |t: usize| leaf_tables::subset_sum(&z, t, all);
            for (k, &f) in features.iter().enumerate() {
                phi[f] += if z.contains(&0.0) {
                    leaf_tables::share(v, &z, u, k)
                } else if u >> k & 1 == 1 {
                    v * (1.0 - z[k]) / z[k] * a(u & !(1 << k))
                } else {
                    -v * a(u)
                };
            }
        }
        for tree in &e.trees {
            let Some(tables) = &tree.leaf_tables else {
                continue;
            };
            let mut got = vec![0.0; x.len()];
            let goes_left = |i: usize| e.goes_left(&tree.nodes[i], x[tree.nodes[i].feature]);
            let reached =
                leaf_tables::explain(tables, goes_left, &mut Default::default(), &mut got);
            assert!(std::ptr::eq(&tree.nodes[reached], e.leaf(tree, x)), "{x:?}");
            let mut want = vec![0.0; x.len()];
            walk(e, &tree.nodes, 0, x, &mut Vec::new(), &mut want);
            let bits = |v: &[f64]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{x:?}");
        }
    }

    fn split(feature: usize, threshold: f64, left: u32, right: u32, cover: f64) -> Node {
        Node {
            feature,
            threshold,
            left,
            right,
            missing: [Missing::Nan, Missing::Zero, Missing::None][feature % 3],
            default_left: left % 2 == 1,
            value: 0.0,
            cover,
        }
    }

    fn leaf(value: f64, cover: f64) -> Node {
        Node::leaf(value, cover)
    }

    /// Two trees over four features; the second splits on feature 0 twice on one path, which
    /// is the case TreeSHAP's unwinding exists for.
    fn ensemble(comparison: Comparison) -> Ensemble {
        let t1 = Tree::new(
            vec![
                split(0, 0.5, 1, 2, 100.0),
                split(1, 1.5, 3, 4, 60.0),
                split(2, -1.0, 5, 6, 40.0),
                leaf(-0.4, 25.0),
                leaf(0.3, 35.0),
                leaf(0.9, 10.0),
                leaf(-0.2, 30.0),
            ],
            4,
        )
        .unwrap();
        let t2 = Tree::new(
            vec![
                split(0, 2.0, 1, 2, 100.0),
                split(0, 0.0, 3, 4, 70.0),
                split(3, 5.0, 5, 6, 30.0),
                leaf(0.15, 20.0),
                split(1, 0.5, 7, 8, 50.0),
                leaf(-0.6, 12.0),
                leaf(0.45, 18.0),
                leaf(0.05, 22.0),
                leaf(-0.35, 28.0),
            ],
            4,
        )
        .unwrap();
        Ensemble {
            feature_names: ["a", "b", "c", "d"].map(String::from).to_vec(),
            trees: vec![t1, t2],
            base_margin: -1.25,
            comparison,
            declared_monotone: Vec::new(),
        }
    }

    /// E[tree | the features in `known` are x's]: known features follow x, unknown ones
    /// average their children by cover. The conditional expectation TreeSHAP explains.
    fn conditional(e: &Ensemble, t: &Tree, i: usize, x: &[f64], known: u32) -> f64 {
        let n = &t.nodes[i];
        if n.is_leaf() {
            return n.value;
        }
        if known & (1 << n.feature) != 0 {
            let next = if e.goes_left(n, x[n.feature]) {
                n.left
            } else {
                n.right
            };
            return conditional(e, t, next as usize, x, known);
        }
        let (l, r) = (n.left as usize, n.right as usize);
        (conditional(e, t, l, x, known) * t.nodes[l].cover
            + conditional(e, t, r, x, known) * t.nodes[r].cover)
            / n.cover
    }

    /// Shapley values by their definition: every subset, weighted |S|!(M-|S|-1)!/M!.
    fn brute_force(e: &Ensemble, x: &[f64]) -> Vec<f64> {
        let m = x.len();
        let fact = |k: usize| (1..=k).product::<usize>() as f64;
        let v = |s: u32| -> f64 {
            e.base_margin
                + e.trees
                    .iter()
                    .map(|t| conditional(e, t, 0, x, s))
                    .sum::<f64>()
        };
        (0..m)
            .map(|j| {
                (0u32..1 << m)
                    .filter(|s| s & (1 << j) == 0)
                    .map(|s| {
                        let size = s.count_ones() as usize;
                        let w = fact(size) * fact(m - size - 1) / fact(m);
                        w * (v(s | 1 << j) - v(s))
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn tree_shap_equals_brute_force_shapley_values_and_sums_to_the_margin() {
        // Also with leaves no training data reached (a zero cover fraction, where the leaf
        // tables keep every share rather than divide by it).
        let variants = [false, true].map(|zero| {
            move |comparison| {
                let mut e = ensemble(comparison);
                if zero {
                    for (t, leaf) in [(0, 5), (1, 7)] {
                        let mut nodes = e.trees[t].nodes.clone();
                        nodes[leaf].cover = 0.0;
                        e.trees[t] = Tree::new(nodes, 4).unwrap();
                    }
                }
                e
            }
        });
        let cases = variants
            .iter()
            .flat_map(|make| [Comparison::LessThanF32, Comparison::LessOrEqualF64].map(make));
        for e in cases {
            let grid = [
                -2.0,
                -1.0,
                0.0,
                0.25,
                0.5,
                1.0,
                1.5,
                2.0,
                3.0,
                5.0,
                7.0,
                f64::NAN,
            ];
            let mut seen = 0;
            for (i, &a) in grid.iter().enumerate() {
                for &b in &grid {
                    let x = [a, b, grid[(i + 3) % grid.len()], grid[(i * 7) % grid.len()]];
                    let want = brute_force(&e, &x);
                    for tables in [true, false] {
                        let got = e.explain_by(&x, tables);
                        for (g, w) in got.contributions.iter().zip(&want) {
                            assert!((g - w).abs() < 1e-12, "x={x:?}: {g} vs {w} ({tables})");
                        }
                        let sum = got.expected + got.contributions.iter().sum::<f64>();
                        assert!((sum - got.margin).abs() < 1e-12);
                        assert_eq!(got.margin, e.margin(&x));
                    }
                    seen += 1;
                }
            }
            assert_eq!(seen, 144);
        }
    }

    #[test]
    fn the_expected_value_is_the_cover_weighted_mean() {
        let e = ensemble(Comparison::LessThanF32);
        let t1 = (0.25 * -0.4 + 0.35 * 0.3 + 0.1 * 0.9 + 0.3 * -0.2) / 1.0;
        assert!((e.trees[0].expected() - t1).abs() < 1e-12);
        assert_eq!(e.trees[1].depth(), 3);
    }

    #[test]
    fn comparisons_follow_each_library_at_the_threshold() {
        let n = split(0, 0.5, 1, 2, 1.0);
        let xgb = ensemble(Comparison::LessThanF32);
        let lgb = ensemble(Comparison::LessOrEqualF64);
        assert!(!xgb.goes_left(&n, 0.5));
        assert!(lgb.goes_left(&n, 0.5));
        // float32: a value just under the threshold in f64 is equal to it in f32.
        let n = split(0, 0.1, 1, 2, 1.0);
        assert!(!xgb.goes_left(&n, 0.1 - 1e-12));
        assert!(xgb.goes_left(&n, 0.09));
        assert!(n.default_left == xgb.goes_left(&n, f64::NAN));
        // LightGBM's missing rules: NaN read as zero unless NaN is the missing value; zero
        // sent the default way when zero is.
        let mut n = split(0, -1.0, 2, 1, 1.0);
        n.missing = Missing::None;
        assert!(!lgb.goes_left(&n, f64::NAN), "NaN is compared as 0 > -1");
        n.missing = Missing::Zero;
        n.default_left = true;
        assert!(lgb.goes_left(&n, f64::NAN) && lgb.goes_left(&n, 1e-36));
        assert!(!lgb.goes_left(&n, 1e-30));
    }

    #[test]
    fn a_broken_tree_is_refused_with_the_node() {
        let cycle = vec![split(0, 1.0, 0, 1, 1.0), leaf(0.0, 1.0)];
        assert!(Tree::new(cycle, 1).unwrap_err().contains("node 0"));
        let out = vec![split(3, 1.0, 1, 2, 1.0), leaf(0.0, 1.0), leaf(0.0, 0.0)];
        assert!(Tree::new(out, 2).unwrap_err().contains("feature 3"));
        let nan = vec![leaf(f64::NAN, 1.0)];
        assert!(Tree::new(nan, 1).unwrap_err().contains("leaf 0"));
    }
}
