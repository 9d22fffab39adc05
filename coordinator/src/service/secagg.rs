//! `fedpref.v1.SecureAggregationService`: the key, share and unmasking stages of a
//! DISTRIBUTED round (the masked input itself arrives through `DeviceService.UploadUpdate`).
//!
//! Authentication, rate and concurrency limits are those of `DeviceService`
//! (`authorization: Bearer <device token>`). Every message is checked for its shape here —
//! key lengths, indices, share kinds — with `INVALID_ARGUMENT` naming the field; the engine
//! then decides what only it can (round, task token, stage, neighbours, repeats, the safety
//! rule) and its rejections map to `INVALID_ARGUMENT` / `FAILED_PRECONDITION` as for uploads.

use std::sync::Arc;

use fedpref_proto::v1::{self as pb, secure_aggregation_service_server::SecureAggregationService};
use fedpref_secagg::messages::public_key_from_slice;
use fedpref_secagg::{
    AdvertiseKeys, EncryptedShare, Graph, RevealedShare, ServerStage, ShareKeys, ShareKind, Unmask,
};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use super::convert::{reject_status, task_ref};
use super::{Shared, auth, coordinator_status, duration, invalid, now_ms, timestamp};
use crate::engine::{Action, Event};
use crate::secure_round::{SecureRoundInfo, StageInput};

/// How long a device should wait after `AdvertiseKeys` or `ShareKeys` before its first
/// `GetStage`, in ms (`GetStage` itself answers with an interval that grows with the cohort),
/// unless the request rate needs longer (see [`SecureAggregationApi::poll_after_ms`]).
pub const POLL_AFTER_MS: i64 = 100;

/// What `StageUpdate.abort_reason` says to every device of an abandoned round. The
/// coordinator's own reason can name participants (which one's shares could not be
/// recovered, which dropped); it goes to the coordinator's log and the ledger only.
pub const ABORT_REASON_FOR_DEVICES: &str = "the round was abandoned: too few devices completed a \
     stage, or the coordinator could not finish the round; no model was released from it";

/// The SecureAggregationService implementation.
pub struct SecureAggregationApi {
    shared: Arc<Shared>,
}

impl SecureAggregationApi {
    /// Serves devices from the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The polling interval to hand out, ms: at least `suggested`, and long enough that a
    /// device following it polls at no more than half its sustained request rate
    /// (`limits.device_requests_per_second`), so the other half is left for its own messages
    /// (`ShareKeys`, `UploadUpdate`, `Unmask`), which draw from the same bucket. Capped at a
    /// minute.
    fn poll_after_ms(&self, suggested: i64) -> i64 {
        let rate = self.shared.limits.device_requests_per_second;
        let floor = if rate > 0.0 {
            (2_000.0 / rate).ceil().min(60_000.0) as i64
        } else {
            60_000
        };
        suggested.max(floor)
    }

    /// A concurrency permit, the caller's device id, and a token from its rate bucket.
    async fn admit(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(String, OwnedSemaphorePermit), Status> {
        let permit = self.shared.concurrency.acquire()?;
        let device = auth::device(&self.shared, metadata).await?;
        self.shared.rate.check(&device)?;
        Ok((device, permit))
    }

    /// Hands `event` to the run's engine and answers with its verdict on `device`'s message.
    async fn submit(&self, run_id: String, device: String, event: Event) -> Result<(), Status> {
        self.shared
            .blocking(move |c| {
                super::require_task_in_run(c, &run_id, &device)?;
                if c.engine(&run_id).is_none() {
                    return Err(Status::failed_precondition(format!(
                        "run {run_id:?} is not active"
                    )));
                }
                let actions = c
                    .handle(&run_id, event, now_ms())
                    .map_err(coordinator_status)?;
                for action in actions {
                    match action {
                        Action::SecAggAccepted { device: d, .. }
                        | Action::UpdateAccepted { device: d, .. }
                            if d == device =>
                        {
                            return Ok(());
                        }
                        Action::Reject {
                            device: d,
                            rejection,
                        } if d == device => {
                            return Err(reject_status(rejection.kind, rejection.message));
                        }
                        _ => {}
                    }
                }
                Err(Status::failed_precondition(
                    "the round closed before the message arrived",
                ))
            })
            .await
    }
}

/// A round's public parameters as the protocol's `SecureAggregationRound`.
pub fn round_to_proto(info: &SecureRoundInfo) -> pb::SecureAggregationRound {
    let config = &info.config;
    let (neighbour_count, graph_seed) = match config.graph {
        Graph::Complete => (0, vec![]),
        Graph::Harary { degree, seed } => (degree, seed.to_vec()),
    };
    let mechanism = &info.plan.mechanism;
    pb::SecureAggregationRound {
        round_context: config.context.0.to_vec(),
        cohort_size: config.cohort_size,
        threshold: config.threshold,
        neighbour_count,
        graph_seed,
        min_contributors: config.min_contributors,
        fixed_point_scale: config.encoding.params().scale,
        dimension: config.dimension() as u64,
        device_noise_variance: mechanism.device_variance(),
        rounding_beta: info.plan.rounding_beta,
        assumed_honest_devices: u32::try_from(mechanism.honest_devices()).unwrap_or(u32::MAX),
        advertise_keys_deadline: Some(timestamp(info.deadlines[0])),
        share_keys_deadline: Some(timestamp(info.deadlines[1])),
        masked_input_deadline: Some(timestamp(info.deadlines[2])),
        unmasking_deadline: Some(timestamp(info.deadlines[3])),
    }
}

fn stage_to_proto(stage: &ServerStage) -> pb::SecAggStage {
    match stage {
        ServerStage::AdvertiseKeys => pb::SecAggStage::AdvertiseKeys,
        ServerStage::ShareKeys => pb::SecAggStage::ShareKeys,
        ServerStage::MaskedInput => pb::SecAggStage::MaskedInput,
        ServerStage::Unmasking => pb::SecAggStage::Unmasking,
        ServerStage::Completed => pb::SecAggStage::Completed,
        ServerStage::Aborted(_) => pb::SecAggStage::Aborted,
    }
}

fn keys_to_proto(k: &fedpref_secagg::ParticipantKeys) -> pb::ParticipantKeys {
    pb::ParticipantKeys {
        participant_index: k.participant_index,
        encryption_public_key: k.encryption_public_key.to_vec(),
        masking_public_key: k.masking_public_key.to_vec(),
    }
}

fn share_to_proto(s: &EncryptedShare) -> pb::EncryptedShare {
    pb::EncryptedShare {
        sender_index: s.sender_index,
        recipient_index: s.recipient_index,
        ciphertext: s.ciphertext.clone(),
    }
}

/// The largest share ciphertext accepted before the engine checks the exact length.
const MAX_CIPHERTEXT_BYTES: usize = 1024;
/// The largest revealed share accepted before the engine parses it.
const MAX_SHARE_BYTES: usize = 256;

#[tonic::async_trait]
impl SecureAggregationService for SecureAggregationApi {
    async fn advertise_keys(
        &self,
        request: Request<pb::AdvertiseKeysRequest>,
    ) -> Result<Response<pb::AdvertiseKeysResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        let task = task_ref(r.task.as_ref(), "task")?;
        let keys = AdvertiseKeys {
            encryption_public_key: public_key_from_slice(
                "encryption_public_key",
                &r.encryption_public_key,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
            masking_public_key: public_key_from_slice("masking_public_key", &r.masking_public_key)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        let event = Event::SecAggKeys {
            device: device.clone(),
            round: task.round_id,
            task_token: task.task_token,
            keys,
        };
        self.submit(task.run_id, device, event).await?;
        Ok(Response::new(pb::AdvertiseKeysResponse {
            poll_after: Some(duration(self.poll_after_ms(POLL_AFTER_MS))),
        }))
    }

    async fn get_stage(
        &self,
        request: Request<pb::GetStageRequest>,
    ) -> Result<Response<pb::StageUpdate>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let task = task_ref(request.get_ref().task.as_ref(), "task")?;
        let view = self
            .shared
            .blocking(move |c| {
                let run_id = task.run_id;
                super::require_task_in_run(c, &run_id, &device)?;
                if c.engine(&run_id).is_none() {
                    return Err(Status::failed_precondition(format!(
                        "run {run_id:?} is not active"
                    )));
                }
                // Close whatever stage is due first, so the answer is current.
                c.handle(&run_id, Event::Tick, now_ms())
                    .map_err(coordinator_status)?;
                let engine = c.engine(&run_id).expect("checked");
                engine
                    .secure_stage(&device, task.round_id, &task.task_token)
                    .map_err(|r| reject_status(r.kind, r.message))
            })
            .await?;
        let input = match view.input {
            StageInput::None => None,
            StageInput::KeyDirectory(d) => {
                Some(pb::stage_update::Input::KeyDirectory(pb::KeyDirectory {
                    own_index: d.own_index,
                    neighbours: d.neighbours.iter().map(keys_to_proto).collect(),
                    threshold: d.threshold,
                }))
            }
            StageInput::ShareInbox(i) => {
                Some(pb::stage_update::Input::ShareInbox(pb::ShareInbox {
                    shares: i.shares.iter().map(share_to_proto).collect(),
                }))
            }
            StageInput::UnmaskingPlan(p) => {
                Some(pb::stage_update::Input::UnmaskingPlan(pb::UnmaskingPlan {
                    survivor_indices: p.survivor_indices,
                    dropped_indices: p.dropped_indices,
                }))
            }
        };
        Ok(Response::new(pb::StageUpdate {
            stage: stage_to_proto(&view.stage) as i32,
            stage_deadline: Some(timestamp(view.deadline_ms)),
            poll_after: Some(duration(self.poll_after_ms(view.poll_after_ms))),
            input,
            abort_reason: match view.stage {
                ServerStage::Aborted(_) => ABORT_REASON_FOR_DEVICES.to_string(),
                _ => String::new(),
            },
        }))
    }

    async fn share_keys(
        &self,
        request: Request<pb::ShareKeysRequest>,
    ) -> Result<Response<pb::ShareKeysResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        let task = task_ref(r.task.as_ref(), "task")?;
        if r.shares.is_empty() {
            return Err(invalid("shares", "must hold one ciphertext per neighbour"));
        }
        let mut shares = Vec::with_capacity(r.shares.len());
        for (i, s) in r.shares.into_iter().enumerate() {
            for (name, v) in [
                ("sender_index", s.sender_index),
                ("recipient_index", s.recipient_index),
            ] {
                if v == 0 {
                    return Err(invalid(
                        &format!("shares[{i}].{name}"),
                        "must be a participant index, at least 1",
                    ));
                }
            }
            if s.ciphertext.is_empty() || s.ciphertext.len() > MAX_CIPHERTEXT_BYTES {
                return Err(invalid(
                    &format!("shares[{i}].ciphertext"),
                    format!(
                        "{} bytes; must be 1 to {MAX_CIPHERTEXT_BYTES}",
                        s.ciphertext.len()
                    ),
                ));
            }
            shares.push(EncryptedShare {
                sender_index: s.sender_index,
                recipient_index: s.recipient_index,
                ciphertext: s.ciphertext,
            });
        }
        let event = Event::SecAggShares {
            device: device.clone(),
            round: task.round_id,
            task_token: task.task_token,
            shares: ShareKeys { shares },
        };
        self.submit(task.run_id, device, event).await?;
        Ok(Response::new(pb::ShareKeysResponse {
            poll_after: Some(duration(self.poll_after_ms(POLL_AFTER_MS))),
        }))
    }

    async fn unmask(
        &self,
        request: Request<pb::UnmaskRequest>,
    ) -> Result<Response<pb::UnmaskResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        let task = task_ref(r.task.as_ref(), "task")?;
        let mut shares = Vec::with_capacity(r.shares.len());
        for (i, s) in r.shares.into_iter().enumerate() {
            if s.owner_index == 0 {
                return Err(invalid(
                    &format!("shares[{i}].owner_index"),
                    "must be a participant index, at least 1",
                ));
            }
            let kind = match pb::ShareKind::try_from(s.kind) {
                Ok(pb::ShareKind::SelfMaskSeed) => ShareKind::SelfMaskSeed,
                Ok(pb::ShareKind::MaskingKey) => ShareKind::MaskingKey,
                _ => {
                    return Err(invalid(
                        &format!("shares[{i}].kind"),
                        "must be SHARE_KIND_SELF_MASK_SEED or SHARE_KIND_MASKING_KEY",
                    ));
                }
            };
            if s.share.is_empty() || s.share.len() > MAX_SHARE_BYTES {
                return Err(invalid(
                    &format!("shares[{i}].share"),
                    format!("{} bytes; must be 1 to {MAX_SHARE_BYTES}", s.share.len()),
                ));
            }
            shares.push(RevealedShare {
                owner_index: s.owner_index,
                kind,
                share: s.share,
            });
        }
        let event = Event::SecAggUnmask {
            device: device.clone(),
            round: task.round_id,
            task_token: task.task_token,
            unmask: Unmask { shares },
        };
        self.submit(task.run_id, device, event).await?;
        Ok(Response::new(pb::UnmaskResponse {}))
    }
}
