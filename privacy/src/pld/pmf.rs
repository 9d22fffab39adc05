//! One direction of a discretised privacy loss distribution: probability masses on the grid
//! `{k·Δ}` plus a mass at +∞, and the operations the accountant needs on it.
//!
//! # What is kept, and why it stays an upper bound
//! A [`LossPmf`] stands for the privacy loss L = ln(P(o)/Q(o)), o ∼ P, of a pair (P, Q). Its
//! hockey-stick divergence is `δ(ε) = m_∞ + Σ_k p_k (1 − e^{ε − kΔ})₊`. Every operation here
//! may only *raise* δ(ε) for every ε:
//! - **truncating tails**: mass below the kept range is moved up to its first point, mass above
//!   it goes to +∞ (both raise the loss, and δ is the expectation of a non-decreasing function
//!   of the loss with values in [0, 1]);
//! - **FFT self-composition** works on a window chosen by a Chernoff bound; the mass the
//!   window misses (at most `tail` on each side) is added to m_∞, and what wraps around the
//!   circular convolution only adds mass inside the window;
//! - rounding noise of the FFT that comes out negative is set to 0 (raising mass).
//!
//! Composition is convolution of the finite parts; +∞ absorbs everything it meets.
//! Floating-point rounding in the FFT itself (about 1e-16 of the largest mass per entry) is
//! not bounded pessimistically; it sits far below the δ values anyone asks for (≥ 1e-13).

use std::sync::Arc;

use realfft::RealFftPlanner;
use realfft::num_complex::Complex;

/// One direction of a discrete privacy loss distribution on the grid `{k·Δ : k ∈ ℤ}`.
#[derive(Clone, Debug, PartialEq)]
pub struct LossPmf {
    interval: f64,
    /// Grid index of `probs[0]`.
    offset: i64,
    probs: Vec<f64>,
    infinity_mass: f64,
}

impl LossPmf {
    /// The loss of a mechanism that reveals nothing: all mass at 0.
    pub(crate) fn identity(interval: f64) -> Self {
        Self {
            interval,
            offset: 0,
            probs: vec![1.0],
            infinity_mass: 0.0,
        }
    }

    /// A distribution from masses on consecutive grid points starting at index `offset`.
    /// Negative masses (rounding noise) are raised to 0.
    pub(crate) fn new(interval: f64, offset: i64, mut probs: Vec<f64>, infinity_mass: f64) -> Self {
        for p in &mut probs {
            if p.is_nan() || *p < 0.0 {
                *p = 0.0;
            }
        }
        if probs.is_empty() {
            probs.push(0.0);
        }
        let mut pmf = Self {
            interval,
            offset,
            probs,
            infinity_mass: infinity_mass.clamp(0.0, 1.0),
        };
        pmf.trim_zeros();
        pmf
    }

    /// Δ, the spacing of the loss grid.
    pub fn interval(&self) -> f64 {
        self.interval
    }

    /// The mass at +∞ (outcomes only P can produce, and truncated tails).
    pub fn infinity_mass(&self) -> f64 {
        self.infinity_mass
    }

    /// The smallest and largest finite loss with mass.
    pub fn support(&self) -> (f64, f64) {
        (
            self.offset as f64 * self.interval,
            (self.offset + self.probs.len() as i64 - 1) as f64 * self.interval,
        )
    }

    /// The number of grid points kept.
    pub fn len(&self) -> usize {
        self.probs.len()
    }

    /// Never true: at least one grid point is kept.
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }

    /// The total finite mass.
    pub fn finite_mass(&self) -> f64 {
        self.probs.iter().sum()
    }

    /// The (loss, mass) pairs of the finite part.
    pub fn masses(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.probs
            .iter()
            .enumerate()
            .map(|(i, &p)| ((self.offset + i as i64) as f64 * self.interval, p))
    }

    fn trim_zeros(&mut self) {
        let first = self.probs.iter().position(|&p| p > 0.0);
        match first {
            None => {
                self.probs = vec![0.0];
                self.offset = 0;
            }
            Some(first) => {
                let last = self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(first);
                self.probs.truncate(last + 1);
                self.probs.drain(..first);
                self.offset += first as i64;
            }
        }
    }

    /// `δ(ε) = m_∞ + Σ_k p_k (1 − e^{ε − kΔ})₊`, the hockey-stick divergence at ε.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let mut delta = 0.0;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let loss = (self.offset + i as i64) as f64 * self.interval;
            if loss <= epsilon {
                break;
            }
            delta += p * -(epsilon - loss).exp_m1();
        }
        (delta + self.infinity_mass).min(1.0)
    }

    /// The smallest ε ≥ 0 with `δ(ε) ≤ delta`; +∞ if the mass at +∞ alone exceeds δ.
    ///
    /// Between grid points δ(ε) is `A − e^ε·B` with A and B the masses above (B weighted by
    /// e^{−loss}), so ε is solved exactly there rather than rounded to the grid.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        let step = (-self.interval).exp();
        // upper = m_∞ + Σ_{j>k} p_j ; lower = Σ_{j>k} p_j e^{−(x_j − x_k)}, relative to x_k.
        let mut upper = self.infinity_mass;
        let mut lower = 0.0;
        let mut below_next = 0.0;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let loss = (self.offset + i as i64) as f64 * self.interval;
            // `lower` is still relative to the grid point above this one.
            lower = (lower + below_next) * step;
            if upper > delta && lower > 0.0 && upper - delta >= lower {
                // ε ∈ [loss, loss + Δ): solve upper − e^{ε − loss}·lower = δ.
                return (loss + ((upper - delta) / lower).ln()).max(0.0);
            }
            upper += p;
            below_next = p;
        }
        // Below every grid point: δ(ε) = upper − e^{ε − x_0}·(lower + p_0).
        let lowest = self.offset as f64 * self.interval;
        let lower = lower + below_next;
        if upper <= delta || lower <= 0.0 {
            return 0.0;
        }
        (lowest + ((upper - delta) / lower).ln()).max(0.0)
    }

    /// Moves the lowest masses (at most `tail` in total) up to the first kept point and the
    /// highest (at most `tail`) to +∞.
    pub(crate) fn truncate_tails(&mut self, tail: f64) {
        let mut low = 0.0;
        let mut first = 0;
        while first + 1 < self.probs.len() && low + self.probs[first] <= tail {
            low += self.probs[first];
            first += 1;
        }
        let mut high = 0.0;
        let mut last = self.probs.len() - 1;
        while last > first && high + self.probs[last] <= tail {
            high += self.probs[last];
            last -= 1;
        }
        self.probs.truncate(last + 1);
        self.probs.drain(..first);
        self.probs[0] += low;
        self.offset += first as i64;
        self.infinity_mass = (self.infinity_mass + high).min(1.0);
        self.trim_zeros();
    }

    /// The composition with another distribution on the same grid: the convolution of the
    /// finite parts, then tails of at most `tail` each truncated pessimistically.
    pub(crate) fn compose(&self, other: &LossPmf, tail: f64) -> LossPmf {
        debug_assert_eq!(self.interval, other.interval);
        let probs = convolve(&self.probs, &other.probs);
        let (f1, f2) = (self.finite_mass(), other.finite_mass());
        let infinity = self.infinity_mass * f2
            + other.infinity_mass * f1
            + self.infinity_mass * other.infinity_mass;
        let mut pmf = LossPmf::new(
            self.interval,
            self.offset + other.offset,
            probs,
            infinity.min(1.0),
        );
        pmf.truncate_tails(tail);
        pmf
    }

    /// `ln Σ_k p_k e^{t·kΔ}` over the finite part.
    ///
    /// The factors e^{t·(x_k − anchor)} are taken in blocks of [`MGF_BLOCK`] grid points: one
    /// `exp` at the block's first point times a table of e^{t·jΔ}, each factor within a few ulp
    /// of its own `exp` (a block whose first factor is subnormal or zero takes one `exp` per
    /// point, so no term is lost to underflow that `exp` would have kept).
    fn log_mgf(&self, t: f64) -> f64 {
        let (lo, hi) = self.support();
        let anchor = if t >= 0.0 { hi } else { lo };
        let steps: Vec<f64> = (0..MGF_BLOCK)
            .map(|j| (t * (j as f64 * self.interval)).exp())
            .collect();
        let mut sum = 0.0;
        for (b, block) in self.probs.chunks(MGF_BLOCK).enumerate() {
            let first = b * MGF_BLOCK;
            let loss = |j: usize| (self.offset + (first + j) as i64) as f64 * self.interval;
            let base = (t * (loss(0) - anchor)).exp();
            if base.is_normal() {
                for (&p, &step) in block.iter().zip(&steps) {
                    if p > 0.0 {
                        sum += p * (base * step);
                    }
                }
            } else {
                for (j, &p) in block.iter().enumerate() {
                    if p > 0.0 {
                        sum += p * (t * (loss(j) - anchor)).exp();
                    }
                }
            }
        }
        t * anchor + sum.ln()
    }

    /// The composition of `count` copies, by one FFT, a power in the frequency domain and one
    /// inverse FFT over a window that a Chernoff bound shows holds all but `tail` of the mass
    /// on each side (that mass goes to +∞).
    pub(crate) fn self_compose(&self, count: u64, tail: f64) -> LossPmf {
        SelfComposer::new(self.clone()).compose(count, tail)
    }
}

/// Grid points per `exp` in [`LossPmf::log_mgf`].
const MGF_BLOCK: usize = 64;

/// The widest window a self-composition is computed over, in grid points (2²⁴: 16.8 M points,
/// 268 MB of complex FFT input). A composition whose Chernoff window is wider spends an ε far
/// beyond any budget; it is answered with all its mass at +∞.
pub(crate) const MAX_COMPOSED_WINDOW: usize = 1 << 24;

/// The orders t = 2^(j/2), j = −12 … 26, at which the Chernoff bounds of a self-composition's
/// window are tried.
fn chernoff_orders() -> impl Iterator<Item = f64> {
    (-12..=26).map(|j| 2f64.powf(j as f64 / 2.0))
}

/// Self-composes one distribution any number of times, keeping what does not depend on the
/// count: the log-MGF at the Chernoff orders and the last forward FFT (per transform size).
/// [`SelfComposer::compose`] returns exactly (to the bit) what [`LossPmf::self_compose`]
/// returns; it only avoids recomputing, so a run asking for its ε after every round pays one
/// power and one inverse FFT per direction and round.
#[derive(Clone, Debug)]
pub(crate) struct SelfComposer {
    single: LossPmf,
    /// (ln M(t), ln M(−t)) at each of [`chernoff_orders`].
    log_mgf: Vec<(f64, f64)>,
    /// The forward FFT of the single distribution folded onto a circle of the given size.
    spectrum: Option<(usize, Vec<Complex<f64>>)>,
}

impl SelfComposer {
    pub(crate) fn new(single: LossPmf) -> Self {
        let log_mgf = chernoff_orders()
            .map(|t| (single.log_mgf(t), single.log_mgf(-t)))
            .collect();
        Self {
            single,
            log_mgf,
            spectrum: None,
        }
    }

    /// The composition of `count` copies (see [`LossPmf::self_compose`]).
    pub(crate) fn compose(&mut self, count: u64, tail: f64) -> LossPmf {
        let single = &self.single;
        if count == 0 {
            return LossPmf::identity(single.interval);
        }
        if count == 1 {
            return single.clone();
        }
        let n = count as f64;
        let len = single.probs.len() as i64;
        // Exact bounds of the composed support, in grid indices relative to count·offset.
        let exact_hi = (len - 1).saturating_mul(i64::try_from(count).unwrap_or(i64::MAX));
        let (mut rel_lo, mut rel_hi) = (0i64, exact_hi);
        let log_tail = tail.ln();
        let base = single.offset as f64 * single.interval;
        for (t, &(up, down)) in chernoff_orders().zip(&self.log_mgf) {
            // Upper: P(S ≥ a) ≤ e^{−ta} M(t)^n.
            let a = (n * up - log_tail) / t;
            let idx = ((a - n * base) / single.interval).ceil();
            if idx.is_finite() && idx < rel_hi as f64 {
                rel_hi = (idx as i64).max(0);
            }
            // Lower: P(S ≤ a) ≤ e^{ta} M(−t)^n.
            let a = (log_tail - n * down) / t;
            let idx = ((a - n * base) / single.interval).floor();
            if idx.is_finite() && idx > rel_lo as f64 {
                rel_lo = (idx as i64).min(exact_hi);
            }
        }
        if rel_lo > rel_hi {
            rel_lo = rel_hi;
        }
        // An absurd count (a manifest asking for 2⁶² rounds, say) would need a window wider
        // than memory, or grid indices beyond i64. Everything at +∞ is a valid, pessimistic
        // answer (ε = ∞), and calibration then looks for more noise.
        let composed_offset = i64::try_from(count)
            .ok()
            .and_then(|c| single.offset.checked_mul(c))
            .and_then(|o| o.checked_add(rel_lo));
        let (Some(composed_offset), true) = (
            composed_offset,
            rel_hi - rel_lo < MAX_COMPOSED_WINDOW as i64,
        ) else {
            return LossPmf::new(single.interval, 0, vec![], 1.0);
        };
        let width = (rel_hi - rel_lo + 1) as usize;
        let size = fast_len(width.max(2));
        let spectrum = match &self.spectrum {
            Some((cached, spectrum)) if *cached == size => spectrum,
            _ => {
                // Fold the single distribution onto the circle (aliasing only adds mass).
                let mut input = vec![0.0; size];
                for (i, &p) in single.probs.iter().enumerate() {
                    input[i % size] += p;
                }
                &self.spectrum.insert((size, forward(&input))).1
            }
        };
        let single = &self.single;
        let powered: Vec<Complex<f64>> = spectrum
            .iter()
            .map(|z| {
                if count <= u64::from(u32::MAX) {
                    z.powu(count as u32)
                } else {
                    z.powf(n)
                }
            })
            .collect();
        let circular = inverse(powered, size);
        let mut probs = Vec::with_capacity(width);
        for r in rel_lo..=rel_hi {
            probs.push(circular[r.rem_euclid(size as i64) as usize]);
        }
        // (f + m)^n − f^n: every product with at least one factor at +∞.
        let finite = single.finite_mass();
        let infinity = (finite + single.infinity_mass).powf(n) - finite.powf(n) + 2.0 * tail;
        let mut pmf = LossPmf::new(single.interval, composed_offset, probs, infinity.min(1.0));
        pmf.truncate_tails(tail);
        pmf
    }
}

/// The smallest length ≥ n of the form 2^a·3^b (fast for the FFT).
fn fast_len(n: usize) -> usize {
    let mut best = n.next_power_of_two();
    let mut p3 = 1usize;
    while p3 < best {
        let mut m = p3;
        while m < n {
            m *= 2;
        }
        best = best.min(m);
        p3 *= 3;
    }
    best
}

thread_local! {
    static PLANNER: std::cell::RefCell<RealFftPlanner<f64>> = std::cell::RefCell::new(RealFftPlanner::new());
}

fn forward(input: &[f64]) -> Vec<Complex<f64>> {
    let size = input.len();
    let plan: Arc<dyn realfft::RealToComplex<f64>> =
        PLANNER.with(|p| p.borrow_mut().plan_fft_forward(size));
    let mut buffer = input.to_vec();
    let mut out = plan.make_output_vec();
    plan.process(&mut buffer, &mut out)
        .expect("buffer lengths come from the plan");
    out
}

fn inverse(mut spectrum: Vec<Complex<f64>>, size: usize) -> Vec<f64> {
    let plan: Arc<dyn realfft::ComplexToReal<f64>> =
        PLANNER.with(|p| p.borrow_mut().plan_fft_inverse(size));
    // A real signal's spectrum has real first (and, for even sizes, last) coefficients;
    // rounding in a power can leave a tiny imaginary part there, which realfft refuses.
    if let Some(first) = spectrum.first_mut() {
        first.im = 0.0;
    }
    if size.is_multiple_of(2)
        && let Some(last) = spectrum.last_mut()
    {
        last.im = 0.0;
    }
    let mut out = plan.make_output_vec();
    plan.process(&mut spectrum, &mut out)
        .expect("buffer lengths come from the plan");
    let scale = 1.0 / size as f64;
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

/// Linear convolution: directly for short inputs, by FFT otherwise.
pub(crate) fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, &x) in a.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (j, &y) in b.iter().enumerate() {
                out[i + j] += x * y;
            }
        }
        return out;
    }
    let size = fast_len(out_len);
    let mut pa = vec![0.0; size];
    pa[..a.len()].copy_from_slice(a);
    let mut pb = vec![0.0; size];
    pb[..b.len()].copy_from_slice(b);
    let fa = forward(&pa);
    let fb = forward(&pb);
    let product: Vec<Complex<f64>> = fa.iter().zip(&fb).map(|(x, y)| x * y).collect();
    let mut out = inverse(product, size);
    out.truncate(out_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_composer_reused_across_counts_gives_the_bits_of_a_fresh_self_composition() {
        let single = pmf(-3, &[0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05], 1e-9);
        let mut composer = SelfComposer::new(single.clone());
        // Counts out of order, repeated, and crossing transform sizes.
        for count in [0, 1, 2, 7, 3, 40, 41, 40, 500, 2, 1000] {
            assert_eq!(
                composer.compose(count, 1e-15),
                single.self_compose(count, 1e-15),
                "count {count}"
            );
        }
    }

    #[test]
    fn an_absurd_count_is_all_mass_at_infinity_not_a_panic_or_a_huge_window() {
        // Found by fuzzing a run manifest asking for about 2⁶³ rounds: the composed offset
        // overflowed i64, and smaller absurd counts would need windows wider than memory.
        let single = pmf(-3, &[0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05], 1e-9);
        for count in [u64::MAX, 1 << 63, (1 << 62) + 5, 1 << 40] {
            let composed = single.self_compose(count, 1e-15);
            assert_eq!(composed.infinity_mass(), 1.0, "count {count}");
            assert_eq!(composed.epsilon_for_delta(1e-6), f64::INFINITY);
        }
        // A large but reasonable count is still computed.
        let single = pmf(-3, &[0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05], 0.0);
        let composed = single.self_compose(100_000, 1e-15);
        assert!(composed.infinity_mass() < 1e-6);
        assert!(composed.epsilon_for_delta(1e-6).is_finite());
    }

    fn pmf(offset: i64, probs: &[f64], inf: f64) -> LossPmf {
        LossPmf::new(0.5, offset, probs.to_vec(), inf)
    }

    #[test]
    fn the_blocked_log_mgf_is_the_sum_of_one_exp_per_point_to_within_a_few_ulp() {
        // 1,000 points with zeros and a 10⁻³⁰⁰ mass among them, so blocks start on zeros,
        // and orders large enough that whole blocks underflow.
        let probs: Vec<f64> = (0..1000)
            .map(|i| match i % 13 {
                0 => 0.0,
                5 => 1e-300,
                r => (r as f64) * 1e-3,
            })
            .collect();
        let single = LossPmf::new(0.01, -400, probs.clone(), 0.0);
        let direct = |t: f64| {
            let (lo, hi) = single.support();
            let anchor = if t >= 0.0 { hi } else { lo };
            let sum: f64 = probs
                .iter()
                .enumerate()
                .filter(|(_, p)| **p > 0.0)
                .map(|(i, p)| p * (t * ((-400 + i as i64) as f64 * 0.01 - anchor)).exp())
                .sum();
            t * anchor + sum.ln()
        };
        for t in chernoff_orders().flat_map(|t| [t, -t]) {
            let (blocked, exact) = (single.log_mgf(t), direct(t));
            assert!(
                (blocked - exact).abs() <= 1e-13 * exact.abs().max(1.0),
                "t = {t}: {blocked} against {exact}"
            );
        }
    }

    #[test]
    fn delta_and_epsilon_are_inverse_on_a_small_distribution() {
        let p = pmf(-2, &[0.1, 0.2, 0.3, 0.25, 0.1], 0.05);
        for &eps in &[0.0, 0.1, 0.3, 0.5, 0.7, 0.99] {
            let d = p.delta_for_epsilon(eps);
            let back = p.epsilon_for_delta(d);
            assert!((back - eps).abs() < 1e-12, "ε={eps} δ={d} back={back}");
        }
        assert_eq!(p.epsilon_for_delta(0.01), f64::INFINITY);
        // Direct formula at ε = 0.25.
        let direct =
            0.05 + 0.1 * (1.0 - (0.25f64 - 1.0).exp()) + 0.25 * (1.0 - (0.25f64 - 0.5).exp());
        assert!((p.delta_for_epsilon(0.25) - direct).abs() < 1e-15);
    }

    #[test]
    fn fft_convolution_matches_direct_convolution() {
        let a: Vec<f64> = (0..300).map(|i| ((i * 7919) % 101) as f64 / 1e4).collect();
        let b: Vec<f64> = (0..200).map(|i| ((i * 104729) % 97) as f64 / 1e4).collect();
        let fast = convolve(&a, &b);
        let mut slow = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                slow[i + j] += x * y;
            }
        }
        for (f, s) in fast.iter().zip(&slow) {
            assert!((f - s).abs() < 1e-14, "{f} vs {s}");
        }
    }

    #[test]
    fn self_composition_matches_repeated_composition() {
        let p = pmf(-3, &[0.05, 0.15, 0.3, 0.3, 0.15, 0.0499], 1e-4);
        let mut repeated = LossPmf::identity(0.5);
        for _ in 0..7 {
            repeated = repeated.compose(&p, 0.0);
        }
        let powered = p.self_compose(7, 1e-30);
        for &eps in &[0.0, 0.5, 1.0, 2.0, 4.0] {
            let a = repeated.delta_for_epsilon(eps);
            let b = powered.delta_for_epsilon(eps);
            assert!(b >= a - 1e-15 && b - a < 1e-12, "ε={eps}: {a} vs {b}");
        }
    }

    #[test]
    fn truncation_only_raises_delta() {
        let p = pmf(-4, &[1e-9, 1e-3, 0.3, 0.4, 0.2, 0.099, 1e-9], 0.0);
        let mut t = p.clone();
        t.truncate_tails(1e-8);
        assert!(t.len() < p.len());
        for &eps in &[0.0, 0.2, 0.6, 1.2] {
            assert!(t.delta_for_epsilon(eps) >= p.delta_for_epsilon(eps));
        }
    }

    #[test]
    fn fast_len_is_a_small_smooth_number_at_least_n() {
        for n in [1usize, 2, 5, 17, 1000, 60_001, 250_000] {
            let m = fast_len(n);
            assert!(m >= n && m < 2 * n.max(2));
            let mut r = m;
            while r.is_multiple_of(2) {
                r /= 2;
            }
            while r.is_multiple_of(3) {
                r /= 3;
            }
            assert_eq!(r, 1, "{m}");
        }
    }
}
