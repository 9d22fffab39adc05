//! # fedpref-client-sdk
//!
//! What an app embeds to personalise **on the device**: it keeps the user's events in a
//! local SQLite file, fits a private preference model there, recommends with the
//! guardrails of the product brief (diversity, recency, sensitive topics, transparency
//! labels), gives the user real controls (personalisation and training switches, profile,
//! reset, export, delete), and releases model updates only clipped, noised and accounted
//! for. [`participation`] takes part in federated rounds over gRPC with TLS: enrol, check
//! in, download the model (resuming), train, upload — with retries, and declining tasks the
//! user's budget or switches do not allow.
//!
//! ```
//! use fedpref_client_sdk::{Device, DeviceConfig, MatrixFactorization, Reason, Timestamp};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mut device = Device::open(dir.path().join("device.db"), DeviceConfig::default())?;
//! let now = Timestamp::parse_rfc3339("2026-06-01T12:00:00Z")?;
//!
//! // The app feeds events (here as JSON Lines: the catalogue, then what the user did).
//! let mut lines = String::new();
//! for i in 0..20 {
//!     let topic = ["Comedy", "Drama", "Jazz", "Health"][i % 4];
//!     let sensitive = topic == "Health";
//!     lines += &format!(
//!         "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"],\"sensitive\":{sensitive}}}\n"
//!     );
//! }
//! for (item, value) in [("i0", 5.0), ("i4", 4.5), ("i1", 2.0), ("i8", 4.0)] {
//!     lines += &format!(
//!         "{{\"type\":\"rating\",\"item\":\"{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
//!     );
//! }
//! device.ingest_jsonl(&lines, false, now)?;
//!
//! // Without a shared model the device is cold: a non-personalised ranking.
//! let recs = device.recommend(5, now)?;
//! assert!(recs.iter().all(|r| r.reason == Reason::Popular));
//!
//! // With one (normally downloaded from the coordinator), recommendations are personal.
//! let items = (0..20).map(|i| format!("i{i}")).collect();
//! device.install_model(MatrixFactorization::initial(1, items, 4, 0.1, 7)?)?;
//! let recs = device.recommend(5, now)?;
//! assert_eq!(recs.len(), 5);
//! assert_eq!(recs.iter().filter(|r| r.reason == Reason::Diversity).count(), 1); // ⌊5·0.2 + ½⌋
//! // Sensitive items (Health: i3, i7, …) are never used without the user's opt-in.
//! assert!(recs.iter().all(|r| !["i3", "i7", "i11", "i15", "i19"].contains(&r.item.as_str())));
//! # Ok(()) }
//! ```
//!
//! ## Map
//! - [`Device`]: the façade — ingest, recommend, profile, controls, export, delete, budget.
//! - [`event`]: the event types and the JSON Lines format; [`examples`]: the event →
//!   example table; [`store`]: the SQLite schema, migrations and journal choice.
//! - [`model`]: the [`PreferenceModel`] trait and [`MatrixFactorization`] (the maths of
//!   `../shared/bench/WORKLOAD.md`); [`recommend`]: the guardrails.
//! - [`upload`]: [`Device::prepare_upload`], the one function that clips, noises and
//!   records, and [`PreparedUpload`], the only thing that may be uploaded; in distributed
//!   mode [`Device::prepare_share`] and [`PreparedShare`], the only thing that may be masked.
//! - [`secure_aggregation`]: a distributed task's round parameters, checked before the
//!   device says anything, and the secure-aggregation message conversions.
//! - [`participation`]: [`CoordinatorClient`] (the gRPC calls, retries, resumable
//!   download) and [`participate`] (rounds with a [`Device`]).
//! - [`evaluation`]: federated evaluation, the aggregate counts behind the coordinator's
//!   guardrail metrics, reported with [`participation::report_metrics`].
//! - [`cli`]: the `fedpref-device` reference program.
//!
//! ## Features
//! - `grpc` (on by default): [`participation`], [`cli`] and the `fedpref-device` program,
//!   with tonic, tokio and rustls. Without it the crate is the store, the model, private
//!   training, evaluation and the user controls, with no network stack: what the simulator
//!   and the Python package link.

pub mod catalogue;
#[cfg(feature = "grpc")]
pub mod cli;
pub mod device;
pub mod evaluation;
pub mod event;
pub mod examples;
pub mod model;
#[cfg(feature = "grpc")]
pub mod participation;
pub mod recommend;
pub mod secure_aggregation;
pub mod store;
mod time;
pub mod upload;

pub use catalogue::{Catalogue, Permissions};
pub use device::{
    Affinity, BudgetStatus, Consent, Device, DeviceConfig, IngestReport, Profile, ProfileEdit,
    PurgeReport, Retention, Settings, UploadRecord, derive_implicit,
};
pub use evaluation::{EvaluationCounts, EvaluationRelease, EvaluationWindow, PreparedEvaluation};
pub use event::{CatalogueItem, Event, EventError, EventLimits, ExplicitKind, Feedback, Signal};
pub use examples::{Example, ExampleTable, ItemExample, SignalMapping};
pub use model::{
    LocalTraining, MatrixFactorization, ModelError, PreferenceModel, SparseUpdate, TensorLayout,
    TensorSpec, TrainingScratch, UserState, local_round, local_round_sparse,
    local_round_sparse_with,
};
#[cfg(feature = "grpc")]
pub use participation::{
    CallTime, CoordinatorClient, DownloadProgress, MetricsOutcome, ParticipateOptions,
    ParticipationConfig, ParticipationError, ParticipationEvent, ParticipationReport, ReportWhen,
    RetryPolicy, enrolment_grant_from_bytes, participate, report_metrics,
};
pub use recommend::{Guardrails, PersonalView, Ranker, Reason, Recommendation};
pub use time::Timestamp;
pub use upload::{PreparedShare, PreparedUpload, TrainingTask};

pub use fedpref_privacy;
pub use fedpref_proto;

use fedpref_privacy::{PrivacyError, PrivacyMode};
use thiserror::Error;

/// One refused JSON Lines record: its 1-based line number, the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error, serde::Serialize)]
#[error("line {line}, field `{field}`: {message}")]
pub struct LineError {
    /// The line number, from 1.
    pub line: usize,
    /// The field at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Everything the SDK can refuse or fail at. Each message names what was wrong.
#[derive(Debug, Error)]
pub enum SdkError {
    /// An event passed to [`Device::record`] is invalid; nothing was stored.
    #[error("event {index}, field `{field}`: {message}; nothing was stored")]
    InvalidEvent {
        /// The event's index in the slice.
        index: usize,
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Lines of a JSON Lines input are invalid; nothing was stored.
    #[error("{} invalid line(s), nothing was stored; first: {}", .0.len(), .0[0])]
    InvalidLines(Vec<LineError>),
    /// Bad input to a control (e.g. an empty topic).
    #[error("{0}")]
    InvalidInput(String),
    /// A bad configuration value.
    #[error("{0}")]
    InvalidConfig(String),
    /// A bad model or training configuration.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The user turned training participation off.
    #[error("training participation is off: no update is prepared")]
    TrainingOff,
    /// The budget would be exceeded; nothing was recorded.
    #[error("{0}")]
    BudgetExceeded(PrivacyError),
    /// The task's privacy mode is one the SDK cannot honour.
    #[error(
        "privacy mode {0} cannot be released this way: `prepare_upload` releases local-mode updates and `prepare_share` distributed-mode shares; in central mode the device does not upload"
    )]
    UnsupportedMode(PrivacyMode),
    /// The task is for a model version the device does not hold.
    #[error("the task is for model version {task}, the device holds {held:?}")]
    ModelVersionMismatch {
        /// The task's version.
        task: u64,
        /// The installed version, if any.
        held: Option<u64>,
    },
    /// No usable examples: nothing to learn from.
    #[error("no usable training examples on this device")]
    NoExamples,
    /// A privacy-crate refusal (bad σ or C, non-finite update, …).
    #[error("privacy: {0}")]
    Privacy(#[from] PrivacyError),
    /// The store was written by a newer SDK.
    #[error("the store has schema version {found}; this SDK supports up to {supported}")]
    SchemaTooNew {
        /// The file's version.
        found: i64,
        /// This SDK's version.
        supported: i64,
    },
    /// The store failed or holds something unreadable.
    #[error("store: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for SdkError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}
