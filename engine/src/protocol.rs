//! The round engine's protocol: what happens to it ([`Event`], including operators'
//! [`AdminCommand`]s), what it asks its driver to do ([`Action`]), what it gives a device
//! ([`Task`], and in distributed mode [`SecureRoundInfo`] and [`StageView`]), why it refuses a
//! request ([`Rejection`]) and what a committed round produces ([`RoundOutcome`]).
//!
//! These are plain data: the engine ([`crate::engine`]) and the secure round
//! ([`crate::secure_round`]) produce and consume them, the coordinator maps them to gRPC and the
//! store, and the simulator drives the engine with them. They are re-exported from
//! [`crate::engine`] under their old paths.

use std::sync::Arc;

use fedpref_secagg::{
    AdvertiseKeys, KeyDirectory, RoundConfig, ServerStage, ShareInbox, ShareKeys, Unmask,
    UnmaskingPlan,
};

use crate::distributed::DistributedPlan;
use crate::ledger::{DistributedRound, LedgerEvent};
use crate::model::ModelBlob;

/// Something that happened.
#[derive(Clone, Debug)]
pub enum Event {
    /// A device asked for work.
    CheckIn {
        /// Its opaque id.
        device: String,
        /// Whether the app says it may train now (idle, charging, unmetered, budget left).
        eligible: bool,
    },
    /// A device uploaded its update.
    Update {
        /// Its opaque id.
        device: String,
        /// The round it says the update is for.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// The update to the shared parameters.
        values: Vec<f32>,
        /// Its number of local examples.
        examples: u64,
        /// Adaptive clipping in local mode: the device's noised clip bit (required exactly
        /// then; refused otherwise).
        clip_bit: Option<ClipBit>,
    },
    /// A device's upload header arrived (its body, the noised update, not yet read): the
    /// header is checked against the device's task and, in local mode, the round is charged
    /// in the ledger ([`Action::ChargeRound`]) before the body is read, so that the ledger
    /// counts every update the coordinator could have seen.
    UpdateHeader {
        /// Its opaque id.
        device: String,
        /// The round it says the update is for.
        round: u64,
        /// The task token it was given.
        task_token: String,
    },
    /// Simulations only: a simulated device's **clipped, un-noised** update, sparse
    /// (`values[j]` at coordinate `indices[j]`, zero elsewhere, indices strictly increasing).
    /// Taken in privacy modes `none` and `local` with a FedAvg-family optimiser. In mode
    /// `local` the engine checks the norm is at most the round's C and, instead of the
    /// device's dense N(0, (σC)²) noise, the round's aggregator adds one aggregate draw of
    /// N(0, Σ w² (σC)²) per coordinate when the round closes — the same distribution of the
    /// released aggregate ([`crate::aggregation::RoundAggregator::add_simulated`]). The
    /// closing tick must then be given a simulation sampler: with the secure sampler the
    /// round is abandoned, so no real model can come from such updates. No transport
    /// constructs this event; real uploads are [`Event::Update`]. Validation, tasks and
    /// accounting are those of [`Event::Update`].
    SimulatedUpdate {
        /// Its opaque id.
        device: String,
        /// The round it says the update is for.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// The coordinates that may be non-zero, strictly increasing.
        indices: Vec<u32>,
        /// Their clipped values.
        values: Vec<f32>,
        /// Its number of local examples.
        examples: u64,
        /// Adaptive clipping in local mode: the device's noised clip bit.
        clip_bit: Option<ClipBit>,
    },
    /// A device hands its task back (budget, conditions, opt-out); in a fixed cohort its
    /// slot goes to the next device that checks in.
    Decline {
        /// Its opaque id.
        device: String,
        /// The round of the task.
        round: u64,
        /// The task token it was given.
        task_token: String,
    },
    /// Distributed mode, stage 1: a device advertises its keys.
    SecAggKeys {
        /// Its opaque id.
        device: String,
        /// The round of the task.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// Its two public keys.
        keys: AdvertiseKeys,
    },
    /// Distributed mode, stage 2: a device sends its encrypted shares.
    SecAggShares {
        /// Its opaque id.
        device: String,
        /// The round of the task.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// One ciphertext per neighbour.
        shares: ShareKeys,
    },
    /// Distributed mode, stage 3: a device uploads its masked input.
    MaskedUpdate {
        /// Its opaque id.
        device: String,
        /// The round of the task.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// The masked, fixed-point values modulo 2³².
        values: Vec<u32>,
    },
    /// Distributed mode, stage 4: a device reveals the shares its plan asks for.
    SecAggUnmask {
        /// Its opaque id.
        device: String,
        /// The round of the task.
        round: u64,
        /// The task token it was given.
        task_token: String,
        /// The revealed shares.
        unmask: Unmask,
    },
    /// The driver durably recorded the release an [`Action::RecordRelease`] asked for: the
    /// round's sum may now be unmasked.
    ReleaseRecorded {
        /// The round.
        round: u64,
    },
    /// Time passed (deadlines are checked against `now`).
    Tick,
    /// An operator's command.
    Admin(AdminCommand),
}

impl Event {
    /// The device (or person) the event comes from; `None` for ticks, recorded releases and
    /// operator commands.
    pub fn device(&self) -> Option<&str> {
        match self {
            Self::CheckIn { device, .. }
            | Self::Update { device, .. }
            | Self::UpdateHeader { device, .. }
            | Self::SimulatedUpdate { device, .. }
            | Self::Decline { device, .. }
            | Self::SecAggKeys { device, .. }
            | Self::SecAggShares { device, .. }
            | Self::MaskedUpdate { device, .. }
            | Self::SecAggUnmask { device, .. } => Some(device),
            Self::ReleaseRecorded { .. } | Self::Tick | Self::Admin(_) => None,
        }
    }
}

/// Operator commands: the one type the engine, the coordinator's admin service, the replica
/// forwarding (serialised as JSON with a `kind` tag) and the admin command line share.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminCommand {
    /// Stop opening rounds; the open round, if any, is abandoned.
    Pause {
        /// Why.
        reason: String,
    },
    /// Open rounds again.
    Resume {
        /// Why (recorded in the ledger).
        reason: String,
    },
    /// Stop the run for good.
    Stop {
        /// Why.
        reason: String,
    },
    /// Publish an earlier version's parameters as a new version. The spend stays.
    Rollback {
        /// The version to restore.
        to_version: u64,
        /// Why (recorded in the ledger).
        reason: String,
        /// Its parameters: the driver reads them from the store before the engine sees the
        /// command (never serialised; a forwarded rollback is resolved by the run's owner).
        #[serde(skip)]
        params: Vec<f32>,
    },
}

impl AdminCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Pause { .. } => "pause",
            Self::Resume { .. } => "resume",
            Self::Stop { .. } => "stop",
            Self::Rollback { .. } => "rollback (to a version of another shape)",
        }
    }
}

/// A task for a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// The device.
    pub device: String,
    /// The round.
    pub round: u64,
    /// The token the upload must carry.
    pub task_token: String,
    /// The model version to train against.
    pub model_version: u64,
    /// When the upload must arrive, ms since the epoch.
    pub deadline_ms: i64,
    /// Distributed mode: the round's secure-aggregation parameters and stage deadlines.
    pub secure_aggregation: Option<Arc<SecureRoundInfo>>,
    /// The clip norm C of the round (adaptive clipping's current C, else the manifest's).
    pub clip_norm: f64,
    /// Adaptive clipping in local mode: the standard deviation σ_b of the noise the device
    /// must add to its clip bit (the task requests a bit); `None` when no bit is requested.
    pub clip_bit_noise_std: Option<f64>,
}

/// A device's clip bit for adaptive clipping in local mode, with the C it was computed for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipBit {
    /// The clip norm the device applied and compared its update's norm with; must be the
    /// round's C.
    pub clip_norm: f64,
    /// 1 if the update's norm before clipping was at most C, else 0, plus the device's
    /// N(0, σ_b²) noise. Must be finite.
    pub noised_bit: f64,
}

/// How a rejection maps to a status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectKind {
    /// The request itself is malformed (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// The request is well-formed but not allowed now (`FAILED_PRECONDITION`).
    FailedPrecondition,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The status it maps to.
    pub kind: RejectKind,
    /// A message naming the problem.
    pub message: String,
}

/// A distributed round's release, to be recorded before its sum is unmasked.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseRecord {
    /// The round.
    pub round: u64,
    /// The devices whose masked inputs are in the sum.
    pub participants: Vec<String>,
    /// The `round_released` ledger entry.
    pub event: LedgerEvent,
}

/// The round whose release `actions` ask to record, if any: once it is recorded, the driver
/// answers [`Event::ReleaseRecorded`] for it.
pub fn release_to_record(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::RecordRelease(r) => Some(r.round),
        _ => None,
    })
}

/// What the engine asks its driver to do.
#[derive(Clone, Debug)]
pub enum Action {
    /// Give a device its task.
    SendTask(Task),
    /// Distributed mode: record this release durably (fenced, with its ledger entry and the
    /// contributors' participations), then answer [`Event::ReleaseRecorded`]; the sum is
    /// unmasked only then. If recording fails the round is never unmasked.
    RecordRelease(Box<ReleaseRecord>),
    /// Tell a device to come back later.
    ComeBackLater {
        /// The device.
        device: String,
        /// When, ms since the epoch.
        retry_at_ms: i64,
        /// Why.
        reason: String,
    },
    /// Refuse a request.
    Reject {
        /// The device.
        device: String,
        /// Why.
        rejection: Rejection,
    },
    /// A task was handed back; the device is not asked again this round.
    TaskDeclined {
        /// The device.
        device: String,
        /// The round.
        round: u64,
    },
    /// An update was accepted into the round (in distributed mode: a masked input).
    UpdateAccepted {
        /// The device.
        device: String,
        /// The round.
        round: u64,
    },
    /// Distributed mode: a device's keys, shares or revealed shares were accepted.
    SecAggAccepted {
        /// The device.
        device: String,
        /// The round.
        round: u64,
    },
    /// Durably record a round: its ledger event, participants and the model version it
    /// produced (unpublished), in one transaction.
    CommitRound(Box<RoundOutcome>),
    /// Local mode: record the round's spend (its `round_charged` ledger entry) now, before any
    /// of its updates is read: each device's upload is a release to the coordinator whether
    /// the round later commits or not. The round's commit adds nothing to it; an abandonment
    /// leaves it spent. If recording fails, the upload must be refused unread.
    ChargeRound {
        /// The round.
        round: u64,
        /// The `RoundCharged` ledger event.
        event: LedgerEvent,
    },
    /// Make a committed model version visible. Always comes after its `CommitRound`.
    PublishModel {
        /// The version.
        version: u64,
    },
    /// Record that a round was abandoned: nothing of it is published. It released nothing,
    /// unless an [`Action::RecordRelease`] for the same round came first (a distributed round
    /// whose sum was unmasked, or was about to be, when it failed).
    AbandonRound {
        /// The round.
        round: u64,
        /// Updates received.
        contributions: u64,
        /// Why.
        reason: String,
    },
    /// The run's status changed; record the ledger event.
    StatusChanged {
        /// The new status.
        status: RunState,
        /// The ledger event to append.
        event: LedgerEvent,
    },
    /// An operator command that cannot be carried out now (`FAILED_PRECONDITION`).
    AdminRefused {
        /// Why.
        message: String,
    },
    /// Store and publish a rollback.
    RolledBack {
        /// The restored version.
        to_version: u64,
        /// The new version number.
        new_version: u64,
        /// The new version, encoded.
        model: ModelBlob,
        /// The server optimiser's fresh state, as JSON.
        server_state: String,
        /// Why, as the operator gave it.
        reason: String,
    },
}

/// A committed round.
#[derive(Clone, Debug)]
pub struct RoundOutcome {
    /// The round.
    pub round: u64,
    /// Devices aggregated.
    pub participants: Vec<String>,
    /// The new model version, encoded.
    pub model: ModelBlob,
    /// The server optimiser's state, as JSON.
    pub server_state: String,
    /// The `RoundCommitted` ledger event.
    pub event: LedgerEvent,
    /// `RunStopped` when this round completes the run.
    pub stop: Option<LedgerEvent>,
}

/// The run's state as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Rounds open.
    Active,
    /// No rounds until resumed.
    Paused,
    /// Done.
    Stopped,
}

impl RunState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

/// The public description of a distributed round, the same for every device of the round:
/// what a task carries.
#[derive(Clone, Debug, PartialEq)]
pub struct SecureRoundInfo {
    /// The secure-aggregation config (context, n, t, graph, m, checked encoding).
    pub config: RoundConfig,
    /// The run's distributed plan (mechanism, β, durations).
    pub plan: DistributedPlan,
    /// Absolute deadlines, ms since the epoch: advertise keys, share keys, masked input,
    /// unmasking.
    pub deadlines: [i64; 4],
}

impl SecureRoundInfo {
    /// The ledger's record of this round once its sum was unmasked from `contributors`
    /// masked inputs: the mechanism, the neighbouring relation, t, k, m and the assumption.
    pub fn ledger_record(&self, contributors: u64) -> DistributedRound {
        DistributedRound {
            mechanism_name: "distributed_discrete_gaussian".into(),
            mechanism: self.plan.mechanism,
            neighbouring: "zero-out".into(),
            threshold: self.config.threshold,
            neighbour_count: match self.config.graph {
                fedpref_secagg::Graph::Complete => self.config.cohort_size - 1,
                fedpref_secagg::Graph::Harary { degree, .. } => degree,
            },
            min_contributors: self.config.min_contributors,
            contributors,
            assumption: self.plan.assumption(),
        }
    }
}

/// What a device is given for the current stage.
#[derive(Clone, Debug, PartialEq)]
pub enum StageInput {
    /// Nothing: the stage needs nothing from the device, or the device is no longer part of
    /// the round (it missed an earlier stage) and must stop.
    None,
    /// Share keys: the device's index and its neighbours' keys.
    KeyDirectory(KeyDirectory),
    /// Masked input: the encrypted shares addressed to the device.
    ShareInbox(ShareInbox),
    /// Unmasking: which neighbours survived and which dropped.
    UnmaskingPlan(UnmaskingPlan),
}

/// The round's stage as one device sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageView {
    /// The stage.
    pub stage: ServerStage,
    /// When it closes, ms since the epoch (the round's last deadline once it has ended).
    pub deadline_ms: i64,
    /// The device's input for it.
    pub input: StageInput,
    /// How long the device should wait before polling again, ms: 100 ms per 50 devices of
    /// the cohort (at most 5 s), so a round's polls stay near 500 a second whatever n.
    pub poll_after_ms: i64,
}
