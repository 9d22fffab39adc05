//! The gRPC services: `fedpref.v1.DeviceService` ([`device`]),
//! `fedpref.v1.SecureAggregationService` ([`secagg`], on the device port) and
//! `fedpref.v1.AdminService` ([`admin`]), thin drivers around the durable [`Coordinator`].
//!
//! - **One lock, never across an await.** The `Coordinator` is synchronous (rusqlite); it
//!   sits behind a `std::sync::Mutex` and every use of it runs on tokio's blocking pool
//!   ([`Shared::blocking`]), which takes the lock, does the store work and lets go before
//!   the future resumes.
//! - **Authentication** ([`auth`]): devices enrol with the app key and then present a
//!   256-bit token whose SHA-256 alone is stored; the admin service wants the admin token.
//!   Secrets are compared in constant time and never logged.
//! - **Limits** ([`limits`]): a per-device token bucket and one semaphore over both services;
//!   overload is refused at once with `RESOURCE_EXHAUSTED` and a retry hint, never queued.
//! - **Validation before the engine**: uploads are checked (header, sizes, chunk order,
//!   shapes, dtypes, finiteness) before anything reaches the aggregate.
//! - **Caches of immutable facts** (manifests, model hashes and sizes, token hash → device)
//!   keep check-ins and authentication off the store after the first time.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod device;
pub mod limits;
pub mod secagg;
pub mod upload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedpref_proto::v1 as pb;
use tonic::Status;

use crate::config::Limits;
use crate::coordinator::{Coordinator, CoordinatorError};
use crate::manifest::RunManifest;
use crate::store::StoreError;

/// Entries a cache holds before it is emptied (they are cheap to rebuild).
const CACHE_LIMIT: usize = 100_000;

/// Facts that never change once written — a run's manifest, a model version's hash and size,
/// the device a token hash belongs to — kept so that check-ins and authentication do not
/// parse TOML, read snapshots or query the store every time. Device tokens cannot be revoked
/// yet; when they can, revocation must evict `devices` too.
#[derive(Default)]
struct Caches {
    manifests: Mutex<HashMap<String, Arc<RunManifest>>>,
    model_refs: Mutex<HashMap<(String, u64), pb::ModelVersionRef>>,
    devices: Mutex<HashMap<String, String>>,
}

fn remember<K: std::hash::Hash + Eq, V>(map: &Mutex<HashMap<K, V>>, key: K, value: V) {
    if let Ok(mut m) = map.lock() {
        if m.len() >= CACHE_LIMIT {
            m.clear();
        }
        m.insert(key, value);
    }
}

/// What both services share.
pub struct Shared {
    coordinator: Arc<Mutex<Coordinator>>,
    /// Run ids, oldest first: the order in which check-ins are offered to runs.
    run_order: Mutex<Vec<String>>,
    /// SHA-256 of the app key.
    app_key_sha256: [u8; 32],
    /// SHA-256 of the admin token.
    admin_token_sha256: [u8; 32],
    /// The configured limits.
    pub limits: Limits,
    /// Per-device rate limits.
    pub rate: limits::RateLimiter,
    /// The concurrency limit over both services.
    pub concurrency: limits::Concurrency,
    caches: Caches,
    /// Prometheus metrics (also fed by the coordinator's engine steps).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The enrolment grant keys (the coordinator's, copied so that `Enroll` checks a grant's
    /// signature without holding the coordinator's lock).
    pub grant_keys: crate::enrolment::GrantKeys,
}

impl Shared {
    /// Wraps an open coordinator with the deployment's secrets and limits.
    pub fn new(
        coordinator: Coordinator,
        app_key: &str,
        admin_token: &str,
        limits: Limits,
    ) -> Result<Arc<Self>, CoordinatorError> {
        let mut coordinator = coordinator;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        coordinator.set_metrics(Arc::clone(&metrics));
        let run_order = coordinator
            .store()
            .runs()?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let grant_keys = coordinator.grant_keys().clone();
        Ok(Arc::new(Self {
            coordinator: Arc::new(Mutex::new(coordinator)),
            run_order: Mutex::new(run_order),
            app_key_sha256: auth::sha256(app_key.as_bytes()),
            admin_token_sha256: auth::sha256(admin_token.as_bytes()),
            rate: limits::RateLimiter::new(limits.device_requests_per_second, limits.device_burst),
            concurrency: limits::Concurrency::new(limits.max_concurrent_requests),
            limits,
            caches: Caches::default(),
            metrics,
            grant_keys,
        }))
    }

    /// The coordinator, for the ticker and for shutdown.
    pub fn coordinator(&self) -> Arc<Mutex<Coordinator>> {
        Arc::clone(&self.coordinator)
    }

    /// Runs `f` with the coordinator locked, on the blocking pool. The lock is taken and
    /// released inside the blocking task, so it is never held across an await. (One dedicated
    /// thread fed over a channel was measured too: it cost more CPU per upload and more memory
    /// under `benches/upload_load.rs`, because the blocking call before an upload's chunks are
    /// read also paces how many uploads are decoded at once.)
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Coordinator) -> Result<T, Status> + Send + 'static,
    {
        let coordinator = Arc::clone(&self.coordinator);
        tokio::task::spawn_blocking(move || {
            let mut guard = coordinator
                .lock()
                .map_err(|_| Status::internal("the coordinator is unavailable after a failure"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "store task failed");
            Status::internal("internal error")
        })?
    }

    /// Like [`Shared::blocking`], for calls that usually stay in memory: when the
    /// coordinator's lock is free and `in_memory` says that `f` will not touch the store, `f`
    /// runs right here, without the trip to the blocking pool and its thread wake-ups
    /// (measured: about three context switches per upload). Otherwise `f` waits its turn on the
    /// blocking pool like any other call. `in_memory` only decides where `f` runs; a wrong
    /// answer costs a short store write on this thread, never correctness.
    pub async fn in_memory_if<T, P, F>(&self, in_memory: P, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        P: FnOnce(&Coordinator) -> bool,
        F: FnOnce(&mut Coordinator) -> Result<T, Status> + Send + 'static,
    {
        let f = match self.coordinator.try_lock() {
            Ok(mut guard) if in_memory(&guard) => return f(&mut guard),
            Ok(_) | Err(std::sync::TryLockError::WouldBlock) => f,
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err(Status::internal(
                    "the coordinator is unavailable after a failure",
                ));
            }
        };
        self.blocking(f).await
    }

    /// Run ids, oldest first.
    pub fn run_order(&self) -> Vec<String> {
        self.run_order.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Replaces the run order (a replica learns of runs created at other replicas).
    pub fn set_run_order(&self, ids: Vec<String>) {
        if let Ok(mut order) = self.run_order.lock() {
            *order = ids;
        }
    }

    /// A run's manifest (immutable once the run exists).
    pub fn manifest(&self, c: &Coordinator, run_id: &str) -> Result<Arc<RunManifest>, Status> {
        if let Some(m) = self.cached_manifest(run_id) {
            return Ok(m);
        }
        let m = Arc::new(c.store().run(run_id).map_err(store_status)?.manifest);
        remember(&self.caches.manifests, run_id.to_string(), Arc::clone(&m));
        Ok(m)
    }

    /// A run's manifest if it is cached, without the coordinator's lock.
    pub fn cached_manifest(&self, run_id: &str) -> Option<Arc<RunManifest>> {
        self.caches
            .manifests
            .lock()
            .ok()
            .and_then(|m| m.get(run_id).cloned())
    }

    /// A model version's reference: SHA-256 and size of its encoded snapshot (immutable).
    pub fn model_ref(
        &self,
        c: &Coordinator,
        run_id: &str,
        version: u64,
    ) -> Result<pb::ModelVersionRef, Status> {
        let key = (run_id.to_string(), version);
        if let Some(r) = self
            .caches
            .model_refs
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return Ok(r);
        }
        let blob = c.store().model(run_id, version).map_err(store_status)?;
        let r = pb::ModelVersionRef {
            run_id: run_id.to_string(),
            model_version: version,
            sha256: unhex(&blob.sha256),
            size_bytes: blob.bytes.len() as u64,
        };
        remember(&self.caches.model_refs, key, r.clone());
        Ok(r)
    }

    /// The device id a token hash (hex) was enrolled with, if it has been seen.
    fn cached_device(&self, token_sha256: &str) -> Option<String> {
        self.caches
            .devices
            .lock()
            .ok()
            .and_then(|m| m.get(token_sha256).cloned())
    }

    fn remember_device(&self, token_sha256: String, device_id: String) {
        remember(&self.caches.devices, token_sha256, device_id);
    }

    fn add_run(&self, run_id: &str) {
        if let Ok(mut v) = self.run_order.lock() {
            v.push(run_id.to_string());
        }
    }
}

/// Current time, ms since the Unix epoch (the services' clock; the engine gets it as an
/// argument).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Maps a driver failure to a status. Store and model failures are logged and answered with
/// a generic `INTERNAL`, so no database detail reaches a device.
pub fn coordinator_status(e: CoordinatorError) -> Status {
    match e {
        CoordinatorError::NoSuchRun(id) => Status::not_found(format!("no run with id {id:?}")),
        CoordinatorError::Store(StoreError::NoSuchRun(id)) => {
            Status::not_found(format!("no run with id {id:?}"))
        }
        CoordinatorError::Store(StoreError::NoSuchVersion { run, version }) => {
            Status::not_found(format!("run {run:?} has no model version {version}"))
        }
        CoordinatorError::Store(StoreError::RunExists(id)) => {
            Status::already_exists(format!("a run with id {id:?} exists already"))
        }
        CoordinatorError::Refused(message) => Status::failed_precondition(message),
        other => {
            tracing::error!(error = %other, "coordinator failure");
            Status::internal("internal error; the coordinator logged the cause")
        }
    }
}

/// Maps a store failure to a status (see [`coordinator_status`]).
pub fn store_status(e: StoreError) -> Status {
    coordinator_status(CoordinatorError::Store(e))
}

pub use crate::coordinator::shorten;

/// `PERMISSION_DENIED` unless `device` was given a task in `run_id` (or took part in one of
/// its rounds). Every device call that names a run checks this first, so that to a device
/// without a task an unknown run and a run it may not see get the same answer, and nothing
/// about the run (its round, its model versions, whether it is active) is told.
pub fn require_task_in_run(c: &Coordinator, run_id: &str, device: &str) -> Result<(), Status> {
    if c.may_download(run_id, device).map_err(coordinator_status)? {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "run_id: this device has no task in run {run_id:?} (or there is no such run)"
        )))
    }
}

/// `INVALID_ARGUMENT` naming `field` unless `id` can name a run
/// ([`crate::coordinator::is_run_id`]), checked before any lookup so that no error quotes an
/// arbitrary string.
pub fn check_run_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if !crate::coordinator::is_run_id(id) {
        return Err(invalid(
            field,
            format!(
                "{:?} is not a run id (1 to {} ASCII letters, digits, '-' or '_')",
                shorten(id),
                crate::coordinator::MAX_RUN_ID_LEN
            ),
        ));
    }
    Ok(())
}

/// `INVALID_ARGUMENT` naming the field.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// A protobuf timestamp from ms since the epoch.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration from ms (negative values become 0).
pub fn duration(ms: i64) -> prost_types::Duration {
    let ms = ms.max(0);
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Raw bytes of a hex digest (empty if it is not hex).
pub fn unhex(s: &str) -> Vec<u8> {
    if !s.len().is_multiple_of(2) {
        return vec![];
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .unwrap_or_default()
}

use fedpref_proto::prost_types;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_id_of_megabytes_is_refused_without_being_quoted_back() {
        let huge = "x".repeat(3 << 20);
        let e = check_run_id("task.run_id", &huge).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("task.run_id: \"xxxx"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("(3145728 bytes)"), "{}", e.message());
        assert!(e.message().len() < 200, "{} bytes", e.message().len());
        let e = check_run_id("run_id", "run/../x").unwrap_err();
        assert!(e.message().contains("is not a run id"), "{}", e.message());
        assert!(
            check_run_id("run_id", "")
                .unwrap_err()
                .message()
                .ends_with("must not be empty")
        );
        assert!(check_run_id("run_id", &"r".repeat(128)).is_ok());
        assert!(check_run_id("run_id", &"r".repeat(129)).is_err());
    }

    #[test]
    fn shorten_keeps_short_strings_and_cuts_long_ones_on_a_character_boundary() {
        assert_eq!(shorten("run-1"), "run-1");
        let long = "é".repeat(100);
        let short = shorten(&long);
        assert!(short.starts_with(&"é".repeat(64)), "{short}");
        assert!(short.ends_with("… (200 bytes)"), "{short}");
    }
}
