//! The coordinator's durable state, in SQLite or PostgreSQL: runs and manifests, rounds,
//! model versions (kept for rollback), the privacy ledger, participations (opaque device id,
//! round), enrolled devices (id and token hash), the noised sums of federated-evaluation releases, and the
//! runs' leases when several replicas share one PostgreSQL database.
//!
//! - One [`Store`] type, two backends (module `backend`): the queries are written once in
//!   standard SQL with positional parameters; [`Store::open`] opens a SQLite file,
//!   [`Store::open_postgres`] a PostgreSQL database, [`Store::open_location`] either.
//! - Migrations are numbered SQL scripts, one list per dialect kept side by side
//!   ([`MIGRATIONS`] for SQLite, [`POSTGRES_MIGRATIONS`]); they differ only where the
//!   dialects do (`BLOB` / `BYTEA`, and PostgreSQL's privileges on the ledger). Each is applied
//!   in order inside a transaction and recorded in `schema_migrations`.
//! - Everything a round commits — the round row, its participations, its ledger entry, the
//!   model version it produced and the run's counters — is one transaction
//!   ([`Store::commit_round`]); publishing that version is a second, later one
//!   ([`Store::publish`]), so the ledger entry is always durable before the model is visible.
//!   A crash between the two leaves a committed, unpublished version that
//!   [`crate::coordinator::Coordinator::open`] publishes on restart, spending nothing twice.
//! - The ledger is append-only: on PostgreSQL, migration 4 revokes `UPDATE`, `DELETE` and
//!   `TRUNCATE` on it from the role that runs the migrations (the coordinator's role) and from
//!   `PUBLIC`.
//! - Leases and fencing ([`Store::enable_fencing`], [`Store::acquire_lease`]): a replica
//!   holds a run through a row of `run_leases` (owner, fencing token, expiry by the
//!   database's clock); every write a run makes checks, inside its own transaction and under
//!   the lease row's lock, that the token it holds is still the row's and has not lapsed. A
//!   replica that lost its lease therefore cannot commit a round or append to the ledger.
//! - Individual updates are never written here.

mod backend;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use backend::{Conn, Dialect, Row, Tx, Value, now_ms_sql, vals};

use fedpref_privacy::evaluation::{COORDINATES, EvaluationSum};

use crate::ledger::{GENESIS_HASH, LedgerEntry, LedgerEvent, SealedEntry, seal};
use crate::manifest::RunManifest;
use crate::model::ModelBlob;

/// The SQLite schema, one script per version (the PostgreSQL one, [`POSTGRES_MIGRATIONS`],
/// is the same schema in its dialect).
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    manifest_toml TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    rounds_committed BIGINT NOT NULL,
    next_round BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    published_version BIGINT NOT NULL,
    server_state TEXT NOT NULL
);
CREATE TABLE model_versions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    version BIGINT NOT NULL,
    round BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    snapshot BLOB NOT NULL,
    created_at_ms BIGINT NOT NULL,
    published_at_ms BIGINT,
    PRIMARY KEY (run_id, version)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    contributions BIGINT NOT NULL,
    closed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE participations (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, round, device_id)
);
CREATE INDEX participations_by_device ON participations (device_id, run_id);
CREATE TABLE ledger (
    run_id TEXT NOT NULL REFERENCES runs(id),
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
    // 2: enrolled devices (only the SHA-256 of each token is kept) and the sums of the
    // devices' federated-evaluation counts, per run, model version and activity cohort.
    r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    sdk_version TEXT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL
);
CREATE TABLE evaluation_counts (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    cohort TEXT NOT NULL,
    reports BIGINT NOT NULL,
    recommendation_lists_shown BIGINT NOT NULL,
    recommendations_shown BIGINT NOT NULL,
    injected_recommendations_shown BIGINT NOT NULL,
    positive_feedback_count BIGINT NOT NULL,
    negative_feedback_count BIGINT NOT NULL,
    personalisation_opt_outs BIGINT NOT NULL,
    training_opt_outs BIGINT NOT NULL,
    predictions_evaluated BIGINT NOT NULL,
    predictions_within_half BIGINT NOT NULL,
    PRIMARY KEY (run_id, model_version, cohort)
);
"#,
    // 3: the evaluation sums the guardrail metrics also need (diversity, topic coverage,
    // devices that opted out, the windows covered), and which devices reported on which
    // model version, so a guardrail counts distinct devices rather than reports.
    r#"
ALTER TABLE evaluation_counts ADD COLUMN intra_list_diversity_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN opted_out_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN window_start_ms BIGINT;
ALTER TABLE evaluation_counts ADD COLUMN window_end_ms BIGINT;
CREATE TABLE evaluation_reporters (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, device_id)
);
"#,
    // 4: run leases, for replicas sharing one database (see Store::acquire_lease).
    r#"
CREATE TABLE run_leases (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    owner TEXT NOT NULL,
    owner_endpoint TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
"#,
    // 5: admin commands sent to a replica that does not own the run, for the owner to apply
    // (see crate::replica::forward).
    r#"
CREATE TABLE admin_commands (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX admin_commands_by_run ON admin_commands (run_id, status);
"#,
    // 6: federated evaluation as a DP release: the sums of the devices' released, noised
    // rates per model version (no device identity, no time, no raw count); the raw counts
    // and the table of which device reported on which version are dropped.
    r#"
DROP TABLE evaluation_reporters;
DROP TABLE evaluation_counts;
CREATE TABLE evaluation_releases (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    reports BIGINT NOT NULL,
    sums TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version)
);
"#,
    // 7: the ledger signing key's signature of each run's head after every entry (see
    // crate::checkpoint), written in the entry's transaction.
    r#"
CREATE TABLE ledger_signatures (
    run_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
];

/// The PostgreSQL schema, one script per version, version for version the same as
/// [`MIGRATIONS`].
pub const POSTGRES_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    manifest_toml TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    rounds_committed BIGINT NOT NULL,
    next_round BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    published_version BIGINT NOT NULL,
    server_state TEXT NOT NULL
);
CREATE TABLE model_versions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    version BIGINT NOT NULL,
    round BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    snapshot BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    published_at_ms BIGINT,
    PRIMARY KEY (run_id, version)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    contributions BIGINT NOT NULL,
    closed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE participations (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, round, device_id)
);
CREATE INDEX participations_by_device ON participations (device_id, run_id);
CREATE TABLE ledger (
    run_id TEXT NOT NULL REFERENCES runs(id),
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
    // 2: enrolled devices (only the SHA-256 of each token is kept) and the sums of the
    // devices' federated-evaluation counts, per run, model version and activity cohort.
    r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    sdk_version TEXT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL
);
CREATE TABLE evaluation_counts (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    cohort TEXT NOT NULL,
    reports BIGINT NOT NULL,
    recommendation_lists_shown BIGINT NOT NULL,
    recommendations_shown BIGINT NOT NULL,
    injected_recommendations_shown BIGINT NOT NULL,
    positive_feedback_count BIGINT NOT NULL,
    negative_feedback_count BIGINT NOT NULL,
    personalisation_opt_outs BIGINT NOT NULL,
    training_opt_outs BIGINT NOT NULL,
    predictions_evaluated BIGINT NOT NULL,
    predictions_within_half BIGINT NOT NULL,
    PRIMARY KEY (run_id, model_version, cohort)
);
"#,
    // 3: the evaluation sums the guardrail metrics also need (diversity, topic coverage,
    // devices that opted out, the windows covered), and which devices reported on which
    // model version, so a guardrail counts distinct devices rather than reports.
    r#"
ALTER TABLE evaluation_counts ADD COLUMN intra_list_diversity_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN opted_out_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN window_start_ms BIGINT;
ALTER TABLE evaluation_counts ADD COLUMN window_end_ms BIGINT;
CREATE TABLE evaluation_reporters (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, device_id)
);
"#,
    // 4: run leases, for replicas sharing one database (see Store::acquire_lease), and the
    // ledger made append-only for the role that runs the coordinator: it keeps SELECT and
    // INSERT, loses UPDATE, DELETE and TRUNCATE (as does PUBLIC). A table's owner could grant
    // them back to itself; a deployment that wants that impossible too runs the migrations as
    // a separate owner role and the coordinator as a role granted SELECT, INSERT only.
    r#"
CREATE TABLE run_leases (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    owner TEXT NOT NULL,
    owner_endpoint TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
REVOKE UPDATE, DELETE, TRUNCATE ON ledger FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger FROM CURRENT_USER;
"#,
    // 5: admin commands sent to a replica that does not own the run, for the owner to apply
    // (see crate::replica::forward).
    r#"
CREATE TABLE admin_commands (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX admin_commands_by_run ON admin_commands (run_id, status);
"#,
    // 6: federated evaluation as a DP release: the sums of the devices' released, noised
    // rates per model version (no device identity, no time, no raw count); the raw counts
    // and the table of which device reported on which version are dropped.
    r#"
DROP TABLE evaluation_reporters;
DROP TABLE evaluation_counts;
CREATE TABLE evaluation_releases (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    reports BIGINT NOT NULL,
    sums TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version)
);
"#,
    // 7: as in SQLite, and append-only like the ledger.
    r#"
CREATE TABLE ledger_signatures (
    run_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_signatures FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_signatures FROM CURRENT_USER;
"#,
];

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// PostgreSQL said no.
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    /// This replica no longer holds the run's lease (a newer owner took it, or it lapsed):
    /// the write was refused and nothing of it was stored.
    #[error("run {run}: replica {replica:?} may not write: {why}")]
    LeaseLost {
        /// The run.
        run: String,
        /// This replica.
        replica: String,
        /// What the lease row said.
        why: String,
    },
    /// The run does not exist.
    #[error("no run with id {0:?}")]
    NoSuchRun(String),
    /// A run with this id exists already.
    #[error("a run with id {0:?} exists already")]
    RunExists(String),
    /// The model version does not exist.
    #[error("run {run}: no model version {version}")]
    NoSuchVersion {
        /// The run.
        run: String,
        /// The version.
        version: u64,
    },
    /// Stored data does not parse.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The database was written by a newer fedpref.
    #[error("the database schema is version {found}, newer than this build's {supported}")]
    TooNew {
        /// Found.
        found: i64,
        /// Supported.
        supported: i64,
    },
}

/// A run's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Rounds run.
    Active,
    /// No rounds until resumed.
    Paused,
    /// Finished: completed, budget exhausted or stopped; see the ledger's last entry.
    Stopped,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(Self::Active),
            "paused" => Ok(Self::Paused),
            "stopped" => Ok(Self::Stopped),
            other => Err(StoreError::Corrupt(format!("unknown run status {other:?}"))),
        }
    }
}

/// A run as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The id.
    pub id: String,
    /// The manifest.
    pub manifest: RunManifest,
    /// Its SHA-256.
    pub manifest_sha256: String,
    /// Its status.
    pub status: RunStatus,
    /// Rounds committed so far.
    pub rounds_committed: u64,
    /// The next round number to open (committed and abandoned rounds both use one).
    pub next_round: u64,
    /// The newest model version (committed, maybe not yet published).
    pub current_version: u64,
    /// The newest published model version.
    pub published_version: u64,
    /// The server optimiser's state, as JSON.
    pub server_state: String,
}

/// What a round commits, in one transaction.
#[derive(Clone, Debug)]
pub struct RoundCommit<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The round number.
    pub round: u64,
    /// Opaque ids of the devices whose updates were aggregated.
    pub participants: &'a [String],
    /// The model version produced.
    pub model: &'a ModelBlob,
    /// The server optimiser's state after the round, as JSON.
    pub server_state: &'a str,
    /// The round's ledger event (`RoundCommitted`).
    pub event: LedgerEvent,
    /// A final event to append in the same transaction when the round ends the run.
    pub stop: Option<LedgerEvent>,
    /// The coordinator's clock.
    pub at_ms: i64,
}

/// Reads the noised evaluation sum of (run, version) inside a transaction.
fn read_evaluation_sum(
    tx: &mut Tx<'_>,
    run_id: &str,
    version: i64,
) -> Result<EvaluationSum, StoreError> {
    match tx.query_opt(
        "SELECT reports, sums FROM evaluation_releases WHERE run_id = ?1 AND model_version = ?2",
        vals![run_id, version],
    )? {
        Some(r) => evaluation_sum_from(r.u64(0)?, &r.text(1)?),
        None => Ok(EvaluationSum::default()),
    }
}

fn evaluation_sum_from(reports: u64, sums: &str) -> Result<EvaluationSum, StoreError> {
    let sums: [f64; COORDINATES] = serde_json::from_str(sums)
        .map_err(|e| StoreError::Corrupt(format!("evaluation sums {sums:?}: {e}")))?;
    if sums.iter().any(|v| !v.is_finite()) {
        return Err(StoreError::Corrupt(format!(
            "evaluation sums {sums:?}: not finite"
        )));
    }
    Ok(EvaluationSum { reports, sums })
}

/// The rows a run's lease keeps (see [`Store::acquire_lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The run.
    pub run_id: String,
    /// The replica that holds (or last held) it.
    pub owner: String,
    /// Where that replica serves devices, for redirects.
    pub owner_endpoint: String,
    /// The fencing token: raised by one every time the lease changes hands.
    pub token: u64,
    /// When it lapses unless renewed, by the database's clock (ms since the epoch).
    pub expires_at_ms: i64,
}

/// What [`Store::acquire_lease`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// This replica took the lease: it was free, released or lapsed (the token went up).
    Acquired {
        /// The lease now held.
        lease: Lease,
        /// The replica whose lease lapsed, if it was taken over (not free or released).
        taken_from: Option<String>,
    },
    /// This replica held it and renewed it (same token).
    Renewed(Lease),
    /// Another replica holds it and it has not lapsed.
    HeldBy(Lease),
}

/// A replica's identity and the leases it believes it holds.
#[derive(Clone, Debug)]
struct Fencing {
    replica_id: String,
    endpoint: String,
    lease_ms: i64,
    tokens: std::collections::HashMap<String, u64>,
}

/// The store: SQLite or PostgreSQL behind one interface.
pub struct Store {
    conn: Mutex<Conn>,
    dialect: Dialect,
    fencing: Option<Fencing>,
    signer: Option<crate::checkpoint::LedgerSigner>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Ok(conn) = self.conn.get_mut() {
            conn.close_off_runtime();
        }
    }
}

/// The SQLite connection of a store, for tests that tamper with the database.
pub struct SqliteConnection<'a>(MutexGuard<'a, Conn>);

impl std::ops::Deref for SqliteConnection<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match &*self.0 {
            Conn::Sqlite(c) => c,
            Conn::Postgres(_) | Conn::Closed => unreachable!("checked by Store::connection"),
        }
    }
}

/// Whether `location` names a PostgreSQL database (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies pending
    /// migrations.
    /// A new database file is created with mode 0600 (on Unix): it holds device token hashes
    /// and who took part in which round. SQLite gives its `-wal` and `-shm` files the same
    /// mode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private_file(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::init_sqlite(conn)
    }

    /// An in-memory SQLite store, for tests and simulations.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init_sqlite(Connection::open_in_memory()?)
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host:port/db`, TLS off:
    /// run it on a private network or a local socket) and applies pending migrations.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let client = postgres::Client::connect(url, postgres::NoTls)?;
        Self::init(Conn::Postgres(Box::new(client)))
    }

    /// Opens `location`: a `postgres://` URL, or else a SQLite file path.
    pub fn open_location(location: &str) -> Result<Self, StoreError> {
        if is_postgres_url(location) {
            Self::open_postgres(location)
        } else {
            Self::open(Path::new(location))
        }
    }

    fn init_sqlite(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::init(Conn::Sqlite(conn))
    }

    fn init(mut conn: Conn) -> Result<Self, StoreError> {
        let dialect = conn.dialect();
        let migrations = match dialect {
            Dialect::Sqlite => MIGRATIONS,
            Dialect::Postgres => POSTGRES_MIGRATIONS,
        };
        let mut tx = conn.begin(true)?;
        if dialect == Dialect::Postgres {
            // Replicas starting together apply migrations one at a time.
            tx.batch("SELECT pg_advisory_xact_lock(7218309214)")?;
        }
        tx.batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")?;
        let current = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )?
            .i64(0)?;
        let supported = migrations.len() as i64;
        if current > supported {
            return Err(StoreError::TooNew {
                found: current,
                supported,
            });
        }
        for (i, script) in migrations.iter().enumerate().skip(current as usize) {
            tx.batch(script)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES (?1)",
                vals![i as i64 + 1],
            )?;
        }
        tx.commit()?;
        Ok(Self {
            conn: Mutex::new(conn),
            dialect,
            fencing: None,
            signer: None,
        })
    }

    /// Whether this store is on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    /// Runs `f` in one transaction, committed if it returns `Ok`, rolled back otherwise.
    fn tx<T>(
        &self,
        write: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Corrupt("the connection was poisoned by a panic".into()))?;
        let mut tx = conn.begin(write)?;
        let out = f(&mut tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.tx(false, f)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.tx(true, f)
    }

    /// Inside a write for `run_id`: when this store is a replica's, checks — holding the
    /// lease row's lock until the transaction ends — that this replica still holds the run's
    /// lease with the fencing token it took, and that the lease has not lapsed.
    fn fence(&self, tx: &mut Tx<'_>, run_id: &str) -> Result<(), StoreError> {
        let Some(f) = &self.fencing else {
            return Ok(());
        };
        let lost = |why: String| StoreError::LeaseLost {
            run: run_id.to_string(),
            replica: f.replica_id.clone(),
            why,
        };
        let Some(&token) = f.tokens.get(run_id) else {
            return Err(lost("this replica does not hold the run's lease".into()));
        };
        let lock = match tx.dialect() {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let row = tx.query_opt(
            &format!(
                "SELECT owner, token, expires_at_ms > {} FROM run_leases WHERE run_id = ?1{lock}",
                now_ms_sql(tx.dialect())
            ),
            vals![run_id],
        )?;
        let Some(row) = row else {
            return Err(lost("the run has no lease row".into()));
        };
        let (owner, current, live) = (row.text(0)?, row.u64(1)?, row.i64(2)? != 0);
        if owner != f.replica_id || current != token {
            return Err(lost(format!(
                "fencing token {token} is stale: the lease is now {owner:?}'s with token {current}"
            )));
        }
        if !live {
            return Err(lost(format!("the lease (token {token}) has lapsed")));
        }
        Ok(())
    }

    /// Makes this store a replica's: from now on every write a run makes (round commits and
    /// abandons, publishes, status changes, rollbacks, ledger entries) checks in its own
    /// transaction that `replica_id` holds the run's lease ([`Store::acquire_lease`]) with the
    /// token it took. `endpoint` is where this replica serves devices (for redirects);
    /// `lease_ms` is how long a lease lasts unless renewed.
    pub fn enable_fencing(&mut self, replica_id: &str, endpoint: &str, lease_ms: u64) {
        self.fencing = Some(Fencing {
            replica_id: replica_id.to_string(),
            endpoint: endpoint.to_string(),
            lease_ms: lease_ms.min(i64::MAX as u64) as i64,
            tokens: Default::default(),
        });
    }

    /// This store's replica id, if fencing is on.
    pub fn replica_id(&self) -> Option<&str> {
        self.fencing.as_ref().map(|f| f.replica_id.as_str())
    }

    /// The fencing token this replica holds for `run_id`, if it believes it holds the lease.
    pub fn held_token(&self, run_id: &str) -> Option<u64> {
        self.fencing.as_ref()?.tokens.get(run_id).copied()
    }

    /// Takes or renews a run's lease, in one transaction, by the database's clock: taken when
    /// there is no lease row, when it was released or when it lapsed (the fencing token goes
    /// up by one); renewed (same token) when this replica holds it with the token it
    /// remembers. Otherwise another replica holds it, and this replica forgets any token it
    /// had for the run. Needs [`Store::enable_fencing`].
    pub fn acquire_lease(&mut self, run_id: &str) -> Result<LeaseOutcome, StoreError> {
        let f = self.fencing.clone().ok_or_else(|| {
            StoreError::Corrupt("leases need a replica id (Store::enable_fencing)".into())
        })?;
        let held = f.tokens.get(run_id).copied();
        let outcome = self.write(|tx| {
            let now = tx
                .query_one(&format!("SELECT {}", now_ms_sql(tx.dialect())), &[])?
                .i64(0)?;
            let expires = now.saturating_add(f.lease_ms);
            if tx.dialect() == Dialect::Postgres {
                tx.execute(
                    "INSERT INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, '', '', 0, 0) ON CONFLICT (run_id) DO NOTHING",
                    vals![run_id],
                )?;
            } else {
                tx.execute(
                    "INSERT OR IGNORE INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, '', '', 0, 0)",
                    vals![run_id],
                )?;
            }
            let lock = match tx.dialect() {
                Dialect::Postgres => " FOR UPDATE",
                Dialect::Sqlite => "",
            };
            let row = tx.query_one(
                &format!(
                    "SELECT owner, owner_endpoint, token, expires_at_ms FROM run_leases WHERE run_id = ?1{lock}"
                ),
                vals![run_id],
            )?;
            let current = Lease {
                run_id: run_id.to_string(),
                owner: row.text(0)?,
                owner_endpoint: row.text(1)?,
                token: row.u64(2)?,
                expires_at_ms: row.i64(3)?,
            };
            let mine = current.owner == f.replica_id && Some(current.token) == held;
            let free = current.owner.is_empty() || current.expires_at_ms <= now;
            if !mine && !free {
                return Ok(LeaseOutcome::HeldBy(current));
            }
            let token = if mine { current.token } else { current.token + 1 };
            tx.execute(
                "UPDATE run_leases SET owner = ?2, owner_endpoint = ?3, token = ?4, expires_at_ms = ?5 WHERE run_id = ?1",
                vals![run_id, &f.replica_id, &f.endpoint, token as i64, expires],
            )?;
            let lease = Lease {
                run_id: run_id.to_string(),
                owner: f.replica_id.clone(),
                owner_endpoint: f.endpoint.clone(),
                token,
                expires_at_ms: expires,
            };
            Ok(if mine {
                LeaseOutcome::Renewed(lease)
            } else {
                LeaseOutcome::Acquired {
                    lease,
                    taken_from: (!current.owner.is_empty()).then_some(current.owner),
                }
            })
        })?;
        if let Some(f) = self.fencing.as_mut() {
            match &outcome {
                LeaseOutcome::Acquired { lease: l, .. } | LeaseOutcome::Renewed(l) => {
                    f.tokens.insert(run_id.to_string(), l.token);
                }
                LeaseOutcome::HeldBy(_) => {
                    f.tokens.remove(run_id);
                }
            }
        }
        Ok(outcome)
    }

    /// Gives a held lease up (shutdown): the row stays, with no owner, so the next replica
    /// takes it at once with a higher token. A lease this replica no longer holds is left
    /// alone.
    pub fn release_lease(&mut self, run_id: &str) -> Result<(), StoreError> {
        let Some(f) = self.fencing.as_mut() else {
            return Ok(());
        };
        let Some(token) = f.tokens.remove(run_id) else {
            return Ok(());
        };
        let owner = f.replica_id.clone();
        self.write(|tx| {
            tx.execute(
                "UPDATE run_leases SET owner = '', expires_at_ms = 0 WHERE run_id = ?1 AND owner = ?2 AND token = ?3",
                vals![run_id, &owner, token as i64],
            )?;
            Ok(())
        })
    }

    /// Forgets a lease without touching the database (after a write was refused as fenced).
    pub fn forget_lease(&mut self, run_id: &str) {
        if let Some(f) = self.fencing.as_mut() {
            f.tokens.remove(run_id);
        }
    }

    /// A run's lease row, if it ever had one.
    pub fn lease(&self, run_id: &str) -> Result<Option<Lease>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT owner, owner_endpoint, token, expires_at_ms FROM run_leases WHERE run_id = ?1",
                vals![run_id],
            )?
            .map(|row| {
                Ok(Lease {
                    run_id: run_id.to_string(),
                    owner: row.text(0)?,
                    owner_endpoint: row.text(1)?,
                    token: row.u64(2)?,
                    expires_at_ms: row.i64(3)?,
                })
            })
            .transpose()
        })
    }

    /// The database's clock (ms since the epoch), which times leases.
    pub fn database_now_ms(&self) -> Result<i64, StoreError> {
        self.read(|tx| {
            tx.query_one(&format!("SELECT {}", now_ms_sql(tx.dialect())), &[])?
                .i64(0)
        })
    }

    /// Creates a run with its initial model (version 1, published) and its first two ledger
    /// entries, in one transaction. A replica that creates a run takes its lease in the same
    /// transaction.
    pub fn create_run(
        &mut self,
        run_id: &str,
        manifest: &RunManifest,
        initial: &ModelBlob,
        server_state: &str,
        created: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let fencing = self.fencing.clone();
        let token = self.write(|tx| {
            if tx
                .query_opt("SELECT id FROM runs WHERE id = ?1", vals![run_id])?
                .is_some()
            {
                return Err(StoreError::RunExists(run_id.to_string()));
            }
            tx.execute(
                "INSERT INTO runs (id, manifest_toml, manifest_sha256, status, created_at_ms, rounds_committed, \
                 next_round, current_version, published_version, server_state) VALUES (?1, ?2, ?3, ?4, ?5, 0, 1, 1, 1, ?6)",
                vals![run_id, manifest.to_toml(), manifest.sha256(), RunStatus::Active.as_str(), at_ms, server_state],
            )?;
            insert_model(tx, run_id, 0, initial, at_ms, Some(at_ms))?;
            append(tx, self.signer.as_ref(), run_id, at_ms, created)?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: 1,
                    model_sha256: initial.sha256.clone(),
                },
            )?;
            let Some(f) = &fencing else {
                return Ok(None);
            };
            let now = now_ms_sql(tx.dialect());
            tx.execute(
                &format!(
                    "INSERT INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, ?2, ?3, 1, {now} + ?4)"
                ),
                vals![run_id, &f.replica_id, &f.endpoint, f.lease_ms],
            )?;
            Ok(Some(1))
        })?;
        if let (Some(f), Some(token)) = (self.fencing.as_mut(), token) {
            f.tokens.insert(run_id.to_string(), token);
        }
        Ok(())
    }

    /// A run by id.
    pub fn run(&self, run_id: &str) -> Result<RunRecord, StoreError> {
        self.read(|tx| {
            let row = tx.query_opt(
                "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
                 published_version, server_state FROM runs WHERE id = ?1",
                vals![run_id],
            )?;
            row_to_run(&row.ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?)
        })
    }

    /// All runs, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
                 published_version, server_state FROM runs ORDER BY created_at_ms, id",
                &[],
            )?
            .iter()
            .map(row_to_run)
            .collect()
        })
    }

    /// Commits a round: everything in one transaction (see the module docs), fenced.
    pub fn commit_round(&mut self, c: &RoundCommit<'_>) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, c.run_id)?;
            tx.execute(
                "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'committed', ?3, ?4)",
                vals![c.run_id, c.round as i64, c.participants.len() as i64, c.at_ms],
            )?;
            for device in c.participants {
                // A distributed round's participations were written with its release.
                tx.execute(
                    "INSERT INTO participations (run_id, round, device_id) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                    vals![c.run_id, c.round as i64, device],
                )?;
            }
            insert_model(tx, c.run_id, c.round, c.model, c.at_ms, None)?;
            append(tx, self.signer.as_ref(), c.run_id, c.at_ms, c.event.clone())?;
            let status = if let Some(stop) = &c.stop {
                append(tx, self.signer.as_ref(), c.run_id, c.at_ms, stop.clone())?;
                RunStatus::Stopped
            } else {
                run_status(tx, c.run_id)?
            };
            tx.execute(
                "UPDATE runs SET rounds_committed = rounds_committed + 1, next_round = ?2, current_version = ?3, \
                 server_state = ?4, status = ?5 WHERE id = ?1",
                vals![c.run_id, c.round as i64 + 1, c.model.version as i64, c.server_state, status.as_str()],
            )?;
            Ok(())
        })
    }

    /// Records a distributed round's release before its sum is unmasked, in one fenced
    /// transaction: the `round_released` ledger entry, the contributors' participations, and
    /// the run's next round number (so that a restart never reuses this round's number). A
    /// replica that lost the run's lease gets [`StoreError::LeaseLost`] and never unmasks.
    pub fn record_release(
        &mut self,
        run_id: &str,
        round: u64,
        participants: &[String],
        event: &LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            for device in participants {
                tx.execute(
                    "INSERT INTO participations (run_id, round, device_id) VALUES (?1, ?2, ?3)",
                    vals![run_id, round as i64, device],
                )?;
            }
            append(tx, self.signer.as_ref(), run_id, at_ms, event.clone())?;
            tx.execute(
                "UPDATE runs SET next_round = ?2 WHERE id = ?1",
                vals![run_id, round as i64 + 1],
            )?;
            Ok(())
        })
    }

    /// Rounds whose data was released: the committed ones and those with a recorded release
    /// (participations), in order.
    pub fn released_rounds(&self, run_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM rounds WHERE run_id = ?1 AND outcome = 'committed' \
             UNION SELECT round FROM participations WHERE run_id = ?1 ORDER BY round",
            vals![run_id],
        )
    }

    /// Releases recorded for rounds that have neither committed nor been abandoned (the
    /// process that recorded them stopped before the round ended), with their contributor
    /// counts, in order.
    pub fn orphan_releases(&self, run_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT p.round, COUNT(*) FROM participations p WHERE p.run_id = ?1 AND NOT EXISTS \
                 (SELECT 1 FROM rounds r WHERE r.run_id = p.run_id AND r.round = p.round) \
                 GROUP BY p.round ORDER BY p.round",
                vals![run_id],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.u64(1)?)))
            .collect()
        })
    }

    /// Records an abandoned round: nothing released, nothing spent (unless its release was
    /// recorded first, see [`Store::record_release`]).
    pub fn abandon_round(
        &mut self,
        run_id: &str,
        round: u64,
        contributions: u64,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            tx.execute(
                "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'abandoned', ?3, ?4)",
                vals![run_id, round as i64, contributions as i64, at_ms],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::RoundAbandoned {
                    round,
                    contributions,
                    reason: reason.to_string(),
                },
            )?;
            tx.execute(
                "UPDATE runs SET next_round = ?2 WHERE id = ?1",
                vals![run_id, round as i64 + 1],
            )?;
            Ok(())
        })
    }

    /// Publishes a committed version (a second transaction after [`Store::commit_round`]).
    /// Publishing a version that is already published is a no-op.
    pub fn publish(&mut self, run_id: &str, version: u64, at_ms: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            let row = tx.query_opt(
                "SELECT sha256, published_at_ms FROM model_versions WHERE run_id = ?1 AND version = ?2",
                vals![run_id, version as i64],
            )?;
            let row = row.ok_or_else(|| StoreError::NoSuchVersion {
                run: run_id.to_string(),
                version,
            })?;
            if row.opt_i64(1)?.is_some() {
                return Ok(());
            }
            let sha256 = row.text(0)?;
            tx.execute(
                "UPDATE model_versions SET published_at_ms = ?3 WHERE run_id = ?1 AND version = ?2",
                vals![run_id, version as i64, at_ms],
            )?;
            tx.execute(
                "UPDATE runs SET published_version = ?2 WHERE id = ?1 AND published_version < ?2",
                vals![run_id, version as i64],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: version,
                    model_sha256: sha256,
                },
            )
        })
    }

    /// Changes a run's status with its ledger entry, in one transaction.
    pub fn set_status(
        &mut self,
        run_id: &str,
        status: RunStatus,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            self.fence(tx, run_id)?;
            tx.execute(
                "UPDATE runs SET status = ?2 WHERE id = ?1",
                vals![run_id, status.as_str()],
            )?;
            append(tx, self.signer.as_ref(), run_id, at_ms, event)
        })
    }

    /// Stores an earlier version's parameters as a new, published version and records the
    /// rollback, in one transaction. The server optimiser's state is replaced.
    pub fn rollback(
        &mut self,
        run_id: &str,
        to_version: u64,
        new_model: &ModelBlob,
        server_state: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            insert_model(tx, run_id, 0, new_model, at_ms, Some(at_ms))?;
            tx.execute(
                "UPDATE runs SET current_version = ?2, published_version = ?2, server_state = ?3 WHERE id = ?1",
                vals![run_id, new_model.version as i64, server_state],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::RolledBack {
                    to_version,
                    new_version: new_model.version,
                    model_sha256: new_model.sha256.clone(),
                    reason: reason.to_string(),
                },
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: new_model.version,
                    model_sha256: new_model.sha256.clone(),
                },
            )
        })
    }

    /// A stored model version.
    pub fn model(&self, run_id: &str, version: u64) -> Result<ModelBlob, StoreError> {
        self.read(|tx| {
            let row = tx
                .query_opt(
                    "SELECT snapshot, sha256 FROM model_versions WHERE run_id = ?1 AND version = ?2",
                    vals![run_id, version as i64],
                )?
                .ok_or_else(|| StoreError::NoSuchVersion {
                    run: run_id.to_string(),
                    version,
                })?;
            Ok(ModelBlob {
                version,
                bytes: row.blob(0)?,
                sha256: row.text(1)?,
            })
        })
    }

    /// A run's ledger, in sequence order.
    pub fn ledger(&self, run_id: &str) -> Result<Vec<SealedEntry>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT sequence, body, prev_hash, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence",
                vals![run_id],
            )?
            .iter()
            .map(|r| {
                Ok(SealedEntry {
                    sequence: r.u64(0)?,
                    body: r.text(1)?,
                    prev_hash: r.text(2)?,
                    hash: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// The stored head signatures of a run's ledger, in sequence order.
    pub fn ledger_signatures(
        &self,
        run_id: &str,
    ) -> Result<Vec<crate::checkpoint::HeadSignature>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT sequence, at_ms, public_key, signature FROM ledger_signatures WHERE run_id = ?1 ORDER BY sequence",
                vals![run_id],
            )?
            .iter()
            .map(|r| {
                Ok(crate::checkpoint::HeadSignature {
                    sequence: r.u64(0)?,
                    at_ms: r.i64(1)?,
                    public_key: r.text(2)?,
                    signature: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// Every run id that has ledger entries or head signatures, or a row in `runs`, sorted:
    /// what `ledger verify` checks. The ledger itself is the authority; a run whose `runs`
    /// row was deleted is still listed, and one with a row but no entries fails verification.
    pub fn ledger_run_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT run_id FROM ledger UNION SELECT run_id FROM ledger_signatures \
                 UNION SELECT id FROM runs ORDER BY 1",
                &[],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// A run's stored manifest TOML, if its `runs` row exists.
    pub fn manifest_toml(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT manifest_toml FROM runs WHERE id = ?1",
                vals![run_id],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// Signs every ledger entry appended from now on with `signer` (see
    /// [`crate::checkpoint`]).
    pub fn set_ledger_signer(&mut self, signer: Option<crate::checkpoint::LedgerSigner>) {
        self.signer = signer;
    }

    /// The public key entries are signed with, hex.
    pub fn ledger_public_key(&self) -> Option<String> {
        self.signer.as_ref().map(|s| s.public_key_hex())
    }

    /// The `epsilon_assumption` a run's `run_created` entry records, if any.
    pub fn created_assumption(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        let body = self.read(|tx| {
            tx.query_opt(
                "SELECT body FROM ledger WHERE run_id = ?1 AND sequence = 1",
                vals![run_id],
            )?
            .map(|r| r.text(0))
            .transpose()
        })?;
        let Some(body) = body else {
            return Ok(None);
        };
        let entry: crate::ledger::LedgerEntry = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("run_created of run {run_id}: {e}")))?;
        Ok(match entry.event {
            LedgerEvent::RunCreated {
                epsilon_assumption, ..
            } => epsilon_assumption,
            _ => None,
        })
    }

    fn rounds_of(&self, sql: &str, params: &[Value]) -> Result<Vec<u64>, StoreError> {
        self.read(|tx| tx.query(sql, params)?.iter().map(|r| r.u64(0)).collect())
    }

    /// The rounds a device took part in, for one run.
    pub fn participations(&self, run_id: &str, device_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM participations WHERE run_id = ?1 AND device_id = ?2 ORDER BY round",
            vals![run_id, device_id],
        )
    }

    /// Enrols a device: its opaque id and the SHA-256 (hex) of its token. The token itself is
    /// never stored.
    pub fn insert_device(
        &self,
        device_id: &str,
        token_sha256: &str,
        sdk_version: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO devices (id, token_sha256, sdk_version, enrolled_at_ms) VALUES (?1, ?2, ?3, ?4)",
                vals![device_id, token_sha256, sdk_version, at_ms],
            )?;
            Ok(())
        })
    }

    /// Devices enrolled at or after `since_ms`.
    pub fn enrolments_since(&self, since_ms: i64) -> Result<u64, StoreError> {
        self.read(|tx| {
            tx.query_one(
                "SELECT COUNT(*) FROM devices WHERE enrolled_at_ms >= ?1",
                vals![since_ms],
            )?
            .u64(0)
        })
    }

    /// The device whose token hashes to `token_sha256` (hex), if any.
    pub fn device_by_token_hash(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT id FROM devices WHERE token_sha256 = ?1",
                vals![token_sha256],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// Enrolled devices.
    pub fn device_count(&self) -> Result<u64, StoreError> {
        self.read(|tx| tx.query_one("SELECT COUNT(*) FROM devices", &[])?.u64(0))
    }

    /// Adds one device's released evaluation (checked with
    /// [`EvaluationSum::check`]) to the noised sums of (run, model version), in one
    /// transaction; returns whether it is the version's first. Nothing else is stored: no
    /// device, no time. Sums commute, so any replica may add them: this write is not fenced.
    pub fn add_evaluation_release(
        &mut self,
        run_id: &str,
        model_version: u64,
        values: &[f64; COORDINATES],
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let version = i64::try_from(model_version)
                .map_err(|_| StoreError::Corrupt(format!("model version {model_version}")))?;
            let mut sum = read_evaluation_sum(tx, run_id, version)?;
            let first = sum.reports == 0;
            sum.add(values);
            let text = serde_json::to_string(&sum.sums).expect("finite sums serialise");
            if first {
                tx.execute(
                    "INSERT INTO evaluation_releases (run_id, model_version, reports, sums) VALUES (?1, ?2, ?3, ?4)",
                    vals![run_id, version, sum.reports as i64, text],
                )?;
            } else {
                tx.execute(
                    "UPDATE evaluation_releases SET reports = ?3, sums = ?4 WHERE run_id = ?1 AND model_version = ?2",
                    vals![run_id, version, sum.reports as i64, text],
                )?;
            }
            Ok(first)
        })
    }

    /// The noised evaluation sum of (run, model version); empty if none was reported.
    pub fn evaluation_sum(
        &self,
        run_id: &str,
        model_version: u64,
    ) -> Result<EvaluationSum, StoreError> {
        let version = i64::try_from(model_version)
            .map_err(|_| StoreError::Corrupt(format!("model version {model_version}")))?;
        self.read(|tx| read_evaluation_sum(tx, run_id, version))
    }

    /// Every model version of the run with evaluation reports, with its noised sum, in
    /// version order.
    pub fn evaluation_sums(&self, run_id: &str) -> Result<Vec<(u64, EvaluationSum)>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT model_version, reports, sums FROM evaluation_releases WHERE run_id = ?1 ORDER BY model_version",
                vals![run_id],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, evaluation_sum_from(r.u64(1)?, &r.text(2)?)?)))
            .collect()
        })
    }

    /// Whether `device_id` took part in a committed round of `run_id`.
    pub fn took_part(&self, run_id: &str, device_id: &str) -> Result<bool, StoreError> {
        self.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 FROM participations WHERE run_id = ?1 AND device_id = ?2 LIMIT 1",
                    vals![run_id, device_id],
                )?
                .is_some())
        })
    }

    /// The run's committed rounds, in order: a round's position in this list (from 1) is the
    /// release index the participation limits count in.
    pub fn committed_rounds(&self, run_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM rounds WHERE run_id = ?1 AND outcome = 'committed' ORDER BY round",
            vals![run_id],
        )
    }

    /// The rounds each device took part in, for one run, by device id. Device ids stay
    /// inside the coordinator; reports show only the distribution.
    pub fn participations_by_device(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, Vec<u64>)>, StoreError> {
        let rows = self.read(|tx| {
            tx.query(
                "SELECT device_id, round FROM participations WHERE run_id = ?1 ORDER BY device_id, round",
                vals![run_id],
            )
        })?;
        let mut out: Vec<(String, Vec<u64>)> = vec![];
        for row in rows {
            let (device, round) = (row.text(0)?, row.u64(1)?);
            match out.last_mut() {
                Some((d, rounds)) if *d == device => rounds.push(round),
                _ => out.push((device, vec![round])),
            }
        }
        Ok(out)
    }

    /// Appends one event to a run's ledger on its own (a guardrail alert), fenced.
    pub fn append_event(
        &mut self,
        run_id: &str,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            self.fence(tx, run_id)?;
            append(tx, self.signer.as_ref(), run_id, at_ms, event)
        })
    }

    /// Queues an admin command for the replica that owns `run_id` (see
    /// [`crate::replica::forward`]); `id` is unique.
    pub fn enqueue_admin_command(
        &self,
        id: &str,
        run_id: &str,
        command: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            tx.execute(
                "INSERT INTO admin_commands (id, run_id, command, status, result, created_at_ms) \
                 VALUES (?1, ?2, ?3, 'pending', '', ?4)",
                vals![id, run_id, command, at_ms],
            )?;
            Ok(())
        })
    }

    /// Claims a run's queued admin commands, oldest first (they become `running`), fenced:
    /// only the lease holder claims.
    pub fn claim_admin_commands(
        &mut self,
        run_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            let rows = tx.query(
                "SELECT id, command FROM admin_commands WHERE run_id = ?1 AND status = 'pending' \
                 ORDER BY created_at_ms, id",
                vals![run_id],
            )?;
            let mut out = vec![];
            for r in rows {
                let id = r.text(0)?;
                tx.execute(
                    "UPDATE admin_commands SET status = 'running' WHERE id = ?1",
                    vals![&id],
                )?;
                out.push((id, r.text(1)?));
            }
            Ok(out)
        })
    }

    /// Records a claimed admin command's outcome: `done` or `failed`, with a result text.
    pub fn finish_admin_command(&self, id: &str, ok: bool, result: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE admin_commands SET status = ?2, result = ?3 WHERE id = ?1",
                vals![id, if ok { "done" } else { "failed" }, result],
            )?;
            Ok(())
        })
    }

    /// Withdraws a queued admin command nobody claimed yet; whether it was withdrawn.
    pub fn cancel_admin_command(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE admin_commands SET status = 'cancelled' WHERE id = ?1 AND status = 'pending'",
                vals![id],
            )? == 1)
        })
    }

    /// An admin command's status (`pending`, `running`, `done`, `failed`, `cancelled`) and
    /// result text.
    pub fn admin_command(&self, id: &str) -> Result<Option<(String, String)>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT status, result FROM admin_commands WHERE id = ?1",
                vals![id],
            )?
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .transpose()
        })
    }

    /// Direct access to a SQLite store's connection, for tests that tamper with the database.
    ///
    /// # Panics
    /// On a PostgreSQL store.
    pub fn connection(&self) -> SqliteConnection<'_> {
        let guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            matches!(&*guard, Conn::Sqlite(_)),
            "Store::connection is for SQLite stores"
        );
        SqliteConnection(guard)
    }
}

fn run_status(tx: &mut Tx<'_>, run_id: &str) -> Result<RunStatus, StoreError> {
    let row = tx
        .query_opt("SELECT status FROM runs WHERE id = ?1", vals![run_id])?
        .ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?;
    RunStatus::parse(&row.text(0)?)
}

fn insert_model(
    tx: &mut Tx<'_>,
    run_id: &str,
    round: u64,
    model: &ModelBlob,
    at_ms: i64,
    published_at_ms: Option<i64>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO model_versions (run_id, version, round, sha256, snapshot, created_at_ms, published_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        vals![run_id, model.version as i64, round as i64, &model.sha256, &model.bytes, at_ms, published_at_ms],
    )?;
    Ok(())
}

/// Creates `path` empty with mode 0600 if it does not exist (on Unix; elsewhere SQLite creates
/// it).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StoreError::Corrupt(format!(
                    "creating {}: {e}",
                    path.display()
                )));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Appends one entry to a run's chain inside `tx` and, with a signing key, stores the key's
/// signature of the new head in the same transaction.
fn append(
    tx: &mut Tx<'_>,
    signer: Option<&crate::checkpoint::LedgerSigner>,
    run_id: &str,
    at_ms: i64,
    event: LedgerEvent,
) -> Result<(), StoreError> {
    let last = tx.query_opt(
        "SELECT sequence, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence DESC LIMIT 1",
        vals![run_id],
    )?;
    let (sequence, prev_hash) = match last {
        Some(r) => (r.u64(0)? + 1, r.text(1)?),
        None => (1, GENESIS_HASH.to_string()),
    };
    let kind = event.kind();
    let entry = LedgerEntry {
        run_id: run_id.to_string(),
        sequence,
        at_ms,
        event,
    };
    let sealed = seal(&entry, &prev_hash);
    tx.execute(
        "INSERT INTO ledger (run_id, sequence, at_ms, kind, body, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        vals![run_id, sequence as i64, at_ms, kind, &sealed.body, &sealed.prev_hash, &sealed.hash],
    )?;
    if let Some(signer) = signer {
        let s = signer.sign_head(run_id, sequence, &sealed.hash, at_ms);
        tx.execute(
            "INSERT INTO ledger_signatures (run_id, sequence, at_ms, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            vals![run_id, sequence as i64, at_ms, &s.public_key, &s.signature],
        )?;
    }
    Ok(())
}

fn row_to_run(r: &Row) -> Result<RunRecord, StoreError> {
    let id = r.text(0)?;
    let toml = r.text(1)?;
    Ok(RunRecord {
        manifest: RunManifest::from_toml(&toml, &format!("stored manifest of run {id}"))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        manifest_sha256: r.text(2)?,
        status: RunStatus::parse(&r.text(3)?)?,
        rounds_committed: r.u64(4)?,
        next_round: r.u64(5)?,
        current_version: r.u64(6)?,
        published_version: r.u64(7)?,
        server_state: r.text(8)?,
        id,
    })
}
