//! The `fedpref-coordinator` command line.
//!
//! ```text
//! fedpref-coordinator accountant epsilon   --noise-multiplier S --sampling-rate Q --rounds T --delta D   [--mode M] [--json]
//! fedpref-coordinator accountant delta     --noise-multiplier S --sampling-rate Q --rounds T --epsilon E [--mode M] [--json]
//! fedpref-coordinator accountant calibrate --target-epsilon E   --sampling-rate Q --rounds T --delta D   [--mode M] [--json]
//! ```
//!
//! Flags are validated as they are parsed: σ ≤ 0, q outside (0, 1], δ outside (0, 1) and
//! zero rounds are usage errors naming the flag (exit code 2). In `--mode local` the rounds
//! are the device's own uploads, each a replace-one release with sensitivity 2C, so σ is
//! halved; a sampling rate other than 1 is refused, because the coordinator sees who
//! uploaded and sampling does not amplify what it sees.

use clap::{Args, Parser, Subcommand, ValueEnum};
use fedpref_privacy::{OrderGrid, PrivacyMode, PrivacyStatement, RoundRelease};
use serde_json::json;

/// The fedpref coordinator.
#[derive(Debug, Parser)]
#[command(name = "fedpref-coordinator", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The Rényi-DP accountant: ε for a schedule, δ for an ε, σ for a target.
    #[command(subcommand)]
    Accountant(AccountantCommand),
}

/// Accountant commands.
#[derive(Debug, Subcommand)]
pub enum AccountantCommand {
    /// ε after T rounds of the (Poisson-subsampled) Gaussian mechanism, at δ.
    Epsilon(EpsilonArgs),
    /// δ after T rounds, at ε.
    Delta(DeltaArgs),
    /// The smallest noise multiplier σ that keeps T rounds within (ε, δ).
    Calibrate(CalibrateArgs),
}

/// Privacy modes as the command line spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Each device noises its own update (replace-one, sensitivity 2C, no amplification).
    Local,
    /// The coordinator noises the sum (add/remove-one, sensitivity C, amplified by sampling).
    Central,
    /// Devices add noise shares under secure aggregation (accounted as central).
    Distributed,
}

impl From<ModeArg> for PrivacyMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Local => PrivacyMode::Local,
            ModeArg::Central => PrivacyMode::Central,
            ModeArg::Distributed => PrivacyMode::Distributed,
        }
    }
}

/// Flags shared by every accountant command.
#[derive(Debug, Args)]
pub struct Schedule {
    /// Poisson sampling rate q per round, in (0, 1]; must be 1 in local mode.
    #[arg(long, value_name = "Q", default_value_t = 1.0, value_parser = parse_sampling_rate)]
    pub sampling_rate: f64,
    /// Number of rounds T (in local mode: the device's own uploads).
    #[arg(long, value_name = "T", value_parser = parse_rounds)]
    pub rounds: u64,
    /// Privacy mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Central)]
    pub mode: ModeArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `accountant epsilon`.
#[derive(Debug, Args)]
pub struct EpsilonArgs {
    /// Noise multiplier σ (noise std = σ·C), > 0.
    #[arg(long, value_name = "S", value_parser = parse_noise_multiplier)]
    pub noise_multiplier: f64,
    /// Target δ, in (0, 1).
    #[arg(long, value_name = "D", value_parser = parse_delta)]
    pub delta: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub schedule: Schedule,
}

/// `accountant delta`.
#[derive(Debug, Args)]
pub struct DeltaArgs {
    /// Noise multiplier σ (noise std = σ·C), > 0.
    #[arg(long, value_name = "S", value_parser = parse_noise_multiplier)]
    pub noise_multiplier: f64,
    /// ε at which to report δ, ≥ 0.
    #[arg(long, value_name = "E", value_parser = parse_epsilon)]
    pub epsilon: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub schedule: Schedule,
}

/// `accountant calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The ε to stay within, > 0.
    #[arg(long, value_name = "E", value_parser = parse_target_epsilon)]
    pub target_epsilon: f64,
    /// Target δ, in (0, 1).
    #[arg(long, value_name = "D", value_parser = parse_delta)]
    pub delta: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub schedule: Schedule,
}

fn parse_f64(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| format!("'{s}' is not a number"))
}

fn parse_rounds(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("the number of rounds must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("'{s}' is not a whole number of rounds")),
    }
}

fn parse_noise_multiplier(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err("the noise multiplier must be a finite number greater than 0".into())
    }
}

fn parse_sampling_rate(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err("the sampling rate must be in (0, 1]".into())
    }
}

fn parse_delta(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err("δ must be in (0, 1)".into())
    }
}

fn parse_epsilon(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err("ε must be a finite number ≥ 0".into())
    }
}

fn parse_target_epsilon(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err("the target ε must be a finite number greater than 0".into())
    }
}

/// Why a command did not produce output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags are inconsistent (exit code 2, like a parse error).
    #[error("{0}")]
    Usage(String),
    /// The command ran and failed (exit code 1).
    #[error("{0}")]
    Failed(String),
}

/// Runs a parsed command and returns what to print.
pub fn run(cli: &Cli) -> Result<String, CliError> {
    match &cli.command {
        Command::Accountant(cmd) => run_accountant(cmd),
    }
}

fn check_local_sampling(schedule: &Schedule) -> Result<(), CliError> {
    if schedule.mode == ModeArg::Local && schedule.sampling_rate != 1.0 {
        return Err(CliError::Usage(format!(
            "--sampling-rate {} cannot be used with --mode local: each upload is seen by the \
             coordinator, which knows who uploaded, so sampling does not amplify what it sees. \
             Give --rounds as the device's own uploads and leave --sampling-rate at 1",
            schedule.sampling_rate
        )));
    }
    Ok(())
}

fn run_accountant(cmd: &AccountantCommand) -> Result<String, CliError> {
    let grid = OrderGrid::default();
    let failed = |e: fedpref_privacy::PrivacyError| CliError::Failed(e.to_string());
    let (statement, sigma, schedule) = match cmd {
        AccountantCommand::Epsilon(a) => {
            check_local_sampling(&a.schedule)?;
            let release = release(a.noise_multiplier, &a.schedule);
            let s = fedpref_privacy::epsilon_after(&release, a.schedule.rounds, a.delta, &grid)
                .map_err(failed)?;
            (s, a.noise_multiplier, &a.schedule)
        }
        AccountantCommand::Delta(a) => {
            check_local_sampling(&a.schedule)?;
            let release = release(a.noise_multiplier, &a.schedule);
            let s = fedpref_privacy::delta_after(&release, a.schedule.rounds, a.epsilon, &grid)
                .map_err(failed)?;
            (s, a.noise_multiplier, &a.schedule)
        }
        AccountantCommand::Calibrate(a) => {
            check_local_sampling(&a.schedule)?;
            let (sigma, s) = fedpref_privacy::calibrate(
                a.schedule.mode.into(),
                a.target_epsilon,
                a.delta,
                a.schedule.sampling_rate,
                a.schedule.rounds,
                &grid,
            )
            .map_err(failed)?;
            (s, sigma, &a.schedule)
        }
    };
    Ok(if schedule.json {
        render_json(&statement, sigma, schedule)
    } else {
        render_text(cmd, &statement, sigma, schedule)
    })
}

fn release(noise_multiplier: f64, schedule: &Schedule) -> RoundRelease {
    RoundRelease {
        mode: schedule.mode.into(),
        noise_multiplier,
        sampling_rate: schedule.sampling_rate,
    }
}

/// A finite number, or `null` for ε = +∞ (JSON has no infinity).
fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

fn render_json(s: &PrivacyStatement, sigma: f64, schedule: &Schedule) -> String {
    json!({
        "epsilon": finite(s.epsilon),
        "delta": s.delta,
        "order": s.order,
        "noise_multiplier": sigma,
        "sampling_rate": schedule.sampling_rate,
        "rounds": schedule.rounds,
        "mode": s.mode.as_str(),
        "audience": s.audience.as_str(),
    })
    .to_string()
}

fn render_text(
    cmd: &AccountantCommand,
    s: &PrivacyStatement,
    sigma: f64,
    schedule: &Schedule,
) -> String {
    let headline = match cmd {
        AccountantCommand::Epsilon(_) => format!("ε = {:.6} at δ = {:e}", s.epsilon, s.delta),
        AccountantCommand::Delta(_) => format!("δ = {:e} at ε = {}", s.delta, s.epsilon),
        AccountantCommand::Calibrate(_) => {
            format!("σ = {sigma:.9} (ε = {:.6} at δ = {:e})", s.epsilon, s.delta)
        }
    };
    let local_note = if s.mode == PrivacyMode::Local {
        "\nlocal mode: replace-one neighbours, sensitivity 2C, so the accountant used σ/2; rounds are the device's own uploads"
    } else {
        ""
    };
    format!(
        "{headline}\n\
         mode {}, noise multiplier σ = {sigma}, sampling rate q = {}, rounds T = {}, best Rényi order {}\n\
         audience: {}{local_note}",
        s.mode,
        schedule.sampling_rate,
        schedule.rounds,
        s.order,
        s.audience.describe(),
    )
}
