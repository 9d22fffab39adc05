//! Soak: N real SDK devices take part in rounds against a `fedpref-coordinator serve` process
//! on 127.0.0.1 for a bounded time, and the coordinator's resident memory, open file
//! descriptors and threads are sampled after every committed round.
//!
//! ```sh
//! cargo build --release -p fedpref-coordinator --bin fedpref-coordinator
//! cargo run --release -p fedpref-client-sdk --example soak -- --devices 1000 --minutes 30
//! ```
//!
//! Each device is a [`Device`] with its own SQLite store (a catalogue of `--items` items and 20
//! ratings drawn from the device's number; in /dev/shm when the machine has it, standing for
//! each phone's own storage) and its own TLS connection, driven by
//! [`participate`] one task at a time (check in, download, train, clip, noise, record, upload,
//! report evaluation when due), exactly as an app runs it. The run is local DP, σ = 1, C = 1,
//! cohorts of `--cohort` devices, rounds of at most `--round-seconds`. Every device connects
//! from 127.0.0.1, so the coordinator's per-address and per-device request limits are lifted
//! (they are tested on their own); everything else is the default configuration.
//!
//! Prints, per window of `--window-minutes`: p50/p99 latency of `CheckIn` and `UploadUpdate`
//! as the devices measured them ([`CoordinatorClient::take_call_times`]), calls, uploads,
//! rounds; then the coordinator's memory, descriptors and threads after warm-up, with the
//! least-squares slope per committed round; then every error. Exits 1 when a device met an
//! error other than the expected ones (an upload that arrived after its round closed, a
//! check-in told to come back later), when the coordinator logged an `ERROR`, when its open
//! descriptors grew by more than `--max-fd-growth` after warm-up, when no round committed, or
//! when `ledger verify` fails afterwards. `--json FILE` writes every figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpref_client_sdk::{
    CoordinatorClient, Device, DeviceConfig, ParticipateOptions, ParticipationConfig,
    ParticipationEvent, Timestamp, participate,
};

const RUN_ID: &str = "soak";
const APP_KEY: &str = "soak-app-key-0123456789abcdef0123";
const ADMIN_TOKEN: &str = "soak-admin-token-0123456789abcdef";
const RATINGS_PER_DEVICE: usize = 20;

struct Args {
    devices: usize,
    minutes: f64,
    window_minutes: f64,
    warmup_minutes: f64,
    items: usize,
    cohort: usize,
    round_seconds: u64,
    coordinator: PathBuf,
    json: Option<PathBuf>,
    max_fd_growth: i64,
    client_threads: usize,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "soak: {problem}\nusage: soak [--devices N] [--minutes M] [--window-minutes W] [--warmup-minutes W] [--items N] [--cohort N] [--round-seconds S] [--coordinator PATH] [--json FILE] [--max-fd-growth N] [--client-threads N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/examples/soak → target/<profile>/fedpref-coordinator
    let sibling = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fedpref-coordinator"))
        .unwrap_or_default();
    let mut a = Args {
        devices: 1000,
        minutes: 30.0,
        window_minutes: 5.0,
        warmup_minutes: 2.0,
        items: 200,
        cohort: 100,
        round_seconds: 10,
        coordinator: sibling,
        json: None,
        max_fd_growth: 32,
        client_threads: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> T {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {v:?} is not a number")))
        }
        match flag.as_str() {
            "--devices" => a.devices = num(&flag, value()),
            "--minutes" => a.minutes = num(&flag, value()),
            "--window-minutes" => a.window_minutes = num(&flag, value()),
            "--warmup-minutes" => a.warmup_minutes = num(&flag, value()),
            "--items" => a.items = num(&flag, value()),
            "--cohort" => a.cohort = num(&flag, value()),
            "--round-seconds" => a.round_seconds = num(&flag, value()),
            "--coordinator" => a.coordinator = PathBuf::from(value()),
            "--json" => a.json = Some(PathBuf::from(value())),
            "--max-fd-growth" => a.max_fd_growth = num(&flag, value()),
            "--client-threads" => a.client_threads = num(&flag, value()),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.devices == 0 || a.cohort == 0 || a.client_threads == 0 || a.items < RATINGS_PER_DEVICE {
        usage("--devices, --cohort and --client-threads must be positive and --items at least 20");
    }
    if !(a.minutes > 0.0 && a.window_minutes > 0.0 && a.warmup_minutes >= 0.0)
        || a.warmup_minutes >= a.minutes
    {
        usage("--minutes and --window-minutes must be positive, --warmup-minutes below --minutes");
    }
    if !a.coordinator.is_file() {
        usage(&format!(
            "no coordinator binary at {} (build it, or pass --coordinator)",
            a.coordinator.display()
        ));
    }
    a
}

/// What the devices saw, in the order they saw it.
#[derive(Default)]
struct Seen {
    /// (seconds since the start, call, milliseconds, ok)
    calls: Vec<(f64, &'static str, f64, bool)>,
    uploads: Vec<f64>,
    /// Expected: an upload that reached the coordinator after its round closed.
    refused: Vec<(f64, String)>,
    declined: Vec<(f64, String)>,
    /// Anything else.
    errors: Vec<(f64, String)>,
}

/// The coordinator process after a committed round.
#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    round: u64,
    rss_kib: f64,
    fds: i64,
    threads: i64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("an address")
        .port()
}

/// Writes the coordinator's files and creates the run; returns the configuration's path,
/// the CA certificate and the device address.
fn setup(dir: &Path, a: &Args) -> (PathBuf, String, String) {
    let cert = fedpref_coordinator::config::self_signed_localhost().expect("a certificate");
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"))
    };
    write("cert.pem", &cert.certificate_pem);
    write("key.pem", &cert.private_key_pem);
    write("app.key", APP_KEY);
    write("admin.token", ADMIN_TOKEN);
    let (device_port, admin_port) = (free_port(), free_port());
    let config = dir.join("coordinator.toml");
    write(
        "coordinator.toml",
        &format!(
            "[listen]\ndevice = \"127.0.0.1:{device_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\
             [store]\npath = \"coordinator.db\"\n[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
             [auth]\napp_key_file = \"app.key\"\nadmin_token_file = \"admin.token\"\n\
             [limits]\nmax_enrolments_per_window = {}\nmax_concurrent_requests = {}\n\
             device_requests_per_second = 1000000.0\ndevice_burst = 1000000\n",
            2 * a.devices + 100,
            4 * a.devices + 100,
        ),
    );
    let manifest = format!(
        r#"title = "Soak"
purpose = "Hold many devices taking part for a long time"
owner = "soak@example.com"
privacy_mode = "local"
rounds = 1000000
clip_norm = 1.0
noise_multiplier = 1.0
[budget]
epsilon = 1e12
delta = 1e-6
[sampling]
kind = "cohort"
target_size = {cohort}
minimum_size = {minimum}
round_seconds = {round_seconds}
[server_optimizer]
kind = "fedavg"
[model]
items = {items}
factors = 8
[opt_out_policy]
consent_model = "opt-in"
"#,
        cohort = a.cohort,
        minimum = (a.cohort / 2).max(1),
        round_seconds = a.round_seconds,
        items = a.items,
    );
    let m = fedpref_coordinator::manifest::RunManifest::from_toml(&manifest, "soak.toml")
        .expect("the soak manifest");
    let mut store = fedpref_coordinator::store::Store::open(&dir.join("coordinator.db"))
        .expect("the coordinator's store");
    fedpref_coordinator::coordinator::create_run(&mut store, RUN_ID, &m, Timestamp::now().millis())
        .expect("creating the run");
    (
        config,
        cert.certificate_pem,
        format!("127.0.0.1:{device_port}"),
    )
}

fn device(dir: &Path, n: usize, items: usize) -> Device {
    let config = DeviceConfig {
        budget_epsilon: 1e12,
        ..DeviceConfig::default()
    };
    let mut d = Device::open(dir.join(format!("d{n}.db")), config).expect("a device store");
    let mut lines = String::new();
    for i in 0..items {
        lines += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"t{}\"]}}\n",
            i % 7
        );
    }
    let now = Timestamp::now();
    // 20 distinct items and values from the device's number (a small LCG: no RNG needed).
    let mut x = (n as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1);
    let mut rated = std::collections::BTreeSet::new();
    while rated.len() < RATINGS_PER_DEVICE {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        rated.insert((x >> 33) as usize % items);
    }
    for (k, item) in rated.into_iter().enumerate() {
        let at = now.plus_millis(-1000 * (RATINGS_PER_DEVICE - k) as i64);
        let value = 1 + (item + n) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"{}\"}}\n",
            at.to_rfc3339()
        );
    }
    d.ingest_jsonl(&lines, false, now)
        .expect("the device's data");
    d
}

fn proc_field(pid: u32, name: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn sample(pid: u32, at: f64, round: u64) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(-1, |d| d.count() as i64);
    Sample {
        at,
        round,
        rss_kib: proc_field(pid, "VmRSS:"),
        fds,
        threads: proc_field(pid, "Threads:") as i64,
    }
}

/// Least-squares slope of `y` against `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    num / den
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let a = parse_args();
    // The devices' stores are SQLite, written synchronously inside their async tasks (as in
    // an app, where each device is alone): enough worker threads that one device's fsync
    // does not hold up another's answer, so the latencies are the coordinator's and the
    // network's, not the harness's queue.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads)
        .enable_all()
        .build()
        .expect("the devices' runtime")
        .block_on(soak(a));
}

async fn soak(a: Args) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // The devices' stores stand for a thousand phones' own storage: in memory (/dev/shm)
    // where there is one, so that their fsyncs do not queue with the coordinator's on the
    // one disk the coordinator's store is on.
    let devices_root = match Path::new("/dev/shm") {
        shm if shm.is_dir() => tempfile::tempdir_in(shm),
        _ => tempfile::tempdir(),
    }
    .expect("a directory for the devices' stores");
    let devices_dir = devices_root.path().to_path_buf();
    let (config, ca, device_addr) = setup(dir.path(), &a);
    let log_path = dir.path().join("coordinator.log");
    let mut server = Command::new(&a.coordinator)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("the coordinator's log"))
        .spawn()
        .expect("starting the coordinator");
    let pid = server.id();
    let url = format!("https://{device_addr}");
    eprintln!(
        "soak: {} devices, {} min, coordinator pid {pid} on {url}, cohorts of {}, rounds ≤ {} s",
        a.devices, a.minutes, a.cohort, a.round_seconds
    );

    // The devices' stores, on every core, before the clock starts.
    let prepared = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut devices: Vec<(usize, Device)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (dir, items) = (&devices_dir, a.items);
                let count = a.devices;
                scope.spawn(move || {
                    (t..count)
                        .step_by(threads)
                        .map(|n| (n, device(dir, n, items)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a device store"))
            .collect()
    });
    devices.sort_by_key(|d| d.0);
    eprintln!(
        "soak: {} device stores made in {:.1} s",
        a.devices,
        prepared.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(a.minutes * 60.0);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::with_capacity(a.devices);
    for (n, mut d) in devices {
        let (url, ca, seen) = (url.clone(), ca.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = match CoordinatorClient::connect(
                &url,
                ca.as_bytes(),
                ParticipationConfig::default(),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    let at = started.elapsed().as_secs_f64();
                    seen.lock()
                        .unwrap()
                        .errors
                        .push((at, format!("d{n}: connect: {e}")));
                    return;
                }
            };
            while Instant::now() < end {
                let options = ParticipateOptions {
                    rounds: 1,
                    device_conditions_met: true,
                    give_up_after: Some(end.saturating_duration_since(Instant::now())),
                };
                let left = end.saturating_duration_since(Instant::now());
                let outcome = tokio::time::timeout(
                    left,
                    participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {}),
                )
                .await;
                let at = started.elapsed().as_secs_f64();
                let failed = {
                    let mut s = seen.lock().unwrap();
                    for t in client.take_call_times() {
                        s.calls.push((at, t.call, t.took.as_secs_f64() * 1e3, t.ok));
                    }
                    match outcome {
                        Err(_) => break,
                        Ok(Err(e)) => {
                            s.errors.push((at, format!("d{n}: {e}")));
                            true
                        }
                        Ok(Ok(report)) => {
                            for e in report.events {
                                match e {
                                    ParticipationEvent::Uploaded { .. } => s.uploads.push(at),
                                    ParticipationEvent::UploadRefused { message, .. } => {
                                        s.refused.push((at, message))
                                    }
                                    ParticipationEvent::Declined { reason, why, .. } => {
                                        s.declined.push((at, format!("{reason}: {why}")))
                                    }
                                    _ => {}
                                }
                            }
                            false
                        }
                    }
                };
                if failed {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }));
    }

    // The coordinator after every committed round, read from its store.
    let store = fedpref_coordinator::store::Store::open(&dir.path().join("coordinator.db"))
        .expect("the store");
    let mut samples: Vec<Sample> = vec![];
    let mut last_version = 0;
    let mut abandoned = 0u64;
    let mut ledger_seen = 0;
    let mut abandoned_at = vec![];
    let mut committed_at = vec![];
    let mut last_progress = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(Some(_)) = server.try_wait() {
            break;
        }
        let Ok(run) = store.run(RUN_ID) else { continue };
        if run.current_version != last_version {
            last_version = run.current_version;
            samples.push(sample(pid, started.elapsed().as_secs_f64(), last_version));
        }
        if let Ok(ledger) = store.ledger(RUN_ID) {
            let at = started.elapsed().as_secs_f64();
            for e in &ledger[ledger_seen..] {
                if e.body.contains("\"round_abandoned\"") {
                    abandoned += 1;
                    abandoned_at.push(at);
                } else if e.body.contains("\"round_committed\"") {
                    committed_at.push(at);
                }
            }
            ledger_seen = ledger.len();
        }
        if last_progress.elapsed() >= Duration::from_secs(60) {
            last_progress = Instant::now();
            if let Some(s) = samples.last() {
                eprintln!(
                    "soak: {:5.0} s, model version {}, {abandoned} rounds abandoned, RSS {:.1} MiB, {} fds, {} threads",
                    started.elapsed().as_secs_f64(),
                    s.round,
                    s.rss_kib / 1024.0,
                    s.fds,
                    s.threads
                );
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let crashed = server.try_wait().ok().flatten();
    terminate(&mut server);
    let verify = Command::new(&a.coordinator)
        .args(["ledger", "verify", "--run", RUN_ID, "--db"])
        .arg(dir.path().join("coordinator.db"))
        .output()
        .expect("running ledger verify");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut log_levels: BTreeMap<&str, usize> = BTreeMap::new();
    let mut log_problems: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        for level in ["ERROR", "WARN"] {
            if line.contains(&format!(" {level} ")) {
                *log_levels.entry(level).or_default() += 1;
                // The message without the timestamp, to group repeats.
                let message = line.split_once(&format!(" {level} ")).map_or(line, |x| x.1);
                *log_problems
                    .entry(format!("{level} {message}"))
                    .or_default() += 1;
            }
        }
    }

    // Report.
    let seen = seen.lock().unwrap();
    let window = a.window_minutes * 60.0;
    let windows = (a.minutes * 60.0 / window).ceil() as usize;
    let mut rows = vec![];
    println!(
        "| minutes | check-ins | CheckIn p50 / p99 ms | uploads | UploadUpdate p50 / p99 ms | rounds committed / abandoned | uploads refused (late) | calls refused or failed | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in 0..windows {
        let (from, to) = (w as f64 * window, (w + 1) as f64 * window);
        let inside = |t: f64| t >= from && t < to;
        let lat = |call: &str| {
            let mut v: Vec<f64> = seen
                .calls
                .iter()
                .filter(|c| inside(c.0) && c.1 == call && c.3)
                .map(|c| c.2)
                .collect();
            v.sort_by(f64::total_cmp);
            (v.len(), percentile(&v, 0.5), percentile(&v, 0.99))
        };
        let (checkins, c50, c99) = lat("CheckIn");
        let (_, u50, u99) = lat("UploadUpdate");
        let uploads = seen.uploads.iter().filter(|t| inside(**t)).count();
        let committed = committed_at.iter().filter(|t| inside(**t)).count();
        let gave_up = abandoned_at.iter().filter(|t| inside(**t)).count();
        let refused = seen.refused.iter().filter(|r| inside(r.0)).count();
        let errors = seen.errors.iter().filter(|r| inside(r.0)).count();
        let retried = seen.calls.iter().filter(|c| inside(c.0) && !c.3).count();
        println!(
            "| {:.1}–{:.1} | {checkins} | {c50:.1} / {c99:.1} | {uploads} | {u50:.1} / {u99:.1} | {committed} / {gave_up} | {refused} | {retried} | {errors} |",
            from / 60.0,
            to.min(a.minutes * 60.0) / 60.0
        );
        rows.push(serde_json::json!({
            "from_minute": from / 60.0, "to_minute": to.min(a.minutes * 60.0) / 60.0,
            "check_ins": checkins, "check_in_p50_ms": c50, "check_in_p99_ms": c99,
            "uploads": uploads, "upload_p50_ms": u50, "upload_p99_ms": u99,
            "rounds_committed": committed, "rounds_abandoned": gave_up,
            "uploads_refused": refused, "calls_refused_or_failed": retried, "errors": errors,
        }));
    }
    let warm: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.at >= a.warmup_minutes * 60.0)
        .collect();
    let per_round = |f: fn(&Sample) -> f64| {
        slope(
            &warm
                .iter()
                .map(|s| (s.round as f64, f(s)))
                .collect::<Vec<_>>(),
        )
    };
    let rss_slope = per_round(|s| s.rss_kib);
    // Caches and the allocator's arenas fill for a while: the second half shows whether the
    // growth goes on.
    let second_half = &warm[warm.len() / 2..];
    let rss_slope_late = slope(
        &second_half
            .iter()
            .map(|s| (s.round as f64, s.rss_kib))
            .collect::<Vec<_>>(),
    );
    let fd_slope = per_round(|s| s.fds as f64);
    let thread_slope = per_round(|s| s.threads as f64);
    let (first, last) = (warm.first().copied(), warm.last().copied());
    let peak = proc_peak(&samples);
    println!();
    match (first, last) {
        (Some(f), Some(l)) => println!(
            "After {} min of warm-up, rounds {}–{} ({} committed): RSS {:.1} → {:.1} MiB (highest {:.1}), slope {:+.2} KiB per round ({:+.2} over the second half); open descriptors {} → {}, slope {:+.4} per round; threads {} → {}, slope {:+.4} per round.",
            a.warmup_minutes,
            f.round,
            l.round,
            warm.len(),
            f.rss_kib / 1024.0,
            l.rss_kib / 1024.0,
            peak / 1024.0,
            rss_slope,
            rss_slope_late,
            f.fds,
            l.fds,
            fd_slope,
            f.threads,
            l.threads,
            thread_slope
        ),
        _ => println!("No round committed after the warm-up."),
    }
    let unexpected_calls = seen.calls.iter().filter(|c| !c.3).count();
    // A device that could not finish before the upload deadline gives the task back: expected
    // when two cores carry the coordinator and a thousand devices.
    let unexpected_declines = seen
        .declined
        .iter()
        .filter(|d| !d.1.starts_with("DECLINE_REASON_DEADLINE_UNREACHABLE"))
        .count();
    println!(
        "Devices: {} uploads, {} refused as late (expected), {} declined, {} calls refused or failed, {} errors. Coordinator log: {} ERROR, {} WARN lines.{}",
        seen.uploads.len(),
        seen.refused.len(),
        seen.declined.len(),
        unexpected_calls,
        seen.errors.len(),
        log_levels.get("ERROR").copied().unwrap_or(0),
        log_levels.get("WARN").copied().unwrap_or(0),
        if crashed.is_some() {
            " The coordinator exited during the soak."
        } else {
            ""
        }
    );
    for (message, count) in log_problems.iter().take(20) {
        println!("  coordinator log, {count}×: {message}");
    }
    let mut grouped: BTreeMap<String, usize> = BTreeMap::new();
    for (_, e) in seen.errors.iter().chain(&seen.declined) {
        // Group by message without the device's number.
        let key: String = e
            .split_once(": ")
            .map_or(e.as_str(), |x| x.1)
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        *grouped.entry(key).or_default() += 1;
    }
    for (message, count) in grouped.iter().take(20) {
        println!("  devices, {count}×: {message}");
    }
    let verified = verify.status.success();
    println!(
        "ledger verify: {}",
        if verified {
            "passed".to_string()
        } else {
            format!(
                "FAILED: {}{}",
                String::from_utf8_lossy(&verify.stdout),
                String::from_utf8_lossy(&verify.stderr)
            )
        }
    );
    let fd_growth = match (first, last) {
        (Some(f), Some(l)) => l.fds - f.fds,
        _ => 0,
    };
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "devices": a.devices, "minutes": a.minutes, "cohort": a.cohort,
            "round_seconds": a.round_seconds, "items": a.items,
            "warmup_minutes": a.warmup_minutes,
            "windows": rows,
            "rounds_committed": committed_at.len(), "rounds_abandoned": abandoned,
            "rss_kib_slope_per_round": rss_slope, "rss_kib_slope_per_round_second_half": rss_slope_late,
            "fds_slope_per_round": fd_slope, "client_threads": a.client_threads,
            "threads_slope_per_round": thread_slope,
            "rss_kib_after_warmup": first.map(|s| s.rss_kib), "rss_kib_at_end": last.map(|s| s.rss_kib),
            "rss_kib_highest": peak,
            "fds_after_warmup": first.map(|s| s.fds), "fds_at_end": last.map(|s| s.fds),
            "samples": samples.iter().map(|s| serde_json::json!([s.at, s.round, s.rss_kib, s.fds, s.threads])).collect::<Vec<_>>(),
            "uploads": seen.uploads.len(), "uploads_refused": seen.refused.len(),
            "declined": seen.declined.len(), "failed_call_attempts": unexpected_calls,
            "errors": seen.errors.iter().map(|e| &e.1).collect::<Vec<_>>(),
            "coordinator_log_problems": log_problems,
            "ledger_verified": verified,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    let failures: Vec<String> = [
        (!seen.errors.is_empty()).then(|| format!("{} device errors", seen.errors.len())),
        (unexpected_declines > 0).then(|| {
            format!(
                "{unexpected_declines} tasks declined for another reason than a passed deadline"
            )
        }),
        log_levels
            .get("ERROR")
            .map(|n| format!("{n} ERROR lines in the coordinator's log")),
        crashed.map(|s| format!("the coordinator exited during the soak ({s})")),
        samples.is_empty().then(|| "no round committed".to_string()),
        (fd_growth > a.max_fd_growth).then(|| {
            format!(
                "open descriptors grew by {fd_growth} after warm-up (more than --max-fd-growth {})",
                a.max_fd_growth
            )
        }),
        (!verified).then(|| "ledger verify failed".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !failures.is_empty() {
        println!("soak FAILED: {}", failures.join("; "));
        std::process::exit(1);
    }
    println!("soak passed");
}

fn proc_peak(samples: &[Sample]) -> f64 {
    samples.iter().map(|s| s.rss_kib).fold(f64::NAN, f64::max)
}
