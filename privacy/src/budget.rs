//! Privacy budgets that are enforced, not advisory.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::pld::{Accountant, PldAccountant, composed_gaussian_noise_multiplier, gaussian_epsilon};
use crate::{
    Audience, OrderGrid, PrivacyError, PrivacyMode, PrivacyStatement, RdpAccountant, RoundRelease,
};

/// A privacy budget (ε, δ) and what has been spent against it.
///
/// The coordinator keeps one per training run, the SDK one per user. [`Budget::spend`]
/// refuses a round that would take ε past the budget and records nothing in that case, so a
/// holder that asks before every release never overspends.
///
/// ε is computed by the budget's [`Accountant`]: PLD by default (tight), or RDP. The RDP
/// accountant is kept either way. Distributed-mode releases are recorded as the Gaussian whose
/// *RDP* bounds the distributed discrete Gaussian's, which does not bound its (ε, δ) curve, so
/// a budget of distributed releases falls back to RDP and its statements say so.
///
/// A budget composes releases of one privacy mode, with one exception: local releases and
/// distributed ones may share a budget (a device that takes part in distributed runs also
/// releases its federated evaluation with local noise). Their composition is stated in
/// distributed mode — zero-out neighbouring, against the release observers, by RDP — which
/// holds because a local release's guarantee (replace-one, sensitivity 2C, effective σ/2)
/// bounds the divergence between *any* two inputs of the user, the zero-out pair included,
/// and RDP composes additively over adaptively chosen mechanisms under one neighbouring
/// relation. Other mixtures are refused: central mode's add/remove-one relation is not
/// implied by the others.
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
    /// The accountant ε is computed with. Budgets stored before PLD existed were RDP.
    #[serde(default = "legacy_kind")]
    kind: Accountant,
    /// The releases as the PLD accountant composed them: (q, effective σ, count).
    #[serde(default)]
    pld_schedule: Vec<PldRounds>,
}

/// A run of identical releases in a PLD budget's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct PldRounds {
    sampling_rate: f64,
    noise_multiplier: f64,
    count: u64,
}

fn legacy_kind() -> Accountant {
    Accountant::Rdp
}

/// The PLD ε of a schedule at δ: a pure function of the schedule, so a budget read back from
/// its stored form states the same ε to the bit. Unsampled Gaussians (local mode, q = 1)
/// compose exactly to one Gaussian; otherwise each run of identical releases is composed by
/// one FFT power.
fn pld_epsilon(schedule: &[PldRounds], delta: f64) -> Result<f64, PrivacyError> {
    for s in schedule {
        check::sampling_rate(s.sampling_rate)?;
        check::positive("noise_multiplier", s.noise_multiplier)?;
    }
    if schedule.is_empty() {
        return Ok(0.0);
    }
    if schedule.iter().all(|s| s.sampling_rate == 1.0) {
        let sigma = composed_gaussian_noise_multiplier(
            schedule.iter().map(|s| (s.noise_multiplier, s.count)),
        );
        return Ok(gaussian_epsilon(sigma, delta));
    }
    let mut pld = PldAccountant::default();
    for s in schedule {
        pld.compose_subsampled_gaussian(s.sampling_rate, s.noise_multiplier, s.count)?;
    }
    Ok(pld.epsilon(delta)?.epsilon)
}

/// The schedule after one more release.
fn schedule_after(schedule: &[PldRounds], q: f64, sigma: f64) -> Vec<PldRounds> {
    let mut next = schedule.to_vec();
    match next.last_mut() {
        Some(last) if last.sampling_rate == q && last.noise_multiplier == sigma => last.count += 1,
        _ => next.push(PldRounds {
            sampling_rate: q,
            noise_multiplier: sigma,
            count: 1,
        }),
    }
    next
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
    #[serde(default = "legacy_kind")]
    kind: Accountant,
    #[serde(default)]
    pld_schedule: Vec<PldRounds>,
}

impl TryFrom<BudgetRepr> for Budget {
    type Error = PrivacyError;
    fn try_from(r: BudgetRepr) -> Result<Self, Self::Error> {
        let mut b =
            Budget::with_accountant(r.epsilon, r.delta, r.accountant.orders().clone(), r.kind)?;
        b.accountant = r.accountant;
        b.rounds = r.rounds;
        b.mode = r.mode;
        b.audience = r.audience;
        // The stored schedule is validated again (it is what ε is computed from).
        pld_epsilon(&r.pld_schedule, b.delta)?;
        b.pld_schedule = r.pld_schedule;
        Ok(b)
    }
}

impl Budget {
    /// A budget of (ε, δ) with nothing spent, over the default order grid, accounted by the
    /// default accountant (PLD).
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, PrivacyError> {
        Self::with_orders(epsilon, delta, OrderGrid::default())
    }

    /// A budget over a chosen order grid (for the RDP accountant, which is kept either way),
    /// accounted by the default accountant (PLD).
    pub fn with_orders(epsilon: f64, delta: f64, orders: OrderGrid) -> Result<Self, PrivacyError> {
        Self::with_accountant(epsilon, delta, orders, Accountant::default())
    }

    /// A budget whose ε is computed by the given accountant.
    pub fn with_accountant(
        epsilon: f64,
        delta: f64,
        orders: OrderGrid,
        kind: Accountant,
    ) -> Result<Self, PrivacyError> {
        Ok(Self {
            epsilon: check::positive("epsilon", epsilon)?,
            delta: check::delta(delta)?,
            accountant: RdpAccountant::new(orders),
            rounds: 0,
            mode: None,
            audience: Audience::Anyone,
            kind,
            pld_schedule: Vec::new(),
        })
    }

    /// The accountant the budget was set up with (its statements name the one actually used:
    /// RDP for distributed-mode releases).
    pub fn accountant_kind(&self) -> Accountant {
        self.kind
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

    /// The RDP accountant holding what has been spent (kept whatever the budget's accountant).
    pub fn accountant(&self) -> &RdpAccountant {
        &self.accountant
    }

    /// What has been spent, as ε at the budget's δ, with its audience (the narrowest of the
    /// rounds' audiences) and the accountant that computed it.
    pub fn spent(&self) -> PrivacyStatement {
        self.statement(
            &self.accountant,
            &self.pld_schedule,
            self.mode,
            self.audience,
        )
    }

    /// ε left before the budget is reached (never negative).
    pub fn remaining(&self) -> f64 {
        (self.epsilon - self.spent().epsilon).max(0.0)
    }

    /// Whether spending `next` would take ε past the budget.
    pub fn would_exceed(&self, next: &RoundRelease) -> Result<bool, PrivacyError> {
        Ok(self.after(next)?.0.epsilon > self.epsilon)
    }

    /// Spends one round, or refuses with [`PrivacyError::BudgetExceeded`] and records nothing.
    pub fn spend(&mut self, next: &RoundRelease) -> Result<PrivacyStatement, PrivacyError> {
        let (statement, accountant, schedule) = self.after(next)?;
        if statement.epsilon > self.epsilon {
            return Err(PrivacyError::BudgetExceeded {
                would_be: statement.epsilon,
                budget: self.epsilon,
                delta: self.delta,
            });
        }
        self.accountant = accountant;
        self.pld_schedule = schedule;
        self.rounds += 1;
        self.mode = Some(statement.mode);
        self.audience = statement.audience;
        Ok(statement)
    }

    /// The mode the budget's releases are stated in once `next` is spent: `next`'s own in a
    /// budget of its mode (or of none yet); distributed when local and distributed releases
    /// meet (see the type's docs: the local release's replace-one guarantee, sensitivity 2C,
    /// also bounds the zero-out pair, so the composition holds under zero-out neighbouring).
    /// Any other mixture is refused.
    fn check_mode(&self, next: &RoundRelease) -> Result<PrivacyMode, PrivacyError> {
        use PrivacyMode::{Distributed, Local};
        match (self.mode, next.mode) {
            (None, mode) => Ok(mode),
            (Some(held), mode) if held == mode => Ok(mode),
            (Some(Distributed), Local) | (Some(Local), Distributed) => Ok(Distributed),
            _ => Err(PrivacyError::Unsupported(
                "a budget accounts for releases of one privacy mode only (local releases may join distributed ones)",
            )),
        }
    }

    fn after(
        &self,
        next: &RoundRelease,
    ) -> Result<(PrivacyStatement, RdpAccountant, Vec<PldRounds>), PrivacyError> {
        let mode = self.check_mode(next)?;
        let (q, sigma) = next.effective()?;
        let mut accountant = self.accountant.clone();
        accountant.compose_subsampled_gaussian(q, sigma, 1)?;
        let schedule = match self.kind {
            Accountant::Pld => schedule_after(&self.pld_schedule, q, sigma),
            Accountant::Rdp => Vec::new(),
        };
        let audience = self.audience.narrowest(next.audience());
        let statement = self.statement(&accountant, &schedule, Some(mode), audience);
        Ok((statement, accountant, schedule))
    }

    fn statement(
        &self,
        accountant: &RdpAccountant,
        schedule: &[PldRounds],
        mode: Option<PrivacyMode>,
        audience: Audience,
    ) -> PrivacyStatement {
        let mode = mode.unwrap_or(PrivacyMode::Local);
        // δ was validated at construction, so the conversions cannot fail.
        match self.kind {
            Accountant::Pld if mode != PrivacyMode::Distributed => {
                // The schedule's entries were validated when they were spent or read back.
                let epsilon = pld_epsilon(schedule, self.delta)
                    .expect("the schedule is validated when recorded");
                PrivacyStatement {
                    epsilon,
                    delta: self.delta,
                    order: None,
                    mode,
                    audience,
                    accountant: Accountant::Pld,
                }
            }
            _ => {
                let e = accountant
                    .epsilon(self.delta)
                    .expect("budget δ is validated at construction");
                PrivacyStatement {
                    epsilon: e.epsilon,
                    delta: e.delta,
                    order: Some(e.order),
                    mode,
                    audience,
                    accountant: Accountant::Rdp,
                }
            }
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
    fn local_releases_join_distributed_ones_in_either_order_stated_by_rdp_in_distributed_mode() {
        let distributed = RoundRelease {
            mode: PrivacyMode::Distributed,
            noise_multiplier: 4.0,
            sampling_rate: 1.0,
        };
        let local = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: 4.0,
            sampling_rate: 1.0,
        };
        let mut a = Budget::new(50.0, 1e-6).unwrap();
        a.spend(&distributed).unwrap();
        let s = a.spend(&local).unwrap();
        let mut b = Budget::new(50.0, 1e-6).unwrap();
        b.spend(&local).unwrap();
        assert_eq!(b.spent().accountant, Accountant::Pld);
        assert!(!b.would_exceed(&distributed).unwrap());
        b.spend(&distributed).unwrap();
        for (statement, budget) in [(s, &a), (b.spent(), &b)] {
            assert_eq!(statement.mode, PrivacyMode::Distributed);
            assert_eq!(statement.accountant, Accountant::Rdp);
            assert_eq!(statement.audience, Audience::ReleaseObservers);
            assert_eq!(budget.rounds(), 2);
        }
        // Composition does not depend on the order: the same RDP curves added.
        assert_eq!(a.spent().epsilon, b.spent().epsilon);
        // The local release is composed with its effective σ/2 (sensitivity 2C): the pair
        // costs what two Gaussians of effective σ 4 and 2 cost.
        let mut rdp = RdpAccountant::new(OrderGrid::default());
        rdp.compose_subsampled_gaussian(1.0, 4.0, 1).unwrap();
        rdp.compose_subsampled_gaussian(1.0, 2.0, 1).unwrap();
        assert_eq!(a.spent().epsilon, rdp.epsilon(1e-6).unwrap().epsilon);
        // A stored mixed budget reads back the same.
        let back: Budget = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.spent(), a.spent());
        // Central releases still join neither.
        assert!(a.spend(&central(1.0)).is_err());
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
    fn a_pld_budget_affords_more_rounds_than_an_rdp_one_and_says_which_it_is() {
        let count = |kind: Accountant| {
            let mut b = Budget::with_accountant(2.0, 1e-5, OrderGrid::default(), kind).unwrap();
            while b.spend(&central(0.05)).is_ok() {}
            assert_eq!(b.spent().accountant, kind);
            assert!(b.spent().epsilon <= 2.0);
            b.rounds()
        };
        let (pld, rdp) = (count(Accountant::Pld), count(Accountant::Rdp));
        assert!(pld > rdp, "PLD {pld} rounds, RDP {rdp}");
        assert_eq!(
            Budget::new(1.0, 1e-5).unwrap().accountant_kind(),
            Accountant::Pld
        );
    }

    #[test]
    fn a_pld_budget_survives_a_round_trip_through_its_stored_form() {
        let mut b = Budget::new(5.0, 1e-5).unwrap();
        for q in [0.01, 0.01, 0.02] {
            b.spend(&central(q)).unwrap();
        }
        let text = serde_json::to_string(&b).unwrap();
        let back: Budget = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.spent(), b.spent());
        // A stored schedule with a bad entry is refused, not trusted.
        let bad = text.replace("\"noise_multiplier\":1.0", "\"noise_multiplier\":-1.0");
        assert_ne!(bad, text);
        assert!(serde_json::from_str::<Budget>(&bad).is_err());
    }

    #[test]
    fn a_budget_stored_before_pld_existed_stays_rdp() {
        let mut b =
            Budget::with_accountant(5.0, 1e-5, OrderGrid::default(), Accountant::Rdp).unwrap();
        b.spend(&central(0.01)).unwrap();
        let mut value: serde_json::Value = serde_json::to_value(&b).unwrap();
        let obj = value.as_object_mut().unwrap();
        obj.remove("kind");
        obj.remove("pld_schedule");
        let back: Budget = serde_json::from_value(value).unwrap();
        assert_eq!(back.accountant_kind(), Accountant::Rdp);
        assert_eq!(back.spent(), b.spent());
    }

    #[test]
    fn distributed_releases_fall_back_to_rdp_and_say_so() {
        let mut b = Budget::new(50.0, 1e-5).unwrap();
        let s = b
            .spend(&RoundRelease {
                mode: PrivacyMode::Distributed,
                noise_multiplier: 1.0,
                sampling_rate: 1.0,
            })
            .unwrap();
        assert_eq!(s.accountant, Accountant::Rdp);
        assert_eq!(b.spent().accountant, Accountant::Rdp);
    }

    #[test]
    fn budget_rejects_bad_limits() {
        assert!(Budget::new(0.0, 1e-5).is_err());
        assert!(Budget::new(1.0, 0.0).is_err());
        assert!(Budget::new(f64::NAN, 1e-5).is_err());
    }
}
