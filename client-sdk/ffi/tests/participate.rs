//! `participate` as an app calls it: a blocking call with a listener, against a real
//! coordinator started in-process on 127.0.0.1 with TLS from a fresh certificate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpref_ffi::{
    FedprefDevice, FedprefError, ParticipateOptions, ParticipationListener, ParticipationStep,
};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

// The SDK's own test coordinator (TLS on 127.0.0.1, app key, admin token).
#[path = "../../tests/common/mod.rs"]
mod common;
use common::{APP_KEY, TestServer, admin};

const ITEMS: u64 = 8;

/// A local-DP run: cohorts of 2, 2-second rounds, `ITEMS` items × 3 factors.
async fn create_run(server: &TestServer, rounds: u64) {
    let manifest = pb::RunManifest {
        title: "FFI participation test".into(),
        purpose: "the exported participate call end to end".into(),
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
                target_cohort_size: 2,
                round_deadline: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                minimum_cohort_size: 2,
            })),
        }),
        rounds,
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
                    init_seed: Some(5),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        ..Default::default()
    };
    server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest),
            request_id: "ffi-participation".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap();
}

fn device(dir: &std::path::Path, n: usize) -> Arc<FedprefDevice> {
    let d = FedprefDevice::open(dir.join(format!("d{n}.db")).display().to_string()).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        let topic = ["Comedy", "Drama", "Jazz"][i as usize % 3];
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"]}}\n");
    }
    for j in 0..4 {
        let item = (n + 3 * j) % ITEMS as usize;
        let value = 1 + (n + j) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    d.ingest_jsonl(lines, false, None).unwrap();
    d
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(ParticipationStep, String)>>);

impl ParticipationListener for Recorder {
    fn on_step(&self, step: ParticipationStep, message: String) {
        self.0.lock().unwrap().push((step, message));
    }
}

#[test]
fn two_devices_take_part_in_a_local_dp_round_and_their_budgets_show_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(TestServer::start());
    runtime.block_on(create_run(&server, 1));
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<_> = (0..2).map(|n| device(dir.path(), n)).collect();
    let listeners: Vec<_> = (0..2).map(|_| Arc::new(Recorder::default())).collect();
    let options = ParticipateOptions {
        rounds: 1,
        device_conditions_met: true,
        give_up_after_seconds: Some(20.0),
        enrolment_grant: None,
    };
    let started = Instant::now();
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .zip(&listeners)
            .map(|(d, l)| {
                let (url, ca, options) = (url.clone(), server.ca_pem.clone(), options.clone());
                let listener: Arc<dyn ParticipationListener> = l.clone();
                s.spawn(move || d.participate(url, ca, APP_KEY.into(), options, Some(listener)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    for ((report, d), l) in reports.into_iter().zip(&devices).zip(&listeners) {
        let report = report.unwrap();
        assert_eq!(report.uploads, 1, "{:#?}", report.messages);
        assert!(matches!(
            report.steps.first(),
            Some(ParticipationStep::Enrolled { new: true, .. })
        ));
        assert!(
            report
                .steps
                .iter()
                .any(|s| matches!(s, ParticipationStep::Uploaded { round_id: 1, .. })),
            "{:#?}",
            report.messages
        );
        // The listener saw every step, in order, with the SDK's wording.
        let seen = l.0.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            report.steps
        );
        assert_eq!(
            seen.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
            report.messages
        );
        let b = d.budget().unwrap();
        assert_eq!((b.rounds, b.uploads.len()), (1, 1));
        assert!(b.epsilon_spent > 0.0 && b.epsilon_remaining < b.epsilon_budget);
        assert_eq!(b.uploads[0].mode, "local");
        // With the downloaded model, recommendations are personal.
        assert_eq!(d.recommend(3, None).unwrap().len(), 3);
    }

    // A wrong app key is a typed error with the coordinator's reason.
    let stranger = device(dir.path(), 9);
    let e = stranger
        .participate(
            url.clone(),
            server.ca_pem.clone(),
            "not-the-app-key".into(),
            options.clone(),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::Unauthenticated(ref m) if m.starts_with("Enroll: UNAUTHENTICATED")),
        "{e:?}"
    );
    // A URL that is not one is refused before any network call.
    let e = stranger
        .participate(
            "not a url".into(),
            server.ca_pem.clone(),
            APP_KEY.into(),
            options.clone(),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, FedprefError::InvalidEndpoint(_)), "{e:?}");
    // An enrolment grant that is not one is refused before any network call.
    let e = stranger
        .participate(
            url.clone(),
            server.ca_pem.clone(),
            APP_KEY.into(),
            ParticipateOptions {
                enrolment_grant: Some(b"not a grant".to_vec()),
                ..options.clone()
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::InvalidInput(ref m) if m.starts_with("enrolment grant:")),
        "{e:?}"
    );
    let e = stranger
        .participate(
            url,
            server.ca_pem.clone(),
            APP_KEY.into(),
            ParticipateOptions {
                rounds: 0,
                ..options
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::InvalidInput(ref m) if m.contains("rounds")),
        "{e:?}"
    );
    runtime.block_on(server.running.shutdown()).unwrap();
}
