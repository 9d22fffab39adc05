//! A 512-layer ziggurat for the standard normal, drawing one `u64` per sample on the fast
//! path; used by [`super::SimulationSampler`] only (never for real releases).
//!
//! # Algorithm (Marsaglia & Tsang 2000, with Doornik 2005's independent bits)
//! Cover the half density f(x) = exp(−x²/2) (unnormalised) with 512 regions of equal area
//! v: a base strip (the rectangle [0, r] × [0, f(r)] plus the tail x > r) and 511
//! rectangles [0, xᵢ] × [f(xᵢ), f(xᵢ₊₁)] stacked on it, with x₁ = r, x₅₁₂ = 0 and
//! `x₀ = v/f(r)` the width the base strip would have as a rectangle. Each sample takes one
//! word from the RNG and splits it into disjoint fields, so layer, sign and uniform are
//! independent (the correlation Doornik found in the original came from sharing bits):
//!
//! - bits 63..55: the layer i (uniform over the 512 equal-area layers);
//! - bit 54: the sign s (bit 53 is unused);
//! - bits 52..0: an integer u uniform on [0, 2⁵³); the magnitude is |x| = u · xᵢ/2⁵³.
//!
//! If |x| < xᵢ₊₁ (tested on the integer: u < ⌊2⁵³·xᵢ₊₁/xᵢ⌋) the point lies in the part of
//! the layer wholly under the curve and x is returned: the fast path, taken by 99.2% of
//! words. Otherwise, in layer 0 the sample comes from the tail |x| > r by Marsaglia's
//! (1964) exact method (a = −ln U₁/r, b = −ln U₂, accept r + a when 2b > a²; 94% of pairs
//! are accepted); in the other layers a height y uniform on [f(xᵢ), f(xᵢ₊₁)) is drawn and x
//! is kept if y < f(|x|) (the wedge test), and a rejected point restarts with a fresh word.
//! Every point under the curve is in exactly one layer, so the output is exactly N(0, 1)
//! up to the precision of the tables, of f64 arithmetic and of the 2⁻⁵³ uniform grid.
//! Misclassifying a grid point at a rectangle edge, as ⌊·⌋ may, only sends it to the wedge
//! test, which accepts it.
//!
//! The wedge test first compares y with the layer's chord (McFarland 2016): f is concave
//! below x = 1 and convex above, and lies within a precomputed interpolation-error bound of
//! the chord, so about 99% of wedge points are accepted or rejected without `exp`. Those
//! shortcuts take exactly the decision `y < f(|x|)` would (a test checks it point by point).
//! 512 layers rather than 256 halve the words that leave the fast path (0.8% instead of
//! 1.5%), which measured 10% faster overall; the fast-path tables are 16 KiB.
//!
//! # Constants
//! r = 3.852046150368391 is the tail start for 512 layers: the double found by bisection on
//! the closure of the top layer, x₅₁₁(1 − f(x₅₁₁)) = v, with the same `libm` arithmetic as
//! [`Ziggurat::build`] (the same bisection for 256 layers lands on Marsaglia & Tsang's
//! 3.6541528853610088, as a check). The layer area is v = r·f(r) + √(π/2)·erfc(r/√2)
//! ≈ 2.456766351541e-3, and the edges follow from xᵢ₊₁ = f⁻¹(f(xᵢ) + v/xᵢ). With this r
//! the top layer's area matches v to a relative 9e-13, a total mass error near 2e-15 (the
//! tests check every layer's area to 2e-12).
//!
//! The tables are built once, on first use, behind a [`LazyLock`] (one atomic load per
//! batch afterwards); `exp`, `ln` and `erfc` come from `libm`, pure Rust ports of musl, so
//! they, and therefore the tables and every sample, are the same bits on every platform.
//! Nothing here uses SIMD-dependent or fused multiply-add arithmetic (Rust never contracts
//! `a*b + c` on its own); the one exception is 32-bit x86 without SSE2, whose x87 floats
//! are not reproducible for any code.
//!
//! # Cost
//! The fast path is about a dozen instructions beside the generator's own; measurements are
//! in the `SimulationSampler` docs of the parent module.

use std::sync::LazyLock;

use rand_core::Rng;

/// The number of layers: nine bits of each word pick a layer.
const LAYERS: usize = 512;
/// r: where the tail starts, x₁ (see the module docs for where it comes from).
const TAIL_START: f64 = 3.852_046_150_368_391;
/// The top ten bits of a word pick the layer (nine bits) and the sign (one bit).
const INDEX_SHIFT: u32 = 54;
/// The uniform in each word is an integer on [0, 2⁵³).
const UNIFORM_MASK: u64 = (1 << 53) - 1;
/// 2⁻⁵³, exactly.
const ULP_53: f64 = 1.0 / (1u64 << 53) as f64;
/// A batch of [`Ziggurat::apply_samples`]: small enough for its slow-path index list to sit on the
/// stack, large enough that the per-batch work is negligible.
const BATCH: usize = 256;

/// The unnormalised half density exp(−x²/2).
#[inline]
fn density(x: f64) -> f64 {
    libm::exp(-0.5 * x * x)
}

/// A uniform on [0, 1) with 53 random bits.
#[inline]
fn unit_closed_open(word: u64) -> f64 {
    (word >> 11) as f64 * ULP_53
}

/// A uniform on (0, 1] with 53 random bits, safe to take the logarithm of.
#[inline]
fn unit_open_closed(word: u64) -> f64 {
    ((word >> 11) + 1) as f64 * ULP_53
}

/// The ziggurat's tables; get the shared instance with [`Ziggurat::get`].
///
/// The fast-path tables are indexed by the top ten bits of a word, j = 2i + s for layer i
/// and sign bit s, so the sign costs nothing: `scale[j]` is ±xᵢ/2⁵³.
#[derive(Debug)]
pub(crate) struct Ziggurat {
    /// ⌊2⁵³·xᵢ₊₁/xᵢ⌋ at j = 2i + s: uniforms below it land wholly under the curve.
    accept_below: [u64; 2 * LAYERS],
    /// ±xᵢ/2⁵³ at j = 2i + s: turns the integer uniform into the signed sample.
    scale: [f64; 2 * LAYERS],
    /// What the wedge test of layer i needs (entry 0 is unused: layer 0 has a tail instead).
    wedges: [Wedge; LAYERS],
}

/// Whether f is concave or convex over a layer's x-range: f'' = (x² − 1)·f changes sign at
/// x = 1, so only the layer that straddles 1 is neither.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    /// Above its chord: a point below the chord is under the curve.
    Concave,
    /// Below its chord: a point above the chord is over the curve.
    Convex,
    /// Straddles the inflection point x = 1: always evaluate f.
    Inflection,
}

/// Layer i's wedge [xᵢ₊₁, xᵢ] × [f(xᵢ), f(xᵢ₊₁)], with heights measured in units of the
/// layer from f(xᵢ). The chord from (xᵢ, 0) to (xᵢ₊₁, 1) lies within `slack` of the curve,
/// so most wedge points are decided against the chord without computing exp (McFarland
/// 2016 uses the same idea); only points within `slack` of the chord evaluate f.
#[derive(Clone, Copy, Debug)]
struct Wedge {
    /// xᵢ.
    outer: f64,
    /// 1/(xᵢ − xᵢ₊₁).
    inv_width: f64,
    /// f(xᵢ).
    low: f64,
    /// f(xᵢ₊₁) − f(xᵢ).
    height: f64,
    shape: Shape,
    /// A bound on |f − chord| over the layer, in units of `height`, plus [`CHORD_MARGIN`].
    slack: f64,
}

/// Room left around the chord for the rounding of the chord test (whose relative error is
/// a few 2⁻⁵³), so that every decision taken without f is the one f would take.
const CHORD_MARGIN: f64 = 1e-9;

impl Wedge {
    /// The wedge of the layer between edges `outer` = xᵢ and `inner` = xᵢ₊₁ < xᵢ.
    fn new(outer: f64, inner: f64) -> Self {
        let (low, high) = (density(outer), density(inner));
        let width = outer - inner;
        // Linear interpolation error: |f − chord| ≤ width²/8 · max|f''| on the layer, and
        // |f''| = |x² − 1|·f is monotone between its extremes at 0 and √3 (where it is
        // 2e^(−3/2)), so its maximum is at an edge or at √3.
        let curvature = |x: f64| ((x * x - 1.0) * density(x)).abs();
        let sqrt3 = 3.0f64.sqrt();
        let mut max_curvature = curvature(inner).max(curvature(outer));
        if inner <= sqrt3 && sqrt3 <= outer {
            max_curvature = max_curvature.max(2.0 * libm::exp(-1.5));
        }
        let slack = width * width / 8.0 * max_curvature / (high - low);
        Self {
            outer,
            inv_width: 1.0 / width,
            low,
            height: high - low,
            shape: if inner >= 1.0 {
                Shape::Convex
            } else if outer <= 1.0 {
                Shape::Concave
            } else {
                Shape::Inflection
            },
            slack: slack * (1.0 + 1e-6) + CHORD_MARGIN,
        }
    }

    /// Whether the point (x, f(xᵢ) + v·height) of this wedge lies under the curve.
    #[inline]
    fn under_curve(&self, x: f64, v: f64) -> bool {
        // The chord's height at x, in the same units as v.
        let chord = (self.outer - x) * self.inv_width;
        match self.shape {
            Shape::Concave if v < chord - CHORD_MARGIN => true,
            Shape::Concave if v >= chord + self.slack => false,
            Shape::Convex if v >= chord + CHORD_MARGIN => false,
            Shape::Convex if v < chord - self.slack => true,
            _ => self.low + v * self.height < density(x),
        }
    }
}

static TABLES: LazyLock<Ziggurat> = LazyLock::new(Ziggurat::build);

impl Ziggurat {
    /// The tables, built on first use.
    pub(crate) fn get() -> &'static Self {
        &TABLES
    }

    /// The layer area v and the edges xᵢ for i = 0..=512 (x₀ = v/f(r), x₁ = r, x₅₁₂ = 0).
    fn area_and_edges() -> (f64, [f64; LAYERS + 1]) {
        let r = TAIL_START;
        let area = r * density(r)
            + (std::f64::consts::PI / 2.0).sqrt() * libm::erfc(r / std::f64::consts::SQRT_2);
        let mut edges = [0.0; LAYERS + 1];
        edges[0] = area / density(r);
        edges[1] = r;
        for i in 1..LAYERS - 1 {
            edges[i + 1] = (-2.0 * libm::log(area / edges[i] + density(edges[i]))).sqrt();
        }
        edges[LAYERS] = 0.0;
        (area, edges)
    }

    fn build() -> Self {
        let (_, edges) = Self::area_and_edges();
        let mut wedges = [Wedge::new(1.0, 0.0); LAYERS];
        for (i, wedge) in wedges.iter_mut().enumerate().skip(1) {
            *wedge = Wedge::new(edges[i], edges[i + 1]);
        }
        let mut accept_below = [0; 2 * LAYERS];
        let mut scale = [0.0; 2 * LAYERS];
        for j in 0..2 * LAYERS {
            let (i, negative) = (j >> 1, j & 1 == 1);
            accept_below[j] = (edges[i + 1] / edges[i] * (1u64 << 53) as f64) as u64;
            scale[j] = if negative { -edges[i] } else { edges[i] } * ULP_53;
        }
        Self {
            accept_below,
            scale,
            wedges,
        }
    }

    /// Calls `apply(value, z)` once for each value, with independent standard normal z.
    ///
    /// The fast path writes through `apply` at once; a word that misses it is kept with its
    /// position and finished after the batch, so the inner loop makes no call and the RNG
    /// state stays in registers. Positions are therefore visited out of order: `apply` must
    /// depend only on its value and z. The result is deterministic for a seed.
    #[inline(always)]
    pub(crate) fn apply_samples<R, F>(&self, rng: &mut R, values: &mut [f64], mut apply: F)
    where
        R: Rng + ?Sized,
        F: FnMut(&mut f64, f64),
    {
        let mut slow_positions = [0u16; BATCH];
        let mut slow_words = [0u64; BATCH];
        for batch in values.chunks_mut(BATCH) {
            let mut count = 0;
            for (position, value) in batch.iter_mut().enumerate() {
                let word = rng.next_u64();
                let j = (word >> INDEX_SHIFT) as usize;
                let u = word & UNIFORM_MASK;
                if u < self.accept_below[j] {
                    apply(value, u as f64 * self.scale[j]);
                } else {
                    // Keep the word: the slow path must continue from it, since restarting
                    // would drop the wedge and tail mass this word stands for.
                    slow_positions[count] = position as u16;
                    slow_words[count] = word;
                    count += 1;
                }
            }
            for (&position, &word) in slow_positions[..count].iter().zip(&slow_words[..count]) {
                let z = self.finish(rng, word);
                apply(&mut batch[usize::from(position)], z);
            }
        }
    }

    /// The rest of a sample whose first word missed the fast path.
    #[cold]
    #[inline(never)]
    fn finish<R: Rng + ?Sized>(&self, rng: &mut R, mut word: u64) -> f64 {
        loop {
            let j = (word >> INDEX_SHIFT) as usize;
            let (i, negative) = (j >> 1, j & 1 == 1);
            let u = word & UNIFORM_MASK;
            if u < self.accept_below[j] {
                return u as f64 * self.scale[j];
            }
            let magnitude = if i == 0 {
                Some(self.tail(rng))
            } else {
                let x = u as f64 * self.scale[2 * i];
                let v = unit_closed_open(rng.next_u64());
                self.wedges[i].under_curve(x, v).then_some(x)
            };
            if let Some(magnitude) = magnitude {
                return if negative { -magnitude } else { magnitude };
            }
            word = rng.next_u64();
        }
    }

    /// A sample of |X| conditioned on |X| > r, by Marsaglia's (1964) exponential
    /// rejection: exact, accepting about 93% of pairs at this r.
    fn tail<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        loop {
            let a = -libm::log(unit_open_closed(rng.next_u64())) / TAIL_START;
            let b = -libm::log(unit_open_closed(rng.next_u64()));
            if b + b > a * a {
                return TAIL_START + a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::Xoshiro256PlusPlus;

    /// Standard normal CDF via `libm::erfc` (the FreeBSD msun algorithm, error below
    /// 1 ulp), accurate to about 1e-16 relative.
    fn normal_cdf(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// P(|X| > t) for X ~ N(0, 1).
    fn two_sided_tail(t: f64) -> f64 {
        libm::erfc(t / std::f64::consts::SQRT_2)
    }

    fn draws(seed: u64, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; n];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        Ziggurat::get().apply_samples(&mut rng, &mut out, |v, z| *v = z);
        out
    }

    /// Kolmogorov–Smirnov statistic √n·D of `samples` against `cdf`.
    fn ks_statistic(mut samples: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
        samples.sort_unstable_by(f64::total_cmp);
        let n = samples.len() as f64;
        let d = samples
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let p = cdf(x);
                (p - i as f64 / n).max((i + 1) as f64 / n - p)
            })
            .fold(0.0, f64::max);
        n.sqrt() * d
    }

    /// √n·D exceeds 1.95 with probability 0.001 under the null (Kolmogorov distribution).
    const KS_CRITICAL_0_001: f64 = 1.95;
    /// Moment and frequency checks allow this many standard errors (two-sided p ≈ 6e-7 for
    /// a normal statistic); the seeds are fixed, so the tests are deterministic.
    const STANDARD_ERRORS: f64 = 5.0;

    #[test]
    fn every_layer_has_the_same_area_and_the_top_layer_closes() {
        let z = Ziggurat::get();
        let (v, edges) = Ziggurat::area_and_edges();
        assert!((v - 2.456_766_351_541e-3).abs() < 1e-15, "v = {v}");
        assert_eq!(edges[1], TAIL_START);
        // The base strip as a rectangle of width x₀.
        assert!((edges[0] * density(TAIL_START) - v).abs() <= 1e-15 * v);
        for i in 1..LAYERS {
            let layer_area = edges[i] * z.wedges[i].height;
            assert!(
                (layer_area - v).abs() <= 2e-12 * v,
                "layer {i}: area {layer_area} vs {v}"
            );
            assert!(edges[i + 1] < edges[i]);
        }
        assert_eq!(z.wedges[LAYERS - 1].low + z.wedges[LAYERS - 1].height, 1.0);
    }

    #[test]
    fn the_chord_shortcuts_decide_every_wedge_point_as_the_density_does() {
        let z = Ziggurat::get();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let mut without_exp = 0;
        let per_layer = 4000;
        for (i, wedge) in z.wedges.iter().enumerate().skip(1) {
            let inner = wedge.outer - 1.0 / wedge.inv_width;
            for _ in 0..per_layer {
                let x = inner + unit_closed_open(rng.next_u64()) / wedge.inv_width;
                let v = unit_closed_open(rng.next_u64());
                let exact = wedge.low + v * wedge.height < density(x);
                assert_eq!(
                    wedge.under_curve(x, v),
                    exact,
                    "layer {i}: x = {x}, v = {v}"
                );
                let chord = (wedge.outer - x) * wedge.inv_width;
                if wedge.shape != Shape::Inflection && (v - chord).abs() > wedge.slack {
                    without_exp += 1;
                }
            }
        }
        // Most wedge points are decided without exp (it is what makes the slow path cheap).
        let share = without_exp as f64 / (per_layer * (LAYERS - 1)) as f64;
        assert!(share > 0.9, "only {share} of wedge points avoided exp");
    }

    #[test]
    fn mean_variance_skewness_and_kurtosis_are_within_their_standard_errors() {
        for seed in [1, 2] {
            let n = 1 << 22;
            let x = draws(seed, n);
            let nf = n as f64;
            let mean = x.iter().sum::<f64>() / nf;
            let central = |k: i32| x.iter().map(|&v| (v - mean).powi(k)).sum::<f64>() / nf;
            let (m2, m3, m4) = (central(2), central(3), central(4));
            let skewness = m3 / m2.powf(1.5);
            let excess_kurtosis = m4 / (m2 * m2) - 3.0;
            // Standard errors for normal data: 1/√n, √(2/n), √(6/n), √(24/n).
            let checks = [
                ("mean", mean, 0.0, (1.0 / nf).sqrt()),
                ("variance", m2, 1.0, (2.0 / nf).sqrt()),
                ("skewness", skewness, 0.0, (6.0 / nf).sqrt()),
                ("excess kurtosis", excess_kurtosis, 0.0, (24.0 / nf).sqrt()),
            ];
            for (name, value, expected, se) in checks {
                assert!(
                    (value - expected).abs() < STANDARD_ERRORS * se,
                    "seed {seed}: {name} = {value}, expected {expected} ± {se}"
                );
            }
        }
    }

    #[test]
    fn kolmogorov_smirnov_accepts_the_normal_cdf() {
        for seed in [3, 4] {
            let ks = ks_statistic(draws(seed, 1 << 21), normal_cdf);
            assert!(ks < KS_CRITICAL_0_001, "seed {seed}: √n·D = {ks}");
        }
    }

    #[test]
    fn kolmogorov_smirnov_accepts_the_tail_sampler() {
        let z = Ziggurat::get();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let beyond_r = two_sided_tail(TAIL_START);
        let tail: Vec<f64> = (0..1 << 20).map(|_| z.tail(&mut rng)).collect();
        assert!(tail.iter().all(|&x| x > TAIL_START));
        // P(|X| ≤ x | |X| > r).
        let ks = ks_statistic(tail, |x| 1.0 - two_sided_tail(x) / beyond_r);
        assert!(ks < KS_CRITICAL_0_001, "tail: √n·D = {ks}");
    }

    #[test]
    fn tail_frequencies_match_the_exact_probabilities() {
        let n = 1 << 24;
        let x = draws(6, n);
        let nf = n as f64;
        for t in [1.0, 2.0, 3.0, TAIL_START, 4.0, 5.0] {
            let p = two_sided_tail(t);
            let count = x.iter().filter(|v| v.abs() > t).count() as f64;
            let se = (nf * p * (1.0 - p)).sqrt();
            assert!(
                (count - nf * p).abs() < STANDARD_ERRORS * se,
                "|x| > {t}: {count} draws, expected {} ± {se}",
                nf * p
            );
        }
        // The sign is independent of the magnitude, in the tail too.
        let positive = x.iter().filter(|&&v| v > TAIL_START).count() as f64;
        let beyond = x.iter().filter(|v| v.abs() > TAIL_START).count() as f64;
        assert!((positive - beyond / 2.0).abs() < STANDARD_ERRORS * beyond.sqrt() / 2.0);
    }

    #[test]
    fn the_same_seed_gives_the_same_bits_and_these_bits() {
        assert_eq!(draws(7, 10_000), draws(7, 10_000));
        assert_ne!(draws(7, 100), draws(8, 100));
        // A fingerprint of the first 100,000 values (FNV-1a over their bits), so that a
        // change of platform, rand version or table arithmetic cannot go unnoticed.
        let fingerprint = draws(7, 100_000)
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
                (h ^ v.to_bits()).wrapping_mul(0x0000_0100_0000_01b3)
            });
        assert_eq!(fingerprint, 15_373_983_862_189_406_653);
    }
}
