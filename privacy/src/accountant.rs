//! The Rényi-DP accountant: composition over rounds whose σ and q may differ, conversion to
//! (ε, δ), and calibration of σ for a target ε.

use serde::{Deserialize, Serialize};

use crate::PrivacyError;
use crate::error::check;
use crate::rdp::{OrderGrid, delta_from_rdp, epsilon_from_rdp, subsampled_gaussian_rdp};

/// ε for a given δ, with the Rényi order that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsilonAtOrder {
    /// The smallest ε over the order grid (`+∞` if none is finite).
    pub epsilon: f64,
    /// The δ it holds with.
    pub delta: f64,
    /// The first order attaining the minimum.
    pub order: f64,
}

/// δ for a given ε, with the Rényi order that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaAtOrder {
    /// The given ε.
    pub epsilon: f64,
    /// The smallest δ over the order grid, at most 1.
    pub delta: f64,
    /// The first order attaining the minimum.
    pub order: f64,
}

/// Composes Rényi-DP over releases: the RDP of a sequence of mechanisms is the sum of their
/// RDP at each order (Mironov 2017, Prop. 1), so the accountant keeps one running sum per
/// order of its grid.
///
/// It works in *effective* noise multipliers (noise std / L2 sensitivity) and add/remove-one
/// neighbouring; [`crate::PrivacyMode`] maps a mode's configured σ to the effective one.
///
/// ```
/// use fedpref_privacy::RdpAccountant;
/// let mut acc = RdpAccountant::default();
/// acc.compose_subsampled_gaussian(0.01, 1.1, 1000).unwrap();
/// let e = acc.epsilon(1e-5).unwrap();
/// assert!(e.epsilon > 1.0 && e.epsilon < 2.0);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RdpAccountantRepr")]
pub struct RdpAccountant {
    orders: OrderGrid,
    rdp: Vec<f64>,
}

/// The serialised form, validated on the way in: persisted state that is corrupt (a NaN,
/// a negative RDP, a length that does not match the grid) must not under-report spend.
#[derive(Deserialize)]
struct RdpAccountantRepr {
    orders: OrderGrid,
    rdp: Vec<f64>,
}

impl TryFrom<RdpAccountantRepr> for RdpAccountant {
    type Error = PrivacyError;
    fn try_from(r: RdpAccountantRepr) -> Result<Self, Self::Error> {
        let mut acc = RdpAccountant::new(r.orders);
        acc.compose_rdp(&r.rdp, 1)?;
        Ok(acc)
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(OrderGrid::default())
    }
}

impl RdpAccountant {
    /// An accountant that has spent nothing, over the given order grid.
    pub fn new(orders: OrderGrid) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// The order grid.
    pub fn orders(&self) -> &OrderGrid {
        &self.orders
    }

    /// The composed RDP, one value per order of the grid.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// The single-step RDP of a Poisson-subsampled Gaussian over this accountant's grid.
    pub fn step_rdp(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
    ) -> Result<Vec<f64>, PrivacyError> {
        let q = check::sampling_rate(sampling_rate)?;
        let sigma = check::positive("noise_multiplier", noise_multiplier)?;
        Ok(self
            .orders
            .orders()
            .iter()
            .map(|&a| subsampled_gaussian_rdp(q, sigma, a))
            .collect())
    }

    /// Adds `count` rounds of the Gaussian mechanism (no sampling) with effective σ.
    pub fn compose_gaussian(
        &mut self,
        noise_multiplier: f64,
        count: u64,
    ) -> Result<(), PrivacyError> {
        self.compose_subsampled_gaussian(1.0, noise_multiplier, count)
    }

    /// Adds `count` rounds of the Poisson-subsampled Gaussian mechanism with rate q and
    /// effective σ. `q = 1` is the plain Gaussian mechanism.
    pub fn compose_subsampled_gaussian(
        &mut self,
        sampling_rate: f64,
        noise_multiplier: f64,
        count: u64,
    ) -> Result<(), PrivacyError> {
        let step = self.step_rdp(sampling_rate, noise_multiplier)?;
        self.compose_rdp(&step, count)
    }

    /// Adds `count` copies of a precomputed single-step RDP curve over this grid.
    pub fn compose_rdp(&mut self, step: &[f64], count: u64) -> Result<(), PrivacyError> {
        if step.len() != self.rdp.len() {
            return Err(PrivacyError::DimensionMismatch {
                expected: self.rdp.len(),
                actual: step.len(),
            });
        }
        if let Some(&bad) = step.iter().find(|r| r.is_nan() || **r < 0.0) {
            return Err(PrivacyError::invalid("rdp", bad, "RDP must be ≥ 0"));
        }
        let count = count as f64;
        for (total, r) in self.rdp.iter_mut().zip(step) {
            *total += count * r;
        }
        Ok(())
    }

    /// Adds everything another accountant (over the same grid) has composed.
    pub fn compose(&mut self, other: &RdpAccountant) -> Result<(), PrivacyError> {
        if other.orders != self.orders {
            return Err(PrivacyError::Unsupported(
                "cannot compose accountants over different order grids",
            ));
        }
        self.compose_rdp(&other.rdp, 1)
    }

    /// The smallest ε at which everything composed so far is (ε, δ)-DP.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonAtOrder, PrivacyError> {
        let delta = check::delta(delta)?;
        let (epsilon, order) = epsilon_from_rdp(&self.orders, &self.rdp, delta);
        Ok(EpsilonAtOrder {
            epsilon,
            delta,
            order,
        })
    }

    /// The smallest δ at which everything composed so far is (ε, δ)-DP.
    pub fn delta(&self, epsilon: f64) -> Result<DeltaAtOrder, PrivacyError> {
        let epsilon = check::epsilon(epsilon)?;
        let (delta, order) = delta_from_rdp(&self.orders, &self.rdp, epsilon);
        Ok(DeltaAtOrder {
            epsilon,
            delta,
            order,
        })
    }
}

/// The result of [`calibrate_noise_multiplier`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The smallest effective σ (to a relative 1e-12) whose ε does not exceed the target.
    pub noise_multiplier: f64,
    /// ε at that σ (≤ the target).
    pub epsilon: f64,
    /// The order at which that ε is attained.
    pub order: f64,
}

/// Finds the smallest effective noise multiplier σ such that `rounds` rounds of the
/// Poisson-subsampled Gaussian with rate q are (target ε, δ)-DP, by bracketing and
/// bisection. ε(σ) is non-increasing in σ, so the answer is the bracket's upper end, which
/// always meets the target.
pub fn calibrate_noise_multiplier(
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    rounds: u64,
    orders: &OrderGrid,
) -> Result<Calibration, PrivacyError> {
    let target = check::positive("target_epsilon", target_epsilon)?;
    let delta = check::delta(delta)?;
    let q = check::sampling_rate(sampling_rate)?;
    if rounds == 0 {
        return Err(PrivacyError::invalid("rounds", 0.0, "must be at least 1"));
    }
    let eps = |sigma: f64| {
        let mut acc = RdpAccountant::new(orders.clone());
        acc.compose_subsampled_gaussian(q, sigma, rounds)
            .and_then(|()| acc.epsilon(delta))
    };
    let (mut lo, mut hi) = (0.1, 1.0);
    let mut at_hi = eps(hi)?;
    while at_hi.epsilon > target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e12 {
            return Err(PrivacyError::Calibration(
                "no noise multiplier up to 1e12 meets the target ε",
            ));
        }
        at_hi = eps(hi)?;
    }
    // No search below the smallest σ the mechanism accepts.
    let floor = crate::noise::MIN_NOISE_MULTIPLIER;
    while lo > floor && eps(lo)?.epsilon <= target {
        hi = lo;
        lo = (lo / 2.0).max(floor);
    }
    if lo == floor && eps(lo)?.epsilon <= target {
        // Even the smallest usable σ meets the target.
        let at = eps(lo)?;
        return Ok(Calibration {
            noise_multiplier: lo,
            epsilon: at.epsilon,
            order: at.order,
        });
    }
    at_hi = eps(hi)?;
    while (hi - lo) > 1e-12 * hi {
        let mid = 0.5 * (lo + hi);
        let at_mid = eps(mid)?;
        if at_mid.epsilon <= target {
            hi = mid;
            at_hi = at_mid;
        } else {
            lo = mid;
        }
    }
    Ok(Calibration {
        noise_multiplier: hi,
        epsilon: at_hi.epsilon,
        order: at_hi.order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composition_is_additive_over_rounds_with_different_parameters() {
        let mut a = RdpAccountant::default();
        a.compose_subsampled_gaussian(0.1, 1.0, 3).unwrap();
        a.compose_subsampled_gaussian(0.01, 2.0, 5).unwrap();
        let s1 = a.step_rdp(0.1, 1.0).unwrap();
        let s2 = a.step_rdp(0.01, 2.0).unwrap();
        for (i, r) in a.rdp().iter().enumerate() {
            assert!((r - (3.0 * s1[i] + 5.0 * s2[i])).abs() <= 1e-12 * r.max(1.0));
        }
    }

    #[test]
    fn accountant_rejects_bad_parameters_naming_them() {
        let mut a = RdpAccountant::default();
        let e = a.compose_subsampled_gaussian(1.5, 1.0, 1).unwrap_err();
        assert!(e.to_string().contains("sampling_rate"), "{e}");
        let e = a.compose_subsampled_gaussian(0.5, -1.0, 1).unwrap_err();
        assert!(e.to_string().contains("noise_multiplier"), "{e}");
        let e = a.epsilon(1.0).unwrap_err();
        assert!(e.to_string().contains("delta"), "{e}");
    }

    #[test]
    fn corrupt_serialised_state_is_refused() {
        let mut a = RdpAccountant::default();
        a.compose_gaussian(2.0, 3).unwrap();
        let json = serde_json_roundtrip(&a);
        assert_eq!(json, a);
        let text = format!("{{\"orders\":[2.0,3.0],\"rdp\":[{},-1.0]}}", 0.5);
        assert!(serde_json::from_str::<RdpAccountant>(&text).is_err());
        let text = "{\"orders\":[2.0,3.0],\"rdp\":[0.5]}";
        assert!(serde_json::from_str::<RdpAccountant>(text).is_err());
    }

    fn serde_json_roundtrip(a: &RdpAccountant) -> RdpAccountant {
        serde_json::from_str(&serde_json::to_string(a).unwrap()).unwrap()
    }

    #[test]
    fn calibration_does_not_search_below_the_mechanisms_smallest_sigma() {
        let c = calibrate_noise_multiplier(1e9, 1e-5, 1.0, 1, &OrderGrid::default()).unwrap();
        assert!(c.noise_multiplier >= crate::noise::MIN_NOISE_MULTIPLIER);
    }

    #[test]
    fn tiny_sigma_gives_a_finite_answer_quickly_instead_of_exhausting_memory() {
        let mut a = RdpAccountant::default();
        a.compose_subsampled_gaussian(0.5, 1e-4, 1).unwrap();
        assert!(a.epsilon(1e-5).unwrap().epsilon > 100.0);
    }

    #[test]
    fn nothing_composed_means_epsilon_zero() {
        let a = RdpAccountant::default();
        assert_eq!(a.epsilon(1e-5).unwrap().epsilon, 0.0);
        assert_eq!(a.delta(0.5).unwrap().delta, 0.0);
    }

    #[test]
    fn calibration_meets_the_target_and_is_tight() {
        let grid = OrderGrid::default();
        let c = calibrate_noise_multiplier(2.0, 1e-5, 0.05, 100, &grid).unwrap();
        assert!(c.epsilon <= 2.0);
        let mut a = RdpAccountant::default();
        a.compose_subsampled_gaussian(0.05, c.noise_multiplier * (1.0 - 1e-9), 100)
            .unwrap();
        assert!(a.epsilon(1e-5).unwrap().epsilon > 2.0 * (1.0 - 1e-6));
    }
}
