//! The distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke 2021, "The Distributed
//! Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML) and its
//! Rényi-DP accountant: each device adds integer noise to its integer-rounded update, secure
//! aggregation reveals only the sum, and the sum carries the noise of all honest devices.
//!
//! # The mechanism ([`DistributedDiscreteGaussian`])
//! Each device, holding an update x already clipped to ‖x‖₂ ≤ C ([`crate::clip_l2`]):
//! 1. **scales** it to the lattice: x/γ, with γ the granularity (model units per lattice step),
//!    so ‖x/γ‖₂ ≤ c := C/γ;
//! 2. **rounds it randomly**: each coordinate goes to ⌊v⌋ + 1 with probability v − ⌊v⌋, else
//!    to ⌊v⌋ (unbiased), and the whole rounding is **repeated until** the rounded vector's
//!    norm is at most Δ₂ (conditional randomised rounding, KLS21 Sec. 4.1), where
//!    `Δ₂ = min{ c + √d, √(c² + d/4 + √(2 ln(1/β))·(c + √d/2)) }` (KLS21 Prop. 22; the
//!    first term always holds since rounding moves every coordinate by less than 1, so with
//!    β = 0 no retry happens; with β > 0 a try fails with probability at most β). The bound is
//!    therefore enforced, not probable: the rounded update's L2 norm is at most Δ₂ always;
//! 3. **adds noise** N_Z(0, s²)^d, the exact discrete Gaussian with integer variance
//!    parameter s² ([`crate::noise::discrete`]), drawn from ChaCha20 seeded by the operating
//!    system ([`SecureShareSampler`]) — or, in simulations only, from a seeded generator
//!    ([`SimulationShareSampler`]), whose shares carry the [`Simulated`] type and cannot be
//!    mistaken for real ones;
//! 4. hands the integer vector to secure aggregation, which sums modulo 2³².
//!
//! # Conditions of the guarantee
//! - **Honest devices.** The accountant takes `honest_devices` = m: the number of devices,
//!   *other than the user whose privacy is measured*, that are guaranteed to follow the
//!   protocol, not collude with the server, and have their masked input in the sum (dropped
//!   devices' noise is not in it). Size the per-device noise from a guaranteed minimum
//!   (secure aggregation's `min_contributors` minus the assumed corrupted devices minus one),
//!   never from the nominal cohort.
//! - **Secure aggregation** reveals only the sum of at least m + 1 inputs, and to no one the
//!   individual noised updates (see `fedpref-secagg` for what it does and does not defend
//!   against). Without it, each device's upload is only as private as its own share of noise.
//! - **Modular clipping.** The sum is computed modulo 2³² and read back as the centred
//!   representative. Reducing modulo 2³² is post-processing of the integer sum and costs no
//!   privacy; a wrap-around would only corrupt utility, and secure aggregation's overflow check
//!   (`FixedPoint::new`) refuses rounds where it could happen but with probability below 2⁻⁴⁰.
//! - **Randomised rounding** uses floating-point probabilities; any error there biases the
//!   rounding slightly but cannot break the norm bound, which is checked in exact integer
//!   arithmetic, so privacy does not depend on it.
//!
//! # Neighbouring relation, sensitivity and guarantee
//! **Zero-out** neighbouring, the unit being one user's whole update: one user's rounded
//! update x̃ is replaced by the zero vector while the user's device still takes part and adds
//! its noise share. The compared releases are `x̃ + Y` and `Y`, Y the sum of all noise shares
//! and the other users' updates; adding the target's own share (and any dishonest device's)
//! is post-processing, so the guarantee rests on N, the sum of the m other honest devices'
//! shares alone. This is the relation [`crate::PrivacyMode::Distributed`] states. It is
//! **not** add/remove-one: a user who leaves takes its noise share too, and the difference
//! of the two sums (update plus share) has no bounded norm.
//!
//! The L2 sensitivity is Δ₂ and the L1 sensitivity `Δ₁ = min{√d·Δ₂, Δ₂²}` (an integer
//! vector has |v_i| ≤ v_i²). By KLS21 Prop. 14 with Theorem 1's τ, one round is
//! (α, ε(α))-RDP for every α ≥ 1 with, writing σ² = m·s²,
//!
//! `ε(α) = min{ αΔ₂²/(2σ²) + τd,  (α/2)(Δ₂²/σ² + 2Δ₁τ/σ + τ²d),  (α/2)(Δ₂/σ + τ√d)² }`,
//! `τ = 10 Σ_{k=1}^{m−1} exp(−2π² s² · k/(k+1))`.
//!
//! τ measures how far a sum of discrete Gaussians is from one discrete Gaussian; it is at
//! most 10(m − 1)·e^(−π²s²), so for s ≥ 4 and m ≤ 10⁶ it is below 10⁻⁶⁰ and ε(α) is the
//! Gaussian mechanism's αΔ₂²/(2σ²). The theorem needs
//! s ≥ 1/2, which [`DistributedDiscreteGaussian::new`] enforces. The coordinator knows who
//! took part, so no amplification by sampling is claimed: rounds compose at q = 1.
//!
//! # Checked against
//! `tests/distributed_reference.rs` compares these values with an independent Python
//! computation of the same proposition and with the exact Rényi divergence of sums of discrete
//! Gaussians computed by convolution in 50-digit arithmetic (the bound must lie above it, and
//! close to it once τ is negligible); `tests/data/distributed_PROVENANCE.md` says how. KLS21
//! reports its accounting as plots, not tables, so there are no published figures to match
//! digit for digit.

use std::fmt::Debug;
use std::marker::PhantomData;

use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng};
use rand_core::Rng;
use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::noise::discrete::{DiscreteGaussian, MAX_SIGMA_SQUARED};
use crate::rdp::OrderGrid;
use crate::{Clipped, EpsilonAtOrder, PrivacyError, Provenance, RdpAccountant, Secure, Simulated};

/// Conditional randomised rounding gives up after this many tries (each fails with
/// probability at most β < 1; at KLS21's β = e^(−1/2) this is reached with probability
/// below 10⁻²¹⁷).
pub const MAX_ROUNDING_TRIES: u32 = 1000;

/// The distributed discrete Gaussian mechanism for one round's configuration. See the
/// module docs for the neighbouring relation, sensitivity and guarantee.
///
/// ```
/// use fedpref_privacy::{clip_l2, OrderGrid};
/// use fedpref_privacy::distributed::{DistributedDiscreteGaussian, SecureShareSampler};
///
/// // σ = 1 in total from 99 honest devices besides the target, C = 1, a 2⁻¹⁰ lattice.
/// let beta = (-0.5f64).exp();
/// let mechanism = DistributedDiscreteGaussian::for_noise_multiplier(1.0, 1.0 / 1024.0, 3, beta, 1.0, 99)?;
/// let update = clip_l2(vec![0.5, -2.0, 1.0], 1.0)?;
/// let share = mechanism.noised_share(&update, &mut SecureShareSampler::from_os()?)?;
/// assert_eq!(share.values().len(), 3); // integers, for secure aggregation
///
/// let spent = mechanism.epsilon_after(10, 1e-6, &OrderGrid::default())?;
/// assert!(spent.epsilon > 1.0 && spent.epsilon < 30.0);
/// # Ok::<(), fedpref_privacy::PrivacyError>(())
/// ```
///
/// It serialises as its six parameters and is checked by [`DistributedDiscreteGaussian::new`]
/// again when deserialised, so a mechanism received from elsewhere cannot skip the checks.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MechanismParams", into = "MechanismParams")]
pub struct DistributedDiscreteGaussian {
    clip_norm: f64,
    granularity: f64,
    dimension: usize,
    beta: f64,
    device_variance: u64,
    honest_devices: u64,
}

/// The serialised form of [`DistributedDiscreteGaussian`].
#[derive(Clone, Copy, Serialize, Deserialize)]
struct MechanismParams {
    clip_norm: f64,
    granularity: f64,
    dimension: usize,
    beta: f64,
    device_variance: u64,
    honest_devices: u64,
}

impl TryFrom<MechanismParams> for DistributedDiscreteGaussian {
    type Error = PrivacyError;
    fn try_from(p: MechanismParams) -> Result<Self, Self::Error> {
        Self::new(
            p.clip_norm,
            p.granularity,
            p.dimension,
            p.beta,
            p.device_variance,
            p.honest_devices,
        )
    }
}

impl From<DistributedDiscreteGaussian> for MechanismParams {
    fn from(m: DistributedDiscreteGaussian) -> Self {
        Self {
            clip_norm: m.clip_norm,
            granularity: m.granularity,
            dimension: m.dimension,
            beta: m.beta,
            device_variance: m.device_variance,
            honest_devices: m.honest_devices,
        }
    }
}

impl DistributedDiscreteGaussian {
    /// A mechanism with clip norm C, granularity γ (model units per lattice step), dimension
    /// d, conditional-rounding parameter β ∈ [0, 0.99] (0: no retries and the looser bound;
    /// KLS21 use e^(−1/2)),
    /// per-device noise variance s² in lattice units (an integer, 1 ≤ s² ≤ 2⁵²; s ≥ 1/2
    /// holds for every such integer), and m honest devices besides the target.
    pub fn new(
        clip_norm: f64,
        granularity: f64,
        dimension: usize,
        beta: f64,
        device_variance: u64,
        honest_devices: u64,
    ) -> Result<Self, PrivacyError> {
        check::positive("clip_norm", clip_norm)?;
        check::positive("granularity", granularity)?;
        if dimension == 0 {
            return Err(PrivacyError::invalid(
                "dimension",
                0.0,
                "must be at least 1",
            ));
        }
        if !(0.0..=0.99).contains(&beta) {
            return Err(PrivacyError::invalid("beta", beta, "must be in [0, 0.99]"));
        }
        if device_variance == 0 || device_variance > MAX_SIGMA_SQUARED {
            return Err(PrivacyError::invalid(
                "device_variance",
                device_variance as f64,
                "must be an integer in [1, 2^52] (lattice units squared)",
            ));
        }
        if honest_devices == 0 {
            return Err(PrivacyError::invalid(
                "honest_devices",
                0.0,
                "at least one honest device besides the target must add noise",
            ));
        }
        let c = clip_norm / granularity;
        if !c.is_finite() || c + (dimension as f64).sqrt() >= 2f64.powi(52) {
            return Err(PrivacyError::invalid(
                "granularity",
                granularity,
                "too fine for the clip norm: C/γ must stay below 2^52",
            ));
        }
        Ok(Self {
            clip_norm,
            granularity,
            dimension,
            beta,
            device_variance,
            honest_devices,
        })
    }

    /// The mechanism whose m honest devices' noise adds up to at least (σ·C)² of variance
    /// per coordinate, σ the noise multiplier: s² = ⌈(σC/γ)² / m⌉ (rounded up: never less
    /// noise than asked).
    pub fn for_noise_multiplier(
        clip_norm: f64,
        granularity: f64,
        dimension: usize,
        beta: f64,
        noise_multiplier: f64,
        honest_devices: u64,
    ) -> Result<Self, PrivacyError> {
        check::positive("noise_multiplier", noise_multiplier)?;
        check::positive("clip_norm", clip_norm)?;
        check::positive("granularity", granularity)?;
        if honest_devices == 0 {
            return Err(PrivacyError::invalid(
                "honest_devices",
                0.0,
                "at least one honest device besides the target must add noise",
            ));
        }
        let central = noise_multiplier * clip_norm / granularity;
        let variance = (central * central / honest_devices as f64).ceil().max(1.0);
        if !variance.is_finite() || variance > MAX_SIGMA_SQUARED as f64 {
            return Err(PrivacyError::invalid(
                "granularity",
                granularity,
                "too fine for this noise: the per-device variance would exceed 2^52 lattice units",
            ));
        }
        Self::new(
            clip_norm,
            granularity,
            dimension,
            beta,
            variance as u64,
            honest_devices,
        )
    }

    /// C.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }
    /// γ, model units per lattice step.
    pub fn granularity(&self) -> f64 {
        self.granularity
    }
    /// d.
    pub fn dimension(&self) -> usize {
        self.dimension
    }
    /// s², each device's noise variance in lattice units.
    pub fn device_variance(&self) -> u64 {
        self.device_variance
    }
    /// m, the honest devices besides the target.
    pub fn honest_devices(&self) -> u64 {
        self.honest_devices
    }
    /// Each device's noise standard deviation in model units, s·γ (for secure aggregation's
    /// overflow check).
    pub fn device_noise_std(&self) -> f64 {
        (self.device_variance as f64).sqrt() * self.granularity
    }

    /// Δ₂, the enforced bound on a rounded update's L2 norm, in lattice units.
    pub fn l2_sensitivity(&self) -> f64 {
        let c = self.clip_norm / self.granularity;
        let d = self.dimension as f64;
        let always = c + d.sqrt();
        if self.beta == 0.0 {
            return always;
        }
        let conditional =
            (c * c + d / 4.0 + (2.0 * (1.0 / self.beta).ln()).sqrt() * (c + d.sqrt() / 2.0)).sqrt();
        always.min(conditional)
    }

    /// Δ₁ = min{√d·Δ₂, Δ₂²}, in lattice units.
    pub fn l1_sensitivity(&self) -> f64 {
        let l2 = self.l2_sensitivity();
        ((self.dimension as f64).sqrt() * l2).min(l2 * l2)
    }

    /// τ = 10 Σ_{k=1}^{m−1} exp(−2π² s² k/(k+1)) (KLS21 Theorem 1).
    ///
    /// The terms fall with k, so beyond k = 2²⁰ (where they are within a factor
    /// e^(2π²s²/2²⁰) of their limit) the remaining ones are each bounded by the last term
    /// summed: the value is then an upper bound on τ, which keeps Prop. 14 valid, and the
    /// cost stays bounded for any m.
    pub fn tau(&self) -> f64 {
        const EXACT_TERMS: u64 = 1 << 20;
        let s2 = self.device_variance as f64;
        let term = |k: u64| {
            let kf = k as f64;
            (-2.0 * std::f64::consts::PI.powi(2) * s2 * kf / (kf + 1.0)).exp()
        };
        let mut tau = 0.0;
        let exact_end = self.honest_devices.min(EXACT_TERMS + 1);
        for k in 1..exact_end {
            let t = term(k);
            tau += t;
            if t == 0.0 {
                // Every later term is smaller still (k/(k+1) grows).
                return 10.0 * tau;
            }
        }
        if self.honest_devices > exact_end {
            tau += (self.honest_devices - exact_end) as f64 * term(exact_end - 1);
        }
        10.0 * tau
    }

    /// One round's RDP at order α ≥ 1 (KLS21 Prop. 14; see the module docs).
    pub fn rdp(&self, order: f64) -> f64 {
        self.rdp_with_tau(order, self.tau())
    }

    fn rdp_with_tau(&self, order: f64, tau: f64) -> f64 {
        let sigma = ((self.honest_devices as f64) * self.device_variance as f64).sqrt();
        let (l2, l1) = (self.l2_sensitivity(), self.l1_sensitivity());
        let d = self.dimension as f64;
        let l2_scale = l2 / sigma;
        let l1_scale = l1 / sigma;
        let term1 = order / 2.0 * l2_scale * l2_scale + tau * d;
        let term2 = order / 2.0 * (l2_scale * l2_scale + 2.0 * l1_scale * tau + tau * tau * d);
        let term3 = order / 2.0 * (l2_scale + d.sqrt() * tau).powi(2);
        term1.min(term2).min(term3)
    }

    /// One round's RDP at every order of the grid.
    pub fn rdp_curve(&self, orders: &OrderGrid) -> Vec<f64> {
        let tau = self.tau();
        orders
            .orders()
            .iter()
            .map(|&a| self.rdp_with_tau(a, tau))
            .collect()
    }

    /// Adds `rounds` rounds of this mechanism to an accountant (composition: RDP adds up).
    pub fn compose_into(
        &self,
        accountant: &mut RdpAccountant,
        rounds: u64,
    ) -> Result<(), PrivacyError> {
        accountant.compose_rdp(&self.rdp_curve(accountant.orders()), rounds)
    }

    /// ε after `rounds` rounds, at δ, over the grid (the crate's improved conversion).
    pub fn epsilon_after(
        &self,
        rounds: u64,
        delta: f64,
        orders: &OrderGrid,
    ) -> Result<EpsilonAtOrder, PrivacyError> {
        let mut accountant = RdpAccountant::new(orders.clone());
        self.compose_into(&mut accountant, rounds)?;
        accountant.epsilon(delta)
    }

    /// The smallest integer per-device variance s² whose ε after `rounds` rounds is at most
    /// the target (bisection; ε is non-increasing in s²).
    pub fn calibrate(
        target_epsilon: f64,
        delta: f64,
        rounds: u64,
        template: &Self,
        orders: &OrderGrid,
    ) -> Result<Self, PrivacyError> {
        check::positive("target_epsilon", target_epsilon)?;
        let at = |variance: u64| -> Result<(Self, f64), PrivacyError> {
            let m = Self {
                device_variance: variance,
                ..*template
            };
            let e = m.epsilon_after(rounds, delta, orders)?.epsilon;
            Ok((m, e))
        };
        let (mut lo, mut hi) = (1u64, MAX_SIGMA_SQUARED);
        let (best, e_hi) = at(hi)?;
        if e_hi > target_epsilon {
            return Err(PrivacyError::Calibration(
                "no per-device variance up to 2^52 lattice units meets the target ε; use a \
                 coarser granularity",
            ));
        }
        let mut best = best;
        if at(lo)?.1 <= target_epsilon {
            return Ok(at(lo)?.0);
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let (m, e) = at(mid)?;
            if e <= target_epsilon {
                hi = mid;
                best = m;
            } else {
                lo = mid;
            }
        }
        Ok(best)
    }

    /// A device's noised share: its clipped update scaled, rounded (conditionally, randomly)
    /// and noised in integers, ready for secure aggregation. The sampler decides the share's
    /// provenance.
    pub fn noised_share<S: ShareSampler>(
        &self,
        update: &Clipped,
        sampler: &mut S,
    ) -> Result<NoisedShare<S::Provenance>, PrivacyError> {
        if update.dimension() != self.dimension {
            return Err(PrivacyError::DimensionMismatch {
                expected: self.dimension,
                actual: update.dimension(),
            });
        }
        if update.clip_norm() > self.clip_norm * (1.0 + 1e-12) {
            return Err(PrivacyError::invalid(
                "clip_norm",
                update.clip_norm(),
                "the update was clipped to a larger norm than the mechanism's",
            ));
        }
        let mut values = self.round(update.values(), sampler)?;
        let gaussian = DiscreteGaussian::new(self.device_variance).expect("checked in new");
        sampler.add_noise(&mut values, &gaussian);
        Ok(NoisedShare {
            values,
            mechanism: *self,
            provenance: PhantomData,
        })
    }

    /// Conditional randomised rounding of x/γ to Z^d with ‖·‖₂ ≤ Δ₂.
    fn round<S: ShareSampler>(
        &self,
        values: &[f64],
        sampler: &mut S,
    ) -> Result<Vec<i64>, PrivacyError> {
        let bound = self.l2_sensitivity();
        // Compared in integers: Σ r_i² ≤ ⌊Δ₂²⌋ ⇔ ‖r‖₂ ≤ Δ₂ for integer r.
        let bound_sq = (bound * bound).floor() as u128;
        let scaled: Vec<f64> = values.iter().map(|v| v / self.granularity).collect();
        let mut rounded = vec![0i64; scaled.len()];
        for _ in 0..MAX_ROUNDING_TRIES {
            let mut norm_sq: u128 = 0;
            for (r, &v) in rounded.iter_mut().zip(&scaled) {
                let floor = v.floor();
                let frac = v - floor;
                // P[up] = frac, by comparing 64 uniform bits with frac·2⁶⁴.
                let up = (sampler.next_u64() as f64) < frac * 18_446_744_073_709_551_616.0;
                *r = floor as i64 + i64::from(up);
                norm_sq += u128::from(r.unsigned_abs()) * u128::from(r.unsigned_abs());
            }
            if norm_sq <= bound_sq {
                return Ok(rounded);
            }
        }
        Err(PrivacyError::Unsupported(
            "conditional randomised rounding failed 1000 times in a row; the update is not \
             clipped to the mechanism's norm",
        ))
    }
}

/// One device's noised integer share. Only [`DistributedDiscreteGaussian::noised_share`]
/// makes one, and its type says which sampler drew the noise: only a
/// `NoisedShare<Secure>` may be uploaded.
#[derive(Clone, PartialEq)]
pub struct NoisedShare<P: Provenance> {
    values: Vec<i64>,
    mechanism: DistributedDiscreteGaussian,
    provenance: PhantomData<P>,
}

impl<P: Provenance> Debug for NoisedShare<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NoisedShare<{}> {{ dimension: {}, .. }}",
            P::NAME,
            self.values.len()
        )
    }
}

impl<P: Provenance> NoisedShare<P> {
    /// The integer values (lattice units): rounded update plus noise.
    pub fn values(&self) -> &[i64] {
        &self.values
    }
    /// The integer values, by value.
    pub fn into_values(self) -> Vec<i64> {
        self.values
    }
    /// The mechanism that made it.
    pub fn mechanism(&self) -> &DistributedDiscreteGaussian {
        &self.mechanism
    }
    /// "secure" or "simulated".
    pub fn provenance(&self) -> &'static str {
        P::NAME
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A source of randomness for rounding and noise shares. Sealed: see [`SecureShareSampler`]
/// and [`SimulationShareSampler`].
pub trait ShareSampler: sealed::Sealed {
    /// The provenance of the shares it makes.
    type Provenance: Provenance;
    /// 64 uniform bits (for randomised rounding).
    fn next_u64(&mut self) -> u64;
    /// Adds an independent draw of `gaussian` to every value.
    fn add_noise(&mut self, values: &mut [i64], gaussian: &DiscreteGaussian);
}

/// The production sampler: ChaCha20 seeded with 256 bits from the operating system, as the
/// crate's [`crate::SecureSampler`].
pub struct SecureShareSampler {
    rng: ChaCha20Rng,
}

impl Debug for SecureShareSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecureShareSampler { .. }")
    }
}

impl SecureShareSampler {
    /// A sampler seeded from the operating system's random source.
    pub fn from_os() -> Result<Self, PrivacyError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng).map_err(|_| {
            PrivacyError::Unsupported("the operating system's random source failed")
        })?;
        Ok(Self { rng })
    }
}

impl sealed::Sealed for SecureShareSampler {}
impl ShareSampler for SecureShareSampler {
    type Provenance = Secure;
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    fn add_noise(&mut self, values: &mut [i64], gaussian: &DiscreteGaussian) {
        for v in values {
            *v = v.saturating_add(gaussian.sample(&mut self.rng));
        }
    }
}

/// The simulation sampler: the same algorithms from a seeded ChaCha20, reproducible for a
/// seed. Its shares are `NoisedShare<Simulated>`, which nothing that uploads accepts.
#[derive(Debug)]
pub struct SimulationShareSampler {
    rng: ChaCha20Rng,
}

impl SimulationShareSampler {
    /// A sampler from a 64-bit seed.
    pub fn seed_from_u64(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
}

impl sealed::Sealed for SimulationShareSampler {}
impl ShareSampler for SimulationShareSampler {
    type Provenance = Simulated;
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    fn add_noise(&mut self, values: &mut [i64], gaussian: &DiscreteGaussian) {
        for v in values {
            *v = v.saturating_add(gaussian.sample(&mut self.rng));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{clip_l2, rdp::gaussian_rdp};

    fn mechanism(variance: u64, m: u64) -> DistributedDiscreteGaussian {
        DistributedDiscreteGaussian::new(1.0, 1.0 / 1024.0, 100, 0.0, variance, m).unwrap()
    }

    #[test]
    fn with_negligible_tau_the_rdp_is_the_gaussian_mechanisms() {
        let m = mechanism(10_000, 50);
        assert_eq!(m.tau(), 0.0);
        let sigma = (50.0f64 * 10_000.0).sqrt();
        for &a in &[1.5, 2.0, 10.0, 64.0] {
            let expected = gaussian_rdp(a, sigma / m.l2_sensitivity());
            assert!((m.rdp(a) - expected).abs() <= 1e-15 * expected, "α={a}");
        }
        // Δ₂ with β = 0 is c + √d.
        assert_eq!(m.l2_sensitivity(), 1024.0 + 10.0);
    }

    #[test]
    fn small_device_noise_pays_for_the_sum_not_being_a_discrete_gaussian() {
        let m = DistributedDiscreteGaussian::new(1.0, 0.5, 4, 0.0, 1, 10).unwrap();
        assert!(m.tau() > 1e-9);
        let sigma = 10f64.sqrt();
        assert!(m.rdp(2.0) > gaussian_rdp(2.0, sigma / m.l2_sensitivity()));
    }

    #[test]
    fn conditional_rounding_bound_is_tighter_than_the_trivial_one() {
        let loose = DistributedDiscreteGaussian::new(1.0, 1e-3, 16_384, 0.0, 1, 10).unwrap();
        let tight =
            DistributedDiscreteGaussian::new(1.0, 1e-3, 16_384, (-0.5f64).exp(), 1, 10).unwrap();
        assert!(tight.l2_sensitivity() < loose.l2_sensitivity());
        assert!(tight.l2_sensitivity() > 1000.0);
    }

    #[test]
    fn shares_respect_the_norm_bound_and_are_unbiased() {
        let mech = DistributedDiscreteGaussian::new(1.0, 0.01, 50, (-0.5f64).exp(), 1, 10).unwrap();
        let clipped = clip_l2(vec![0.137; 50], 1.0).unwrap();
        let mut sampler = SimulationShareSampler::seed_from_u64(5);
        let mut sum = vec![0f64; 50];
        let trials = 4000;
        for _ in 0..trials {
            let rounded = mech.round(clipped.values(), &mut sampler).unwrap();
            let norm = rounded.iter().map(|&r| (r * r) as f64).sum::<f64>().sqrt();
            assert!(norm <= mech.l2_sensitivity());
            for (s, r) in sum.iter_mut().zip(&rounded) {
                *s += *r as f64;
            }
        }
        let target = clipped.values()[0] / 0.01;
        let mean = sum.iter().sum::<f64>() / (50.0 * trials as f64);
        // Rounding to ⌊v⌋ or ⌈v⌉ with the right odds: mean within 0.01 of v (σ ≈ 0.001).
        assert!((mean - target).abs() < 0.01, "mean {mean} vs {target}");
    }

    #[test]
    fn conditional_rounding_enforces_the_bound_where_plain_rounding_would_break_it() {
        // c = 5, d = 100, β = 0.99: Δ₂² = 50 + 10·√(2 ln(1/0.99)) ≈ 51.42. Every coordinate is
        // 0.5, so a plain randomised rounding has Binomial(100, 1/2) ones and a squared norm
        // above 51 about 38 % of the time; the conditional rounding must retry those.
        let mech = DistributedDiscreteGaussian::new(5.0, 1.0, 100, 0.99, 1, 10).unwrap();
        let bound_sq = mech.l2_sensitivity().powi(2);
        assert!((51.0..52.0).contains(&bound_sq), "{bound_sq}");
        let clipped = clip_l2(vec![0.5; 100], 5.0).unwrap();
        let mut sampler = SimulationShareSampler::seed_from_u64(11);
        let trials = 2000;
        let mut ones = 0i64;
        for _ in 0..trials {
            let rounded = mech.round(clipped.values(), &mut sampler).unwrap();
            assert!(rounded.iter().all(|&r| r == 0 || r == 1));
            let norm_sq: i64 = rounded.iter().map(|r| r * r).sum();
            assert!(
                norm_sq <= 51,
                "squared norm {norm_sq} above Δ₂² = {bound_sq}"
            );
            ones += norm_sq;
        }
        // Conditioning on ≤ 51 ones moves the mean from 50 to about 47.4.
        let mean = ones as f64 / f64::from(trials);
        assert!(mean < 48.5, "mean {mean}: the bound was not binding");
    }

    #[test]
    fn tau_stays_quick_and_an_upper_bound_for_any_number_of_devices() {
        let huge = DistributedDiscreteGaussian::new(1.0, 0.5, 4, 0.0, 1, u64::MAX).unwrap();
        let start = std::time::Instant::now();
        let tau = huge.tau();
        let curve = huge.rdp_curve(&OrderGrid::default());
        assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
        // Every term is at least its limit e^(−2π²s²) and at most e^(−π²s²).
        let m1 = (u64::MAX - 1) as f64;
        let pi2 = std::f64::consts::PI.powi(2);
        assert!(tau >= 10.0 * m1 * (-2.0 * pi2).exp(), "{tau}");
        assert!(tau <= 10.0 * m1 * (-pi2).exp(), "{tau}");
        assert!(curve.iter().all(|r| r.is_finite() && *r > 0.0));
        // Below the cut-off the sum is exact: one term more than 2²⁰ devices' worth.
        let at_cut = DistributedDiscreteGaussian::new(1.0, 0.5, 4, 0.0, 1, (1 << 20) + 1).unwrap();
        let past_cut =
            DistributedDiscreteGaussian::new(1.0, 0.5, 4, 0.0, 1, (1 << 20) + 2).unwrap();
        let last = (-2.0 * pi2 * 1_048_576.0 / 1_048_577.0).exp();
        assert!((past_cut.tau() - at_cut.tau() - 10.0 * last).abs() <= 1e-9 * at_cut.tau());
    }

    #[test]
    fn a_deserialised_mechanism_is_checked_again() {
        let m = mechanism(100, 5);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            serde_json::from_str::<DistributedDiscreteGaussian>(&json).unwrap(),
            m
        );
        for (field, bad) in [
            ("\"device_variance\":100", "\"device_variance\":0"),
            ("\"honest_devices\":5", "\"honest_devices\":0"),
            ("\"beta\":0.0", "\"beta\":2.0"),
        ] {
            let forged = json.replace(field, bad);
            assert_ne!(forged, json);
            let e = serde_json::from_str::<DistributedDiscreteGaussian>(&forged).unwrap_err();
            let name = field.split('"').nth(1).unwrap();
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn share_noise_has_the_configured_variance() {
        let mech = DistributedDiscreteGaussian::new(1.0, 1.0, 20_000, 0.0, 400, 10).unwrap();
        let zero = clip_l2(vec![0.0; 20_000], 1.0).unwrap();
        let share = mech
            .noised_share(&zero, &mut SimulationShareSampler::seed_from_u64(9))
            .unwrap();
        assert_eq!(share.provenance(), "simulated");
        let var = share.values().iter().map(|&v| (v * v) as f64).sum::<f64>() / 20_000.0;
        assert!((var - 400.0).abs() < 400.0 * 0.05, "variance {var}");
        let secure = mech
            .noised_share(&zero, &mut SecureShareSampler::from_os().unwrap())
            .unwrap();
        assert_eq!(secure.provenance(), "secure");
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let e = DistributedDiscreteGaussian::new(1.0, 0.01, 10, 1.0, 1, 1).unwrap_err();
        assert!(e.to_string().contains("beta"), "{e}");
        let e = DistributedDiscreteGaussian::new(1.0, 0.01, 10, 0.0, 0, 1).unwrap_err();
        assert!(e.to_string().contains("device_variance"), "{e}");
        let e = DistributedDiscreteGaussian::new(1.0, 0.01, 10, 0.0, 1, 0).unwrap_err();
        assert!(e.to_string().contains("honest_devices"), "{e}");
        let m = mechanism(100, 5);
        let wrong = clip_l2(vec![0.0; 3], 1.0).unwrap();
        assert!(matches!(
            m.noised_share(&wrong, &mut SimulationShareSampler::seed_from_u64(1)),
            Err(PrivacyError::DimensionMismatch { .. })
        ));
    }

    #[test]
    fn calibration_meets_the_target_and_one_less_does_not() {
        let grid = OrderGrid::default();
        let template = mechanism(1, 100);
        let m = DistributedDiscreteGaussian::calibrate(2.0, 1e-5, 100, &template, &grid).unwrap();
        assert!(m.epsilon_after(100, 1e-5, &grid).unwrap().epsilon <= 2.0);
        let less = DistributedDiscreteGaussian {
            device_variance: m.device_variance - 1,
            ..m
        };
        assert!(less.epsilon_after(100, 1e-5, &grid).unwrap().epsilon > 2.0);
    }
}
