//! `participate` as an app calls it: a blocking call with a listener, against a real
//! coordinator started in-process on 127.0.0.1 with TLS from a fresh certificate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpref_coordinator::config::{Config, Limits, self_signed_localhost};
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_ffi::{
    FedprefDevice, FedprefError, ParticipateOptions, ParticipationListener, ParticipationStep,
};
use fedpref_proto::metadata::bearer;
use fedpref_proto::prost_types;
use fedpref_proto::v1::{self as pb, admin_service_client::AdminServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const APP_KEY: &str = "ffi-participation-app-key-012345";
const ADMIN_TOKEN: &str = "ffi-participation-admin-token-01";
const ITEMS: u64 = 8;

struct Server {
    running: Running,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

async fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed_localhost().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("cert.pem", &cert.certificate_pem);
    write("key.pem", &cert.private_key_pem);
    write("app.key", APP_KEY);
    write("admin.token", ADMIN_TOKEN);
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
    let mut config = Config::from_toml(text, "test.toml", dir.path()).unwrap();
    config.limits = Limits {
        max_upload_bytes: 1 << 20,
        max_upload_chunks: 64,
        max_chunk_bytes: 1024,
        download_chunk_bytes: 1000,
        device_requests_per_second: 10_000.0,
        device_burst: 10_000,
        max_concurrent_requests: 64,
        tick_millis: 20,
    };
    let options = ServeOptions {
        admin_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let running = start(&config, &options).await.unwrap();
    Server {
        running,
        ca_pem: cert.certificate_pem,
        _dir: dir,
    }
}

/// A local-DP run: cohorts of 2, 2-second rounds, `ITEMS` items × 3 factors.
async fn create_run(server: &Server, rounds: u64) {
    let channel = Channel::from_shared(format!(
        "https://127.0.0.1:{}",
        server.running.admin_addr.port()
    ))
    .unwrap()
    .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&server.ca_pem)))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let manifest = pb::RunManifest {
        title: "FFI participation test".into(),
        purpose: "the exported participate call end to end".into(),
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
                target_cohort_size: 2,
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
                    init_seed: Some(5),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        ..Default::default()
    };
    let mut request = tonic::Request::new(pb::CreateRunRequest {
        manifest: Some(manifest),
        request_id: "ffi-participation".into(),
        simulation_seed: None,
    });
    request.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        bearer(ADMIN_TOKEN).parse().unwrap(),
    );
    AdminServiceClient::new(channel)
        .create_run(request)
        .await
        .unwrap();
}

fn device(dir: &std::path::Path, n: usize) -> Arc<FedprefDevice> {
    let d = FedprefDevice::open(dir.join(format!("d{n}.db")).display().to_string()).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        let topic = ["Comedy", "Drama", "Jazz"][i as usize % 3];
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"]}}\n");
    }
    for j in 0..4 {
        let item = (n + 3 * j) % ITEMS as usize;
        let value = 1 + (n + j) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    d.ingest_jsonl(lines, false, None).unwrap();
    d
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(ParticipationStep, String)>>);

impl ParticipationListener for Recorder {
    fn on_step(&self, step: ParticipationStep, message: String) {
        self.0.lock().unwrap().push((step, message));
    }
}

#[test]
fn two_devices_take_part_in_a_local_dp_round_and_their_budgets_show_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(start_server());
    runtime.block_on(create_run(&server, 1));
    let url = format!("https://127.0.0.1:{}", server.running.device_addr.port());
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<_> = (0..2).map(|n| device(dir.path(), n)).collect();
    let listeners: Vec<_> = (0..2).map(|_| Arc::new(Recorder::default())).collect();
    let options = ParticipateOptions {
        rounds: 1,
        device_conditions_met: true,
        give_up_after_seconds: Some(20.0),
    };
    let started = Instant::now();
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .zip(&listeners)
            .map(|(d, l)| {
                let (url, ca) = (url.clone(), server.ca_pem.clone());
                let listener: Arc<dyn ParticipationListener> = l.clone();
                s.spawn(move || d.participate(url, ca, APP_KEY.into(), options, Some(listener)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    for ((report, d), l) in reports.into_iter().zip(&devices).zip(&listeners) {
        let report = report.unwrap();
        assert_eq!(report.uploads, 1, "{:#?}", report.messages);
        assert!(matches!(
            report.steps.first(),
            Some(ParticipationStep::Enrolled { new: true, .. })
        ));
        assert!(
            report
                .steps
                .iter()
                .any(|s| matches!(s, ParticipationStep::Uploaded { round_id: 1, .. })),
            "{:#?}",
            report.messages
        );
        // The listener saw every step, in order, with the SDK's wording.
        let seen = l.0.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            report.steps
        );
        assert_eq!(
            seen.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
            report.messages
        );
        let b = d.budget().unwrap();
        assert_eq!((b.rounds, b.uploads.len()), (1, 1));
        assert!(b.epsilon_spent > 0.0 && b.epsilon_remaining < b.epsilon_budget);
        assert_eq!(b.uploads[0].mode, "local");
        // With the downloaded model, recommendations are personal.
        assert_eq!(d.recommend(3, None).unwrap().len(), 3);
    }

    // A wrong app key is a typed error with the coordinator's reason.
    let stranger = device(dir.path(), 9);
    let e = stranger
        .participate(
            url.clone(),
            server.ca_pem.clone(),
            "not-the-app-key".into(),
            options,
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::Unauthenticated(ref m) if m.starts_with("Enroll: UNAUTHENTICATED")),
        "{e:?}"
    );
    // A URL that is not one is refused before any network call.
    let e = stranger
        .participate(
            "not a url".into(),
            server.ca_pem.clone(),
            APP_KEY.into(),
            options,
            None,
        )
        .unwrap_err();
    assert!(matches!(e, FedprefError::InvalidEndpoint(_)), "{e:?}");
    let e = stranger
        .participate(
            url,
            server.ca_pem.clone(),
            APP_KEY.into(),
            ParticipateOptions {
                rounds: 0,
                ..options
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::InvalidInput(ref m) if m.contains("rounds")),
        "{e:?}"
    );
    runtime.block_on(server.running.shutdown()).unwrap();
}
