//! `fedpref-coordinator admin …`: the AdminService from the command line, over TLS.
//!
//! ```text
//! fedpref-coordinator admin runs create   --endpoint URL --token-file F [--ca-cert F] --manifest FILE [--request-id ID]
//! fedpref-coordinator admin runs list     --endpoint URL --token-file F [--ca-cert F]
//! fedpref-coordinator admin runs get      --endpoint URL --token-file F [--ca-cert F] --run ID
//! fedpref-coordinator admin runs pause    --endpoint URL --token-file F [--ca-cert F] --run ID --reason TEXT
//! fedpref-coordinator admin runs resume   --endpoint URL --token-file F [--ca-cert F] --run ID --reason TEXT
//! fedpref-coordinator admin runs stop     --endpoint URL --token-file F [--ca-cert F] --run ID --reason TEXT
//! fedpref-coordinator admin runs rollback --endpoint URL --token-file F [--ca-cert F] --run ID --version N --reason TEXT
//! fedpref-coordinator admin runs ledger   --endpoint URL --token-file F [--ca-cert F] --run ID
//! fedpref-coordinator admin runs report   --endpoint URL --token-file F [--ca-cert F] --run ID [--format html|md|json]
//! ```
//!
//! `--ca-cert` is the PEM certificate to trust (the one `init` wrote); without it the system's
//! roots are not consulted and an `https` endpoint is refused. An `http://` endpoint only works
//! against a server started with `--insecure-plaintext` on loopback.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use fedpref_proto::v1 as pb;
use fedpref_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::cli_error::CliError;
use crate::engine::AdminCommand;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Args)]
pub struct Target {
    /// The AdminService URL, e.g. https://localhost:7443.
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// A file holding the admin token (as written by `init`); needed unless a client
    /// certificate is given.
    #[arg(long, value_name = "F", required_unless_present = "client_cert")]
    pub token_file: Option<PathBuf>,
    /// The PEM certificate to trust for TLS (the coordinator's self-signed cert).
    #[arg(long, value_name = "F")]
    pub ca_cert: Option<PathBuf>,
    /// An admin client certificate (PEM) signed by the coordinator's `auth.admin_client_ca`
    /// (`init` wrote tls/admin-client.pem); authenticates without the token.
    #[arg(long, value_name = "F", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM; `init` wrote tls/admin-client.key).
    #[arg(long, value_name = "F", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// `admin` commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommandLine {
    /// Training runs.
    #[command(subcommand)]
    Runs(RunsCommand),
}

/// Report formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// Self-contained HTML.
    Html,
    /// Markdown.
    Md,
    /// JSON.
    Json,
}

/// `admin runs` commands.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Create a run from a TOML manifest.
    Create {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run manifest (TOML).
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// Makes a retried create idempotent.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// List runs.
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
    },
    /// One run.
    Get {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
    },
    /// Pause a run (its open round is abandoned).
    Pause {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
        /// Why; recorded in the ledger.
        #[arg(long)]
        reason: String,
    },
    /// Resume a paused run.
    Resume {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
        /// Why; recorded in the ledger.
        #[arg(long)]
        reason: String,
    },
    /// Stop a run for good (recorded in the ledger; nothing can change it afterwards).
    Stop {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
        /// Why; recorded in the ledger.
        #[arg(long)]
        reason: String,
    },
    /// Publish an earlier model version's parameters as a new version.
    // `--version` is the model version here, not the program's: no `-V/--version` flag.
    #[command(disable_version_flag = true)]
    Rollback {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
        /// The version to restore.
        #[arg(long)]
        version: u64,
        /// Why; recorded in the ledger.
        #[arg(long)]
        reason: String,
    },
    /// Print the run's ledger.
    Ledger {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
    },
    /// Fetch the run's report.
    Report {
        #[command(flatten)]
        #[allow(missing_docs)]
        target: Target,
        /// The run id.
        #[arg(long)]
        run: String,
        /// The format.
        #[arg(long, value_enum, default_value_t = FormatArg::Html)]
        format: FormatArg,
    },
}

/// Runs an `admin` command.
pub fn run(cmd: &AdminCommandLine) -> Result<String, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    runtime.block_on(async {
        match cmd {
            AdminCommandLine::Runs(c) => runs(c).await,
        }
    })
}

fn read_token(path: &Path) -> Result<String, CliError> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", path.display())))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(CliError::Usage(format!(
            "--token-file {}: the file is empty",
            path.display()
        )));
    }
    Ok(token)
}

async fn connect(
    target: &Target,
) -> Result<(AdminServiceClient<Channel>, Option<String>), CliError> {
    let token = target.token_file.as_deref().map(read_token).transpose()?;
    let mut endpoint = Channel::from_shared(target.endpoint.clone())
        .map_err(|e| CliError::Usage(format!("--endpoint {}: {e}", target.endpoint)))?;
    if target.endpoint.starts_with("https://") {
        let Some(ca) = &target.ca_cert else {
            return Err(CliError::Usage(
                "--ca-cert is needed for an https endpoint (the certificate `init` wrote)".into(),
            ));
        };
        let pem = std::fs::read_to_string(ca)
            .map_err(|e| CliError::Usage(format!("--ca-cert {}: {e}", ca.display())))?;
        let domain = url_host(&target.endpoint);
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(domain);
        if let (Some(cert), Some(key)) = (&target.client_cert, &target.client_key) {
            let read = |flag: &str, path: &Path| {
                std::fs::read(path)
                    .map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
            };
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            CliError::Usage(format!(
                "--ca-cert {} / --client-cert / --client-key: {e}",
                ca.display()
            ))
        })?;
    } else if target.client_cert.is_some() {
        return Err(CliError::Usage(format!(
            "--client-cert needs an https:// endpoint, not {}",
            target.endpoint
        )));
    } else if !target.endpoint.starts_with("http://") {
        return Err(CliError::Usage(format!(
            "--endpoint {}: must start with https:// (or http:// for a plaintext loopback server)",
            target.endpoint
        )));
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CliError::Failed(format!("cannot reach {}: {e}", target.endpoint)))?;
    Ok((AdminServiceClient::new(channel), token))
}

/// The host of a URL, for TLS name checking; `localhost` when the URL names 127.0.0.1 (the
/// certificate `init` writes is for localhost and the loopback addresses).
fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host = if host_port.starts_with('[') {
        host_port
            .split(']')
            .next()
            .unwrap_or(host_port)
            .trim_start_matches('[')
    } else {
        host_port.split(':').next().unwrap_or(host_port)
    };
    match host {
        "127.0.0.1" | "::1" => "localhost".into(),
        h => h.into(),
    }
}

/// The request, with the admin token when there is one (a client certificate authenticates
/// the connection instead).
fn authed<T>(message: T, token: &Option<String>) -> Result<Request<T>, CliError> {
    let mut r = Request::new(message);
    let Some(token) = token else {
        return Ok(r);
    };
    let value = fedpref_proto::metadata::bearer(token)
        .parse()
        .map_err(|_| {
            CliError::Usage("--token-file: the token is not a valid header value".into())
        })?;
    r.metadata_mut()
        .insert(fedpref_proto::metadata::AUTHORIZATION, value);
    Ok(r)
}

fn status(e: tonic::Status) -> CliError {
    // A refused client certificate surfaces only as a broken connection at the first call.
    let broken = match e.code() {
        tonic::Code::Unknown => e.message().contains("transport error"),
        tonic::Code::Cancelled | tonic::Code::Unavailable => true,
        _ => false,
    };
    let hint = if broken {
        " (the TLS connection failed: check --ca-cert, and that a --client-cert is signed by \
         the coordinator's auth.admin_client_ca)"
    } else {
        ""
    };
    CliError::Failed(format!("{:?}: {}{hint}", e.code(), e.message()))
}

impl RunsCommand {
    /// The engine's operator command this subcommand sends (`None` for the read-only ones).
    pub fn admin_command(&self) -> Option<AdminCommand> {
        Some(match self {
            Self::Pause { reason, .. } => AdminCommand::Pause {
                reason: reason.clone(),
            },
            Self::Resume { reason, .. } => AdminCommand::Resume {
                reason: reason.clone(),
            },
            Self::Stop { reason, .. } => AdminCommand::Stop {
                reason: reason.clone(),
            },
            Self::Rollback {
                version, reason, ..
            } => AdminCommand::Rollback {
                to_version: *version,
                reason: reason.clone(),
                params: vec![],
            },
            _ => return None,
        })
    }
}

/// Sends one operator command as its AdminService call.
async fn send_command(
    client: &mut AdminServiceClient<Channel>,
    token: &Option<String>,
    run: &str,
    command: AdminCommand,
) -> Result<pb::Run, CliError> {
    let run_id = run.to_string();
    let reply = match command {
        AdminCommand::Pause { reason } => {
            client
                .pause_run(authed(pb::PauseRunRequest { run_id, reason }, token)?)
                .await
        }
        AdminCommand::Resume { reason } => {
            client
                .resume_run(authed(pb::ResumeRunRequest { run_id, reason }, token)?)
                .await
        }
        AdminCommand::Stop { reason } => {
            client
                .stop_run(authed(pb::StopRunRequest { run_id, reason }, token)?)
                .await
        }
        AdminCommand::Rollback {
            to_version, reason, ..
        } => {
            client
                .rollback_run(authed(
                    pb::RollbackRunRequest {
                        run_id,
                        model_version: to_version,
                        reason,
                    },
                    token,
                )?)
                .await
        }
    };
    Ok(reply.map_err(status)?.into_inner())
}

fn describe_run(r: &pb::Run) -> String {
    let status = pb::RunStatus::try_from(r.status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("RUN_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| r.status.to_string());
    let title = r.manifest.as_ref().map(|m| m.title.as_str()).unwrap_or("");
    let eps = r
        .epsilon_spent
        .iter()
        .map(|a| {
            let audience = pb::Audience::try_from(a.audience)
                .map(|x| {
                    x.as_str_name()
                        .trim_start_matches("AUDIENCE_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            let accountant = match pb::Accountant::try_from(a.accountant) {
                Ok(pb::Accountant::Pld) => "PLD",
                Ok(pb::Accountant::Rdp) => "RDP",
                _ => "accountant not named",
            };
            format!("ε = {:.4} ({audience}, {accountant})", a.epsilon)
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}\t{status}{}\t{} rounds committed, {} abandoned\tmodel v{}\t{}\t{title}",
        r.run_id,
        if r.status_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.status_reason)
        },
        r.rounds_committed,
        r.rounds_abandoned,
        r.latest_model_version,
        if eps.is_empty() {
            "nothing spent".into()
        } else {
            eps
        },
    )
}

async fn runs(cmd: &RunsCommand) -> Result<String, CliError> {
    match cmd {
        RunsCommand::Create {
            target,
            manifest,
            request_id,
        } => {
            let m = crate::manifest::RunManifest::from_file(manifest)
                .map_err(|e| CliError::Failed(e.to_string()))?;
            if let Some(w) = m.noise_warning() {
                eprintln!("warning: {}: {w}", manifest.display());
            }
            let (mut client, token) = connect(target).await?;
            let request = pb::CreateRunRequest {
                manifest: Some(crate::service::convert::manifest_to_proto(&m)),
                request_id: request_id.clone().unwrap_or_default(),
                simulation_seed: None,
            };
            let run = client
                .create_run(authed(request, &token)?)
                .await
                .map_err(status)?
                .into_inner();
            Ok(describe_run(&run))
        }
        RunsCommand::List { target } => {
            let (mut client, token) = connect(target).await?;
            let mut lines = vec![];
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_runs(authed(
                        pb::ListRunsRequest {
                            page_size: 100,
                            page_token: page_token.clone(),
                            statuses: vec![],
                        },
                        &token,
                    )?)
                    .await
                    .map_err(status)?
                    .into_inner();
                lines.extend(page.runs.iter().map(describe_run));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            Ok(if lines.is_empty() {
                "no runs".into()
            } else {
                lines.join("\n")
            })
        }
        RunsCommand::Get { target, run } => {
            let (mut client, token) = connect(target).await?;
            let r = client
                .get_run(authed(
                    pb::GetRunRequest {
                        run_id: run.clone(),
                    },
                    &token,
                )?)
                .await
                .map_err(status)?
                .into_inner();
            Ok(describe_run(&r))
        }
        RunsCommand::Pause { target, run, .. }
        | RunsCommand::Resume { target, run, .. }
        | RunsCommand::Stop { target, run, .. }
        | RunsCommand::Rollback { target, run, .. } => {
            let command = cmd.admin_command().expect("an operator command");
            let (mut client, token) = connect(target).await?;
            let r = send_command(&mut client, &token, run, command).await?;
            Ok(describe_run(&r))
        }
        RunsCommand::Ledger { target, run } => {
            let (mut client, token) = connect(target).await?;
            let mut lines = vec![];
            let mut page_token = String::new();
            loop {
                let page = client
                    .read_ledger(authed(
                        pb::ReadLedgerRequest {
                            run_id: run.clone(),
                            start_sequence: 0,
                            page_size: 500,
                            page_token: page_token.clone(),
                        },
                        &token,
                    )?)
                    .await
                    .map_err(status)?
                    .into_inner();
                for e in &page.entries {
                    let kind = pb::LedgerEntryKind::try_from(e.kind)
                        .map(|k| {
                            k.as_str_name()
                                .trim_start_matches("LEDGER_ENTRY_KIND_")
                                .to_lowercase()
                        })
                        .unwrap_or_default();
                    let spend = e
                        .spend
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    let why = if e.reason.is_empty() {
                        String::new()
                    } else {
                        format!("\t{} ({})", e.reason, e.actor)
                    };
                    lines.push(format!(
                        "{}\t{kind}\tround {}\tmodel v{}\t{} participants\t{spend}{why}",
                        e.sequence, e.round_id, e.model_version, e.participants
                    ));
                }
                if page.next_page_token.is_empty() {
                    lines.push(format!(
                        "head: entry {} sha256 {}",
                        page.head_sequence,
                        crate::hex(&page.head_sha256)
                    ));
                    break;
                }
                page_token = page.next_page_token;
            }
            Ok(lines.join("\n"))
        }
        RunsCommand::Report {
            target,
            run,
            format,
        } => {
            let (mut client, token) = connect(target).await?;
            let format = match format {
                FormatArg::Html => pb::ReportFormat::Html,
                FormatArg::Md => pb::ReportFormat::Markdown,
                FormatArg::Json => pb::ReportFormat::Json,
            };
            let r = client
                .get_report(authed(
                    pb::GetReportRequest {
                        run_id: run.clone(),
                        format: format as i32,
                    },
                    &token,
                )?)
                .await
                .map_err(status)?
                .into_inner();
            Ok(String::from_utf8_lossy(&r.content).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_checked_as_localhost() {
        assert_eq!(url_host("https://127.0.0.1:7443"), "localhost");
        assert_eq!(url_host("https://[::1]:7443/"), "localhost");
        assert_eq!(
            url_host("https://coordinator.example.com:443"),
            "coordinator.example.com"
        );
    }
}
