//! The tree-aggregation accountant against reference values: the worst-case sensitivity
//! against a brute force over every participation pattern and against TensorFlow Privacy's
//! dynamic program (`tests/data/tree_sensitivity.json`, see `tree_sensitivity.md`), the
//! exact Gaussian (ε, δ) against the analytic-Gaussian values of the shared accountant
//! vectors, and inequalities that must hold.

use std::collections::BTreeSet;

use fedpref_privacy::OrderGrid;
use fedpref_privacy::rdp::epsilon_from_rdp;
use fedpref_privacy::tree::{
    ParticipationLimits, TreeAccountant, TreeSchedule, epsilon_from_zcdp_gaussian,
    worst_case_sensitivity_squared,
};
use proptest::prelude::*;
use serde_json::Value;

fn schedule_of(case: &Value) -> TreeSchedule {
    match case["schedule"].as_str().unwrap() {
        "single" => TreeSchedule::single_tree(),
        "restart" => TreeSchedule::restart_every(
            case["restart_every"].as_u64().unwrap(),
            case["completion"].as_bool().unwrap(),
        )
        .unwrap(),
        other => panic!("unknown schedule {other}"),
    }
}

fn load() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tree_sensitivity.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn sensitivity_matches_brute_force_and_tf_privacy_on_every_reference_case() {
    let data = load();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (group, key) in [
        ("small", "brute_force"),
        ("small", "tf_privacy"),
        ("large", "tf_privacy"),
    ] {
        for case in data[group].as_array().unwrap() {
            let Some(expected) = case.get(key).and_then(Value::as_u64) else {
                continue;
            };
            let limits = ParticipationLimits::new(
                case["min_separation"].as_u64().unwrap(),
                case["max_participations"].as_u64().unwrap(),
            )
            .unwrap();
            let rounds = case["rounds"].as_u64().unwrap();
            let got = worst_case_sensitivity_squared(schedule_of(case), limits, rounds);
            checked += 1;
            if got != expected {
                failures.push(format!("{key}: {case}: got {got}"));
            }
        }
    }
    assert!(checked > 2000, "only {checked} reference values");
    assert!(
        failures.is_empty(),
        "{} of {checked} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The nodes of a run, from the definition: dyadic blocks inside each tree, a tree split
/// into its largest power-of-two prefix and the rest, completed trees padded to a power of
/// two. Each node as the set of real rounds (0-based) it covers.
fn nodes(schedule: TreeSchedule, rounds: u64) -> Vec<BTreeSet<u64>> {
    let mut trees = Vec::new();
    match schedule.rounds_per_tree() {
        None => trees.push((rounds, rounds)),
        Some(per) => {
            let mut left = rounds;
            while left > 0 {
                let real = left.min(per);
                let leaves = if schedule.completion() && real == per {
                    real.next_power_of_two()
                } else {
                    real
                };
                trees.push((real, leaves));
                left -= real;
            }
        }
    }
    let mut out = Vec::new();
    let mut start = 0;
    for (real, leaves) in trees {
        // Complete subtrees [base, base + p) for the binary digits p of `leaves`.
        let mut base = 0;
        let mut rest = leaves;
        while rest > 0 {
            let p = 1u64 << (63 - rest.leading_zeros());
            let mut size = 1;
            while size <= p {
                for j in 0..p / size {
                    let lo = base + j * size;
                    let hi = (lo + size).min(real);
                    out.push((lo..hi.max(lo)).map(|r| start + r).collect());
                }
                size *= 2;
            }
            base += p;
            rest -= p;
        }
        start += real;
    }
    out
}

fn brute_force(schedule: TreeSchedule, s: u64, k: u64, rounds: u64) -> u64 {
    let nodes = nodes(schedule, rounds);
    let mut best = 0;
    for mask in 0u32..(1 << rounds) {
        let chosen: Vec<u64> = (0..rounds).filter(|r| mask >> r & 1 == 1).collect();
        if chosen.len() as u64 > k || chosen.windows(2).any(|w| w[1] - w[0] < s) {
            continue;
        }
        let value: u64 = nodes
            .iter()
            .map(|n| {
                let c = chosen.iter().filter(|r| n.contains(r)).count() as u64;
                c * c
            })
            .sum();
        best = best.max(value);
    }
    best
}

fn schedules() -> impl Strategy<Value = TreeSchedule> {
    prop_oneof![
        Just(TreeSchedule::single_tree()),
        (1u64..8, any::<bool>()).prop_map(|(r, c)| TreeSchedule::restart_every(r, c).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn sensitivity_equals_brute_force_on_random_small_runs(
        schedule in schedules(),
        rounds in 1u64..13,
        s in 1u64..6,
        k in 1u64..6,
    ) {
        let limits = ParticipationLimits::new(s, k).unwrap();
        prop_assert_eq!(
            worst_case_sensitivity_squared(schedule, limits, rounds),
            brute_force(schedule, s, k, rounds),
            "{} over {} rounds, {}", schedule, rounds, limits
        );
    }

    #[test]
    fn looser_limits_and_more_rounds_never_cost_less(
        schedule in schedules(),
        rounds in 1u64..200,
        s in 1u64..20,
        k in 1u64..10,
    ) {
        let at = |s: u64, k: u64, t: u64| {
            worst_case_sensitivity_squared(schedule, ParticipationLimits::new(s, k).unwrap(), t)
        };
        let base = at(s, k, rounds);
        prop_assert!(at(s, k + 1, rounds) >= base);
        prop_assert!(at(s + 1, k, rounds) <= base);
        prop_assert!(at(s, k, rounds + 1) >= base);
        // At least one participation: one leaf, and at most k·(nodes over a leaf) squared terms.
        prop_assert!(base >= 1);
    }
}

#[test]
fn exact_gaussian_epsilon_matches_the_analytic_gaussian_reference_vectors() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/rdp_vectors.json"
    ))
    .unwrap();
    let data: Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for v in data["vectors"].as_array().unwrap() {
        let Some(expected) = v.get("epsilon_gaussian_analytic").and_then(Value::as_f64) else {
            continue;
        };
        if v["q"].as_f64() != Some(1.0) || v["neighbouring"].as_str() != Some("add_remove") {
            continue;
        }
        // T compositions of the Gaussian with multiplier σ: ρ = T/(2σ²).
        let sigma = v["noise_multiplier"].as_f64().unwrap();
        let rounds = v["T"].as_f64().unwrap();
        let delta = v["delta"].as_f64().unwrap();
        let got = epsilon_from_zcdp_gaussian(rounds / (2.0 * sigma * sigma), delta).unwrap();
        checked += 1;
        if (got - expected).abs() > 1e-6 * expected.max(1.0) {
            failures.push(format!("{}: {got} vs {expected}", v["id"]));
        }
    }
    assert!(checked >= 20, "only {checked} vectors");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn exact_epsilon_is_never_above_the_rdp_bound() {
    let grid = OrderGrid::default();
    for rho in [0.01, 0.1, 0.5, 1.0, 4.0, 20.0] {
        for delta in [1e-5, 1e-8] {
            let exact = epsilon_from_zcdp_gaussian(rho, delta).unwrap();
            let rdp: Vec<f64> = grid.orders().iter().map(|a| a * rho).collect();
            let (bound, _) = epsilon_from_rdp(&grid, &rdp, delta);
            assert!(
                exact <= bound + 1e-9,
                "ρ={rho}, δ={delta}: {exact} > {bound}"
            );
            // … and not far below it (the RDP conversion is nearly tight for a Gaussian).
            assert!(
                exact > 0.7 * bound,
                "ρ={rho}, δ={delta}: {exact} vs {bound}"
            );
        }
    }
}

#[test]
fn epsilon_falls_with_sigma_and_rises_with_rounds_and_calibration_inverts_it() {
    let limits = ParticipationLimits::new(10, 20).unwrap();
    let schedule = TreeSchedule::restart_every(100, true).unwrap();
    let eps = |sigma: f64, rounds: u64| {
        TreeAccountant::new(sigma, schedule, limits)
            .unwrap()
            .spend(rounds, 1e-6)
            .unwrap()
            .epsilon
    };
    assert!(eps(2.0, 500) < eps(1.5, 500));
    // More rounds cost more while the limit on participations is not yet reached (500
    // rounds hold at most 20 participations at separation 10; 800 rounds hold more but the
    // limit is 20, so the worst pattern may already fit in the first 500).
    assert!(eps(2.0, 150) < eps(2.0, 500));
    assert!(eps(2.0, 500) <= eps(2.0, 800));
    let sigma =
        TreeAccountant::calibrate_noise_multiplier(schedule, limits, 500, 4.0, 1e-6).unwrap();
    assert!((eps(sigma, 500) - 4.0).abs() < 1e-6, "σ = {sigma}");
    let spend = TreeAccountant::new(sigma, schedule, limits)
        .unwrap()
        .spend(500, 1e-6)
        .unwrap();
    assert_eq!(
        spend.assumption,
        "participation limits (separation 10, at most 20)"
    );
    assert!((spend.rho - spend.sensitivity_squared as f64 / (2.0 * sigma * sigma)).abs() < 1e-12);
}

#[test]
fn a_thousand_rounds_with_wide_separation_is_computed_quickly() {
    // A production-sized case: 2,048 rounds, a device at most every 128 rounds and at most
    // 16 times (also in the reference file, from TF Privacy: 608).
    let start = std::time::Instant::now();
    let got = worst_case_sensitivity_squared(
        TreeSchedule::single_tree(),
        ParticipationLimits::new(128, 16).unwrap(),
        2048,
    );
    assert_eq!(got, 608);
    // Generous for a debug build on a loaded 2-core machine.
    assert!(start.elapsed().as_secs() < 120, "{:?}", start.elapsed());
}
