//! The distributed discrete Gaussian accountant against `tests/data/distributed_reference.json`
//! (see `tests/data/distributed_PROVENANCE.md`): an independent 60-digit computation of
//! KLS21 Prop. 14, and exact Rényi divergences of sums of discrete Gaussians that the bound
//! must lie above.

use fedpref_privacy::OrderGrid;
use fedpref_privacy::distributed::DistributedDiscreteGaussian;
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

fn close(actual: f64, expected: f64, rel: f64) -> bool {
    (actual - expected).abs() <= rel * expected.abs().max(1e-300)
}

#[test]
fn proposition_14_matches_the_independent_computation() {
    let data = reference();
    let grid = OrderGrid::default();
    let mut failures = Vec::new();
    let vectors = data["proposition_14"].as_array().unwrap();
    assert!(vectors.len() >= 5);
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let m = DistributedDiscreteGaussian::new(
            f(v, "clip"),
            f(v, "gamma"),
            f(v, "d") as usize,
            f(v, "beta"),
            f(v, "s2") as u64,
            f(v, "m") as u64,
        )
        .unwrap();
        if !close(m.l2_sensitivity(), f(v, "l2_sensitivity"), 1e-12) {
            failures.push(format!(
                "{name}: Δ₂ {} vs {}",
                m.l2_sensitivity(),
                f(v, "l2_sensitivity")
            ));
        }
        if (m.tau() - f(v, "tau")).abs() > 1e-12 * f(v, "tau") + 1e-300 {
            failures.push(format!("{name}: τ {} vs {}", m.tau(), f(v, "tau")));
        }
        let orders = v["orders"].as_array().unwrap();
        let rdp = v["rdp"].as_array().unwrap();
        for (a, r) in orders.iter().zip(rdp) {
            let (a, r) = (a.as_f64().unwrap(), r.as_f64().unwrap());
            if !close(m.rdp(a), r, 1e-10) {
                failures.push(format!("{name}: RDP at α = {a}: {} vs {r}", m.rdp(a)));
            }
        }
        for (rounds, eps) in v["epsilon_delta_1e_5"].as_object().unwrap() {
            let rounds: u64 = rounds.parse().unwrap();
            let eps = eps.as_f64().unwrap();
            let ours = m.epsilon_after(rounds, 1e-5, &grid).unwrap().epsilon;
            if !close(ours, eps, 1e-9) {
                failures.push(format!("{name}: ε after {rounds} rounds: {ours} vs {eps}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_bound_lies_above_the_exact_divergence_of_summed_discrete_gaussians() {
    let data = reference();
    let mut failures = Vec::new();
    let cases = data["exact_divergence"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for c in cases {
        let m = DistributedDiscreteGaussian::new(
            f(c, "clip"),
            f(c, "gamma"),
            f(c, "d") as usize,
            f(c, "beta"),
            f(c, "s2") as u64,
            f(c, "m") as u64,
        )
        .unwrap();
        let alpha = f(c, "alpha");
        let exact = f(c, "exact_rdp");
        let ours = m.rdp(alpha);
        let label = format!("s² = {}, m = {}, α = {alpha}", f(c, "s2"), f(c, "m"));
        if ours < exact * (1.0 - 1e-12) {
            failures.push(format!(
                "{label}: bound {ours} below the exact divergence {exact}"
            ));
        }
        // Where τ is negligible the bound is tight.
        if m.tau() < 1e-15 && ours > exact * (1.0 + 1e-9) {
            failures.push(format!(
                "{label}: bound {ours} not tight against {exact} with τ = {}",
                m.tau()
            ));
        }
        if !close(ours, f(c, "bound"), 1e-12) {
            failures.push(format!(
                "{label}: bound {ours} vs the reference's {}",
                f(c, "bound")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn epsilon_falls_with_more_honest_devices_and_grows_with_rounds() {
    let grid = OrderGrid::default();
    let eps = |m: u64, rounds: u64| {
        DistributedDiscreteGaussian::new(1.0, 1.0 / 1024.0, 16_384, (-0.5f64).exp(), 20_000, m)
            .unwrap()
            .epsilon_after(rounds, 1e-6, &grid)
            .unwrap()
            .epsilon
    };
    assert!(eps(100, 10) < eps(50, 10));
    assert!(eps(50, 100) > eps(50, 10));
}

#[test]
fn noise_multiplier_construction_gives_at_least_the_central_noise() {
    // σ = 1, C = 1, γ = 2⁻¹⁰, m = 99: central variance ≥ (σC/γ)².
    let m = DistributedDiscreteGaussian::for_noise_multiplier(1.0, 1.0 / 1024.0, 100, 0.0, 1.0, 99)
        .unwrap();
    let central = m.device_variance() as f64 * m.honest_devices() as f64;
    assert!(central >= 1024.0 * 1024.0);
    assert!(central < 1024.0 * 1024.0 + 99.0);
    assert!((m.device_noise_std() - (m.device_variance() as f64).sqrt() / 1024.0).abs() < 1e-15);
}
