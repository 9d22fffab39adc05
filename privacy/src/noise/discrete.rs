//! The discrete Gaussian N_Z(0, σ²) sampled exactly in integer arithmetic, after Canonne,
//! Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy" (Algorithms 1–3).
//!
//! Every probability the algorithm compares against is a ratio of integers held in `u128`;
//! no floating-point number is involved, so the output distribution is exactly the discrete
//! Gaussian whatever the rounding mode or the platform (Mironov 2012's attack on textbook
//! floating-point Laplace sampling has nothing to work with). Uniform integers come from
//! rejection sampling on whole random words, so they carry no modulo bias.
//!
//! σ² is an integer `S ≤ 2⁵²`. With it, every intermediate value fits in `u128` except in
//! events of probability below e^-4096 per draw (a discrete Laplace candidate beyond 2³⁸ at
//! scale t ≤ 2²⁶ + 1, or a Bernoulli loop index past 2²²). In those events the candidate is
//! rejected — the exact algorithm would reject it with probability above 1 − e^-4,000,000 —
//! so the output's total-variation distance from the exact discrete Gaussian is below
//! e^-4096 per coordinate: far below anything an adversary or a test can see, and below the
//! δ = 1e-300 that one could add for it.

use rand_core::Rng;

/// Largest supported σ² (so that `2·S·t²` and the squared deviations fit in `u128`).
pub const MAX_SIGMA_SQUARED: u64 = 1 << 52;

/// A sampler for the discrete Gaussian N_Z(0, S) with integer variance parameter S:
/// `P[X = x] ∝ exp(−x² / (2S))` for every integer x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    sigma_sq: u128,
    /// Scale of the discrete Laplace proposal: ⌊√S⌋ + 1.
    t: u128,
    /// Denominator of the acceptance exponent: 2·S·t².
    denominator: u128,
}

impl DiscreteGaussian {
    /// The sampler for N_Z(0, S); `None` unless `1 ≤ S ≤ 2⁵²`.
    pub fn new(sigma_squared: u64) -> Option<Self> {
        if sigma_squared == 0 || sigma_squared > MAX_SIGMA_SQUARED {
            return None;
        }
        let s = u128::from(sigma_squared);
        let t = u128::from(sigma_squared.isqrt()) + 1;
        Some(Self {
            sigma_sq: s,
            t,
            denominator: 2 * s * t * t,
        })
    }

    /// The variance parameter S.
    pub fn sigma_squared(&self) -> u64 {
        self.sigma_sq as u64
    }

    /// One draw (CKS20 Algorithm 3): propose Y from the discrete Laplace with scale t, accept
    /// with probability exp(−(|Y| − S/t)² / (2S)).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> i64 {
        loop {
            let y = discrete_laplace(rng, self.t);
            let magnitude = y.unsigned_abs() as u128;
            // (|Y| − S/t)² / (2S) = (|Y|·t − S)² / (2·S·t²)
            let Some(deviation) = magnitude
                .checked_mul(self.t)
                .map(|m| m.abs_diff(self.sigma_sq))
            else {
                continue;
            };
            let Some(numerator) = deviation.checked_mul(deviation) else {
                continue;
            };
            if bernoulli_exp_neg(rng, numerator, self.denominator) {
                return y;
            }
        }
    }
}

/// A uniform integer in `[0, n)` for n ≥ 1, by rejection on the smallest covering power of
/// two (at most two tries in expectation; no modulo bias).
#[inline]
pub(crate) fn uniform_below<R: Rng + ?Sized>(rng: &mut R, n: u128) -> u128 {
    debug_assert!(n > 0);
    if n == 1 {
        return 0;
    }
    let bits = 128 - (n - 1).leading_zeros();
    if bits <= 64 {
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        loop {
            let x = u128::from(rng.next_u64() & mask);
            if x < n {
                return x;
            }
        }
    }
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    loop {
        let x = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())) & mask;
        if x < n {
            return x;
        }
    }
}

/// Bernoulli(exp(−γ)) for γ = num/den ∈ [0, 1] (CKS20 Algorithm 1): draw A_k ~
/// Bernoulli(γ/k) for k = 1, 2, … until one is 0; return whether that k is odd.
#[inline]
fn bernoulli_exp_neg_unit<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    loop {
        // Past k = 2²² the product may overflow; reaching it has probability < 1/(2²²)!.
        let Some(dk) = den.checked_mul(k) else {
            return k % 2 == 1;
        };
        if uniform_below(rng, dk) >= num {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Bernoulli(exp(−γ)) for any γ = num/den ≥ 0 (CKS20 Algorithm 1, γ > 1 branch): ⌊γ⌋
/// independent Bernoulli(exp(−1)), all of which must be 1, then Bernoulli(exp(−(γ − ⌊γ⌋))).
#[inline]
pub(crate) fn bernoulli_exp_neg<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    debug_assert!(den > 0);
    // Most calls have γ < 8; avoid a 128-bit division for them.
    let (mut whole, mut rest) = (0u128, num);
    while rest >= den && whole < 8 {
        rest -= den;
        whole += 1;
    }
    if rest >= den {
        whole += rest / den;
        rest %= den;
    }
    for _ in 0..whole {
        if !bernoulli_exp_neg_unit(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp_neg_unit(rng, rest, den)
}

/// The discrete Laplace distribution with integer scale t ≥ 1, `P[X = x] ∝ exp(−|x|/t)`
/// (CKS20 Algorithm 2).
fn discrete_laplace<R: Rng + ?Sized>(rng: &mut R, t: u128) -> i64 {
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp_neg_unit(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_neg_unit(rng, 1, 1) {
            v += 1;
        }
        let x = t.saturating_mul(v).saturating_add(u);
        let negative = rng.next_u64() & 1 == 1;
        if negative && x == 0 {
            continue;
        }
        // |x| ≥ 2⁶³ has probability below exp(−2³⁷); such a draw is rejected downstream.
        let x = i64::try_from(x).unwrap_or(i64::MAX);
        return if negative { -x } else { x };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha20Rng;

    /// The exact pmf of N_Z(0, S) on [-m, m], normalised over a range wide enough that the
    /// rest is below 1e-30.
    fn pmf(s: f64, m: i64) -> Vec<f64> {
        let wide = (40.0 * s.sqrt()) as i64 + 10;
        let z: f64 = (-wide..=wide)
            .map(|x| (-(x * x) as f64 / (2.0 * s)).exp())
            .sum();
        (-m..=m)
            .map(|x| (-(x * x) as f64 / (2.0 * s)).exp() / z)
            .collect()
    }

    #[test]
    fn uniform_below_covers_its_range_without_bias() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[uniform_below(&mut rng, 6) as usize] += 1;
        }
        // Each count is Binomial(60000, 1/6): sd ≈ 91; allow 6 sd.
        for c in counts {
            assert!((c as i64 - 10_000).abs() < 550, "{counts:?}");
        }
        assert_eq!(uniform_below(&mut rng, 1), 0);
        let big = uniform_below(&mut rng, u128::MAX);
        assert!(big < u128::MAX);
    }

    #[test]
    fn bernoulli_exp_neg_has_probability_exp_minus_gamma() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for (num, den) in [(0u128, 1u128), (1, 2), (1, 1), (5, 2), (7, 3)] {
            let n = 200_000;
            let hits = (0..n)
                .filter(|_| bernoulli_exp_neg(&mut rng, num, den))
                .count();
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            let got = hits as f64 / n as f64;
            assert!(
                (got - p).abs() < 6.0 * sd + 1e-12,
                "γ={num}/{den}: {got} vs {p}"
            );
        }
    }

    #[test]
    fn sampler_rejects_out_of_range_variance() {
        assert!(DiscreteGaussian::new(0).is_none());
        assert!(DiscreteGaussian::new(MAX_SIGMA_SQUARED + 1).is_none());
        assert!(DiscreteGaussian::new(MAX_SIGMA_SQUARED).is_some());
    }

    #[test]
    fn small_variance_histogram_matches_the_exact_pmf_by_chi_square() {
        // Pearson's χ² over the cells with expected count ≥ 5, tail cells pooled.
        for s in [1u64, 3, 10, 50] {
            let g = DiscreteGaussian::new(s).unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(s);
            let n = 100_000usize;
            let m = (6.0 * (s as f64).sqrt()) as i64 + 1;
            let p = pmf(s as f64, m);
            let mut counts = vec![0usize; p.len() + 1];
            for _ in 0..n {
                let x = g.sample(&mut rng);
                if x.abs() <= m {
                    counts[(x + m) as usize] += 1;
                } else {
                    *counts.last_mut().unwrap() += 1;
                }
            }
            let mut chi2 = 0.0;
            let mut cells = 0;
            let (mut pooled_obs, mut pooled_exp) = (
                counts[p.len()] as f64,
                n as f64 * (1.0 - p.iter().sum::<f64>()),
            );
            for (i, pi) in p.iter().enumerate() {
                let e = pi * n as f64;
                if e >= 5.0 {
                    chi2 += (counts[i] as f64 - e).powi(2) / e;
                    cells += 1;
                } else {
                    pooled_obs += counts[i] as f64;
                    pooled_exp += e;
                }
            }
            if pooled_exp >= 5.0 {
                chi2 += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
                cells += 1;
            }
            // χ² with k−1 dof: mean k−1, sd √(2(k−1)); 8 sd is far beyond chance.
            let dof = (cells - 1) as f64;
            assert!(
                chi2 < dof + 8.0 * (2.0 * dof).sqrt(),
                "S={s}: χ²={chi2} over {dof} dof"
            );
        }
    }

    #[test]
    fn production_scale_has_the_stated_variance_and_no_bias() {
        let g = DiscreteGaussian::new(MAX_SIGMA_SQUARED).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let n = 100_000;
        let s2 = MAX_SIGMA_SQUARED as f64;
        let xs: Vec<f64> = (0..n).map(|_| g.sample(&mut rng) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // sd of the mean: σ/√n; of the variance: σ²·√(2/n) ≈ 0.45 %. Allow 6 sd.
        assert!(
            mean.abs() < 6.0 * s2.sqrt() / (n as f64).sqrt(),
            "mean {mean}"
        );
        assert!(
            (var / s2 - 1.0).abs() < 6.0 * (2.0 / n as f64).sqrt(),
            "var ratio {}",
            var / s2
        );
    }
}
