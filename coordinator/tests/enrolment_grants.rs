//! Enrolment grants over real gRPC with TLS on loopback: with `auth.enrolment_grant_keys` a
//! coordinator enrols only devices with a grant the app's backend signed, every device of one
//! person acts as that person (one update per round, one participation history), enrolments
//! per person are capped, the run's ledger and report say its guarantees hold per person, and
//! a coordinator cannot drop the keys while such a run goes on.

mod common;

use common::device::{
    authed, central_manifest, check_in_request, update_for, upload, upload_messages,
};
use std::path::Path;

use fedpref_coordinator::checkpoint::LedgerSigner;
use fedpref_coordinator::config::{Config, Limits};
use fedpref_coordinator::enrolment::{Person, sign};
use fedpref_coordinator::ledger::LedgerEvent;
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient, check_in_response::Outcome,
    device_service_client::DeviceServiceClient,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const APP_KEY: &str = "test-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
const PERSON_KEY: &str = "test-person-key-0123456789abcdef-0123456789";
const HOUR_MS: i64 = 3_600_000;

struct Server {
    running: Running,
    ca_pem: String,
}

fn write_files(dir: &Path) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("cert.pem", &cert.cert.pem());
    write("key.pem", &cert.signing_key.serialize_pem());
    write("app.key", APP_KEY);
    write("admin.token", ADMIN_TOKEN);
    write("person.key", PERSON_KEY);
    cert.cert.pem()
}

async fn serve(
    dir: &Path,
    ca_pem: &str,
    keys: &[String],
) -> Result<Server, fedpref_coordinator::server::ServerError> {
    let text = format!(
        r#"
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
enrolment_grant_keys = {keys:?}
person_key_file = "person.key"
"#
    );
    let mut config = Config::from_toml(&text, "test.toml", dir).unwrap();
    config.limits = Limits {
        device_requests_per_second: 10_000.0,
        device_burst: 10_000,
        tick_millis: 20,
        max_enrolments_per_person: 2,
        ..Limits::default()
    };
    let options = ServeOptions {
        admin_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    Ok(Server {
        running: start(&config, &options).await?,
        ca_pem: ca_pem.to_string(),
    })
}

impl Server {
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

    async fn create_run(&self) -> String {
        AdminServiceClient::new(self.channel(self.running.admin_addr.port()).await)
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(manifest()),
                    request_id: "create-1".into(),
                    simulation_seed: None,
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .run_id
    }

    fn ledger(&self, run_id: &str) -> Vec<LedgerEvent> {
        let c = self.running.coordinator();
        let c = c.lock().unwrap();
        c.store()
            .ledger(run_id)
            .unwrap()
            .into_iter()
            .map(|e| {
                serde_json::from_str::<fedpref_coordinator::ledger::LedgerEntry>(&e.body)
                    .unwrap()
                    .event
            })
            .collect()
    }
}

fn manifest() -> pb::RunManifest {
    pb::RunManifest {
        title: "Grants".into(),
        ..central_manifest(3, 2, 60, 5)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn enroll(
    client: &mut DeviceServiceClient<Channel>,
    grant: Option<pb::EnrolmentGrant>,
) -> Result<String, tonic::Status> {
    client
        .enroll(pb::EnrollRequest {
            app_key: APP_KEY.into(),
            sdk_version: "0.1.0".into(),
            grant,
        })
        .await
        .map(|r| r.into_inner().device_token)
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, words: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(words),
        "{:?} should contain {words:?}",
        status.message()
    );
}

async fn task(client: &mut DeviceServiceClient<Channel>, token: &str) -> Option<pb::Task> {
    match client
        .check_in(authed(check_in_request(), token))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
    {
        Outcome::Task(t) => Some(t),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_grants_act_as_their_person_and_the_run_says_per_person() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_files(dir.path());
    let backend = LedgerSigner::from_seed([3; 32]);
    let keys = vec![backend.public_key_hex()];

    // Before grants: an enrolment without one, and a grant nobody can check.
    let plain = serve(dir.path(), &ca, &[]).await.unwrap();
    let mut client = plain.device().await;
    let ungranted = enroll(&mut client, None).await.unwrap();
    refused(
        enroll(
            &mut client,
            Some(sign(&backend, "alice", now_ms() + HOUR_MS)),
        )
        .await,
        Code::FailedPrecondition,
        "auth.enrolment_grant_keys",
    );
    plain.running.shutdown().await.unwrap();

    let server = serve(dir.path(), &ca, &keys).await.unwrap();
    let mut client = server.device().await;
    // No grant, a grant by another key, an expired grant, a tampered grant.
    refused(
        enroll(&mut client, None).await,
        Code::Unauthenticated,
        "grant: missing",
    );
    let stranger = LedgerSigner::from_seed([4; 32]);
    refused(
        enroll(
            &mut client,
            Some(sign(&stranger, "alice", now_ms() + HOUR_MS)),
        )
        .await,
        Code::Unauthenticated,
        "grant.signature",
    );
    refused(
        enroll(&mut client, Some(sign(&backend, "alice", now_ms() - 1))).await,
        Code::Unauthenticated,
        "expired",
    );
    let mut tampered = sign(&backend, "alice", now_ms() + HOUR_MS);
    tampered.claims[2] ^= 1;
    refused(
        enroll(&mut client, Some(tampered)).await,
        Code::Unauthenticated,
        "grant.signature",
    );
    // The enrolment made without a grant no longer authenticates.
    refused(
        client
            .check_in(authed(check_in_request(), &ungranted))
            .await,
        Code::Unauthenticated,
        "enrol again with one",
    );

    // Alice enrols two devices (the cap is two per person), Bob one.
    let alice_phone = enroll(
        &mut client,
        Some(sign(&backend, "alice", now_ms() + HOUR_MS)),
    )
    .await
    .unwrap();
    let alice_laptop = enroll(
        &mut client,
        Some(sign(&backend, "alice", now_ms() + HOUR_MS)),
    )
    .await
    .unwrap();
    refused(
        enroll(
            &mut client,
            Some(sign(&backend, "alice", now_ms() + HOUR_MS)),
        )
        .await,
        Code::ResourceExhausted,
        "limits.max_enrolments_per_person",
    );
    let bob = enroll(&mut client, Some(sign(&backend, "bob", now_ms() + HOUR_MS)))
        .await
        .unwrap();

    let run_id = server.create_run().await;
    // Alice's phone takes the round's task; her laptop, acting as the same person, gets no
    // second one: whatever it is told, it cannot add a second update for her.
    let phone_task = task(&mut client, &alice_phone).await.expect("a task");
    let laptop_task = task(&mut client, &alice_laptop).await;
    if let Some(t) = &laptop_task {
        assert_eq!(t.task_token, phone_task.task_token, "one task per person");
    }
    upload(
        &mut client,
        &alice_phone,
        upload_messages(&phone_task, &update_for(&phone_task), 1 << 20),
    )
    .await
    .unwrap();
    refused(
        upload(
            &mut client,
            &alice_laptop,
            upload_messages(&phone_task, &update_for(&phone_task), 1 << 20),
        )
        .await,
        Code::FailedPrecondition,
        "already uploaded",
    );
    let bob_task = task(&mut client, &bob).await.expect("a task");
    upload(
        &mut client,
        &bob,
        upload_messages(&bob_task, &update_for(&bob_task), 1 << 20),
    )
    .await
    .unwrap();

    // The run records that it counts per person, and its participation history knows Alice
    // once, under her person, not her devices.
    let events = server.ledger(&run_id);
    let Some(LedgerEvent::RunCreated { privacy_unit, .. }) = events.first() else {
        panic!("no run_created")
    };
    assert_eq!(privacy_unit.as_deref(), Some("person"));
    {
        let c = server.running.coordinator();
        let c = c.lock().unwrap();
        let alice = Person::from_pseudonym(PERSON_KEY.as_bytes(), "alice").principal;
        assert!(c.may_download(&run_id, &alice).unwrap());
        let report = fedpref_coordinator::report::ImpactReport::build(c.store(), &run_id, now_ms())
            .expect("a report");
        let text = report.to_markdown();
        assert!(
            text.contains("One user is:** one person"),
            "the report states the unit: {text}"
        );
    }
    server.running.shutdown().await.unwrap();

    // Dropping the keys while a per-person run goes on is refused, naming the key.
    let e = match serve(dir.path(), &ca, &[]).await {
        Ok(_) => panic!("a coordinator without keys must not go on with a per-person run"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("auth.enrolment_grant_keys") && e.contains(&run_id),
        "{e}"
    );
}

/// Whatever replica serves it, with or without grant keys, a run that counts per person takes
/// part only through persons: an enrolment without a grant is refused by the coordinator
/// itself, and check-in does not offer it the run.
#[test]
fn a_per_person_run_refuses_enrolments_without_a_grant_on_any_coordinator() {
    use fedpref_coordinator::coordinator::{Coordinator, create_run_counting};
    use fedpref_coordinator::engine::{Action, Event};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let t0 = 1_800_000_000_000;
    {
        let mut store = fedpref_coordinator::store::Store::open(&db).unwrap();
        let m = fedpref_coordinator::service::convert::manifest_from_proto(&manifest()).unwrap();
        create_run_counting(&mut store, "per-person", &m, t0, Some("person")).unwrap();
    }
    // A coordinator without grant keys (a replica that adopted the run, say).
    let mut c = Coordinator::open(&db, t0 + 1).unwrap();
    assert!(!c.grant_keys().required());
    assert!(c.counts_per_person("per-person").unwrap());
    let check_in = |device: &str| Event::CheckIn {
        device: device.into(),
        eligible: true,
    };
    let e = c
        .handle("per-person", check_in("dev-0123"), t0 + 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("counts privacy per person"), "{e}");
    let person = Person::from_pseudonym(PERSON_KEY.as_bytes(), "alice").principal;
    let actions = c.handle("per-person", check_in(&person), t0 + 3).unwrap();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::SendTask(t) if t.device == person)),
        "{actions:?}"
    );
}
