//! The coordinator's durable state, in SQLite or PostgreSQL: runs and manifests, rounds,
//! model versions (kept for rollback), the privacy ledger, participations (opaque device id,
//! round), enrolled devices (id and token hash), the noised sums of federated-evaluation releases, and the
//! runs' leases when several replicas share one PostgreSQL database.
//!
//! - One [`Store`] type, its queries grouped by concern, a module each: `runs` (runs, rounds,
//!   model versions), `ledger` (entries, signed heads), `devices` (enrolments and
//!   participations), `evaluation` (noised evaluation sums), `lease` (replicas' leases and
//!   fencing), `admin_queue` (commands shared between replicas) and `schema` (the migrations).
//! - Two backends (module `backend`): the queries are written once in
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

mod admin_queue;
mod backend;
mod devices;
mod evaluation;
mod lease;
mod ledger;
mod runs;
mod schema;

pub use devices::{EnrolmentCap, EnrolmentCaps};
pub use lease::{Lease, LeaseOutcome};
pub use runs::{RoundCommit, RunRecord, RunStatus};
pub use schema::{MIGRATIONS, POSTGRES_MIGRATIONS};

use ledger::append;
use runs::run_status;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use backend::{Conn, Dialect, Row, Tx, Value, now_ms_sql, vals};

use fedpref_privacy::evaluation::{COORDINATES, EvaluationSum};

use crate::ledger::{GENESIS_HASH, LedgerEntry, LedgerEvent, SealedEntry, seal};
use crate::manifest::RunManifest;
use crate::model::ModelBlob;

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
