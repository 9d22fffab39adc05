//! Property tests: Shamir sharing over GF(2⁶¹ − 1) and the fixed-point encoding.

use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::shamir::{Share, combine, split};
use fedpref_secagg::{EncodingParams, FixedPoint};
use proptest::prelude::*;

fn subset(n: usize, size: usize, seed: u64) -> Vec<usize> {
    // A seeded partial Fisher–Yates: `size` distinct indices in 0..n.
    let mut idx: Vec<usize> = (0..n).collect();
    let mut state = seed | 1;
    for i in 0..size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = i + (state as usize) % (n - i);
        idx.swap(i, j);
    }
    idx.truncate(size);
    idx
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_t_of_n_shares_reconstruct_the_secret(
        secret in any::<[u8; 32]>(),
        n in 2usize..40,
        t_frac in 0.0f64..1.0,
        first_x in 1u32..100_000,
        seed in any::<u64>(),
        pick in any::<u64>(),
    ) {
        let t = 1 + ((n - 1) as f64 * t_frac) as usize;
        let holders: Vec<u32> = (0..n as u32).map(|i| first_x + 7 * i).collect();
        let shares = split(&secret, t, &holders, &mut simulation_rng(seed, &[])).unwrap();
        prop_assert_eq!(shares.len(), n);
        let chosen: Vec<Share> = subset(n, t, pick).into_iter().map(|i| shares[i].clone()).collect();
        prop_assert_eq!(combine(&chosen, t).unwrap(), secret);
        // More than t shares also reconstruct (the first t are used).
        prop_assert_eq!(combine(&shares, t).unwrap(), secret);
    }

    #[test]
    fn fewer_than_t_shares_do_not_reconstruct_the_secret(
        secret in any::<[u8; 32]>(),
        n in 3usize..40,
        t_frac in 0.0f64..1.0,
        seed in any::<u64>(),
        pick in any::<u64>(),
    ) {
        let t = 2 + ((n - 2) as f64 * t_frac) as usize;
        let holders: Vec<u32> = (1..=n as u32).collect();
        let shares = split(&secret, t, &holders, &mut simulation_rng(seed, &[])).unwrap();
        let chosen: Vec<Share> = subset(n, t - 1, pick).into_iter().map(|i| shares[i].clone()).collect();
        // Refused outright at threshold t …
        prop_assert!(combine(&chosen, t).is_err());
        // … and interpolating them as if the threshold were t − 1 gives something else (the
        // chance of a match is 2^-280 per attempt).
        let guess = combine(&chosen, t - 1);
        prop_assert!(guess.map(|g| g != secret).unwrap_or(true));
    }

    #[test]
    fn fixed_point_round_trips_within_half_a_step(
        values in proptest::collection::vec(-1.0f64..1.0, 1..64),
        log_scale in 0i32..24,
    ) {
        let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
        let clipped: Vec<f64> = values.iter().map(|v| v / norm.max(1.0)).collect();
        let scale = 2f64.powi(log_scale);
        let fp = FixedPoint::new(EncodingParams {
            clip_norm: 1.0, scale, cohort_size: 100, dimension: clipped.len(), device_noise_std: 0.0,
        }).unwrap();
        let encoded = fp.encode_f64(&clipped).unwrap();
        let decoded = fp.decode_f64(encoded.values());
        for (x, y) in clipped.iter().zip(&decoded) {
            prop_assert!((x - y).abs() <= 0.5 / scale + 1e-12, "{x} vs {y} at scale {scale}");
        }
    }

    #[test]
    fn encoded_sums_decode_to_the_integer_sum_within_the_checked_bound(
        n in 1usize..200,
        seed in any::<u64>(),
        noise in 0.0f64..0.01,
    ) {
        let dimension = 16;
        let scale = FixedPoint::largest_scale(1.0, n, dimension, noise).unwrap();
        let fp = FixedPoint::new(EncodingParams {
            clip_norm: 1.0, scale, cohort_size: n, dimension, device_noise_std: noise,
        }).unwrap();
        let mut rng = simulation_rng(seed, &[]);
        let mut sum_mod = vec![0u32; dimension];
        let mut sum_int = vec![0i64; dimension];
        let mut sum_real = vec![0f64; dimension];
        for _ in 0..n {
            // Adversarially aligned: every device pushes every coordinate to its extreme.
            let v: Vec<f64> = (0..dimension)
                .map(|_| if rand_core::Rng::next_u32(&mut rng) & 1 == 0 { 0.25 } else { -0.25 })
                .collect();
            let e = fp.encode_f64(&v).unwrap();
            for k in 0..dimension {
                sum_mod[k] = sum_mod[k].wrapping_add(e.values()[k]);
                sum_int[k] += i64::from(e.values()[k] as i32);
                sum_real[k] += v[k];
            }
        }
        prop_assert_eq!(fp.decode_integers(&sum_mod), sum_int.clone());
        for k in 0..dimension {
            prop_assert!((sum_int[k] as f64).abs() <= fp.sum_bound());
            let back = fp.decode_f64(&sum_mod)[k];
            prop_assert!((back - sum_real[k]).abs() <= n as f64 * 0.5 / scale + 1e-9);
        }
    }
}

mod rounds {
    use std::collections::BTreeSet;

    use fedpref_secagg::inprocess::{Dropouts, run_round};
    use fedpref_secagg::rng::simulation_rng;
    use fedpref_secagg::{EncodingParams, RoundConfig, RoundContext, SecAggError, SecAggParams};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever drops out where, a round either unmasks exactly the sum of the inputs that
        /// arrived, or is abandoned; it never returns a wrong sum or another error.
        #[test]
        fn any_dropout_pattern_gives_the_exact_sum_or_an_abandoned_round(
            n in 5u32..12,
            stage_of in proptest::collection::vec(0u8..8, 12),
            values in proptest::collection::vec(-0.2f64..0.2, 12 * 4),
            seed in any::<u64>(),
        ) {
            let params = SecAggParams::choose(n, 0.3, 0.0).unwrap();
            let encoding = EncodingParams {
                clip_norm: 1.0, scale: 4096.0, cohort_size: n as usize, dimension: 4,
                device_noise_std: 0.0,
            };
            let config = RoundConfig::new(
                RoundContext([3; 32]), &params, [4; 32], encoding, params.threshold,
            ).unwrap();
            // Stage codes 0–3 drop before that stage; 4–7 stay to the end.
            let mut dropouts = Dropouts::default();
            for i in 1..=n {
                let set = match stage_of[i as usize - 1] {
                    0 => &mut dropouts.before_keys,
                    1 => &mut dropouts.before_shares,
                    2 => &mut dropouts.before_input,
                    3 => &mut dropouts.before_unmask,
                    _ => continue,
                };
                set.insert(i);
            }
            let inputs: Vec<_> = (0..n as usize)
                .map(|i| config.encoding.encode_f64(&values[4 * i..4 * i + 4]).unwrap())
                .collect();
            match run_round(&config, &inputs, &dropouts, &mut simulation_rng(seed, &[])) {
                Ok((output, _)) => {
                    let mut expected = [0u32; 4];
                    for &i in &output.contributors {
                        for (e, v) in expected.iter_mut().zip(inputs[i as usize - 1].values()) {
                            *e = e.wrapping_add(*v);
                        }
                    }
                    prop_assert_eq!(output.sum, expected.to_vec());
                    let early: BTreeSet<u32> = dropouts.before_keys.iter()
                        .chain(&dropouts.before_shares).chain(&dropouts.before_input)
                        .copied().collect();
                    prop_assert!(output.contributors.iter().all(|i| !early.contains(i)));
                    prop_assert!(output.contributors.len() >= params.threshold as usize);
                }
                Err(e) => prop_assert!(matches!(e, SecAggError::Abandoned(_)), "{e}"),
            }
        }
    }
}
