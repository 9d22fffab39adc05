//! Prints the table of `docs/accounting.md`: for a handful of schedules, ε by the RDP and by
//! the PLD accountant at the same σ, and the σ each needs for the same target ε (the noise
//! PLD saves).
//!
//! `cargo run --release -p fedpref-privacy --example accounting_table`

use std::time::Instant;

use fedpref_privacy::{
    Accountant, OrderGrid, PrivacyMode, RoundRelease, calibrate_with, epsilon_after_with,
};

struct Schedule {
    name: &'static str,
    mode: PrivacyMode,
    sampling_rate: f64,
    rounds: u64,
    delta: f64,
    noise_multiplier: f64,
    target_epsilon: f64,
}

fn main() {
    let schedules = [
        Schedule {
            name: "README: `accountant epsilon` example",
            mode: PrivacyMode::Central,
            sampling_rate: 0.01,
            rounds: 1000,
            delta: 1e-5,
            noise_multiplier: 1.1,
            target_epsilon: 2.0,
        },
        Schedule {
            name: "README: simulator, central, `--target-epsilon 8 --sampling-rate 0.1`",
            mode: PrivacyMode::Central,
            sampling_rate: 0.1,
            rounds: 50,
            delta: 1e-5,
            noise_multiplier: 0.8573,
            target_epsilon: 8.0,
        },
        Schedule {
            name: "ML-1M private preset (`--preset movielens-1m-private`): all 6,040 users, 80 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 1.0,
            rounds: 80,
            delta: 1e-6,
            noise_multiplier: 6.1653,
            target_epsilon: 8.0,
        },
        Schedule {
            name: "README: ML-100K DP-FedAvg, q = 0.106, 100 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 0.106,
            rounds: 100,
            delta: 1e-5,
            noise_multiplier: 1.024,
            target_epsilon: 8.0,
        },
        Schedule {
            name: "local DP, 20 uploads per device",
            mode: PrivacyMode::Local,
            sampling_rate: 1.0,
            rounds: 20,
            delta: 1e-6,
            noise_multiplier: 8.0,
            target_epsilon: 8.0,
        },
        Schedule {
            name: "ML-1M-like central, q = 0.01, 100 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 0.01,
            rounds: 100,
            delta: 1e-6,
            noise_multiplier: 1.0,
            target_epsilon: 3.0,
        },
        Schedule {
            name: "ML-1M-like central, q = 0.01, 1000 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 0.01,
            rounds: 1000,
            delta: 1e-6,
            noise_multiplier: 1.0,
            target_epsilon: 3.0,
        },
        Schedule {
            name: "ML-1M-like central, q = 0.1, 100 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 0.1,
            rounds: 100,
            delta: 1e-6,
            noise_multiplier: 1.0,
            target_epsilon: 3.0,
        },
        Schedule {
            name: "ML-1M-like central, q = 0.1, 1000 rounds",
            mode: PrivacyMode::Central,
            sampling_rate: 0.1,
            rounds: 1000,
            delta: 1e-6,
            noise_multiplier: 1.0,
            target_epsilon: 3.0,
        },
    ];
    let grid = OrderGrid::default();
    println!(
        "| schedule | mode | q | T | δ | σ | RDP ε | PLD ε | target ε | RDP σ | PLD σ | noise saved |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let started = Instant::now();
    for s in &schedules {
        let release = RoundRelease {
            mode: s.mode,
            noise_multiplier: s.noise_multiplier,
            sampling_rate: s.sampling_rate,
        };
        let eps = |a| {
            epsilon_after_with(a, &release, s.rounds, s.delta, &grid)
                .expect("valid schedule")
                .epsilon
        };
        let sigma = |a| {
            calibrate_with(
                a,
                s.mode,
                s.target_epsilon,
                s.delta,
                s.sampling_rate,
                s.rounds,
                &grid,
            )
            .expect("calibrates")
            .0
        };
        let (rdp_sigma, pld_sigma) = (sigma(Accountant::Rdp), sigma(Accountant::Pld));
        println!(
            "| {} | {} | {} | {} | {:e} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {:.1} % |",
            s.name,
            s.mode,
            s.sampling_rate,
            s.rounds,
            s.delta,
            s.noise_multiplier,
            eps(Accountant::Rdp),
            eps(Accountant::Pld),
            s.target_epsilon,
            rdp_sigma,
            pld_sigma,
            100.0 * (1.0 - pld_sigma / rdp_sigma),
        );
    }
    eprintln!("computed in {:.1} s", started.elapsed().as_secs_f64());
}
