//! Will the noise swamp the signal? An estimate made before training, from the run's
//! settings alone.
//!
//! A round releases the mean of m clipped updates (each of L2 norm at most C) plus noise.
//! The mean's norm is at most C — that bound is reached only when every update points the
//! same way, so it is the signal's best case. The noise on the mean, over d coordinates:
//!
//! - **central** and **distributed**: N(0, (σC)²) per coordinate on the sum, so the mean's
//!   noise has norm ≈ σC√d / m;
//! - **local**: every device adds N(0, (σC)²) per coordinate, so the sum's noise has
//!   variance m(σC)² per coordinate and the mean's noise norm is ≈ σC√d / √m.
//!
//! When that noise norm exceeds C, no round's release can point the model the right way
//! more often than the noise points it elsewhere, whatever the data. The cohort that would
//! bring the noise down to C is m ≥ σ√d (central, distributed) or m ≥ σ²d (local): local
//! DP's noise grows with the update's dimension and shrinks only with the square root of
//! the cohort.

use crate::PrivacyMode;

/// The estimate for one configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseToSignal {
    /// The expected L2 norm of the noise on the released mean.
    pub noise_norm: f64,
    /// The largest norm the mean of clipped updates can have: C.
    pub signal_bound: f64,
    /// The smallest expected cohort whose mean's noise norm is at most C.
    pub needed_cohort: f64,
}

impl NoiseToSignal {
    /// Whether the noise exceeds the signal's best case.
    pub fn swamped(&self) -> bool {
        self.noise_norm > self.signal_bound
    }
}

/// The estimate for `mode` with noise multiplier σ, clip norm C, update dimension d and an
/// expected cohort of m devices per round. `None` when an argument is not finite and
/// positive (σ = 0 has no noise to estimate).
pub fn noise_to_signal(
    mode: PrivacyMode,
    noise_multiplier: f64,
    clip_norm: f64,
    dimension: usize,
    cohort: f64,
) -> Option<NoiseToSignal> {
    let ok = |x: f64| x.is_finite() && x > 0.0;
    if !(ok(noise_multiplier) && ok(clip_norm) && ok(cohort) && dimension > 0) {
        return None;
    }
    let d = dimension as f64;
    let (noise_norm, needed_cohort) = match mode {
        PrivacyMode::Local => (
            noise_multiplier * clip_norm * d.sqrt() / cohort.sqrt(),
            noise_multiplier * noise_multiplier * d,
        ),
        PrivacyMode::Central | PrivacyMode::Distributed => (
            noise_multiplier * clip_norm * d.sqrt() / cohort,
            noise_multiplier * d.sqrt(),
        ),
    };
    Some(NoiseToSignal {
        noise_norm,
        signal_bound: clip_norm,
        needed_cohort: needed_cohort.ceil(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dp_on_the_standard_workload_is_swamped_and_names_the_cohort_it_needs() {
        // 1,000 items × (16 + 1) + 1 coordinates, σ = 1, 100 devices a round.
        let e = noise_to_signal(PrivacyMode::Local, 1.0, 1.0, 17_001, 100.0).unwrap();
        assert!(e.swamped());
        assert!((e.noise_norm - (17_001f64 / 100.0).sqrt()).abs() < 1e-12);
        assert_eq!(e.needed_cohort, 17_001.0);
        // At the needed cohort the noise is down to C.
        let at = noise_to_signal(PrivacyMode::Local, 1.0, 1.0, 17_001, 17_001.0).unwrap();
        assert!(!at.swamped());
    }

    #[test]
    fn central_dp_noise_shrinks_with_the_whole_cohort() {
        let small = noise_to_signal(PrivacyMode::Central, 2.0, 0.5, 10_000, 100.0).unwrap();
        assert!(small.swamped(), "{small:?}");
        assert_eq!(small.needed_cohort, 200.0);
        let big = noise_to_signal(PrivacyMode::Central, 2.0, 0.5, 10_000, 10_000.0).unwrap();
        assert!(!big.swamped());
        assert!((small.noise_norm / big.noise_norm - 100.0).abs() < 1e-9);
        assert_eq!(
            noise_to_signal(PrivacyMode::Distributed, 2.0, 0.5, 10_000, 100.0),
            Some(small)
        );
    }

    #[test]
    fn no_estimate_without_noise_or_with_bad_numbers() {
        assert!(noise_to_signal(PrivacyMode::Central, 0.0, 1.0, 10, 10.0).is_none());
        assert!(noise_to_signal(PrivacyMode::Central, f64::NAN, 1.0, 10, 10.0).is_none());
        assert!(noise_to_signal(PrivacyMode::Local, 1.0, 1.0, 0, 10.0).is_none());
        assert!(noise_to_signal(PrivacyMode::Local, 1.0, 1.0, 10, 0.0).is_none());
    }
}
