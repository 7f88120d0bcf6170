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
//! with `w(s) = s! (d − s − 1)! / d!` over the path's d distinct features F, so a leaf keeps
//! the `2^d · d` shares themselves, a row of d per U. Explaining a vector then costs one
//! comparison per split and one row read per leaf, instead of the O(depth²) recursion per
//! leaf. (Keeping only `A(T) = Σ_{S⊆T} w(|S|) Π_{j∈F∖S} z_j`, `2^d` numbers a leaf, and
//! deriving the shares from it takes a quarter of the memory but several reads and a
//! multiplication per share: measured slower, see BENCHMARKS.md.)
//!
//! The rows a vector reads are scattered over the tables, which outgrow the core's L2 cache at
//! a few hundred trees, so the time goes to waiting for them: all of a tree's rows are found
//! and prefetched first, then read, so that their misses overlap.
//!
//! A leaf's U comes from the splits above it, and a split's feature takes the same place among
//! the path features of every leaf below it (places are given in path order, first split
//! first), so U is propagated down the tree once per vector, a mask per node, rather than
//! gathered again for every leaf. Everything of a tree sits in flat arrays read in order, so
//! the work is not lost to pointer chasing. Trees with a path of more than [`MAX_FEATURES`]
//! distinct features keep the recursive algorithm.

use super::Node;

/// The most distinct features on one path for which a tree gets tables: 64 · 6 numbers per
/// leaf, and 3^6 steps per leaf to build them.
pub const MAX_FEATURES: usize = 6;

/// A split, with the place its feature takes among the path features of the leaves below.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Split {
    node: u32,
    left: u32,
    right: u32,
    k: u8,
}

/// Where a leaf's parts are in the tree's arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LeafRef {
    node: u32,
    /// Its d path features start here.
    features: u32,
    d: u8,
    /// Its `2^d` rows of d shares start here.
    table: u32,
}

/// A tree's tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    /// Every split, in depth-first order: parents before children.
    splits: Vec<Split>,
    nodes: usize,
    leaves: Vec<LeafRef>,
    /// Vector indices of each leaf's path features.
    features: Vec<u32>,
    table: Vec<f64>,
}

/// What [`explain`] reuses from one call to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Per node, the path features the vector agrees with on the way to it.
    agree: Vec<u8>,
    /// Per leaf, where the row the vector reads starts.
    rows: Vec<u32>,
}

/// The tables of a tree, or `None` when a path has too many distinct features.
pub fn build(nodes: &[Node]) -> Option<Tables> {
    let mut t = Tables {
        splits: Vec::new(),
        nodes: nodes.len(),
        leaves: Vec::new(),
        features: Vec::new(),
        table: Vec::new(),
    };
    collect(nodes, 0, &mut Vec::new(), &mut t)?;
    t.table.shrink_to_fit();
    Some(t)
}

/// Walks to every leaf under node `i`, `path` holding the splits so far as (node, went left).
fn collect(nodes: &[Node], i: usize, path: &mut Vec<(u32, bool)>, t: &mut Tables) -> Option<()> {
    let n = &nodes[i];
    if n.is_leaf() {
        return leaf(nodes, path, n.value, t);
    }
    // Its feature's place among the distinct features of the path so far, which every leaf
    // below shares.
    let mut above: Vec<usize> = Vec::new();
    for &(j, _) in path.iter() {
        let f = nodes[j as usize].feature;
        if !above.contains(&f) {
            above.push(f);
        }
    }
    let k = above
        .iter()
        .position(|&f| f == n.feature)
        .unwrap_or(above.len());
    if k >= MAX_FEATURES {
        return None;
    }
    t.splits.push(Split {
        node: i as u32,
        left: n.left,
        right: n.right,
        k: k as u8,
    });
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
    }
    let d = features.len();
    if d > MAX_FEATURES {
        return None;
    }
    let table = t.table.len() as u32;
    for u in 0..1usize << d {
        for k in 0..d {
            t.table.push(share(v, &z, u, k));
        }
    }
    let node = match path.last() {
        Some(&(i, true)) => nodes[i as usize].left,
        Some(&(i, false)) => nodes[i as usize].right,
        None => 0,
    };
    t.leaves.push(LeafRef {
        node,
        features: t.features.len() as u32,
        d: d as u8,
        table,
    });
    t.features.extend(features);
    Some(())
}

/// Feature k's share of a leaf of value `v` and path fractions `z` for a vector that agrees
/// with the path features in `u`.
///
/// Computed as the releases before full tables computed it per vector, `v (1 − z_k)/z_k ·
/// A(U∖k)` and `−v · A(U)` (the shares' own formula only where a fraction is zero), so that
/// every bit is the same and a decision they recorded still replays identically.
pub(super) fn share(v: f64, z: &[f64], u: usize, k: usize) -> f64 {
    if z.contains(&0.0) {
        return if u >> k & 1 == 1 {
            v * (1.0 - z[k]) * sum_without(z, u & !(1 << k), k)
        } else {
            -v * z[k] * sum_without(z, u, k)
        };
    }
    let all = (1usize << z.len()) - 1;
    if u >> k & 1 == 1 {
        let coefficient = v * (1.0 - z[k]) / z[k];
        coefficient * subset_sum(z, u & !(1 << k), all)
    } else {
        -v * subset_sum(z, u, all)
    }
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

/// `Σ_{S⊆t} w(|S|) Π_{j∈F∖S∖k} z_j` for k not in t, without dividing by `z_k`.
fn sum_without(z: &[f64], t: usize, k: usize) -> f64 {
    subset_sum(z, t, ((1usize << z.len()) - 1) & !(1 << k))
}

/// `Σ_{S⊆t} w(|S|) Π_{j∈kept∖S} z_j`, subsets and products as bit masks over the path features.
pub(super) fn subset_sum(z: &[f64], t: usize, kept: usize) -> f64 {
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

/// Adds one tree's shares for a vector to `phi`; `goes_left(i)` says whether the vector goes
/// left at split i. Every leaf's row is located and prefetched first, then added, so that
/// the rows' cache misses overlap (a tree behind, so that they overlap work too, measured
/// no better).
///
/// Returns the node of the leaf the vector reaches: the one leaf it agrees with on every
/// path feature, so that the margin needs no second walk down the tree.
pub fn explain(
    t: &Tables,
    goes_left: impl FnMut(usize) -> bool,
    scratch: &mut Scratch,
    phi: &mut [f64],
) -> usize {
    let reached = locate(t, goes_left, &mut scratch.agree, &mut scratch.rows);
    accumulate(t, &scratch.rows, phi);
    reached
}

/// Finds the row each leaf of `t` gives the vector, into `rows`, and prefetches it; returns
/// the node of the leaf reached.
///
/// Which way a vector goes is data, not a pattern a branch predictor can learn, so neither
/// loop takes a branch on it: agreement is cleared bit by bit with masks, and a row found by
/// index.
fn locate(
    t: &Tables,
    mut goes_left: impl FnMut(usize) -> bool,
    agree: &mut Vec<u8>,
    rows: &mut Vec<u32>,
) -> usize {
    agree.clear();
    agree.resize(t.nodes, 0);
    agree[0] = u8::MAX;
    for s in &t.splits {
        let a = agree[s.node as usize];
        let left = u8::from(goes_left(s.node as usize));
        agree[s.left as usize] = a & !((1 - left) << s.k);
        agree[s.right as usize] = a & !(left << s.k);
    }
    rows.clear();
    let mut reached = 0;
    for leaf in &t.leaves {
        let d = usize::from(leaf.d);
        let all = (1 << d) - 1;
        let u = usize::from(agree[leaf.node as usize]) & all;
        let row = leaf.table as usize + u * d;
        prefetch(t.table.as_ptr().wrapping_add(row));
        rows.push(row as u32);
        // Every split on the way to any other leaf sends the vector elsewhere, which clears
        // the bit of its feature there.
        reached = if u == all { leaf.node } else { reached };
    }
    reached as usize
}

/// Adds the shares of the rows [`locate`] found to `phi`.
fn accumulate(t: &Tables, rows: &[u32], phi: &mut [f64]) {
    for (leaf, &row) in t.leaves.iter().zip(rows) {
        let d = usize::from(leaf.d);
        let at = leaf.features as usize;
        let row = row as usize;
        for (&f, share) in t.features[at..at + d].iter().zip(&t.table[row..row + d]) {
            phi[f as usize] += share;
        }
    }
}

/// Asks for the cache line at `p` without waiting for it.
#[cfg(target_arch = "x86_64")]
fn prefetch(p: *const f64) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: a prefetch is a hint that never faults nor reads into the program, whatever
    // the address (one past a table's end, for a one-leaf tree, included).
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_: *const f64) {}

/// The heap bytes of a tree's tables, for the memory of a loaded version.
pub fn heap_bytes(t: &Tables) -> usize {
    t.leaves.capacity() * std::mem::size_of::<LeafRef>()
        + t.splits.capacity() * std::mem::size_of::<Split>()
        + t.features.capacity() * std::mem::size_of::<u32>()
        + t.table.capacity() * std::mem::size_of::<f64>()
}
