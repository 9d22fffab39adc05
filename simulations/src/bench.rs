//! `fedpref-sim bench`: the standard workload of `../shared/bench/WORKLOAD.md` through the
//! same engine, SDK training and privacy code as `run`.
//!
//! Workload data ([`crate::data::workload`]), k factors, a cohort of m clients per round
//! drawn uniformly without replacement, the SDK's local round (ridge fit, one epoch),
//! clipping to C and local Gaussian noise σC on every coordinate (`SimulationSampler`) —
//! per device with `--noise-path per-device`, or, by default, sparse updates plus one
//! aggregate draw per round with the same distribution (see `docs/performance.md`), FedAvg with η = 1 in the coordinator's engine (weighted by example
//! counts, which are equal here, so unweighted as the workload says), then the final RMSE
//! after every user refits its private part. `client_updates_per_s` counts the rounds'
//! wall-clock time only (not data generation or the final evaluation), of the fastest of
//! `--repeat` runs of the training loop in this process.

use std::time::Instant;

use fedpref_client_sdk::LocalTraining;
use fedpref_engine::aggregation::ServerOptimizer;
use fedpref_engine::manifest::ManifestPrivacyMode;
use serde_json::json;

use crate::cli::{BenchArgs, CliError};
use crate::data::workload;
use crate::report::peak_rss_bytes;
use crate::sim::{Sampling, Settings, Simulation, Timings};

/// Runs the workload and returns the text (or JSON) to print.
pub fn run(args: &BenchArgs) -> Result<String, CliError> {
    let usage = |m: String| CliError::Usage(m);
    if args.users == 0 {
        return Err(usage("--users 0: must be at least 1".into()));
    }
    if args.ratings_per_user < 2 || args.ratings_per_user > args.items {
        return Err(usage(format!(
            "--ratings-per-user {}: must be between 2 and --items ({})",
            args.ratings_per_user, args.items
        )));
    }
    if args.clients_per_round == 0 || args.clients_per_round as usize > args.users {
        return Err(usage(format!(
            "--clients-per-round {}: must be between 1 and --users ({})",
            args.clients_per_round, args.users
        )));
    }
    if args.rounds == 0 {
        return Err(usage("--rounds 0: must be at least 1".into()));
    }
    if args.factors == 0 {
        return Err(usage("--factors 0: must be at least 1".into()));
    }
    if args.repeat == 0 {
        return Err(usage("--repeat 0: must be at least 1".into()));
    }
    if !(args.noise_multiplier.is_finite() && args.noise_multiplier >= 0.0) {
        return Err(usage(format!(
            "--noise-multiplier {}: must be a finite number ≥ 0",
            args.noise_multiplier
        )));
    }
    if !(args.clip_norm.is_finite() && args.clip_norm > 0.0) {
        return Err(usage(format!(
            "--clip-norm {}: must be a finite number > 0",
            args.clip_norm
        )));
    }
    let t = Instant::now();
    let data = workload(args.users, args.items, args.ratings_per_user, args.seed)
        .map_err(|e| CliError::Failed(e.into()))?;
    let generation_s = t.elapsed().as_secs_f64();
    let noise = args.noise_multiplier > 0.0;
    let settings = Settings {
        rounds: args.rounds,
        sampling: Sampling::Cohort(args.clients_per_round),
        privacy_mode: if noise {
            ManifestPrivacyMode::Local
        } else {
            ManifestPrivacyMode::None
        },
        noise_multiplier: noise.then_some(args.noise_multiplier),
        target_epsilon: None,
        accountant: Default::default(),
        delta: 1e-5,
        clip_norm: args.clip_norm,
        clip_without_privacy: true,
        server_optimizer: ServerOptimizer::Fedavg {
            server_learning_rate: 1.0,
        },
        seed: args.seed,
        factors: args.factors,
        training: LocalTraining::default(),
        eval_every: 0,
        ranking: false,
        scenario: None,
        // Every workload user has the same number of training ratings, so weighting by
        // examples is the workload's unweighted mean.
        fedavg_weighting: crate::sim::FedavgWeighting::Examples,
        out: None,
        participation: None,
        adaptive_clipping: None,
        dropout: 0.0,
        corruption_rate: 0.0,
        noise_path: args.noise_path,
    };
    // Every repetition is the same seeded work from a fresh engine; the fastest is kept.
    let mut fastest: Option<(Timings, u64, Option<f64>)> = None;
    let mut walls = Vec::with_capacity(args.repeat as usize);
    for _ in 0..args.repeat {
        let mut simulation =
            Simulation::new(&settings, &data).map_err(|e| CliError::Usage(e.to_string()))?;
        let records = simulation
            .run(|_| {})
            .map_err(|e| CliError::Failed(e.into()))?;
        let rmse = records
            .last()
            .and_then(|r| r.evaluation.as_ref())
            .map(|e| e.rmse);
        let tm = simulation.timings;
        walls.push(tm.rounds_wall_ns as f64 / 1e9);
        if fastest
            .as_ref()
            .is_none_or(|(best, _, _)| tm.rounds_wall_ns < best.rounds_wall_ns)
        {
            fastest = Some((tm, simulation.client_updates, rmse));
        }
    }
    let (tm, updates, rmse) = fastest.expect("--repeat is at least 1");
    let wall = tm.rounds_wall_ns as f64 / 1e9;
    let per_s = updates as f64 / wall;
    let threads = rayon::current_num_threads();
    let total = (tm.fit_ns + tm.privacy_ns + tm.aggregation_ns).max(1) as f64;
    let share = |ns: u64| ns as f64 / total;
    let value = json!({
        "client_updates_per_s": per_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "rmse": rmse,
        "client_updates": updates,
        "rounds_wall_s": wall,
        "repeat": args.repeat,
        "rounds_wall_repeats_s": walls,
        "threads": threads,
        "fit_cpu_s": tm.fit_ns as f64 / 1e9,
        "noise_cpu_s": tm.privacy_ns as f64 / 1e9,
        "aggregation_s": tm.aggregation_ns as f64 / 1e9,
        "fit_share": share(tm.fit_ns),
        "noise_share": share(tm.privacy_ns),
        "aggregation_share": share(tm.aggregation_ns),
        "data_generation_s": generation_s,
        "evaluation_s": tm.evaluation_ns as f64 / 1e9,
        "users": args.users,
        "items": args.items,
        "ratings_per_user": args.ratings_per_user,
        "factors": args.factors,
        "clients_per_round": args.clients_per_round,
        "rounds": args.rounds,
        "noise_multiplier": args.noise_multiplier,
        "clip_norm": args.clip_norm,
        "seed": args.seed,
        "noise_path": args.noise_path.as_str(),
    });
    if args.json {
        return Ok(value.to_string());
    }
    Ok(format!(
        "workload: U = {}, I = {}, n = {}, k = {}, m = {}, R = {}, σ = {}, C = {}, noise path {} ({} threads)\n\
         client_updates_per_s {:.0}\n\
         peak_rss_bytes {}\n\
         rmse {}\n\
         time: fit {:.3} s CPU ({:.0}%), clip+noise {:.3} s CPU ({:.0}%), aggregation {:.3} s on the driving thread ({:.0}%); rounds took {:.3} s wall{}\n\
         (data generation {:.3} s, final evaluation {:.3} s, not counted)",
        args.users,
        args.items,
        args.ratings_per_user,
        args.factors,
        args.clients_per_round,
        args.rounds,
        args.noise_multiplier,
        args.clip_norm,
        args.noise_path.as_str(),
        threads,
        per_s,
        peak_rss_bytes().map_or("n/a".into(), |b| b.to_string()),
        rmse.map_or("n/a".into(), |r| format!("{r:.5}")),
        tm.fit_ns as f64 / 1e9,
        100.0 * share(tm.fit_ns),
        tm.privacy_ns as f64 / 1e9,
        100.0 * share(tm.privacy_ns),
        tm.aggregation_ns as f64 / 1e9,
        100.0 * share(tm.aggregation_ns),
        wall,
        if args.repeat > 1 {
            format!(
                " (the fastest of {} runs: {})",
                args.repeat,
                walls
                    .iter()
                    .map(|w| format!("{w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        },
        generation_s,
        tm.evaluation_ns as f64 / 1e9,
    ))
}
