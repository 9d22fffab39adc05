//! The on-device SQLite store: schema, migrations and row access.
//!
//! # Layout
//! One file the app chooses. Three kinds of user data live in three tables, each row with
//! its timestamp (`at_ms`, milliseconds since the epoch, UTC):
//! - `explicit` — what the user told the app: `role`, `goal`, `interest`;
//! - `implicit` — what was derived from use: `topic` and `format` affinities and active
//!   `hour`s, each with the item it came from (rebuilt from feedback whenever it changes);
//! - `feedback` — signals: `rating`, `thumbs`, `save`, `dismiss`, `dwell`.
//!
//! Beside them: `consents` (sensitive-topic opt-ins), `muted_topics`, `settings`,
//! `items` (the catalogue), `global_model` (the shared model), `private_model` (u, b_u),
//! `privacy_budget` (the on-device accountant, as JSON) and `uploads` (one row per
//! released update); since migration 2, `enrolment`, `installed_snapshot`, `model_download`
//! and `model_download_chunks` (participation, see [`MIGRATIONS`]). `schema_version` holds the schema's version; [`MIGRATIONS`] are
//! applied in order, each in its own transaction, when a store is opened.
//!
//! # Journal and deletion
//! The store uses SQLite's rollback journal (`journal_mode = DELETE`), not WAL: a device
//! writes rarely and from one thread, so WAL's concurrency buys nothing, and with a
//! rollback journal the user's data lives in exactly one file once a transaction has
//! committed (a WAL file would hold copies of deleted pages until a checkpoint).
//! `secure_delete = ON` makes SQLite overwrite deleted content with zeros, so expired
//! rows are really gone; "delete everything" also runs `VACUUM`.

use rusqlite::{Connection, OptionalExtension, params};

use crate::event::{CatalogueItem, ExplicitKind, Feedback, Signal};
use crate::time::Timestamp;

/// The schema, one migration per version (index 0 takes version 0 to 1).
///
/// Migration 2 adds what participation needs: `enrolment` (the coordinator's endpoint, the
/// device id and the device token — a secret, never logged or exported), `installed_snapshot`
/// (which run, version and SHA-256 the installed shared model came from) and
/// `model_download` + `model_download_chunks` (a download in progress, kept chunk by chunk
/// so that it resumes from the last byte received).
///
/// Migration 3 adds federated evaluation ([`crate::evaluation`]): `evaluation_window` (the
/// counts of each open window, one per run and model version), `evaluation_shown` and
/// `evaluation_topics` (the items and topics shown in each window, kept on the device only
/// to attribute feedback and count distinct topics; deleted with the window).
///
/// Migration 4 makes evaluation a DP release: `evaluation_token` (the single-use token and
/// noise multiplier a task gave for reporting on its run and model version; a secret like
/// the device token, deleted with the enrolment) and `uploads.kind` (`update` for a model
/// update or share, `evaluation` for an evaluation release: both spend the budget).
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    item TEXT PRIMARY KEY,
    title TEXT,
    topics TEXT NOT NULL,
    sensitive INTEGER NOT NULL,
    published_ms INTEGER,
    format TEXT,
    popularity REAL
);
CREATE TABLE explicit (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('role', 'goal', 'interest')),
    value TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX explicit_at ON explicit (at_ms);
CREATE TABLE implicit (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('topic', 'format', 'hour')),
    value TEXT NOT NULL,
    weight REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    source_item TEXT NOT NULL
);
CREATE INDEX implicit_at ON implicit (at_ms);
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'thumbs', 'save', 'dismiss', 'dwell')),
    item TEXT NOT NULL,
    value REAL NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX feedback_at ON feedback (at_ms);
CREATE TABLE consents (topic TEXT PRIMARY KEY, personalise INTEGER NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE muted_topics (topic TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE global_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    factor_dimension INTEGER NOT NULL,
    item_ids TEXT NOT NULL,
    item_factors BLOB NOT NULL,
    item_biases BLOB NOT NULL,
    global_offset REAL NOT NULL
);
CREATE TABLE private_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    model_version INTEGER NOT NULL,
    user_factor BLOB NOT NULL,
    user_bias REAL NOT NULL,
    example_count INTEGER NOT NULL,
    fitted_ms INTEGER NOT NULL
);
CREATE TABLE privacy_budget (id INTEGER PRIMARY KEY CHECK (id = 1), budget TEXT NOT NULL);
CREATE TABLE uploads (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    round_id INTEGER NOT NULL,
    model_version INTEGER NOT NULL,
    mode TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    clip_norm REAL NOT NULL,
    epsilon_after REAL NOT NULL
);
"#,
    r#"
CREATE TABLE enrolment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    endpoint TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_token TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL
);
CREATE TABLE installed_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    size_bytes INTEGER NOT NULL
);
CREATE TABLE model_download (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    size_bytes INTEGER NOT NULL
);
CREATE TABLE model_download_chunks (start_byte INTEGER PRIMARY KEY, content BLOB NOT NULL);
"#,
    r#"
CREATE TABLE evaluation_window (
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    lists INTEGER NOT NULL DEFAULT 0,
    shown INTEGER NOT NULL DEFAULT 0,
    injected INTEGER NOT NULL DEFAULT 0,
    diversity_sum REAL NOT NULL DEFAULT 0,
    positive INTEGER NOT NULL DEFAULT 0,
    negative INTEGER NOT NULL DEFAULT 0,
    personalisation_opt_out INTEGER NOT NULL DEFAULT 0,
    training_opt_out INTEGER NOT NULL DEFAULT 0,
    predictions INTEGER NOT NULL DEFAULT 0,
    within_half INTEGER NOT NULL DEFAULT 0,
    abs_error_sum REAL NOT NULL DEFAULT 0,
    sq_error_sum REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, model_version)
);
CREATE TABLE evaluation_shown (
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, item)
);
CREATE INDEX evaluation_shown_item ON evaluation_shown (item);
CREATE TABLE evaluation_topics (
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, topic)
);
"#,
    r#"
CREATE TABLE evaluation_token (
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    token TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    PRIMARY KEY (run_id, model_version)
);
ALTER TABLE uploads ADD COLUMN kind TEXT NOT NULL DEFAULT 'update';
"#,
    r#"
ALTER TABLE uploads ADD COLUMN assumed_honest_devices INTEGER;
ALTER TABLE uploads ADD COLUMN min_contributors INTEGER;
"#,
];

/// The schema version this SDK writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Tables that hold the user's data or anything derived from it.
pub(crate) const USER_TABLES: &[&str] = &[
    "explicit",
    "implicit",
    "feedback",
    "consents",
    "muted_topics",
    "private_model",
];

/// The settings key of the earliest time of the next federated-evaluation report (ms since
/// the epoch), as the coordinator scheduled it for this enrolment.
pub(crate) const NEXT_REPORT_KEY: &str = "evaluation_next_report_ms";

/// How long a write waits for another handle's lock before it fails with "database is
/// locked".
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Creates the store's file with mode 0600 if it does not exist, and tightens an existing
/// one to 0600 (Unix; elsewhere the platform's defaults apply).
fn restrict_to_owner(path: &std::path::Path) -> Result<(), crate::SdkError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let storage =
            |e: std::io::Error| crate::SdkError::Storage(format!("{}: {e}", path.display()));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(storage)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(storage)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Opens (creating if needed) and migrates a store. Fails if the file's schema is newer
/// than this SDK's.
///
/// The file is created readable and writable by its owner only (mode 0600 on Unix; an
/// existing store is tightened to 0600): it holds the device token and the participation
/// history. SQLite gives its rollback journal the database file's mode. Writers wait up to
/// [`BUSY_TIMEOUT`] for another handle's write lock, so two handles (or two processes) on
/// one store take turns instead of failing.
pub(crate) fn open(path: &std::path::Path) -> Result<Connection, crate::SdkError> {
    restrict_to_owner(path)?;
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    let mode: String = conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(crate::SdkError::Storage(format!(
            "could not set the rollback journal (journal_mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        [],
    )?;
    let found: Option<i64> = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(crate::SdkError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version as i64 + 1],
        )?;
        tx.commit()?;
    }
    Ok(conn)
}

pub(crate) fn get_setting(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
}

pub(crate) fn set_setting(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(crate) fn upsert_item(conn: &Connection, item: &CatalogueItem) -> rusqlite::Result<()> {
    let topics = serde_json::to_string(&item.topics).expect("strings serialise");
    conn.prepare_cached(
        "INSERT INTO items (item, title, topics, sensitive, published_ms, format, popularity)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (item) DO UPDATE SET title = excluded.title, topics = excluded.topics,
           sensitive = excluded.sensitive, published_ms = excluded.published_ms,
           format = excluded.format, popularity = excluded.popularity",
    )?
    .execute(params![
        item.item,
        item.title,
        topics,
        item.sensitive,
        item.published.map(Timestamp::millis),
        item.format,
        item.popularity
    ])?;
    Ok(())
}

pub(crate) fn load_items(conn: &Connection) -> rusqlite::Result<Vec<CatalogueItem>> {
    let mut stmt = conn.prepare(
        "SELECT item, title, topics, sensitive, published_ms, format, popularity FROM items ORDER BY rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        let topics: String = r.get(2)?;
        Ok(CatalogueItem {
            item: r.get(0)?,
            title: r.get(1)?,
            topics: serde_json::from_str(&topics).unwrap_or_default(),
            sensitive: r.get(3)?,
            published: r.get::<_, Option<i64>>(4)?.map(Timestamp::from_millis),
            format: r.get(5)?,
            popularity: r.get(6)?,
        })
    })?;
    rows.collect()
}

pub(crate) fn insert_feedback(conn: &Connection, f: &Feedback) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO feedback (kind, item, value, at_ms) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![
            f.signal.kind(),
            f.item,
            f.signal.stored_value(),
            f.at.millis()
        ])?;
    Ok(())
}

pub(crate) fn load_feedback(conn: &Connection) -> rusqlite::Result<Vec<Feedback>> {
    let mut stmt = conn.prepare("SELECT kind, item, value, at_ms FROM feedback ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(0)?;
        let value: f64 = r.get(2)?;
        Ok(Feedback {
            item: r.get(1)?,
            signal: Signal::from_stored(&kind, value).unwrap_or(Signal::Save),
            at: Timestamp::from_millis(r.get(3)?),
        })
    })?;
    rows.collect()
}

/// Stores an explicit record: a role replaces the previous role; a goal or interest
/// replaces an equal one (refreshing its timestamp).
pub(crate) fn put_explicit(
    conn: &Connection,
    kind: ExplicitKind,
    value: &str,
    at: Timestamp,
) -> rusqlite::Result<()> {
    if kind == ExplicitKind::Role {
        conn.execute("DELETE FROM explicit WHERE kind = 'role'", [])?;
    } else {
        conn.execute(
            "DELETE FROM explicit WHERE kind = ?1 AND value = ?2",
            params![kind.as_str(), value],
        )?;
    }
    conn.execute(
        "INSERT INTO explicit (kind, value, at_ms) VALUES (?1, ?2, ?3)",
        params![kind.as_str(), value, at.millis()],
    )?;
    Ok(())
}

pub(crate) fn remove_explicit(
    conn: &Connection,
    kind: ExplicitKind,
    value: Option<&str>,
) -> rusqlite::Result<usize> {
    match value {
        Some(v) => conn.execute(
            "DELETE FROM explicit WHERE kind = ?1 AND value = ?2",
            params![kind.as_str(), v],
        ),
        None => conn.execute("DELETE FROM explicit WHERE kind = ?1", [kind.as_str()]),
    }
}

pub(crate) fn load_explicit(
    conn: &Connection,
) -> rusqlite::Result<Vec<(ExplicitKind, String, Timestamp)>> {
    let mut stmt = conn.prepare("SELECT kind, value, at_ms FROM explicit ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(0)?;
        Ok((
            ExplicitKind::parse(&kind).unwrap_or(ExplicitKind::Goal),
            r.get(1)?,
            Timestamp::from_millis(r.get(2)?),
        ))
    })?;
    rows.collect()
}

pub(crate) fn put_consent(
    conn: &Connection,
    topic: &str,
    personalise: bool,
    at: Timestamp,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO consents (topic, personalise, at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (topic) DO UPDATE SET personalise = excluded.personalise, at_ms = excluded.at_ms",
        params![topic, personalise, at.millis()],
    )?;
    Ok(())
}

pub(crate) fn load_consents(conn: &Connection) -> rusqlite::Result<Vec<(String, bool, Timestamp)>> {
    let mut stmt = conn.prepare("SELECT topic, personalise, at_ms FROM consents ORDER BY topic")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, Timestamp::from_millis(r.get(2)?)))
    })?;
    rows.collect()
}

pub(crate) fn load_muted(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT topic FROM muted_topics ORDER BY topic")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// One derived (implicit) row.
#[derive(Clone, Debug, PartialEq)]
pub struct ImplicitRow {
    /// `topic`, `format` or `hour`.
    pub kind: &'static str,
    /// The topic, the format, or the hour (`00`–`23`, UTC).
    pub value: String,
    /// The affinity: positive for liking, negative for disliking (activity for hours).
    pub weight: f64,
    /// When the event it came from happened.
    pub at: Timestamp,
    /// The item it came from.
    pub source_item: String,
}

pub(crate) fn replace_implicit(conn: &Connection, rows: &[ImplicitRow]) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM implicit", [])?;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO implicit (kind, value, weight, at_ms, source_item) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for row in rows {
        stmt.execute(params![
            row.kind,
            row.value,
            row.weight,
            row.at.millis(),
            row.source_item
        ])?;
    }
    Ok(())
}

pub(crate) fn load_implicit(conn: &Connection) -> rusqlite::Result<Vec<ImplicitRow>> {
    let mut stmt =
        conn.prepare("SELECT kind, value, weight, at_ms, source_item FROM implicit ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(0)?;
        Ok(ImplicitRow {
            kind: match kind.as_str() {
                "topic" => "topic",
                "format" => "format",
                _ => "hour",
            },
            value: r.get(1)?,
            weight: r.get(2)?,
            at: Timestamp::from_millis(r.get(3)?),
            source_item: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Whether any row of `table` is older than `cutoff`.
pub(crate) fn has_rows_before(
    conn: &Connection,
    table: &str,
    cutoff: Timestamp,
) -> rusqlite::Result<bool> {
    conn.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE at_ms < ?1)"),
        [cutoff.millis()],
        |r| r.get(0),
    )
}

pub(crate) fn delete_before(
    conn: &Connection,
    table: &str,
    cutoff: Timestamp,
) -> rusqlite::Result<usize> {
    conn.execute(
        &format!("DELETE FROM {table} WHERE at_ms < ?1"),
        [cutoff.millis()],
    )
}

pub(crate) fn f64_blob(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn blob_f64(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_is_at_the_current_schema_version_and_reopening_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = open(&path).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        set_setting(&conn, "x", "1").unwrap();
        drop(conn);
        let conn = open(&path).unwrap();
        assert_eq!(get_setting(&conn, "x").unwrap().as_deref(), Some("1"));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_store_from_a_newer_sdk_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        let before = std::fs::read(&path).unwrap();
        let err = open(&path).unwrap_err();
        assert!(err.to_string().contains("99"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn a_new_store_is_created_readable_by_its_owner_only_and_an_old_one_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(open(&path).unwrap());
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn the_store_uses_the_rollback_journal_and_secure_delete() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("s.db")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let secure: i64 = conn
            .query_row("PRAGMA secure_delete", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), secure), ("delete", 1));
    }
}
