//! Aggregation through the public API: central noise at the stated scale, provenance in the
//! types, the manifest's `[server_optimizer]` table, and whole rounds end to end.

use fedpref_coordinator::aggregation::{
    Aggregate, AggregationError, AggregationPrivacy, RoundAggregator, ServerOptimizer, ServerState,
    apply,
};
use fedpref_privacy::{Secure, SecureSampler, Simulated, SimulationSampler};

/// A deterministic update with small coordinates (L2 norm well below 1 for d ≤ 10⁶).
fn update(dimension: usize, device: usize) -> Vec<f32> {
    (0..dimension)
        .map(|j| 1e-4 * (((j * 7 + device * 3) % 13) as f32 - 6.0))
        .collect()
}

fn l2(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// With σ = 0.8, C = 2 and W = 50, the noise on each coordinate of Δ must have standard
/// deviation σC/W = 0.032. Over d = 200,000 coordinates the sample standard deviation has a
/// relative standard error of 1/√(2d) ≈ 0.16%; the tolerance is 1% (about 6 standard errors),
/// and the sample mean must be within 5·0.032/√d of 0.
#[test]
fn central_noise_on_the_mean_has_std_sigma_c_over_the_expected_cohort_size() {
    const D: usize = 200_000;
    let (sigma, clip, cohort) = (0.8, 2.0, 50.0);
    let privacy = AggregationPrivacy::Central {
        clip_norm: clip,
        noise_multiplier: sigma,
        expected_cohort_size: cohort,
    };
    let mut round = RoundAggregator::new(&ServerOptimizer::default(), &privacy, D).unwrap();
    let weights = [1.0, 0.5, 0.25];
    let mut expected = vec![0.0_f64; D];
    for (device, &w) in weights.iter().enumerate() {
        let u = update(D, device);
        assert!(l2(&u) < clip, "the test's updates are not clipped");
        for (e, &x) in expected.iter_mut().zip(&u) {
            *e += w * f64::from(x) / cohort;
        }
        round.add(&u, w).unwrap();
    }
    let aggregate: Aggregate<Simulated> = round
        .finish(&mut SimulationSampler::seed_from_u64(2024))
        .unwrap();
    assert_eq!(aggregate.contributions(), 3);
    let want_std = sigma * clip / cohort;
    assert!((aggregate.noise_std() - want_std).abs() < 1e-15);

    let noise: Vec<f64> = aggregate
        .delta()
        .iter()
        .zip(&expected)
        .map(|(d, e)| d - e)
        .collect();
    let mean = noise.iter().sum::<f64>() / D as f64;
    let std = (noise.iter().map(|z| (z - mean).powi(2)).sum::<f64>() / (D - 1) as f64).sqrt();
    assert!(
        (std / want_std - 1.0).abs() < 0.01,
        "empirical noise std {std} vs σC/W = {want_std}"
    );
    assert!(
        mean.abs() < 5.0 * want_std / (D as f64).sqrt(),
        "noise mean {mean}"
    );
}

#[test]
fn the_secure_sampler_gives_an_aggregate_of_secure_provenance() {
    const D: usize = 2_000;
    let privacy = AggregationPrivacy::Central {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_cohort_size: 100.0,
    };
    let mut round = RoundAggregator::new(&ServerOptimizer::default(), &privacy, D).unwrap();
    for device in 0..5 {
        round.add(&update(D, device), 1.0).unwrap();
    }
    // The annotation is the test: this only compiles because the sampler is secure.
    let aggregate: Aggregate<Secure> = round
        .finish(&mut SecureSampler::from_os().unwrap())
        .unwrap();
    assert_eq!(aggregate.provenance(), "secure");
    // Noise std 0.01 per coordinate; every coordinate within 6 std of the true mean (a
    // false failure has probability below 2000 · 2e-9).
    for j in 0..D {
        let truth: f64 = (0..5).map(|k| f64::from(update(D, k)[j])).sum::<f64>() / 100.0;
        assert!((aggregate.delta()[j] - truth).abs() < 0.06);
    }
}

#[test]
fn local_mode_is_finished_with_either_sampler_and_carries_its_provenance() {
    let optimizer = ServerOptimizer::default();
    let mut a = RoundAggregator::new(&optimizer, &AggregationPrivacy::Local, 2).unwrap();
    a.add(&[1.0, 2.0], 1.0).unwrap();
    let secure: Aggregate<Secure> = a.finish(&mut SecureSampler::from_os().unwrap()).unwrap();
    assert_eq!(secure.delta(), &[1.0, 2.0]);
    assert_eq!(secure.noise_std(), 0.0);
}

// --- the manifest's [server_optimizer] table ---------------------------------------------

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Manifest {
    server_optimizer: ServerOptimizer,
}

fn parse(table: &str) -> Result<ServerOptimizer, toml::de::Error> {
    toml::from_str::<Manifest>(&format!("[server_optimizer]\n{table}")).map(|m| m.server_optimizer)
}

#[test]
fn server_optimizer_tables_parse_with_the_documented_defaults() {
    assert_eq!(
        parse("kind = \"fedadam\"\nserver_learning_rate = 0.05\ntau = 1e-4").unwrap(),
        ServerOptimizer::Fedadam {
            server_learning_rate: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-4
        }
    );
    assert_eq!(
        parse("kind = \"fedyogi\"").unwrap(),
        ServerOptimizer::Fedyogi {
            server_learning_rate: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3
        }
    );
    assert_eq!(
        parse("kind = \"fedadagrad\"").unwrap(),
        ServerOptimizer::Fedadagrad {
            server_learning_rate: 0.01,
            beta1: 0.0,
            tau: 1e-3
        }
    );
    assert_eq!(
        parse("kind = \"fedavg\"").unwrap(),
        ServerOptimizer::default()
    );
    assert_eq!(
        parse("kind = \"fedavgm\"").unwrap(),
        ServerOptimizer::Fedavgm {
            server_learning_rate: 1.0,
            momentum: 0.9
        }
    );
    assert_eq!(
        parse("kind = \"median\"").unwrap(),
        ServerOptimizer::Median {
            server_learning_rate: 1.0
        }
    );
    assert_eq!(
        parse("kind = \"trimmed-mean\"\ntrim_fraction = 0.1").unwrap(),
        ServerOptimizer::TrimmedMean {
            server_learning_rate: 1.0,
            trim_fraction: 0.1
        }
    );
    // Every kind round-trips through its own serialisation.
    for kind in [
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "median",
    ] {
        let optimizer = parse(&format!("kind = \"{kind}\"")).unwrap();
        assert_eq!(optimizer.kind(), kind);
        let again = toml::to_string(&Manifest2 {
            server_optimizer: optimizer,
        })
        .unwrap();
        assert_eq!(
            toml::from_str::<Manifest>(&again).unwrap().server_optimizer,
            optimizer
        );
    }
}

#[derive(serde::Serialize)]
struct Manifest2 {
    server_optimizer: ServerOptimizer,
}

#[test]
fn unknown_keys_and_kinds_are_errors_that_name_them() {
    let e = parse("kind = \"fedadam\"\nbeta_1 = 0.9")
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta_1"), "{e}");
    // A key that belongs to another optimiser is unknown here too.
    let e = parse("kind = \"fedavg\"\nmomentum = 0.9")
        .unwrap_err()
        .to_string();
    assert!(e.contains("momentum"), "{e}");
    let e = parse("kind = \"fedsgd\"").unwrap_err().to_string();
    assert!(e.contains("fedsgd"), "{e}");
    let e = parse("kind = \"trimmed-mean\"").unwrap_err().to_string();
    assert!(e.contains("trim_fraction"), "{e}");
    // Parsing accepts any number; validate() names the key that is out of range.
    let optimizer = parse("kind = \"fedyogi\"\nbeta2 = 1.5").unwrap();
    let e = optimizer.validate(&AggregationPrivacy::Local).unwrap_err();
    assert!(
        e.to_string().contains("server_optimizer.beta2 = 1.5"),
        "{e}"
    );
}

#[test]
fn median_in_central_mode_is_a_config_error_before_any_round() {
    let optimizer = parse("kind = \"median\"").unwrap();
    let privacy = AggregationPrivacy::Central {
        clip_norm: 1.0,
        noise_multiplier: 1.1,
        expected_cohort_size: 1000.0,
    };
    let e = RoundAggregator::new(&optimizer, &privacy, 16).unwrap_err();
    assert!(matches!(e, AggregationError::RobustNotCoveredByDp { .. }));
    assert!(
        e.to_string()
            .contains("not covered by the central-DP sensitivity analysis"),
        "{e}"
    );
}

// --- whole rounds ------------------------------------------------------------------------

/// Devices whose best model is `target` send Δ_k = target − x + noise; with each optimiser
/// the global model approaches the target over the rounds.
#[test]
fn rounds_of_each_optimiser_converge_on_a_shared_target() {
    const D: usize = 8;
    let target: Vec<f32> = (0..D).map(|j| j as f32 * 0.25 - 1.0).collect();
    let optimizers = [
        ServerOptimizer::default(),
        ServerOptimizer::Fedavgm {
            server_learning_rate: 0.5,
            momentum: 0.5,
        },
        ServerOptimizer::Fedadam {
            server_learning_rate: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ServerOptimizer::Fedyogi {
            server_learning_rate: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ServerOptimizer::Fedadagrad {
            server_learning_rate: 0.2,
            beta1: 0.0,
            tau: 1e-3,
        },
        ServerOptimizer::Median {
            server_learning_rate: 1.0,
        },
    ];
    for optimizer in optimizers {
        let mut state = ServerState::new(&optimizer, D);
        let mut params = vec![0.0_f32; D];
        let mut noise = SimulationSampler::seed_from_u64(5);
        for _round in 0..300 {
            let mut aggregator =
                RoundAggregator::new(&optimizer, &AggregationPrivacy::Local, D).unwrap();
            for device in 0..10 {
                let mut jitter = vec![0.0_f64; D];
                noise.add_gaussian(&mut jitter, 0.01);
                let u: Vec<f32> = (0..D)
                    .map(|j| target[j] - params[j] + jitter[j] as f32)
                    .collect();
                aggregator.add(&u, 1.0 + device as f64).unwrap();
            }
            let aggregate = aggregator.finish(&mut noise).unwrap();
            apply(&optimizer, &mut state, &mut params, &aggregate).unwrap();
        }
        let error = params
            .iter()
            .zip(&target)
            .map(|(p, t)| (p - t).abs())
            .fold(0.0_f32, f32::max);
        assert!(error < 0.02, "{}: max error {error}", optimizer.kind());
        assert_eq!(state.steps(), 300);
    }
}

/// One device in ten sends a huge update: the median barely moves, the mean is dragged.
#[test]
fn the_median_resists_an_outlier_that_drags_the_mean() {
    let mut median = RoundAggregator::new(
        &ServerOptimizer::Median {
            server_learning_rate: 1.0,
        },
        &AggregationPrivacy::Local,
        1,
    )
    .unwrap();
    let mut mean =
        RoundAggregator::new(&ServerOptimizer::default(), &AggregationPrivacy::Local, 1).unwrap();
    for k in 0..9 {
        let honest = [1.0 + 0.01 * k as f32];
        median.add(&honest, 1.0).unwrap();
        mean.add(&honest, 1.0).unwrap();
    }
    median.add(&[1e6], 1.0).unwrap();
    mean.add(&[1e6], 1.0).unwrap();
    let mut sampler = SimulationSampler::seed_from_u64(1);
    let m = median.finish(&mut sampler).unwrap().delta()[0];
    let a = mean.finish(&mut sampler).unwrap().delta()[0];
    assert!((m - 1.045).abs() < 1e-6, "median {m}");
    assert!(a > 1e5, "mean {a}");
}
