//! Replicas: two coordinators in-process on one PostgreSQL database (see the coordinator's
//! `tests/common/pg.rs`: the server `FEDPREF_TEST_POSTGRES_URL` names, or a throwaway cluster
//! from Debian's binaries; without either the test skips, saying why, unless
//! `FEDPREF_REQUIRE_POSTGRES=1`). Devices pointed at the replica that does not own the run are
//! redirected to the owner and take part there.

#[path = "../../coordinator/tests/common/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use fedpref_client_sdk::participation::ParticipationEvent;
use fedpref_client_sdk::{
    CoordinatorClient, Device, DeviceConfig, ParticipateOptions, ParticipationConfig, Timestamp,
    participate,
};
use fedpref_coordinator::config::{Config, self_signed_localhost};
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_coordinator::store::Store;

const APP_KEY: &str = "redirect-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "redirect-admin-token-0123456789ab";
const RUN: &str = "redirected";

const MANIFEST: &str = r#"
title = "Redirect test"
purpose = "Devices reach the replica that owns the run"
owner = "tests@example.com"
privacy_mode = "local"
rounds = 1
clip_norm = 1.0
noise_multiplier = 4.0
[budget]
epsilon = 100.0
delta = 1e-5
[sampling]
kind = "cohort"
target_size = 2
minimum_size = 2
round_seconds = 3
[server_optimizer]
kind = "fedavg"
[model]
items = 6
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

/// The synchronous PostgreSQL client runs a small runtime of its own: on a thread of its own.
fn sync<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// A replica in-process: its own directory, certificate and ports, the shared database.
async fn replica(
    dir: &std::path::Path,
    id: &str,
    url: &str,
    cert: &fedpref_coordinator::config::SelfSigned,
) -> (Running, String) {
    let dir = dir.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("cert.pem", &cert.certificate_pem);
    write("key.pem", &cert.private_key_pem);
    write("app.key", APP_KEY);
    write("admin.token", ADMIN_TOKEN);
    let (device, admin) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{device}");
    let text = format!(
        "[listen]\ndevice = \"127.0.0.1:{device}\"\nadmin = \"127.0.0.1:{admin}\"\n\
         [store]\nurl = \"{url}\"\n\
         [replica]\nid = \"{id}\"\nadvertise = \"{endpoint}\"\nlease_millis = 2000\nrenew_millis = 500\n\
         [tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
         [auth]\napp_key_file = \"app.key\"\nadmin_token_file = \"admin.token\"\n\
         [limits]\ntick_millis = 20\ndevice_requests_per_second = 1000.0\ndevice_burst = 1000\n"
    );
    let config = Config::from_toml(&text, "coordinator.toml", &dir).unwrap();
    let running = start(&config, &ServeOptions::default()).await.unwrap();
    (running, endpoint)
}

/// A device whose catalogue is the run's items and who rated a few of them.
fn device(dir: &std::path::Path, name: &str, seed: usize) -> Device {
    let mut d = Device::open(dir.join(format!("{name}.db")), DeviceConfig::default()).unwrap();
    let mut lines = String::new();
    for i in 0..6 {
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"Jazz\"]}}\n");
    }
    for j in 0..3 {
        let item = (seed + 2 * j) % 6;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{},\"at\":\"2026-05-30T20:00:00Z\"}}\n",
            1 + (seed + j) % 5
        );
    }
    d.ingest_jsonl(&lines, false, Timestamp::now()).unwrap();
    d
}

#[test]
fn devices_at_the_replica_that_does_not_own_the_run_follow_the_redirect_and_take_part() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    sync(|| {
        let manifest =
            fedpref_coordinator::manifest::RunManifest::from_toml(MANIFEST, "redirect.toml")
                .unwrap();
        let mut store = Store::open_location(&url).unwrap();
        fedpref_coordinator::coordinator::create_run(&mut store, RUN, &manifest, 1).unwrap();
    });
    let owner = |url: &str| {
        sync(|| {
            Store::open_location(url)
                .unwrap()
                .lease(RUN)
                .unwrap()
                .map(|l| l.owner)
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cert = self_signed_localhost().unwrap();
        // a starts first and takes the run's lease; b owns nothing.
        let (a, a_endpoint) = replica(dir.path(), "replica-a", &url, &cert).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while owner(&url).as_deref() != Some("replica-a") {
            assert!(Instant::now() < deadline, "replica-a never took the lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (b, b_endpoint) = replica(dir.path(), "replica-b", &url, &cert).await;

        let mut handles = vec![];
        for n in 0..2 {
            let mut d = device(dir.path(), &format!("device{n}"), n);
            let mut client = CoordinatorClient::connect(
                &b_endpoint,
                cert.certificate_pem.as_bytes(),
                ParticipationConfig::default(),
            )
            .await
            .unwrap();
            handles.push(tokio::spawn(async move {
                let options = ParticipateOptions {
                    rounds: 1,
                    give_up_after: Some(Duration::from_secs(30)),
                    ..ParticipateOptions::default()
                };
                let report = participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
                    .await
                    .unwrap();
                (report, client.endpoint().to_string())
            }));
        }
        for h in handles {
            let (report, endpoint) = h.await.unwrap();
            assert!(
                report.events.iter().any(|e| matches!(
                    e,
                    ParticipationEvent::Redirected { endpoint } if *endpoint == a_endpoint
                )),
                "the device is sent from b to a: {:#?}",
                report.events
            );
            assert_eq!(report.uploads, 1, "{:#?}", report.events);
            assert_eq!(endpoint, a_endpoint, "the client now talks to the owner");
        }
        // The owner commits the round the redirected devices completed.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let committed =
                sync(|| Store::open_location(&url).unwrap().run(RUN).unwrap()).rounds_committed;
            if committed == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the round was not committed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    });
}
