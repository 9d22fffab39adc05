//! The run manifest: what a training run is for, what it may use, and what privacy it may
//! spend. Written in TOML by the run's owner; its SHA-256 goes into the ledger's first entry.
//!
//! ```toml
//! title = "Movie preferences, spring release"
//! purpose = "Rank the catalogue by what each user is likely to enjoy"
//! owner = "recsys-team@example.com"
//! data_elements_used = ["ratings", "thumbs up/down"]
//! data_elements_not_used = ["location", "contacts"]
//! privacy_mode = "central"
//! rounds = 50
//! clip_norm = 1.0
//! noise_multiplier = 1.1          # or: target_epsilon = 3.0 (σ is then calibrated)
//! accountant = "pld"              # or "rdp": computes every ε of the run (default "pld")
//!
//! [budget]
//! epsilon = 8.0
//! delta = 1e-6
//! # audience = "release_observers"  # which ε the budget binds (default: the strictest one the
//! #                                 # run tracks; see RunManifest::budget_audience)
//!
//! [sampling]
//! kind = "poisson"                # or "cohort" with target_size, minimum_size
//! rate = 0.05
//! population = 2000               # devices expected to check in per round window
//! round_seconds = 600
//!
//! [server_optimizer]
//! kind = "fedavg"
//! server_learning_rate = 1.0
//!
//! [model]
//! items = 1000
//! factors = 16
//!
//! [participation]                    # optional; required by server_optimizer "dp-ftrl"
//! min_separation = 20                # a device at most once every 20 committed rounds …
//! max_participations = 10            # … and at most 10 times in the run
//!
//! [adaptive_clipping]                # optional, central or local mode; clip_norm is the initial C
//! target_quantile = 0.5
//! learning_rate = 0.2                # default 0.2 (Andrew et al. 2021)
//! bit_noise_std = 5.0                # central: on the bit sum, default expected cohort size / 20;
//!                                    # local: on each device's bit, required
//! min_clip_norm = 0.001              # C never goes below this (default clip_norm / 1000) …
//! max_clip_norm = 1000.0             # … nor above this (default clip_norm × 1000)
//!
//! [opt_out_policy]
//! consent_model = "opt-in"
//! description = "Training is off until the user turns it on in Settings"
//!
//! [[harm_scenarios]]                 # any number; shown in the impact report
//! scenario = "Recommendations narrow to one genre"
//! affected_groups = "light users"
//! mitigation = "diversity injection"
//! residual_risk = "some narrowing remains"   # optional
//!
//! [[kpis]]                           # any number; what success means
//! metric = "hit_rate_at_10"
//! description = "Share of held-out positives in the top 10"
//! target = 0.2                       # optional
//! higher_is_better = true
//!
//! [[guardrail_metrics]]              # any number; see `GuardrailMetricKind` for the metrics
//! metric = "negative_feedback_rate"
//! direction = "above"                # or "below"
//! threshold = 0.2                    # a share or rate in [0, 1]
//! on_alert = "pause"                 # or "log" (default)
//! minimum_reporting_devices = 50     # default 10
//! ```
//!
//! Unknown keys and out-of-range values are errors naming the file and the key.
//! `privacy_mode = "distributed"` adds a `[secure_aggregation]` section: see
//! [`crate::distributed`].

use std::path::Path;

use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant};
use fedpref_privacy::{Accountant, Audience, OrderGrid, PrivacyMode, RoundRelease};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aggregation::{AggregationPrivacy, ServerOptimizer};
pub use crate::distributed::{DistributedNoiseKind, DistributedPlan, SecureAggregationSpec};

/// A manifest problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The manifest's path.
        file: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type.
    #[error("{file}: {message}")]
    Parse {
        /// The manifest's path (or `<manifest>` for in-memory text).
        file: String,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A value is outside its range.
    #[error("{file}: {key} = {value}: {reason}")]
    Invalid {
        /// The manifest's path.
        file: String,
        /// The key, as a dotted path (`budget.epsilon`).
        key: String,
        /// The offending value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Privacy modes as a manifest spells them; `none` exists for simulations only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestPrivacyMode {
    /// No differential privacy (simulations only; the coordinator refuses it for real runs).
    None,
    /// Local DP.
    Local,
    /// Central DP.
    Central,
    /// Distributed DP under secure aggregation: devices add integer noise shares and mask
    /// their updates; the coordinator unmasks only the sum (see [`crate::distributed`]).
    Distributed,
}

impl ManifestPrivacyMode {
    /// The privacy crate's mode, if any.
    pub fn privacy_mode(self) -> Option<PrivacyMode> {
        match self {
            Self::None => None,
            Self::Local => Some(PrivacyMode::Local),
            Self::Central => Some(PrivacyMode::Central),
            Self::Distributed => Some(PrivacyMode::Distributed),
        }
    }

    /// As the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

/// The budget a run may spend.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The audience whose ε the budget binds (absent: the strictest the run tracks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<BudgetAudience>,
}

/// An audience a budget can bind (`fedpref_privacy::Audience`, by its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAudience {
    /// Anyone, the coordinator included (local mode).
    Anyone,
    /// Whoever sees the released models and may know who took part (no amplification).
    ReleaseObservers,
    /// Observers of the released models who do not learn who was sampled (amplified by
    /// Poisson sampling).
    ObserversUnawareOfParticipation,
}

impl BudgetAudience {
    /// The privacy crate's audience.
    pub fn audience(self) -> fedpref_privacy::Audience {
        match self {
            Self::Anyone => fedpref_privacy::Audience::Anyone,
            Self::ReleaseObservers => fedpref_privacy::Audience::ReleaseObservers,
            Self::ObserversUnawareOfParticipation => {
                fedpref_privacy::Audience::ObserversUnawareOfParticipation
            }
        }
    }
}

/// How devices are selected for a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplingSpec {
    /// Each eligible device that checks in while the round's selection window is open is
    /// selected independently with probability `rate`. Amplification by sampling covers the
    /// devices that check in during the window (not the whole install base).
    Poisson {
        /// q.
        rate: f64,
        /// The number of eligible devices expected to check in per window; the expected
        /// cohort `rate × population` is the fixed denominator of central-DP averaging.
        population: u64,
        /// How long the round stays open, in seconds.
        round_seconds: u64,
        /// Fewer contributions than this at the deadline abandons the round.
        #[serde(default = "one")]
        minimum_size: u32,
    },
    /// The first `target_size` eligible devices to check in are selected; no amplification
    /// is claimed (the selection is not random).
    Cohort {
        /// Devices selected per round.
        target_size: u32,
        /// Fewer contributions than this at the deadline abandons the round.
        minimum_size: u32,
        /// How long the round stays open, in seconds.
        round_seconds: u64,
    },
}

fn one() -> u32 {
    1
}

impl SamplingSpec {
    /// How long a round stays open, in milliseconds.
    pub fn round_millis(&self) -> i64 {
        let s = match self {
            Self::Poisson { round_seconds, .. } | Self::Cohort { round_seconds, .. } => {
                *round_seconds
            }
        };
        (s as i64).saturating_mul(1000)
    }

    /// The smallest cohort that is not abandoned.
    pub fn minimum_size(&self) -> u32 {
        match self {
            Self::Poisson { minimum_size, .. } | Self::Cohort { minimum_size, .. } => *minimum_size,
        }
    }

    /// The rate the accountant may use: q for Poisson sampling, 1 for a fixed cohort.
    pub fn accounting_rate(&self) -> f64 {
        match self {
            Self::Poisson { rate, .. } => *rate,
            Self::Cohort { .. } => 1.0,
        }
    }

    /// The expected number of contributions per round.
    pub fn expected_cohort_size(&self) -> f64 {
        match self {
            Self::Poisson {
                rate, population, ..
            } => rate * *population as f64,
            Self::Cohort { target_size, .. } => f64::from(*target_size),
        }
    }
}

/// Quantile-based adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021). In central
/// mode the coordinator checks whether each update's norm was at most the current C, sums
/// those centred bits, noises the sum with N(0, σ_b²) and moves C geometrically toward the
/// `target_quantile` of the update norms (see [`fedpref_privacy::adaptive_clip`]). In local
/// mode each device computes its bit before clipping, adds N(0, σ_b²) to it itself and sends
/// it with its update; the coordinator sums the noised bits (adding no noise) and moves C the
/// same way. The manifest's `clip_norm` is the initial C.
///
/// Local-mode privacy: neighbouring is replace-one (local DP); the update's sensitivity is 2C
/// and the bit's 1, and `noise_multiplier` z is again the combined multiplier of the pair,
/// z⁻² = σ_Δ⁻² + (2σ_b)⁻² (see
/// [`fedpref_privacy::adaptive_clip::local_upload_noise_multiplier`]): devices noise their
/// update with σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and each upload is accounted as z.
///
/// Privacy: with a per-round optimiser the manifest's `noise_multiplier` z is the combined
/// multiplier of the update sum and the bit sum, so the accounting is that of z; the update
/// noise is raised to σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), which needs 2σ_b > z. With `dp-ftrl`
/// the bits cost ρ = k/(8σ_b²) more for k participations, added to the tree's ρ, and C
/// changes only when a tree restarts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClippingSpec {
    /// γ ∈ (0, 1): the fraction of updates that should fit under C.
    pub target_quantile: f64,
    /// η > 0 of the geometric update C ← C·exp(−η(b̄ − γ)).
    #[serde(default = "default_clip_learning_rate")]
    pub learning_rate: f64,
    /// σ_b: in central mode the noise standard deviation on the sum of bits (default: the
    /// expected cohort size / 20, the paper's default); in local mode the noise standard
    /// deviation each device adds to its own bit (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_noise_std: Option<f64>,
    /// The smallest C adaptive clipping may set (default: `clip_norm` / 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_clip_norm: Option<f64>,
    /// The largest C adaptive clipping may set (default: `clip_norm` × 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clip_norm: Option<f64>,
}

/// How far below and above the initial C adaptive clipping may go by default.
pub const DEFAULT_CLIP_NORM_RANGE: f64 = 1000.0;

fn default_clip_learning_rate() -> f64 {
    0.2
}

/// The shared model the run trains (federated matrix factorisation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Items in the catalogue.
    pub items: u64,
    /// Latent factors per item (k).
    pub factors: u64,
    /// Standard deviation of the initial item factors.
    #[serde(default = "default_init_scale")]
    pub init_scale: f64,
    /// Initial global offset (the mean rating).
    #[serde(default = "default_offset")]
    pub initial_offset: f64,
}

fn default_init_scale() -> f64 {
    0.1
}
fn default_offset() -> f64 {
    3.0
}

/// How users consent to training and what withdrawing does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutPolicy {
    /// `opt-in` or `opt-out`.
    pub consent_model: String,
    /// What the user sees and does.
    #[serde(default)]
    pub description: String,
    /// What happens to past contributions when a user withdraws.
    #[serde(default)]
    pub withdrawal_effect: String,
}

/// A foreseeable harm and its mitigation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HarmScenario {
    /// What could go wrong.
    pub scenario: String,
    /// Who would be affected.
    #[serde(default)]
    pub affected_groups: String,
    /// What the run does about it.
    pub mitigation: String,
    /// What risk remains after the mitigation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub residual_risk: String,
}

/// A key performance indicator: what success means for the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kpi {
    /// Short name, e.g. `rmse` or `hit_rate_at_10`.
    pub metric: String,
    /// What it measures and how, in plain words.
    #[serde(default)]
    pub description: String,
    /// The value the run aims for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Whether larger values are better.
    #[serde(default)]
    pub higher_is_better: bool,
}

/// A metric the coordinator derives from the devices' noised federated-evaluation releases
/// (`ReportMetrics`), per model version: a ratio of noised sums, each a mean of the devices'
/// rates over the devices with a denominator (see [`crate::guardrail`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailMetricKind {
    /// Mean over devices shown lists of their mean intra-list diversity.
    IntraListDiversity,
    /// Mean over devices with a catalogue of distinct topics shown ÷ catalogue topics.
    TopicCoverage,
    /// Mean over devices shown lists of negative feedback ÷ recommendations shown.
    NegativeFeedbackRate,
    /// Reporting devices whose user turned personalisation off ÷ reporting devices.
    OptOutRate,
    /// Difference in prediction accuracy (share within 0.5) between the light and heavy
    /// cohorts.
    CohortAccuracyGap,
    /// Mean over devices shown lists of injected slots ÷ recommendations shown.
    InjectedShare,
}

impl GuardrailMetricKind {
    /// Every metric, in report order.
    pub const ALL: [Self; 6] = [
        Self::IntraListDiversity,
        Self::TopicCoverage,
        Self::NegativeFeedbackRate,
        Self::OptOutRate,
        Self::CohortAccuracyGap,
        Self::InjectedShare,
    ];

    /// As the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IntraListDiversity => "intra_list_diversity",
            Self::TopicCoverage => "topic_coverage",
            Self::NegativeFeedbackRate => "negative_feedback_rate",
            Self::OptOutRate => "opt_out_rate",
            Self::CohortAccuracyGap => "cohort_accuracy_gap",
            Self::InjectedShare => "injected_share",
        }
    }

    /// One phrase for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::IntraListDiversity => "mean intra-list diversity of the lists shown",
            Self::TopicCoverage => "mean share of the catalogue's topics shown on a device",
            Self::NegativeFeedbackRate => "negative feedback per recommendation shown",
            Self::OptOutRate => "share of reporting devices whose user turned personalisation off",
            Self::CohortAccuracyGap => {
                "largest gap in prediction accuracy between activity cohorts"
            }
            Self::InjectedShare => "share of slots filled by diversity injection",
        }
    }
}

/// Which side of a threshold is an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdDirection {
    /// Alert when the metric rises above the threshold.
    Above,
    /// Alert when the metric falls below the threshold.
    Below,
}

impl ThresholdDirection {
    /// Whether `value` is on the alerting side of `threshold` (strictly).
    pub fn crossed(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Above => value > threshold,
            Self::Below => value < threshold,
        }
    }

    /// As the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Above => "above",
            Self::Below => "below",
        }
    }
}

/// What the coordinator does when a guardrail alert fires. It always logs the alert, counts
/// it in Prometheus and writes a ledger entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertAction {
    /// Only log, count and record; the run carries on.
    Log,
    /// As `log`, and pause the run until an operator resumes it.
    Pause,
}

impl AlertAction {
    /// As the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Pause => "pause",
        }
    }
}

fn default_alert_action() -> AlertAction {
    AlertAction::Log
}

fn default_minimum_reporting_devices() -> u64 {
    10
}

/// A guardrail: a metric watched through federated evaluation, with its alert threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailMetric {
    /// The metric.
    pub metric: GuardrailMetricKind,
    /// Which side of the threshold alerts.
    pub direction: ThresholdDirection,
    /// The threshold (a share or rate, in [0, 1]).
    pub threshold: f64,
    /// `log` (default) or `pause`.
    #[serde(default = "default_alert_action")]
    pub on_alert: AlertAction,
    /// The metric is evaluated only once at least this many distinct devices have reported
    /// on a model version, so a handful of devices can neither trip it nor be singled out.
    #[serde(default = "default_minimum_reporting_devices")]
    pub minimum_reporting_devices: u64,
}

/// A run manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunManifest {
    /// A short title.
    pub title: String,
    /// What the model is for.
    pub purpose: String,
    /// Who answers for the run.
    pub owner: String,
    /// Data elements the training uses.
    #[serde(default)]
    pub data_elements_used: Vec<String>,
    /// Data elements deliberately not used.
    #[serde(default)]
    pub data_elements_not_used: Vec<String>,
    /// The privacy mode.
    pub privacy_mode: ManifestPrivacyMode,
    /// The run's privacy budget.
    pub budget: BudgetSpec,
    /// The clip norm C.
    pub clip_norm: f64,
    /// σ; give this or `target_epsilon`.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// A target ε for all `rounds`, from which σ is calibrated at creation.
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    /// The accountant that computes the run's ε (`"pld"` or `"rdp"`): the calibration of σ
    /// for `target_epsilon`, the budget's checks, the ledger's cumulative ε and `ledger
    /// verify`'s re-derivation. Absent: PLD ([`RunManifest::accountant`]). DP-FTRL's tree and
    /// distributed mode's mechanism are accounted by RDP whatever it says, and their ε
    /// statements name RDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accountant: Option<Accountant>,
    /// The number of rounds.
    pub rounds: u64,
    /// Device selection.
    pub sampling: SamplingSpec,
    /// The server optimiser.
    pub server_optimizer: ServerOptimizer,
    /// The model.
    pub model: ModelSpec,
    /// Consent and withdrawal.
    pub opt_out_policy: OptOutPolicy,
    /// Foreseeable harms and mitigations.
    #[serde(default)]
    pub harm_scenarios: Vec<HarmScenario>,
    /// What success means for the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kpis: Vec<Kpi>,
    /// Guardrail metrics and their alert thresholds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guardrail_metrics: Vec<GuardrailMetric>,
    /// Seed for the initial model (random if absent).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Participation limits the round engine enforces: a device takes part at most once
    /// every `min_separation` committed rounds and at most `max_participations` times.
    /// Required by `dp-ftrl`, whose ε rests on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participation: Option<ParticipationLimits>,
    /// Adaptive clipping (central mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClippingSpec>,
    /// Secure aggregation and the devices' noise (distributed mode only, and required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregationSpec>,
}

/// The audiences a run's ledger tracks, with the sampling rate each is accounted at. The
/// first is the one the budget is enforced on.
pub fn tracked_audiences(release: &RoundRelease) -> Vec<(Audience, f64)> {
    match release.mode {
        PrivacyMode::Local => vec![(Audience::Anyone, 1.0)],
        PrivacyMode::Central | PrivacyMode::Distributed if release.sampling_rate < 1.0 => vec![
            (
                Audience::ObserversUnawareOfParticipation,
                release.sampling_rate,
            ),
            (Audience::ReleaseObservers, 1.0),
        ],
        PrivacyMode::Central | PrivacyMode::Distributed => vec![(Audience::ReleaseObservers, 1.0)],
    }
}

impl From<&RunManifest> for crate::distributed::PlanInputs {
    fn from(manifest: &RunManifest) -> Self {
        Self {
            secure_aggregation: manifest.secure_aggregation,
            cohort: match manifest.sampling {
                SamplingSpec::Cohort {
                    target_size,
                    minimum_size,
                    ..
                } => Some((target_size, minimum_size)),
                SamplingSpec::Poisson { .. } => None,
            },
            noise_multiplier: manifest.noise_multiplier,
            dimension: manifest.dimension(),
            clip_norm: manifest.clip_norm,
        }
    }
}

impl RunManifest {
    /// Reads and validates a manifest file.
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_toml(&text, &file)
    }

    /// Parses and validates manifest text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ManifestError> {
        let mut manifest: Self = toml::from_str(text).map_err(|e| ManifestError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        manifest.validate(file)?;
        Ok(manifest)
    }

    /// The manifest as canonical TOML (what is stored and hashed).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises")
    }

    /// SHA-256 of the canonical TOML, hex.
    pub fn sha256(&self) -> String {
        crate::hex(&Sha256::digest(self.to_toml().as_bytes()))
    }

    /// The per-round release the accountant sees (`None` in privacy mode `none`, and with
    /// `dp-ftrl`, whose rounds are accounted together by the tree accountant: see
    /// [`RunManifest::tree_accountant`]).
    pub fn round_release(&self) -> Option<RoundRelease> {
        // Distributed rounds are accounted with the distributed discrete Gaussian's own RDP
        // curve ([`RunManifest::distributed_plan`]), not as a Gaussian release.
        if self.server_optimizer.is_tree() || self.privacy_mode == ManifestPrivacyMode::Distributed
        {
            return None;
        }
        Some(RoundRelease {
            mode: self.privacy_mode.privacy_mode()?,
            noise_multiplier: self.noise_multiplier?,
            sampling_rate: self.sampling.accounting_rate(),
        })
    }

    /// The tree accountant of a `dp-ftrl` run (σ of the tree's nodes, its schedule and the
    /// participation limits); `None` for every other optimiser.
    pub fn tree_accountant(&self) -> Option<TreeAccountant> {
        let schedule = self.server_optimizer.tree_schedule().ok()??;
        TreeAccountant::new(self.noise_multiplier?, schedule, self.participation?).ok()
    }

    /// The accountant the manifest names (`accountant = "pld" | "rdp"`), PLD when it names
    /// none.
    pub fn accountant(&self) -> Accountant {
        self.accountant.unwrap_or_default()
    }

    /// The accountant that actually computes the run's ε: the manifest's for per-round
    /// Gaussian releases (modes local and central with a per-round optimiser), RDP for
    /// DP-FTRL's tree and distributed mode's mechanism (where PLD does not apply), and `None`
    /// without DP.
    pub fn epsilon_accountant(&self) -> Option<Accountant> {
        if self.privacy_mode == ManifestPrivacyMode::None {
            return None;
        }
        Some(match self.round_release() {
            Some(_) => self.accountant(),
            None => Accountant::Rdp,
        })
    }

    /// The audience whose ε the budget binds: `[budget] audience` if given, else the strictest
    /// the run tracks (`anyone` in local mode, `release_observers` otherwise, never the
    /// audience amplification by sampling is claimed for).
    pub fn budget_audience(&self) -> fedpref_privacy::Audience {
        match (self.budget.audience, self.privacy_mode) {
            (Some(a), _) => a.audience(),
            (None, ManifestPrivacyMode::Local) => fedpref_privacy::Audience::Anyone,
            (None, _) => fedpref_privacy::Audience::ReleaseObservers,
        }
    }

    /// The per-round release the budget is charged with: [`RunManifest::round_release`] at
    /// the sampling rate of the audience the budget binds ([`RunManifest::budget_audience`]):
    /// q for observers unaware of participation, 1 for everyone else.
    pub fn budget_release(&self) -> Option<RoundRelease> {
        let release = self.round_release()?;
        let audience = self.budget_audience();
        let q = tracked_audiences(&release)
            .into_iter()
            .find(|(a, _)| *a == audience)
            .map_or(1.0, |(_, q)| q);
        Some(RoundRelease {
            sampling_rate: q,
            ..release
        })
    }

    /// The bounds adaptive clipping keeps C within, with their defaults (`clip_norm` / 1000 and
    /// `clip_norm` × 1000); `None` without adaptive clipping.
    pub fn clip_norm_bounds(&self) -> Option<(f64, f64)> {
        let a = self.adaptive_clipping?;
        Some((
            a.min_clip_norm
                .unwrap_or(self.clip_norm / DEFAULT_CLIP_NORM_RANGE),
            a.max_clip_norm
                .unwrap_or(self.clip_norm * DEFAULT_CLIP_NORM_RANGE),
        ))
    }

    /// σ_b of adaptive clipping, with its default (expected cohort size / 20).
    pub fn bit_noise_std(&self) -> Option<f64> {
        let a = self.adaptive_clipping?;
        Some(
            a.bit_noise_std
                .unwrap_or(self.sampling.expected_cohort_size() / 20.0),
        )
    }

    /// The noise multiplier σ in the device's task: the update noise σ_Δ with adaptive
    /// clipping in local mode ([`RunManifest::update_noise_multiplier`]), else the
    /// manifest's σ (0 without one). Uploads must repeat it.
    pub fn task_noise_multiplier(&self) -> f64 {
        if self.local_clip_bits() {
            self.update_noise_multiplier().unwrap_or(0.0)
        } else {
            self.noise_multiplier.unwrap_or(0.0)
        }
    }

    /// Whether devices send noised clip bits: adaptive clipping in local mode.
    pub fn local_clip_bits(&self) -> bool {
        self.adaptive_clipping.is_some() && self.privacy_mode == ManifestPrivacyMode::Local
    }

    /// The noise multiplier the coordinator applies to each round's update sum: the
    /// manifest's σ, or with adaptive clipping and a per-round optimiser, the raised
    /// σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) that leaves the combined multiplier at z.
    pub fn update_noise_multiplier(&self) -> Option<f64> {
        let z = self.noise_multiplier?;
        match self.bit_noise_std() {
            Some(sigma_b) if !self.server_optimizer.is_tree() => {
                fedpref_privacy::adaptive_clip::update_noise_multiplier(z, sigma_b).ok()
            }
            _ => Some(z),
        }
    }

    /// The sentence naming the assumption the run's headline ε rests on: participation
    /// limits for `dp-ftrl`, Poisson sampling from a population of N, or none (a fixed cohort
    /// or local DP: worst case per device).
    pub fn epsilon_assumption(&self) -> String {
        if let Some(plan) = self.distributed_plan() {
            // Every round runs the same mechanism, so with limits a device's RDP is at most
            // `max_participations` rounds' (its separation does not enter: the rounds' noises
            // are independent).
            return match self.participation {
                Some(limits) => format!("{}; {}", limits.assumption(), plan.assumption()),
                None => plan.assumption(),
            };
        }
        if let Some(limits) = self
            .participation
            .filter(|_| self.server_optimizer.is_tree())
        {
            return limits.assumption();
        }
        match (&self.sampling, self.privacy_mode) {
            (SamplingSpec::Poisson { population, .. }, ManifestPrivacyMode::Central) => {
                format!("Poisson sampling from a population of {population}")
            }
            _ => "none (worst case per device)".into(),
        }
    }

    /// A distributed run's per-round secure-aggregation and noise parameters (`None` in the
    /// other modes; always `Some` for a validated distributed manifest).
    pub fn distributed_plan(&self) -> Option<DistributedPlan> {
        if self.privacy_mode != ManifestPrivacyMode::Distributed {
            return None;
        }
        crate::distributed::plan(self).ok()
    }

    /// How the aggregator treats updates.
    pub fn aggregation_privacy(&self) -> AggregationPrivacy {
        match self.privacy_mode {
            ManifestPrivacyMode::None => AggregationPrivacy::None,
            ManifestPrivacyMode::Local => AggregationPrivacy::Local,
            ManifestPrivacyMode::Central | ManifestPrivacyMode::Distributed => {
                AggregationPrivacy::Central {
                    clip_norm: self.clip_norm,
                    // Central and distributed modes require σ, and 2σ_b > σ with adaptive
                    // clipping (validated): a missing σ must never become zero noise.
                    noise_multiplier: self
                        .update_noise_multiplier()
                        .expect("central mode has a valid noise multiplier (validated)"),
                    expected_cohort_size: self.sampling.expected_cohort_size(),
                }
            }
        }
    }

    /// Shared parameters: V (items × k), item biases (items) and the global offset (1).
    pub fn dimension(&self) -> usize {
        (self.model.items * (self.model.factors + 1) + 1) as usize
    }

    /// A warning, before training, when the noise on each round's released mean would exceed
    /// the largest signal a mean of clipped updates can carry (C), naming the cohort size
    /// that would be needed ([`fedpref_privacy::signal`]). `None` without noise or when the
    /// expected cohort is large enough.
    pub fn noise_warning(&self) -> Option<String> {
        let mode = self.privacy_mode.privacy_mode()?;
        let sigma = self.task_noise_multiplier();
        let cohort = self.sampling.expected_cohort_size();
        let dimension = self.dimension();
        let e = fedpref_privacy::signal::noise_to_signal(
            mode,
            sigma,
            self.clip_norm,
            dimension,
            cohort,
        )?;
        e.swamped().then(|| {
            format!(
                "the noise will swamp the signal: {} devices a round with σ = {sigma:.3} and C = {} over {dimension} coordinates put noise of norm ≈ {:.3} on each round's mean, more than the largest update mean (C); a cohort of about {} devices would be needed{}",
                cohort.round(),
                self.clip_norm,
                e.noise_norm,
                e.needed_cohort,
                if mode == PrivacyMode::Local {
                    " (local DP's noise grows with the dimension and shrinks only with √cohort)"
                } else {
                    ""
                }
            )
        })
    }

    fn validate(&mut self, file: &str) -> Result<(), ManifestError> {
        let bad = |key: &str, value: String, reason: &str| ManifestError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        for (key, v) in [
            ("title", &self.title),
            ("purpose", &self.purpose),
            ("owner", &self.owner),
        ] {
            if v.trim().is_empty() {
                return Err(bad(key, "\"\"".into(), "must not be empty"));
            }
        }
        if !(self.budget.epsilon.is_finite() && self.budget.epsilon > 0.0) {
            return Err(bad(
                "budget.epsilon",
                self.budget.epsilon.to_string(),
                "must be a finite number > 0",
            ));
        }
        if let Some(a) = self.budget.audience {
            // σ may still be a target ε here: the audiences depend only on mode and sampling.
            let release = self.round_release().or_else(|| {
                let mode = self.privacy_mode.privacy_mode()?;
                (!self.server_optimizer.is_tree() && mode != PrivacyMode::Distributed).then(|| {
                    RoundRelease {
                        mode,
                        noise_multiplier: 1.0,
                        sampling_rate: self.sampling.accounting_rate(),
                    }
                })
            });
            let tracked: Vec<fedpref_privacy::Audience> = match release {
                Some(r) => tracked_audiences(&r).into_iter().map(|(a, _)| a).collect(),
                None if self.privacy_mode == ManifestPrivacyMode::Local => {
                    vec![fedpref_privacy::Audience::Anyone]
                }
                None => vec![fedpref_privacy::Audience::ReleaseObservers],
            };
            if !tracked.contains(&a.audience()) {
                return Err(bad(
                    "budget.audience",
                    format!("\"{}\"", a.audience().as_str()),
                    &format!(
                        "this run's ε is tracked for {}",
                        tracked
                            .iter()
                            .map(|a| format!("\"{}\"", a.as_str()))
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                ));
            }
        }
        if !(self.budget.delta > 0.0 && self.budget.delta < 1.0) {
            return Err(bad(
                "budget.delta",
                self.budget.delta.to_string(),
                "must be in (0, 1)",
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(bad(
                "clip_norm",
                self.clip_norm.to_string(),
                "must be a finite number > 0",
            ));
        }
        if self.rounds == 0 {
            return Err(bad("rounds", "0".into(), "must be at least 1"));
        }
        match &self.sampling {
            SamplingSpec::Poisson {
                rate,
                population,
                round_seconds,
                ..
            } => {
                if !(*rate > 0.0 && *rate <= 1.0) {
                    return Err(bad("sampling.rate", rate.to_string(), "must be in (0, 1]"));
                }
                if *population == 0 {
                    return Err(bad("sampling.population", "0".into(), "must be at least 1"));
                }
                if *round_seconds == 0 {
                    return Err(bad(
                        "sampling.round_seconds",
                        "0".into(),
                        "must be at least 1",
                    ));
                }
            }
            SamplingSpec::Cohort {
                target_size,
                minimum_size,
                round_seconds,
            } => {
                if *target_size == 0 {
                    return Err(bad(
                        "sampling.target_size",
                        "0".into(),
                        "must be at least 1",
                    ));
                }
                if *minimum_size == 0 || minimum_size > target_size {
                    return Err(bad(
                        "sampling.minimum_size",
                        minimum_size.to_string(),
                        "must be between 1 and sampling.target_size",
                    ));
                }
                if *round_seconds == 0 {
                    return Err(bad(
                        "sampling.round_seconds",
                        "0".into(),
                        "must be at least 1",
                    ));
                }
            }
        }
        if self.model.items == 0 || self.model.factors == 0 {
            return Err(bad(
                "model",
                format!(
                    "items = {}, factors = {}",
                    self.model.items, self.model.factors
                ),
                "items and factors must be at least 1",
            ));
        }
        if self.model.items.saturating_mul(self.model.factors + 1) > 1 << 28 {
            return Err(bad(
                "model.items",
                self.model.items.to_string(),
                "the model would exceed 2^28 parameters",
            ));
        }
        if !(self.model.init_scale.is_finite() && self.model.init_scale >= 0.0) {
            return Err(bad(
                "model.init_scale",
                self.model.init_scale.to_string(),
                "must be ≥ 0",
            ));
        }
        if !["opt-in", "opt-out"].contains(&self.opt_out_policy.consent_model.as_str()) {
            return Err(bad(
                "opt_out_policy.consent_model",
                format!("{:?}", self.opt_out_policy.consent_model),
                "must be \"opt-in\" or \"opt-out\"",
            ));
        }
        for (i, h) in self.harm_scenarios.iter().enumerate() {
            if h.scenario.trim().is_empty() || h.mitigation.trim().is_empty() {
                return Err(bad(
                    &format!("harm_scenarios[{i}]"),
                    format!("{:?}", h.scenario),
                    "scenario and mitigation must not be empty",
                ));
            }
        }
        for (i, k) in self.kpis.iter().enumerate() {
            if k.metric.trim().is_empty() {
                return Err(bad(
                    &format!("kpis[{i}].metric"),
                    "\"\"".into(),
                    "must not be empty",
                ));
            }
            if let Some(t) = k.target
                && !t.is_finite()
            {
                return Err(bad(
                    &format!("kpis[{i}].target"),
                    t.to_string(),
                    "must be a finite number",
                ));
            }
        }
        for (i, g) in self.guardrail_metrics.iter().enumerate() {
            if !(g.threshold.is_finite() && (0.0..=1.0).contains(&g.threshold)) {
                return Err(bad(
                    &format!("guardrail_metrics[{i}].threshold"),
                    g.threshold.to_string(),
                    "must be in [0, 1]: every guardrail metric is a share or a rate",
                ));
            }
            if g.minimum_reporting_devices == 0 {
                return Err(bad(
                    &format!("guardrail_metrics[{i}].minimum_reporting_devices"),
                    "0".into(),
                    "must be at least 1",
                ));
            }
            if self.guardrail_metrics[..i]
                .iter()
                .any(|o| o.metric == g.metric && o.direction == g.direction)
            {
                return Err(bad(
                    &format!("guardrail_metrics[{i}].metric"),
                    format!("\"{}\"", g.metric.as_str()),
                    "the same metric and direction are given twice",
                ));
            }
        }
        self.validate_distributed_combinations(file)?;
        self.validate_tree_and_clipping(file)?;
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "target_epsilon",
                    self.target_epsilon.unwrap_or_default().to_string(),
                    "give either noise_multiplier or target_epsilon, not both",
                ));
            }
            (None, None) if self.privacy_mode != ManifestPrivacyMode::None => {
                return Err(bad(
                    "noise_multiplier",
                    "(missing)".into(),
                    "give noise_multiplier or target_epsilon",
                ));
            }
            (Some(s), None)
                if !(s.is_finite() && s >= fedpref_privacy::noise::MIN_NOISE_MULTIPLIER) =>
            {
                return Err(bad(
                    "noise_multiplier",
                    s.to_string(),
                    "must be a finite number ≥ 0.001",
                ));
            }
            (None, Some(e)) => {
                if !(e.is_finite() && e > 0.0 && e <= self.budget.epsilon) {
                    return Err(bad(
                        "target_epsilon",
                        e.to_string(),
                        "must be > 0 and at most budget.epsilon",
                    ));
                }
                if let (Some(schedule), Some(limits)) = (
                    self.server_optimizer.tree_schedule().ok().flatten(),
                    self.participation,
                ) {
                    if self.adaptive_clipping.is_some() {
                        return Err(bad(
                            "target_epsilon",
                            e.to_string(),
                            "with dp-ftrl and adaptive clipping give noise_multiplier (the bits' cost adds to the tree's, and the budget stops the run before it is exceeded)",
                        ));
                    }
                    let sigma = TreeAccountant::calibrate_noise_multiplier(
                        schedule,
                        limits,
                        self.rounds,
                        e,
                        self.budget.delta,
                    )
                    .map_err(|err| bad("target_epsilon", e.to_string(), &err.to_string()))?;
                    self.noise_multiplier = Some(sigma);
                    self.target_epsilon = None;
                    return self.validate_optimizer(file);
                }
                let mode = self.privacy_mode.privacy_mode().expect("checked above");
                // Calibrated for the audience the budget binds: amplified by sampling only when
                // the manifest says the budget binds observers unaware of participation.
                let q = if mode == PrivacyMode::Local
                    || self.budget_audience()
                        != fedpref_privacy::Audience::ObserversUnawareOfParticipation
                {
                    1.0
                } else {
                    self.sampling.accounting_rate()
                };
                let (sigma, _) = fedpref_privacy::calibrate_with(
                    self.accountant(),
                    mode,
                    e,
                    self.budget.delta,
                    q,
                    self.rounds,
                    &OrderGrid::default(),
                )
                .map_err(|err| bad("target_epsilon", e.to_string(), &err.to_string()))?;
                self.noise_multiplier = Some(sigma);
                self.target_epsilon = None;
            }
            _ => {}
        }
        self.validate_optimizer(file)
    }

    fn validate_optimizer(&self, file: &str) -> Result<(), ManifestError> {
        let bad = |key: &str, value: String, reason: &str| ManifestError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        if let (Some(z), Some(sigma_b)) = (self.noise_multiplier, self.bit_noise_std())
            && !self.server_optimizer.is_tree()
        {
            fedpref_privacy::adaptive_clip::update_noise_multiplier(z, sigma_b).map_err(|e| {
                bad(
                    "adaptive_clipping.bit_noise_std",
                    sigma_b.to_string(),
                    &format!("{e} (noise_multiplier = {z} is the combined multiplier)"),
                )
            })?;
        }
        self.server_optimizer
            .validate(&self.aggregation_privacy())
            .map_err(|e| {
                bad(
                    "server_optimizer",
                    format!("{:?}", self.server_optimizer),
                    &e.to_string(),
                )
            })?;
        if let Some(release) = self.round_release() {
            release
                .effective()
                .map_err(|e| bad("sampling", format!("{:?}", self.sampling), &e.to_string()))?;
        }
        if self.privacy_mode == ManifestPrivacyMode::Distributed {
            crate::distributed::plan(self).map_err(|e| bad(&e.key, e.value, &e.reason))?;
        }
        Ok(())
    }

    /// Refuses what distributed mode cannot do, and `[secure_aggregation]` elsewhere.
    fn validate_distributed_combinations(&self, file: &str) -> Result<(), ManifestError> {
        let bad = |key: &str, value: String, reason: &str| ManifestError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        if self.privacy_mode != ManifestPrivacyMode::Distributed {
            if self.secure_aggregation.is_some() {
                return Err(bad(
                    "secure_aggregation",
                    format!("privacy_mode = \"{}\"", self.privacy_mode.as_str()),
                    "[secure_aggregation] applies to privacy_mode = \"distributed\" only",
                ));
            }
            return Ok(());
        }
        if self.server_optimizer.is_tree() {
            return Err(bad(
                "server_optimizer",
                "\"dp-ftrl\"".into(),
                "dp-ftrl is not available in distributed mode: each tree node's noise must be added once and taken back out of later prefix sums, and under secure aggregation that noise comes from one round's devices, whom no later round can reach (it would need secrets handed from cohort to cohort); use privacy_mode = \"central\", or a per-round optimiser with [participation] limits, which distributed mode accounts without any sampling assumption",
            ));
        }
        if matches!(
            self.server_optimizer,
            ServerOptimizer::Median { .. } | ServerOptimizer::TrimmedMean { .. }
        ) {
            return Err(bad(
                "server_optimizer",
                format!("\"{}\"", self.server_optimizer.kind()),
                "robust aggregators need the individual updates, which secure aggregation hides from the coordinator: use a mean-based optimiser (fedavg, fedavgm, fedadam, fedyogi, fedadagrad)",
            ));
        }
        if self.adaptive_clipping.is_some() {
            return Err(bad(
                "adaptive_clipping",
                "privacy_mode = \"distributed\"".into(),
                "adaptive clipping is not available in distributed mode yet (the clip bits would have to be masked and noised with the update)",
            ));
        }
        if let Some(e) = self.target_epsilon {
            return Err(bad(
                "target_epsilon",
                e.to_string(),
                "distributed mode needs noise_multiplier: σ is split among the honest devices, and `fedpref-coordinator accountant` does not calibrate the distributed discrete Gaussian",
            ));
        }
        if self.secure_aggregation.is_none() {
            return Err(bad(
                "secure_aggregation",
                "(missing)".into(),
                "privacy_mode = \"distributed\" needs a [secure_aggregation] section",
            ));
        }
        Ok(())
    }
}

impl RunManifest {
    /// Checks `dp-ftrl`, `[participation]` and `[adaptive_clipping]` against each other and
    /// the privacy mode.
    fn validate_tree_and_clipping(&self, file: &str) -> Result<(), ManifestError> {
        let bad = |key: &str, value: String, reason: &str| ManifestError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        if self.server_optimizer.is_tree() {
            if self.privacy_mode != ManifestPrivacyMode::Central {
                return Err(bad(
                    "server_optimizer",
                    "\"dp-ftrl\"".into(),
                    &format!(
                        "dp-ftrl adds its tree noise on the coordinator, so privacy_mode must be \"central\", not \"{}\"",
                        self.privacy_mode.as_str()
                    ),
                ));
            }
            if self.participation.is_none() {
                return Err(bad(
                    "participation",
                    "(missing)".into(),
                    "dp-ftrl's ε rests on participation limits: give [participation] min_separation and max_participations",
                ));
            }
        }
        if self.participation.is_some()
            && !self.server_optimizer.is_tree()
            && self.privacy_mode == ManifestPrivacyMode::Central
            && matches!(self.sampling, SamplingSpec::Poisson { rate, .. } if rate < 1.0)
        {
            // The amplification-by-sampling accountant assumes every device is selected
            // independently in every round; limits make a device's selection depend on its
            // past (secret) selections, which that analysis does not cover.
            return Err(bad(
                "participation",
                "with sampling.kind = \"poisson\"".into(),
                "participation limits would make Poisson selection depend on each device's past selections, which the amplification-by-sampling accountant does not cover: use sampling.kind = \"cohort\" or server_optimizer.kind = \"dp-ftrl\"",
            ));
        }
        if let Some(a) = self.adaptive_clipping {
            if !matches!(
                self.privacy_mode,
                ManifestPrivacyMode::Central | ManifestPrivacyMode::Local
            ) {
                return Err(bad(
                    "adaptive_clipping",
                    format!("privacy_mode = \"{}\"", self.privacy_mode.as_str()),
                    "adaptive clipping is available in central mode (the coordinator noises the bit sum) and local mode (each device noises its bit)",
                ));
            }
            if self.privacy_mode == ManifestPrivacyMode::Local && a.bit_noise_std.is_none() {
                return Err(bad(
                    "adaptive_clipping.bit_noise_std",
                    "(missing)".into(),
                    "required in local mode: the noise standard deviation each device adds to its clip bit (it must exceed noise_multiplier / 2)",
                ));
            }
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return Err(bad(
                    "adaptive_clipping.target_quantile",
                    a.target_quantile.to_string(),
                    "must be in (0, 1)",
                ));
            }
            if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                return Err(bad(
                    "adaptive_clipping.learning_rate",
                    a.learning_rate.to_string(),
                    "must be a finite number > 0",
                ));
            }
            let sigma_b = self.bit_noise_std().unwrap_or(0.0);
            if !(sigma_b.is_finite() && sigma_b > 0.0) {
                return Err(bad(
                    "adaptive_clipping.bit_noise_std",
                    sigma_b.to_string(),
                    "must be a finite number > 0",
                ));
            }
            let (lo, hi) = self.clip_norm_bounds().expect("adaptive clipping is on");
            for (key, v) in [
                ("adaptive_clipping.min_clip_norm", lo),
                ("adaptive_clipping.max_clip_norm", hi),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(key, v.to_string(), "must be a finite number > 0"));
                }
            }
            if !(lo <= self.clip_norm && self.clip_norm <= hi) {
                return Err(bad(
                    "adaptive_clipping.min_clip_norm",
                    format!("{lo} (max_clip_norm {hi}, clip_norm {})", self.clip_norm),
                    "must satisfy min_clip_norm ≤ clip_norm ≤ max_clip_norm",
                ));
            }
            if self.server_optimizer.is_tree()
                && self
                    .server_optimizer
                    .tree_schedule()
                    .ok()
                    .flatten()
                    .and_then(|s| s.rounds_per_tree())
                    .is_none()
            {
                return Err(bad(
                    "adaptive_clipping",
                    "server_optimizer.restart_every (missing)".into(),
                    "with dp-ftrl, C can change only when a tree restarts: give server_optimizer.restart_every",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
title = "Movie preferences"
purpose = "Rank the catalogue by what each user is likely to enjoy"
owner = "recsys@example.com"
data_elements_used = ["ratings"]
data_elements_not_used = ["location"]
privacy_mode = "central"
rounds = 5
clip_norm = 1.0
noise_multiplier = 1.0

[budget]
epsilon = 10.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 4
minimum_size = 2
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"
description = "off until the user turns it on"
"#;

    #[test]
    fn the_accountant_key_is_pld_or_rdp_and_defaults_to_pld() {
        let m = RunManifest::from_toml(EXAMPLE, "m.toml").unwrap();
        assert_eq!(m.accountant, None);
        assert_eq!(m.accountant(), Accountant::Pld);
        assert_eq!(m.epsilon_accountant(), Some(Accountant::Pld));
        assert!(!m.to_toml().contains("accountant"), "absent stays absent");
        for (value, expected) in [("pld", Accountant::Pld), ("rdp", Accountant::Rdp)] {
            let text = EXAMPLE.replace(
                "noise_multiplier = 1.0",
                &format!("noise_multiplier = 1.0\naccountant = \"{value}\""),
            );
            let m = RunManifest::from_toml(&text, "m.toml").unwrap();
            assert_eq!(m.accountant(), expected);
            let back = RunManifest::from_toml(&m.to_toml(), "again.toml").unwrap();
            assert_eq!(back.accountant, Some(expected), "the key round-trips");
        }
        let bad = EXAMPLE.replace(
            "noise_multiplier = 1.0",
            "noise_multiplier = 1.0\naccountant = \"moments\"",
        );
        let e = RunManifest::from_toml(&bad, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("accountant") && e.contains("m.toml"), "{e}");
    }

    #[test]
    fn a_target_epsilon_costs_less_noise_with_pld_than_with_rdp() {
        let sigma = |accountant: &str| {
            let text = EXAMPLE.replace(
                "noise_multiplier = 1.0",
                &format!("target_epsilon = 4.0\naccountant = \"{accountant}\""),
            );
            RunManifest::from_toml(&text, "m.toml")
                .unwrap()
                .noise_multiplier
                .unwrap()
        };
        let (pld, rdp) = (sigma("pld"), sigma("rdp"));
        assert!(pld < rdp, "PLD σ {pld} < RDP σ {rdp}");
        // Each meets the target by its own accountant.
        let release = |s| RoundRelease {
            mode: PrivacyMode::Central,
            noise_multiplier: s,
            sampling_rate: 1.0,
        };
        for (a, s) in [(Accountant::Pld, pld), (Accountant::Rdp, rdp)] {
            let e =
                fedpref_privacy::epsilon_after_with(a, &release(s), 5, 1e-6, &OrderGrid::default())
                    .unwrap()
                    .epsilon;
            assert!(e <= 4.0 * (1.0 + 1e-9), "{a}: ε {e}");
        }
    }

    #[test]
    fn a_cohort_too_small_for_its_noise_gets_a_warning_naming_the_cohort_needed() {
        // 10 items × 3 + 1 = 31 coordinates, σ = 1, central: a cohort of ⌈√31⌉ = 6 needed.
        let m = RunManifest::from_toml(EXAMPLE, "m.toml").unwrap();
        let w = m.noise_warning().unwrap();
        assert!(
            w.contains("4 devices a round") && w.contains("about 6 devices"),
            "{w}"
        );
        let big = EXAMPLE.replace("target_size = 4", "target_size = 6");
        assert_eq!(
            RunManifest::from_toml(&big, "m.toml")
                .unwrap()
                .noise_warning(),
            None
        );
        let local = EXAMPLE.replace("privacy_mode = \"central\"", "privacy_mode = \"local\"");
        let w = RunManifest::from_toml(&local, "m.toml")
            .unwrap()
            .noise_warning()
            .unwrap();
        // Local DP needs σ²d = 31 devices.
        assert!(
            w.contains("about 31 devices") && w.contains("√cohort"),
            "{w}"
        );
    }

    #[test]
    fn example_manifest_parses_and_hashes_stably() {
        let m = RunManifest::from_toml(EXAMPLE, "m.toml").unwrap();
        assert_eq!(m.dimension(), 10 * 3 + 1);
        assert_eq!(
            m.sha256(),
            RunManifest::from_toml(&m.to_toml(), "again")
                .unwrap()
                .sha256()
        );
        assert_eq!(m.sampling.accounting_rate(), 1.0);
    }

    #[test]
    fn the_shipped_example_manifest_is_valid() {
        let m = RunManifest::from_toml(
            include_str!("../../coordinator/manifests/example.toml"),
            "example.toml",
        )
        .unwrap();
        assert!(m.noise_multiplier.unwrap() > 0.5);
        assert_eq!(m.sampling.accounting_rate(), 0.02);
    }

    #[test]
    fn the_shipped_dp_ftrl_manifest_is_valid_and_fits_its_budget() {
        let m = RunManifest::from_toml(
            include_str!("../../coordinator/manifests/dp-ftrl.toml"),
            "dp-ftrl.toml",
        )
        .unwrap();
        assert!(
            m.round_release().is_none(),
            "the tree accountant, not per-round RDP"
        );
        let acc = m.tree_accountant().unwrap();
        let spent = acc.spend(m.rounds, m.budget.delta).unwrap();
        assert!(spent.epsilon < m.budget.epsilon, "{}", spent.epsilon);
        assert_eq!(
            m.epsilon_assumption(),
            "participation limits (separation 64, at most 8)"
        );
        // With dp-ftrl the update noise is the tree's σ; the bits are charged on top.
        assert_eq!(m.update_noise_multiplier(), m.noise_multiplier);
        // The canonical TOML round-trips.
        assert_eq!(RunManifest::from_toml(&m.to_toml(), "x").unwrap(), m);
    }

    #[test]
    fn adaptive_clipping_raises_the_update_noise_to_keep_the_combined_multiplier() {
        let text =
            format!("{EXAMPLE}\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 5.0\n");
        let m = RunManifest::from_toml(&text, "m.toml").unwrap();
        let z = m.noise_multiplier.unwrap();
        let s = m.update_noise_multiplier().unwrap();
        let combined = fedpref_privacy::adaptive_clip::effective_noise_multiplier(s, 5.0).unwrap();
        assert!(s > z && (combined - z).abs() < 1e-12, "{s} {combined} {z}");
        // 2σ_b must exceed z.
        let text =
            format!("{EXAMPLE}\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 0.4\n");
        let e = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adaptive_clipping.bit_noise_std"), "{e}");
        let text = format!("{EXAMPLE}\n[adaptive_clipping]\ntarget_quantile = 1.5\n");
        let e = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adaptive_clipping.target_quantile"), "{e}");
    }

    #[test]
    fn adaptive_clipping_in_local_mode_needs_a_per_device_bit_noise() {
        let local = EXAMPLE.replace("privacy_mode = \"central\"", "privacy_mode = \"local\"");
        let text =
            format!("{local}\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 2.0\n");
        let m = RunManifest::from_toml(&text, "m.toml").unwrap();
        assert!(m.local_clip_bits());
        let z = m.noise_multiplier.unwrap();
        let s = m.task_noise_multiplier();
        assert!(s > z, "{s} {z}");
        // The device's pair (update σ_Δ, bit σ_b) is accounted as the manifest's z.
        let pair = fedpref_privacy::adaptive_clip::local_upload_noise_multiplier(s, 2.0).unwrap();
        assert!((pair - z).abs() < 1e-12, "{pair} {z}");
        assert_eq!(m.round_release().unwrap().noise_multiplier, z);
        // σ_b has no default in local mode.
        let text = format!("{local}\n[adaptive_clipping]\ntarget_quantile = 0.5\n");
        let e = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adaptive_clipping.bit_noise_std") && e.contains("required in local mode"),
            "{e}"
        );
        // 2σ_b must exceed z here too.
        let text =
            format!("{local}\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 0.5\n");
        let e = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adaptive_clipping.bit_noise_std"), "{e}");
        // Without adaptive clipping nothing changes for local tasks.
        let m = RunManifest::from_toml(&local, "m.toml").unwrap();
        assert!(!m.local_clip_bits());
        assert_eq!(m.task_noise_multiplier(), m.noise_multiplier.unwrap());
    }

    #[test]
    fn participation_limits_with_poisson_amplification_are_refused() {
        let poisson = EXAMPLE.replace(
            "kind = \"cohort\"\ntarget_size = 4\nminimum_size = 2\n",
            "kind = \"poisson\"\nrate = 0.1\npopulation = 100\n",
        );
        assert!(RunManifest::from_toml(&poisson, "m.toml").is_ok());
        let limited =
            format!("{poisson}\n[participation]\nmin_separation = 2\nmax_participations = 3\n");
        let e = RunManifest::from_toml(&limited, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("participation") && e.contains("cohort"), "{e}");
        // With a fixed cohort they are enforced, and the ε stays the worst case per device.
        let cohort =
            format!("{EXAMPLE}\n[participation]\nmin_separation = 2\nmax_participations = 3\n");
        let m = RunManifest::from_toml(&cohort, "m.toml").unwrap();
        assert_eq!(m.epsilon_assumption(), "none (worst case per device)");
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_file_and_key() {
        let text = EXAMPLE.replace("rounds = 5", "rounds = 5\nroundz = 6");
        let err = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml") && err.contains("roundz"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (from, to, key) in [
            ("epsilon = 10.0", "epsilon = -1.0", "budget.epsilon"),
            ("delta = 1e-6", "delta = 1.5", "budget.delta"),
            ("clip_norm = 1.0", "clip_norm = 0.0", "clip_norm"),
            ("rounds = 5", "rounds = 0", "rounds"),
            (
                "minimum_size = 2",
                "minimum_size = 9",
                "sampling.minimum_size",
            ),
            (
                "noise_multiplier = 1.0",
                "noise_multiplier = 0.0",
                "noise_multiplier",
            ),
            (
                "consent_model = \"opt-in\"",
                "consent_model = \"maybe\"",
                "opt_out_policy.consent_model",
            ),
        ] {
            let text = EXAMPLE.replace(from, to);
            let err = RunManifest::from_toml(&text, "m.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("m.toml"), "{to}: {err}");
        }
    }

    #[test]
    fn target_epsilon_is_calibrated_into_a_noise_multiplier() {
        let text = EXAMPLE.replace("noise_multiplier = 1.0", "target_epsilon = 4.0");
        let m = RunManifest::from_toml(&text, "m.toml").unwrap();
        let sigma = m.noise_multiplier.unwrap();
        // Calibrated by the run's accountant (PLD by default), whose ε meets the target.
        let spent = fedpref_privacy::epsilon_after_with(
            m.accountant(),
            &m.round_release().unwrap(),
            5,
            1e-6,
            &OrderGrid::default(),
        )
        .unwrap();
        assert!(
            sigma > 0.5 && spent.epsilon <= 4.0,
            "σ={sigma}, ε={}",
            spent.epsilon
        );
    }

    const OVERSIGHT: &str = r#"
[[harm_scenarios]]
scenario = "Narrowing"
mitigation = "diversity injection"
residual_risk = "some"

[[kpis]]
metric = "rmse"
target = 0.9

[[guardrail_metrics]]
metric = "negative_feedback_rate"
direction = "above"
threshold = 0.2
on_alert = "pause"

[[guardrail_metrics]]
metric = "intra_list_diversity"
direction = "below"
threshold = 0.3
minimum_reporting_devices = 25
"#;

    #[test]
    fn harm_scenarios_kpis_and_guardrails_parse_with_defaults_and_are_hashed() {
        let plain = RunManifest::from_toml(EXAMPLE, "m.toml").unwrap();
        let m = RunManifest::from_toml(&format!("{EXAMPLE}{OVERSIGHT}"), "m.toml").unwrap();
        assert_eq!(m.harm_scenarios[0].residual_risk, "some");
        assert_eq!(m.kpis[0].target, Some(0.9));
        assert!(!m.kpis[0].higher_is_better);
        let g = &m.guardrail_metrics;
        assert_eq!(g[0].metric, GuardrailMetricKind::NegativeFeedbackRate);
        assert_eq!(g[0].on_alert, AlertAction::Pause);
        assert_eq!(g[0].minimum_reporting_devices, 10);
        assert_eq!(g[1].on_alert, AlertAction::Log);
        assert_eq!(g[1].minimum_reporting_devices, 25);
        assert!(g[1].direction.crossed(0.29, 0.3) && !g[1].direction.crossed(0.3, 0.3));
        assert_ne!(m.sha256(), plain.sha256());
        let again = RunManifest::from_toml(&m.to_toml(), "again").unwrap();
        assert_eq!(again, m);
        // A manifest without the new sections serialises (and hashes) as before.
        assert!(!plain.to_toml().contains("kpis") && !plain.to_toml().contains("guardrail"));
    }

    #[test]
    fn bad_guardrails_name_their_key() {
        for (from, to, key) in [
            (
                "threshold = 0.2",
                "threshold = 1.5",
                "guardrail_metrics[0].threshold",
            ),
            (
                "minimum_reporting_devices = 25",
                "minimum_reporting_devices = 0",
                "guardrail_metrics[1].minimum_reporting_devices",
            ),
            (
                "direction = \"below\"",
                "direction = \"above\"\nthreshold_ = 1",
                "threshold_",
            ),
            ("on_alert = \"pause\"", "on_alert = \"panic\"", "on_alert"),
            (
                "metric = \"intra_list_diversity\"",
                "metric = \"vibes\"",
                "metric",
            ),
            (
                "metric = \"intra_list_diversity\"\ndirection = \"below\"",
                "metric = \"negative_feedback_rate\"\ndirection = \"above\"",
                "guardrail_metrics[1].metric",
            ),
            ("metric = \"rmse\"", "metric = \" \"", "kpis[0].metric"),
        ] {
            let text = format!("{EXAMPLE}{}", OVERSIGHT.replace(from, to));
            assert_ne!(text, format!("{EXAMPLE}{OVERSIGHT}"), "{from} not found");
            let err = RunManifest::from_toml(&text, "m.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("m.toml"), "{to}: {err}");
        }
    }

    fn distributed(section: &str) -> String {
        EXAMPLE
            .replace(
                "privacy_mode = \"central\"",
                "privacy_mode = \"distributed\"",
            )
            .replace(
                "target_size = 4\nminimum_size = 2",
                "target_size = 50\nminimum_size = 30",
            )
            + section
    }

    const SECTION: &str = r#"
[secure_aggregation]
noise = "discrete_gaussian"
dropout_rate = 0.3
corruption_rate = 0.05
"#;

    #[test]
    fn distributed_mode_derives_threshold_scale_and_honest_devices() {
        let m = RunManifest::from_toml(&distributed(SECTION), "m.toml").unwrap();
        let plan = m.distributed_plan().unwrap();
        assert_eq!(plan.params.cohort_size, 50);
        assert!(plan.params.threshold > plan.params.degree / 2);
        assert_eq!(plan.min_contributors, plan.params.threshold.max(30));
        // m − ⌈γn⌉ − 1 honest devices besides the target.
        assert_eq!(
            plan.mechanism.honest_devices(),
            u64::from(plan.min_contributors) - 3 - 1
        );
        assert!(m.round_release().is_none(), "accounted by the mechanism");
        assert!(m.epsilon_assumption().contains("zero-out"));
        // The default scale is the largest power of two that passes the overflow check.
        let scale = plan.encoding.scale;
        assert_eq!(scale.log2().fract(), 0.0);
        let twice = distributed(&format!("{SECTION}scale = {}\n", scale * 2.0));
        let err = RunManifest::from_toml(&twice, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("secure_aggregation.scale"), "{err}");
        assert_eq!(
            RunManifest::from_toml(&m.to_toml(), "again")
                .unwrap()
                .sha256(),
            m.sha256()
        );
    }

    #[test]
    fn distributed_mode_refuses_what_it_cannot_do_naming_the_key() {
        let section = |extra: &str| format!("{SECTION}{extra}\n");
        for (text, key) in [
            (
                distributed("").replace("[secure_aggregation]", ""),
                "secure_aggregation",
            ),
            (
                distributed(&section("")).replace(
                    "kind = \"fedavg\"\nserver_learning_rate = 1.0",
                    "kind = \"median\"",
                ),
                "server_optimizer",
            ),
            (
                distributed(&section("")).replace("noise_multiplier = 1.0", "target_epsilon = 5.0"),
                "target_epsilon",
            ),
            (
                distributed(&section("")).replace(
                    "kind = \"cohort\"\ntarget_size = 50\nminimum_size = 30",
                    "kind = \"poisson\"\nrate = 0.1\npopulation = 500",
                ),
                "sampling.kind",
            ),
            (
                distributed(&section("")).replace("dropout_rate = 0.3", "dropout_rate = 0.6"),
                "secure_aggregation.dropout_rate",
            ),
            (
                distributed(&section("threshold = 2")),
                "secure_aggregation.threshold",
            ),
            (
                distributed(&section("assumed_honest_devices = 1000")),
                "secure_aggregation.assumed_honest_devices",
            ),
            (
                distributed(&section("rounding_beta = 1.5")),
                "secure_aggregation.rounding_beta",
            ),
            (
                distributed(&section("unmasking_seconds = 0")),
                "secure_aggregation.unmasking_seconds",
            ),
            (
                distributed(&section("")).replace("discrete_gaussian", "skellam"),
                "secure_aggregation.noise",
            ),
            (format!("{EXAMPLE}{SECTION}"), "secure_aggregation"),
        ] {
            let err = RunManifest::from_toml(&text, "m.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn dp_ftrl_stays_refused_in_distributed_mode() {
        let text = distributed(SECTION).replace(
            "kind = \"fedavg\"\nserver_learning_rate = 1.0",
            "kind = \"dp-ftrl\"\nserver_learning_rate = 1.0",
        ) + "[participation]\nmin_separation = 1\nmax_participations = 5\n";
        let err = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dp-ftrl is not available in distributed mode"),
            "{err}"
        );
    }

    #[test]
    fn the_distributed_example_manifest_is_valid() {
        let m = RunManifest::from_toml(
            include_str!("../../coordinator/manifests/distributed.toml"),
            "distributed.toml",
        )
        .unwrap();
        assert!(m.distributed_plan().is_some());
    }
}
