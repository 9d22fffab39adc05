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
