//! `fedpref.v1.AdminService`: runs, their lifecycle, model versions and the ledger.
//!
//! Every call needs the admin token; a device token is refused with `PERMISSION_DENIED`.
//! State changes go through the engine and the store exactly as offline commands do, so the
//! ledger records each before it takes effect. `GetReport` renders the run's impact report
//! ([`crate::report`]) as HTML, Markdown or JSON.

use std::sync::Arc;

use fedpref_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::convert::{decode_entries, ledger_entry_to_proto, manifest_from_proto, run_to_proto};
use super::{Shared, auth, coordinator_status, invalid, now_ms, store_status, timestamp, unhex};
use crate::coordinator::Coordinator;
use crate::engine::{Action, AdminCommand, Event};
use crate::ledger::{LedgerEvent, verify};
use crate::replica::forward;

/// The AdminService implementation.
pub struct AdminApi {
    shared: Arc<Shared>,
}

impl AdminApi {
    /// Serves operators from the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The run after a command the owning replica applied.
    async fn forwarded_run(&self, id: String) -> Result<Response<pb::Run>, Status> {
        let run = self.shared.blocking(move |c| load_run(c, &id)).await?;
        Ok(Response::new(run))
    }

    async fn admit<T>(
        &self,
        request: &Request<T>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let permit = self.shared.concurrency.acquire()?;
        // Only a certificate that the configured admin CA signed gets this far: rustls
        // verified it during the handshake (without a CA, none is asked for).
        let certified = request.peer_certs().is_some_and(|c| !c.is_empty());
        auth::admin(&self.shared, request.metadata(), certified).await?;
        Ok(permit)
    }
}

fn run_id(id: &str) -> Result<String, Status> {
    super::check_run_id("run_id", id)?;
    Ok(id.to_string())
}

/// The longest reason an admin command records in the (append-only) ledger, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

fn reason(r: &str) -> Result<String, Status> {
    if r.trim().is_empty() {
        return Err(invalid("reason", "must not be empty: it is recorded"));
    }
    if r.len() > MAX_REASON_BYTES {
        return Err(invalid(
            "reason",
            format!(
                "{} bytes; at most {MAX_REASON_BYTES}: it is recorded in the ledger for good",
                r.len()
            ),
        ));
    }
    Ok(r.to_string())
}

/// A run as the admin service shows it, read under the lock.
fn load_run(c: &Coordinator, run_id: &str) -> Result<pb::Run, Status> {
    let record = c.store().run(run_id).map_err(store_status)?;
    let sealed = c.store().ledger(run_id).map_err(store_status)?;
    let entries = decode_entries(&sealed)?;
    let open = c.engine(run_id).and_then(|e| e.open_round());
    Ok(run_to_proto(&record, &entries, &sealed, None, open))
}

/// Page size: 0 means `default`, values above 1000 mean 1000.
fn page_size(n: u32, default: usize) -> usize {
    match n {
        0 => default,
        n => (n as usize).min(1000),
    }
}

fn page_start(token: &str) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse()
        .map_err(|_| invalid("page_token", "not a token this service issued"))
}

/// Carries out an admin command and maps a refusal to `FAILED_PRECONDITION`.
fn command(c: &mut Coordinator, run_id: &str, cmd: AdminCommand) -> Result<pb::Run, Status> {
    if c.engine(run_id).is_none() {
        c.store().run(run_id).map_err(store_status)?;
        return Err(Status::failed_precondition(format!(
            "run {run_id:?} has stopped; nothing can change it"
        )));
    }
    let actions = c
        .handle(run_id, Event::Admin(cmd), now_ms())
        .map_err(coordinator_status)?;
    for a in actions {
        if let Action::AdminRefused { message } = a {
            return Err(Status::failed_precondition(message));
        }
    }
    load_run(c, run_id)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_run(
        &self,
        request: Request<pb::CreateRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        if r.simulation_seed.is_some() {
            return Err(Status::failed_precondition(
                "simulation_seed: this coordinator does not run in simulation mode",
            ));
        }
        let manifest = manifest_from_proto(
            r.manifest
                .as_ref()
                .ok_or_else(|| invalid("manifest", "must be set"))?,
        )?;
        // Idempotency: the run id is derived from the request id, so a retry finds the run
        // the first request created.
        let id = if r.request_id.is_empty() {
            let (random, _) = auth::new_credentials()?;
            format!("run-{}", &random["dev-".len()..])
        } else {
            let digest = auth::sha256(r.request_id.as_bytes());
            format!("run-{}", &crate::hex(&digest)[..32])
        };
        let shared = Arc::clone(&self.shared);
        let (run, created) = self
            .shared
            .blocking(move |c| {
                if let Ok(existing) = c.store().run(&id) {
                    if existing.manifest_sha256 == manifest.sha256() {
                        return Ok((load_run(c, &id)?, false));
                    }
                    return Err(Status::already_exists(
                        "request_id: was used before with a different manifest",
                    ));
                }
                c.create_run(&id, manifest, now_ms())
                    .map_err(coordinator_status)?;
                Ok((load_run(c, &id)?, true))
            })
            .await?;
        if created {
            shared.add_run(&run.run_id);
            tracing::info!(run = %run.run_id, "run created");
        }
        Ok(Response::new(run))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let id = run_id(&request.get_ref().run_id)?;
        let run = self.shared.blocking(move |c| load_run(c, &id)).await?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let size = page_size(r.page_size, 50);
        let start = page_start(&r.page_token)?;
        let statuses = r.statuses;
        let runs = self
            .shared
            .blocking(move |c| {
                let mut ids: Vec<String> = c
                    .store()
                    .runs()
                    .map_err(store_status)?
                    .into_iter()
                    .map(|r| r.id)
                    .collect();
                ids.reverse();
                let mut runs = vec![];
                for id in ids {
                    let run = load_run(c, &id)?;
                    if statuses.is_empty() || statuses.contains(&run.status) {
                        runs.push(run);
                    }
                }
                Ok(runs)
            })
            .await?;
        let next = start + size;
        let next_page_token = if next < runs.len() {
            next.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.into_iter().skip(start).take(size).collect(),
            next_page_token,
        }))
    }

    async fn pause_run(
        &self,
        request: Request<pb::PauseRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let (id, reason) = (run_id(&r.run_id)?, reason(&r.reason)?);
        tracing::info!(run = %id, "pause");
        if forward(
            &self.shared,
            &id,
            AdminCommand::Pause {
                reason: reason.clone(),
            },
        )
        .await?
        {
            return self.forwarded_run(id).await;
        }
        let run = self
            .shared
            .blocking(move |c| command(c, &id, AdminCommand::Pause { reason }))
            .await?;
        Ok(Response::new(run))
    }

    async fn resume_run(
        &self,
        request: Request<pb::ResumeRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let (id, reason) = (run_id(&r.run_id)?, reason(&r.reason)?);
        tracing::info!(run = %id, reason = %reason, "resume");
        if forward(
            &self.shared,
            &id,
            AdminCommand::Resume {
                reason: reason.clone(),
            },
        )
        .await?
        {
            return self.forwarded_run(id).await;
        }
        let run = self
            .shared
            .blocking(move |c| command(c, &id, AdminCommand::Resume { reason }))
            .await?;
        Ok(Response::new(run))
    }

    async fn stop_run(
        &self,
        request: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let (id, reason) = (run_id(&r.run_id)?, reason(&r.reason)?);
        tracing::info!(run = %id, "stop");
        if forward(
            &self.shared,
            &id,
            AdminCommand::Stop {
                reason: reason.clone(),
            },
        )
        .await?
        {
            return self.forwarded_run(id).await;
        }
        let run = self
            .shared
            .blocking(move |c| command(c, &id, AdminCommand::Stop { reason }))
            .await?;
        Ok(Response::new(run))
    }

    async fn rollback_run(
        &self,
        request: Request<pb::RollbackRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let (id, why) = (run_id(&r.run_id)?, reason(&r.reason)?);
        let to = r.model_version;
        tracing::info!(run = %id, to_version = to, "rollback");
        let rollback = AdminCommand::Rollback {
            to_version: to,
            reason: why.clone(),
            params: vec![],
        };
        if forward(&self.shared, &id, rollback).await? {
            return self.forwarded_run(id).await;
        }
        let run = self
            .shared
            .blocking(move |c| {
                let Some(engine) = c.engine(&id) else {
                    c.store().run(&id).map_err(store_status)?;
                    return Err(Status::failed_precondition(format!(
                        "run {id:?} has stopped; nothing can change it"
                    )));
                };
                let current = engine.model().0;
                if to >= current {
                    return Err(invalid(
                        "model_version",
                        format!("{to} is not earlier than the current version {current}"),
                    ));
                }
                let actions = c
                    .rollback(&id, to, &why, now_ms())
                    .map_err(coordinator_status)?;
                for a in actions {
                    if let Action::AdminRefused { message } = a {
                        return Err(Status::failed_precondition(message));
                    }
                }
                load_run(c, &id)
            })
            .await?;
        Ok(Response::new(run))
    }

    async fn list_model_versions(
        &self,
        request: Request<pb::ListModelVersionsRequest>,
    ) -> Result<Response<pb::ListModelVersionsResponse>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let id = run_id(&r.run_id)?;
        let size = page_size(r.page_size, 50);
        let start = page_start(&r.page_token)?;
        let (versions, next_page_token) = self
            .shared
            .blocking(move |c| {
                let record = c.store().run(&id).map_err(store_status)?;
                let entries = decode_entries(&c.store().ledger(&id).map_err(store_status)?)?;
                // Newest first; the ledger says when each was published and what it restores.
                let newest = record.published_version;
                let all: Vec<u64> = (1..=newest).rev().collect();
                let mut out = vec![];
                for &v in all.iter().skip(start).take(size) {
                    let blob = c.store().model(&id, v).map_err(store_status)?;
                    let mut info = pb::ModelVersionInfo {
                        model: Some(pb::ModelVersionRef {
                            run_id: id.clone(),
                            model_version: v,
                            sha256: unhex(&blob.sha256),
                            size_bytes: blob.bytes.len() as u64,
                        }),
                        latest: v == newest,
                        ..Default::default()
                    };
                    for e in &entries {
                        match &e.event {
                            LedgerEvent::ModelPublished { model_version, .. }
                                if *model_version == v =>
                            {
                                info.published_at = Some(timestamp(e.at_ms));
                            }
                            LedgerEvent::RoundCommitted {
                                round,
                                model_version,
                                ..
                            } if *model_version == v => info.produced_by_round = *round,
                            LedgerEvent::RolledBack {
                                to_version,
                                new_version,
                                ..
                            } if *new_version == v => info.restored_model_version = *to_version,
                            _ => {}
                        }
                    }
                    out.push(info);
                }
                let next = start + size;
                let token = if next < all.len() {
                    next.to_string()
                } else {
                    String::new()
                };
                Ok((out, token))
            })
            .await?;
        Ok(Response::new(pb::ListModelVersionsResponse {
            versions,
            next_page_token,
        }))
    }

    async fn read_ledger(
        &self,
        request: Request<pb::ReadLedgerRequest>,
    ) -> Result<Response<pb::ReadLedgerResponse>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let id = run_id(&r.run_id)?;
        let size = page_size(r.page_size, 100);
        let first: u64 = if r.page_token.is_empty() {
            r.start_sequence.max(1)
        } else {
            page_start(&r.page_token)? as u64
        };
        let response = self
            .shared
            .blocking(move |c| {
                let record = c.store().run(&id).map_err(store_status)?;
                let sealed = c.store().ledger(&id).map_err(store_status)?;
                let entries = decode_entries(&sealed)?;
                let head = sealed.last();
                let page: Vec<pb::LedgerEntry> = entries
                    .iter()
                    .zip(&sealed)
                    .filter(|(e, _)| e.sequence >= first)
                    .take(size)
                    .map(|(e, s)| ledger_entry_to_proto(e, s, &record.manifest))
                    .collect();
                let last = page.last().map(|e| e.sequence).unwrap_or(0);
                let head_sequence = head.map(|h| h.sequence).unwrap_or(0);
                Ok(pb::ReadLedgerResponse {
                    next_page_token: if last > 0 && last < head_sequence {
                        (last + 1).to_string()
                    } else {
                        String::new()
                    },
                    entries: page,
                    head_sequence,
                    head_sha256: head.map(|h| unhex(&h.hash)).unwrap_or_default(),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn verify_ledger(
        &self,
        request: Request<pb::VerifyLedgerRequest>,
    ) -> Result<Response<pb::LedgerVerification>, Status> {
        let _permit = self.admit(&request).await?;
        let id = run_id(&request.get_ref().run_id)?;
        let response = self
            .shared
            .blocking(move |c| {
                let record = c.store().run(&id).map_err(store_status)?;
                let sealed = c.store().ledger(&id).map_err(store_status)?;
                let head = sealed.last().map(|h| unhex(&h.hash)).unwrap_or_default();
                Ok(match verify(&id, &sealed) {
                    Ok(t) => pb::LedgerVerification {
                        intact: true,
                        entries_checked: t.entries,
                        first_bad_sequence: 0,
                        problem: String::new(),
                        head_sha256: unhex(&t.head_hash),
                        totals: t
                            .cumulative_epsilon
                            .iter()
                            .map(|a| super::convert::audience_epsilon(a, &record.manifest))
                            .collect(),
                    },
                    Err(f) => pb::LedgerVerification {
                        intact: false,
                        entries_checked: sealed.len() as u64,
                        first_bad_sequence: f.sequence,
                        problem: f.problem,
                        head_sha256: head,
                        totals: vec![],
                    },
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn get_report(
        &self,
        request: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::Report>, Status> {
        let _permit = self.admit(&request).await?;
        let r = request.into_inner();
        let id = run_id(&r.run_id)?;
        let format = match pb::ReportFormat::try_from(r.format) {
            Ok(
                f @ (pb::ReportFormat::Html | pb::ReportFormat::Markdown | pb::ReportFormat::Json),
            ) => f,
            _ => {
                return Err(invalid(
                    "format",
                    "must be REPORT_FORMAT_HTML, REPORT_FORMAT_MARKDOWN or REPORT_FORMAT_JSON",
                ));
            }
        };
        let generated_at = now_ms();
        let report = self
            .shared
            .blocking(move |c| {
                c.store().run(&id).map_err(store_status)?;
                crate::report::ImpactReport::build(c.store(), &id, generated_at).map_err(|e| match e {
                    crate::report::ReportError::Store(e) => store_status(e),
                    other => {
                        tracing::error!(error = %other, "impact report failed");
                        Status::internal("the report could not be rendered; the coordinator logged the cause")
                    }
                })
            })
            .await?;
        let (content, media_type) = match format {
            pb::ReportFormat::Html => (report.to_html(), "text/html; charset=utf-8"),
            pb::ReportFormat::Markdown => (report.to_markdown(), "text/markdown; charset=utf-8"),
            _ => (report.to_json(), "application/json"),
        };
        Ok(Response::new(pb::Report {
            run_id: report.run_id.clone(),
            format: format as i32,
            media_type: media_type.into(),
            content: content.into_bytes(),
            ledger_head_sha256: unhex(&report.ledger.head_sha256),
            ledger_intact: report.ledger.intact,
            generated_at: Some(timestamp(generated_at)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_of_megabytes_is_refused_before_it_reaches_the_ledger() {
        let e = reason(&"x".repeat(3 << 20)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "reason: 3145728 bytes; at most 4096: it is recorded in the ledger for good"
        );
        assert_eq!(reason(&"x".repeat(MAX_REASON_BYTES)).unwrap().len(), 4096);
        assert!(reason("  ").is_err());
    }
}
