//! The ledger against someone with write access to the database: truncation, deleted runs and
//! chains rewritten from genesis are evident to `ledger verify` given a signed checkpoint kept
//! elsewhere; verify checks the rounds against the manifest and the budget on its own; and the
//! engine's spend comes from the ledger. On SQLite and, when a server is available, PostgreSQL.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{COHORT_MANIFEST, durable_round, manifest, pg};
use fedpref_coordinator::checkpoint::LedgerSigner;
use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::ledger::{chain_hash, check_against_manifest};
use fedpref_coordinator::store::Store;

const T0: i64 = 1_700_000_000_000;
const BIN: &str = env!("CARGO_BIN_EXE_fedpref-coordinator");

/// A SQLite file in a temporary directory, and a fresh PostgreSQL database when a server is
/// available (otherwise the PostgreSQL half skips, saying why).
fn locations() -> Vec<(String, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![(dir.path().join("c.db").display().to_string(), dir)];
    if let Some(url) = pg::fresh_database() {
        out.push((url, tempfile::tempdir().unwrap()));
    }
    out
}

fn signer() -> LedgerSigner {
    LedgerSigner::from_seed([42; 32])
}

fn open(location: &str) -> Coordinator {
    let mut store = Store::open_location(location).unwrap();
    store.set_ledger_signer(Some(signer()));
    Coordinator::with_store(store, T0).unwrap()
}

/// Run `r1` with `rounds` rounds of 3 devices through a coordinator that signs its ledger.
fn run_rounds(location: &str, rounds: usize) {
    let mut c = open(location);
    c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    let mut now = T0 + 1;
    for r in 0..rounds {
        now = durable_round(&mut c, "r1", &r.to_string(), 3, now);
    }
}

/// Runs SQL as someone who can write anything: foreign keys off on SQLite, and on PostgreSQL
/// the superuser with triggers (and so foreign keys) off for the session.
fn tamper(location: &str, sql: &str) {
    if location.starts_with("postgres") {
        let mut client = postgres::Client::connect(location, postgres::NoTls).unwrap();
        client
            .batch_execute(&format!("SET session_replication_role = replica; {sql}"))
            .unwrap();
    } else {
        let conn = rusqlite::Connection::open(location).unwrap();
        conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; {sql}"))
            .unwrap();
    }
}

/// The run's ledger rows (sequence, body, hash).
fn rows(location: &str) -> Vec<(i64, String)> {
    let store = Store::open_location(location).unwrap();
    store
        .ledger("r1")
        .unwrap()
        .into_iter()
        .map(|e| (e.sequence as i64, e.body))
        .collect()
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn verify(location: &str, checkpoints: &[&Path]) -> (i32, String) {
    let mut args = vec!["ledger", "verify", "--db", location];
    for c in checkpoints {
        args.push("--checkpoint");
        args.push(c.to_str().unwrap());
    }
    let out = cli(&args);
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn checkpoint(location: &str, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("r1.checkpoint.json");
    let out = cli(&[
        "ledger",
        "checkpoint",
        "--db",
        location,
        "--run",
        "r1",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[test]
fn a_checkpoint_names_the_run_head_and_key_and_an_intact_chain_extends_it() {
    for (location, dir) in locations() {
        run_rounds(&location, 2);
        let path = checkpoint(&location, dir.path());
        let cp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(cp["run_id"], "r1");
        assert_eq!(cp["entry_count"], 6);
        assert_eq!(cp["public_key"], signer().public_key_hex());
        let store = Store::open_location(&location).unwrap();
        assert_eq!(cp["head_hash"], store.ledger("r1").unwrap()[5].hash);
        drop(store);
        // More rounds later: the chain still extends the old checkpoint.
        let mut c = open(&location);
        durable_round(&mut c, "r1", "later", 3, T0 + 1_000_000);
        drop(c);
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains("signed by ledger key") && text.contains("extends 1 checkpoint"),
            "{text}"
        );
        // The report shows the key and the head.
        let out = cli(&["report", "--db", &location, "--run", "r1", "--format", "md"]);
        let md = String::from_utf8_lossy(&out.stdout);
        assert!(md.contains(&signer().public_key_hex()), "{md}");
    }
}

#[test]
fn deleting_the_tail_is_found_against_a_checkpoint() {
    for (location, dir) in locations() {
        run_rounds(&location, 3);
        let path = checkpoint(&location, dir.path());
        // Entries 5–8 (rounds 2 and 3) and their signatures go.
        tamper(
            &location,
            "DELETE FROM ledger WHERE sequence >= 5; DELETE FROM ledger_signatures WHERE sequence >= 5;",
        );
        // The shortened chain is consistent on its own …
        let (code, text) = verify(&location, &[]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("1 rounds committed"), "{text}");
        // … but does not extend the checkpoint.
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("ledger entry 5") && text.contains("entries were removed"),
            "{text}"
        );
    }
}

#[test]
fn deleting_the_tail_but_not_its_signatures_is_found_without_a_checkpoint() {
    for (location, _dir) in locations() {
        run_rounds(&location, 3);
        tamper(&location, "DELETE FROM ledger WHERE sequence >= 5;");
        let (code, text) = verify(&location, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("entries were removed"), "{text}");
    }
}

#[test]
fn deleting_a_runs_rows_is_found_against_a_checkpoint() {
    for (location, dir) in locations() {
        run_rounds(&location, 2);
        let path = checkpoint(&location, dir.path());
        tamper(
            &location,
            "DELETE FROM ledger WHERE run_id = 'r1'; DELETE FROM ledger_signatures WHERE run_id = 'r1';
             DELETE FROM participations WHERE run_id = 'r1'; DELETE FROM rounds WHERE run_id = 'r1';
             DELETE FROM model_versions WHERE run_id = 'r1'; DELETE FROM runs WHERE id = 'r1';",
        );
        let (code, text) = verify(&location, &[]);
        assert_eq!((code, text.trim()), (0, "no runs"));
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("run r1: FAILED") && text.contains("missing from the ledger"),
            "{text}"
        );
    }
}

#[test]
fn runs_are_listed_from_the_ledger_not_the_runs_table() {
    for (location, _dir) in locations() {
        run_rounds(&location, 1);
        tamper(&location, "DELETE FROM runs WHERE id = 'r1';");
        let (code, text) = verify(&location, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("run r1: FAILED") && text.contains("missing from the runs table"),
            "{text}"
        );
    }
}

/// Rewrites the chain from genesis with `edit` applied to each parsed body, recomputing every
/// hash, as someone without the signing key would.
fn rewrite_from_genesis(location: &str, edit: impl Fn(&mut serde_json::Value)) {
    let mut prev = fedpref_coordinator::ledger::GENESIS_HASH.to_string();
    let mut sql = String::new();
    for (seq, body) in rows(location) {
        let mut v: serde_json::Value = serde_json::from_str(&body).unwrap();
        edit(&mut v);
        let body = serde_json::to_string(&v).unwrap();
        let hash = chain_hash(&prev, &body);
        sql.push_str(&format!(
            "UPDATE ledger SET body = '{}', prev_hash = '{prev}', hash = '{hash}' WHERE run_id = 'r1' AND sequence = {seq};\n",
            body.replace('\'', "''")
        ));
        prev = hash;
    }
    sql.push_str("DELETE FROM ledger_signatures WHERE run_id = 'r1';");
    tamper(location, &sql);
}

#[test]
fn a_chain_rewritten_from_genesis_with_a_smaller_budget_fails_on_the_budget_and_the_checkpoint() {
    for (location, dir) in locations() {
        run_rounds(&location, 2);
        let path = checkpoint(&location, dir.path());
        rewrite_from_genesis(&location, |v| {
            if v["event"]["kind"] == "run_created" {
                v["event"]["budget_epsilon"] = serde_json::json!(1.0);
            }
        });
        // No checkpoint needed: the first round's ε already exceeds the rewritten budget.
        let (code, text) = verify(&location, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("ledger entry 3") && text.contains("exceeds the budget ε = 1"),
            "{text}"
        );
        // With the checkpoint, the rewrite itself is named.
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("the chain was rewritten"), "{text}");
    }
}

#[test]
fn a_chain_rewritten_within_its_budget_is_found_against_the_checkpoint_and_the_manifest() {
    for (location, dir) in locations() {
        run_rounds(&location, 2);
        let path = checkpoint(&location, dir.path());
        // A larger budget (more rounds to come) and no other change: every ε still follows.
        rewrite_from_genesis(&location, |v| {
            if v["event"]["kind"] == "run_created" {
                v["event"]["budget_epsilon"] = serde_json::json!(500.0);
            }
        });
        let (code, text) = verify(&location, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("ledger entry 1") && text.contains("but the manifest says"),
            "{text}"
        );
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("rewritten"), "{text}");
    }
}

#[test]
fn a_forged_checkpoint_is_refused() {
    for (location, dir) in locations() {
        run_rounds(&location, 1);
        let path = checkpoint(&location, dir.path());
        let mut cp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cp["entry_count"] = serde_json::json!(2);
        std::fs::write(&path, cp.to_string()).unwrap();
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("signature"), "{text}");
        std::fs::write(&path, "{\"format\": 1}").unwrap();
        let (code, text) = verify(&location, &[&path]);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("--checkpoint"), "{text}");
    }
}

#[test]
fn rounds_that_depart_from_the_manifest_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("c.db").display().to_string();
    run_rounds(&location, 2);
    let store = Store::open_location(&location).unwrap();
    let entries = store.ledger("r1").unwrap();
    let toml = store.manifest_toml("r1").unwrap().unwrap();
    check_against_manifest("r1", &entries, Some(&toml)).unwrap();
    let with = |seq: usize, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut e = entries.clone();
        let mut v: serde_json::Value = serde_json::from_str(&e[seq - 1].body).unwrap();
        edit(&mut v);
        e[seq - 1].body = v.to_string();
        check_against_manifest("r1", &e, Some(&toml))
            .unwrap_err()
            .to_string()
    };
    let e = with(3, &|v| v["event"]["noise_multiplier"] = 2.0.into());
    assert!(e.starts_with("ledger entry 3: its σ = 2"), "{e}");
    let e = with(5, &|v| v["event"]["clip_norm"] = 0.5.into());
    assert!(e.contains("clip norm C = 0.5"), "{e}");
    let e = with(5, &|v| v["event"]["mode"] = "local".into());
    assert!(e.contains("its mode local"), "{e}");
    let e = with(3, &|v| {
        v["event"]["rdp_increments"][0]["sampling_rate"] = 0.01.into()
    });
    assert!(e.contains("sampling rates"), "{e}");
    let e = with(1, &|v| v["event"]["noise_multiplier"] = 0.5.into());
    assert!(e.contains("run_created records σ"), "{e}");
    let other = toml.replace("noise_multiplier = 1.0", "noise_multiplier = 2.0");
    assert_ne!(other, toml);
    let e = check_against_manifest("r1", &entries, Some(&other))
        .unwrap_err()
        .to_string();
    assert!(e.contains("it was replaced"), "{e}");
}

#[test]
fn the_engine_restores_its_spend_from_the_ledger_not_the_runs_counter() {
    for (location, _dir) in locations() {
        run_rounds(&location, 2);
        let spent = open(&location).engine("r1").unwrap().spent();
        tamper(
            &location,
            "UPDATE runs SET rounds_committed = 0 WHERE id = 'r1';",
        );
        let c = open(&location);
        assert_eq!(c.engine("r1").unwrap().spent(), spent);
        assert!(spent[0].epsilon > 0.0);
    }
}

#[test]
fn every_entry_is_signed_in_its_own_transaction() {
    for (location, _dir) in locations() {
        run_rounds(&location, 1);
        let store = Store::open_location(&location).unwrap();
        let entries = store.ledger("r1").unwrap();
        let sigs = store.ledger_signatures("r1").unwrap();
        assert_eq!(sigs.len(), entries.len());
        assert!(
            sigs.iter()
                .all(|s| s.public_key == signer().public_key_hex())
        );
    }
}

#[cfg(unix)]
#[test]
fn a_new_sqlite_database_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    run_rounds(db.to_str().unwrap(), 1);
    for file in [db.clone(), dir.path().join("c.db-wal")] {
        if file.exists() {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }
}
