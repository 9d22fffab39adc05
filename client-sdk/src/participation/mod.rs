//! Participation: enrol, check in, download the model (resuming), train, upload — over
//! `fedpref.v1.DeviceService` with TLS.
//!
//! [`CoordinatorClient`] makes the calls; [`participate`] drives rounds with a
//! [`Device`]. This module is the IO edge of the SDK: it reads the clock and sleeps; the
//! device's logic underneath still takes `now` as an argument.
//!
//! **One round, as the device sees it.** Check in with the model held and the eligibility
//! (the app's conditions; training switched on and ε left in the on-device accountant).
//! With a task: download its model unless held (resumable, SHA-256 verified, installed per
//! [`snapshot`]'s item-key mapping), check that the update the device would make fits the
//! task (tensor names and shapes, `max_upload_bytes`) and that the deadline has not
//! passed, then [`Device::prepare_upload`] — the only function that clips, noises and
//! records the spend — and stream the result. When `prepare_upload` refuses (training off,
//! budget exceeded, no examples, a mode the SDK cannot honour) the task is given back with
//! `DeclineTask` and the matching reason, and nothing is uploaded.
//!
//! **Distributed mode.** A task in `PRIVACY_MODE_DISTRIBUTED` runs the secure-aggregation
//! stages instead of a single upload (see `distributed.rs`): its round parameters are
//! checked first, then the device advertises keys, shares them, prepares its share with
//! [`Device::prepare_share`] (clip, integer noise share, encode, record the spend), uploads
//! the masked input as `DTYPE_U32` tensors and answers the unmasking request, polling
//! `GetStage` as the coordinator's `poll_after` says and giving up on a stage once its
//! deadline has passed.
//!
//! **Retries.** `UNAVAILABLE` and `RESOURCE_EXHAUSTED` are retried per [`RetryPolicy`]
//! (jittered exponential backoff, bounded attempts, `grpc-retry-pushback-ms` honoured);
//! every other status is final and surfaces as a [`ParticipationError`] with the server's
//! message. "Come back after T" answers are honoured with up to 10 % jitter added.
//!
//! **Federated evaluation.** At the end of [`participate`], in every privacy mode (after a
//! distributed round's share as after a local update), the device sends its evaluation
//! counts when a report is due ([`metrics`]); a failed report never fails participation.
//!
//! **Offline.** Nothing here is needed for recommendations: they use the last installed
//! model, and events are stored locally whatever the network does.

mod backoff;
mod client;
mod distributed;
pub mod metrics;
pub mod snapshot;

use std::time::{Duration, Instant};

use fedpref_privacy::PrivacyMode;
use fedpref_proto::v1::{self as pb, check_in_response::Outcome};
use thiserror::Error;
use tonic::Code;

pub use backoff::{RETRY_PUSHBACK, RetryPolicy, pushback, retryable};
pub use client::{CALL_TIMES_KEPT, CallTime, CoordinatorClient, DownloadProgress, MASKED_UPDATE};
pub use metrics::{MetricsOutcome, ReportWhen, report_metrics};
pub use snapshot::{Enrolment, PartialDownload, model_from_snapshot};

use crate::SdkError;
use crate::device::Device;
use crate::model::{LocalTraining, PreferenceModel};
use crate::time::Timestamp;
use crate::upload::TrainingTask;

/// How the SDK talks to coordinators.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticipationConfig {
    /// The SDK version sent at enrolment and check-in. Default: this crate's version.
    pub sdk_version: String,
    /// Retries of `UNAVAILABLE` / `RESOURCE_EXHAUSTED`.
    pub retry: RetryPolicy,
    /// Row `r` of a snapshot without `item_keys` is item `{prefix}{r}` ([`snapshot`]).
    /// Default `i`.
    pub item_key_prefix: String,
    /// Largest download chunk asked for; 0 lets the coordinator choose. Default 0.
    pub download_chunk_bytes: u32,
    /// Connecting (TCP and TLS) gives up after this. Default 10 s.
    pub connect_timeout: Duration,
    /// One call gives up after this. Default 120 s.
    pub request_timeout: Duration,
    /// The enrolment grant the app's backend signed for the signed-in person, sent with
    /// `Enroll`; a coordinator with `auth.enrolment_grant_keys` enrols no device without one
    /// (see [`pb::EnrolmentGrant`]; decode the backend's bytes with `prost::Message::decode`).
    /// Default: none.
    pub enrolment_grant: Option<pb::EnrolmentGrant>,
}

/// An enrolment grant from the bytes the app's backend sent: an encoded
/// [`pb::EnrolmentGrant`], raw or in base64 (standard alphabet, as `fedpref-coordinator grant
/// sign` prints it). The error names what is wrong; the signature is checked by the coordinator.
pub fn enrolment_grant_from_bytes(bytes: &[u8]) -> Result<pb::EnrolmentGrant, String> {
    use base64::Engine as _;
    use prost::Message as _;
    let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
    let raw = match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(decoded) if !text.is_empty() => decoded,
        _ => bytes.to_vec(),
    };
    let grant = pb::EnrolmentGrant::decode(raw.as_slice())
        .map_err(|e| format!("enrolment grant: not an encoded EnrolmentGrant: {e}"))?;
    if grant.claims.is_empty() || grant.signature.len() != 64 {
        return Err(format!(
            "enrolment grant: needs claims and a 64-byte signature, got {} and {} bytes",
            grant.claims.len(),
            grant.signature.len()
        ));
    }
    Ok(grant)
}

impl Default for ParticipationConfig {
    fn default() -> Self {
        Self {
            sdk_version: env!("CARGO_PKG_VERSION").to_string(),
            retry: RetryPolicy::default(),
            item_key_prefix: "i".into(),
            download_chunk_bytes: 0,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            enrolment_grant: None,
        }
    }
}

/// What participation can fail at. Each message says what was wrong.
#[derive(Debug, Error)]
pub enum ParticipationError {
    /// The coordinator URL is not usable.
    #[error("coordinator URL `{url}`: {message}")]
    InvalidEndpoint {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The CA certificate file is not usable.
    #[error("CA certificate: {0}")]
    InvalidCaCertificate(String),
    /// The coordinator's certificate is not validated by the CA certificate (a wrong CA
    /// file, or a coordinator that is not the one the app trusts).
    #[error(
        "TLS: the certificate of {endpoint} is not trusted by the CA certificate given: {message}"
    )]
    Certificate {
        /// The URL.
        endpoint: String,
        /// The TLS library's reason.
        message: String,
    },
    /// The coordinator could not be reached.
    #[error("{endpoint} is unreachable after {attempts} attempt(s): {message}")]
    Unreachable {
        /// The URL.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// `UNAUTHENTICATED`: a wrong app key, or a device token the coordinator does not know.
    #[error("{call}: UNAUTHENTICATED: {message}")]
    Unauthenticated {
        /// The call.
        call: &'static str,
        /// The server's message.
        message: String,
    },
    /// Any other final status, with the server's message.
    #[error("{call}: {code:?}: {message}")]
    Rejected {
        /// The call.
        call: &'static str,
        /// The status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A retryable status persisted through every attempt.
    #[error("{call}: gave up after {attempts} attempt(s); last: {code:?}: {message}")]
    RetriesExhausted {
        /// The call.
        call: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last status code.
        code: Code,
        /// The last message.
        message: String,
    },
    /// A call that needs the device token before the device enrolled.
    #[error("{call}: the device is not enrolled at this coordinator")]
    NotEnrolled {
        /// The call.
        call: &'static str,
    },
    /// The model download was inconsistent, corrupt or does not fit the SDK's model.
    #[error("model download: {0}")]
    Download(String),
    /// The update cannot be sent as the task asks.
    #[error("upload: {0}")]
    Upload(String),
    /// The device (store, model, privacy) refused or failed.
    #[error(transparent)]
    Device(#[from] SdkError),
    /// A secure-aggregation stage failed on the device (distributed mode): a malformed
    /// message from the coordinator, or a request the protocol refuses.
    #[error("secure aggregation, stage {stage}: {message}")]
    SecureAggregation {
        /// The stage: `advertise_keys`, `share_keys`, `masked_input` or `unmasking`.
        stage: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl ParticipationError {
    /// The final error for a status.
    pub fn from_status(call: &'static str, status: &tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::Unauthenticated => Self::Unauthenticated { call, message },
            code => Self::Rejected {
                call,
                code,
                message,
            },
        }
    }
}

pub(crate) fn to_duration(d: fedpref_proto::prost_types::Duration) -> Duration {
    if d.seconds < 0 {
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos.clamp(0, 999_999_999) as u32)
}

/// What one call of [`participate`] is to do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParticipateOptions {
    /// Tasks to finish (each ends with a receipt, a decline or a refused upload). Default 1.
    pub rounds: u32,
    /// The app's call: idle, charging, unmetered network, … Default true.
    pub device_conditions_met: bool,
    /// Stop waiting for tasks after this long in all (None: no limit). Default None.
    pub give_up_after: Option<Duration>,
}

impl Default for ParticipateOptions {
    fn default() -> Self {
        Self {
            rounds: 1,
            device_conditions_met: true,
            give_up_after: None,
        }
    }
}

/// How many redirects in a row [`participate`] follows before it stops for now.
pub const MAX_REDIRECTS_IN_A_ROW: u32 = 3;

/// Something that happened during [`participate`], in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ParticipationEvent {
    /// The device enrolled (or used its stored enrolment).
    Enrolled {
        /// The coordinator's id for the device.
        device_id: String,
        /// Whether it enrolled just now.
        new: bool,
    },
    /// No task: waiting as the coordinator asked.
    ComeBackLater {
        /// The reason (`COME_BACK_REASON_…`).
        reason: String,
        /// The coordinator's words.
        detail: String,
        /// How long the device waits.
        wait: Duration,
    },
    /// The coordinator replica the device checked in at does not own the run: the device
    /// moved to the one that does (same CA, same enrolment) and checks in there.
    Redirected {
        /// The replica's URL.
        endpoint: String,
    },
    /// A task arrived.
    Task {
        /// The run.
        run_id: String,
        /// The round.
        round_id: u64,
        /// The model version to train from.
        model_version: u64,
    },
    /// A model was downloaded and installed.
    ModelInstalled {
        /// The version.
        model_version: u64,
        /// Its size in bytes.
        size_bytes: u64,
        /// Bytes already held from an interrupted download.
        resumed_from: u64,
    },
    /// An update was accepted.
    Uploaded {
        /// The round.
        round_id: u64,
        /// Bytes of tensor data sent.
        bytes: u64,
        /// ε spent by the user after this upload.
        epsilon_spent: f64,
        /// The receipt's id.
        receipt_id: String,
    },
    /// The coordinator refused the update for a reason that is not an error of the
    /// device's (e.g. the round closed first). The spend stays recorded.
    UploadRefused {
        /// The round.
        round_id: u64,
        /// The server's message.
        message: String,
    },
    /// The task was given back; nothing was uploaded.
    Declined {
        /// The round.
        round_id: u64,
        /// `DECLINE_REASON_…`.
        reason: String,
        /// Why, in words.
        why: String,
    },
    /// Distributed mode: the device completed a secure-aggregation stage (its masked input
    /// is reported as [`ParticipationEvent::Uploaded`]).
    SecureAggregationStage {
        /// The round.
        round_id: u64,
        /// `advertise_keys`, `share_keys` or `unmasking`.
        stage: String,
        /// What the device sent.
        detail: String,
    },
    /// Distributed mode: the round went on without the device, or was abandoned, while the
    /// device waited to act in `stage` (a stage deadline passed, or the coordinator aborted
    /// or moved on).
    SecureAggregationLeft {
        /// The stage the device was waiting for.
        round_id: u64,
        /// The stage.
        stage: String,
        /// Why, in words.
        reason: String,
    },
    /// Participation stopped before the requested rounds.
    Stopped {
        /// Why.
        why: String,
    },
}

impl std::fmt::Display for ParticipationEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Enrolled { device_id, new } => {
                if *new {
                    write!(f, "enrolled as {device_id}")
                } else {
                    write!(f, "enrolled already as {device_id}")
                }
            }
            Self::ComeBackLater {
                reason,
                detail,
                wait,
            } => write!(
                f,
                "no task ({reason}: {detail}); checking in again in {:.1} s",
                wait.as_secs_f64()
            ),
            Self::Redirected { endpoint } => {
                write!(f, "redirected to {endpoint}, the replica that owns the run")
            }
            Self::Task {
                run_id,
                round_id,
                model_version,
            } => write!(
                f,
                "task: run {run_id}, round {round_id}, model version {model_version}"
            ),
            Self::ModelInstalled {
                model_version,
                size_bytes,
                resumed_from,
            } => {
                write!(
                    f,
                    "downloaded and installed model version {model_version} ({size_bytes} bytes, SHA-256 verified"
                )?;
                if *resumed_from > 0 {
                    write!(f, ", resumed from byte {resumed_from}")?;
                }
                write!(f, ")")
            }
            Self::Uploaded {
                round_id,
                bytes,
                epsilon_spent,
                receipt_id,
            } => write!(
                f,
                "round {round_id}: uploaded {bytes} bytes (clipped, noised, recorded: ε spent now {epsilon_spent:.4}); receipt {receipt_id}"
            ),
            Self::UploadRefused { round_id, message } => {
                write!(f, "round {round_id}: upload refused: {message}")
            }
            Self::Declined {
                round_id,
                reason,
                why,
            } => write!(
                f,
                "round {round_id}: declined ({reason}): {why}; nothing uploaded"
            ),
            Self::SecureAggregationStage {
                round_id,
                stage,
                detail,
            } => write!(f, "round {round_id}: secure aggregation, {stage}: {detail}"),
            Self::SecureAggregationLeft {
                round_id,
                stage,
                reason,
            } => write!(
                f,
                "round {round_id}: secure aggregation went on without this device at {stage}: {reason}"
            ),
            Self::Stopped { why } => write!(f, "stopped: {why}"),
        }
    }
}

/// What [`participate`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParticipationReport {
    /// Updates accepted.
    pub uploads: u32,
    /// Tasks declined.
    pub declines: u32,
    /// Updates refused by the coordinator.
    pub refused: u32,
    /// Distributed rounds that went on without the device (or were abandoned) before its
    /// part was done.
    pub left: u32,
    /// Everything that happened, in order.
    pub events: Vec<ParticipationEvent>,
    /// The federated-evaluation report made at the end ([`metrics`]); None when
    /// participation ended with an error before it.
    pub metrics: Option<MetricsOutcome>,
}

/// The protocol's privacy mode as the privacy crate's, if it is one.
fn privacy_mode(mode: i32) -> Option<PrivacyMode> {
    match pb::PrivacyMode::try_from(mode).ok()? {
        pb::PrivacyMode::Local => Some(PrivacyMode::Local),
        pb::PrivacyMode::Central => Some(PrivacyMode::Central),
        pb::PrivacyMode::Distributed => Some(PrivacyMode::Distributed),
        _ => None,
    }
}

/// The task's local-training settings, or the device's where the task has none.
pub(super) fn local_training(task: &pb::Task, fallback: LocalTraining) -> LocalTraining {
    match &task.local_training {
        None => fallback,
        Some(c) => LocalTraining {
            private_l2: c
                .private_fit
                .as_ref()
                .map_or(fallback.private_l2, |p| p.l2_regularization),
            epochs: c.epochs,
            learning_rate: c.learning_rate,
            l2_regularization: c.l2_regularization,
            max_examples: usize::try_from(c.max_examples).unwrap_or(usize::MAX),
            // Not on the wire: the device's own.
            ..fallback
        },
    }
}

/// Whether the update the installed model makes has the tensors the task asks for.
fn layout_matches(device: &Device, task: &pb::Task) -> Result<(), String> {
    let Some(model) = device.model() else {
        return Err("no model is installed".into());
    };
    let layout = model.layout();
    let ours: Vec<(&str, &[u64])> = layout
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let theirs: Vec<(&str, &[u64])> = task
        .update_tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    if ours != theirs {
        return Err(format!(
            "the task asks for tensors {theirs:?}, the installed model makes {ours:?}"
        ));
    }
    let bytes = layout.dimension() as u64 * 8;
    if task.max_upload_bytes > 0 && bytes > task.max_upload_bytes {
        return Err(format!(
            "the update is {bytes} bytes, more than the coordinator's max_upload_bytes of {}",
            task.max_upload_bytes
        ));
    }
    Ok(())
}

pub(super) fn decline_reason(e: &SdkError) -> pb::DeclineReason {
    match e {
        SdkError::TrainingOff => pb::DeclineReason::TrainingDisabled,
        SdkError::BudgetExceeded(_) => pb::DeclineReason::PrivacyBudgetExhausted,
        SdkError::NoExamples => pb::DeclineReason::InsufficientExamples,
        _ => pb::DeclineReason::TrainingFailed,
    }
}

/// Enrols if needed (with `app_key`), then checks in, downloads, trains and uploads until
/// `options.rounds` tasks are finished, the run stops, the device may not train (training
/// off, budget exhausted) or `give_up_after` passes. `on_event` sees each step as it
/// happens; the report repeats them.
pub async fn participate(
    device: &mut Device,
    client: &mut CoordinatorClient,
    app_key: &str,
    options: &ParticipateOptions,
    on_event: &mut (dyn FnMut(&ParticipationEvent) + Send),
) -> Result<ParticipationReport, ParticipationError> {
    let started = Instant::now();
    let mut report = ParticipationReport::default();
    let mut emit = |report: &mut ParticipationReport, e: ParticipationEvent| {
        on_event(&e);
        report.events.push(e);
    };
    let (enrolment, new) = client.ensure_enrolled(device, app_key).await?;
    emit(
        &mut report,
        ParticipationEvent::Enrolled {
            device_id: enrolment.device_id,
            new,
        },
    );
    let mut finished = 0;
    let mut reenrolled = false;
    let mut redirects_in_a_row = 0;
    while finished < options.rounds {
        if let Some(limit) = options.give_up_after
            && started.elapsed() >= limit
        {
            emit(
                &mut report,
                ParticipationEvent::Stopped {
                    why: format!("no task within {:.0} s", limit.as_secs_f64()),
                },
            );
            break;
        }
        let training = device.settings().training;
        let eligibility = pb::Eligibility {
            device_conditions_met: options.device_conditions_met,
            privacy_budget_available: training && device.budget()?.epsilon_remaining > 0.0,
        };
        let response = match client.check_in(device.held_snapshot()?, eligibility).await {
            Err(ParticipationError::Unauthenticated { .. }) if !new && !reenrolled => {
                // The coordinator no longer knows the stored token (e.g. its store was
                // reset): enrol once more.
                device.forget_enrolment()?;
                let (e, _) = client.ensure_enrolled(device, app_key).await?;
                reenrolled = true;
                emit(
                    &mut report,
                    ParticipationEvent::Enrolled {
                        device_id: e.device_id,
                        new: true,
                    },
                );
                continue;
            }
            other => other?,
        };
        if !matches!(response.outcome, Some(Outcome::Redirect(_))) {
            redirects_in_a_row = 0;
        }
        let task = match response.outcome {
            Some(Outcome::Task(task)) => task,
            Some(Outcome::ComeBackLater(later)) => {
                let reason = pb::ComeBackReason::try_from(later.reason)
                    .unwrap_or(pb::ComeBackReason::Unspecified);
                let stop = match reason {
                    pb::ComeBackReason::NoActiveRun => Some("no run is active".to_string()),
                    pb::ComeBackReason::SdkUnsupported => {
                        Some("the coordinator does not support this SDK version".into())
                    }
                    pb::ComeBackReason::NotEligible if !training => {
                        Some("training participation is off on this device".into())
                    }
                    pb::ComeBackReason::NotEligible if !eligibility.privacy_budget_available => {
                        Some("the user's privacy budget is spent".into())
                    }
                    _ => None,
                };
                if let Some(why) = stop {
                    emit(&mut report, ParticipationEvent::Stopped { why });
                    break;
                }
                let base = later
                    .retry_after
                    .map_or(Duration::from_secs(1), to_duration);
                let wait = base.mul_f64(1.0 + 0.1 * client.uniform());
                emit(
                    &mut report,
                    ParticipationEvent::ComeBackLater {
                        reason: reason.as_str_name().to_string(),
                        detail: later.detail,
                        wait,
                    },
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            Some(Outcome::Redirect(r)) => {
                // Another replica owns the run: check in there, with the same CA and
                // enrolment. Replicas that keep sending the device on (a lease changing hands
                // while it moves) are followed a few times, then the device stops for now.
                redirects_in_a_row += 1;
                if redirects_in_a_row > MAX_REDIRECTS_IN_A_ROW {
                    emit(
                        &mut report,
                        ParticipationEvent::Stopped {
                            why: format!(
                                "redirected {MAX_REDIRECTS_IN_A_ROW} times in a row; the last replica named {}",
                                r.endpoint
                            ),
                        },
                    );
                    break;
                }
                client.follow_redirect(&r.endpoint).await?;
                emit(
                    &mut report,
                    ParticipationEvent::Redirected {
                        endpoint: r.endpoint,
                    },
                );
                continue;
            }
            None => {
                return Err(ParticipationError::Rejected {
                    call: "CheckIn",
                    code: Code::Internal,
                    message: "the response has no outcome".into(),
                });
            }
        };
        let model = task
            .model
            .clone()
            .ok_or_else(|| ParticipationError::Rejected {
                call: "CheckIn",
                code: Code::Internal,
                message: "the task names no model".into(),
            })?;
        emit(
            &mut report,
            ParticipationEvent::Task {
                run_id: task.run_id.clone(),
                round_id: task.round_id,
                model_version: model.model_version,
            },
        );
        finished += 1;
        if device.held_snapshot()?.as_ref() != Some(&model) {
            match client.download_model(device, &model, None).await? {
                DownloadProgress::Installed {
                    model_version,
                    size_bytes,
                    resumed_from,
                } => emit(
                    &mut report,
                    ParticipationEvent::ModelInstalled {
                        model_version,
                        size_bytes,
                        resumed_from,
                    },
                ),
                DownloadProgress::Partial { .. } => unreachable!("no chunk limit was given"),
            }
        }
        // The task's evaluation token: the device may report once on this run and version.
        if !task.evaluation_token.is_empty() {
            device.store_evaluation_token(
                &task.run_id,
                model.model_version,
                &task.evaluation_token,
                task.evaluation_noise_multiplier,
            )?;
        }
        // Refusals that cost nothing come first: a task the device cannot finish is given
        // back before any budget is spent on it.
        let deadline_passed = task
            .upload_deadline
            .as_ref()
            .is_some_and(|d| Timestamp::now().millis() >= Timestamp::from_proto(d).millis());
        let early = if deadline_passed {
            Some((
                pb::DeclineReason::DeadlineUnreachable,
                "the upload deadline has passed".to_string(),
            ))
        } else if privacy_mode(task.privacy_mode).is_none() {
            Some((
                pb::DeclineReason::TrainingFailed,
                format!(
                    "the task's privacy mode {} is not one this SDK knows",
                    task.privacy_mode
                ),
            ))
        } else if privacy_mode(task.privacy_mode) != Some(PrivacyMode::Distributed)
            && let Err(why) = layout_matches(device, &task)
        {
            // (A distributed task asks for one `masked_update` tensor; its dimension is
            // checked with the round's parameters.)
            Some((pb::DeclineReason::TrainingFailed, why))
        } else {
            None
        };
        if early.is_none() && privacy_mode(task.privacy_mode) == Some(PrivacyMode::Distributed) {
            let outcome = {
                let mut sink = |e: ParticipationEvent| emit(&mut report, e);
                distributed::take_part(device, client, &task, model.model_version, &mut sink)
                    .await?
            };
            match outcome {
                distributed::Outcome::Uploaded => report.uploads += 1,
                distributed::Outcome::Refused => report.refused += 1,
                distributed::Outcome::Left => report.left += 1,
                distributed::Outcome::Declined { reason, wait } => {
                    report.declines += 1;
                    if matches!(
                        reason,
                        pb::DeclineReason::PrivacyBudgetExhausted
                            | pb::DeclineReason::TrainingDisabled
                    ) {
                        emit(
                            &mut report,
                            ParticipationEvent::Stopped {
                                why: "this device cannot take part in further rounds".into(),
                            },
                        );
                        break;
                    }
                    if finished < options.rounds {
                        tokio::time::sleep(wait.mul_f64(1.0 + 0.1 * client.uniform())).await;
                    }
                }
            }
            continue;
        }
        let prepared = match early {
            Some(refusal) => Err(refusal),
            None => {
                let training_task = TrainingTask {
                    round_id: task.round_id,
                    model_version: model.model_version,
                    training: local_training(&task, device.config().training),
                    clip_norm: task.clip_norm,
                    noise_multiplier: task.noise_multiplier,
                    mode: privacy_mode(task.privacy_mode).expect("checked above"),
                    clip_bit_noise_std: task
                        .clip_bit_requested
                        .then_some(task.clip_bit_noise_stddev),
                };
                // The one function that clips, noises and records the spend.
                device
                    .prepare_upload(&training_task, Timestamp::now())
                    .map_err(|e| (decline_reason(&e), e.to_string()))
            }
        };
        match prepared {
            Ok(upload) => match client.upload_update(&task, &upload).await {
                Ok(receipt) => {
                    report.uploads += 1;
                    emit(
                        &mut report,
                        ParticipationEvent::Uploaded {
                            round_id: task.round_id,
                            bytes: receipt.bytes_received,
                            epsilon_spent: upload.spent().epsilon,
                            receipt_id: receipt.receipt_id,
                        },
                    );
                }
                Err(ParticipationError::Rejected {
                    code: Code::FailedPrecondition,
                    message,
                    ..
                }) => {
                    report.refused += 1;
                    emit(
                        &mut report,
                        ParticipationEvent::UploadRefused {
                            round_id: task.round_id,
                            message,
                        },
                    );
                }
                Err(e) => return Err(e),
            },
            Err((reason, why)) => {
                // A round that closed meanwhile (a slow device) takes nothing back.
                let wait = client
                    .give_back(&task, reason)
                    .await?
                    .unwrap_or(Duration::ZERO);
                report.declines += 1;
                emit(
                    &mut report,
                    ParticipationEvent::Declined {
                        round_id: task.round_id,
                        reason: reason.as_str_name().to_string(),
                        why,
                    },
                );
                if matches!(
                    reason,
                    pb::DeclineReason::PrivacyBudgetExhausted | pb::DeclineReason::TrainingDisabled
                ) {
                    emit(
                        &mut report,
                        ParticipationEvent::Stopped {
                            why: "this device cannot take part in further rounds".into(),
                        },
                    );
                    break;
                }
                if finished < options.rounds {
                    tokio::time::sleep(wait.mul_f64(1.0 + 0.1 * client.uniform())).await;
                }
            }
        }
    }
    // Federated evaluation, when due; a failure is recorded, never fatal.
    let outcome = report_metrics(device, client, app_key, ReportWhen::Due)
        .await
        .unwrap_or_else(|e| MetricsOutcome::Failed {
            message: e.to_string(),
        });
    report.metrics = Some(outcome);
    Ok(report)
}
