//! In local mode the run's ledger is an upper bound on what any device released to the
//! coordinator: a round is charged when its first update header arrives, before the update is
//! read, so rounds that are abandoned, refused updates and rounds open at a crash all count.

mod common;

use common::manifest;
use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::engine::{Action, AdminCommand, Event, Task};
use fedpref_coordinator::ledger::{LedgerEntry, LedgerEvent, verify};
use fedpref_coordinator::store::Store;
use fedpref_privacy::{Accountant, OrderGrid, PrivacyMode, RoundRelease, epsilon_after_with};

const T0: i64 = 1_700_000_000_000;

const LOCAL: &str = r#"
title = "Local run"
purpose = "Count every release"
owner = "tests@example.com"
data_elements_used = ["ratings"]
privacy_mode = "local"
rounds = 5
clip_norm = 1.0
noise_multiplier = 2.0
seed = 7

[budget]
epsilon = 1000.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 3
minimum_size = 2
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"
"#;

/// ε of `rounds` local releases at σ = 2 (what each device's accountant shows after uploading
/// in `rounds` rounds).
fn local_epsilon(rounds: u64) -> f64 {
    let release = RoundRelease {
        mode: PrivacyMode::Local,
        noise_multiplier: 2.0,
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

fn task(c: &mut Coordinator, device: &str, now: i64) -> Task {
    c.handle(
        "r1",
        Event::CheckIn {
            device: device.into(),
            eligible: true,
        },
        now,
    )
    .unwrap()
    .into_iter()
    .find_map(|a| match a {
        Action::SendTask(t) => Some(t),
        _ => None,
    })
    .expect("a task")
}

/// The header, then the body, as the upload service sends them.
fn upload(c: &mut Coordinator, t: &Task, values: Vec<f32>, now: i64) -> Vec<Action> {
    let mut actions = c
        .handle(
            "r1",
            Event::UpdateHeader {
                device: t.device.clone(),
                round: t.round,
                task_token: t.task_token.clone(),
            },
            now,
        )
        .unwrap();
    actions.extend(
        c.handle(
            "r1",
            Event::Update {
                device: t.device.clone(),
                round: t.round,
                task_token: t.task_token.clone(),
                values,
                examples: 5,
                clip_bit: None,
            },
            now,
        )
        .unwrap(),
    );
    actions
}

fn events(store: &Store) -> Vec<LedgerEvent> {
    store
        .ledger("r1")
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str::<LedgerEntry>(&e.body).unwrap().event)
        .collect()
}

fn verified_epsilon(store: &Store) -> f64 {
    verify("r1", &store.ledger("r1").unwrap())
        .unwrap()
        .cumulative_epsilon[0]
        .epsilon
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[test]
fn a_round_open_at_a_crash_is_charged_and_the_ledger_counts_every_devices_releases() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(LOCAL), T0).unwrap();
    let devices = ["a", "b", "c"];
    let dim = c.engine("r1").unwrap().model().1.len();
    // Round 1: all three upload and the round commits.
    let mut now = T0 + 1;
    for d in devices {
        let t = task(&mut c, d, now);
        upload(&mut c, &t, vec![0.01; dim], now);
    }
    now = c.engine("r1").unwrap().next_wakeup().unwrap();
    c.handle("r1", Event::Tick, now).unwrap();
    // Round 2: all three upload (each device's accountant now shows two releases) and the
    // coordinator is killed before the deadline.
    now += 1;
    for d in devices {
        let t = task(&mut c, d, now);
        assert_eq!(t.round, 2);
        upload(&mut c, &t, vec![0.01; dim], now);
    }
    drop(c);
    // Restarted: the round open at the crash is closed as abandoned, its ε spent.
    let c = Coordinator::open(&db, now + 10).unwrap();
    let store = Store::open(&db).unwrap();
    let ev = events(&store);
    assert!(matches!(
        ev.last(),
        Some(LedgerEvent::RoundAbandoned { round: 2, reason, .. }) if reason.contains("coordinator stopped")
    ));
    let charged = ev
        .iter()
        .filter(|e| matches!(e, LedgerEvent::RoundCharged { .. }))
        .count();
    assert_eq!(charged, 2);
    let eps = verified_epsilon(&store);
    assert!(
        close(eps, local_epsilon(2)),
        "{eps} vs {}",
        local_epsilon(2)
    );
    // The restarted engine's spend is the ledger's, and its next round is 3.
    assert!(close(c.engine("r1").unwrap().spent()[0].epsilon, eps));
}

#[test]
fn a_round_abandoned_below_its_minimum_and_a_refused_update_are_charged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(LOCAL), T0).unwrap();
    let dim = c.engine("r1").unwrap().model().1.len();
    let mut now = T0 + 1;
    // One device uploads, another's update is refused after its header (wrong length): the
    // round ends below its minimum of 2 accepted updates.
    let t = task(&mut c, "a", now);
    assert!(
        upload(&mut c, &t, vec![0.01; dim], now)
            .iter()
            .any(|a| matches!(a, Action::UpdateAccepted { .. }))
    );
    let t = task(&mut c, "b", now);
    assert!(
        upload(&mut c, &t, vec![0.01; dim + 1], now)
            .iter()
            .any(|a| matches!(a, Action::Reject { .. }))
    );
    now = c.engine("r1").unwrap().next_wakeup().unwrap();
    c.handle("r1", Event::Tick, now).unwrap();
    drop(c);
    let store = Store::open(&db).unwrap();
    let ev = events(&store);
    assert!(matches!(
        ev.last(),
        Some(LedgerEvent::RoundAbandoned { round: 1, .. })
    ));
    let eps = verified_epsilon(&store);
    assert!(close(eps, local_epsilon(1)), "{eps}");
    // Reopened, the engine still counts the abandoned round.
    let c = Coordinator::open(&db, now + 1).unwrap();
    assert!(close(c.engine("r1").unwrap().spent()[0].epsilon, eps));
}

#[test]
fn a_header_for_another_devices_task_is_refused_and_charges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(LOCAL), T0).unwrap();
    let t = task(&mut c, "a", T0 + 1);
    let actions = c
        .handle(
            "r1",
            Event::UpdateHeader {
                device: "a".into(),
                round: t.round,
                task_token: "not-the-token".into(),
            },
            T0 + 2,
        )
        .unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::Reject { .. })));
    let store = Store::open(&db).unwrap();
    assert!(
        !events(&store)
            .iter()
            .any(|e| matches!(e, LedgerEvent::RoundCharged { .. }))
    );
}

#[test]
fn a_committed_charged_round_is_spent_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(LOCAL), T0).unwrap();
    let dim = c.engine("r1").unwrap().model().1.len();
    let mut now = T0 + 1;
    for round in 0..2 {
        for d in ["a", "b", "c"] {
            let t = task(&mut c, &format!("{d}{round}"), now);
            upload(&mut c, &t, vec![0.01; dim], now);
        }
        now = c.engine("r1").unwrap().next_wakeup().unwrap();
        c.handle("r1", Event::Tick, now).unwrap();
        now += 1;
    }
    let store = Store::open(&db).unwrap();
    let eps = verified_epsilon(&store);
    assert!(close(eps, local_epsilon(2)), "{eps}");
    assert!(close(c.engine("r1").unwrap().spent()[0].epsilon, eps));
    drop(c);
    let c = Coordinator::open(&db, now).unwrap();
    assert!(close(c.engine("r1").unwrap().spent()[0].epsilon, eps));
}

/// An operator's pause, stop or rollback abandons the open round; in local mode the updates
/// that arrived in it were released to the coordinator all the same, and the ledger charges
/// them.
#[test]
fn a_round_abandoned_by_pause_stop_or_rollback_after_an_upload_is_charged() {
    type Command = fn(Vec<f32>) -> AdminCommand;
    let commands: [(&str, Command); 3] = [
        ("pause", |_| AdminCommand::Pause {
            reason: "maintenance".into(),
        }),
        ("stop", |_| AdminCommand::Stop {
            reason: "done".into(),
        }),
        ("rollback", |params| AdminCommand::Rollback {
            to_version: 1,
            params,
            reason: "bad model".into(),
        }),
    ];
    for (name, command) in commands {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        let mut c = Coordinator::open(&db, T0).unwrap();
        c.create_run("r1", manifest(LOCAL), T0).unwrap();
        let params = c.engine("r1").unwrap().model().1.to_vec();
        let now = T0 + 1;
        // One update arrives (below the minimum of 2: the round stays open) …
        let t = task(&mut c, "a", now);
        assert!(
            upload(&mut c, &t, vec![0.01; params.len()], now)
                .iter()
                .any(|a| matches!(a, Action::UpdateAccepted { .. })),
            "{name}"
        );
        // … then the operator's command abandons the round.
        c.handle("r1", Event::Admin(command(params)), now + 1)
            .unwrap();
        drop(c);
        let store = Store::open(&db).unwrap();
        let ev = events(&store);
        assert!(
            ev.iter()
                .any(|e| matches!(e, LedgerEvent::RoundAbandoned { round: 1, .. })),
            "{name}: {ev:#?}"
        );
        assert!(
            ev.iter()
                .any(|e| matches!(e, LedgerEvent::RoundCharged { round: 1, .. })),
            "{name}: the abandoned round is charged: {ev:#?}"
        );
        let eps = verified_epsilon(&store);
        assert!(close(eps, local_epsilon(1)), "{name}: {eps}");
    }
}

#[test]
fn an_evaluation_token_is_charged_before_it_leaves_so_a_report_after_the_stop_is_in_the_ledger() {
    use fedpref_coordinator::coordinator::EvaluationRelease;
    use fedpref_privacy::evaluation::{COORDINATES, DEFAULT_NOISE_MULTIPLIER};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("r1", manifest(LOCAL), T0).unwrap();
    let now = T0 + 1;
    let t = task(&mut c, "a", now);
    let evaluation_lines = |store: &Store| {
        events(store)
            .into_iter()
            .filter(|e| matches!(e, LedgerEvent::EvaluationReleased { .. }))
            .count()
    };
    // The task's evaluation token is issued: its version's line is written at once, once.
    c.task_given("r1", "a", t.model_version, || "tok-a".into(), now)
        .unwrap()
        .expect("the first task on a version carries a token");
    c.task_given("r1", "b", t.model_version, || "tok-b".into(), now)
        .unwrap()
        .expect("another device's token");
    assert_eq!(evaluation_lines(c.store()), 1);
    // A restarted coordinator does not write the line again.
    drop(c);
    let mut c = Coordinator::open(&db, now).unwrap();
    let token = c
        .task_given("r1", "c", t.model_version, || "tok-c".into(), now)
        .unwrap()
        .expect("a third device's token");
    assert_eq!(evaluation_lines(c.store()), 1);
    // The run stops before the device reports; its report is still bounded by the ledger.
    c.handle(
        "r1",
        Event::Admin(AdminCommand::Stop {
            reason: "done".into(),
        }),
        now + 1,
    )
    .unwrap();
    c.record_evaluation(
        &EvaluationRelease {
            run_id: "r1",
            model_version: t.model_version,
            token_hash: fedpref_coordinator::service::auth::sha256(token.as_bytes()),
            noise_multiplier: DEFAULT_NOISE_MULTIPLIER,
            values: [0.0; COORDINATES],
        },
        now + 2,
    )
    .unwrap();
    drop(c);
    let store = Store::open(&db).unwrap();
    assert_eq!(evaluation_lines(&store), 1);
    let ev = events(&store);
    let line = ev
        .iter()
        .position(|e| matches!(e, LedgerEvent::EvaluationReleased { model_version, .. } if *model_version == t.model_version))
        .expect("the version's evaluation line");
    let stop = ev
        .iter()
        .position(|e| matches!(e, LedgerEvent::RunStopped { .. }))
        .expect("the stop");
    assert!(line < stop, "{ev:#?}");
    verify("r1", &store.ledger("r1").unwrap()).unwrap_or_else(|e| panic!("{e:?} {ev:#?}"));
}
