//! `fedpref-coordinator admin …` against a real server over TLS, set up as a newcomer would:
//! `init` writes the config, certificate, tokens and manifest; the server runs in-process on
//! 127.0.0.1; the binary talks to it.

use std::path::Path;
use std::process::{Command, Output};

use fedpref_coordinator::config::Config;
use fedpref_coordinator::server::{ServeOptions, start};

fn admin(dir: &Path, port: u16, token_file: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
        .args(["admin", "runs"])
        .args(args)
        .args(["--endpoint", &format!("https://127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(token_file)
        .arg("--ca-cert")
        .arg(dir.join("tls").join("cert.pem"))
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_creates_inspects_pauses_and_resumes_a_run_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    fedpref_coordinator::config::init(&d).unwrap();
    let config = Config::from_file(&d.join("coordinator.toml")).unwrap();
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
    let port = running.admin_addr.port();
    let token = d.join("admin.token");

    let d2 = d.clone();
    let token2 = token.clone();
    let text = tokio::task::spawn_blocking(move || {
        let created = ok(admin(
            &d2,
            port,
            &token2,
            &[
                "create",
                "--manifest",
                d2.join("manifest.toml").to_str().unwrap(),
                "--request-id",
                "first",
            ],
        ));
        let run_id = created.split('\t').next().unwrap().trim().to_string();
        assert!(created.contains("active"), "{created}");
        let listed = ok(admin(&d2, port, &token2, &["list"]));
        assert!(listed.contains(&run_id), "{listed}");
        let got = ok(admin(&d2, port, &token2, &["get", "--run", &run_id]));
        assert!(got.contains("nothing spent"), "{got}");
        let paused = ok(admin(
            &d2,
            port,
            &token2,
            &["pause", "--run", &run_id, "--reason", "incident review"],
        ));
        assert!(paused.contains("paused"), "{paused}");
        let resumed = ok(admin(
            &d2,
            port,
            &token2,
            &["resume", "--run", &run_id, "--reason", "review done"],
        ));
        assert!(resumed.contains("active"), "{resumed}");
        let report = ok(admin(
            &d2,
            port,
            &token2,
            &["report", "--run", &run_id, "--format", "md"],
        ));
        assert!(
            report.contains("chain intact") && report.contains("resumed: review done"),
            "{report}"
        );
        let stopped = ok(admin(
            &d2,
            port,
            &token2,
            &["stop", "--run", &run_id, "--reason", "purpose withdrawn"],
        ));
        assert!(stopped.contains("stopped"), "{stopped}");
        let ledger = ok(admin(&d2, port, &token2, &["ledger", "--run", &run_id]));
        for needle in [
            "run_created",
            "paused\tround 0",
            "incident review (operator)",
            "review done (operator)",
            "purpose withdrawn (operator)",
            "head: entry",
        ] {
            assert!(ledger.contains(needle), "{needle} missing from\n{ledger}");
        }

        // A wrong token is refused, and the error says so.
        let bad = d2.join("bad.token");
        std::fs::write(&bad, "not-the-token").unwrap();
        let out = admin(&d2, port, &bad, &["list"]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("Unauthenticated") || err.contains("PermissionDenied"),
            "{err}"
        );

        // A missing CA for https is a usage error naming the flag.
        let out = Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
            .args([
                "admin",
                "runs",
                "list",
                "--endpoint",
                &format!("https://127.0.0.1:{port}"),
                "--token-file",
            ])
            .arg(&token2)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .await
    .unwrap();
    assert!(text.contains("--ca-cert"), "{text}");
    running.shutdown().await.unwrap();
}

/// `admin runs …` with the given authentication flags (no `--token-file` unless given).
fn admin_with(port: u16, ca: &Path, auth: &[&std::ffi::OsStr], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
        .args(["admin", "runs"])
        .args(args)
        .args(["--endpoint", &format!("https://127.0.0.1:{port}")])
        .arg("--ca-cert")
        .arg(ca)
        .args(auth)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_client_certificate_from_the_configured_ca_replaces_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    fedpref_coordinator::config::init(&d).unwrap();
    // A second CA and a client certificate it signed: not the coordinator's admin CA.
    let stranger = fedpref_coordinator::config::admin_client_certificates().unwrap();
    std::fs::write(d.join("stranger.pem"), &stranger.client_certificate_pem).unwrap();
    std::fs::write(d.join("stranger.key"), &stranger.client_private_key_pem).unwrap();
    let config = Config::from_file(&d.join("coordinator.toml")).unwrap();
    assert_eq!(
        config.auth.admin_client_ca.as_deref(),
        Some(d.join("tls").join("admin-ca.pem").as_path())
    );
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
    let port = running.admin_addr.port();
    let device_port = running.device_addr.port();

    tokio::task::spawn_blocking(move || {
        let ca = d.join("tls").join("cert.pem");
        let tls = d.join("tls");
        let cert_flags = |cert: &Path, key: &Path| -> Vec<std::ffi::OsString> {
            vec![
                "--client-cert".into(),
                cert.into(),
                "--client-key".into(),
                key.into(),
            ]
        };
        let ours = cert_flags(&tls.join("admin-client.pem"), &tls.join("admin-client.key"));
        let ours: Vec<&std::ffi::OsStr> = ours.iter().map(|s| s.as_os_str()).collect();
        // The certificate init wrote: accepted with no token at all.
        let created = ok(admin_with(
            port,
            &ca,
            &ours,
            &[
                "create",
                "--manifest",
                d.join("manifest.toml").to_str().unwrap(),
            ],
        ));
        assert!(created.contains("active"), "{created}");
        let listed = ok(admin_with(port, &ca, &ours, &["list"]));
        assert!(listed.contains("active"), "{listed}");

        // A certificate from another CA fails the TLS handshake.
        let theirs = cert_flags(&d.join("stranger.pem"), &d.join("stranger.key"));
        let theirs: Vec<&std::ffi::OsStr> = theirs.iter().map(|s| s.as_os_str()).collect();
        let out = admin_with(port, &ca, &theirs, &["list"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("auth.admin_client_ca"), "{err}");

        // Neither a token nor a certificate: a usage error naming the flag.
        let out = admin_with(port, &ca, &[], &["list"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--token-file"), "{err}");

        // A certificate without its key is a usage error too.
        let half: Vec<std::ffi::OsString> =
            vec!["--client-cert".into(), tls.join("admin-client.pem").into()];
        let half: Vec<&std::ffi::OsStr> = half.iter().map(|s| s.as_os_str()).collect();
        let out = admin_with(port, &ca, &half, &["list"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--client-key"));

        // The device port never asks for a client certificate: the admin certificate means
        // nothing there (and the admin service is not served on it).
        let out = admin_with(device_port, &ca, &ours, &["list"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Unimplemented"), "{err}");
    })
    .await
    .unwrap();
    running.shutdown().await.unwrap();
}
