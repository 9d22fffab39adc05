//! The store and the ledger through the durable coordinator: one transaction per round,
//! verification, and tampering.

mod common;

use std::path::Path;
use std::process::Command;

use common::{COHORT_MANIFEST, durable_round, manifest};
use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::ledger::{LedgerEvent, verify};
use fedpref_coordinator::store::Store;
use rusqlite::params;

const T0: i64 = 1_700_000_000_000;

/// Creates a run and drives `rounds` full rounds of 3 devices through a durable coordinator.
fn run_rounds(db: &Path, rounds: usize) -> Coordinator {
    let mut c = Coordinator::open(db, T0).unwrap();
    c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    let mut now = T0;
    for r in 0..rounds {
        now = durable_round(&mut c, "r1", &r.to_string(), 3, now);
    }
    c
}

fn kinds(store: &Store) -> Vec<String> {
    store
        .ledger("r1")
        .unwrap()
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.body).unwrap()["event"]["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn rounds_write_a_verifiable_chain_whose_totals_match_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let c = run_rounds(&db, 3);
    let spent = c.engine("r1").unwrap().spent();
    let store = c.store();
    assert_eq!(
        kinds(store),
        [
            "run_created",
            "model_published",
            "round_committed",
            "model_published",
            "round_committed",
            "model_published",
            "round_committed",
            "model_published"
        ]
    );
    let totals = verify("r1", &store.ledger("r1").unwrap()).unwrap();
    assert_eq!(totals.rounds_committed, 3);
    assert_eq!(totals.cumulative_epsilon, spent);
    let run = store.run("r1").unwrap();
    assert_eq!(
        (
            run.rounds_committed,
            run.current_version,
            run.published_version
        ),
        (3, 4, 4)
    );
    assert_eq!(store.participations("r1", "dev-1-2").unwrap(), vec![2]);
    // Every stored version decodes and matches its hash.
    for v in 1..=4 {
        fedpref_coordinator::model::decode(&store.model("r1", v).unwrap(), &run.manifest.model)
            .unwrap();
    }
}

#[test]
fn the_state_survives_reopening_and_the_spend_is_not_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let spent = run_rounds(&db, 2).engine("r1").unwrap().spent();
    let c = Coordinator::open(&db, T0 + 10_000_000).unwrap();
    let e = c.engine("r1").unwrap();
    assert_eq!(e.rounds_committed(), 2);
    assert_eq!(e.spent(), spent);
    assert_eq!(e.model().0, 3);
}

fn tamper(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn verify_db(db: &Path) -> Result<(), (u64, String)> {
    let store = Store::open(db).unwrap();
    verify("r1", &store.ledger("r1").unwrap())
        .map(|_| ())
        .map_err(|f| (f.sequence, f.problem))
}

#[test]
fn an_edited_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 2));
    assert!(verify_db(&db).is_ok());
    tamper(
        &db,
        "UPDATE ledger SET body = replace(body, '\"cohort_size\":3', '\"cohort_size\":30') WHERE sequence = 5",
    );
    let (seq, problem) = verify_db(&db).unwrap_err();
    assert_eq!(seq, 5);
    assert!(problem.contains("edited"), "{problem}");
}

#[test]
fn a_removed_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 2));
    tamper(&db, "DELETE FROM ledger WHERE sequence = 3");
    let (seq, problem) = verify_db(&db).unwrap_err();
    assert_eq!(seq, 3);
    assert!(problem.contains("removed"), "{problem}");
}

#[test]
fn reordered_entries_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 2));
    tamper(
        &db,
        "UPDATE ledger SET sequence = -1 WHERE sequence = 3; UPDATE ledger SET sequence = 3 WHERE sequence = 4; \
         UPDATE ledger SET sequence = 4 WHERE sequence = -1;",
    );
    let (seq, _) = verify_db(&db).unwrap_err();
    assert_eq!(seq, 3);
}

#[test]
fn a_rewritten_chain_with_understated_epsilon_is_found_by_rederivation() {
    // Someone lowers a round's cumulative ε and recomputes every hash after it: the chain is
    // intact, but the ε no longer follows from the recorded σ, q and mode.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 2));
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut rows: Vec<(i64, String, String)> = conn
        .prepare(
            "SELECT sequence, body, prev_hash FROM ledger WHERE run_id = 'r1' ORDER BY sequence",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut entry: serde_json::Value = serde_json::from_str(&rows[4].1).unwrap();
    assert_eq!(entry["event"]["kind"], "round_committed");
    let eps = entry["event"]["cumulative_epsilon"][0]["epsilon"]
        .as_f64()
        .unwrap();
    entry["event"]["cumulative_epsilon"][0]["epsilon"] = serde_json::json!(eps / 2.0);
    rows[4].1 = serde_json::to_string(&entry).unwrap();
    let mut prev = rows[4].2.clone();
    for (seq, body, _) in rows.iter().skip(4) {
        let hash = fedpref_coordinator::ledger::chain_hash(&prev, body);
        conn.execute(
            "UPDATE ledger SET body = ?1, prev_hash = ?2, hash = ?3 WHERE run_id = 'r1' AND sequence = ?4",
            params![body, prev, hash, seq],
        )
        .unwrap();
        prev = hash;
    }
    drop(conn);
    let (seq, problem) = verify_db(&db).unwrap_err();
    assert_eq!(seq, 5);
    assert!(problem.contains("does not follow"), "{problem}");
}

#[test]
fn ledger_verify_command_says_ok_or_names_the_first_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 2));
    let bin = env!("CARGO_BIN_EXE_fedpref-coordinator");
    let ok = Command::new(bin)
        .args(["ledger", "verify", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("run r1: ok") && text.contains("2 rounds committed"),
        "{text}"
    );

    tamper(
        &db,
        "UPDATE ledger SET at_ms = at_ms + 1, body = replace(body, '\"round\":2', '\"round\":7') WHERE sequence = 5",
    );
    let bad = Command::new(bin)
        .args(["ledger", "verify", "--run", "r1", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("ledger entry 5"), "{text}");
}

#[test]
fn run_create_command_validates_the_manifest_and_refuses_mode_none() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let bin = env!("CARGO_BIN_EXE_fedpref-coordinator");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, COHORT_MANIFEST).unwrap();
    let out = Command::new(bin)
        .args(["run", "create", "--id", "first", "--json", "--manifest"])
        .arg(&good)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["run_id"], "first");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        COHORT_MANIFEST.replace("clip_norm = 1.0", "clip_norm = -3.0"),
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["run", "create", "--manifest"])
        .arg(&bad)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("clip_norm"),
        "{err}"
    );

    let none = dir.path().join("none.toml");
    std::fs::write(
        &none,
        COHORT_MANIFEST.replace("privacy_mode = \"central\"", "privacy_mode = \"none\""),
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["run", "create", "--manifest"])
        .arg(&none)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("simulations only"));

    // The failed attempts left the database as it was.
    let store = Store::open(&db).unwrap();
    assert_eq!(store.runs().unwrap().len(), 1);
    assert!(verify("first", &store.ledger("first").unwrap()).is_ok());
    let _ = LedgerEvent::Resumed {
        reason: String::new(),
    };
}

#[test]
fn run_create_command_takes_a_postgres_url_as_every_other_db_command_does() {
    let Some(server) = common::pg::server() else {
        return;
    };
    let url = server.create_database();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, COHORT_MANIFEST).unwrap();
    let bin = env!("CARGO_BIN_EXE_fedpref-coordinator");
    let out = Command::new(bin)
        .args(["run", "create", "--id", "pg-run", "--json", "--manifest"])
        .arg(&good)
        .args(["--db", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open_location(&url).unwrap();
    assert_eq!(store.runs().unwrap().len(), 1);
    let out = Command::new(bin)
        .args(["ledger", "verify", "--run", "pg-run", "--db", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_distributed_round_without_its_record_is_found() {
    // A central chain relabelled as distributed, hashes recomputed: the rounds then claim
    // mode distributed with no mechanism record, which verify must not account as a
    // Gaussian.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    drop(run_rounds(&db, 1));
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<(i64, String, String)> = conn
        .prepare(
            "SELECT sequence, body, prev_hash FROM ledger WHERE run_id = 'r1' ORDER BY sequence",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut prev = rows[0].2.clone();
    let mut committed = None;
    for (seq, body, _) in &rows {
        let mut entry: serde_json::Value = serde_json::from_str(body).unwrap();
        match entry["event"]["kind"].as_str().unwrap() {
            "run_created" => entry["event"]["privacy_mode"] = serde_json::json!("distributed"),
            "round_committed" => {
                entry["event"]["mode"] = serde_json::json!("distributed");
                committed.get_or_insert(*seq);
            }
            _ => {}
        }
        let body = serde_json::to_string(&entry).unwrap();
        let hash = fedpref_coordinator::ledger::chain_hash(&prev, &body);
        conn.execute(
            "UPDATE ledger SET body = ?1, prev_hash = ?2, hash = ?3 WHERE run_id = 'r1' AND sequence = ?4",
            params![body, prev, hash, seq],
        )
        .unwrap();
        prev = hash;
    }
    drop(conn);
    let (seq, problem) = verify_db(&db).unwrap_err();
    assert_eq!(Some(seq as i64), committed);
    assert!(problem.contains("distributed record"), "{problem}");
}

#[test]
fn an_evaluation_release_entry_verifies_only_with_the_epsilon_its_sigma_gives() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let c = run_rounds(&db, 1);
    let delta = c.store().run("r1").unwrap().manifest.budget.delta;
    drop(c);
    let mut store = Store::open(&db).unwrap();
    let honest = fedpref_coordinator::ledger::evaluation_release_event(2, 4.0, delta);
    let LedgerEvent::EvaluationReleased { epsilon, .. } = honest else {
        unreachable!()
    };
    assert!(epsilon > 0.0 && epsilon.is_finite());
    store.append_event("r1", honest, T0 + 100).unwrap();
    assert_eq!(verify_db(&db), Ok(()));
    // An entry that understates what each device's evaluation release cost is found, even
    // with a correct hash chain.
    store
        .append_event(
            "r1",
            LedgerEvent::EvaluationReleased {
                model_version: 3,
                noise_multiplier: 4.0,
                clip_norm: fedpref_privacy::evaluation::clip_norm(),
                epsilon: epsilon / 10.0,
                delta,
            },
            T0 + 200,
        )
        .unwrap();
    let (sequence, problem) = verify_db(&db).unwrap_err();
    assert_eq!(sequence, store.ledger("r1").unwrap().len() as u64);
    assert!(problem.contains("evaluation release"), "{problem}");
}

#[test]
fn a_run_stopped_before_its_first_round_verifies_and_its_stop_may_claim_no_spend() {
    use fedpref_coordinator::engine::{AdminCommand, Event};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    c.handle(
        "r1",
        Event::Admin(AdminCommand::Stop {
            reason: "purpose withdrawn".into(),
        }),
        T0 + 1,
    )
    .unwrap();
    drop(c);
    assert_eq!(
        kinds(&Store::open(&db).unwrap()),
        ["run_created", "model_published", "run_stopped"]
    );
    assert_eq!(verify_db(&db), Ok(()));
    // The stop's totals rewritten to claim a spend no round made (hashes recomputed).
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (body, prev): (String, String) = conn
        .query_row(
            "SELECT body, prev_hash FROM ledger WHERE run_id = 'r1' AND sequence = 3",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(&body).unwrap();
    entry["event"]["cumulative_epsilon"][0]["epsilon"] = serde_json::json!(0.5);
    let body = serde_json::to_string(&entry).unwrap();
    let hash = fedpref_coordinator::ledger::chain_hash(&prev, &body);
    conn.execute(
        "UPDATE ledger SET body = ?1, hash = ?2 WHERE run_id = 'r1' AND sequence = 3",
        params![body, hash],
    )
    .unwrap();
    drop(conn);
    let (seq, problem) = verify_db(&db).unwrap_err();
    assert_eq!(seq, 3);
    assert!(problem.contains("final totals"), "{problem}");
}
