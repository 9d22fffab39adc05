//! Adaptive clipping converges to the target quantile of update norms (Andrew et al. 2021's
//! geometric update), in central and local mode, with noised bits.

use fedpref_privacy::SimulationSampler;
use fedpref_privacy::adaptive_clip::{
    QuantileClipConfig, QuantileClipper, centred_bit, local_bit_release,
};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand_distr::{Distribution, LogNormal};

const COHORT: usize = 100;
const ROUNDS: usize = 400;

/// Norms ~ LogNormal(μ, s): the γ-quantile is exp(μ + s·Φ⁻¹(γ)).
struct Norms {
    dist: LogNormal<f64>,
    rng: Xoshiro256PlusPlus,
}

impl Norms {
    fn new(mu: f64, s: f64, seed: u64) -> Self {
        Self {
            dist: LogNormal::new(mu, s).unwrap(),
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }
    fn cohort(&mut self) -> Vec<f64> {
        (0..COHORT)
            .map(|_| self.dist.sample(&mut self.rng))
            .collect()
    }
}

fn config(target_quantile: f64) -> QuantileClipConfig {
    QuantileClipConfig {
        initial_clip_norm: 0.1,
        target_quantile,
        learning_rate: 0.2,
        // The paper's default σ_b = m/20.
        bit_noise_std: COHORT as f64 / 20.0,
        expected_contributions: COHORT as f64,
    }
}

/// The mean of C over the last quarter of the run (the estimate oscillates around the
/// quantile with the noise of each round's count).
fn settled(trajectory: &[f64]) -> f64 {
    let tail = &trajectory[trajectory.len() * 3 / 4..];
    tail.iter().sum::<f64>() / tail.len() as f64
}

#[test]
fn central_mode_converges_to_within_ten_percent_of_the_target_quantile() {
    // (μ, s, γ, Φ⁻¹(γ))
    for (mu, s, gamma, z) in [
        (0.0, 0.5, 0.5, 0.0),
        (1.0, 0.8, 0.9, 1.281_551_565_545),
        (-1.0, 1.0, 0.3, -0.524_400_512_708),
    ] {
        let truth = f64::exp(mu + s * z);
        let mut clipper = QuantileClipper::new(config(gamma)).unwrap();
        let mut norms = Norms::new(mu, s, 7);
        let mut noise = SimulationSampler::seed_from_u64(8);
        for _ in 0..ROUNDS {
            let c = clipper.clip_norm();
            let mut bits = clipper.begin_bits().unwrap();
            for norm in norms.cohort() {
                bits.add(&centred_bit(norm, c).unwrap(), 1.0).unwrap();
            }
            clipper.release_and_update(bits, &mut noise).unwrap();
        }
        let estimate = settled(clipper.trajectory());
        assert!(
            (estimate / truth - 1.0).abs() < 0.10,
            "γ = {gamma}: C ≈ {estimate}, true quantile {truth}"
        );
        assert_eq!(clipper.trajectory().len(), ROUNDS + 1);
    }
}

#[test]
fn local_mode_converges_to_within_ten_percent_of_the_median() {
    let truth = 1.0; // LogNormal(0, 0.5)'s median
    let mut clipper = QuantileClipper::new(config(0.5)).unwrap();
    let mut norms = Norms::new(0.0, 0.5, 9);
    // Each device adds std 0.5, so the sum's noise std is 0.5·√100 = 5 = σ_b.
    let mut device_noise = SimulationSampler::seed_from_u64(10);
    for _ in 0..ROUNDS {
        let c = clipper.clip_norm();
        let sum: f64 = norms
            .cohort()
            .into_iter()
            .map(|norm| {
                local_bit_release(norm, c, 0.5, &mut device_noise)
                    .unwrap()
                    .values()[0]
            })
            .sum();
        clipper.update(sum).unwrap();
    }
    let estimate = settled(clipper.trajectory());
    assert!(
        (estimate / truth - 1.0).abs() < 0.10,
        "C ≈ {estimate}, median {truth}"
    );
}

#[test]
fn a_wrong_target_does_not_converge_to_the_median() {
    // The test above can fail: aiming at γ = 0.9 lands well away from the median.
    let mut clipper = QuantileClipper::new(config(0.9)).unwrap();
    let mut norms = Norms::new(0.0, 0.5, 11);
    let mut noise = SimulationSampler::seed_from_u64(12);
    for _ in 0..ROUNDS {
        let c = clipper.clip_norm();
        let mut bits = clipper.begin_bits().unwrap();
        for norm in norms.cohort() {
            bits.add(&centred_bit(norm, c).unwrap(), 1.0).unwrap();
        }
        clipper.release_and_update(bits, &mut noise).unwrap();
    }
    assert!(settled(clipper.trajectory()) > 1.5);
}
