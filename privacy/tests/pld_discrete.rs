//! The PLD of the discrete Gaussian and of sums of discrete Gaussians (distributed mode's
//! noise) against the exact Rényi divergences of `tests/data/distributed_reference.json`
//! (`exact_divergence`: 60-digit convolution, see `tests/data/distributed_PROVENANCE.md`),
//! and the pessimism of its discretisation.

use std::collections::HashMap;

use fedpref_privacy::pld::{PldAccountant, PldMechanism};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/distributed_reference.json"
    ))
    .expect("tests/data/distributed_reference.json is present");
    serde_json::from_str(&text).expect("valid JSON")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn sum_of(variance: f64, devices: u64, shift: u64) -> PldMechanism {
    PldMechanism::SumOfDiscreteGaussians {
        device_variance: variance,
        devices,
        shift,
    }
}

#[test]
fn exact_losses_reproduce_the_reference_renyi_divergences() {
    let data = reference();
    let vectors = data["exact_divergence"].as_array().unwrap();
    assert!(vectors.len() >= 40);
    let mut losses = HashMap::new();
    let mut failures = vec![];
    for v in vectors {
        let (s2, m, alpha) = (f(v, "s2"), f(v, "m") as u64, f(v, "alpha"));
        assert_eq!(f(v, "d"), 1.0, "the reference is for scalar releases");
        // Δ₂ = C/γ + √d with β = 0: the integer shifts 1..=⌊Δ₂⌋ are the neighbours.
        let max_shift = (f(v, "clip") / f(v, "gamma") + 1.0).floor() as u64;
        let worst = (1..=max_shift)
            .map(|k| {
                let exact = losses.entry((s2.to_bits(), m, k)).or_insert_with(|| {
                    sum_of(s2, m, k)
                        .exact_losses()
                        .unwrap()
                        .expect("discrete mechanism")
                });
                exact.renyi_divergence(alpha)
            })
            .fold(f64::NEG_INFINITY, f64::max);
        let want = f(v, "exact_rdp");
        if (worst - want).abs() > 1e-9 * want {
            failures.push(format!("s²={s2} m={m} α={alpha}: {worst} vs exact {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn discretised_discrete_gaussian_sums_are_pessimistic_and_tight() {
    for &(s2, m, k) in &[
        (1.0, 1, 1),
        (1.0, 2, 3),
        (2.0, 3, 2),
        (4.0, 5, 1),
        (0.25, 1, 1),
    ] {
        let mech = sum_of(s2, m, k);
        let exact = mech.exact_losses().unwrap().unwrap();
        let pld = mech.pld(1e-4).unwrap();
        for &eps in &[0.0, 0.1, 0.5, 1.0, 2.0, 4.0] {
            let truth = exact.delta_for_epsilon(eps);
            let ours = pld.delta_for_epsilon(eps);
            assert!(
                ours >= truth * (1.0 - 1e-12),
                "s²={s2} m={m} k={k} ε={eps}: {ours} < exact {truth}"
            );
            assert!(
                ours <= truth * (1.0 + 1e-3) + 1e-15,
                "s²={s2} m={m} k={k} ε={eps}: {ours} ≫ exact {truth}"
            );
        }
    }
}

#[test]
fn more_shares_in_the_sum_give_less_epsilon() {
    let eps = |m: u64| {
        let mut acc = PldAccountant::new(1e-4).unwrap();
        acc.compose_mechanism(sum_of(4.0, m, 2), 10).unwrap();
        acc.epsilon(1e-6).unwrap().epsilon
    };
    let (one, three, ten) = (eps(1), eps(3), eps(10));
    assert!(one > three && three > ten, "{one} {three} {ten}");
}

#[test]
fn a_discrete_gaussian_is_close_to_the_continuous_one_at_large_variance() {
    // N_ℤ(0, s²) with shift k against N(0, s²) with sensitivity k: same ε to 1e-4 at s = 20.
    let mut discrete = PldAccountant::new(1e-4).unwrap();
    discrete.compose_mechanism(sum_of(400.0, 1, 20), 5).unwrap();
    let mut continuous = PldAccountant::new(1e-4).unwrap();
    continuous.compose_gaussian(1.0, 5).unwrap();
    let (a, b) = (
        discrete.epsilon(1e-6).unwrap().epsilon,
        continuous.epsilon(1e-6).unwrap().epsilon,
    );
    assert!((a - b).abs() < 1e-3 * b, "{a} vs {b}");
}

#[test]
fn hostile_discrete_parameters_are_refused_naming_the_field() {
    for (m, field) in [
        (sum_of(f64::NAN, 2, 1), "device_variance"),
        (sum_of(0.1, 2, 1), "device_variance"),
        (sum_of(1.0, 0, 1), "devices"),
        (sum_of(1.0, 2, 0), "shift"),
    ] {
        let e = m.pld(1e-4).unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    let e = sum_of(1e9, 1000, 1).pld(1e-4).unwrap_err();
    assert!(e.to_string().contains("RDP"), "{e}");
}
