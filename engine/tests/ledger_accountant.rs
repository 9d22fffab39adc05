//! A run's accountant (`accountant = "pld" | "rdp"` in its manifest) computes its budget
//! checks and every ε its ledger states, `run_created` records it, and `ledger::verify`
//! re-derives every ε with the recorded one (a ledger that records none is RDP's).

use fedpref_engine::engine::{Action, Engine, Event, RunState};
use fedpref_engine::ledger::{
    AudienceEpsilon, GENESIS_HASH, LedgerEntry, LedgerEvent, SealedEntry, check_against_manifest,
    seal, verify,
};
use fedpref_engine::manifest::RunManifest;
use fedpref_privacy::{Accountant, OrderGrid, SimulationSampler, epsilon_after_with};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

/// A central run with Poisson sampling: two audiences, the amplified one bound by the budget.
fn manifest(accountant: Option<&str>, budget: f64, rounds: u64) -> (String, RunManifest) {
    let line = accountant.map_or(String::new(), |a| format!("accountant = \"{a}\"\n"));
    let text = format!(
        r#"
title = "t"
purpose = "p"
owner = "o"
privacy_mode = "central"
rounds = {rounds}
clip_norm = 1.0
noise_multiplier = 0.9
{line}
[budget]
epsilon = {budget}
delta = 1e-5
audience = "observers_unaware_of_participation"

[sampling]
kind = "poisson"
rate = 0.2
population = 40
round_seconds = 60
minimum_size = 1

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 2
factors = 1

[opt_out_policy]
consent_model = "opt-in"
description = "d"
"#
    );
    let m = RunManifest::from_toml(&text, "m.toml").expect("valid manifest");
    (m.to_toml(), m)
}

/// Drives a run to its end; returns its ledger (run_created recording `recorded`) and the
/// number of rounds it committed.
fn run(m: &RunManifest, recorded: Option<Accountant>) -> (Vec<LedgerEvent>, u64) {
    let d = m.dimension();
    let mut engine = Engine::new("r", m.clone(), vec![0.0; d]);
    let mut events = vec![LedgerEvent::RunCreated {
        manifest_sha256: m.sha256(),
        privacy_mode: m.privacy_mode.as_str().into(),
        budget_epsilon: m.budget.epsilon,
        budget_delta: m.budget.delta,
        budget_audience: Some(m.budget_audience().as_str().into()),
        noise_multiplier: m.noise_multiplier,
        clip_norm: m.clip_norm,
        orders: OrderGrid::default().orders().to_vec(),
        accountant: recorded,
        initial_model_sha256: "00".into(),
        participation_limits: None,
        epsilon_assumption: None,
        privacy_unit: None,
    }];
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut sampler = SimulationSampler::seed_from_u64(3);
    let mut now = 0;
    let record = |actions: Vec<Action>, events: &mut Vec<LedgerEvent>| {
        for a in actions {
            match a {
                Action::CommitRound(o) => {
                    events.push(o.event);
                    events.extend(o.stop);
                }
                Action::ChargeRound { event, .. } | Action::StatusChanged { event, .. } => {
                    events.push(event)
                }
                Action::AbandonRound {
                    round,
                    contributions,
                    reason,
                } => events.push(LedgerEvent::RoundAbandoned {
                    round,
                    contributions,
                    reason,
                }),
                _ => {}
            }
        }
    };
    while engine.state() == RunState::Active {
        for device in 0..40 {
            let actions = engine.handle(
                Event::CheckIn {
                    device: format!("d{device}"),
                    eligible: true,
                },
                now,
                &mut rng,
                &mut sampler,
            );
            let tasks: Vec<_> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::SendTask(t) => Some(t.clone()),
                    _ => None,
                })
                .collect();
            record(actions, &mut events);
            for t in tasks {
                let actions = engine.handle(
                    Event::Update {
                        device: t.device,
                        round: t.round,
                        task_token: t.task_token,
                        values: vec![0.01; d],
                        examples: 1,
                        clip_bit: None,
                    },
                    now,
                    &mut rng,
                    &mut sampler,
                );
                record(actions, &mut events);
            }
        }
        now += 61_000;
        let actions = engine.handle(Event::Tick, now, &mut rng, &mut sampler);
        record(actions, &mut events);
    }
    (events, engine.rounds_committed())
}

fn chain(events: &[LedgerEvent]) -> Vec<SealedEntry> {
    let mut prev = GENESIS_HASH.to_string();
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let sealed = seal(
                &LedgerEntry {
                    run_id: "r".into(),
                    sequence: i as u64 + 1,
                    at_ms: 0,
                    event: event.clone(),
                },
                &prev,
            );
            prev = sealed.hash.clone();
            sealed
        })
        .collect()
}

fn last_epsilon(events: &[LedgerEvent]) -> Vec<AudienceEpsilon> {
    events
        .iter()
        .rev()
        .find_map(|e| match e {
            LedgerEvent::RoundCommitted {
                cumulative_epsilon, ..
            } => Some(cumulative_epsilon.clone()),
            _ => None,
        })
        .expect("a committed round")
}

#[test]
fn a_pld_run_states_pld_epsilon_naming_it_and_verifies_with_the_recorded_accountant() {
    let (toml, m) = manifest(None, 100.0, 6);
    assert_eq!(m.accountant(), Accountant::Pld, "PLD is the default");
    let (events, rounds) = run(&m, Some(Accountant::Pld));
    assert_eq!(rounds, 6);
    let eps = last_epsilon(&events);
    assert_eq!(eps.len(), 2, "{eps:?}");
    let release = m.round_release().unwrap();
    for a in &eps {
        assert_eq!(a.accountant, Some(Accountant::Pld));
        let q = if a.audience == "observers_unaware_of_participation" {
            0.2
        } else {
            1.0
        };
        let rdp = epsilon_after_with(
            Accountant::Rdp,
            &fedpref_privacy::RoundRelease {
                sampling_rate: q,
                ..release
            },
            rounds,
            1e-5,
            &OrderGrid::default(),
        )
        .unwrap();
        let pld = epsilon_after_with(
            Accountant::Pld,
            &fedpref_privacy::RoundRelease {
                sampling_rate: q,
                ..release
            },
            rounds,
            1e-5,
            &OrderGrid::default(),
        )
        .unwrap();
        assert_eq!(
            a.epsilon, pld.epsilon,
            "{}: the accountant's own ε",
            a.audience
        );
        assert!(a.epsilon < rdp.epsilon, "PLD is tighter than RDP");
    }
    let sealed = chain(&events);
    let totals = verify("r", &sealed).expect("a PLD ledger verifies");
    assert_eq!(totals.cumulative_epsilon, eps);
    check_against_manifest("r", &sealed, Some(&toml)).expect("the manifest says pld");

    // Recorded as RDP, the same entries do not verify: their ε are PLD's.
    let mut as_rdp = events.clone();
    if let LedgerEvent::RunCreated { accountant, .. } = &mut as_rdp[0] {
        *accountant = Some(Accountant::Rdp);
    }
    let failure = verify("r", &chain(&as_rdp)).unwrap_err();
    assert!(
        failure.problem.contains("does not follow"),
        "{}",
        failure.problem
    );
    // And the manifest (pld by default) disagrees with a run_created that says rdp.
    let failure = check_against_manifest("r", &chain(&as_rdp), Some(&toml)).unwrap_err();
    assert!(
        failure.problem.contains("accountant"),
        "{}",
        failure.problem
    );
}

#[test]
fn an_rdp_run_states_rdp_epsilon_and_a_ledger_naming_no_accountant_verifies_as_rdp() {
    let (toml, m) = manifest(Some("rdp"), 100.0, 4);
    let (events, _) = run(&m, Some(Accountant::Rdp));
    let eps = last_epsilon(&events);
    assert!(eps.iter().all(|a| a.accountant == Some(Accountant::Rdp)));
    verify("r", &chain(&events)).expect("an RDP ledger verifies");
    check_against_manifest("r", &chain(&events), Some(&toml)).expect("the manifest says rdp");

    // A ledger written before runs named their accountant: no key in run_created, none in
    // any ε. It verifies as RDP.
    let legacy: Vec<LedgerEvent> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            match &mut e {
                LedgerEvent::RunCreated { accountant, .. } => *accountant = None,
                LedgerEvent::RoundCommitted {
                    cumulative_epsilon, ..
                }
                | LedgerEvent::RunStopped {
                    cumulative_epsilon, ..
                } => cumulative_epsilon
                    .iter_mut()
                    .for_each(|a| a.accountant = None),
                _ => {}
            }
            e
        })
        .collect();
    let sealed = chain(&legacy);
    assert!(!sealed[0].body.contains("accountant"), "{}", sealed[0].body);
    verify("r", &sealed).expect("a legacy ledger verifies as RDP");
    // Its manifest named no accountant either.
    let (legacy_toml, _) = manifest(None, 100.0, 4);
    let mut legacy_created = legacy.clone();
    if let LedgerEvent::RunCreated {
        manifest_sha256, ..
    } = &mut legacy_created[0]
    {
        *manifest_sha256 = RunManifest::from_toml(&legacy_toml, "m.toml")
            .unwrap()
            .sha256();
    }
    check_against_manifest("r", &chain(&legacy_created), Some(&legacy_toml))
        .expect("a legacy run's manifest names no accountant");
}

#[test]
fn the_pld_budget_lets_a_run_go_further_than_the_rdp_budget_and_never_past_it() {
    // A budget RDP exhausts before the run's rounds are done.
    let budget = 6.0;
    let (_, pld) = manifest(Some("pld"), budget, 60);
    let (_, rdp) = manifest(Some("rdp"), budget, 60);
    let (pld_events, pld_rounds) = run(&pld, Some(Accountant::Pld));
    let (rdp_events, rdp_rounds) = run(&rdp, Some(Accountant::Rdp));
    assert!(
        rdp_rounds < 60,
        "RDP stops the run early ({rdp_rounds} rounds)"
    );
    assert!(
        pld_rounds > rdp_rounds,
        "PLD allows more rounds ({pld_rounds}) than RDP ({rdp_rounds})"
    );
    for events in [&pld_events, &rdp_events] {
        let bound = &last_epsilon(events)[0];
        assert_eq!(bound.audience, "observers_unaware_of_participation");
        assert!(bound.epsilon <= budget, "{bound:?}");
        match events.last() {
            Some(LedgerEvent::RunStopped { reason, .. }) => {
                assert!(reason.starts_with("budget exhausted"), "{reason}")
            }
            other => panic!("the run ends with run_stopped: {other:?}"),
        }
        verify("r", &chain(events)).expect("verifies");
    }
}
