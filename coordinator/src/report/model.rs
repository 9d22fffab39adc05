//! The report's data: what [`ImpactReport::build`] gathers from the store and the ledger, and
//! what [`ImpactReport::to_json`] serialises.

use std::collections::BTreeMap;

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

/// The distribution of per-device ε (see the `report` module docs).
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
    pub(super) fn is_tree(&self) -> bool {
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

/// Composes each device's participations without amplification (see the `report` module
/// docs).
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
}
