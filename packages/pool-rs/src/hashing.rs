//! A multiplicative hasher for the ledger's maps.
//!
//! Their keys are small integers the ledger chose itself (buffer ids, bucket keys), never input an
//! adversary controls, so SipHash's flooding resistance buys nothing and its cost was a third of an
//! acquire+release pair. This is the Fx hash (rustc's): rotate, xor, multiply per word.

use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Clone, Copy, Default)]
pub struct IdHasher(u64);

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdBuildHasher = BuildHasherDefault<IdHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn distinct_ids_hash_apart() {
        let build = IdBuildHasher::default();
        let hashes: std::collections::HashSet<u64> =
            (0..10_000u64).map(|id| build.hash_one(id)).collect();
        assert_eq!(hashes.len(), 10_000);
    }
}
