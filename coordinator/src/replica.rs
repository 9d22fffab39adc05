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
//! - The admin API works from any replica for everything it reads (runs, ledgers, reports,
//!   model versions — all read from the shared store) and for creating runs (the creating
//!   replica takes the new run's lease in the creating transaction). Commands on a run that
//!   another replica owns (pause, resume, stop, rollback) are refused with
//!   `FAILED_PRECONDITION` naming the owner's endpoint.

use std::sync::Arc;
use std::time::Duration;

use fedpref_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ReplicaConfig};
use crate::coordinator::{Coordinator, CoordinatorError};
use crate::service::{Shared, now_ms};
use crate::store::{LeaseOutcome, RunStatus, Store};

/// Opens the configured store: a plain coordinator with every run loaded, or, with a
/// `[replica]` section, a replica's with fencing on and the leases it could take loaded.
pub fn open(config: &Config) -> Result<Coordinator, CoordinatorError> {
    let location = config.store.location();
    let Some(replica) = &config.replica else {
        return Coordinator::open_location(&location, now_ms());
    };
    let mut store = Store::open_location(&location)?;
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
        if run.status == RunStatus::Stopped && !loaded {
            continue;
        }
        let now = now_ms();
        let step = match c.store_mut().acquire_lease(&run.id) {
            Ok(LeaseOutcome::Acquired { lease, taken_from }) => {
                tracing::info!(run = %run.id, token = lease.token, from = ?taken_from, "run lease taken");
                c.adopt(&run.id, taken_from.as_deref(), now).map(|_| ())
            }
            Ok(LeaseOutcome::Renewed(_)) if !loaded => c.adopt(&run.id, None, now).map(|_| ()),
            Ok(LeaseOutcome::Renewed(_)) => Ok(()),
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

/// Why an admin command on `run_id` cannot run here, if another replica owns it.
pub fn owned_elsewhere(c: &Coordinator, run_id: &str) -> Option<tonic::Status> {
    let endpoint = c.remote_owners().get(run_id)?;
    Some(tonic::Status::failed_precondition(format!(
        "run {run_id:?} is owned by the replica at {endpoint}; send the command to that replica's admin service"
    )))
}
