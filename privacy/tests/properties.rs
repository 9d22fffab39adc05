//! Invariants that must hold for any parameters: monotonicity of ε, the clipping bound,
//! the noise's variance, and agreement of our discrete Gaussian with OpenDP's.

use fedpref_privacy::noise::discrete::DiscreteGaussian;
use fedpref_privacy::{
    GaussianMechanism, RdpAccountant, SecureSampler, SimulationSampler, clip_l2, l2_norm,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

fn epsilon(q: f64, sigma: f64, rounds: u64, delta: f64) -> f64 {
    let mut acc = RdpAccountant::default();
    acc.compose_subsampled_gaussian(q, sigma, rounds).unwrap();
    acc.epsilon(delta).unwrap().epsilon
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn epsilon_falls_as_sigma_rises(
        q in prop_oneof![Just(1.0), 0.001f64..0.5],
        sigma in 0.4f64..8.0,
        factor in 1.01f64..3.0,
        rounds in 1u64..2000,
        delta in prop_oneof![Just(1e-5), Just(1e-7)],
    ) {
        let (lo, hi) = (epsilon(q, sigma, rounds, delta), epsilon(q, sigma * factor, rounds, delta));
        prop_assert!(hi <= lo, "σ={sigma}→{}: ε {lo} → {hi}", sigma * factor);
    }

    #[test]
    fn epsilon_rises_with_rounds(
        q in prop_oneof![Just(1.0), 0.001f64..0.5],
        sigma in 0.4f64..8.0,
        rounds in 1u64..2000,
        more in 1u64..2000,
    ) {
        let (a, b) = (epsilon(q, sigma, rounds, 1e-5), epsilon(q, sigma, rounds + more, 1e-5));
        prop_assert!(b >= a, "T={rounds}→{}: ε {a} → {b}", rounds + more);
    }

    #[test]
    fn clipped_norm_never_exceeds_the_clip_norm(
        values in prop::collection::vec(-1e6f64..1e6, 1..400),
        scale_exp in -30i32..30,
        clip in 1e-3f64..1e3,
    ) {
        let scaled: Vec<f64> = values.iter().map(|v| v * 10f64.powi(scale_exp)).collect();
        let c = clip_l2(scaled.clone(), clip).unwrap();
        prop_assert!(l2_norm(c.values()) <= clip);
        // Direction is kept: clipping only scales.
        if c.was_clipped() {
            let k = c.values()[0] / scaled[0];
            for (a, b) in c.values().iter().zip(&scaled) {
                prop_assert!((a - k * b).abs() <= 1e-9 * a.abs().max(f64::MIN_POSITIVE));
            }
        }
    }

    #[test]
    fn lattice_sum_is_independent_of_the_order_of_contributions(
        updates in prop::collection::vec(prop::collection::vec(-2.0f64..2.0, 8), 1..12),
        seed in any::<u64>(),
    ) {
        let mech = GaussianMechanism::new(1.0, 1.0).unwrap();
        let clipped: Vec<_> = updates.into_iter().map(|u| clip_l2(u, 1.0).unwrap()).collect();
        let mut forward = mech.sum(8).unwrap();
        let mut backward = mech.sum(8).unwrap();
        for c in &clipped { forward.add(c, 1.0).unwrap(); }
        for c in clipped.iter().rev() { backward.add(c, 1.0).unwrap(); }
        prop_assert_eq!(forward.unnoised(), backward.unnoised());
        let a = mech.release_sum(forward, &mut SimulationSampler::seed_from_u64(seed)).unwrap();
        let b = mech.release_sum(backward, &mut SimulationSampler::seed_from_u64(seed)).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// Sample variance over `n` coordinates of noise added to zero, divided by σ²C².
/// The tolerance is 6 standard deviations of the sample variance, 6·√(2/n).
fn variance_ratio(values: &[f64], noise_std: f64) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) / (noise_std * noise_std)
}

#[test]
fn noise_variance_matches_sigma_squared_c_squared_for_both_samplers() {
    let n = 200_000;
    let tolerance = 6.0 * (2.0 / n as f64).sqrt();
    for (sigma, clip) in [(1.0, 1.0), (0.7, 3.0), (5.0, 0.1)] {
        let mech = GaussianMechanism::new(sigma, clip).unwrap();
        let zero = clip_l2(vec![0.0; n], clip).unwrap();
        let secure = mech
            .release_update(zero.clone(), &mut SecureSampler::from_os().unwrap())
            .unwrap();
        let simulated = mech
            .release_update(zero, &mut SimulationSampler::seed_from_u64(11))
            .unwrap();
        for (name, values) in [
            ("secure", secure.values()),
            ("simulated", simulated.values()),
        ] {
            let r = variance_ratio(values, sigma * clip);
            assert!(
                (r - 1.0).abs() < tolerance,
                "{name} σ={sigma} C={clip}: variance ratio {r} (tolerance ±{tolerance})"
            );
        }
    }
}

/// Pearson's two-sample χ² statistic over the given bins; returns (χ², degrees of freedom).
fn two_sample_chi_square(a: &[usize], b: &[usize]) -> (f64, f64) {
    let (na, nb) = (
        a.iter().sum::<usize>() as f64,
        b.iter().sum::<usize>() as f64,
    );
    let (ka, kb) = ((nb / na).sqrt(), (na / nb).sqrt());
    let mut chi2 = 0.0;
    let mut bins = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        if x + y > 0 {
            chi2 += (ka * x as f64 - kb * y as f64).powi(2) / (x + y) as f64;
            bins += 1.0;
        }
    }
    (chi2, bins - 1.0)
}

fn histogram(
    samples: impl Iterator<Item = i64>,
    bin: impl Fn(i64) -> usize,
    bins: usize,
) -> Vec<usize> {
    let mut h = vec![0; bins];
    for s in samples {
        h[bin(s)] += 1;
    }
    h
}

/// Our integer-arithmetic discrete Gaussian against OpenDP's exact (arbitrary-precision)
/// `sample_discrete_gaussian`, at a small scale (cell by cell) and at the production scale
/// (2²⁶, in 20 bins equiprobable under the normal approximation). OpenDP draws from its own
/// unseeded RNG, so this test is random: its threshold (8 standard deviations of χ²) makes a
/// false alarm rarer than one in 10⁹ runs.
#[test]
fn discrete_gaussian_matches_opendp_sampler() {
    use dashu::rational::RBig;
    use opendp::traits::samplers::sample_discrete_gaussian;
    let mut rng = ChaCha20Rng::seed_from_u64(5);

    // Scale 3 (σ² = 9): cells −12..=12, tails pooled.
    let n = 40_000;
    let small = DiscreteGaussian::new(9).unwrap();
    let cell = |x: i64| (x.clamp(-13, 13) + 13) as usize;
    let ours = histogram((0..n).map(|_| small.sample(&mut rng)), cell, 27);
    let theirs = histogram(
        (0..n).map(|_| i64::try_from(sample_discrete_gaussian(RBig::from(3u32)).unwrap()).unwrap()),
        cell,
        27,
    );
    let (chi2, dof) = two_sample_chi_square(&ours, &theirs);
    assert!(
        chi2 < dof + 8.0 * (2.0 * dof).sqrt(),
        "scale 3: χ² = {chi2} over {dof} dof"
    );

    // Production scale 2^26, binned at the normal's 5 % quantiles.
    let n = 8_000;
    let scale = (1u64 << 26) as f64;
    let z = [
        -1.645, -1.282, -1.036, -0.842, -0.674, -0.524, -0.385, -0.253, -0.126, 0.0, 0.126, 0.253,
        0.385, 0.524, 0.674, 0.842, 1.036, 1.282, 1.645,
    ];
    let bin = |x: i64| z.iter().filter(|&&q| (x as f64) > q * scale).count();
    let big = DiscreteGaussian::new(1 << 52).unwrap();
    let ours = histogram((0..n).map(|_| big.sample(&mut rng)), bin, 20);
    let theirs = histogram(
        (0..n).map(|_| {
            i64::try_from(sample_discrete_gaussian(RBig::from(1u64 << 26)).unwrap()).unwrap()
        }),
        bin,
        20,
    );
    let (chi2, dof) = two_sample_chi_square(&ours, &theirs);
    assert!(
        chi2 < dof + 8.0 * (2.0 * dof).sqrt(),
        "scale 2^26: χ² = {chi2} over {dof} dof"
    );
}
