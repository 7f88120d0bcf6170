//! Which request ids may have been recorded: a Bloom filter in front of the query view's
//! request index, so that the writer looks a new request id up on disk only when it may be a
//! retry (about 1 in 100 new ids, and every real retry).
//!
//! Written here rather than taken from a crate because it is forty lines and the writer needs
//! exactly this shape: filters added as it fills (a scalable Bloom filter: each new filter
//! twice the size of the one before), so that no rebuild ever stalls the acknowledgement
//! path. About 10 bits per id, 7 probes, ~1% false positives per filter.

use std::hash::{BuildHasher, Hasher};

const BITS_PER_ID: usize = 10;
const PROBES: u64 = 7;

struct Filter {
    bits: Vec<u64>,
    capacity: usize,
    len: usize,
}

impl Filter {
    fn new(capacity: usize) -> Filter {
        let words = (capacity * BITS_PER_ID).div_ceil(64).max(1);
        Filter {
            bits: vec![0; words],
            capacity,
            len: 0,
        }
    }
}

/// The bits an id with hash `h` sets in a filter of `words` words: double hashing
/// (Kirsch–Mitzenmacher), probe i at h1 + i·h2.
fn probes(words: usize, h: u64) -> impl Iterator<Item = (usize, u64)> {
    let n = words as u64 * 64;
    let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
    (0..PROBES).map(move |i| {
        let bit = (h1.wrapping_add(i.wrapping_mul(h2))) % n;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    })
}

/// The request ids seen, with false positives and no false negatives.
pub struct SeenIds {
    filters: Vec<Filter>,
    /// foldhash's quality variant: both halves of its 64 bits are the probes' two hashes,
    /// and it costs a fraction of SipHash per id on the acknowledgement path.
    hasher: foldhash::quality::RandomState,
}

impl SeenIds {
    /// Room for `expected` ids in the first filter (more are added as needed).
    pub fn new(expected: usize) -> SeenIds {
        SeenIds {
            filters: vec![Filter::new(expected.max(1 << 16))],
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    fn hash(&self, id: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(id.as_bytes());
        h.finish()
    }

    pub fn insert(&mut self, id: &str) {
        let h = self.hash(id);
        let last = self.filters.last().expect("a filter");
        if last.len >= last.capacity {
            let capacity = last.capacity * 2;
            self.filters.push(Filter::new(capacity));
        }
        let f = self.filters.last_mut().expect("a filter");
        for (word, mask) in probes(f.bits.len(), h) {
            f.bits[word] |= mask;
        }
        f.len += 1;
    }

    /// False: certainly never inserted. True: maybe.
    pub fn may_contain(&self, id: &str) -> bool {
        let h = self.hash(id);
        self.filters
            .iter()
            .any(|f| probes(f.bits.len(), h).all(|(word, mask)| f.bits[word] & mask != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives_as_it_grows() {
        let mut seen = SeenIds::new(1000);
        for i in 0..300_000 {
            seen.insert(&format!("req-{i}"));
        }
        assert!((0..300_000).all(|i| seen.may_contain(&format!("req-{i}"))));
        let false_positives = (0..100_000)
            .filter(|i| seen.may_contain(&format!("other-{i}")))
            .count();
        // Each of the filters contributes up to ~1%.
        assert!(false_positives < 4_000, "{false_positives}");
    }
}
