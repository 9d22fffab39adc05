//! The Gaussian mechanism, and the two samplers that may drive it.
//!
//! # The mechanism
//! [`GaussianMechanism`] with noise multiplier σ and clip norm C releases a clipped update
//! (or a sum of clipped updates) plus noise of standard deviation σ·C on every coordinate:
//!
//! - for one device's update ([`GaussianMechanism::release_update`], local mode): under
//!   replace-one neighbouring the L2 sensitivity is 2C, so each release is
//!   (α, α·(2C)²/(2(σC)²)) = (α, 2α/σ²)-RDP;
//! - for a sum of clipped updates ([`GaussianMechanism::release_sum`], central mode): under
//!   add/remove-one neighbouring the sensitivity is C, and the release is (α, α/(2σ²))-RDP,
//!   amplified by Poisson sampling as in [`crate::rdp`].
//!
//! # Lattice and floating-point safety (Mironov 2012)
//! Noise drawn as a floating-point Gaussian and added to a float leaks the input through the
//! low-order bits of the output. The production path therefore works on a lattice: values
//! are first scaled by `1 − η`, rounded to the lattice gZ with `g = σC/2²⁶`, then the integer
//! noise g·N_Z(0, 2⁵²) — an exact discrete Gaussian ([`discrete`]) with scale σC in real
//! units (its variance is below 2⁵² by a relative e^(−2π²·2⁵²), i.e. σ²C² to every digit) —
//! is added **in integers**. The output is an integer vector
//! times g: a post-processing of the integer release, which carries no extra information.
//!
//! Rounding moves each coordinate by at most ½ lattice step, so two neighbouring inputs may
//! differ by up to √d more steps than their real distance. The shrink `η = 2g√d/C` pays for
//! that (and for the f64 rounding of the scaling, with a factor 2 to spare): after it, the
//! lattice sensitivity is at most C/g (sums) or 2C/g (single updates), exactly the
//! sensitivity the accountant assumes. For a 16,384-coordinate update and σ = 1, η ≈ 3.8e-6.
//! The discrete Gaussian's Rényi divergence at lattice shifts is at most the continuous
//! Gaussian's (Canonne, Kamath, Steinke 2020, Sec. 2: the theta function peaks at integer
//! shifts), so the unsampled releases — local mode, and central mode at q = 1 — are bounded
//! by [`crate::rdp`] with no approximation.
//!
//! For the Poisson-subsampled release (central mode, q < 1) the add/remove relation needs two
//! divergences. D_α(mixture ‖ base) at integer orders is identical to the continuous case term
//! by term (the discrete Gaussian's moment generating function at integer shifts equals the
//! continuous one). The reverse direction D_α(base ‖ mixture), which Mironov, Talwar, Zhang
//! 2019 bound by the first for the continuous Gaussian, is **not proven here** for the
//! lattice; an independent numerical check of the one-dimensional case (S ∈ {0.25 … 4},
//! shifts 1–3, q ∈ {0.01 … 0.9}, α ∈ {1.5 … 5}) found it below the forward one everywhere.
//! Fractional orders rely on the continuous analysis, from which this lattice (2²⁶ steps per
//! σC) departs by a relative e^(−Ω(2⁵²)) by Poisson summation. We state both as what they
//! are: the sampled ε is the continuous Gaussian's, which the lattice matches far below f64
//! precision, not a separately proven bound for the lattice.
//!
//! # Why not OpenDP's sampler
//! The design names OpenDP. Its `make_gaussian` costs about 6.7 µs per coordinate here even
//! on a coarse grid (110 ms for a 16,384-coordinate update; a phone does this every round),
//! and without its `use-openssl` feature it draws from rand 0.7's `thread_rng`, which
//! OpenDP's own docs call non-secure. The sampler here implements the same algorithm (CKS
//! 2020, Algorithms 1–3) in fixed-width integers, from ChaCha20, at about 0.25 µs per
//! coordinate; `tests/properties.rs` compares its distribution with OpenDP's.
//!
//! Its running time depends on the noise drawn (rejection sampling), so an observer who can
//! time a device's noising learns a little about the noise; uploads are sent after noising
//! completes, and nothing here is constant-time.
//!
//! # Two samplers, kept apart by types
//! - [`SecureSampler`] (production): the exact discrete Gaussian above, from ChaCha20
//!   seeded from the operating system. Its releases are `Released<Secure>`.
//! - [`SimulationSampler`] (simulations only): a ziggurat Gaussian from a seeded
//!   Xoshiro256++, reproducible and cheap, added in floating point to the shrunk values
//!   (no lattice rounding). Its releases are `Released<Simulated>`. The ziggurat is our own
//!   (module `ziggurat`): 512 layers, one 64-bit word per sample on the fast path, exact
//!   tail and wedge tests, tables from `libm` so that a seed gives the same bits on every
//!   platform.
//!
//! Only this crate can make a `Released<Secure>`, and only from a `SecureSampler`; code that
//! uploads or publishes takes `Released<Secure>`, so a simulation release cannot reach it.

pub mod discrete;
mod ziggurat;

use std::fmt::Debug;
use std::marker::PhantomData;

use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng, Xoshiro256PlusPlus};

use crate::error::check;
use crate::{Clipped, PrivacyError};
use discrete::DiscreteGaussian;
use ziggurat::Ziggurat;

/// Lattice steps per σC: the discrete Gaussian's standard deviation in lattice units.
pub const LATTICE_STEPS_PER_SIGMA: f64 = (1u64 << 26) as f64;
/// Smallest noise multiplier the mechanism takes (below it lattice coordinates could
/// exceed 2⁵³; such σ give no meaningful privacy anyway).
pub const MIN_NOISE_MULTIPLIER: f64 = 1e-3;
/// Largest allowed rounding shrink η; beyond it the dimension is too large for σ.
pub const MAX_LATTICE_SHRINK: f64 = 0.01;

mod sealed {
    pub trait Sealed {}
}

/// Where a release's noise came from. Sealed: the two kinds are [`Secure`] and [`Simulated`].
pub trait Provenance: sealed::Sealed + Copy + Debug + Send + Sync + 'static {
    /// A name for logs and errors.
    const NAME: &'static str;
}

/// Noise from [`SecureSampler`]: floating-point safe, from a CSPRNG. Only these releases may
/// leave a device or be published by the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secure {}
/// Noise from [`SimulationSampler`]: seeded and fast, for simulations only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simulated {}

impl sealed::Sealed for Secure {}
impl sealed::Sealed for Simulated {}
impl Provenance for Secure {
    const NAME: &'static str = "secure";
}
impl Provenance for Simulated {
    const NAME: &'static str = "simulated";
}

/// A sampler that adds the mechanism's noise. Sealed: see [`SecureSampler`] and
/// [`SimulationSampler`].
pub trait GaussianSampler: sealed::Sealed {
    /// The provenance its releases carry.
    type Provenance: Provenance;
    /// Replaces each clipped value x by `(1 − η)·x` plus noise of std σC, in place.
    fn perturb(&mut self, values: &mut [f64], lattice: &Lattice);
    /// Returns `g·n` plus noise of std σC for each lattice point n.
    fn perturb_points(&mut self, points: &[i64], lattice: &Lattice) -> Vec<f64>;
}

/// The lattice a release is rounded to: step g = σC/2²⁶ and the shrink η applied first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lattice {
    /// The lattice step g.
    pub step: f64,
    /// The shrink η (values are multiplied by 1 − η before rounding).
    pub shrink: f64,
    /// The noise standard deviation σC, in real units.
    pub noise_std: f64,
}

impl Lattice {
    /// The lattice point nearest to `(1 − η)·x`, as an integer number of steps.
    #[inline]
    fn point(&self, x: f64) -> i64 {
        round_to_integer(x * ((1.0 - self.shrink) / self.step))
    }
}

/// Round half to even by the 1.5·2⁵² trick: exact for |x| < 2⁵¹, and several times faster
/// than `f64::round` on x86-64 without SSE4.1. Lattice coordinates are below 2³⁷ because
/// σ ≥ 0.001 and |x| ≤ C.
#[inline]
fn round_to_integer(x: f64) -> i64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    ((x + MAGIC) - MAGIC) as i64
}

/// The Gaussian mechanism with noise multiplier σ and clip norm C (noise std σC).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaussianMechanism {
    noise_multiplier: f64,
    clip_norm: f64,
}

impl GaussianMechanism {
    /// A mechanism with noise std σ·C. σ must be at least [`MIN_NOISE_MULTIPLIER`].
    pub fn new(noise_multiplier: f64, clip_norm: f64) -> Result<Self, PrivacyError> {
        let noise_multiplier = check::positive("noise_multiplier", noise_multiplier)?;
        let clip_norm = check::positive("clip_norm", clip_norm)?;
        if noise_multiplier < MIN_NOISE_MULTIPLIER {
            return Err(PrivacyError::invalid(
                "noise_multiplier",
                noise_multiplier,
                "must be at least 0.001 for the lattice sampler",
            ));
        }
        Ok(Self {
            noise_multiplier,
            clip_norm,
        })
    }

    /// σ.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// C.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The noise standard deviation σC.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }

    /// The lattice for a release of `dimension` coordinates.
    pub fn lattice(&self, dimension: usize) -> Result<Lattice, PrivacyError> {
        let step = self.noise_std() / LATTICE_STEPS_PER_SIGMA;
        let shrink = 2.0 * step * (dimension as f64).sqrt() / self.clip_norm;
        if shrink > MAX_LATTICE_SHRINK {
            return Err(PrivacyError::invalid(
                "noise_multiplier",
                self.noise_multiplier,
                "too large for this many coordinates: the lattice rounding margin 2σ√d/2^26 would exceed 1%",
            ));
        }
        Ok(Lattice {
            step,
            shrink,
            noise_std: self.noise_std(),
        })
    }

    fn check_clip(&self, clipped: &Clipped) -> Result<(), PrivacyError> {
        if clipped.clip_norm() > self.clip_norm {
            return Err(PrivacyError::invalid(
                "clip_norm",
                clipped.clip_norm(),
                "the update was clipped to a larger norm than the mechanism's clip norm",
            ));
        }
        Ok(())
    }

    /// Releases one device's clipped update with noise (local mode; in distributed mode,
    /// with the device's share of σ). Replace-one sensitivity 2C.
    pub fn release_update<S: GaussianSampler>(
        &self,
        clipped: Clipped,
        sampler: &mut S,
    ) -> Result<Released<S::Provenance>, PrivacyError> {
        self.check_clip(&clipped)?;
        let lattice = self.lattice(clipped.dimension())?;
        let mut values = clipped.into_values();
        sampler.perturb(&mut values, &lattice);
        Ok(Released::new(values, self.noise_std()))
    }

    /// An empty sum of clipped updates for [`GaussianMechanism::release_sum`].
    pub fn sum(&self, dimension: usize) -> Result<ClippedSum, PrivacyError> {
        Ok(ClippedSum {
            lattice: self.lattice(dimension)?,
            clip_norm: self.clip_norm,
            points: vec![0; dimension],
            contributions: 0,
        })
    }

    /// Releases a sum of clipped updates with noise (central mode). Add/remove-one
    /// sensitivity C.
    pub fn release_sum<S: GaussianSampler>(
        &self,
        sum: ClippedSum,
        sampler: &mut S,
    ) -> Result<Released<S::Provenance>, PrivacyError> {
        if sum.clip_norm > self.clip_norm || sum.lattice != self.lattice(sum.points.len())? {
            return Err(PrivacyError::Unsupported(
                "the sum was built for a different mechanism",
            ));
        }
        Ok(Released::new(
            sampler.perturb_points(&sum.points, &sum.lattice),
            self.noise_std(),
        ))
    }
}

/// A running sum of clipped, weighted updates, held exactly on the mechanism's lattice so
/// that one contribution moves it by at most C/g lattice steps whatever else is in it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClippedSum {
    lattice: Lattice,
    clip_norm: f64,
    points: Vec<i64>,
    contributions: u64,
}

impl ClippedSum {
    /// Adds one clipped update with weight w ∈ [0, 1] (a weight above 1 would raise the
    /// sensitivity past C).
    pub fn add(&mut self, clipped: &Clipped, weight: f64) -> Result<(), PrivacyError> {
        if !(0.0..=1.0).contains(&weight) {
            return Err(PrivacyError::invalid("weight", weight, "must be in [0, 1]"));
        }
        if clipped.clip_norm() > self.clip_norm {
            return Err(PrivacyError::invalid(
                "clip_norm",
                clipped.clip_norm(),
                "the update was clipped to a larger norm than the mechanism's clip norm",
            ));
        }
        if clipped.dimension() != self.points.len() {
            return Err(PrivacyError::DimensionMismatch {
                expected: self.points.len(),
                actual: clipped.dimension(),
            });
        }
        // Check first, then add in place, so that a refused update leaves nothing behind
        // and no allocation is made per contribution.
        let lattice = self.lattice;
        let fits = self
            .points
            .iter()
            .zip(clipped.values())
            .all(|(total, &x)| total.checked_add(lattice.point(weight * x)).is_some());
        if !fits {
            return Err(PrivacyError::Unsupported(
                "the lattice sum overflowed: too many contributions for this σ",
            ));
        }
        for (total, &x) in self.points.iter_mut().zip(clipped.values()) {
            *total += lattice.point(weight * x);
        }
        self.contributions += 1;
        Ok(())
    }

    /// The number of contributions added.
    pub fn contributions(&self) -> u64 {
        self.contributions
    }

    /// The sum's lattice and its exact points (integer numbers of steps), for aggregators in
    /// this crate that keep building on the sum.
    pub(crate) fn lattice_and_points(&self) -> (Lattice, &[i64]) {
        (self.lattice, &self.points)
    }

    /// The current (un-noised) sum, in real units; for diagnostics inside a trusted
    /// coordinator only.
    pub fn unnoised(&self) -> Vec<f64> {
        self.points
            .iter()
            .map(|&n| n as f64 * self.lattice.step)
            .collect()
    }
}

/// A noised release. `Released<Secure>` is the only type that may be uploaded or published.
#[derive(Clone, Debug, PartialEq)]
pub struct Released<P: Provenance> {
    values: Vec<f64>,
    noise_std: f64,
    provenance: PhantomData<P>,
}

impl<P: Provenance> Released<P> {
    fn new(values: Vec<f64>, noise_std: f64) -> Self {
        Self {
            values,
            noise_std,
            provenance: PhantomData,
        }
    }

    /// The released coordinates.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Post-processing: the release with `f` applied to each coordinate (same provenance and
    /// noise; post-processing cannot weaken a DP guarantee).
    pub fn map_values(mut self, f: impl Fn(f64) -> f64) -> Self {
        for v in &mut self.values {
            *v = f(*v);
        }
        self
    }

    /// The released coordinates, by value.
    pub fn into_values(self) -> Vec<f64> {
        self.values
    }

    /// The standard deviation of the noise that was added (σC).
    pub fn noise_std(&self) -> f64 {
        self.noise_std
    }

    /// Where the noise came from.
    pub fn provenance(&self) -> &'static str {
        P::NAME
    }
}

/// The production sampler: exact discrete Gaussian noise on the lattice, from a ChaCha20
/// CSPRNG seeded from the operating system.
pub struct SecureSampler {
    rng: ChaCha20Rng,
    gaussian: DiscreteGaussian,
}

impl Debug for SecureSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the RNG state.
        f.write_str("SecureSampler { .. }")
    }
}

impl SecureSampler {
    /// A sampler seeded with 256 bits from the operating system's random source.
    pub fn from_os() -> Result<Self, PrivacyError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng).map_err(|_| {
            PrivacyError::Unsupported("the operating system's random source failed")
        })?;
        Ok(Self {
            rng,
            gaussian: DiscreteGaussian::new(discrete::MAX_SIGMA_SQUARED).expect("2^52 is in range"),
        })
    }
}

impl sealed::Sealed for SecureSampler {}
impl GaussianSampler for SecureSampler {
    type Provenance = Secure;
    fn perturb(&mut self, values: &mut [f64], lattice: &Lattice) {
        for v in values {
            let n = lattice.point(*v);
            *v = n.saturating_add(self.gaussian.sample(&mut self.rng)) as f64 * lattice.step;
        }
    }
    fn perturb_points(&mut self, points: &[i64], lattice: &Lattice) -> Vec<f64> {
        points
            .iter()
            .map(|&n| n.saturating_add(self.gaussian.sample(&mut self.rng)) as f64 * lattice.step)
            .collect()
    }
}

/// The simulation sampler: a ziggurat standard normal from a seeded Xoshiro256++, added in
/// floating point. Deterministic for a seed (the same bits on every platform); **not** safe
/// for real releases, and its type keeps it out of them.
///
/// The normal is our 512-layer ziggurat (Marsaglia & Tsang 2000, exact tail and wedge
/// tests; see `noise/ziggurat.rs`), not `rand_distr::StandardNormal`: its fast path draws
/// one word and makes no call, and noise is drawn a batch at a time so the generator's
/// state stays in registers. Measured on the development machine (AMD EPYC, 2 cores), per
/// coordinate at d = 16,384: with `cargo bench -p fedpref-privacy --bench noise --
/// "d=16384"` on a quiet machine, one Xoshiro256++ word ≈ 1.0 ns and
/// `rand_distr::StandardNormal` ≈ 3.7 ns; noising (`clip_and_noise/simulation` −
/// `clip_only`) went from ≈ 2.7 ns with `StandardNormal` to ≈ 1.6–1.8 ns (≈ 1.7× the
/// generator; best of 40 timings of `perturb` alone: 1.61 ns against 0.95 ns for the bare
/// generator). The bench's difference of two allocating benchmarks is noisy: under load
/// the same code has read from 1.1× to 2.6×.
#[derive(Clone, Debug)]
pub struct SimulationSampler {
    rng: Xoshiro256PlusPlus,
}

impl SimulationSampler {
    /// A sampler from a 64-bit seed.
    pub fn seed_from_u64(seed: u64) -> Self {
        Self {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// An independent stream for a seed and a path of stream ids (e.g. `[round, client]`):
    /// the ids are mixed into the seed with SplitMix64, so each path gets its own stream.
    pub fn for_stream(seed: u64, stream: &[u64]) -> Self {
        let mixed = stream.iter().fold(splitmix64(seed), |acc, &id| {
            splitmix64(acc ^ splitmix64(id))
        });
        Self::seed_from_u64(mixed)
    }

    /// Adds N(0, std²) to every value in place, without a lattice (for simulated
    /// mechanisms outside [`GaussianMechanism`], e.g. a noised count).
    pub fn add_gaussian(&mut self, values: &mut [f64], std: f64) {
        Ziggurat::get().apply_samples(&mut self.rng, values, |v, z| *v += std * z);
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl sealed::Sealed for SimulationSampler {}
impl GaussianSampler for SimulationSampler {
    type Provenance = Simulated;
    /// Floating-point noise on the shrunk value, without rounding to the lattice: nothing a
    /// simulation computes leaves the machine, so the rounding (a 2⁻²⁶·σC move) is skipped.
    fn perturb(&mut self, values: &mut [f64], lattice: &Lattice) {
        let keep = 1.0 - lattice.shrink;
        let std = lattice.noise_std;
        Ziggurat::get().apply_samples(&mut self.rng, values, |v, z| *v = *v * keep + std * z);
    }
    fn perturb_points(&mut self, points: &[i64], lattice: &Lattice) -> Vec<f64> {
        let mut values: Vec<f64> = points.iter().map(|&n| n as f64 * lattice.step).collect();
        let std = lattice.noise_std;
        Ziggurat::get().apply_samples(&mut self.rng, &mut values, |v, z| *v += std * z);
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip_l2;

    #[test]
    fn mechanism_rejects_bad_parameters_naming_them() {
        let e = GaussianMechanism::new(0.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("noise_multiplier"));
        let e = GaussianMechanism::new(1.0, -2.0).unwrap_err();
        assert!(e.to_string().contains("clip_norm"));
        let e = GaussianMechanism::new(1e-4, 1.0).unwrap_err();
        assert!(e.to_string().contains("0.001"));
    }

    #[test]
    fn simulation_sampler_is_deterministic_per_seed_and_stream() {
        let mech = GaussianMechanism::new(1.0, 1.0).unwrap();
        let update = clip_l2(vec![0.1; 64], 1.0).unwrap();
        let a = mech
            .release_update(
                update.clone(),
                &mut SimulationSampler::for_stream(7, &[1, 2]),
            )
            .unwrap();
        let b = mech
            .release_update(
                update.clone(),
                &mut SimulationSampler::for_stream(7, &[1, 2]),
            )
            .unwrap();
        let c = mech
            .release_update(update, &mut SimulationSampler::for_stream(7, &[2, 1]))
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a.values(), c.values());
    }

    #[test]
    fn secure_releases_are_lattice_points() {
        let mech = GaussianMechanism::new(0.5, 2.0).unwrap();
        let update = clip_l2(vec![0.3; 100], 2.0).unwrap();
        let lattice = mech.lattice(100).unwrap();
        let r = mech
            .release_update(update, &mut SecureSampler::from_os().unwrap())
            .unwrap();
        assert_eq!(r.provenance(), "secure");
        for v in r.values() {
            let k = v / lattice.step;
            assert!((k - k.round()).abs() < 1e-6, "{v} is not on the lattice");
        }
    }

    #[test]
    fn sum_refuses_weights_above_one_and_wrong_dimensions() {
        let mech = GaussianMechanism::new(1.0, 1.0).unwrap();
        let mut sum = mech.sum(3).unwrap();
        let u = clip_l2(vec![1.0, 0.0, 0.0], 1.0).unwrap();
        assert!(sum.add(&u, 1.5).is_err());
        assert!(sum.add(&clip_l2(vec![1.0], 1.0).unwrap(), 1.0).is_err());
        sum.add(&u, 1.0).unwrap();
        sum.add(&u, 0.5).unwrap();
        assert_eq!(sum.contributions(), 2);
        assert!((sum.unnoised()[0] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn updates_clipped_to_a_larger_norm_are_refused() {
        let mech = GaussianMechanism::new(1.0, 1.0).unwrap();
        let u = clip_l2(vec![3.0], 2.0).unwrap();
        assert!(
            mech.release_update(u, &mut SimulationSampler::seed_from_u64(1))
                .is_err()
        );
    }

    #[test]
    fn too_many_coordinates_for_sigma_is_an_error_not_a_silent_shrink() {
        let mech = GaussianMechanism::new(1000.0, 1.0).unwrap();
        assert!(mech.lattice(10_000_000).is_err());
        assert!(mech.lattice(1000).is_ok());
    }
}
