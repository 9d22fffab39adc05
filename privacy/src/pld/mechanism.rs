//! The mechanisms the PLD accountant knows, each as a dominating pair of output distributions
//! (P, Q), and their pessimistic discretisation onto the loss grid.
//!
//! # Connect-the-dots
//! For a loss grid `ε_i = iΔ`, every outcome whose privacy loss ℓ lies in `[ε_i, ε_{i+1}]`,
//! with P-mass w, is split between the two grid points: `a = w·(1 − e^{ε_i − ℓ})/(1 − e^{−Δ})`
//! goes to `ε_{i+1}` and `w − a` to `ε_i`. Over a whole bucket this is
//! `a = (P(B) − e^{ε_i}·Q(B))/(1 − e^{−Δ})`, since `e^{−ℓ}dP = dQ`. As a function of `e^ε`
//! the discrete hockey-stick curve is then the chord of the true (convex) one between grid
//! points and equal to it at each grid point, so it lies above it everywhere: δ is never
//! under-stated, for every ε. The discrete distribution is itself the PLD of a pair that
//! dominates (P, Q), so the bound survives composition (Doroshenko, Ghazi, Kamath, Kumar,
//! Manurangsi 2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
//! Distributions", PETS, Thm. 3.x and Sec. 4). Mass below the lowest grid point is moved up to
//! it and mass above the highest goes to +∞ (both pessimistic). The grid range covers all but
//! e^{-50}-ish of P's mass, as Google's `dp_accounting` does by default.

use crate::PrivacyError;
use crate::error::check;
use crate::special::log_add;

use super::PrivacyLossDistribution;
use super::pmf::LossPmf;

/// How far (in noise standard deviations) past the mixture means the grid reaches: beyond
/// it, each Gaussian component holds less than 1e-23 of its mass.
const TAIL_SIGMAS: f64 = 10.0;

/// A mechanism whose privacy loss distribution the accountant can build.
///
/// All lengths are in units of the clip norm C; `noise_multiplier` is the noise standard
/// deviation in those units (std = σ·C).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PldMechanism {
    /// **The Gaussian mechanism** `f(D) + N(0, σ²I)` for a query of L2 sensitivity Δ.
    ///
    /// - Neighbouring: any relation under which `‖f(D) − f(D')‖₂ ≤ Δ` (add/remove-one with
    ///   Δ = C, replace-one with Δ = 2C, DP-FTRL's tree with Δ its sensitivity).
    /// - Dominating pair: (N(Δ, σ²), N(0, σ²)); the loss is itself Gaussian,
    ///   L ∼ N(Δ²/(2σ²), Δ²/σ²), and δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ)
    ///   (Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy",
    ///   Thm. 8). The pair is symmetric, so one direction suffices.
    Gaussian {
        /// σ, the noise standard deviation over C.
        noise_multiplier: f64,
        /// Δ, the L2 sensitivity over C.
        sensitivity: f64,
    },
    /// **The Poisson-subsampled Gaussian**: each user enters the round independently with
    /// probability q; the sum of the sampled users' updates (each of norm ≤ C) gets
    /// N(0, σ²C²).
    ///
    /// - Neighbouring: **add/remove-one** user; sensitivity C.
    /// - Dominating pairs (Zhu, Dong, Wang 2022, "Optimal Accounting of Differential Privacy
    ///   via Characteristic Function", AISTATS, Prop. 30; Koskela, Jälkö, Honkela 2020):
    ///   *remove*: ((1−q)N(0,σ²) + qN(1,σ²), N(0,σ²)); *add*: (N(0,σ²), (1−q)N(0,σ²) +
    ///   qN(1,σ²)). The two are not symmetric; both are composed and the larger ε is reported.
    /// - q = 1 is [`PldMechanism::Gaussian`] with Δ = 1.
    SubsampledGaussian {
        /// q ∈ (0, 1].
        sampling_rate: f64,
        /// σ, the noise standard deviation over C.
        noise_multiplier: f64,
    },
    /// **The Poisson-subsampled Gaussian under replace-one** neighbouring: one user's update
    /// x (‖x‖ ≤ C) is replaced by another x' (‖x'‖ ≤ C), and whoever holds it is sampled with
    /// probability q.
    ///
    /// - Sensitivity: 2C when sampled (‖x − x'‖ ≤ 2C), but each of x, x' is at most C from 0.
    /// - Pair: ((1−q)N(0,σ²) + qN(1,σ²), (1−q)N(0,σ²) + qN(−1,σ²)), symmetric (Koskela,
    ///   Jälkö, Honkela 2020, "Computing Tight Differential Privacy Guarantees Using FFT",
    ///   AISTATS, Sec. 6, for the substitution relation).
    /// - q = 1 is [`PldMechanism::Gaussian`] with Δ = 2, fedpref's local mode.
    ReplaceOneSubsampledGaussian {
        /// q ∈ (0, 1].
        sampling_rate: f64,
        /// σ, the noise standard deviation over C.
        noise_multiplier: f64,
    },
    /// **A sum of m independent discrete Gaussians** N_ℤ(0, s²) (Canonne, Kamath, Steinke
    /// 2020, "The Discrete Gaussian for Differential Privacy") added to a scalar integer
    /// query: the noise of distributed mode's secure sum, one coordinate at a time (Kairouz,
    /// Liu, Steinke 2021).
    ///
    /// - Neighbouring: the query changes by at most `shift` (an integer, the L1 = L2
    ///   sensitivity of a scalar integer query in lattice units); zero-out neighbouring in
    ///   distributed mode, where the target's own share is post-processing.
    /// - Pair: (Z + k, Z), Z the m-fold convolution, k = `shift`. For m = 1 this is the
    ///   discrete Gaussian mechanism. The loss is computed from the exact mass function (by
    ///   convolution, truncated where the remaining mass is below 1e-40, which goes to +∞).
    /// - A d-dimensional release with an L2 bound has no single worst-case shift vector
    ///   for sums of discrete Gaussians, so the accountant keeps Kairouz–Liu–Steinke's RDP
    ///   bound there ([`crate::distributed`]); this PLD covers scalar releases.
    SumOfDiscreteGaussians {
        /// s², each share's variance parameter, in lattice units (≥ 1/4).
        device_variance: f64,
        /// m ≥ 1, the number of shares in the sum.
        devices: u64,
        /// k ≥ 1, the sensitivity in lattice units.
        shift: u64,
    },
}

/// A pair of Gaussian mixtures with a common σ whose privacy loss increases with x.
#[derive(Clone, Copy, Debug)]
enum Pair {
    /// P = (1−q)N(0) + qN(1), Q = N(0).
    Remove { q: f64, sigma: f64 },
    /// Reflected add: P = N(0), Q = (1−q)N(0) + qN(−1).
    Add { q: f64, sigma: f64 },
    /// P = (1−q)N(0) + qN(1), Q = (1−q)N(0) + qN(−1).
    Replace { q: f64, sigma: f64 },
}

/// P(Z > z) for a standard normal Z, accurate in the upper tail.
fn normal_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// P(a < Z ≤ b) for a standard normal Z, computed from whichever tail keeps precision.
fn normal_mass(a: f64, b: f64) -> f64 {
    if a >= b {
        return 0.0;
    }
    if a >= 0.0 {
        normal_tail(a) - normal_tail(b)
    } else if b <= 0.0 {
        normal_tail(-b) - normal_tail(-a)
    } else {
        1.0 - normal_tail(b) - normal_tail(-a)
    }
}

/// `ln(e^x − c)` for 0 ≤ c < e^x, accurate for large and small x.
fn ln_exp_minus(x: f64, c: f64) -> f64 {
    if x > 0.0 {
        x + (-c * (-x).exp()).ln_1p()
    } else {
        (x.exp_m1() + (1.0 - c)).ln()
    }
}

impl Pair {
    fn sigma(self) -> f64 {
        match self {
            Pair::Remove { sigma, .. } | Pair::Add { sigma, .. } | Pair::Replace { sigma, .. } => {
                sigma
            }
        }
    }

    fn p_components(self) -> Vec<(f64, f64)> {
        match self {
            Pair::Remove { q, .. } | Pair::Replace { q, .. } => vec![(1.0 - q, 0.0), (q, 1.0)],
            Pair::Add { .. } => vec![(1.0, 0.0)],
        }
    }

    fn q_components(self) -> Vec<(f64, f64)> {
        match self {
            Pair::Remove { .. } => vec![(1.0, 0.0)],
            Pair::Add { q, .. } | Pair::Replace { q, .. } => vec![(1.0 - q, 0.0), (q, -1.0)],
        }
    }

    /// ln((1−q) + q·e^{(2x·μ − μ²)/(2σ²)}) for a component at μ = ±1.
    fn log_mixture_ratio(q: f64, sigma: f64, x: f64, mean: f64) -> f64 {
        let a = (2.0 * x * mean - 1.0) / (2.0 * sigma * sigma);
        if q == 1.0 {
            a
        } else {
            log_add((-q).ln_1p(), q.ln() + a)
        }
    }

    fn loss(self, x: f64) -> f64 {
        match self {
            Pair::Remove { q, sigma } => Self::log_mixture_ratio(q, sigma, x, 1.0),
            Pair::Add { q, sigma } => -Self::log_mixture_ratio(q, sigma, x, -1.0),
            Pair::Replace { q, sigma } => {
                Self::log_mixture_ratio(q, sigma, x, 1.0)
                    - Self::log_mixture_ratio(q, sigma, x, -1.0)
            }
        }
    }

    /// The x at which the loss equals ε (−∞ or +∞ outside the loss's range).
    fn x_for_loss(self, eps: f64) -> f64 {
        match self {
            Pair::Remove { q, sigma } => {
                if q < 1.0 && eps <= (-q).ln_1p() {
                    return f64::NEG_INFINITY;
                }
                sigma * sigma * (ln_exp_minus(eps, 1.0 - q) - q.ln()) + 0.5
            }
            Pair::Add { q, sigma } => {
                if q < 1.0 && eps >= -(-q).ln_1p() {
                    return f64::INFINITY;
                }
                -sigma * sigma * (ln_exp_minus(-eps, 1.0 - q) - q.ln()) - 0.5
            }
            Pair::Replace { .. } => {
                // Monotone: bracket, then bisect to the last bit.
                let (mut lo, mut hi) = (-1.0f64, 1.0f64);
                while self.loss(lo) > eps {
                    lo *= 2.0;
                    if lo < -1e12 {
                        return f64::NEG_INFINITY;
                    }
                }
                while self.loss(hi) < eps {
                    hi *= 2.0;
                    if hi > 1e12 {
                        return f64::INFINITY;
                    }
                }
                for _ in 0..200 {
                    let mid = 0.5 * (lo + hi);
                    if mid <= lo || mid >= hi {
                        break;
                    }
                    if self.loss(mid) < eps {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                hi
            }
        }
    }

    fn mass(components: &[(f64, f64)], sigma: f64, a: f64, b: f64) -> f64 {
        components
            .iter()
            .map(|&(w, mu)| w * normal_mass((a - mu) / sigma, (b - mu) / sigma))
            .sum()
    }

    /// The connect-the-dots discretisation of this pair's privacy loss.
    fn discretise(self, interval: f64) -> LossPmf {
        let sigma = self.sigma();
        let pc = self.p_components();
        let qc = self.q_components();
        let means = pc.iter().map(|c| c.1);
        let lo_mean = means.clone().fold(f64::INFINITY, f64::min);
        let hi_mean = means.fold(f64::NEG_INFINITY, f64::max);
        let x_lo = lo_mean - TAIL_SIGMAS * sigma;
        let x_hi = hi_mean + TAIL_SIGMAS * sigma;
        let i_lo = (self.loss(x_lo) / interval).floor() as i64;
        let i_hi = (self.loss(x_hi) / interval).ceil() as i64;
        let i_hi = i_hi.max(i_lo + 1);
        let n = (i_hi - i_lo + 1) as usize;
        let xs: Vec<f64> = (i_lo..=i_hi)
            .map(|i| self.x_for_loss(i as f64 * interval))
            .collect();
        let mut probs = vec![0.0; n];
        // Everything at or below the lowest grid point's loss goes up to it.
        probs[0] += Self::mass(&pc, sigma, f64::NEG_INFINITY, xs[0]);
        let denominator = -(-interval).exp_m1();
        for b in 0..n - 1 {
            let p_mass = Self::mass(&pc, sigma, xs[b], xs[b + 1]);
            if p_mass <= 0.0 {
                continue;
            }
            let q_mass = Self::mass(&qc, sigma, xs[b], xs[b + 1]);
            let eps = (i_lo + b as i64) as f64 * interval;
            let up = ((p_mass - eps.exp() * q_mass) / denominator).clamp(0.0, p_mass);
            probs[b + 1] += up;
            probs[b] += p_mass - up;
        }
        let infinity = Self::mass(&pc, sigma, xs[n - 1], f64::INFINITY);
        LossPmf::new(interval, i_lo, probs, infinity)
    }
}

impl PldMechanism {
    /// Checks the parameters, naming the one at fault.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        match *self {
            PldMechanism::Gaussian {
                noise_multiplier,
                sensitivity,
            } => {
                check::positive("noise_multiplier", noise_multiplier)?;
                check::positive("sensitivity", sensitivity)?;
            }
            PldMechanism::SubsampledGaussian {
                sampling_rate,
                noise_multiplier,
            }
            | PldMechanism::ReplaceOneSubsampledGaussian {
                sampling_rate,
                noise_multiplier,
            } => {
                check::sampling_rate(sampling_rate)?;
                check::positive("noise_multiplier", noise_multiplier)?;
            }
            PldMechanism::SumOfDiscreteGaussians {
                device_variance,
                devices,
                shift,
            } => {
                if !(device_variance.is_finite() && device_variance >= 0.25) {
                    return Err(PrivacyError::invalid(
                        "device_variance",
                        device_variance,
                        "must be a finite number ≥ 1/4",
                    ));
                }
                if devices == 0 {
                    return Err(PrivacyError::invalid("devices", 0.0, "must be at least 1"));
                }
                if shift == 0 {
                    return Err(PrivacyError::invalid("shift", 0.0, "must be at least 1"));
                }
                // Direct convolution costs about m²(2r+1)²/2 multiplications.
                let r = 2.0 * (2.0 * EXACT_DEPTH * device_variance).sqrt() + 3.0;
                let work = (devices as f64).powi(2) * r * r / 2.0;
                if work > 2e9 {
                    return Err(PrivacyError::Unsupported(
                        "the sum of discrete Gaussians is too wide to convolve exactly \
                         (m²·s² above about 7·10⁵); account it with RDP",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The mechanism's privacy loss distribution, discretised pessimistically on a grid of
    /// spacing `interval`.
    pub fn pld(&self, interval: f64) -> Result<PrivacyLossDistribution, PrivacyError> {
        self.validate()?;
        let interval = check::positive("value_discretization_interval", interval)?;
        Ok(match *self {
            PldMechanism::Gaussian {
                noise_multiplier,
                sensitivity,
            } => PrivacyLossDistribution::symmetric(
                Pair::Remove {
                    q: 1.0,
                    sigma: noise_multiplier / sensitivity,
                }
                .discretise(interval),
            ),
            PldMechanism::SubsampledGaussian {
                sampling_rate: q,
                noise_multiplier: sigma,
            } => {
                if q == 1.0 {
                    return PldMechanism::Gaussian {
                        noise_multiplier: sigma,
                        sensitivity: 1.0,
                    }
                    .pld(interval);
                }
                PrivacyLossDistribution::asymmetric(
                    Pair::Remove { q, sigma }.discretise(interval),
                    Pair::Add { q, sigma }.discretise(interval),
                )
            }
            PldMechanism::ReplaceOneSubsampledGaussian {
                sampling_rate: q,
                noise_multiplier: sigma,
            } => {
                if q == 1.0 {
                    return PldMechanism::Gaussian {
                        noise_multiplier: sigma,
                        sensitivity: 2.0,
                    }
                    .pld(interval);
                }
                PrivacyLossDistribution::symmetric(Pair::Replace { q, sigma }.discretise(interval))
            }
            PldMechanism::SumOfDiscreteGaussians {
                device_variance,
                devices,
                shift,
            } => {
                let losses = discrete_sum_losses(device_variance, devices, shift, ACCOUNTING_DEPTH);
                PrivacyLossDistribution::symmetric(discretise_points(&losses, interval))
            }
        })
    }

    /// For [`PldMechanism::SumOfDiscreteGaussians`]: the exact privacy losses before
    /// discretisation, as (loss, P-mass) pairs, plus the P-mass at +∞ (truncation). Each
    /// share's mass function is kept out to e^{-700} of its peak (f64's limit), deeper than
    /// accounting needs, so that high-order Rényi divergences, which live in the far tails,
    /// come out exact. `None` for the other mechanisms.
    pub fn exact_losses(&self) -> Result<Option<ExactLosses>, PrivacyError> {
        self.validate()?;
        Ok(match *self {
            PldMechanism::SumOfDiscreteGaussians {
                device_variance,
                devices,
                shift,
            } => Some(discrete_sum_losses(
                device_variance,
                devices,
                shift,
                EXACT_DEPTH,
            )),
            _ => None,
        })
    }
}

/// A discrete privacy loss distribution before discretisation onto a grid.
#[derive(Clone, Debug, PartialEq)]
pub struct ExactLosses {
    /// (loss, P-mass) for each outcome with finite loss.
    pub points: Vec<(f64, f64)>,
    /// P-mass with infinite loss (including the truncated tails).
    pub infinity_mass: f64,
}

impl ExactLosses {
    /// The Rényi divergence `D_α(P‖Q) = ln(Σ P·e^{(α−1)ℓ})/(α − 1)` over the finite losses.
    /// The mass at +∞ (from truncating the mass function where less than 1e-40 remains)
    /// is left out, so this is the divergence of the truncated pair, for comparison with
    /// exact values.
    pub fn renyi_divergence(&self, order: f64) -> f64 {
        let terms: Vec<f64> = self
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(l, w)| w.ln() + (order - 1.0) * l)
            .collect();
        crate::special::log_sum_exp(&terms) / (order - 1.0)
    }

    /// δ(ε) of the exact losses.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        self.infinity_mass
            + self
                .points
                .iter()
                .filter(|p| p.0 > epsilon)
                .map(|&(l, w)| w * -(epsilon - l).exp_m1())
                .sum::<f64>()
    }
}

/// Connect-the-dots for point masses (see the module docs).
fn discretise_points(losses: &ExactLosses, interval: f64) -> LossPmf {
    let finite: Vec<&(f64, f64)> = losses.points.iter().filter(|p| p.1 > 0.0).collect();
    if finite.is_empty() {
        return LossPmf::new(interval, 0, vec![0.0], losses.infinity_mass);
    }
    let lo = finite.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let hi = finite.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let i_lo = (lo / interval).floor() as i64;
    let i_hi = (hi / interval).floor() as i64 + 1;
    let mut probs = vec![0.0; (i_hi - i_lo + 1) as usize];
    let denominator = -(-interval).exp_m1();
    for &&(loss, w) in &finite {
        let i = (loss / interval).floor() as i64;
        let eps = i as f64 * interval;
        let up = (w * -(eps - loss).exp_m1() / denominator).clamp(0.0, w);
        probs[(i + 1 - i_lo) as usize] += up;
        probs[(i - i_lo) as usize] += w - up;
    }
    LossPmf::new(interval, i_lo, probs, losses.infinity_mass)
}

/// How deep (as −ln of the relative mass) each share's mass function is kept for accounting:
/// the mass beyond, below 1e-50, goes to +∞.
const ACCOUNTING_DEPTH: f64 = 120.0;

/// As deep as f64 reaches, for [`PldMechanism::exact_losses`].
const EXACT_DEPTH: f64 = 700.0;

/// The exact losses of (Z + k, Z), Z the sum of m discrete Gaussians N_ℤ(0, s²), each share
/// kept on |x| ≤ r with e^{−r²/(2s²)} ≈ e^{−depth}.
fn discrete_sum_losses(variance: f64, devices: u64, shift: u64, depth: f64) -> ExactLosses {
    // One share: e^{−x²/(2s²)} on |x| ≤ r, normalised over a wider range so that the
    // truncated mass is really missing, not renormalised away.
    let r = (variance * 2.0 * depth).sqrt().ceil() as i64 + 1;
    let wide = 2 * r;
    let norm: f64 = (-wide..=wide)
        .map(|x| (-(x * x) as f64 / (2.0 * variance)).exp())
        .sum();
    let one: Vec<f64> = (-r..=r)
        .map(|x| (-(x * x) as f64 / (2.0 * variance)).exp() / norm)
        .collect();
    let truncated_one = (1.0 - one.iter().sum::<f64>()).max(0.0);
    // Direct convolution: every term is positive, so small masses keep their relative
    // precision and the losses in the tails are exact (an FFT would bury them in rounding).
    let mut z = vec![1.0];
    for _ in 0..devices {
        let mut next = vec![0.0; z.len() + one.len() - 1];
        for (i, &a) in z.iter().enumerate() {
            for (j, &b) in one.iter().enumerate() {
                next[i + j] += a * b;
            }
        }
        z = next;
    }
    let centre = (z.len() / 2) as i64; // index of 0
    // Each share lost at most `truncated_one` of its mass; the sum lost at most m times that.
    let lost = (devices as f64 * truncated_one).min(1.0);
    let k = shift as i64;
    let at = |x: i64| -> f64 {
        let idx = x + centre;
        if idx < 0 || idx >= z.len() as i64 {
            0.0
        } else {
            z[idx as usize]
        }
    };
    let mut points = Vec::with_capacity(z.len());
    let mut infinity = lost;
    for x in -centre + k..=centre + k {
        let p = at(x - k);
        if p <= 0.0 {
            continue;
        }
        let q = at(x);
        if q <= 0.0 {
            infinity += p;
        } else {
            points.push((p.ln() - q.ln(), p));
        }
    }
    ExactLosses {
        points,
        infinity_mass: infinity.min(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_delta(sigma: f64, eps: f64) -> f64 {
        // Balle & Wang 2018, sensitivity 1.
        let a = 1.0 / (2.0 * sigma) - eps * sigma;
        let b = -1.0 / (2.0 * sigma) - eps * sigma;
        normal_tail(-a) - eps.exp() * normal_tail(-b)
    }

    #[test]
    fn gaussian_pld_is_above_and_close_to_the_exact_curve() {
        for &sigma in &[0.5, 1.0, 3.0] {
            let pld = Pair::Remove { q: 1.0, sigma }.discretise(1e-4);
            for &eps in &[0.0, 0.3, 1.0, 2.5, 5.0] {
                let exact = gaussian_delta(sigma, eps);
                let d = pld.delta_for_epsilon(eps);
                assert!(
                    d >= exact * (1.0 - 1e-9) - 1e-18,
                    "σ={sigma} ε={eps}: {d} < {exact}"
                );
                assert!(
                    d <= exact * (1.0 + 1e-6) + 1e-15,
                    "σ={sigma} ε={eps}: {d} ≫ {exact}"
                );
            }
        }
    }

    #[test]
    fn every_pair_has_unit_mass_and_increasing_loss() {
        let pairs = [
            Pair::Remove {
                q: 0.01,
                sigma: 1.0,
            },
            Pair::Add {
                q: 0.01,
                sigma: 1.0,
            },
            Pair::Replace { q: 0.2, sigma: 2.0 },
        ];
        for pair in pairs {
            let pld = pair.discretise(1e-3);
            let total = pld.finite_mass() + pld.infinity_mass();
            assert!((total - 1.0).abs() < 1e-12, "{pair:?}: {total}");
            let mut last = f64::NEG_INFINITY;
            for i in -50..50 {
                let l = pair.loss(i as f64 / 5.0);
                assert!(l >= last, "{pair:?}");
                last = l;
            }
            // x_for_loss inverts loss.
            for &x in &[-1.0, 0.0, 0.7, 2.0] {
                let back = pair.x_for_loss(pair.loss(x));
                assert!(
                    (back - x).abs() < 1e-8 * (1.0 + x.abs()),
                    "{pair:?} x={x} back={back}"
                );
            }
        }
    }

    #[test]
    fn discrete_sum_losses_have_unit_mass() {
        let e = discrete_sum_losses(2.0, 3, 2, ACCOUNTING_DEPTH);
        let total: f64 = e.points.iter().map(|p| p.1).sum::<f64>() + e.infinity_mass;
        assert!((total - 1.0).abs() < 1e-12, "{total}");
    }
}
