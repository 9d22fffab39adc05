//! Rounds per second with one vs two coordinator replicas on one PostgreSQL database, for many
//! small concurrent runs: each replica takes the leases of its share of the runs and drives
//! rounds through its own durable `Coordinator` (engine, fenced store transactions, ledger) on
//! its own thread, as replica processes would. Devices are simulated in process; the figure is
//! what the round engine plus the database sustain.
//!
//! `cargo bench -p fedpref-coordinator --bench replicas [-- --runs 24 --rounds 5]`
//! (uses `FEDPREF_TEST_POSTGRES_URL`, or starts a throwaway cluster like the tests).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Instant;

use common::{COHORT_MANIFEST, durable_round, manifest, pg};
use fedpref_coordinator::coordinator::{self, Coordinator};
use fedpref_coordinator::store::{LeaseOutcome, Store};

const T0: i64 = 1_700_000_000_000;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Creates `runs` runs in a fresh database and returns its URL.
fn database(runs: usize) -> String {
    let url = pg::fresh_database().expect("a PostgreSQL server");
    let text = COHORT_MANIFEST
        .replace("rounds = 5", "rounds = 100000")
        .replace("epsilon = 20.0", "epsilon = 1000000.0");
    let m = manifest(&text);
    let mut store = Store::open_location(&url).unwrap();
    for r in 0..runs {
        coordinator::create_run(&mut store, &format!("run-{r}"), &m, T0).unwrap();
    }
    url
}

/// Committed rounds per second with `replicas` replicas sharing `runs` runs.
fn measure(replicas: usize, runs: usize, rounds: usize) -> f64 {
    let url = database(runs);
    let mut coordinators = vec![];
    for i in 0..replicas {
        let mut store = Store::open_location(&url).unwrap();
        store.enable_fencing(&format!("replica-{i}"), "https://bench:7443", 600_000);
        let mut c = Coordinator::replica(store).unwrap();
        for r in (0..runs).filter(|r| r % replicas == i) {
            let run = format!("run-{r}");
            let taken = c.store_mut().acquire_lease(&run).unwrap();
            assert!(matches!(taken, LeaseOutcome::Acquired { .. }), "{taken:?}");
            c.adopt(&run, None, T0).unwrap();
        }
        coordinators.push(c);
    }
    let start = Instant::now();
    let committed: usize = std::thread::scope(|s| {
        let handles: Vec<_> = coordinators
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                s.spawn(move || {
                    let owned = c.loaded_runs();
                    let mut now = T0 + 1;
                    for round in 0..rounds {
                        for run in &owned {
                            now = durable_round(&mut c, run, &format!("{i}-{round}"), 4, now);
                        }
                    }
                    owned.len() * rounds
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    let store = Store::open_location(&url).unwrap();
    let stored: u64 = store
        .runs()
        .unwrap()
        .iter()
        .map(|r| r.rounds_committed)
        .sum();
    assert_eq!(stored as usize, committed, "every round committed once");
    committed as f64 / secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = arg("--runs", 24);
    let rounds = arg("--rounds", 5);
    if pg::server().is_none() {
        return;
    }
    println!("{runs} runs × {rounds} rounds of 4 devices each, PostgreSQL, fenced commits");
    for replicas in [1, 2] {
        let rate = measure(replicas, runs, rounds);
        println!("replicas = {replicas}: {rate:.1} committed rounds/s");
    }
}
