//! Federated evaluation end to end: SDK devices take part in a round against a real
//! coordinator on 127.0.0.1 over TLS, show recommendations, give feedback, and release their
//! evaluation with DP (recorded in their accountants); the coordinator sums the noised
//! releases, one per device and model version, records the cost in the ledger and shows no
//! metric below its minimum of devices; a device whose user turned training off sends
//! nothing.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::time::Duration;

use fedpref_client_sdk::participation::MetricsOutcome;
use fedpref_client_sdk::{
    Device, DeviceConfig, ParticipateOptions, ParticipationConfig, PreferenceModel, ReportWhen,
    RetryPolicy, Timestamp, participate, report_metrics,
};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

const ITEMS: u64 = 8;

/// A local-DP run of 10 rounds (cohorts of 3, at least 2, 2-second rounds) with a
/// guardrail: a negative feedback rate above 0.2 over at least 3 reporting devices pauses
/// the run.
fn manifest() -> pb::RunManifest {
    pb::RunManifest {
        title: "Evaluation test".into(),
        purpose: "Federated evaluation end to end".into(),
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
                target_cohort_size: 3,
                round_deadline: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                minimum_cohort_size: 2,
            })),
        }),
        rounds: 10,
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
                    init_seed: Some(11),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        guardrail_metrics: vec![
            pb::GuardrailMetric {
                metric: pb::GuardrailMetricKind::NegativeFeedbackRate as i32,
                direction: pb::ThresholdDirection::Above as i32,
                threshold: 0.2,
                on_alert: pb::AlertAction::Pause as i32,
                minimum_reporting_devices: 3,
            },
            pb::GuardrailMetric {
                metric: pb::GuardrailMetricKind::OptOutRate as i32,
                direction: pb::ThresholdDirection::Above as i32,
                threshold: 0.9,
                on_alert: pb::AlertAction::Log as i32,
                minimum_reporting_devices: 3,
            },
        ],
        ..Default::default()
    }
}

fn device(dir: &std::path::Path, name: &str, seed: usize) -> Device {
    let mut d = Device::open(dir.join(format!("{name}.db")), DeviceConfig::default()).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        let topic = ["Comedy", "Drama", "Jazz"][i as usize % 3];
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"]}}\n");
    }
    for j in 0..4 {
        let item = (seed + 3 * j) % ITEMS as usize;
        let value = 1 + (seed + j) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    d.ingest_jsonl(&lines, false, now()).unwrap();
    d
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn a_minute_ago() -> String {
    Timestamp::from_millis(now().millis() - 60_000).to_rfc3339()
}

fn quick_retries() -> ParticipationConfig {
    ParticipationConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        ..ParticipationConfig::default()
    }
}

fn options() -> ParticipateOptions {
    ParticipateOptions {
        rounds: 1,
        give_up_after: Some(Duration::from_secs(20)),
        ..ParticipateOptions::default()
    }
}

/// Participates with each device concurrently; returns them with their reports.
async fn round(
    server: &TestServer,
    devices: Vec<Device>,
) -> Vec<(Device, fedpref_client_sdk::ParticipationReport)> {
    let mut handles = vec![];
    for mut d in devices {
        let mut client = server.client(quick_retries()).await;
        handles.push(tokio::spawn(async move {
            let report = participate(&mut d, &mut client, APP_KEY, &options(), &mut |_| {})
                .await
                .unwrap();
            (d, report)
        }));
    }
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_release_their_evaluation_once_per_version_and_a_device_with_training_off_sends_nothing()
 {
    let server = TestServer::start().await;
    let run_id = server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest()),
            request_id: "evaluation".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let dir = tempfile::tempdir().unwrap();

    // A device without a model has nothing to report: nothing is sent, it does not even
    // enrol.
    let mut fresh = device(dir.path(), "fresh", 9);
    fresh.recommend(3, now()).unwrap();
    let mut client = server.client(quick_retries()).await;
    let outcome = report_metrics(&mut fresh, &mut client, APP_KEY, ReportWhen::Now)
        .await
        .unwrap();
    assert!(
        matches!(outcome, MetricsOutcome::NotSent { .. }),
        "{outcome:?}"
    );
    assert!(fresh.enrolment().unwrap().is_none());

    // Round 1: three devices download model version 1 and train. Nothing was shown with
    // it yet, so nothing is reported.
    let devices = (0..3)
        .map(|n| device(dir.path(), &format!("d{n}"), n))
        .collect();
    let mut devices: Vec<Device> = round(&server, devices)
        .await
        .into_iter()
        .map(|(d, report)| {
            assert_eq!(report.uploads, 1, "{:#?}", report.events);
            assert!(
                matches!(report.metrics, Some(MetricsOutcome::NotSent { .. })),
                "{:?}",
                report.metrics
            );
            d
        })
        .collect();

    // The app shows lists; the users dismiss two recommended items and like one; each
    // rates one more item; the third user turns training off.
    for (n, d) in devices.iter_mut().enumerate() {
        assert_eq!(d.model().unwrap().version(), 1);
        let a = d.recommend(4, now()).unwrap();
        assert!(a.len() >= 3, "{a:?}");
        let at = a_minute_ago();
        let line = |kind: &str, item: &str| {
            format!("{{\"type\":\"{kind}\",\"item\":\"{item}\",\"at\":\"{at}\"}}\n")
        };
        let text = line("dismiss", &a[0].item)
            + &line("dismiss", &a[1].item)
            + &line("save", &a[2].item)
            + &format!(
                "{{\"type\":\"rating\",\"item\":\"{}\",\"value\":3,\"at\":\"{at}\"}}\n",
                a[2].item
            );
        d.ingest_jsonl(&text, false, now()).unwrap();
        d.recommend(4, now()).unwrap();
        if n == 2 {
            d.set_training(false).unwrap();
        }
        let windows = d.evaluation_windows().unwrap();
        assert_eq!(windows.len(), 1);
        assert_eq!(
            (windows[0].run_id.as_str(), windows[0].model_version),
            (run_id.as_str(), 1)
        );
        let c = windows[0].counts;
        assert_eq!(c.recommendation_lists_shown, 2);
        assert_eq!(
            (c.negative_feedback_count, c.positive_feedback_count),
            (2, 1)
        );
        assert_eq!(c.predictions_evaluated, 1);
        assert_eq!(c.training_opt_outs, u64::from(n == 2));
    }

    // A window for a model version no task gave a token for (here one the run never had) is
    // closed unsent: its counts never leave the device, nothing is spent.
    let mut stray = device(dir.path(), "stray", 5);
    {
        let conn = rusqlite::Connection::open(dir.path().join("stray.db")).unwrap();
        conn.execute(
            "INSERT INTO evaluation_window (run_id, model_version, start_ms, lists, shown)
             VALUES (?1, 99, ?2, 1, 4)",
            rusqlite::params![run_id, now().millis() - 1000],
        )
        .unwrap();
    }
    let mut client = server.client(quick_retries()).await;
    let outcome = report_metrics(&mut stray, &mut client, APP_KEY, ReportWhen::Now)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, MetricsOutcome::NotSent { why } if why.contains("evaluation token")),
        "{outcome:?}"
    );
    assert!(stray.evaluation_windows().unwrap().is_empty());
    assert_eq!(stray.budget().unwrap().rounds, 0);

    // Round 2: the two devices that still train take part and then release their
    // evaluation of version 1; the one whose user turned training off sends nothing and
    // keeps its window.
    let results = round(&server, devices).await;
    for (n, (d, report)) in results.iter().enumerate() {
        if n == 2 {
            assert!(
                matches!(&report.metrics, Some(MetricsOutcome::NotSent { why }) if why.contains("training participation is off")),
                "{:?}",
                report.metrics
            );
            assert_eq!(d.evaluation_windows().unwrap().len(), 1);
            assert_eq!(d.budget().unwrap().rounds, 1);
            continue;
        }
        match &report.metrics {
            Some(MetricsOutcome::Reported {
                windows,
                next_report_after,
            }) => {
                assert_eq!(windows, &vec![(run_id.clone(), 1)]);
                assert!(*next_report_after > Duration::ZERO);
            }
            other => panic!("{other:?}: {:#?}", report.events),
        }
        assert!(d.evaluation_windows().unwrap().is_empty());
        assert!(d.next_evaluation_report().unwrap().unwrap() > now());
        // Two updates and the evaluation release, all in the accountant.
        let b = d.budget().unwrap();
        let kinds: Vec<&str> = b.uploads.iter().map(|u| u.kind.as_str()).collect();
        assert_eq!(kinds, ["update", "update", "evaluation"], "{b:?}");
    }
    assert_eq!(results.iter().map(|(_, r)| r.uploads).sum::<u32>(), 2);

    // The coordinator summed two releases of version 1: below the guardrails' minimum of
    // three devices nothing trips, and below the report's minimum no metric is shown. The
    // ledger records what the evaluation cost.
    let mut admin_client = server.admin().await;
    let run = admin_client
        .get_run(admin(pb::GetRunRequest {
            run_id: run_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, pb::RunStatus::Active as i32, "{run:?}");
    let report = admin_client
        .get_report(admin(pb::GetReportRequest {
            run_id: run_id.clone(),
            format: pb::ReportFormat::Json as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    let json: serde_json::Value = serde_json::from_slice(&report.content).unwrap();
    let versions = json["guardrails"]["versions"].as_array().unwrap();
    let v1 = versions
        .iter()
        .find(|v| v["model_version"] == 1)
        .unwrap_or_else(|| panic!("{versions:?}"));
    assert_eq!(v1["reports"], 2, "{v1}");
    assert_eq!(v1["reporting_devices"], 2, "{v1}");
    assert_eq!(v1["values"], serde_json::json!({}), "{v1}");
    assert!(json["guardrails"]["alerts"].as_array().unwrap().is_empty());
    // Each version whose tasks carried evaluation tokens (1 and 2) is charged once, when its
    // first token was issued, whether or not a report followed.
    let spends = json["guardrails"]["evaluation"].as_array().unwrap();
    let versions: Vec<u64> = spends
        .iter()
        .map(|s| s["model_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2], "{spends:?}");
    assert!(spends.iter().all(|s| s["epsilon"].as_f64().unwrap() > 0.0));

    // Reported windows are closed; a new list (with model version 2, downloaded in round
    // 2) opens a new window, which is not due until the coordinator's wait has passed.
    let (mut d, _) = results.into_iter().next().unwrap();
    assert_eq!(d.model().unwrap().version(), 2);
    d.recommend(2, now()).unwrap();
    assert_eq!(d.evaluation_windows().unwrap()[0].model_version, 2);
    let mut client = server.client(quick_retries()).await;
    let outcome = report_metrics(&mut d, &mut client, APP_KEY, ReportWhen::Due)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, MetricsOutcome::NotSent { why } if why.contains("no sooner than")),
        "{outcome:?}"
    );
    assert_eq!(d.evaluation_windows().unwrap().len(), 1);

    // `fedpref-device report-metrics` reports now, whatever the wait; `--if-due` waits.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let cli = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedpref-device"))
            .arg("--store")
            .arg(d.path())
            .args([
                "report-metrics",
                "--coordinator",
                &server.url(),
                "--app-key",
                APP_KEY,
            ])
            .arg("--ca-cert")
            .arg(&ca)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = cli(&["--if-due"]);
    assert!(out.contains("no evaluation report"), "{out}");
    assert_eq!(d.evaluation_windows().unwrap().len(), 1);
    let out = cli(&[]);
    assert!(
        out.contains(&format!("evaluation reported for run {run_id} version 2")),
        "{out}"
    );
    assert!(d.evaluation_windows().unwrap().is_empty());
    server.running.shutdown().await.unwrap();
}
