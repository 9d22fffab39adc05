//! The privacy ledger: append-only, hash-chained, re-derivable.
//!
//! Every entry is one [`LedgerEntry`] (run id, sequence number from 1, time, event). Its
//! **canonical encoding** is its JSON serialisation with fields in declaration order and
//! numbers in shortest round-trip form (`serde_json`); that text is stored verbatim. Its hash
//! is `SHA-256(previous hash in hex ‖ "\n" ‖ canonical text)`, hex, with 64 zeros before the
//! first entry. [`verify`] recomputes the chain and re-derives every cumulative ε from the
//! recorded mechanism parameters with the privacy crate, so an edited, removed or reordered
//! entry is found, and so is a cumulative ε that does not follow from the rounds.
//!
//! A chain can be rewritten from some entry onwards by someone with write access to the
//! database; the hash of the head, printed in reports and kept elsewhere, is what detects that.

use fedpref_privacy::pld::{PldAccountant, RepeatedReleases};
use fedpref_privacy::tree::{
    ParticipationLimits, TreeAccountant, TreeSchedule, epsilon_from_zcdp_gaussian,
};
use fedpref_privacy::{Accountant, Audience, OrderGrid, PrivacyMode, RdpAccountant, RoundRelease};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::manifest::tracked_audiences;
use crate::manifest::{AlertAction, GuardrailMetricKind, ThresholdDirection};

/// The hash before the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// ε for one audience, and the accountant that computed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AudienceEpsilon {
    /// The audience (`fedpref_privacy::Audience::as_str`).
    pub audience: String,
    /// ε at the run's δ.
    pub epsilon: f64,
    /// The accountant that computed `epsilon` (`pld` or `rdp`). Absent in entries written
    /// before runs named their accountant: those are RDP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accountant: Option<Accountant>,
}

/// The mechanism and secure aggregation behind one distributed round: enough to re-derive its
/// RDP increment, and the assumption its ε rests on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedRound {
    /// `"distributed_discrete_gaussian"` (Kairouz, Liu, Steinke 2021).
    pub mechanism_name: String,
    /// The mechanism's parameters (C, granularity, d, β, per-device variance s², honest
    /// devices m); the increment is its RDP curve over the run's grid.
    pub mechanism: fedpref_privacy::distributed::DistributedDiscreteGaussian,
    /// Neighbouring relation: `"zero-out"` (one user's update replaced by zeros, its device
    /// still adding its noise share).
    pub neighbouring: String,
    /// Shamir threshold t.
    pub threshold: u32,
    /// Neighbours per device (n − 1 for the complete graph).
    pub neighbour_count: u32,
    /// The fewest masked inputs the coordinator would unmask (m).
    pub min_contributors: u32,
    /// Masked inputs in the unmasked sum.
    pub contributors: u64,
    /// The assumption ε rests on, in words.
    pub assumption: String,
}

/// One audience's RDP increment for a round, over the run's order grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AudienceRdp {
    /// The audience.
    pub audience: String,
    /// The sampling rate the increment was computed with (1 where no amplification holds).
    pub sampling_rate: f64,
    /// RDP at each order of the run's grid.
    pub rdp: Vec<f64>,
}

/// The tree accounting of one dp-ftrl round: enough to re-derive its cumulative ε.
///
/// The run's rounds fall into **segments** (the rounds one coordinator process released,
/// each with its own trees); ρ = Σ over segments of the tree accountant's ρ for that
/// segment's rounds, plus, with adaptive clipping, the bits' k/(8σ_b²) for
/// k = min(max_participations, ⌈rounds / min_separation⌉) participations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeRound {
    /// Rounds per tree (absent: one tree per segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_every: Option<u64>,
    /// Tree completion at restarts.
    pub completion: bool,
    /// The participation limits enforced: minimum separation in committed rounds …
    pub min_separation: u64,
    /// … and the most participations per device.
    pub max_participations: u64,
    /// The segment this round belongs to (from 0).
    pub segment: u64,
    /// Its position in the segment (from 1).
    pub segment_round: u64,
    /// σ_b of the clip bits, if adaptive clipping is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_noise_std: Option<f64>,
    /// Cumulative ρ (zCDP) after this round.
    pub rho: f64,
}

impl TreeRound {
    fn accountant(&self, noise_multiplier: f64) -> Result<TreeAccountant, String> {
        let schedule = match self.restart_every {
            Some(r) => TreeSchedule::restart_every(r, self.completion),
            None => Ok(TreeSchedule::single_tree()),
        }
        .map_err(|e| e.to_string())?;
        let limits = ParticipationLimits::new(self.min_separation, self.max_participations)
            .map_err(|e| e.to_string())?;
        TreeAccountant::new(noise_multiplier, schedule, limits).map_err(|e| e.to_string())
    }
}

/// Cumulative ρ of a dp-ftrl run whose segments released `segments` rounds each, with the
/// bits of adaptive clipping (σ_b) if any. See [`TreeRound`].
pub fn tree_rho(accountant: &TreeAccountant, segments: &[u64], bit_noise_std: Option<f64>) -> f64 {
    let mut rho: f64 = segments
        .iter()
        .filter(|&&r| r > 0)
        .map(|&r| accountant.rho(r))
        .sum();
    if let Some(sigma_b) = bit_noise_std {
        let rounds: u64 = segments.iter().sum();
        let limits = accountant.limits();
        let k = limits
            .max_participations()
            .min(rounds.div_ceil(limits.min_separation()));
        rho += fedpref_privacy::adaptive_clip::bit_rho(sigma_b, k).unwrap_or(f64::INFINITY);
    }
    rho
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// The run was created from a manifest; the initial model is version 1.
    RunCreated {
        /// SHA-256 of the canonical manifest.
        manifest_sha256: String,
        /// `none`, `local` or `central`.
        privacy_mode: String,
        /// Budget ε.
        budget_epsilon: f64,
        /// Budget δ (every ε in this ledger is at this δ).
        budget_delta: f64,
        /// The audience whose ε the budget binds (absent in ledgers written before it was
        /// recorded: then the first audience of each round's ε).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget_audience: Option<String>,
        /// σ (absent in mode `none`).
        noise_multiplier: Option<f64>,
        /// C.
        clip_norm: f64,
        /// The Rényi orders all RDP values in this ledger refer to.
        orders: Vec<f64>,
        /// The accountant every cumulative ε of the run's per-round releases is computed with
        /// (the manifest's `accountant`; DP-FTRL and distributed runs fall back to RDP). Absent
        /// in ledgers written before runs named it: those are RDP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accountant: Option<Accountant>,
        /// SHA-256 of the initial model.
        initial_model_sha256: String,
        /// The participation limits the round engine enforces, if the manifest sets any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        participation_limits: Option<ParticipationLimits>,
        /// The assumption the run's ε rests on, in words (written when the run has
        /// participation limits, dp-ftrl or adaptive clipping).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epsilon_assumption: Option<String>,
        /// `"person"` when the coordinator enrolled devices only with grants naming a person,
        /// so participation, its limits and every ε of the run count per person across their
        /// devices. Absent: per enrolment (one installation on one device).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privacy_unit: Option<String>,
    },
    /// A round's aggregate was computed and its spend recorded. Written before the model
    /// version it produced is published.
    RoundCommitted {
        /// The round number (from 1).
        round: u64,
        /// Devices whose updates were aggregated.
        cohort_size: u64,
        /// σ.
        noise_multiplier: f64,
        /// C.
        clip_norm: f64,
        /// The privacy mode.
        mode: String,
        /// The RDP spent this round, per audience.
        rdp_increments: Vec<AudienceRdp>,
        /// Cumulative ε at the run's δ after this round, per audience.
        cumulative_epsilon: Vec<AudienceEpsilon>,
        /// The model version the round produced (not yet published).
        model_version: u64,
        /// Its SHA-256.
        model_sha256: String,
        /// dp-ftrl: the tree accounting behind `cumulative_epsilon` (absent for per-round
        /// optimisers, whose `rdp_increments` carry it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tree: Option<TreeRound>,
        /// Adaptive clipping: the clip norm C the next round will use (`clip_norm` is the
        /// one this round used).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_clip_norm: Option<f64>,
        /// The assumption `cumulative_epsilon` rests on, in words (written for dp-ftrl,
        /// adaptive-clipping and distributed runs; for the others it follows from the
        /// audience and the manifest's sampling).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epsilon_assumption: Option<String>,
        /// Distributed mode: the mechanism behind `rdp_increments` (absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        distributed: Option<Box<DistributedRound>>,
    },
    /// A distributed round's sum is about to be unmasked: its release is spent here, before
    /// it exists, so that no crash or lost lease can unmask a sum the ledger does not count.
    /// The round's `round_committed` entry (if it commits) repeats the cumulative ε without
    /// adding to it; a `round_abandoned` entry after it leaves the spend in place.
    RoundReleased {
        /// The round number.
        round: u64,
        /// The devices whose masked inputs are in the sum.
        contributors: u64,
        /// The RDP of the release, per audience.
        rdp_increments: Vec<AudienceRdp>,
        /// Cumulative ε at the run's δ with this release, per audience.
        cumulative_epsilon: Vec<AudienceEpsilon>,
        /// The assumption `cumulative_epsilon` rests on, in words.
        epsilon_assumption: String,
        /// The mechanism behind `rdp_increments`.
        distributed: Box<DistributedRound>,
    },
    /// Local mode: a round's spend, recorded when the first update header of the round
    /// arrived and before any update was read. Each device's upload is a release to the
    /// coordinator, so the round is spent whether it later commits (its `round_committed`
    /// entry repeats the cumulative ε without adding to it), is abandoned, or is open when the
    /// coordinator stops (a `round_abandoned` entry closes it at the next start).
    RoundCharged {
        /// The round number.
        round: u64,
        /// σ.
        noise_multiplier: f64,
        /// The privacy mode (`local`).
        mode: String,
        /// The RDP of the round's release, per audience.
        rdp_increments: Vec<AudienceRdp>,
        /// Cumulative ε at the run's δ with this round, per audience.
        cumulative_epsilon: Vec<AudienceEpsilon>,
    },
    /// A round ended without a release: nothing was released and nothing spent (unless a
    /// `round_released` or `round_charged` entry for it came first).
    RoundAbandoned {
        /// The round number.
        round: u64,
        /// Updates received.
        contributions: u64,
        /// Why.
        reason: String,
    },
    /// A model version became visible to devices.
    ModelPublished {
        /// The version.
        model_version: u64,
        /// Its SHA-256.
        model_sha256: String,
    },
    /// An operator paused the run.
    Paused {
        /// Why, as given.
        reason: String,
    },
    /// An operator resumed the run.
    Resumed {
        /// Why, as given (absent in entries written before reasons were recorded).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The model was rolled back: an earlier version's parameters were published as a new
    /// version. Privacy already spent stays spent.
    RolledBack {
        /// The version whose parameters were restored.
        to_version: u64,
        /// The new version carrying them.
        new_version: u64,
        /// Its SHA-256.
        model_sha256: String,
        /// Why, as given (absent in entries written before reasons were recorded).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// A guardrail metric crossed its manifest threshold. Nothing is spent; when the
    /// guardrail says `pause`, a `paused` entry follows.
    GuardrailAlert {
        /// The metric.
        metric: GuardrailMetricKind,
        /// Its value over the reports summed so far for `model_version`.
        value: f64,
        /// The threshold from the manifest.
        threshold: f64,
        /// Which side of the threshold alerts.
        direction: ThresholdDirection,
        /// What the coordinator did: `log` or `pause`.
        action_taken: AlertAction,
        /// The model version the reports evaluate.
        model_version: u64,
        /// Distinct devices whose reports were summed.
        reporting_devices: u64,
        /// The earliest window start of those reports (ms since the epoch).
        window_start_ms: i64,
        /// The latest window end.
        window_end_ms: i64,
    },
    /// The first federated-evaluation report on a model version was accepted: each device
    /// may release one evaluation of that version (one report per device and version), a
    /// local Gaussian release of K rates in [0, 1] (replace-one, sensitivity 2C with
    /// C = √K/2) with noise multiplier `noise_multiplier`, costing each reporting device
    /// `epsilon` at `delta` on its own. Evaluation spends on devices' own accountants, apart
    /// from the rounds' cumulative ε.
    EvaluationReleased {
        /// The model version evaluated.
        model_version: u64,
        /// σ of each device's evaluation release.
        noise_multiplier: f64,
        /// C = √K/2 of the centred rate vector.
        clip_norm: f64,
        /// ε of one device's release of this version, at `delta`.
        epsilon: f64,
        /// δ.
        delta: f64,
    },
    /// The run stopped; no further rounds.
    RunStopped {
        /// `completed`, `budget exhausted: …`, or an operator's reason.
        reason: String,
        /// Rounds committed.
        rounds_committed: u64,
        /// Final ε per audience.
        cumulative_epsilon: Vec<AudienceEpsilon>,
    },
}

impl LedgerEvent {
    /// The event's kind, as stored in its own column for queries.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RunCreated { .. } => "run_created",
            Self::RoundCommitted { .. } => "round_committed",
            Self::RoundReleased { .. } => "round_released",
            Self::RoundCharged { .. } => "round_charged",
            Self::RoundAbandoned { .. } => "round_abandoned",
            Self::ModelPublished { .. } => "model_published",
            Self::Paused { .. } => "paused",
            Self::Resumed { .. } => "resumed",
            Self::RolledBack { .. } => "rolled_back",
            Self::GuardrailAlert { .. } => "guardrail_alert",
            Self::EvaluationReleased { .. } => "evaluation_released",
            Self::RunStopped { .. } => "run_stopped",
        }
    }
}

/// The [`LedgerEvent::EvaluationReleased`] entry for `model_version` when devices release
/// their evaluation with noise multiplier `noise_multiplier` (ε of one local release at δ
/// on the default order grid).
pub fn evaluation_release_event(
    model_version: u64,
    noise_multiplier: f64,
    delta: f64,
) -> LedgerEvent {
    let epsilon = fedpref_privacy::epsilon_after(
        &fedpref_privacy::evaluation::release(noise_multiplier),
        1,
        delta,
        &fedpref_privacy::OrderGrid::default(),
    )
    .map_or(f64::INFINITY, |s| s.epsilon);
    LedgerEvent::EvaluationReleased {
        model_version,
        noise_multiplier,
        clip_norm: fedpref_privacy::evaluation::clip_norm(),
        epsilon,
        delta,
    }
}

/// Whether two `evaluation_released` events agree (ε to a relative 10⁻¹²).
fn same_evaluation(a: &LedgerEvent, b: &LedgerEvent) -> bool {
    match (a, b) {
        (
            LedgerEvent::EvaluationReleased {
                model_version: va,
                noise_multiplier: sa,
                clip_norm: ca,
                epsilon: ea,
                delta: da,
            },
            LedgerEvent::EvaluationReleased {
                model_version: vb,
                noise_multiplier: sb,
                clip_norm: cb,
                epsilon: eb,
                delta: db,
            },
        ) => {
            va == vb
                && sa == sb
                && ca == cb
                && da == db
                && ea.is_finite()
                && (ea - eb).abs() <= 1e-12 * eb.abs().max(1.0)
        }
        _ => false,
    }
}

/// One ledger entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The run.
    pub run_id: String,
    /// Position in the run's chain, from 1.
    pub sequence: u64,
    /// Milliseconds since the Unix epoch, as the coordinator's clock gave it.
    pub at_ms: i64,
    /// What happened.
    pub event: LedgerEvent,
}

/// An entry as stored: its canonical text and its links.
#[derive(Clone, Debug, PartialEq)]
pub struct SealedEntry {
    /// Position in the chain.
    pub sequence: u64,
    /// The canonical encoding.
    pub body: String,
    /// The previous entry's hash (hex).
    pub prev_hash: String,
    /// This entry's hash (hex).
    pub hash: String,
}

/// The canonical encoding of an entry.
pub fn canonical(entry: &LedgerEntry) -> String {
    serde_json::to_string(entry).expect("ledger entries always serialise")
}

/// `SHA-256(prev_hash ‖ "\n" ‖ body)`, hex.
pub fn chain_hash(prev_hash: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    crate::hex(&h.finalize())
}

/// Seals an entry after `prev_hash`.
pub fn seal(entry: &LedgerEntry, prev_hash: &str) -> SealedEntry {
    let body = canonical(entry);
    SealedEntry {
        sequence: entry.sequence,
        hash: chain_hash(prev_hash, &body),
        prev_hash: prev_hash.to_string(),
        body,
    }
}

/// A run's ledger as one JSON object (`ledger export --format json`):
/// `{"run_id", "genesis_hash", "entries": [{"sequence", "prev_hash", "hash", "canonical",
/// "entry"}]}`. `canonical` is the stored text exactly as hashed, so
/// `hash = SHA-256(prev_hash ‖ "\n" ‖ canonical)` can be recomputed by any tool; `entry` is
/// the same text parsed (or `null` if it does not parse), for reading.
pub fn export_json(run_id: &str, entries: &[SealedEntry]) -> String {
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "sequence": e.sequence,
                "prev_hash": e.prev_hash,
                "hash": e.hash,
                "canonical": e.body,
                "entry": serde_json::from_str::<LedgerEntry>(&e.body)
                    .ok()
                    .and_then(|entry| serde_json::to_value(entry).ok()),
            })
        })
        .collect();
    let mut out = serde_json::to_string_pretty(&serde_json::json!({
        "run_id": run_id,
        "genesis_hash": GENESIS_HASH,
        "entries": entries,
    }))
    .expect("JSON values always serialise");
    out.push('\n');
    out
}

/// A distributed round's RDP increment: the mechanism's curve, for observers of the released
/// models (the coordinator knows who took part, so no amplification by sampling).
pub fn distributed_increments(round: &DistributedRound, orders: &OrderGrid) -> Vec<AudienceRdp> {
    vec![AudienceRdp {
        audience: Audience::ReleaseObservers.as_str().to_string(),
        sampling_rate: 1.0,
        rdp: round.mechanism.rdp_curve(orders),
    }]
}

/// One round's RDP increments per tracked audience.
pub fn round_increments(release: &RoundRelease, orders: &OrderGrid) -> Vec<AudienceRdp> {
    let acc = RdpAccountant::new(orders.clone());
    tracked_audiences(release)
        .into_iter()
        .map(|(audience, q)| {
            let sigma = release
                .mode
                .effective_noise_multiplier(release.noise_multiplier);
            AudienceRdp {
                audience: audience.as_str().to_string(),
                sampling_rate: q,
                rdp: acc
                    .step_rdp(q, sigma)
                    .expect("releases are validated before they reach the ledger"),
            }
        })
        .collect()
}

/// What [`verify`] re-derived from an intact chain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerifiedTotals {
    /// Entries checked.
    pub entries: u64,
    /// Rounds committed.
    pub rounds_committed: u64,
    /// Rounds abandoned.
    pub rounds_abandoned: u64,
    /// Re-derived cumulative ε per audience, at `delta`.
    pub cumulative_epsilon: Vec<AudienceEpsilon>,
    /// The run's δ.
    pub delta: f64,
    /// The hash of the last entry.
    pub head_hash: String,
}

/// The first problem [`verify`] found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("ledger entry {sequence}: {problem}")]
pub struct VerifyFailure {
    /// The sequence number of the first entry found wrong.
    pub sequence: u64,
    /// What is wrong with it.
    pub problem: String,
}

/// Verifies one run's chain, given its stored entries in the order the store returned them
/// (by sequence). Re-derives every RDP increment from the recorded σ, C, q and mode, and every
/// cumulative ε from the increments.
///
/// dp-ftrl rounds are re-derived from their tree records, which must agree with the run: a
/// run whose `run_created` records participation limits with those limits as its ε
/// assumption is a dp-ftrl run, every one of whose committed rounds carries a tree record
/// (and no other run's do); each record's limits are `run_created`'s, its schedule and σ_b
/// are the first record's, and its segment and position continue the records before it
/// (a position one past the last, or a new segment — numbered one past the last — at
/// position 1), the segments together holding every round committed so far.
///
/// Each entry goes through [`check_link`] (the hash chain) and then the check of its kind
/// (the `check_*` methods of the run's running state, each of which says what it verifies).
pub fn verify(run_id: &str, entries: &[SealedEntry]) -> Result<VerifiedTotals, VerifyFailure> {
    if entries.is_empty() {
        return Err(VerifyFailure {
            sequence: 1,
            problem: format!("run {run_id} has no ledger entries"),
        });
    }
    let mut run = ChainState::default();
    let mut prev_hash = GENESIS_HASH.to_string();
    for (i, stored) in entries.iter().enumerate() {
        let sequence = i as u64 + 1;
        let entry = check_link(run_id, stored, sequence, &prev_hash)
            .map_err(|problem| VerifyFailure { sequence, problem })?;
        run.check_entry(&entry.event, sequence)
            .map_err(|problem| VerifyFailure { sequence, problem })?;
        prev_hash = stored.hash.clone();
    }
    Ok(VerifiedTotals {
        entries: entries.len() as u64,
        rounds_committed: run.committed,
        rounds_abandoned: run.abandoned,
        cumulative_epsilon: run.last_eps,
        delta: run.delta,
        head_hash: prev_hash,
    })
}

/// Verifies one link of the hash chain: the entry is at position `sequence`, its
/// `prev_hash` is the previous entry's hash (`prev_hash`), its hash is that of its stored
/// text, and its body parses as a ledger entry of this run at this position.
fn check_link(
    run_id: &str,
    stored: &SealedEntry,
    sequence: u64,
    prev_hash: &str,
) -> Result<LedgerEntry, String> {
    if stored.sequence != sequence {
        return Err(format!(
            "found sequence {} where {sequence} was expected: an entry was removed or reordered",
            stored.sequence
        ));
    }
    if stored.prev_hash != prev_hash {
        return Err(
            "its previous-entry hash does not match the entry before it: that entry or this one was edited, removed or reordered".into(),
        );
    }
    if chain_hash(&stored.prev_hash, &stored.body) != stored.hash {
        return Err("its contents do not match its hash: it was edited".into());
    }
    let entry: LedgerEntry = serde_json::from_str(&stored.body)
        .map_err(|e| format!("its body is not a ledger entry: {e}"))?;
    if entry.run_id != run_id || entry.sequence != sequence {
        return Err("its body names another run or position".into());
    }
    Ok(entry)
}

/// What [`verify`] has learnt from the entries so far.
#[derive(Default)]
struct ChainState {
    /// The Rényi orders `run_created` records.
    grid: Option<OrderGrid>,
    /// The run's δ.
    delta: f64,
    /// The budget ε `run_created` records: no cumulative ε (of the audience the budget
    /// binds, the first listed) may exceed it. (`+∞` until `run_created` is read.)
    budget: Option<f64>,
    budget_audience: Option<String>,
    /// The accountant `run_created` records (`None`: a ledger written before runs named it,
    /// whose ε are RDP's and name no accountant).
    accountant: Option<Accountant>,
    /// What each audience has spent, as the rounds composed it.
    totals: Vec<AudienceTotal>,
    /// PLD's ε of runs of identical releases, remembered between entries.
    pld: RepeatedReleases,
    /// The cumulative ε of the last round (or release, or charge).
    last_eps: Vec<AudienceEpsilon>,
    /// dp-ftrl: rounds per tree segment.
    segments: Vec<u64>,
    /// dp-ftrl: the participation limits `run_created` records (None: not a dp-ftrl run).
    tree_limits: Option<ParticipationLimits>,
    /// dp-ftrl: the run's first tree record, whose schedule and σ_b every later one repeats.
    tree_reference: Option<TreeRound>,
    /// Whether `run_created` records a distributed run: its rounds must carry their
    /// mechanism.
    distributed_run: bool,
    capped: DistributedCap,
    /// The round whose release was recorded last, with its record, until its commit or
    /// abandonment.
    released: Option<(u64, DistributedRound)>,
    /// Whether this ledger records releases at all (older ledgers of distributed runs spend
    /// at commit).
    records_releases: bool,
    /// Local mode: the round charged last, until its commit or abandonment.
    charged: Option<u64>,
    committed: u64,
    abandoned: u64,
}

impl ChainState {
    /// Checks one entry (whose link is verified) by its kind, and learns from it.
    fn check_entry(&mut self, event: &LedgerEvent, sequence: u64) -> Result<(), String> {
        match (event, sequence) {
            (LedgerEvent::RunCreated { .. }, 1) => self.check_run_created(event),
            (_, 1) => Err("the first entry is not run_created".into()),
            (LedgerEvent::RunCreated { .. }, _) => Err("run_created after the first entry".into()),
            (
                LedgerEvent::RoundCommitted {
                    noise_multiplier,
                    cumulative_epsilon,
                    tree: Some(tree),
                    ..
                },
                _,
            ) => self.check_tree_round(tree, *noise_multiplier, cumulative_epsilon),
            (LedgerEvent::RoundCommitted { .. }, _) => self.check_committed_round(event),
            (LedgerEvent::RoundReleased { .. }, _) => self.check_release(event),
            (LedgerEvent::EvaluationReleased { .. }, _) => self.check_evaluation(event),
            (LedgerEvent::RoundCharged { .. }, _) => self.check_charge(event),
            (LedgerEvent::RoundAbandoned { round, .. }, _) => {
                self.abandon(*round);
                Ok(())
            }
            (
                LedgerEvent::RunStopped {
                    cumulative_epsilon,
                    rounds_committed,
                    ..
                },
                _,
            ) => self.check_stop(*rounds_committed, cumulative_epsilon),
            _ => Ok(()),
        }
    }

    /// `run_created`: reads the run's budget, δ, order grid, mode, limits and accountant,
    /// which every later check uses. Verifies that the order grid is valid.
    fn check_run_created(&mut self, event: &LedgerEvent) -> Result<(), String> {
        let LedgerEvent::RunCreated {
            orders,
            budget_delta,
            budget_epsilon,
            budget_audience,
            participation_limits,
            epsilon_assumption,
            privacy_mode,
            accountant,
            ..
        } = event
        else {
            unreachable!("called on run_created");
        };
        self.accountant = *accountant;
        self.budget = Some(*budget_epsilon);
        self.budget_audience = budget_audience.clone();
        self.distributed_run = privacy_mode == "distributed";
        self.capped = DistributedCap::from_run_created(
            self.distributed_run,
            *participation_limits,
            epsilon_assumption.as_deref(),
        );
        // A dp-ftrl run records its limits and, as the assumption its ε rests on, exactly
        // those limits; a run with limits but another optimiser names another assumption.
        self.tree_limits = (*participation_limits)
            .filter(|limits| epsilon_assumption.as_deref() == Some(limits.assumption().as_str()));
        self.grid =
            Some(OrderGrid::new(orders.clone()).map_err(|e| format!("bad order grid: {e}"))?);
        self.delta = *budget_delta;
        Ok(())
    }

    fn grid(&self) -> &OrderGrid {
        self.grid.as_ref().expect("set by the first entry")
    }

    /// A dp-ftrl round (one with a tree record): its settings are the run's
    /// ([`check_tree_settings`]), its segment and position continue the records before it,
    /// the segments hold every committed round, and its ρ and cumulative ε follow from the
    /// tree rounds so far; the ε is within the budget.
    fn check_tree_round(
        &mut self,
        tree: &TreeRound,
        noise_multiplier: f64,
        cumulative_epsilon: &[AudienceEpsilon],
    ) -> Result<(), String> {
        check_tree_settings(tree, self.tree_limits, self.tree_reference.as_ref())?;
        if self.tree_reference.is_none() {
            self.tree_reference = Some(tree.clone());
        }
        let accountant = tree
            .accountant(noise_multiplier)
            .map_err(|e| format!("invalid tree accounting: {e}"))?;
        let segments = &mut self.segments;
        let segment = tree.segment as usize;
        if segment + 1 < segments.len() || segment > segments.len() {
            return Err(format!(
                "its tree.segment {segment} is out of order: segments must be {} or {}",
                segments.len().saturating_sub(1),
                segments.len()
            ));
        }
        if segment == segments.len() {
            segments.push(0);
        }
        if tree.segment_round != segments[segment] + 1 {
            return Err(format!(
                "its tree.segment_round {} in tree segment {segment} does not follow {}",
                tree.segment_round, segments[segment]
            ));
        }
        segments[segment] += 1;
        let in_segments: u64 = segments.iter().sum();
        if in_segments != self.committed + 1 {
            return Err(format!(
                "its tree segments hold {in_segments} rounds where {} have been committed",
                self.committed + 1
            ));
        }
        let rho = tree_rho(&accountant, segments, tree.bit_noise_std);
        if !close(rho, tree.rho) {
            return Err(format!(
                "its ρ {} does not follow from the tree rounds before it ({rho})",
                tree.rho
            ));
        }
        let epsilon = epsilon_from_zcdp_gaussian(rho, self.delta).map_err(|e| e.to_string())?;
        let eps = vec![AudienceEpsilon {
            audience: Audience::ReleaseObservers.as_str().to_string(),
            epsilon,
            accountant: self.accountant.map(|_| Accountant::Rdp),
        }];
        if !same_epsilons(&eps, cumulative_epsilon) {
            return Err(format!(
                "its cumulative ε {cumulative_epsilon:?} does not follow from the tree rounds before it ({eps:?})"
            ));
        }
        self.within_budget(&eps)?;
        self.last_eps = eps;
        self.committed += 1;
        Ok(())
    }

    /// A committed round without a tree record: it settles the local charge or distributed
    /// release recorded for it (if any), is not a round of a dp-ftrl run, is in the run's mode
    /// (a distributed run's rounds carry their mechanism), its increments follow from its σ, q
    /// and mode (or mechanism), and its cumulative ε from the rounds before it — unchanged if
    /// it was charged or released before; the ε is within the budget.
    fn check_committed_round(&mut self, event: &LedgerEvent) -> Result<(), String> {
        let LedgerEvent::RoundCommitted {
            round,
            noise_multiplier,
            mode,
            rdp_increments,
            cumulative_epsilon,
            distributed,
            epsilon_assumption,
            ..
        } = event
        else {
            unreachable!("called on round_committed");
        };
        // A local round charged when its first update arrived spent its ε there; a
        // distributed round whose release was recorded spent its ε there.
        let after_release =
            self.settle_charge(*round)? || self.settle_release(*round, distributed.as_deref())?;
        if let Some(limits) = self.tree_limits {
            return Err(format!(
                "it carries no tree record, but run_created records a dp-ftrl run under {limits}"
            ));
        }
        let mode: PrivacyMode = mode.parse()?;
        if (self.distributed_run || mode == PrivacyMode::Distributed)
            && (mode != PrivacyMode::Distributed || distributed.is_none())
        {
            return Err(format!(
                "a round of a distributed run must be in mode distributed and carry its distributed record (mode {mode:?}, record {})",
                if distributed.is_some() {
                    "present"
                } else {
                    "absent"
                }
            ));
        }
        if let Some(d) = distributed.as_ref().filter(|_| !after_release) {
            self.capped.check(d, epsilon_assumption.as_deref())?;
        }
        let (derived, release) = match distributed {
            Some(d) if mode == PrivacyMode::Distributed => {
                (distributed_increments(d, self.grid()), None)
            }
            Some(_) => {
                return Err(format!("it carries a distributed record in mode {mode:?}"));
            }
            None => {
                let sampling_rate = rdp_increments
                    .first()
                    .map(|a| a.sampling_rate)
                    .unwrap_or(1.0);
                let release = RoundRelease {
                    mode,
                    noise_multiplier: *noise_multiplier,
                    sampling_rate,
                };
                release
                    .effective()
                    .map_err(|e| format!("invalid release: {e}"))?;
                (round_increments(&release, self.grid()), Some(release))
            }
        };
        if !same_increments(&derived, rdp_increments) {
            return Err("its RDP increments do not follow from its σ, q and mode".into());
        }
        let counts = !after_release && (distributed.is_none() || self.capped.counts_next());
        let pld_sigma = self.pld_sigma(release.as_ref());
        self.accumulate(&derived, counts, pld_sigma, cumulative_epsilon, "rounds")?;
        self.committed += 1;
        Ok(())
    }

    /// The local charge pending when round `round` commits: `true` if it is this round's (its
    /// ε was spent then); an error if another round's charge was left open.
    fn settle_charge(&mut self, round: u64) -> Result<bool, String> {
        match self.charged.take() {
            Some(r) if r == round => Ok(true),
            Some(r) => Err(format!(
                "round {r}'s charge was neither committed nor abandoned before round {round} committed"
            )),
            None => Ok(false),
        }
    }

    /// The distributed release pending when round `round` commits: `true` if it is this
    /// round's, with the same record (its ε was spent then); an error if another round's
    /// release was left open, or if a ledger that records releases commits a distributed round
    /// without one.
    fn settle_release(
        &mut self,
        round: u64,
        distributed: Option<&DistributedRound>,
    ) -> Result<bool, String> {
        match (self.released.take(), distributed) {
            (Some((r, record)), Some(d)) if r == round => {
                if *d != record {
                    return Err("its distributed record differs from its release's".into());
                }
                Ok(true)
            }
            (Some((r, _)), _) => Err(format!(
                "round {r}'s release was neither committed nor abandoned before round {round} committed"
            )),
            (None, Some(_)) if self.records_releases => {
                Err("a distributed round committed without a recorded release".into())
            }
            _ => Ok(false),
        }
    }

    /// A distributed round's release (`round_released`): the run is distributed, no other
    /// release is open, its record is consistent (and, under a participation cap, the run's
    /// mechanism and assumption), its increments follow from its mechanism and its cumulative
    /// ε from the releases before it; the ε is within the budget.
    fn check_release(&mut self, event: &LedgerEvent) -> Result<(), String> {
        let LedgerEvent::RoundReleased {
            round,
            contributors,
            rdp_increments,
            cumulative_epsilon,
            epsilon_assumption,
            distributed: d,
        } = event
        else {
            unreachable!("called on round_released");
        };
        if !self.distributed_run {
            return Err(
                "it records a released distributed sum, but run_created is not a distributed run"
                    .into(),
            );
        }
        if let Some((r, _)) = &self.released {
            return Err(format!(
                "round {r}'s release was neither committed nor abandoned before this one"
            ));
        }
        if *contributors != d.contributors {
            return Err(format!(
                "it names {contributors} contributors but its record {}",
                d.contributors
            ));
        }
        self.capped.check(d, Some(epsilon_assumption))?;
        let derived = distributed_increments(d, self.grid());
        if !same_increments(&derived, rdp_increments) {
            return Err("its RDP increments do not follow from its mechanism".into());
        }
        let counts = self.capped.counts_next();
        self.accumulate(&derived, counts, None, cumulative_epsilon, "releases")?;
        self.released = Some((*round, (**d).clone()));
        self.records_releases = true;
        Ok(())
    }

    /// A federated-evaluation release: the entry is what its σ gives at the run's δ (C and ε
    /// re-derived).
    fn check_evaluation(&self, event: &LedgerEvent) -> Result<(), String> {
        let LedgerEvent::EvaluationReleased {
            model_version,
            noise_multiplier,
            delta: evaluation_delta,
            ..
        } = event
        else {
            unreachable!("called on evaluation_released");
        };
        let again = evaluation_release_event(*model_version, *noise_multiplier, *evaluation_delta);
        if *evaluation_delta != self.delta || !same_evaluation(event, &again) {
            return Err(format!(
                "its evaluation release does not follow from σ = {noise_multiplier} at the run's δ = {} (expected {again:?})",
                self.delta
            ));
        }
        Ok(())
    }

    /// A local round's charge (`round_charged`): the run is a local per-round run, no other
    /// charge is open, its increments follow from its σ in local mode, and its cumulative ε
    /// from the rounds before it; the ε is within the budget.
    fn check_charge(&mut self, event: &LedgerEvent) -> Result<(), String> {
        let LedgerEvent::RoundCharged {
            round,
            noise_multiplier,
            mode,
            rdp_increments,
            cumulative_epsilon,
        } = event
        else {
            unreachable!("called on round_charged");
        };
        if self.distributed_run || self.tree_limits.is_some() || mode != "local" {
            return Err(format!(
                "a round_charged entry in mode {mode} of a run that is not a local per-round run"
            ));
        }
        if let Some(r) = self.charged {
            return Err(format!(
                "round {r}'s charge was neither committed nor abandoned before this one"
            ));
        }
        let release = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: *noise_multiplier,
            sampling_rate: 1.0,
        };
        release
            .effective()
            .map_err(|e| format!("invalid release: {e}"))?;
        let derived = round_increments(&release, self.grid());
        if !same_increments(&derived, rdp_increments) {
            return Err("its RDP increments do not follow from its σ and mode".into());
        }
        let pld_sigma = self.pld_sigma(Some(&release));
        self.accumulate(&derived, true, pld_sigma, cumulative_epsilon, "rounds")?;
        self.charged = Some(*round);
        Ok(())
    }

    /// An abandoned round closes its pending release or charge (their ε stays spent).
    fn abandon(&mut self, round: u64) {
        if self.released.as_ref().is_some_and(|(r, _)| *r == round) {
            self.released = None;
        }
        if self.charged == Some(round) {
            self.charged = None;
        }
        self.abandoned += 1;
    }

    /// `run_stopped`: its totals are the rounds committed and the last cumulative ε.
    fn check_stop(
        &self,
        rounds_committed: u64,
        cumulative_epsilon: &[AudienceEpsilon],
    ) -> Result<(), String> {
        // A run stopped before anything was spent states ε = 0 for its audiences.
        let nothing_spent =
            self.last_eps.is_empty() && cumulative_epsilon.iter().all(|e| e.epsilon == 0.0);
        if rounds_committed != self.committed
            || !(nothing_spent || same_epsilons(&self.last_eps, cumulative_epsilon))
        {
            return Err("its final totals do not match the rounds".into());
        }
        Ok(())
    }

    /// The effective σ a per-round release is composed at by PLD, when `run_created`
    /// records the PLD accountant (`None`: RDP composes it, as every distributed release).
    fn pld_sigma(&self, release: Option<&RoundRelease>) -> Option<f64> {
        let release = release.filter(|_| self.accountant == Some(Accountant::Pld))?;
        Some(
            release
                .mode
                .effective_noise_multiplier(release.noise_multiplier),
        )
    }

    /// Composes one spend's derived increments into the running totals (unless `counts` is
    /// false: a charged or released round's commit, or a distributed run past its cap) and
    /// verifies that the recorded cumulative ε is what the run's accountant gives — PLD's of
    /// the releases so far at each audience's sampling rate and effective σ `pld_sigma`, or
    /// RDP's of the increments — names that accountant, and is within the budget. `before`
    /// names what came before in the message (`rounds`, `releases`).
    fn accumulate(
        &mut self,
        derived: &[AudienceRdp],
        counts: bool,
        pld_sigma: Option<f64>,
        recorded: &[AudienceEpsilon],
        before: &str,
    ) -> Result<(), String> {
        let grid = self.grid().clone();
        if self.totals.is_empty() {
            self.totals = derived
                .iter()
                .map(|a| AudienceTotal {
                    audience: a.audience.clone(),
                    rdp: RdpAccountant::new(grid.clone()),
                    pld: vec![],
                })
                .collect();
        }
        let named = self.accountant.map(|_| match pld_sigma {
            Some(_) => Accountant::Pld,
            None => Accountant::Rdp,
        });
        let mut eps = vec![];
        for (total, inc) in self.totals.iter_mut().zip(derived) {
            if counts {
                total
                    .rdp
                    .compose_rdp(&inc.rdp, 1)
                    .map_err(|e| e.to_string())?;
                if let Some(sigma) = pld_sigma {
                    total.add_pld_release(inc.sampling_rate, sigma);
                }
            }
            let epsilon = match pld_sigma {
                Some(_) => schedule_epsilon(&mut self.pld, &total.pld, self.delta)
                    .map_err(|e| e.to_string())?,
                None => {
                    total
                        .rdp
                        .epsilon(self.delta)
                        .map_err(|e| e.to_string())?
                        .epsilon
                }
            };
            eps.push(AudienceEpsilon {
                audience: total.audience.clone(),
                epsilon,
                accountant: named,
            });
        }
        if !same_epsilons(&eps, recorded) {
            return Err(format!(
                "its cumulative ε {recorded:?} does not follow from the {before} before it ({eps:?})"
            ));
        }
        self.within_budget(&eps)?;
        self.last_eps = eps;
        Ok(())
    }

    /// Verifies that a cumulative ε is within the budget `run_created` records.
    fn within_budget(&self, eps: &[AudienceEpsilon]) -> Result<(), String> {
        within_budget(
            eps,
            self.budget.unwrap_or(f64::INFINITY),
            self.budget_audience.as_deref(),
        )
    }
}

/// Whether a cumulative ε is within the budget: the ε of the audience the budget binds
/// (`run_created`'s `budget_audience`, else the first listed) may not exceed the budget ε (up
/// to rounding in the last digits). A round that does not track the bound audience (a
/// distributed or tree round, tracked for release observers only) is checked on its first.
fn within_budget(
    eps: &[AudienceEpsilon],
    budget: f64,
    audience: Option<&str>,
) -> Result<(), String> {
    let bound = audience
        .and_then(|name| eps.iter().find(|a| a.audience == name))
        .or(eps.first());
    match bound {
        Some(a) if a.epsilon > budget && !close(a.epsilon, budget) => Err(format!(
            "its cumulative ε = {} ({}) exceeds the budget ε = {budget} that run_created records",
            a.epsilon, a.audience
        )),
        _ => Ok(()),
    }
}

/// Checks a run's verified chain against the manifest whose SHA-256 its `run_created` entry
/// records (`manifest_toml`: the stored manifest, `None` if the run's row is gone): the stored
/// manifest must hash to it, `run_created` must repeat its mode, budget, σ and C, and every
/// round must have been released with its σ, sampling rate q, mode and clip norm C (with
/// adaptive clipping: the first round at the manifest's C, each later one at the C the round
/// before it chose, within the manifest's bounds; in distributed mode, the manifest's
/// mechanism).
pub fn check_against_manifest(
    run_id: &str,
    entries: &[SealedEntry],
    manifest_toml: Option<&str>,
) -> Result<(), VerifyFailure> {
    let fail = |sequence: u64, problem: String| VerifyFailure { sequence, problem };
    let parse = |e: &SealedEntry| {
        serde_json::from_str::<LedgerEntry>(&e.body)
            .map_err(|err| fail(e.sequence, format!("its body is not a ledger entry: {err}")))
    };
    let Some(first) = entries.first() else {
        return Err(fail(1, format!("run {run_id} has no ledger entries")));
    };
    let LedgerEvent::RunCreated {
        manifest_sha256,
        privacy_mode,
        budget_epsilon,
        budget_delta,
        budget_audience,
        noise_multiplier,
        clip_norm,
        accountant,
        ..
    } = parse(first)?.event
    else {
        return Err(fail(1, "the first entry is not run_created".into()));
    };
    let Some(toml) = manifest_toml else {
        return Err(fail(
            1,
            format!(
                "run {run_id}'s manifest (SHA-256 {manifest_sha256}) is missing from the runs table, so its rounds cannot be checked against it"
            ),
        ));
    };
    let manifest = crate::manifest::RunManifest::from_toml(toml, "the stored manifest")
        .map_err(|e| fail(1, e.to_string()))?;
    if manifest.sha256() != manifest_sha256 {
        return Err(fail(
            1,
            format!(
                "the stored manifest hashes to {}, not the {manifest_sha256} run_created records: it was replaced",
                manifest.sha256()
            ),
        ));
    }
    let mode = manifest.privacy_mode.as_str();
    let differs = |what: &str, recorded: String, expected: String| {
        fail(
            1,
            format!("run_created records {what} {recorded}, but the manifest says {expected}"),
        )
    };
    if privacy_mode != mode {
        return Err(differs("privacy mode", privacy_mode, mode.into()));
    }
    if budget_epsilon != manifest.budget.epsilon || budget_delta != manifest.budget.delta {
        return Err(differs(
            "budget",
            format!("(ε = {budget_epsilon}, δ = {budget_delta})"),
            format!(
                "(ε = {}, δ = {})",
                manifest.budget.epsilon, manifest.budget.delta
            ),
        ));
    }
    if let Some(a) = budget_audience
        && a != manifest.budget_audience().as_str()
    {
        return Err(differs(
            "the budget binding audience",
            a,
            manifest.budget_audience().as_str().into(),
        ));
    }
    if noise_multiplier != manifest.noise_multiplier {
        return Err(differs(
            "σ",
            format!("{noise_multiplier:?}"),
            format!("{:?}", manifest.noise_multiplier),
        ));
    }
    if clip_norm != manifest.clip_norm {
        return Err(differs(
            "C",
            clip_norm.to_string(),
            manifest.clip_norm.to_string(),
        ));
    }
    // A ledger written before runs named their accountant is RDP's: its manifest names none,
    // or names RDP.
    let recorded = accountant.unwrap_or(Accountant::Rdp);
    let expected = match (accountant, manifest.accountant) {
        (None, None) => Accountant::Rdp,
        _ => manifest.accountant(),
    };
    if recorded != expected {
        return Err(differs(
            "the accountant",
            recorded.to_string(),
            expected.to_string(),
        ));
    }
    let sigma = manifest.noise_multiplier.unwrap_or(0.0);
    let rates: Option<Vec<(String, f64)>> = manifest.round_release().map(|r| {
        tracked_audiences(&r)
            .into_iter()
            .map(|(a, q)| (a.as_str().to_string(), q))
            .collect()
    });
    let mechanism = manifest.distributed_plan().map(|p| p.mechanism);
    let mut next_c = manifest.clip_norm;
    let check_mechanism = |sequence: u64, d: &DistributedRound| match mechanism {
        Some(m) if m != d.mechanism => Err(fail(
            sequence,
            "its distributed mechanism is not the one the manifest configures".into(),
        )),
        _ => Ok(()),
    };
    for stored in &entries[1..] {
        let seq = stored.sequence;
        match parse(stored)?.event {
            LedgerEvent::RoundCommitted {
                noise_multiplier: round_sigma,
                clip_norm: round_c,
                mode: round_mode,
                rdp_increments,
                tree,
                next_clip_norm,
                distributed,
                ..
            } => {
                if round_mode != mode {
                    return Err(fail(
                        seq,
                        format!("its mode {round_mode} departs from the manifest's {mode}"),
                    ));
                }
                if round_sigma != sigma {
                    return Err(fail(
                        seq,
                        format!("its σ = {round_sigma} departs from the manifest's σ = {sigma}"),
                    ));
                }
                if let (Some(rates), None, None) = (&rates, &tree, &distributed) {
                    let recorded: Vec<(String, f64)> = rdp_increments
                        .iter()
                        .map(|a| (a.audience.clone(), a.sampling_rate))
                        .collect();
                    if &recorded != rates {
                        return Err(fail(
                            seq,
                            format!(
                                "its audiences and sampling rates {recorded:?} depart from the manifest's {rates:?}"
                            ),
                        ));
                    }
                }
                if let Some(d) = &distributed {
                    check_mechanism(seq, d)?;
                }
                let expected_c = match manifest.adaptive_clipping {
                    None => manifest.clip_norm,
                    Some(_) => next_c,
                };
                if round_c != expected_c {
                    return Err(fail(
                        seq,
                        format!(
                            "its clip norm C = {round_c} departs from the C = {expected_c} the manifest and the rounds before it set"
                        ),
                    ));
                }
                if let Some(c) = next_clip_norm {
                    let (lo, hi) = manifest
                        .clip_norm_bounds()
                        .unwrap_or((f64::MIN_POSITIVE, f64::MAX));
                    if !(c.is_finite() && lo <= c && c <= hi) {
                        return Err(fail(
                            seq,
                            format!(
                                "its next clip norm {c} is outside the manifest's bounds [{lo}, {hi}]"
                            ),
                        ));
                    }
                    next_c = c;
                }
            }
            LedgerEvent::RoundReleased { distributed, .. } => check_mechanism(seq, &distributed)?,
            LedgerEvent::RoundCharged {
                noise_multiplier: round_sigma,
                mode: round_mode,
                ..
            } if round_mode != mode || round_sigma != sigma => {
                return Err(fail(
                    seq,
                    format!(
                        "its mode {round_mode} and σ = {round_sigma} depart from the manifest's {mode} and σ = {sigma}"
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What one audience has spent, as [`verify`] re-derives it: the RDP composition of its
/// increments, and the runs of identical releases PLD composes.
struct AudienceTotal {
    audience: String,
    rdp: RdpAccountant,
    /// (sampling rate q, effective σ, count), consecutive identical releases merged.
    pld: Vec<(f64, f64, u64)>,
}

impl AudienceTotal {
    fn add_pld_release(&mut self, sampling_rate: f64, sigma: f64) {
        match self.pld.last_mut() {
            Some((q, s, count)) if *q == sampling_rate && *s == sigma => *count += 1,
            _ => self.pld.push((sampling_rate, sigma, 1)),
        }
    }
}

/// PLD's ε at δ of runs of identical Poisson-subsampled Gaussian releases (q, effective σ,
/// count): for one run exactly what the engine states ([`RepeatedReleases`]); unsampled runs
/// compose exactly to one Gaussian; any other mix is composed by the PLD accountant.
fn schedule_epsilon(
    memo: &mut RepeatedReleases,
    runs: &[(f64, f64, u64)],
    delta: f64,
) -> Result<f64, fedpref_privacy::PrivacyError> {
    match runs {
        [] => Ok(0.0),
        [(q, sigma, count)] => memo.epsilon(*q, *sigma, *count, delta),
        _ if runs.iter().all(|(q, _, _)| *q == 1.0) => {
            let sigma = fedpref_privacy::pld::composed_gaussian_noise_multiplier(
                runs.iter().map(|(_, s, c)| (*s, *c)),
            );
            Ok(fedpref_privacy::pld::gaussian_epsilon(sigma, delta))
        }
        _ => {
            let mut accountant = PldAccountant::default();
            for (q, sigma, count) in runs {
                accountant.compose_subsampled_gaussian(*q, *sigma, *count)?;
            }
            Ok(accountant.epsilon(delta)?.epsilon)
        }
    }
}

/// What `verify` keeps about a distributed run's participation cap.
#[derive(Default)]
struct DistributedCap {
    /// `max_participations`, when `run_created` records limits and names them in its
    /// assumption (a run created before distributed mode accounted limits composes every
    /// round).
    cap: Option<u64>,
    /// `run_created`'s assumption, which every capped round must repeat.
    assumption: Option<String>,
    /// Released rounds composed so far.
    composed: u64,
    /// The first released round's mechanism: the cap assumes every round runs the same one.
    mechanism: Option<fedpref_privacy::distributed::DistributedDiscreteGaussian>,
}

/// Whether a distributed run's ε assumption names its participation limits, as the
/// manifest writes it once the limits bound the ε ("participation limits (…); …"). A run
/// created before they did names only the mechanism.
pub fn assumption_names_limits(limits: ParticipationLimits, assumption: &str) -> bool {
    assumption.starts_with(&format!("{}; ", limits.assumption()))
}

impl DistributedCap {
    fn from_run_created(
        distributed_run: bool,
        limits: Option<ParticipationLimits>,
        assumption: Option<&str>,
    ) -> Self {
        let cap = limits
            .filter(|_| distributed_run)
            .filter(|&l| assumption.is_some_and(|a| assumption_names_limits(l, a)))
            .map(|l| l.max_participations());
        DistributedCap {
            cap,
            assumption: cap.and(assumption.map(str::to_string)),
            ..Self::default()
        }
    }

    /// Checks one released round's record: its own consistency and, in a capped run, the
    /// same mechanism as the first round and (for committed rounds) the run's assumption.
    fn check(
        &mut self,
        d: &DistributedRound,
        round_assumption: Option<&str>,
    ) -> Result<(), String> {
        let m = u64::from(d.min_contributors);
        if d.contributors < m
            || d.min_contributors < d.threshold
            || d.mechanism.honest_devices() >= m
        {
            return Err(format!(
                "its distributed record is inconsistent: {} contributors, m = {}, t = {}, {} assumed honest devices (needs contributors ≥ m ≥ t and honest devices < m)",
                d.contributors,
                d.min_contributors,
                d.threshold,
                d.mechanism.honest_devices()
            ));
        }
        if self.cap.is_some() {
            match self.mechanism {
                None => self.mechanism = Some(d.mechanism),
                Some(first) if first != d.mechanism => {
                    return Err(
                        "its mechanism differs from the run's first round's, which a participation cap on ε assumes never happens".into(),
                    );
                }
                Some(_) => {}
            }
            if let Some(a) = round_assumption
                && Some(a) != self.assumption.as_deref()
            {
                return Err(format!(
                    "its ε assumption {a:?} is not run_created's {:?}",
                    self.assumption.as_deref().unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    /// Whether the next released round adds to the worst-case device's RDP (and counts it).
    fn counts_next(&mut self) -> bool {
        let counts = self.cap.is_none_or(|k| self.composed < k);
        if counts {
            self.composed += 1;
        }
        counts
    }
}

/// Checks a round's tree settings against the run: the participation limits `run_created`
/// records (`None`: not a dp-ftrl run, so no tree record belongs here), and the schedule and
/// σ_b of the run's first tree record (`None`: this is the first).
fn check_tree_settings(
    tree: &TreeRound,
    limits: Option<ParticipationLimits>,
    reference: Option<&TreeRound>,
) -> Result<(), String> {
    let Some(limits) = limits else {
        return Err(
            "it carries a tree record, but run_created records no dp-ftrl run (participation limits with their assumption)"
                .into(),
        );
    };
    if tree.min_separation != limits.min_separation() {
        return Err(format!(
            "its tree.min_separation {} differs from run_created's participation_limits.min_separation {}",
            tree.min_separation,
            limits.min_separation()
        ));
    }
    if tree.max_participations != limits.max_participations() {
        return Err(format!(
            "its tree.max_participations {} differs from run_created's participation_limits.max_participations {}",
            tree.max_participations,
            limits.max_participations()
        ));
    }
    let Some(first) = reference else {
        return Ok(());
    };
    if tree.restart_every != first.restart_every {
        return Err(format!(
            "its tree.restart_every {:?} differs from the run's first tree record ({:?})",
            tree.restart_every, first.restart_every
        ));
    }
    if tree.completion != first.completion {
        return Err(format!(
            "its tree.completion {} differs from the run's first tree record ({})",
            tree.completion, first.completion
        ));
    }
    // σ_b is copied from the manifest into every entry, so equal means bit-for-bit equal.
    if tree.bit_noise_std.map(f64::to_bits) != first.bit_noise_std.map(f64::to_bits) {
        return Err(format!(
            "its tree.bit_noise_std {:?} differs from the run's first tree record ({:?})",
            tree.bit_noise_std, first.bit_noise_std
        ));
    }
    Ok(())
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn same_increments(a: &[AudienceRdp], b: &[AudienceRdp]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.audience == y.audience
                && x.sampling_rate == y.sampling_rate
                && x.rdp.len() == y.rdp.len()
                && x.rdp.iter().zip(&y.rdp).all(|(p, q)| close(*p, *q))
        })
}

fn same_epsilons(a: &[AudienceEpsilon], b: &[AudienceEpsilon]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.audience == y.audience && x.accountant == y.accountant && close(x.epsilon, y.epsilon)
        })
}
