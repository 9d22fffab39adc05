//! The round engine's rules, with no sockets, clocks or store.

mod common;

use common::{COHORT_MANIFEST, Harness};
use fedpref_coordinator::engine::{Action, AdminCommand, Event, RejectKind, RunState};
use fedpref_coordinator::ledger::LedgerEvent;
use fedpref_privacy::{OrderGrid, PrivacyMode, RoundRelease, epsilon_after};

fn rejection(actions: &[Action]) -> (RejectKind, String) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Reject { rejection, .. } => Some((rejection.kind, rejection.message.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected a rejection in {actions:?}"))
}

#[test]
fn a_full_cohort_round_commits_its_ledger_entry_before_publishing() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let actions = h.round(3);
    let commit = actions
        .iter()
        .position(|a| matches!(a, Action::CommitRound(_)))
        .expect("round committed");
    let publish = actions
        .iter()
        .position(|a| matches!(a, Action::PublishModel { version: 2 }))
        .expect("version 2 published");
    assert!(commit < publish, "the commit must come first: {actions:?}");
    let Action::CommitRound(outcome) = &actions[commit] else {
        unreachable!()
    };
    assert_eq!(outcome.participants.len(), 3);
    let LedgerEvent::RoundCommitted {
        cumulative_epsilon,
        cohort_size,
        ..
    } = &outcome.event
    else {
        panic!("{:?}", outcome.event)
    };
    assert_eq!(*cohort_size, 3);
    assert!(cumulative_epsilon[0].epsilon > 0.0);
    assert_eq!(h.engine.rounds_committed(), 1);
}

#[test]
fn a_round_below_the_minimum_cohort_is_abandoned_and_spends_nothing() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let actions = h.round(1);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::AbandonRound {
            round: 1,
            contributions: 1,
            ..
        }
    )));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::CommitRound(_) | Action::PublishModel { .. }))
    );
    assert!(h.engine.spent().iter().all(|a| a.epsilon == 0.0));
    assert_eq!(h.engine.model().0, 1);
    // The next round gets the next number.
    let t = h.task("late").unwrap();
    assert_eq!(t.round, 2);
}

#[test]
fn the_cohort_is_capped_at_its_target_size() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let tasks = (0..6)
        .filter(|i| h.task(&format!("d{i}")).is_some())
        .count();
    assert_eq!(tasks, 4);
    let later = h.check_in("d9");
    assert!(
        matches!(&later[0], Action::ComeBackLater { reason, .. } if reason.contains("not selected"))
    );
}

#[test]
fn a_second_upload_in_a_round_is_refused_with_failed_precondition() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let dim = h.dimension();
    let t = h.task("a").unwrap();
    assert!(matches!(
        h.upload(&t, vec![0.0; dim])[0],
        Action::UpdateAccepted { .. }
    ));
    let (kind, msg) = rejection(&h.upload(&t, vec![0.0; dim]));
    assert_eq!(kind, RejectKind::FailedPrecondition);
    assert!(msg.contains("already uploaded"), "{msg}");
}

#[test]
fn bad_uploads_are_rejected_with_a_reason() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let dim = h.dimension();
    let t = h.task("a").unwrap();

    let mut stale = t.clone();
    stale.round = 99;
    let (kind, msg) = rejection(&h.upload(&stale, vec![0.0; dim]));
    assert_eq!(
        (kind, msg.contains("stale round id 99")),
        (RejectKind::FailedPrecondition, true),
        "{msg}"
    );

    let mut forged = t.clone();
    forged.task_token = "00".into();
    let (kind, msg) = rejection(&h.upload(&forged, vec![0.0; dim]));
    assert_eq!(
        (kind, msg.as_str()),
        (RejectKind::InvalidArgument, "unknown task token")
    );

    let mut stranger = t.clone();
    stranger.device = "never-checked-in".into();
    let (kind, msg) = rejection(&h.upload(&stranger, vec![0.0; dim]));
    assert_eq!(kind, RejectKind::FailedPrecondition);
    assert!(msg.contains("not selected"), "{msg}");

    let (kind, msg) = rejection(&h.upload(&t, vec![0.0; dim - 1]));
    assert_eq!(kind, RejectKind::InvalidArgument);
    assert!(msg.contains(&format!("{}", dim - 1)), "{msg}");

    let mut nan = vec![0.0; dim];
    nan[3] = f32::NAN;
    let (kind, msg) = rejection(&h.upload(&t, nan));
    assert_eq!(kind, RejectKind::InvalidArgument);
    assert!(
        msg.contains('3') && msg.to_lowercase().contains("nan"),
        "{msg}"
    );

    let mut inf = vec![0.0; dim];
    inf[0] = f32::INFINITY;
    assert_eq!(rejection(&h.upload(&t, inf)).0, RejectKind::InvalidArgument);

    // None of the bad uploads counted: a good one is still accepted.
    assert!(matches!(
        h.upload(&t, vec![0.0; dim])[0],
        Action::UpdateAccepted { .. }
    ));
}

#[test]
fn an_ineligible_device_is_told_to_come_back() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let a = h.send(Event::CheckIn {
        device: "x".into(),
        eligible: false,
    });
    assert!(
        matches!(&a[0], Action::ComeBackLater { reason, .. } if reason.contains("not eligible"))
    );
}

#[test]
fn poisson_selection_picks_each_device_with_probability_q_once_per_round() {
    let text = COHORT_MANIFEST.replace(
        "kind = \"cohort\"\ntarget_size = 4\nminimum_size = 2",
        "kind = \"poisson\"\nrate = 0.1\npopulation = 10000",
    );
    let mut h = Harness::new(&text);
    let n = 10_000;
    let selected: Vec<bool> = (0..n).map(|i| h.task(&format!("d{i}")).is_some()).collect();
    let count = selected.iter().filter(|s| **s).count() as f64;
    // Binomial(10000, 0.1): sd 30; allow 6 sd.
    assert!((count - 1000.0).abs() < 180.0, "{count} selected");
    // Asking again does not re-flip the coin.
    for (i, s) in selected.iter().enumerate().take(200) {
        assert_eq!(h.task(&format!("d{i}")).is_some(), *s);
    }
}

#[test]
fn a_run_stops_before_the_round_that_would_overspend() {
    // ε for one central round at σ = 1, q = 1, δ = 1e-6 is about 5.9; a budget of 12 fits two.
    let text = COHORT_MANIFEST.replace("epsilon = 20.0", "epsilon = 12.0");
    let mut h = Harness::new(&text);
    let mut stop_reason = None;
    for _ in 0..5 {
        for a in h.round(3) {
            if let Action::StatusChanged {
                status: RunState::Stopped,
                event: LedgerEvent::RunStopped { reason, .. },
            } = a
            {
                stop_reason = Some(reason);
            }
        }
        // The stop happens when the next round would open.
        for a in h.send(Event::Tick) {
            if let Action::StatusChanged {
                status: RunState::Stopped,
                event: LedgerEvent::RunStopped { reason, .. },
            } = a
            {
                stop_reason = Some(reason);
            }
        }
    }
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 1.0,
        sampling_rate: 1.0,
    };
    let k = h.engine.rounds_committed();
    let grid = OrderGrid::default();
    assert!(epsilon_after(&release, k, 1e-6, &grid).unwrap().epsilon <= 12.0);
    assert!(epsilon_after(&release, k + 1, 1e-6, &grid).unwrap().epsilon > 12.0);
    assert_eq!(h.engine.state(), RunState::Stopped);
    assert!(stop_reason.unwrap().starts_with("budget exhausted"));
    assert!(h.engine.spent()[0].epsilon <= 12.0);
}

#[test]
fn the_run_completes_after_its_rounds() {
    let text = COHORT_MANIFEST.replace("rounds = 5", "rounds = 2");
    let mut h = Harness::new(&text);
    h.round(2);
    let last = h.round(2);
    let Some(Action::CommitRound(outcome)) =
        last.iter().find(|a| matches!(a, Action::CommitRound(_)))
    else {
        panic!("{last:?}")
    };
    assert!(
        matches!(&outcome.stop, Some(LedgerEvent::RunStopped { reason, rounds_committed: 2, .. }) if reason == "completed")
    );
    assert_eq!(h.engine.state(), RunState::Stopped);
    assert!(h.task("late").is_none());
}

#[test]
fn pause_abandons_the_open_round_and_resume_opens_a_new_one() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let dim = h.dimension();
    let t = h.task("a").unwrap();
    h.upload(&t, vec![0.0; dim]);
    let a = h.send(Event::Admin(AdminCommand::Pause {
        reason: "incident".into(),
    }));
    assert!(matches!(
        &a[0],
        Action::AbandonRound {
            round: 1,
            contributions: 1,
            ..
        }
    ));
    assert!(
        matches!(&a[1], Action::StatusChanged { status: RunState::Paused, event: LedgerEvent::Paused { reason } } if reason == "incident")
    );
    assert!(h.task("b").is_none());
    let (kind, _) = rejection(&h.upload(&t, vec![0.0; dim]));
    assert_eq!(kind, RejectKind::FailedPrecondition);
    let refused = h.send(Event::Admin(AdminCommand::Pause {
        reason: "again".into(),
    }));
    assert!(matches!(&refused[0], Action::AdminRefused { .. }));
    h.send(Event::Admin(AdminCommand::Resume {
        reason: "review done".into(),
    }));
    assert_eq!(h.task("b").unwrap().round, 2);
    assert!(h.engine.spent().iter().all(|a| a.epsilon == 0.0));
}

#[test]
fn rollback_publishes_old_parameters_as_a_new_version_and_keeps_the_spend() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let v0 = h.engine.model().1.to_vec();
    h.round(3);
    h.round(3);
    let spent = h.engine.spent();
    assert_eq!(h.engine.model().0, 3);
    let a = h.send(Event::Admin(AdminCommand::Rollback {
        to_version: 1,
        params: v0.clone(),
        reason: "bad round".into(),
    }));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::RolledBack {
            to_version: 1,
            new_version: 4,
            ..
        }
    )));
    assert_eq!(h.engine.model(), (4, v0.as_slice()));
    assert_eq!(h.engine.spent(), spent);
}

#[test]
fn the_same_seeds_give_the_same_rounds() {
    let run = || {
        let mut h = Harness::new(COHORT_MANIFEST);
        for _ in 0..3 {
            h.round(4);
        }
        (h.engine.model().1.to_vec(), h.engine.spent())
    };
    assert_eq!(run(), run());
}

#[test]
fn central_mode_clips_every_update_on_the_coordinator() {
    let text = COHORT_MANIFEST
        .replace("noise_multiplier = 1.0", "noise_multiplier = 0.05")
        .replace("epsilon = 20.0", "epsilon = 10000.0");
    let mut h = Harness::new(&text);
    let before = h.engine.model().1.to_vec();
    let dim = h.dimension();
    for name in ["a", "b"] {
        let t = h.task(name).unwrap();
        h.upload(&t, vec![1000.0; dim]);
    }
    h.finish_round();
    let after = h.engine.model().1;
    let moved: f64 = before
        .iter()
        .zip(after)
        .map(|(a, b)| f64::from(b - a).powi(2))
        .sum::<f64>()
        .sqrt();
    // Two clipped updates of norm ≤ 1 over the expected cohort of 4 move it by at most 0.5;
    // the noise adds σC/4 = 0.0125 per coordinate, about 0.07 over 31 coordinates.
    assert!(moved <= 0.5 + 0.3, "the model moved by {moved}");
    assert!(
        moved > 0.3,
        "the clipped updates did move the model: {moved}"
    );
}

#[test]
fn a_declined_task_frees_its_cohort_slot_for_the_next_device() {
    let mut h = Harness::new(COHORT_MANIFEST);
    let tasks: Vec<_> = (0..4).map(|i| h.task(&format!("d{i}")).unwrap()).collect();
    assert!(h.task("late").is_none(), "the cohort of 4 is full");
    let t = &tasks[1];
    let a = h.send(Event::Decline {
        device: t.device.clone(),
        round: t.round,
        task_token: t.task_token.clone(),
    });
    assert!(
        matches!(&a[0], Action::TaskDeclined { round: 1, .. }),
        "{a:?}"
    );
    assert!(
        h.task("later").is_some(),
        "the freed slot goes to the next device"
    );
    assert!(
        h.task(&t.device).is_none(),
        "the decliner is not asked again this round"
    );
    // Declining after uploading is refused.
    let dim = h.dimension();
    h.upload(&tasks[0], vec![0.0; dim]);
    let (kind, msg) = rejection(&h.send(Event::Decline {
        device: tasks[0].device.clone(),
        round: 1,
        task_token: tasks[0].task_token.clone(),
    }));
    assert_eq!(kind, RejectKind::FailedPrecondition);
    assert!(msg.contains("already uploaded"), "{msg}");
}

/// A distributed run of five devices whose stages last 10 s each.
fn distributed_manifest() -> String {
    COHORT_MANIFEST
        .replace(
            "privacy_mode = \"central\"",
            "privacy_mode = \"distributed\"",
        )
        .replace(
            "target_size = 4\nminimum_size = 2",
            "target_size = 5\nminimum_size = 3",
        )
        + r#"
[secure_aggregation]
noise = "discrete_gaussian"
dropout_rate = 0.3
corruption_rate = 0.0
advertise_keys_seconds = 10
share_keys_seconds = 10
masked_input_seconds = 10
unmasking_seconds = 10
"#
}

#[test]
fn a_distributed_round_moves_through_its_stages_at_their_deadlines_and_unmasks_the_exact_sum() {
    use fedpref_coordinator::secure_round::StageInput;
    use fedpref_secagg::{Client, ServerStage, rng::simulation_rng};

    let mut h = Harness::new(&distributed_manifest());
    let mut rng = simulation_rng(5, &[]);
    let opened = h.now;
    let mut waiting = vec![];
    for i in 0..5 {
        let task = h.task(&format!("device-{i}")).expect("five slots");
        let info = task.secure_aggregation.clone().expect("a distributed task");
        assert_eq!(info.deadlines[0], opened + 10_000);
        assert_eq!(task.deadline_ms, info.deadlines[2], "the upload deadline");
        let (state, keys) = Client::advertise(info.config.clone(), &mut rng).unwrap();
        waiting.push((task, info, state, keys));
    }
    // The cohort is full: a sixth device waits for the next round.
    assert!(h.task("device-5").is_none());
    // Device 4 never advertises its keys; the others do.
    let mut sharing = vec![];
    for (task, info, state, keys) in waiting.into_iter().take(4) {
        let actions = h.send(Event::SecAggKeys {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            keys,
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::SecAggAccepted { .. }))
        );
        sharing.push((task, info, state));
    }
    let view = |h: &Harness, task: &fedpref_coordinator::engine::Task| {
        h.engine
            .secure_stage(&task.device, task.round, &task.task_token)
            .unwrap()
    };
    assert_eq!(view(&h, &sharing[0].0).stage, ServerStage::AdvertiseKeys);
    // Nothing closes a second early; at the deadline the stage closes without device 4.
    h.now = opened + 9_999;
    h.send(Event::Tick);
    assert_eq!(view(&h, &sharing[0].0).stage, ServerStage::AdvertiseKeys);
    assert_eq!(h.engine.next_wakeup(), Some(opened + 10_000));
    h.now = opened + 10_000;
    h.send(Event::Tick);
    let mut masking = vec![];
    for (task, info, state) in sharing {
        let StageInput::KeyDirectory(directory) = view(&h, &task).input else {
            panic!("no directory");
        };
        assert_eq!(directory.neighbours.len(), 3);
        let (state, shares) = state.share_keys(&directory, &mut rng).unwrap();
        h.send(Event::SecAggShares {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            shares,
        });
        masking.push((task, info, state));
    }
    // Everyone in the stage answered: it closed at once, and the next one lasts 10 s from now.
    assert_eq!(view(&h, &masking[0].0).stage, ServerStage::MaskedInput);
    assert_eq!(h.engine.next_wakeup(), Some(h.now + 10_000));
    let mut expected = vec![0i64; h.dimension()];
    let mut unmasking = vec![];
    for (k, (task, info, state)) in masking.into_iter().enumerate() {
        let StageInput::ShareInbox(inbox) = view(&h, &task).input else {
            panic!("no inbox");
        };
        let x: Vec<i64> = (0..expected.len() as i64)
            .map(|j| j * 7 - 50 + k as i64)
            .collect();
        let encoded = info.config.encoding.encode_integers(&x).unwrap();
        let (state, masked) = state.masked_input(&inbox, &encoded).unwrap();
        // A plain update is refused in a distributed round.
        let actions = h.send(Event::Update {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            values: vec![0.0; expected.len()],
            examples: 1,
            clip_bit: None,
        });
        assert_eq!(rejection(&actions).0, RejectKind::InvalidArgument);
        let actions = h.send(Event::MaskedUpdate {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            values: masked.values,
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::UpdateAccepted { .. }))
        );
        if k == 0 {
            // The stages closed early: a device that has contributed is told to come back
            // when the current stage ends, not at the masked-input deadline planned when the
            // round opened (twenty seconds later here; ten minutes with the defaults).
            let retry = h
                .send(Event::CheckIn {
                    device: task.device.clone(),
                    eligible: true,
                })
                .into_iter()
                .find_map(|a| match a {
                    Action::ComeBackLater { retry_at_ms, .. } => Some(retry_at_ms),
                    _ => None,
                })
                .expect("told to come back");
            assert_eq!(retry, h.engine.next_wakeup().unwrap());
            assert!(retry < task.deadline_ms, "{retry} vs {}", task.deadline_ms);
        }
        for (e, v) in expected.iter_mut().zip(&x) {
            *e += v;
        }
        unmasking.push((task, state));
    }
    let mut committed = None;
    for (task, state) in unmasking {
        let StageInput::UnmaskingPlan(plan) = view(&h, &task).input else {
            panic!("no plan");
        };
        let actions = h.send(Event::SecAggUnmask {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            unmask: state.unmask(&plan).unwrap(),
        });
        committed = committed.or(actions.into_iter().find_map(|a| match a {
            Action::CommitRound(outcome) => Some(outcome),
            _ => None,
        }));
    }
    let outcome = committed.expect("the last answer completes the round");
    assert_eq!(outcome.participants.len(), 4);
    let sum = h.engine.last_unmasked_sum().unwrap();
    assert_eq!(sum.integers, expected);
    let LedgerEvent::RoundCommitted {
        distributed: Some(record),
        cumulative_epsilon,
        ..
    } = &outcome.event
    else {
        panic!("no distributed record");
    };
    assert_eq!(record.contributors, 4);
    assert_eq!(
        cumulative_epsilon[0].epsilon,
        record
            .mechanism
            .epsilon_after(1, 1e-6, &OrderGrid::default())
            .unwrap()
            .epsilon
    );
}

#[test]
fn a_distributed_round_without_enough_keys_is_abandoned_at_the_first_deadline() {
    let mut h = Harness::new(&distributed_manifest());
    let opened = h.now;
    for i in 0..5 {
        h.task(&format!("device-{i}")).unwrap();
    }
    h.now = opened + 10_000;
    let actions = h.send(Event::Tick);
    let Some(Action::AbandonRound { reason, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::AbandonRound { .. }))
    else {
        panic!("not abandoned: {actions:?}");
    };
    assert!(reason.contains("nothing was unmasked"), "{reason}");
    assert_eq!(h.engine.spent()[0].epsilon, 0.0);
    assert_eq!(h.engine.open_round(), None);
}

#[test]
fn a_restored_distributed_run_has_spent_exactly_its_committed_rounds() {
    use fedpref_coordinator::aggregation::ServerState;
    use fedpref_coordinator::engine::{Engine, Progress};

    let manifest = common::manifest(&distributed_manifest());
    let plan = manifest.distributed_plan().unwrap();
    let params = vec![0.0; manifest.dimension()];
    let engine = Engine::restore(
        "run-test",
        manifest.clone(),
        Progress {
            state: RunState::Active,
            rounds_committed: 3,
            next_round: 5,
            current_version: 4,
            server_state: ServerState::new(&manifest.server_optimizer, params.len()),
            uncommitted_charges: 0,
            params,
        },
    );
    let expected = plan
        .mechanism
        .epsilon_after(3, manifest.budget.delta, &OrderGrid::default())
        .unwrap()
        .epsilon;
    assert_eq!(engine.spent()[0].epsilon, expected);
    assert_eq!(engine.state(), RunState::Active);
    assert!(engine.epsilon_assumption().contains("honest devices"));
}

#[test]
fn a_distributed_run_stops_before_a_round_its_budget_cannot_pay_for() {
    let text = distributed_manifest().replace("epsilon = 20.0", "epsilon = 0.01");
    let mut h = Harness::new(&text);
    let actions = h.check_in("device-0");
    assert!(!actions.iter().any(|a| matches!(a, Action::SendTask(_))));
    let stopped = actions.iter().find_map(|a| match a {
        Action::StatusChanged {
            event: LedgerEvent::RunStopped { reason, .. },
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    let reason = stopped.expect("the run stops");
    assert!(reason.contains("budget exhausted"), "{reason}");
    assert!(reason.contains("honest devices"), "{reason}");
    assert_eq!(h.engine.state(), RunState::Stopped);
}

#[test]
fn a_distributed_slot_declined_before_advertising_goes_to_the_next_device() {
    use fedpref_secagg::{Client, rng::simulation_rng};

    let mut h = Harness::new(&distributed_manifest());
    let mut rng = simulation_rng(9, &[]);
    let tasks: Vec<_> = (0..5)
        .map(|i| h.task(&format!("device-{i}")).unwrap())
        .collect();
    assert!(h.task("device-5").is_none(), "the cohort is full");
    // Device 1 advertises, then declines: its keys stay in the round, its slot is not freed.
    let info = tasks[1].secure_aggregation.clone().unwrap();
    let (_, keys) = Client::advertise(info.config.clone(), &mut rng).unwrap();
    h.send(Event::SecAggKeys {
        device: tasks[1].device.clone(),
        round: tasks[1].round,
        task_token: tasks[1].task_token.clone(),
        keys,
    });
    for t in &tasks[..2] {
        let actions = h.send(Event::Decline {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::TaskDeclined { .. }))
        );
    }
    // Device 0 had not advertised: exactly one slot is free again.
    assert!(h.task("device-6").is_some());
    assert!(h.task("device-7").is_none());
}

/// Runs one distributed round of five devices up to the key directories: devices check in
/// in `order` (the first two of `order` decline and come back under another id before anyone
/// advertises, as colluders grabbing slots would), all advertise keys, and the index each
/// device was given is returned, by device number.
fn indices_after_advertising(seed: u64, order: [usize; 5]) -> [u32; 5] {
    use fedpref_coordinator::secure_round::StageInput;
    use fedpref_secagg::{Client, ServerStage, rng::simulation_rng};
    use rand::SeedableRng;

    let mut h = Harness::new(&distributed_manifest());
    h.rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    let mut rng = simulation_rng(seed, &[]);
    let mut tasks = vec![None; 5];
    for &i in &order {
        tasks[i] = h.task(&format!("device-{i}"));
    }
    for &i in &order[..2] {
        let t = tasks[i].take().unwrap();
        h.send(Event::Decline {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
        });
        // A declined device waits for the next round; a colluder comes back as another.
        tasks[i] = h.task(&format!("device-{i}-again"));
    }
    let mut indices = [0u32; 5];
    let mut clients = vec![];
    for t in tasks.iter().map(|t| t.as_ref().expect("five slots")) {
        let info = t.secure_aggregation.clone().unwrap();
        let (_, keys) = Client::advertise(info.config.clone(), &mut rng).unwrap();
        h.send(Event::SecAggKeys {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            keys,
        });
        clients.push(t.clone());
    }
    for (i, t) in clients.iter().enumerate() {
        let view = h
            .engine
            .secure_stage(&t.device, t.round, &t.task_token)
            .unwrap();
        assert_eq!(view.stage, ServerStage::ShareKeys);
        let StageInput::KeyDirectory(directory) = view.input else {
            panic!("no directory");
        };
        indices[i] = directory.own_index;
    }
    indices
}

#[test]
fn a_device_cannot_steer_its_participant_index_by_its_check_in_order_or_declines() {
    // Over many rounds, the device that checks in first (and the one that grabs a slot,
    // declines and grabs another) lands on every index about equally often: the index is
    // drawn when the key stage closes, not given out in check-in order.
    let rounds = 250u64;
    let mut first = [0u32; 5];
    let mut decliner = [0u32; 5];
    for seed in 0..rounds {
        let indices = indices_after_advertising(seed, [0, 1, 2, 3, 4]);
        let mut sorted = indices;
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 2, 3, 4, 5], "a permutation of the cohort");
        first[indices[0] as usize - 1] += 1;
        decliner[indices[1] as usize - 1] += 1;
    }
    // Expected 50 each; a χ² statistic over 4 degrees of freedom above 18.47 has
    // probability 0.001 under uniformity (the seeds are fixed, so the test is deterministic).
    for counts in [first, decliner] {
        let expected = rounds as f64 / 5.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 18.47,
            "indices not uniform: {counts:?} (χ² = {chi2})"
        );
    }
    // The same seeds with the check-ins in another order give the same permutation of the
    // slots, not the same indices to the same devices: the draw is over slots, after U1.
    let a = indices_after_advertising(7, [0, 1, 2, 3, 4]);
    let b = indices_after_advertising(7, [4, 3, 2, 1, 0]);
    assert_ne!(a, b);
}

/// What [`complete_distributed_round`] needs: the engine alone or a durable coordinator.
trait Driver {
    fn send(&mut self, event: Event) -> Vec<Action>;
    fn engine(&self) -> &fedpref_coordinator::engine::Engine;
}

impl Driver for Harness {
    fn send(&mut self, event: Event) -> Vec<Action> {
        Harness::send(self, event)
    }
    fn engine(&self) -> &fedpref_coordinator::engine::Engine {
        &self.engine
    }
}

/// A coordinator on a SQLite store, with one run.
struct Durable {
    c: fedpref_coordinator::coordinator::Coordinator,
    run: &'static str,
    now: i64,
}

impl Driver for Durable {
    fn send(&mut self, event: Event) -> Vec<Action> {
        self.c.handle(self.run, event, self.now).unwrap()
    }
    fn engine(&self) -> &fedpref_coordinator::engine::Engine {
        self.c.engine(self.run).unwrap()
    }
}

/// Runs one distributed round in which five devices named `{prefix}-0` … `{prefix}-4` go
/// through every stage with the same positive input; returns every action the engine took.
fn complete_distributed_round(h: &mut impl Driver, prefix: &str, seed: u64) -> Vec<Action> {
    distributed_round(h, prefix, seed, 5)
}

/// As [`complete_distributed_round`], with only the first `answering` devices answering the
/// unmasking request.
fn distributed_round(
    h: &mut impl Driver,
    prefix: &str,
    seed: u64,
    answering: usize,
) -> Vec<Action> {
    use fedpref_coordinator::secure_round::StageInput;
    use fedpref_secagg::{Client, rng::simulation_rng};

    let mut rng = simulation_rng(seed, &[]);
    let mut all = vec![];
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            h.send(Event::CheckIn {
                device: format!("{prefix}-{i}"),
                eligible: true,
            })
            .into_iter()
            .find_map(|a| match a {
                Action::SendTask(t) => Some(t),
                _ => None,
            })
            .expect("five slots")
        })
        .collect();
    let info = tasks[0].secure_aggregation.clone().unwrap();
    let mut states = vec![];
    for t in &tasks {
        let (state, keys) = Client::advertise(info.config.clone(), &mut rng).unwrap();
        all.extend(h.send(Event::SecAggKeys {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            keys,
        }));
        states.push(state);
    }
    let input = |h: &dyn Driver, t: &fedpref_coordinator::engine::Task| {
        h.engine()
            .secure_stage(&t.device, t.round, &t.task_token)
            .unwrap()
            .input
    };
    let mut next = vec![];
    for (t, state) in tasks.iter().zip(states) {
        let StageInput::KeyDirectory(d) = input(h, t) else {
            panic!("no directory")
        };
        let (state, shares) = state.share_keys(&d, &mut rng).unwrap();
        all.extend(h.send(Event::SecAggShares {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            shares,
        }));
        next.push(state);
    }
    let x = vec![3i64; h.engine().model().1.len()];
    let encoded = info.config.encoding.encode_integers(&x).unwrap();
    let mut last = vec![];
    for (t, state) in tasks.iter().zip(next) {
        let StageInput::ShareInbox(inbox) = input(h, t) else {
            panic!("no inbox")
        };
        let (state, masked) = state.masked_input(&inbox, &encoded).unwrap();
        all.extend(h.send(Event::MaskedUpdate {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            values: masked.values,
        }));
        last.push(state);
    }
    for (t, state) in tasks.iter().zip(last).take(answering) {
        let StageInput::UnmaskingPlan(plan) = input(h, t) else {
            panic!("no plan")
        };
        all.extend(h.send(Event::SecAggUnmask {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            unmask: state.unmask(&plan).unwrap(),
        }));
    }
    all
}

/// ε after `n` releases of a distributed run's mechanism, at the run's δ.
fn releases_epsilon(manifest: &fedpref_coordinator::manifest::RunManifest, n: u64) -> f64 {
    manifest
        .distributed_plan()
        .unwrap()
        .mechanism
        .epsilon_after(n, manifest.budget.delta, &OrderGrid::default())
        .unwrap()
        .epsilon
}

/// A distributed run in which no device takes part more than `k` times.
fn limited_distributed_manifest(k: u64) -> String {
    distributed_manifest()
        + &format!("\n[participation]\nmin_separation = 1\nmax_participations = {k}\n")
}

#[test]
fn with_participation_limits_a_distributed_run_spends_at_most_k_rounds_and_the_ledger_agrees() {
    use fedpref_coordinator::coordinator::Coordinator;
    use fedpref_coordinator::ledger::verify;

    let manifest = common::manifest(&limited_distributed_manifest(2));
    let rounds = |n| releases_epsilon(&manifest, n);
    let assumption = manifest.epsilon_assumption();
    assert!(
        assumption.starts_with("participation limits (separation 1, at most 2); ")
            && assumption.contains("honest devices"),
        "{assumption}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut d = Durable {
        c: Coordinator::open(&dir.path().join("c.db"), 1_000).unwrap(),
        run: "limited",
        now: 2_000,
    };
    d.c.create_run("limited", manifest.clone(), 1_000).unwrap();
    let mut spent = vec![];
    for (round, prefix) in ["a", "b", "c", "d"].into_iter().enumerate() {
        // The first cohort has used one of its two participations: it may come back once.
        let prefix = if round == 1 { "a" } else { prefix };
        let actions = complete_distributed_round(&mut d, prefix, round as u64);
        let committed = actions.iter().find_map(|a| match a {
            Action::CommitRound(o) => Some(o),
            _ => None,
        });
        let Some(LedgerEvent::RoundCommitted {
            cumulative_epsilon,
            epsilon_assumption,
            ..
        }) = committed.map(|o| &o.event)
        else {
            panic!("round {round} did not commit: {actions:?}");
        };
        assert_eq!(epsilon_assumption.as_deref(), Some(assumption.as_str()));
        spent.push(cumulative_epsilon[0].epsilon);
        d.now += 1;
    }
    // Two rounds' ε after the second round, and no more after it: no device can be in a
    // third released sum.
    assert_eq!(spent, vec![rounds(1), rounds(2), rounds(2), rounds(2)]);
    let refused = d.send(Event::CheckIn {
        device: "a-0".into(),
        eligible: true,
    });
    let at_the_limit = |actions: &[Action]| {
        actions.iter().any(|a| {
            matches!(a, Action::ComeBackLater { reason, .. }
            if reason.contains("has taken part 2 times, the most this run allows"))
        })
    };
    assert!(at_the_limit(&refused), "{refused:?}");
    let entries = d.c.store().ledger("limited").unwrap();
    let totals = verify("limited", &entries).expect("the ledger verifies");
    assert_eq!(totals.rounds_committed, 4);
    assert_eq!(totals.cumulative_epsilon[0].epsilon, rounds(2));

    // After a restart: the cap and the devices' histories come back from the store, and a
    // fifth round spends nothing more and still verifies.
    d.c = Coordinator::open(&dir.path().join("c.db"), d.now).unwrap();
    assert_eq!(d.engine().spent()[0].epsilon, rounds(2));
    let refused = d.send(Event::CheckIn {
        device: "a-3".into(),
        eligible: true,
    });
    assert!(at_the_limit(&refused), "{refused:?}");
    let actions = complete_distributed_round(&mut d, "e", 9);
    assert!(
        actions.iter().any(|a| matches!(a, Action::CommitRound(_))),
        "{actions:?}"
    );
    let entries = d.c.store().ledger("limited").unwrap();
    let totals = verify("limited", &entries).expect("the ledger verifies after the restart");
    assert_eq!(totals.rounds_committed, 5);
    assert_eq!(totals.cumulative_epsilon[0].epsilon, rounds(2));
    // A ledger whose run_created names no limits gets no cap: the same rounds then fail to
    // verify where the cumulative ε stopped growing.
    let mut first: fedpref_coordinator::ledger::LedgerEntry =
        serde_json::from_str(&entries[0].body).unwrap();
    if let LedgerEvent::RunCreated {
        epsilon_assumption, ..
    } = &mut first.event
    {
        *epsilon_assumption = Some(manifest.distributed_plan().unwrap().assumption());
    }
    let mut plain = vec![];
    let mut prev = fedpref_coordinator::ledger::GENESIS_HASH.to_string();
    for (i, sealed) in entries.iter().enumerate() {
        let entry: fedpref_coordinator::ledger::LedgerEntry = if i == 0 {
            first.clone()
        } else {
            serde_json::from_str(&sealed.body).unwrap()
        };
        let resealed = fedpref_coordinator::ledger::seal(&entry, &prev);
        prev = resealed.hash.clone();
        plain.push(resealed);
    }
    verify("limited", &plain[..4]).expect("two rounds verify either way");
    let e = verify("limited", &plain).unwrap_err();
    assert!(e.problem.contains("cumulative ε"), "{e}");
}

/// An engine driven without recording releases: what a durable driver holds when it
/// crashes (or loses its lease) after asking for a release and before the round commits.
struct Unrecorded(Harness);

impl Driver for Unrecorded {
    fn send(&mut self, event: Event) -> Vec<Action> {
        let h = &mut self.0;
        h.engine.handle(event, h.now, &mut h.rng, &mut h.sampler)
    }
    fn engine(&self) -> &fedpref_coordinator::engine::Engine {
        &self.0.engine
    }
}

/// Runs a distributed round with devices `{prefix}-0` … `{prefix}-4` until the engine asks
/// for its release, and returns that request, unanswered.
fn release_of_a_round(text: &str, prefix: &str) -> fedpref_coordinator::engine::ReleaseRecord {
    let mut driver = Unrecorded(Harness::new(text));
    let actions = complete_distributed_round(&mut driver, prefix, 17);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::CommitRound(_))),
        "nothing commits before the release is recorded"
    );
    actions
        .into_iter()
        .find_map(|a| match a {
            Action::RecordRelease(r) => Some(*r),
            _ => None,
        })
        .expect("the round asked for its release")
}

#[test]
fn a_release_recorded_before_a_crash_stays_spent_and_counted_after_the_restart() {
    use fedpref_coordinator::coordinator::Coordinator;
    use fedpref_coordinator::ledger::verify;
    use fedpref_coordinator::store::Store;

    let manifest = common::manifest(&limited_distributed_manifest(1));
    let rounds = |n| releases_epsilon(&manifest, n);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let mut c = Coordinator::open(&db, 1_000).unwrap();
    c.create_run("limited", manifest.clone(), 1_000).unwrap();
    drop(c);
    // Round 1 reaches its release, which is recorded; then the process dies before the
    // round commits (its sum may have been unmasked in memory).
    let release = release_of_a_round(&limited_distributed_manifest(1), "a");
    assert_eq!(release.round, 1);
    assert_eq!(release.participants.len(), 5);
    let LedgerEvent::RoundReleased {
        cumulative_epsilon, ..
    } = &release.event
    else {
        panic!("not a release: {:?}", release.event);
    };
    assert_eq!(cumulative_epsilon[0].epsilon, rounds(1));
    let mut store = Store::open(&db).unwrap();
    store
        .record_release("limited", 1, &release.participants, &release.event, 1_500)
        .unwrap();
    drop(store);

    // After the restart the release is spent, its contributors have used their one
    // participation, and round numbers move on.
    let mut d = Durable {
        c: Coordinator::open(&db, 2_000).unwrap(),
        run: "limited",
        now: 2_000,
    };
    assert_eq!(d.engine().spent()[0].epsilon, rounds(1));
    let refused = d.send(Event::CheckIn {
        device: "a-0".into(),
        eligible: true,
    });
    assert!(
        refused
            .iter()
            .any(|a| matches!(a, Action::ComeBackLater { reason, .. }
            if reason.contains("the most this run allows"))),
        "{refused:?}"
    );
    let actions = complete_distributed_round(&mut d, "b", 3);
    let committed = actions
        .iter()
        .find_map(|a| match a {
            Action::CommitRound(o) => Some(o),
            _ => None,
        })
        .expect("round 2 commits");
    assert_eq!(committed.round, 2);
    let entries = d.c.store().ledger("limited").unwrap();
    let totals = verify("limited", &entries).expect("the ledger verifies");
    assert_eq!(totals.rounds_committed, 1);
    // k = 1: each device is in at most one release, so two releases still cost one round's ε.
    assert_eq!(totals.cumulative_epsilon[0].epsilon, rounds(1));
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| {
            serde_json::from_str::<fedpref_coordinator::ledger::LedgerEntry>(&e.body)
                .unwrap()
                .event
                .kind()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "run_created",
            "model_published",
            "round_released",
            // Closed when the restarted coordinator loaded the run.
            "round_abandoned",
            "round_released",
            "round_committed",
            "model_published"
        ]
    );
}

#[test]
fn an_operators_command_at_the_unmasking_deadline_abandons_the_round_with_nothing_spent() {
    let manifest = common::manifest(&distributed_manifest());
    assert!(manifest.distributed_plan().unwrap().params.threshold <= 4);
    let mut h = Harness::new(&distributed_manifest());
    // Four of five devices answer the unmasking request: the stage waits for its deadline.
    let actions = distributed_round(&mut h, "device", 21, 4);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RecordRelease(_) | Action::CommitRound(_))),
        "{actions:?}"
    );
    // The first event after the deadline is an operator's pause.
    h.now = h.engine.next_wakeup().unwrap();
    let actions = h.send(Event::Admin(AdminCommand::Pause {
        reason: "maintenance".into(),
    }));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RecordRelease(_))),
        "{actions:?}"
    );
    let Some(Action::AbandonRound { reason, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::AbandonRound { .. }))
    else {
        panic!("not abandoned: {actions:?}");
    };
    assert!(reason.contains("nothing was unmasked or spent"), "{reason}");
    assert_eq!(h.engine.spent()[0].epsilon, 0.0);
    assert_eq!(h.engine.state(), RunState::Paused);
    // Without the command, the same deadline releases the round (and records it first).
    let mut h = Harness::new(&distributed_manifest());
    distributed_round(&mut h, "device", 21, 4);
    h.now = h.engine.next_wakeup().unwrap();
    let actions = h.send(Event::Tick);
    assert!(
        matches!(actions.first(), Some(Action::RecordRelease(_)))
            && actions.iter().any(|a| matches!(a, Action::CommitRound(_))),
        "{actions:?}"
    );
}

#[test]
fn a_distributed_round_that_fails_after_unmasking_counts_its_epsilon_and_stops_the_run() {
    use fedpref_coordinator::aggregation::ServerState;
    use fedpref_coordinator::engine::{Engine, Progress};

    // Restored parameters that are not finite: the server step refuses them, so the round
    // fails after its sum was unmasked.
    let manifest = common::manifest(&distributed_manifest());
    let params = vec![f32::NAN; manifest.dimension()];
    let mut h = Harness::new(&distributed_manifest());
    h.engine = Engine::restore(
        "run-test",
        manifest.clone(),
        Progress {
            state: RunState::Active,
            rounds_committed: 1,
            next_round: 2,
            current_version: 1,
            server_state: ServerState::new(&manifest.server_optimizer, params.len()),
            uncommitted_charges: 0,
            params,
        },
    );
    let before = h.engine.spent()[0].epsilon;
    let actions = complete_distributed_round(&mut h, "device", 3);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::CommitRound(_) | Action::PublishModel { .. }))
    );
    let Some(Action::AbandonRound { reason, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::AbandonRound { .. }))
    else {
        panic!("not abandoned: {actions:?}");
    };
    assert!(reason.contains("ε stays spent"), "{reason}");
    let stopped = actions.iter().find_map(|a| match a {
        Action::StatusChanged {
            event:
                LedgerEvent::RunStopped {
                    reason,
                    cumulative_epsilon,
                    ..
                },
            ..
        } => Some((reason.clone(), cumulative_epsilon[0].epsilon)),
        _ => None,
    });
    let (reason, epsilon) = stopped.expect("the run stops");
    assert!(reason.contains("after its sum was unmasked"), "{reason}");
    let expected = manifest
        .distributed_plan()
        .unwrap()
        .mechanism
        .epsilon_after(2, manifest.budget.delta, &OrderGrid::default())
        .unwrap()
        .epsilon;
    assert!(epsilon > before);
    assert_eq!(epsilon, expected);
    assert_eq!(h.engine.spent()[0].epsilon, expected);
    assert_eq!(h.engine.state(), RunState::Stopped);
}

#[test]
fn a_run_stopped_by_a_failure_after_unmasking_verifies_with_that_rounds_epsilon() {
    use fedpref_coordinator::aggregation::ServerState;
    use fedpref_coordinator::coordinator::Coordinator;
    use fedpref_coordinator::engine::{Engine, Progress};
    use fedpref_coordinator::ledger::{LedgerEntry, SealedEntry, seal, verify};

    // The run's first entry from a real store; the rest is what the engine asks the store to
    // write when the first round fails after unmasking (non-finite parameters).
    let manifest = common::manifest(&distributed_manifest());
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(&dir.path().join("c.db"), 1_000).unwrap();
    c.create_run("run-test", manifest.clone(), 1_000).unwrap();
    let mut entries = c.store().ledger("run-test").unwrap();
    let params = vec![f32::NAN; manifest.dimension()];
    let mut h = Harness::new(&distributed_manifest());
    h.engine = Engine::restore(
        "run-test",
        manifest.clone(),
        Progress {
            state: RunState::Active,
            rounds_committed: 0,
            next_round: 1,
            current_version: 0,
            server_state: ServerState::new(&manifest.server_optimizer, params.len()),
            uncommitted_charges: 0,
            params,
        },
    );
    let events: Vec<LedgerEvent> = complete_distributed_round(&mut h, "device", 5)
        .into_iter()
        .filter_map(|a| match a {
            Action::RecordRelease(r) => Some(r.event),
            Action::AbandonRound {
                round,
                contributions,
                reason,
            } => Some(LedgerEvent::RoundAbandoned {
                round,
                contributions,
                reason,
            }),
            Action::StatusChanged { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    assert!(
        matches!(&events[0], LedgerEvent::RoundReleased { .. })
            && matches!(&events[1], LedgerEvent::RoundAbandoned { .. }),
        "{events:?}"
    );
    let chain = |entries: &mut Vec<SealedEntry>, events: &[LedgerEvent]| {
        for event in events {
            let last = entries.last().unwrap();
            let entry = LedgerEntry {
                run_id: "run-test".into(),
                sequence: last.sequence + 1,
                at_ms: 2_000,
                event: event.clone(),
            };
            let sealed = seal(&entry, &last.hash);
            entries.push(sealed);
        }
    };
    let mut stripped = entries.clone();
    chain(&mut entries, &events);
    let totals = verify("run-test", &entries).expect("what the engine writes verifies");
    let one_round = releases_epsilon(&manifest, 1);
    assert_eq!(totals.rounds_committed, 0);
    assert_eq!(totals.rounds_abandoned, 1);
    assert!((totals.cumulative_epsilon[0].epsilon - one_round).abs() < 1e-9);
    // Without the release entry the stop's ε has nothing to follow from.
    chain(&mut stripped, &events[1..]);
    let e = verify("run-test", &stripped).unwrap_err();
    assert!(e.problem.contains("final totals"), "{e}");
}

#[test]
fn a_public_key_advertised_in_an_earlier_round_is_refused() {
    use fedpref_secagg::{AdvertiseKeys, Client, rng::simulation_rng};

    let mut h = Harness::new(&distributed_manifest());
    let mut rng = simulation_rng(11, &[]);
    // Round 1: device-0 advertises keys, the round is abandoned for want of the others.
    let opened = h.now;
    let task = h.task("device-0").unwrap();
    let info = task.secure_aggregation.clone().unwrap();
    let (_, first) = Client::advertise(info.config.clone(), &mut rng).unwrap();
    let actions = h.send(Event::SecAggKeys {
        device: task.device.clone(),
        round: task.round,
        task_token: task.task_token.clone(),
        keys: first.clone(),
    });
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::SecAggAccepted { .. }))
    );
    h.now = opened + 10_000;
    h.send(Event::Tick);
    assert_eq!(h.engine.open_round(), None);
    // Round 2: a device offering either of those keys again is refused, naming the field.
    let task = h.task("device-1").unwrap();
    assert_eq!(task.round, 2);
    let info = task.secure_aggregation.clone().unwrap();
    let (_, fresh) = Client::advertise(info.config.clone(), &mut rng).unwrap();
    for (keys, field) in [
        (
            AdvertiseKeys {
                encryption_public_key: fresh.encryption_public_key,
                masking_public_key: first.masking_public_key,
            },
            "masking_public_key",
        ),
        (
            AdvertiseKeys {
                encryption_public_key: first.encryption_public_key,
                masking_public_key: fresh.masking_public_key,
            },
            "encryption_public_key",
        ),
    ] {
        let (kind, message) = rejection(&h.send(Event::SecAggKeys {
            device: task.device.clone(),
            round: task.round,
            task_token: task.task_token.clone(),
            keys,
        }));
        assert_eq!(kind, RejectKind::FailedPrecondition);
        assert!(message.starts_with(field), "{message}");
    }
    // Fresh keys are taken.
    let actions = h.send(Event::SecAggKeys {
        device: task.device.clone(),
        round: task.round,
        task_token: task.task_token.clone(),
        keys: fresh,
    });
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::SecAggAccepted { .. }))
    );
}

#[test]
fn a_distributed_run_whose_plan_fails_stops_instead_of_opening_plain_rounds() {
    use fedpref_coordinator::engine::Engine;
    use fedpref_coordinator::model::initial_parameters;

    let mut manifest = common::manifest(&distributed_manifest());
    // A manifest that passed validation once but whose plan no longer holds (as after an
    // upgrade that tightened the plan's checks).
    manifest.secure_aggregation = None;
    let params = initial_parameters(&manifest.model, 7);
    let mut h = Harness::new(&distributed_manifest());
    h.engine = Engine::new("run-test", manifest, params);
    let actions = h.check_in("device-0");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::SendTask(_))),
        "{actions:?}"
    );
    let stopped = actions.iter().find_map(|a| match a {
        Action::StatusChanged {
            event: LedgerEvent::RunStopped { reason, .. },
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    let reason = stopped.expect("the run stops");
    assert!(reason.contains("secure_aggregation"), "{reason}");
    assert_eq!(h.engine.state(), RunState::Stopped);
}

#[test]
fn local_mode_weighs_every_update_equally_whatever_example_count_reaches_the_engine() {
    let text = COHORT_MANIFEST
        .replace("privacy_mode = \"central\"", "privacy_mode = \"local\"")
        .replace("noise_multiplier = 1.0", "noise_multiplier = 5.0");
    let mut h = Harness::new(&text);
    let before = h.engine.model().1.to_vec();
    let dim = h.dimension();
    // One device claims 2^50 examples for an update of +1 everywhere, another one example
    // for -1 everywhere: weighted by the claim, the mean would be +1.
    for (name, value, examples) in [("a", 1.0f32, 1u64 << 50), ("b", -1.0, 1)] {
        let t = h.task(name).unwrap();
        let actions = h.send(Event::Update {
            device: t.device.clone(),
            round: t.round,
            task_token: t.task_token.clone(),
            values: vec![value; dim],
            examples,
            clip_bit: None,
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::UpdateAccepted { .. })),
            "{actions:?}"
        );
    }
    h.finish_round();
    let after = h.engine.model().1;
    let moved = before
        .iter()
        .zip(after)
        .map(|(a, b)| f64::from(b - a).abs())
        .fold(0.0, f64::max);
    assert!(
        moved < 1e-6,
        "the uniform mean of +1 and -1 is 0; moved {moved}"
    );
}

/// `COHORT_MANIFEST` in mode `local` with σ and a model of `items` × 8 factors.
fn local_manifest(items: usize, sigma: f64) -> String {
    COHORT_MANIFEST
        .replace("privacy_mode = \"central\"", "privacy_mode = \"local\"")
        .replace(
            "noise_multiplier = 1.0",
            &format!("noise_multiplier = {sigma}"),
        )
        .replace(
            "items = 10\nfactors = 2",
            &format!("items = {items}\nfactors = 8"),
        )
        .replace("epsilon = 20.0", "epsilon = 1e9")
}

fn simulated(
    task: &fedpref_coordinator::engine::Task,
    indices: Vec<u32>,
    values: Vec<f32>,
) -> Event {
    Event::SimulatedUpdate {
        device: task.device.clone(),
        round: task.round,
        task_token: task.task_token.clone(),
        indices,
        values,
        examples: 10,
        clip_bit: None,
    }
}

#[test]
fn simulated_sparse_updates_are_validated_and_refused_outside_modes_none_and_local() {
    let mut h = Harness::new(&local_manifest(10, 1.0));
    let dim = h.dimension() as u32;
    let t = h.task("a").unwrap();
    for (indices, values, needle) in [
        (vec![3, 2], vec![0.1, 0.1], "strictly increasing"),
        (vec![2, 2], vec![0.1, 0.1], "strictly increasing"),
        (vec![dim], vec![0.1], "out of range"),
        (vec![1, 2], vec![0.1], "2 indices but 1 values"),
        (vec![1, 5], vec![0.1, f32::NAN], "coordinate 5"),
        // Norm 1.5 > C = 1: a simulated update must arrive clipped.
        (vec![0, 1], vec![0.9, 1.2], "exceeds round 1's clip norm"),
    ] {
        let (kind, msg) = rejection(&h.send(simulated(&t, indices, values)));
        assert_eq!(kind, RejectKind::InvalidArgument);
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // None of them counted.
    assert!(matches!(
        h.send(simulated(&t, vec![0, 1], vec![0.6, 0.8]))[0],
        Action::UpdateAccepted { .. }
    ));

    let mut central = Harness::new(COHORT_MANIFEST);
    let t = central.task("a").unwrap();
    let (kind, msg) = rejection(&central.send(simulated(&t, vec![0], vec![0.1])));
    assert_eq!(kind, RejectKind::InvalidArgument);
    assert!(msg.contains("privacy mode central"), "{msg}");
}

#[test]
fn a_round_of_simulated_updates_is_abandoned_when_closed_with_the_secure_sampler() {
    let mut h = Harness::new(&local_manifest(10, 1.0));
    let version = h.engine.model().0;
    for name in ["a", "b"] {
        let t = h.task(name).unwrap();
        h.send(simulated(&t, vec![0], vec![0.5]));
    }
    h.now = h.engine.next_wakeup().unwrap();
    let mut secure = fedpref_privacy::SecureSampler::from_os().unwrap();
    let actions = h.engine.handle(Event::Tick, h.now, &mut h.rng, &mut secure);
    let reason = actions
        .iter()
        .find_map(|a| match a {
            Action::AbandonRound { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected the round to be abandoned: {actions:?}"));
    assert!(reason.contains("secure sampler"), "{reason}");
    assert_eq!(h.engine.model().0, version, "no model was published");
}

/// The per-coordinate variance of Δ after one round of four devices whose updates are 0,
/// noised per device (dense, as a phone does) or by the aggregate draw.
fn round_noise_variance(per_device: bool, seed: u64) -> f64 {
    use fedpref_privacy::{GaussianMechanism, SimulationSampler, clip_l2};
    let sigma = 1.5;
    let mut h = Harness::new(&local_manifest(2_000, sigma));
    h.sampler = SimulationSampler::seed_from_u64(seed);
    let before = h.engine.model().1.to_vec();
    let dim = before.len();
    let mechanism = GaussianMechanism::new(sigma, 1.0).unwrap();
    for i in 0..4u64 {
        let t = h.task(&format!("d{i}")).unwrap();
        let event = if per_device {
            let mut s = SimulationSampler::for_stream(seed, &[1, i]);
            let noised = mechanism
                .release_update(clip_l2(vec![0.0; dim], 1.0).unwrap(), &mut s)
                .unwrap();
            Event::Update {
                device: t.device.clone(),
                round: t.round,
                task_token: t.task_token.clone(),
                values: noised.values().iter().map(|&x| x as f32).collect(),
                examples: 10,
                clip_bit: None,
            }
        } else {
            simulated(&t, vec![], vec![])
        };
        // In local mode the round's first update also charges the round in the ledger.
        assert!(
            h.send(event)
                .iter()
                .any(|a| matches!(a, Action::UpdateAccepted { .. }))
        );
    }
    let actions = h.finish_round();
    assert!(
        actions.iter().any(|a| matches!(a, Action::CommitRound(_))),
        "{actions:?}"
    );
    let after = h.engine.model().1;
    let n = dim as f64;
    let d: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| f64::from(*a) - f64::from(*b))
        .collect();
    let mean = d.iter().sum::<f64>() / n;
    d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
}

#[test]
fn the_aggregate_noise_has_the_per_device_noise_variance() {
    // Mean of 4 updates with N(0, σ²C²) each: Var = 4 σ²C² / 4² = σ²C²/4 = 0.5625. With
    // 18,001 coordinates the sample variance's relative standard error is √(2/18,000) ≈ 1 %;
    // the tolerance is 5 %.
    let expected = 1.5f64.powi(2) / 4.0;
    for seed in [1, 2] {
        let aggregate = round_noise_variance(false, seed);
        let per_device = round_noise_variance(true, seed);
        for (name, v) in [("aggregate", aggregate), ("per-device", per_device)] {
            assert!(
                (v / expected - 1.0).abs() < 0.05,
                "{name}: variance {v}, expected {expected}"
            );
        }
    }
}
