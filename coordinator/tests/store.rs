//! The store's behaviour on both backends: SQLite (a file) and PostgreSQL (a fresh database on
//! the test server; see `common::pg`): rounds through a durable coordinator, the ledger's hash
//! chain, one transaction per round, migrations, evaluation sums; then run leases and fencing
//! with two store handles on one database, and the ledger's privileges on PostgreSQL.

mod common;

use common::{COHORT_MANIFEST, durable_round, manifest, pg};
use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::ledger::{LedgerEvent, verify};
use fedpref_coordinator::store::{LeaseOutcome, RoundCommit, Store, StoreError};
use fedpref_privacy::{Accountant, OrderGrid, PrivacyMode, RoundRelease, epsilon_after_with};

const T0: i64 = 1_700_000_000_000;

/// A SQLite file in a temporary directory, and a fresh PostgreSQL database when a server is
/// available (otherwise the PostgreSQL half skips, saying why).
fn locations() -> Vec<(String, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![(dir.path().join("c.db").display().to_string(), Some(dir))];
    if let Some(url) = pg::fresh_database() {
        out.push((url, None));
    }
    out
}

fn spend_of(rounds: u64) -> f64 {
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 1.0,
        sampling_rate: 1.0,
    };
    epsilon_after_with(
        Accountant::Pld,
        &release,
        rounds,
        1e-6,
        &OrderGrid::default(),
    )
    .unwrap()
    .epsilon
}

#[test]
fn rounds_commit_and_the_chain_verifies_on_both_backends() {
    for (location, _dir) in locations() {
        let mut c = Coordinator::open_location(&location, T0).unwrap();
        c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
        let mut now = T0 + 1;
        for round in 0..3 {
            now = durable_round(&mut c, "r1", &round.to_string(), 4, now);
        }
        drop(c);
        // Reopened: the migrations are not applied twice, and everything is there.
        let store = Store::open_location(&location).unwrap();
        let run = store.run("r1").unwrap();
        assert_eq!(run.rounds_committed, 3, "{location}");
        assert_eq!(run.published_version, 4, "{location}");
        let totals = verify("r1", &store.ledger("r1").unwrap()).unwrap();
        assert_eq!(totals.rounds_committed, 3, "{location}");
        let want = spend_of(3);
        assert!(
            (totals.cumulative_epsilon[0].epsilon - want).abs() <= 1e-9 * want,
            "{location}: spent {} want {want}",
            totals.cumulative_epsilon[0].epsilon
        );
        assert_eq!(store.committed_rounds("r1").unwrap(), vec![1, 2, 3]);
        assert_eq!(store.participations("r1", "dev-0-0").unwrap(), vec![1]);
        let model = store.model("r1", 4).unwrap();
        assert_eq!(model.version, 4);
        assert!(!model.bytes.is_empty());
        // Resuming a coordinator on it restores the engine where it was.
        let c = Coordinator::open_location(&location, now).unwrap();
        assert_eq!(c.engine("r1").unwrap().model().0, 4, "{location}");
    }
}

#[test]
fn a_failing_round_commit_leaves_nothing_behind_on_both_backends() {
    for (location, _dir) in locations() {
        let mut c = Coordinator::open_location(&location, T0).unwrap();
        c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
        durable_round(&mut c, "r1", "a", 4, T0 + 1);
        let store = c.store();
        let before_ledger = store.ledger("r1").unwrap();
        let before_run = store.run("r1").unwrap();
        let model = store.model("r1", 2).unwrap();
        drop(c);
        let mut store = Store::open_location(&location).unwrap();
        // A new round number with an existing model version: the model insert fails after
        // the round row and its participations were written, and the whole transaction rolls
        // back.
        let err = store
            .commit_round(&RoundCommit {
                run_id: "r1",
                round: 9,
                participants: &["x".to_string(), "y".to_string()],
                model: &model,
                server_state: "{}",
                event: LedgerEvent::RoundAbandoned {
                    round: 9,
                    contributions: 0,
                    reason: "test".into(),
                },
                stop: None,
                at_ms: T0 + 10,
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Sql(_) | StoreError::Postgres(_)),
            "{location}: {err}"
        );
        assert_eq!(store.ledger("r1").unwrap(), before_ledger, "{location}");
        assert_eq!(store.run("r1").unwrap(), before_run, "{location}");
        assert!(store.participations("r1", "x").unwrap().is_empty());
        assert_eq!(store.committed_rounds("r1").unwrap(), vec![1]);
    }
}

#[test]
fn evaluation_releases_sum_on_both_backends_with_no_device_or_time_stored() {
    for (location, _dir) in locations() {
        let mut c = Coordinator::open_location(&location, T0).unwrap();
        c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
        drop(c);
        let mut store = Store::open_location(&location).unwrap();
        let mut v = [0.0; fedpref_privacy::evaluation::COORDINATES];
        v[4] = 0.25;
        assert!(
            store.add_evaluation_release("r1", 1, &v).unwrap(),
            "{location}"
        );
        assert!(!store.add_evaluation_release("r1", 1, &v).unwrap());
        assert!(store.add_evaluation_release("r1", 2, &v).unwrap());
        let sum = store.evaluation_sum("r1", 1).unwrap();
        assert_eq!(sum.reports, 2, "{location}");
        assert!((sum.sums[4] - 0.5).abs() < 1e-12);
        assert_eq!(store.evaluation_sum("r1", 9).unwrap().reports, 0);
        let all = store.evaluation_sums("r1").unwrap();
        assert_eq!(
            all.iter().map(|(v, s)| (*v, s.reports)).collect::<Vec<_>>(),
            [(1, 2), (2, 1)]
        );
    }
    // The SQLite file holds no table that links devices to evaluation reports.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('evaluation_releases')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(columns, ["run_id", "model_version", "reports", "sums"]);
    let reporters: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('evaluation_reporters', 'evaluation_counts')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reporters, 0);
}

#[test]
fn a_restarted_coordinator_never_issues_a_device_a_second_evaluation_token_for_a_version() {
    for (location, _dir) in locations() {
        let mut c = Coordinator::open_location(&location, T0).unwrap();
        c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
        let token = |c: &mut Coordinator, device: &str, version: u64| {
            c.task_given(
                "r1",
                device,
                version,
                || format!("tok-{device}-{version}"),
                T0,
            )
            .unwrap()
        };
        assert_eq!(token(&mut c, "d1", 1).as_deref(), Some("tok-d1-1"));
        assert_eq!(token(&mut c, "d1", 1), None, "{location}: once per version");
        drop(c);
        // After a restart the device may not report on version 1 again (its first token,
        // if unredeemed, is gone with the process), but gets version 2's; other devices
        // are unaffected.
        let mut c = Coordinator::open_location(&location, T0 + 1).unwrap();
        assert_eq!(token(&mut c, "d1", 1), None, "{location}");
        assert_eq!(token(&mut c, "d1", 2).as_deref(), Some("tok-d1-2"));
        assert_eq!(token(&mut c, "d2", 1).as_deref(), Some("tok-d2-1"));
        assert_eq!(token(&mut c, "d3", 1).as_deref(), Some("tok-d3-1"));
        // Versions far behind are forgotten with the next version's first token.
        let far = 1 + fedpref_coordinator::grants::KEEP_VERSIONS + 1;
        assert!(token(&mut c, "d4", far).is_some());
        let mut store = Store::open_location(&location).unwrap();
        assert!(
            store.claim_evaluation_token("r1", 1, "d1", 0).unwrap(),
            "{location}: version 1 was forgotten"
        );
        assert!(!store.claim_evaluation_token("r1", 2, "d1", 0).unwrap());
    }
}

#[test]
fn a_recorded_release_is_listed_until_its_round_ends_on_both_backends() {
    for (location, _dir) in locations() {
        let mut c = Coordinator::open_location(&location, T0).unwrap();
        c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
        let mut other = Store::open_location(&location).unwrap();
        let participants = vec!["dev-x-0".to_string(), "dev-x-1".to_string()];
        // The event's content does not matter to the store.
        let event = LedgerEvent::RoundAbandoned {
            round: 1,
            contributions: 2,
            reason: "stand-in".into(),
        };
        other
            .record_release("r1", 1, &participants, &event, T0 + 1)
            .unwrap();
        assert_eq!(
            other.orphan_releases("r1").unwrap(),
            vec![(1, 2)],
            "{location}"
        );
        assert_eq!(other.released_rounds("r1").unwrap(), vec![1]);
        assert_eq!(other.run("r1").unwrap().next_round, 2);
        assert_eq!(other.participations("r1", "dev-x-0").unwrap(), vec![1]);
        // The round then commits with the same devices among its participants: their rows
        // are already there and stay single.
        durable_round(&mut c, "r1", "x", 4, T0 + 2);
        let store = c.store();
        assert!(
            store.orphan_releases("r1").unwrap().is_empty(),
            "{location}"
        );
        assert_eq!(store.released_rounds("r1").unwrap(), vec![1]);
        assert_eq!(store.participations("r1", "dev-x-0").unwrap(), vec![1]);
        assert_eq!(store.participations("r1", "dev-x-3").unwrap(), vec![1]);
        assert_eq!(store.run("r1").unwrap().rounds_committed, 1);
    }
}

/// Two replicas' handles on one database, with a run created by the first.
fn two_replicas(location: &str, lease_ms: u64) -> (Coordinator, Store) {
    let mut a = Store::open_location(location).unwrap();
    a.enable_fencing("replica-a", "https://a.example:7443", lease_ms);
    let mut a = Coordinator::replica(a).unwrap();
    a.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    let mut b = Store::open_location(location).unwrap();
    b.enable_fencing("replica-b", "https://b.example:7443", lease_ms);
    (a, b)
}

#[test]
fn a_held_lease_is_not_taken_and_a_non_owner_cannot_write() {
    for (location, _dir) in locations() {
        let (mut a, mut b) = two_replicas(&location, 60_000);
        assert_eq!(
            a.store().held_token("r1"),
            Some(1),
            "the creator holds the lease"
        );
        match b.acquire_lease("r1").unwrap() {
            LeaseOutcome::HeldBy(l) => {
                assert_eq!(l.owner, "replica-a");
                assert_eq!(l.owner_endpoint, "https://a.example:7443");
                assert_eq!(l.token, 1);
            }
            other => panic!("{location}: {other:?}"),
        }
        let before = b.ledger("r1").unwrap();
        let err = b
            .append_event(
                "r1",
                LedgerEvent::RoundAbandoned {
                    round: 1,
                    contributions: 0,
                    reason: "not mine".into(),
                },
                T0,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
        assert_eq!(b.ledger("r1").unwrap(), before);
        // Nor can it record a release, so it never gets to unmask a sum (the event is
        // refused before anything is written, whatever it holds).
        let err = b
            .record_release(
                "r1",
                1,
                &["device-x".to_string()],
                &LedgerEvent::RoundAbandoned {
                    round: 1,
                    contributions: 1,
                    reason: "not mine".into(),
                },
                T0,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
        assert_eq!(b.ledger("r1").unwrap(), before);
        assert!(b.participations("r1", "device-x").unwrap().is_empty());
        assert!(b.orphan_releases("r1").unwrap().is_empty());
        // The owner renews (same token) and keeps committing rounds.
        assert!(matches!(
            a.store_mut().acquire_lease("r1").unwrap(),
            LeaseOutcome::Renewed(ref l) if l.token == 1
        ));
        durable_round(&mut a, "r1", "x", 4, T0 + 1);
        assert_eq!(b.run("r1").unwrap().rounds_committed, 1);
    }
}

#[test]
fn after_a_lapse_the_new_owner_takes_over_and_the_stale_owner_cannot_commit() {
    for (location, _dir) in locations() {
        let (mut a, mut b) = two_replicas(&location, 500);
        durable_round(&mut a, "r1", "first", 4, T0 + 1);
        // Replica A stalls past its lease (no renewal).
        std::thread::sleep(std::time::Duration::from_millis(700));
        let taken = b.acquire_lease("r1").unwrap();
        let LeaseOutcome::Acquired { lease, taken_from } = taken else {
            panic!("{location}: {taken:?}");
        };
        assert_eq!(lease.token, 2, "the fencing token went up");
        assert_eq!(taken_from.as_deref(), Some("replica-a"));
        let mut b = Coordinator::replica(b).unwrap();
        assert!(b.adopt("r1", taken_from.as_deref(), T0 + 100_000).unwrap());
        let ledger_before = b.store().ledger("r1").unwrap();
        // A wakes up and finishes a round it had in flight: its commit is refused and
        // nothing of it is stored.
        let dim = a.engine("r1").unwrap().model().1.len();
        let mut refused = None;
        for d in 0..4 {
            let device = format!("late-{d}");
            let actions = a
                .handle(
                    "r1",
                    fedpref_coordinator::engine::Event::CheckIn {
                        device: device.clone(),
                        eligible: true,
                    },
                    T0 + 200_000,
                )
                .unwrap();
            for action in actions {
                if let fedpref_coordinator::engine::Action::SendTask(task) = action {
                    a.handle(
                        "r1",
                        fedpref_coordinator::engine::Event::Update {
                            device: device.clone(),
                            round: task.round,
                            task_token: task.task_token,
                            values: vec![0.01; dim],
                            examples: 5,
                            clip_bit: None,
                        },
                        T0 + 200_000,
                    )
                    .unwrap();
                }
            }
        }
        let deadline = a.engine("r1").unwrap().next_wakeup().unwrap();
        if let Err(e) = a.handle("r1", fedpref_coordinator::engine::Event::Tick, deadline) {
            refused = Some(e.to_string());
        }
        let refused = refused.expect("the stale owner's commit must be refused");
        assert!(refused.contains("stale"), "{location}: {refused}");
        assert!(a.engine("r1").is_none(), "the stale owner unloaded the run");
        assert_eq!(b.store().ledger("r1").unwrap(), ledger_before, "{location}");
        // The ledger says the in-flight round was abandoned at takeover, and the new owner
        // carries on: the spend is exactly that of the committed rounds.
        durable_round(&mut b, "r1", "second", 4, T0 + 300_000);
        let store = b.store();
        let totals = verify("r1", &store.ledger("r1").unwrap()).unwrap();
        assert_eq!(totals.rounds_committed, 2);
        assert_eq!(store.run("r1").unwrap().rounds_committed, 2);
        let want = spend_of(2);
        assert!((totals.cumulative_epsilon[0].epsilon - want).abs() <= 1e-9 * want);
        let abandoned = store
            .ledger("r1")
            .unwrap()
            .iter()
            .filter(|e| e.body.contains("round_abandoned") && e.body.contains("replica-a"))
            .count();
        assert_eq!(abandoned, 1, "{location}");
    }
}

#[test]
fn a_released_lease_is_taken_at_once_without_abandoning_a_round() {
    for (location, _dir) in locations() {
        let (mut a, mut b) = two_replicas(&location, 60_000);
        a.store_mut().release_lease("r1").unwrap();
        assert_eq!(a.store().held_token("r1"), None);
        match b.acquire_lease("r1").unwrap() {
            LeaseOutcome::Acquired { lease, taken_from } => {
                assert_eq!((lease.token, taken_from), (2, None), "{location}");
            }
            other => panic!("{location}: {other:?}"),
        }
    }
}

#[test]
fn a_restarted_replica_takes_its_predecessors_lease_at_once_and_fences_it() {
    for (location, _dir) in locations() {
        let (mut a, _b) = two_replicas(&location, 60_000);
        durable_round(&mut a, "r1", "first", 4, T0 + 1);
        // Replica A's process is killed and started again under the same id: the new
        // process holds no token, and the lease still names replica-a for a minute.
        let mut restarted = Store::open_location(&location).unwrap();
        restarted.enable_fencing("replica-a", "https://a.example:7443", 60_000);
        let LeaseOutcome::Acquired { lease, taken_from } = restarted.acquire_lease("r1").unwrap()
        else {
            panic!("{location}: the restarted replica did not take its own lease");
        };
        assert_eq!(lease.token, 2, "{location}: the fencing token went up");
        assert_eq!(taken_from.as_deref(), Some("replica-a"));
        // The old process, were it still alive, can write nothing more.
        let before = restarted.ledger("r1").unwrap();
        let err = a
            .store_mut()
            .append_event(
                "r1",
                LedgerEvent::RoundAbandoned {
                    round: 2,
                    contributions: 0,
                    reason: "stale".into(),
                },
                T0 + 2,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
        assert_eq!(restarted.ledger("r1").unwrap(), before);
        // And it does not take the lease back: it holds a token, just not the current one.
        assert!(matches!(
            a.store_mut().acquire_lease("r1").unwrap(),
            LeaseOutcome::HeldBy(ref l) if l.token == 2
        ));
        // The new process renews what it took.
        assert!(matches!(
            restarted.acquire_lease("r1").unwrap(),
            LeaseOutcome::Renewed(ref l) if l.token == 2
        ));
    }
}

#[test]
fn the_ledger_is_append_only_for_the_coordinators_postgres_role() {
    let Some(server) = pg::server() else {
        return;
    };
    let url = server.create_database();
    let db = url.rsplit('/').next().unwrap().to_string();
    let role = format!("fedpref_coord_{}", std::process::id());
    server.admin(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'pw'; ALTER DATABASE {db} OWNER TO {role}"
    ));
    let coordinator_url = server.url_as(&role, "pw", &db);
    let mut c = Coordinator::open_location(&coordinator_url, T0).unwrap();
    c.create_run("r1", manifest(COHORT_MANIFEST), T0).unwrap();
    durable_round(&mut c, "r1", "a", 4, T0 + 1);
    drop(c);
    let mut client = postgres::Client::connect(&coordinator_url, postgres::NoTls).unwrap();
    for sql in [
        "UPDATE ledger SET body = 'tampered' WHERE sequence = 1",
        "DELETE FROM ledger WHERE sequence = 1",
        "TRUNCATE ledger",
    ] {
        let err = client.batch_execute(sql).unwrap_err();
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    // The same role may still read and append (the coordinator just did), and other tables
    // stay writable.
    client
        .batch_execute("UPDATE runs SET server_state = server_state")
        .unwrap();
    let store = Store::open_location(&coordinator_url).unwrap();
    verify("r1", &store.ledger("r1").unwrap()).unwrap();
}

#[test]
fn forwarded_admin_commands_are_claimed_only_by_the_owner_and_withdrawn_only_while_pending() {
    for (location, _dir) in locations() {
        let (mut a, mut b) = two_replicas(&location, 60_000);
        b.enqueue_admin_command("c1", "r1", r#"{"kind":"pause","reason":"x"}"#, T0)
            .unwrap();
        b.enqueue_admin_command("c2", "r1", r#"{"kind":"resume","reason":"y"}"#, T0 + 1)
            .unwrap();
        assert!(matches!(
            b.enqueue_admin_command("c3", "nope", "{}", T0),
            Err(StoreError::NoSuchRun(_))
        ));
        // b does not hold the lease: it cannot claim.
        assert!(matches!(
            b.claim_admin_commands("r1"),
            Err(StoreError::LeaseLost { .. })
        ));
        assert!(b.cancel_admin_command("c2").unwrap(), "{location}");
        let claimed = a.store_mut().claim_admin_commands("r1").unwrap();
        assert_eq!(
            claimed.len(),
            1,
            "{location}: the withdrawn one is not claimed"
        );
        assert_eq!(claimed[0].0, "c1");
        assert!(
            !b.cancel_admin_command("c1").unwrap(),
            "a claimed command stays"
        );
        assert_eq!(
            b.admin_command("c1").unwrap(),
            Some(("running".to_string(), String::new()))
        );
        a.store().finish_admin_command("c1", true, "ok").unwrap();
        assert_eq!(
            b.admin_command("c1").unwrap(),
            Some(("done".to_string(), "ok".to_string()))
        );
        assert_eq!(b.admin_command("c2").unwrap().unwrap().0, "cancelled");
        assert!(a.store_mut().claim_admin_commands("r1").unwrap().is_empty());
    }
}

#[test]
fn concurrent_enrolments_through_several_handles_never_pass_a_cap() {
    use fedpref_coordinator::store::{EnrolmentCap, EnrolmentCaps};
    let caps = EnrolmentCaps {
        window_since_ms: T0,
        max_in_window: 1_000,
        person_since_ms: T0,
        max_per_person: 3,
    };
    for (location, _dir) in locations() {
        // Create the schema once, then four handles (as four replicas would hold) race to
        // enrol twenty devices of one person and twenty of nobody in particular.
        drop(Store::open_location(&location).unwrap());
        let outcomes: Vec<Option<(EnrolmentCap, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|h| {
                    let location = location.clone();
                    s.spawn(move || {
                        let store = Store::open_location(&location).unwrap();
                        (0..10)
                            .map(|i| {
                                let person = (i % 2 == 0).then_some("person-x");
                                store
                                    .enrol_device_within_caps(
                                        &format!("d{h}-{i}"),
                                        &format!("{h:02}{i:062}"),
                                        "test",
                                        T0 + 1,
                                        person,
                                        &caps,
                                    )
                                    .unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let store = Store::open_location(&location).unwrap();
        assert_eq!(
            store.person_enrolments_since("person-x", T0).unwrap(),
            3,
            "{location}"
        );
        let refused = outcomes
            .iter()
            .filter(|o| matches!(o, Some((EnrolmentCap::Person, 3))))
            .count();
        assert_eq!(refused, 17, "{location}");
        assert_eq!(store.enrolments_since(T0).unwrap(), 23, "{location}");
        // The window cap holds the same way.
        let full = EnrolmentCaps {
            max_in_window: 23,
            ..caps
        };
        assert_eq!(
            store
                .enrol_device_within_caps("late", &"f".repeat(64), "test", T0 + 2, None, &full)
                .unwrap(),
            Some((EnrolmentCap::Window, 23))
        );
        assert_eq!(store.enrolments_since(T0).unwrap(), 23, "{location}");
    }
}
