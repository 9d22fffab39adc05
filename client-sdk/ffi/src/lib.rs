//! # fedpref-ffi
//!
//! The client SDK's app-facing API for Kotlin and Swift apps, exported with UniFFI
//! proc-macros. It is a thin layer over [`fedpref_client_sdk::Device`]: no logic of its own
//! beyond converting types, reading the clock where the app does not pass a time, and
//! running [`fedpref_client_sdk::participate`] on a private single-threaded runtime so that
//! the app sees one blocking call.
//!
//! What an app calls:
//! - **start-up**: [`FedprefDevice::open`] (or [`FedprefDevice::open_with_budget`]), then
//!   [`FedprefDevice::recommend`] for the first screen;
//! - **user action**: [`FedprefDevice::ingest_jsonl`] for what the user did, the controls
//!   ([`FedprefDevice::set_personalisation`], [`FedprefDevice::set_training`],
//!   [`FedprefDevice::profile`], [`FedprefDevice::edit_profile`],
//!   [`FedprefDevice::reset_model`], [`FedprefDevice::export`],
//!   [`FedprefDevice::delete_everything`]) and [`FedprefDevice::budget`];
//! - **background job** (the app decides the device is idle, charging and on an unmetered
//!   network): [`FedprefDevice::participate`].
//!
//! Every error is a [`FedprefError`] whose variant names the kind of failure and whose
//! message is the Rust SDK's message, unchanged; in Kotlin and Swift each variant is its
//! own exception type.
//!
//! ```
//! use fedpref_ffi::{FedprefDevice, Reason};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let device = FedprefDevice::open(dir.path().join("device.db").display().to_string())?;
//! let report = device.ingest_jsonl(
//!     "{\"type\":\"item\",\"item\":\"i0\",\"topics\":[\"Jazz\"]}\n\
//!      {\"type\":\"item\",\"item\":\"i1\",\"topics\":[\"Drama\"]}\n\
//!      {\"type\":\"item\",\"item\":\"i2\",\"topics\":[\"Comedy\"]}\n\
//!      {\"type\":\"rating\",\"item\":\"i0\",\"value\":5,\"at\":\"2026-05-30T20:00:00Z\"}\n"
//!         .into(),
//!     false,
//!     None,
//! )?;
//! assert_eq!((report.items, report.explicit, report.feedback), (3, 0, 1));
//! // No shared model yet: a non-personalised ranking of what the user has not rated,
//! // labelled as such.
//! let recs = device.recommend(2, None)?;
//! assert_eq!(recs.len(), 2);
//! assert!(recs.iter().all(|r| r.reason == Reason::Popular && !r.label.is_empty()));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedpref_client_sdk as sdk;
use fedpref_client_sdk::{ParticipationError, SdkError, Timestamp};

uniffi::setup_scaffolding!();

/// Everything the SDK can refuse or fail at. The message of each is the Rust SDK's message
/// (`Display`), unchanged; the variant says what kind of failure it is.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum FedprefError {
    /// An event is invalid; nothing was stored.
    #[error("{0}")]
    InvalidEvent(String),
    /// Lines of a JSON Lines input are invalid; nothing was stored.
    #[error("{0}")]
    InvalidLines(String),
    /// Bad input to a call (an empty topic, a bad time, a bad model document, …).
    #[error("{0}")]
    InvalidInput(String),
    /// A bad configuration value.
    #[error("{0}")]
    InvalidConfig(String),
    /// A bad model or training configuration.
    #[error("{0}")]
    Model(String),
    /// The user turned training participation off.
    #[error("{0}")]
    TrainingOff(String),
    /// The privacy budget would be exceeded; nothing was recorded.
    #[error("{0}")]
    BudgetExceeded(String),
    /// A privacy mode the SDK cannot honour on the device.
    #[error("{0}")]
    UnsupportedMode(String),
    /// A task for a model version the device does not hold.
    #[error("{0}")]
    ModelVersionMismatch(String),
    /// No usable training examples.
    #[error("{0}")]
    NoExamples(String),
    /// A privacy-crate refusal.
    #[error("{0}")]
    Privacy(String),
    /// The store was written by a newer SDK.
    #[error("{0}")]
    SchemaTooNew(String),
    /// The store failed or holds something unreadable.
    #[error("{0}")]
    Storage(String),
    /// The coordinator URL, or the CA certificate, is not usable.
    #[error("{0}")]
    InvalidEndpoint(String),
    /// The coordinator's certificate is not trusted by the CA certificate given.
    #[error("{0}")]
    Certificate(String),
    /// The coordinator could not be reached (also: retries exhausted).
    #[error("{0}")]
    Unreachable(String),
    /// A wrong app key, or a device token the coordinator does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The coordinator refused a call with a final status, or the device is not enrolled.
    #[error("{0}")]
    Rejected(String),
    /// The model download was inconsistent, corrupt or does not fit.
    #[error("{0}")]
    Download(String),
    /// The update cannot be sent as the task asks.
    #[error("{0}")]
    Upload(String),
}

impl From<SdkError> for FedprefError {
    fn from(e: SdkError) -> Self {
        let message = e.to_string();
        match e {
            SdkError::InvalidEvent { .. } => Self::InvalidEvent(message),
            SdkError::InvalidLines(_) => Self::InvalidLines(message),
            SdkError::InvalidInput(_) => Self::InvalidInput(message),
            SdkError::InvalidConfig(_) => Self::InvalidConfig(message),
            SdkError::Model(_) => Self::Model(message),
            SdkError::TrainingOff => Self::TrainingOff(message),
            SdkError::BudgetExceeded(_) => Self::BudgetExceeded(message),
            SdkError::UnsupportedMode(_) => Self::UnsupportedMode(message),
            SdkError::ModelVersionMismatch { .. } => Self::ModelVersionMismatch(message),
            SdkError::NoExamples => Self::NoExamples(message),
            SdkError::Privacy(_) => Self::Privacy(message),
            SdkError::SchemaTooNew { .. } => Self::SchemaTooNew(message),
            SdkError::Storage(_) => Self::Storage(message),
        }
    }
}

impl From<ParticipationError> for FedprefError {
    fn from(e: ParticipationError) -> Self {
        use ParticipationError as P;
        let message = e.to_string();
        match e {
            P::Device(inner) => inner.into(),
            P::InvalidEndpoint { .. } | P::InvalidCaCertificate(_) => {
                Self::InvalidEndpoint(message)
            }
            P::Certificate { .. } => Self::Certificate(message),
            P::Unreachable { .. } | P::RetriesExhausted { .. } => Self::Unreachable(message),
            P::Unauthenticated { .. } => Self::Unauthenticated(message),
            P::Rejected { .. } | P::NotEnrolled { .. } => Self::Rejected(message),
            P::Download(_) => Self::Download(message),
            P::Upload(_) | P::SecureAggregation { .. } => Self::Upload(message),
        }
    }
}

/// The time to use: the app's, or the clock's.
fn time(now: Option<SystemTime>) -> Result<Timestamp, FedprefError> {
    let Some(t) = now else {
        return Ok(Timestamp::now());
    };
    let millis = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()),
        Err(before) => i64::try_from(before.duration().as_millis()).map(|m| -m),
    };
    millis
        .map(Timestamp::from_millis)
        .map_err(|_| FedprefError::InvalidInput(format!("time {t:?} is out of range")))
}

/// What an ingest stored.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct IngestReport {
    /// Catalogue items stored.
    pub items: u64,
    /// Feedback events stored.
    pub feedback: u64,
    /// Explicit records stored.
    pub explicit: u64,
    /// Consents stored.
    pub consents: u64,
    /// Events already past their retention window, not stored.
    pub expired: u64,
    /// The refused lines (only with `skip_invalid`), each naming its line and field.
    pub skipped: Vec<String>,
}

/// Why an item is in the list (the transparency label says it to the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Reason {
    /// Ranked by the user's own model.
    Personal,
    /// Injected from outside the user's established interests.
    Diversity,
    /// Added to meet the recency floor.
    Recency,
    /// Non-personalised ranking.
    Popular,
}

impl From<sdk::Reason> for Reason {
    fn from(r: sdk::Reason) -> Self {
        match r {
            sdk::Reason::Personal => Self::Personal,
            sdk::Reason::Diversity => Self::Diversity,
            sdk::Reason::Recency => Self::Recency,
            sdk::Reason::Popular => Self::Popular,
        }
    }
}

/// One recommended item.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Recommendation {
    /// The item's id.
    pub item: String,
    /// What the slot was ranked by.
    pub score: f64,
    /// The transparency label to show with the item.
    pub label: String,
    /// Why the item is here.
    pub reason: Reason,
}

/// The two switches the user controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Record)]
pub struct Settings {
    /// Personalised recommendations.
    pub personalisation: bool,
    /// Taking part in training.
    pub training: bool,
}

/// A topic, format or hour with its summed affinity.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Affinity {
    /// The topic, the format, or the hour (`00`–`23`, UTC).
    pub value: String,
    /// The summed weight.
    pub weight: f64,
}

/// A sensitive-topic choice.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct Consent {
    /// The topic.
    pub topic: String,
    /// Whether it may be used to personalise.
    pub personalise: bool,
}

/// What the device knows about the user, for a "your profile" screen.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Profile {
    /// The two switches.
    pub settings: Settings,
    /// Explicit: the role.
    pub role: Option<String>,
    /// Explicit: goals.
    pub goals: Vec<String>,
    /// Explicit: followed topics.
    pub interests: Vec<String>,
    /// Inferred topic affinities, strongest first.
    pub inferred_topics: Vec<Affinity>,
    /// Inferred format affinities, strongest first.
    pub inferred_formats: Vec<Affinity>,
    /// Active hours (UTC), busiest first.
    pub active_hours: Vec<Affinity>,
    /// Sensitive-topic choices.
    pub consents: Vec<Consent>,
    /// Topics removed from the profile.
    pub muted_topics: Vec<String>,
    /// Feedback events held, by kind.
    pub feedback_counts: HashMap<String, u64>,
    /// Usable training examples.
    pub examples: u64,
    /// Whether recommendations are personalised right now.
    pub personalised: bool,
}

/// A change the user makes to the profile.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ProfileEdit {
    /// Sets the role, or clears it with `None`.
    SetRole {
        /// The role.
        role: Option<String>,
    },
    /// Adds a goal.
    AddGoal {
        /// The goal.
        goal: String,
    },
    /// Removes a goal.
    RemoveGoal {
        /// The goal.
        goal: String,
    },
    /// Follows a topic.
    AddInterest {
        /// The topic.
        topic: String,
    },
    /// Unfollows a topic.
    RemoveInterest {
        /// The topic.
        topic: String,
    },
    /// Removes a topic from the profile: never inferred, never used to personalise.
    MuteTopic {
        /// The topic.
        topic: String,
    },
    /// Undoes `MuteTopic`.
    UnmuteTopic {
        /// The topic.
        topic: String,
    },
    /// Opts in or out of personalising with a sensitive topic.
    SetConsent {
        /// The topic.
        topic: String,
        /// Whether it may be used.
        personalise: bool,
    },
}

impl From<ProfileEdit> for sdk::ProfileEdit {
    fn from(e: ProfileEdit) -> Self {
        match e {
            ProfileEdit::SetRole { role } => Self::SetRole(role),
            ProfileEdit::AddGoal { goal } => Self::AddGoal(goal),
            ProfileEdit::RemoveGoal { goal } => Self::RemoveGoal(goal),
            ProfileEdit::AddInterest { topic } => Self::AddInterest(topic),
            ProfileEdit::RemoveInterest { topic } => Self::RemoveInterest(topic),
            ProfileEdit::MuteTopic { topic } => Self::MuteTopic(topic),
            ProfileEdit::UnmuteTopic { topic } => Self::UnmuteTopic(topic),
            ProfileEdit::SetConsent { topic, personalise } => {
                Self::SetConsent { topic, personalise }
            }
        }
    }
}

/// One released update, as the device recorded it.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct UploadRecord {
    /// When (RFC 3339).
    pub at: String,
    /// The round.
    pub round_id: u64,
    /// The model version trained against.
    pub model_version: u64,
    /// The privacy mode.
    pub mode: String,
    /// σ.
    pub noise_multiplier: f64,
    /// C.
    pub clip_norm: f64,
    /// ε spent after this upload.
    pub epsilon_after: f64,
    /// `update` (a model update or share) or `evaluation` (a federated-evaluation release).
    pub kind: String,
    /// Distributed mode only: `epsilon_after` holds if at least this many of the devices in
    /// the released sum were honest.
    pub assumed_honest_devices: Option<u64>,
    /// Distributed mode only: the fewest devices a released sum holds.
    pub min_contributors: Option<u32>,
}

/// The on-device privacy accountant, for the app's UI.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct BudgetStatus {
    /// The budget's ε.
    pub epsilon_budget: f64,
    /// The budget's δ.
    pub delta: f64,
    /// ε spent so far, at δ.
    pub epsilon_spent: f64,
    /// ε left (never negative).
    pub epsilon_remaining: f64,
    /// Updates released.
    pub rounds: u64,
    /// Against whom the spent ε holds.
    pub audience: String,
    /// The uploads, oldest first.
    pub uploads: Vec<UploadRecord>,
}

/// What one `participate` call is to do.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ParticipateOptions {
    /// Tasks to finish (each ends with an upload, a decline or a refused upload), ≥ 1.
    pub rounds: u32,
    /// The app's verdict: idle, charging, unmetered network. When false the device checks
    /// in as ineligible and trains nothing.
    pub device_conditions_met: bool,
    /// Stop waiting for tasks after this many seconds in all; `None`: no limit.
    pub give_up_after_seconds: Option<f64>,
    /// The enrolment grant the app's backend signed for the signed-in person (an encoded
    /// `EnrolmentGrant`, raw or base64), sent when the device enrols; needed by a coordinator
    /// that counts per person. `None`: enrol with the app key alone.
    #[uniffi(default = None)]
    pub enrolment_grant: Option<Vec<u8>>,
}

/// One step of a participation cycle, in order.
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum ParticipationStep {
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
        /// Seconds the device waits.
        wait_seconds: f64,
    },
    /// The device moved to the coordinator replica that owns the run.
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
    /// The coordinator refused the update (e.g. the round closed first); the spend stays.
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
    /// Distributed mode: the device completed a secure-aggregation stage.
    SecureAggregationStage {
        /// The round.
        round_id: u64,
        /// `advertise_keys`, `share_keys` or `unmasking`.
        stage: String,
        /// What the device sent.
        detail: String,
    },
    /// Distributed mode: the round went on without the device (a stage deadline passed, or
    /// the coordinator aborted or moved on) while it waited to act in `stage`.
    SecureAggregationLeft {
        /// The round.
        round_id: u64,
        /// The stage the device was waiting for.
        stage: String,
        /// Why.
        reason: String,
    },
    /// Participation stopped before the requested rounds.
    Stopped {
        /// Why.
        why: String,
    },
}

impl From<&sdk::ParticipationEvent> for ParticipationStep {
    fn from(e: &sdk::ParticipationEvent) -> Self {
        use sdk::ParticipationEvent as E;
        match e.clone() {
            E::Enrolled { device_id, new } => Self::Enrolled { device_id, new },
            E::ComeBackLater {
                reason,
                detail,
                wait,
            } => Self::ComeBackLater {
                reason,
                detail,
                wait_seconds: wait.as_secs_f64(),
            },
            E::Redirected { endpoint } => Self::Redirected { endpoint },
            E::Task {
                run_id,
                round_id,
                model_version,
            } => Self::Task {
                run_id,
                round_id,
                model_version,
            },
            E::ModelInstalled {
                model_version,
                size_bytes,
                resumed_from,
            } => Self::ModelInstalled {
                model_version,
                size_bytes,
                resumed_from,
            },
            E::Uploaded {
                round_id,
                bytes,
                epsilon_spent,
                receipt_id,
            } => Self::Uploaded {
                round_id,
                bytes,
                epsilon_spent,
                receipt_id,
            },
            E::UploadRefused { round_id, message } => Self::UploadRefused { round_id, message },
            E::Declined {
                round_id,
                reason,
                why,
            } => Self::Declined {
                round_id,
                reason,
                why,
            },
            E::SecureAggregationStage {
                round_id,
                stage,
                detail,
            } => Self::SecureAggregationStage {
                round_id,
                stage,
                detail,
            },
            E::SecureAggregationLeft {
                round_id,
                stage,
                reason,
            } => Self::SecureAggregationLeft {
                round_id,
                stage,
                reason,
            },
            E::Stopped { why } => Self::Stopped { why },
        }
    }
}

/// What a `participate` call did.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ParticipationReport {
    /// Updates accepted.
    pub uploads: u32,
    /// Tasks declined.
    pub declines: u32,
    /// Updates refused by the coordinator.
    pub refused: u32,
    /// Every step, in order.
    pub steps: Vec<ParticipationStep>,
    /// The same steps as the SDK words them (for a log).
    pub messages: Vec<String>,
}

/// Implemented by the app to follow a participation cycle as it happens (progress in a
/// notification, a log). Called on the thread that called `participate`.
#[uniffi::export(with_foreign)]
pub trait ParticipationListener: Send + Sync {
    /// One step, with the SDK's wording of it.
    fn on_step(&self, step: ParticipationStep, message: String);
}

/// One user's device: the store, the model and the controls. Thread-safe; calls on one
/// handle are serialised (a `participate` cycle holds the handle until it returns, so call
/// it from a background job, never from the UI thread).
#[derive(uniffi::Object)]
pub struct FedprefDevice {
    device: Mutex<sdk::Device>,
}

impl FedprefDevice {
    fn lock(&self) -> MutexGuard<'_, sdk::Device> {
        // A panic while holding the lock cannot leave the store half-written (every write
        // is one SQLite transaction), so the device stays usable.
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[uniffi::export]
impl FedprefDevice {
    /// Opens (creating and migrating if needed) the store at `path`, with the default
    /// configuration: a privacy budget of ε = 10 at δ = 1e-6 when the store is new.
    #[uniffi::constructor]
    pub fn open(path: String) -> Result<Arc<Self>, FedprefError> {
        let device = sdk::Device::open(path, sdk::DeviceConfig::default())?;
        Ok(Arc::new(Self {
            device: Mutex::new(device),
        }))
    }

    /// Opens the store at `path`; a new store gets the privacy budget (ε, δ). An existing
    /// store keeps the budget it was created with.
    #[uniffi::constructor]
    pub fn open_with_budget(
        path: String,
        epsilon: f64,
        delta: f64,
    ) -> Result<Arc<Self>, FedprefError> {
        let config = sdk::DeviceConfig {
            budget_epsilon: epsilon,
            budget_delta: delta,
            ..sdk::DeviceConfig::default()
        };
        let device = sdk::Device::open(path, config)?;
        Ok(Arc::new(Self {
            device: Mutex::new(device),
        }))
    }

    /// Stores the records of a JSON Lines text (catalogue items, feedback, explicit data,
    /// consents; the format in docs/app-developers.md). Without `skip_invalid` one bad line
    /// refuses the whole text ([`FedprefError::InvalidLines`]); with it, the valid lines
    /// are stored and the bad ones reported. `now`: the clock if `None`.
    pub fn ingest_jsonl(
        &self,
        lines: String,
        skip_invalid: bool,
        now: Option<SystemTime>,
    ) -> Result<IngestReport, FedprefError> {
        let now = time(now)?;
        let r = self.lock().ingest_jsonl(&lines, skip_invalid, now)?;
        Ok(IngestReport {
            items: r.items as u64,
            feedback: r.feedback as u64,
            explicit: r.explicit as u64,
            consents: r.consents as u64,
            expired: r.expired as u64,
            skipped: r.skipped.iter().map(ToString::to_string).collect(),
        })
    }

    /// Up to `k` recommendations with scores, transparency labels and reasons.
    pub fn recommend(
        &self,
        k: u32,
        now: Option<SystemTime>,
    ) -> Result<Vec<Recommendation>, FedprefError> {
        let now = time(now)?;
        let recs = self.lock().recommend(k as usize, now)?;
        Ok(recs
            .into_iter()
            .map(|r| Recommendation {
                item: r.item,
                score: r.score,
                label: r.label,
                reason: r.reason.into(),
            })
            .collect())
    }

    /// The two switches.
    pub fn settings(&self) -> Settings {
        let s = self.lock().settings();
        Settings {
            personalisation: s.personalisation,
            training: s.training,
        }
    }

    /// Turns personalised recommendations on or off.
    pub fn set_personalisation(&self, on: bool) -> Result<(), FedprefError> {
        Ok(self.lock().set_personalisation(on)?)
    }

    /// Turns training participation on or off (off: `participate` declines every task).
    pub fn set_training(&self, on: bool) -> Result<(), FedprefError> {
        Ok(self.lock().set_training(on)?)
    }

    /// The profile: explicit data, what was inferred, consents and switches.
    pub fn profile(&self, now: Option<SystemTime>) -> Result<Profile, FedprefError> {
        let now = time(now)?;
        let p = self.lock().profile(now)?;
        let affinities = |v: Vec<sdk::Affinity>| {
            v.into_iter()
                .map(|a| Affinity {
                    value: a.value,
                    weight: a.weight,
                })
                .collect()
        };
        Ok(Profile {
            settings: Settings {
                personalisation: p.settings.personalisation,
                training: p.settings.training,
            },
            role: p.role,
            goals: p.goals,
            interests: p.interests,
            inferred_topics: affinities(p.inferred_topics),
            inferred_formats: affinities(p.inferred_formats),
            active_hours: affinities(p.active_hours),
            consents: p
                .consents
                .into_iter()
                .map(|c| Consent {
                    topic: c.topic,
                    personalise: c.personalise,
                })
                .collect(),
            muted_topics: p.muted_topics,
            feedback_counts: p
                .feedback_counts
                .into_iter()
                .map(|(k, n)| (k, n as u64))
                .collect(),
            examples: p.examples as u64,
            personalised: p.personalised,
        })
    }

    /// Applies one change the user made to the profile.
    pub fn edit_profile(
        &self,
        edit: ProfileEdit,
        now: Option<SystemTime>,
    ) -> Result<(), FedprefError> {
        let now = time(now)?;
        Ok(self.lock().edit_profile(edit.into(), now)?)
    }

    /// Forgets what was learned from use (private parameters, inferred profile, feedback);
    /// explicit data, consents, switches, the shared model and the budget stay.
    pub fn reset_model(&self) -> Result<(), FedprefError> {
        Ok(self.lock().reset_model()?)
    }

    /// Everything the store holds, as one JSON document (`fedpref-device-export`).
    pub fn export(&self, now: Option<SystemTime>) -> Result<String, FedprefError> {
        let now = time(now)?;
        let doc = self.lock().export(now)?;
        serde_json::to_string_pretty(&doc)
            .map_err(|e| FedprefError::Storage(format!("the export does not serialise: {e}")))
    }

    /// Deletes everything about the user (kept: the two switches and the accountant's
    /// spend, which cannot be undone).
    pub fn delete_everything(&self) -> Result<(), FedprefError> {
        Ok(self.lock().delete_everything()?)
    }

    /// The privacy budget: ε spent and left, and the uploads.
    pub fn budget(&self) -> Result<BudgetStatus, FedprefError> {
        let b = self.lock().budget()?;
        Ok(BudgetStatus {
            epsilon_budget: b.epsilon_budget,
            delta: b.delta,
            epsilon_spent: b.epsilon_spent,
            epsilon_remaining: b.epsilon_remaining,
            rounds: b.rounds,
            audience: b.audience,
            uploads: b
                .uploads
                .into_iter()
                .map(|u| UploadRecord {
                    at: u.at,
                    round_id: u.round_id,
                    model_version: u.model_version,
                    mode: u.mode,
                    noise_multiplier: u.noise_multiplier,
                    clip_norm: u.clip_norm,
                    epsilon_after: u.epsilon_after,
                    kind: u.kind,
                    assumed_honest_devices: u.assumed_honest_devices,
                    min_contributors: u.min_contributors,
                })
                .collect(),
        })
    }

    /// Installs a shared model from its JSON form (`{"model_version", "factor_dimension",
    /// "global_offset", "items": [{"item", "factors", "bias"}]}`), as `fedpref-device model
    /// import` does; normally `participate` downloads it.
    pub fn install_model_json(&self, json: String) -> Result<(), FedprefError> {
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| FedprefError::InvalidInput(format!("model: not valid JSON: {e}")))?;
        let model = sdk::MatrixFactorization::from_json(&value)
            .map_err(|e| FedprefError::from(SdkError::Model(e)))?;
        Ok(self.lock().install_model(model)?)
    }

    /// One participation cycle against the coordinator at `coordinator_url` (its
    /// certificate must chain to `ca_certificate_pem`): enrol with `app_key` if the device
    /// has not, then check in → download the model if needed → train → clip, noise and
    /// record → upload, `options.rounds` times (or decline what the switches or the budget
    /// do not allow). Blocks until done; `listener` sees each step as it happens.
    pub fn participate(
        &self,
        coordinator_url: String,
        ca_certificate_pem: String,
        app_key: String,
        options: ParticipateOptions,
        listener: Option<Arc<dyn ParticipationListener>>,
    ) -> Result<ParticipationReport, FedprefError> {
        if options.rounds == 0 {
            return Err(FedprefError::InvalidInput(
                "participate: rounds must be at least 1".into(),
            ));
        }
        let give_up_after = match options.give_up_after_seconds {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(FedprefError::InvalidInput(format!(
                    "participate: give_up_after_seconds {s} must be a finite number > 0"
                )));
            }
        };
        let config = sdk::ParticipationConfig {
            enrolment_grant: options
                .enrolment_grant
                .as_deref()
                .map(sdk::enrolment_grant_from_bytes)
                .transpose()
                .map_err(FedprefError::InvalidInput)?,
            ..sdk::ParticipationConfig::default()
        };
        let sdk_options = sdk::ParticipateOptions {
            rounds: options.rounds,
            device_conditions_met: options.device_conditions_met,
            give_up_after,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| FedprefError::Storage(format!("cannot start the network runtime: {e}")))?;
        let mut device = self.lock();
        let mut on_event = |e: &sdk::ParticipationEvent| {
            if let Some(l) = &listener {
                l.on_step(e.into(), e.to_string());
            }
        };
        let report = runtime.block_on(async {
            let mut client = sdk::CoordinatorClient::connect(
                &coordinator_url,
                ca_certificate_pem.as_bytes(),
                config,
            )
            .await?;
            sdk::participate(
                &mut device,
                &mut client,
                &app_key,
                &sdk_options,
                &mut on_event,
            )
            .await
        })?;
        Ok(ParticipationReport {
            uploads: report.uploads,
            declines: report.declines,
            refused: report.refused,
            steps: report.events.iter().map(Into::into).collect(),
            messages: report.events.iter().map(ToString::to_string).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_to_the_sdk_clock_and_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_780_000_000_123);
        assert_eq!(time(Some(t)).unwrap().millis(), 1_780_000_000_123);
        let before = UNIX_EPOCH - Duration::from_millis(5);
        assert_eq!(time(Some(before)).unwrap().millis(), -5);
    }

    #[test]
    fn every_sdk_error_keeps_its_message_and_gets_its_own_variant() {
        let e: FedprefError = SdkError::TrainingOff.into();
        assert!(matches!(e, FedprefError::TrainingOff(_)));
        assert_eq!(e.to_string(), SdkError::TrainingOff.to_string());
        let e: FedprefError = ParticipationError::Device(SdkError::NoExamples).into();
        assert!(matches!(e, FedprefError::NoExamples(_)));
        let p = ParticipationError::NotEnrolled { call: "CheckIn" };
        let message = p.to_string();
        let e: FedprefError = p.into();
        assert!(matches!(e, FedprefError::Rejected(_)));
        assert_eq!(e.to_string(), message);
    }
}
