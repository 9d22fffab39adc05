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

/// A distributed run: a cohort of 5 (at least 4 in every sum), σ = 4, stages of up to 20 s
/// that close as soon as every device has answered.
fn manifest() -> pb::RunManifest {
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
            advertise_keys_duration: seconds(20),
            share_keys_duration: seconds(20),
            masked_input_duration: seconds(20),
            unmasking_duration: seconds(20),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn device(dir: &Path, n: usize) -> Device {
    let mut d = Device::open(dir.join(format!("device{n}.db")), DeviceConfig::default()).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_sdk_devices_complete_a_distributed_round_and_each_records_its_spend() {
    let server = TestServer::start().await;
    let run_id = server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest()),
            request_id: "distributed".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let dir = tempfile::tempdir().unwrap();
    let mut handles = vec![];
    for n in 0..COHORT as usize {
        let mut d = device(dir.path(), n);
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
    for h in handles {
        let (d, report) = h.await.unwrap();
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
        assert_eq!(b.audience, "release_observers");
        assert!(b.epsilon_spent > 0.0 && b.epsilon_spent < b.epsilon_budget);
    }

    // The coordinator unmasked the sum, committed the round, and its ledger verifies.
    let mut admin_client = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let run = admin_client
            .get_run(admin(pb::GetRunRequest {
                run_id: run_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if run.rounds_committed >= 1 || Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.rounds_committed, 1, "{run:?}");
    let verification = admin_client
        .verify_ledger(admin(pb::VerifyLedgerRequest { run_id }))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
}
