//! The simulation driver: the coordinator's round [`Engine`], driven in-process by simulated
//! devices that train with the SDK's model code and noise with the privacy crate.
//!
//! One round, exactly as a deployment would run it, minus the sockets:
//! 1. devices check in (`Event::CheckIn`): with `--cohort-size K`, K users drawn uniformly
//!    without replacement from stream (seed, 3, round) check in and the engine's cohort
//!    sampling gives each a task (with participation limits, every user checks in, in an
//!    order shuffled by that stream, and the engine takes the first K its limits allow); with `--sampling-rate q` in modes `none`/`central`, every
//!    user checks in and the engine's own Poisson sampling selects each with probability q
//!    (its RNG is stream (seed, 5, round)); in mode `local` the accountant refuses q < 1
//!    (the coordinator sees who uploaded), so there each user checks in with probability q
//!    and every one that does is given a task;
//! 2. the selected devices train in parallel (rayon). With `--noise-path per-device`: the
//!    SDK's [`local_round`] (ridge fit of the private part, epochs of the shared update,
//!    dense update), then — in mode `local` — [`clip_l2`] and
//!    [`GaussianMechanism::release_update`] with
//!    `SimulationSampler::for_stream(seed, &[round, client])`, as a phone does. With
//!    `--noise-path aggregate` (the default): the SDK's [`local_round_sparse_with`] (the
//!    same numbers on the rated items' rows, their biases and the offset only, in working
//!    memory each worker thread reuses) clipped sparsely;
//!    in modes `none` and `local` the clipped sparse update goes to the engine un-noised, in
//!    modes `central` (and DP-FTRL) it is scattered into the dense update the engine's
//!    lattice sum needs. In mode `central` the engine clips again, sums and noises once.
//!    The first batch of candidates already trains while the engine takes the check-ins (a
//!    device's update depends on the model, its data and its own stream, not on its task);
//!    that batch is used only if its users are the first tasks and the round's C is the one
//!    it trained at, and trained again otherwise;
//! 3. the updates are handed to the engine (`Event::Update`, or `Event::SimulatedUpdate`
//!    for sparse ones) in task order, so the aggregate is the same bytes on any number of
//!    threads;
//! 4. a tick at the deadline closes the round (aggregation, server optimiser, accountant)
//!    with `SimulationSampler::for_stream(seed, &[round, u64::MAX])`: central noise, or — on
//!    the aggregate path in mode `local` — the one aggregate draw of N(0, Σᵢ wᵢ²σ²C²) per
//!    coordinate that stands in for every device's own noise (see [`NoisePath`]).

use std::path::PathBuf;
use std::time::Instant;

use fedpref_client_sdk::{
    Example, LocalTraining, MatrixFactorization, ModelError, SparseUpdate, TrainingScratch,
    local_round, local_round_sparse_with,
};
use fedpref_engine::aggregation::ServerOptimizer;
use fedpref_engine::distributed::{DistributedNoiseKind, SecureAggregationSpec};
use fedpref_engine::engine::{Action, ClipBit, Engine, Event, RunState, Task};
use fedpref_engine::ledger::AudienceEpsilon;
use fedpref_engine::manifest::{
    AdaptiveClippingSpec, BudgetAudience, BudgetSpec, ManifestPrivacyMode, ModelSpec, OptOutPolicy,
    RunManifest, SamplingSpec,
};
use fedpref_engine::model::initial_parameters;
use fedpref_privacy::tree::ParticipationLimits;
use fedpref_privacy::{Accountant, GaussianMechanism, SimulationSampler, clip_l2};
use ndarray::Array2;
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{Dataset, splitmix64, stream_rng};
use crate::feedback::{FeedbackModel, RoundFeedback, Scenario};
use crate::metrics::{Evaluation, evaluate, example_iter, examples};

/// A simulation that cannot go on, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The settings make an invalid run manifest (the message names the flag).
    #[error("{0}")]
    Settings(String),
    /// The engine refused something a simulated device did.
    #[error("round {round}: the engine refused device {device}: {message}")]
    Refused {
        /// The round.
        round: u64,
        /// The device.
        device: String,
        /// The engine's message.
        message: String,
    },
    /// The SDK refused the shared model.
    #[error("the shared model: {0}")]
    Model(#[from] ModelError),
    /// Clipping or noise failed.
    #[error("privacy: {0}")]
    Privacy(#[from] fedpref_privacy::PrivacyError),
}

/// Which devices are asked to train each round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Poisson sampling with rate q (`--sampling-rate`).
    Rate(f64),
    /// A cohort of K users drawn uniformly without replacement (`--cohort-size`).
    Cohort(u32),
}

/// How FedAvg weighs the updates of a round in runs without DP. Every DP mode weighs users
/// equally: central DP because each contribution has sensitivity C, local and distributed DP
/// because a device sends nothing unnoised about its data, so there is no example count to
/// weigh by.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum FedavgWeighting {
    /// By the device's number of local examples (the engine's weighting: each device reports
    /// its example count with its update).
    #[default]
    Examples,
    /// Every update alike (the unweighted mean of `../shared/bench/WORKLOAD.md`): each
    /// simulated device reports one example, so the engine's weights are all 1.
    Uniform,
}

impl FedavgWeighting {
    /// Its name in flags and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Examples => "examples",
            Self::Uniform => "uniform",
        }
    }
}

/// How a simulated round makes its noise (`--noise-path`).
///
/// `aggregate` (the default) computes and clips each device's update sparsely — only the
/// rows of V of the items it rated, their biases and the global offset, whose L2 norm is
/// the dense update's — and, in mode `local`, replaces every device's dense N(0, (σC)²)
/// noise by one draw of N(0, Σᵢ wᵢ² σ²C²) per coordinate per round, added by the engine's
/// aggregator. The released aggregate has exactly the same distribution, because the
/// devices' noises are independent Gaussians. `per-device` keeps every device's dense
/// noised update, as a phone makes it (the same bytes as before this option existed).
///
/// Only modes `none` and `local` (with a FedAvg-family optimiser) aggregate sparse updates;
/// mode `central` (and DP-FTRL, which is central) already noises once per round and sums on
/// the privacy crate's dense lattice, and mode `distributed` must mask and noise a dense
/// share on every device (secure aggregation reveals only the sum of those); there the
/// devices still train and clip sparsely, then hand the engine the dense update.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum NoisePath {
    /// Sparse clipped updates and one aggregate noise draw per round.
    #[default]
    Aggregate,
    /// Every device's dense noised update.
    PerDevice,
}

impl NoisePath {
    /// Its name in flags and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aggregate => "aggregate",
            Self::PerDevice => "per-device",
        }
    }
}

/// Everything a run needs, resolved from flags and the config file.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Rounds.
    pub rounds: u64,
    /// Device selection.
    pub sampling: Sampling,
    /// The privacy mode (`distributed` runs in [`crate::distributed`]).
    pub privacy_mode: ManifestPrivacyMode,
    /// σ.
    pub noise_multiplier: Option<f64>,
    /// A target ε over all rounds, from which the manifest calibrates σ.
    pub target_epsilon: Option<f64>,
    /// The accountant that calibrates σ for `target_epsilon` and computes every ε of the run
    /// (`--accountant`; the manifest's `accountant`). DP-FTRL and distributed mode fall back
    /// to RDP, and their ε say so.
    pub accountant: Accountant,
    /// δ.
    pub delta: f64,
    /// C.
    pub clip_norm: f64,
    /// Whether devices clip in mode `none` (they always do in `local` and `central`).
    pub clip_without_privacy: bool,
    /// The server optimiser.
    pub server_optimizer: ServerOptimizer,
    /// The seed of everything.
    pub seed: u64,
    /// Latent factors k.
    pub factors: usize,
    /// Local training.
    pub training: LocalTraining,
    /// Evaluate every this many rounds (0: only after the last).
    pub eval_every: u64,
    /// Compute ranking metrics (top 10) at evaluations.
    pub ranking: bool,
    /// Where outputs go.
    pub out: Option<PathBuf>,
    /// The user-feedback scenario (negative feedback and opt-outs), if modelled.
    pub scenario: Option<Scenario>,
    /// How FedAvg weighs updates (ignored in mode `central`, which weighs users equally).
    pub fedavg_weighting: FedavgWeighting,
    /// Participation limits the engine enforces (required by dp-ftrl). With a cohort, every
    /// training user then checks in each round, in a random order, and the engine gives
    /// tasks to the first K whose limits allow it (no sampling).
    pub participation: Option<ParticipationLimits>,
    /// Adaptive clipping. Mode central: devices then do not pre-clip, so the engine sees
    /// the norms it estimates the quantile of. Mode local: devices send noised clip bits
    /// (`bit_noise_std` is required).
    pub adaptive_clipping: Option<AdaptiveClippingSpec>,
    /// Mode distributed: the probability that a cohort member drops out during the secure
    /// aggregation round (at a stage drawn uniformly from the four; `--dropout`).
    pub dropout: f64,
    /// Mode distributed: the assumed fraction of corrupted devices colluding with the
    /// coordinator (`--corruption-rate`), which sizes the threshold and the honest devices
    /// the accountant counts on.
    pub corruption_rate: f64,
    /// How a round makes its noise (`--noise-path`).
    pub noise_path: NoisePath,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            rounds: 50,
            sampling: Sampling::Cohort(100),
            privacy_mode: ManifestPrivacyMode::None,
            noise_multiplier: None,
            target_epsilon: None,
            accountant: Accountant::Pld,
            delta: 1e-5,
            clip_norm: 1.0,
            clip_without_privacy: false,
            server_optimizer: ServerOptimizer::Fedavg {
                server_learning_rate: 1.0,
            },
            seed: 42,
            factors: 16,
            training: LocalTraining::default(),
            eval_every: 1,
            ranking: true,
            out: None,
            scenario: None,
            fedavg_weighting: FedavgWeighting::Examples,
            participation: None,
            adaptive_clipping: None,
            dropout: 0.0,
            corruption_rate: 0.0,
            noise_path: NoisePath::Aggregate,
        }
    }
}

impl Settings {
    /// The weighting the engine actually applies: the chosen one in mode `none`,
    /// [`FedavgWeighting::Uniform`] in every DP mode.
    pub fn effective_weighting(&self) -> FedavgWeighting {
        match self.privacy_mode {
            ManifestPrivacyMode::None => self.fedavg_weighting,
            _ => FedavgWeighting::Uniform,
        }
    }

    /// The run manifest these settings make, validated by the coordinator's own manifest
    /// code (which calibrates σ from a target ε). `users` and `items` size the population
    /// and the model.
    pub fn manifest(&self, users: usize, items: usize) -> Result<RunManifest, SimError> {
        let distributed = self.privacy_mode == ManifestPrivacyMode::Distributed;
        let sampling = match (self.sampling, self.privacy_mode) {
            // Secure aggregation unmasks no sum of fewer than m = max(t, minimum_size)
            // devices: the expected survivors at the drop-out rate, minus as many again.
            (Sampling::Cohort(k), ManifestPrivacyMode::Distributed) => {
                let n = k.min(users as u32).max(1);
                SamplingSpec::Cohort {
                    target_size: n,
                    minimum_size: (((1.0 - 2.0 * self.dropout) * f64::from(n)).ceil() as u32)
                        .clamp(1, n),
                    round_seconds: 60,
                }
            }
            (Sampling::Cohort(k), _) => SamplingSpec::Cohort {
                target_size: k.min(users as u32).max(1),
                minimum_size: 1,
                round_seconds: 60,
            },
            (Sampling::Rate(_), ManifestPrivacyMode::Local) => SamplingSpec::Cohort {
                target_size: users as u32,
                minimum_size: 1,
                round_seconds: 60,
            },
            (Sampling::Rate(q), _) => SamplingSpec::Poisson {
                rate: q,
                population: users as u64,
                round_seconds: 60,
                minimum_size: 1,
            },
        };
        let noise = self.privacy_mode != ManifestPrivacyMode::None;
        let manifest = RunManifest {
            title: "fedpref-sim".into(),
            purpose: "simulation".into(),
            owner: "fedpref-sim".into(),
            data_elements_used: vec!["ratings".into()],
            data_elements_not_used: vec![],
            privacy_mode: self.privacy_mode,
            budget: BudgetSpec {
                epsilon: self.target_epsilon.unwrap_or(1e12),
                delta: self.delta,
                // `--target-epsilon` has always been the amplified ε of a Poisson-sampled
                // central run (the simulator really samples); a coordinator's manifest binds
                // the unamplified one unless it says otherwise.
                audience: (matches!(sampling, SamplingSpec::Poisson { .. })
                    && self.privacy_mode == ManifestPrivacyMode::Central
                    && !self.server_optimizer.is_tree())
                .then_some(BudgetAudience::ObserversUnawareOfParticipation),
            },
            clip_norm: self.clip_norm,
            noise_multiplier: if noise { self.noise_multiplier } else { None },
            target_epsilon: if noise { self.target_epsilon } else { None },
            accountant: Some(self.accountant),
            rounds: self.rounds,
            sampling,
            server_optimizer: self.server_optimizer,
            model: ModelSpec {
                items: items as u64,
                factors: self.factors as u64,
                init_scale: 0.1,
                initial_offset: 3.0,
            },
            opt_out_policy: OptOutPolicy {
                consent_model: "opt-in".into(),
                description: "simulated devices".into(),
                withdrawal_effect: String::new(),
            },
            harm_scenarios: vec![],
            kpis: vec![],
            guardrail_metrics: vec![],
            seed: Some(self.seed),
            participation: self.participation,
            adaptive_clipping: self.adaptive_clipping,
            secure_aggregation: distributed.then_some(SecureAggregationSpec {
                noise: DistributedNoiseKind::DiscreteGaussian,
                dropout_rate: self.dropout,
                corruption_rate: self.corruption_rate,
                threshold: None,
                scale: None,
                rounding_beta: None,
                assumed_honest_devices: None,
                advertise_keys_seconds: 60,
                share_keys_seconds: 60,
                masked_input_seconds: 60,
                unmasking_seconds: 60,
            }),
        };
        RunManifest::from_toml(&manifest.to_toml(), "flags").map_err(|e| {
            let text = e.to_string();
            let text = text.strip_prefix("flags: ").unwrap_or(&text);
            SimError::Settings(flag_names(text))
        })
    }
}

/// Rewrites manifest keys in a message as the flags that set them.
pub(crate) fn flag_names(message: &str) -> String {
    let mut m = message.to_string();
    for (key, flag) in [
        ("budget.epsilon", "--target-epsilon"),
        ("budget.delta", "--delta"),
        ("noise_multiplier", "--noise-multiplier"),
        ("target_epsilon", "--target-epsilon"),
        ("clip_norm", "--clip-norm"),
        ("sampling.rate", "--sampling-rate"),
        ("sampling.target_size", "--cohort-size"),
        ("server_optimizer", "--server-optimizer"),
        ("participation", "--min-separation"),
        ("adaptive_clipping.bit_noise_std", "--bit-noise-std"),
        ("adaptive_clipping.target_quantile", "--target-quantile"),
        ("adaptive_clipping", "--adaptive-clipping"),
        ("secure_aggregation.dropout_rate", "--dropout"),
        ("secure_aggregation.corruption_rate", "--corruption-rate"),
        ("sampling.minimum_size", "--cohort-size"),
        ("rounds", "--rounds"),
        ("model", "--factors"),
    ] {
        if m.starts_with(key) {
            m = format!("{flag}{}", &m[key.len()..]);
            break;
        }
    }
    m
}

/// One round's record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundRecord {
    /// The round number (1-based).
    pub round: u64,
    /// Updates aggregated (0 when the round was abandoned).
    pub contributions: u64,
    /// Why the round released nothing, if it did not.
    pub abandoned: Option<String>,
    /// Cumulative ε per audience after the round, from the engine's accountant.
    pub epsilon: Vec<AudienceEpsilon>,
    /// The evaluation after the round, if one was due.
    pub evaluation: Option<Evaluation>,
    /// Negative feedback and opt-outs, where the run models them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<RoundFeedback>,
    /// Adaptive clipping: the clip norm C the next round will use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
}

/// Where the time went (nanoseconds). Fitting and privacy are summed over clients and
/// threads (CPU time); aggregation and evaluation are wall-clock time on the driving thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// The SDK's local round: ridge fit, shared-update epochs, the dense update.
    pub fit_ns: u64,
    /// Clipping, noise and the f32 encoding of the upload.
    pub privacy_ns: u64,
    /// Check-ins, handing updates to the engine, closing rounds (aggregation, optimiser,
    /// accountant).
    pub aggregation_ns: u64,
    /// Wall-clock time of the rounds (everything but evaluation).
    pub rounds_wall_ns: u64,
    /// Wall-clock time of the evaluations.
    pub evaluation_ns: u64,
}

/// Devices trained per parallel batch: bounds the updates in memory at once, and is the
/// grain of the pipeline between training and aggregation.
const BATCH: usize = 32;

/// A simulated federated run over a data set.
pub struct Simulation<'d> {
    settings: Settings,
    data: &'d Dataset,
    manifest: RunManifest,
    engine: Engine,
    now: i64,
    step: u64,
    item_ids: Vec<String>,
    /// The devices' copy of the shared model, reloaded from the engine's parameters at the
    /// start of every round (its item index is built once).
    shared: MatrixFactorization,
    feedback: Option<FeedbackModel>,
    /// Where the time went so far.
    pub timings: Timings,
    /// Updates accepted so far.
    pub client_updates: u64,
    /// Every device that checked in was refused by its participation limits, so no round
    /// can commit any more.
    exhausted: bool,
    /// The L2 norms before clipping of the updates the last round's devices trained.
    update_norms: Vec<f64>,
}

/// What a simulated device hands the engine.
enum Upload {
    /// Its dense update (noised in mode `local`): `Event::Update`.
    Dense(Vec<f32>),
    /// Its clipped, un-noised sparse update: `Event::SimulatedUpdate`.
    Sparse { indices: Vec<u32>, values: Vec<f32> },
}

struct ClientUpdate {
    upload: Upload,
    examples: u64,
    /// Adaptive clipping in local mode: the device's noised clip bit.
    clip_bit: Option<f64>,
    /// The update's L2 norm before clipping.
    norm_before_clipping: f64,
    fit_ns: u64,
    privacy_ns: u64,
}

/// A batch of tasks with their trained updates, in task order.
type TrainedBatch<'a> = (&'a [(usize, Task)], Vec<ClientUpdate>);

fn device_id(user: usize) -> String {
    format!("u{user}")
}

impl<'d> Simulation<'d> {
    /// A fresh run at the engine's version 0 (initial parameters from the coordinator's
    /// `initial_parameters` with the run's seed).
    pub fn new(settings: &Settings, data: &'d Dataset) -> Result<Self, SimError> {
        let population = data.users.iter().filter(|u| u.trains).count();
        let manifest = settings.manifest(population, data.items.len())?;
        let params = initial_parameters(&manifest.model, settings.seed);
        let item_ids: Vec<String> = data.items.iter().map(|i| i.id.clone()).collect();
        let shared = shared_model(0, &item_ids, settings.factors, &params)?;
        let engine = Engine::new("fedpref-sim", manifest.clone(), params);
        Ok(Self {
            settings: settings.clone(),
            data,
            manifest,
            engine,
            now: 1_700_000_000_000,
            step: 0,
            item_ids,
            shared,
            feedback: settings.scenario.map(|s| FeedbackModel::new(s, data)),
            timings: Timings::default(),
            client_updates: 0,
            exhausted: false,
            update_norms: vec![],
        })
    }

    /// The validated manifest (σ calibrated when a target ε was given).
    pub fn manifest(&self) -> &RunManifest {
        &self.manifest
    }

    /// The current shared model, as the SDK sees it after a download.
    pub fn model(&self) -> Result<MatrixFactorization, SimError> {
        let (version, params) = self.engine.model();
        Ok(shared_model(
            version,
            &self.item_ids,
            self.settings.factors,
            params,
        )?)
    }

    /// Cumulative ε per audience.
    pub fn spent(&self) -> Vec<AudienceEpsilon> {
        self.engine.spent()
    }

    /// The assumption the run's ε rests on, in words.
    pub fn epsilon_assumption(&self) -> String {
        self.engine.epsilon_assumption()
    }

    /// The L2 norms before clipping of the updates the last round's devices trained, in
    /// task order (what adaptive clipping's C should track).
    pub fn update_norms(&self) -> &[f64] {
        &self.update_norms
    }

    /// The round engine (read-only), e.g. for its clip norm or participation limits.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs every round, calling `progress` after each, and returns their records.
    pub fn run(
        &mut self,
        mut progress: impl FnMut(&RoundRecord),
    ) -> Result<Vec<RoundRecord>, SimError> {
        let mut records = vec![];
        // The engine opens a round on the first check-in and stops the run itself after
        // its last round; the bound only guards against a schedule in which no device
        // ever checks in.
        let limit = self.settings.rounds.saturating_mul(100).max(1_000);
        while self.engine.state() == RunState::Active && self.step < limit {
            if self
                .feedback
                .as_ref()
                .is_some_and(|f| f.everyone_opted_out())
            {
                // Nobody is left to check in: the run ends early, with fewer rounds.
                break;
            }
            let record = self.run_round()?;
            progress(&record);
            records.push(record);
            if self.exhausted {
                // No device may take part any more (see `run_round`).
                break;
            }
        }
        Ok(records)
    }

    /// Runs one round: check-ins (the first opens the engine's round), training, updates,
    /// the closing tick, and an evaluation if due. Streams are keyed by the simulation's
    /// step, which is the engine's round id whenever a device checks in.
    pub fn run_round(&mut self) -> Result<RoundRecord, SimError> {
        let start = Instant::now();
        self.step += 1;
        let round = self.step;
        let seed = self.settings.seed;
        let t = Instant::now();
        let opted_out = self.feedback.as_ref().map(|f| f.opted_out()).unwrap_or(&[]);
        let candidates = candidates_among(&self.settings, self.data, round, opted_out);
        let mut rng = stream_rng(seed, &[5, round]);
        let mut sampler = SimulationSampler::for_stream(seed, &[round, u64::MAX - 1]);
        let checked_in = candidates.len();

        // The devices train on the model they download, which check-ins do not change: load
        // it once, before them.
        let (version, params) = self.engine.model();
        self.shared.load_parameters(version, params)?;
        let bit_noise_std = self
            .manifest
            .local_clip_bits()
            .then(|| self.manifest.bit_noise_std())
            .flatten();
        let clip = match self.settings.privacy_mode {
            ManifestPrivacyMode::None if !self.settings.clip_without_privacy => None,
            // The engine clips in central mode; with adaptive clipping it must see the
            // norms before clipping.
            ManifestPrivacyMode::Central if self.settings.adaptive_clipping.is_some() => None,
            _ => Some(self.manifest.clip_norm),
        };
        // Local mode: the devices' update noise (raised to σ_Δ with adaptive clipping, whose
        // bits take the rest of the combined multiplier) at the open round's C.
        let noise_multiplier = self.manifest.task_noise_multiplier();
        let mechanism_at = |c: f64| -> Result<Option<GaussianMechanism>, SimError> {
            Ok(match self.settings.privacy_mode {
                ManifestPrivacyMode::Local => Some(GaussianMechanism::new(noise_multiplier, c)?),
                _ => None,
            })
        };
        let clip_norm_before = self.engine.clip_norm();
        let early_mechanism = mechanism_at(clip_norm_before)?;
        let training = self.settings.training;
        let data = self.data;
        let path = self.sparse_path();
        let uniform = self.settings.effective_weighting() == FedavgWeighting::Uniform;
        let model = &self.shared;
        let train = |users: &[usize],
                     mechanism: Option<&GaussianMechanism>|
         -> Result<Vec<ClientUpdate>, SimError> {
            users
                .par_iter()
                .map(|&user| {
                    let mut update = train_client(
                        model,
                        data,
                        user,
                        &training,
                        clip,
                        mechanism,
                        bit_noise_std,
                        seed,
                        round,
                        path,
                    )?;
                    if uniform {
                        // The engine weighs by the reported example count.
                        update.examples = 1;
                    }
                    Ok(update)
                })
                .collect()
        };

        // Check-ins on this thread while the workers already train the first candidates: a
        // device's update depends only on the model, its data and its own noise stream, not
        // on its task, so the result is the same as training after the check-ins. The early
        // batch is used only if those candidates are the first tasks, in order, and the
        // round's C is the one it was trained at.
        let head: Vec<usize> = candidates.iter().copied().take(BATCH).collect();
        let engine = &mut self.engine;
        let now = self.now;
        let (checked, early) = rayon::join(
            || {
                let mut tasks = Vec::with_capacity(candidates.len());
                let mut limited_devices = 0usize;
                for &user in &candidates {
                    let actions = engine.handle(
                        Event::CheckIn {
                            device: device_id(user),
                            eligible: true,
                        },
                        now,
                        &mut rng,
                        &mut sampler,
                    );
                    for a in actions {
                        match a {
                            Action::SendTask(task) => tasks.push((user, task)),
                            // Limits count committed rounds, so when every device is refused
                            // by them no round can commit and none will be allowed again: the
                            // run is over.
                            Action::ComeBackLater { reason, .. }
                                if reason.starts_with("participation limit") =>
                            {
                                limited_devices += 1;
                            }
                            _ => {}
                        }
                    }
                }
                (tasks, limited_devices)
            },
            || train(&head, early_mechanism.as_ref()),
        );
        let (tasks, limited_devices) = checked;
        self.timings.aggregation_ns += t.elapsed().as_nanos() as u64;
        if self.engine.model().0 != version {
            return Err(SimError::Settings(format!(
                "round {round}: the model changed during check-ins"
            )));
        }
        let mechanism = mechanism_at(self.engine.clip_norm())?;
        let first = tasks.len().min(BATCH);
        let early_fits = first > 0
            && self.engine.clip_norm() == clip_norm_before
            && first == head.len()
            && tasks[..first]
                .iter()
                .map(|(u, _)| *u)
                .eq(head.iter().copied());
        let early = if early_fits { Some(early?) } else { None };

        // Pipelined: while the workers train batch i + 1, this thread hands batch i to the
        // engine (in task order, so the aggregate does not depend on the thread count).
        let mut pending: Option<TrainedBatch> = None;
        self.update_norms.clear();
        let mut batches = tasks.chunks(BATCH).peekable();
        if let Some(trained) = early {
            let batch = batches.next().expect("the early batch's tasks");
            self.update_norms
                .extend(trained.iter().map(|u| u.norm_before_clipping));
            pending = Some((batch, trained));
        }
        for batch in batches {
            let users: Vec<usize> = batch.iter().map(|(u, _)| *u).collect();
            let (fed, trained) = rayon::join(
                || {
                    feed(
                        &mut self.engine,
                        &mut self.timings,
                        now,
                        &mut rng,
                        &mut sampler,
                        round,
                        pending.take(),
                    )
                },
                || train(&users, mechanism.as_ref()),
            );
            fed?;
            let trained = trained?;
            self.update_norms
                .extend(trained.iter().map(|u| u.norm_before_clipping));
            pending = Some((batch, trained));
        }
        feed(
            &mut self.engine,
            &mut self.timings,
            now,
            &mut rng,
            &mut sampler,
            round,
            pending.take(),
        )?;

        let t = Instant::now();
        let opened = self.engine.open_round().is_some();
        self.now = self.engine.next_wakeup().unwrap_or(self.now + 60_000);
        let mut sampler = SimulationSampler::for_stream(seed, &[round, u64::MAX]);
        let mut contributions = 0;
        let mut abandoned = None;
        for a in self
            .engine
            .handle(Event::Tick, self.now, &mut rng, &mut sampler)
        {
            match a {
                Action::CommitRound(outcome) => contributions = outcome.participants.len() as u64,
                Action::AbandonRound { reason, .. } => abandoned = Some(reason),
                _ => {}
            }
        }
        if !opened {
            abandoned = Some("no device checked in, so the engine opened no round".into());
        }
        self.client_updates += contributions;
        self.timings.aggregation_ns += t.elapsed().as_nanos() as u64;
        self.timings.rounds_wall_ns += start.elapsed().as_nanos() as u64;

        // The scenario: the round's devices react to the lists the downloaded model gave them.
        let t = Instant::now();
        let feedback = match self.feedback.as_mut() {
            Some(state) => {
                let users: Vec<usize> = tasks.iter().map(|(u, _)| *u).collect();
                Some(
                    state
                        .observe(
                            model,
                            self.data,
                            &self.settings.training,
                            seed,
                            round,
                            &users,
                        )
                        .0,
                )
            }
            None => None,
        };
        self.timings.evaluation_ns += t.elapsed().as_nanos() as u64;

        self.exhausted = self.settings.participation.is_some()
            && tasks.is_empty()
            && checked_in > 0
            && limited_devices == checked_in;
        let last = self.engine.state() != RunState::Active || self.exhausted;
        let every = self.settings.eval_every;
        let due = last || (every > 0 && round.is_multiple_of(every));
        let evaluation = if due {
            let t = Instant::now();
            let e = evaluate(
                &self.model()?,
                self.data,
                &self.settings.training,
                self.settings.ranking,
            );
            self.timings.evaluation_ns += t.elapsed().as_nanos() as u64;
            Some(e)
        } else {
            None
        };
        Ok(RoundRecord {
            round,
            contributions,
            abandoned,
            epsilon: self.engine.spent(),
            evaluation,
            feedback,
            clip_norm: self
                .engine
                .clip_trajectory()
                .map(|_| self.engine.clip_norm()),
        })
    }
}

/// The users that check in in `round` (in check-in order), from stream (seed, 3, round): a
/// uniform cohort with `--cohort-size K`, each user with probability q in mode `local` with
/// `--sampling-rate q`, and every user otherwise (the engine then samples). Shared by the
/// in-process and gRPC transports, so both see the very same check-ins.
pub fn candidates(settings: &Settings, data: &Dataset, round: u64) -> Vec<usize> {
    candidates_among(settings, data, round, &[])
}

/// [`candidates`] among the users who have not opted out (`opted_out[u]`; an empty slice:
/// nobody has). With nobody opted out the two are the same.
pub fn candidates_among(
    settings: &Settings,
    data: &Dataset,
    round: u64,
    opted_out: &[bool],
) -> Vec<usize> {
    let seed = settings.seed;
    let trainable: Vec<usize> = (0..data.users.len())
        .filter(|&u| data.users[u].trains && !opted_out.get(u).copied().unwrap_or(false))
        .collect();
    let users = trainable.len();
    match (settings.sampling, settings.privacy_mode) {
        (Sampling::Cohort(_), _) if settings.participation.is_some() => {
            // No sampling: everyone checks in, in a random order; the engine's cohort takes
            // the first K its participation limits allow.
            let mut r = stream_rng(seed, &[3, round]);
            let mut order = trainable;
            for i in (1..order.len()).rev() {
                order.swap(i, r.random_range(0..=i));
            }
            order
        }
        (Sampling::Cohort(k), _) => {
            let mut r = stream_rng(seed, &[3, round]);
            let k = (k as usize).min(users);
            // Floyd's algorithm: k distinct users, then shuffled into check-in order.
            let mut chosen = std::collections::HashSet::with_capacity(k);
            let mut order = Vec::with_capacity(k);
            for j in users - k..users {
                let pick = r.random_range(0..=j);
                let pick = if chosen.contains(&pick) { j } else { pick };
                chosen.insert(pick);
                order.push(pick);
            }
            for i in (1..order.len()).rev() {
                order.swap(i, r.random_range(0..=i));
            }
            order.into_iter().map(|i| trainable[i]).collect()
        }
        (Sampling::Rate(q), ManifestPrivacyMode::Local) => {
            let mut r = stream_rng(seed, &[3, round]);
            trainable
                .into_iter()
                .filter(|_| r.random::<f64>() < q)
                .collect()
        }
        (Sampling::Rate(_), _) => trainable,
    }
}

/// Hands a batch of trained updates to the engine, in task order.
fn feed(
    engine: &mut Engine,
    timings: &mut Timings,
    now: i64,
    rng: &mut Xoshiro256PlusPlus,
    sampler: &mut SimulationSampler,
    round: u64,
    batch: Option<TrainedBatch>,
) -> Result<(), SimError> {
    let Some((batch, updates)) = batch else {
        return Ok(());
    };
    let t = Instant::now();
    for ((user, task), update) in batch.iter().zip(updates) {
        timings.fit_ns += update.fit_ns;
        timings.privacy_ns += update.privacy_ns;
        let clip_bit = update.clip_bit.map(|noised_bit| ClipBit {
            clip_norm: task.clip_norm,
            noised_bit,
        });
        let event = match update.upload {
            Upload::Dense(values) => Event::Update {
                device: task.device.clone(),
                round: task.round,
                task_token: task.task_token.clone(),
                values,
                examples: update.examples,
                clip_bit,
            },
            Upload::Sparse { indices, values } => Event::SimulatedUpdate {
                device: task.device.clone(),
                round: task.round,
                task_token: task.task_token.clone(),
                indices,
                values,
                examples: update.examples,
                clip_bit,
            },
        };
        let actions = engine.handle(event, now, rng, sampler);
        for a in actions {
            if let Action::Reject { rejection, .. } = a {
                return Err(SimError::Refused {
                    round,
                    device: device_id(*user),
                    message: rejection.message,
                });
            }
        }
    }
    timings.aggregation_ns += t.elapsed().as_nanos() as u64;
    Ok(())
}

/// The SDK's model over the engine's flat f32 parameters (V, item biases, global offset).
pub fn shared_model(
    version: u64,
    item_ids: &[String],
    factors: usize,
    params: &[f32],
) -> Result<MatrixFactorization, ModelError> {
    let n = item_ids.len();
    let widen = |s: &[f32]| s.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let item_factors = Array2::from_shape_vec((n, factors), widen(&params[..n * factors]))
        .map_err(|e| ModelError {
            field: "parameters".into(),
            message: e.to_string(),
        })?;
    MatrixFactorization::new(
        version,
        item_ids.to_vec(),
        item_factors,
        widen(&params[n * factors..n * (factors + 1)]).into(),
        f64::from(params[n * (factors + 1)]),
    )
}

/// How a device's update travels in this round.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LocalPath {
    /// Today's dense path: the SDK's dense update, clipped and (mode `local`) noised
    /// densely — `--noise-path per-device`.
    PerDevice,
    /// Sparse training and clipping, handed to the engine sparse and un-noised (modes
    /// `none` and `local`; the engine's aggregator draws the aggregate noise).
    Sparse,
    /// Sparse training and clipping, handed to the engine dense (modes `central` and
    /// DP-FTRL, whose engine paths need dense updates).
    SparseThenDense,
}

impl Simulation<'_> {
    /// The path this run's devices take (see [`NoisePath`]).
    fn sparse_path(&self) -> LocalPath {
        let robust = matches!(
            self.settings.server_optimizer,
            ServerOptimizer::Median { .. } | ServerOptimizer::TrimmedMean { .. }
        );
        match (self.settings.noise_path, self.settings.privacy_mode) {
            (NoisePath::PerDevice, _) => LocalPath::PerDevice,
            (NoisePath::Aggregate, ManifestPrivacyMode::None | ManifestPrivacyMode::Local)
                if !robust =>
            {
                LocalPath::Sparse
            }
            (NoisePath::Aggregate, _) => LocalPath::SparseThenDense,
        }
    }
}

/// Clips a sparse update's values to L2 norm `c` (its norm is the dense update's, so this
/// is clipping the dense update) and narrows them to f32, as an upload carries them.
/// Returns the indices, the clipped f32 values and the norm before clipping.
fn clip_sparse(
    update: SparseUpdate,
    c: Option<f64>,
) -> Result<(Vec<u32>, Vec<f32>, f64), SimError> {
    let (values, norm_before) = match c {
        Some(c) => {
            let clipped = clip_l2(update.values, c)?;
            let norm = clipped.norm_before();
            (clipped.into_values(), norm)
        }
        None => {
            let norm = update.norm();
            (update.values, norm)
        }
    };
    Ok((
        update.indices,
        values.into_iter().map(|x| x as f32).collect(),
        norm_before,
    ))
}

thread_local! {
    /// A worker thread's examples buffer and training working memory, reused by every device
    /// it trains (the results do not depend on it).
    static DEVICE_SCRATCH: std::cell::RefCell<(Vec<Example>, TrainingScratch)> =
        std::cell::RefCell::default();
}

#[allow(clippy::too_many_arguments)]
fn train_client(
    model: &MatrixFactorization,
    data: &Dataset,
    user: usize,
    training: &LocalTraining,
    clip: Option<f64>,
    mechanism: Option<&GaussianMechanism>,
    bit_noise_std: Option<f64>,
    seed: u64,
    round: u64,
    path: LocalPath,
) -> Result<ClientUpdate, SimError> {
    let t = Instant::now();
    if path != LocalPath::PerDevice {
        // One thread's devices train one after another: their working memory is reused.
        let (update, example_count) = DEVICE_SCRATCH.with_borrow_mut(|(examples, scratch)| {
            examples.clear();
            examples.extend(example_iter(&data.users[user].train, training));
            let (_private, update) = local_round_sparse_with(model, examples, training, scratch);
            (update, examples.len() as u64)
        });
        let fit_ns = t.elapsed().as_nanos() as u64;
        let t = Instant::now();
        let dimension = update.dimension;
        // Mode local: the device's C; the engine's aggregator adds the noise.
        let c = mechanism.map(|m| m.clip_norm()).or(clip);
        let (indices, values, norm_before_clipping) = clip_sparse(update, c)?;
        let mut clip_bit = None;
        if let (Some(mechanism), Some(sigma_b)) = (mechanism, bit_noise_std) {
            let mut sampler = SimulationSampler::for_stream(seed, &[round, user as u64]);
            let bit = fedpref_privacy::adaptive_clip::local_bit_release(
                norm_before_clipping,
                mechanism.clip_norm(),
                sigma_b,
                &mut sampler,
            )?;
            clip_bit = Some(bit.values()[0] + 0.5);
        }
        let upload = if path == LocalPath::Sparse {
            Upload::Sparse { indices, values }
        } else {
            let mut dense = vec![0.0f32; dimension];
            for (&i, &v) in indices.iter().zip(&values) {
                dense[i as usize] = v;
            }
            Upload::Dense(dense)
        };
        return Ok(ClientUpdate {
            upload,
            examples: example_count,
            clip_bit,
            norm_before_clipping,
            fit_ns,
            privacy_ns: t.elapsed().as_nanos() as u64,
        });
    }
    let examples = examples(&data.users[user].train, training);
    let (_private, update) = local_round(model, &examples, training);
    let fit_ns = t.elapsed().as_nanos() as u64;
    let t = Instant::now();
    let mut clip_bit = None;
    // The norm before clipping is the clip's own (one pass over the dense update).
    let (values, norm_before_clipping): (Vec<f32>, f64) = match (clip, mechanism) {
        (_, Some(mechanism)) => {
            let clipped = clip_l2(update, mechanism.clip_norm())?;
            let norm_before_clipping = clipped.norm_before();
            let mut sampler = SimulationSampler::for_stream(seed, &[round, user as u64]);
            let released = mechanism.release_update(clipped, &mut sampler)?;
            // Adaptive clipping in local mode: the device's bit, noised as the SDK does
            // (seeded simulation noise here), 0/1 + N(0, σ_b²) on the wire.
            if let Some(sigma_b) = bit_noise_std {
                let bit = fedpref_privacy::adaptive_clip::local_bit_release(
                    norm_before_clipping,
                    mechanism.clip_norm(),
                    sigma_b,
                    &mut sampler,
                )?;
                clip_bit = Some(bit.values()[0] + 0.5);
            }
            (
                released.values().iter().map(|&x| x as f32).collect(),
                norm_before_clipping,
            )
        }
        (Some(c), None) => {
            let clipped = clip_l2(update, c)?;
            (
                clipped.values().iter().map(|&x| x as f32).collect(),
                clipped.norm_before(),
            )
        }
        (None, None) => (
            update.iter().map(|&x| x as f32).collect(),
            fedpref_privacy::l2_norm(&update),
        ),
    };
    Ok(ClientUpdate {
        upload: Upload::Dense(values),
        examples: examples.len() as u64,
        clip_bit,
        norm_before_clipping,
        fit_ns,
        privacy_ns: t.elapsed().as_nanos() as u64,
    })
}

/// A stable 64-bit digest of a record list (for quick determinism checks in logs).
pub fn digest(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(splitmix64(bytes.len() as u64), |acc, &b| {
            splitmix64(acc ^ u64::from(b))
        })
}
