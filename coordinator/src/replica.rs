//! Several coordinator replicas on one database: each run is owned by one replica at a time
//! through a lease row ([`crate::store::Store::acquire_lease`]), and every write a run makes
//! is fenced by the lease's token, so a replica that lost its lease cannot commit.
//!
//! - [`open`] opens the store with fencing on and takes the leases it can; [`spawn`] renews
//!   them every `renew_millis`, takes runs whose lease lapsed or was released (resuming from
//!   the store: the round in flight at the old owner is recorded as abandoned, nothing of it
//!   spent) and unloads runs another replica now holds. On shutdown the leases are released
//!   so another replica takes over at once.
//! - A device checking in at a replica that owns no run with work for it is answered with a
//!   `Redirect` to the owner's advertised endpoint ([`redirect`]), not proxied: a proxy would
//!   put a second hop (and a second TLS session) on every upload chunk and tie the device's
//!   stream to two processes' lifetimes, while a redirect costs one extra check-in and lets
//!   the load balancer spread only the first contact.
//! - The admin API works from any replica. Reads (runs, ledgers, reports, model versions) come
//!   from the shared store; a run is created by the replica asked, which takes its lease in the
//!   creating transaction. A command on a run another replica owns (pause, resume, stop,
//!   rollback) is forwarded through the database ([`forward`]): queued in `admin_commands`,
//!   claimed and applied by the owner on its next lease pass (fenced, like every write the run
//!   makes), and answered here once the owner recorded the outcome — within `renew_millis`
//!   plus a poll. A command nobody claimed within [`FORWARD_TIMEOUT`] is withdrawn and
//!   answered `UNAVAILABLE`.

use std::sync::Arc;
use std::time::Duration;

use fedpref_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ReplicaConfig};
use crate::coordinator::{Coordinator, CoordinatorError};
use crate::engine::{Action, AdminCommand, Event};
use crate::service::{Shared, coordinator_status, now_ms};
use crate::store::{LeaseOutcome, RunStatus, Store};

/// Opens the configured store: a plain coordinator with every run loaded, or, with a
/// `[replica]` section, a replica's with fencing on and the leases it could take loaded.
pub fn open(config: &Config) -> Result<Coordinator, CoordinatorError> {
    let location = config.store.location();
    let mut store = Store::open_location(&location)?;
    store.set_ledger_signer(
        config
            .ledger_signer()
            .map_err(|e| CoordinatorError::Refused(e.to_string()))?,
    );
    let Some(replica) = &config.replica else {
        return Coordinator::with_store(store, now_ms());
    };
    store.enable_fencing(&replica.id, &replica.advertise, replica.lease_millis);
    let mut coordinator = Coordinator::replica(store)?;
    let _ = renew(&mut coordinator)?;
    Ok(coordinator)
}

/// One pass over every run's lease; returns the ids of all runs, oldest first.
pub fn renew(c: &mut Coordinator) -> Result<Vec<String>, CoordinatorError> {
    let runs = c.store().runs()?;
    let mut first_error = None;
    for run in &runs {
        let loaded = c.engine(&run.id).is_some();
        if run.status == RunStatus::Stopped {
            // A stopped run needs no owner (its ledger is closed, its last version published
            // in the same critical section as the stop): the lease is let go and no device is
            // sent anywhere for it.
            if loaded && let Err(e) = c.store_mut().release_lease(&run.id) {
                tracing::warn!(run = %run.id, error = %e, "releasing a stopped run's lease failed");
            }
            c.disown(&run.id, None);
            continue;
        }
        let now = now_ms();
        let step = match c.store_mut().acquire_lease(&run.id) {
            Ok(LeaseOutcome::Acquired { lease, taken_from }) => {
                tracing::info!(run = %run.id, token = lease.token, from = ?taken_from, "run lease taken");
                if taken_from.as_deref() == c.store().replica_id() {
                    tracing::warn!(run = %run.id, "run lease taken over from an earlier process of this replica that stopped without releasing it (two live processes configured with one replica id would take it from each other)");
                }
                c.adopt(&run.id, taken_from.as_deref(), now)
                    .and_then(|_| apply_forwarded(c, &run.id))
            }
            Ok(LeaseOutcome::Renewed(_)) if !loaded => c.adopt(&run.id, None, now).map(|_| ()),
            Ok(LeaseOutcome::Renewed(_)) => apply_forwarded(c, &run.id),
            Ok(LeaseOutcome::HeldBy(lease)) => {
                if loaded {
                    tracing::warn!(run = %run.id, owner = %lease.owner, "run lease held by another replica: run unloaded");
                }
                c.disown(&run.id, Some(lease.owner_endpoint));
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = step {
            tracing::error!(run = %run.id, error = %e, "lease step failed");
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(runs.into_iter().map(|r| r.id).collect()),
    }
}

/// Renews leases every `renew_millis` until `stop` changes, then releases them.
pub fn spawn(
    shared: &Arc<Shared>,
    replica: &ReplicaConfig,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let shared = Arc::clone(shared);
    let every = Duration::from_millis(replica.renew_millis);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = interval.tick() => {
                    let result = shared
                        .blocking(|c| renew(c).map_err(|e| tonic::Status::internal(e.to_string())))
                        .await;
                    match result {
                        Ok(order) => shared.set_run_order(order),
                        Err(e) => tracing::error!(error = %e.message(), "renewing leases failed"),
                    }
                }
            }
        }
        let released = shared
            .blocking(|c| {
                for run in c.loaded_runs() {
                    if let Err(e) = c.store_mut().release_lease(&run) {
                        tracing::warn!(run = %run, error = %e, "releasing the lease failed");
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e.message(), "releasing leases failed");
        }
    })
}

/// The answer to a device that checked in at a replica with no work for it while another
/// replica owns a run: check in there. `None` when no other replica owns a run.
pub fn redirect(c: &Coordinator, valid_for: Duration) -> Option<pb::CheckInResponse> {
    let (_, endpoint) = c.remote_owners().iter().next()?;
    Some(pb::CheckInResponse {
        outcome: Some(pb::check_in_response::Outcome::Redirect(pb::Redirect {
            endpoint: endpoint.clone(),
            valid_for: Some(crate::service::duration(valid_for.as_millis() as i64)),
        })),
        latest_model: None,
    })
}

/// How long [`forward`] waits for the owning replica to take a command.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome the owner records: a gRPC code (0 for success) and a message.
#[derive(serde::Serialize, serde::Deserialize)]
struct Outcome {
    code: i32,
    message: String,
}

/// Sends `command` to the replica that owns `run_id`, if another one does, and waits for its
/// outcome. `Ok(true)`: the owner applied it; `Ok(false)`: this replica owns the run (or
/// nobody does, or this is no replica) — handle it here.
pub async fn forward(
    shared: &Arc<Shared>,
    run_id: &str,
    command: AdminCommand,
) -> Result<bool, tonic::Status> {
    let run = run_id.to_string();
    let json = serde_json::to_string(&command).expect("serialisable");
    let queued = shared
        .blocking(move |c| {
            let Some(me) = c.store().replica_id().map(str::to_string) else {
                return Ok(None);
            };
            if c.engine(&run).is_some() {
                return Ok(None);
            }
            let lease = c
                .store()
                .lease(&run)
                .map_err(crate::service::store_status)?;
            let now = c
                .store()
                .database_now_ms()
                .map_err(crate::service::store_status)?;
            match lease {
                Some(l) if !l.owner.is_empty() && l.owner != me && l.expires_at_ms > now => {}
                _ => return Ok(None),
            }
            let id = format!("{me}-{:016x}", rand::random::<u64>());
            c.store()
                .enqueue_admin_command(&id, &run, &json, now_ms())
                .map_err(crate::service::store_status)?;
            Ok(Some(id))
        })
        .await?;
    let Some(id) = queued else {
        return Ok(false);
    };
    tracing::info!(run = %run_id, command = %id, "admin command forwarded to the owning replica");
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let poll_id = id.clone();
        let state = shared
            .blocking(move |c| {
                c.store()
                    .admin_command(&poll_id)
                    .map_err(crate::service::store_status)
            })
            .await?;
        match state {
            Some((status, result)) if status == "done" || status == "failed" => {
                let outcome: Outcome = serde_json::from_str(&result).map_err(|_| {
                    tonic::Status::internal("the owning replica recorded an unreadable outcome")
                })?;
                if outcome.code == 0 {
                    return Ok(true);
                }
                return Err(tonic::Status::new(
                    tonic::Code::from_i32(outcome.code),
                    outcome.message,
                ));
            }
            _ if tokio::time::Instant::now() < deadline => continue,
            _ => {
                let cancel_id = id.clone();
                let withdrawn = shared
                    .blocking(move |c| {
                        c.store()
                            .cancel_admin_command(&cancel_id)
                            .map_err(crate::service::store_status)
                    })
                    .await?;
                return Err(tonic::Status::unavailable(if withdrawn {
                    format!(
                        "the replica that owns run {run_id:?} did not take the command within {} s; it was withdrawn",
                        FORWARD_TIMEOUT.as_secs()
                    )
                } else {
                    format!(
                        "the replica that owns run {run_id:?} took the command but has not finished it; check the run"
                    )
                }));
            }
        }
    }
}

/// Applies the admin commands other replicas queued for a run this replica owns.
fn apply_forwarded(c: &mut Coordinator, run_id: &str) -> Result<(), CoordinatorError> {
    if c.engine(run_id).is_none() {
        return Ok(());
    }
    for (id, json) in c.store_mut().claim_admin_commands(run_id)? {
        let result = match serde_json::from_str::<AdminCommand>(&json) {
            Ok(command) => apply(c, run_id, command),
            Err(e) => Err(tonic::Status::invalid_argument(format!(
                "unreadable forwarded command: {e}"
            ))),
        };
        let outcome = match &result {
            Ok(()) => Outcome {
                code: 0,
                message: String::new(),
            },
            Err(s) => Outcome {
                code: s.code() as i32,
                message: s.message().to_string(),
            },
        };
        tracing::info!(run = %run_id, command = %id, ok = result.is_ok(), "forwarded admin command applied");
        c.store().finish_admin_command(
            &id,
            result.is_ok(),
            &serde_json::to_string(&outcome).expect("serialisable"),
        )?;
    }
    Ok(())
}

fn apply(c: &mut Coordinator, run_id: &str, command: AdminCommand) -> Result<(), tonic::Status> {
    let actions = match command {
        AdminCommand::Rollback {
            to_version, reason, ..
        } => {
            let current = c.engine(run_id).map(|e| e.model().0).unwrap_or(0);
            if to_version >= current {
                return Err(crate::service::invalid(
                    "model_version",
                    format!("{to_version} is not earlier than the current version {current}"),
                ));
            }
            c.rollback(run_id, to_version, &reason, now_ms())
        }
        other => c.handle(run_id, Event::Admin(other), now_ms()),
    }
    .map_err(coordinator_status)?;
    for a in actions {
        if let Action::AdminRefused { message } = a {
            return Err(tonic::Status::failed_precondition(message));
        }
    }
    Ok(())
}
