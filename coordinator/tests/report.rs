//! The impact report: golden JSON and Markdown for a fixed-seed run, a tampered ledger,
//! per-device ε against the accountant, guardrail alerts (ledger, Prometheus, pause), the
//! `report` and `ledger export` commands, and the HTML rendered by headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedpref_coordinator::coordinator::{Coordinator, EvaluationRelease};
use fedpref_coordinator::engine::{Action, AdminCommand, Event};
use fedpref_coordinator::ledger::{LedgerEvent, chain_hash, verify};
use fedpref_coordinator::manifest::RunManifest;
use fedpref_coordinator::metrics::Metrics;
use fedpref_coordinator::report::ImpactReport;
use fedpref_coordinator::store::Store;
use fedpref_privacy::{OrderGrid, PrivacyMode, RoundRelease};
use rusqlite::params;

const T0: i64 = 1_767_225_600_000; // 2026-01-01 00:00:00 UTC
const GENERATED_AT: i64 = 1_767_312_000_000; // 2026-01-02 00:00:00 UTC
const RUN: &str = "impact";

const MANIFEST: &str = r#"
title = "Movie preferences, impact test"
purpose = "Rank the catalogue by what each user is likely to enjoy"
owner = "recommendations-team@example.com"
data_elements_used = ["explicit ratings (1-5)", "thumbs up/down"]
data_elements_not_used = ["location", "contacts"]
privacy_mode = "central"
rounds = 8
clip_norm = 1.0
noise_multiplier = 1.2
seed = 11

[budget]
epsilon = 30.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 3
minimum_size = 2
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 12
factors = 2

[opt_out_policy]
consent_model = "opt-in"
description = "Training is off until the user turns it on"
withdrawal_effect = "The device stops taking part; past noised aggregates stay"

[[harm_scenarios]]
scenario = "Recommendations narrow to one genre for light users"
affected_groups = "users with fewer than 20 ratings"
mitigation = "diversity injection and per-cohort accuracy monitoring"
residual_risk = "light users may still see a narrower catalogue"

[[kpis]]
metric = "hit_rate_at_10"
description = "Share of held-out positives in the top 10"
target = 0.2
higher_is_better = true

[[guardrail_metrics]]
metric = "negative_feedback_rate"
direction = "above"
threshold = 0.2
on_alert = "pause"
minimum_reporting_devices = 3

[[guardrail_metrics]]
metric = "intra_list_diversity"
direction = "below"
threshold = 0.3
on_alert = "log"
minimum_reporting_devices = 3
"#;

/// One round in which `devices` check in and upload, in that order, then the deadline
/// passes. Returns the time after the round.
fn round(c: &mut Coordinator, devices: &[&str], now: i64) -> i64 {
    let dim = c.engine(RUN).unwrap().model().1.len();
    for d in devices {
        let actions = c
            .handle(
                RUN,
                Event::CheckIn {
                    device: (*d).into(),
                    eligible: true,
                },
                now,
            )
            .unwrap();
        let task = actions
            .into_iter()
            .find_map(|a| match a {
                Action::SendTask(t) => Some(t),
                _ => None,
            })
            .expect("a device of the cohort gets a task");
        c.handle(
            RUN,
            Event::Update {
                device: (*d).into(),
                round: task.round,
                task_token: task.task_token,
                values: vec![0.01; dim],
                examples: 5,
                clip_bit: None,
            },
            now,
        )
        .unwrap();
    }
    let deadline = c.engine(RUN).unwrap().next_wakeup().unwrap();
    c.handle(RUN, Event::Tick, deadline).unwrap();
    deadline + 1000
}

/// One device's evaluation of `version`, as the SDK would release it but without noise (so
/// that the golden report is deterministic): the device is given a task on the version
/// first, which hands it the evaluation token it reports with.
fn try_report(
    c: &mut Coordinator,
    device: &str,
    version: u64,
    negative: u64,
    diversity: f64,
    now: i64,
) -> Result<(), fedpref_coordinator::coordinator::CoordinatorError> {
    use fedpref_privacy::evaluation::{COORDINATES, EvaluationCounts, EvaluationRates};
    let token = c
        .task_given(
            RUN,
            device,
            version,
            || format!("token-{device}-{version}"),
            now,
        )?
        .unwrap_or_else(|| format!("token-{device}-{version}"));
    let rates = EvaluationRates::from_counts(&EvaluationCounts {
        lists_shown: 4,
        items_shown: 40,
        injected_shown: 8,
        negative_feedback: negative,
        positive_feedback: 6,
        predictions: 10,
        predictions_within_half: if device < "c" { 8 } else { 6 },
        intra_list_diversity_sum: diversity,
        distinct_topics_shown: 1,
        catalogue_topics: 2,
        heavy: device < "c",
        ..Default::default()
    });
    let mut values = [0.0; COORDINATES];
    for (v, r) in values.iter_mut().zip(rates.values()) {
        *v = r - 0.5;
    }
    c.record_evaluation(
        &EvaluationRelease {
            run_id: RUN,
            model_version: version,
            token_hash: fedpref_coordinator::service::auth::sha256(token.as_bytes()),
            noise_multiplier: fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER,
            values,
        },
        now,
    )
    .map(|_| ())
}

fn report(
    c: &mut Coordinator,
    device: &str,
    version: u64,
    negative: u64,
    diversity: f64,
    now: i64,
) {
    try_report(c, device, version, negative, diversity, now).unwrap();
}

/// The fixed run: five committed rounds and one abandoned, a guardrail that pauses the run,
/// a resumption and a rollback. Device `a` takes part in 4 rounds, `b` and `c` in 3, `d`,
/// `e`, `f` and `g` in 1. Everything but the central noise (and so the model and ledger hashes) is
/// determined by the script.
fn fixed_run(db: &Path, metrics: Option<Arc<Metrics>>) -> Coordinator {
    let mut c = Coordinator::open(db, T0).unwrap();
    if let Some(m) = metrics {
        c.set_metrics(m);
    }
    let manifest = RunManifest::from_toml(MANIFEST, "impact.toml").unwrap();
    c.create_run(RUN, manifest, T0).unwrap();
    let mut now = T0 + 1000;
    now = round(&mut c, &["a", "b", "c"], now);
    now = round(&mut c, &["a", "b", "d"], now);
    now = round(&mut c, &["x"], now); // abandoned: below the minimum of 2
    now = round(&mut c, &["a", "e", "f"], now);
    // Version 4 (after three committed rounds) draws negative feedback from three devices:
    // 10 / 40 = 0.25 > 0.2, so the run pauses; diversity 0.5 stays above 0.3.
    for d in ["a", "b", "c"] {
        report(&mut c, d, 4, 10, 2.0, now);
        now += 10;
    }
    assert_eq!(
        format!("{:?}", c.engine(RUN).unwrap().state()),
        "Paused",
        "the guardrail pauses the run"
    );
    c.handle(
        RUN,
        Event::Admin(AdminCommand::Resume {
            reason: "negative feedback traced to a catalogue import; fixed".into(),
        }),
        now,
    )
    .unwrap();
    now += 1000;
    now = round(&mut c, &["a", "b", "c"], now);
    c.rollback(RUN, 4, "version 5 ranks stale items first", now)
        .unwrap();
    now += 1000;
    round(&mut c, &["c", "g"], now);
    c
}

/// Replaces every 64-hex-digit SHA-256 with a placeholder: the model versions carry central
/// noise from the OS-seeded sampler, so their hashes (and the chain's) differ between runs.
fn normalise(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            .count();
        let boundary_before = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if run == 64 && boundary_before {
            out.push_str("<sha256>");
            i += 64;
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .map(|i| i + 1)
            .unwrap_or(expected.lines().count().min(actual.lines().count()) + 1);
        panic!(
            "{name} differs from {} at line {line}:\n  expected: {:?}\n  actual:   {:?}\n(UPDATE_GOLDEN=1 rewrites it after a deliberate change)",
            path.display(),
            expected.lines().nth(line - 1),
            actual.lines().nth(line - 1)
        );
    }
}

#[test]
fn json_and_markdown_reports_of_the_fixed_run_match_their_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixed_run(&dir.path().join("c.db"), None);
    let r = ImpactReport::build(c.store(), RUN, GENERATED_AT).unwrap();
    assert!(r.ledger.intact, "{:?}", r.ledger.problem);
    golden("impact_report.json", &normalise(&r.to_json()));
    golden("impact_report.md", &normalise(&r.to_markdown()));
}

#[test]
fn the_report_states_the_runs_shape_and_its_head_hash() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixed_run(&dir.path().join("c.db"), None);
    let r = ImpactReport::build(c.store(), RUN, GENERATED_AT).unwrap();
    let totals = verify(RUN, &c.store().ledger(RUN).unwrap()).unwrap();
    assert_eq!(r.ledger.head_sha256, totals.head_hash);
    assert_eq!(r.ledger.rederived_epsilon, totals.cumulative_epsilon);
    assert_eq!(r.spend.final_epsilon, totals.cumulative_epsilon);
    assert_eq!(r.spend.rounds_committed, 5);
    assert_eq!(r.spend.rounds_abandoned, 1);
    assert_eq!(r.spend.devices_participated, 7); // a b c d e f g
    assert_eq!(
        r.spend.series.len(),
        1,
        "a fixed cohort: release observers only"
    );
    assert_eq!(r.spend.series[0].points.len(), 6);
    assert_eq!(r.guardrails.alerts.len(), 1);
    assert_eq!(
        r.operations
            .iter()
            .map(|o| o.kind.as_str())
            .collect::<Vec<_>>(),
        ["paused", "resumed", "rolled_back"]
    );
    let html = r.to_html();
    assert!(html.contains(&totals.head_hash));
    assert!(!html.contains("ledger-broken"));
    // Self-contained: nothing is fetched from elsewhere.
    for needle in [
        "src=", "<script", "<link", "url(", "@import", "http://", "https://",
    ] {
        let allowed = needle == "http://"
            && html.matches(needle).count() == html.matches("http://www.w3.org/2000/svg").count();
        assert!(
            !html.contains(needle) || allowed,
            "the page contains {needle}"
        );
    }
}

#[test]
fn per_device_epsilon_of_a_device_equals_the_accountants_answer_for_its_participations() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixed_run(&dir.path().join("c.db"), None);
    let r = ImpactReport::build(c.store(), RUN, GENERATED_AT).unwrap();
    assert_eq!(c.store().participations(RUN, "a").unwrap().len(), 4);
    let release = |k| {
        fedpref_privacy::epsilon_after_with(
            fedpref_privacy::Accountant::Pld,
            &RoundRelease {
                mode: PrivacyMode::Central,
                noise_multiplier: 1.2,
                sampling_rate: 1.0,
            },
            k,
            1e-6,
            &OrderGrid::default(),
        )
        .unwrap()
        .epsilon
    };
    let pd = &r.spend.per_device;
    let groups: Vec<(u64, u64)> = pd
        .by_participations
        .iter()
        .map(|g| (g.participations, g.devices))
        .collect();
    assert_eq!(groups, [(1, 4), (3, 2), (4, 1)]);
    for g in &pd.by_participations {
        let expected = release(g.participations);
        assert!(
            (g.epsilon - expected).abs() <= 1e-12 * expected,
            "{} participations: report {} vs accountant {expected}",
            g.participations,
            g.epsilon
        );
    }
    assert_eq!(pd.max_participations, 4);
    assert_eq!(pd.devices_at_max, 1);
    assert_eq!(pd.max_epsilon, Some(pd.by_participations[2].epsilon));
    assert_eq!(pd.histogram.iter().map(|b| b.devices).sum::<u64>(), 7);
    // Without amplification a device's own ε is below the run's (every round) and above 0.
    let run_eps = r.spend.final_epsilon[0].epsilon;
    assert!(pd.max_epsilon.unwrap() < run_eps);
}

#[test]
fn a_tampered_ledger_row_makes_the_report_say_the_chain_is_broken_at_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(fixed_run(&db, None));
    let store = Store::open(&db).unwrap();
    let body: String = store
        .connection()
        .query_row(
            "SELECT body FROM ledger WHERE run_id = ?1 AND sequence = 3",
            params![RUN],
            |r| r.get(0),
        )
        .unwrap();
    assert!(body.contains("\"cohort_size\":3"), "{body}");
    store
        .connection()
        .execute(
            "UPDATE ledger SET body = ?2 WHERE run_id = ?1 AND sequence = 3",
            params![RUN, body.replace("\"cohort_size\":3", "\"cohort_size\":30")],
        )
        .unwrap();
    let r = ImpactReport::build(&store, RUN, GENERATED_AT).unwrap();
    assert!(!r.ledger.intact);
    assert_eq!(r.ledger.failed_sequence, Some(3));
    let html = r.to_html();
    let banner = html
        .find("id=\"ledger-broken\"")
        .expect("a broken-chain banner");
    assert!(
        banner < html.find("<h1>").unwrap(),
        "the banner comes first"
    );
    assert!(html.contains("LEDGER CHAIN BROKEN at entry 3"));
    assert!(html.contains(".broken{background:#fde8ea;border:2px solid #b00020;color:#b00020"));
    let md = r.to_markdown();
    let first_para = md.lines().nth(2).unwrap();
    assert!(
        first_para.starts_with("> **LEDGER CHAIN BROKEN at entry 3"),
        "{first_para}"
    );
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["ledger"]["intact"], false);
    assert_eq!(json["ledger"]["failed_sequence"], 3);
}

#[test]
fn guardrail_alerts_are_logged_counted_recorded_once_and_pause_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut c = fixed_run(&dir.path().join("c.db"), Some(Arc::clone(&metrics)));
    let text = metrics.render();
    assert!(
        text.contains(
            "fedpref_guardrail_alerts_total{metric=\"negative_feedback_rate\",run=\"impact\"} 1"
        ),
        "{text}"
    );
    let entries = c.store().ledger(RUN).unwrap();
    let events: Vec<LedgerEvent> = entries
        .iter()
        .map(|e| {
            serde_json::from_str::<fedpref_coordinator::ledger::LedgerEntry>(&e.body)
                .unwrap()
                .event
        })
        .collect();
    let alert_at = events
        .iter()
        .position(|e| matches!(e, LedgerEvent::GuardrailAlert { .. }))
        .expect("an alert entry");
    match &events[alert_at] {
        LedgerEvent::GuardrailAlert {
            value,
            threshold,
            model_version,
            reporting_devices,
            ..
        } => {
            assert_eq!(
                (*value, *threshold, *model_version, *reporting_devices),
                (0.25, 0.2, 4, 3)
            );
        }
        _ => unreachable!(),
    }
    match &events[alert_at + 1] {
        LedgerEvent::Paused { reason } => assert!(
            reason.starts_with("guardrail: negative_feedback_rate"),
            "{reason}"
        ),
        other => panic!("expected a pause after the alert, got {other:?}"),
    }
    // More reports on the same version do not fire the same alert again.
    let now = T0 + 10_000_000;
    report(&mut c, "d", 4, 10, 2.0, now);
    let alerts = |c: &Coordinator| {
        c.store()
            .ledger(RUN)
            .unwrap()
            .iter()
            .filter(|e| e.body.contains("\"kind\":\"guardrail_alert\""))
            .count()
    };
    assert_eq!(alerts(&c), 1);
    // A log-only guardrail records and counts, but does not pause: diversity 1.0 / 4 lists.
    let latest = c.store().run(RUN).unwrap().current_version;
    for d in ["a", "b", "c"] {
        report(&mut c, d, latest, 0, 1.0, now);
    }
    assert_eq!(alerts(&c), 2);
    assert_eq!(format!("{:?}", c.engine(RUN).unwrap().state()), "Active");
    assert!(metrics.render().contains(
        "fedpref_guardrail_alerts_total{metric=\"intra_list_diversity\",run=\"impact\"} 1"
    ));
    // The chain with alerts still verifies.
    verify(RUN, &c.store().ledger(RUN).unwrap()).unwrap();
}

#[test]
fn two_devices_cannot_trip_a_guardrail_that_needs_three() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(&dir.path().join("c.db"), T0).unwrap();
    c.create_run(RUN, RunManifest::from_toml(MANIFEST, "m").unwrap(), T0)
        .unwrap();
    report(&mut c, "a", 1, 40, 0.0, T0 + 5000);
    report(&mut c, "b", 1, 40, 0.0, T0 + 5000);
    // The same device cannot report twice on a version: its token is used up.
    let err = try_report(&mut c, "b", 1, 40, 0.0, T0 + 5000).unwrap_err();
    assert!(err.to_string().contains("evaluation_token"), "{err}");
    assert!(
        c.store()
            .ledger(RUN)
            .unwrap()
            .iter()
            .all(|e| !e.body.contains("guardrail_alert"))
    );
    assert_eq!(c.store().evaluation_sum(RUN, 1).unwrap().reports, 2);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
}

#[test]
fn report_and_ledger_export_commands_write_what_the_library_renders() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(fixed_run(&db, None));
    let out = dir.path().join("report.html");
    let o = bin()
        .args([
            "report",
            "--db",
            db.to_str().unwrap(),
            "--run",
            RUN,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg"));
    let md = bin()
        .args([
            "report",
            "--db",
            db.to_str().unwrap(),
            "--run",
            RUN,
            "--format",
            "md",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8(md.stdout)
            .unwrap()
            .starts_with("# Impact report: Movie preferences")
    );
    let missing = bin()
        .args(["report", "--db", db.to_str().unwrap(), "--run", "nope"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));

    // Every exported entry's hash can be recomputed from its canonical text alone.
    let o = bin()
        .args([
            "ledger",
            "export",
            "--db",
            db.to_str().unwrap(),
            "--run",
            RUN,
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["run_id"], RUN);
    let entries = v["entries"].as_array().unwrap();
    let mut prev = v["genesis_hash"].as_str().unwrap().to_string();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["sequence"], i as u64 + 1);
        assert_eq!(e["prev_hash"].as_str().unwrap(), prev);
        let canonical = e["canonical"].as_str().unwrap();
        assert_eq!(chain_hash(&prev, canonical), e["hash"].as_str().unwrap());
        assert_eq!(e["entry"]["sequence"], e["sequence"]);
        prev = e["hash"].as_str().unwrap().to_string();
    }
    // A tampered row: the report is still written, says so, and the command fails.
    let store = Store::open(&db).unwrap();
    store
        .connection()
        .execute(
            "UPDATE ledger SET body = replace(body, '\"round\":1,', '\"round\":7,') WHERE run_id = ?1 AND sequence = 3",
            params![RUN],
        )
        .unwrap();
    let o = bin()
        .args([
            "report",
            "--db",
            db.to_str().unwrap(),
            "--run",
            RUN,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("LEDGER CHAIN BROKEN at entry 3"));
    assert!(
        std::fs::read_to_string(&out)
            .unwrap()
            .contains("id=\"ledger-broken\"")
    );
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["entry"]["event"]["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"guardrail_alert") && kinds.contains(&"rolled_back"));
}

// ---------------------------------------------------------------------------------------
// Headless Chromium

const CHROMIUM: &str = "/usr/bin/chromium";
const WIDTH: u32 = 1024;
const HEIGHT: u32 = 1400;

/// Renders `html` to a PNG with headless Chromium and decodes it to RGBA rows.
fn screenshot(dir: &Path, html: &str, name: &str) -> (u32, u32, Vec<u8>) {
    let page = dir.join(format!("{name}.html"));
    let png = dir.join(format!("{name}.png"));
    std::fs::write(&page, html).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("FEDPREF_REPORT_SCREENSHOT_DIR");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={WIDTH},{HEIGHT}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success() || png.exists(),
                "chromium exited with {status}"
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(keep) = keep {
        std::fs::copy(&png, Path::new(&keep).join(format!("{name}.png"))).unwrap();
        std::fs::copy(&page, Path::new(&keep).join(format!("{name}.html"))).unwrap();
    }
    let file = std::fs::File::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let rgba: Vec<u8> = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, rgba)
}

/// Whether Chromium is here to render with. CI sets `FEDPREF_REQUIRE_CHROMIUM=1`, so there a
/// missing browser fails the test instead of skipping it.
fn chromium_available() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    if std::env::var_os("FEDPREF_REQUIRE_CHROMIUM").is_some_and(|v| v == "1") {
        panic!("FEDPREF_REQUIRE_CHROMIUM=1 but {CHROMIUM} is not installed");
    }
    println!(
        "skipped: {CHROMIUM} is not installed (apt-get install -y chromium); the HTML report was not rendered"
    );
    false
}

/// Pixels in rows [from, to) that are clearly red (the broken-chain banner's text and border,
/// or its pink background).
fn reddish(rgba: &[u8], width: u32, rows: std::ops::Range<u32>) -> usize {
    rows.flat_map(|y| (0..width).map(move |x| ((y * width + x) * 4) as usize))
        .filter(|&i| {
            let (r, g, b) = (rgba[i], rgba[i + 1], rgba[i + 2]);
            (r > 150 && g < 60 && b < 80)
                || (r > 245 && (225..=240).contains(&g) && (225..=240).contains(&b))
        })
        .count()
}

#[test]
fn headless_chromium_renders_the_html_report_to_a_full_non_blank_page() {
    if !chromium_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let c = fixed_run(&db, None);
    let html = ImpactReport::build(c.store(), RUN, GENERATED_AT)
        .unwrap()
        .to_html();
    drop(c);
    let (w, h, rgba) = screenshot(dir.path(), &html, "intact");
    assert_eq!((w, h), (WIDTH, HEIGHT));
    let pixels = (w * h) as usize;
    let non_white = rgba
        .chunks(4)
        .filter(|p| p[0] < 235 || p[1] < 235 || p[2] < 235)
        .count();
    assert!(
        non_white > pixels / 50,
        "only {non_white} of {pixels} pixels are not white: the page looks blank"
    );
    let mut colours: Vec<[u8; 3]> = rgba.chunks(4).map(|p| [p[0], p[1], p[2]]).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 20,
        "only {} distinct colours",
        colours.len()
    );
    // The chart's series colour is on the page (the SVG was drawn).
    let blue = rgba
        .chunks(4)
        .filter(|p| p[0] < 60 && (80..=110).contains(&p[1]) && p[2] > 150)
        .count();
    assert!(blue > 200, "{blue} pixels of the series colour");
    // No red banner at the top of an intact report.
    assert!(reddish(&rgba, w, 0..80) < 50);

    // Tamper with one row: the top of the rendered page turns red.
    let store = Store::open(&db).unwrap();
    store
        .connection()
        .execute(
            "UPDATE ledger SET body = replace(body, '\"cohort_size\":3', '\"cohort_size\":4') WHERE run_id = ?1 AND sequence = 3",
            params![RUN],
        )
        .unwrap();
    let broken = ImpactReport::build(&store, RUN, GENERATED_AT)
        .unwrap()
        .to_html();
    let (w, _, rgba) = screenshot(dir.path(), &broken, "broken");
    let red = reddish(&rgba, w, 0..80);
    assert!(
        red > 5_000,
        "only {red} red pixels at the top of a broken report"
    );
}

#[test]
fn a_poisson_sampled_run_reports_both_audiences_and_unamplified_per_device_epsilon() {
    let text = MANIFEST
        .replace(
            "kind = \"cohort\"\ntarget_size = 3\nminimum_size = 2",
            "kind = \"poisson\"\nrate = 0.5\npopulation = 8\nminimum_size = 1",
        )
        .replace("rounds = 8", "rounds = 4");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(&dir.path().join("c.db"), T0).unwrap();
    c.create_run(
        RUN,
        RunManifest::from_toml(&text, "poisson.toml").unwrap(),
        T0,
    )
    .unwrap();
    let dim = c.engine(RUN).unwrap().model().1.len();
    let mut now = T0 + 1000;
    for _ in 0..3 {
        // Each of 8 devices checks in; the engine selects each with probability 1/2. A round
        // nobody was selected for is abandoned.
        for d in 0..8 {
            let device = format!("p{d}");
            let actions = c
                .handle(
                    RUN,
                    Event::CheckIn {
                        device: device.clone(),
                        eligible: true,
                    },
                    now,
                )
                .unwrap();
            if let Some(task) = actions.into_iter().find_map(|a| match a {
                Action::SendTask(t) => Some(t),
                _ => None,
            }) {
                c.handle(
                    RUN,
                    Event::Update {
                        device,
                        round: task.round,
                        task_token: task.task_token,
                        values: vec![0.01; dim],
                        examples: 5,
                        clip_bit: None,
                    },
                    now,
                )
                .unwrap();
            }
        }
        now = c.engine(RUN).unwrap().next_wakeup().unwrap_or(now + 60_000);
        c.handle(RUN, Event::Tick, now).unwrap();
        now += 1000;
    }
    let r = ImpactReport::build(c.store(), RUN, GENERATED_AT).unwrap();
    assert!(r.ledger.intact);
    let audiences: Vec<&str> = r
        .assessment
        .audiences
        .iter()
        .map(|a| a.audience.as_str())
        .collect();
    assert_eq!(
        audiences,
        ["observers_unaware_of_participation", "release_observers"]
    );
    // Nobody selected in all three rounds has probability 2^-24.
    assert!(r.spend.rounds_committed > 0, "no round committed");
    assert_eq!(r.spend.series.len(), 2);
    assert_eq!(r.to_html().matches("<polyline").count(), 2);
    // Amplification lowers the run's ε only for observers unaware of who took part.
    assert!(r.spend.final_epsilon[0].epsilon < r.spend.final_epsilon[1].epsilon);
    let total: u64 = r
        .spend
        .per_device
        .by_participations
        .iter()
        .map(|g| g.devices)
        .sum();
    assert_eq!(total, r.spend.devices_participated);
    for g in &r.spend.per_device.by_participations {
        let expected = fedpref_privacy::epsilon_after_with(
            fedpref_privacy::Accountant::Pld,
            &RoundRelease {
                mode: PrivacyMode::Central,
                noise_multiplier: 1.2,
                sampling_rate: 1.0,
            },
            g.participations,
            1e-6,
            &OrderGrid::default(),
        )
        .unwrap()
        .epsilon;
        assert!((g.epsilon - expected).abs() <= 1e-12 * expected);
    }
}

#[test]
fn a_stopped_runs_ledger_gets_no_alert_but_its_counts_are_still_summed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(&dir.path().join("c.db"), T0).unwrap();
    c.create_run(RUN, RunManifest::from_toml(MANIFEST, "m").unwrap(), T0)
        .unwrap();
    // Three devices were given tasks (and evaluation tokens) on version 1 before the stop.
    for d in ["a", "b", "c"] {
        c.task_given(RUN, d, 1, || format!("token-{d}-1"), T0)
            .unwrap()
            .unwrap();
    }
    c.handle(
        RUN,
        Event::Admin(AdminCommand::Stop {
            reason: "purpose withdrawn".into(),
        }),
        T0 + 1,
    )
    .unwrap();
    // A stopped run gives no more evaluation tokens.
    assert_eq!(
        c.task_given(RUN, "d", 1, || "token-d-1".into(), T0 + 2)
            .unwrap(),
        None
    );
    let before = c.store().ledger(RUN).unwrap().len();
    for d in ["a", "b", "c"] {
        report(&mut c, d, 1, 40, 0.0, T0 + 5000);
    }
    assert_eq!(c.store().ledger(RUN).unwrap().len(), before);
    let r = ImpactReport::build(c.store(), RUN, GENERATED_AT).unwrap();
    assert_eq!(r.guardrails.versions[0].reporting_devices, 3);
    assert!(r.guardrails.alerts.is_empty());
    assert_eq!(r.status, "stopped");
    assert!(r.ledger.intact, "{:?}", r.ledger.problem);
}
