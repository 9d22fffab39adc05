//! Adaptive clipping in local mode end to end: SDK devices send noised clip bits to a real
//! coordinator (in-process, 127.0.0.1, TLS from a generated certificate) and its C moves.

mod common;

use common::{APP_KEY, TestServer, admin};
use std::time::{Duration, Instant};

use fedpref_client_sdk::{
    Device, DeviceConfig, ParticipateOptions, ParticipationConfig, RetryPolicy, Timestamp,
    participate,
};
use fedpref_privacy::{Budget, PrivacyMode, RoundRelease};
use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

const ITEMS: u64 = 8;
/// The combined multiplier z of (update, bit) and the per-device bit noise σ_b.
const Z: f64 = 4.0;
const SIGMA_B: f64 = 3.0;

fn manifest() -> pb::RunManifest {
    pb::RunManifest {
        title: "Adaptive clipping on devices".into(),
        purpose: "Devices send noised clip bits".into(),
        owner: "tests@example.com".into(),
        data_elements_used: vec![pb::DataElement {
            element: "ratings".into(),
            rationale: String::new(),
        }],
        privacy_mode: pb::PrivacyMode::Local as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: 100.0,
            delta: 1e-6,
        }),
        clip_norm: 1.0,
        noise_multiplier: Z,
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
        rounds: 2,
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
        adaptive_clipping: Some(pb::AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_multiplier: SIGMA_B,
        }),
        ..Default::default()
    }
}

fn device(dir: &std::path::Path, n: usize) -> Device {
    let mut d = Device::open(dir.join(format!("d{n}.db")), DeviceConfig::default()).unwrap();
    let mut lines = String::new();
    for i in 0..ITEMS {
        lines += &format!("{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"Drama\"]}}\n");
    }
    for j in 0..4 {
        let item = (n + 3 * j) % ITEMS as usize;
        let value = 1 + (n + j) % 5;
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    d.ingest_jsonl(&lines, false, Timestamp::now()).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_send_noised_clip_bits_and_the_coordinators_clip_norm_moves() {
    let server = TestServer::start().await;
    let run_id = server
        .admin()
        .await
        .create_run(admin(pb::CreateRunRequest {
            manifest: Some(manifest()),
            request_id: "adaptive".into(),
            simulation_seed: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let dir = tempfile::tempdir().unwrap();
    let config = ParticipationConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        ..ParticipationConfig::default()
    };
    let mut handles = vec![];
    for n in 0..3 {
        let mut d = device(dir.path(), n);
        let mut client = server.client(config.clone()).await;
        handles.push(tokio::spawn(async move {
            let options = ParticipateOptions {
                rounds: 2,
                give_up_after: Some(Duration::from_secs(20)),
                ..ParticipateOptions::default()
            };
            let report = participate(&mut d, &mut client, APP_KEY, &options, &mut |_| {})
                .await
                .unwrap();
            (d, report)
        }));
    }
    // Each device recorded its two (update, bit) pairs as two local releases at the combined
    // multiplier z: exactly what a fresh accountant says for two such releases.
    let mut expected = Budget::new(
        DeviceConfig::default().budget_epsilon,
        DeviceConfig::default().budget_delta,
    )
    .unwrap();
    let pair = RoundRelease {
        mode: PrivacyMode::Local,
        noise_multiplier: Z,
        sampling_rate: 1.0,
    };
    expected.spend(&pair).unwrap();
    let expected = expected.spend(&pair).unwrap().epsilon;
    for h in handles {
        let (d, report) = h.await.unwrap();
        assert_eq!(report.uploads, 2, "{:#?}", report.events);
        let b = d.budget().unwrap();
        assert_eq!(b.rounds, 2);
        assert!(
            (b.epsilon_spent - expected).abs() <= 1e-9 * expected,
            "device spent {} for two pairs, expected {expected}",
            b.epsilon_spent
        );
        // The update itself carried the raised σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) > z.
        let sigma_delta = (Z.powi(-2) - (2.0 * SIGMA_B).powi(-2)).powf(-0.5);
        assert!(
            b.uploads
                .iter()
                .all(|u| (u.noise_multiplier - sigma_delta).abs() < 1e-12),
            "{:?}",
            b.uploads
        );
    }
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
        if run.rounds_committed >= 2 || Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.rounds_committed, 2, "{run:?}");
    // Two rounds of noised bits moved C off its initial 1.0.
    assert!(
        run.current_clip_norm.is_finite()
            && run.current_clip_norm > 0.0
            && run.current_clip_norm != 1.0,
        "{run:?}"
    );
    let verification = admin_client
        .verify_ledger(admin(pb::VerifyLedgerRequest {
            run_id: run_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(verification.intact, "{verification:?}");
    server.running.shutdown().await.unwrap();
}
