//! The ledger reader: a coordinator store's runs and their hash-chained privacy ledger.
//!
//! The store is opened **read-only** (SQLite `SQLITE_OPEN_READ_ONLY`; nothing is migrated
//! or written, so a notebook can read the store of a running coordinator), and every run's
//! ledger is checked with the coordinator's own [`fedpref_engine::ledger::verify`],
//! which recomputes the hash chain and every cumulative ε from the recorded σ, q and mode.
//!
//! The result is a JSON list with one object per run, oldest first: `run_id`, `status`,
//! `rounds_committed`, `published_version`, `ok` and then either `totals` (as
//! `fedpref-coordinator ledger verify --json` prints them) or the failing `sequence` and
//! `problem`, and `entries`: each entry's canonical body (as `ledger show` prints it,
//! parsed) with its `hash` and `prev_hash`.

use std::path::Path;

use fedpref_engine::ledger::{SealedEntry, verify};
use rusqlite::{Connection, OpenFlags, params};
use serde_json::{Value, json};

use crate::Error;

/// The newest coordinator store schema this reader knows (the coordinator's
/// `store::MIGRATIONS.len()`, checked by a test; the wheel does not link the coordinator).
pub const SUPPORTED_SCHEMA: i64 = 9;

/// Reads and verifies every run's ledger in the store at `db`.
pub fn read(db: &Path) -> Result<String, Error> {
    if !db.is_file() {
        return Err(Error::Invalid(format!("{}: no such file", db.display())));
    }
    let failed = |e: rusqlite::Error| Error::Failed(format!("{}: {e}", db.display()));
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(|e| {
            Error::Failed(format!(
                "{}: not a fedpref coordinator store ({e})",
                db.display()
            ))
        })?;
    if version > SUPPORTED_SCHEMA {
        return Err(Error::Failed(format!(
            "{}: the store has schema version {version}; this reader supports up to {SUPPORTED_SCHEMA}",
            db.display(),
        )));
    }
    let mut runs = conn
        .prepare(
            "SELECT id, status, rounds_committed, published_version FROM runs ORDER BY created_at_ms, id",
        )
        .map_err(failed)?;
    let runs = runs
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(failed)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    let mut entries_stmt = conn
        .prepare(
            "SELECT sequence, body, prev_hash, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence",
        )
        .map_err(failed)?;
    let mut out = Vec::with_capacity(runs.len());
    for (run_id, status, rounds_committed, published_version) in runs {
        let entries = entries_stmt
            .query_map(params![run_id], |r| {
                Ok(SealedEntry {
                    sequence: r.get::<_, i64>(0)? as u64,
                    body: r.get(1)?,
                    prev_hash: r.get(2)?,
                    hash: r.get(3)?,
                })
            })
            .map_err(failed)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let mut run = json!({
            "run_id": run_id,
            "status": status,
            "rounds_committed": rounds_committed,
            "published_version": published_version,
        });
        match verify(&run_id, &entries) {
            Ok(totals) => {
                run["ok"] = json!(true);
                run["totals"] = json!(totals);
            }
            Err(f) => {
                run["ok"] = json!(false);
                run["sequence"] = json!(f.sequence);
                run["problem"] = json!(f.problem);
            }
        }
        run["entries"] = Value::Array(
            entries
                .iter()
                .map(|e| {
                    let mut body: Value = serde_json::from_str(&e.body).unwrap_or_else(
                        |err| json!({"unreadable_body": e.body, "error": err.to_string()}),
                    );
                    body["hash"] = json!(e.hash);
                    body["prev_hash"] = json!(e.prev_hash);
                    body
                })
                .collect(),
        );
        out.push(run);
    }
    Ok(Value::Array(out).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpref_coordinator::store::Store;

    #[test]
    fn the_reader_knows_the_coordinators_newest_schema() {
        assert_eq!(
            SUPPORTED_SCHEMA,
            fedpref_coordinator::store::MIGRATIONS.len() as i64
        );
    }

    #[test]
    fn a_missing_file_and_a_foreign_database_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&dir.path().join("nope.db")).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)) && e.to_string().ends_with("no such file"));
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER)")
            .unwrap();
        let e = read(&other).unwrap_err();
        assert!(
            e.to_string().contains("not a fedpref coordinator store"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_store_has_no_runs_and_is_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.db");
        drop(Store::open(&path).unwrap());
        let before = std::fs::read(&path).unwrap();
        assert_eq!(read(&path).unwrap(), "[]");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
