//! Secure aggregation of distributed-DP noise shares from `fedpref-privacy`: the unmasked sum
//! is exactly the sum of the contributors' integer shares, and close to the sum of their
//! clipped updates.

use std::collections::BTreeSet;

use fedpref_privacy::clip_l2;
use fedpref_privacy::distributed::{DistributedDiscreteGaussian, SimulationShareSampler};
use fedpref_secagg::inprocess::{Dropouts, run_round};
use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::{EncodingParams, FixedPoint, RoundConfig, RoundContext, SecAggParams};
use rand_core::Rng;

#[test]
fn noised_shares_sum_exactly_through_secure_aggregation_with_dropouts() {
    let (n, dimension, clip_norm, noise_multiplier) = (50u32, 256usize, 1.0, 1.0);
    let params = SecAggParams::choose(n, 0.3, 0.0).unwrap();
    // The noise must come from devices that are sure to be in the sum: the fewest
    // contributors the server unmasks, less the one whose privacy is measured.
    let honest = u64::from(params.threshold) - 1;
    let approx_std = noise_multiplier * clip_norm / (honest as f64).sqrt() * 1.01;
    let scale = FixedPoint::largest_scale(clip_norm, n as usize, dimension, approx_std).unwrap();
    let mechanism = DistributedDiscreteGaussian::for_noise_multiplier(
        clip_norm,
        1.0 / scale,
        dimension,
        (-0.5f64).exp(),
        noise_multiplier,
        honest,
    )
    .unwrap();
    let encoding = EncodingParams {
        clip_norm,
        scale,
        cohort_size: n as usize,
        dimension,
        device_noise_std: mechanism.device_noise_std(),
    };
    let config = RoundConfig::new(
        RoundContext([5; 32]),
        &params,
        [6; 32],
        encoding,
        params.threshold,
    )
    .unwrap();

    let mut rng = simulation_rng(21, &[]);
    let mut updates = Vec::new();
    let mut shares = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..n {
        let raw: Vec<f64> = (0..dimension)
            .map(|_| f64::from(rng.next_u32()) / f64::from(u32::MAX) - 0.5)
            .collect();
        let clipped = clip_l2(raw, clip_norm).unwrap();
        let share = mechanism
            .noised_share(
                &clipped,
                &mut SimulationShareSampler::seed_from_u64(u64::from(i)),
            )
            .unwrap();
        inputs.push(config.encoding.encode_integers(share.values()).unwrap());
        updates.push(clipped.into_values());
        shares.push(share.into_values());
    }
    let dropouts = Dropouts {
        before_input: (1..=n).filter(|i| i % 10 == 3).collect::<BTreeSet<_>>(),
        ..Dropouts::default()
    };
    let (output, bytes) = run_round(&config, &inputs, &dropouts, &mut rng).unwrap();
    assert_eq!(output.contributors.len(), 45);
    assert!(bytes.by_participant[&1][2] > 4 * dimension);

    let decoded = config.encoding.decode_integers(&output.sum);
    let gamma = 1.0 / scale;
    let noise_std = mechanism.device_noise_std() * (output.contributors.len() as f64).sqrt();
    for k in 0..dimension {
        let exact: i64 = output
            .contributors
            .iter()
            .map(|&i| shares[i as usize - 1][k])
            .sum();
        assert_eq!(decoded[k], exact, "coordinate {k}");
        let truth: f64 = output
            .contributors
            .iter()
            .map(|&i| updates[i as usize - 1][k])
            .sum();
        let got = decoded[k] as f64 * gamma;
        // Noise of std σC·√(45/24) ≈ 1.37 per coordinate: 7 standard deviations is a
        // failure probability far below 1e-9 over 256 coordinates.
        assert!(
            (got - truth).abs() < 7.0 * noise_std,
            "coordinate {k}: {got} vs {truth}"
        );
    }
}
