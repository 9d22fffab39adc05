//! Distributed mode end to end: SDK devices run the secure-aggregation stages against a real
//! coordinator started in-process on 127.0.0.1 with TLS from a freshly generated
//! certificate; each device its own SQLite file, its keys and noise from the operating
//! system's random source. Distributed devices release their federated evaluation with
//! local noise after their share, as local-mode devices do after their update.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::path::Path;
use std::time::{Duration, Instant};

use fedpref_client_sdk::participation::{MetricsOutcome, ParticipationEvent};
use fedpref_client_sdk::{
    Device, DeviceConfig, ParticipateOptions, ParticipationConfig, ParticipationError,
    PreferenceModel, RetryPolicy, Timestamp, participate,
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
    create_run_from(server, manifest(stage_seconds)).await
}

async fn create_run_from(server: &TestServer, manifest: pb::RunManifest) -> String {
    server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest),
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

/// The run's impact report, as JSON.
async fn report_json(server: &TestServer, run_id: &str) -> serde_json::Value {
    let report = server
        .admin()
        .await
        .get_report(admin(pb::GetReportRequest {
            run_id: run_id.to_string(),
            format: pb::ReportFormat::Json as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    serde_json::from_slice(&report.content).unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_devices_release_their_evaluation_once_per_version_and_the_ledger_records_it() {
    let server = TestServer::start().await;
    // Three rounds, so the run is still active (its ledger open) when round 2's devices report.
    let mut m = manifest(20);
    m.rounds = 3;
    let run_id = create_run_from(&server, m).await;
    let dir = tempfile::tempdir().unwrap();
    let devices = (0..COHORT as usize)
        .map(|n| device(dir.path(), n, DeviceConfig::default()))
        .collect();

    // Round 1: each device downloads model version 1 (its task carries the version's
    // evaluation token) and uploads its share; nothing was shown with the model yet.
    let mut devices: Vec<Device> = participate_all(&server, devices)
        .await
        .into_iter()
        .map(|(d, report)| {
            assert_eq!(report.uploads, 1, "{:#?}", report.events);
            assert!(
                matches!(report.metrics, Some(MetricsOutcome::NotSent { .. })),
                "{:?}",
                report.metrics
            );
            d
        })
        .collect();
    assert_eq!(committed(&server, &run_id, 1).await.rounds_committed, 1);

    // The app shows lists with version 1; each device keeps its single-use token for it.
    let mut tokens = vec![];
    for d in &mut devices {
        assert_eq!(d.model().unwrap().version(), 1);
        assert!(!d.recommend(4, Timestamp::now()).unwrap().is_empty());
        let windows = d.evaluation_windows().unwrap();
        assert_eq!(
            windows
                .iter()
                .map(|w| (w.run_id.as_str(), w.model_version))
                .collect::<Vec<_>>(),
            [(run_id.as_str(), 1)]
        );
        let conn = rusqlite::Connection::open(d.path()).unwrap();
        let token: String = conn
            .query_row(
                "SELECT token FROM evaluation_token WHERE run_id = ?1 AND model_version = 1",
                [&run_id],
                |r| r.get(0),
            )
            .expect("the distributed task carried an evaluation token");
        tokens.push(token);
    }

    // Round 2: after its share is uploaded each device releases its evaluation of version
    // 1, noised on the device and recorded in its accountant beside its shares.
    let results = participate_all(&server, devices).await;
    for (d, report) in &results {
        assert_eq!(report.uploads, 1, "{:#?}", report.events);
        match &report.metrics {
            Some(MetricsOutcome::Reported { windows, .. }) => {
                assert_eq!(windows, &vec![(run_id.clone(), 1)]);
            }
            other => panic!("{other:?}: {:#?}", report.events),
        }
        assert!(d.evaluation_windows().unwrap().is_empty());
        let b = d.budget().unwrap();
        let kinds: Vec<(&str, &str)> = b
            .uploads
            .iter()
            .map(|u| (u.kind.as_str(), u.mode.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("update", "distributed"),
                ("update", "distributed"),
                ("evaluation", "local")
            ],
            "{b:?}"
        );
        let evaluation = &b.uploads[2];
        assert_eq!(evaluation.model_version, 1);
        assert_eq!(
            evaluation.noise_multiplier,
            fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER
        );
        assert!(evaluation.epsilon_after > b.uploads[1].epsilon_after);
        // Composed with the shares under zero-out neighbours, by RDP.
        assert_eq!(
            (b.accountant.as_str(), b.audience.as_str()),
            ("rdp", "release_observers")
        );
        assert_eq!(b.epsilon_spent, evaluation.epsilon_after);
        assert!(b.epsilon_spent < b.epsilon_budget);
    }
    assert_eq!(committed(&server, &run_id, 2).await.rounds_committed, 2);

    // The coordinator summed five releases of version 1; the ledger records what the
    // evaluation cost, once for the version, and verifies.
    let mut admin_client = server.admin().await;
    let ledger = admin_client
        .read_ledger(admin(pb::ReadLedgerRequest {
            run_id: run_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let spends: Vec<&pb::LedgerEntry> = ledger
        .entries
        .iter()
        .filter(|e| e.kind == pb::LedgerEntryKind::EvaluationReleased as i32)
        .collect();
    // One line per version whose tasks carried tokens, written when its first token left.
    let versions_charged: Vec<u64> = spends.iter().map(|e| e.model_version).collect();
    assert_eq!(versions_charged.first(), Some(&1), "{:#?}", ledger.entries);
    assert!(
        versions_charged.windows(2).all(|w| w[0] < w[1]),
        "{versions_charged:?}"
    );
    assert!(
        spends
            .iter()
            .all(|e| e.noise_multiplier == fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER)
    );
    let verification = admin_client
        .verify_ledger(admin(pb::VerifyLedgerRequest {
            run_id: run_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
    let json = report_json(&server, &run_id).await;
    let versions = json["guardrails"]["versions"].as_array().unwrap();
    let v1 = versions
        .iter()
        .find(|v| v["model_version"] == 1)
        .unwrap_or_else(|| panic!("{versions:?}"));
    assert_eq!(v1["reports"], COHORT, "{v1}");
    let spent = json["guardrails"]["evaluation"].as_array().unwrap();
    assert_eq!(spent.len(), versions_charged.len(), "{spent:?}");
    assert_eq!(spent[0]["model_version"], 1);
    assert!(spent.iter().all(|s| s["epsilon"].as_f64().unwrap() > 0.0));

    // A second report on version 1 with the device's token is refused, and not counted.
    let (mut d, _) = results.into_iter().next().unwrap();
    let mut client = server.client(quick_retries()).await;
    client.ensure_enrolled(&mut d, APP_KEY).await.unwrap();
    let again = client
        .report_metrics(pb::ReportMetricsRequest {
            run_id: run_id.clone(),
            model_version: 1,
            evaluation_token: tokens[0].clone(),
            released_rates: vec![0.0; fedpref_privacy::evaluation::COORDINATES],
            noise_multiplier: fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER,
        })
        .await;
    assert!(
        matches!(
            &again,
            Err(ParticipationError::Rejected {
                code: tonic::Code::FailedPrecondition,
                ..
            })
        ),
        "{again:?}"
    );
    let json = report_json(&server, &run_id).await;
    let v1 = json["guardrails"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model_version"] == 1)
        .cloned()
        .unwrap();
    assert_eq!(v1["reports"], COHORT, "{v1}");
    server.running.shutdown().await.unwrap();
}
