//! The `fedpref-coordinator` command line.
//!
//! ```text
//! fedpref-coordinator accountant epsilon   --noise-multiplier S --sampling-rate Q --rounds T --delta D   [--mode M] [--accountant pld|rdp] [--json]
//! fedpref-coordinator accountant delta     --noise-multiplier S --sampling-rate Q --rounds T --epsilon E [--mode M] [--accountant pld|rdp] [--json]
//! fedpref-coordinator accountant calibrate --target-epsilon E   --sampling-rate Q --rounds T --delta D   [--mode M] [--accountant pld|rdp] [--json]
//! fedpref-coordinator accountant tree (--noise-multiplier S | --target-epsilon E) --rounds T --delta D
//!                                     --min-separation s --max-participations k [--restart-every R [--completion]] [--json]
//! fedpref-coordinator ledger verify --db PATH [--run ID] [--checkpoint FILE]… [--json]
//! fedpref-coordinator ledger checkpoint --db PATH --run ID [--out FILE]
//! fedpref-coordinator ledger export --db PATH --run ID [--format json]
//! fedpref-coordinator report --db PATH --run ID [--out FILE] [--format html|md|json]
//! fedpref-coordinator init --dir DIR
//! fedpref-coordinator serve --config DIR/coordinator.toml [--device-addr A] [--admin-addr A] [--metrics-addr A] [--insecure-plaintext]
//! ```
//!
//! Flags are validated as they are parsed: σ ≤ 0, q outside (0, 1], δ outside (0, 1) and
//! zero rounds are usage errors naming the flag (exit code 2). In `--mode local` the rounds
//! are the device's own uploads, each a replace-one release with sensitivity 2C, so σ is
//! halved; a sampling rate other than 1 is refused, because the coordinator sees who
//! uploaded and sampling does not amplify what it sees. `--accountant` picks the privacy-loss-
//! distribution accountant (`pld`, the default: tight) or Rényi DP (`rdp`); every answer
//! names the one used. `accountant tree` is always RDP/zCDP (DP-FTRL's tree).

use clap::{Args, Parser, Subcommand, ValueEnum};
use fedpref_privacy::{Accountant, OrderGrid, PrivacyMode, PrivacyStatement, RoundRelease};
use rand_core::TryRng;
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
    /// The privacy accountant (PLD by default, or RDP): ε for a schedule, δ for an ε, σ for a
    /// target.
    #[command(subcommand)]
    Accountant(AccountantCommand),
    /// Training runs in a coordinator database.
    #[command(subcommand)]
    Run(RunCommand),
    /// The privacy ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Render a run's one-page impact report from the database.
    Report {
        /// The coordinator's SQLite database.
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// The run.
        #[arg(long)]
        run: String,
        /// Write the report here (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// `html` (one self-contained page), `md` or `json`.
        #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
        format: ReportFormat,
    },
    /// The AdminService of a running coordinator, over TLS.
    #[command(subcommand)]
    Admin(crate::admin_client::AdminCommandLine),
    /// Write a working configuration, a self-signed certificate, secrets and an example
    /// manifest into a directory.
    Init {
        /// The directory (created if missing); existing files are never overwritten.
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
    },
    /// Serve DeviceService and AdminService (TLS) until SIGINT or SIGTERM.
    Serve {
        /// The configuration file (`init` writes one).
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
        /// Listen address of DeviceService (overrides `listen.device`).
        #[arg(long, value_name = "ADDR")]
        device_addr: Option<std::net::SocketAddr>,
        /// Listen address of AdminService (overrides `listen.admin`).
        #[arg(long, value_name = "ADDR")]
        admin_addr: Option<std::net::SocketAddr>,
        /// Listen address of the metrics endpoint (overrides `listen.metrics`; not served yet).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve without TLS. Only on loopback addresses, for local testing.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Enrolment grants: the app backend's key, and grants signed with it (for testing, and
    /// for backends that shell out; the format is in docs/operators.md).
    #[command(subcommand)]
    Grant(GrantCommand),
}

/// Enrolment grant commands.
#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Write a new Ed25519 key for the app's backend (the seed in hex, mode 0600) and print its
    /// public key, the value for `auth.enrolment_grant_keys`.
    Keygen {
        /// The key file to write (never overwritten).
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Sign a grant naming one person; prints the encoded `EnrolmentGrant`, base64 (standard,
    /// padded), for the app to pass to the SDK.
    Sign {
        /// The backend's key file (`grant keygen` wrote it).
        #[arg(long, value_name = "FILE")]
        key_file: std::path::PathBuf,
        /// The backend's pseudonym for the person (1 to 128 bytes; not a name or an email).
        #[arg(long)]
        pseudonym: String,
        /// How long the grant stays valid, in seconds (1 to 604800, a week: coordinators refuse
        /// longer grants).
        #[arg(long, default_value_t = 600)]
        expires_in_seconds: u64,
    },
}

/// Run commands (offline, on the database file).
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Create a run from a manifest; prints its id.
    Create {
        /// The coordinator's SQLite database (created if missing), or a postgres:// URL
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// The run manifest (TOML).
        #[arg(long, value_name = "FILE")]
        manifest: std::path::PathBuf,
        /// The run id (ASCII letters, digits, '-', '_'); random if absent.
        #[arg(long)]
        id: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the runs.
    List {
        /// The coordinator's SQLite database.
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Ledger commands.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Recompute the hash chain and every cumulative ε, check the head signatures, the rounds
    /// against the run's manifest, the budget, and that the chain extends every checkpoint
    /// given; exit 1 at the first problem.
    Verify {
        /// The coordinator's SQLite database (or a postgres:// URL).
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// Only this run (default: every run in the ledger or in a checkpoint).
        #[arg(long)]
        run: Option<String>,
        /// A checkpoint written by `ledger checkpoint` (repeatable): the run's chain must
        /// still hold its head at its position.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a run's signed head (run, entry count, head hash, public key, signature, time)
    /// as JSON, to keep outside the database.
    Checkpoint {
        /// The coordinator's SQLite database (or a postgres:// URL).
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// The run.
        #[arg(long)]
        run: String,
        /// Write it here (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Export a run's entries with their canonical text and hashes, for re-derivation
    /// elsewhere (the fields are documented in docs/reference/ledger-export.md).
    Export {
        /// The coordinator's SQLite database.
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// The run.
        #[arg(long)]
        run: String,
        /// The output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
    },
    /// Print a run's entries, one canonical JSON object per line.
    Show {
        /// The coordinator's SQLite database.
        #[arg(long, value_name = "PATH")]
        db: std::path::PathBuf,
        /// The run.
        #[arg(long)]
        run: String,
    },
}

/// Impact report formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// One self-contained, printable HTML page.
    Html,
    /// Markdown.
    Md,
    /// JSON.
    Json,
}

/// Ledger export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object: the run id and every entry with its canonical text and hashes.
    Json,
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
    /// DP-FTRL's tree aggregation under participation limits (no sampling): ε at δ after T
    /// rounds for σ, or the σ that keeps T rounds within a target ε.
    Tree(TreeArgs),
}

/// `accountant tree`.
#[derive(Debug, Args)]
pub struct TreeArgs {
    /// Noise multiplier σ of each tree node (noise std σ·C), > 0.
    #[arg(long, value_name = "S", value_parser = parse_noise_multiplier, conflicts_with = "target_epsilon", required_unless_present = "target_epsilon")]
    pub noise_multiplier: Option<f64>,
    /// Calibrate σ for this ε instead, > 0.
    #[arg(long, value_name = "E", value_parser = parse_target_epsilon)]
    pub target_epsilon: Option<f64>,
    /// δ, in (0, 1).
    #[arg(long, value_name = "D", value_parser = parse_delta)]
    pub delta: f64,
    /// Number of rounds T.
    #[arg(long, value_name = "T", value_parser = parse_rounds)]
    pub rounds: u64,
    /// A device takes part at most once every s rounds (1: consecutive rounds allowed).
    #[arg(long, value_name = "s")]
    pub min_separation: u64,
    /// … and at most k times.
    #[arg(long, value_name = "k")]
    pub max_participations: u64,
    /// A new tree every R rounds (default: one tree).
    #[arg(long, value_name = "R")]
    pub restart_every: Option<u64>,
    /// The tree completion trick at each restart (needs --restart-every).
    #[arg(long, requires = "restart_every")]
    pub completion: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn run_tree_accountant(a: &TreeArgs) -> Result<String, CliError> {
    use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant, TreeSchedule};
    let usage =
        |flag: &str, e: fedpref_privacy::PrivacyError| CliError::Usage(format!("{flag}: {e}"));
    let limits = ParticipationLimits::new(a.min_separation, a.max_participations)
        .map_err(|e| usage("--min-separation/--max-participations", e))?;
    let schedule = match a.restart_every {
        Some(r) => {
            TreeSchedule::restart_every(r, a.completion).map_err(|e| usage("--restart-every", e))?
        }
        None => TreeSchedule::single_tree(),
    };
    let failed = |e: fedpref_privacy::PrivacyError| CliError::Failed(e.to_string());
    let sigma = match (a.noise_multiplier, a.target_epsilon) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            TreeAccountant::calibrate_noise_multiplier(schedule, limits, a.rounds, e, a.delta)
                .map_err(failed)?
        }
        (None, None) => {
            return Err(CliError::Usage(
                "give --noise-multiplier or --target-epsilon".into(),
            ));
        }
    };
    let spent = TreeAccountant::new(sigma, schedule, limits)
        .map_err(failed)?
        .spend(a.rounds, a.delta)
        .map_err(failed)?;
    Ok(if a.json {
        json!({
            "epsilon": finite(spent.epsilon),
            "delta": spent.delta,
            "rho": spent.rho,
            "sensitivity_squared": spent.sensitivity_squared,
            "noise_multiplier": sigma,
            "rounds": a.rounds,
            "schedule": schedule.to_string(),
            "assumption": spent.assumption,
        })
        .to_string()
    } else {
        format!(
            "ε = {:.6} at δ = {:e}\n\
             σ = {sigma}, rounds T = {}, {schedule}, sensitivity² = {} C², ρ = {:.6} (zCDP)\n\
             assumption: {}",
            spent.epsilon,
            spent.delta,
            a.rounds,
            spent.sensitivity_squared,
            spent.rho,
            spent.assumption
        )
    })
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
    /// The accountant: `pld` (privacy loss distributions, tight) or `rdp` (Rényi DP).
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    pub accountant: AccountantArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Accountants as the command line spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccountantArg {
    /// Privacy loss distributions with pessimistic discretisation (the default).
    Pld,
    /// Rényi DP with the improved conversion.
    Rdp,
}

impl From<AccountantArg> for Accountant {
    fn from(a: AccountantArg) -> Self {
        match a {
            AccountantArg::Pld => Accountant::Pld,
            AccountantArg::Rdp => Accountant::Rdp,
        }
    }
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

pub use crate::cli_error::CliError;

/// Runs a parsed command and returns what to print.
pub fn run(cli: &Cli) -> Result<String, CliError> {
    match &cli.command {
        Command::Accountant(cmd) => run_accountant(cmd),
        Command::Run(cmd) => run_runs(cmd),
        Command::Ledger(cmd) => run_ledger(cmd),
        Command::Admin(cmd) => crate::admin_client::run(cmd),
        Command::Report {
            db,
            run,
            out,
            format,
        } => {
            let store = open_existing(db)?;
            let report = crate::report::ImpactReport::build(&store, run, now_ms())
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let text = match format {
                ReportFormat::Html => report.to_html(),
                ReportFormat::Md => report.to_markdown(),
                ReportFormat::Json => report.to_json(),
            };
            let status = if report.ledger.intact {
                format!("ledger intact, head {}", report.ledger.head_sha256)
            } else {
                format!(
                    "LEDGER CHAIN BROKEN at entry {}: {}",
                    report.ledger.failed_sequence.unwrap_or(0),
                    report.ledger.problem.as_deref().unwrap_or("")
                )
            };
            let printed = match out {
                Some(path) => {
                    std::fs::write(path, text)
                        .map_err(|e| CliError::Failed(format!("--out {}: {e}", path.display())))?;
                    format!("wrote {} ({status})", path.display())
                }
                None => text.trim_end().to_string(),
            };
            // A broken chain still gets its report (which says so at the top), but the
            // command fails, so that scripts notice.
            if report.ledger.intact {
                Ok(printed)
            } else {
                Err(CliError::Verification(printed))
            }
        }
        Command::Grant(GrantCommand::Keygen { out }) => {
            let key = crate::checkpoint::LedgerSigner::write_new_file(out)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            Ok(format!(
                "wrote {}\npublic key (for auth.enrolment_grant_keys): {}",
                out.display(),
                key.public_key_hex()
            ))
        }
        Command::Grant(GrantCommand::Sign {
            key_file,
            pseudonym,
            expires_in_seconds,
        }) => {
            use base64::Engine as _;
            use fedpref_proto::prost::Message as _;
            if !(1..=604_800).contains(expires_in_seconds) {
                return Err(CliError::Usage(
                    "--expires-in-seconds: must be in 1..=604800 (a week)".into(),
                ));
            }
            if pseudonym.is_empty() || pseudonym.len() > crate::enrolment::MAX_PSEUDONYM_BYTES {
                return Err(CliError::Usage(format!(
                    "--pseudonym: {} bytes; must be 1 to {}",
                    pseudonym.len(),
                    crate::enrolment::MAX_PSEUDONYM_BYTES
                )));
            }
            let key = crate::checkpoint::LedgerSigner::read_file(key_file)
                .map_err(|e| CliError::Failed(format!("--key-file: {e}")))?;
            let grant = crate::enrolment::sign(
                &key,
                pseudonym,
                now_ms() + (*expires_in_seconds as i64) * 1000,
            );
            Ok(base64::engine::general_purpose::STANDARD.encode(grant.encode_to_vec()))
        }
        Command::Init { dir } => {
            let done = crate::config::init(dir).map_err(|e| CliError::Failed(e.to_string()))?;
            let mut out = vec![format!("wrote {} files:", done.files.len())];
            out.extend(done.files.iter().map(|f| format!("  {}", f.display())));
            out.push(format!(
                "next: fedpref-coordinator serve --config {}",
                dir.join("coordinator.toml").display()
            ));
            Ok(out.join("\n"))
        }
        Command::Serve {
            config,
            device_addr,
            admin_addr,
            metrics_addr,
            insecure_plaintext,
        } => {
            let config = crate::config::Config::from_file(config)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let options = crate::server::ServeOptions {
                device_addr: *device_addr,
                admin_addr: *admin_addr,
                metrics_addr: *metrics_addr,
                insecure_plaintext: *insecure_plaintext,
            };
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .try_init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
            runtime
                .block_on(crate::server::serve(&config, &options))
                .map_err(|e| CliError::Failed(e.to_string()))?;
            Ok("stopped".into())
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn open_existing(db: &std::path::Path) -> Result<crate::store::Store, CliError> {
    if let Some(url) = db.to_str().filter(|u| crate::store::is_postgres_url(u)) {
        return crate::store::Store::open_postgres(url)
            .map_err(|e| CliError::Failed(format!("--db: {e}")));
    }
    if !db.exists() {
        return Err(CliError::Usage(format!(
            "--db {}: no such file",
            db.display()
        )));
    }
    crate::store::Store::open(db).map_err(|e| CliError::Failed(format!("{}: {e}", db.display())))
}

fn run_runs(cmd: &RunCommand) -> Result<String, CliError> {
    match cmd {
        RunCommand::Create {
            db,
            manifest,
            id,
            json,
        } => {
            let m = crate::manifest::RunManifest::from_file(manifest)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            if let Some(w) = m.noise_warning() {
                eprintln!("warning: {}: {w}", manifest.display());
            }
            let id = match id {
                Some(id) => id.clone(),
                None => {
                    let mut bytes = [0u8; 8];
                    rand::rngs::SysRng
                        .try_fill_bytes(&mut bytes)
                        .map_err(|e| CliError::Failed(format!("random source: {e}")))?;
                    format!("run-{}", crate::hex(&bytes))
                }
            };
            // A new SQLite file is created; a PostgreSQL database must exist (its schema is
            // made on first use, as `serve` does).
            let mut store = match db.to_str().filter(|u| crate::store::is_postgres_url(u)) {
                Some(url) => crate::store::Store::open_postgres(url)
                    .map_err(|e| CliError::Failed(format!("--db: {e}")))?,
                None => crate::store::Store::open(db)
                    .map_err(|e| CliError::Failed(format!("{}: {e}", db.display())))?,
            };
            crate::coordinator::create_run(&mut store, &id, &m, now_ms())
                .map_err(|e| CliError::Failed(e.to_string()))?;
            Ok(if *json {
                json!({"run_id": id, "manifest_sha256": m.sha256(), "noise_multiplier": m.noise_multiplier}).to_string()
            } else {
                format!(
                    "created run {id} (manifest sha256 {}, σ = {})",
                    m.sha256(),
                    m.noise_multiplier
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "none".into())
                )
            })
        }
        RunCommand::List { db, json } => {
            let store = open_existing(db)?;
            let runs = store.runs().map_err(|e| CliError::Failed(e.to_string()))?;
            if *json {
                let list: Vec<_> = runs
                    .iter()
                    .map(|r| {
                        json!({"run_id": r.id, "title": r.manifest.title, "status": format!("{:?}", r.status).to_lowercase(),
                               "rounds_committed": r.rounds_committed, "published_version": r.published_version})
                    })
                    .collect();
                Ok(serde_json::Value::Array(list).to_string())
            } else {
                Ok(runs
                    .iter()
                    .map(|r| {
                        format!(
                            "{}\t{:?}\t{} rounds\tv{}\t{}",
                            r.id,
                            r.status,
                            r.rounds_committed,
                            r.published_version,
                            r.manifest.title
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        }
    }
}

fn run_ledger(cmd: &LedgerCommand) -> Result<String, CliError> {
    match cmd {
        LedgerCommand::Verify {
            db,
            run,
            checkpoint,
            json,
        } => {
            let store = open_existing(db)?;
            let mut checkpoints = vec![];
            for path in checkpoint {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    CliError::Usage(format!("--checkpoint {}: {e}", path.display()))
                })?;
                checkpoints.push(
                    crate::checkpoint::Checkpoint::parse(
                        &text,
                        &format!("--checkpoint {}", path.display()),
                    )
                    .map_err(CliError::Usage)?,
                );
            }
            let ids = crate::audit::runs_to_verify(&store, run.as_deref(), &checkpoints)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let mut lines = vec![];
            let mut reports = vec![];
            let mut failed = None;
            for id in &ids {
                let outcome = crate::audit::verify_stored_run(&store, id, &checkpoints)
                    .map_err(|e| CliError::Failed(e.to_string()))?;
                match outcome {
                    Ok(v) => {
                        let t = &v.totals;
                        let eps = t
                            .cumulative_epsilon
                            .iter()
                            .map(|a| {
                                format!(
                                    "ε = {:.6} ({}, {})",
                                    a.epsilon,
                                    a.audience,
                                    a.accountant.unwrap_or(fedpref_privacy::Accountant::Rdp)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        let signed = match &v.signed.public_key {
                            Some(k) => format!("signed by ledger key {k}"),
                            None => "UNSIGNED (no ledger signing key configured)".into(),
                        };
                        lines.push(format!(
                            "run {id}: ok — {} entries, {} rounds committed, {} abandoned, {} at δ = {:e}, head {} {signed}, extends {} checkpoint(s)",
                            t.entries,
                            t.rounds_committed,
                            t.rounds_abandoned,
                            if eps.is_empty() { "nothing spent".to_string() } else { eps },
                            t.delta,
                            t.head_hash,
                            v.checkpoints
                        ));
                        reports.push(json!({"run_id": id, "ok": true, "totals": t,
                            "public_key": v.signed.public_key, "checkpoints": v.checkpoints}));
                    }
                    Err(f) => {
                        lines.push(format!("run {id}: FAILED at {f}"));
                        reports.push(json!({"run_id": id, "ok": false, "sequence": f.sequence, "problem": f.problem}));
                        failed.get_or_insert(f);
                    }
                }
            }
            if ids.is_empty() {
                lines.push("no runs".into());
            }
            let out = if *json {
                serde_json::Value::Array(reports).to_string()
            } else {
                lines.join("\n")
            };
            match failed {
                Some(_) => Err(CliError::Verification(out)),
                None => Ok(out),
            }
        }
        LedgerCommand::Checkpoint { db, run, out } => {
            let store = open_existing(db)?;
            // Never sign off on a chain that does not verify.
            crate::audit::verify_stored_run(&store, run, &[])
                .map_err(|e| CliError::Failed(e.to_string()))?
                .map_err(|f| {
                    CliError::Verification(format!("run {run}: not checkpointed: FAILED at {f}"))
                })?;
            let entries = store
                .ledger(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let signatures = store
                .ledger_signatures(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let checkpoint =
                crate::checkpoint::Checkpoint::of_head(run, &entries, &signatures, now_ms())
                    .map_err(CliError::Failed)?;
            let text = checkpoint.to_json();
            match out {
                Some(path) => {
                    std::fs::write(path, &text)
                        .map_err(|e| CliError::Failed(format!("--out {}: {e}", path.display())))?;
                    Ok(format!(
                        "wrote {}: run {run}, {} entries, head {}, key {}",
                        path.display(),
                        checkpoint.entry_count,
                        checkpoint.head_hash,
                        checkpoint.public_key
                    ))
                }
                None => Ok(text.trim_end().to_string()),
            }
        }
        LedgerCommand::Export { db, run, format } => {
            let store = open_existing(db)?;
            store
                .run(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let entries = store
                .ledger(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            match format {
                ExportFormat::Json => Ok(crate::ledger::export_json(run, &entries)),
            }
        }
        LedgerCommand::Show { db, run } => {
            let store = open_existing(db)?;
            store
                .run(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let entries = store
                .ledger(run)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            Ok(entries
                .into_iter()
                .map(|e| e.body)
                .collect::<Vec<_>>()
                .join("\n"))
        }
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
    if let AccountantCommand::Tree(a) = cmd {
        return run_tree_accountant(a);
    }
    let grid = OrderGrid::default();
    let failed = |e: fedpref_privacy::PrivacyError| CliError::Failed(e.to_string());
    let (statement, sigma, schedule) = match cmd {
        AccountantCommand::Epsilon(a) => {
            check_local_sampling(&a.schedule)?;
            let release = release(a.noise_multiplier, &a.schedule);
            let s = fedpref_privacy::epsilon_after_with(
                a.schedule.accountant.into(),
                &release,
                a.schedule.rounds,
                a.delta,
                &grid,
            )
            .map_err(failed)?;
            (s, a.noise_multiplier, &a.schedule)
        }
        AccountantCommand::Delta(a) => {
            check_local_sampling(&a.schedule)?;
            let release = release(a.noise_multiplier, &a.schedule);
            let s = fedpref_privacy::delta_after_with(
                a.schedule.accountant.into(),
                &release,
                a.schedule.rounds,
                a.epsilon,
                &grid,
            )
            .map_err(failed)?;
            (s, a.noise_multiplier, &a.schedule)
        }
        AccountantCommand::Calibrate(a) => {
            check_local_sampling(&a.schedule)?;
            let (sigma, s) = fedpref_privacy::calibrate_with(
                a.schedule.accountant.into(),
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
        AccountantCommand::Tree(_) => unreachable!("handled above"),
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
        "accountant": s.accountant.as_str(),
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
        AccountantCommand::Tree(_) => unreachable!("rendered by run_tree_accountant"),
    };
    let local_note = if s.mode == PrivacyMode::Local {
        "\nlocal mode: replace-one neighbours, sensitivity 2C, so the accountant used σ/2; rounds are the device's own uploads"
    } else {
        ""
    };
    let accountant = match s.accountant {
        Accountant::Pld => {
            "accountant: PLD (privacy loss distribution, pessimistic discretisation)".to_string()
        }
        Accountant::Rdp => format!(
            "accountant: RDP, best Rényi order {}",
            s.order.map_or("none".to_string(), |o| o.to_string())
        ),
    };
    format!(
        "{headline}\n\
         mode {}, noise multiplier σ = {sigma}, sampling rate q = {}, rounds T = {}\n\
         {accountant}\n\
         audience: {}{local_note}",
        s.mode,
        schedule.sampling_rate,
        schedule.rounds,
        s.audience.describe(),
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's consistency checks over every subcommand (conflicting flag names, a subcommand
    /// argument named like a global one, …), which otherwise fire only when that subcommand
    /// is parsed in a debug build.
    #[test]
    fn every_subcommand_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
