//! Unit tests of aggregation and the server optimisers. The integration test
//! (`coordinator/tests/aggregation.rs`) covers central noise and provenance through the public
//! API.

use proptest::prelude::*;

use super::optimizer::Moments;
use super::*;
use fedpref_privacy::{Simulated, SimulationSampler};

const FEDAVG: ServerOptimizer = ServerOptimizer::Fedavg {
    server_learning_rate: 1.0,
};
const MEDIAN: ServerOptimizer = ServerOptimizer::Median {
    server_learning_rate: 1.0,
};
const TRIMMED: ServerOptimizer = ServerOptimizer::TrimmedMean {
    server_learning_rate: 1.0,
    trim_fraction: 0.2,
};

fn central(clip_norm: f64, noise_multiplier: f64, expected_cohort_size: f64) -> AggregationPrivacy {
    AggregationPrivacy::Central {
        clip_norm,
        noise_multiplier,
        expected_cohort_size,
    }
}

fn sampler() -> SimulationSampler {
    SimulationSampler::seed_from_u64(11)
}

fn aggregate_of(delta: Vec<f64>) -> Aggregate<Simulated> {
    Aggregate {
        contributions: 1,
        denominator: 1.0,
        noise_std: 0.0,
        delta,
        provenance: PhantomData,
    }
}

// --- the weighted mean -------------------------------------------------------------------

#[test]
fn fedavg_weighted_mean_is_exact_on_small_examples() {
    for privacy in [AggregationPrivacy::None, AggregationPrivacy::Local] {
        let mut round = RoundAggregator::new(&FEDAVG, &privacy, 3).unwrap();
        round.add(&[1.0, 2.0, -4.0], 1.0).unwrap();
        round.add(&[4.0, 0.5, 8.0], 3.0).unwrap();
        round.add(&[100.0, 100.0, 100.0], 0.0).unwrap(); // counted, moves nothing
        assert_eq!(round.contributions(), 3);
        let aggregate = round.finish(&mut sampler()).unwrap();
        // (1·1 + 3·4)/4 = 3.25; (2 + 1.5)/4 = 0.875; (−4 + 24)/4 = 5
        assert_eq!(aggregate.delta(), &[3.25, 0.875, 5.0]);
        assert_eq!(aggregate.denominator(), 4.0);
        assert_eq!(aggregate.contributions(), 3);
        assert_eq!(aggregate.noise_std(), 0.0);
        assert_eq!(aggregate.provenance(), "simulated");
    }
}

#[test]
fn fractional_weights_give_the_weighted_mean() {
    let mut round = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 1).unwrap();
    round.add(&[2.0], 0.25).unwrap();
    round.add(&[-2.0], 0.75).unwrap();
    let delta = round.finish(&mut sampler()).unwrap().into_delta();
    assert_eq!(delta, vec![-1.0]);
}

#[test]
fn a_mean_of_nothing_or_of_zero_weights_is_an_error_naming_the_count() {
    let round = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 2).unwrap();
    assert_eq!(
        round.finish(&mut sampler()).unwrap_err(),
        AggregationError::NothingToAverage { contributions: 0 }
    );
    let mut round = RoundAggregator::new(&MEDIAN, &AggregationPrivacy::Local, 2).unwrap();
    round.add(&[1.0, 1.0], 0.0).unwrap();
    let e = round.finish(&mut sampler()).unwrap_err();
    assert!(e.to_string().contains("1 update(s) accepted"), "{e}");
}

#[test]
fn mode_none_refuses_the_secure_sampler() {
    let mut round = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::None, 1).unwrap();
    round.add(&[1.0], 1.0).unwrap();
    let e = round
        .finish(&mut fedpref_privacy::SecureSampler::from_os().unwrap())
        .unwrap_err();
    assert_eq!(e, AggregationError::NoDpWithSecureSampler);
    assert!(e.to_string().contains("simulations only"));
}

// --- rejection ---------------------------------------------------------------------------

#[test]
fn nan_inf_wrong_length_and_bad_weights_are_rejected_without_changing_the_accumulator() {
    for (optimizer, privacy) in [
        (FEDAVG, AggregationPrivacy::None),
        (FEDAVG, AggregationPrivacy::Local),
        (FEDAVG, central(1.0, 1.0, 10.0)),
        (MEDIAN, AggregationPrivacy::Local),
    ] {
        let mut round = RoundAggregator::new(&optimizer, &privacy, 20).unwrap();
        round.add(&[0.1; 20], 0.5).unwrap();
        // The accumulator's derived Debug prints every f64 exactly (and the lattice sum's
        // integers), so equal strings mean an unchanged accumulator.
        let before = format!("{:?}", round.accumulator);
        let mut nan = vec![0.2_f32; 20];
        nan[17] = f32::NAN;
        let mut inf = vec![0.2_f32; 20];
        inf[3] = f32::NEG_INFINITY;
        let cases: Vec<(Vec<f32>, f64, &str)> = vec![
            (nan, 1.0, "coordinate 17 is NaN"),
            (inf, 1.0, "coordinate 3 is -inf"),
            (vec![0.2; 12], 1.0, "expected 20 values, got 12"),
            (vec![0.2; 21], 1.0, "expected 20 values, got 21"),
            (vec![0.2; 20], f64::NAN, "weight NaN refused"),
            (vec![0.2; 20], -0.5, "weight -0.5 refused"),
            (vec![0.2; 20], f64::INFINITY, "weight inf refused"),
        ];
        for (update, weight, message) in cases {
            let e = round.add(&update, weight).unwrap_err();
            assert!(
                e.to_string().contains(message),
                "{}: {e} lacks {message:?}",
                privacy.name()
            );
            assert_eq!(
                format!("{:?}", round.accumulator),
                before,
                "{}: {message}",
                privacy.name()
            );
        }
        assert_eq!(round.contributions(), 1);
    }
}

#[test]
fn debug_output_never_shows_the_accumulated_values() {
    let mut round = RoundAggregator::new(&FEDAVG, &central(1.0, 1.0, 10.0), 3).unwrap();
    round.add(&[0.123_456, 0.5, 0.25], 1.0).unwrap();
    let shown = format!("{round:?}");
    assert!(
        shown.contains("central") && shown.contains("contributions: 1"),
        "{shown}"
    );
    assert!(
        !shown.contains("0.12") && !shown.contains("points"),
        "{shown}"
    );
}

#[test]
fn central_mode_refuses_weights_above_one_and_says_why() {
    let mut round = RoundAggregator::new(&FEDAVG, &central(1.0, 1.0, 10.0), 2).unwrap();
    let e = round.add(&[0.1, 0.1], 1.5).unwrap_err();
    assert!(e.to_string().contains("capped at 1"), "{e}");
    assert!(e.to_string().contains("min(n_k/ŵ, 1)"), "{e}");
    round.add(&[0.1, 0.1], 1.0).unwrap();
    round.add(&[0.1, 0.1], 0.0).unwrap();
    assert_eq!(round.contributions(), 2);
    // Outside central mode, weights are example counts.
    let mut round = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 2).unwrap();
    round.add(&[0.1, 0.1], 250.0).unwrap();
    assert!(round.add(&[0.1, 0.1], MAX_WEIGHT * 2.0).is_err());
}

// --- central -----------------------------------------------------------------------------

#[test]
fn central_clips_weights_sums_and_divides_by_the_expected_cohort_size() {
    // σ = 0.001, C = 1, W = 4: noise std on Δ is 0.00025; tolerance 0.002 is 8 std.
    let mut round = RoundAggregator::new(&FEDAVG, &central(1.0, 0.001, 4.0), 2).unwrap();
    round.add(&[3.0, 4.0], 0.5).unwrap(); // clipped to (0.6, 0.8), weighted 0.5
    round.add(&[0.0, 1.0], 1.0).unwrap(); // norm 1: unchanged
    let aggregate = round.finish(&mut sampler()).unwrap();
    // (0.3 + 0, 0.4 + 1) / 4 — divided by W = 4, not by the 2 contributions.
    let expected = [0.075, 0.35];
    for (got, want) in aggregate.delta().iter().zip(expected) {
        assert!((got - want).abs() < 0.002, "{got} vs {want}");
    }
    assert_eq!(aggregate.denominator(), 4.0);
    assert!((aggregate.noise_std() - 0.001 / 4.0).abs() < 1e-15);
}

#[test]
fn central_releases_noise_even_for_an_empty_sum() {
    let round = RoundAggregator::new(&FEDAVG, &central(1.0, 1.0, 5.0), 1000).unwrap();
    let aggregate = round.finish(&mut sampler()).unwrap();
    assert_eq!(aggregate.contributions(), 0);
    assert!(aggregate.delta().iter().any(|&x| x != 0.0));
}

// --- configuration -----------------------------------------------------------------------

#[test]
fn robust_options_are_refused_in_central_mode_with_a_config_error() {
    for optimizer in [MEDIAN, TRIMMED] {
        let e = optimizer.validate(&central(1.0, 1.0, 100.0)).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("not covered by the central-DP sensitivity analysis"),
            "{message}"
        );
        assert!(message.contains(optimizer.kind()), "{message}");
        assert!(message.contains("\"central\""), "{message}");
        assert_eq!(
            RoundAggregator::new(&optimizer, &central(1.0, 1.0, 100.0), 4).unwrap_err(),
            e
        );
        optimizer.validate(&AggregationPrivacy::Local).unwrap();
        optimizer.validate(&AggregationPrivacy::None).unwrap();
    }
    for optimizer in [
        FEDAVG,
        ServerOptimizer::Fedadam {
            server_learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
    ] {
        optimizer.validate(&central(1.0, 1.0, 100.0)).unwrap();
    }
}

#[test]
fn out_of_range_hyper_parameters_are_errors_naming_the_key() {
    let adam = |server_learning_rate, beta1, beta2, tau| ServerOptimizer::Fedadam {
        server_learning_rate,
        beta1,
        beta2,
        tau,
    };
    let cases = [
        (
            adam(0.0, 0.9, 0.99, 1e-3),
            "server_optimizer.server_learning_rate",
        ),
        (
            adam(f64::NAN, 0.9, 0.99, 1e-3),
            "server_optimizer.server_learning_rate",
        ),
        (adam(0.1, 1.0, 0.99, 1e-3), "server_optimizer.beta1"),
        (adam(0.1, 0.9, -0.1, 1e-3), "server_optimizer.beta2"),
        (adam(0.1, 0.9, 0.99, 0.0), "server_optimizer.tau"),
        (
            ServerOptimizer::Fedavgm {
                server_learning_rate: 1.0,
                momentum: 1.0,
            },
            "server_optimizer.momentum",
        ),
        (
            ServerOptimizer::Fedadagrad {
                server_learning_rate: 1.0,
                beta1: 0.0,
                tau: f64::INFINITY,
            },
            "server_optimizer.tau",
        ),
        (
            ServerOptimizer::TrimmedMean {
                server_learning_rate: 1.0,
                trim_fraction: 0.5,
            },
            "server_optimizer.trim_fraction",
        ),
        (
            ServerOptimizer::Median {
                server_learning_rate: -1.0,
            },
            "server_optimizer.server_learning_rate",
        ),
    ];
    for (optimizer, key) in cases {
        let e = optimizer.validate(&AggregationPrivacy::Local).unwrap_err();
        assert!(
            matches!(e, AggregationError::InvalidConfig { key: k, .. } if k == key),
            "{optimizer:?}: {e}"
        );
        assert!(e.to_string().contains(key));
    }
    for (privacy, key) in [
        (central(0.0, 1.0, 10.0), "clip_norm"),
        (central(1.0, 0.0, 10.0), "noise_multiplier"),
        (central(1.0, 1e-4, 10.0), "noise_multiplier"),
        (central(1.0, 1.0, f64::NAN), "expected_cohort_size"),
    ] {
        let e = FEDAVG.validate(&privacy).unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
    }
    assert_eq!(
        RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 0).unwrap_err(),
        AggregationError::EmptyModel
    );
    // σ too large for the lattice at this dimension: the privacy crate's error, passed on.
    let e = RoundAggregator::new(&FEDAVG, &central(1.0, 1000.0, 10.0), 10_000_000).unwrap_err();
    assert!(matches!(e, AggregationError::Privacy(_)), "{e}");
}

// --- memory ------------------------------------------------------------------------------

/// The streaming claim, checked on the buffers themselves: the mean path's only heap buffer
/// is the f64 accumulator, allocated once in `new`; after 2,000 updates it is the same
/// allocation (same pointer, same capacity) and `memory_bytes` has not moved; likewise the
/// central path's scratch buffer. The robust
/// path, which must buffer, is measured the same way and does grow — so the measure can fail.
/// (A counting global allocator would be more direct, but it needs `unsafe impl GlobalAlloc`,
/// which the workspace forbids.)
#[test]
fn streaming_memory_does_not_grow_with_the_cohort() {
    const D: usize = 4096;
    for privacy in [AggregationPrivacy::None, AggregationPrivacy::Local] {
        let mut round = RoundAggregator::new(&FEDAVG, &privacy, D).unwrap();
        let buffer = |r: &RoundAggregator| match &r.accumulator {
            Accumulator::Mean { weighted_sum, .. } => {
                (weighted_sum.as_ptr(), weighted_sum.capacity())
            }
            _ => unreachable!("fedavg without central noise is the mean path"),
        };
        let (bytes, allocation) = (round.memory_bytes(), buffer(&round));
        assert_eq!(bytes, D * 8);
        let update = vec![0.25_f32; D];
        for _ in 0..2000 {
            round.add(&update, 1.0).unwrap();
        }
        assert_eq!(round.memory_bytes(), bytes);
        assert_eq!(buffer(&round), allocation);
    }
    // Central: the lattice sum lives in the privacy crate (a d-element Vec<i64> replaced by
    // one of the same length on each add); what this module holds is the recycled scratch
    // copy, which must stay the same allocation.
    let mut round = RoundAggregator::new(&FEDAVG, &central(1.0, 1.0, 100.0), D).unwrap();
    let scratch = |r: &RoundAggregator| match &r.accumulator {
        Accumulator::Central { scratch, .. } => (scratch.as_ptr(), scratch.capacity()),
        _ => unreachable!("fedavg in central mode is the lattice path"),
    };
    round.add(&vec![0.5_f32; D], 1.0).unwrap();
    let (bytes, allocation) = (round.memory_bytes(), scratch(&round));
    assert_eq!(bytes, D * 16);
    for _ in 0..200 {
        round.add(&vec![0.5_f32; D], 0.5).unwrap();
    }
    assert_eq!((round.memory_bytes(), scratch(&round)), (bytes, allocation));

    let mut robust = RoundAggregator::new(&MEDIAN, &AggregationPrivacy::Local, D).unwrap();
    let update = vec![0.25_f32; D];
    for _ in 0..100 {
        robust.add(&update, 1.0).unwrap();
    }
    assert!(
        robust.memory_bytes() >= 100 * D * 4,
        "robust options buffer the cohort"
    );
    // The struct itself is small and fixed-size: no per-update bookkeeping.
    assert!(size_of::<RoundAggregator>() <= 256);
}

// --- permutation invariance --------------------------------------------------------------

fn cohort() -> impl Strategy<Value = Vec<(Vec<f32>, f64)>> {
    (1usize..6).prop_flat_map(|d| {
        prop::collection::vec(
            (
                prop::collection::vec(-100.0_f32..100.0, d),
                prop_oneof![Just(1.0), 0.01_f64..50.0],
            ),
            1..12,
        )
    })
}

fn run(
    optimizer: &ServerOptimizer,
    privacy: &AggregationPrivacy,
    updates: &[(Vec<f32>, f64)],
) -> Vec<f64> {
    let mut round = RoundAggregator::new(optimizer, privacy, updates[0].0.len()).unwrap();
    for (update, weight) in updates {
        round.add(update, *weight).unwrap();
    }
    round.finish(&mut sampler()).unwrap().into_delta()
}

proptest! {
    /// The mean is invariant up to f64 rounding of the sums (order of additions):
    /// |Δ − Δ'| ≤ 1e-12 · Σ|w x| / Σ w per coordinate.
    #[test]
    fn weighted_mean_is_permutation_invariant(
        (updates, shuffled) in cohort().prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle()))
    ) {
        let a = run(&FEDAVG, &AggregationPrivacy::Local, &updates);
        let b = run(&FEDAVG, &AggregationPrivacy::Local, &shuffled);
        let total: f64 = updates.iter().map(|(_, w)| w).sum();
        for j in 0..a.len() {
            let scale: f64 = updates.iter().map(|(u, w)| (w * f64::from(u[j])).abs()).sum::<f64>() / total;
            prop_assert!((a[j] - b[j]).abs() <= 1e-12 * scale.max(1e-300), "{} vs {}", a[j], b[j]);
        }
    }

    /// Median and trimmed mean sort each coordinate, so they are invariant bit for bit.
    #[test]
    fn median_and_trimmed_mean_are_exactly_permutation_invariant(
        (updates, shuffled) in cohort().prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle())),
        trim_fraction in 0.0_f64..0.5,
    ) {
        let trimmed = ServerOptimizer::TrimmedMean { server_learning_rate: 1.0, trim_fraction };
        for optimizer in [MEDIAN, trimmed] {
            prop_assert_eq!(
                run(&optimizer, &AggregationPrivacy::Local, &updates),
                run(&optimizer, &AggregationPrivacy::Local, &shuffled)
            );
        }
    }

    /// The central sum is held in integers, so with the same noise it is invariant bit for bit.
    #[test]
    fn central_sum_is_exactly_permutation_invariant(
        (updates, shuffled) in cohort().prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle()))
    ) {
        let capped = |c: &[(Vec<f32>, f64)]| -> Vec<(Vec<f32>, f64)> {
            c.iter().map(|(u, w)| (u.clone(), w.min(1.0))).collect()
        };
        let privacy = central(10.0, 0.5, 8.0);
        prop_assert_eq!(
            run(&FEDAVG, &privacy, &capped(&updates)),
            run(&FEDAVG, &privacy, &capped(&shuffled))
        );
    }

    /// A median is a median: it lies within each coordinate's range, with at least half of
    /// the values on each side.
    #[test]
    fn median_splits_each_coordinate_in_half(updates in cohort()) {
        let median = run(&MEDIAN, &AggregationPrivacy::Local, &updates);
        let n = updates.len();
        for (j, &m) in median.iter().enumerate() {
            let below = updates.iter().filter(|(u, _)| f64::from(u[j]) <= m).count();
            let above = updates.iter().filter(|(u, _)| f64::from(u[j]) >= m).count();
            prop_assert!(2 * below >= n && 2 * above >= n, "coordinate {}: {}", j, m);
        }
    }
}

// --- server optimisers -------------------------------------------------------------------

/// Two steps from x = 1 with Δ₁, Δ₂; returns x after each step.
fn two_steps(optimizer: ServerOptimizer, deltas: [f64; 2]) -> [f32; 2] {
    let mut state = ServerState::new(&optimizer, 1);
    let mut params = [1.0_f32];
    let mut after = [0.0; 2];
    for (k, d) in deltas.into_iter().enumerate() {
        apply(&optimizer, &mut state, &mut params, &aggregate_of(vec![d])).unwrap();
        after[k] = params[0];
    }
    assert_eq!(state.steps(), 2);
    after
}

fn assert_close(got: [f32; 2], want: [f64; 2]) {
    for (g, w) in got.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn fedavg_and_fedavgm_steps_match_hand_computed_values() {
    let fedavg = ServerOptimizer::Fedavg {
        server_learning_rate: 0.5,
    };
    // x = 1 + 0.5·0.5 = 1.25; then 1.25 + 0.5·(−0.2) = 1.15
    assert_close(two_steps(fedavg, [0.5, -0.2]), [1.25, 1.15]);
    let fedavgm = ServerOptimizer::Fedavgm {
        server_learning_rate: 1.0,
        momentum: 0.9,
    };
    // m = 0.5, x = 1.5; m = 0.9·0.5 − 0.2 = 0.25, x = 1.75
    assert_close(two_steps(fedavgm, [0.5, -0.2]), [1.5, 1.75]);
}

#[test]
fn fedadam_steps_match_hand_computed_values() {
    let adam = ServerOptimizer::Fedadam {
        server_learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 0.1,
    };
    // v₋₁ = τ² = 0.01. Step 1, Δ = 0.5: m = 0.1·0.5 = 0.05; v = 0.99·0.01 + 0.01·0.25 = 0.0124;
    //   x = 1 + 0.1·0.05/(√0.0124 + 0.1) = 1.0236568485.
    // Step 2, Δ = −0.2: m = 0.045 − 0.02 = 0.025; v = 0.99·0.0124 + 0.01·0.04 = 0.012676;
    //   x = 1.0236568 + 0.1·0.025/(√0.012676 + 0.1) = 1.0354166986.
    assert_close(
        two_steps(adam, [0.5, -0.2]),
        [1.023_656_848_5, 1.035_416_698_6],
    );
}

#[test]
fn fedyogi_steps_match_hand_computed_values_on_both_signs() {
    let yogi = ServerOptimizer::Fedyogi {
        server_learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 0.1,
    };
    // Step 1, Δ = 0.5: v₋₁ − Δ² = 0.01 − 0.25 < 0, so v = 0.01 + 0.01·0.25 = 0.0125;
    //   m = 0.05; x = 1 + 0.005/(√0.0125 + 0.1) = 1.0236067977.
    // Step 2, Δ = 0.05: v − Δ² = 0.0125 − 0.0025 > 0, so v = 0.0125 − 0.01·0.0025 = 0.012475;
    //   m = 0.045 + 0.005 = 0.05; x = 1.0236068 + 0.005/(√0.012475 + 0.1) = 1.0472260695.
    assert_close(
        two_steps(yogi, [0.5, 0.05]),
        [1.023_606_797_7, 1.047_226_069_5],
    );
    // The second moment itself, after both steps.
    let mut state = ServerState::new(&yogi, 1);
    apply(&yogi, &mut state, &mut [1.0], &aggregate_of(vec![0.5])).unwrap();
    apply(&yogi, &mut state, &mut [1.0], &aggregate_of(vec![0.05])).unwrap();
    let Moments::Yogi { m, v } = &state.moments else {
        panic!("FedYogi keeps yogi moments: {:?}", state.moments)
    };
    assert!((m[0] - 0.05).abs() < 1e-15 && (v[0] - 0.012_475).abs() < 1e-15);
}

#[test]
fn fedadagrad_steps_match_hand_computed_values() {
    let adagrad = ServerOptimizer::Fedadagrad {
        server_learning_rate: 0.1,
        beta1: 0.0,
        tau: 0.1,
    };
    // Step 1, Δ = 0.5: m = 0.5; v = 0.01 + 0.25 = 0.26; x = 1 + 0.05/(√0.26 + 0.1) = 1.0819803903.
    // Step 2, Δ = −0.2: m = −0.2; v = 0.30; x = 1.0819804 − 0.02/(√0.3 + 0.1) = 1.0511029725.
    assert_close(
        two_steps(adagrad, [0.5, -0.2]),
        [1.081_980_390_3, 1.051_102_972_5],
    );
}

#[test]
fn robust_options_step_like_fedavg_with_their_learning_rate() {
    let median = ServerOptimizer::Median {
        server_learning_rate: 0.5,
    };
    assert_close(two_steps(median, [0.5, -0.2]), [1.25, 1.15]);
}

#[test]
fn a_step_that_would_overflow_changes_nothing_and_names_the_coordinate() {
    let adam = ServerOptimizer::Fedadam {
        server_learning_rate: 1.0,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-3,
    };
    let fedavg = ServerOptimizer::Fedavg {
        server_learning_rate: 1.0,
    };
    // FedAvg: parameter 2 would become 1e39 → +∞ as f32.
    let mut state = ServerState::new(&fedavg, 3);
    let mut params = [1.0_f32, 2.0, 3.0];
    let e = apply(
        &fedavg,
        &mut state,
        &mut params,
        &aggregate_of(vec![1.0, 1.0, 1e39]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        AggregationError::NonFiniteStep {
            index: 2,
            what: "parameter"
        }
    );
    assert_eq!(params, [1.0, 2.0, 3.0]);
    assert_eq!(state, ServerState::new(&fedavg, 3));
    // Adam: Δ² overflows f64 at coordinate 1 (v = ∞), although x stays finite.
    let mut state = ServerState::new(&adam, 2);
    let mut params = [1.0_f32, 2.0];
    let e = apply(
        &adam,
        &mut state,
        &mut params,
        &aggregate_of(vec![0.1, 1e200]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        AggregationError::NonFiniteStep {
            index: 1,
            what: "optimiser moment"
        }
    );
    assert_eq!(params, [1.0, 2.0]);
    assert_eq!(state, ServerState::new(&adam, 2));
}

#[test]
fn apply_refuses_mismatched_lengths_and_another_optimisers_state() {
    let fedavgm = ServerOptimizer::Fedavgm {
        server_learning_rate: 1.0,
        momentum: 0.9,
    };
    let mut state = ServerState::new(&fedavgm, 2);
    let e = apply(
        &fedavgm,
        &mut state,
        &mut [0.0; 3],
        &aggregate_of(vec![0.0; 2]),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("params has 3 coordinates, expected 2"),
        "{e}"
    );
    let e = apply(
        &fedavgm,
        &mut state,
        &mut [0.0; 2],
        &aggregate_of(vec![0.0; 3]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("the aggregate has 3"), "{e}");
    let e = apply(
        &FEDAVG,
        &mut state,
        &mut [0.0; 2],
        &aggregate_of(vec![0.0; 2]),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("holds momentum moments") && e.to_string().contains("\"fedavg\""),
        "{e}"
    );
    assert_eq!(state.steps(), 0);
}

#[test]
fn server_state_round_trips_through_serde_and_rejects_a_tampered_length() {
    let yogi = ServerOptimizer::Fedyogi {
        server_learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 0.1,
    };
    let mut state = ServerState::new(&yogi, 3);
    apply(
        &yogi,
        &mut state,
        &mut [0.0; 3],
        &aggregate_of(vec![0.1, -0.2, 0.3]),
    )
    .unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let back: ServerState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    // A state whose moment vectors are shorter than its dimension is refused at apply.
    let mut short = back;
    if let Moments::Yogi { m, .. } = &mut short.moments {
        m.pop();
    }
    let e = apply(
        &yogi,
        &mut short,
        &mut [0.0; 3],
        &aggregate_of(vec![0.0; 3]),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("the server state has 2 coordinates"),
        "{e}"
    );
}

#[test]
fn simulated_sparse_updates_without_noise_average_like_their_dense_updates() {
    let mut sparse = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::None, 5).unwrap();
    let mut dense = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::None, 5).unwrap();
    sparse
        .add_simulated(&[0, 3], &[1.0, -2.0], 2.0, 0.0)
        .unwrap();
    sparse
        .add_simulated(&[3, 4], &[4.0, 0.5], 1.0, 0.0)
        .unwrap();
    dense.add(&[1.0, 0.0, 0.0, -2.0, 0.0], 2.0).unwrap();
    dense.add(&[0.0, 0.0, 0.0, 4.0, 0.5], 1.0).unwrap();
    assert_eq!(sparse.simulated_noise_variance(), 0.0);
    let a = sparse.finish(&mut sampler()).unwrap();
    let b = dense.finish(&mut sampler()).unwrap();
    assert_eq!(a.delta(), b.delta());
    assert_eq!(a.contributions(), 2);
}

#[test]
fn simulated_sparse_updates_are_refused_where_the_path_is_dense_or_the_input_is_bad() {
    for (optimizer, privacy) in [
        (FEDAVG, central(1.0, 1.0, 10.0)),
        (MEDIAN, AggregationPrivacy::Local),
        (TRIMMED, AggregationPrivacy::None),
    ] {
        let mut r = RoundAggregator::new(&optimizer, &privacy, 4).unwrap();
        let e = r.add_simulated(&[0], &[0.1], 1.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("weighted-mean path"), "{e}");
    }
    let mut r = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 4).unwrap();
    for (indices, values, weight, std, needle) in [
        (
            vec![1u32, 0],
            vec![0.1f32, 0.1],
            1.0,
            1.0,
            "strictly increasing",
        ),
        (vec![4], vec![0.1], 1.0, 1.0, "out of range"),
        (vec![0], vec![0.1, 0.2], 1.0, 1.0, "1 indices but 2 values"),
        (vec![2], vec![f32::INFINITY], 1.0, 1.0, "coordinate 2"),
        (vec![0], vec![0.1], -1.0, 1.0, "weight -1"),
        (vec![0], vec![0.1], 1.0, f64::NAN, "noise_std NaN"),
    ] {
        let e = r.add_simulated(&indices, &values, weight, std).unwrap_err();
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
    assert_eq!(r.contributions(), 0);
    assert_eq!(r.simulated_noise_variance(), 0.0);
}

#[test]
fn the_aggregate_noise_draw_has_variance_sum_of_squared_weights_times_sigma_c_squared() {
    // Three devices with weights 1, 2, 3 and σC = 0.5: the weighted sum's noise has variance
    // (1 + 4 + 9)·0.25 = 3.5, and Δ = sum / 6 has variance 3.5/36. 200,000 coordinates: the
    // sample variance's relative standard error is 0.3 %; the tolerance is 2 %.
    let d = 200_000;
    let mut r = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, d).unwrap();
    for w in [1.0, 2.0, 3.0] {
        r.add_simulated(&[], &[], w, 0.5).unwrap();
    }
    assert!((r.simulated_noise_variance() - 3.5).abs() < 1e-12);
    let a = r.finish(&mut sampler()).unwrap();
    let n = d as f64;
    let mean = a.delta().iter().sum::<f64>() / n;
    let var = a.delta().iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let expected = 3.5 / 36.0;
    assert!((var / expected - 1.0).abs() < 0.02, "{var} vs {expected}");
    assert!(mean.abs() < 5.0 * (expected / n).sqrt(), "{mean}");
}

#[test]
fn simulated_noise_cannot_be_finished_by_the_secure_sampler() {
    let mut r = RoundAggregator::new(&FEDAVG, &AggregationPrivacy::Local, 3).unwrap();
    r.add_simulated(&[1], &[0.5], 1.0, 1.0).unwrap();
    let e = r
        .finish(&mut fedpref_privacy::SecureSampler::from_os().unwrap())
        .unwrap_err();
    assert_eq!(e, AggregationError::SimulatedNoiseWithSecureSampler);
}
