//! Federated evaluation end to end: SDK devices take part in a round against a real
//! coordinator on 127.0.0.1 over TLS, show recommendations, give feedback, and report their
//! evaluation counts; the coordinator's sums and its guardrail (negative feedback rate,
//! pausing the run) reflect them.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::time::{Duration, Instant};

use fedpref_client_sdk::participation::MetricsOutcome;
use fedpref_client_sdk::{
    Device, DeviceConfig, EvaluationCounts, ParticipateOptions, ParticipationConfig,
    ParticipationError, PreferenceModel, ReportWhen, RetryPolicy, Timestamp, participate,
    report_metrics,
};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;
use tonic::Code;

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

fn add(total: &mut EvaluationCounts, c: &EvaluationCounts) {
    total.recommendation_lists_shown += c.recommendation_lists_shown;
    total.recommendations_shown += c.recommendations_shown;
    total.negative_feedback_count += c.negative_feedback_count;
    total.intra_list_diversity_sum += c.intra_list_diversity_sum;
    total.training_opt_outs += c.training_opt_outs;
    total.predictions_evaluated += c.predictions_evaluated;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_report_counts_and_the_negative_feedback_guardrail_pauses_the_run() {
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
    let mut expected = EvaluationCounts::default();
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
        add(&mut expected, &c);
    }

    // A coordinator error is surfaced by the direct call and recorded, not fatal, in
    // participation; the window stays open. (A window for a model version the run never
    // had: the coordinator refuses it.)
    let mut broken = device(dir.path(), "broken", 5);
    broken.set_training(false).unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("broken.db")).unwrap();
        conn.execute(
            "INSERT INTO evaluation_window (run_id, model_version, start_ms, lists, shown)
             VALUES (?1, 99, ?2, 1, 4)",
            rusqlite::params![run_id, now().millis() - 1000],
        )
        .unwrap();
    }
    let mut client = server.client(quick_retries()).await;
    let err = report_metrics(&mut broken, &mut client, APP_KEY, ReportWhen::Now)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ParticipationError::Rejected { call: "ReportMetrics", code: Code::InvalidArgument, message } if message.contains("99")),
        "{err}"
    );
    let report = participate(&mut broken, &mut client, APP_KEY, &options(), &mut |_| {})
        .await
        .unwrap();
    assert!(
        matches!(&report.metrics, Some(MetricsOutcome::Failed { message }) if message.contains("ReportMetrics")),
        "{:?}",
        report.metrics
    );
    assert_eq!(broken.evaluation_windows().unwrap().len(), 1);

    // Round 2: the two devices that still train take part and then report; the one whose
    // user turned training off stops at check-in and reports all the same.
    let results = round(&server, devices).await;
    for (d, report) in &results {
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
    }
    assert_eq!(results.iter().map(|(_, r)| r.uploads).sum::<u32>(), 2);

    // The coordinator summed the three reports: the negative feedback rate crossed 0.2
    // over 3 devices, and the run paused.
    let mut admin_client = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let run = admin_client
            .get_run(admin(pb::GetRunRequest {
                run_id: run_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if run.status == pb::RunStatus::Paused as i32 || Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.status, pb::RunStatus::Paused as i32, "{run:?}");
    assert!(
        run.status_reason.contains("negative_feedback_rate"),
        "{}",
        run.status_reason
    );
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
    assert_eq!(v1["reports"], 3, "{v1}");
    assert_eq!(v1["reporting_devices"], 3, "{v1}");
    let value = |k: &str| {
        v1["values"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {v1}"))
    };
    let rate = expected.negative_feedback_count as f64 / expected.recommendations_shown as f64;
    assert!(rate > 0.2);
    assert!(
        (value("negative_feedback_rate") - rate).abs() < 1e-12,
        "{v1}"
    );
    assert!((value("opt_out_rate") - 1.0 / 3.0).abs() < 1e-12, "{v1}");
    let diversity = expected.intra_list_diversity_sum / expected.recommendation_lists_shown as f64;
    assert!(
        (value("intra_list_diversity") - diversity).abs() < 1e-9,
        "{v1}"
    );
    let alerts = json["guardrails"]["alerts"].as_array().unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a["metric"] == "negative_feedback_rate" && a["action_taken"] == "pause"),
        "{alerts:?}"
    );
    assert!(
        !alerts.iter().any(|a| a["metric"] == "opt_out_rate"),
        "{alerts:?}"
    );

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
        out.contains(&format!(
            "evaluation counts reported for run {run_id} version 2"
        )),
        "{out}"
    );
    assert!(d.evaluation_windows().unwrap().is_empty());
    server.running.shutdown().await.unwrap();
}
