//! One task in distributed mode: the device's side of the secure-aggregation stages.
//!
//! 1. **Check** the round's parameters ([`DistributedRound::from_task`]: overflow bound,
//!    threshold, graph, honest devices, noise) and the user's budget and settings
//!    ([`Device::check_share`]) before anything is sent; a refusal gives the task back.
//! 2. **AdvertiseKeys** with two fresh X25519 public keys, then poll `GetStage` (waiting at
//!    least the coordinator's `poll_after` between polls) until SHARE_KEYS.
//! 3. **ShareKeys**: the encrypted Shamir shares for the device's neighbours.
//! 4. **Prepare the share** ([`Device::prepare_share`]: train, clip, round and noise in
//!    integers with OS-seeded randomness, encode, record the spend), then poll until
//!    MASKED_INPUT and **upload** the masked input as `DTYPE_U32` tensors with `UploadUpdate`.
//! 5. Poll until UNMASKING and **Unmask**: one share per neighbour, of its self-mask seed or
//!    its masking key as the plan says — never both (the secagg client refuses such a plan).
//!
//! While the device waits to act in a stage, it gives up once that stage's deadline (from
//! the task) has passed, or when the coordinator reports the round ABORTED, moved past the
//! stage, or reached it without input for the device (the coordinator's sign that the
//! device missed a stage): the round then goes on (or not) without it, which the protocol
//! tolerates. Errors name the stage.

use std::time::Duration;

use fedpref_proto::v1::{self as pb, stage_update::Input};
use fedpref_secagg::Client;
use tonic::Code;

use super::{
    CoordinatorClient, ParticipationError, ParticipationEvent, decline_reason, local_training,
};
use crate::device::Device;
use crate::model::PreferenceModel;
use crate::secure_aggregation::{
    DistributedRound, advertise_request, key_directory, share_inbox, share_keys_request,
    unmask_request, unmasking_plan,
};
use crate::time::Timestamp;
use crate::upload::TrainingTask;
use fedpref_privacy::PrivacyMode;

/// The shortest pause between two polls, whatever `poll_after` says.
const MIN_POLL: Duration = Duration::from_millis(20);
/// The pause between polls when the coordinator gives none.
const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// How a distributed task ended for the device.
pub(super) enum Outcome {
    /// The masked input was accepted (the device may also have answered the unmasking).
    Uploaded,
    /// The coordinator refused the masked input (e.g. its stage had closed).
    Refused,
    /// The task was given back before anything was spent.
    Declined {
        /// Why.
        reason: pb::DeclineReason,
        /// How long the coordinator asked the device to wait.
        wait: Duration,
    },
    /// The round went on without the device, or was abandoned.
    Left,
}

fn secagg_error(stage: &'static str, e: impl std::fmt::Display) -> ParticipationError {
    ParticipationError::SecureAggregation {
        stage,
        message: e.to_string(),
    }
}

async fn decline(
    client: &mut CoordinatorClient,
    task: &pb::Task,
    reason: pb::DeclineReason,
    why: String,
    emit: &mut (dyn FnMut(ParticipationEvent) + Send),
) -> Result<Outcome, ParticipationError> {
    // A coordinator that has moved the round on no longer takes the task back; the device
    // simply is not in the sum.
    let wait = client
        .give_back(task, reason)
        .await?
        .unwrap_or(Duration::ZERO);
    emit(ParticipationEvent::Declined {
        round_id: task.round_id,
        reason: reason.as_str_name().to_string(),
        why,
    });
    Ok(Outcome::Declined { reason, wait })
}

fn stage_name(stage: pb::SecAggStage) -> &'static str {
    match stage {
        pb::SecAggStage::AdvertiseKeys => "advertise_keys",
        pb::SecAggStage::ShareKeys => "share_keys",
        pb::SecAggStage::MaskedInput => "masked_input",
        pb::SecAggStage::Unmasking => "unmasking",
        pb::SecAggStage::Completed => "completed",
        pb::SecAggStage::Aborted => "aborted",
        pb::SecAggStage::Unspecified => "unspecified",
    }
}

/// Polls `GetStage` until the round reaches `target`, honouring `poll_after`. Returns None
/// (after emitting why) when the round was aborted, moved past `target`, or `deadline`
/// passed first.
async fn wait_for(
    client: &mut CoordinatorClient,
    task: &pb::Task,
    target: pb::SecAggStage,
    deadline: Option<i64>,
    first_wait: Duration,
    emit: &mut (dyn FnMut(ParticipationEvent) + Send),
) -> Result<Option<pb::StageUpdate>, ParticipationError> {
    let mut wait = first_wait;
    loop {
        if !wait.is_zero() {
            tokio::time::sleep(wait.max(MIN_POLL)).await;
        }
        let update = client.get_stage(task).await?;
        let stage = pb::SecAggStage::try_from(update.stage).unwrap_or(pb::SecAggStage::Unspecified);
        let left = |reason: String| ParticipationEvent::SecureAggregationLeft {
            round_id: task.round_id,
            stage: stage_name(target).to_string(),
            reason,
        };
        if stage == target {
            if update.input.is_none() {
                // The coordinator's way of saying the device missed a stage: it is out.
                emit(left(
                    "the coordinator no longer counts this device in the round (it missed a stage)"
                        .into(),
                ));
                return Ok(None);
            }
            return Ok(Some(update));
        }
        match stage {
            pb::SecAggStage::Unspecified => {
                return Err(ParticipationError::Rejected {
                    call: "GetStage",
                    code: Code::Internal,
                    message: format!(
                        "waiting for {}: the coordinator sent stage {} (unspecified or unknown)",
                        stage_name(target),
                        update.stage
                    ),
                });
            }
            pb::SecAggStage::Aborted => {
                emit(left(format!(
                    "the coordinator abandoned the round: {}",
                    update.abort_reason
                )));
                return Ok(None);
            }
            pb::SecAggStage::Completed if target == pb::SecAggStage::Unmasking => {
                emit(left(
                    "the sum was unmasked without needing this device's shares".into(),
                ));
                return Ok(None);
            }
            s if (s as i32) > (target as i32) => {
                emit(left(format!(
                    "the round moved on to {} before the device could act in {}",
                    stage_name(s),
                    stage_name(target)
                )));
                return Ok(None);
            }
            _ => {}
        }
        let now = Timestamp::now().millis();
        if let Some(d) = deadline
            && now >= d
        {
            emit(left(format!(
                "the {} stage's deadline passed while the round was still at {}",
                stage_name(target),
                stage_name(stage)
            )));
            return Ok(None);
        }
        wait = update
            .poll_after
            .map_or(DEFAULT_POLL, super::to_duration)
            .max(MIN_POLL);
        if let Some(d) = deadline {
            // Wake up at the deadline at the latest, to give up on time.
            let until = Duration::from_millis(u64::try_from(d - now).unwrap_or(0));
            wait = wait.min(until.max(MIN_POLL));
        }
    }
}

/// Takes part in one distributed task (see the module docs). The model is installed and the
/// deadline, mode and layout checks of [`super::participate`] have passed.
pub(super) async fn take_part(
    device: &mut Device,
    client: &mut CoordinatorClient,
    task: &pb::Task,
    model_version: u64,
    emit: &mut (dyn FnMut(ParticipationEvent) + Send),
) -> Result<Outcome, ParticipationError> {
    let round_id = task.round_id;
    let stage_done = |stage: &str, detail: String| ParticipationEvent::SecureAggregationStage {
        round_id,
        stage: stage.to_string(),
        detail,
    };
    // 1. Everything that can be refused for free, before the device says anything.
    let dimension = device.model().map_or(0, |m| m.layout().dimension());
    let round = match DistributedRound::from_task(task, dimension) {
        Ok(round) => round,
        Err(e) => {
            return decline(
                client,
                task,
                pb::DeclineReason::TrainingFailed,
                e.to_string(),
                emit,
            )
            .await;
        }
    };
    if let Err(e) = device.check_share(&round) {
        return decline(client, task, decline_reason(&e), e.to_string(), emit).await;
    }

    // 2. Advertise keys.
    let mut rng = fedpref_secagg::rng::os_rng().map_err(|e| secagg_error("advertise_keys", e))?;
    let (state, keys) = Client::advertise(round.config.clone(), &mut rng)
        .map_err(|e| secagg_error("advertise_keys", e))?;
    let poll = client
        .advertise_keys(advertise_request(task, &keys))
        .await?;
    emit(stage_done(
        "advertise_keys",
        "sent two fresh X25519 public keys".into(),
    ));

    // 3. Share keys.
    let Some(update) = wait_for(
        client,
        task,
        pb::SecAggStage::ShareKeys,
        round.deadlines.share_keys,
        poll,
        emit,
    )
    .await?
    else {
        return Ok(Outcome::Left);
    };
    let Some(Input::KeyDirectory(directory)) = update.input else {
        return Err(secagg_error(
            "share_keys",
            "the SHARE_KEYS stage came without the device's key_directory",
        ));
    };
    let directory = key_directory(&directory).map_err(|e| secagg_error("share_keys", e))?;
    let (state, shares) = state
        .share_keys(&directory, &mut rng)
        .map_err(|e| secagg_error("share_keys", e))?;
    let poll = client.share_keys(share_keys_request(task, &shares)).await?;
    emit(stage_done(
        "share_keys",
        format!(
            "participant {}: sent {} encrypted shares (threshold {})",
            directory.own_index,
            shares.shares.len(),
            round.config.threshold
        ),
    ));

    // 4. Train, clip, noise, encode, record — then wait for the masked-input stage.
    let training_task = TrainingTask {
        round_id,
        model_version,
        training: local_training(task, device.config().training),
        clip_norm: task.clip_norm,
        noise_multiplier: task.noise_multiplier,
        mode: PrivacyMode::Distributed,
        clip_bit_noise_std: None,
    };
    let share = match device.prepare_share(&training_task, &round, Timestamp::now()) {
        Ok(share) => share,
        Err(e) => {
            return decline(client, task, decline_reason(&e), e.to_string(), emit).await;
        }
    };
    let Some(update) = wait_for(
        client,
        task,
        pb::SecAggStage::MaskedInput,
        round.deadlines.masked_input,
        poll,
        emit,
    )
    .await?
    else {
        return Ok(Outcome::Left);
    };
    let Some(Input::ShareInbox(inbox)) = update.input else {
        return Err(secagg_error(
            "masked_input",
            "the MASKED_INPUT stage came without the device's share_inbox",
        ));
    };
    let (state, masked) = state
        .masked_input(&share_inbox(&inbox), share.encoded())
        .map_err(|e| secagg_error("masked_input", e))?;
    match client.upload_masked_input(task, &share, &masked).await {
        Ok(receipt) => emit(ParticipationEvent::Uploaded {
            round_id,
            bytes: receipt.bytes_received,
            epsilon_spent: share.spent().epsilon,
            receipt_id: receipt.receipt_id,
        }),
        Err(ParticipationError::Rejected {
            code: Code::FailedPrecondition,
            message,
            ..
        }) => {
            emit(ParticipationEvent::UploadRefused { round_id, message });
            return Ok(Outcome::Refused);
        }
        Err(e) => return Err(e),
    }

    // 5. Unmask.
    let Some(update) = wait_for(
        client,
        task,
        pb::SecAggStage::Unmasking,
        round.deadlines.unmasking,
        update.poll_after.map_or(DEFAULT_POLL, super::to_duration),
        emit,
    )
    .await?
    else {
        return Ok(Outcome::Uploaded);
    };
    let Some(Input::UnmaskingPlan(plan)) = update.input else {
        return Err(secagg_error(
            "unmasking",
            "the UNMASKING stage came without the device's unmasking_plan",
        ));
    };
    let reply = state
        .unmask(&unmasking_plan(&plan))
        .map_err(|e| secagg_error("unmasking", e))?;
    client.unmask(unmask_request(task, &reply)).await?;
    emit(stage_done(
        "unmasking",
        format!(
            "revealed {} shares ({} survivors, {} dropped)",
            reply.shares.len(),
            plan.survivor_indices.len(),
            plan.dropped_indices.len()
        ),
    ));
    Ok(Outcome::Uploaded)
}
