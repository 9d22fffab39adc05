//! Same seed, same bytes: one thread or many.

use std::path::Path;

use fedpref_simulations::cli::{RunArgs, RunPlan, plan, run_plan};
use fedpref_simulations::progress::Quiet;

fn run_on(threads: usize, plan: &RunPlan, out: &Path) -> (Vec<u8>, Vec<u8>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| run_plan(plan, false, out, &Quiet)).unwrap();
    (
        std::fs::read(out.join("metrics.csv")).unwrap(),
        std::fs::read(out.join("metrics.json")).unwrap(),
    )
}

fn args(mode: fedpref_simulations::cli::Mode) -> RunArgs {
    RunArgs {
        users: Some(120),
        items: Some(60),
        rounds: Some(3),
        cohort_size: Some(40),
        privacy_mode: Some(mode),
        noise_multiplier: Some(0.5),
        seed: Some(7),
        ..RunArgs::default()
    }
}

#[test]
fn local_dp_runs_write_the_same_metrics_bytes_on_one_thread_and_on_four() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&args(fedpref_simulations::cli::Mode::Local)).unwrap();
    let one = run_on(1, &plan, &dir.path().join("one"));
    let four = run_on(4, &plan, &dir.path().join("four"));
    assert!(one.0.len() > 100 && String::from_utf8_lossy(&one.0).contains("epsilon_anyone"));
    assert_eq!(one, four);
}

#[test]
fn central_dp_runs_with_poisson_sampling_are_deterministic_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(fedpref_simulations::cli::Mode::Central);
    a.cohort_size = None;
    a.sampling_rate = Some(0.3);
    let plan = plan(&a).unwrap();
    let one = run_on(1, &plan, &dir.path().join("one"));
    let three = run_on(3, &plan, &dir.path().join("three"));
    assert!(String::from_utf8_lossy(&one.0).contains("epsilon_observers_unaware_of_participation"));
    assert_eq!(one, three);
}

#[test]
fn a_different_seed_gives_different_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let plan_a = plan(&args(fedpref_simulations::cli::Mode::Local)).unwrap();
    let mut b = args(fedpref_simulations::cli::Mode::Local);
    b.seed = Some(8);
    let plan_b = plan(&b).unwrap();
    assert_ne!(
        run_on(2, &plan_a, &dir.path().join("a")).0,
        run_on(2, &plan_b, &dir.path().join("b")).0
    );
}
