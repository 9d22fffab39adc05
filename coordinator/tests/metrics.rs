//! `GET /metrics` on a running server: the counters move when devices act.

use std::io::{Read, Write};
use std::net::TcpStream;

use fedpref_coordinator::config::Config;
use fedpref_coordinator::server::{ServeOptions, start};
use fedpref_proto::v1 as pb;
use fedpref_proto::v1::device_service_client::DeviceServiceClient;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn value(text: &str, metric: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metric} not in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_check_ins_and_refused_uploads() {
    let dir = tempfile::tempdir().unwrap();
    fedpref_coordinator::config::init(dir.path()).unwrap();
    let config = Config::from_file(&dir.path().join("coordinator.toml")).unwrap();
    // A run created offline, as `run create` does, before the server starts.
    let manifest =
        fedpref_coordinator::manifest::RunManifest::from_file(&dir.path().join("manifest.toml"))
            .unwrap();
    let mut store = fedpref_coordinator::store::Store::open(&config.store.path).unwrap();
    fedpref_coordinator::coordinator::create_run(&mut store, "demo", &manifest, 1).unwrap();
    drop(store);
    let running = start(
        &config,
        &ServeOptions {
            device_addr: Some("127.0.0.1:0".parse().unwrap()),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let metrics_addr = running.metrics_addr.expect("metrics are served");
    let before = tokio::task::spawn_blocking(move || scrape(metrics_addr))
        .await
        .unwrap();
    assert_eq!(value(&before, "fedpref_checkins_total"), 0.0);

    let pem = std::fs::read_to_string(dir.path().join("tls").join("cert.pem")).unwrap();
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", running.device_addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = DeviceServiceClient::new(channel);
    let app_key = std::fs::read_to_string(dir.path().join("app.key")).unwrap();
    let token = client
        .enroll(pb::EnrollRequest {
            app_key: app_key.trim().into(),
            sdk_version: "0.1.0".into(),
            grant: None,
        })
        .await
        .unwrap()
        .into_inner()
        .device_token;
    let mut check_in = Request::new(pb::CheckInRequest {
        sdk_version: "0.1.0".into(),
        held_model: None,
        eligibility: Some(pb::Eligibility {
            device_conditions_met: true,
            privacy_budget_available: true,
        }),
    });
    check_in.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        fedpref_proto::metadata::bearer(&token).parse().unwrap(),
    );
    let answer = client.check_in(check_in).await.unwrap().into_inner();
    assert!(
        matches!(
            answer.outcome,
            Some(pb::check_in_response::Outcome::Task(_))
        ),
        "{answer:?}"
    );
    // An upload without a token is refused as unauthenticated, and counted.
    let refused = client
        .upload_update(tokio_stream::iter(vec![pb::UploadUpdateRequest {
            part: None,
        }]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let after = tokio::task::spawn_blocking(move || scrape(metrics_addr))
        .await
        .unwrap();
    assert_eq!(value(&after, "fedpref_checkins_total"), 1.0);
    assert_eq!(value(&after, "fedpref_tasks_sent_total"), 1.0);
    assert_eq!(
        value(
            &after,
            "fedpref_uploads_rejected_total{reason=\"unauthenticated\"}"
        ),
        1.0
    );
    assert!(
        after.contains("fedpref_round_duration_seconds_bucket"),
        "{after}"
    );
    running.shutdown().await.unwrap();
}
