//! Invariants of the PLD accountant for any parameters: ε falls as σ rises, rises with the
//! rounds and with the sampling rate; composing rounds one at a time agrees with composing
//! them at once (FFT power); and PLD ε never exceeds RDP ε for the same schedule.
//!
//! A coarser grid (Δ = 1e-3) than the default keeps these fast; the properties do not depend
//! on Δ.

use fedpref_privacy::RdpAccountant;
use fedpref_privacy::pld::{PldAccountant, PldMechanism};
use proptest::prelude::*;

const INTERVAL: f64 = 1e-3;

fn pld_epsilon(q: f64, sigma: f64, rounds: u64, delta: f64) -> f64 {
    let mut acc = PldAccountant::new(INTERVAL).unwrap();
    acc.compose_subsampled_gaussian(q, sigma, rounds).unwrap();
    acc.epsilon(delta).unwrap().epsilon
}

/// Discretisation and truncation may break ties by rounding noise, never by more.
fn at_most(a: f64, b: f64) -> bool {
    a <= b * (1.0 + 1e-9) + 1e-12
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pld_epsilon_falls_as_sigma_rises(
        q in prop_oneof![Just(1.0), 0.001f64..0.3],
        sigma in 0.6f64..6.0,
        factor in 1.01f64..2.0,
        rounds in 1u64..500,
    ) {
        let (lo, hi) = (pld_epsilon(q, sigma, rounds, 1e-5), pld_epsilon(q, sigma * factor, rounds, 1e-5));
        prop_assert!(at_most(hi, lo), "σ={sigma}→{}: ε {lo} → {hi}", sigma * factor);
    }

    #[test]
    fn pld_epsilon_rises_with_rounds(
        q in prop_oneof![Just(1.0), 0.001f64..0.3],
        sigma in 0.6f64..6.0,
        rounds in 1u64..500,
        more in 1u64..500,
    ) {
        let (a, b) = (pld_epsilon(q, sigma, rounds, 1e-5), pld_epsilon(q, sigma, rounds + more, 1e-5));
        prop_assert!(at_most(a, b), "T={rounds}→{}: ε {a} → {b}", rounds + more);
    }

    #[test]
    fn pld_epsilon_rises_with_the_sampling_rate(
        q in 0.001f64..0.5,
        factor in 1.05f64..2.0,
        sigma in 0.6f64..6.0,
        rounds in 1u64..300,
    ) {
        let q2 = (q * factor).min(1.0);
        let (a, b) = (pld_epsilon(q, sigma, rounds, 1e-5), pld_epsilon(q2, sigma, rounds, 1e-5));
        prop_assert!(at_most(a, b), "q={q}→{q2}: ε {a} → {b}");
    }

    #[test]
    fn pld_epsilon_never_exceeds_rdp_epsilon(
        q in prop_oneof![Just(1.0), 0.001f64..0.5],
        sigma in 0.6f64..6.0,
        rounds in 1u64..500,
        delta in prop_oneof![Just(1e-5), Just(1e-7)],
    ) {
        let pld = pld_epsilon(q, sigma, rounds, delta);
        let mut rdp = RdpAccountant::default();
        rdp.compose_subsampled_gaussian(q, sigma, rounds).unwrap();
        let rdp = rdp.epsilon(delta).unwrap().epsilon;
        prop_assert!(pld <= rdp, "q={q} σ={sigma} T={rounds}: PLD {pld} > RDP {rdp}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn composing_rounds_one_by_one_equals_self_composition(
        q in prop_oneof![Just(1.0), 0.005f64..0.2],
        sigma in 0.7f64..4.0,
        rounds in 2u64..60,
    ) {
        let mut one_by_one = PldAccountant::new(INTERVAL).unwrap();
        for _ in 0..rounds {
            one_by_one.compose_subsampled_gaussian(q, sigma, 1).unwrap();
        }
        let mut at_once = PldAccountant::new(INTERVAL).unwrap();
        at_once.compose_subsampled_gaussian(q, sigma, rounds).unwrap();
        prop_assert_eq!(one_by_one.schedule(), at_once.schedule());
        for delta in [1e-4, 1e-6, 1e-9] {
            let a = one_by_one.epsilon(delta).unwrap().epsilon;
            let b = at_once.epsilon(delta).unwrap().epsilon;
            // The two differ only in where tails (≤ 1e-15 each) were truncated.
            prop_assert!((a - b).abs() <= 1e-5 * a.max(1e-3), "δ={delta}: {a} vs {b}");
        }
    }
}

#[test]
fn heterogeneous_rounds_compose_in_any_order() {
    let mut ab = PldAccountant::new(INTERVAL).unwrap();
    ab.compose_subsampled_gaussian(0.05, 1.0, 20).unwrap();
    ab.compose_gaussian(8.0, 3).unwrap();
    ab.compose_subsampled_gaussian(0.2, 2.0, 5).unwrap();
    let mut ba = PldAccountant::new(INTERVAL).unwrap();
    ba.compose_subsampled_gaussian(0.2, 2.0, 5).unwrap();
    ba.compose_gaussian(8.0, 3).unwrap();
    ba.compose_subsampled_gaussian(0.05, 1.0, 20).unwrap();
    let (a, b) = (
        ab.epsilon(1e-6).unwrap().epsilon,
        ba.epsilon(1e-6).unwrap().epsilon,
    );
    assert!((a - b).abs() < 1e-9 * a, "{a} vs {b}");
    // And each part alone costs less than the whole.
    let part = {
        let mut p = PldAccountant::new(INTERVAL).unwrap();
        p.compose_subsampled_gaussian(0.05, 1.0, 20).unwrap();
        p.epsilon(1e-6).unwrap().epsilon
    };
    assert!(part < a);
}

#[test]
fn a_gaussian_of_any_sensitivity_is_the_unit_gaussian_at_the_scaled_sigma() {
    // DP-FTRL's tree: a Gaussian of sensitivity Δ with std σ is N(Δ) vs N(0) at σ/Δ.
    let mut scaled = PldAccountant::new(INTERVAL).unwrap();
    scaled
        .compose_mechanism(
            PldMechanism::Gaussian {
                noise_multiplier: 6.0,
                sensitivity: 3.0,
            },
            10,
        )
        .unwrap();
    let mut unit = PldAccountant::new(INTERVAL).unwrap();
    unit.compose_gaussian(2.0, 10).unwrap();
    let (a, b) = (
        scaled.epsilon(1e-6).unwrap().epsilon,
        unit.epsilon(1e-6).unwrap().epsilon,
    );
    assert!((a - b).abs() < 1e-12 * a, "{a} vs {b}");
}

#[test]
fn replace_one_sampling_costs_more_than_add_remove_and_less_than_no_sampling() {
    let eps = |m: PldMechanism| {
        let mut acc = PldAccountant::new(INTERVAL).unwrap();
        acc.compose_mechanism(m, 50).unwrap();
        acc.epsilon(1e-6).unwrap().epsilon
    };
    let add_remove = eps(PldMechanism::SubsampledGaussian {
        sampling_rate: 0.05,
        noise_multiplier: 1.5,
    });
    let replace = eps(PldMechanism::ReplaceOneSubsampledGaussian {
        sampling_rate: 0.05,
        noise_multiplier: 1.5,
    });
    let unsampled = eps(PldMechanism::Gaussian {
        noise_multiplier: 1.5,
        sensitivity: 2.0,
    });
    assert!(
        add_remove < replace && replace < unsampled,
        "{add_remove} {replace} {unsampled}"
    );
}
