//! Python's `random.Random` as far as AlpacaEval uses it, bit for bit: seeding from a string
//! (version 2: the UTF-8 bytes followed by their SHA-512, read as one big-endian integer, fed to
//! MT19937's `init_by_array` in 32-bit words, least significant first), `random()` (53 bits
//! from two 32-bit draws) and `choices(population)` with `k = 1` (`population[floor(random() *
//! n)]`).
//!
//! AlpacaEval 2.0 shows the two outputs of a prompt to its judge in an order drawn so:
//! `random.Random("is_switched_outputs" + instruction + "0").choices([False, True])[0]`
//! ([`alpaca_eval_switched`]): its `RandomSwitchTwoColumnsProcessor` seeded with the
//! annotator's seed, 0 by default (the processor's own default, 123, is overridden by the
//! `PairwiseAnnotator` that builds it). Reproducing it exactly is what lets tsr's annotations
//! be compared one for one with alpaca_eval's; the request bodies alpaca_eval sends are
//! recorded by `scripts/alpaca_request_golden.py` and compared in `steps/tests`. Checked against CPython on many instructions,
//! non-ASCII included, by `scripts/py_random_golden.py` (fixture
//! `tests/fixtures/eval/py-random.json`).

use sha2::{Digest as _, Sha512};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random` generator (MT19937).
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a `str` seed.
    pub fn from_str_seed(seed: &str) -> PyRandom {
        let bytes = seed.as_bytes();
        let mut all = bytes.to_vec();
        all.extend_from_slice(&Sha512::digest(bytes));
        // The big-endian integer of `all`, as 32-bit words from the least significant one.
        // Leading zero bytes do not count (CPython uses as many words as the integer needs).
        let mut words: Vec<u32> = all
            .rchunks(4)
            .map(|c| c.iter().fold(0u32, |w, b| (w << 8) | *b as u32))
            .collect();
        while words.len() > 1 && words.last() == Some(&0) {
            words.pop();
        }
        let mut r = PyRandom::init_genrand(19_650_218);
        r.init_by_array(&words);
        r
    }

    fn init_genrand(s: u32) -> PyRandom {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        PyRandom { mt, index: N }
    }

    fn init_by_array(&mut self, key: &[u32]) {
        let mt = &mut self.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        self.index = N;
    }

    /// The next 32 random bits (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            let mt = &mut self.mt;
            for k in 0..N {
                let y = (mt[k] & UPPER_MASK) | (mt[(k + 1) % N] & LOWER_MASK);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                mt[k] = mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random()`: a float in [0, 1) with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `choices(population)[0]` (no weights, `k = 1`).
    pub fn choice<'a, T>(&mut self, population: &'a [T]) -> &'a T {
        let n = population.len() as f64;
        &population[(self.random() * n).floor() as usize]
    }
}

/// Whether AlpacaEval 2.0 shows the two outputs for `instruction` switched (the model's output
/// first): its `RandomSwitchTwoColumnsProcessor` with seed column `instruction`, switch column
/// `is_switched_outputs` and the annotator's default seed, 0.
pub fn alpaca_eval_switched(instruction: &str) -> bool {
    let seed = format!("is_switched_outputs{instruction}0");
    *PyRandom::from_str_seed(&seed).choice(&[false, true])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11 on this machine (`random.Random("tsr").random()`, and the
    /// first `getrandbits(32)` of `random.Random("")`); the broad check against Python is the
    /// fixture test in `tests/eval.rs`.
    #[test]
    fn known_values_from_cpython() {
        let mut r = PyRandom::from_str_seed("tsr");
        assert_eq!(r.random(), TSR_RANDOM);
        let mut r = PyRandom::from_str_seed("");
        assert_eq!(r.next_u32(), EMPTY_U32);
    }

    const TSR_RANDOM: f64 = 0.31708125102305007;
    const EMPTY_U32: u32 = 4_124_137_760;
}
