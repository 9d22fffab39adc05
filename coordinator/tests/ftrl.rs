//! DP-FTRL, participation limits and adaptive clipping in the round engine and the durable
//! coordinator.

mod common;

use common::{Harness, durable_round, manifest};
use fedpref_coordinator::coordinator::Coordinator;
use fedpref_coordinator::engine::{Action, Event, RunState};
use fedpref_coordinator::ledger::{self, LedgerEntry, LedgerEvent};
use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant, TreeSchedule};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000;

/// A dp-ftrl manifest: cohort of 4, trees of 4 rounds with completion, devices at most once
/// every 3 committed rounds and at most 3 times.
fn ftrl_manifest(rounds: u64, extra: &str) -> String {
    format!(
        r#"
title = "Tree run"
purpose = "Exercise DP-FTRL"
owner = "tests@example.com"
privacy_mode = "central"
rounds = {rounds}
clip_norm = 1.0
noise_multiplier = 2.0
seed = 7

[budget]
epsilon = 50.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 4
minimum_size = 1
round_seconds = 60

[server_optimizer]
kind = "dp-ftrl"
momentum = 0.5
restart_every = 4
completion = true

[participation]
min_separation = 3
max_participations = 3

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"
{extra}
"#
    )
}

fn limit_reason(actions: &[Action]) -> Option<(String, i64)> {
    actions.iter().find_map(|a| match a {
        Action::ComeBackLater {
            reason,
            retry_at_ms,
            ..
        } if reason.starts_with("participation limit") => Some((reason.clone(), *retry_at_ms)),
        _ => None,
    })
}

#[test]
fn a_device_that_took_part_too_recently_is_told_when_to_come_back() {
    let mut h = Harness::new(&ftrl_manifest(10, ""));
    let dim = h.dimension();
    let task = h.task("alice").expect("first round: alice gets a task");
    h.upload(&task, vec![0.01; dim]);
    h.finish_round();
    h.now += 1;
    // Committed round 2: too soon (separation 3 means round 4 at the earliest).
    let actions = h.check_in("alice");
    let (reason, retry_at) = limit_reason(&actions).expect("refused by the limit");
    assert!(reason.contains("committed round 4"), "{reason}");
    assert!(retry_at > h.now, "{retry_at} should be after {}", h.now);
    assert!(!actions.iter().any(|a| matches!(a, Action::SendTask(_))));
}

#[test]
fn dp_ftrl_rounds_carry_tree_accounting_that_the_ledger_verifier_rederives() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let m = manifest(&ftrl_manifest(6, ""));
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("t", m.clone(), T0).unwrap();
    let mut now = T0 + 1;
    for r in 0..6 {
        now = durable_round(&mut c, "t", &format!("r{r}"), 4, now);
    }
    assert_eq!(c.engine("t").unwrap().state(), RunState::Stopped);
    let entries = c.store().ledger("t").unwrap();
    let totals = ledger::verify("t", &entries).expect("intact");
    assert_eq!(totals.rounds_committed, 6);
    // The ledger's first entry records the limits in force.
    assert!(
        entries[0]
            .body
            .contains(r#""participation_limits":{"min_separation":3,"max_participations":3}"#),
        "{}",
        entries[0].body
    );
    // Without a restart the run is one segment: exactly the tree accountant's ε.
    let accountant = TreeAccountant::new(
        2.0,
        TreeSchedule::restart_every(4, true).unwrap(),
        ParticipationLimits::new(3, 3).unwrap(),
    )
    .unwrap();
    let expected = accountant.spend(6, 1e-6).unwrap().epsilon;
    let got = totals.cumulative_epsilon[0].epsilon;
    assert!(
        (got - expected).abs() < 1e-9 * expected,
        "{got} vs {expected}"
    );
    let last: LedgerEntry = serde_json::from_str(
        &entries
            .iter()
            .rev()
            .find(|e| e.body.contains("round_committed"))
            .unwrap()
            .body,
    )
    .unwrap();
    let LedgerEvent::RoundCommitted {
        tree,
        epsilon_assumption,
        ..
    } = last.event
    else {
        panic!()
    };
    assert_eq!(
        epsilon_assumption.as_deref(),
        Some("participation limits (separation 3, at most 3)")
    );
    let tree = tree.expect("tree record");
    assert_eq!((tree.segment, tree.segment_round), (0, 6));

    // An edited ρ is found.
    let mut tampered = entries.clone();
    let i = tampered
        .iter()
        .position(|e| e.body.contains("\"segment_round\":3"))
        .unwrap();
    let text = tampered[i].body.clone();
    let rho_at = text.find("\"rho\":").unwrap() + 6;
    tampered[i].body = format!("{}0.001{}", &text[..rho_at], {
        let rest = &text[rho_at..];
        &rest[rest.find('}').unwrap()..]
    });
    let prev = tampered[i].prev_hash.clone();
    tampered[i].hash = ledger::chain_hash(&prev, &tampered[i].body);
    for j in i + 1..tampered.len() {
        tampered[j].prev_hash = tampered[j - 1].hash.clone();
        tampered[j].hash = ledger::chain_hash(&tampered[j].prev_hash, &tampered[j].body);
    }
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert!(e.problem.contains("ρ"), "{e}");
}

#[test]
fn a_coordinator_restart_starts_a_new_tree_segment_whose_rho_adds_to_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let m = manifest(&ftrl_manifest(6, ""));
    let mut now = T0 + 1;
    {
        let mut c = Coordinator::open(&db, T0).unwrap();
        c.create_run("t", m.clone(), T0).unwrap();
        for r in 0..3 {
            now = durable_round(&mut c, "t", &format!("a{r}"), 4, now);
        }
    }
    let mut c = Coordinator::open(&db, now).unwrap();
    // The devices of the first segment are still limited after the restart.
    let actions = c
        .handle(
            "t",
            Event::CheckIn {
                device: "dev-a2-0".into(),
                eligible: true,
            },
            now,
        )
        .unwrap();
    assert!(limit_reason(&actions).is_some(), "{actions:?}");
    for r in 0..3 {
        now = durable_round(&mut c, "t", &format!("b{r}"), 4, now);
    }
    let entries = c.store().ledger("t").unwrap();
    let totals = ledger::verify("t", &entries).expect("intact across the restart");
    assert_eq!(totals.rounds_committed, 6);
    // Two segments of 3 rounds, each its own tree (neither reached its restart, so neither
    // was completed): ρ adds up. The ε of one segment alone is a lower bound.
    let accountant = TreeAccountant::new(
        2.0,
        TreeSchedule::restart_every(4, true).unwrap(),
        ParticipationLimits::new(3, 3).unwrap(),
    )
    .unwrap();
    let one_segment = accountant.spend(3, 1e-6).unwrap().epsilon;
    let two_segments =
        fedpref_privacy::tree::epsilon_from_zcdp_gaussian(2.0 * accountant.rho(3), 1e-6).unwrap();
    let got = totals.cumulative_epsilon[0].epsilon;
    assert!(
        (got - two_segments).abs() < 1e-9 * got,
        "{got} vs {two_segments}"
    );
    assert!(got > one_segment, "{got} <= {one_segment}");
    let last = entries
        .iter()
        .rev()
        .find(|e| e.body.contains("round_committed"))
        .unwrap();
    assert!(
        last.body.contains("\"segment\":1,\"segment_round\":3"),
        "{}",
        last.body
    );
}

#[test]
fn dp_ftrl_stops_before_its_tree_epsilon_would_exceed_the_budget() {
    let text = ftrl_manifest(50, "").replace("epsilon = 50.0", "epsilon = 3.0");
    let mut h = Harness::new(&text);
    let mut committed = 0;
    for _ in 0..50 {
        let actions = h.round(4);
        committed += actions
            .iter()
            .filter(|a| matches!(a, Action::CommitRound(_)))
            .count();
        if h.engine.state() == RunState::Stopped {
            break;
        }
    }
    assert_eq!(h.engine.state(), RunState::Stopped);
    assert!(committed > 0 && committed < 50, "{committed}");
    assert!(h.engine.spent()[0].epsilon <= 3.0);
}

#[test]
fn a_round_that_fails_after_tree_aggregation_stops_the_run_instead_of_reusing_the_tree() {
    // A learning rate so large that the first step overflows the model's f32 parameters: the
    // tree has already taken the round's sum, so the run must stop rather than release that
    // sum later without counting it.
    let text = ftrl_manifest(10, "").replace(
        "kind = \"dp-ftrl\"",
        "kind = \"dp-ftrl\"\nserver_learning_rate = 1e300",
    );
    let mut h = Harness::new(&text);
    let dim = h.dimension();
    for device in ["a", "b", "c", "d"] {
        let task = h.task(device).expect("a task");
        h.upload(&task, vec![0.01; dim]);
    }
    let actions = h.finish_round();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::CommitRound(_))),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::AbandonRound { reason, .. } if reason.contains("server optimiser failed"))),
        "{actions:?}"
    );
    let stopped = actions.iter().find_map(|a| match a {
        Action::StatusChanged {
            status: RunState::Stopped,
            event: LedgerEvent::RunStopped { reason, .. },
        } => Some(reason.clone()),
        _ => None,
    });
    assert!(
        stopped
            .as_deref()
            .is_some_and(|r| r.contains("DP-FTRL cannot continue")),
        "{actions:?}"
    );
    assert_eq!(h.engine.state(), RunState::Stopped);
    h.now += 1;
    assert!(h.task("e").is_none(), "a stopped run hands out no task");
}

#[test]
fn adaptive_clipping_converges_to_within_ten_percent_of_the_true_quantile() {
    // Update norms log-normal: exp(N(ln 2, 0.5²)); median 2, 0.9-quantile 2·e^(0.5·1.2816).
    for (gamma, z) in [(0.5f64, 0.0f64), (0.9, 1.281_551_565_545)] {
        let text = ftrl_manifest(1, "")
            .replace(
                "[server_optimizer]\nkind = \"dp-ftrl\"\nmomentum = 0.5\nrestart_every = 4\ncompletion = true\n\n[participation]\nmin_separation = 3\nmax_participations = 3\n",
                "[server_optimizer]\nkind = \"fedavg\"\n",
            )
            .replace("rounds = 1", "rounds = 300")
            .replace("target_size = 4", "target_size = 100")
            .replace("epsilon = 50.0", "epsilon = 1e9")
            .replace("clip_norm = 1.0", "clip_norm = 0.3")
            + &format!("\n[adaptive_clipping]\ntarget_quantile = {gamma}\nbit_noise_std = 5.0\n");
        let mut h = Harness::new(&text);
        let dim = h.dimension();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (gamma * 1000.0) as u64;
        let mut normal = move || {
            // Box–Muller from a splitmix64 stream.
            let mut u = || {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut x = state;
                x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
            };
            let (a, b) = (u().max(1e-300), u());
            (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
        };
        for r in 0..300 {
            for i in 0..100 {
                let task = h.task(&format!("d{r}-{i}")).expect("cohort has room");
                let norm = (2f64.ln() + 0.5 * normal()).exp();
                let mut v = vec![0.0f32; dim];
                v[i % dim] = norm as f32;
                h.upload(&task, v);
            }
            h.finish_round();
            h.now += 1;
        }
        let truth = 2.0 * (0.5 * z).exp();
        let c = h.engine.clip_norm();
        assert!(
            (c - truth).abs() <= 0.1 * truth,
            "γ = {gamma}: C = {c}, true quantile {truth}"
        );
        assert_eq!(h.engine.clip_trajectory().unwrap().len(), 301);
    }
}

#[test]
fn dp_ftrl_outside_central_mode_or_without_limits_is_refused_by_name() {
    let no_limits = ftrl_manifest(5, "").replace(
        "[participation]\nmin_separation = 3\nmax_participations = 3\n",
        "",
    );
    let e = fedpref_coordinator::manifest::RunManifest::from_toml(&no_limits, "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("participation"), "{e}");
    let local =
        ftrl_manifest(5, "").replace("privacy_mode = \"central\"", "privacy_mode = \"local\"");
    let e = fedpref_coordinator::manifest::RunManifest::from_toml(&local, "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("central"), "{e}");
    let distributed = ftrl_manifest(5, "").replace(
        "privacy_mode = \"central\"",
        "privacy_mode = \"distributed\"",
    );
    let e = fedpref_coordinator::manifest::RunManifest::from_toml(&distributed, "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("secure aggregation"), "{e}");
}

#[test]
fn a_target_epsilon_is_calibrated_with_the_tree_accountant() {
    let text = ftrl_manifest(20, "").replace("noise_multiplier = 2.0", "target_epsilon = 5.0");
    let m = manifest(&text);
    let sigma = m.noise_multiplier.unwrap();
    let spent = m.tree_accountant().unwrap().spend(20, 1e-6).unwrap();
    assert!(
        (spent.epsilon - 5.0).abs() < 1e-6,
        "{} at σ = {sigma}",
        spent.epsilon
    );
    assert_eq!(
        m.epsilon_assumption(),
        "participation limits (separation 3, at most 3)"
    );
}

/// One randomised schedule: in each of `rounds` rounds, devices (ids 0..devices) check in
/// in the given order; each that gets a task uploads.
fn run_schedule(separation: u64, max: u64, schedule: &[Vec<u8>]) -> Vec<(u64, Vec<String>)> {
    let text = ftrl_manifest(schedule.len() as u64, "")
        .replace(
            "min_separation = 3",
            &format!("min_separation = {separation}"),
        )
        .replace(
            "max_participations = 3",
            &format!("max_participations = {max}"),
        )
        .replace("epsilon = 50.0", "epsilon = 1e9")
        .replace("target_size = 4", "target_size = 3");
    let mut h = Harness::new(&text);
    let dim = h.dimension();
    let mut committed = vec![];
    for arrivals in schedule {
        for d in arrivals {
            let name = format!("d{d}");
            if let Some(task) = h.task(&name) {
                h.upload(&task, vec![0.01; dim]);
            }
        }
        for a in h.finish_round() {
            if let Action::CommitRound(o) = a {
                committed.push((o.round, o.participants.clone()));
            }
        }
        h.now += 1;
    }
    committed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_engine_never_hands_out_a_task_that_breaks_a_participation_limit(
        separation in 1u64..5,
        max in 1u64..4,
        schedule in prop::collection::vec(prop::collection::vec(0u8..8, 0..10), 1..16),
    ) {
        let committed = run_schedule(separation, max, &schedule);
        // Release index (position among committed rounds) of each participation.
        let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for (i, (_, participants)) in committed.iter().enumerate() {
            for p in participants {
                seen.entry(p.clone()).or_default().push(i as u64 + 1);
            }
        }
        for (device, releases) in seen {
            prop_assert!(releases.len() as u64 <= max, "{device}: {releases:?}");
            for w in releases.windows(2) {
                prop_assert!(w[1] - w[0] >= separation, "{device}: {releases:?} (s = {separation})");
            }
        }
    }
}

#[test]
fn a_dp_ftrl_run_with_adaptive_clipping_reports_its_assumption_and_c_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let text = ftrl_manifest(
        6,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 0.5\n",
    );
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("t", manifest(&text), T0).unwrap();
    let mut now = T0 + 1;
    for r in 0..6 {
        now = durable_round(&mut c, "t", &format!("r{r}"), 4, now);
    }
    let entries = c.store().ledger("t").unwrap();
    let totals = ledger::verify("t", &entries).expect("intact, bits included");
    // The bits add k/(8σ_b²) with k = min(3, ⌈6/3⌉) = 2 participations.
    let accountant = TreeAccountant::new(
        2.0,
        TreeSchedule::restart_every(4, true).unwrap(),
        ParticipationLimits::new(3, 3).unwrap(),
    )
    .unwrap();
    let rho = accountant.rho(6) + 2.0 / (8.0 * 0.25);
    let expected = fedpref_privacy::tree::epsilon_from_zcdp_gaussian(rho, 1e-6).unwrap();
    let got = totals.cumulative_epsilon[0].epsilon;
    assert!(
        (got - expected).abs() < 1e-9 * expected,
        "{got} vs {expected}"
    );

    let report = fedpref_coordinator::report::ImpactReport::build(c.store(), "t", now).unwrap();
    assert!(report.ledger.intact, "{:?}", report.ledger.problem);
    assert_eq!(
        report.assessment.epsilon_assumption,
        "participation limits (separation 3, at most 3)"
    );
    let trajectory = &report.spend.clip_trajectory;
    assert_eq!(trajectory.len(), 6);
    // Every update (norm 0.01·√31 ≈ 0.056) fits under C = 1, so C shrinks — but only at the
    // tree restart after round 4 does the clip norm used change.
    assert!(
        trajectory[..4].iter().all(|p| p.clip_norm == 1.0),
        "{trajectory:?}"
    );
    assert!(trajectory[4].clip_norm < 1.0, "{trajectory:?}");
    let md = report.to_markdown();
    assert!(
        md.contains("participation limits (separation 3, at most 3)"),
        "{md}"
    );
    assert!(md.contains("| round | C | next C |"), "{md}");
    assert!(md.contains("DP-FTRL: each round's ledger entry"), "{md}");
    let html = report.to_html();
    assert!(html.contains("<h3>Adaptive clipping</h3>"));
    assert!(html.contains("participation limits (separation 3, at most 3)"));
    // Every device's ε is shown as the run's.
    let groups = &report.spend.per_device.by_participations;
    assert!(!groups.is_empty());
    assert!(
        groups.iter().all(|g| (g.epsilon - got).abs() < 1e-9 * got),
        "{groups:?}"
    );
}

/// A finished 6-round dp-ftrl run with adaptive clipping (σ_b = 0.5): its ledger entries.
fn ftrl_ledger_with_bits() -> Vec<ledger::SealedEntry> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let text = ftrl_manifest(
        6,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 0.5\n",
    );
    let mut c = Coordinator::open(&db, T0).unwrap();
    c.create_run("t", manifest(&text), T0).unwrap();
    let mut now = T0 + 1;
    for r in 0..6 {
        now = durable_round(&mut c, "t", &format!("r{r}"), 4, now);
    }
    let entries = c.store().ledger("t").unwrap();
    ledger::verify("t", &entries).expect("intact");
    entries
}

/// Rewrites the ledger as someone with database access could: `edit` changes the tree
/// record of every round committed at or after round `from`, whose ρ and ε are then
/// re-derived from the edited record as if it were the truth (a one-segment run: the segment
/// holds `segment_round` rounds), and the whole chain is re-hashed. Only checks of the
/// records against the run can find what was done.
fn rewrite_tree_records(
    entries: &[ledger::SealedEntry],
    from: u64,
    mut edit: impl FnMut(&mut Option<ledger::TreeRound>),
) -> Vec<ledger::SealedEntry> {
    let mut out = entries.to_vec();
    for e in out.iter_mut() {
        let mut entry: LedgerEntry = serde_json::from_str(&e.body).unwrap();
        if let LedgerEvent::RoundCommitted {
            round,
            noise_multiplier,
            tree,
            cumulative_epsilon,
            ..
        } = &mut entry.event
            && *round >= from
        {
            edit(tree);
            if let Some(t) = tree {
                let schedule = match t.restart_every {
                    Some(r) => TreeSchedule::restart_every(r, t.completion).unwrap(),
                    None => TreeSchedule::single_tree(),
                };
                let limits =
                    ParticipationLimits::new(t.min_separation, t.max_participations).unwrap();
                let accountant = TreeAccountant::new(*noise_multiplier, schedule, limits).unwrap();
                t.rho = ledger::tree_rho(&accountant, &[t.segment_round], t.bit_noise_std);
                cumulative_epsilon[0].epsilon =
                    fedpref_privacy::tree::epsilon_from_zcdp_gaussian(t.rho, 1e-6).unwrap();
            }
        }
        e.body = ledger::canonical(&entry);
    }
    let mut prev = ledger::GENESIS_HASH.to_string();
    for e in out.iter_mut() {
        e.prev_hash = prev;
        e.hash = ledger::chain_hash(&e.prev_hash, &e.body);
        prev = e.hash.clone();
    }
    out
}

/// The sequence number of the entry committing `round`.
fn sequence_of_round(entries: &[ledger::SealedEntry], round: u64) -> u64 {
    entries
        .iter()
        .find(|e| {
            let entry: LedgerEntry = serde_json::from_str(&e.body).unwrap();
            matches!(entry.event, LedgerEvent::RoundCommitted { round: r, .. } if r == round)
        })
        .unwrap()
        .sequence
}

#[test]
fn rewriting_the_tree_records_of_a_dp_ftrl_ledger_unchanged_is_no_tampering() {
    // The rewrite itself, applied without an edit, reproduces the ledger byte for byte: the
    // tests below catch their edits, not the rewriting.
    let entries = ftrl_ledger_with_bits();
    let same = rewrite_tree_records(&entries, 1, |_| {});
    assert_eq!(same, entries);
}

#[test]
fn a_dp_ftrl_round_whose_tree_record_was_removed_is_found() {
    let entries = ftrl_ledger_with_bits();
    let tampered = rewrite_tree_records(&entries, 3, |t| {
        if t.as_ref().is_some_and(|t| t.segment_round == 3) {
            *t = None;
        }
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 3), "{e}");
    assert!(e.problem.contains("no tree record"), "{e}");
    assert!(e.problem.contains("dp-ftrl"), "{e}");
}

#[test]
fn a_dp_ftrl_round_whose_bit_noise_std_was_raised_is_found_though_its_rho_follows() {
    let entries = ftrl_ledger_with_bits();
    // A larger σ_b from round 3 on: each rewritten record's ρ is smaller, and follows from it.
    let tampered = rewrite_tree_records(&entries, 3, |t| {
        t.as_mut().unwrap().bit_noise_std = Some(5.0);
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 3), "{e}");
    assert!(e.problem.contains("tree.bit_noise_std"), "{e}");
}

#[test]
fn a_dp_ftrl_ledger_whose_participation_limits_were_loosened_is_found_though_its_rho_follows() {
    let entries = ftrl_ledger_with_bits();
    // A wider separation in every round: fewer participations, a smaller ρ throughout, each
    // following from its record — but not the limits run_created records.
    let tampered = rewrite_tree_records(&entries, 1, |t| {
        t.as_mut().unwrap().min_separation = 6;
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 1), "{e}");
    assert!(e.problem.contains("tree.min_separation"), "{e}");
    assert!(e.problem.contains("participation_limits"), "{e}");

    let tampered = rewrite_tree_records(&entries, 2, |t| {
        t.as_mut().unwrap().max_participations = 1;
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 2), "{e}");
    assert!(e.problem.contains("tree.max_participations"), "{e}");
}

#[test]
fn a_dp_ftrl_round_whose_tree_position_skips_one_is_found() {
    let entries = ftrl_ledger_with_bits();
    // Positions 1, 2, 4, 5, 6, 7: each record's ρ follows from its own position.
    let tampered = rewrite_tree_records(&entries, 3, |t| {
        t.as_mut().unwrap().segment_round += 1;
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 3), "{e}");
    assert!(e.problem.contains("tree.segment_round 4"), "{e}");

    // A second segment that does not start at position 1, or skips a segment number.
    let tampered = rewrite_tree_records(&entries, 4, |t| {
        t.as_mut().unwrap().segment = 2;
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 4), "{e}");
    assert!(e.problem.contains("tree.segment 2"), "{e}");
    let tampered = rewrite_tree_records(&entries, 4, |t| {
        t.as_mut().unwrap().segment = 1;
    });
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 4), "{e}");
    assert!(e.problem.contains("tree.segment_round 4"), "{e}");
}

#[test]
fn a_tree_record_in_a_run_that_is_not_dp_ftrl_is_found() {
    let entries = ftrl_ledger_with_bits();
    // run_created rewritten to name another assumption: the run no longer records dp-ftrl,
    // so its tree records do not belong to it.
    let mut tampered = entries.clone();
    let mut first: LedgerEntry = serde_json::from_str(&tampered[0].body).unwrap();
    let LedgerEvent::RunCreated {
        epsilon_assumption, ..
    } = &mut first.event
    else {
        panic!()
    };
    *epsilon_assumption = Some("none (worst case per device)".into());
    tampered[0].body = ledger::canonical(&first);
    let mut prev = ledger::GENESIS_HASH.to_string();
    for e in tampered.iter_mut() {
        e.prev_hash = prev;
        e.hash = ledger::chain_hash(&e.prev_hash, &e.body);
        prev = e.hash.clone();
    }
    let e = ledger::verify("t", &tampered).unwrap_err();
    assert_eq!(e.sequence, sequence_of_round(&entries, 1), "{e}");
    assert!(e.problem.contains("carries a tree record"), "{e}");
}
