//! The user-feedback scenario through the public API: opted-out users stop being sampled,
//! and runs with it stay the same bytes on any number of threads.

use std::path::Path;

use fedpref_simulations::cli::{RunArgs, RunPlan, plan, run_plan};
use fedpref_simulations::data::{SyntheticSpec, synthetic};
use fedpref_simulations::feedback::Scenario;
use fedpref_simulations::progress::Quiet;
use fedpref_simulations::sim::{Sampling, Settings, Simulation};

#[test]
fn users_who_opt_out_are_never_sampled_again_and_the_run_ends_when_nobody_is_left() {
    let data = synthetic(&SyntheticSpec {
        users: 60,
        items: 40,
        ..SyntheticSpec::default()
    })
    .unwrap();
    // Every item is disliked and every dislike makes the user leave: each round's cohort
    // opts out as a whole, so the next cohort must come from the users still in.
    let settings = Settings {
        rounds: 10,
        sampling: Sampling::Cohort(20),
        scenario: Some(Scenario {
            negative_below: 6.0,
            opt_out_per_negative: 1.0,
            memory: 1,
        }),
        ..Settings::default()
    };
    let mut run = Simulation::new(&settings, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    assert_eq!(records.len(), 3, "60 users, 20 leave per round");
    let rates: Vec<f64> = records
        .iter()
        .map(|r| r.feedback.as_ref().unwrap().opt_out_rate)
        .collect();
    assert_eq!(rates, [20.0 / 60.0, 40.0 / 60.0, 1.0]);
    for r in &records {
        assert_eq!(r.contributions, 20, "round {}", r.round);
        let f = r.feedback.as_ref().unwrap();
        assert_eq!((f.exposed_users, f.opted_out), (20, 20));
        assert_eq!(f.negative_feedback_rate, Some(1.0));
    }
    assert_eq!(run.client_updates, 60, "every user trained exactly once");
}

#[test]
fn without_the_scenario_records_have_no_feedback_and_with_it_some_users_stay() {
    let data = synthetic(&SyntheticSpec {
        users: 120,
        items: 60,
        ..SyntheticSpec::default()
    })
    .unwrap();
    let base = Settings {
        rounds: 4,
        sampling: Sampling::Cohort(30),
        eval_every: 0,
        ..Settings::default()
    };
    let plain = Simulation::new(&base, &data).unwrap().run(|_| {}).unwrap();
    assert!(plain.iter().all(|r| r.feedback.is_none()));
    let with = Settings {
        scenario: Some(Scenario::default()),
        ..base
    };
    let records = Simulation::new(&with, &data).unwrap().run(|_| {}).unwrap();
    assert_eq!(records.len(), 4);
    let last = records.last().unwrap().feedback.clone().unwrap();
    let rate = last.negative_feedback_rate.unwrap();
    assert!(rate > 0.0 && rate < 1.0, "negative feedback rate {rate}");
    assert!(
        last.opt_out_rate < 0.5,
        "opt-out rate {}",
        last.opt_out_rate
    );
    // The opt-out rate never falls: opting out is for good.
    let rates: Vec<f64> = records
        .iter()
        .map(|r| r.feedback.as_ref().unwrap().opt_out_rate)
        .collect();
    assert!(rates.windows(2).all(|w| w[0] <= w[1]), "{rates:?}");
}

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

#[test]
fn feedback_runs_write_the_same_metrics_bytes_on_one_thread_and_on_four() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sim.toml");
    std::fs::write(
        &config,
        "[scenario]\nnegative_below = 3.0\nopt_out_per_negative = 0.1\nmemory = 2\n",
    )
    .unwrap();
    let plan = plan(&RunArgs {
        config: Some(config),
        users: Some(150),
        items: Some(60),
        rounds: Some(4),
        cohort_size: Some(40),
        privacy_mode: Some(fedpref_simulations::cli::Mode::Local),
        noise_multiplier: Some(0.5),
        seed: Some(11),
        ..RunArgs::default()
    })
    .unwrap();
    let one = run_on(1, &plan, &dir.path().join("one"));
    let four = run_on(4, &plan, &dir.path().join("four"));
    let csv = String::from_utf8_lossy(&one.0).into_owned();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",negative_feedback_rate,opt_out_rate")
    );
    let last = csv.lines().last().unwrap();
    let opt_out: f64 = last.rsplit(',').next().unwrap().parse().unwrap();
    assert!(opt_out > 0.0, "someone opted out: {last}");
    assert_eq!(one, four);
}
