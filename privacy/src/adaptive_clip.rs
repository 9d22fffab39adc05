//! Quantile-based adaptive clipping, after Andrew, Thakkar, McMahan, Ramaswamy 2021,
//! "Differentially Private Learning with Adaptive Clipping" (NeurIPS; arXiv:1905.03871).
//!
//! # The estimator
//! Each contributing device reports, besides its clipped update, one bit: whether its update
//! norm (before clipping) was at most the current clip norm C. It reports it centred,
//! b − ½ ∈ {−½, +½} ([`centred_bit`]), so that one device moves the sum by at most ½. The
//! coordinator receives the noised sum Σ(bᵢ − ½) + N(0, σ_b²), turns it into the noised
//! fraction b̄ = (noised sum + m/2)/m, with m the **expected** number of contributions (a
//! public number: using the realised count would release it), and updates C geometrically
//! (the paper's Algorithm 1, geometric update):
//!
//! C ← C · exp(−η (b̄ − γ)),
//!
//! with target quantile γ and learning rate η. C grows while fewer than a fraction γ of the
//! updates fit under it and shrinks otherwise, so it tracks the γ-quantile of update norms.
//!
//! # Modes
//! - **Central** ([`QuantileClipper::bit_mechanism`]): the coordinator sums the centred bits
//!   on the lattice and adds N(0, σ_b²) once, with the crate's [`GaussianMechanism`] (noise
//!   multiplier 2σ_b, clip norm ½), so it uses the same samplers and provenance types as the
//!   update sum. Neighbouring add/remove-one device, sensitivity ½.
//! - **Local** ([`local_bit_release`]): each device noises its own centred bit with
//!   N(0, σ_local²) before upload; the coordinator sums the releases and calls
//!   [`QuantileClipper::update`] with the sum (noise variance m·σ_local²). Neighbouring
//!   replace-one (the device uploads either way), sensitivity 1, so each upload is
//!   ρ = 1/(2σ_local²)-zCDP on top of the update's own cost.
//!   Accounted together with the update as one Gaussian with
//!   [`local_upload_noise_multiplier`] (the same combination as central mode's).
//! - Distributed mode (the bit as one more coordinate under secure aggregation, each device
//!   adding a share of the noise) is not provided here.
//!
//! # Privacy cost
//! In central mode the bit sum is a Gaussian mechanism with sensitivity ½ and noise σ_b,
//! i.e. noise multiplier 2σ_b. Released together with the update sum (sensitivity C, noise
//! σ_Δ·C), the pair is one Gaussian mechanism whose noise multiplier z satisfies
//! z⁻² = σ_Δ⁻² + (2σ_b)⁻² (the paper's Sec. 3.1). To spend exactly what a fixed-clip run with
//! multiplier z would (under the same sampling or participation assumption), the update
//! noise must be raised to
//!
//! σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2),
//!
//! which exists only when 2σ_b > z ([`update_noise_multiplier`] refuses other values). With
//! tree aggregation, where the bits are not tree-aggregated, add instead ρ = k/(8σ_b²) for k
//! participations ([`bit_rho`]) to the tree's ρ. The paper's default is σ_b = m/20.
//!
//! With DP-FTRL, C must stay fixed inside a tree (a node's noise σC is drawn for one C):
//! apply the new C at a restart.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{
    ClippedSum, GaussianMechanism, GaussianSampler, PrivacyError, Provenance, Released, clip_l2,
};

/// The device's report: b − ½ with b = 1 if `norm_before_clipping` ≤ `clip_norm`, else 0,
/// as a one-coordinate update clipped to ½ (so that it can go into a [`ClippedSum`] of the
/// [`QuantileClipper::bit_mechanism`]).
pub fn centred_bit(
    norm_before_clipping: f64,
    clip_norm: f64,
) -> Result<crate::Clipped, PrivacyError> {
    let clip_norm = check::positive("clip_norm", clip_norm)?;
    if !(norm_before_clipping.is_finite() && norm_before_clipping >= 0.0) {
        return Err(PrivacyError::invalid(
            "norm_before_clipping",
            norm_before_clipping,
            "must be a finite number ≥ 0",
        ));
    }
    let bit = if norm_before_clipping <= clip_norm {
        0.5
    } else {
        -0.5
    };
    clip_l2(vec![bit], 0.5)
}

/// Local mode: the device's centred bit plus N(0, `noise_std`²), released by the device.
/// Replace-one sensitivity 1, so ρ = 1/(2·noise_std²) per upload.
pub fn local_bit_release<S: GaussianSampler>(
    norm_before_clipping: f64,
    clip_norm: f64,
    noise_std: f64,
    sampler: &mut S,
) -> Result<Released<S::Provenance>, PrivacyError> {
    let noise_std = check::positive("bit_noise_std", noise_std)?;
    let bit = centred_bit(norm_before_clipping, clip_norm)?;
    // Clip norm ½ and multiplier 2·std give noise std `noise_std`.
    GaussianMechanism::new(2.0 * noise_std, 0.5)?.release_update(bit, sampler)
}

/// How many noise standard deviations a local clip bit may lie outside [0, 1] on the wire.
pub const LOCAL_BIT_RANGE_STDS: f64 = 10.0;

/// The range a device's noised clip bit (0/1 plus N(0, σ_b²), uncentred, as sent) is clamped
/// to before upload and the coordinator accepts: [−10σ_b, 1 + 10σ_b]. Clamping is
/// post-processing of the released value, so it costs no privacy; a bit lands outside only
/// with probability below 2·10⁻²³, so the estimator's bias is nil. What it buys: no single
/// device can move the round's bit sum by more than 1 + 20σ_b, however it lies.
pub fn local_bit_range(bit_noise_std: f64) -> (f64, f64) {
    let w = LOCAL_BIT_RANGE_STDS * bit_noise_std;
    (-w, 1.0 + w)
}

/// Clamps a noised clip bit (uncentred) into [`local_bit_range`]; post-processing.
pub fn clamp_local_bit(noised_bit: f64, bit_noise_std: f64) -> f64 {
    let (lo, hi) = local_bit_range(bit_noise_std);
    noised_bit.clamp(lo, hi)
}

/// The update noise multiplier σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) that, together with bit noise
/// σ_b, spends what noise multiplier z alone would (Andrew et al. 2021, Sec. 3.1). Refused
/// unless z > 0 and 2σ_b > z.
pub fn update_noise_multiplier(
    noise_multiplier: f64,
    bit_noise_std: f64,
) -> Result<f64, PrivacyError> {
    let z = check::positive("noise_multiplier", noise_multiplier)?;
    let sigma_b = check::positive("bit_noise_std", bit_noise_std)?;
    let rest = z.powi(-2) - (2.0 * sigma_b).powi(-2);
    if rest <= 0.0 {
        return Err(PrivacyError::invalid(
            "bit_noise_std",
            sigma_b,
            "must exceed half the noise multiplier (2σ_b > z), or the bit alone costs more than the whole budget",
        ));
    }
    Ok(rest.powf(-0.5))
}

/// The effective noise multiplier z = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) of an update sum with
/// multiplier σ_Δ released with a bit sum of noise σ_b (for accounting).
pub fn effective_noise_multiplier(
    update_noise_multiplier: f64,
    bit_noise_std: f64,
) -> Result<f64, PrivacyError> {
    let s = check::positive("update_noise_multiplier", update_noise_multiplier)?;
    let sigma_b = check::positive("bit_noise_std", bit_noise_std)?;
    Ok((s.powi(-2) + (2.0 * sigma_b).powi(-2)).powf(-0.5))
}

/// Local mode: the noise multiplier to account one device upload of (noised update, noised
/// clip bit) with, as a [`crate::RoundRelease`] in [`crate::PrivacyMode::Local`].
///
/// Neighbouring relation: local DP, one device's data **replaced** (the device uploads either
/// way). Under it the clipped update moves by at most 2C (noise σ_Δ·C per coordinate: effective
/// multiplier σ_Δ/2, which is what the local-mode accountant applies) and the bit (0/1, or
/// centred ±½) by at most 1 (noise σ_b: effective multiplier σ_b). The pair is one Gaussian
/// mechanism with effective multiplier z_eff, z_eff⁻² = (σ_Δ/2)⁻² + σ_b⁻², i.e.
/// ρ = 2/σ_Δ² + 1/(2σ_b²) per upload. The local-mode accountant halves the multiplier it is
/// given, so the multiplier to give it is z = 2·z_eff, and z⁻² = σ_Δ⁻² + (2σ_b)⁻²: the same
/// formula as central mode's [`effective_noise_multiplier`] (both sensitivities double under
/// replace-one), so a manifest's `noise_multiplier` z means the same combined cost in both
/// modes and [`update_noise_multiplier`] gives the device's update noise σ_Δ.
pub fn local_upload_noise_multiplier(
    update_noise_multiplier: f64,
    bit_noise_std: f64,
) -> Result<f64, PrivacyError> {
    effective_noise_multiplier(update_noise_multiplier, bit_noise_std)
}

/// ρ-zCDP of `participations` central bit releases of noise σ_b: k·(½)²/(2σ_b²) = k/(8σ_b²).
pub fn bit_rho(bit_noise_std: f64, participations: u64) -> Result<f64, PrivacyError> {
    let sigma_b = check::positive("bit_noise_std", bit_noise_std)?;
    Ok(participations as f64 / (8.0 * sigma_b * sigma_b))
}

/// Settings of [`QuantileClipper`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantileClipConfig {
    /// C before the first round.
    pub initial_clip_norm: f64,
    /// γ ∈ (0, 1): the fraction of updates that should fit under C.
    pub target_quantile: f64,
    /// η > 0 of the geometric update (the paper uses 0.2).
    pub learning_rate: f64,
    /// σ_b: the noise std on the sum of bits (the paper's default is m/20).
    pub bit_noise_std: f64,
    /// m: the expected number of contributions per round (public).
    pub expected_contributions: f64,
}

/// The coordinator's side of adaptive clipping: holds C, updates it from each round's noised
/// bit sum, and keeps C's trajectory for the ledger (serialisable for it; built only through
/// [`QuantileClipper::new`], which checks the settings).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantileClipper {
    config: QuantileClipConfig,
    clip_norm: f64,
    trajectory: Vec<f64>,
    /// [min, max] that C is kept in, if set ([`QuantileClipper::with_bounds`]).
    bounds: Option<(f64, f64)>,
}

impl QuantileClipper {
    /// A clipper, refusing out-of-range settings by name.
    pub fn new(config: QuantileClipConfig) -> Result<Self, PrivacyError> {
        check::positive("initial_clip_norm", config.initial_clip_norm)?;
        check::positive("learning_rate", config.learning_rate)?;
        check::positive("bit_noise_std", config.bit_noise_std)?;
        check::positive("expected_contributions", config.expected_contributions)?;
        if !(config.target_quantile > 0.0 && config.target_quantile < 1.0) {
            return Err(PrivacyError::invalid(
                "target_quantile",
                config.target_quantile,
                "must be in (0, 1)",
            ));
        }
        Ok(Self {
            config,
            clip_norm: config.initial_clip_norm,
            trajectory: vec![config.initial_clip_norm],
            bounds: None,
        })
    }

    /// Keeps C within [`min_clip_norm`, `max_clip_norm`] from now on (each update's C is
    /// clamped; the current C too). Refused unless 0 < min ≤ max < ∞. The bounds are public
    /// settings, so clamping is post-processing of the released bit sum.
    pub fn with_bounds(
        mut self,
        min_clip_norm: f64,
        max_clip_norm: f64,
    ) -> Result<Self, PrivacyError> {
        check::positive("min_clip_norm", min_clip_norm)?;
        check::positive("max_clip_norm", max_clip_norm)?;
        if min_clip_norm > max_clip_norm {
            return Err(PrivacyError::invalid(
                "min_clip_norm",
                min_clip_norm,
                "must be at most max_clip_norm",
            ));
        }
        self.bounds = Some((min_clip_norm, max_clip_norm));
        self.clip_norm = self.clip_norm.clamp(min_clip_norm, max_clip_norm);
        Ok(self)
    }

    /// The settings.
    pub fn config(&self) -> QuantileClipConfig {
        self.config
    }

    /// The current clip norm C, for this round's devices.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// C before each update: the initial C, then one value per update.
    pub fn trajectory(&self) -> &[f64] {
        &self.trajectory
    }

    /// The central-mode mechanism for the bit sum: noise multiplier 2σ_b on clip norm ½,
    /// i.e. noise std σ_b. Sum the devices' [`centred_bit`]s into its [`ClippedSum`]
    /// ([`QuantileClipper::begin_bits`]) and release with [`GaussianMechanism::release_sum`].
    pub fn bit_mechanism(&self) -> Result<GaussianMechanism, PrivacyError> {
        GaussianMechanism::new(2.0 * self.config.bit_noise_std, 0.5)
    }

    /// An empty bit sum for the round.
    pub fn begin_bits(&self) -> Result<ClippedSum, PrivacyError> {
        self.bit_mechanism()?.sum(1)
    }

    /// Central mode: noises the round's bit sum and updates C from it; returns the new C.
    pub fn release_and_update<S: GaussianSampler>(
        &mut self,
        bits: ClippedSum,
        sampler: &mut S,
    ) -> Result<f64, PrivacyError> {
        let released = self.bit_mechanism()?.release_sum(bits, sampler)?;
        self.update_from_release(&released)
    }

    /// Updates C from a released one-coordinate noised bit sum.
    pub fn update_from_release<P: Provenance>(
        &mut self,
        released: &Released<P>,
    ) -> Result<f64, PrivacyError> {
        match released.values() {
            [sum] => self.update(*sum),
            other => Err(PrivacyError::DimensionMismatch {
                expected: 1,
                actual: other.len(),
            }),
        }
    }

    /// C ← C·exp(−η(b̄ − γ)) with b̄ = (noised centred sum + m/2)/m; returns the new C.
    pub fn update(&mut self, noised_centred_sum: f64) -> Result<f64, PrivacyError> {
        if !noised_centred_sum.is_finite() {
            return Err(PrivacyError::invalid(
                "noised_centred_sum",
                noised_centred_sum,
                "must be finite",
            ));
        }
        let m = self.config.expected_contributions;
        let fraction = (noised_centred_sum + m / 2.0) / m;
        self.clip_norm *=
            (-self.config.learning_rate * (fraction - self.config.target_quantile)).exp();
        if let Some((lo, hi)) = self.bounds {
            self.clip_norm = self.clip_norm.clamp(lo, hi);
        }
        self.trajectory.push(self.clip_norm);
        Ok(self.clip_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_keep_c_finite_whatever_the_bit_sum() {
        let config = QuantileClipConfig {
            initial_clip_norm: 1.0,
            target_quantile: 0.5,
            learning_rate: 0.2,
            bit_noise_std: 1.0,
            expected_contributions: 3.0,
        };
        // Unbounded, one absurd sum sends C to infinity.
        let mut free = QuantileClipper::new(config).unwrap();
        assert_eq!(free.update(-1e300).unwrap(), f64::INFINITY);
        let mut c = QuantileClipper::new(config)
            .unwrap()
            .with_bounds(0.01, 100.0)
            .unwrap();
        assert_eq!(c.update(-1e300).unwrap(), 100.0);
        assert_eq!(c.update(1e300).unwrap(), 0.01);
        assert!(
            QuantileClipper::new(config)
                .unwrap()
                .with_bounds(2.0, 1.0)
                .is_err()
        );
        assert!(
            QuantileClipper::new(config)
                .unwrap()
                .with_bounds(0.0, 1.0)
                .is_err()
        );
        assert!(
            QuantileClipper::new(config)
                .unwrap()
                .with_bounds(1.0, f64::INFINITY)
                .is_err()
        );
    }

    #[test]
    fn a_clamped_local_bit_stays_in_its_stated_range() {
        assert_eq!(local_bit_range(0.5), (-5.0, 6.0));
        assert_eq!(clamp_local_bit(-1e300, 0.5), -5.0);
        assert_eq!(clamp_local_bit(1e300, 0.5), 6.0);
        assert_eq!(clamp_local_bit(0.7, 0.5), 0.7);
    }

    #[test]
    fn the_combined_multiplier_inverts_the_effective_one() {
        let z = 1.0;
        let sigma_b = 5.0;
        let s = update_noise_multiplier(z, sigma_b).unwrap();
        assert!(s > z);
        assert!((effective_noise_multiplier(s, sigma_b).unwrap() - z).abs() < 1e-12);
        // The paper's example: m = 100, σ_b = m/20 = 5, z = 1 → σ_Δ = (1 − 1/100)^(-1/2).
        assert!((s - (0.99f64).powf(-0.5)).abs() < 1e-12);
    }

    #[test]
    fn the_local_pair_is_accounted_as_one_gaussian_of_hand_derived_cost() {
        // σ_Δ = 4, σ_b = 2, replace-one: update ρ = (2C)²/(2·(4C)²) = 1/8, bit ρ = 1²/(2·2²)
        // = 1/8, so ρ = 1/4 per upload; z_eff = (2ρ)^(-1/2) = √2 and the local accountant's
        // input is z = 2√2.
        let z = local_upload_noise_multiplier(4.0, 2.0).unwrap();
        assert!((z - 2.0 * 2f64.sqrt()).abs() < 1e-12, "{z}");
        let release = crate::RoundRelease {
            mode: crate::PrivacyMode::Local,
            noise_multiplier: z,
            sampling_rate: 1.0,
        };
        let (q, effective) = release.effective().unwrap();
        assert_eq!(q, 1.0);
        // Gaussian RDP at order α is α·ρ = α/(2·z_eff²).
        for alpha in [2.0, 8.0, 32.0] {
            let rdp = crate::rdp::gaussian_rdp(alpha, effective);
            assert!((rdp - alpha * 0.25).abs() < 1e-12, "α = {alpha}: {rdp}");
        }
        // The bit's noise alone (no bit) would cost only the update's 1/8.
        let update_only = crate::RoundRelease {
            mode: crate::PrivacyMode::Local,
            noise_multiplier: 4.0,
            sampling_rate: 1.0,
        };
        let (_, e) = update_only.effective().unwrap();
        assert!((crate::rdp::gaussian_rdp(2.0, e) - 2.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn a_bit_noise_too_small_for_the_budget_is_refused_by_name() {
        let e = update_noise_multiplier(2.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("bit_noise_std"), "{e}");
        assert!(update_noise_multiplier(2.0, 0.9).is_err());
        assert!(update_noise_multiplier(0.0, 3.0).is_err());
    }

    #[test]
    fn bits_are_centred_and_ties_count_as_fitting() {
        assert_eq!(centred_bit(1.0, 1.0).unwrap().values(), &[0.5]);
        assert_eq!(centred_bit(1.5, 1.0).unwrap().values(), &[-0.5]);
        assert!(centred_bit(f64::NAN, 1.0).is_err());
        assert!(centred_bit(1.0, 0.0).is_err());
    }

    #[test]
    fn c_grows_when_everything_fits_and_shrinks_when_nothing_does() {
        let config = QuantileClipConfig {
            initial_clip_norm: 1.0,
            target_quantile: 0.5,
            learning_rate: 0.2,
            bit_noise_std: 1.0,
            expected_contributions: 10.0,
        };
        let mut c = QuantileClipper::new(config).unwrap();
        // All 10 fit: b̄ = 1, C·e^(−0.1).
        let after = c.update(5.0).unwrap();
        assert!((after - (-0.1f64).exp()).abs() < 1e-12);
        let after = c.update(-5.0).unwrap();
        assert!((after - 1.0).abs() < 1e-12);
        assert_eq!(c.trajectory().len(), 3);
        assert!(
            QuantileClipper::new(QuantileClipConfig {
                target_quantile: 1.0,
                ..config
            })
            .unwrap_err()
            .to_string()
            .contains("target_quantile")
        );
    }
}
