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
//!
//! [budget]
//! epsilon = 8.0
//! delta = 1e-6
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
//! [opt_out_policy]
//! consent_model = "opt-in"
//! description = "Training is off until the user turns it on in Settings"
//! ```
//!
//! Unknown keys and out-of-range values are errors naming the file and the key.

use std::path::Path;

use fedpref_privacy::{OrderGrid, PrivacyMode, RoundRelease};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aggregation::{AggregationPrivacy, ServerOptimizer};

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
    /// Distributed DP under secure aggregation (not available yet).
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
    /// Seed for the initial model (random if absent).
    #[serde(default)]
    pub seed: Option<u64>,
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

    /// The per-round release the accountant sees (`None` in privacy mode `none`).
    pub fn round_release(&self) -> Option<RoundRelease> {
        Some(RoundRelease {
            mode: self.privacy_mode.privacy_mode()?,
            noise_multiplier: self.noise_multiplier?,
            sampling_rate: self.sampling.accounting_rate(),
        })
    }

    /// How the aggregator treats updates.
    pub fn aggregation_privacy(&self) -> AggregationPrivacy {
        match self.privacy_mode {
            ManifestPrivacyMode::None => AggregationPrivacy::None,
            ManifestPrivacyMode::Local => AggregationPrivacy::Local,
            ManifestPrivacyMode::Central | ManifestPrivacyMode::Distributed => {
                AggregationPrivacy::Central {
                    clip_norm: self.clip_norm,
                    noise_multiplier: self.noise_multiplier.unwrap_or(0.0),
                    expected_cohort_size: self.sampling.expected_cohort_size(),
                }
            }
        }
    }

    /// Shared parameters: V (items × k), item biases (items) and the global offset (1).
    pub fn dimension(&self) -> usize {
        (self.model.items * (self.model.factors + 1) + 1) as usize
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
        if self.privacy_mode == ManifestPrivacyMode::Distributed {
            return Err(bad(
                "privacy_mode",
                "\"distributed\"".into(),
                "distributed mode needs secure aggregation, which is not available yet",
            ));
        }
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
                let mode = self.privacy_mode.privacy_mode().expect("checked above");
                let q = if mode == PrivacyMode::Local {
                    1.0
                } else {
                    self.sampling.accounting_rate()
                };
                let (sigma, _) = fedpref_privacy::calibrate(
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
        let m = RunManifest::from_toml(include_str!("../manifests/example.toml"), "example.toml")
            .unwrap();
        assert!(m.noise_multiplier.unwrap() > 0.5);
        assert_eq!(m.sampling.accounting_rate(), 0.02);
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
        let spent = fedpref_privacy::epsilon_after(
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

    #[test]
    fn distributed_mode_is_refused_until_secure_aggregation_exists() {
        let text = EXAMPLE.replace(
            "privacy_mode = \"central\"",
            "privacy_mode = \"distributed\"",
        );
        let err = RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("secure aggregation"), "{err}");
    }
}
