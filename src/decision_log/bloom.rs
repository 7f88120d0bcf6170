//! A Bloom filter over 64-bit hashes: the writer's filter of request ids seen
//! ([`super::seen`]) and the view's filters of customers per span
//! ([`super::customer_filter`]) are both this.
//!
//! Written here rather than taken from a crate because it is thirty lines, and the customer
//! filters are stored in the view, so their bit layout must stay as it is across releases
//! (a crate's may change with its version). About 10 bits per key and 7 probes: ~1% false
//! positives at capacity.

/// Bits per key at capacity.
const BITS_PER_KEY: usize = 10;
/// Bits set per key.
const PROBES: u64 = 7;
/// The first byte of a stored filter: the layout below (little-endian words).
const FORMAT: u8 = 1;

/// Keys (as hashes) with false positives and no false negatives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    /// An empty filter sized for `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Bloom {
        Bloom {
            bits: vec![0; (capacity * BITS_PER_KEY).div_ceil(64).max(1)],
        }
    }

    /// The bits a key with hash `h` sets: double hashing (Kirsch–Mitzenmacher), probe i at
    /// h1 + i·h2, so both halves of `h` must be well mixed.
    fn probes(&self, h: u64) -> impl Iterator<Item = (usize, u64)> + use<> {
        let n = self.bits.len() as u64 * 64;
        let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
        (0..PROBES).map(move |i| {
            let bit = (h1.wrapping_add(i.wrapping_mul(h2))) % n;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    pub fn insert(&mut self, h: u64) {
        for (word, mask) in self.probes(h) {
            self.bits[word] |= mask;
        }
    }

    /// False: certainly never inserted. True: maybe.
    pub fn may_contain(&self, h: u64) -> bool {
        self.probes(h)
            .all(|(word, mask)| self.bits[word] & mask != 0)
    }

    /// The stored form: [`FORMAT`], then the words, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.bits.len() * 8);
        out.push(FORMAT);
        for w in &self.bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// A stored filter, or None if `bytes` is not one this release wrote.
    pub fn from_bytes(bytes: &[u8]) -> Option<Bloom> {
        let (&format, words) = bytes.split_first()?;
        if format != FORMAT || words.is_empty() || words.len() % 8 != 0 {
            return None;
        }
        let bits = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        Some(Bloom { bits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64's finalizer: well-mixed hashes of consecutive integers.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn no_false_negatives_and_about_one_percent_false_positives_at_capacity() {
        let mut f = Bloom::with_capacity(50_000);
        for i in 0..50_000 {
            f.insert(mix(i));
        }
        assert!((0..50_000).all(|i| f.may_contain(mix(i))));
        let false_positives = (1_000_000..1_100_000)
            .filter(|&i| f.may_contain(mix(i)))
            .count();
        assert!(
            (300..2_000).contains(&false_positives),
            "{false_positives} in 100,000"
        );
    }

    #[test]
    fn a_stored_filter_reads_back_the_same_and_a_damaged_one_not_at_all() {
        let mut f = Bloom::with_capacity(1_000);
        for i in 0..1_000 {
            f.insert(mix(i));
        }
        let bytes = f.to_bytes();
        assert_eq!(Bloom::from_bytes(&bytes), Some(f));
        assert_eq!(Bloom::from_bytes(&bytes[..bytes.len() - 1]), None);
        assert_eq!(Bloom::from_bytes(&bytes[..1]), None);
        assert_eq!(Bloom::from_bytes(&[]), None);
        let mut other = bytes.clone();
        other[0] = FORMAT + 1;
        assert_eq!(Bloom::from_bytes(&other), None);
    }
}
