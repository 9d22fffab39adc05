//! Crash and resume with a real process: the child drives rounds through a durable
//! coordinator and dies (abort, or SIGKILL from the parent); the parent reopens the
//! database and checks that the chain is intact, that no budget was lost or counted twice,
//! and that no model version is half written.
//!
//! The child is this test binary re-run with `FEDPREF_CRASH_CHILD` set, executing
//! `child_entry` only.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{COHORT_MANIFEST, durable_round, manifest};
use fedpref_coordinator::coordinator::{Coordinator, Stage};
use fedpref_coordinator::ledger::verify;
use fedpref_coordinator::store::Store;
use fedpref_privacy::{Accountant, OrderGrid, PrivacyMode, RoundRelease, epsilon_after_with};

const T0: i64 = 1_700_000_000_000;
const LONG_MANIFEST_ROUNDS: &str = "rounds = 100000";

fn long_manifest() -> String {
    COHORT_MANIFEST
        .replace("rounds = 5", LONG_MANIFEST_ROUNDS)
        .replace("epsilon = 20.0", "epsilon = 1000000.0")
        .replace("noise_multiplier = 1.0", "noise_multiplier = 5.0")
}

/// Drives rounds forever (or until the hook aborts); resumes whatever the database holds.
fn drive(db: &Path, abort_after_commit: bool) {
    let mut c = Coordinator::open(db, T0).unwrap();
    if c.engine("r1").is_none() && c.store().runs().unwrap().is_empty() {
        c.create_run("r1", manifest(&long_manifest()), T0).unwrap();
    }
    if abort_after_commit {
        c.set_stage_hook(|stage| {
            if stage == Stage::RoundCommitted {
                std::process::abort();
            }
        });
    }
    let mut now = T0 + 1;
    for round in 0.. {
        now = durable_round(&mut c, "r1", &round.to_string(), 3, now);
    }
}

#[test]
fn child_entry() {
    // Only does something when run as the child of the tests below.
    if let Ok(db) = std::env::var("FEDPREF_CRASH_CHILD") {
        let abort = std::env::var("FEDPREF_CRASH_AT_COMMIT").is_ok();
        drive(Path::new(&db), abort);
    }
}

fn child(db: &Path, abort_at_commit: bool) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("FEDPREF_CRASH_CHILD", db);
    if abort_at_commit {
        cmd.env("FEDPREF_CRASH_AT_COMMIT", "1");
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd
}

/// Waits until the first child has created the run (its `run_created` entry is durable), so
/// that the kills land while rounds run however slow the machine is; a kill before that would
/// leave no run to check.
fn wait_for_run(db: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let created = Store::open(db)
            .and_then(|store| store.ledger("r1"))
            .is_ok_and(|entries| !entries.is_empty());
        if created {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never created its run"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks everything that must hold after any crash, then returns rounds committed.
fn check_consistent(db: &Path) -> u64 {
    let store = Store::open(db).unwrap();
    let entries = store.ledger("r1").unwrap();
    let totals =
        verify("r1", &entries).unwrap_or_else(|e| panic!("chain broken after a crash: {e}"));
    let run = store.run("r1").unwrap();
    assert_eq!(
        totals.rounds_committed, run.rounds_committed,
        "ledger and run row disagree"
    );
    // The spend is exactly that of the committed rounds, no more, no less.
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 5.0,
        sampling_rate: 1.0,
    };
    if run.rounds_committed > 0 {
        let want = epsilon_after_with(
            Accountant::Pld,
            &release,
            run.rounds_committed,
            1e-6,
            &OrderGrid::default(),
        )
        .unwrap();
        assert!((totals.cumulative_epsilon[0].epsilon - want.epsilon).abs() <= 1e-9 * want.epsilon);
    }
    // Every committed version is whole: it decodes and matches its hash.
    for v in 1..=run.current_version {
        fedpref_coordinator::model::decode(&store.model("r1", v).unwrap(), &run.manifest.model)
            .unwrap_or_else(|e| panic!("half-written model after a crash: {e}"));
    }
    run.rounds_committed
}

#[test]
fn a_crash_between_the_ledger_write_and_the_publish_resumes_without_double_spend() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let status = child(&db, true).status().unwrap();
    assert!(!status.success(), "the child should have aborted");

    // The round's ledger entry is durable; its model is not published.
    {
        let store = Store::open(&db).unwrap();
        let run = store.run("r1").unwrap();
        assert_eq!(
            (
                run.rounds_committed,
                run.current_version,
                run.published_version
            ),
            (1, 2, 1)
        );
        let last = store.ledger("r1").unwrap().pop().unwrap();
        assert!(
            last.body.contains("\"kind\":\"round_committed\""),
            "{}",
            last.body
        );
    }
    assert_eq!(check_consistent(&db), 1);

    // Restarting publishes the committed version once and spends nothing again.
    let c = Coordinator::open(&db, T0 + 5_000_000).unwrap();
    let run = c.store().run("r1").unwrap();
    assert_eq!(run.published_version, 2);
    let published = c
        .store()
        .ledger("r1")
        .unwrap()
        .iter()
        .filter(|e| {
            e.body.contains("\"kind\":\"model_published\"")
                && e.body.contains("\"model_version\":2,")
        })
        .count();
    assert_eq!(published, 1);
    assert_eq!(c.engine("r1").unwrap().rounds_committed(), 1);
    drop(c);
    // Opening again changes nothing.
    let before = Store::open(&db).unwrap().ledger("r1").unwrap().len();
    drop(Coordinator::open(&db, T0 + 6_000_000).unwrap());
    assert_eq!(
        Store::open(&db).unwrap().ledger("r1").unwrap().len(),
        before
    );
    assert_eq!(check_consistent(&db), 1);
}

#[test]
fn kill_9_at_arbitrary_points_never_loses_or_double_counts_budget() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut last = 0;
    for (i, delay_ms) in [150u64, 230, 90, 310].into_iter().enumerate() {
        let mut proc = child(&db, false).spawn().unwrap();
        if i == 0 {
            wait_for_run(&db);
        }
        std::thread::sleep(Duration::from_millis(delay_ms + 40 * i as u64));
        proc.kill().unwrap(); // SIGKILL
        proc.wait().unwrap();
        let rounds = check_consistent(&db);
        assert!(
            rounds >= last,
            "committed rounds went backwards: {last} → {rounds}"
        );
        last = rounds;
        // Resuming publishes what was committed.
        let c = Coordinator::open(&db, T0 + 10_000_000 * (i as i64 + 1)).unwrap();
        let run = c.store().run("r1").unwrap();
        assert_eq!(run.published_version, run.current_version);
        drop(c);
        check_consistent(&db);
    }
    assert!(last > 0, "the children never committed a round");
}

#[test]
fn a_failed_commit_reloads_the_engine_from_the_store() {
    use fedpref_coordinator::engine::Event;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    let now = durable_round(&mut c, "r1", "a", 4, T0);
    let spent_after_one = c.engine("r1").unwrap().spent();
    // Every ledger write fails from now on (as a full disk would).
    let sql = rusqlite::Connection::open(&db).unwrap();
    sql.execute_batch(
        "CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    let dim = c.engine("r1").unwrap().model().1.len();
    for d in 0..4 {
        let device = format!("dev-b-{d}");
        let actions = c
            .handle(
                "r1",
                Event::CheckIn {
                    device: device.clone(),
                    eligible: true,
                },
                now,
            )
            .unwrap();
        let task = actions
            .into_iter()
            .find_map(|a| match a {
                fedpref_coordinator::engine::Action::SendTask(t) => Some(t),
                _ => None,
            })
            .unwrap();
        let update = Event::Update {
            device,
            round: task.round,
            task_token: task.task_token,
            values: vec![0.01; dim],
            examples: 5,
            clip_bit: None,
        };
        c.handle("r1", update, now).unwrap();
    }
    // The round commits at its deadline: that write fails.
    let deadline = c.engine("r1").unwrap().next_wakeup().unwrap();
    assert!(c.handle("r1", Event::Tick, deadline).is_err());
    let now = deadline;
    // The engine is back at what the store holds: no version, spend or round it could not
    // record.
    let store = Store::open(&db).unwrap();
    let run = store.run("r1").unwrap();
    let engine = c.engine("r1").unwrap();
    assert_eq!(engine.model().0, run.current_version);
    assert_eq!(engine.spent(), spent_after_one);
    // Once writes work again, the next round commits and the chain verifies.
    sql.execute_batch("DROP TRIGGER fail_ledger;").unwrap();
    durable_round(&mut c, "r1", "c", 4, now + 1);
    let store = Store::open(&db).unwrap();
    let totals = verify("r1", &store.ledger("r1").unwrap()).expect("the chain verifies");
    let run = store.run("r1").unwrap();
    assert_eq!((totals.rounds_committed, run.rounds_committed), (2, 2));
    assert_eq!(c.engine("r1").unwrap().model().0, run.current_version);
    assert_eq!(
        c.engine("r1").unwrap().spent(),
        totals.cumulative_epsilon,
        "the engine spent what the ledger says"
    );
}
