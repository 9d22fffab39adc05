//! Distributed mode end to end: SDK devices run the secure-aggregation stages against a real
//! coordinator started in-process on 127.0.0.1 with TLS from a freshly generated
//! certificate; each device its own SQLite file, its keys and noise from the operating
//! system's random source.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::path::Path;
use std::time::{Duration, Instant};

use fedpref_client_sdk::participation::ParticipationEvent;
use fedpref_client_sdk::{
    Device, DeviceConfig, ParticipateOptions, ParticipationConfig, RetryPolicy, Timestamp,
    participate,
};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

const ITEMS: u64 = 8;
const COHORT: u32 = 5;

fn seconds(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// A distributed run: a cohort of 5 (at least 4 in every sum), σ = 4, stages of up to
/// `stage_seconds` that close as soon as every device has answered.
fn manifest(stage_seconds: i64) -> pb::RunManifest {
    pb::RunManifest {
        title: "Distributed participation test".into(),
        purpose: "SDK devices through secure aggregation".into(),
        owner: "tests@example.com".into(),
        data_elements_used: vec![pb::DataElement {
            element: "ratings".into(),
            rationale: String::new(),
        }],
        privacy_mode: pb::PrivacyMode::Distributed as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: 100.0,
            delta: 1e-5,
        }),
        clip_norm: 1.0,
        noise_multiplier: 4.0,
        sampling: Some(pb::Sampling {
            method: Some(pb::sampling::Method::Cohort(pb::CohortSampling {
                target_cohort_size: COHORT,
                round_deadline: seconds(120),
                minimum_cohort_size: 4,
            })),
        }),
        rounds: 1,
        server_optimizer: Some(pb::ServerOptimizer {
            optimizer: Some(pb::server_optimizer::Optimizer::Fedavg(pb::FedAvg {
                server_learning_rate: 1.0,
            })),
        }),
        model: Some(pb::ModelSpec {
            model: Some(pb::model_spec::Model::MatrixFactorization(
                pb::MatrixFactorizationSpec {
                    item_count: ITEMS,
                    factor_dimension: 3,
                    item_biases: true,
                    global_offset: true,
                    init_stddev: 0.1,
                    init_seed: Some(11),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        secure_aggregation: Some(pb::SecureAggregationConfig {
            noise: pb::DistributedNoise::DiscreteGaussian as i32,
            dropout_rate: 0.1,
            corruption_rate: 0.0,
            advertise_keys_duration: seconds(stage_seconds),
            share_keys_duration: seconds(stage_seconds),
            masked_input_duration: seconds(stage_seconds),
            unmasking_duration: seconds(stage_seconds),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn device(dir: &Path, n: usize, config: DeviceConfig) -> Device {
    let mut d = Device::open(dir.join(format!("device{n}.db")), config).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        lines += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"t{}\"]}}\n",
            i % 3
        );
    }
    for j in 0..4 {
        let item = (n + 3 * j) % ITEMS as usize;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{},\"at\":\"2026-05-30T20:00:00Z\"}}\n",
            1 + (n + j) % 5
        );
    }
    d.ingest_jsonl(&lines, false, Timestamp::now()).unwrap();
    d
}

fn quick_retries() -> ParticipationConfig {
    ParticipationConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        ..ParticipationConfig::default()
    }
}

async fn create_run(server: &TestServer, stage_seconds: i64) -> String {
    server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest(stage_seconds)),
            request_id: "distributed".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .run_id
}

/// Runs one `participate` call per device, concurrently; returns each device and report.
async fn participate_all(
    server: &TestServer,
    devices: Vec<Device>,
) -> Vec<(Device, fedpref_client_sdk::ParticipationReport)> {
    let mut handles = vec![];
    for mut d in devices {
        let mut client = server.client(quick_retries()).await;
        handles.push(tokio::spawn(async move {
            let options = ParticipateOptions {
                rounds: 1,
                give_up_after: Some(Duration::from_secs(60)),
                ..ParticipateOptions::default()
            };
            let report = participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
                .await
                .unwrap();
            (d, report)
        }));
    }
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Waits until the run has committed `rounds` rounds (or 20 s pass); returns the run.
async fn committed(server: &TestServer, run_id: &str, rounds: u64) -> pb::Run {
    let mut admin_client = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = admin_client
            .get_run(admin(pb::GetRunRequest {
                run_id: run_id.to_string(),
            }))
            .await
            .unwrap()
            .into_inner();
        if run.rounds_committed >= rounds || Instant::now() > deadline {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_sdk_devices_complete_a_distributed_round_and_each_records_its_spend() {
    let server = TestServer::start().await;
    let run_id = create_run(&server, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let devices = (0..COHORT as usize)
        .map(|n| device(dir.path(), n, DeviceConfig::default()))
        .collect();
    for (d, report) in participate_all(&server, devices).await {
        assert_eq!(report.uploads, 1, "{:#?}", report.events);
        let stages: Vec<&str> = report
            .events
            .iter()
            .filter_map(|e| match e {
                ParticipationEvent::SecureAggregationStage { stage, .. } => Some(stage.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            stages,
            ["advertise_keys", "share_keys", "unmasking"],
            "{:#?}",
            report.events
        );
        let b = d.budget().unwrap();
        assert_eq!((b.rounds, b.uploads.len()), (1, 1));
        assert_eq!(b.uploads[0].mode, "distributed");
        // The record names the honest fraction its ε assumes.
        let (honest, fewest) = (
            b.uploads[0]
                .assumed_honest_devices
                .expect("a distributed share names it"),
            b.uploads[0]
                .min_contributors
                .expect("and the fewest contributors"),
        );
        assert!(
            honest >= 1 && honest < u64::from(fewest),
            "{honest} of {fewest}"
        );
        assert_eq!(b.audience, "release_observers");
        assert!(b.epsilon_spent > 0.0 && b.epsilon_spent < b.epsilon_budget);
    }

    // The coordinator unmasked the sum, committed the round, and its ledger verifies.
    let run = committed(&server, &run_id, 1).await;
    assert_eq!(run.rounds_committed, 1, "{run:?}");
    let verification = server
        .admin()
        .await
        .verify_ledger(admin(pb::VerifyLedgerRequest { run_id }))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_whose_budget_cannot_pay_for_the_round_declines_before_advertising_and_the_rest_go_on()
 {
    let server = TestServer::start().await;
    // Stages of at most 3 s: the key stage waits that long for the fifth device.
    let run_id = create_run(&server, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut devices: Vec<Device> = (0..COHORT as usize - 1)
        .map(|n| device(dir.path(), n, DeviceConfig::default()))
        .collect();
    devices.push(device(
        dir.path(),
        9,
        DeviceConfig {
            budget_epsilon: 0.01,
            ..DeviceConfig::default()
        },
    ));
    let results = participate_all(&server, devices).await;
    let (poor, poor_report) = &results[COHORT as usize - 1];
    assert_eq!(poor_report.declines, 1, "{:#?}", poor_report.events);
    assert!(
        poor_report.events.iter().any(|e| matches!(
            e,
            ParticipationEvent::Declined { reason, .. } if reason == "DECLINE_REASON_PRIVACY_BUDGET_EXHAUSTED"
        )),
        "{:#?}",
        poor_report.events
    );
    assert!(
        !poor_report
            .events
            .iter()
            .any(|e| matches!(e, ParticipationEvent::SecureAggregationStage { .. })),
        "it said nothing: {:#?}",
        poor_report.events
    );
    assert_eq!(poor.budget().unwrap().rounds, 0);
    for (d, report) in &results[..COHORT as usize - 1] {
        assert_eq!(report.uploads, 1, "{:#?}", report.events);
        assert_eq!(d.budget().unwrap().rounds, 1);
    }
    let run = committed(&server, &run_id, 1).await;
    assert_eq!(run.rounds_committed, 1, "{run:?}");
}
