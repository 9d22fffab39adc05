//! `fedpref.v1.DeviceService`: enrolment, check-in, model download, update upload, declines
//! and federated-evaluation reports.
//!
//! Check-ins name no run: the device is offered to every run that is not stopped, oldest
//! first, until one gives it a task; otherwise it is told when to come back (the first
//! reason an active run gave). Uploads are validated completely — header, sizes, chunk
//! order, tensor names, shapes, dtypes and finiteness — before the engine sees them; the
//! engine then decides what only it can (round, task token, selection, one update per
//! device per round) and its [`Rejection`](crate::engine::Rejection) kinds map to
//! `INVALID_ARGUMENT` / `FAILED_PRECONDITION` with its message.

use std::pin::Pin;
use std::sync::Arc;

use fedpref_proto::v1::{self as pb, device_service_server::DeviceService};
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{proto_mode, reject_status, task_ref, update_tensors};
use super::{Shared, auth, coordinator_status, duration, invalid, now_ms, timestamp, unhex};
use crate::engine::{Action, Event, RunState};
use crate::store::{EnrolmentCap, EnrolmentCaps};

/// How long a device waits when no run exists at all, in ms.
const NO_RUN_RETRY_MS: i64 = 60_000;
/// How long a redirected device may use the owner's endpoint before checking in here again.
const REDIRECT_VALID_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a device should report evaluation counts, in ms.
const REPORT_EVERY_MS: i64 = 3_600_000;

/// The DeviceService implementation.
pub struct DeviceApi {
    shared: Arc<Shared>,
}

impl DeviceApi {
    /// `UploadUpdate` with every check; the trait method counts its refusals.
    async fn upload_update_checked(
        &self,
        request: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        super::upload::receive(&self.shared, device, request.into_inner())
            .await
            .map(Response::new)
    }

    /// Serves devices from the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
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
}

/// The engine's come-back reasons as the protocol's enum.
fn come_back_reason(reason: &str) -> pb::ComeBackReason {
    match reason {
        "no round is open" => pb::ComeBackReason::RoundNotOpen,
        "the run is paused" => pb::ComeBackReason::RunPaused,
        "the run has stopped" => pb::ComeBackReason::NoActiveRun,
        "the device is not eligible now" => pb::ComeBackReason::NotEligible,
        "this device has already contributed to the open round" => {
            pb::ComeBackReason::AlreadyParticipating
        }
        r if r.starts_with("participation limit") => pb::ComeBackReason::ParticipationLimit,
        _ => pb::ComeBackReason::NotSelected,
    }
}

fn sdk_version(v: &str, field: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "must be a semantic version of at most 64 printable characters",
        ));
    }
    Ok(())
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let _permit = self.shared.concurrency.acquire()?;
        // Enrolment carries no token: rate-limit it by the peer's address instead.
        if let Some(peer) = request.remote_addr() {
            self.shared
                .rate
                .check(&format!("enrol from {}", peer.ip()))?;
        }
        let r = request.into_inner();
        if r.app_key.is_empty() {
            return Err(Status::unauthenticated("app_key: must not be empty"));
        }
        if !auth::app_key_matches(&self.shared, &r.app_key) {
            tracing::warn!("enrolment with a wrong app key");
            return Err(Status::unauthenticated(
                "app_key: not this deployment's app key",
            ));
        }
        sdk_version(&r.sdk_version, "sdk_version")?;
        let (device_id, token) = auth::new_credentials()?;
        let hash = crate::hex(&auth::sha256(token.as_bytes()));
        let id = device_id.clone();
        let limits = self.shared.limits.clone();
        // The grant is checked before the coordinator's lock is taken: a flood of forged
        // grants costs signature checks, not the lock every upload needs.
        let keys = &self.shared.grant_keys;
        let person = match (&r.grant, keys.required()) {
            (None, false) => None,
            (Some(_), false) => {
                return Err(Status::failed_precondition(
                    "grant: this coordinator has no auth.enrolment_grant_keys to check enrolment grants with; enrol without one",
                ));
            }
            (None, true) => {
                return Err(Status::unauthenticated(
                    crate::enrolment::GrantError::Missing.to_string(),
                ));
            }
            (Some(grant), true) => Some(keys.verify(grant, now_ms()).map_err(|e| {
                tracing::warn!(error = %e, "enrolment grant refused");
                Status::unauthenticated(e.to_string())
            })?),
        };
        let person = self
            .shared
            .blocking(move |c| {
                // Counted and inserted in one store transaction that every replica takes in
                // turn, so concurrent enrolments cannot pass the caps together.
                let now = now_ms();
                let window_s = limits.enrolment_window_seconds;
                let person_window_s = limits.person_enrolment_window_seconds;
                let caps = EnrolmentCaps {
                    window_since_ms: now.saturating_sub((window_s as i64).saturating_mul(1000)),
                    max_in_window: u64::from(limits.max_enrolments_per_window),
                    person_since_ms: now
                        .saturating_sub((person_window_s as i64).saturating_mul(1000)),
                    max_per_person: u64::from(limits.max_enrolments_per_person),
                };
                let reached = c
                    .store()
                    .enrol_device_within_caps(
                        &id,
                        &hash,
                        &r.sdk_version,
                        now,
                        person.as_ref().map(|p| p.principal.as_str()),
                        &caps,
                    )
                    .map_err(super::store_status)?;
                match reached {
                    None => Ok(person),
                    Some((EnrolmentCap::Window, recent)) => Err(Status::resource_exhausted(format!(
                        "enrolment: {recent} devices enrolled in the last {window_s} seconds, the most limits.max_enrolments_per_window allows; retry later"
                    ))),
                    Some((EnrolmentCap::Person, theirs)) => Err(Status::resource_exhausted(format!(
                        "grant: this person enrolled {theirs} times in the last {person_window_s} seconds, the most limits.max_enrolments_per_person allows"
                    ))),
                }
            })
            .await?;
        match &person {
            Some(p) => {
                tracing::info!(device = %device_id, person = %p.principal, "device enrolled with a grant")
            }
            None => tracing::info!(device = %device_id, "device enrolled"),
        }
        Ok(Response::new(pb::EnrollResponse {
            device_id,
            device_token: token,
        }))
    }

    async fn check_in(
        &self,
        request: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        sdk_version(&r.sdk_version, "sdk_version")?;
        let e = r
            .eligibility
            .ok_or_else(|| invalid("eligibility", "must be set"))?;
        let eligible = e.device_conditions_met && e.privacy_budget_available;
        let runs = self.shared.run_order();
        let shared = Arc::clone(&self.shared);
        let limits = self.shared.limits.clone();
        let response = self
            .shared
            .blocking(move |c| {
                let now = now_ms();
                let mut later: Option<(bool, i64, String, String)> = None;
                for run_id in runs {
                    let Some(state) = c.engine(&run_id).map(|e| e.state()) else {
                        continue;
                    };
                    if state == RunState::Stopped {
                        continue;
                    }
                    // A run that counts per person is not offered to an enrolment without a
                    // grant (`Coordinator::handle` would refuse it).
                    if !device.starts_with(crate::enrolment::PRINCIPAL_PREFIX)
                        && c.counts_per_person(&run_id).map_err(coordinator_status)?
                    {
                        continue;
                    }
                    let actions = c
                        .handle(
                            &run_id,
                            Event::CheckIn {
                                device: device.clone(),
                                eligible,
                            },
                            now,
                        )
                        .map_err(coordinator_status)?;
                    let active = c.engine(&run_id).map(|e| e.state()) == Some(RunState::Active);
                    for action in actions {
                        match action {
                            Action::SendTask(task) if task.device == device => {
                                let manifest = shared.manifest(c, &run_id)?;
                                let model = shared.model_ref(c, &run_id, task.model_version)?;
                                // Every mode's devices release their evaluation with
                                // local noise (see docs/what-leaves-the-device.md).
                                let mut token_error = None;
                                let evaluation_token = c
                                    .task_given(
                                        &run_id,
                                        &device,
                                        task.model_version,
                                        || match auth::new_credentials() {
                                            Ok((_, token)) => token,
                                            Err(e) => {
                                                token_error = Some(e);
                                                String::new()
                                            }
                                        },
                                        now,
                                    )
                                    .map_err(coordinator_status)?
                                    .unwrap_or_default();
                                if let Some(e) = token_error {
                                    return Err(e);
                                }
                                tracing::info!(device = %device, run = %run_id, round = task.round, "task sent");
                                return Ok(pb::CheckInResponse {
                                    outcome: Some(pb::check_in_response::Outcome::Task(pb::Task {
                                        run_id: run_id.clone(),
                                        round_id: task.round,
                                        task_token: task.task_token,
                                        model: Some(model.clone()),
                                        local_training: None,
                                        privacy_mode: proto_mode(manifest.privacy_mode) as i32,
                                        clip_norm: if manifest.local_clip_bits() {
                                            task.clip_norm
                                        } else {
                                            manifest.clip_norm
                                        },
                                        noise_multiplier: manifest.task_noise_multiplier(),
                                        upload_deadline: Some(timestamp(task.deadline_ms)),
                                        clip_bit_requested: task.clip_bit_noise_std.is_some(),
                                        clip_bit_noise_stddev: task
                                            .clip_bit_noise_std
                                            .unwrap_or(0.0),
                                        update_tensors: update_tensors(&manifest),
                                        max_upload_bytes: limits.max_upload_bytes,
                                        max_chunk_bytes: limits.max_chunk_bytes,
                                        secure_aggregation: task
                                            .secure_aggregation
                                            .as_ref()
                                            .and_then(|_| {
                                                super::convert::secure_aggregation_to_proto(
                                                    &manifest,
                                                )
                                            }),
                                        secure_aggregation_round: task
                                            .secure_aggregation
                                            .as_deref()
                                            .map(super::secagg::round_to_proto),
                                        evaluation_noise_multiplier: if evaluation_token.is_empty() {
                                            0.0
                                        } else {
                                            fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER
                                        },
                                        evaluation_token,
                                    })),
                                    latest_model: Some(model),
                                });
                            }
                            Action::ComeBackLater {
                                device: d,
                                retry_at_ms,
                                reason,
                            } if d == device => {
                                // Keep the first answer, preferring an active run's.
                                let better = match &later {
                                    None => true,
                                    Some((was_active, ..)) => active && !was_active,
                                };
                                if better {
                                    later = Some((active, retry_at_ms, reason, run_id.clone()));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                // No run here had an answer: another replica may own one.
                if later.is_none()
                    && let Some(redirect) = crate::replica::redirect(c, REDIRECT_VALID_FOR)
                {
                    return Ok(redirect);
                }
                let (retry_at, reason, detail, latest_model) = match later {
                    Some((_, at, reason, run_id)) => {
                        let version = c.engine(&run_id).map(|e| e.model().0).unwrap_or(0);
                        // Only a model this device may download is named to it.
                        let model = if c.may_download(&run_id, &device).map_err(coordinator_status)? {
                            Some(shared.model_ref(c, &run_id, version)?)
                        } else {
                            None
                        };
                        (at, come_back_reason(&reason), reason, model)
                    }
                    None => (
                        now + NO_RUN_RETRY_MS,
                        pb::ComeBackReason::NoActiveRun,
                        "no run is active".to_string(),
                        None,
                    ),
                };
                Ok(pb::CheckInResponse {
                    outcome: Some(pb::check_in_response::Outcome::ComeBackLater(
                        pb::ComeBackLater {
                            retry_after: Some(duration((retry_at - now).max(100))),
                            reason: reason as i32,
                            detail,
                        },
                    )),
                    latest_model,
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    type DownloadModelStream = ChunkStream;

    async fn download_model(
        &self,
        request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let (device, permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        super::check_run_id("run_id", &r.run_id)?;
        if r.model_version.is_none() && r.offset != 0 {
            return Err(invalid(
                "model_version",
                "must be set when resuming from a non-zero offset",
            ));
        }
        if !r.expected_sha256.is_empty() && r.expected_sha256.len() != fedpref_proto::SHA256_LEN {
            return Err(invalid(
                "expected_sha256",
                format!(
                    "must be empty or {} bytes, got {}",
                    fedpref_proto::SHA256_LEN,
                    r.expected_sha256.len()
                ),
            ));
        }
        let run_id = r.run_id.clone();
        let requested = r.model_version;
        let (version, blob) = self
            .shared
            .blocking(move |c| {
                // Only a device given a task in the run may download its models.
                super::require_task_in_run(c, &run_id, &device)?;
                let record = c.store().run(&run_id).map_err(super::store_status)?;
                let version = requested.unwrap_or(record.published_version);
                if version > record.published_version {
                    return Err(Status::not_found(format!(
                        "model_version: run {run_id:?} has no published version {version} (latest is {})",
                        record.published_version
                    )));
                }
                let blob = c
                    .store()
                    .model(&run_id, version)
                    .map_err(super::store_status)?;
                Ok((version, blob))
            })
            .await?;
        let total = blob.bytes.len() as u64;
        if r.offset >= total {
            return Err(Status::out_of_range(format!(
                "offset: {} is not below the snapshot's size of {total} bytes",
                r.offset
            )));
        }
        let sha = unhex(&blob.sha256);
        if !r.expected_sha256.is_empty() && r.expected_sha256 != sha {
            return Err(Status::failed_precondition(format!(
                "expected_sha256: model version {version} has SHA-256 {}, not the expected one",
                blob.sha256
            )));
        }
        let limit = u64::from(self.shared.limits.download_chunk_bytes);
        let chunk = match u64::from(r.max_chunk_bytes) {
            0 => limit,
            n => n.min(limit),
        };
        let bytes = Arc::new(blob.bytes);
        let run_id = r.run_id;
        let offsets = (r.offset..total).step_by(chunk as usize);
        let stream = tokio_stream::iter(offsets.map(move |offset| {
            // The permit lives as long as the stream: a download counts against the
            // concurrency limit until its last chunk is sent.
            let _held = &permit;
            let end = (offset + chunk).min(total);
            Ok(pb::ModelChunk {
                run_id: run_id.clone(),
                model_version: version,
                total_size_bytes: total,
                model_sha256: sha.clone(),
                offset,
                content: bytes[offset as usize..end as usize].to_vec(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let result = self.upload_update_checked(request).await;
        if let Err(status) = &result {
            self.shared.metrics.upload_rejected(status.code());
        }
        result
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        let task = task_ref(r.task.as_ref(), "task")?;
        let reason = match pb::DeclineReason::try_from(r.reason) {
            Ok(pb::DeclineReason::Unspecified) | Err(_) => {
                return Err(invalid("reason", "must be a specified DeclineReason"));
            }
            Ok(reason) => reason,
        };
        let run_id = task.run_id.clone();
        let shared = Arc::clone(&self.shared);
        let (device_id, round, token) = (device.clone(), task.round_id, task.task_token.clone());
        let retry_ms = self
            .shared
            .blocking(move |c| {
                super::require_task_in_run(c, &run_id, &device_id)?;
                let manifest = shared.manifest(c, &run_id)?;
                let now = now_ms();
                let actions = c
                    .handle(
                        &run_id,
                        Event::Decline {
                            device: device_id,
                            round,
                            task_token: token,
                        },
                        now,
                    )
                    .map_err(coordinator_status)?;
                for action in actions {
                    if let Action::Reject { rejection, .. } = action {
                        return Err(reject_status(rejection.kind, rejection.message));
                    }
                }
                Ok(match c.engine(&run_id).and_then(|e| e.next_wakeup()) {
                    Some(deadline) => (deadline - now).max(1000),
                    None => manifest.sampling.round_millis(),
                })
            })
            .await?;
        // The slot is free: in a fixed cohort the next device to check in takes it.
        tracing::info!(device = %device, run = %task.run_id, round = task.round_id, reason = reason.as_str_name(), "task declined");
        Ok(Response::new(pb::DeclineTaskResponse {
            retry_after: Some(duration(retry_ms)),
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let (device, _permit) = self.admit(request.metadata()).await?;
        let r = request.into_inner();
        super::check_run_id("run_id", &r.run_id)?;
        if r.evaluation_token.is_empty() {
            return Err(invalid(
                "evaluation_token",
                "must be set: the token of a task for this run and model version",
            ));
        }
        let sigma = fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER;
        if r.noise_multiplier != sigma {
            return Err(invalid(
                "noise_multiplier",
                format!("must be the task's evaluation_noise_multiplier, {sigma}"),
            ));
        }
        let values = fedpref_privacy::evaluation::EvaluationSum::check(&r.released_rates, sigma)
            .map_err(|e| invalid(&e.field.replacen("values", "released_rates", 1), e.reason))?;
        let token_hash = auth::sha256(r.evaluation_token.as_bytes());
        let run_id = r.run_id.clone();
        let version = r.model_version;
        self.shared
            .blocking(move |c| {
                // Checked, never stored: the release is kept apart from the device.
                super::require_task_in_run(c, &run_id, &device)?;
                c.record_evaluation(
                    &crate::coordinator::EvaluationRelease {
                        run_id: &run_id,
                        model_version: version,
                        token_hash,
                        noise_multiplier: sigma,
                        values,
                    },
                    now_ms(),
                )
                .map_err(super::coordinator_status)
            })
            .await?;
        tracing::debug!(run = %r.run_id, "evaluation release added");
        Ok(Response::new(pb::ReportMetricsResponse {
            next_report_after: Some(duration(REPORT_EVERY_MS)),
        }))
    }
}
