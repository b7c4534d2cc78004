//! CPython's `random.Random` (MT19937 seeded by `init_by_array`) for the calls
//! the split protocol makes: `Random(seed)`, `shuffle` and `sample`, draw for
//! draw. The reference splits in `../shared/eval/` were written by a Python
//! script with it; making the same draws lets `thaw split` write them byte for
//! byte. (Python 3.11's algorithms; `shuffle` and `sample` have been unchanged
//! since 3.2 and 3.11's removal of their `random` argument changed nothing
//! here.)

const N: usize = 624;
const M: usize = 397;

/// `random.Random(seed)` for a non-negative integer seed.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)`: the seed's 32-bit words, least significant
    /// first (at least one), through `init_by_array`.
    pub fn new(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                r.mt[0] = r.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                r.mt[0] = r.mt[N - 1];
                i = 1;
            }
        }
        r.mt[0] = 0x8000_0000;
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1] ^ (self.mt[i - 1] >> 30);
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev).wrapping_add(i as u32);
        }
        self.index = N;
    }

    /// `genrand_uint32`.
    fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & UPPER) | (self.mt[(k + 1) % N] & LOWER);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
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

    /// `getrandbits(k)` for `1 <= k <= 64`: 32-bit words from the least
    /// significant, the last one cut to the bits left.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!((1..=64).contains(&k), "getrandbits({k})");
        let mut out = 0u64;
        let mut left = k;
        let mut shift = 0;
        while left > 0 {
            let mut w = self.next_u32();
            if left < 32 {
                w >>= 32 - left;
            }
            out |= u64::from(w) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        out
    }

    /// `_randbelow(n)` (`_randbelow_with_getrandbits`), `n > 0`: draws of
    /// `n.bit_length()` bits until one is below `n`.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n > 0, "randbelow(0)");
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `shuffle(x)`: for `i` from the last index down to 1, swap `x[i]` with
    /// `x[randbelow(i + 1)]`.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            x.swap(i, j);
        }
    }

    /// `sample(population, k)`, in selection order: a shrinking pool when the
    /// population is small beside `k`, else repeated draws over the whole
    /// population skipping positions already taken (CPython's choice, which
    /// decides how many numbers are drawn).
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        let n = population.len();
        assert!(k <= n, "sample larger than population");
        let mut setsize: u64 = 21;
        if k > 5 {
            let e = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
            setsize = setsize.saturating_add(4u64.checked_pow(e).unwrap_or(u64::MAX));
        }
        let mut out = Vec::with_capacity(k);
        if n as u64 <= setsize {
            let mut pool = population.to_vec();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                out.push(pool[j].clone());
                pool[j] = pool[n - i - 1].clone();
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while !selected.insert(j) {
                    j = self.randbelow(n as u64) as usize;
                }
                out.push(population[j].clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3.11.7.

    #[test]
    fn words_match_cpython() {
        let mut r = PyRandom::new(2020);
        let w: Vec<u64> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(w, [2661459254, 2660693840, 749574286]);
        let mut r = PyRandom::new(0);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32)],
            [3626764237, 1654615998]
        );
        let mut r = PyRandom::new((1 << 40) + 5);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32)],
            [2166296868, 2220160828]
        );
        let mut r = PyRandom::new(u64::MAX);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32)],
            [93740670, 1068495656]
        );
        let mut r = PyRandom::new(7);
        assert_eq!(
            [r.getrandbits(40), r.getrandbits(64), r.getrandbits(1)],
            [1040772936760, 7283207964119141687, 1]
        );
    }

    #[test]
    fn randbelow_matches_cpython() {
        let mut r = PyRandom::new(7);
        let got: Vec<u64> = [1u64, 2, 3, 1000, (1 << 31) + 1, 1 << 32, (1 << 33) + 7]
            .iter()
            .map(|&n| r.randbelow(n))
            .collect();
        assert_eq!(got, [0, 0, 1, 666, 207388624, 2301595691, 2179419893]);
    }

    #[test]
    fn shuffle_and_sample_match_cpython() {
        let mut r = PyRandom::new(2020);
        let mut x: Vec<u32> = (0..20).collect();
        r.shuffle(&mut x);
        assert_eq!(
            x,
            [0, 11, 16, 4, 13, 12, 10, 3, 7, 1, 9, 2, 8, 6, 18, 15, 17, 14, 5, 19]
        );
        let mut r = PyRandom::new(2020);
        let pop50: Vec<u32> = (0..50).collect();
        let pop100: Vec<u32> = (0..100).collect();
        // 50 <= 21 + 4^3: the pool; 100 > 85: draws with rejection.
        assert_eq!(
            r.sample(&pop50, 10),
            [39, 49, 11, 42, 29, 28, 30, 23, 26, 34]
        );
        assert_eq!(
            r.sample(&pop100, 10),
            [20, 79, 11, 58, 30, 26, 52, 85, 77, 19]
        );
        assert!(r.sample(&pop50[..5], 0).is_empty());
        assert_eq!(r.sample(&pop50[..3], 3), [1, 2, 0]);
    }
}
