//! Representative messages survive encoding and decoding unchanged, and the
//! documented wire conventions (chunked model download, forward compatibility)
//! hold.

use std::fmt::Debug;

use fedpref_proto::prost::Message;
use fedpref_proto::prost_types::{Duration, Timestamp};
use fedpref_proto::v1::{
    Accountant, AlertAction, Audience, ConsentModel, KeyDirectory, ParticipantKeys, SecAggStage,
    ThresholdDirection,
};
use fedpref_proto::v1::{
    AudienceEpsilon, AudienceSpend, CheckInRequest, CheckInResponse, CohortSampling, ComeBackLater,
    ComeBackReason, DataElement, Dtype, Eligibility, EpsilonAssumption, FedAdaptive,
    GuardrailMetric, GuardrailMetricKind, HarmScenario, Kpi, LedgerEntry, LedgerEntryKind,
    LocalTrainingConfig, MatrixFactorizationSpec, ModelChunk, ModelSnapshot, ModelSpec,
    ModelVersionRef, NamedTensor, OptOutPolicy, ParticipationLimits, PoissonSampling,
    PoissonSamplingAssumption, PrivacyBudget, PrivacyMode, PrivateFit, PrivateFitMethod, RdpPoint,
    ReportMetricsRequest, RunManifest, Sampling, ServerOptimizer, StageUpdate, Task, TaskRef,
    TensorChunk, UpdateHeader, UploadUpdateRequest, check_in_response::Outcome, epsilon_assumption,
    model_spec, sampling, server_optimizer, stage_update, upload_update_request::Part,
};

fn assert_round_trips<M: Message + Default + PartialEq + Debug>(message: &M) {
    let wire = message.encode_to_vec();
    assert_eq!(wire.len(), message.encoded_len());
    let back = M::decode(wire.as_slice()).expect("a message we encoded decodes");
    assert_eq!(&back, message);
}

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

fn secs(seconds: i64) -> Option<Duration> {
    Some(Duration { seconds, nanos: 0 })
}

fn sha(byte: u8) -> Vec<u8> {
    vec![byte; fedpref_proto::SHA256_LEN]
}

fn manifest() -> RunManifest {
    RunManifest {
        title: "news-recs-2026-q4".into(),
        purpose: "Recommend articles a reader is likely to enjoy".into(),
        owner: "Personalisation team".into(),
        data_elements_used: vec![DataElement {
            element: "explicit ratings of articles".into(),
            rationale: "the training target".into(),
        }],
        data_elements_not_used: vec![DataElement {
            element: "precise location".into(),
            rationale: "not needed for relevance".into(),
        }],
        privacy_mode: PrivacyMode::Central as i32,
        budget: Some(PrivacyBudget {
            epsilon: 8.0,
            delta: 1e-5,
        }),
        clip_norm: 1.0,
        noise_multiplier: 0.0,
        target_epsilon: Some(8.0),
        sampling: Some(Sampling {
            method: Some(sampling::Method::Poisson(PoissonSampling {
                sampling_rate: 0.01,
                population_size: 100_000,
                round_duration: secs(600),
            })),
        }),
        rounds: 200,
        participation_limits: Some(ParticipationLimits {
            min_separation_rounds: 10,
            max_participations: 5,
        }),
        server_optimizer: Some(ServerOptimizer {
            optimizer: Some(server_optimizer::Optimizer::Fedadam(FedAdaptive {
                server_learning_rate: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            })),
        }),
        adaptive_clipping: None,
        model: Some(ModelSpec {
            model: Some(model_spec::Model::MatrixFactorization(
                MatrixFactorizationSpec {
                    item_count: 1682,
                    factor_dimension: 16,
                    item_biases: true,
                    global_offset: true,
                    init_stddev: 0.1,
                    init_seed: Some(42),
                },
            )),
        }),
        local_training: Some(training()),
        secure_aggregation: None,
        opt_out_policy: Some(OptOutPolicy {
            consent_model: ConsentModel::OptIn as i32,
            description: "Settings > Privacy > Help improve recommendations".into(),
            withdrawal_effect: "the device stops taking part at once".into(),
        }),
        harm_scenarios: vec![HarmScenario {
            scenario: "filter bubble".into(),
            affected_groups: "all readers".into(),
            mitigation: "20% diversity injection".into(),
            residual_risk: "low".into(),
        }],
        kpis: vec![Kpi {
            metric: "rmse".into(),
            description: "test RMSE on held-out examples".into(),
            target: Some(0.95),
            higher_is_better: false,
        }],
        guardrail_metrics: vec![GuardrailMetric {
            metric: GuardrailMetricKind::NegativeFeedbackRate as i32,
            direction: ThresholdDirection::Above as i32,
            threshold: 0.2,
            on_alert: AlertAction::Pause as i32,
            minimum_reporting_devices: 50,
        }],
        accountant: Accountant::Rdp as i32,
    }
}

fn training() -> LocalTrainingConfig {
    LocalTrainingConfig {
        private_fit: Some(PrivateFit {
            method: PrivateFitMethod::Ridge as i32,
            l2_regularization: 0.1,
            epochs: 0,
            learning_rate: 0.0,
        }),
        epochs: 1,
        batch_size: 0,
        learning_rate: 0.05,
        l2_regularization: 1e-4,
        max_examples: 300,
    }
}

#[test]
fn a_full_run_manifest_round_trips() {
    assert_round_trips(&manifest());
}

#[test]
fn check_in_and_its_task_answer_round_trip() {
    assert_round_trips(&CheckInRequest {
        sdk_version: "0.1.0".into(),
        held_model: Some(ModelVersionRef {
            run_id: "run-1".into(),
            model_version: 3,
            sha256: sha(3),
            size_bytes: 1 << 20,
        }),
        eligibility: Some(Eligibility {
            device_conditions_met: true,
            privacy_budget_available: true,
        }),
    });
    assert_round_trips(&CheckInResponse {
        outcome: Some(Outcome::Task(Task {
            run_id: "run-1".into(),
            round_id: 4,
            task_token: "tok".into(),
            model: Some(ModelVersionRef {
                run_id: "run-1".into(),
                model_version: 4,
                sha256: sha(4),
                size_bytes: 2 << 20,
            }),
            local_training: Some(training()),
            privacy_mode: PrivacyMode::Local as i32,
            clip_norm: 1.0,
            noise_multiplier: 1.1,
            upload_deadline: at(1_800_000_000),
            clip_bit_requested: true,
            clip_bit_noise_stddev: 10.0,
            update_tensors: vec![
                NamedTensor::from_f32("item_factors", vec![2, 2], &[0.0; 4])
                    .unwrap()
                    .spec(),
            ],
            max_upload_bytes: 64 << 20,
            max_chunk_bytes: 1 << 20,
            secure_aggregation: None,
            secure_aggregation_round: None,
            evaluation_token: "eval-tok".into(),
            evaluation_noise_multiplier: 4.0,
        })),
        latest_model: None,
    });
    assert_round_trips(&CheckInResponse {
        outcome: Some(Outcome::ComeBackLater(ComeBackLater {
            retry_after: secs(3600),
            reason: ComeBackReason::ParticipationLimit as i32,
            detail: "took part 2 rounds ago; minimum separation is 10".into(),
        })),
        latest_model: None,
    });
}

#[test]
fn upload_header_and_chunks_round_trip() {
    assert_round_trips(&UploadUpdateRequest {
        part: Some(Part::Header(UpdateHeader {
            task: Some(TaskRef {
                run_id: "run-1".into(),
                round_id: 4,
                task_token: "tok".into(),
            }),
            base_model_version: 4,
            tensors: vec![],
            privacy_mode: PrivacyMode::Local as i32,
            clip_norm: 1.0,
            noise_multiplier: 1.1,
            clip_bit: Some(0.93),
            update_sha256: sha(9),
        })),
    });
    assert_round_trips(&UploadUpdateRequest {
        part: Some(Part::Chunk(TensorChunk {
            tensor_index: 1,
            offset: 4096,
            content: vec![1, 2, 3, 4].into(),
        })),
    });
}

#[test]
fn a_ledger_entry_round_trips_with_its_hashes() {
    assert_round_trips(&LedgerEntry {
        sequence: 12,
        run_id: "run-1".into(),
        round_id: 11,
        kind: LedgerEntryKind::RoundSpent as i32,
        recorded_at: at(1_800_000_000),
        privacy_mode: PrivacyMode::Central as i32,
        spend: vec![AudienceSpend {
            audience: Audience::ReleasedModels as i32,
            epsilon_spent: 0.05,
            epsilon_cumulative: 1.23,
            assumption: Some(EpsilonAssumption {
                assumption: Some(epsilon_assumption::Assumption::PoissonSampling(
                    PoissonSamplingAssumption {
                        population_size: 100_000,
                        sampling_rate: 0.01,
                    },
                )),
            }),
            accountant: Accountant::Pld as i32,
            rdp_increments: vec![RdpPoint {
                order: 8.0,
                rdp_epsilon: 0.0012,
            }],
        }],
        delta: 1e-5,
        noise_multiplier: 1.1,
        sampling_rate: 0.01,
        clip_norm: 1.0,
        participants: 987,
        expected_cohort_size: 1000,
        model_version: 12,
        model_sha256: sha(12),
        next_clip_norm: Some(0.9),
        actor: "engine".into(),
        previous_hash: sha(0xaa),
        entry_hash: sha(0xbb),
        ..Default::default()
    });
}

#[test]
fn metrics_reports_round_trip() {
    assert_round_trips(&ReportMetricsRequest {
        run_id: "run-1".into(),
        model_version: 12,
        evaluation_token: "tok".into(),
        released_rates: vec![
            0.25, -3.5, 7.0, 0.0, 0.5, -0.5, 1.0, 2.0, -2.0, 0.1, 0.2, 0.3,
        ],
        noise_multiplier: 4.0,
    });
}

#[test]
fn secure_aggregation_stage_updates_round_trip() {
    assert_round_trips(&StageUpdate {
        stage: SecAggStage::ShareKeys as i32,
        stage_deadline: at(1_800_000_060),
        poll_after: secs(5),
        input: Some(stage_update::Input::KeyDirectory(KeyDirectory {
            own_index: 3,
            neighbours: vec![ParticipantKeys {
                participant_index: 4,
                encryption_public_key: vec![7; 32],
                masking_public_key: vec![8; 32],
            }],
            threshold: 30,
        })),
        abort_reason: String::new(),
    });
}

#[test]
fn a_model_snapshot_split_into_chunks_reassembles_to_the_same_model() {
    let factors: Vec<f32> = (0..200 * 8).map(|i| i as f32 * 0.001).collect();
    let snapshot = ModelSnapshot {
        run_id: "run-1".into(),
        model_version: 5,
        spec: None,
        tensors: vec![
            NamedTensor::from_f32("item_factors", vec![200, 8], &factors).unwrap(),
            NamedTensor::from_f32("global_offset", vec![], &[3.5]).unwrap(),
        ],
        item_keys: (0..200).map(|i| format!("i{i}")).collect(),
        produced_by_round: 4,
        restored_model_version: 0,
        published_at: at(1_800_000_000),
    };
    let encoded = snapshot.encode_to_vec();
    let chunk_size = 1000;
    let chunks: Vec<ModelChunk> = encoded
        .chunks(chunk_size)
        .enumerate()
        .map(|(i, content)| ModelChunk {
            run_id: "run-1".into(),
            model_version: 5,
            total_size_bytes: encoded.len() as u64,
            model_sha256: sha(5),
            offset: (i * chunk_size) as u64,
            content: content.to_vec(),
        })
        .collect();
    assert!(chunks.len() > 1);
    // Over the wire and back, then resumed from the third chunk's offset.
    let received: Vec<ModelChunk> = chunks
        .iter()
        .map(|c| ModelChunk::decode(c.encode_to_vec().as_slice()).unwrap())
        .collect();
    let mut reassembled = Vec::new();
    for chunk in &received {
        assert_eq!(
            chunk.offset as usize,
            reassembled.len(),
            "chunks are contiguous"
        );
        reassembled.extend_from_slice(&chunk.content);
    }
    assert_eq!(reassembled.len() as u64, received[0].total_size_bytes);
    let back = ModelSnapshot::decode(reassembled.as_slice()).unwrap();
    assert_eq!(back, snapshot);
    assert_eq!(back.tensors[0].to_f32_vec().unwrap(), factors);
    assert_eq!(back.tensors[1].dtype(), Dtype::F32);
}

#[test]
fn a_message_from_a_newer_protocol_with_unknown_fields_still_decodes() {
    let mut wire = AudienceEpsilon {
        audience: Audience::ReleasedModels as i32,
        epsilon: 2.5,
        assumption: None,
        accountant: Accountant::Pld as i32,
    }
    .encode_to_vec();
    // Field 999, varint 1: a field this version does not know.
    wire.extend_from_slice(&[0xb8, 0x3e, 0x01]);
    let back = AudienceEpsilon::decode(wire.as_slice()).unwrap();
    assert_eq!(back.epsilon, 2.5);
    assert_eq!(back.audience(), Audience::ReleasedModels);
}

#[test]
fn cohort_sampling_round_trips() {
    assert_round_trips(&Sampling {
        method: Some(sampling::Method::Cohort(CohortSampling {
            target_cohort_size: 100,
            round_deadline: secs(900),
            minimum_cohort_size: 50,
        })),
    });
}
