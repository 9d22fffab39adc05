//! Server optimisers: how the round's aggregate Δ becomes the next model.
//!
//! All of them treat Δ — the (weighted, possibly noised) average of the devices' model
//! deltas, i.e. *new − old*, so Δ already points downhill — as a pseudo-gradient and take one
//! step with it (Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan 2021,
//! "Adaptive Federated Optimization", Alg. 1 and 2). With server learning rate η:
//!
//! - FedAvg: x_{t+1} = x_t + η Δ_t (η = 1 is plain FedAvg, McMahan et al. 2017).
//! - FedAvgM (server momentum, Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical
//!   Data Distribution for Federated Visual Classification", §3):
//!   m_t = μ m_{t−1} + Δ_t, x_{t+1} = x_t + η m_t.
//! - FedAdagrad, FedYogi, FedAdam (Reddi et al. 2021, Alg. 2), per coordinate:
//!   m_t = β₁ m_{t−1} + (1 − β₁) Δ_t, then
//!   - FedAdagrad: v_t = v_{t−1} + Δ_t²,
//!   - FedYogi:    v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²),
//!   - FedAdam:    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²,
//!
//!   and x_{t+1} = x_t + η m_t / (√v_t + τ). As in Alg. 2 there is no bias correction, and
//!   the second moment starts at v_{−1} = τ² (the algorithm asks for v_{−1} ≥ τ²); m_{−1} = 0.
//! - Median and trimmed mean: Δ is the robust statistic of the updates, applied as FedAvg:
//!   x_{t+1} = x_t + η Δ_t.
//! - DP-FTRL (Kairouz et al. 2021): Δ_t is the difference of two consecutive noised prefix
//!   sums from tree aggregation ([`super::FtrlTree`]), then FedAvgM's step with momentum μ
//!   (μ = 0: x_{t+1} = x_0 + η·s_t/W, plain DP-FTRL).
//!
//! Moments are kept in f64; parameters are f32, updated as x ← f32(f64(x) + step).

use serde::{Deserialize, Serialize};

use super::error::{AggregationError, positive, unit_interval};
use super::{Aggregate, AggregationPrivacy};
use fedpref_privacy::Provenance;
use fedpref_privacy::tree::TreeSchedule;

/// The defaults applied to keys left out of `[server_optimizer]`, with where each comes from.
pub mod defaults {
    /// FedAvg's server learning rate: 1.0, which is plain FedAvg (McMahan et al. 2017).
    pub fn fedavg_server_learning_rate() -> f64 {
        1.0
    }
    /// FedAvgM's server learning rate: 1.0 (Hsu et al. 2019 keep η = 1 and tune μ).
    pub fn fedavgm_server_learning_rate() -> f64 {
        1.0
    }
    /// FedAvgM's momentum μ: 0.9 (Hsu et al. 2019; Reddi et al. 2021's FedAvgM baseline).
    pub fn momentum() -> f64 {
        0.9
    }
    /// The adaptive optimisers' server learning rate η: 0.01. A starting point only: Reddi et
    /// al. 2021 tune η per task (§5 and the appendix's grids), and so should a run.
    pub fn adaptive_server_learning_rate() -> f64 {
        0.01
    }
    /// β₁ = 0.9, the value Reddi et al. 2021 fix in all their experiments (§5).
    pub fn beta1() -> f64 {
        0.9
    }
    /// β₂ = 0.99, the value Reddi et al. 2021 fix in all their experiments (§5).
    pub fn beta2() -> f64 {
        0.99
    }
    /// τ = 10⁻³. Reddi et al. 2021 treat τ as a hyper-parameter and study its effect (§5);
    /// 10⁻³ is a common default of FedOpt implementations. Smaller τ is more adaptive.
    pub fn tau() -> f64 {
        1e-3
    }
    /// FedAdagrad's β₁ = 0: plain Adagrad on the pseudo-gradient (m_t = Δ_t). Alg. 2 allows
    /// momentum here too.
    pub fn adagrad_beta1() -> f64 {
        0.0
    }
    /// The robust options' server learning rate: 1.0, i.e. x ← x + Δ.
    pub fn robust_server_learning_rate() -> f64 {
        1.0
    }
    /// DP-FTRL's server learning rate: 1.0, so that without momentum the model is the
    /// initial model plus the noised prefix sum of the round averages.
    pub fn ftrl_server_learning_rate() -> f64 {
        1.0
    }
    /// DP-FTRL's momentum: 0 (plain DP-FTRL). Kairouz et al. 2021 use 0.9 in their
    /// momentum variant (DP-FTRLM).
    pub fn ftrl_momentum() -> f64 {
        0.0
    }
}

/// The server optimiser and its hyper-parameters, as in the run manifest's
/// `[server_optimizer]` table, e.g.
///
/// ```toml
/// [server_optimizer]
/// kind = "fedadam"
/// server_learning_rate = 0.01
/// beta1 = 0.9
/// beta2 = 0.99
/// tau = 0.001
/// ```
///
/// `kind` is one of `fedavg`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, `median`,
/// `trimmed-mean`, `dp-ftrl`. Left-out keys take the [`defaults`]; unknown keys are errors. See the
/// module docs for the update rules.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// Weighted federated averaging: x ← x + η Δ.
    Fedavg {
        /// η > 0 (default 1.0).
        #[serde(default = "defaults::fedavg_server_learning_rate")]
        server_learning_rate: f64,
    },
    /// Federated averaging with server momentum: m ← μ m + Δ, x ← x + η m.
    Fedavgm {
        /// η > 0 (default 1.0).
        #[serde(default = "defaults::fedavgm_server_learning_rate")]
        server_learning_rate: f64,
        /// μ ∈ [0, 1) (default 0.9).
        #[serde(default = "defaults::momentum")]
        momentum: f64,
    },
    /// Adam on the server (Reddi et al. 2021, Alg. 2).
    Fedadam {
        /// η > 0 (default 0.01).
        #[serde(default = "defaults::adaptive_server_learning_rate")]
        server_learning_rate: f64,
        /// β₁ ∈ [0, 1) (default 0.9).
        #[serde(default = "defaults::beta1")]
        beta1: f64,
        /// β₂ ∈ [0, 1) (default 0.99).
        #[serde(default = "defaults::beta2")]
        beta2: f64,
        /// τ > 0 (default 10⁻³).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
    /// Yogi on the server (Reddi et al. 2021, Alg. 2).
    Fedyogi {
        /// η > 0 (default 0.01).
        #[serde(default = "defaults::adaptive_server_learning_rate")]
        server_learning_rate: f64,
        /// β₁ ∈ [0, 1) (default 0.9).
        #[serde(default = "defaults::beta1")]
        beta1: f64,
        /// β₂ ∈ [0, 1) (default 0.99).
        #[serde(default = "defaults::beta2")]
        beta2: f64,
        /// τ > 0 (default 10⁻³).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
    /// Adagrad on the server (Reddi et al. 2021, Alg. 2).
    Fedadagrad {
        /// η > 0 (default 0.01).
        #[serde(default = "defaults::adaptive_server_learning_rate")]
        server_learning_rate: f64,
        /// β₁ ∈ [0, 1) (default 0: no momentum).
        #[serde(default = "defaults::adagrad_beta1")]
        beta1: f64,
        /// τ > 0 (default 10⁻³).
        #[serde(default = "defaults::tau")]
        tau: f64,
    },
    /// Coordinate-wise median of the updates, then x ← x + η Δ. Buffers the cohort
    /// (O(d × K) memory). Refused in central mode.
    Median {
        /// η > 0 (default 1.0).
        #[serde(default = "defaults::robust_server_learning_rate")]
        server_learning_rate: f64,
    },
    /// Coordinate-wise β-trimmed mean of the updates, then x ← x + η Δ. Buffers the cohort
    /// (O(d × K) memory). Refused in central mode.
    TrimmedMean {
        /// η > 0 (default 1.0).
        #[serde(default = "defaults::robust_server_learning_rate")]
        server_learning_rate: f64,
        /// β ∈ [0, 0.5): the fraction dropped at each end of each coordinate. Required: it
        /// must exceed the fraction of bad updates to be tolerated, which only the run's
        /// threat model can say.
        trim_fraction: f64,
    },
    /// DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private
    /// (Deep) Learning without Sampling or Shuffling", Alg. 1, with the heavy-ball momentum of
    /// its DP-FTRLM): the round sums of clipped updates are released as noised **prefix
    /// sums** by binary-tree aggregation ([`fedpref_privacy::tree::TreeAggregator`]), Δ_t is
    /// the difference of consecutive prefix sums divided by the expected cohort size, and
    /// m ← μ m + Δ, x ← x + η m. Central mode only; the run manifest must give
    /// `[participation]` limits, which the tree's accountant rests on instead of sampling.
    ///
    /// ```toml
    /// [server_optimizer]
    /// kind = "dp-ftrl"
    /// server_learning_rate = 1.0
    /// momentum = 0.9
    /// restart_every = 64     # a new tree every 64 rounds (omit for one tree)
    /// completion = true      # the tree completion trick at each restart
    /// ```
    DpFtrl {
        /// η > 0 (default 1.0).
        #[serde(default = "defaults::ftrl_server_learning_rate")]
        server_learning_rate: f64,
        /// μ ∈ [0, 1) (default 0: no momentum).
        #[serde(default = "defaults::ftrl_momentum")]
        momentum: f64,
        /// Rounds per tree; absent: one tree for the whole run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart_every: Option<u64>,
        /// Release the last round of each tree through the padded tree's root (needs
        /// `restart_every`).
        #[serde(default)]
        completion: bool,
    },
}

impl Default for ServerOptimizer {
    /// Plain FedAvg (η = 1).
    fn default() -> Self {
        Self::Fedavg {
            server_learning_rate: defaults::fedavg_server_learning_rate(),
        }
    }
}

impl ServerOptimizer {
    /// The `kind` as the manifest spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fedavg { .. } => "fedavg",
            Self::Fedavgm { .. } => "fedavgm",
            Self::Fedadam { .. } => "fedadam",
            Self::Fedyogi { .. } => "fedyogi",
            Self::Fedadagrad { .. } => "fedadagrad",
            Self::Median { .. } => "median",
            Self::TrimmedMean { .. } => "trimmed-mean",
            Self::DpFtrl { .. } => "dp-ftrl",
        }
    }

    /// The tree schedule of `dp-ftrl` (`None` for every other optimiser). Errors name the
    /// key (`restart_every = 0`, or `completion` without restarts).
    pub fn tree_schedule(&self) -> Result<Option<TreeSchedule>, AggregationError> {
        let Self::DpFtrl {
            restart_every,
            completion,
            ..
        } = *self
        else {
            return Ok(None);
        };
        match restart_every {
            None if completion => Err(AggregationError::InvalidConfig {
                key: "server_optimizer.completion",
                value: 1.0,
                reason: "tree completion needs restarts: give server_optimizer.restart_every",
            }),
            None => Ok(Some(TreeSchedule::single_tree())),
            Some(rounds) => TreeSchedule::restart_every(rounds, completion)
                .map(Some)
                .map_err(|_| AggregationError::InvalidConfig {
                    key: "server_optimizer.restart_every",
                    value: rounds as f64,
                    reason: "a tree must span at least 1 round",
                }),
        }
    }

    /// Whether this is `dp-ftrl` (noise from tree aggregation, not per round).
    pub fn is_tree(&self) -> bool {
        matches!(self, Self::DpFtrl { .. })
    }

    /// The server learning rate η.
    pub fn server_learning_rate(&self) -> f64 {
        match *self {
            Self::Fedavg {
                server_learning_rate,
            }
            | Self::Fedavgm {
                server_learning_rate,
                ..
            }
            | Self::Fedadam {
                server_learning_rate,
                ..
            }
            | Self::Fedyogi {
                server_learning_rate,
                ..
            }
            | Self::Fedadagrad {
                server_learning_rate,
                ..
            }
            | Self::Median {
                server_learning_rate,
            }
            | Self::TrimmedMean {
                server_learning_rate,
                ..
            }
            | Self::DpFtrl {
                server_learning_rate,
                ..
            } => server_learning_rate,
        }
    }

    /// Whether the optimiser buffers the cohort (median, trimmed mean) instead of streaming.
    pub fn is_robust(&self) -> bool {
        matches!(self, Self::Median { .. } | Self::TrimmedMean { .. })
    }

    /// Checks the hyper-parameters' ranges (naming the key, e.g. `server_optimizer.beta2`),
    /// the privacy parameters ([`AggregationPrivacy::validate`]), and that the optimiser is
    /// allowed in the privacy mode.
    ///
    /// The robust options are refused in central mode (and must be refused in any future
    /// distributed mode: the match below is exhaustive, so adding a mode forces the choice).
    /// Central DP calibrates its noise to the add/remove-one L2 sensitivity C of a *sum* of
    /// clipped updates; a coordinate-wise median or trimmed mean is not a sum, and its
    /// sensitivity is not covered by that analysis (nor by the accountant).
    pub fn validate(&self, privacy: &AggregationPrivacy) -> Result<(), AggregationError> {
        self.check_ranges()?;
        privacy.validate()?;
        let statistic = match self {
            Self::Median { .. } => "median",
            Self::TrimmedMean { .. } => "trimmed mean",
            Self::DpFtrl { .. } => {
                self.tree_schedule()?;
                return match privacy {
                    AggregationPrivacy::Central { .. } => Ok(()),
                    AggregationPrivacy::None | AggregationPrivacy::Local => {
                        Err(AggregationError::TreeNeedsCentral {
                            mode: privacy.name(),
                        })
                    }
                };
            }
            _ => return Ok(()),
        };
        match privacy {
            AggregationPrivacy::None | AggregationPrivacy::Local => Ok(()),
            AggregationPrivacy::Central { .. } => Err(AggregationError::RobustNotCoveredByDp {
                optimizer: self.kind(),
                statistic,
                mode: privacy.name(),
            }),
        }
    }

    fn check_ranges(&self) -> Result<(), AggregationError> {
        positive(
            "server_optimizer.server_learning_rate",
            self.server_learning_rate(),
        )?;
        match *self {
            Self::Fedavg { .. } | Self::Median { .. } => {}
            Self::Fedavgm { momentum, .. } | Self::DpFtrl { momentum, .. } => {
                unit_interval("server_optimizer.momentum", momentum)?;
            }
            Self::Fedadam {
                beta1, beta2, tau, ..
            }
            | Self::Fedyogi {
                beta1, beta2, tau, ..
            } => {
                unit_interval("server_optimizer.beta1", beta1)?;
                unit_interval("server_optimizer.beta2", beta2)?;
                positive("server_optimizer.tau", tau)?;
            }
            Self::Fedadagrad { beta1, tau, .. } => {
                unit_interval("server_optimizer.beta1", beta1)?;
                positive("server_optimizer.tau", tau)?;
            }
            Self::TrimmedMean { trim_fraction, .. } => {
                if !(0.0..0.5).contains(&trim_fraction) {
                    return Err(AggregationError::InvalidConfig {
                        key: "server_optimizer.trim_fraction",
                        value: trim_fraction,
                        reason: "must be in [0, 0.5): the fraction trimmed from each end",
                    });
                }
            }
        }
        Ok(())
    }
}

/// The server optimiser's state between rounds: its moments, per coordinate, in f64.
/// Persisted by the store (serde); [`apply`] checks that it matches the optimiser and the
/// model's dimension before using it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
pub struct ServerState {
    dimension: usize,
    steps: u64,
    pub(super) moments: Moments,
    /// dp-ftrl: the rounds each coordinator process's tree released (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tree: Option<TreeProgress>,
    /// Adaptive clipping: the current clip norm C (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clip_norm: Option<f64>,
}

/// How many rounds DP-FTRL's trees have released, per **segment**: the rounds released by
/// one coordinator process. A tree's nodes are never stored (they hold un-noised sums and
/// secret noise), so a restarted coordinator starts a new tree. The accountant charges each
/// segment as its own tree schedule and adds their ρ's (composition of zCDP): the worst
/// pattern of the whole run restricted to a segment is an allowed pattern of that segment,
/// so the sum of the segments' worst cases is an upper bound. A restart can cost privacy; it
/// never hides any.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TreeProgress {
    /// Rounds released by each finished segment, oldest first.
    pub finished_segments: Vec<u64>,
    /// Rounds released by the current segment.
    pub current_segment: u64,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub(super) enum Moments {
    /// FedAvg and the robust options keep nothing.
    Stateless,
    /// FedAvgM's velocity m.
    Momentum { velocity: Vec<f64> },
    /// First and second moments of FedAdam.
    Adam { m: Vec<f64>, v: Vec<f64> },
    /// … of FedYogi.
    Yogi { m: Vec<f64>, v: Vec<f64> },
    /// … of FedAdagrad.
    Adagrad { m: Vec<f64>, v: Vec<f64> },
}

impl Moments {
    fn name(&self) -> &'static str {
        match self {
            Self::Stateless => "no",
            Self::Momentum { .. } => "momentum",
            Self::Adam { .. } => "adam",
            Self::Yogi { .. } => "yogi",
            Self::Adagrad { .. } => "adagrad",
        }
    }
}

impl ServerState {
    /// The initial state: m = 0, and v = τ² for the adaptive optimisers (Reddi et al. 2021,
    /// Alg. 2: v_{−1} ≥ τ²).
    pub fn new(optimizer: &ServerOptimizer, dimension: usize) -> Self {
        let adaptive = |tau: f64| (vec![0.0; dimension], vec![tau * tau; dimension]);
        let moments = match *optimizer {
            ServerOptimizer::Fedavg { .. }
            | ServerOptimizer::Median { .. }
            | ServerOptimizer::TrimmedMean { .. } => Moments::Stateless,
            ServerOptimizer::Fedavgm { .. } | ServerOptimizer::DpFtrl { .. } => Moments::Momentum {
                velocity: vec![0.0; dimension],
            },
            ServerOptimizer::Fedadam { tau, .. } => {
                let (m, v) = adaptive(tau);
                Moments::Adam { m, v }
            }
            ServerOptimizer::Fedyogi { tau, .. } => {
                let (m, v) = adaptive(tau);
                Moments::Yogi { m, v }
            }
            ServerOptimizer::Fedadagrad { tau, .. } => {
                let (m, v) = adaptive(tau);
                Moments::Adagrad { m, v }
            }
        };
        Self {
            dimension,
            steps: 0,
            moments,
            tree: optimizer.is_tree().then(TreeProgress::default),
            clip_norm: None,
        }
    }

    /// dp-ftrl's segments (see [`TreeProgress`]).
    pub fn tree_progress(&self) -> Option<&TreeProgress> {
        self.tree.as_ref()
    }

    /// Replaces dp-ftrl's segments.
    pub fn set_tree_progress(&mut self, progress: Option<TreeProgress>) {
        self.tree = progress;
    }

    /// Adaptive clipping's current C, if stored.
    pub fn clip_norm(&self) -> Option<f64> {
        self.clip_norm
    }

    /// Stores adaptive clipping's current C.
    pub fn set_clip_norm(&mut self, clip_norm: Option<f64>) {
        self.clip_norm = clip_norm;
    }

    /// The model's dimension d.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The number of steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// params ← one server-optimiser step with the aggregate's Δ (Reddi et al. 2021, Alg. 2; see
/// the module docs for each rule), updating `state`.
///
/// Atomic: the step is computed for every coordinate first, and if any parameter (as f32)
/// or moment would be NaN or infinite, nothing is changed and the coordinate is named.
/// Errors also if the lengths of `params`, Δ and `state` differ, or `state` belongs to
/// another optimiser.
pub fn apply<P: Provenance>(
    optimizer: &ServerOptimizer,
    state: &mut ServerState,
    params: &mut [f32],
    aggregate: &Aggregate<P>,
) -> Result<(), AggregationError> {
    optimizer.check_ranges()?;
    let delta = aggregate.delta();
    for (what, actual) in [("params", params.len()), ("the aggregate", delta.len())] {
        if actual != state.dimension {
            return Err(AggregationError::DimensionMismatch {
                what,
                expected: state.dimension,
                actual,
            });
        }
    }
    let eta = optimizer.server_learning_rate();
    let mismatch = |needed: &'static str, found: &Moments| AggregationError::StateMismatch {
        expected: optimizer.kind(),
        needed,
        found: found.name(),
    };
    match (*optimizer, &mut state.moments) {
        (
            ServerOptimizer::Fedavg { .. }
            | ServerOptimizer::Median { .. }
            | ServerOptimizer::TrimmedMean { .. },
            Moments::Stateless,
        ) => step_atomically(params, delta, [], |x, d, []| (x + eta * d, []))?,
        (
            ServerOptimizer::Fedavgm { momentum, .. } | ServerOptimizer::DpFtrl { momentum, .. },
            Moments::Momentum { velocity },
        ) => step_atomically(params, delta, [velocity], |x, d, [m]| {
            let m = momentum * m + d;
            (x + eta * m, [m])
        })?,
        (
            ServerOptimizer::Fedadam {
                beta1, beta2, tau, ..
            },
            Moments::Adam { m, v },
        ) => step_atomically(params, delta, [m, v], |x, d, [m, v]| {
            let m = beta1 * m + (1.0 - beta1) * d;
            let v = beta2 * v + (1.0 - beta2) * d * d;
            (x + eta * m / (v.sqrt() + tau), [m, v])
        })?,
        (
            ServerOptimizer::Fedyogi {
                beta1, beta2, tau, ..
            },
            Moments::Yogi { m, v },
        ) => step_atomically(params, delta, [m, v], |x, d, [m, v]| {
            let m = beta1 * m + (1.0 - beta1) * d;
            let d2 = d * d;
            let v = v - (1.0 - beta2) * d2 * sign(v - d2);
            (x + eta * m / (v.sqrt() + tau), [m, v])
        })?,
        (ServerOptimizer::Fedadagrad { beta1, tau, .. }, Moments::Adagrad { m, v }) => {
            step_atomically(params, delta, [m, v], |x, d, [m, v]| {
                let m = beta1 * m + (1.0 - beta1) * d;
                let v = v + d * d;
                (x + eta * m / (v.sqrt() + tau), [m, v])
            })?
        }
        (ServerOptimizer::Fedavg { .. }, found)
        | (ServerOptimizer::Median { .. }, found)
        | (ServerOptimizer::TrimmedMean { .. }, found) => return Err(mismatch("no", found)),
        (ServerOptimizer::Fedavgm { .. } | ServerOptimizer::DpFtrl { .. }, found) => {
            return Err(mismatch("momentum", found));
        }
        (ServerOptimizer::Fedadam { .. }, found) => return Err(mismatch("adam", found)),
        (ServerOptimizer::Fedyogi { .. }, found) => return Err(mismatch("yogi", found)),
        (ServerOptimizer::Fedadagrad { .. }, found) => return Err(mismatch("adagrad", found)),
    }
    state.steps += 1;
    Ok(())
}

/// sign(x) ∈ {−1, 0, 1}, with sign(0) = 0 as in Yogi (f64::signum gives ±1 at ±0).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Runs `step(x, Δ, moments) -> (x', moments')` on every coordinate, first without writing
/// (to check that every x' as f32 and every moment is finite), then for real. The step is a
/// pure function, so both passes compute the same values.
fn step_atomically<const N: usize>(
    params: &mut [f32],
    delta: &[f64],
    moments: [&mut Vec<f64>; N],
    step: impl Fn(f64, f64, [f64; N]) -> (f64, [f64; N]),
) -> Result<(), AggregationError> {
    for (what, len) in moments.iter().map(|m| ("the server state", m.len())) {
        if len != params.len() {
            return Err(AggregationError::DimensionMismatch {
                what,
                expected: params.len(),
                actual: len,
            });
        }
    }
    let at = |moments: &[&mut Vec<f64>; N], i: usize| std::array::from_fn(|k| moments[k][i]);
    for (i, (&x, &d)) in params.iter().zip(delta).enumerate() {
        let (x, m) = step(f64::from(x), d, at(&moments, i));
        if !(x as f32).is_finite() {
            return Err(AggregationError::NonFiniteStep {
                index: i,
                what: "parameter",
            });
        }
        if m.iter().any(|m| !m.is_finite()) {
            return Err(AggregationError::NonFiniteStep {
                index: i,
                what: "optimiser moment",
            });
        }
    }
    let mut moments = moments;
    for (i, (x, &d)) in params.iter_mut().zip(delta).enumerate() {
        let (next, m) = step(f64::from(*x), d, at(&moments, i));
        *x = next as f32;
        for (moment, value) in moments.iter_mut().zip(m) {
            moment[i] = value;
        }
    }
    Ok(())
}
