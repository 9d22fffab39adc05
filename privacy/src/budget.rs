//! Privacy budgets that are enforced, not advisory.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{
    Audience, OrderGrid, PrivacyError, PrivacyMode, PrivacyStatement, RdpAccountant, RoundRelease,
};

/// A privacy budget (ε, δ) and what has been spent against it.
///
/// The coordinator keeps one per training run, the SDK one per user. [`Budget::spend`]
/// refuses a round that would take ε past the budget and records nothing in that case, so a
/// holder that asks before every release never overspends.
///
/// ```
/// use fedpref_privacy::{Budget, PrivacyMode, RoundRelease};
/// let mut budget = Budget::new(1.0, 1e-5).unwrap();
/// let round = RoundRelease { mode: PrivacyMode::Local, noise_multiplier: 20.0, sampling_rate: 1.0 };
/// let mut rounds = 0;
/// while !budget.would_exceed(&round).unwrap() {
///     budget.spend(&round).unwrap();
///     rounds += 1;
/// }
/// assert!(rounds > 0 && budget.spent().epsilon <= 1.0);
/// assert!(budget.spend(&round).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BudgetRepr")]
pub struct Budget {
    epsilon: f64,
    delta: f64,
    accountant: RdpAccountant,
    rounds: u64,
    mode: Option<PrivacyMode>,
    audience: Audience,
}

/// The serialised form, validated on the way in (a NaN ε would otherwise never be exceeded).
#[derive(Deserialize)]
struct BudgetRepr {
    epsilon: f64,
    delta: f64,
    accountant: RdpAccountant,
    rounds: u64,
    mode: Option<PrivacyMode>,
    audience: Audience,
}

impl TryFrom<BudgetRepr> for Budget {
    type Error = PrivacyError;
    fn try_from(r: BudgetRepr) -> Result<Self, Self::Error> {
        let mut b = Budget::with_orders(r.epsilon, r.delta, r.accountant.orders().clone())?;
        b.accountant = r.accountant;
        b.rounds = r.rounds;
        b.mode = r.mode;
        b.audience = r.audience;
        Ok(b)
    }
}

impl Budget {
    /// A budget of (ε, δ) with nothing spent, over the default order grid.
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, PrivacyError> {
        Self::with_orders(epsilon, delta, OrderGrid::default())
    }

    /// A budget over a chosen order grid.
    pub fn with_orders(epsilon: f64, delta: f64, orders: OrderGrid) -> Result<Self, PrivacyError> {
        Ok(Self {
            epsilon: check::positive("epsilon", epsilon)?,
            delta: check::delta(delta)?,
            accountant: RdpAccountant::new(orders),
            rounds: 0,
            mode: None,
            audience: Audience::Anyone,
        })
    }

    /// The budget's ε.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The budget's δ.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// The number of rounds spent.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The accountant holding what has been spent.
    pub fn accountant(&self) -> &RdpAccountant {
        &self.accountant
    }

    /// What has been spent, as ε at the budget's δ, with its audience (the narrowest of the
    /// rounds' audiences).
    pub fn spent(&self) -> PrivacyStatement {
        self.statement(&self.accountant, self.audience)
    }

    /// ε left before the budget is reached (never negative).
    pub fn remaining(&self) -> f64 {
        (self.epsilon - self.spent().epsilon).max(0.0)
    }

    /// Whether spending `next` would take ε past the budget.
    pub fn would_exceed(&self, next: &RoundRelease) -> Result<bool, PrivacyError> {
        self.check_mode(next)?;
        Ok(self.after(next)?.0.epsilon > self.epsilon)
    }

    /// Spends one round, or refuses with [`PrivacyError::BudgetExceeded`] and records nothing.
    pub fn spend(&mut self, next: &RoundRelease) -> Result<PrivacyStatement, PrivacyError> {
        self.check_mode(next)?;
        let (statement, accountant) = self.after(next)?;
        if statement.epsilon > self.epsilon {
            return Err(PrivacyError::BudgetExceeded {
                would_be: statement.epsilon,
                budget: self.epsilon,
                delta: self.delta,
            });
        }
        self.accountant = accountant;
        self.rounds += 1;
        self.mode = Some(next.mode);
        self.audience = statement.audience;
        Ok(statement)
    }

    fn check_mode(&self, next: &RoundRelease) -> Result<(), PrivacyError> {
        match self.mode {
            Some(mode) if mode != next.mode => Err(PrivacyError::Unsupported(
                "a budget accounts for releases of one privacy mode only",
            )),
            _ => Ok(()),
        }
    }

    fn after(
        &self,
        next: &RoundRelease,
    ) -> Result<(PrivacyStatement, RdpAccountant), PrivacyError> {
        let (q, sigma) = next.effective()?;
        let mut accountant = self.accountant.clone();
        accountant.compose_subsampled_gaussian(q, sigma, 1)?;
        let audience = self.audience.narrowest(next.audience());
        let mut statement = self.statement(&accountant, audience);
        statement.mode = next.mode;
        Ok((statement, accountant))
    }

    fn statement(&self, accountant: &RdpAccountant, audience: Audience) -> PrivacyStatement {
        // δ was validated at construction, so the conversion cannot fail.
        let e = accountant
            .epsilon(self.delta)
            .expect("budget δ is validated at construction");
        PrivacyStatement {
            epsilon: e.epsilon,
            delta: e.delta,
            order: e.order,
            mode: self.mode.unwrap_or(PrivacyMode::Local),
            audience,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn central(q: f64) -> RoundRelease {
        RoundRelease {
            mode: PrivacyMode::Central,
            noise_multiplier: 1.0,
            sampling_rate: q,
        }
    }

    #[test]
    fn a_refused_round_records_nothing() {
        let mut b = Budget::new(0.5, 1e-5).unwrap();
        let before = b.clone();
        let err = b.spend(&central(1.0)).unwrap_err();
        assert!(matches!(err, PrivacyError::BudgetExceeded { .. }), "{err}");
        assert_eq!(b, before);
    }

    #[test]
    fn spent_and_remaining_add_up_to_the_budget() {
        let mut b = Budget::new(5.0, 1e-5).unwrap();
        for _ in 0..10 {
            b.spend(&central(0.01)).unwrap();
        }
        assert_eq!(b.rounds(), 10);
        let s = b.spent();
        assert!((s.epsilon + b.remaining() - 5.0).abs() < 1e-12);
        assert_eq!(s.audience, Audience::ObserversUnawareOfParticipation);
    }

    #[test]
    fn mixing_modes_in_one_budget_is_refused() {
        let mut b = Budget::new(5.0, 1e-5).unwrap();
        b.spend(&central(0.01)).unwrap();
        let local = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: 10.0,
            sampling_rate: 1.0,
        };
        assert!(b.spend(&local).is_err());
    }

    #[test]
    fn would_exceed_refuses_a_release_of_another_mode() {
        let mut b = Budget::new(5.0, 1e-5).unwrap();
        b.spend(&central(0.01)).unwrap();
        let local = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: 10.0,
            sampling_rate: 1.0,
        };
        assert!(b.would_exceed(&local).is_err());
    }

    #[test]
    fn a_persisted_budget_with_a_nan_limit_is_refused() {
        let b = Budget::new(5.0, 1e-5).unwrap();
        let text = serde_json::to_string(&b)
            .unwrap()
            .replace("\"epsilon\":5.0", "\"epsilon\":null");
        assert!(serde_json::from_str::<Budget>(&text).is_err());
        let back: Budget = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn budget_rejects_bad_limits() {
        assert!(Budget::new(0.0, 1e-5).is_err());
        assert!(Budget::new(1.0, 0.0).is_err());
        assert!(Budget::new(f64::NAN, 1e-5).is_err());
    }
}
