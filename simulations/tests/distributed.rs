//! `--privacy-mode distributed` in-process: real SecAgg+ rounds with noise shares, drop-out,
//! abandonment that spends nothing, and the same bytes on any thread count.

use std::path::Path;

use fedpref_engine::manifest::ManifestPrivacyMode;
use fedpref_simulations::cli::{Mode, RunArgs, RunPlan, plan, run_plan};
use fedpref_simulations::data::{SyntheticSpec, synthetic};
use fedpref_simulations::distributed::DistributedSimulation;
use fedpref_simulations::progress::Quiet;
use fedpref_simulations::sim::{Sampling, Settings};

fn run_on(threads: usize, plan: &RunPlan, out: &Path) -> (Vec<u8>, Vec<u8>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| run_plan(plan, false, out, &Quiet)).unwrap();
    (
        std::fs::read(out.join("metrics.csv")).unwrap(),
        std::fs::read(out.join("summary.json")).unwrap(),
    )
}

fn args() -> RunArgs {
    RunArgs {
        users: Some(120),
        items: Some(40),
        rounds: Some(3),
        cohort_size: Some(30),
        privacy_mode: Some(Mode::Distributed),
        noise_multiplier: Some(1.0),
        dropout: Some(0.2),
        corruption_rate: Some(0.05),
        seed: Some(7),
        ..RunArgs::default()
    }
}

fn settings() -> Settings {
    Settings {
        rounds: 3,
        sampling: Sampling::Cohort(20),
        privacy_mode: ManifestPrivacyMode::Distributed,
        noise_multiplier: Some(1.0),
        eval_every: 0,
        ranking: false,
        ..Settings::default()
    }
}

#[test]
fn distributed_runs_write_the_same_bytes_on_one_thread_and_on_three() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&args()).unwrap();
    let one = run_on(1, &plan, &dir.path().join("one"));
    let three = run_on(3, &plan, &dir.path().join("three"));
    let again = run_on(2, &plan, &dir.path().join("again"));
    assert_eq!(one.0, three.0);
    assert_eq!(one.0, again.0);
    let csv = String::from_utf8(one.0).unwrap();
    assert!(csv.contains("epsilon_release_observers"), "{csv}");
    let summary: serde_json::Value = serde_json::from_slice(&one.1).unwrap();
    assert_eq!(summary["epsilon_assumption"], "release_observers");
    let rests_on = summary["epsilon_rests_on"].as_str().unwrap();
    assert!(rests_on.contains("secure aggregation"), "{rests_on}");
    assert!(rests_on.contains("honest devices"), "{rests_on}");
    // 20% drop-out: some rounds lose devices, and those after uploading are recovered.
    assert!(summary["client_updates"].as_u64().unwrap() < 90);
}

#[test]
fn a_different_seed_gives_a_different_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = plan(&args()).unwrap();
    let mut b = args();
    b.seed = Some(8);
    let b = plan(&b).unwrap();
    assert_ne!(
        run_on(2, &a, &dir.path().join("a")).0,
        run_on(2, &b, &dir.path().join("b")).0
    );
}

#[test]
fn every_round_without_drop_out_releases_the_whole_cohort_and_epsilon_grows() {
    let data = synthetic(&SyntheticSpec {
        users: 60,
        items: 30,
        ..SyntheticSpec::default()
    })
    .unwrap();
    let mut run = DistributedSimulation::new(&settings(), &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    assert_eq!(records.len(), 3);
    let mut last = 0.0;
    for r in &records {
        assert_eq!(r.contributions, 20, "{r:?}");
        assert!(r.abandoned.is_none());
        let e = r.epsilon[0].epsilon;
        assert!(e > last && e.is_finite(), "{e} after {last}");
        last = e;
    }
    // Three rounds compose exactly as the mechanism's own accountant says.
    let expected = run
        .plan()
        .mechanism
        .epsilon_after(3, 1e-5, &fedpref_privacy::OrderGrid::default())
        .unwrap()
        .epsilon;
    assert!((last - expected).abs() < 1e-9, "{last} vs {expected}");
    assert_eq!(run.client_updates, 60);
}

#[test]
fn a_round_with_fewer_than_t_survivors_is_abandoned_and_spends_nothing_and_late_drops_are_recovered()
 {
    let data = synthetic(&SyntheticSpec {
        users: 60,
        items: 30,
        ..SyntheticSpec::default()
    })
    .unwrap();
    // Parameters chosen for 10% drop-out (the graph then has enough neighbours to recover
    // devices that drop after uploading).
    let settings = Settings {
        dropout: 0.1,
        ..settings()
    };
    let mut run = DistributedSimulation::new(&settings, &data).unwrap();
    let n = run.cohort_size();
    let t = run.plan().secagg.threshold;
    let before = run.model().unwrap();
    // n − t + 1 devices never advertise keys: t − 1 are left.
    let mut dropouts = fedpref_secagg::inprocess::Dropouts::default();
    dropouts.before_keys.extend(1..=n - t + 1);
    let record = run.run_round_with(&dropouts).unwrap();
    assert_eq!(record.contributions, 0);
    let reason = record.abandoned.expect("abandoned");
    assert!(reason.contains("secure aggregation"), "{reason}");
    assert_eq!(record.epsilon[0].epsilon, 0.0);
    assert_eq!(run.rounds_committed(), 0);
    assert_eq!(run.model().unwrap(), before, "the model moved");

    // Two devices upload and then vanish: the unmasking stage recovers them, the round is
    // released, and only it is spent.
    let mut dropouts = fedpref_secagg::inprocess::Dropouts::default();
    dropouts.before_unmask.extend([3, 11]);
    let record = run.run_round_with(&dropouts).unwrap();
    assert!(record.abandoned.is_none(), "{record:?}");
    assert_eq!(record.contributions, u64::from(n));
    let one_round = run
        .plan()
        .mechanism
        .epsilon_after(1, 1e-5, &fedpref_privacy::OrderGrid::default())
        .unwrap()
        .epsilon;
    assert!((record.epsilon[0].epsilon - one_round).abs() < 1e-9);
    assert_ne!(run.model().unwrap(), before);
}

#[test]
fn settings_distributed_mode_cannot_honour_are_refused_naming_the_flag() {
    for (mutate, flag) in [
        (
            Box::new(|a: &mut RunArgs| {
                a.cohort_size = None;
                a.sampling_rate = Some(0.5);
            }) as Box<dyn Fn(&mut RunArgs)>,
            "--cohort-size",
        ),
        (
            Box::new(|a: &mut RunArgs| a.dropout = Some(0.6)),
            "--dropout",
        ),
        (
            Box::new(|a: &mut RunArgs| a.corruption_rate = Some(0.5)),
            "--corruption-rate",
        ),
        (
            Box::new(|a: &mut RunArgs| a.cohort_size = Some(2)),
            "--cohort-size",
        ),
        (
            Box::new(|a: &mut RunArgs| {
                a.noise_multiplier = None;
                a.target_epsilon = Some(5.0);
            }),
            "--target-epsilon",
        ),
        (
            Box::new(|a: &mut RunArgs| {
                a.privacy_mode = Some(Mode::Central);
            }),
            "--dropout",
        ),
    ] {
        let mut a = args();
        mutate(&mut a);
        let err = match plan(&a) {
            Ok(p) => match fedpref_simulations::distributed::DistributedSimulation::new(
                &p.settings,
                &p.data,
            ) {
                Ok(_) => panic!("accepted: expected an error naming {flag}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(err.contains(flag), "expected {flag} in: {err}");
    }
}

#[test]
fn participation_limits_cap_a_distributed_runs_epsilon_at_k_rounds() {
    let mut a = args();
    a.dropout = Some(0.0);
    a.min_separation = Some(1);
    a.max_participations = Some(1);
    let p = plan(&a).unwrap();
    let mut run = DistributedSimulation::new(&p.settings, &p.data).unwrap();
    assert!(
        run.epsilon_assumption()
            .starts_with("participation limits (separation 1, at most 1); "),
        "{}",
        run.epsilon_assumption()
    );
    let records = run.run(|_| {}).unwrap();
    assert_eq!(records.len(), 3);
    let one_round = run
        .plan()
        .mechanism
        .epsilon_after(1, 1e-5, &fedpref_privacy::OrderGrid::default())
        .unwrap()
        .epsilon;
    for r in &records {
        assert!(r.abandoned.is_none(), "{r:?}");
        assert!((r.epsilon[0].epsilon - one_round).abs() < 1e-9, "{r:?}");
    }
    // 120 users, cohorts of 30, each at most once: three disjoint cohorts.
    assert_eq!(run.client_updates, 90);
}
