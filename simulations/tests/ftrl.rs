//! DP-FTRL, participation limits and adaptive clipping in the simulator.

use std::path::{Path, PathBuf};

use fedpref_simulations::cli::{Mode, RunArgs, RunPlan, plan, run_plan};
use fedpref_simulations::progress::Quiet;

fn run_on(threads: usize, plan: &RunPlan, out: &Path) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let outcome = pool.install(|| run_plan(plan, false, out, &Quiet)).unwrap();
    (
        std::fs::read(out.join("metrics.csv")).unwrap(),
        std::fs::read(out.join("metrics.json")).unwrap(),
        outcome.summary,
    )
}

fn ftrl_args() -> RunArgs {
    RunArgs {
        users: Some(150),
        items: Some(60),
        rounds: Some(12),
        cohort_size: Some(20),
        privacy_mode: Some(Mode::Central),
        noise_multiplier: Some(1.0),
        server_optimizer: Some("dp-ftrl".into()),
        min_separation: Some(4),
        max_participations: Some(3),
        restart_every: Some(4),
        tree_completion: true,
        adaptive_clipping: true,
        target_quantile: Some(0.5),
        seed: Some(11),
        ..RunArgs::default()
    }
}

#[test]
fn dp_ftrl_runs_with_adaptive_clipping_write_the_same_bytes_on_one_thread_and_on_three() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(&ftrl_args()).unwrap();
    let one = run_on(1, &plan, &dir.path().join("one"));
    let three = run_on(3, &plan, &dir.path().join("three"));
    assert_eq!((&one.0, &one.1), (&three.0, &three.1));
    let s = &one.2;
    assert_eq!(
        s["epsilon_rests_on"],
        "participation limits (separation 4, at most 3)"
    );
    assert_eq!(s["epsilon_assumption"], "release_observers");
    assert!(s["epsilon"].as_f64().unwrap() > 0.0);
    let c = s["clip_norm"].as_f64().unwrap();
    assert!(c > 0.0 && c != 1.0, "C moved: {c}");
    let metrics: serde_json::Value = serde_json::from_slice(&one.1).unwrap();
    assert_eq!(metrics["settings"]["participation"]["min_separation"], 4);
}

#[test]
fn a_dp_ftrl_cohort_fills_from_the_devices_its_limits_allow() {
    // With 150 users, separation 4 and at most 3 participations, 12 rounds of 20 need 240
    // participations of at most 450 allowed: every cohort fills (the engine-level property
    // test checks that no device ever breaks its limit).
    let dir = tempfile::tempdir().unwrap();
    let mut a = ftrl_args();
    a.adaptive_clipping = false;
    a.target_quantile = None;
    let plan = plan(&a).unwrap();
    let (_, json, summary) = run_on(2, &plan, &dir.path().join("o"));
    let metrics: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let rounds = metrics["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 12);
    assert!(
        rounds.iter().all(|r| r["contributions"] == 20),
        "{rounds:?}"
    );
    assert_eq!(summary["rounds"], 12);
}

#[test]
fn dp_ftrl_settings_that_do_not_fit_are_errors_naming_the_flag() {
    let mut a = ftrl_args();
    a.min_separation = None;
    a.max_participations = None;
    let p = plan(&a).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = run_plan(&p, false, dir.path(), &Quiet)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--min-separation"), "{e}");
    let mut b = ftrl_args();
    b.server_optimizer = None;
    let e = plan(&b).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("--restart-every"), "{e}");
    let mut c = ftrl_args();
    c.adaptive_clipping = false;
    let e = plan(&c).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("--target-quantile"), "{e}");
}

fn shared_ml_100k() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/ml-100k");
    if p.is_dir() {
        Some(p)
    } else {
        println!(
            "skipped: {} is absent (MovieLens is not redistributable, so it is not in the repo)",
            p.display()
        );
        None
    }
}

/// A short version of the comparison in docs/ml-engineers.md: DP-FedAvg with Poisson sampling and DP-FTRL
/// without sampling, both calibrated to ε = 8 at δ = 1e-5, both learn beyond the global mean.
#[test]
fn on_movielens_100k_dp_fedavg_with_sampling_and_dp_ftrl_without_both_learn_at_epsilon_8() {
    let Some(path) = shared_ml_100k() else {
        return;
    };
    let base = || RunArgs {
        dataset: Some(fedpref_simulations::cli::DatasetKind::Movielens100k),
        path: Some(path.clone()),
        rounds: Some(20),
        privacy_mode: Some(Mode::Central),
        target_epsilon: Some(8.0),
        eval_every: Some(0),
        ..RunArgs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let fedavg = RunArgs {
        sampling_rate: Some(0.106),
        ..base()
    };
    let ftrl = RunArgs {
        cohort_size: Some(100),
        server_optimizer: Some("dp-ftrl".into()),
        min_separation: Some(9),
        ..base()
    };
    let mut rmse = vec![];
    for (name, args) in [("dp-fedavg", fedavg), ("dp-ftrl", ftrl)] {
        let plan = plan(&args).unwrap();
        let (_, _, s) = run_on(2, &plan, &dir.path().join(name));
        let eps = s["epsilon"].as_f64().unwrap();
        assert!((eps - 8.0).abs() < 1e-3, "{name}: ε = {eps}");
        let r = s["rmse"].as_f64().unwrap();
        println!(
            "{name}: rmse {r:.4}, ε {eps:.3} ({})",
            s["epsilon_rests_on"]
        );
        rmse.push(r);
    }
    let global_mean = 1.2099;
    for r in rmse {
        assert!(r < global_mean, "{r} is no better than the global mean");
    }
}

fn local_adaptive_args() -> RunArgs {
    RunArgs {
        users: Some(150),
        items: Some(60),
        rounds: Some(10),
        cohort_size: Some(30),
        privacy_mode: Some(Mode::Local),
        noise_multiplier: Some(2.0),
        adaptive_clipping: true,
        target_quantile: Some(0.5),
        bit_noise_std: Some(1.5),
        seed: Some(5),
        ..RunArgs::default()
    }
}

#[test]
fn local_adaptive_clipping_runs_in_process_from_the_devices_bits_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let adaptive = plan(&local_adaptive_args()).unwrap();
    let one = run_on(1, &adaptive, &dir.path().join("one"));
    let three = run_on(3, &adaptive, &dir.path().join("three"));
    assert_eq!((&one.0, &one.1), (&three.0, &three.1));
    let s = &one.2;
    let c = s["clip_norm"].as_f64().unwrap();
    assert!(c.is_finite() && c > 0.0 && c != 1.0, "C moved: {c}");
    assert_eq!(s["epsilon_rests_on"], "none (worst case per device)");
    assert!(s["epsilon"].as_f64().unwrap() > 0.0);
    // --noise-multiplier is the combined multiplier of (update, bit): the same run without
    // adaptive clipping spends the same ε (its devices add more update noise instead).
    let mut fixed = local_adaptive_args();
    fixed.adaptive_clipping = false;
    fixed.target_quantile = None;
    fixed.bit_noise_std = None;
    let (_, _, f) = run_on(2, &plan(&fixed).unwrap(), &dir.path().join("fixed"));
    let (a, b) = (
        s["epsilon"].as_f64().unwrap(),
        f["epsilon"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * b, "{a} vs {b}");
}

#[test]
fn local_adaptive_clipping_needs_a_bit_noise_named_by_its_flag() {
    let mut a = local_adaptive_args();
    a.bit_noise_std = None;
    let e = plan(&a).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("--bit-noise-std"), "{e}");
    // 2σ_b must exceed the noise multiplier.
    let mut b = local_adaptive_args();
    b.bit_noise_std = Some(0.5);
    let e = match plan(&b) {
        Err(e) => e.to_string(),
        Ok(p) => {
            let dir = tempfile::tempdir().unwrap();
            run_plan(&p, false, dir.path(), &Quiet)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        }
    };
    assert!(e.contains("--bit-noise-std"), "{e}");
}

#[test]
fn local_adaptive_clipping_converges_to_within_ten_percent_of_the_true_quantile_of_update_norms() {
    use fedpref_engine::manifest::{AdaptiveClippingSpec, ManifestPrivacyMode};
    use fedpref_simulations::data::{SyntheticSpec, synthetic};
    use fedpref_simulations::sim::{Sampling, Settings, Simulation};

    let data = synthetic(&SyntheticSpec {
        users: 400,
        items: 40,
        ..SyntheticSpec::default()
    })
    .unwrap();
    for gamma in [0.5, 0.8] {
        let settings = Settings {
            rounds: 80,
            sampling: Sampling::Cohort(200),
            privacy_mode: ManifestPrivacyMode::Local,
            noise_multiplier: Some(2.0),
            clip_norm: 0.05,
            eval_every: 0,
            ranking: false,
            adaptive_clipping: Some(AdaptiveClippingSpec {
                target_quantile: gamma,
                learning_rate: 0.2,
                bit_noise_std: Some(1.5),
                min_clip_norm: None,
                max_clip_norm: None,
            }),
            seed: 9,
            ..Settings::default()
        };
        let mut run = Simulation::new(&settings, &data).unwrap();
        let mut pooled = vec![];
        for r in 0..80 {
            run.run_round().unwrap();
            if r >= 70 {
                pooled.extend_from_slice(run.update_norms());
            }
        }
        // The empirical γ-quantile of the last ten rounds' norms before clipping (C starts
        // at 0.05, about a third of the median).
        pooled.sort_by(f64::total_cmp);
        let truth = pooled[((gamma * pooled.len() as f64) as usize).min(pooled.len() - 1)];
        let c = run.engine().clip_norm();
        assert!(
            (c - truth).abs() <= 0.1 * truth,
            "γ = {gamma}: C = {c}, quantile of the update norms {truth}"
        );
    }
}
