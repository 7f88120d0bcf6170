//! Which request ids may have been recorded: a Bloom filter in front of the query view's
//! request index, so that the writer looks a new request id up on disk only when it may be a
//! retry (about 1 in 100 new ids, and every real retry).
//!
//! Filters are added as it fills (a scalable Bloom filter: each new [`Bloom`] twice the size
//! of the one before), so that no rebuild ever stalls the acknowledgement path; ~1% false
//! positives per filter.

use std::hash::{BuildHasher, Hasher};

use super::bloom::Bloom;

struct Filter {
    bloom: Bloom,
    capacity: usize,
    len: usize,
}

impl Filter {
    fn new(capacity: usize) -> Filter {
        Filter {
            bloom: Bloom::with_capacity(capacity),
            capacity,
            len: 0,
        }
    }
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
        f.bloom.insert(h);
        f.len += 1;
    }

    /// False: certainly never inserted. True: maybe.
    pub fn may_contain(&self, id: &str) -> bool {
        let h = self.hash(id);
        self.filters.iter().any(|f| f.bloom.may_contain(h))
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
