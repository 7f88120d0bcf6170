//! Exact path-dependent TreeSHAP from tables precomputed per leaf (the idea of Fast TreeSHAP
//! v2, Yang 2021), for trees whose paths are short in distinct features.
//!
//! TreeSHAP's expectation factorises over a leaf's path: knowing the features in S, the leaf
//! weighs `v · Π_{j∈S} o_j · Π_{j∉S} z_j`, where for each distinct feature j of the path `z_j`
//! is the product of its splits' cover fractions and `o_j` is 1 when x goes the path's way at
//! every split on j. Since `o_j` is 0 or 1, a vector meets a leaf only through the set U of
//! path features it agrees with, so each feature's share of the leaf is a function of U that
//! can be tabulated when the tree is loaded:
//! - for k in U: `v (1 − z_k) Σ_{S⊆U∖k} w(|S|) Π_{j∈F∖S∖k} z_j`
//! - for k not in U: `−v z_k Σ_{S⊆U} w(|S|) Π_{j∈F∖S∖k} z_j`
//!
//! with `w(s) = s! (d − s − 1)! / d!` over the path's d distinct features F. With
//! `A(T) = Σ_{S⊆T} w(|S|) Π_{j∈F∖S} z_j` both are one table lookup: `v (1 − z_k)/z_k · A(U∖k)`
//! for k in U and `−v A(U)` for k outside it, so a leaf keeps `2^d` numbers (a leaf with a zero
//! fraction, where the division fails, keeps the `2^d · d` shares themselves). Explaining a
//! vector then costs one comparison per split and about one lookup per (leaf, path feature),
//! instead of the O(depth²) recursion per leaf. Everything of a tree sits in four flat arrays,
//! read in order, so the work is not lost to pointer chasing. Trees with a path of more than
//! [`MAX_FEATURES`] distinct features keep the recursive algorithm.

use super::Node;

/// The most distinct features on one path for which a tree gets tables: 64 numbers per leaf
/// (64 · 6 with a zero fraction), and 3^6 steps per leaf to build them.
pub const MAX_FEATURES: usize = 6;

/// One split on a leaf's path.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    node: u32,
    /// Whether the path goes left at the node.
    left: bool,
    /// The split feature's place among the leaf's path features.
    k: u8,
}

/// Where a leaf's parts are in the tree's arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LeafRef {
    steps: u32,
    n_steps: u8,
    /// Its d path features (and their coefficients) start here.
    features: u32,
    d: u8,
    table: u32,
    /// The table holds every share (`2^d · d`), not `A`.
    full: bool,
    /// `−v`.
    minus_value: f64,
}

/// A tree's tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    leaves: Vec<LeafRef>,
    steps: Vec<Step>,
    /// Vector indices of each leaf's path features.
    features: Vec<u32>,
    /// `v (1 − z_k) / z_k` of each leaf's path features.
    coefficients: Vec<f64>,
    table: Vec<f64>,
}

/// The tables of a tree, or `None` when a path has too many distinct features.
pub fn build(nodes: &[Node]) -> Option<Tables> {
    let mut t = Tables {
        leaves: Vec::new(),
        steps: Vec::new(),
        features: Vec::new(),
        coefficients: Vec::new(),
        table: Vec::new(),
    };
    collect(nodes, 0, &mut Vec::new(), &mut t)?;
    for v in [&mut t.coefficients, &mut t.table] {
        v.shrink_to_fit();
    }
    Some(t)
}

/// Walks to every leaf under node `i`, `path` holding the splits so far as (node, went left).
fn collect(nodes: &[Node], i: usize, path: &mut Vec<(u32, bool)>, t: &mut Tables) -> Option<()> {
    let n = &nodes[i];
    if n.is_leaf() {
        return leaf(nodes, path, n.value, t);
    }
    for (child, left) in [(n.left, true), (n.right, false)] {
        path.push((i as u32, left));
        collect(nodes, child as usize, path, t)?;
        path.pop();
    }
    Some(())
}

fn leaf(nodes: &[Node], path: &[(u32, bool)], v: f64, t: &mut Tables) -> Option<()> {
    let mut features: Vec<u32> = Vec::new();
    let mut z: Vec<f64> = Vec::new();
    let steps = t.steps.len() as u32;
    for &(i, left) in path {
        let n = &nodes[i as usize];
        let child = &nodes[if left { n.left } else { n.right } as usize];
        // As the recursion computes it: no data through the parent means no data here.
        let fraction = if n.cover > 0.0 {
            child.cover / n.cover
        } else {
            0.0
        };
        let k = match features.iter().position(|&f| f as usize == n.feature) {
            Some(k) => k,
            None => {
                features.push(n.feature as u32);
                z.push(1.0);
                features.len() - 1
            }
        };
        z[k] *= fraction;
        t.steps.push(Step {
            node: i,
            left,
            k: k as u8,
        });
    }
    let d = features.len();
    if d > MAX_FEATURES {
        return None;
    }
    let a = sums(&z);
    let full = z.contains(&0.0);
    let table = t.table.len() as u32;
    if full {
        let all = (1usize << d) - 1;
        for u in 0..=all {
            for k in 0..d {
                t.table.push(if u >> k & 1 == 1 {
                    v * (1.0 - z[k]) * sum_without(&z, u & !(1 << k), k)
                } else {
                    -v * z[k] * sum_without(&z, u, k)
                });
            }
        }
    } else {
        t.table.extend_from_slice(&a);
    }
    t.leaves.push(LeafRef {
        steps,
        n_steps: path.len() as u8,
        features: t.features.len() as u32,
        d: d as u8,
        table,
        full,
        minus_value: -v,
    });
    t.coefficients.extend(
        z.iter()
            .map(|&zk| if full { 0.0 } else { v * (1.0 - zk) / zk }),
    );
    t.features.extend(features);
    Some(())
}

/// The Shapley weight of a subset of size s among d players, one of whom is left out; 0 for
/// s = d (`A` of the whole path is never read: a feature outside U needs U smaller).
fn weight(s: usize, d: usize) -> f64 {
    if s >= d {
        return 0.0;
    }
    let factorial = |n: usize| (1..=n).map(|k| k as f64).product::<f64>();
    factorial(s) * factorial(d - s - 1) / factorial(d)
}

/// `A(T)` for every subset T of the path features: `Σ_{S⊆T} w(|S|) Π_{j∈F∖S} z_j`.
fn sums(z: &[f64]) -> Vec<f64> {
    if z.is_empty() {
        // A tree that is one leaf: nothing to share.
        return vec![0.0];
    }
    let all = (1usize << z.len()) - 1;
    (0..=all).map(|t| subset_sum(z, t, all)).collect()
}

/// `Σ_{S⊆t} w(|S|) Π_{j∈F∖S∖k} z_j` for k not in t, without dividing by `z_k`.
fn sum_without(z: &[f64], t: usize, k: usize) -> f64 {
    subset_sum(z, t, ((1usize << z.len()) - 1) & !(1 << k))
}

/// `Σ_{S⊆t} w(|S|) Π_{j∈kept∖S} z_j`, subsets and products as bit masks over the path features.
fn subset_sum(z: &[f64], t: usize, kept: usize) -> f64 {
    let product = |m: usize| -> f64 {
        (0..z.len())
            .filter(|j| m >> j & 1 == 1)
            .map(|j| z[j])
            .product()
    };
    subsets(t)
        .map(|s| weight(s.count_ones() as usize, z.len()) * product(kept & !s))
        .sum()
}

/// Every subset of the bits of `t`, `t` itself first and 0 last.
fn subsets(t: usize) -> impl Iterator<Item = usize> {
    let mut next = Some(t);
    std::iter::from_fn(move || {
        let s = next?;
        next = (s != 0).then(|| (s - 1) & t);
        Some(s)
    })
}

/// Adds one tree's shares for a vector to `phi`; `left[i]` says whether the vector goes left
/// at split i (its values for leaves unused).
///
/// Which way a vector goes is data, not a pattern a branch predictor can learn, so the loop
/// takes no branch on it: the subset is cleared bit by bit with masks, and a share is chosen
/// between its two candidates by bits (exactly one of them, not a blend).
pub fn explain(t: &Tables, left: &[bool], phi: &mut [f64]) {
    for leaf in &t.leaves {
        let d = usize::from(leaf.d);
        let mut u = (1usize << d) - 1;
        let steps = leaf.steps as usize..leaf.steps as usize + usize::from(leaf.n_steps);
        for step in &t.steps[steps] {
            let away = usize::from(left[step.node as usize] != step.left);
            u &= !(away << step.k);
        }
        let at = leaf.features as usize;
        let features = &t.features[at..at + d];
        let table = &t.table[leaf.table as usize..];
        if leaf.full {
            for (&f, share) in features.iter().zip(&table[u * d..(u + 1) * d]) {
                phi[f as usize] += share;
            }
            continue;
        }
        let outside = (leaf.minus_value * table[u]).to_bits();
        for (k, (&f, c)) in features.iter().zip(&t.coefficients[at..at + d]).enumerate() {
            let inside = (c * table[u & !(1 << k)]).to_bits();
            // All ones when k is in U, else zero.
            let mask = 0u64.wrapping_sub(((u >> k) & 1) as u64);
            phi[f as usize] += f64::from_bits((inside & mask) | (outside & !mask));
        }
    }
}

/// The heap bytes of a tree's tables, for the memory of a loaded version.
pub fn heap_bytes(t: &Tables) -> usize {
    t.leaves.capacity() * std::mem::size_of::<LeafRef>()
        + t.steps.capacity() * std::mem::size_of::<Step>()
        + t.features.capacity() * std::mem::size_of::<u32>()
        + t.coefficients.capacity() * std::mem::size_of::<f64>()
        + t.table.capacity() * std::mem::size_of::<f64>()
}
