//! `--transport grpc`: the same run as in-process, over a real coordinator on 127.0.0.1 with
//! TLS and the users as real SDK clients. Byte equality is impossible by design (the SDK's
//! noise is OS-seeded, see `src/grpc.rs`); what must be equal is asserted exactly.
#![cfg(feature = "grpc")]

use fedpref_simulations::cli::{Mode, RunArgs, Transport, plan, run_plan};
use fedpref_simulations::progress::Quiet;
use fedpref_simulations::sim::candidates;

fn args(transport: Transport) -> RunArgs {
    RunArgs {
        users: Some(20),
        items: Some(30),
        rounds: Some(2),
        cohort_size: Some(5),
        privacy_mode: Some(Mode::Local),
        noise_multiplier: Some(0.01),
        seed: Some(7),
        transport: Some(transport),
        ..RunArgs::default()
    }
}

#[test]
fn grpc_runs_the_same_cohorts_rounds_and_epsilon_as_in_process_and_a_close_rmse() {
    let dir = tempfile::tempdir().unwrap();
    let local = plan(&args(Transport::Inprocess)).unwrap();
    let grpc = plan(&args(Transport::Grpc)).unwrap();
    let a = run_plan(&local, false, &dir.path().join("a"), &Quiet).unwrap();
    let b = run_plan(&grpc, false, &dir.path().join("b"), &Quiet).unwrap();
    for key in ["rounds", "client_updates", "epsilon", "delta", "seed"] {
        assert_eq!(a.summary[key], b.summary[key], "{key}");
    }
    assert_eq!(a.summary["client_updates"], 10);
    assert_eq!(a.records.len(), b.records.len());
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!(
            (x.round, x.contributions, &x.abandoned, &x.epsilon),
            (y.round, y.contributions, &y.abandoned, &y.epsilon)
        );
    }
    // Different noise draws (OS-seeded on the device) and the SDK's own example order: close,
    // not equal. σ = 0.01 keeps the noise small.
    let (ra, rb) = (
        a.summary["rmse"].as_f64().unwrap(),
        b.summary["rmse"].as_f64().unwrap(),
    );
    assert!((ra - rb).abs() < 0.02, "in-process {ra}, grpc {rb}");
    assert_ne!(
        a.summary["rmse"], b.summary["rmse"],
        "OS-seeded noise differs"
    );

    // The same users uploaded in each round: the in-process check-ins.
    let run = fedpref_simulations::grpc::run(&grpc.settings, &grpc.data, |_| {}).unwrap();
    for (i, uploaded) in run.uploaded.iter().enumerate() {
        let mut expected = candidates(&grpc.settings, &grpc.data, i as u64 + 1);
        expected.sort_unstable();
        assert_eq!(uploaded, &expected, "round {}", i + 1);
    }
}

#[test]
fn grpc_refuses_what_it_cannot_run_naming_the_flag() {
    let mut a = args(Transport::Grpc);
    a.privacy_mode = Some(Mode::Central);
    let e = plan(&a).err().unwrap().to_string();
    assert!(
        e.contains("--transport grpc") && e.contains("--privacy-mode local or distributed"),
        "{e}"
    );
    a.privacy_mode = None;
    a.noise_multiplier = None;
    let e = plan(&a).err().unwrap().to_string();
    assert!(e.contains("--privacy-mode local"), "{e}");
    a.centralised = true;
    let e = plan(&a).err().unwrap().to_string();
    assert!(
        e.contains("--transport grpc") && e.contains("--centralised"),
        "{e}"
    );
}

#[test]
fn over_grpc_users_who_opt_out_are_not_sampled_again() {
    let mut settings = plan(&args(Transport::Grpc)).unwrap();
    settings.settings.rounds = 10;
    // Every item is disliked and every dislike makes the user leave (its device's training
    // switch is turned off): each round's uploaders are gone for good.
    settings.settings.scenario = Some(fedpref_simulations::feedback::Scenario {
        negative_below: 6.0,
        opt_out_per_negative: 1.0,
        memory: 1,
    });
    let run = fedpref_simulations::grpc::run(&settings.settings, &settings.data, |_| {}).unwrap();
    assert_eq!(run.records.len(), 4, "20 users, 5 leave per round");
    let mut seen = std::collections::HashSet::new();
    for (r, uploaded) in run.records.iter().zip(&run.uploaded) {
        assert_eq!(uploaded.len(), 5, "round {}", r.round);
        for u in uploaded {
            assert!(seen.insert(*u), "u{u} trained after opting out");
        }
        let f = r.feedback.as_ref().unwrap();
        assert_eq!(f.opted_out, 5);
        assert_eq!(f.opt_out_rate, r.round as f64 * 5.0 / 20.0);
    }
}

#[test]
fn distributed_over_grpc_runs_the_same_cohorts_and_epsilon_as_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let distributed = |transport| RunArgs {
        privacy_mode: Some(Mode::Distributed),
        noise_multiplier: Some(1.0),
        ..args(transport)
    };
    let local = plan(&distributed(Transport::Inprocess)).unwrap();
    let grpc = plan(&distributed(Transport::Grpc)).unwrap();
    let a = run_plan(&local, false, &dir.path().join("a"), &Quiet).unwrap();
    let b = run_plan(&grpc, false, &dir.path().join("b"), &Quiet).unwrap();
    for key in [
        "rounds",
        "client_updates",
        "epsilon",
        "epsilon_assumption",
        "epsilon_rests_on",
    ] {
        assert_eq!(a.summary[key], b.summary[key], "{key}");
    }
    assert_eq!(a.summary["client_updates"], 10);
    assert_eq!(a.summary["epsilon_assumption"], "release_observers");
    assert!(a.summary["epsilon"].as_f64().unwrap() > 0.0);
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!(
            (x.round, x.contributions, &x.abandoned, &x.epsilon),
            (y.round, y.contributions, &y.abandoned, &y.epsilon)
        );
    }
}

#[test]
fn distributed_over_grpc_refuses_simulated_drop_out_naming_the_flag() {
    let mut a = args(Transport::Grpc);
    a.privacy_mode = Some(Mode::Distributed);
    a.noise_multiplier = Some(1.0);
    a.dropout = Some(0.1);
    let e = plan(&a).err().unwrap().to_string();
    assert!(
        e.contains("--transport grpc") && e.contains("--dropout"),
        "{e}"
    );
}
