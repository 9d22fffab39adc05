//! The impact report: one page per training run for the people who answer for it.
//!
//! [`ImpactReport::build`] reads a run from the [`Store`] — its manifest, its ledger (verified
//! with [`crate::ledger::verify`]), its participations and its summed federated-evaluation
//! counts — and gathers what was promised, what was spent, by whom and for whom. It renders as
//! JSON ([`ImpactReport::to_json`]), Markdown ([`ImpactReport::to_markdown`]) or one
//! self-contained, printable HTML page ([`ImpactReport::to_html`]: inline CSS and SVG, no
//! script, font or image from anywhere else).
//!
//! Every number comes from the ledger and the store and can be re-derived with
//! `fedpref-coordinator ledger verify` and `ledger export --format json`:
//!
//! - **Cumulative ε per round and audience** is the `cumulative_epsilon` of each
//!   `round_committed` entry, which `verify` re-derives from the recorded σ, q and mode.
//! - **Per-device ε** composes, for each device, the rounds it took part in (the
//!   `participations` table) *without* amplification by sampling — q = 1 at each round's σ,
//!   with the privacy crate's [`RdpAccountant`] over the run's order grid — converted at the
//!   run's δ. It holds against an observer of the released models who knows which rounds the
//!   device took part in (in local mode: against anyone who sees its uploads). Device ids never
//!   appear in the report, only the distribution.
//! - **Guardrail metrics** are ratios of counts summed over all reporting devices of a model
//!   version ([`crate::guardrail`]); alerts are the ledger's `guardrail_alert` entries.
//!
//! The report carries the time it was rendered (`generated_at_ms`), which the caller passes in;
//! nothing else in it depends on the clock of the machine rendering it.

use std::collections::BTreeMap;
use std::fmt::Write;

use fedpref_privacy::{Accountant, Audience, OrderGrid, PrivacyMode, RdpAccountant};
use serde::Serialize;

use crate::guardrail::{VersionMetrics, all_versions};
use crate::ledger::{AudienceEpsilon, LedgerEntry, LedgerEvent};
use crate::manifest::{
    AlertAction, GuardrailMetric, GuardrailMetricKind, HarmScenario, Kpi, OptOutPolicy,
    SamplingSpec, ThresholdDirection,
};
use crate::store::{RunStatus, Store, StoreError};

/// The version of the report's JSON layout.
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// A report failure.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The store failed or the run does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The accountant refused the recorded parameters.
    #[error("re-deriving per-device ε: {0}")]
    Privacy(#[from] fedpref_privacy::PrivacyError),
}

/// A run's impact report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImpactReport {
    /// [`REPORT_FORMAT_VERSION`].
    pub format_version: u32,
    /// The run.
    pub run_id: String,
    /// The manifest's title.
    pub title: String,
    /// `active`, `paused` or `stopped`.
    pub status: String,
    /// When the report was rendered (ms since the Unix epoch).
    pub generated_at_ms: i64,
    /// The ledger's verification.
    pub ledger: LedgerStatus,
    /// The manifest as an impact assessment.
    pub assessment: Assessment,
    /// What was spent.
    pub spend: Spend,
    /// Guardrail metrics, thresholds and alerts.
    pub guardrails: Guardrails,
    /// Operator and guardrail actions on the run (pauses, resumptions, rollbacks, the stop).
    pub operations: Vec<Operation>,
}

/// Whom "one user" is: without enrolment grants from the app's backend (not built), each
/// enrolment is its own user.
pub const UNIT_OF_PRIVACY: &str = "one enrolment (one installation of the app on one device). The coordinator accepted no enrolment grants naming a person when this run was created, so participation limits, every ε and the budget hold per enrolment, not per person: a person with two devices, or one who deletes everything and enrols again, counts as two. Sybil enrolment is limited only by the app key shipped in the app, per-address and per-device request limits, and the coordinator's cap on enrolments per window (limits.max_enrolments_per_window); distributed mode's ε assumes its honest devices are real, distinct users.";
/// The report's unit of privacy for a run whose `run_created` records `"privacy_unit": "person"`.
pub const UNIT_OF_PRIVACY_PERSON: &str = "one person, as the app's backend knows them. Every device enrolled with a grant the backend signed naming the person by a pseudonym (the coordinator keeps only its hash), and acts as that person: one update per round, and participation limits, every ε and the budget count per person across all their devices and re-enrolments. Enrolments per person are capped (limits.max_enrolments_per_person). Sybil enrolment is limited by the backend's accounts: whoever holds many accounts can still enrol many persons, and distributed mode's ε assumes its honest devices are real, distinct people.";

/// The ledger's verification when the report was rendered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LedgerStatus {
    /// Whether the chain is intact and every cumulative ε follows from the rounds.
    pub intact: bool,
    /// Entries stored.
    pub entries: u64,
    /// The sequence number of the last stored entry.
    pub head_sequence: u64,
    /// The stored hash of the last entry (hex), to match a printed report to the database.
    pub head_sha256: String,
    /// The first entry found wrong, if any.
    pub failed_sequence: Option<u64>,
    /// What is wrong with it.
    pub problem: Option<String>,
    /// Cumulative ε per audience as `verify` re-derived it (empty when the chain is broken).
    pub rederived_epsilon: Vec<AudienceEpsilon>,
    /// The ledger signing key that signed the head (hex), `None` if the head is unsigned;
    /// with the head hash, what a checkpoint kept elsewhere is compared with.
    pub public_key: Option<String>,
}

/// The manifest, as an impact assessment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assessment {
    /// What the model is for.
    pub purpose: String,
    /// Who answers for the run.
    pub owner: String,
    /// Data elements the training uses.
    pub data_elements_used: Vec<String>,
    /// Data elements deliberately not used.
    pub data_elements_not_used: Vec<String>,
    /// `local` or `central`.
    pub privacy_mode: String,
    /// Who adds the noise and what a neighbouring dataset is, in words.
    pub mode_explained: String,
    /// Whom "one user" is in every ε and limit of the run, and how Sybil enrolment is limited,
    /// in words.
    pub unit_of_privacy: String,
    /// The audience whose ε the budget binds (`fedpref_privacy::Audience::as_str`).
    pub budget_audience: String,
    /// The audiences the run's ε is reported for, widest first, each with what it holds
    /// against.
    pub audiences: Vec<AudienceNote>,
    /// Budget ε.
    pub budget_epsilon: f64,
    /// Budget δ; every ε in the report is at this δ.
    pub budget_delta: f64,
    /// The clip norm C.
    pub clip_norm: f64,
    /// σ.
    pub noise_multiplier: Option<f64>,
    /// Device selection, in words.
    pub sampling: String,
    /// The sampling rate the accountant uses (1 for a fixed cohort).
    pub sampling_rate: f64,
    /// The assumption the run's headline ε rests on, in words: "Poisson sampling from a
    /// population of N", "participation limits (separation s, at most k)" or "none (worst
    /// case per device)".
    pub epsilon_assumption: String,
    /// The accountant that computed the run's ε (`pld` or `rdp`), as `run_created` records it
    /// (DP-FTRL and distributed runs fall back to `rdp`).
    pub accountant: String,
    /// The same, in words.
    pub accountant_explained: String,
    /// Rounds planned.
    pub rounds_planned: u64,
    /// Consent and withdrawal.
    pub opt_out_policy: OptOutPolicy,
    /// Foreseeable harms and their mitigations.
    pub harm_scenarios: Vec<HarmScenario>,
    /// What success means.
    pub kpis: Vec<Kpi>,
    /// SHA-256 of the canonical manifest (as in the ledger's first entry).
    pub manifest_sha256: String,
}

/// One audience and what its ε holds against.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AudienceNote {
    /// The audience's identifier (as in the ledger).
    pub audience: String,
    /// What it holds against.
    pub description: String,
}

/// One point of a cumulative-ε series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RoundEpsilon {
    /// The round (0: before the first).
    pub round: u64,
    /// Cumulative ε after it.
    pub epsilon: f64,
}

/// The cumulative ε of one audience, round by round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    /// The audience.
    pub audience: String,
    /// Points, starting at round 0 with ε = 0.
    pub points: Vec<RoundEpsilon>,
}

/// What was spent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spend {
    /// Rounds committed (privacy spent).
    pub rounds_committed: u64,
    /// Rounds abandoned (nothing released, nothing spent).
    pub rounds_abandoned: u64,
    /// Distinct devices whose updates entered at least one aggregate.
    pub devices_participated: u64,
    /// Budget ε.
    pub budget_epsilon: f64,
    /// δ of every ε.
    pub delta: f64,
    /// Cumulative ε per audience after the last committed round.
    pub final_epsilon: Vec<AudienceEpsilon>,
    /// Cumulative ε per round, per audience.
    pub series: Vec<Series>,
    /// Each device's own spend.
    pub per_device: PerDevice,
    /// Adaptive clipping: the clip norm of each committed round and the one it chose for the
    /// next (empty without adaptive clipping).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clip_trajectory: Vec<ClipPoint>,
}

/// Where adaptive clipping's bits came from and what protects them, by privacy mode.
fn clip_bits_sentence(privacy_mode: &str) -> &'static str {
    if privacy_mode == "local" {
        "Local mode: each device computed its bit (norm before clipping at most C) and added Gaussian noise to it itself; the coordinator summed the noised bits without adding noise. Each upload's (update, bit) pair is accounted in the ε above as one local release at the combined noise multiplier (replace-one neighbours; no sampling assumption)."
    } else {
        "Central mode: the coordinator computed each update's bit, summed the bits and added Gaussian noise to the sum; the bits' cost is in the ε above."
    }
}

/// One committed round's clip norms under adaptive clipping.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ClipPoint {
    /// The round.
    pub round: u64,
    /// The clip norm C its updates were clipped to.
    pub clip_norm: f64,
    /// The clip norm chosen for the next round (for dp-ftrl, applied from the next tree).
    pub next_clip_norm: f64,
}

/// Devices that took part in the same number of rounds, and their ε.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParticipationGroup {
    /// Rounds each of these devices took part in.
    pub participations: u64,
    /// How many devices.
    pub devices: u64,
    /// Their ε (the largest in the group if σ differed between rounds).
    pub epsilon: f64,
}

/// One histogram bin: devices with `from ≤ ε < to` (the last bin includes `to`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bin {
    /// Lower edge.
    pub from: f64,
    /// Upper edge.
    pub to: f64,
    /// Devices in the bin.
    pub devices: u64,
}

/// The distribution of per-device ε (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerDevice {
    /// Against whom it holds.
    pub holds_against: String,
    /// Devices by number of rounds taken part in.
    pub by_participations: Vec<ParticipationGroup>,
    /// Ten equal-width bins over [0, max ε].
    pub histogram: Vec<Bin>,
    /// The largest per-device ε, if any device took part.
    pub max_epsilon: Option<f64>,
    /// The most rounds one device took part in.
    pub max_participations: u64,
    /// Devices whose ε is the maximum.
    pub devices_at_max: u64,
}

/// Guardrails: thresholds, measured values and alerts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Guardrails {
    /// The manifest's guardrails.
    pub thresholds: Vec<GuardrailMetric>,
    /// Metrics per model version that has reports.
    pub versions: Vec<VersionMetrics>,
    /// Every alert that fired (the ledger's `guardrail_alert` entries).
    pub alerts: Vec<Alert>,
    /// What federated evaluation cost each reporting device, per model version (the
    /// ledger's `evaluation_released` entries).
    pub evaluation: Vec<EvaluationSpend>,
}

/// One model version's evaluation release, as the ledger records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvaluationSpend {
    /// The ledger entry.
    pub sequence: u64,
    /// The model version evaluated.
    pub model_version: u64,
    /// σ of each device's release.
    pub noise_multiplier: f64,
    /// ε of one device's release, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

impl EvaluationSpend {
    fn sentence(&self) -> String {
        format!(
            "Model version {}: each reporting device released its evaluation once, a local Gaussian release with σ = {}, ε = {:.4} at δ = {:e} on that device's own accountant (ledger entry {}).",
            self.model_version, self.noise_multiplier, self.epsilon, self.delta, self.sequence
        )
    }
}

/// A guardrail alert as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    /// The ledger entry.
    pub sequence: u64,
    /// When it was recorded.
    pub at_ms: i64,
    /// The metric.
    pub metric: GuardrailMetricKind,
    /// Its value.
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// Which side alerts.
    pub direction: ThresholdDirection,
    /// What the coordinator did.
    pub action_taken: AlertAction,
    /// The model version evaluated.
    pub model_version: u64,
    /// Distinct devices whose reports were summed.
    pub reporting_devices: u64,
}

/// An action on the run, from the ledger.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Operation {
    /// The ledger entry.
    pub sequence: u64,
    /// When it was recorded.
    pub at_ms: i64,
    /// `paused`, `resumed`, `rolled_back` or `run_stopped`.
    pub kind: String,
    /// What happened, in words.
    pub detail: String,
}

impl ImpactReport {
    /// Gathers a run's report from the store. A broken ledger does not stop the report: it is
    /// rendered with the chain marked broken and the figures read from the entries as stored.
    pub fn build(store: &Store, run_id: &str, generated_at_ms: i64) -> Result<Self, ReportError> {
        let record = store.run(run_id)?;
        let m = &record.manifest;
        let sealed = store.ledger(run_id)?;
        let stored = crate::audit::verify_stored_run(store, run_id, &[])?;
        let public_key = stored
            .as_ref()
            .ok()
            .and_then(|v| v.signed.public_key.clone());
        let verification = stored.map(|v| v.totals);
        let ledger = LedgerStatus {
            public_key,
            intact: verification.is_ok(),
            entries: sealed.len() as u64,
            head_sequence: sealed.last().map(|e| e.sequence).unwrap_or(0),
            head_sha256: sealed.last().map(|e| e.hash.clone()).unwrap_or_default(),
            failed_sequence: verification.as_ref().err().map(|f| f.sequence),
            problem: verification.as_ref().err().map(|f| f.problem.clone()),
            rederived_epsilon: verification
                .as_ref()
                .map(|t| t.cumulative_epsilon.clone())
                .unwrap_or_default(),
        };
        // Entries as stored; an unreadable one is left out (the ledger status says why).
        let entries: Vec<LedgerEntry> = sealed
            .iter()
            .filter_map(|e| serde_json::from_str(&e.body).ok())
            .collect();
        let mut grid = OrderGrid::default();
        let mut delta = m.budget.delta;
        let mut series: BTreeMap<String, Vec<RoundEpsilon>> = BTreeMap::new();
        let mut audience_order: Vec<String> = vec![];
        let mut round_sigma: BTreeMap<u64, (PrivacyMode, f64)> = BTreeMap::new();
        let (mut committed, mut abandoned) = (0u64, 0u64);
        let mut final_epsilon = vec![];
        let mut alerts = vec![];
        let mut recorded_accountant = m.accountant();
        let mut per_person = false;
        let mut evaluation = vec![];
        let mut operations = vec![];
        let mut clip_trajectory = vec![];
        for e in &entries {
            match &e.event {
                LedgerEvent::RunCreated {
                    orders,
                    budget_delta,
                    accountant,
                    privacy_unit,
                    ..
                } => {
                    per_person = privacy_unit.as_deref()
                        == Some(crate::coordinator::PRIVACY_UNIT_PERSON);
                    if let Ok(g) = OrderGrid::new(orders.clone()) {
                        grid = g;
                    }
                    delta = *budget_delta;
                    // A run created before runs named their accountant is RDP's.
                    recorded_accountant = accountant.unwrap_or(Accountant::Rdp);
                }
                LedgerEvent::RoundCommitted {
                    round,
                    noise_multiplier,
                    mode,
                    cumulative_epsilon,
                    clip_norm,
                    next_clip_norm,
                    ..
                } => {
                    committed += 1;
                    if let Some(next) = next_clip_norm {
                        clip_trajectory.push(ClipPoint {
                            round: *round,
                            clip_norm: *clip_norm,
                            next_clip_norm: *next,
                        });
                    }
                    if let Ok(mode) = mode.parse::<PrivacyMode>() {
                        round_sigma.insert(*round, (mode, *noise_multiplier));
                    }
                    add_point(&mut series, &mut audience_order, *round, cumulative_epsilon);
                    final_epsilon = cumulative_epsilon.clone();
                }
                LedgerEvent::RoundReleased {
                    round,
                    cumulative_epsilon,
                    ..
                } => {
                    // A distributed release is spent when recorded, before it commits (or
                    // not): its contributors count it, and so does the run's final ε.
                    round_sigma.insert(*round, (PrivacyMode::Distributed, 0.0));
                    add_point(&mut series, &mut audience_order, *round, cumulative_epsilon);
                    final_epsilon = cumulative_epsilon.clone();
                }
                LedgerEvent::RoundCharged {
                    round,
                    cumulative_epsilon,
                    noise_multiplier,
                    ..
                } => {
                    // A local round is spent when its first update arrives, whether it then
                    // commits or not.
                    round_sigma.insert(*round, (PrivacyMode::Local, *noise_multiplier));
                    add_point(&mut series, &mut audience_order, *round, cumulative_epsilon);
                    final_epsilon = cumulative_epsilon.clone();
                }
                LedgerEvent::RoundAbandoned { .. } => abandoned += 1,
                LedgerEvent::GuardrailAlert {
                    metric,
                    value,
                    threshold,
                    direction,
                    action_taken,
                    model_version,
                    reporting_devices,
                    ..
                } => alerts.push(Alert {
                    sequence: e.sequence,
                    at_ms: e.at_ms,
                    metric: *metric,
                    value: *value,
                    threshold: *threshold,
                    direction: *direction,
                    action_taken: *action_taken,
                    model_version: *model_version,
                    reporting_devices: *reporting_devices,
                }),
                LedgerEvent::Paused { reason } => operations.push(Operation {
                    sequence: e.sequence,
                    at_ms: e.at_ms,
                    kind: "paused".into(),
                    detail: format!("paused: {reason}"),
                }),
                LedgerEvent::Resumed { reason } => operations.push(Operation {
                    sequence: e.sequence,
                    at_ms: e.at_ms,
                    kind: "resumed".into(),
                    detail: if reason.is_empty() {
                        "resumed".into()
                    } else {
                        format!("resumed: {reason}")
                    },
                }),
                LedgerEvent::RolledBack {
                    to_version,
                    new_version,
                    reason,
                    ..
                } => operations.push(Operation {
                    sequence: e.sequence,
                    at_ms: e.at_ms,
                    kind: "rolled_back".into(),
                    detail: format!(
                        "rolled back to the parameters of version {to_version}, published as version {new_version}{}; the privacy already spent stays spent",
                        if reason.is_empty() { String::new() } else { format!(" ({reason})") }
                    ),
                }),
                LedgerEvent::RunStopped {
                    reason,
                    rounds_committed,
                    ..
                } => operations.push(Operation {
                    sequence: e.sequence,
                    at_ms: e.at_ms,
                    kind: "run_stopped".into(),
                    detail: format!("stopped after {rounds_committed} rounds: {reason}"),
                }),
                LedgerEvent::EvaluationReleased {
                    model_version,
                    noise_multiplier,
                    epsilon,
                    delta,
                    ..
                } => evaluation.push(EvaluationSpend {
                    sequence: e.sequence,
                    model_version: *model_version,
                    noise_multiplier: *noise_multiplier,
                    epsilon: *epsilon,
                    delta: *delta,
                }),
                LedgerEvent::ModelPublished { .. } => {}
            }
        }
        let series = audience_order
            .iter()
            .map(|a| Series {
                audience: a.clone(),
                points: series.remove(a).unwrap_or_default(),
            })
            .collect();
        let participations = store.participations_by_device(run_id)?;
        // The accountant of the run's per-round releases; DP-FTRL and distributed mode are RDP's.
        let used_accountant = match m.epsilon_accountant() {
            Some(Accountant::Pld) => recorded_accountant,
            _ => Accountant::Rdp,
        };
        // dp-ftrl: a device's share of the tree's ε is bounded by the run's (the worst
        // allowed pattern), which is what is shown for every device that took part.
        let tree_epsilon = m
            .server_optimizer
            .is_tree()
            .then(|| final_epsilon.first().map_or(0.0, |a| a.epsilon));
        let per_device = per_device_spend(
            &participations,
            &round_sigma,
            &grid,
            delta,
            m,
            tree_epsilon,
            used_accountant,
        )?;
        let versions = all_versions(&store.evaluation_sums(run_id)?);
        let mode = m.privacy_mode.privacy_mode();
        let audiences: Vec<AudienceNote> = match m.round_release() {
            Some(release) => crate::ledger::tracked_audiences(&release)
                .into_iter()
                .map(|(a, _)| AudienceNote {
                    audience: a.as_str().into(),
                    description: a.describe().into(),
                })
                .collect(),
            None if m.server_optimizer.is_tree() => vec![AudienceNote {
                audience: Audience::ReleaseObservers.as_str().into(),
                description: format!(
                    "{}, provided every device kept to the {} the round engine enforces (DP-FTRL tree aggregation: no sampling assumed)",
                    Audience::ReleaseObservers.describe(),
                    m.epsilon_assumption()
                ),
            }],
            None if m.distributed_plan().is_some() => vec![AudienceNote {
                audience: Audience::ReleaseObservers.as_str().into(),
                description: format!(
                    "{}, under {}",
                    Audience::ReleaseObservers.describe(),
                    m.epsilon_assumption()
                ),
            }],
            None => vec![],
        };
        let sampling = match &m.sampling {
            SamplingSpec::Poisson {
                rate,
                population,
                round_seconds,
                minimum_size,
            } => format!(
                "Poisson sampling: each eligible device that checks in during a round's {round_seconds}-second window is selected with probability {rate} (about {population} eligible devices per window); a round with fewer than {minimum_size} updates is abandoned"
            ),
            SamplingSpec::Cohort {
                target_size,
                minimum_size,
                round_seconds,
            } => format!(
                "A fixed cohort: the first {target_size} eligible devices to check in, {round_seconds}-second rounds, abandoned below {minimum_size} updates; selection is not random, so no amplification by sampling is claimed"
            ),
        };
        let mode_explained = match mode {
            Some(PrivacyMode::Local) => "Local DP: each device clips its update to C and adds Gaussian noise before it leaves the device, so the coordinator never sees an un-noised update. Neighbouring datasets replace one user's data (sensitivity 2C).",
            Some(PrivacyMode::Central) => "Central DP: the coordinator clips each update to C, sums, and adds Gaussian noise once before any model is released; the coordinator itself is trusted with individual updates. Neighbouring datasets add or remove one user (sensitivity C).",
            Some(PrivacyMode::Distributed) => "Distributed DP: each device adds a share of the noise under secure aggregation. Neighbouring datasets zero out one user's contribution while the device still takes part; the L2 sensitivity of the sum is C in model units, at most C/γ + √d in lattice units after scaling and randomised rounding (γ the granularity, d the model's dimension).",
            None => "No differential privacy.",
        }
        .to_string();
        Ok(Self {
            format_version: REPORT_FORMAT_VERSION,
            run_id: run_id.to_string(),
            title: m.title.clone(),
            status: match record.status {
                RunStatus::Active => "active",
                RunStatus::Paused => "paused",
                RunStatus::Stopped => "stopped",
            }
            .into(),
            generated_at_ms,
            ledger,
            assessment: Assessment {
                purpose: m.purpose.clone(),
                owner: m.owner.clone(),
                data_elements_used: m.data_elements_used.clone(),
                data_elements_not_used: m.data_elements_not_used.clone(),
                privacy_mode: m.privacy_mode.as_str().into(),
                mode_explained,
                unit_of_privacy: if per_person {
                    UNIT_OF_PRIVACY_PERSON
                } else {
                    UNIT_OF_PRIVACY
                }
                .to_string(),
                budget_audience: m.budget_audience().as_str().to_string(),
                audiences,
                budget_epsilon: m.budget.epsilon,
                budget_delta: m.budget.delta,
                clip_norm: m.clip_norm,
                noise_multiplier: m.noise_multiplier,
                sampling,
                sampling_rate: if m.server_optimizer.is_tree() {
                    1.0
                } else {
                    m.sampling.accounting_rate()
                },
                epsilon_assumption: m.epsilon_assumption(),
                accountant: used_accountant.as_str().to_string(),
                accountant_explained: explain_accountant(used_accountant, recorded_accountant),
                rounds_planned: m.rounds,
                opt_out_policy: m.opt_out_policy.clone(),
                harm_scenarios: m.harm_scenarios.clone(),
                kpis: m.kpis.clone(),
                manifest_sha256: record.manifest_sha256.clone(),
            },
            spend: Spend {
                rounds_committed: committed,
                rounds_abandoned: abandoned,
                devices_participated: participations.len() as u64,
                budget_epsilon: m.budget.epsilon,
                delta,
                final_epsilon,
                series,
                per_device,
                clip_trajectory,
            },
            guardrails: Guardrails {
                thresholds: m.guardrail_metrics.clone(),
                versions,
                alerts,
                evaluation,
            },
            operations,
        })
    }

    /// Whether the run used dp-ftrl (its ε rests on participation limits).
    fn is_tree(&self) -> bool {
        // A distributed run with limits names them too, but has no tree.
        self.assessment.privacy_mode != "distributed"
            && self
                .assessment
                .epsilon_assumption
                .starts_with("participation limits")
    }

    /// The report as pretty-printed JSON (the layout is documented field by field in the
    /// types of this module).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a report always serialises");
        s.push('\n');
        s
    }
}

/// The accountant that computed a run's ε, in words (`recorded`: the one `run_created` names).
fn explain_accountant(used: Accountant, recorded: Accountant) -> String {
    match (used, recorded) {
        (Accountant::Pld, _) => "the PLD accountant (privacy loss distributions with pessimistic discretisation: an upper bound within about 0.1 % of the exact ε), as the manifest's accountant = \"pld\" says".into(),
        (Accountant::Rdp, Accountant::Pld) => "the RDP accountant (Rényi DP, converted to (ε, δ)): the manifest names pld, but PLD does not apply to this run's mechanism (DP-FTRL's tree, or distributed mode's discrete Gaussian), so it falls back to RDP".into(),
        (Accountant::Rdp, Accountant::Rdp) => "the RDP accountant (Rényi DP, converted to (ε, δ)), as the run's ledger records it".into(),
    }
}

/// Composes each device's participations without amplification (see the module docs).
fn per_device_spend(
    participations: &[(String, Vec<u64>)],
    round_sigma: &BTreeMap<u64, (PrivacyMode, f64)>,
    grid: &OrderGrid,
    delta: f64,
    m: &crate::manifest::RunManifest,
    tree_epsilon: Option<f64>,
    accountant: Accountant,
) -> Result<PerDevice, ReportError> {
    let holds_against = match m.privacy_mode.privacy_mode() {
        Some(PrivacyMode::Local) => Audience::Anyone,
        _ => Audience::ReleaseObservers,
    };
    let distributed = m.distributed_plan();
    // ε depends only on the multiset of (mode, σ) of a device's rounds: compute each once.
    let mut cache: BTreeMap<Vec<(&'static str, u64, u64)>, f64> = BTreeMap::new();
    let mut groups: BTreeMap<u64, (u64, f64)> = BTreeMap::new();
    let mut epsilons = Vec::with_capacity(participations.len());
    for (_, rounds) in participations {
        let mut key: BTreeMap<(&'static str, u64), u64> = BTreeMap::new();
        let mut counted = 0u64;
        for r in rounds {
            if let Some((mode, sigma)) = round_sigma.get(r) {
                *key.entry((mode.as_str(), sigma.to_bits())).or_default() += 1;
                counted += 1;
            }
        }
        let key: Vec<(&'static str, u64, u64)> =
            key.into_iter().map(|((m, s), c)| (m, s, c)).collect();
        let epsilon = match (tree_epsilon, cache.get(&key)) {
            // Distributed rounds all use the run's one mechanism: its RDP, `counted` times.
            _ if distributed.is_some() => {
                let plan = distributed.as_ref().expect("checked");
                if counted > 0 {
                    plan.mechanism.epsilon_after(counted, delta, grid)?.epsilon
                } else {
                    0.0
                }
            }
            (Some(e), _) => {
                if counted > 0 {
                    e
                } else {
                    0.0
                }
            }
            (None, Some(e)) => *e,
            (None, None) if accountant == Accountant::Pld => {
                // A device's rounds are unsampled Gaussian releases: PLD composes them exactly
                // to one Gaussian.
                let e = if key.is_empty() {
                    0.0
                } else {
                    let sigma = fedpref_privacy::pld::composed_gaussian_noise_multiplier(
                        key.iter().map(|(mode, sigma_bits, count)| {
                            let mode: PrivacyMode = mode.parse().expect("a mode's own name parses");
                            (
                                mode.effective_noise_multiplier(f64::from_bits(*sigma_bits)),
                                *count,
                            )
                        }),
                    );
                    fedpref_privacy::pld::gaussian_epsilon(sigma, delta)
                };
                cache.insert(key, e);
                e
            }
            (None, None) => {
                let mut acc = RdpAccountant::new(grid.clone());
                for (mode, sigma_bits, count) in &key {
                    let mode: PrivacyMode = mode.parse().expect("a mode's own name parses");
                    let sigma = mode.effective_noise_multiplier(f64::from_bits(*sigma_bits));
                    let step = acc.step_rdp(1.0, sigma)?;
                    acc.compose_rdp(&step, *count)?;
                }
                let e = if key.is_empty() {
                    0.0
                } else {
                    acc.epsilon(delta)?.epsilon
                };
                cache.insert(key, e);
                e
            }
        };
        let g = groups.entry(counted).or_insert((0, 0.0));
        g.0 += 1;
        g.1 = g.1.max(epsilon);
        epsilons.push(epsilon);
    }
    let max_epsilon = epsilons.iter().copied().reduce(f64::max);
    let histogram = match max_epsilon {
        Some(max) if max > 0.0 => {
            const BINS: usize = 10;
            let width = max / BINS as f64;
            let mut counts = [0u64; BINS];
            for e in &epsilons {
                let i = ((e / width).floor() as usize).min(BINS - 1);
                counts[i] += 1;
            }
            counts
                .iter()
                .enumerate()
                .map(|(i, &devices)| Bin {
                    from: width * i as f64,
                    to: if i + 1 == BINS {
                        max
                    } else {
                        width * (i + 1) as f64
                    },
                    devices,
                })
                .collect()
        }
        _ => vec![],
    };
    Ok(PerDevice {
        holds_against: holds_against.describe().into(),
        by_participations: groups
            .into_iter()
            .map(|(participations, (devices, epsilon))| ParticipationGroup {
                participations,
                devices,
                epsilon,
            })
            .collect(),
        histogram,
        max_epsilon,
        max_participations: participations
            .iter()
            .map(|(_, r)| r.len() as u64)
            .max()
            .unwrap_or(0),
        devices_at_max: max_epsilon
            .map(|m| epsilons.iter().filter(|e| **e == m).count() as u64)
            .unwrap_or(0),
    })
}

/// `YYYY-MM-DD hh:mm:ss UTC` for milliseconds since the Unix epoch.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn eps(v: f64) -> String {
    format!("{v:.4}")
}

fn metric_value(v: f64) -> String {
    format!("{v:.4}")
}

/// The paragraph that tells a reader how to re-derive every number.
fn rederive_text(run_id: &str, tree: bool) -> Vec<String> {
    let mut lines = vec![
        format!(
            "`fedpref-coordinator ledger verify --db PATH --run {run_id}` recomputes the hash chain and re-derives every round's RDP increments and the cumulative ε per audience from the recorded σ, q and mode; its head hash must equal the one printed at the top of this report."
        ),
        format!(
            "`fedpref-coordinator ledger export --db PATH --run {run_id} --format json` prints every entry with its canonical text, previous hash and hash (documented field by field in docs/reference/ledger-export.md): the rounds, cohort sizes, ε per round, guardrail alerts, pauses, rollbacks and the stop shown here are those entries."
        ),
        "Per-device ε composes, for each device, the rounds it took part in at each round's σ without amplification by sampling (`fedpref-coordinator accountant epsilon --noise-multiplier σ --sampling-rate 1 --rounds K --delta δ` gives the same figure for K participations at one σ).".to_string(),
        format!(
            "Guardrail metrics are ratios of noised sums: each device releases its evaluation of a model version once, as K = {} rates in [0, 1] with Gaussian noise added on the device; the coordinator sums the releases and compares ratios of the noised sums with the thresholds. A version's metrics are shown only from {} reporting devices; no single device's release is shown or used alone.",
            fedpref_privacy::evaluation::COORDINATES,
            crate::guardrail::MINIMUM_DEVICES_SHOWN
        ),
    ];
    if tree {
        lines.push(
            "DP-FTRL: each round's ledger entry records its tree segment, its position in it and the cumulative ρ; `ledger verify` re-derives ρ and ε from the tree accountant under the recorded participation limits. A device's own ε is at most the run's (the worst pattern the limits allow), which is the per-device figure shown.".to_string(),
        );
    }
    lines
}

// ---------------------------------------------------------------------------------------
// Markdown

impl ImpactReport {
    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut o = String::new();
        let a = &self.assessment;
        let _ = writeln!(o, "# Impact report: {}", md(&self.title));
        let _ = writeln!(o);
        if !self.ledger.intact {
            let _ = writeln!(
                o,
                "> **LEDGER CHAIN BROKEN at entry {}: {}.** The figures below are read from the entries as stored and cannot be trusted until the ledger is restored from a copy whose head hash was recorded.",
                self.ledger.failed_sequence.unwrap_or(0),
                md(self.ledger.problem.as_deref().unwrap_or("unknown problem"))
            );
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "Run `{}` · status **{}** · generated {}",
            self.run_id,
            self.status,
            utc(self.generated_at_ms)
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Ledger: **{}** · {} entries · head entry {} · head SHA-256 `{}` · {}",
            if self.ledger.intact {
                "chain intact, totals re-derived"
            } else {
                "CHAIN BROKEN"
            },
            self.ledger.entries,
            self.ledger.head_sequence,
            self.ledger.head_sha256,
            match &self.ledger.public_key {
                Some(k) => format!("signed by ledger key `{k}`"),
                None => "head not signed".to_string(),
            }
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "## What the run promised");
        let _ = writeln!(o);
        let _ = writeln!(o, "- **Purpose:** {}", md(&a.purpose));
        let _ = writeln!(o, "- **Owner:** {}", md(&a.owner));
        let _ = writeln!(
            o,
            "- **Data used:** {}",
            list_or_none(&a.data_elements_used)
        );
        let _ = writeln!(
            o,
            "- **Data deliberately not used:** {}",
            list_or_none(&a.data_elements_not_used)
        );
        let _ = writeln!(
            o,
            "- **Privacy mode:** {} — {}",
            a.privacy_mode,
            md(&a.mode_explained)
        );
        for n in &a.audiences {
            let _ = writeln!(o, "  - ε for `{}` {}", n.audience, n.description);
        }
        let _ = writeln!(
            o,
            "- **The budget binds:** the ε for `{}`",
            a.budget_audience
        );
        let _ = writeln!(o, "- **One user is:** {}", md(&a.unit_of_privacy));
        let _ = writeln!(
            o,
            "- **Budget:** ε = {} at δ = {:e} · clip norm C = {} · noise multiplier σ = {}",
            a.budget_epsilon,
            a.budget_delta,
            a.clip_norm,
            a.noise_multiplier
                .map(|s| format!("{s:.6}"))
                .unwrap_or_else(|| "none".into())
        );
        let _ = writeln!(
            o,
            "- **Sampling:** {} (accounting rate q = {}) · {} rounds planned",
            md(&a.sampling),
            a.sampling_rate,
            a.rounds_planned
        );
        let _ = writeln!(
            o,
            "- **The headline ε rests on:** {}",
            md(&a.epsilon_assumption)
        );
        let _ = writeln!(
            o,
            "- **Every ε is computed by:** {}",
            md(&a.accountant_explained)
        );
        let p = &a.opt_out_policy;
        let _ = writeln!(
            o,
            "- **Consent:** {}{}{}",
            p.consent_model,
            if p.description.is_empty() {
                String::new()
            } else {
                format!(" — {}", md(&p.description))
            },
            if p.withdrawal_effect.is_empty() {
                String::new()
            } else {
                format!(" · Withdrawal: {}", md(&p.withdrawal_effect))
            }
        );
        let _ = writeln!(o, "- **Manifest SHA-256:** `{}`", a.manifest_sha256);
        let _ = writeln!(o);
        let _ = writeln!(o, "### Harm scenarios");
        let _ = writeln!(o);
        if a.harm_scenarios.is_empty() {
            let _ = writeln!(o, "None recorded in the manifest.");
        } else {
            let _ = writeln!(o, "| scenario | affected | mitigation | residual risk |");
            let _ = writeln!(o, "|---|---|---|---|");
            for h in &a.harm_scenarios {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} |",
                    cell(&h.scenario),
                    cell(&h.affected_groups),
                    cell(&h.mitigation),
                    cell(&h.residual_risk)
                );
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "### KPIs");
        let _ = writeln!(o);
        if a.kpis.is_empty() {
            let _ = writeln!(o, "None recorded in the manifest.");
        } else {
            let _ = writeln!(o, "| KPI | description | target | better |");
            let _ = writeln!(o, "|---|---|---|---|");
            for k in &a.kpis {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} |",
                    cell(&k.metric),
                    cell(&k.description),
                    k.target
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "—".into()),
                    if k.higher_is_better {
                        "higher"
                    } else {
                        "lower"
                    }
                );
            }
        }
        let _ = writeln!(o);
        let s = &self.spend;
        let _ = writeln!(o, "## What was spent");
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{} rounds committed, {} abandoned (nothing spent); {} devices took part.",
            s.rounds_committed, s.rounds_abandoned, s.devices_participated
        );
        let _ = writeln!(o);
        for f in &s.final_epsilon {
            let _ = writeln!(
                o,
                "- Cumulative ε for `{}`: **{}** of the budget {} ({:.1} %) at δ = {:e}",
                f.audience,
                eps(f.epsilon),
                s.budget_epsilon,
                100.0 * f.epsilon / s.budget_epsilon,
                s.delta
            );
        }
        if !s.series.is_empty() {
            let _ = writeln!(o);
            let _ = write!(o, "| round |");
            for se in &s.series {
                let _ = write!(o, " ε `{}` |", se.audience);
            }
            let _ = writeln!(o);
            let _ = writeln!(o, "|---|{}", "---|".repeat(s.series.len()));
            for (i, pt) in s.series[0].points.iter().enumerate().skip(1) {
                let _ = write!(o, "| {} |", pt.round);
                for se in &s.series {
                    let _ = write!(
                        o,
                        " {} |",
                        se.points.get(i).map(|p| eps(p.epsilon)).unwrap_or_default()
                    );
                }
                let _ = writeln!(o);
            }
        }
        if !s.clip_trajectory.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "Adaptive clipping: the clip norm C of each round.");
            let _ = writeln!(o, "{}", clip_bits_sentence(&self.assessment.privacy_mode));
            let _ = writeln!(o);
            let _ = writeln!(o, "| round | C | next C |");
            let _ = writeln!(o, "|---|---|---|");
            for c in &s.clip_trajectory {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} |",
                    c.round,
                    trim_num(c.clip_norm),
                    trim_num(c.next_clip_norm)
                );
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "### Per-device ε");
        let _ = writeln!(o);
        let pd = &s.per_device;
        let _ = writeln!(o, "{}", per_device_sentence(pd, s.delta));
        let _ = writeln!(o);
        if !pd.by_participations.is_empty() {
            let _ = writeln!(o, "| rounds taken part in | devices | ε per device |");
            let _ = writeln!(o, "|---|---|---|");
            for g in &pd.by_participations {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} |",
                    g.participations,
                    g.devices,
                    eps(g.epsilon)
                );
            }
            let _ = writeln!(o);
            let _ = writeln!(o, "| ε from | ε to | devices |");
            let _ = writeln!(o, "|---|---|---|");
            for b in &pd.histogram {
                let _ = writeln!(o, "| {} | {} | {} |", eps(b.from), eps(b.to), b.devices);
            }
            let _ = writeln!(o);
        }
        let g = &self.guardrails;
        let _ = writeln!(o, "## Guardrails");
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", guardrail_intro(g));
        let _ = writeln!(o);
        if !g.thresholds.is_empty() {
            let _ = writeln!(
                o,
                "| metric | alert when | on alert | minimum devices | latest value |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|");
            for t in &g.thresholds {
                let _ = writeln!(
                    o,
                    "| {} | {} {} | {} | {} | {} |",
                    t.metric.as_str(),
                    t.direction.as_str(),
                    t.threshold,
                    t.on_alert.as_str(),
                    t.minimum_reporting_devices,
                    latest_value(g, t.metric)
                );
            }
            let _ = writeln!(o);
        }
        if !g.versions.is_empty() {
            let _ = write!(o, "| model version | devices | reports |");
            for k in GuardrailMetricKind::ALL {
                let _ = write!(o, " {} |", k.as_str());
            }
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "|---|---|---|{}",
                "---|".repeat(GuardrailMetricKind::ALL.len())
            );
            for v in &g.versions {
                let _ = write!(
                    o,
                    "| {} | {} | {} |",
                    v.model_version, v.reporting_devices, v.reports
                );
                for k in GuardrailMetricKind::ALL {
                    let _ = write!(
                        o,
                        " {} |",
                        v.values
                            .get(&k)
                            .map(|x| metric_value(*x))
                            .unwrap_or_else(|| "—".into())
                    );
                }
                let _ = writeln!(o);
            }
            let _ = writeln!(o);
        }
        for spend in &g.evaluation {
            let _ = writeln!(o, "- {}", spend.sentence());
        }
        if !g.evaluation.is_empty() {
            let _ = writeln!(o);
        }
        let _ = writeln!(o, "### Alerts");
        let _ = writeln!(o);
        if g.alerts.is_empty() {
            let _ = writeln!(o, "No guardrail alert fired.");
        } else {
            for al in &g.alerts {
                let _ = writeln!(o, "- {}", alert_sentence(al));
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "## Operations");
        let _ = writeln!(o);
        if self.operations.is_empty() {
            let _ = writeln!(o, "No pause, resumption, rollback or stop.");
        } else {
            for op in &self.operations {
                let _ = writeln!(
                    o,
                    "- entry {} ({}): {}",
                    op.sequence,
                    utc(op.at_ms),
                    md(&op.detail)
                );
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "## How to re-derive these numbers");
        let _ = writeln!(o);
        for line in rederive_text(&self.run_id, self.is_tree()) {
            let _ = writeln!(o, "- {line}");
        }
        o
    }
}

fn md(s: &str) -> String {
    s.replace('\n', " ")
}

fn cell(s: &str) -> String {
    if s.is_empty() {
        "—".into()
    } else {
        md(s).replace('|', "\\|")
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none listed".into()
    } else {
        v.iter().map(|s| md(s)).collect::<Vec<_>>().join("; ")
    }
}

fn per_device_sentence(pd: &PerDevice, delta: f64) -> String {
    match pd.max_epsilon {
        None => "No device has taken part yet.".into(),
        Some(max) => format!(
            "Each device's own participations composed without amplification by sampling, at δ = {delta:e}; this {}. The largest per-device ε is {}: {} took part in {} rounds.",
            pd.holds_against,
            eps(max),
            if pd.devices_at_max == 1 {
                "the one device with it".to_string()
            } else {
                format!("each of the {} devices with it", pd.devices_at_max)
            },
            pd.max_participations,
        ),
    }
}

fn guardrail_intro(g: &Guardrails) -> String {
    if g.thresholds.is_empty() {
        "The manifest sets no guardrail thresholds.".into()
    } else {
        format!(
            "{} guardrails from the manifest, evaluated per model version over counts summed across reporting devices (aggregate counts only, and only once the minimum number of devices has reported).",
            g.thresholds.len()
        )
    }
}

fn latest_value(g: &Guardrails, k: GuardrailMetricKind) -> String {
    g.versions
        .iter()
        .rev()
        .find_map(|v| {
            v.values
                .get(&k)
                .map(|x| format!("{} (v{})", metric_value(*x), v.model_version))
        })
        .unwrap_or_else(|| "—".into())
}

fn alert_sentence(a: &Alert) -> String {
    format!(
        "entry {} ({}): {} = {} is {} the threshold {} on model version {} ({} reporting devices; a ratio of noised sums); action: {}",
        a.sequence,
        utc(a.at_ms),
        a.metric.as_str(),
        metric_value(a.value),
        a.direction.as_str(),
        a.threshold,
        a.model_version,
        a.reporting_devices,
        a.action_taken.as_str()
    )
}

// ---------------------------------------------------------------------------------------
// HTML

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Markdown-style `code` spans of the re-derivation text as `<code>`.
fn code_spans(s: &str) -> String {
    let mut o = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(o, "<code>{}</code>", esc(part));
        } else {
            o.push_str(&esc(part));
        }
    }
    o
}

const SERIES_COLOURS: [&str; 3] = ["#1f5fa8", "#2e8540", "#7a3e9d"];
const BUDGET_COLOUR: &str = "#b00020";

const STYLE: &str = "
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1a1a1a;margin:24px auto;max-width:960px;padding:0 16px;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:2px;margin:18px 0 8px}h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0;width:100%}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.broken{background:#fde8ea;border:2px solid #b00020;color:#b00020;padding:10px 12px;font-weight:bold;margin:0 0 12px}
.ok{color:#2e6b30;font-weight:bold}.bad{color:#b00020;font-weight:bold}
.meta{color:#444}.hash{font-family:monospace;font-size:12px;word-break:break-all}
.cols{display:flex;gap:16px;flex-wrap:wrap}.cols>div{flex:1 1 420px}
.alert{color:#b00020}footer{border-top:1px solid #ccc;margin-top:20px;padding-top:6px;font-size:12px;color:#333}
code{font-family:monospace;font-size:12px;background:#f4f4f4;padding:0 2px}
svg text{font-family:inherit;font-size:11px;fill:#1a1a1a}
@media print{body{margin:0;max-width:none;font-size:11px}h2{break-after:avoid}table,svg{break-inside:avoid}}
";

impl ImpactReport {
    /// The report as one self-contained, printable HTML page: inline CSS and SVG, no
    /// script, and nothing fetched from anywhere else.
    pub fn to_html(&self) -> String {
        let mut o = String::new();
        let a = &self.assessment;
        let s = &self.spend;
        let _ = write!(
            o,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n<title>Impact report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
            esc(&self.title)
        );
        if !self.ledger.intact {
            let _ = writeln!(
                o,
                "<div class=\"broken\" id=\"ledger-broken\">LEDGER CHAIN BROKEN at entry {}: {}. The figures below are read from the entries as stored and cannot be trusted until the ledger is restored from a copy whose head hash was recorded.</div>",
                self.ledger.failed_sequence.unwrap_or(0),
                esc(self.ledger.problem.as_deref().unwrap_or("unknown problem"))
            );
        }
        let _ = writeln!(o, "<h1>Impact report: {}</h1>", esc(&self.title));
        let _ = writeln!(
            o,
            "<p class=\"meta\">Run <code>{}</code> · status <b>{}</b> · generated {}</p>",
            esc(&self.run_id),
            esc(&self.status),
            utc(self.generated_at_ms)
        );
        let _ = writeln!(
            o,
            "<p>Ledger: {} · {} entries · head entry {} · head SHA-256 <span class=\"hash\">{}</span> · {}</p>",
            if self.ledger.intact {
                "<span class=\"ok\">chain intact, totals re-derived</span>"
            } else {
                "<span class=\"bad\">CHAIN BROKEN</span>"
            },
            self.ledger.entries,
            self.ledger.head_sequence,
            esc(&self.ledger.head_sha256),
            match &self.ledger.public_key {
                Some(k) => format!(
                    "signed by ledger key <span class=\"hash\">{}</span>",
                    esc(k)
                ),
                None => "head not signed".to_string(),
            }
        );

        let _ = writeln!(o, "<h2>What the run promised</h2>\n<table>");
        let row = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "<tr><th>{k}</th><td>{v}</td></tr>");
        };
        row(&mut o, "Purpose", esc(&a.purpose));
        row(&mut o, "Owner", esc(&a.owner));
        row(
            &mut o,
            "Data used",
            esc(&list_or_none(&a.data_elements_used)),
        );
        row(
            &mut o,
            "Data deliberately not used",
            esc(&list_or_none(&a.data_elements_not_used)),
        );
        let mut audiences = String::new();
        for n in &a.audiences {
            let _ = write!(
                audiences,
                "<br>ε for <code>{}</code> {}",
                esc(&n.audience),
                esc(&n.description)
            );
        }
        row(
            &mut o,
            "Privacy mode",
            format!(
                "<b>{}</b> — {}{audiences}",
                esc(&a.privacy_mode),
                esc(&a.mode_explained)
            ),
        );
        row(
            &mut o,
            "The budget binds",
            format!("the ε for <code>{}</code>", esc(&a.budget_audience)),
        );
        row(&mut o, "One user is", esc(&a.unit_of_privacy));
        row(
            &mut o,
            "Budget and noise",
            format!(
                "ε = {} at δ = {:e} · clip norm C = {} · noise multiplier σ = {}",
                a.budget_epsilon,
                a.budget_delta,
                a.clip_norm,
                a.noise_multiplier
                    .map(|s| format!("{s:.6}"))
                    .unwrap_or_else(|| "none".into())
            ),
        );
        row(
            &mut o,
            "Sampling",
            format!(
                "{} (accounting rate q = {}) · {} rounds planned",
                esc(&a.sampling),
                a.sampling_rate,
                a.rounds_planned
            ),
        );
        row(
            &mut o,
            "The headline ε rests on",
            esc(&a.epsilon_assumption),
        );
        row(
            &mut o,
            "Every ε is computed by",
            esc(&a.accountant_explained),
        );
        let p = &a.opt_out_policy;
        row(
            &mut o,
            "Consent",
            format!(
                "{}{}{}",
                esc(&p.consent_model),
                if p.description.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", esc(&p.description))
                },
                if p.withdrawal_effect.is_empty() {
                    String::new()
                } else {
                    format!("<br>Withdrawal: {}", esc(&p.withdrawal_effect))
                }
            ),
        );
        row(
            &mut o,
            "Manifest SHA-256",
            format!("<span class=\"hash\">{}</span>", esc(&a.manifest_sha256)),
        );
        let _ = writeln!(o, "</table>");
        let _ = writeln!(o, "<h3>Harm scenarios</h3>");
        if a.harm_scenarios.is_empty() {
            let _ = writeln!(o, "<p>None recorded in the manifest.</p>");
        } else {
            let _ = writeln!(
                o,
                "<table><tr><th>Scenario</th><th>Affected</th><th>Mitigation</th><th>Residual risk</th></tr>"
            );
            for h in &a.harm_scenarios {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&h.scenario),
                    esc(&h.affected_groups),
                    esc(&h.mitigation),
                    esc(&h.residual_risk)
                );
            }
            let _ = writeln!(o, "</table>");
        }
        if !a.kpis.is_empty() {
            let _ = writeln!(
                o,
                "<h3>KPIs</h3>\n<table><tr><th>KPI</th><th>Description</th><th>Target</th><th>Better</th></tr>"
            );
            for k in &a.kpis {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(&k.metric),
                    esc(&k.description),
                    k.target
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "—".into()),
                    if k.higher_is_better {
                        "higher"
                    } else {
                        "lower"
                    }
                );
            }
            let _ = writeln!(o, "</table>");
        }

        let _ = writeln!(o, "<h2>What was spent</h2>");
        let _ = writeln!(
            o,
            "<p>{} rounds committed, {} abandoned (nothing spent); <b>{}</b> devices took part.</p>",
            s.rounds_committed, s.rounds_abandoned, s.devices_participated
        );
        let _ = writeln!(o, "<ul>");
        for f in &s.final_epsilon {
            let _ = writeln!(
                o,
                "<li>Cumulative ε for <code>{}</code>: <b>{}</b> of the budget {} ({:.1} %) at δ = {:e}</li>",
                esc(&f.audience),
                eps(f.epsilon),
                s.budget_epsilon,
                100.0 * f.epsilon / s.budget_epsilon,
                s.delta
            );
        }
        let _ = writeln!(o, "</ul>\n<div class=\"cols\"><div>");
        o.push_str(&epsilon_chart(s));
        let _ = writeln!(o, "</div><div>");
        o.push_str(&histogram_chart(&s.per_device));
        let _ = writeln!(
            o,
            "<p>{}</p>",
            esc(&per_device_sentence(&s.per_device, s.delta))
        );
        let _ = writeln!(o, "</div></div>");
        if !s.clip_trajectory.is_empty() {
            let _ = writeln!(
                o,
                "<h3>Adaptive clipping</h3>\n<p>{}</p>\n<table><tr><th>Round</th><th>C</th><th>Next C</th></tr>",
                esc(clip_bits_sentence(&self.assessment.privacy_mode))
            );
            for c in &s.clip_trajectory {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    c.round,
                    trim_num(c.clip_norm),
                    trim_num(c.next_clip_norm)
                );
            }
            let _ = writeln!(o, "</table>");
        }

        let g = &self.guardrails;
        let _ = writeln!(
            o,
            "<h2>Guardrails</h2>\n<p>{}</p>",
            esc(&guardrail_intro(g))
        );
        if !g.thresholds.is_empty() {
            let _ = writeln!(
                o,
                "<table><tr><th>Metric</th><th>Alert when</th><th>On alert</th><th>Minimum devices</th><th>Latest value</th></tr>"
            );
            for t in &g.thresholds {
                let _ = writeln!(
                    o,
                    "<tr><td>{}<br><small>{}</small></td><td>{} {}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    t.metric.as_str(),
                    esc(t.metric.describe()),
                    t.direction.as_str(),
                    t.threshold,
                    t.on_alert.as_str(),
                    t.minimum_reporting_devices,
                    latest_value(g, t.metric)
                );
            }
            let _ = writeln!(o, "</table>");
        }
        if !g.versions.is_empty() {
            let _ = write!(
                o,
                "<table><tr><th>Model version</th><th>Devices</th><th>Reports</th>"
            );
            for k in GuardrailMetricKind::ALL {
                let _ = write!(o, "<th>{}</th>", k.as_str().replace('_', " "));
            }
            let _ = writeln!(o, "</tr>");
            for v in &g.versions {
                let _ = write!(
                    o,
                    "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
                    v.model_version, v.reporting_devices, v.reports
                );
                for k in GuardrailMetricKind::ALL {
                    let _ = write!(
                        o,
                        "<td class=\"num\">{}</td>",
                        v.values
                            .get(&k)
                            .map(|x| metric_value(*x))
                            .unwrap_or_else(|| "—".into())
                    );
                }
                let _ = writeln!(o, "</tr>");
            }
            let _ = writeln!(o, "</table>");
        }
        if !g.evaluation.is_empty() {
            let _ = writeln!(o, "<ul>");
            for spend in &g.evaluation {
                let _ = writeln!(o, "<li>{}</li>", esc(&spend.sentence()));
            }
            let _ = writeln!(o, "</ul>");
        }
        let _ = writeln!(o, "<h3>Alerts</h3>");
        if g.alerts.is_empty() {
            let _ = writeln!(o, "<p>No guardrail alert fired.</p>");
        } else {
            let _ = writeln!(o, "<ul>");
            for al in &g.alerts {
                let _ = writeln!(o, "<li class=\"alert\">{}</li>", esc(&alert_sentence(al)));
            }
            let _ = writeln!(o, "</ul>");
        }
        let _ = writeln!(o, "<h2>Operations</h2>");
        if self.operations.is_empty() {
            let _ = writeln!(o, "<p>No pause, resumption, rollback or stop.</p>");
        } else {
            let _ = writeln!(o, "<ul>");
            for op in &self.operations {
                let _ = writeln!(
                    o,
                    "<li>entry {} ({}): {}</li>",
                    op.sequence,
                    utc(op.at_ms),
                    esc(&op.detail)
                );
            }
            let _ = writeln!(o, "</ul>");
        }
        let _ = writeln!(o, "<footer><b>How to re-derive these numbers.</b><ul>");
        for line in rederive_text(&self.run_id, self.is_tree()) {
            let _ = writeln!(o, "<li>{}</li>", code_spans(&line));
        }
        let _ = writeln!(o, "</ul></footer>\n</body>\n</html>");
        o
    }
}

/// A round-number tick step giving at most about `n` ticks over `[0, max]`.
fn tick_step(max: f64, n: usize) -> f64 {
    let raw = max / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn epsilon_chart(s: &Spend) -> String {
    let (w, h) = (440.0, 260.0);
    let (l, r, t, b) = (48.0, 12.0, 24.0, 36.0);
    let x_max = s
        .series
        .iter()
        .filter_map(|se| se.points.last().map(|p| p.round))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let top = s
        .series
        .iter()
        .flat_map(|se| se.points.iter().map(|p| p.epsilon))
        .fold(s.budget_epsilon, f64::max)
        * 1.08;
    let x = |v: f64| l + (w - l - r) * v / x_max;
    let y = |v: f64| h - b - (h - t - b) * v / top;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"epsilon-chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Cumulative epsilon per round against the budget\">"
    );
    let _ = writeln!(
        o,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{l}\" y=\"14\" font-weight=\"bold\">Cumulative ε per round (δ = {:e})</text>",
        s.delta
    );
    let ystep = tick_step(top, 5);
    let mut v = 0.0;
    while v <= top + 1e-12 {
        let _ = writeln!(
            o,
            "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e3e3e3\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            y(v),
            w - r,
            y(v),
            l - 4.0,
            y(v) + 4.0,
            trim_num(v)
        );
        v += ystep;
    }
    let xstep = tick_step(x_max, 8).max(1.0).round();
    let mut v = 0.0;
    while v <= x_max + 1e-9 {
        let _ = writeln!(
            o,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(v),
            h - b,
            x(v),
            h - b + 4.0,
            x(v),
            h - b + 16.0,
            v as u64
        );
        v += xstep;
    }
    let _ = writeln!(
        o,
        "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">round</text>",
        (l + w - r) / 2.0,
        h - 4.0
    );
    let _ = writeln!(
        o,
        "<line id=\"budget-line\" x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{BUDGET_COLOUR}\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{BUDGET_COLOUR}\">budget ε = {}</text>",
        y(s.budget_epsilon),
        w - r,
        y(s.budget_epsilon),
        w - r - 2.0,
        y(s.budget_epsilon) - 4.0,
        trim_num(s.budget_epsilon)
    );
    for (i, se) in s.series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.round as f64), y(p.epsilon)))
            .collect();
        let _ = writeln!(
            o,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        let ly = t + 8.0 + 14.0 * i as f64;
        let _ = writeln!(
            o,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"2.5\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            l + 8.0,
            l + 26.0,
            l + 30.0,
            ly + 4.0,
            esc(&se.audience.replace('_', " "))
        );
    }
    if s.series.is_empty() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no round committed yet</text>",
            (l + w - r) / 2.0,
            (t + h - b) / 2.0
        );
    }
    let _ = writeln!(o, "</svg>");
    o
}

fn histogram_chart(pd: &PerDevice) -> String {
    let (w, h) = (440.0, 260.0);
    let (l, r, t, b) = (48.0, 12.0, 24.0, 36.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"device-histogram\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Histogram of per-device epsilon\">"
    );
    let _ = writeln!(
        o,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{l}\" y=\"14\" font-weight=\"bold\">Devices by their own ε (no amplification)</text>"
    );
    let peak = pd.histogram.iter().map(|b| b.devices).max().unwrap_or(0);
    if peak == 0 {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no device has taken part yet</text>",
            (l + w - r) / 2.0,
            (t + h - b) / 2.0
        );
        let _ = writeln!(o, "</svg>");
        return o;
    }
    let top = peak as f64 * 1.1;
    let y = |v: f64| h - b - (h - t - b) * v / top;
    let ystep = tick_step(top, 5).max(1.0).round();
    let mut v = 0.0;
    while v <= top {
        let _ = writeln!(
            o,
            "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e3e3e3\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            y(v),
            w - r,
            y(v),
            l - 4.0,
            y(v) + 4.0,
            v as u64
        );
        v += ystep;
    }
    let n = pd.histogram.len() as f64;
    let bw = (w - l - r) / n;
    for (i, bin) in pd.histogram.iter().enumerate() {
        let x0 = l + bw * i as f64;
        let _ = writeln!(
            o,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#1f5fa8\"><title>{} devices with ε in [{}, {}]</title></rect>",
            x0 + 1.0,
            y(bin.devices as f64),
            bw - 2.0,
            h - b - y(bin.devices as f64),
            bin.devices,
            eps(bin.from),
            eps(bin.to)
        );
        if i % 2 == 0 || pd.histogram.len() <= 5 {
            let _ = writeln!(
                o,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0,
                h - b + 14.0,
                trim_num(bin.from)
            );
        }
    }
    if let Some(last) = pd.histogram.last() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            w - r,
            h - b + 14.0,
            trim_num(last.to)
        );
    }
    let _ = writeln!(
        o,
        "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">ε per device</text>",
        h - b,
        w - r,
        h - b,
        (l + w - r) / 2.0,
        h - 4.0
    );
    let _ = writeln!(o, "</svg>");
    o
}

/// A short number for axis labels: at most three significant decimals, no trailing zeros.
fn trim_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Adds a round's cumulative ε to each audience's series (from a point at round 0), once per
/// round: a distributed round's release and its commit carry the same figure.
fn add_point(
    series: &mut BTreeMap<String, Vec<RoundEpsilon>>,
    audience_order: &mut Vec<String>,
    round: u64,
    cumulative: &[AudienceEpsilon],
) {
    for a in cumulative {
        if !audience_order.contains(&a.audience) {
            audience_order.push(a.audience.clone());
        }
        let points = series.entry(a.audience.clone()).or_insert_with(|| {
            vec![RoundEpsilon {
                round: 0,
                epsilon: 0.0,
            }]
        });
        if points.last().is_some_and(|p| p.round == round) {
            continue;
        }
        points.push(RoundEpsilon {
            round,
            epsilon: a.epsilon,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn html_escaping_covers_markup_characters() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(code_spans("run `a<b` now"), "run <code>a&lt;b</code> now");
    }

    #[test]
    fn tick_steps_are_round_numbers() {
        assert_eq!(tick_step(4.4, 5), 1.0);
        assert_eq!(tick_step(22.0, 5), 5.0);
        assert_eq!(tick_step(0.9, 5), 0.2);
        assert_eq!(trim_num(2.50), "2.5");
        assert_eq!(trim_num(0.0), "0");
    }
}
