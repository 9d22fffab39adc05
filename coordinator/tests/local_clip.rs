//! Adaptive clipping in local mode: devices send noised clip bits, the round engine sums them
//! and moves C toward the target quantile.

mod common;

use common::Harness;
use fedpref_coordinator::engine::{Action, ClipBit, Event, RejectKind, Task};

/// A local-mode run: cohort of `cohort`, per-device bit noise σ_b, combined multiplier 1.
fn local_manifest(rounds: u64, cohort: u32, clip_norm: f64, adaptive: &str) -> String {
    format!(
        r#"
title = "Local adaptive clipping"
purpose = "Exercise device clip bits"
owner = "tests@example.com"
privacy_mode = "local"
rounds = {rounds}
clip_norm = {clip_norm}
noise_multiplier = 1.0
seed = 7

[budget]
epsilon = 1e9
delta = 1e-6

[sampling]
kind = "cohort"
target_size = {cohort}
minimum_size = 1
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"
{adaptive}
"#
    )
}

/// A seeded standard normal stream (splitmix64 + Box–Muller).
fn normals(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        let mut u = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = state;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (a, b) = (u().max(1e-300), u());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

fn upload_with(h: &mut Harness, task: &Task, clip_bit: Option<ClipBit>) -> Vec<Action> {
    let dim = h.dimension();
    h.send(Event::Update {
        device: task.device.clone(),
        round: task.round,
        task_token: task.task_token.clone(),
        values: vec![0.0; dim],
        examples: 5,
        clip_bit,
    })
}

fn rejection(actions: &[Action]) -> Option<(RejectKind, String)> {
    actions.iter().find_map(|a| match a {
        Action::Reject { rejection, .. } => Some((rejection.kind, rejection.message.clone())),
        _ => None,
    })
}

fn accepted(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::UpdateAccepted { .. }))
}

#[test]
fn local_adaptive_clipping_converges_to_within_ten_percent_of_the_true_quantile() {
    // Update norms log-normal exp(N(ln 2, 0.5²)): median 2, 0.9-quantile 2·e^(0.5·1.2816).
    // Each device reports 1{norm ≤ C} + N(0, 1²), the engine adds nothing.
    for (gamma, z) in [(0.5f64, 0.0f64), (0.9, 1.281_551_565_545)] {
        let text = local_manifest(
            300,
            100,
            0.3,
            &format!("\n[adaptive_clipping]\ntarget_quantile = {gamma}\nbit_noise_std = 1.0\n"),
        );
        let mut h = Harness::new(&text);
        let mut normal = normals(0x5eed ^ (gamma * 1000.0) as u64);
        for r in 0..300 {
            for i in 0..100 {
                let task = h.task(&format!("d{r}-{i}")).expect("cohort has room");
                assert_eq!(task.clip_bit_noise_std, Some(1.0));
                assert_eq!(task.clip_norm, h.engine.clip_norm());
                let norm = (2f64.ln() + 0.5 * normal()).exp();
                let bit = if norm <= task.clip_norm { 1.0 } else { 0.0 };
                let actions = upload_with(
                    &mut h,
                    &task,
                    Some(ClipBit {
                        clip_norm: task.clip_norm,
                        noised_bit: bit + normal(),
                    }),
                );
                assert!(accepted(&actions), "{actions:?}");
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
fn c_moves_with_the_devices_bits_alone() {
    // σ_b = 1, m = 4, γ = 0.5, η = 0.2: four bits of exactly 1 give b̄ = 1 and
    // C ← C·e^(−0.2·0.5); four of exactly 0 give b̄ = 0 and C ← C·e^(0.1).
    let text = local_manifest(
        2,
        4,
        1.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n",
    );
    let mut h = Harness::new(&text);
    for (round, bit, expected) in [(0, 1.0, (-0.1f64).exp()), (1, 0.0, 1.0)] {
        for i in 0..4 {
            let task = h.task(&format!("r{round}-{i}")).unwrap();
            let actions = upload_with(
                &mut h,
                &task,
                Some(ClipBit {
                    clip_norm: task.clip_norm,
                    noised_bit: bit,
                }),
            );
            assert!(accepted(&actions), "{actions:?}");
        }
        h.finish_round();
        h.now += 1;
        let c = h.engine.clip_norm();
        assert!((c - expected).abs() < 1e-12, "round {round}: C = {c}");
    }
}

#[test]
fn device_bits_are_required_exactly_when_requested() {
    let text = local_manifest(
        3,
        4,
        1.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n",
    );
    let mut h = Harness::new(&text);
    let task = h.task("a").unwrap();
    let (kind, message) = rejection(&upload_with(&mut h, &task, None)).expect("refused");
    assert_eq!(kind, RejectKind::InvalidArgument);
    assert!(message.contains("header.clip_bit"), "{message}");
    let (_, message) = rejection(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 2.0,
            noised_bit: 1.0,
        }),
    ))
    .expect("refused");
    assert!(message.contains("header.clip_norm"), "{message}");
    let (_, message) = rejection(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 1.0,
            noised_bit: f64::NAN,
        }),
    ))
    .expect("refused");
    assert!(message.contains("header.clip_bit"), "{message}");
    // A refused upload left the slot open: the right one is accepted.
    assert!(accepted(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 1.0,
            noised_bit: 0.3,
        }),
    )));

    // Without adaptive clipping no bit is requested and one is refused.
    let mut h = Harness::new(&local_manifest(3, 4, 1.0, ""));
    let task = h.task("a").unwrap();
    assert_eq!(task.clip_bit_noise_std, None);
    let (_, message) = rejection(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 1.0,
            noised_bit: 1.0,
        }),
    ))
    .expect("refused");
    assert!(message.contains("header.clip_bit"), "{message}");
    assert!(accepted(&upload_with(&mut h, &task, None)));
}

#[test]
fn a_durable_local_run_records_c_in_the_ledger_and_the_report_states_the_local_assumption() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000;
    let text = local_manifest(
        3,
        4,
        1.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n",
    );
    let mut c =
        fedpref_coordinator::coordinator::Coordinator::open(&dir.path().join("c.db"), t0).unwrap();
    c.create_run("t", common::manifest(&text), t0).unwrap();
    let dim = c.engine("t").unwrap().model().1.len();
    let mut now = t0 + 1;
    for r in 0..3 {
        for d in 0..4 {
            let device = format!("dev-{r}-{d}");
            let actions = c
                .handle(
                    "t",
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
                    Action::SendTask(t) => Some(t),
                    _ => None,
                })
                .expect("a task");
            // Every device reports "fits" (bit 1, no noise): C shrinks each round.
            let actions = c
                .handle(
                    "t",
                    Event::Update {
                        device,
                        round: task.round,
                        task_token: task.task_token,
                        values: vec![0.0; dim],
                        examples: 5,
                        clip_bit: Some(ClipBit {
                            clip_norm: task.clip_norm,
                            noised_bit: 1.0,
                        }),
                    },
                    now,
                )
                .unwrap();
            assert!(accepted(&actions), "{actions:?}");
        }
        let deadline = c.engine("t").unwrap().next_wakeup().unwrap();
        c.handle("t", Event::Tick, deadline).unwrap();
        now = deadline + 1;
    }
    let entries = c.store().ledger("t").unwrap();
    let totals = fedpref_coordinator::ledger::verify("t", &entries).expect("intact");
    // Three local releases at the combined z = 1 (the devices' pairs), nothing more.
    let release = fedpref_privacy::RoundRelease {
        mode: fedpref_privacy::PrivacyMode::Local,
        noise_multiplier: 1.0,
        sampling_rate: 1.0,
    };
    // The ledger accounts with the run's accountant (PLD, the default): compare with a PLD budget.
    let mut budget = fedpref_privacy::Budget::with_accountant(
        1e9,
        1e-6,
        fedpref_privacy::OrderGrid::default(),
        fedpref_privacy::Accountant::Pld,
    )
    .unwrap();
    for _ in 0..2 {
        budget.spend(&release).unwrap();
    }
    let expected = budget.spend(&release).unwrap().epsilon;
    let got = totals.cumulative_epsilon[0].epsilon;
    assert!(
        (got - expected).abs() <= 1e-9 * expected,
        "{got} vs {expected}"
    );
    let report = fedpref_coordinator::report::ImpactReport::build(c.store(), "t", now).unwrap();
    let trajectory = &report.spend.clip_trajectory;
    assert_eq!(trajectory.len(), 3);
    // b̄ = 1, γ = 0.5, η = 0.2: C ← C·e^(−0.1) each round.
    for (i, p) in trajectory.iter().enumerate() {
        let before = (-0.1 * i as f64).exp();
        assert!((p.clip_norm - before).abs() < 1e-12, "{trajectory:?}");
        assert!(
            (p.next_clip_norm - before * (-0.1f64).exp()).abs() < 1e-12,
            "{trajectory:?}"
        );
    }
    assert_eq!(
        report.assessment.epsilon_assumption,
        "none (worst case per device)"
    );
    let md = report.to_markdown();
    assert!(md.contains("| round | C | next C |"), "{md}");
    assert!(
        md.contains("Local mode: each device computed its bit"),
        "{md}"
    );
    assert!(
        report
            .to_html()
            .contains("Local mode: each device computed its bit")
    );
}

#[test]
fn a_clip_bit_of_minus_1e300_is_refused_and_c_stays_finite() {
    let text = local_manifest(
        3,
        3,
        1.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n",
    );
    let mut h = Harness::new(&text);
    let task = h.task("a").unwrap();
    let (kind, message) = rejection(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 1.0,
            noised_bit: -1e300,
        }),
    ))
    .expect("refused");
    assert_eq!(kind, RejectKind::InvalidArgument);
    assert!(
        message.contains("header.clip_bit") && message.contains("outside [-10, 11]"),
        "{message}"
    );
    // The edge of the range is accepted; the round ends with C finite and the next task's C
    // is what the bits moved it to.
    assert!(accepted(&upload_with(
        &mut h,
        &task,
        Some(ClipBit {
            clip_norm: 1.0,
            noised_bit: -10.0,
        }),
    )));
    h.finish_round();
    h.now += 1;
    let c = h.engine.clip_norm();
    assert!(c.is_finite() && c > 1.0, "{c}");
    assert_eq!(h.task("b").unwrap().clip_norm, c);
}

#[test]
fn c_stays_within_the_manifests_bounds_however_the_bits_push() {
    let text = local_manifest(
        40,
        1,
        1.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nlearning_rate = 1.0\nbit_noise_std = 1.0\nmin_clip_norm = 0.5\nmax_clip_norm = 4.0\n",
    );
    let mut h = Harness::new(&text);
    // Every device lies at the bottom of the range: C grows by e^(10.5) a round, unbounded.
    for r in 0..3 {
        let task = h.task(&format!("up{r}")).unwrap();
        assert!(accepted(&upload_with(
            &mut h,
            &task,
            Some(ClipBit {
                clip_norm: task.clip_norm,
                noised_bit: -10.0,
            }),
        )));
        h.finish_round();
        h.now += 1;
    }
    assert_eq!(h.engine.clip_norm(), 4.0);
    for r in 0..3 {
        let task = h.task(&format!("down{r}")).unwrap();
        assert!(accepted(&upload_with(
            &mut h,
            &task,
            Some(ClipBit {
                clip_norm: task.clip_norm,
                noised_bit: 11.0,
            }),
        )));
        h.finish_round();
        h.now += 1;
    }
    assert_eq!(h.engine.clip_norm(), 0.5);
}

#[test]
fn clip_norm_bounds_are_validated_and_named() {
    for (extra, key) in [
        ("min_clip_norm = 2.0", "adaptive_clipping.min_clip_norm"),
        ("max_clip_norm = 0.5", "adaptive_clipping.min_clip_norm"),
        ("max_clip_norm = -1.0", "adaptive_clipping.max_clip_norm"),
    ] {
        let text = local_manifest(
            3,
            3,
            1.0,
            &format!(
                "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n{extra}\n"
            ),
        );
        let e = fedpref_coordinator::manifest::RunManifest::from_toml(&text, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
    let text = local_manifest(
        3,
        3,
        2.0,
        "\n[adaptive_clipping]\ntarget_quantile = 0.5\nbit_noise_std = 1.0\n",
    );
    let m = fedpref_coordinator::manifest::RunManifest::from_toml(&text, "m.toml").unwrap();
    assert_eq!(m.clip_norm_bounds(), Some((0.002, 2000.0)));
}
