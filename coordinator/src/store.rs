//! The coordinator's durable state in SQLite: runs and manifests, rounds, model versions
//! (kept for rollback), the privacy ledger, participations (opaque device id, round),
//! enrolled devices (id and token hash) and summed federated-evaluation counts.
//!
//! - Migrations are numbered SQL scripts in [`MIGRATIONS`], applied in order inside a
//!   transaction and recorded in `schema_migrations`.
//! - The SQL is kept portable to PostgreSQL. The places that differ: `BLOB` is `BYTEA` there,
//!   and the connection pragmas below (WAL, `synchronous = FULL`, `foreign_keys`) are
//!   SQLite's; the queries themselves use only standard SQL with positional parameters.
//! - Everything a round commits — the round row, its participations, its ledger entry, the
//!   model version it produced and the run's counters — is one transaction
//!   ([`Store::commit_round`]); publishing that version is a second, later one
//!   ([`Store::publish`]), so the ledger entry is always durable before the model is visible.
//!   A crash between the two leaves a committed, unpublished version that
//!   [`crate::coordinator::Coordinator::open`] publishes on restart, spending nothing twice.
//! - Individual updates are never written here.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::ledger::{GENESIS_HASH, LedgerEntry, LedgerEvent, SealedEntry, seal};
use crate::manifest::RunManifest;
use crate::model::ModelBlob;

/// The schema, one script per version.
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
];

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
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

/// The federated-evaluation counts the store sums (from `fedpref.v1.EvaluationCounts`; each
/// integer is at most `i64::MAX`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvaluationSums {
    /// Recommendation lists shown.
    pub recommendation_lists_shown: i64,
    /// Recommended items shown.
    pub recommendations_shown: i64,
    /// Slots filled by diversity injection.
    pub injected_recommendations_shown: i64,
    /// Positive feedback on recommended items.
    pub positive_feedback_count: i64,
    /// Negative feedback on recommended items.
    pub negative_feedback_count: i64,
    /// Personalisation opt-outs.
    pub personalisation_opt_outs: i64,
    /// Training opt-outs.
    pub training_opt_outs: i64,
    /// Held-out predictions evaluated.
    pub predictions_evaluated: i64,
    /// Of those, within 0.5 of the target.
    pub predictions_within_half: i64,
    /// Sum over lists shown of each list's intra-list diversity (in [0, 1]).
    pub intra_list_diversity_sum: f64,
    /// Sum over reports that had a catalogue of distinct topics shown ÷ catalogue topics.
    pub topic_coverage_sum: f64,
    /// Reports that had a catalogue (the denominator of topic coverage).
    pub topic_coverage_reports: i64,
    /// Reports whose user turned personalisation or training off in the window (0 or 1 per
    /// report).
    pub opted_out_reports: i64,
}

/// The summed evaluation counts of one (model version, cohort).
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluationRow {
    /// The model version the counts evaluate.
    pub model_version: u64,
    /// The activity cohort.
    pub cohort: String,
    /// Reports summed.
    pub reports: u64,
    /// The sums.
    pub sums: EvaluationSums,
    /// The earliest window start of the reports summed (ms since the epoch).
    pub window_start_ms: Option<i64>,
    /// The latest window end.
    pub window_end_ms: Option<i64>,
}

/// One device's report, as [`Store::add_evaluation_counts`] records it.
#[derive(Clone, Debug)]
pub struct EvaluationReport<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The model version the counts evaluate.
    pub model_version: u64,
    /// The activity cohort.
    pub cohort: &'a str,
    /// The reporting device (recorded only as having reported on this version).
    pub device_id: &'a str,
    /// Start of the window (ms since the epoch).
    pub window_start_ms: i64,
    /// End of the window.
    pub window_end_ms: i64,
    /// The counts.
    pub counts: EvaluationSums,
}

/// The SQLite store.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::init(conn)
    }

    /// An in-memory store, for tests and simulations.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
        )?;
        let current: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        let supported = MIGRATIONS.len() as i64;
        if current > supported {
            return Err(StoreError::TooNew {
                found: current,
                supported,
            });
        }
        for (i, script) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(script)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES (?1)",
                params![i as i64 + 1],
            )?;
        }
        tx.commit()?;
        Ok(Self { conn })
    }

    /// Creates a run with its initial model (version 1, published) and its first two ledger
    /// entries, in one transaction.
    pub fn create_run(
        &mut self,
        run_id: &str,
        manifest: &RunManifest,
        initial: &ModelBlob,
        server_state: &str,
        created: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let exists: Option<String> = tx
            .query_row("SELECT id FROM runs WHERE id = ?1", params![run_id], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::RunExists(run_id.to_string()));
        }
        tx.execute(
            "INSERT INTO runs (id, manifest_toml, manifest_sha256, status, created_at_ms, rounds_committed, \
             next_round, current_version, published_version, server_state) VALUES (?1, ?2, ?3, ?4, ?5, 0, 1, 1, 1, ?6)",
            params![run_id, manifest.to_toml(), manifest.sha256(), RunStatus::Active.as_str(), at_ms, server_state],
        )?;
        insert_model(&tx, run_id, 0, initial, at_ms, Some(at_ms))?;
        append(&tx, run_id, at_ms, created)?;
        append(
            &tx,
            run_id,
            at_ms,
            LedgerEvent::ModelPublished {
                model_version: 1,
                model_sha256: initial.sha256.clone(),
            },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A run by id.
    pub fn run(&self, run_id: &str) -> Result<RunRecord, StoreError> {
        self.conn
            .query_row(
                "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
                 published_version, server_state FROM runs WHERE id = ?1",
                params![run_id],
                row_to_run,
            )
            .optional()?
            .ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?
    }

    /// All runs, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
             published_version, server_state FROM runs ORDER BY created_at_ms, id",
        )?;
        let rows = stmt.query_map([], row_to_run)?;
        rows.map(|r| r?).collect()
    }

    /// Commits a round: everything in one transaction (see the module docs).
    pub fn commit_round(&mut self, c: &RoundCommit<'_>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'committed', ?3, ?4)",
            params![c.run_id, c.round as i64, c.participants.len() as i64, c.at_ms],
        )?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO participations (run_id, round, device_id) VALUES (?1, ?2, ?3)",
            )?;
            for device in c.participants {
                stmt.execute(params![c.run_id, c.round as i64, device])?;
            }
        }
        insert_model(&tx, c.run_id, c.round, c.model, c.at_ms, None)?;
        append(&tx, c.run_id, c.at_ms, c.event.clone())?;
        let status = if let Some(stop) = &c.stop {
            append(&tx, c.run_id, c.at_ms, stop.clone())?;
            RunStatus::Stopped
        } else {
            run_status(&tx, c.run_id)?
        };
        tx.execute(
            "UPDATE runs SET rounds_committed = rounds_committed + 1, next_round = ?2, current_version = ?3, \
             server_state = ?4, status = ?5 WHERE id = ?1",
            params![c.run_id, c.round as i64 + 1, c.model.version as i64, c.server_state, status.as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records an abandoned round: nothing released, nothing spent.
    pub fn abandon_round(
        &mut self,
        run_id: &str,
        round: u64,
        contributions: u64,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'abandoned', ?3, ?4)",
            params![run_id, round as i64, contributions as i64, at_ms],
        )?;
        append(
            &tx,
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
            params![run_id, round as i64 + 1],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Publishes a committed version (a second transaction after [`Store::commit_round`]).
    /// Publishing a version that is already published is a no-op.
    pub fn publish(&mut self, run_id: &str, version: u64, at_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let row: Option<(String, Option<i64>)> = tx
            .query_row(
                "SELECT sha256, published_at_ms FROM model_versions WHERE run_id = ?1 AND version = ?2",
                params![run_id, version as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (sha256, published) = row.ok_or_else(|| StoreError::NoSuchVersion {
            run: run_id.to_string(),
            version,
        })?;
        if published.is_some() {
            return Ok(());
        }
        tx.execute(
            "UPDATE model_versions SET published_at_ms = ?3 WHERE run_id = ?1 AND version = ?2",
            params![run_id, version as i64, at_ms],
        )?;
        tx.execute(
            "UPDATE runs SET published_version = ?2 WHERE id = ?1 AND published_version < ?2",
            params![run_id, version as i64],
        )?;
        append(
            &tx,
            run_id,
            at_ms,
            LedgerEvent::ModelPublished {
                model_version: version,
                model_sha256: sha256,
            },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Changes a run's status with its ledger entry, in one transaction.
    pub fn set_status(
        &mut self,
        run_id: &str,
        status: RunStatus,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        run_status(&tx, run_id)?;
        tx.execute(
            "UPDATE runs SET status = ?2 WHERE id = ?1",
            params![run_id, status.as_str()],
        )?;
        append(&tx, run_id, at_ms, event)?;
        tx.commit()?;
        Ok(())
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
        let tx = self.conn.transaction()?;
        insert_model(&tx, run_id, 0, new_model, at_ms, Some(at_ms))?;
        tx.execute(
            "UPDATE runs SET current_version = ?2, published_version = ?2, server_state = ?3 WHERE id = ?1",
            params![run_id, new_model.version as i64, server_state],
        )?;
        append(
            &tx,
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
            &tx,
            run_id,
            at_ms,
            LedgerEvent::ModelPublished {
                model_version: new_model.version,
                model_sha256: new_model.sha256.clone(),
            },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A stored model version.
    pub fn model(&self, run_id: &str, version: u64) -> Result<ModelBlob, StoreError> {
        self.conn
            .query_row(
                "SELECT snapshot, sha256 FROM model_versions WHERE run_id = ?1 AND version = ?2",
                params![run_id, version as i64],
                |r| {
                    Ok(ModelBlob {
                        version,
                        bytes: r.get(0)?,
                        sha256: r.get(1)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NoSuchVersion {
                run: run_id.to_string(),
                version,
            })
    }

    /// A run's ledger, in sequence order.
    pub fn ledger(&self, run_id: &str) -> Result<Vec<SealedEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT sequence, body, prev_hash, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence")?;
        let rows = stmt.query_map(params![run_id], |r| {
            Ok(SealedEntry {
                sequence: r.get::<_, i64>(0)? as u64,
                body: r.get(1)?,
                prev_hash: r.get(2)?,
                hash: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rounds a device took part in, for one run.
    pub fn participations(&self, run_id: &str, device_id: &str) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round FROM participations WHERE run_id = ?1 AND device_id = ?2 ORDER BY round",
        )?;
        let rows = stmt.query_map(params![run_id, device_id], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<Result<_, _>>()?)
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
        self.conn.execute(
            "INSERT INTO devices (id, token_sha256, sdk_version, enrolled_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![device_id, token_sha256, sdk_version, at_ms],
        )?;
        Ok(())
    }

    /// The device whose token hashes to `token_sha256` (hex), if any.
    pub fn device_by_token_hash(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM devices WHERE token_sha256 = ?1",
                params![token_sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Enrolled devices.
    pub fn device_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Adds one device's evaluation counts to the sums for (run, model version, cohort) and
    /// records that the device reported on that version, in one transaction.
    pub fn add_evaluation_counts(
        &mut self,
        report: &EvaluationReport<'_>,
    ) -> Result<(), StoreError> {
        let c = &report.counts;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO evaluation_counts (run_id, model_version, cohort, reports, recommendation_lists_shown, \
             recommendations_shown, injected_recommendations_shown, positive_feedback_count, negative_feedback_count, \
             personalisation_opt_outs, training_opt_outs, predictions_evaluated, predictions_within_half, \
             intra_list_diversity_sum, topic_coverage_sum, topic_coverage_reports, opted_out_reports, \
             window_start_ms, window_end_ms) \
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
             ON CONFLICT (run_id, model_version, cohort) DO UPDATE SET reports = evaluation_counts.reports + 1, \
             recommendation_lists_shown = evaluation_counts.recommendation_lists_shown + excluded.recommendation_lists_shown, \
             recommendations_shown = evaluation_counts.recommendations_shown + excluded.recommendations_shown, \
             injected_recommendations_shown = evaluation_counts.injected_recommendations_shown + excluded.injected_recommendations_shown, \
             positive_feedback_count = evaluation_counts.positive_feedback_count + excluded.positive_feedback_count, \
             negative_feedback_count = evaluation_counts.negative_feedback_count + excluded.negative_feedback_count, \
             personalisation_opt_outs = evaluation_counts.personalisation_opt_outs + excluded.personalisation_opt_outs, \
             training_opt_outs = evaluation_counts.training_opt_outs + excluded.training_opt_outs, \
             predictions_evaluated = evaluation_counts.predictions_evaluated + excluded.predictions_evaluated, \
             predictions_within_half = evaluation_counts.predictions_within_half + excluded.predictions_within_half, \
             intra_list_diversity_sum = evaluation_counts.intra_list_diversity_sum + excluded.intra_list_diversity_sum, \
             topic_coverage_sum = evaluation_counts.topic_coverage_sum + excluded.topic_coverage_sum, \
             topic_coverage_reports = evaluation_counts.topic_coverage_reports + excluded.topic_coverage_reports, \
             opted_out_reports = evaluation_counts.opted_out_reports + excluded.opted_out_reports, \
             window_start_ms = CASE WHEN evaluation_counts.window_start_ms IS NULL \
                 OR excluded.window_start_ms < evaluation_counts.window_start_ms \
                 THEN excluded.window_start_ms ELSE evaluation_counts.window_start_ms END, \
             window_end_ms = CASE WHEN evaluation_counts.window_end_ms IS NULL \
                 OR excluded.window_end_ms > evaluation_counts.window_end_ms \
                 THEN excluded.window_end_ms ELSE evaluation_counts.window_end_ms END",
            params![
                report.run_id,
                report.model_version as i64,
                report.cohort,
                c.recommendation_lists_shown,
                c.recommendations_shown,
                c.injected_recommendations_shown,
                c.positive_feedback_count,
                c.negative_feedback_count,
                c.personalisation_opt_outs,
                c.training_opt_outs,
                c.predictions_evaluated,
                c.predictions_within_half,
                c.intra_list_diversity_sum,
                c.topic_coverage_sum,
                c.topic_coverage_reports,
                c.opted_out_reports,
                report.window_start_ms,
                report.window_end_ms,
            ],
        )?;
        tx.execute(
            "INSERT INTO evaluation_reporters (run_id, model_version, device_id) VALUES (?1, ?2, ?3) \
             ON CONFLICT (run_id, model_version, device_id) DO NOTHING",
            params![report.run_id, report.model_version as i64, report.device_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every (model version, cohort) row of a run's summed evaluation counts, by version and
    /// cohort.
    pub fn evaluation_rows(&self, run_id: &str) -> Result<Vec<EvaluationRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT model_version, cohort, reports, recommendation_lists_shown, recommendations_shown, \
             injected_recommendations_shown, positive_feedback_count, negative_feedback_count, \
             personalisation_opt_outs, training_opt_outs, predictions_evaluated, predictions_within_half, \
             intra_list_diversity_sum, topic_coverage_sum, topic_coverage_reports, opted_out_reports, \
             window_start_ms, window_end_ms FROM evaluation_counts WHERE run_id = ?1 ORDER BY model_version, cohort",
        )?;
        let rows = stmt.query_map(params![run_id], |r| {
            Ok(EvaluationRow {
                model_version: r.get::<_, i64>(0)? as u64,
                cohort: r.get(1)?,
                reports: r.get::<_, i64>(2)? as u64,
                sums: EvaluationSums {
                    recommendation_lists_shown: r.get(3)?,
                    recommendations_shown: r.get(4)?,
                    injected_recommendations_shown: r.get(5)?,
                    positive_feedback_count: r.get(6)?,
                    negative_feedback_count: r.get(7)?,
                    personalisation_opt_outs: r.get(8)?,
                    training_opt_outs: r.get(9)?,
                    predictions_evaluated: r.get(10)?,
                    predictions_within_half: r.get(11)?,
                    intra_list_diversity_sum: r.get(12)?,
                    topic_coverage_sum: r.get(13)?,
                    topic_coverage_reports: r.get(14)?,
                    opted_out_reports: r.get(15)?,
                },
                window_start_ms: r.get(16)?,
                window_end_ms: r.get(17)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Distinct devices that reported evaluation counts on a model version.
    pub fn reporting_devices(&self, run_id: &str, model_version: u64) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM evaluation_reporters WHERE run_id = ?1 AND model_version = ?2",
            params![run_id, model_version as i64],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// The run's committed rounds, in order: a round's position in this list (from 1) is the
    /// release index the participation limits count in.
    pub fn committed_rounds(&self, run_id: &str) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round FROM rounds WHERE run_id = ?1 AND outcome = 'committed' ORDER BY round",
        )?;
        let rows = stmt.query_map(params![run_id], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<Result<_, _>>()?)
    }

    /// The rounds each device took part in, for one run, by device id. Device ids stay
    /// inside the coordinator; reports show only the distribution.
    pub fn participations_by_device(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, Vec<u64>)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT device_id, round FROM participations WHERE run_id = ?1 ORDER BY device_id, round",
        )?;
        let rows = stmt.query_map(params![run_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        let mut out: Vec<(String, Vec<u64>)> = vec![];
        for row in rows {
            let (device, round) = row?;
            match out.last_mut() {
                Some((d, rounds)) if *d == device => rounds.push(round),
                _ => out.push((device, vec![round])),
            }
        }
        Ok(out)
    }

    /// Appends one event to a run's ledger on its own (a guardrail alert).
    pub fn append_event(
        &mut self,
        run_id: &str,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        run_status(&tx, run_id)?;
        append(&tx, run_id, at_ms, event)?;
        tx.commit()?;
        Ok(())
    }

    /// The summed evaluation counts of (run, model version, cohort) and how many reports they
    /// sum, if any.
    pub fn evaluation_counts(
        &self,
        run_id: &str,
        model_version: u64,
        cohort: &str,
    ) -> Result<Option<(u64, EvaluationSums)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT reports, recommendation_lists_shown, recommendations_shown, injected_recommendations_shown, \
                 positive_feedback_count, negative_feedback_count, personalisation_opt_outs, training_opt_outs, \
                 predictions_evaluated, predictions_within_half, intra_list_diversity_sum, topic_coverage_sum, \
                 topic_coverage_reports, opted_out_reports FROM evaluation_counts \
                 WHERE run_id = ?1 AND model_version = ?2 AND cohort = ?3",
                params![run_id, model_version as i64, cohort],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        EvaluationSums {
                            recommendation_lists_shown: r.get(1)?,
                            recommendations_shown: r.get(2)?,
                            injected_recommendations_shown: r.get(3)?,
                            positive_feedback_count: r.get(4)?,
                            negative_feedback_count: r.get(5)?,
                            personalisation_opt_outs: r.get(6)?,
                            training_opt_outs: r.get(7)?,
                            predictions_evaluated: r.get(8)?,
                            predictions_within_half: r.get(9)?,
                            intra_list_diversity_sum: r.get(10)?,
                            topic_coverage_sum: r.get(11)?,
                            topic_coverage_reports: r.get(12)?,
                            opted_out_reports: r.get(13)?,
                        },
                    ))
                },
            )
            .optional()?)
    }

    /// Direct access for tests that tamper with the database.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

fn run_status(tx: &Transaction<'_>, run_id: &str) -> Result<RunStatus, StoreError> {
    let s: Option<String> = tx
        .query_row(
            "SELECT status FROM runs WHERE id = ?1",
            params![run_id],
            |r| r.get(0),
        )
        .optional()?;
    RunStatus::parse(&s.ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?)
}

fn insert_model(
    tx: &Transaction<'_>,
    run_id: &str,
    round: u64,
    model: &ModelBlob,
    at_ms: i64,
    published_at_ms: Option<i64>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO model_versions (run_id, version, round, sha256, snapshot, created_at_ms, published_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![run_id, model.version as i64, round as i64, model.sha256, model.bytes, at_ms, published_at_ms],
    )?;
    Ok(())
}

/// Appends one entry to a run's chain inside `tx`.
fn append(
    tx: &Transaction<'_>,
    run_id: &str,
    at_ms: i64,
    event: LedgerEvent,
) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT sequence, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence DESC LIMIT 1",
            params![run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (sequence, prev_hash) = match last {
        Some((s, h)) => (s as u64 + 1, h),
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
        params![run_id, sequence as i64, at_ms, kind, sealed.body, sealed.prev_hash, sealed.hash],
    )?;
    Ok(())
}

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RunRecord, StoreError>> {
    let id: String = r.get(0)?;
    let toml: String = r.get(1)?;
    let status: String = r.get(3)?;
    let record = (|| {
        Ok(RunRecord {
            manifest: RunManifest::from_toml(&toml, &format!("stored manifest of run {id}"))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            manifest_sha256: r.get(2)?,
            status: RunStatus::parse(&status)?,
            rounds_committed: r.get::<_, i64>(4)? as u64,
            next_round: r.get::<_, i64>(5)? as u64,
            current_version: r.get::<_, i64>(6)? as u64,
            published_version: r.get::<_, i64>(7)? as u64,
            server_state: r.get(8)?,
            id: id.clone(),
        })
    })();
    Ok(record)
}
