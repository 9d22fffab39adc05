//! Shared helpers for the coordinator's integration tests.
#![allow(dead_code)]

pub mod device;
pub mod pg;

use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::engine::{Action, Engine, Event, Task};
use fedpref_coordinator::manifest::RunManifest;
use fedpref_coordinator::model::initial_parameters;
use fedpref_privacy::SimulationSampler;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

/// A small central-DP manifest with a fixed cohort: 10 items × 2 factors (31 parameters).
pub const COHORT_MANIFEST: &str = r#"
title = "Test run"
purpose = "Exercise the round engine"
owner = "tests@example.com"
data_elements_used = ["ratings"]
privacy_mode = "central"
rounds = 5
clip_norm = 1.0
noise_multiplier = 1.0
seed = 7

[budget]
epsilon = 20.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 4
minimum_size = 2
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"
"#;

pub fn manifest(text: &str) -> RunManifest {
    RunManifest::from_toml(text, "test manifest").expect("test manifest is valid")
}

pub fn engine(text: &str) -> Engine {
    let m = manifest(text);
    let params = initial_parameters(&m.model, 7);
    Engine::new("run-test", m, params)
}

/// Drives an engine with seeded randomness and simulation noise.
pub struct Harness {
    pub engine: Engine,
    pub rng: ChaCha20Rng,
    pub sampler: SimulationSampler,
    pub now: i64,
}

impl Harness {
    pub fn new(text: &str) -> Self {
        Self {
            engine: engine(text),
            rng: ChaCha20Rng::seed_from_u64(1),
            sampler: SimulationSampler::seed_from_u64(2),
            now: 1_000_000,
        }
    }

    /// Handles `event`; a release the engine asks to record is taken as recorded at once
    /// (as the durable driver does once its store has written it).
    pub fn send(&mut self, event: Event) -> Vec<Action> {
        let mut actions = self
            .engine
            .handle(event, self.now, &mut self.rng, &mut self.sampler);
        if let Some(round) = fedpref_coordinator::engine::release_to_record(&actions) {
            actions.extend(self.engine.handle(
                Event::ReleaseRecorded { round },
                self.now,
                &mut self.rng,
                &mut self.sampler,
            ));
        }
        actions
    }

    pub fn check_in(&mut self, device: &str) -> Vec<Action> {
        self.send(Event::CheckIn {
            device: device.into(),
            eligible: true,
        })
    }

    pub fn task(&mut self, device: &str) -> Option<Task> {
        self.check_in(device).into_iter().find_map(|a| match a {
            Action::SendTask(t) => Some(t),
            _ => None,
        })
    }

    pub fn upload(&mut self, task: &Task, values: Vec<f32>) -> Vec<Action> {
        self.send(Event::Update {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            values,
            examples: 10,
            clip_bit: None,
        })
    }

    pub fn dimension(&self) -> usize {
        self.engine.model().1.len()
    }

    /// Moves past the open round's deadline and ticks.
    pub fn finish_round(&mut self) -> Vec<Action> {
        if let Some(t) = self.engine.next_wakeup() {
            self.now = t;
        }
        self.send(Event::Tick)
    }

    /// One full round with `n` devices uploading small updates.
    pub fn round(&mut self, n: usize) -> Vec<Action> {
        let dim = self.dimension();
        let mut all = vec![];
        for i in 0..n {
            let name = format!("device-{}-{i}", self.now);
            if let Some(task) = self.task(&name) {
                all.extend(self.upload(&task, vec![0.01; dim]));
            }
        }
        all.extend(self.finish_round());
        self.now += 1;
        all
    }
}

/// One round through a durable coordinator: `devices` devices named after `tag` check in and
/// upload small updates, then the deadline passes. Returns the time after the round.
pub fn durable_round(c: &mut Coordinator, run: &str, tag: &str, devices: usize, now: i64) -> i64 {
    let dim = c.engine(run).unwrap().model().1.len();
    for d in 0..devices {
        let device = format!("dev-{tag}-{d}");
        let actions = c
            .handle(
                run,
                Event::CheckIn {
                    device: device.clone(),
                    eligible: true,
                },
                now,
            )
            .unwrap();
        if let Some(Action::SendTask(task)) = actions
            .into_iter()
            .find(|a| matches!(a, Action::SendTask(_)))
        {
            c.handle(
                run,
                Event::Update {
                    device,
                    round: task.round,
                    task_token: task.task_token,
                    values: vec![0.01; dim],
                    examples: 5,
                    clip_bit: None,
                },
                now,
            )
            .unwrap();
        }
    }
    let deadline = c.engine(run).unwrap().next_wakeup().unwrap_or(now + 1);
    c.handle(run, Event::Tick, deadline).unwrap();
    deadline + 1
}
