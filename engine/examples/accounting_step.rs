//! How long the round engine's accounting takes per round, with each accountant.
//!
//! Drives a central run with Poisson sampling (q = 0.01, σ = 1, δ = 1e-5, 1,000 rounds, a
//! one-coordinate model so that aggregation costs next to nothing) through the engine, once
//! with `accountant = "rdp"` and once with `accountant = "pld"`, and prints the time per round
//! of each and their difference: the PLD accountant's per-round step (the ε of the next
//! round's release checked against the budget before the round opens, and both audiences' ε
//! stated when it commits).
//!
//! ```sh
//! cargo run --release -p fedpref-engine --example accounting_step [ROUNDS]
//! ```

use std::time::Instant;

use fedpref_engine::engine::{Action, Engine, Event, RunState};
use fedpref_engine::manifest::RunManifest;
use fedpref_privacy::SimulationSampler;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

const MANIFEST: &str = r#"
title = "accounting step"
purpose = "measure the accountant"
owner = "bench"
privacy_mode = "central"
rounds = ROUNDS
clip_norm = 1.0
noise_multiplier = 1.0
accountant = "ACCOUNTANT"

[budget]
epsilon = 1000.0
delta = 1e-5
audience = "observers_unaware_of_participation"

[sampling]
kind = "poisson"
rate = 0.01
population = 400
round_seconds = 60
minimum_size = 1

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 1
factors = 1

[opt_out_policy]
consent_model = "opt-in"
description = "bench"
"#;

/// Runs `rounds` rounds; returns the seconds taken and the last ε statement.
fn run(accountant: &str, rounds: u64) -> (f64, String) {
    let text = MANIFEST
        .replace("ROUNDS", &rounds.to_string())
        .replace("ACCOUNTANT", accountant);
    let manifest = RunManifest::from_toml(&text, "bench.toml").expect("a valid manifest");
    let dimension = manifest.dimension();
    let mut engine = Engine::new("bench", manifest, vec![0.0; dimension]);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut sampler = SimulationSampler::seed_from_u64(7);
    let mut now = 0i64;
    let start = Instant::now();
    while engine.state() == RunState::Active {
        // Check-ins until the round has a contribution (each is selected with probability q).
        let mut uploaded = false;
        for device in 0..4000 {
            let actions = engine.handle(
                Event::CheckIn {
                    device: format!("d{device}"),
                    eligible: true,
                },
                now,
                &mut rng,
                &mut sampler,
            );
            for action in actions {
                if let Action::SendTask(task) = action {
                    let accepted = engine.handle(
                        Event::Update {
                            device: task.device,
                            round: task.round,
                            task_token: task.task_token,
                            values: vec![0.1; dimension],
                            examples: 1,
                            clip_bit: None,
                        },
                        now,
                        &mut rng,
                        &mut sampler,
                    );
                    uploaded |= accepted
                        .iter()
                        .any(|a| matches!(a, Action::UpdateAccepted { .. }));
                }
            }
            if uploaded {
                break;
            }
        }
        now += 61_000;
        engine.handle(Event::Tick, now, &mut rng, &mut sampler);
    }
    let seconds = start.elapsed().as_secs_f64();
    let spent = engine
        .spent()
        .iter()
        .map(|a| format!("{} ε = {:.4}", a.audience, a.epsilon))
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(engine.rounds_committed(), rounds, "every round committed");
    (seconds, spent)
}

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .map(|r| r.parse().expect("ROUNDS is a number"))
        .unwrap_or(1000);
    let (rdp, rdp_spent) = run("rdp", rounds);
    println!(
        "rdp: {rounds} rounds in {rdp:.2} s, {:.2} ms a round ({rdp_spent})",
        1e3 * rdp / rounds as f64
    );
    let (pld, pld_spent) = run("pld", rounds);
    println!(
        "pld: {rounds} rounds in {pld:.2} s, {:.2} ms a round ({pld_spent})",
        1e3 * pld / rounds as f64
    );
    println!(
        "the PLD accountant's step: {:.2} ms a round, amortised over {rounds} rounds",
        1e3 * (pld - rdp) / rounds as f64
    );
}
