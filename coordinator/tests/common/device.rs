//! Device-side requests the gRPC tests share: authenticated requests, a check-in asking for
//! work, and an update for a task's tensors, chunked and uploaded.

use fedpref_proto::metadata::bearer;
use fedpref_proto::v1::{
    self as pb, device_service_client::DeviceServiceClient, upload_update_request::Part,
};
use tonic::Request;
use tonic::transport::Channel;

pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        bearer(token).parse().unwrap(),
    );
    r
}

pub fn check_in_request() -> pb::CheckInRequest {
    pb::CheckInRequest {
        sdk_version: "0.1.0".into(),
        held_model: None,
        eligibility: Some(pb::Eligibility {
            device_conditions_met: true,
            privacy_budget_available: true,
        }),
    }
}

/// The upload stream for a task: the header, then each tensor's f64 bytes in chunks.
pub fn upload_messages(
    task: &pb::Task,
    tensors: &[(pb::TensorSpec, Vec<f64>)],
    chunk_bytes: usize,
) -> Vec<pb::UploadUpdateRequest> {
    let header = pb::UpdateHeader {
        task: Some(pb::TaskRef {
            run_id: task.run_id.clone(),
            round_id: task.round_id,
            task_token: task.task_token.clone(),
        }),
        base_model_version: task.model.as_ref().unwrap().model_version,
        tensors: tensors.iter().map(|(s, _)| s.clone()).collect(),
        privacy_mode: task.privacy_mode,
        clip_norm: task.clip_norm,
        noise_multiplier: task.noise_multiplier,
        ..Default::default()
    };
    let mut out = vec![pb::UploadUpdateRequest {
        part: Some(Part::Header(header)),
    }];
    for (i, (_, values)) in tensors.iter().enumerate() {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (n, piece) in bytes.chunks(chunk_bytes).enumerate() {
            out.push(pb::UploadUpdateRequest {
                part: Some(Part::Chunk(pb::TensorChunk {
                    tensor_index: i as u32,
                    offset: (n * chunk_bytes) as u64,
                    content: piece.to_vec().into(),
                })),
            });
        }
    }
    out
}

/// A small valid update for the task's tensors.
pub fn update_for(task: &pb::Task) -> Vec<(pb::TensorSpec, Vec<f64>)> {
    task.update_tensors
        .iter()
        .map(|s| {
            let n: u64 = s.shape.iter().product();
            (s.clone(), vec![0.001; n as usize])
        })
        .collect()
}

pub async fn upload(
    client: &mut DeviceServiceClient<Channel>,
    token: &str,
    messages: Vec<pb::UploadUpdateRequest>,
) -> Result<pb::UploadReceipt, tonic::Status> {
    client
        .upload_update(authed(tokio_stream::iter(messages), token))
        .await
        .map(|r| r.into_inner())
}

/// A central-DP run over loopback: σ = 1, C = 1, ε budget 100, a cohort of `target` (at least
/// `minimum`) with `round_seconds`-second rounds, 100 items × 4 factors.
pub fn central_manifest(
    target: u32,
    minimum: u32,
    round_seconds: i64,
    rounds: u64,
) -> pb::RunManifest {
    pb::RunManifest {
        title: "Service test".into(),
        purpose: "Exercise the gRPC services".into(),
        owner: "tests@example.com".into(),
        data_elements_used: vec![pb::DataElement {
            element: "ratings".into(),
            rationale: String::new(),
        }],
        privacy_mode: pb::PrivacyMode::Central as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: 100.0,
            delta: 1e-5,
        }),
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        sampling: Some(pb::Sampling {
            method: Some(pb::sampling::Method::Cohort(pb::CohortSampling {
                target_cohort_size: target,
                round_deadline: Some(fedpref_proto::prost_types::Duration {
                    seconds: round_seconds,
                    nanos: 0,
                }),
                minimum_cohort_size: minimum,
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
                    item_count: 100,
                    factor_dimension: 4,
                    item_biases: true,
                    global_offset: true,
                    init_stddev: 0.1,
                    init_seed: Some(7),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        ..Default::default()
    }
}
