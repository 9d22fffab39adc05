//! Failover with real processes: two `fedpref-coordinator serve` replicas on one PostgreSQL
//! database (see `common::pg`), devices over TLS. One test kills the owner with SIGKILL in
//! the middle of a round and checks that the other replica takes the run over once the lease
//! lapses, that the ledger verifies and that the ε spent is that of the committed rounds,
//! exactly once. The other freezes the owner (SIGSTOP) past its lease, lets the other replica
//! take over, resumes it (SIGCONT) and checks that nothing it does afterwards is stored.
//! Both print the failover time they measured.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::device::{authed, check_in_request, update_for, upload, upload_messages};
use common::pg;
use fedpref_coordinator::ledger::verify;
use fedpref_coordinator::store::Store;
use fedpref_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient, check_in_response::Outcome,
    device_service_client::DeviceServiceClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const APP_KEY: &str = "test-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
const RUN: &str = "failover";
const LEASE_MS: u64 = 2000;

const MANIFEST: &str = r#"
title = "Failover test"
purpose = "Survive the loss of a replica"
owner = "tests@example.com"
privacy_mode = "central"
rounds = 50
clip_norm = 1.0
noise_multiplier = 2.0
[budget]
epsilon = 500.0
delta = 1e-6
[sampling]
kind = "cohort"
target_size = 3
minimum_size = 2
round_seconds = 2
[server_optimizer]
kind = "fedavg"
[model]
items = 5
factors = 2
[opt_out_policy]
consent_model = "opt-in"
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Replica {
    id: &'static str,
    device_port: u16,
    admin_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn new(
        root: &Path,
        id: &'static str,
        url: &str,
        cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
    ) -> Self {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("cert.pem", &cert.cert.pem());
        write("key.pem", &cert.signing_key.serialize_pem());
        write("app.key", APP_KEY);
        write("admin.token", ADMIN_TOKEN);
        let (device_port, admin_port) = (free_port(), free_port());
        write(
            "coordinator.toml",
            &format!(
                "[listen]\ndevice = \"127.0.0.1:{device_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\
                 [store]\nurl = \"{url}\"\n\
                 [replica]\nid = \"{id}\"\nadvertise = \"https://127.0.0.1:{device_port}\"\n\
                 lease_millis = {LEASE_MS}\nrenew_millis = 500\n\
                 [tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
                 [auth]\napp_key_file = \"app.key\"\nadmin_token_file = \"admin.token\"\n\
                 [limits]\ntick_millis = 50\ndevice_requests_per_second = 1000.0\ndevice_burst = 1000\n"
            ),
        );
        Self {
            id,
            device_port,
            admin_port,
            dir,
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("log")).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
                .args(["serve", "--config"])
                .arg(self.dir.join("coordinator.toml"))
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    async fn admin(&self, ca: &str) -> AdminServiceClient<Channel> {
        let channel = Channel::from_shared(format!("https://127.0.0.1:{}", self.admin_port))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        AdminServiceClient::new(channel)
    }

    async fn client(&self, ca: &str) -> DeviceServiceClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = Channel::from_shared(format!("https://127.0.0.1:{}", self.device_port))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
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
                Err(e) => panic!("replica {} did not come up: {e}\n{}", self.id, self.log()),
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The synchronous PostgreSQL client runs its own small runtime: on a thread of its own.
fn sync<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// Polls the store until `f` holds (or panics after `secs`).
async fn until(url: &str, secs: u64, what: &str, f: impl Fn(&Store) -> bool + Sync) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if sync(|| f(&Store::open_location(url).unwrap())) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn owner(store: &Store) -> String {
    store
        .lease(RUN)
        .unwrap()
        .map(|l| l.owner)
        .unwrap_or_default()
}

/// Checks in and uploads; the round id, or `None` without a task.
async fn check_in_and_upload(
    client: &mut DeviceServiceClient<Channel>,
    token: &str,
) -> Option<u64> {
    let outcome = client
        .check_in(authed(check_in_request(), token))
        .await
        .ok()?
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

/// Sets up a database with the run, two replicas (a starts first and takes the lease, then
/// b) and three enrolled devices on a. `None` without a PostgreSQL server.
async fn setup(
    root: &Path,
) -> Option<(
    String,
    Replica,
    Replica,
    String,
    Vec<(DeviceServiceClient<Channel>, String)>,
)> {
    let url = sync(|| {
        let url = pg::fresh_database()?;
        let m = fedpref_coordinator::manifest::RunManifest::from_toml(MANIFEST, "failover.toml")
            .unwrap();
        let mut store = Store::open_location(&url).unwrap();
        fedpref_coordinator::coordinator::create_run(&mut store, RUN, &m, 1).unwrap();
        Some(url)
    })?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = cert.cert.pem();
    let mut a = Replica::new(root, "replica-a", &url, &cert);
    let mut b = Replica::new(root, "replica-b", &url, &cert);
    a.start();
    until(&url, 30, "a takes the lease", |s| owner(s) == "replica-a").await;
    b.start();
    let mut devices = vec![];
    for _ in 0..3 {
        let mut client = a.client(&ca).await;
        let token = enroll(&mut client).await;
        devices.push((client, token));
    }
    // At b, which owns nothing, a device is sent to a.
    let mut at_b = b.client(&ca).await;
    let answer = at_b
        .check_in(authed(check_in_request(), &devices[0].1))
        .await
        .unwrap()
        .into_inner();
    match answer.outcome {
        Some(Outcome::Redirect(r)) => {
            assert_eq!(r.endpoint, format!("https://127.0.0.1:{}", a.device_port))
        }
        other => panic!("a check-in at the non-owner must be redirected, got {other:?}"),
    }
    Some((url, a, b, ca, devices))
}

/// The ledger verifies, agrees with the run row, and the ε spent is exactly that of the
/// committed rounds. Returns the committed rounds.
fn check_ledger(url: &str) -> u64 {
    sync(|| check_ledger_now(url))
}

fn check_ledger_now(url: &str) -> u64 {
    let store = Store::open_location(url).unwrap();
    let run = store.run(RUN).unwrap();
    let totals = verify(RUN, &store.ledger(RUN).unwrap()).unwrap();
    assert_eq!(totals.rounds_committed, run.rounds_committed);
    assert_eq!(
        store.committed_rounds(RUN).unwrap().len() as u64,
        run.rounds_committed
    );
    if run.rounds_committed == 0 {
        assert!(
            totals.cumulative_epsilon.iter().all(|e| e.epsilon == 0.0),
            "nothing committed, nothing spent: {:?}",
            totals.cumulative_epsilon
        );
        return 0;
    }
    let want = fedpref_privacy::epsilon_after_with(
        fedpref_privacy::Accountant::Pld,
        &run.manifest.round_release().unwrap(),
        run.rounds_committed,
        1e-6,
        &fedpref_privacy::OrderGrid::default(),
    )
    .unwrap();
    assert!(
        (totals.cumulative_epsilon[0].epsilon - want.epsilon).abs() <= 1e-9 * want.epsilon,
        "spent {} for {} committed rounds, want {}",
        totals.cumulative_epsilon[0].epsilon,
        run.rounds_committed,
        want.epsilon
    );
    run.rounds_committed
}

fn abandoned_at_takeover(url: &str, from: &str) -> usize {
    sync(|| abandoned_now(url, from))
}

fn abandoned_now(url: &str, from: &str) -> usize {
    Store::open_location(url)
        .unwrap()
        .ledger(RUN)
        .unwrap()
        .iter()
        .filter(|e| e.body.contains("round_abandoned") && e.body.contains(from))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_owner_mid_round_fails_over_without_double_spend() {
    let root = tempfile::tempdir().unwrap();
    let Some((url, mut a, b, ca, mut devices)) = setup(root.path()).await else {
        return;
    };
    // One full round at a.
    for (client, token) in &mut devices {
        check_in_and_upload(client, token)
            .await
            .expect("a task at a");
    }
    until(&url, 30, "round 1 commits at a", |s| {
        s.run(RUN).unwrap().rounds_committed >= 1
    })
    .await;
    // Round 2 in flight at a: two of three uploads in; then SIGKILL.
    let mut in_flight = 0;
    for (client, token) in devices.iter_mut().take(2) {
        in_flight += check_in_and_upload(client, token).await.is_some() as u32;
    }
    assert_eq!(in_flight, 2);
    a.signal("-KILL");
    let killed = Instant::now();
    a.child.take().unwrap().wait().unwrap();
    until(&url, 30, "b takes the run over", |s| {
        owner(s) == "replica-b"
    })
    .await;
    let failover = killed.elapsed();
    println!(
        "failover: replica-b owned the run {} ms after SIGKILL of replica-a (lease {LEASE_MS} ms, renewal every 500 ms)",
        failover.as_millis()
    );
    // The lease changes hands first; the new owner then records the abandoned round.
    until(
        &url,
        30,
        "the in-flight round is abandoned in the ledger",
        |_| abandoned_now(&url, "replica-a") >= 1,
    )
    .await;
    assert_eq!(abandoned_at_takeover(&url, "replica-a"), 1);
    let committed_before = check_ledger(&url);
    // The devices carry on at b.
    let mut next = vec![];
    for (client, token) in &mut devices {
        *client = b.client(&ca).await;
        next.push(check_in_and_upload(client, token).await);
    }
    assert!(
        next.iter().all(Option::is_some),
        "every device got a task at b: {next:?}"
    );
    until(&url, 30, "a round commits at b", |s| {
        s.run(RUN).unwrap().rounds_committed > committed_before
    })
    .await;
    let committed = check_ledger(&url);
    assert_eq!(committed, committed_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_owner_resumed_after_takeover_stores_nothing() {
    let root = tempfile::tempdir().unwrap();
    let Some((url, a, b, ca, mut devices)) = setup(root.path()).await else {
        return;
    };
    // A round in flight at a: two uploads (the minimum), then a is frozen before the deadline.
    let mut in_flight = 0;
    for (client, token) in devices.iter_mut().take(2) {
        in_flight += check_in_and_upload(client, token).await.is_some() as u32;
    }
    assert_eq!(in_flight, 2);
    a.signal("-STOP");
    let frozen = Instant::now();
    until(&url, 30, "b takes the run over", |s| {
        owner(s) == "replica-b"
    })
    .await;
    println!(
        "failover: replica-b owned the run {} ms after replica-a froze (lease {LEASE_MS} ms)",
        frozen.elapsed().as_millis()
    );
    until(
        &url,
        30,
        "the in-flight round is abandoned in the ledger",
        |_| abandoned_now(&url, "replica-a") >= 1,
    )
    .await;
    let ledger_at_takeover = sync(|| Store::open_location(&url).unwrap().ledger(RUN).unwrap());
    // a wakes up with its round past the deadline and its lease gone.
    a.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = a.log();
        if log.contains("lease lost") || log.contains("held by another replica") {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "replica-a never noticed; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if log.contains("is stale") {
        println!("replica-a tried to commit its late round: refused (stale fencing token)");
    } else {
        println!("replica-a renewed first, found the lease taken and dropped its round");
    }
    // Nothing of a's round reached the store: b's ledger is unchanged but for b's own
    // entries, no round is committed, nothing is spent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ledger, committed) = sync(|| {
        let store = Store::open_location(&url).unwrap();
        (
            store.ledger(RUN).unwrap(),
            store.run(RUN).unwrap().rounds_committed,
        )
    });
    assert_eq!(&ledger[..ledger_at_takeover.len()], &ledger_at_takeover[..]);
    assert_eq!(committed, 0, "a's late round was not committed");
    assert_eq!(abandoned_at_takeover(&url, "replica-a"), 1);
    assert_eq!(check_ledger(&url), 0);
    // And the run goes on at b.
    for (client, token) in &mut devices {
        *client = b.client(&ca).await;
        check_in_and_upload(client, token)
            .await
            .expect("a task at b");
    }
    until(&url, 30, "a round commits at b", |s| {
        s.run(RUN).unwrap().rounds_committed == 1
    })
    .await;
    assert_eq!(check_ledger(&url), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_commands_sent_to_the_replica_that_does_not_own_the_run_are_applied_by_the_owner() {
    let root = tempfile::tempdir().unwrap();
    let Some((url, mut a, b, ca, _devices)) = setup(root.path()).await else {
        return;
    };
    let mut admin = b.admin(&ca).await;
    let run = admin
        .pause_run(authed(
            pb::PauseRunRequest {
                run_id: RUN.into(),
                reason: "maintenance window".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("a pause sent to the non-owner is applied by the owner")
        .into_inner();
    assert_eq!(run.status, pb::RunStatus::Paused as i32);
    let (status, owner_now) = sync(|| {
        let store = Store::open_location(&url).unwrap();
        (store.run(RUN).unwrap().status, owner(&store))
    });
    assert_eq!(status, fedpref_coordinator::store::RunStatus::Paused);
    assert_eq!(owner_now, "replica-a", "the owner did not change");
    // The owner's refusal comes back with its code and message.
    let err = admin
        .rollback_run(authed(
            pb::RollbackRunRequest {
                run_id: RUN.into(),
                model_version: 5,
                reason: "bad".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("model_version"), "{err:?}");
    let run = admin
        .resume_run(authed(
            pb::ResumeRunRequest {
                run_id: RUN.into(),
                reason: "window over".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, pb::RunStatus::Active as i32);
    sync(|| {
        let store = Store::open_location(&url).unwrap();
        let entries = store.ledger(RUN).unwrap();
        verify(RUN, &entries).unwrap();
        assert!(
            entries
                .iter()
                .any(|e| e.body.contains("maintenance window"))
        );
        assert!(entries.iter().any(|e| e.body.contains("window over")));
    });
    // A graceful stop releases the lease: the other replica takes the run at once, and as
    // nothing lapsed, no round is recorded as abandoned.
    a.signal("-TERM");
    let status = a.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{status}: {}", a.log());
    until(&url, 30, "b takes the released run", |s| {
        owner(s) == "replica-b"
    })
    .await;
    assert_eq!(abandoned_at_takeover(&url, "replica-a"), 0);
    check_ledger(&url);
}

// The device side of the protocol, as in tests/service.rs.

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
