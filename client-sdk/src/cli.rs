//! The `fedpref-device` command line: a reference device program for terminals, desktop
//! developers and tests. `main.rs` only parses and dispatches to [`run`].
//!
//! ```text
//! fedpref-device --store PATH ingest FILE.jsonl [--skip-invalid]
//! fedpref-device --store PATH recommend -k N [--json]
//! fedpref-device --store PATH profile [--json] [--set-role R | --clear-role] [--add-goal G] [--remove-goal G]
//!                                     [--add-interest T] [--remove-interest T] [--mute-topic T] [--unmute-topic T]
//! fedpref-device --store PATH set personalisation on|off
//! fedpref-device --store PATH set training on|off
//! fedpref-device --store PATH reset
//! fedpref-device --store PATH export FILE
//! fedpref-device --store PATH delete
//! fedpref-device --store PATH budget [--json]
//! fedpref-device --store PATH model import FILE.json
//! fedpref-device --store PATH participate --coordinator URL --ca-cert F --app-key K [--rounds N]
//! fedpref-device --store PATH report-metrics --coordinator URL --ca-cert F --app-key K [--if-due]
//! ```
//!
//! `participate` also sends the federated-evaluation counts when a report is due;
//! `report-metrics` sends them now (or, with `--if-due`, only when due).
//!
//! `--store` may come before or after the subcommand. `--now RFC3339` replaces the clock
//! (for reproducible sessions and tests). Usage errors exit with code 2; refused input
//! (a bad line, a bad model file) exits with code 1 and names the line and field.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::participation::participate as participate_rounds;
use crate::participation::{ReportWhen, report_metrics};
use crate::{
    CoordinatorClient, Device, DeviceConfig, MatrixFactorization, ParticipateOptions,
    ParticipationConfig, ParticipationError, ProfileEdit, SdkError, Timestamp,
};

/// The fedpref reference device.
#[derive(Debug, Parser)]
#[command(name = "fedpref-device", version, about, propagate_version = true)]
pub struct Cli {
    /// The device's SQLite store (created if missing).
    #[arg(long, global = true, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Use this time instead of the clock (RFC 3339), for reproducible sessions.
    #[arg(long, global = true, value_name = "RFC3339", value_parser = parse_time)]
    pub now: Option<Timestamp>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(s)
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store the records of a JSON Lines file (catalogue, feedback, explicit data, consents).
    Ingest {
        /// The JSON Lines file.
        file: PathBuf,
        /// Store the valid lines even if some are invalid (which are reported).
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Recommend N items with scores, labels and reasons.
    Recommend {
        /// How many items.
        #[arg(short = 'k', value_name = "N")]
        k: usize,
        /// Print JSON: a list of {"item", "score", "label", "reason"}.
        #[arg(long)]
        json: bool,
    },
    /// Show (and optionally edit) the profile.
    Profile(ProfileArgs),
    /// Turn personalisation or training participation on or off.
    #[command(subcommand)]
    Set(SetCommand),
    /// Reset the model: forget the private parameters, the inferred profile and feedback.
    Reset,
    /// Export everything the store holds as one JSON file.
    Export {
        /// Where to write it.
        file: PathBuf,
    },
    /// Delete everything the store holds about the user.
    Delete,
    /// Show the privacy budget: ε spent and left.
    Budget {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the shared model held on the device.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Take part in training rounds: enrol if needed, then check in, download, train and
    /// upload, N times.
    Participate(ParticipateArgs),
    /// Send the federated-evaluation counts (aggregate numbers only) to the coordinator.
    ReportMetrics(ReportMetricsArgs),
}

/// `report-metrics` flags.
#[derive(Debug, Args)]
pub struct ReportMetricsArgs {
    /// Where and how to connect.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Only if the coordinator's wait since the last report has passed.
    #[arg(long)]
    pub if_due: bool,
}

/// The coordinator's address and the device's credentials.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// The coordinator's DeviceService, e.g. https://localhost:7443.
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// The CA certificate (PEM) that the coordinator's certificate must chain to.
    #[arg(long, value_name = "F")]
    pub ca_cert: PathBuf,
    /// The deployment's app key (used only to enrol; the device token is kept in the store).
    #[arg(long, value_name = "K")]
    pub app_key: String,
    /// The enrolment grant the app's backend signed for this person (base64, as
    /// `fedpref-coordinator grant sign` prints it); needed to enrol with a coordinator that
    /// counts per person.
    #[arg(long, value_name = "BASE64")]
    pub enrolment_grant: Option<String>,
}

/// `participate` flags.
#[derive(Debug, Args)]
pub struct ParticipateArgs {
    /// The coordinator's DeviceService, e.g. https://localhost:7443.
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// The CA certificate (PEM) that the coordinator's certificate must chain to.
    #[arg(long, value_name = "F")]
    pub ca_cert: PathBuf,
    /// The deployment's app key (used only to enrol; the device token is kept in the store).
    #[arg(long, value_name = "K")]
    pub app_key: String,
    /// Tasks to finish.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// The enrolment grant the app's backend signed for this person (base64, as
    /// `fedpref-coordinator grant sign` prints it); needed to enrol with a coordinator that
    /// counts per person.
    #[arg(long, value_name = "BASE64")]
    pub enrolment_grant: Option<String>,
}

/// The participation settings for `--enrolment-grant`.
fn participation_config(grant: Option<&str>) -> Result<ParticipationConfig, CliError> {
    Ok(ParticipationConfig {
        enrolment_grant: grant
            .map(|g| {
                crate::participation::enrolment_grant_from_bytes(g.as_bytes())
                    .map_err(|e| CliError::Usage(format!("--enrolment-grant: {e}")))
            })
            .transpose()?,
        ..ParticipationConfig::default()
    })
}

/// Profile flags.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Set the role.
    #[arg(long, value_name = "ROLE", conflicts_with = "clear_role")]
    pub set_role: Option<String>,
    /// Clear the role.
    #[arg(long)]
    pub clear_role: bool,
    /// Add a goal.
    #[arg(long, value_name = "GOAL")]
    pub add_goal: Vec<String>,
    /// Remove a goal.
    #[arg(long, value_name = "GOAL")]
    pub remove_goal: Vec<String>,
    /// Follow a topic.
    #[arg(long, value_name = "TOPIC")]
    pub add_interest: Vec<String>,
    /// Unfollow a topic.
    #[arg(long, value_name = "TOPIC")]
    pub remove_interest: Vec<String>,
    /// Remove a topic from the profile: never inferred, never used to personalise.
    #[arg(long, value_name = "TOPIC")]
    pub mute_topic: Vec<String>,
    /// Undo --mute-topic.
    #[arg(long, value_name = "TOPIC")]
    pub unmute_topic: Vec<String>,
}

/// `set` subcommands.
#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// Personalised recommendations on or off.
    Personalisation {
        /// on or off.
        state: Switch,
    },
    /// Training participation on or off.
    Training {
        /// on or off.
        state: Switch,
    },
}

/// `model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Install a shared model from its JSON form (until download exists).
    Import {
        /// The model file: {"model_version", "factor_dimension", "global_offset", "items": [{"item", "factors", "bias"}]}.
        file: PathBuf,
    },
}

/// on / off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// How a command failed.
#[derive(Debug)]
pub enum CliError {
    /// Bad usage (exit code 2).
    Usage(String),
    /// Refused input or a failure (exit code 1).
    Failed(String),
}

impl From<SdkError> for CliError {
    fn from(e: SdkError) -> Self {
        Self::Failed(e.to_string())
    }
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("serialisable")
}

/// Runs a command; returns what to print on standard output.
pub fn run(cli: &Cli) -> Result<String, CliError> {
    let store = cli
        .store
        .as_ref()
        .ok_or_else(|| CliError::Usage("--store PATH is required".into()))?;
    let now = cli.now.unwrap_or_else(Timestamp::now);
    let mut device = Device::open(store, DeviceConfig::default())?;
    match &cli.command {
        Command::Ingest { file, skip_invalid } => {
            let text = read(file)?;
            let report = match device.ingest_jsonl(&text, *skip_invalid, now) {
                Err(SdkError::InvalidLines(errors)) => {
                    let mut message = format!(
                        "{}: {} invalid line(s); nothing from the file was stored (--skip-invalid stores the valid lines)",
                        file.display(),
                        errors.len()
                    );
                    for e in &errors {
                        message += &format!("\n  {e}");
                    }
                    return Err(CliError::Failed(message));
                }
                other => other?,
            };
            let mut out = format!(
                "stored {} items, {} feedback events, {} explicit records, {} consents from {}",
                report.items,
                report.feedback,
                report.explicit,
                report.consents,
                file.display()
            );
            if report.expired > 0 {
                out += &format!(
                    "\n{} events were already past their retention window and were not stored",
                    report.expired
                );
            }
            for e in &report.skipped {
                out += &format!("\nskipped {e}");
            }
            Ok(out)
        }
        Command::Recommend { k, json } => {
            let recs = device.recommend(*k, now)?;
            if *json {
                return Ok(serde_json::to_string(&recs).expect("serialisable"));
            }
            if recs.is_empty() {
                return Ok("nothing to recommend: the catalogue is empty".into());
            }
            Ok(recs
                .iter()
                .enumerate()
                .map(|(n, r)| {
                    format!(
                        "{:>3}. {:<12} {:>7.3}  {:<9}  {}",
                        n + 1,
                        r.item,
                        r.score,
                        r.reason.as_str(),
                        r.label
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"))
        }
        Command::Profile(args) => {
            let mut edits = Vec::new();
            if let Some(role) = &args.set_role {
                edits.push(ProfileEdit::SetRole(Some(role.clone())));
            }
            if args.clear_role {
                edits.push(ProfileEdit::SetRole(None));
            }
            edits.extend(args.add_goal.iter().cloned().map(ProfileEdit::AddGoal));
            edits.extend(
                args.remove_goal
                    .iter()
                    .cloned()
                    .map(ProfileEdit::RemoveGoal),
            );
            edits.extend(
                args.add_interest
                    .iter()
                    .cloned()
                    .map(ProfileEdit::AddInterest),
            );
            edits.extend(
                args.remove_interest
                    .iter()
                    .cloned()
                    .map(ProfileEdit::RemoveInterest),
            );
            edits.extend(args.mute_topic.iter().cloned().map(ProfileEdit::MuteTopic));
            edits.extend(
                args.unmute_topic
                    .iter()
                    .cloned()
                    .map(ProfileEdit::UnmuteTopic),
            );
            for edit in edits {
                device.edit_profile(edit, now)?;
            }
            let p = device.profile(now)?;
            if args.json {
                return Ok(to_json(&p));
            }
            let on = |b: bool| if b { "on" } else { "off" };
            let list = |v: &[String]| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            let affinities = |v: &[crate::Affinity]| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.iter()
                        .map(|a| format!("{} ({:+.2})", a.value, a.weight))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let consents: Vec<String> = p
                .consents
                .iter()
                .map(|c| format!("{}: {}", c.topic, if c.personalise { "yes" } else { "no" }))
                .collect();
            let counts: Vec<String> = p
                .feedback_counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            Ok(format!(
                "personalisation: {}   training: {}   personalised now: {}\n\
                 role: {}\ngoals: {}\ninterests: {}\n\
                 inferred topics: {}\ninferred formats: {}\nactive hours (UTC): {}\n\
                 sensitive-topic consents: {}\nmuted topics: {}\nfeedback: {}   usable examples: {}",
                on(p.settings.personalisation),
                on(p.settings.training),
                if p.personalised { "yes" } else { "no" },
                p.role.as_deref().unwrap_or("-"),
                list(&p.goals),
                list(&p.interests),
                affinities(&p.inferred_topics),
                affinities(&p.inferred_formats),
                affinities(&p.active_hours),
                list(&consents),
                list(&p.muted_topics),
                list(&counts),
                p.examples,
            ))
        }
        Command::Set(SetCommand::Personalisation { state }) => {
            device.set_personalisation(*state == Switch::On)?;
            Ok(format!(
                "personalisation {}",
                if *state == Switch::On { "on" } else { "off" }
            ))
        }
        Command::Set(SetCommand::Training { state }) => {
            device.set_training(*state == Switch::On)?;
            Ok(format!(
                "training participation {}",
                if *state == Switch::On { "on" } else { "off" }
            ))
        }
        Command::Reset => {
            device.reset_model()?;
            Ok("model reset: private parameters, inferred profile and feedback deleted".into())
        }
        Command::Export { file } => {
            let doc = device.export(now)?;
            std::fs::write(file, to_json(&doc) + "\n")
                .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", file.display())))?;
            Ok(format!("exported to {}", file.display()))
        }
        Command::Delete => {
            device.delete_everything()?;
            Ok(format!(
                "deleted everything about the user from {} (kept: the two switches and the privacy accountant's spend)",
                store.display()
            ))
        }
        Command::Budget { json } => {
            let b = device.budget()?;
            if *json {
                return Ok(serde_json::to_string(&b).expect("serialisable"));
            }
            Ok(format!(
                "ε spent {:.4} of {} at δ = {:e}; {:.4} left; {} update(s) released\n{}",
                b.epsilon_spent,
                b.epsilon_budget,
                b.delta,
                b.epsilon_remaining,
                b.rounds,
                if b.rounds == 0 {
                    "nothing has left this device".to_owned()
                } else {
                    format!("audience: {}", b.audience)
                }
            ))
        }
        Command::Participate(args) => participate(&mut device, args),
        Command::ReportMetrics(args) => report(&mut device, args),
        Command::Model(ModelCommand::Import { file }) => {
            let text = read(file)?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                CliError::Failed(format!("{}: not valid JSON: {e}", file.display()))
            })?;
            let model = MatrixFactorization::from_json(&value)
                .map_err(|e| CliError::Failed(format!("{}: {e}", file.display())))?;
            let summary = format!(
                "installed model version {} ({} items, k = {})",
                crate::PreferenceModel::version(&model),
                crate::PreferenceModel::item_count(&model),
                model.factor_dimension()
            );
            device.install_model(model)?;
            Ok(summary)
        }
    }
}

/// Names the flag a participation error is about.
fn participation_error(e: ParticipationError, args: &ParticipateArgs) -> CliError {
    use ParticipationError as E;
    let ca = args.ca_cert.display();
    CliError::Failed(match &e {
        E::InvalidEndpoint { .. } | E::Unreachable { .. } => format!("--coordinator: {e}"),
        E::InvalidCaCertificate(_) => format!("--ca-cert {ca}: {e}"),
        E::Certificate { .. } => format!(
            "--ca-cert {ca}: {e} (is this the coordinator's CA certificate, and --coordinator the right host?)"
        ),
        E::Unauthenticated { call: "Enroll", .. } => format!("--app-key: {e}"),
        _ => e.to_string(),
    })
}

fn participate(device: &mut Device, args: &ParticipateArgs) -> Result<String, CliError> {
    let ca_pem = std::fs::read(&args.ca_cert).map_err(|e| {
        CliError::Failed(format!(
            "--ca-cert {}: cannot read: {e}",
            args.ca_cert.display()
        ))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the network runtime: {e}")))?;
    let options = ParticipateOptions {
        rounds: args.rounds,
        ..ParticipateOptions::default()
    };
    let config = participation_config(args.enrolment_grant.as_deref())?;
    let report = runtime
        .block_on(async {
            let mut client = CoordinatorClient::connect(&args.coordinator, &ca_pem, config).await?;
            participate_rounds(device, &mut client, &args.app_key, &options, &mut |e| {
                println!("{e}")
            })
            .await
        })
        .map_err(|e| participation_error(e, args))?;
    if let Some(m) = &report.metrics {
        println!("{m}");
    }
    let b = device.budget()?;
    Ok(format!(
        "{} update(s) uploaded, {} declined, {} refused; ε spent {:.4} of {}, {:.4} left",
        report.uploads,
        report.declines,
        report.refused,
        b.epsilon_spent,
        b.epsilon_budget,
        b.epsilon_remaining
    ))
}

fn report(device: &mut Device, args: &ReportMetricsArgs) -> Result<String, CliError> {
    let c = &args.connection;
    let flags = ParticipateArgs {
        coordinator: c.coordinator.clone(),
        ca_cert: c.ca_cert.clone(),
        app_key: c.app_key.clone(),
        rounds: 1,
        enrolment_grant: c.enrolment_grant.clone(),
    };
    let config = participation_config(c.enrolment_grant.as_deref())?;
    let ca_pem = std::fs::read(&c.ca_cert).map_err(|e| {
        CliError::Failed(format!(
            "--ca-cert {}: cannot read: {e}",
            c.ca_cert.display()
        ))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the network runtime: {e}")))?;
    let when = if args.if_due {
        ReportWhen::Due
    } else {
        ReportWhen::Now
    };
    let outcome = runtime
        .block_on(async {
            let mut client = CoordinatorClient::connect(&c.coordinator, &ca_pem, config).await?;
            report_metrics(device, &mut client, &c.app_key, when).await
        })
        .map_err(|e| participation_error(e, &flags))?;
    Ok(outcome.to_string())
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
