//! The `fedpref-sim` command line: `run` and `bench`. `main.rs` only parses and calls
//! [`execute`].

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use fedpref_client_sdk::LocalTraining;
use fedpref_engine::aggregation::ServerOptimizer;
use fedpref_engine::manifest::{AdaptiveClippingSpec, ManifestPrivacyMode};
use fedpref_privacy::tree::ParticipationLimits;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{self, Dataset, SyntheticSpec};
use crate::feedback::Scenario;
use crate::guardrails::{Alert, Guardrails, Monitor};
use crate::progress::Progress;
use crate::report;
use crate::sim::{self, FedavgWeighting, NoisePath, RoundRecord, Sampling, Settings, Simulation};

/// Seeded federated simulations through the coordinator's engine and the SDK's training.
#[derive(Debug, Parser)]
#[command(name = "fedpref-sim", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A federated run with metrics per round (CSV and JSON under --out).
    Run(Box<RunArgs>),
    /// The standard workload of ../shared/bench/WORKLOAD.md: speed, memory, final RMSE.
    Bench(BenchArgs),
    /// Runs a grid of settings (in parallel) and writes one table.
    Sweep(SweepArgs),
    /// Writes a data set's split as `run` makes it (train.tsv and test.tsv: user, item,
    /// rating, with the data set's own ids), so that other libraries can be measured on
    /// exactly the same ratings (`simulations/baselines/surprise_baselines.py`).
    ExportSplit(ExportSplitArgs),
    /// Test RMSE against ε for modes local, central and distributed at several populations,
    /// with the no-noise and bias-only lines (CSV and plot; see `frontier.rs`).
    Frontier(Box<FrontierArgs>),
}

/// The privacy modes a frontier draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontierMode {
    /// Each device clips and noises its own update.
    Local,
    /// The coordinator clips, sums and noises once.
    Central,
    /// Each device adds a share of the noise; secure aggregation reveals only the sum.
    Distributed,
}

impl FrontierMode {
    /// Its name in flags and outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

/// `fedpref-sim frontier` flags.
#[derive(Debug, Default, clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct FrontierArgs {
    /// Data sets: synthetic population sizes and/or `movielens-1m`, comma-separated
    /// [default: 10000,100000,1000000,movielens-1m].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub populations: Option<Vec<String>>,
    /// Privacy modes [default: local,central,distributed].
    #[arg(long, value_delimiter = ',', value_enum, value_name = "LIST")]
    pub modes: Option<Vec<FrontierMode>>,
    /// Target ε values [default: 1,4,16].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub epsilons: Option<Vec<f64>>,
    /// δ of every private run [default: 1e-7].
    #[arg(long, value_name = "D")]
    pub delta: Option<f64>,
    /// Rounds of every run [default: 50].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u64>,
    /// Synthetic data: items [default: 1000].
    #[arg(long, value_name = "N")]
    pub items: Option<usize>,
    /// Synthetic data: the share of the population in each round's cohort, in (0, 1]
    /// [default: 0.01].
    #[arg(long, value_name = "Q")]
    pub cohort_share: Option<f64>,
    /// Latent factors k [default: 16].
    #[arg(long, value_name = "K")]
    pub factors: Option<usize>,
    /// The clip norm C of every run, the no-noise line's included [default: 1].
    #[arg(long, value_name = "C")]
    pub clip_norm: Option<f64>,
    /// FedAdam's server learning rate η [default: 0.03, `run`'s].
    #[arg(long, value_name = "ETA")]
    pub server_learning_rate: Option<f64>,
    /// Mode distributed runs real SecAgg+ on every device, whose cost per round grows with
    /// the cohort (n log n masks of the model's size): its points with a larger cohort are
    /// left out [default: 100].
    #[arg(long, value_name = "N")]
    pub distributed_max_cohort: Option<u64>,
    /// The directory of MovieLens 1M [default: ../shared/data/ml-1m].
    #[arg(long, value_name = "P")]
    pub path: Option<PathBuf>,
    /// Score on the validation split carved from the training ratings (for tuning); the
    /// test ratings are not loaded.
    #[arg(long)]
    pub validation: bool,
    /// A grid small enough for tests (see the module docs); explicit flags still apply.
    #[arg(long)]
    pub quick: bool,
    /// The seed of everything [default: 42].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Where the CSV, the plot and every run's metrics go [default: fedpref-sim-frontier].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Worker threads [default: all cores]; results do not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Run nothing: merge the `frontier.json` of earlier frontiers (comma-separated
    /// directories, e.g. one per data set) into one table and plot under --out.
    #[arg(long, value_delimiter = ',', value_name = "DIRS")]
    pub replot: Option<Vec<PathBuf>>,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `fedpref-sim export-split` flags.
#[derive(Debug, clap::Args)]
pub struct ExportSplitArgs {
    /// The data set.
    #[arg(long, value_enum)]
    pub dataset: DatasetKind,
    /// The directory of a MovieLens data set [default: ../shared/data/ml-100k or ml-1m].
    #[arg(long, value_name = "P")]
    pub path: Option<PathBuf>,
    /// The validation split instead: the test ratings are dropped and the latest 20 % of each
    /// user's training ratings are held out (what `run --validation` trains and scores on).
    #[arg(long)]
    pub validation: bool,
    /// Synthetic data: users [default: 1000].
    #[arg(long, value_name = "N")]
    pub users: Option<usize>,
    /// Synthetic data: items [default: 500].
    #[arg(long, value_name = "N")]
    pub items: Option<usize>,
    /// Synthetic data: the seed [default: 42].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// The directory to write train.tsv and test.tsv into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Writes the split of `export-split`; returns what to print.
pub(crate) fn export_split(args: &ExportSplitArgs) -> Result<String, CliError> {
    let plan = plan(&RunArgs {
        dataset: Some(args.dataset),
        path: args.path.clone(),
        validation: args.validation,
        users: args.users,
        items: args.items,
        seed: args.seed,
        ..RunArgs::default()
    })?;
    let data = &plan.data;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| CliError::Failed(anyhow::anyhow!("--out {}: {e}", args.out.display())))?;
    let mut written = vec![];
    for (name, test) in [("train.tsv", false), ("test.tsv", true)] {
        let mut text = String::from("user\titem\trating\n");
        for user in &data.users {
            for r in if test { &user.test } else { &user.train } {
                text += &format!(
                    "{}\t{}\t{}\n",
                    user.id, data.items[r.item as usize].id, r.value
                );
            }
        }
        let path = args.out.join(name);
        std::fs::write(&path, text)
            .map_err(|e| CliError::Failed(anyhow::anyhow!("--out: {}: {e}", path.display())))?;
        written.push(path.display().to_string());
    }
    Ok(format!(
        "{}: {} training and {} held-out ratings; wrote {}",
        data.name,
        data.train_ratings(),
        data.test_ratings(),
        written.join(", ")
    ))
}

/// Data sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The seeded synthetic generator (the default).
    Synthetic,
    /// MovieLens 100K from --path (u.data + items.tsv or u.item).
    #[value(name = "movielens-100k")]
    #[serde(rename = "movielens-100k")]
    Movielens100k,
    /// MovieLens 1M from --path (ratings.dat or ratings.tsv + movies.dat or items.tsv).
    #[value(name = "movielens-1m")]
    #[serde(rename = "movielens-1m")]
    Movielens1m,
}

/// Published and tuned settings (see `docs/personalisation.md` for everything each sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// TensorFlow Federated's federated-reconstruction tutorial on MovieLens 1M.
    #[value(name = "tff-fedrecon-movielens-1m")]
    TffFedreconMovielens1m,
    /// MovieLens 100K without DP, tuned on validation data.
    #[value(name = "movielens-100k")]
    Movielens100k,
    /// MovieLens 1M without DP, tuned on validation data.
    #[value(name = "movielens-1m")]
    Movielens1m,
    /// MovieLens 1M under user-level central DP (ε ≤ 8 at δ = 1e-6), tuned on validation data.
    #[value(name = "movielens-1m-private")]
    Movielens1mPrivate,
}

/// How simulated devices reach the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// The engine driven in-process (seeded; the same bytes for the same seed).
    #[default]
    Inprocess,
    /// A real coordinator on 127.0.0.1 with TLS, the users as real SDK clients (modes local
    /// and distributed; the noise is OS-seeded, so not the same bytes — see `grpc.rs`).
    Grpc,
}

/// `--accountant`: the privacy accountant of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccountantArg {
    /// Privacy loss distributions: the tight (ε, δ).
    #[default]
    Pld,
    /// Rényi DP.
    Rdp,
}

impl From<AccountantArg> for fedpref_privacy::Accountant {
    fn from(a: AccountantArg) -> Self {
        match a {
            AccountantArg::Pld => Self::Pld,
            AccountantArg::Rdp => Self::Rdp,
        }
    }
}

/// Privacy modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No DP (simulations only).
    None,
    /// Each device clips and noises its update.
    Local,
    /// The coordinator clips, sums and noises once.
    Central,
    /// Each device adds a share of the noise; secure aggregation reveals only the sum.
    Distributed,
}

impl Mode {
    fn manifest(self) -> ManifestPrivacyMode {
        match self {
            Self::None => ManifestPrivacyMode::None,
            Self::Local => ManifestPrivacyMode::Local,
            Self::Central => ManifestPrivacyMode::Central,
            Self::Distributed => ManifestPrivacyMode::Distributed,
        }
    }
}

/// `fedpref-sim run` flags. Every one can also be set in `--config FILE` (TOML, the same
/// names with `_` for `-`); flags win. The config file may also hold a `[scenario]` table
/// (the user-feedback scenario, [`crate::feedback::Scenario`]) and a `[guardrails]` table
/// (alert thresholds, [`crate::guardrails::Guardrails`]).
#[derive(Debug, Default, clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    /// A TOML file with any of these settings (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A preset: `movielens-100k` and `movielens-1m` (no DP), `movielens-1m-private`
    /// (user-level central DP, ε ≤ 8 at δ = 1e-6), all tuned on validation data, or
    /// `tff-fedrecon-movielens-1m` (TFF's federated-reconstruction tutorial: MovieLens 1M,
    /// 2,000 users with ≤ 300 ratings split 80/10/10 by user, 50 users per round, 20 rounds,
    /// 50 factors, no DP). MovieLens is read from --path, or ../shared/data. Other flags
    /// override what a preset sets; `docs/personalisation.md` lists it all.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// The data set [default: synthetic].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// The directory of a MovieLens data set.
    #[arg(long, value_name = "P")]
    pub path: Option<PathBuf>,
    /// Rounds [default: 50].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u64>,
    /// Poisson sampling rate q in (0, 1].
    #[arg(long, value_name = "Q", conflicts_with = "cohort_size")]
    pub sampling_rate: Option<f64>,
    /// Devices per round, drawn uniformly without replacement [default: 100].
    #[arg(long, value_name = "K")]
    pub cohort_size: Option<u32>,
    /// none | local | central | distributed [default: none].
    #[arg(long, value_enum)]
    pub privacy_mode: Option<Mode>,
    /// σ (noise std σ·C).
    #[arg(long, value_name = "S", conflicts_with = "target_epsilon")]
    pub noise_multiplier: Option<f64>,
    /// Calibrate σ so that all rounds spend at most this ε.
    #[arg(long, value_name = "E")]
    pub target_epsilon: Option<f64>,
    /// The accountant that calibrates σ for --target-epsilon and computes every ε of the run:
    /// pld (privacy loss distributions, tight) or rdp (Rényi DP) [default: pld]. DP-FTRL and
    /// --privacy-mode distributed are accounted by RDP whatever it says.
    #[arg(long, value_enum)]
    pub accountant: Option<AccountantArg>,
    /// δ [default: 1e-5].
    #[arg(long, value_name = "D")]
    pub delta: Option<f64>,
    /// The clip norm C [default: 1]; in mode none, giving it makes devices clip.
    #[arg(long, value_name = "C")]
    pub clip_norm: Option<f64>,
    /// fedavg | fedavgm | fedadam | fedyogi | fedadagrad | median | dp-ftrl (mode central,
    /// needs --min-separation) [default: fedavg].
    #[arg(long, value_name = "NAME")]
    pub server_optimizer: Option<String>,
    /// dp-ftrl: start a new tree every R rounds [default: one tree].
    #[arg(long, value_name = "R")]
    pub restart_every: Option<u64>,
    /// dp-ftrl: the tree completion trick at each restart (needs --restart-every).
    #[arg(long)]
    pub tree_completion: bool,
    /// Participation limits: a device takes part at most once every S committed rounds
    /// (required by dp-ftrl; with --cohort-size everyone then checks in and the engine takes
    /// the first K allowed).
    #[arg(long, value_name = "S")]
    pub min_separation: Option<u64>,
    /// Participation limits: at most K participations per device [default: ⌈rounds / S⌉,
    /// i.e. no limit beyond the separation].
    #[arg(long, value_name = "K", requires = "min_separation")]
    pub max_participations: Option<u64>,
    /// Adaptive clipping (modes central and local): C follows the --target-quantile of
    /// update norms, starting from --clip-norm.
    #[arg(long)]
    pub adaptive_clipping: bool,
    /// Adaptive clipping's target quantile γ in (0, 1) [default: 0.5].
    #[arg(long, value_name = "Q")]
    pub target_quantile: Option<f64>,
    /// Adaptive clipping's bit noise σ_b: on the bit sum in mode central [default: the
    /// expected cohort size / 20], on each device's bit in mode local (required there; must
    /// exceed half the noise multiplier).
    #[arg(long, value_name = "S")]
    pub bit_noise_std: Option<f64>,
    /// The server learning rate η [default: the optimiser's].
    #[arg(long, value_name = "ETA")]
    pub server_learning_rate: Option<f64>,
    /// The seed of everything [default: 42].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Where metrics go [default: fedpref-sim-out].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Latent factors k [default: 16].
    #[arg(long, value_name = "K")]
    pub factors: Option<usize>,
    /// Local epochs E of the shared update [default: 1].
    #[arg(long, value_name = "E")]
    pub local_epochs: Option<u32>,
    /// Local learning rate η of the shared update [default: 1].
    #[arg(long, value_name = "LR")]
    pub learning_rate: Option<f64>,
    /// ρ: L2 regularisation of the shared parameters, per rating [default: 0.1].
    #[arg(long, value_name = "RHO")]
    pub l2_regularization: Option<f64>,
    /// λ_u's constant part: L2 regularisation of a user's private part [default: 0].
    #[arg(long, value_name = "L")]
    pub private_l2: Option<f64>,
    /// λ_u's part per rating: λ_u = private-l2 + this × the user's ratings [default: 0.2].
    #[arg(long, value_name = "L")]
    pub private_l2_per_example: Option<f64>,
    /// β: biases (user and item) are regularised β times as much as factors [default: 0.3].
    #[arg(long, value_name = "B")]
    pub bias_l2_ratio: Option<f64>,
    /// Tune on validation data: train on the earlier 80 % of each user's training ratings
    /// and evaluate on the rest; the test ratings are not loaded into the run at all.
    #[arg(long)]
    pub validation: bool,
    /// Evaluate every N rounds; 0: only after the last [default: 1].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Synthetic data: users [default: 1000].
    #[arg(long, value_name = "N")]
    pub users: Option<usize>,
    /// Synthetic data: items [default: 500].
    #[arg(long, value_name = "N")]
    pub items: Option<usize>,
    /// Worker threads [default: all cores]; results do not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Train the same model on all data in one place (the baseline), no privacy.
    #[arg(long)]
    pub centralised: bool,
    /// inprocess | grpc (a real coordinator on loopback with TLS, the users as SDK clients;
    /// modes local and distributed) [default: inprocess].
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Print one summary object at the end.
    #[arg(long)]
    pub json: bool,
    /// No progress bar, no per-round lines.
    #[arg(long)]
    pub quiet: bool,
    /// Model users' negative feedback and opt-outs (the `[scenario]` table of --config sets
    /// its parameters; this flag turns it on with the defaults).
    #[arg(long)]
    pub user_feedback: bool,
    /// How FedAvg weighs updates in modes none/local: `examples` (by each device's example
    /// count, the engine's default) or `uniform` (every update alike); mode central always
    /// weighs users equally [default: examples].
    #[arg(long, value_enum, value_name = "W")]
    pub fedavg_weighting: Option<FedavgWeighting>,
    /// Mode distributed: the probability in [0, 0.5) that a cohort member drops out of the
    /// secure-aggregation round, at a stage drawn uniformly from the four (advertise keys,
    /// share keys, masked input, unmasking) [default: 0].
    #[arg(long, value_name = "RATE")]
    pub dropout: Option<f64>,
    /// Mode distributed: the assumed fraction in [0, 0.5) of devices colluding with the
    /// coordinator; it raises the threshold and lowers the honest devices the accountant
    /// counts on [default: 0].
    #[arg(long, value_name = "G")]
    pub corruption_rate: Option<f64>,
    /// How a round makes its noise: `aggregate` (sparse clipped updates, one aggregate noise
    /// draw per round; the same distribution) or `per-device` (every device's dense noised
    /// update, as a phone makes it) [default: aggregate]. See docs/performance.md.
    #[arg(long, value_name = "PATH")]
    pub noise_path: Option<NoisePath>,
}

/// `--config FILE`: the flags' settings in TOML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dataset: Option<DatasetKind>,
    path: Option<PathBuf>,
    rounds: Option<u64>,
    sampling_rate: Option<f64>,
    cohort_size: Option<u32>,
    privacy_mode: Option<Mode>,
    noise_multiplier: Option<f64>,
    target_epsilon: Option<f64>,
    accountant: Option<AccountantArg>,
    delta: Option<f64>,
    clip_norm: Option<f64>,
    server_optimizer: Option<toml::Value>,
    server_learning_rate: Option<f64>,
    restart_every: Option<u64>,
    tree_completion: Option<bool>,
    min_separation: Option<u64>,
    max_participations: Option<u64>,
    adaptive_clipping: Option<bool>,
    target_quantile: Option<f64>,
    bit_noise_std: Option<f64>,
    seed: Option<u64>,
    out: Option<PathBuf>,
    factors: Option<usize>,
    local_epochs: Option<u32>,
    learning_rate: Option<f64>,
    l2_regularization: Option<f64>,
    private_l2: Option<f64>,
    private_l2_per_example: Option<f64>,
    bias_l2_ratio: Option<f64>,
    validation: Option<bool>,
    eval_every: Option<u64>,
    users: Option<usize>,
    items: Option<usize>,
    transport: Option<Transport>,
    user_feedback: Option<bool>,
    fedavg_weighting: Option<FedavgWeighting>,
    dropout: Option<f64>,
    corruption_rate: Option<f64>,
    noise_path: Option<NoisePath>,
    scenario: Option<Scenario>,
    guardrails: Option<Guardrails>,
}

/// `fedpref-sim bench` flags; defaults are the workload's.
#[derive(Debug, clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    /// Users U.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Items I.
    #[arg(long, default_value_t = 1000)]
    pub items: usize,
    /// Ratings per user n.
    #[arg(long, default_value_t = 50)]
    pub ratings_per_user: usize,
    /// Latent factors k.
    #[arg(long, default_value_t = 16)]
    pub factors: usize,
    /// Clients per round m.
    #[arg(long, default_value_t = 100)]
    pub clients_per_round: u32,
    /// Rounds R.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// σ of the local noise; 0 runs without noise (clipping still applies).
    #[arg(long, default_value_t = 1.0)]
    pub noise_multiplier: f64,
    /// The clip norm C.
    #[arg(long, default_value_t = 1.0)]
    pub clip_norm: f64,
    /// The seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// How a round makes its noise: `aggregate` or `per-device` (see `run --noise-path`).
    #[arg(long, value_name = "PATH", default_value = "aggregate")]
    pub noise_path: NoisePath,
    /// Run the training loop N times in this process, each from a fresh coordinator engine
    /// with the same seed (the same work and result), and report the fastest — as the NumPy
    /// reference's `--repeat` does.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `fedpref-sim sweep` flags.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// The grid: a TOML file with `[base]` (any `run` setting, for every run) and `[grid]`
    /// (a list of values per setting; every combination runs).
    #[arg(long, value_name = "FILE")]
    pub grid: PathBuf,
    /// Where the table and each run's metrics go [default: fedpref-sim-sweep].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Worker threads [default: all cores]; results do not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Print the table as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A command-line failure: usage errors (exit code 2) name the flag; others exit with 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag or config value is wrong.
    #[error("{0}")]
    Usage(String),
    /// Anything else (data, IO, the run).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
        }
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

fn positive(flag: &str, v: Option<f64>) -> Result<(), CliError> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => {
            Err(usage(format!("{flag} {x}: must be a finite number > 0")))
        }
        _ => Ok(()),
    }
}

/// Everything `run` resolved: the data set, the settings, and the output choices.
pub struct RunPlan {
    /// The data set.
    pub data: Dataset,
    /// The settings.
    pub settings: Settings,
    /// Where files go.
    pub out: PathBuf,
    /// The settings as JSON, for `metrics.json`.
    pub settings_json: Value,
    /// How devices reach the engine.
    pub transport: Transport,
    /// Alert thresholds, if configured.
    pub guardrails: Option<Guardrails>,
}

fn server_optimizer(
    name: Option<Value>,
    lr: Option<f64>,
    default: &Defaults,
) -> Result<ServerOptimizer, CliError> {
    let mut v = match name {
        None => {
            let mut v = json!({"kind": default.server_optimizer});
            if let Some(lr) = default.server_learning_rate {
                v["server_learning_rate"] = json!(lr);
            }
            for &(key, value) in default.server_optimizer_settings {
                v[key] = json!(value);
            }
            v
        }
        Some(Value::String(s)) => json!({ "kind": s }),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(usage(format!(
                "--server-optimizer {other}: must be a name or a table"
            )));
        }
    };
    if let Some(lr) = lr {
        v["server_learning_rate"] = json!(lr);
    }
    let kind = v["kind"].as_str().unwrap_or("").to_string();
    serde_json::from_value(v).map_err(|e| {
        usage(format!(
            "--server-optimizer {kind}: {e} (one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median; trimmed-mean needs a [server_optimizer] table with beta in --config)"
        ))
    })
}

/// What a run uses for every setting that neither a flag nor the config file gives: the
/// command line's defaults, or a preset's.
#[derive(Clone, Debug)]
struct Defaults {
    dataset: DatasetKind,
    rounds: u64,
    /// Devices per round; `u32::MAX`: every training user.
    cohort_size: u32,
    factors: usize,
    training: LocalTraining,
    server_optimizer: &'static str,
    server_learning_rate: Option<f64>,
    /// The optimiser's other keys (as in a `[server_optimizer]` table), when no
    /// `--server-optimizer` or table replaces it.
    server_optimizer_settings: &'static [(&'static str, f64)],
    fedavg_weighting: Option<FedavgWeighting>,
    eval_every: u64,
    privacy_mode: Mode,
    target_epsilon: Option<f64>,
    delta: f64,
    clip_norm: Option<f64>,
}

/// The local training every run uses unless told otherwise: weighted-λ regularisation and one
/// full gradient step (η = 1), so that the server optimiser sets the step size (tuned on
/// MovieLens 100K's validation split; `docs/personalisation.md`).
pub fn tuned_local_training() -> LocalTraining {
    LocalTraining {
        private_l2: 0.0,
        private_l2_per_example: 0.2,
        bias_l2_ratio: 0.3,
        l2_regularization: 0.1,
        learning_rate: 1.0,
        epochs: 1,
        ..LocalTraining::default()
    }
}

impl Defaults {
    fn of(preset: Option<Preset>) -> Self {
        let plain = Self {
            dataset: DatasetKind::Synthetic,
            rounds: 50,
            cohort_size: 100,
            factors: 16,
            training: tuned_local_training(),
            server_optimizer: "fedadam",
            server_learning_rate: Some(0.03),
            server_optimizer_settings: &[],
            fedavg_weighting: Some(FedavgWeighting::Uniform),
            eval_every: 1,
            privacy_mode: Mode::None,
            target_epsilon: None,
            delta: 1e-5,
            clip_norm: None,
        };
        match preset {
            None => plain,
            // The tutorial's protocol with the workload's local training and plain FedAvg,
            // as first published beside it.
            Some(Preset::TffFedreconMovielens1m) => Self {
                dataset: DatasetKind::Movielens1m,
                rounds: 20,
                cohort_size: 50,
                factors: 50,
                training: LocalTraining::default(),
                server_optimizer: "fedavg",
                server_learning_rate: None,
                fedavg_weighting: None,
                ..plain
            },
            Some(Preset::Movielens100k) => Self {
                dataset: DatasetKind::Movielens100k,
                rounds: 100,
                cohort_size: u32::MAX,
                factors: 32,
                server_learning_rate: Some(0.01),
                eval_every: 10,
                ..plain
            },
            // Tuned on MovieLens 1M's own validation split: a larger data set takes more
            // factors and less regularisation than MovieLens 100K.
            Some(Preset::Movielens1m) => Self {
                dataset: DatasetKind::Movielens1m,
                rounds: 100,
                cohort_size: u32::MAX,
                factors: 64,
                training: LocalTraining {
                    private_l2_per_example: 0.1,
                    l2_regularization: 0.08,
                    ..tuned_local_training()
                },
                server_learning_rate: Some(0.03),
                eval_every: 10,
                ..plain
            },
            // Under DP fewer factors (the noise goes on every shared coordinate), a
            // tighter clip, and FedAdam without momentum and with a smaller τ did better on
            // validation data (docs/personalisation.md).
            Some(Preset::Movielens1mPrivate) => Self {
                dataset: DatasetKind::Movielens1m,
                rounds: 80,
                cohort_size: u32::MAX,
                factors: 4,
                server_learning_rate: Some(0.05),
                server_optimizer_settings: &[("beta1", 0.0), ("tau", 3e-4)],
                eval_every: 10,
                privacy_mode: Mode::Central,
                target_epsilon: Some(8.0),
                delta: 1e-6,
                clip_norm: Some(0.7),
                ..plain
            },
        }
    }
}

/// The directory a MovieLens data set is read from without `--path`: `../shared/data/<dir>`
/// when it exists there (where the project's checkout keeps it).
fn default_data_path(dataset: DatasetKind) -> Option<PathBuf> {
    let dir = match dataset {
        DatasetKind::Movielens100k => "ml-100k",
        DatasetKind::Movielens1m => "ml-1m",
        DatasetKind::Synthetic => return None,
    };
    let path = Path::new("../shared/data").join(dir);
    path.is_dir().then_some(path)
}

/// Resolves `run`'s flags and config file into a plan, loading the data set.
pub fn plan(args: &RunArgs) -> Result<RunPlan, CliError> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
            toml::from_str::<FileConfig>(&text).map_err(|e| {
                usage(format!(
                    "--config {}: {}",
                    path.display(),
                    e.to_string().trim_end()
                ))
            })?
        }
        None => FileConfig::default(),
    };
    plan_with(args, file)
}

/// Resolves a plan from a TOML table of `run` settings (as in `--config`); `source` names
/// the table in errors.
pub fn plan_from_table(table: toml::Table, source: &str) -> Result<RunPlan, CliError> {
    let file: FileConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| usage(format!("{source}: {}", e.to_string().trim_end())))?;
    plan_with(&RunArgs::default(), file)
}

fn plan_with(args: &RunArgs, file: FileConfig) -> Result<RunPlan, CliError> {
    let tff = args.preset == Some(Preset::TffFedreconMovielens1m);
    let defaults = Defaults::of(args.preset);
    let dataset = args.dataset.or(file.dataset).unwrap_or(defaults.dataset);
    let rounds = args.rounds.or(file.rounds).unwrap_or(defaults.rounds);
    if rounds == 0 {
        return Err(usage("--rounds 0: must be at least 1"));
    }
    let sampling = match (
        args.sampling_rate,
        args.cohort_size,
        file.sampling_rate,
        file.cohort_size,
    ) {
        (Some(q), _, _, _) => Sampling::Rate(q),
        (None, Some(k), _, _) => Sampling::Cohort(k),
        (None, None, Some(_), Some(_)) => {
            return Err(usage(
                "--config: give sampling_rate or cohort_size, not both",
            ));
        }
        (None, None, Some(q), None) => Sampling::Rate(q),
        (None, None, None, Some(k)) => Sampling::Cohort(k),
        (None, None, None, None) => Sampling::Cohort(defaults.cohort_size),
    };
    match sampling {
        Sampling::Rate(q) if !(q > 0.0 && q <= 1.0) => {
            return Err(usage(format!("--sampling-rate {q}: must be in (0, 1]")));
        }
        Sampling::Cohort(0) => return Err(usage("--cohort-size 0: must be at least 1")),
        _ => {}
    }
    let mode = args
        .privacy_mode
        .or(file.privacy_mode)
        .unwrap_or(defaults.privacy_mode);
    if args.centralised && mode != Mode::None {
        return Err(usage(
            "--centralised trains without privacy (the baseline): drop --privacy-mode",
        ));
    }
    let dropout = args.dropout.or(file.dropout);
    let corruption_rate = args.corruption_rate.or(file.corruption_rate);
    if mode != Mode::Distributed && (dropout.is_some() || corruption_rate.is_some()) {
        return Err(usage(
            "--dropout and --corruption-rate describe the secure-aggregation round: they need --privacy-mode distributed",
        ));
    }
    let (noise_multiplier, target_epsilon) = match (args.noise_multiplier, args.target_epsilon) {
        (None, None) => match (file.noise_multiplier, file.target_epsilon) {
            (None, None) if mode == defaults.privacy_mode => (None, defaults.target_epsilon),
            from_file => from_file,
        },
        flags => flags,
    };
    if noise_multiplier.is_some() && target_epsilon.is_some() {
        return Err(usage(
            "--noise-multiplier and --target-epsilon: give one, not both",
        ));
    }
    positive("--noise-multiplier", noise_multiplier)?;
    positive("--target-epsilon", target_epsilon)?;
    let delta = args.delta.or(file.delta).unwrap_or(defaults.delta);
    if !(delta > 0.0 && delta < 1.0) {
        return Err(usage(format!("--delta {delta}: must be in (0, 1)")));
    }
    if mode != Mode::None && noise_multiplier.is_none() && target_epsilon.is_none() {
        return Err(usage(format!(
            "--privacy-mode {}: give --noise-multiplier or --target-epsilon",
            mode.to_possible_value()
                .expect("no skipped values")
                .get_name()
        )));
    }
    if mode == Mode::None && (noise_multiplier.is_some() || target_epsilon.is_some()) {
        return Err(usage(
            "--noise-multiplier/--target-epsilon need --privacy-mode local or central",
        ));
    }
    let clip = args
        .clip_norm
        .or(file.clip_norm)
        .or(defaults.clip_norm.filter(|_| mode != Mode::None));
    positive("--clip-norm", clip)?;
    let mut optimizer = server_optimizer(
        args.server_optimizer.clone().map(Value::String).or(file
            .server_optimizer
            .map(|v| serde_json::to_value(v).expect("TOML is JSON-representable"))),
        args.server_learning_rate.or(file.server_learning_rate),
        &defaults,
    )?;
    let restart = args.restart_every.or(file.restart_every);
    let completion = args.tree_completion || file.tree_completion == Some(true);
    match &mut optimizer {
        ServerOptimizer::DpFtrl {
            restart_every,
            completion: c,
            ..
        } => {
            if restart.is_some() {
                *restart_every = restart;
            }
            *c |= completion;
        }
        _ if restart.is_some() || completion => {
            return Err(usage(
                "--restart-every/--tree-completion need --server-optimizer dp-ftrl",
            ));
        }
        _ => {}
    }
    let min_separation = args.min_separation.or(file.min_separation);
    let max_participations = args.max_participations.or(file.max_participations);
    let participation = match (min_separation, max_participations) {
        (None, None) => None,
        (None, Some(_)) => return Err(usage("--max-participations needs --min-separation")),
        (Some(s), k) => Some(
            ParticipationLimits::new(s, k.unwrap_or_else(|| rounds.div_ceil(s.max(1)).max(1)))
                .map_err(|e| usage(format!("--min-separation/--max-participations: {e}")))?,
        ),
    };
    let adaptive = args.adaptive_clipping || file.adaptive_clipping == Some(true);
    let target_quantile = args.target_quantile.or(file.target_quantile);
    if target_quantile.is_some() && !adaptive {
        return Err(usage("--target-quantile needs --adaptive-clipping"));
    }
    let bit_noise_std = args.bit_noise_std.or(file.bit_noise_std);
    if bit_noise_std.is_some() && !adaptive {
        return Err(usage("--bit-noise-std needs --adaptive-clipping"));
    }
    if adaptive && mode == Mode::Local && bit_noise_std.is_none() {
        return Err(usage(
            "--adaptive-clipping with --privacy-mode local needs --bit-noise-std S (the noise each device adds to its clip bit; more than half the noise multiplier)",
        ));
    }
    let adaptive_clipping = adaptive.then(|| AdaptiveClippingSpec {
        target_quantile: target_quantile.unwrap_or(0.5),
        learning_rate: 0.2,
        bit_noise_std,
        min_clip_norm: None,
        max_clip_norm: None,
    });
    let factors = args.factors.or(file.factors).unwrap_or(defaults.factors);
    if factors == 0 || factors > 1024 {
        return Err(usage(format!("--factors {factors}: must be in [1, 1024]")));
    }
    let mut training = defaults.training;
    if let Some(e) = args.local_epochs.or(file.local_epochs) {
        training.epochs = e;
    }
    if let Some(lr) = args.learning_rate.or(file.learning_rate) {
        training.learning_rate = lr;
    }
    if let Some(rho) = args.l2_regularization.or(file.l2_regularization) {
        training.l2_regularization = rho;
    }
    if let Some(l) = args.private_l2.or(file.private_l2) {
        training.private_l2 = l;
    }
    if let Some(l) = args.private_l2_per_example.or(file.private_l2_per_example) {
        training.private_l2_per_example = l;
    }
    if let Some(b) = args.bias_l2_ratio.or(file.bias_l2_ratio) {
        training.bias_l2_ratio = b;
    }
    training.validate().map_err(|e| {
        usage(match e.field.as_str() {
            "epochs" => format!("--local-epochs: {}", e.message),
            "learning_rate" => format!("--learning-rate: {}", e.message),
            "l2_regularization" => format!("--l2-regularization: {}", e.message),
            "private_l2" => format!("--private-l2: {}", e.message),
            "private_l2_per_example" => format!("--private-l2-per-example: {}", e.message),
            "bias_l2_ratio" => format!("--bias-l2-ratio: {}", e.message),
            _ => e.to_string(),
        })
    })?;
    let seed = args.seed.or(file.seed).unwrap_or(42);
    let path = args
        .path
        .clone()
        .or(file.path)
        .or_else(|| default_data_path(dataset));
    let data = match dataset {
        DatasetKind::Synthetic => {
            let spec = SyntheticSpec {
                users: args.users.or(file.users).unwrap_or(1_000),
                items: args.items.or(file.items).unwrap_or(500),
                seed,
                ..SyntheticSpec::default()
            };
            data::synthetic(&spec).map_err(|e| usage(format!("--users/--items: {e}")))?
        }
        DatasetKind::Movielens100k | DatasetKind::Movielens1m => {
            let name = dataset
                .to_possible_value()
                .expect("named")
                .get_name()
                .to_string();
            let path = path.ok_or_else(|| {
                usage(format!(
                    "--dataset {name} needs --path DIR (the directory holding its files; a copy may be in ../shared/data)"
                ))
            })?;
            let loaded = if dataset == DatasetKind::Movielens100k {
                data::movielens_100k(&path)
            } else {
                data::movielens_1m(&path)
            };
            loaded.map_err(|e| CliError::Failed(anyhow::anyhow!("--path: {e}")))?
        }
    };
    let data = if tff {
        if dataset != DatasetKind::Movielens1m {
            return Err(usage(
                "--preset tff-fedrecon-movielens-1m needs --dataset movielens-1m",
            ));
        }
        data::tff_fedrecon(data, seed)
            .map_err(|e| CliError::Failed(anyhow::anyhow!("--preset: {e}")))?
    } else {
        data
    };
    let validation = args.validation || file.validation == Some(true);
    let data = if validation {
        data.validation_split()
            .map_err(|e| CliError::Failed(anyhow::anyhow!("--validation: {e}")))?
    } else {
        data
    };
    let scenario = match (
        file.scenario,
        args.user_feedback || file.user_feedback == Some(true),
    ) {
        (Some(s), _) => Some(s),
        (None, true) => Some(Scenario::default()),
        (None, false) => None,
    };
    if let Some(s) = &scenario {
        s.validate().map_err(usage)?;
        if args.centralised {
            return Err(usage(
                "--centralised has no devices, so no user feedback: drop --user-feedback or the [scenario] table",
            ));
        }
    }
    if let Some(g) = &file.guardrails {
        g.validate().map_err(usage)?;
    }
    let fedavg_weighting = args.fedavg_weighting.or(file.fedavg_weighting);
    let transport = args.transport.or(file.transport).unwrap_or_default();
    if mode != Mode::None && fedavg_weighting == Some(FedavgWeighting::Examples) {
        return Err(usage(
            "--fedavg-weighting examples: every DP mode weighs users equally (a device sends no example count, and in central mode each contribution has sensitivity C); drop the flag or use uniform",
        ));
    }
    // Over gRPC a device sends no example count: the coordinator weighs every update alike.
    if transport == Transport::Grpc && fedavg_weighting == Some(FedavgWeighting::Examples) {
        return Err(usage(
            "--transport grpc and --fedavg-weighting examples: an SDK device sends no example count, so the coordinator weighs every update equally; drop one",
        ));
    }
    let noise_path = args.noise_path.or(file.noise_path);
    if transport == Transport::Grpc && noise_path == Some(NoisePath::Aggregate) {
        return Err(usage(
            "--transport grpc and --noise-path aggregate: over gRPC every device is the SDK, which noises its own dense update; drop --noise-path",
        ));
    }
    let fedavg_weighting = match transport {
        Transport::Grpc => Some(FedavgWeighting::Uniform),
        Transport::Inprocess => fedavg_weighting.or(defaults.fedavg_weighting),
    };
    let settings = Settings {
        rounds,
        sampling,
        privacy_mode: mode.manifest(),
        noise_multiplier,
        target_epsilon,
        accountant: args
            .accountant
            .or(file.accountant)
            .unwrap_or_default()
            .into(),
        delta,
        clip_norm: clip.unwrap_or(1.0),
        clip_without_privacy: clip.is_some(),
        server_optimizer: optimizer,
        seed,
        factors,
        training,
        eval_every: args
            .eval_every
            .or(file.eval_every)
            .unwrap_or(defaults.eval_every),
        ranking: true,
        out: None,
        scenario,
        fedavg_weighting: fedavg_weighting.unwrap_or_default(),
        participation,
        adaptive_clipping,
        dropout: dropout.unwrap_or(0.0),
        corruption_rate: corruption_rate.unwrap_or(0.0),
        noise_path: match transport {
            Transport::Grpc => NoisePath::PerDevice,
            Transport::Inprocess => noise_path.unwrap_or_default(),
        },
    };
    if mode == Mode::Distributed {
        crate::distributed::check(&settings).map_err(|e| usage(e.to_string()))?;
    }
    let out = args
        .out
        .clone()
        .or(file.out)
        .unwrap_or_else(|| PathBuf::from("fedpref-sim-out"));
    let mut settings_json = json!({
        "dataset": data.name,
        "rounds": rounds,
        "sampling": sampling,
        "privacy_mode": settings.privacy_mode.as_str(),
        "noise_multiplier": noise_multiplier,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "clip_norm": settings.clip_norm,
        "server_optimizer": optimizer,
        "seed": seed,
        "factors": factors,
        "local_epochs": training.epochs,
        "learning_rate": training.learning_rate,
        "l2_regularization": training.l2_regularization,
        "private_l2": training.private_l2,
        "private_l2_per_example": training.private_l2_per_example,
        "bias_l2_ratio": training.bias_l2_ratio,
        "validation": validation,
        "centralised": args.centralised,
        // The centralised baseline aggregates nothing.
        "fedavg_weighting": (!args.centralised).then(|| settings.effective_weighting().as_str()),
    });
    // Only runs that set them carry these keys, so other runs' files keep their bytes.
    if settings.privacy_mode != ManifestPrivacyMode::None {
        // The accountant asked for; the summary's `epsilon_accountant` names the one that
        // computed the ε (RDP for dp-ftrl and distributed mode).
        settings_json["accountant"] = json!(settings.accountant.as_str());
    }
    if let Some(s) = &scenario {
        settings_json["scenario"] = json!(s);
    }
    if let Some(g) = &file.guardrails {
        settings_json["guardrails"] = json!(g);
    }
    if let Some(p) = &participation {
        settings_json["participation"] = json!(p);
    }
    if let Some(a) = &adaptive_clipping {
        settings_json["adaptive_clipping"] = json!(a);
    }
    // Files without the key were made by the per-device path, which keeps their bytes.
    if settings.noise_path != NoisePath::PerDevice && !args.centralised {
        settings_json["noise_path"] = json!(settings.noise_path.as_str());
    }
    if mode == Mode::Distributed {
        settings_json["dropout"] = json!(settings.dropout);
        settings_json["corruption_rate"] = json!(settings.corruption_rate);
    }
    if transport == Transport::Grpc {
        if args.centralised {
            return Err(usage(
                "--transport grpc and --centralised: the centralised baseline has no devices to connect; drop one",
            ));
        }
        #[cfg(feature = "grpc")]
        crate::grpc::check(&settings).map_err(|e| usage(e.to_string()))?;
        #[cfg(not(feature = "grpc"))]
        return Err(usage(
            "--transport grpc: this fedpref-sim was built without the `grpc` feature",
        ));
    }
    Ok(RunPlan {
        data,
        settings,
        out,
        settings_json,
        transport,
        guardrails: file.guardrails,
    })
}

pub(crate) fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, CliError> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(usage("--threads 0: must be at least 1")),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| CliError::Failed(e.into()))?;
            Ok(pool.install(f))
        }
    }
}

/// The outcome of `run`: the records, the summary and the files written.
pub struct RunOutcome {
    /// Per-round records.
    pub records: Vec<RoundRecord>,
    /// The summary object.
    pub summary: Value,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The validated σ, if any.
    pub noise_multiplier: Option<f64>,
    /// The guardrail alerts, in round order (empty without `[guardrails]`).
    pub alerts: Vec<Alert>,
}

/// The warning `run` gives before training when the noise would swamp the signal
/// ([`fedpref_engine::manifest::RunManifest::noise_warning`]).
pub fn noise_warning(settings: &Settings, data: &Dataset) -> Option<String> {
    let population = data.users.iter().filter(|u| u.trains).count();
    settings
        .manifest(population, data.items.len())
        .ok()?
        .noise_warning()
}

/// What a run gives `run_plan`: its records, client updates, timings and σ.
type RunParts = (Vec<RoundRecord>, u64, sim::Timings, Option<f64>);

/// The run through a real coordinator and SDK devices over loopback gRPC, and its ε
/// statement's assumption.
#[cfg(feature = "grpc")]
fn grpc_run(
    plan: &RunPlan,
    bar: &dyn Progress,
    watch: &mut impl FnMut(&RoundRecord),
) -> Result<(RunParts, String), CliError> {
    let run = crate::grpc::run(&plan.settings, &plan.data, |r| {
        watch(r);
        bar.position(r.round, r.evaluation.as_ref().map(|e| e.rmse));
    })
    .map_err(|e| CliError::Failed(e.into()))?;
    let sigma = run.manifest.noise_multiplier;
    Ok((
        (run.records, run.client_updates, run.timings, sigma),
        run.manifest.epsilon_assumption(),
    ))
}

/// Without the `grpc` feature, plans with `--transport grpc` are refused when they are made;
/// this is never reached.
#[cfg(not(feature = "grpc"))]
fn grpc_run(
    _plan: &RunPlan,
    _bar: &dyn Progress,
    _watch: &mut impl FnMut(&RoundRecord),
) -> Result<(RunParts, String), CliError> {
    Err(usage(
        "--transport grpc: this fedpref-sim was built without the `grpc` feature",
    ))
}

/// Runs a plan (federated, or `--centralised`) and writes its outputs under `out`.
pub fn run_plan(
    plan: &RunPlan,
    centralised: bool,
    out: &Path,
    bar: &dyn Progress,
) -> Result<RunOutcome, CliError> {
    let run = simulate(plan, centralised, bar, &out.display().to_string())?;
    let files = write_outputs(plan, &run, out)?;
    Ok(RunOutcome {
        records: run.records,
        summary: run.summary,
        files,
        noise_multiplier: run.noise_multiplier,
        alerts: run.alerts,
    })
}

/// A run's results in memory: what [`simulate`] returns and [`write_outputs`] writes.
#[derive(Clone, Debug)]
pub struct SimulatedRun {
    /// Per-round records.
    pub records: Vec<RoundRecord>,
    /// The summary object (`summary.json`).
    pub summary: Value,
    /// The settings as `metrics.json` records them, with the σ used.
    pub settings: Value,
    /// The validated σ, if any.
    pub noise_multiplier: Option<f64>,
    /// The guardrail alerts, in round order (empty without `[guardrails]`).
    pub alerts: Vec<Alert>,
    /// The trained shared model (item factors, item biases, global offset) of an in-process
    /// federated run; `None` for `--centralised` and `--transport grpc`, whose models are not
    /// the simulator's to hand back.
    pub model: Option<fedpref_client_sdk::MatrixFactorization>,
}

/// Runs a plan (federated, or `--centralised`) in memory and writes no file: the library
/// entry point behind `fedpref-sim run` and the Python package. Guardrail alerts and the
/// noise warning go to stderr as they happen (prefixed with `label`), above `bar`.
pub fn simulate(
    plan: &RunPlan,
    centralised: bool,
    bar: &dyn Progress,
    label: &str,
) -> Result<SimulatedRun, CliError> {
    let s = &plan.settings;
    // Guardrails are checked as each round ends; alerts go to stderr at once (above the
    // progress bar) and to `alerts.json`.
    let mut monitor = plan.guardrails.map(Monitor::new);
    let mut alerts: Vec<Alert> = vec![];
    let mut watch = |r: &RoundRecord| {
        if let Some(m) = monitor.as_mut() {
            for a in m.check(r) {
                bar.say(&format!("alert [{label}]: {a}"));
                alerts.push(a);
            }
        }
    };
    let mut assumption: Option<String> = None;
    let warning = if centralised {
        None
    } else {
        noise_warning(s, &plan.data)
    };
    if let Some(w) = &warning {
        bar.say(&format!("warning: {w}"));
    }
    let mut chosen: Option<Value> = None;
    let mut model = None;
    let (records, client_updates, timings, sigma) = if centralised {
        let run = crate::centralised::centralised(s, &plan.data)
            .map_err(|e| CliError::Failed(e.into()))?;
        let timings = sim::Timings {
            rounds_wall_ns: run.wall_ns,
            ..Default::default()
        };
        chosen = Some(json!({
            "method": "alternating least squares",
            "sweeps": run.sweeps,
            "validation_rmse": run.validation_rmse,
        }));
        bar.position(s.rounds, None);
        run.records.iter().for_each(&mut watch);
        (run.records, 0, timings, None)
    } else if plan.transport == Transport::Grpc {
        let (run, epsilon_assumption) = grpc_run(plan, bar, &mut watch)?;
        assumption = Some(epsilon_assumption);
        run
    } else if s.privacy_mode == ManifestPrivacyMode::Distributed {
        let mut simulation = crate::distributed::DistributedSimulation::new(s, &plan.data)
            .map_err(|e| usage(e.to_string()))?;
        assumption = Some(simulation.epsilon_assumption());
        let records = simulation
            .run(|r| {
                watch(r);
                bar.position(r.round, r.evaluation.as_ref().map(|e| e.rmse));
            })
            .map_err(|e| CliError::Failed(e.into()))?;
        model = Some(simulation.model().map_err(|e| CliError::Failed(e.into()))?);
        (
            records,
            simulation.client_updates,
            simulation.timings,
            s.noise_multiplier,
        )
    } else {
        let mut simulation = Simulation::new(s, &plan.data).map_err(|e| usage(e.to_string()))?;
        let sigma = simulation.manifest().noise_multiplier;
        assumption = Some(simulation.epsilon_assumption());
        let records = simulation
            .run(|r| {
                watch(r);
                bar.position(r.round, r.evaluation.as_ref().map(|e| e.rmse));
            })
            .map_err(|e| CliError::Failed(e.into()))?;
        model = Some(simulation.model().map_err(|e| CliError::Failed(e.into()))?);
        (
            records,
            simulation.client_updates,
            simulation.timings,
            sigma,
        )
    };
    let delta = (s.privacy_mode != ManifestPrivacyMode::None).then_some(s.delta);
    let mut summary = report::summary(&records, delta, s.seed, client_updates, &timings);
    report::add_feedback(&mut summary, &records);
    report::add_privacy_details(&mut summary, &records, assumption.as_deref());
    if plan.guardrails.is_some() {
        summary["alerts"] = json!(alerts.len());
    }
    if let Some(c) = chosen {
        summary["centralised"] = c;
    }
    if let Some(w) = warning {
        summary["noise_warning"] = json!(w);
    }
    if s.ranking
        && let Some(p) = crate::metrics::popularity_ranking(&plan.data)
    {
        summary["popularity_hit_rate_at_10"] = json!(p.hit_rate_at_10);
        summary["popularity_ndcg_at_10"] = json!(p.ndcg_at_10);
    }
    let mut settings_json = plan.settings_json.clone();
    settings_json["noise_multiplier"] = json!(sigma);
    if plan.transport == Transport::Grpc {
        settings_json["transport"] = json!("grpc");
        #[cfg(feature = "grpc")]
        {
            settings_json["round_seconds"] = json!(crate::grpc::ROUND_SECONDS);
        }
    }
    Ok(SimulatedRun {
        records,
        summary,
        settings: settings_json,
        noise_multiplier: sigma,
        alerts,
        model,
    })
}

/// Writes a run's metrics (CSV, JSON), summary, alerts and plots under `out`; returns the
/// files written.
pub fn write_outputs(
    plan: &RunPlan,
    run: &SimulatedRun,
    out: &Path,
) -> Result<Vec<PathBuf>, CliError> {
    let SimulatedRun {
        records,
        summary,
        settings,
        alerts,
        ..
    } = run;
    let csv = report::metrics_csv(&plan.data, records);
    let metrics = report::metrics_json(&plan.data, settings.clone(), records);
    let mut files = report::write(out, &csv, &metrics, summary)
        .map_err(|e| CliError::Failed(anyhow::anyhow!("--out: {e}")))?;
    if plan.guardrails.is_some() {
        let path = out.join("alerts.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&alerts).expect("serialisable") + "\n",
        )
        .map_err(|e| CliError::Failed(anyhow::anyhow!("--out: {}: {e}", path.display())))?;
        files.push(path);
    }
    let points = |f: fn(&crate::metrics::Evaluation) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r.round as f64, f(r.evaluation.as_ref()?)?)))
            .collect()
    };
    for (name, label, f) in [
        (
            "rmse_by_round",
            "test RMSE",
            (|e| Some(e.rmse)) as fn(&crate::metrics::Evaluation) -> Option<f64>,
        ),
        ("ndcg_at_10_by_round", "NDCG@10", |e| e.ndcg_at_10),
    ] {
        files.extend(
            crate::plot::line_plot(
                &out.join(name),
                &format!("{label} by round ({})", plan.data.name),
                "round",
                label,
                &points(f),
            )
            .map_err(|e| CliError::Failed(e.into()))?,
        );
    }
    let cohorts: Vec<crate::plot::Series> = plan
        .data
        .cohorts
        .iter()
        .enumerate()
        .map(|(c, name)| crate::plot::Series {
            name: name.clone(),
            points: records
                .iter()
                .filter_map(|r| {
                    let e = r.evaluation.as_ref()?;
                    Some((r.round as f64, e.cohort_rmse.get(c).copied().flatten()?))
                })
                .collect(),
        })
        .collect();
    if cohorts.len() >= 2 {
        files.extend(
            crate::plot::lines_plot(
                &out.join("rmse_by_cohort"),
                &format!("test RMSE per cohort ({})", plan.data.name),
                "round",
                "test RMSE",
                &cohorts,
            )
            .map_err(|e| CliError::Failed(e.into()))?,
        );
    }
    if records.iter().any(|r| r.feedback.is_some()) {
        let rate = |f: fn(&crate::feedback::RoundFeedback) -> Option<f64>| -> Vec<(f64, f64)> {
            records
                .iter()
                .filter_map(|r| Some((r.round as f64, f(r.feedback.as_ref()?)?)))
                .collect()
        };
        files.extend(
            crate::plot::lines_plot(
                &out.join("feedback_by_round"),
                &format!("user feedback by round ({})", plan.data.name),
                "round",
                "share",
                &[
                    crate::plot::Series {
                        name: "negative feedback rate".into(),
                        points: rate(|f| f.negative_feedback_rate),
                    },
                    crate::plot::Series {
                        name: "opt-out rate".into(),
                        points: rate(|f| Some(f.opt_out_rate)),
                    },
                ],
            )
            .map_err(|e| CliError::Failed(e.into()))?,
        );
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_preset_sets_fedadam_without_momentum_and_flags_override_it() {
        let private = Defaults::of(Some(Preset::Movielens1mPrivate));
        let adam = |o: ServerOptimizer| match o {
            ServerOptimizer::Fedadam {
                server_learning_rate,
                beta1,
                tau,
                ..
            } => (server_learning_rate, beta1, tau),
            other => panic!("not FedAdam: {other:?}"),
        };
        assert_eq!(
            adam(server_optimizer(None, None, &private).unwrap()),
            (0.05, 0.0, 3e-4)
        );
        // A rate flag keeps the preset's other keys; naming an optimiser replaces them all.
        assert_eq!(
            adam(server_optimizer(None, Some(0.2), &private).unwrap()),
            (0.2, 0.0, 3e-4)
        );
        let (_, beta1, tau) =
            adam(server_optimizer(Some(Value::String("fedadam".into())), None, &private).unwrap());
        assert_eq!((beta1, tau), (0.9, 1e-3));
        assert!(matches!(
            server_optimizer(Some(Value::String("fedavg".into())), None, &private).unwrap(),
            ServerOptimizer::Fedavg { .. }
        ));
        // The presets without DP keep FedAdam's defaults.
        let (_, beta1, tau) =
            adam(server_optimizer(None, None, &Defaults::of(Some(Preset::Movielens1m))).unwrap());
        assert_eq!((beta1, tau), (0.9, 1e-3));
    }
}
