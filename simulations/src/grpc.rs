//! `--transport grpc`: the same run over the real wire. A coordinator is started in-process
//! on 127.0.0.1 with TLS from a freshly generated self-signed certificate (store, certificate
//! and keys in a temporary directory); the run is created in its store from the very manifest
//! the in-process path builds (only the round deadline differs: wall-clock seconds here);
//! every simulated user that checks in is a real SDK [`Device`] (its own SQLite file holding
//! the catalogue and the user's training ratings) driven by [`participate`]: enrol, check in,
//! download, `prepare_upload` (fit, clip, noise, record), upload.
//!
//! What is the same as in-process: the check-ins of every round ([`candidates`](crate::sim::candidates), stream
//! (seed, 3, round)), hence the cohorts, the number of rounds and of client updates, the
//! initial model (the manifest's seed), the engine, aggregation, optimiser and accountant
//! (so ε per round). What is not: the bytes of the model. The SDK noises every upload with
//! the production `SecureSampler`, which is OS-seeded on purpose (floating-point-safe noise
//! must never be seeded or replayable), the coordinator's task tokens come from its
//! OS-seeded generator, and the SDK builds its examples from its own store (one per item,
//! newest first) where the in-process path feeds ratings in time order. Modes `local` and
//! `distributed` are supported (the SDK uploads nothing in mode `central`, and a coordinator
//! refuses mode `none`).
//!
//! In mode `distributed` each SDK device runs the secure-aggregation stages against the
//! coordinator's `SecureAggregationService` (keys, shares, masked `DTYPE_U32` input,
//! unmasking) with OS-seeded keys and noise; the stages close as soon as every device has
//! answered. No drop-out is simulated over the wire (`--dropout` must be 0): every device
//! completes every stage. The round parameters come from the same manifest, hence the same
//! coordinator plan, as in-process, so ε per round is the same; the masks and the noise are
//! not.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fedpref_client_sdk::{
    CoordinatorClient, Device, DeviceConfig, ParticipateOptions, ParticipationConfig,
    ParticipationEvent, Timestamp, participate,
};
use fedpref_coordinator::config::{Config, Limits, self_signed_localhost};
use fedpref_coordinator::coordinator::create_run;
use fedpref_coordinator::server::{ServeOptions, start};
use fedpref_coordinator::store::{RunStatus, Store};
use fedpref_engine::ledger::{LedgerEntry, LedgerEvent};
use fedpref_engine::manifest::{ManifestPrivacyMode, RunManifest, SamplingSpec};
use fedpref_engine::model;

use crate::data::Dataset;
use crate::feedback::FeedbackModel;
use crate::metrics::evaluate;
use crate::sim::Settings;
use crate::sim::{RoundRecord, SimError, Timings, candidates_among, shared_model};

/// The round deadline over gRPC, in wall-clock seconds (the in-process engine's clock is
/// simulated). Every selected device must download, train and upload within it.
pub const ROUND_SECONDS: u64 = 2;

/// Mode distributed: the longest each secure-aggregation stage may last over gRPC, in
/// wall-clock seconds (a stage closes early once every device has answered).
pub const STAGE_SECONDS: u64 = 15;

const RUN_ID: &str = "fedpref-sim";
const APP_KEY: &str = "fedpref-sim-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "fedpref-sim-admin-token-0123456789ab";

/// The outcome of a run over gRPC.
pub struct GrpcRun {
    /// Per-round records, as in-process.
    pub records: Vec<RoundRecord>,
    /// Updates the coordinator aggregated.
    pub client_updates: u64,
    /// Wall-clock time (only `rounds_wall_ns` and `evaluation_ns` are measured).
    pub timings: Timings,
    /// The manifest the run was created from.
    pub manifest: RunManifest,
    /// The users that uploaded an accepted update, per round, in user order.
    pub uploaded: Vec<Vec<usize>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> SimError {
    SimError::Settings(format!("--transport grpc: {what}: {e}"))
}

/// Refuses settings the gRPC transport cannot run, naming the flag.
pub fn check(settings: &Settings) -> Result<(), SimError> {
    match settings.privacy_mode {
        ManifestPrivacyMode::Local if settings.adaptive_clipping.is_some() => {
            Err(SimError::Settings(
                "--transport grpc and --adaptive-clipping: the simulator runs adaptive clipping in process only (the SDK and coordinator support it over gRPC; client-sdk/tests/adaptive_clipping.rs)".into(),
            ))
        }
        ManifestPrivacyMode::Local => Ok(()),
        ManifestPrivacyMode::Distributed if settings.dropout > 0.0 => {
            Err(SimError::Settings(format!(
                "--transport grpc and --dropout {}: no drop-out is simulated over the wire (every SDK device completes the stages); use the in-process transport for drop-out",
                settings.dropout
            )))
        }
        ManifestPrivacyMode::Distributed => crate::distributed::check(settings),
        mode => Err(SimError::Settings(format!(
            "--transport grpc needs --privacy-mode local or distributed (got {}): the SDK uploads nothing in mode central, and a coordinator refuses mode none",
            mode.as_str()
        ))),
    }
}

/// Runs `settings` on `data` over gRPC (see the module docs), calling `progress` after
/// each round.
pub fn run(
    settings: &Settings,
    data: &Dataset,
    progress: impl FnMut(&RoundRecord),
) -> Result<GrpcRun, SimError> {
    check(settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("the async runtime", e))?;
    runtime.block_on(run_async(settings, data, progress))
}

fn coordinator_config(dir: &Path) -> Result<(Config, String), SimError> {
    let cert = self_signed_localhost().map_err(|e| failed("the certificate", e))?;
    for (name, text) in [
        ("cert.pem", cert.certificate_pem.as_str()),
        ("key.pem", cert.private_key_pem.as_str()),
        ("app.key", APP_KEY),
        ("admin.token", ADMIN_TOKEN),
    ] {
        std::fs::write(dir.join(name), text).map_err(|e| failed(name, e))?;
    }
    let text = r#"
[listen]
device = "127.0.0.1:0"
admin = "127.0.0.1:1"
[store]
path = "coordinator.db"
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[auth]
app_key_file = "app.key"
admin_token_file = "admin.token"
"#;
    let mut config = Config::from_toml(text, "coordinator.toml", dir)
        .map_err(|e| failed("the coordinator's configuration", e))?;
    config.limits = Limits {
        max_upload_bytes: 1 << 30,
        max_upload_chunks: 1 << 20,
        device_requests_per_second: 1e6,
        device_burst: 1 << 20,
        max_concurrent_requests: 1 << 16,
        tick_millis: 20,
        ..Limits::default()
    };
    Ok((config, cert.certificate_pem))
}

/// A simulated user as an SDK device: the catalogue (rows as item keys `i{row}`) and the
/// user's training ratings, timestamped in order over the last minutes.
fn device(
    dir: &Path,
    data: &Dataset,
    user: usize,
    settings: &Settings,
) -> Result<Device, SimError> {
    let config = DeviceConfig {
        training: settings.training,
        budget_epsilon: 1e12,
        budget_delta: settings.delta,
        ..DeviceConfig::default()
    };
    let mut d = Device::open(dir.join(format!("u{user}.db")), config)
        .map_err(|e| failed("a device store", e))?;
    let mut lines = String::new();
    for (row, item) in data.items.iter().enumerate() {
        let topics: Vec<&str> = item
            .topics
            .iter()
            .map(|&t| data.topics[t as usize].as_str())
            .collect();
        // The simulated users have opted in to every topic, so no item is marked sensitive.
        lines += &serde_json::json!({"type": "item", "item": format!("i{row}"), "topics": topics})
            .to_string();
        lines.push('\n');
    }
    let now = Timestamp::now();
    let train = &data.users[user].train;
    for (n, r) in train.iter().enumerate() {
        let at = now.plus_millis(-1000 * (train.len() - n) as i64);
        lines += &serde_json::json!({
            "type": "rating", "item": format!("i{}", r.item), "value": r.value, "at": at.to_rfc3339()
        })
        .to_string();
        lines.push('\n');
    }
    d.ingest_jsonl(&lines, false, now)
        .map_err(|e| failed(&format!("user {user}'s data"), e))?;
    Ok(d)
}

async fn run_async(
    settings: &Settings,
    data: &Dataset,
    mut progress: impl FnMut(&RoundRecord),
) -> Result<GrpcRun, SimError> {
    let dir = tempfile::tempdir().map_err(|e| failed("a temporary directory", e))?;
    let devices_dir = dir.path().join("devices");
    std::fs::create_dir(&devices_dir).map_err(|e| failed("the devices' directory", e))?;
    let population = data.users.iter().filter(|u| u.trains).count();
    let mut manifest = settings.manifest(population, data.items.len())?;
    match &mut manifest.sampling {
        SamplingSpec::Cohort { round_seconds, .. }
        | SamplingSpec::Poisson { round_seconds, .. } => *round_seconds = ROUND_SECONDS,
    }
    let distributed = manifest.privacy_mode == ManifestPrivacyMode::Distributed;
    if let Some(spec) = manifest.secure_aggregation.as_mut() {
        // Upper bounds in wall-clock seconds: each stage closes as soon as every device has
        // answered.
        spec.advertise_keys_seconds = STAGE_SECONDS;
        spec.share_keys_seconds = STAGE_SECONDS;
        spec.masked_input_seconds = STAGE_SECONDS;
        spec.unmasking_seconds = STAGE_SECONDS;
    }
    // A device's whole part: the round, or the four stages.
    let device_seconds = if distributed {
        4 * STAGE_SECONDS + ROUND_SECONDS
    } else {
        4 * ROUND_SECONDS
    };
    let (config, ca_pem) = coordinator_config(dir.path())?;
    {
        let mut store = Store::open(&config.store.path).map_err(|e| failed("the store", e))?;
        create_run(&mut store, RUN_ID, &manifest, Timestamp::now().millis())
            .map_err(|e| failed("creating the run", e))?;
    }
    let running = start(
        &config,
        &ServeOptions {
            admin_addr: Some("127.0.0.1:0".parse().expect("an address")),
            ..ServeOptions::default()
        },
    )
    .await
    .map_err(|e| failed("starting the coordinator", e))?;
    let url = format!("https://127.0.0.1:{}", running.device_addr.port());
    let store = Store::open(&config.store.path).map_err(|e| failed("the store", e))?;
    let item_ids: Vec<String> = data.items.iter().map(|i| i.id.clone()).collect();

    let mut devices: HashMap<usize, (Device, CoordinatorClient)> = HashMap::new();
    let mut records = vec![];
    let mut uploaded_by_round = vec![];
    let mut timings = Timings::default();
    let mut client_updates = 0;
    let mut ledger_seen = 0;
    let limit = settings.rounds.saturating_mul(100).max(1_000);
    let mut step = 0;
    let mut feedback_state = settings.scenario.map(|s| FeedbackModel::new(s, data));
    let result: Result<(), SimError> = async {
        while store
            .run(RUN_ID)
            .map_err(|e| failed("the store", e))?
            .status
            == RunStatus::Active
            && step < limit
            && !feedback_state
                .as_ref()
                .is_some_and(|f| f.everyone_opted_out())
        {
            let start_round = Instant::now();
            step += 1;
            let round = step;
            let opted_out = feedback_state
                .as_ref()
                .map(|f| f.opted_out())
                .unwrap_or(&[]);
            let users = candidates_among(settings, data, round, opted_out);
            // The model the round's devices download, for the feedback scenario.
            let downloaded = match feedback_state {
                Some(_) => {
                    let version = store
                        .run(RUN_ID)
                        .map_err(|e| failed("the store", e))?
                        .current_version;
                    let blob = store
                        .model(RUN_ID, version)
                        .map_err(|e| failed("the model", e))?;
                    let params = model::decode(&blob, &manifest.model)
                        .map_err(|e| failed("the model", e))?;
                    Some(shared_model(version, &item_ids, settings.factors, &params)?)
                }
                None => None,
            };
            let mut handles = Vec::with_capacity(users.len());
            for &user in &users {
                let (device, client) = match devices.remove(&user) {
                    Some(pair) => pair,
                    None => {
                        let device = device(&devices_dir, data, user, settings)?;
                        let client = CoordinatorClient::connect(
                            &url,
                            ca_pem.as_bytes(),
                            ParticipationConfig::default(),
                        )
                        .await
                        .map_err(|e| failed("connecting a device", e))?;
                        (device, client)
                    }
                };
                handles.push(tokio::spawn(async move {
                    let (mut device, mut client) = (device, client);
                    let options = ParticipateOptions {
                        rounds: 1,
                        device_conditions_met: true,
                        give_up_after: Some(Duration::from_secs(device_seconds)),
                    };
                    let report =
                        participate(&mut device, &mut client, APP_KEY, &options, &mut |_| {}).await;
                    (user, device, client, report)
                }));
            }
            let mut uploaded = vec![];
            for h in handles {
                let (user, device, client, report) =
                    h.await.map_err(|e| failed("a device task", e))?;
                let report = report.map_err(|e| failed(&format!("device u{user}"), e))?;
                if report
                    .events
                    .iter()
                    .any(|e| matches!(e, ParticipationEvent::Uploaded { .. }))
                {
                    uploaded.push(user);
                }
                devices.insert(user, (device, client));
            }
            uploaded.sort_unstable();
            // Wait for the coordinator's ticker to close the round at its deadline.
            let mut outcome = None;
            if !users.is_empty() {
                let waited = Instant::now();
                while outcome.is_none() {
                    let ledger = store.ledger(RUN_ID).map_err(|e| failed("the ledger", e))?;
                    for sealed in &ledger[ledger_seen..] {
                        let entry: LedgerEntry = serde_json::from_str(&sealed.body)
                            .map_err(|e| failed("a ledger entry", e))?;
                        match entry.event {
                            LedgerEvent::RoundCommitted {
                                cohort_size,
                                cumulative_epsilon,
                                ..
                            } => outcome = Some((cohort_size, None, cumulative_epsilon)),
                            LedgerEvent::RoundAbandoned { reason, .. } => {
                                outcome = Some((0, Some(reason), vec![]));
                            }
                            _ => {}
                        }
                    }
                    ledger_seen = ledger.len();
                    if outcome.is_none() {
                        if waited.elapsed()
                            > Duration::from_secs(10 * ROUND_SECONDS + device_seconds)
                        {
                            return Err(failed(
                                &format!("round {round}"),
                                "the coordinator did not close it",
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let (contributions, abandoned, epsilon) = outcome.unwrap_or((
                0,
                Some("no device checked in, so the engine opened no round".into()),
                vec![],
            ));
            let epsilon = if abandoned.is_some() {
                records
                    .last()
                    .map(|r: &RoundRecord| r.epsilon.clone())
                    .unwrap_or_default()
            } else {
                epsilon
            };
            client_updates += contributions;
            timings.rounds_wall_ns += start_round.elapsed().as_nanos() as u64;
            let record = store.run(RUN_ID).map_err(|e| failed("the store", e))?;
            let last = record.status != RunStatus::Active;
            let every = settings.eval_every;
            let evaluation = if last || (every > 0 && round.is_multiple_of(every)) {
                let t = Instant::now();
                let blob = store
                    .model(RUN_ID, record.current_version)
                    .map_err(|e| failed("the model", e))?;
                let params =
                    model::decode(&blob, &manifest.model).map_err(|e| failed("the model", e))?;
                let m = shared_model(record.current_version, &item_ids, settings.factors, &params)?;
                let e = evaluate(&m, data, &settings.training, settings.ranking);
                timings.evaluation_ns += t.elapsed().as_nanos() as u64;
                Some(e)
            } else {
                None
            };
            // The scenario: the devices that uploaded react to their lists; those who opt
            // out switch training off on the device, as a user would in the app.
            let feedback = match (feedback_state.as_mut(), &downloaded) {
                (Some(state), Some(m)) => {
                    let (f, left) =
                        state.observe(m, data, &settings.training, settings.seed, round, &uploaded);
                    for u in left {
                        if let Some((device, _)) = devices.get_mut(&u) {
                            device
                                .set_training(false)
                                .map_err(|e| failed(&format!("device u{u}"), e))?;
                        }
                    }
                    Some(f)
                }
                _ => None,
            };
            let r = RoundRecord {
                round,
                contributions,
                abandoned,
                epsilon,
                evaluation,
                feedback,
                clip_norm: None,
            };
            progress(&r);
            records.push(r);
            uploaded_by_round.push(uploaded);
        }
        Ok(())
    }
    .await;
    drop(devices);
    let stopped = running.shutdown().await;
    result?;
    stopped.map_err(|e| failed("stopping the coordinator", e))?;
    Ok(GrpcRun {
        records,
        client_updates,
        timings,
        manifest,
        uploaded: uploaded_by_round,
    })
}
