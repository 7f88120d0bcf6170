//! Exact verification of a declared monotone direction over a tree ensemble.
//!
//! A sum of trees each monotone in a feature is monotone in it, and that is what the libraries
//! guarantee when trained with monotone constraints, so each tree is checked on its own. A
//! tree's leaves partition the input space into boxes (one interval per feature, and whether
//! a missing value can reach the leaf). A tree breaks "increasing in f" exactly when two
//! leaves L and R have boxes that meet on every other feature, L's interval of f lies wholly
//! below R's, and L's value is above R's: some vector moves from L to R as only f rises.
//! This is exact, unlike the sufficient test that every leaf left of a split on f is below
//! every leaf right of it, which LightGBM's "intermediate" and "advanced" constraint methods
//! do not satisfy. Monotonicity is over present values: a missing f is not ordered.

use super::{Ensemble, LEAF, Missing, Tree};
use crate::schema::Monotone;

/// Where a leaf's vectors can lie along one feature: an interval whose upper end is open
/// for XGBoost (`x < t` goes left) and lower end open for LightGBM (`x <= t` goes left);
/// either way it is non-empty exactly when `lo < hi`. `missing` says a missing value can
/// also reach the leaf.
#[derive(Debug, Clone, Copy)]
struct Span {
    lo: f64,
    hi: f64,
    missing: bool,
}

impl Span {
    const ALL: Span = Span {
        lo: f64::NEG_INFINITY,
        hi: f64::INFINITY,
        missing: true,
    };

    fn meets(&self, other: &Span) -> bool {
        self.lo.max(other.lo) < self.hi.min(other.hi) || (self.missing && other.missing)
    }
}

struct Leaf {
    node: usize,
    value: f64,
    spans: Vec<Span>,
}

/// Checks every tree; the error names the first tree that breaks the direction and how.
pub fn check(e: &Ensemble, feature: usize, direction: Monotone) -> Result<(), String> {
    for (t, tree) in e.trees.iter().enumerate() {
        let mut leaves = Vec::new();
        collect(
            tree,
            0,
            &mut vec![Span::ALL; e.feature_names.len()],
            &mut leaves,
        );
        for low in &leaves {
            for high in &leaves {
                let (a, b) = (low.spans[feature], high.spans[feature]);
                let ordered = a.lo < a.hi && b.lo < b.hi && a.hi <= b.lo;
                if !ordered {
                    continue;
                }
                let broken = match direction {
                    Monotone::Increasing => low.value > high.value,
                    Monotone::Decreasing => low.value < high.value,
                };
                let others_meet = low
                    .spans
                    .iter()
                    .zip(&high.spans)
                    .enumerate()
                    .all(|(g, (x, y))| g == feature || x.meets(y));
                if broken && others_meet {
                    return Err(format!(
                        "tree {t} breaks it: its margin goes from {} (leaf node {}) to {} (leaf \
                         node {}) as {} rises past {}",
                        low.value, low.node, high.value, high.node, e.feature_names[feature], a.hi
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every leaf under node `i`, with the box the path to it leaves.
fn collect(tree: &Tree, i: usize, spans: &mut [Span], out: &mut Vec<Leaf>) {
    let n = &tree.nodes[i];
    if n.left == LEAF {
        out.push(Leaf {
            node: i,
            value: n.value,
            spans: spans.to_vec(),
        });
        return;
    }
    let saved = spans[n.feature];
    for (child, left) in [(n.left, true), (n.right, false)] {
        let s = &mut spans[n.feature];
        if left {
            s.hi = s.hi.min(n.threshold);
        } else {
            s.lo = s.lo.max(n.threshold);
        }
        // A missing value follows the default direction; with no missing type it is read as
        // zero, which the intervals already place.
        s.missing &= match n.missing {
            Missing::Nan | Missing::Zero => n.default_left == left,
            Missing::None => false,
        };
        collect(tree, child as usize, spans, out);
        spans[n.feature] = saved;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Comparison, Node};
    use super::*;

    fn split(feature: usize, threshold: f64, left: u32, right: u32) -> Node {
        Node {
            feature,
            threshold,
            left,
            right,
            missing: Missing::Nan,
            default_left: true,
            value: 0.0,
            cover: 2.0,
        }
    }

    fn ensemble(nodes: Vec<Node>) -> Ensemble {
        Ensemble {
            feature_names: vec!["f".into(), "g".into()],
            trees: vec![Tree::new(nodes, 2).unwrap()],
            base_margin: 0.0,
            comparison: Comparison::LessThanF32,
            declared_monotone: Vec::new(),
        }
    }

    /// f splits at the root; below, g splits each side. Leaves: (f low, g low) = a,
    /// (f low, g high) = b, (f high, g low) = c, (f high, g high) = d.
    fn grid(a: f64, b: f64, c: f64, d: f64, g_left: f64, g_right: f64) -> Ensemble {
        ensemble(vec![
            split(0, 5.0, 1, 2),
            split(1, g_left, 3, 4),
            split(1, g_right, 5, 6),
            Node::leaf(a, 1.0),
            Node::leaf(b, 1.0),
            Node::leaf(c, 1.0),
            Node::leaf(d, 1.0),
        ])
    }

    #[test]
    fn only_leaves_one_step_of_f_apart_are_compared() {
        // b (f low, g ≥ 10) is above c (f high, g < 0), but no vector goes from one to the
        // other by raising f alone: the g ranges do not meet. The sufficient test would
        // refuse this tree; it is monotone.
        let e = grid(0.0, 3.0, 1.0, 4.0, 10.0, 0.0);
        assert_eq!(check(&e, 0, Monotone::Increasing), Ok(()));
        // With the same g threshold on both sides, b and d share g ≥ 10 and b > c matters
        // only if they meet: here b = 3 < d = 4 and a = 0 < c = 1, still monotone.
        let e = grid(0.0, 3.0, 1.0, 4.0, 10.0, 10.0);
        assert_eq!(check(&e, 0, Monotone::Increasing), Ok(()));
        // Raising a above c breaks it: a and c share g < 0 (and a missing g, which goes
        // left at both g splits).
        let e = grid(2.0, 3.0, 1.0, 4.0, 10.0, 0.0);
        let err = check(&e, 0, Monotone::Increasing).unwrap_err();
        assert!(
            err.contains("tree 0") && err.contains("leaf node 3"),
            "{err}"
        );
        // And a below d breaks "decreasing".
        assert!(check(&e, 0, Monotone::Decreasing).is_err());
    }

    #[test]
    fn a_feature_the_tree_never_splits_on_is_monotone_both_ways() {
        let e = grid(0.0, 3.0, 1.0, 4.0, 10.0, 0.0);
        assert_eq!(check(&e, 1, Monotone::Increasing), Ok(()));
        let single = ensemble(vec![
            split(1, 1.0, 1, 2),
            Node::leaf(1.0, 1.0),
            Node::leaf(0.0, 1.0),
        ]);
        assert_eq!(check(&single, 0, Monotone::Decreasing), Ok(()));
        assert!(check(&single, 1, Monotone::Increasing).is_err());
        assert_eq!(check(&single, 1, Monotone::Decreasing), Ok(()));
    }

    /// The held-out rows of a fixture, missing values as NaN.
    fn rows(file: &str) -> Vec<Vec<f64>> {
        let text = std::fs::read_to_string(format!("{}/{file}", super::super::tests::DIR));
        text.unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                l.split(',')
                    .take(21)
                    .map(|c| c.parse().unwrap_or(f64::NAN))
                    .collect()
            })
            .collect()
    }

    /// Whether the margin ever moves against `direction` as feature `j` steps through
    /// `grid`, over every row: the brute-force reference for the exact check.
    fn brute_force_breaks(
        e: &Ensemble,
        rows: &[Vec<f64>],
        j: usize,
        grid: &[f64],
        up: bool,
    ) -> bool {
        rows.iter().any(|row| {
            let mut x = row.clone();
            let margins: Vec<f64> = grid
                .iter()
                .map(|&v| {
                    x[j] = v;
                    e.margin(&x)
                })
                .collect();
            margins
                .windows(2)
                .any(|w| if up { w[1] < w[0] } else { w[1] > w[0] })
        })
    }

    #[test]
    fn the_check_agrees_with_brute_force_on_the_library_models() {
        let dir = super::super::tests::DIR;
        let xgb =
            super::super::xgboost::parse(&std::fs::read(format!("{dir}/xgboost.json")).unwrap());
        let lgb = std::fs::read_to_string(format!("{dir}/lightgbm.txt")).unwrap();
        let lgb = super::super::lightgbm::parse(&lgb);
        for (e, file) in [
            (xgb.unwrap(), "xgboost_expected.csv"),
            (lgb.unwrap(), "lightgbm_expected.csv"),
        ] {
            let rows = rows(file);
            let delay = e
                .feature_names
                .iter()
                .position(|n| n == "PAYMENTDELAY_1")
                .unwrap();
            let age = e.feature_names.iter().position(|n| n == "AGE").unwrap();
            let delays: Vec<f64> = (0..=8).map(f64::from).collect();
            let ages: Vec<f64> = (21..=79).map(f64::from).collect();
            // Trained increasing in the payment delay: both say it holds.
            assert_eq!(check(&e, delay, Monotone::Increasing), Ok(()), "{file}");
            assert!(
                !brute_force_breaks(&e, &rows, delay, &delays, true),
                "{file}"
            );
            // Unconstrained in age: where the check refuses a direction, some real row
            // moves against it.
            for (direction, up) in [(Monotone::Increasing, true), (Monotone::Decreasing, false)] {
                let refused = check(&e, age, direction).is_err();
                assert!(refused, "{file}: age is not {direction} in a boosted model");
                assert!(
                    brute_force_breaks(&e, &rows, age, &ages, up),
                    "{file}: {direction}"
                );
            }
        }
    }
}
