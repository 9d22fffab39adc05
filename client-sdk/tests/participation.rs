//! Participation end to end: SDK devices against a real coordinator started in-process on
//! 127.0.0.1 with TLS from a freshly generated certificate; each device its own SQLite file.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::path::Path;
use std::time::{Duration, Instant};

use fedpref_client_sdk::participation::{DownloadProgress, ParticipationEvent};
use fedpref_client_sdk::{
    CoordinatorClient, Device, DeviceConfig, ParticipateOptions, ParticipationConfig,
    ParticipationError, RetryPolicy, Timestamp, participate,
};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

const ITEMS: u64 = 8;

/// A local-DP run: a cohort of 3 (at least 2), 2-second rounds, `ITEMS` items × 3 factors.
fn local_manifest(rounds: u64) -> pb::RunManifest {
    pb::RunManifest {
        title: "Participation test".into(),
        purpose: "SDK devices end to end".into(),
        owner: "tests@example.com".into(),
        data_elements_used: vec![pb::DataElement {
            element: "ratings".into(),
            rationale: String::new(),
        }],
        privacy_mode: pb::PrivacyMode::Local as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: 100.0,
            delta: 1e-5,
        }),
        clip_norm: 1.0,
        noise_multiplier: 4.0,
        sampling: Some(pb::Sampling {
            method: Some(pb::sampling::Method::Cohort(pb::CohortSampling {
                target_cohort_size: 3,
                round_deadline: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                minimum_cohort_size: 2,
            })),
        }),
        rounds,
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
        ..Default::default()
    }
}

async fn create_run(server: &TestServer, rounds: u64) -> String {
    server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(local_manifest(rounds)),
            request_id: "participation".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .run_id
}

/// A device whose catalogue is the run's items `i0 … i7` and who rated a few of them.
fn device(dir: &Path, name: &str, seed: usize, config: DeviceConfig) -> Device {
    let mut d = Device::open(dir.join(format!("{name}.db")), config).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        let topic = ["Comedy", "Drama", "Jazz"][i as usize % 3];
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"]}}\n");
    }
    for j in 0..4 {
        let item = (seed + 3 * j) % ITEMS as usize;
        let value = 1 + (seed + j) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    d.ingest_jsonl(&lines, false, now()).unwrap();
    d
}

fn now() -> Timestamp {
    Timestamp::now()
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
async fn three_devices_complete_two_local_dp_rounds_and_the_ledger_verifies() {
    let server = TestServer::start().await;
    let run_id = create_run(&server, 2).await;
    let dir = tempfile::tempdir().unwrap();

    let mut handles = vec![];
    for n in 0..3 {
        let mut d = device(
            dir.path(),
            &format!("device{n}"),
            n,
            DeviceConfig::default(),
        );
        let mut client = server.client(quick_retries()).await;
        handles.push(tokio::spawn(async move {
            let options = ParticipateOptions {
                rounds: 2,
                give_up_after: Some(Duration::from_secs(20)),
                ..ParticipateOptions::default()
            };
            let report = participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
                .await
                .unwrap();
            (
                d,
                report,
                client.take_call_times(),
                client.take_call_times(),
            )
        }));
    }
    let mut devices = vec![];
    for h in handles {
        let (d, report, times, none_left) = h.await.unwrap();
        assert_eq!(report.uploads, 2, "{:#?}", report.events);
        // The client kept the timing of each call it made, and handed them over once.
        let ok = |call: &str| times.iter().filter(|t| t.call == call && t.ok).count();
        assert!(ok("CheckIn") >= 2, "{times:?}");
        assert_eq!(ok("UploadUpdate"), 2, "{times:?}");
        assert_eq!(ok("DownloadModel"), 2, "{times:?}");
        assert!(times.iter().all(|t| t.took < Duration::from_secs(20)));
        assert!(none_left.is_empty());
        assert!(
            report.events.iter().any(|e| matches!(
                e,
                ParticipationEvent::ModelInstalled {
                    model_version: 2,
                    ..
                }
            )),
            "the second round trains on the model the first produced: {:#?}",
            report.events
        );
        devices.push(d);
    }
    // Each device's accountant shows its two local-DP uploads.
    for d in &devices {
        let b = d.budget().unwrap();
        assert_eq!(b.rounds, 2);
        assert_eq!(b.uploads.len(), 2);
        assert!(b.epsilon_spent > 0.0 && b.epsilon_spent < b.epsilon_budget);
        assert!(b.uploads.iter().all(|u| u.mode == "local"));
        assert!(d.enrolment().unwrap().is_some());
    }

    // The coordinator committed both rounds and its ledger verifies.
    let mut admin_client = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let run = admin_client
            .get_run(admin(pb::GetRunRequest {
                run_id: run_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if run.rounds_committed >= 2 || Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.rounds_committed, 2, "{run:?}");
    let verification = admin_client
        .verify_ledger(admin(pb::VerifyLedgerRequest {
            run_id: run_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");

    // Offline: the coordinator is gone; recommendations still come from the last model,
    // events still queue, and participation fails with a typed error.
    let url = server.url();
    let ca = server.ca_pem.clone();
    server.running.shutdown().await.unwrap();
    let d = &mut devices[0];
    let recs = d.recommend(3, now()).unwrap();
    assert_eq!(recs.len(), 3);
    d.ingest_jsonl(
        "{\"type\":\"thumbs\",\"item\":\"i1\",\"value\":\"up\",\"at\":\"2026-05-31T10:00:00Z\"}\n",
        false,
        now(),
    )
    .unwrap();
    let e = CoordinatorClient::connect(&url, ca.as_bytes(), quick_retries())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ParticipationError::Unreachable { attempts: 3, .. }),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_from_the_bytes_kept_in_the_store() {
    let server = TestServer::start().await;
    create_run(&server, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(dir.path(), "resume", 1, DeviceConfig::default());
    let mut client = server
        .client(ParticipationConfig {
            download_chunk_bytes: 40,
            ..quick_retries()
        })
        .await;
    client.ensure_enrolled(&mut d, APP_KEY).await.unwrap();
    let response = client
        .check_in(
            None,
            pb::Eligibility {
                device_conditions_met: true,
                privacy_budget_available: true,
            },
        )
        .await
        .unwrap();
    let model = response.latest_model.expect("the run has a model");
    assert!(model.size_bytes > 80, "several chunks: {model:?}");

    // The first chunk only, as if the connection dropped.
    let p = client
        .download_model(&mut d, &model, Some(1))
        .await
        .unwrap();
    assert_eq!(
        p,
        DownloadProgress::Partial {
            held_bytes: 40,
            size_bytes: model.size_bytes
        }
    );
    assert!(
        d.model().is_none(),
        "nothing is installed from a partial download"
    );
    drop(d);
    // The bytes survive closing the store; a new client resumes from them.
    let mut d = Device::open(dir.path().join("resume.db"), DeviceConfig::default()).unwrap();
    assert_eq!(d.partial_download().unwrap().unwrap().held_bytes, 40);
    let p = client.download_model(&mut d, &model, None).await.unwrap();
    assert_eq!(
        p,
        DownloadProgress::Installed {
            model_version: model.model_version,
            size_bytes: model.size_bytes,
            resumed_from: 40
        }
    );
    assert_eq!(d.held_snapshot().unwrap(), Some(model.clone()));
    assert_eq!(d.partial_download().unwrap(), None);
    let installed = d.model().unwrap();
    assert_eq!(installed.item_ids().len(), ITEMS as usize);
    assert_eq!(installed.item_ids()[7], "i7");
    assert_eq!(installed.factor_dimension(), 3);
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_given_back_after_its_round_closed_is_not_an_error() {
    let server = TestServer::start().await;
    create_run(&server, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(dir.path(), "slow", 1, DeviceConfig::default());
    let mut client = server.client(quick_retries()).await;
    client.ensure_enrolled(&mut d, APP_KEY).await.unwrap();
    let eligible = pb::Eligibility {
        device_conditions_met: true,
        privacy_budget_available: true,
    };
    let answer = client.check_in(None, eligible).await.unwrap();
    let Some(pb::check_in_response::Outcome::Task(task)) = answer.outcome else {
        panic!("no task: {answer:?}");
    };
    // Alone in a round that needs two, the device is too slow: the round is abandoned at its
    // 2-second deadline before the device gives its task back.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let refused = client
        .decline_task(&task, pb::DeclineReason::DeadlineUnreachable)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            ParticipationError::Rejected {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ),
        "{refused}"
    );
    assert_eq!(
        client
            .give_back(&task, pb::DeclineReason::DeadlineUnreachable)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_certificate_is_a_clear_tls_error() {
    let server = TestServer::start().await;
    let other = fedpref_coordinator::config::self_signed_localhost().unwrap();
    let e = CoordinatorClient::connect(
        &server.url(),
        other.certificate_pem.as_bytes(),
        quick_retries(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ParticipationError::Certificate { .. }), "{e}");
    assert!(
        e.to_string().contains("not trusted by the CA certificate"),
        "{e}"
    );
    let e = CoordinatorClient::connect(&server.url(), b"not a certificate", quick_retries())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ParticipationError::InvalidCaCertificate(_)),
        "{e}"
    );
    let e = CoordinatorClient::connect(
        "http://127.0.0.1:1",
        server.ca_pem.as_bytes(),
        quick_retries(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("https://"), "{e}");
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_enrolment_grants_devices_enrol_with_their_persons_grant_and_take_part() {
    use fedpref_coordinator::checkpoint::LedgerSigner;
    let backend = LedgerSigner::from_seed([21; 32]);
    let server = TestServer::start_with_grant_keys(&[backend.public_key_hex()]).await;
    let run_id = create_run(&server, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let expires = Timestamp::now().millis() + 3_600_000;

    // Without a grant the SDK gets a typed error naming the grant, and stores nothing.
    let mut stranger = device(dir.path(), "no-grant", 9, DeviceConfig::default());
    let e = server
        .client(quick_retries())
        .await
        .ensure_enrolled(&mut stranger, APP_KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ParticipationError::Unauthenticated { call: "Enroll", message } if message.contains("grant")),
        "{e}"
    );
    assert_eq!(stranger.enrolment().unwrap(), None);

    // Two people, each with the grant their backend signed (as the app would receive it:
    // base64 bytes), take part in the round.
    let mut handles = vec![];
    for (n, person) in ["ann", "ben"].into_iter().enumerate() {
        let grant = fedpref_coordinator::enrolment::sign(&backend, person, expires);
        let bytes = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            prost::Message::encode_to_vec(&grant),
        );
        let config = ParticipationConfig {
            enrolment_grant: Some(
                fedpref_client_sdk::enrolment_grant_from_bytes(bytes.as_bytes()).unwrap(),
            ),
            ..quick_retries()
        };
        let mut d = device(dir.path(), person, n, DeviceConfig::default());
        let mut client = server.client(config).await;
        handles.push(tokio::spawn(async move {
            let options = ParticipateOptions {
                rounds: 1,
                give_up_after: Some(Duration::from_secs(20)),
                ..ParticipateOptions::default()
            };
            participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
                .await
                .unwrap()
        }));
    }
    for h in handles {
        let report = h.await.unwrap();
        assert_eq!(report.uploads, 1, "{:#?}", report.events);
    }
    let mut admin_client = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = admin_client
            .get_run(admin(pb::GetRunRequest {
                run_id: run_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if run.rounds_committed == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{run:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_app_key_is_a_typed_unauthenticated_error_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(dir.path(), "wrong-key", 2, DeviceConfig::default());
    let mut client = server.client(quick_retries()).await;
    let e = client
        .ensure_enrolled(&mut d, "not-the-app-key-at-all-0000")
        .await
        .unwrap_err();
    match &e {
        ParticipationError::Unauthenticated { call, message } => {
            assert_eq!(*call, "Enroll");
            assert!(message.contains("app key"), "{message}");
        }
        other => panic!("expected UNAUTHENTICATED, got {other}"),
    }
    assert_eq!(d.enrolment().unwrap(), None);
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_declines_the_task_and_uploads_nothing() {
    let server = TestServer::start().await;
    create_run(&server, 5).await;
    let dir = tempfile::tempdir().unwrap();
    // One local round at σ = 4 costs more than ε = 0.5.
    let config = DeviceConfig {
        budget_epsilon: 0.5,
        ..DeviceConfig::default()
    };
    let mut d = device(dir.path(), "poor", 3, config);
    let mut client = server.client(quick_retries()).await;
    let options = ParticipateOptions {
        rounds: 2,
        give_up_after: Some(Duration::from_secs(10)),
        ..ParticipateOptions::default()
    };
    let report = participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.uploads, 0, "{:#?}", report.events);
    assert_eq!(report.declines, 1, "{:#?}", report.events);
    assert!(
        report.events.iter().any(|e| matches!(
            e,
            ParticipationEvent::Declined { reason, .. } if reason == "DECLINE_REASON_PRIVACY_BUDGET_EXHAUSTED"
        )),
        "{:#?}",
        report.events
    );
    let b = d.budget().unwrap();
    assert_eq!((b.rounds, b.uploads.len()), (0, 0));
    assert_eq!(b.epsilon_spent, 0.0);

    // Training switched off: the device checks in as not eligible and stops; no task.
    let mut off = device(dir.path(), "off", 4, DeviceConfig::default());
    off.set_training(false).unwrap();
    let report = participate(&mut off, &mut client, APP_KEY, &options, &mut |_| {})
        .await
        .unwrap();
    assert_eq!((report.uploads, report.declines), (0, 0));
    assert!(
        matches!(report.events.last(), Some(ParticipationEvent::Stopped { why }) if why.contains("training participation is off")),
        "{:#?}",
        report.events
    );
    assert_eq!(off.budget().unwrap().rounds, 0);
    server.running.shutdown().await.unwrap();
}

#[test]
fn participate_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedpref-device"))
        .arg("--store")
        .arg(dir.path().join("d.db"))
        .args([
            "participate",
            "--coordinator",
            "https://127.0.0.1:1",
            "--ca-cert",
            "/nonexistent/ca.pem",
            "--app-key",
            "k",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ca-cert /nonexistent/ca.pem: cannot read"),
        "{err}"
    );
}
