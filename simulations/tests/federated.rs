//! Short federated runs learn: they beat the global-mean baseline.

use fedpref_engine::aggregation::ServerOptimizer;
use fedpref_simulations::centralised::centralised;
use fedpref_simulations::data::{SyntheticSpec, synthetic, workload};
use fedpref_simulations::metrics::global_mean_rmse;
use fedpref_simulations::sim::{Sampling, Settings, Simulation};

#[test]
fn a_short_federated_run_beats_the_global_mean_baseline() {
    let data = synthetic(&SyntheticSpec {
        users: 200,
        items: 100,
        ..SyntheticSpec::default()
    })
    .unwrap();
    let settings = Settings {
        rounds: 5,
        sampling: Sampling::Cohort(50),
        ..Settings::default()
    };
    let mut run = Simulation::new(&settings, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    let rmse = records.last().unwrap().evaluation.as_ref().unwrap().rmse;
    let baseline = global_mean_rmse(&data);
    assert!(
        rmse < baseline,
        "federated {rmse} vs global mean {baseline}"
    );
    assert_eq!(run.client_updates, 250);
}

#[test]
fn local_dp_spends_epsilon_for_anyone_and_central_dp_with_a_target_stays_under_it() {
    let data = workload(100, 50, 10, 3).unwrap();
    let local = Settings {
        rounds: 2,
        sampling: Sampling::Cohort(20),
        privacy_mode: fedpref_engine::manifest::ManifestPrivacyMode::Local,
        noise_multiplier: Some(2.0),
        eval_every: 0,
        ranking: false,
        ..Settings::default()
    };
    let mut run = Simulation::new(&local, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    let spent = &records.last().unwrap().epsilon;
    assert_eq!(spent[0].audience, "anyone");
    assert!(spent[0].epsilon > 0.0 && spent[0].epsilon.is_finite());

    let central = Settings {
        sampling: Sampling::Rate(0.2),
        privacy_mode: fedpref_engine::manifest::ManifestPrivacyMode::Central,
        noise_multiplier: None,
        target_epsilon: Some(3.0),
        server_optimizer: ServerOptimizer::Fedavg {
            server_learning_rate: 1.0,
        },
        ..local
    };
    let mut run = Simulation::new(&central, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    let spent = &records.last().unwrap().epsilon;
    assert_eq!(spent[0].audience, "observers_unaware_of_participation");
    assert!(spent[0].epsilon <= 3.0, "{spent:?}");
}

#[test]
fn the_centralised_baseline_learns_through_the_same_sdk_code() {
    let data = synthetic(&SyntheticSpec {
        users: 150,
        items: 80,
        ..SyntheticSpec::default()
    })
    .unwrap();
    let settings = Settings {
        rounds: 3,
        eval_every: 0,
        ..Settings::default()
    };
    let records = centralised(&settings, &data).unwrap().records;
    let rmse = records.last().unwrap().evaluation.as_ref().unwrap().rmse;
    assert!(rmse < global_mean_rmse(&data), "{rmse}");
}

#[test]
fn evaluation_only_users_never_train() {
    let data =
        fedpref_simulations::data::tff_fedrecon(workload(60, 30, 10, 4).unwrap(), 1).unwrap();
    let settings = Settings {
        rounds: 3,
        sampling: Sampling::Cohort(1_000),
        eval_every: 0,
        ..Settings::default()
    };
    let mut run = Simulation::new(&settings, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    // The cohort is capped by the 48 training users; the 6 test users only evaluate.
    assert!(records.iter().all(|r| r.contributions == 48));
    assert!(records[2].evaluation.as_ref().unwrap().rmse.is_finite());
}

#[test]
fn uniform_fedavg_weighting_changes_runs_with_unequal_example_counts_only() {
    use fedpref_simulations::sim::FedavgWeighting;
    let rmse = |data: &fedpref_simulations::data::Dataset, weighting| {
        let settings = Settings {
            rounds: 3,
            sampling: Sampling::Cohort(40),
            fedavg_weighting: weighting,
            ranking: false,
            ..Settings::default()
        };
        let records = Simulation::new(&settings, data)
            .unwrap()
            .run(|_| {})
            .unwrap();
        records.last().unwrap().evaluation.as_ref().unwrap().rmse
    };
    // Synthetic users hold 8 to 120 training ratings: the weighting matters.
    let skewed = synthetic(&SyntheticSpec {
        users: 120,
        items: 60,
        ..SyntheticSpec::default()
    })
    .unwrap();
    let (a, b) = (
        rmse(&skewed, FedavgWeighting::Examples),
        rmse(&skewed, FedavgWeighting::Uniform),
    );
    assert!((a - b).abs() > 1e-6, "examples {a} vs uniform {b}");
    // The workload gives every user the same count: both weightings are the same mean (up
    // to rounding in the weighted sum).
    let equal = workload(120, 60, 10, 3).unwrap();
    let (a, b) = (
        rmse(&equal, FedavgWeighting::Examples),
        rmse(&equal, FedavgWeighting::Uniform),
    );
    assert!((a - b).abs() < 1e-9, "examples {a} vs uniform {b}");
}
