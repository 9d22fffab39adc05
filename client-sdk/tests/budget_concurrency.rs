//! The on-device budget holds when two handles, or two processes, spend from one store.
//!
//! The two-process test runs this test binary twice more as child processes (selected by
//! the `FEDPREF_SPEND_CHILD_STORE` environment variable): each child opens the store, waits
//! until both are open, then releases updates until its budget refuses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fedpref_client_sdk::fedpref_privacy::PrivacyMode;
use fedpref_client_sdk::{
    Device, DeviceConfig, LocalTraining, MatrixFactorization, SdkError, Timestamp, TrainingTask,
};

const CHILD_STORE: &str = "FEDPREF_SPEND_CHILD_STORE";
const CHILD_GO: &str = "FEDPREF_SPEND_CHILD_GO";
const CHILD_READY: &str = "FEDPREF_SPEND_CHILD_READY";

fn now() -> Timestamp {
    Timestamp::parse_rfc3339("2026-06-01T12:00:00Z").unwrap()
}

fn task() -> TrainingTask {
    TrainingTask {
        round_id: 1,
        model_version: 1,
        training: LocalTraining::default(),
        clip_norm: 1.0,
        // ε = 10 allows a handful of these local releases.
        noise_multiplier: 4.0,
        mode: PrivacyMode::Local,
        clip_bit_noise_std: None,
    }
}

/// A store with a catalogue, some ratings and a shared model: ready to release updates.
fn ready_store(path: &Path) {
    let mut d = Device::open(path, DeviceConfig::default()).unwrap();
    let mut lines = String::new();
    for i in 0..20 {
        lines += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"t{}\"]}}\n",
            i % 4
        );
    }
    for i in 0..8 {
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{i}\",\"value\":{},\"at\":\"2026-05-30T20:0{i}:00Z\"}}\n",
            1 + i % 5
        );
    }
    d.ingest_jsonl(&lines, false, now()).unwrap();
    let items = (0..20).map(|i| format!("i{i}")).collect();
    d.install_model(MatrixFactorization::initial(1, items, 4, 0.3, 5).unwrap())
        .unwrap();
}

/// Releases until the budget refuses; returns how many releases succeeded.
fn spend_until_refused(d: &mut Device) -> u64 {
    let mut released = 0;
    loop {
        match d.prepare_upload(&task(), now()) {
            Ok(_) => released += 1,
            Err(SdkError::BudgetExceeded(_)) => return released,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
        assert!(released < 1_000);
    }
}

/// How many releases a single handle gets from a fresh store: the budget's capacity.
fn capacity(dir: &Path) -> u64 {
    let path = dir.join("alone.db");
    ready_store(&path);
    let mut d = Device::open(&path, DeviceConfig::default()).unwrap();
    spend_until_refused(&mut d)
}

fn assert_accountant_records(path: &Path, released: u64, capacity: u64) {
    let status = Device::open(path, DeviceConfig::default())
        .unwrap()
        .budget()
        .unwrap();
    assert_eq!(
        released, status.rounds,
        "{released} releases left the device, its accountant records {}",
        status.rounds
    );
    assert_eq!(status.uploads.len() as u64, released);
    assert_eq!(released, capacity, "the budget allows {capacity} releases");
    assert!(status.epsilon_spent <= status.epsilon_budget);
}

#[test]
fn two_handles_on_one_store_spend_no_more_than_the_budget_and_record_every_release() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = capacity(dir.path());
    assert!(capacity >= 2, "the test needs a budget of several releases");
    let path = dir.path().join("device.db");
    ready_store(&path);
    // Both handles load the accountant before either spends.
    let mut first = Device::open(&path, DeviceConfig::default()).unwrap();
    let mut second = Device::open(&path, DeviceConfig::default()).unwrap();
    let mut released = 0;
    let mut refused = [false, false];
    while !(refused[0] && refused[1]) {
        for (i, d) in [&mut first, &mut second].into_iter().enumerate() {
            if refused[i] {
                continue;
            }
            match d.prepare_upload(&task(), now()) {
                Ok(_) => released += 1,
                Err(SdkError::BudgetExceeded(_)) => refused[i] = true,
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        assert!(released < 1_000);
    }
    assert_accountant_records(&path, released, capacity);
    // Each handle's view agrees with the store.
    assert_eq!(first.budget().unwrap().rounds, capacity);
    assert_eq!(second.budget().unwrap().rounds, capacity);
}

#[test]
fn two_processes_on_one_store_spend_no_more_than_the_budget_and_record_every_release() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = capacity(dir.path());
    let path = dir.path().join("device.db");
    ready_store(&path);
    let go = dir.path().join("go");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|i| {
            let ready = dir.path().join(format!("ready-{i}"));
            let child = Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_releases_until_refused",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_STORE, &path)
                .env(CHILD_GO, &go)
                .env(CHILD_READY, &ready)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (child, ready)
        })
        .collect();
    // Let both open the store (and load the accountant) before either spends.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !children.iter().all(|(_, ready)| ready.exists()) {
        assert!(Instant::now() < deadline, "the children did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&go, b"").unwrap();
    let mut released = 0;
    for (child, _) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed");
        let stdout = String::from_utf8(out.stdout).unwrap();
        // The harness may print the test's name on the same line: look for the marker.
        let count = stdout
            .split("released=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no count in the child's output: {stdout}"));
        released += count;
    }
    assert_accountant_records(&path, released, capacity);
}

/// The child side of the two-process test; does nothing unless the parent set
/// `FEDPREF_SPEND_CHILD_STORE`.
#[test]
fn child_process_releases_until_refused() {
    let Some(store) = std::env::var_os(CHILD_STORE).map(PathBuf::from) else {
        return;
    };
    let go = PathBuf::from(std::env::var_os(CHILD_GO).unwrap());
    let ready = PathBuf::from(std::env::var_os(CHILD_READY).unwrap());
    let mut d = Device::open(&store, DeviceConfig::default()).unwrap();
    d.budget().unwrap();
    std::fs::write(&ready, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !go.exists() {
        assert!(Instant::now() < deadline, "no go from the parent");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("released={};", spend_until_refused(&mut d));
}
