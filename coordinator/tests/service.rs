//! The gRPC services over 127.0.0.1 with TLS from a certificate generated here (rcgen):
//! devices through full rounds, every bad input with its status code and message, admin
//! authentication, health.

mod common;

use common::device::{
    authed, central_manifest as manifest, check_in_request, update_for, upload, upload_messages,
};
use std::path::Path;
use std::time::{Duration, Instant};

use fedpref_coordinator::config::{Config, Limits};
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_privacy::evaluation::Coordinate;
use fedpref_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient, check_in_response::Outcome,
    device_service_client::DeviceServiceClient, upload_update_request::Part,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Request};

const APP_KEY: &str = "test-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

struct TestServer {
    running: Running,
    ca_pem: String,
    dir: tempfile::TempDir,
}

fn limits() -> Limits {
    Limits {
        max_upload_bytes: 1 << 20,
        max_upload_chunks: 16,
        max_chunk_bytes: 1024,
        download_chunk_bytes: 1000,
        device_requests_per_second: 10_000.0,
        device_burst: 10_000,
        max_concurrent_requests: 64,
        tick_millis: 20,
        ..Limits::default()
    }
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(limits()).await
    }

    async fn start_with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cert.pem", &cert.cert.pem());
        write("key.pem", &cert.signing_key.serialize_pem());
        write("app.key", APP_KEY);
        write("admin.token", ADMIN_TOKEN);
        let config = r#"
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
        let mut config = Config::from_toml(config, "test.toml", dir.path()).unwrap();
        config.limits = limits;
        let options = ServeOptions {
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let running = start(&config, &options).await.unwrap();
        Self {
            running,
            ca_pem: cert.cert.pem(),
            dir,
        }
    }

    async fn channel(&self, port: u16) -> Channel {
        Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.ca_pem))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn device(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.channel(self.running.device_addr.port()).await)
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel(self.running.admin_addr.port()).await)
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("coordinator.db")
    }
}

/// A central-DP cohort run over the protocol's manifest: 100 items × 4 factors.
async fn create_run(server: &TestServer, m: pb::RunManifest) -> pb::Run {
    server
        .admin()
        .await
        .create_run(authed(
            pb::CreateRunRequest {
                manifest: Some(m),
                request_id: "create-1".into(),
                simulation_seed: None,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn enroll(client: &mut DeviceServiceClient<Channel>) -> String {
    client
        .enroll(pb::EnrollRequest {
            app_key: APP_KEY.into(),
            sdk_version: "0.1.0".into(),
            grant: None,
        })
        .await
        .unwrap()
        .into_inner()
        .device_token
}

async fn check_in(client: &mut DeviceServiceClient<Channel>, token: &str) -> Outcome {
    client
        .check_in(authed(check_in_request(), token))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
}

/// Downloads a model from `offset`; returns the bytes and the SHA-256 the chunks carry.
async fn download(
    client: &mut DeviceServiceClient<Channel>,
    token: &str,
    run_id: &str,
    version: Option<u64>,
    offset: u64,
) -> Result<(Vec<u8>, Vec<u8>), tonic::Status> {
    let mut stream = client
        .download_model(authed(
            pb::DownloadModelRequest {
                run_id: run_id.into(),
                model_version: version,
                offset,
                max_chunk_bytes: 0,
                expected_sha256: vec![],
            },
            token,
        ))
        .await?
        .into_inner();
    let (mut bytes, mut sha) = (vec![], vec![]);
    while let Some(chunk) = stream.message().await? {
        assert_eq!(
            chunk.offset,
            offset + bytes.len() as u64,
            "chunks arrive in order"
        );
        assert!(chunk.content.len() <= 1000, "chunks are bounded");
        sha = chunk.model_sha256;
        bytes.extend(chunk.content);
    }
    Ok((bytes, sha))
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, words: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(words),
        "message {:?} should contain {words:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_devices_complete_three_rounds_over_tls_and_the_ledger_verifies() {
    let server = TestServer::start().await;
    let run = create_run(&server, manifest(3, 2, 1, 3)).await;
    assert_eq!(run.status, pb::RunStatus::Active as i32);
    // The same request id finds the same run instead of creating a second one.
    assert_eq!(
        create_run(&server, manifest(3, 2, 1, 3)).await.run_id,
        run.run_id
    );

    let mut devices = vec![];
    for _ in 0..3 {
        let mut client = server.device().await;
        let token = enroll(&mut client).await;
        devices.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut accepted = 0u64;
            let mut held: Option<(u64, Vec<u8>)> = None;
            while Instant::now() < deadline {
                let outcome = client
                    .check_in(authed(check_in_request(), &token))
                    .await
                    .unwrap()
                    .into_inner()
                    .outcome
                    .unwrap();
                let task = match outcome {
                    Outcome::Task(task) => task,
                    Outcome::ComeBackLater(later) => {
                        if later.reason == pb::ComeBackReason::NoActiveRun as i32 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        continue;
                    }
                    Outcome::Redirect(_) => panic!("no redirects here"),
                };
                let model = task.model.clone().unwrap();
                if held.as_ref().map(|h| h.0) != Some(model.model_version) {
                    let (bytes, sha) = download(
                        &mut client,
                        &token,
                        &task.run_id,
                        Some(model.model_version),
                        0,
                    )
                    .await
                    .unwrap();
                    assert_eq!(bytes.len() as u64, model.size_bytes);
                    assert_eq!(Sha256::digest(&bytes).to_vec(), sha);
                    assert_eq!(sha, model.sha256);
                    held = Some((model.model_version, bytes));
                }
                match upload(
                    &mut client,
                    &token,
                    upload_messages(&task, &update_for(&task), 1024),
                )
                .await
                {
                    Ok(receipt) => {
                        assert_eq!(receipt.round_id, task.round_id);
                        accepted += 1;
                    }
                    // The round's one-second deadline passed first: try the next round.
                    Err(s) if s.code() == Code::FailedPrecondition => {}
                    Err(s) => panic!("upload failed: {s:?}"),
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for d in devices {
        accepted += d.await.unwrap();
    }
    assert!(
        accepted >= 6,
        "at least two updates per committed round, got {accepted}"
    );

    let mut admin = server.admin().await;
    let got = admin
        .get_run(authed(
            pb::GetRunRequest {
                run_id: run.run_id.clone(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, pb::RunStatus::Completed as i32, "{got:?}");
    assert_eq!(got.rounds_committed, 3);
    assert_eq!(got.latest_model_version, 4);
    assert!(!got.epsilon_spent.is_empty());
    // The manifest named no accountant: the run's ε is PLD's, and says so.
    assert_eq!(
        got.manifest.as_ref().unwrap().accountant,
        pb::Accountant::Unspecified as i32
    );
    for a in &got.epsilon_spent {
        assert_eq!(a.accountant, pb::Accountant::Pld as i32, "{a:?}");
    }
    let verification = admin
        .verify_ledger(authed(
            pb::VerifyLedgerRequest {
                run_id: run.run_id.clone(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
    // The ledger, two entries a page.
    let mut token = String::new();
    let mut entries = vec![];
    loop {
        let page = admin
            .read_ledger(authed(
                pb::ReadLedgerRequest {
                    run_id: run.run_id.clone(),
                    start_sequence: 1,
                    page_size: 2,
                    page_token: token.clone(),
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            assert_eq!(entries.len() as u64, page.head_sequence);
            break;
        }
        token = page.next_page_token;
    }
    let spent = entries
        .iter()
        .filter(|e| e.kind == pb::LedgerEntryKind::RoundSpent as i32)
        .count();
    assert_eq!(spent, 3);
    let versions = admin
        .list_model_versions(authed(
            pb::ListModelVersionsRequest {
                run_id: run.run_id.clone(),
                page_size: 0,
                page_token: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        versions.versions.len(),
        4,
        "the initial model and three rounds' versions"
    );
    assert!(versions.versions[0].latest);

    let db = server.db();
    server.running.shutdown().await.unwrap();
    // The store, read offline after shutdown: the chain and every ε re-derive.
    let store = fedpref_coordinator::store::Store::open(&db).unwrap();
    let totals =
        fedpref_coordinator::ledger::verify(&run.run_id, &store.ledger(&run.run_id).unwrap())
            .unwrap();
    assert_eq!(totals.rounds_committed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_bad_input_gets_its_status_code_and_a_message_naming_the_problem() {
    let server = TestServer::start().await;
    let run = create_run(&server, manifest(1, 1, 60, 5)).await;
    let mut client = server.device().await;

    // Enrolment and device authentication.
    assert_status(
        client
            .enroll(pb::EnrollRequest {
                app_key: "wrong-app-key-000000".into(),
                sdk_version: "0.1.0".into(),
                grant: None,
            })
            .await,
        Code::Unauthenticated,
        "app_key",
    );
    assert_status(
        client.check_in(Request::new(check_in_request())).await,
        Code::Unauthenticated,
        "missing `authorization`",
    );
    assert_status(
        client
            .check_in(authed(check_in_request(), "not-a-token"))
            .await,
        Code::Unauthenticated,
        "unknown device token",
    );
    let a = enroll(&mut client).await;
    let b = enroll(&mut client).await;
    assert_status(
        client
            .check_in(authed(
                pb::CheckInRequest {
                    eligibility: None,
                    ..check_in_request()
                },
                &a,
            ))
            .await,
        Code::InvalidArgument,
        "eligibility",
    );

    // A gets the round's only task; B is not selected.
    let Outcome::Task(task) = check_in(&mut client, &a).await else {
        panic!("the first device gets the task");
    };
    assert_eq!(task.run_id, run.run_id);
    let Outcome::ComeBackLater(later) = check_in(&mut client, &b).await else {
        panic!("the cohort of one is full");
    };
    assert_eq!(later.reason, pb::ComeBackReason::NotSelected as i32);

    // Download: whole, resumed from an offset, and a bad offset.
    let model = task.model.clone().unwrap();
    let (whole, sha) = download(&mut client, &a, &run.run_id, None, 0)
        .await
        .unwrap();
    assert_eq!(sha, model.sha256);
    let (tail, _) = download(
        &mut client,
        &a,
        &run.run_id,
        Some(model.model_version),
        1500,
    )
    .await
    .unwrap();
    assert_eq!(tail, whole[1500..]);
    assert_status(
        download(
            &mut client,
            &a,
            &run.run_id,
            Some(model.model_version),
            whole.len() as u64,
        )
        .await,
        Code::OutOfRange,
        "offset",
    );
    assert_status(
        download(&mut client, &a, &run.run_id, None, 10).await,
        Code::InvalidArgument,
        "model_version",
    );
    // B was given no task in the run: it may download none of its models, and cannot tell
    // the run from one that does not exist.
    for run_id in [run.run_id.as_str(), "no-such-run"] {
        assert_status(
            download(&mut client, &b, run_id, None, 0).await,
            Code::PermissionDenied,
            "no task in run",
        );
    }

    let good = update_for(&task);
    // Not selected: B uploads for A's round.
    let mut stolen = task.clone();
    stolen.task_token = "0".repeat(32);
    assert_status(
        upload(&mut client, &b, upload_messages(&stolen, &good, 1024)).await,
        Code::PermissionDenied,
        "no task in run",
    );
    // Nor can B probe whether a run exists by uploading, declining or reporting: a real run
    // and a run that does not exist get the same answer, before any other check.
    for run_id in [run.run_id.as_str(), "no-such-run"] {
        let mut probe = stolen.clone();
        probe.run_id = run_id.into();
        assert_status(
            upload(&mut client, &b, upload_messages(&probe, &good, 1024)).await,
            Code::PermissionDenied,
            "no task in run",
        );
        assert_status(
            client
                .decline_task(authed(
                    pb::DeclineTaskRequest {
                        task: Some(pb::TaskRef {
                            run_id: run_id.into(),
                            round_id: probe.round_id,
                            task_token: probe.task_token.clone(),
                        }),
                        reason: pb::DeclineReason::ConditionsChanged as i32,
                    },
                    &b,
                ))
                .await,
            Code::PermissionDenied,
            "no task in run",
        );
        assert_status(
            client
                .report_metrics(authed(
                    pb::ReportMetricsRequest {
                        run_id: run_id.into(),
                        model_version: 99,
                        ..evaluation_report(&probe, &[])
                    },
                    &b,
                ))
                .await,
            Code::PermissionDenied,
            "no task in run",
        );
    }
    // A stale (or future) round id.
    let mut stale = task.clone();
    stale.round_id += 1;
    assert_status(
        upload(&mut client, &a, upload_messages(&stale, &good, 1024)).await,
        Code::FailedPrecondition,
        "stale round id",
    );
    // A wrong shape.
    let mut wrong = good.clone();
    wrong[0].0.shape = vec![99, 4];
    wrong[0].1.truncate(99 * 4);
    assert_status(
        upload(&mut client, &a, upload_messages(&task, &wrong, 1024)).await,
        Code::InvalidArgument,
        "header.tensors[0].shape",
    );
    // NaN.
    let mut nan = good.clone();
    nan[1].1[3] = f64::NAN;
    assert_status(
        upload(&mut client, &a, upload_messages(&task, &nan, 1024)).await,
        Code::InvalidArgument,
        "element 3 is not finite",
    );
    // Oversize: a chunk above the limit, and too many chunks.
    assert_status(
        upload(&mut client, &a, upload_messages(&task, &good, 2048)).await,
        Code::InvalidArgument,
        "chunk.content: 2048 bytes",
    );
    assert_status(
        upload(&mut client, &a, upload_messages(&task, &good, 200)).await,
        Code::InvalidArgument,
        "limit of 16 chunks",
    );
    // Out-of-order chunks.
    let mut messages = upload_messages(&task, &good, 1024);
    messages.swap(1, 2);
    assert_status(
        upload(&mut client, &a, messages).await,
        Code::InvalidArgument,
        "chunk.offset",
    );
    // An unknown task token, and bytes that do not match the header's SHA-256.
    let mut forged = task.clone();
    forged.task_token = "f".repeat(32);
    assert_status(
        upload(&mut client, &a, upload_messages(&forged, &good, 1024)).await,
        Code::InvalidArgument,
        "unknown task token",
    );
    // The header is checked before the body is read: a forged header whose body never comes
    // is refused at once.
    let header_only = upload_messages(&forged, &good, 1024).remove(0);
    let hanging =
        tokio_stream::StreamExt::chain(tokio_stream::iter([header_only]), tokio_stream::pending());
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        client.upload_update(authed(hanging, &a)),
    )
    .await
    .expect("answered without waiting for the body");
    assert_status(
        refused.map(|r| r.into_inner()),
        Code::InvalidArgument,
        "unknown task token",
    );
    let mut messages = upload_messages(&task, &good, 1024);
    if let Some(Part::Header(h)) = messages[0].part.as_mut() {
        h.update_sha256 = vec![0; 32];
    }
    assert_status(
        upload(&mut client, &a, messages).await,
        Code::DataLoss,
        "update_sha256",
    );
    // The real upload, then a second one.
    let receipt = upload(&mut client, &a, upload_messages(&task, &good, 1024))
        .await
        .unwrap();
    assert_eq!(receipt.bytes_received, (100 * 4 + 100 + 1) * 8);
    assert_status(
        upload(&mut client, &a, upload_messages(&task, &good, 1024)).await,
        Code::FailedPrecondition,
        "already uploaded",
    );

    // Declining a task after uploading for it is refused; metrics reports are summed.
    let declined = client
        .decline_task(authed(
            pb::DeclineTaskRequest {
                task: Some(pb::TaskRef {
                    run_id: task.run_id.clone(),
                    round_id: task.round_id,
                    task_token: task.task_token.clone(),
                }),
                reason: pb::DeclineReason::ConditionsChanged as i32,
            },
            &a,
        ))
        .await;
    assert_status(declined, Code::FailedPrecondition, "already uploaded");
    // The task carried an evaluation token: A's release is accepted once, B (no task) has none.
    assert!(!task.evaluation_token.is_empty());
    assert_eq!(
        task.evaluation_noise_multiplier,
        fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER
    );
    let mine = evaluation_report(&task, &[]);
    client
        .report_metrics(authed(mine.clone(), &a))
        .await
        .unwrap();
    assert_status(
        client.report_metrics(authed(mine.clone(), &a)).await,
        Code::FailedPrecondition,
        "evaluation_token",
    );
    assert_status(
        client.report_metrics(authed(mine, &b)).await,
        Code::PermissionDenied,
        "no task in run",
    );

    // The admin service: device tokens refused, no token unauthenticated.
    let mut admin = server.admin().await;
    let get = |token: &str| {
        authed(
            pb::GetRunRequest {
                run_id: run.run_id.clone(),
            },
            token,
        )
    };
    assert_status(
        admin.get_run(get(&a)).await,
        Code::PermissionDenied,
        "device tokens",
    );
    assert_status(
        admin
            .get_run(Request::new(pb::GetRunRequest {
                run_id: run.run_id.clone(),
            }))
            .await,
        Code::Unauthenticated,
        "missing",
    );
    assert_status(
        admin.get_run(get("wrong-admin-token")).await,
        Code::Unauthenticated,
        "unknown admin token",
    );
    assert_status(
        admin
            .get_run(authed(
                pb::GetRunRequest {
                    run_id: "nope".into(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::NotFound,
        "nope",
    );
    let got = admin.get_run(get(ADMIN_TOKEN)).await.unwrap().into_inner();
    assert_eq!(got.current_round, task.round_id);
    // Pause abandons the round; a paused run tells devices so; pause twice is refused.
    let paused = admin
        .pause_run(authed(
            pb::PauseRunRequest {
                run_id: run.run_id.clone(),
                reason: "maintenance".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.status, pb::RunStatus::Paused as i32);
    assert_eq!(paused.status_reason, "maintenance");
    let Outcome::ComeBackLater(later) = check_in(&mut client, &a).await else {
        panic!("a paused run gives no tasks");
    };
    assert_eq!(later.reason, pb::ComeBackReason::RunPaused as i32);
    assert_status(
        admin
            .pause_run(authed(
                pb::PauseRunRequest {
                    run_id: run.run_id.clone(),
                    reason: "again".into(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::FailedPrecondition,
        "paused",
    );
    assert_status(
        admin
            .pause_run(authed(
                pb::PauseRunRequest {
                    run_id: run.run_id.clone(),
                    reason: String::new(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "reason",
    );
    let resumed = admin
        .resume_run(authed(
            pb::ResumeRunRequest {
                run_id: run.run_id.clone(),
                reason: "done".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.status, pb::RunStatus::Active as i32);
    let report = admin
        .get_report(authed(
            pb::GetReportRequest {
                run_id: run.run_id.clone(),
                format: pb::ReportFormat::Html as i32,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let html = String::from_utf8(report.content).unwrap();
    assert!(report.ledger_intact);
    assert_eq!(report.media_type, "text/html; charset=utf-8");
    assert!(
        html.starts_with("<!DOCTYPE html>") && html.contains("paused: maintenance"),
        "{html}"
    );
    assert!(html.contains(&fedpref_coordinator::hex(&report.ledger_head_sha256)));
    let json = admin
        .get_report(authed(
            pb::GetReportRequest {
                run_id: run.run_id.clone(),
                format: pb::ReportFormat::Json as i32,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let v: serde_json::Value = serde_json::from_slice(&json.content).unwrap();
    assert_eq!(v["run_id"], run.run_id.as_str());
    assert_eq!(v["ledger"]["intact"], true);
    assert_status(
        admin
            .get_report(authed(
                pb::GetReportRequest {
                    run_id: run.run_id.clone(),
                    format: 0,
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "format",
    );
    // A manifest field this coordinator does not implement is named, not dropped.
    let mut unsupported = manifest(1, 1, 60, 5);
    unsupported.local_training = Some(pb::LocalTrainingConfig::default());
    assert_status(
        admin
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(unsupported),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "manifest.local_training",
    );
    // Adaptive clipping is implemented: an out-of-range setting is named.
    let mut bad_clipping = manifest(1, 1, 60, 5);
    bad_clipping.adaptive_clipping = Some(pb::AdaptiveClipping::default());
    assert_status(
        admin
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(bad_clipping),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "adaptive_clipping.target_quantile",
    );
    let mut bad = manifest(1, 1, 60, 5);
    bad.clip_norm = -1.0;
    assert_status(
        admin
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(bad),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "clip_norm",
    );
    let mut bad_accountant = manifest(1, 1, 60, 5);
    bad_accountant.accountant = 7;
    assert_status(
        admin
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(bad_accountant),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "manifest.accountant: 7 is not an Accountant",
    );

    // Health on both ports.
    for port in [
        server.running.device_addr.port(),
        server.running.admin_addr.port(),
    ] {
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(server.channel(port).await);
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        server.channel(server.running.device_addr.port()).await,
    );
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fedpref.v1.DeviceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let db = server.db();
    server.running.shutdown().await.unwrap();
    // Only the tokens' SHA-256 is stored.
    let store = fedpref_coordinator::store::Store::open(&db).unwrap();
    let hashes: Vec<String> = store
        .connection()
        .prepare("SELECT token_sha256 FROM devices ORDER BY enrolled_at_ms")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(hashes.len(), 2);
    for token in [&a, &b] {
        let hash = fedpref_coordinator::hex(&Sha256::digest(token.as_bytes()));
        assert!(hashes.contains(&hash));
        assert!(!hashes.iter().any(|h| h.contains(token.as_str())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_on_both_ports() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    for (port, service) in [
        (
            server.running.device_addr.port(),
            "fedpref.v1.DeviceService",
        ),
        (server.running.admin_addr.port(), "fedpref.v1.AdminService"),
    ] {
        let mut client = ServerReflectionClient::new(server.channel(port).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("a list of services");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&service), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    }
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_gets_resource_exhausted_with_a_retry_hint() {
    let server = TestServer::start_with(Limits {
        device_requests_per_second: 0.5,
        device_burst: 3,
        ..limits()
    })
    .await;
    let mut client = server.device().await;
    let token = enroll(&mut client).await;
    for _ in 0..3 {
        check_in(&mut client, &token).await;
    }
    let status = client
        .check_in(authed(check_in_request(), &token))
        .await
        .expect_err("over the rate");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("retry after"),
        "{}",
        status.message()
    );
    let hint: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(hint > 0 && hint <= 2000, "{hint}");
    // Another device is not affected.
    let other = enroll(&mut client).await;
    check_in(&mut client, &other).await;
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn plaintext_is_refused_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let text = fedpref_coordinator::config::INIT_CONFIG.replace("127.0.0.1:7443", "0.0.0.0:7443");
    let config = Config::from_toml(&text, "c.toml", dir.path()).unwrap();
    let options = ServeOptions {
        insecure_plaintext: true,
        ..Default::default()
    };
    let e = start(&config, &options).await.err().expect("refused");
    assert!(e.to_string().contains("only allowed on loopback"), "{e}");
}

#[test]
fn init_writes_a_working_directory_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let done = fedpref_coordinator::config::init(dir.path()).unwrap();
    assert_eq!(done.files.len(), 11);
    let config = Config::from_file(&dir.path().join("coordinator.toml")).unwrap();
    assert!(Path::new(&config.tls.certificate).exists());
    assert!(
        config
            .auth
            .admin_client_ca
            .as_deref()
            .is_some_and(Path::exists)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for secret in [
            "app.key",
            "admin.token",
            "tls/key.pem",
            "tls/admin-client.key",
            "ledger.key",
            "person.key",
        ] {
            let mode = std::fs::metadata(dir.path().join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
    }
    fedpref_coordinator::manifest::RunManifest::from_file(&dir.path().join("manifest.toml"))
        .unwrap();
    let e = fedpref_coordinator::config::init(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("coordinator.toml") && e.contains("exists already"),
        "{e}"
    );
}

/// The coordinator binary as a child process with the configuration in `dir`.
fn spawn_server(dir: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
        .args(["serve", "--config"])
        .arg(dir.join("coordinator.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect_when_up(port: u16, ca_pem: &str) -> DeviceServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca_pem))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await;
        match attempt {
            Ok(channel) => return DeviceServiceClient::new(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the server did not come up: {e}"),
        }
    }
}

/// Checks in and uploads once; `None` if the device got no task.
async fn check_in_and_upload(
    client: &mut DeviceServiceClient<Channel>,
    token: &str,
) -> Option<u64> {
    let outcome = client
        .check_in(authed(check_in_request(), token))
        .await
        .unwrap()
        .into_inner()
        .outcome?;
    let Outcome::Task(task) = outcome else {
        return None;
    };
    upload(
        client,
        token,
        upload_messages(&task, &update_for(&task), 1024),
    )
    .await
    .ok()
    .map(|r| r.round_id)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_server_mid_round_then_a_restart_resumes_with_the_ledger_verified() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("cert.pem", &cert.cert.pem());
    write("key.pem", &cert.signing_key.serialize_pem());
    write("app.key", APP_KEY);
    write("admin.token", ADMIN_TOKEN);
    let (device_port, admin_port) = (free_port(), free_port());
    write(
        "coordinator.toml",
        &format!(
            "[listen]\ndevice = \"127.0.0.1:{device_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\
             [store]\npath = \"coordinator.db\"\n[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
             [auth]\napp_key_file = \"app.key\"\nadmin_token_file = \"admin.token\"\n"
        ),
    );
    let db = dir.path().join("coordinator.db");
    let toml_manifest = r#"
title = "Restart test"
purpose = "Survive kill -9"
owner = "tests@example.com"
privacy_mode = "central"
rounds = 3
clip_norm = 1.0
noise_multiplier = 2.0
[budget]
epsilon = 50.0
delta = 1e-6
[sampling]
kind = "cohort"
target_size = 3
minimum_size = 2
round_seconds = 3
[server_optimizer]
kind = "fedavg"
[model]
items = 5
factors = 2
[opt_out_policy]
consent_model = "opt-in"
"#;
    let m = fedpref_coordinator::manifest::RunManifest::from_toml(toml_manifest, "restart.toml")
        .unwrap();
    let mut store = fedpref_coordinator::store::Store::open(&db).unwrap();
    fedpref_coordinator::coordinator::create_run(&mut store, "restart", &m, 1).unwrap();
    drop(store);

    // First life: three devices enrol, take tasks, two upload; then the server is killed
    // before the round's deadline.
    let mut server = spawn_server(dir.path());
    let ca = cert.cert.pem();
    let mut devices = vec![];
    for _ in 0..3 {
        let mut client = connect_when_up(device_port, &ca).await;
        let token = enroll(&mut client).await;
        devices.push((client, token));
    }
    let mut uploaded = 0;
    for (client, token) in devices.iter_mut().take(2) {
        uploaded += check_in_and_upload(client, token).await.is_some() as u32;
    }
    assert_eq!(uploaded, 2);
    server.kill().unwrap(); // SIGKILL, mid-round
    server.wait().unwrap();
    {
        let store = fedpref_coordinator::store::Store::open(&db).unwrap();
        let totals =
            fedpref_coordinator::ledger::verify("restart", &store.ledger("restart").unwrap())
                .unwrap();
        assert_eq!(
            totals.rounds_committed, 0,
            "the round in flight was lost, and nothing was spent"
        );
        assert!(totals.cumulative_epsilon.is_empty());
    }

    // Second life: the same devices (their tokens survived in the store) finish a round.
    let mut server = spawn_server(dir.path());
    let mut rounds = vec![];
    for (client, token) in &mut devices {
        *client = connect_when_up(device_port, &ca).await;
        if let Some(r) = check_in_and_upload(client, token).await {
            rounds.push(r);
        }
    }
    assert_eq!(rounds.len(), 3, "every device got a task in the new round");
    let deadline = Instant::now() + Duration::from_secs(20);
    let committed = loop {
        let store = fedpref_coordinator::store::Store::open(&db).unwrap();
        let run = store.run("restart").unwrap();
        if run.rounds_committed >= 1 && run.published_version == run.current_version {
            break run.rounds_committed;
        }
        assert!(Instant::now() < deadline, "the round never committed");
        drop(store);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();
    let store = fedpref_coordinator::store::Store::open(&db).unwrap();
    let totals =
        fedpref_coordinator::ledger::verify("restart", &store.ledger("restart").unwrap()).unwrap();
    assert_eq!(totals.rounds_committed, committed);
    let one_round = fedpref_privacy::epsilon_after_with(
        fedpref_privacy::Accountant::Pld,
        &m.round_release().unwrap(),
        committed,
        1e-6,
        &fedpref_privacy::OrderGrid::default(),
    )
    .unwrap();
    assert!(
        (totals.cumulative_epsilon[0].epsilon - one_round.epsilon).abs()
            <= 1e-9 * one_round.epsilon
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_metrics_that_cross_a_pause_guardrail_pause_the_run_and_show_in_the_report() {
    let server = TestServer::start().await;
    let mut m = manifest(2, 1, 60, 5);
    m.kpis = vec![pb::Kpi {
        metric: "rmse".into(),
        description: "held-out error".into(),
        target: Some(0.9),
        higher_is_better: false,
    }];
    m.guardrail_metrics = vec![pb::GuardrailMetric {
        metric: pb::GuardrailMetricKind::OptOutRate as i32,
        direction: pb::ThresholdDirection::Above as i32,
        threshold: 0.4,
        on_alert: pb::AlertAction::Pause as i32,
        minimum_reporting_devices: 2,
    }];
    let run = create_run(&server, m.clone()).await;
    // The manifest round-trips with its guardrail.
    let stored = run.manifest.clone().unwrap();
    assert_eq!(stored.guardrail_metrics, m.guardrail_metrics);
    assert_eq!(stored.kpis, m.kpis);

    let mut client = server.device().await;
    let (a, b) = (enroll(&mut client).await, enroll(&mut client).await);
    let task = |outcome: Outcome| match outcome {
        Outcome::Task(t) => t,
        other => panic!("expected a task, got {other:?}"),
    };
    let (task_a, task_b) = (
        task(check_in(&mut client, &a).await),
        task(check_in(&mut client, &b).await),
    );
    // Noiseless releases (the coordinator cannot tell): one device opted out, one did not.
    let report = |t: &pb::Task, opted_out: f64| {
        evaluation_report(
            t,
            &[
                (Coordinate::ListsShown, 1.0),
                (Coordinate::PersonalisationOptOut, opted_out),
            ],
        )
    };
    // One device opting out is one of one: below the two-device minimum, nothing happens.
    client
        .report_metrics(authed(report(&task_a, 1.0), &a))
        .await
        .unwrap();
    let mut admin = server.admin().await;
    let get = || {
        authed(
            pb::GetRunRequest {
                run_id: run.run_id.clone(),
            },
            ADMIN_TOKEN,
        )
    };
    assert_eq!(
        admin.get_run(get()).await.unwrap().into_inner().status,
        pb::RunStatus::Active as i32
    );
    // A second device: 1 of 2 opted out = 0.5 > 0.4, so the run pauses.
    client
        .report_metrics(authed(report(&task_b, 0.0), &b))
        .await
        .unwrap();
    let got = admin.get_run(get()).await.unwrap().into_inner();
    assert_eq!(got.status, pb::RunStatus::Paused as i32);
    let ledger = admin
        .read_ledger(authed(
            pb::ReadLedgerRequest {
                run_id: run.run_id.clone(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let alert = ledger
        .entries
        .iter()
        .find(|e| e.kind == pb::LedgerEntryKind::GuardrailAlert as i32)
        .expect("a guardrail alert entry");
    let g = alert.guardrail_alert.as_ref().unwrap();
    assert_eq!(g.metric, pb::GuardrailMetricKind::OptOutRate as i32);
    assert_eq!((g.value, g.threshold, g.reporting_devices), (0.5, 0.4, 2));
    assert_eq!(g.action_taken, pb::AlertAction::Pause as i32);
    let paused = ledger.entries.last().unwrap();
    assert_eq!(paused.kind, pb::LedgerEntryKind::Paused as i32);
    assert_eq!(paused.actor, "guardrail");
    // The evaluation's cost has its own ledger entry, before the alert.
    let spent = ledger
        .entries
        .iter()
        .find(|e| e.kind == pb::LedgerEntryKind::EvaluationReleased as i32)
        .expect("an evaluation_released entry");
    assert_eq!(spent.model_version, 1);
    assert_eq!(
        spent.noise_multiplier,
        fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER
    );
    assert!(spent.reason.contains("ε ="), "{}", spent.reason);
    let md = admin
        .get_report(authed(
            pb::GetReportRequest {
                run_id: run.run_id.clone(),
                format: pb::ReportFormat::Markdown as i32,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let md = String::from_utf8(md.content).unwrap();
    assert!(
        md.contains("opt_out_rate = 0.5000 is above the threshold 0.4"),
        "{md}"
    );
    server.running.shutdown().await.unwrap();
}

/// A release of rates `set` (every other rate 0), centred as a device sends it but without
/// noise, with the task's evaluation token.
fn evaluation_report(task: &pb::Task, set: &[(Coordinate, f64)]) -> pb::ReportMetricsRequest {
    let mut released_rates = vec![-0.5; fedpref_privacy::evaluation::COORDINATES];
    for (k, v) in set {
        released_rates[k.index()] = v - 0.5;
    }
    pb::ReportMetricsRequest {
        run_id: task.run_id.clone(),
        model_version: task.model.as_ref().unwrap().model_version,
        evaluation_token: task.evaluation_token.clone(),
        released_rates,
        noise_multiplier: task.evaluation_noise_multiplier,
    }
}

/// Sets the header's clip bit of an upload stream.
fn with_clip_bit(
    mut messages: Vec<pb::UploadUpdateRequest>,
    bit: Option<f64>,
) -> Vec<pb::UploadUpdateRequest> {
    if let Some(Part::Header(h)) = messages[0].part.as_mut() {
        h.clip_bit = bit;
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_adaptive_clipping_requests_a_clip_bit_and_the_upload_must_carry_exactly_one() {
    let server = TestServer::start().await;
    let mut m = manifest(2, 1, 30, 2);
    m.privacy_mode = pb::PrivacyMode::Local as i32;
    m.noise_multiplier = 2.0;
    m.adaptive_clipping = Some(pb::AdaptiveClipping {
        target_quantile: 0.5,
        learning_rate: 0.2,
        count_noise_multiplier: 1.5,
    });
    create_run(&server, m).await;
    let mut client = server.device().await;
    let token = enroll(&mut client).await;
    let Outcome::Task(task) = check_in(&mut client, &token).await else {
        panic!("a task");
    };
    assert!(task.clip_bit_requested);
    assert_eq!(task.clip_bit_noise_stddev, 1.5);
    assert_eq!(task.clip_norm, 1.0);
    // The device's update noise is the raised σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).
    let sigma_delta = (2f64.powi(-2) - 3f64.powi(-2)).powf(-0.5);
    assert!((task.noise_multiplier - sigma_delta).abs() < 1e-12);
    let messages = upload_messages(&task, &update_for(&task), 1000);
    assert_status(
        upload(&mut client, &token, with_clip_bit(messages.clone(), None)).await,
        Code::InvalidArgument,
        "header.clip_bit",
    );
    assert_status(
        upload(
            &mut client,
            &token,
            with_clip_bit(messages.clone(), Some(f64::NAN)),
        )
        .await,
        Code::InvalidArgument,
        "header.clip_bit",
    );
    assert_status(
        upload(
            &mut client,
            &token,
            with_clip_bit(messages.clone(), Some(f64::INFINITY)),
        )
        .await,
        Code::InvalidArgument,
        "header.clip_bit",
    );
    let mut wrong_c = with_clip_bit(messages.clone(), Some(1.0));
    if let Some(Part::Header(h)) = wrong_c[0].part.as_mut() {
        h.clip_norm = 2.0;
    }
    assert_status(
        upload(&mut client, &token, wrong_c).await,
        Code::InvalidArgument,
        "header.clip_norm",
    );
    // Refusals left the task usable: the right upload is accepted.
    upload(&mut client, &token, with_clip_bit(messages, Some(0.7)))
        .await
        .unwrap();

    // A run without adaptive clipping requests no bit and refuses one.
    let server = TestServer::start().await;
    let mut m = manifest(2, 1, 30, 2);
    m.privacy_mode = pb::PrivacyMode::Local as i32;
    create_run(&server, m).await;
    let mut client = server.device().await;
    let token = enroll(&mut client).await;
    let Outcome::Task(task) = check_in(&mut client, &token).await else {
        panic!("a task");
    };
    assert!(!task.clip_bit_requested);
    let messages = upload_messages(&task, &update_for(&task), 1000);
    assert_status(
        upload(
            &mut client,
            &token,
            with_clip_bit(messages.clone(), Some(1.0)),
        )
        .await,
        Code::InvalidArgument,
        "header.clip_bit",
    );
    upload(&mut client, &token, messages).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_evaluation_reports_are_refused_naming_the_field_and_store_nothing() {
    let server = TestServer::start().await;
    let mut m = manifest(2, 1, 60, 5);
    m.guardrail_metrics = vec![pb::GuardrailMetric {
        metric: pb::GuardrailMetricKind::NegativeFeedbackRate as i32,
        direction: pb::ThresholdDirection::Above as i32,
        threshold: 0.1,
        on_alert: pb::AlertAction::Pause as i32,
        minimum_reporting_devices: 3,
    }];
    let run = create_run(&server, m).await;
    let mut client = server.device().await;
    let a = enroll(&mut client).await;
    let Outcome::Task(task) = check_in(&mut client, &a).await else {
        panic!("a task");
    };
    let good = evaluation_report(&task, &[(Coordinate::ListsShown, 1.0)]);
    // Out-of-range values, counts up to i64::MAX among them: INVALID_ARGUMENT naming the
    // field; the token is not used up.
    for (i, v) in [
        (4, i64::MAX as f64),
        (0, f64::NAN),
        (7, -1e300),
        (11, f64::INFINITY),
    ] {
        let mut bad = good.clone();
        bad.released_rates[i] = v;
        assert_status(
            client.report_metrics(authed(bad, &a)).await,
            Code::InvalidArgument,
            &format!("released_rates[{i}]"),
        );
    }
    let mut short = good.clone();
    short.released_rates.truncate(3);
    assert_status(
        client.report_metrics(authed(short, &a)).await,
        Code::InvalidArgument,
        "released_rates",
    );
    let mut no_token = good.clone();
    no_token.evaluation_token.clear();
    assert_status(
        client.report_metrics(authed(no_token, &a)).await,
        Code::InvalidArgument,
        "evaluation_token",
    );
    let mut sigma = good.clone();
    sigma.noise_multiplier = 0.01;
    assert_status(
        client.report_metrics(authed(sigma, &a)).await,
        Code::InvalidArgument,
        "noise_multiplier",
    );
    // A model version the task was not for, and a run the device never joined.
    let mut version = good.clone();
    version.model_version += 1;
    assert_status(
        client.report_metrics(authed(version, &a)).await,
        Code::FailedPrecondition,
        "model_version",
    );
    let other = server
        .admin()
        .await
        .create_run(authed(
            pb::CreateRunRequest {
                manifest: Some(pb::RunManifest {
                    title: "Another run".into(),
                    ..manifest(2, 1, 60, 5)
                }),
                request_id: "create-2".into(),
                simulation_seed: None,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.run_id, run.run_id);
    let mut never_joined = good.clone();
    never_joined.run_id = other.run_id.clone();
    never_joined.model_version = 1;
    assert_status(
        client.report_metrics(authed(never_joined, &a)).await,
        Code::PermissionDenied,
        "no task in run",
    );
    // Ten fresh enrolments, each reporting the worst rates allowed, a forged token and
    // values far out of range: none is accepted, the run keeps running.
    for i in 0..10 {
        let fresh = enroll(&mut client).await;
        let mut forged = evaluation_report(
            &task,
            &[
                (Coordinate::ListsShown, 1.0),
                (Coordinate::NegativeFeedbackRate, 1.0),
            ],
        );
        forged.evaluation_token = format!("forged-{i}");
        assert_status(
            client.report_metrics(authed(forged.clone(), &fresh)).await,
            Code::PermissionDenied,
            "no task in run",
        );
        forged.released_rates[Coordinate::NegativeFeedbackRate.index()] = 1e6;
        assert_status(
            client.report_metrics(authed(forged, &fresh)).await,
            Code::InvalidArgument,
            "released_rates[4]",
        );
    }
    // The real report still goes through once; the store summed exactly it.
    client
        .report_metrics(authed(good.clone(), &a))
        .await
        .unwrap();
    assert_status(
        client.report_metrics(authed(good, &a)).await,
        Code::FailedPrecondition,
        "evaluation_token",
    );
    let mut admin = server.admin().await;
    let got = admin
        .get_run(authed(
            pb::GetRunRequest {
                run_id: run.run_id.clone(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, pb::RunStatus::Active as i32);
    let ledger = admin
        .read_ledger(authed(
            pb::ReadLedgerRequest {
                run_id: run.run_id.clone(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        ledger
            .entries
            .iter()
            .all(|e| e.kind != pb::LedgerEntryKind::GuardrailAlert as i32)
    );
    let report = admin
        .get_report(authed(
            pb::GetReportRequest {
                run_id: run.run_id.clone(),
                format: pb::ReportFormat::Json as i32,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let json: serde_json::Value = serde_json::from_slice(&report.content).unwrap();
    let versions = &json["guardrails"]["versions"];
    assert_eq!(versions[0]["reports"], 1, "{versions}");
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolments_past_the_window_cap_get_resource_exhausted_naming_the_limit() {
    let server = TestServer::start_with(Limits {
        max_enrolments_per_window: 3,
        enrolment_window_seconds: 3600,
        ..limits()
    })
    .await;
    let mut client = server.device().await;
    for _ in 0..3 {
        enroll(&mut client).await;
    }
    let status = client
        .enroll(pb::EnrollRequest {
            app_key: APP_KEY.into(),
            sdk_version: "0.1.0".into(),
            grant: None,
        })
        .await
        .expect_err("over the cap");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("limits.max_enrolments_per_window"),
        "{}",
        status.message()
    );
    server.running.shutdown().await.unwrap();
}
