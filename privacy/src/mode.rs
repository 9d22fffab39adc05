//! The three privacy modes of fedpref, their neighbouring relations and sensitivities, and
//! the audience each reported ε holds against.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::pld::{Accountant, DEFAULT_VALUE_DISCRETIZATION_INTERVAL, PldAccountant};
use crate::{OrderGrid, PrivacyError, RdpAccountant};

/// Which pairs of datasets the guarantee distinguishes. The unit of privacy is always **one
/// user** (one device's whole local dataset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Neighbouring {
    /// One user's data added to or removed from the population.
    AddRemoveOne,
    /// One user's data replaced by anything else.
    ReplaceOne,
    /// One user's contribution replaced by zero while the user's device still takes part
    /// (and so still adds its share of distributed noise).
    ZeroOut,
}

/// Who adds the noise, and so what is protected from whom. See DESIGN.md, "Privacy model".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// **Local DP.** Each device clips its update to L2 norm C and adds N(0, (σC)²) to every
    /// coordinate before upload.
    ///
    /// - Neighbouring: replace-one (the same device uploads either way; its data differs).
    /// - Sensitivity: 2C (two clipped vectors differ by at most 2C), so the effective noise
    ///   multiplier is σ/2 and each upload is (α, α/(2(σ/2)²))-RDP.
    /// - Audience: anyone, the coordinator included.
    /// - No amplification by sampling: the coordinator sees who uploaded, so each upload is
    ///   composed at q = 1, and the rounds are the device's own uploads.
    Local,
    /// **Central DP.** Devices upload clipped updates; the trusted coordinator adds
    /// N(0, (σC)²) once to the sum.
    ///
    /// - Neighbouring: add/remove-one user.
    /// - Sensitivity: C, so the effective noise multiplier is σ.
    /// - Amplified by Poisson sampling with rate q (Mironov, Talwar, Zhang 2019) against
    ///   observers of the released models who do not learn who was sampled; composed at
    ///   q = 1 for observers who do.
    /// - No protection against the coordinator itself, which sees raw clipped updates.
    Central,
    /// **Distributed DP.** Each device in the cohort adds a share of the noise and secure
    /// aggregation (the `fedpref-secagg` crate) shows the coordinator only the noised sum.
    /// The exact accountant of the distributed discrete Gaussian, with its rounding,
    /// modular-clipping and honest-device conditions, is
    /// [`crate::distributed::DistributedDiscreteGaussian`]; the coordinator does not run this
    /// mode yet.
    ///
    /// The statement here treats it as [`PrivacyMode::Central`] (sensitivity C, effective σ),
    /// which holds under **zero-out** neighbouring (the target's device still takes part and
    /// contributes 0, so its own share of noise is still in the sum) **and** when the shares
    /// of the honest devices that survive, excluding the target's, add up to at least
    /// (σC)² of variance: shares must be sized from a guaranteed minimum of such devices
    /// (e.g. (σC)²/(m_min − 1) each), not from the nominal cohort. Under add/remove
    /// neighbouring, with dropouts, or with devices colluding with the server, the noise is
    /// smaller and this statement does not hold. A sum of discrete Gaussians is not exactly a
    /// discrete Gaussian (Kairouz, Liu, Steinke 2021); at fedpref's lattice scale the
    /// difference is negligible but real. The coordinator knows the cohort, so no
    /// amplification by sampling holds against it.
    Distributed,
}

impl PrivacyMode {
    /// The neighbouring relation the mode's guarantee is stated for.
    pub fn neighbouring(self) -> Neighbouring {
        match self {
            Self::Local => Neighbouring::ReplaceOne,
            Self::Central => Neighbouring::AddRemoveOne,
            Self::Distributed => Neighbouring::ZeroOut,
        }
    }

    /// L2 sensitivity in units of the clip norm C.
    pub fn sensitivity(self) -> f64 {
        match self {
            Self::Local => 2.0,
            Self::Central | Self::Distributed => 1.0,
        }
    }

    /// The effective noise multiplier: configured σ over the sensitivity in units of C.
    pub fn effective_noise_multiplier(self, noise_multiplier: f64) -> f64 {
        noise_multiplier / self.sensitivity()
    }

    /// Whether Poisson sampling by the coordinator may be claimed as amplification.
    pub fn amplifies_by_sampling(self) -> bool {
        !matches!(self, Self::Local)
    }

    /// The audience an ε computed with sampling rate q holds against.
    pub fn audience(self, sampling_rate: f64) -> Audience {
        match self {
            Self::Local => Audience::Anyone,
            Self::Central | Self::Distributed if sampling_rate < 1.0 => {
                Audience::ObserversUnawareOfParticipation
            }
            Self::Central | Self::Distributed => Audience::ReleaseObservers,
        }
    }

    /// The mode's name as the CLI, the manifest and JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

impl std::str::FromStr for PrivacyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "central" => Ok(Self::Central),
            "distributed" => Ok(Self::Distributed),
            other => Err(format!(
                "unknown privacy mode '{other}' (expected local, central or distributed)"
            )),
        }
    }
}

impl std::fmt::Display for PrivacyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Against whom an ε holds. Ordered from the widest audience to the narrowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Anyone who sees what left the device, the coordinator included (local DP; no
    /// amplification claimed).
    Anyone,
    /// Anyone who sees the released models (or, in distributed mode, the noised sums),
    /// including observers who know which devices took part; no amplification claimed.
    ReleaseObservers,
    /// Observers of the released models who do **not** learn which devices were sampled:
    /// the only audience for which amplification by Poisson sampling holds. It also assumes
    /// the coordinator really sampled each eligible device independently with rate q.
    ObserversUnawareOfParticipation,
}

impl Audience {
    /// The audience of a composition of two statements: the narrower of the two.
    pub fn narrowest(self, other: Self) -> Self {
        self.max(other)
    }

    /// A short identifier for JSON and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anyone => "anyone",
            Self::ReleaseObservers => "release_observers",
            Self::ObserversUnawareOfParticipation => "observers_unaware_of_participation",
        }
    }

    /// One sentence for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Anyone => {
                "holds against anyone who sees what left the device, the coordinator included"
            }
            Self::ReleaseObservers => {
                "holds against anyone who sees the released models, even knowing who took part"
            }
            Self::ObserversUnawareOfParticipation => {
                "holds against observers of the released models who do not learn who was sampled, \
                 and only if devices really were Poisson-sampled with the stated rate"
            }
        }
    }
}

/// One round's release as the accountant sees it: the mode, the configured σ and the
/// sampling rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRelease {
    /// The privacy mode.
    pub mode: PrivacyMode,
    /// The configured noise multiplier σ (noise std = σ·C).
    pub noise_multiplier: f64,
    /// The Poisson sampling rate q; must be 1 in local mode.
    pub sampling_rate: f64,
}

impl RoundRelease {
    /// Validates the release and returns (q, effective σ) for the accountant.
    pub fn effective(&self) -> Result<(f64, f64), PrivacyError> {
        let sigma = check::positive("noise_multiplier", self.noise_multiplier)?;
        let q = check::sampling_rate(self.sampling_rate)?;
        if self.mode == PrivacyMode::Local && q != 1.0 {
            return Err(PrivacyError::Unsupported(
                "in local mode the sampling rate must be 1: the coordinator sees who uploaded, \
                 so sampling does not amplify what it sees; count the device's own uploads as the rounds",
            ));
        }
        Ok((q, self.mode.effective_noise_multiplier(sigma)))
    }

    /// The audience the release's ε holds against.
    pub fn audience(&self) -> Audience {
        self.mode.audience(self.sampling_rate)
    }
}

/// An ε (or δ) with everything needed to read it: the accountant, the mode, the audience
/// and (for RDP) the order.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyStatement {
    /// ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The Rényi order at which the conversion was tightest; `None` for the PLD accountant,
    /// which has no order.
    pub order: Option<f64>,
    /// The privacy mode the releases were made in.
    pub mode: PrivacyMode,
    /// Against whom the statement holds.
    pub audience: Audience,
    /// Which accountant computed it. Statements stored before the PLD accountant existed
    /// were RDP's.
    #[serde(default = "legacy_accountant")]
    pub accountant: Accountant,
}

fn legacy_accountant() -> Accountant {
    Accountant::Rdp
}

/// ε after `rounds` identical releases, at δ.
pub fn epsilon_after(
    release: &RoundRelease,
    rounds: u64,
    delta: f64,
    orders: &OrderGrid,
) -> Result<PrivacyStatement, PrivacyError> {
    let acc = composed(release, rounds, orders)?;
    let e = acc.epsilon(delta)?;
    Ok(PrivacyStatement {
        epsilon: e.epsilon,
        delta: e.delta,
        order: Some(e.order),
        mode: release.mode,
        audience: release.audience(),
        accountant: Accountant::Rdp,
    })
}

/// δ after `rounds` identical releases, at ε.
pub fn delta_after(
    release: &RoundRelease,
    rounds: u64,
    epsilon: f64,
    orders: &OrderGrid,
) -> Result<PrivacyStatement, PrivacyError> {
    let acc = composed(release, rounds, orders)?;
    let d = acc.delta(epsilon)?;
    Ok(PrivacyStatement {
        epsilon: d.epsilon,
        delta: d.delta,
        order: Some(d.order),
        mode: release.mode,
        audience: release.audience(),
        accountant: Accountant::Rdp,
    })
}

/// The smallest configured σ for which `rounds` releases in `mode` with rate q stay within
/// (target ε, δ). In local mode this is twice the effective σ (sensitivity 2C).
pub fn calibrate(
    mode: PrivacyMode,
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    rounds: u64,
    orders: &OrderGrid,
) -> Result<(f64, PrivacyStatement), PrivacyError> {
    // Validate q against the mode before searching.
    let probe = RoundRelease {
        mode,
        noise_multiplier: 1.0,
        sampling_rate,
    };
    probe.effective()?;
    let c =
        crate::calibrate_noise_multiplier(target_epsilon, delta, sampling_rate, rounds, orders)?;
    let sigma = c.noise_multiplier * mode.sensitivity();
    Ok((
        sigma,
        PrivacyStatement {
            epsilon: c.epsilon,
            delta,
            order: Some(c.order),
            mode,
            audience: probe.audience(),
            accountant: Accountant::Rdp,
        },
    ))
}

/// ε after `rounds` identical releases, at δ, by the chosen accountant. With
/// [`Accountant::Pld`] the releases are the Poisson-subsampled Gaussian under add/remove-one
/// (central and distributed modes, at the effective σ), discretised on the default grid, or,
/// at q = 1 (local mode's Gaussian of sensitivity 2C included), the Gaussian, whose
/// composition is exact ([`crate::pld::gaussian_epsilon`]); with [`Accountant::Rdp`] this is
/// [`epsilon_after`].
pub fn epsilon_after_with(
    accountant: Accountant,
    release: &RoundRelease,
    rounds: u64,
    delta: f64,
    orders: &OrderGrid,
) -> Result<PrivacyStatement, PrivacyError> {
    match accountant {
        Accountant::Rdp => epsilon_after(release, rounds, delta, orders),
        Accountant::Pld => {
            let delta = crate::error::check::delta(delta)?;
            let epsilon = match exact_gaussian(release, rounds)? {
                Some(sigma) => crate::pld::gaussian_epsilon(sigma, delta),
                None => composed_pld(release, rounds)?.epsilon(delta)?.epsilon,
            };
            Ok(pld_statement(release, epsilon, delta))
        }
    }
}

/// δ after `rounds` identical releases, at ε, by the chosen accountant.
pub fn delta_after_with(
    accountant: Accountant,
    release: &RoundRelease,
    rounds: u64,
    epsilon: f64,
    orders: &OrderGrid,
) -> Result<PrivacyStatement, PrivacyError> {
    match accountant {
        Accountant::Rdp => delta_after(release, rounds, epsilon, orders),
        Accountant::Pld => {
            let epsilon = crate::error::check::epsilon(epsilon)?;
            let delta = match exact_gaussian(release, rounds)? {
                Some(sigma) => crate::pld::gaussian_delta(sigma, epsilon),
                None => composed_pld(release, rounds)?.delta(epsilon)?.delta,
            };
            Ok(pld_statement(release, epsilon, delta))
        }
    }
}

/// The smallest configured σ for which `rounds` releases stay within (target ε, δ), by the
/// chosen accountant (PLD: to a relative 1e-6).
pub fn calibrate_with(
    accountant: Accountant,
    mode: PrivacyMode,
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    rounds: u64,
    orders: &OrderGrid,
) -> Result<(f64, PrivacyStatement), PrivacyError> {
    match accountant {
        Accountant::Rdp => calibrate(mode, target_epsilon, delta, sampling_rate, rounds, orders),
        Accountant::Pld => {
            let probe = RoundRelease {
                mode,
                noise_multiplier: 1.0,
                sampling_rate,
            };
            probe.effective()?;
            let c = crate::pld::calibrate_noise_multiplier_pld(
                target_epsilon,
                delta,
                sampling_rate,
                rounds,
                DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
            )?;
            let sigma = c.noise_multiplier * mode.sensitivity();
            let release = RoundRelease {
                noise_multiplier: sigma,
                ..probe
            };
            Ok((sigma, pld_statement(&release, c.epsilon, delta)))
        }
    }
}

fn pld_statement(release: &RoundRelease, epsilon: f64, delta: f64) -> PrivacyStatement {
    PrivacyStatement {
        epsilon,
        delta,
        order: None,
        mode: release.mode,
        audience: release.audience(),
        accountant: Accountant::Pld,
    }
}

/// For unsampled releases, the effective σ of their exact composition (one Gaussian).
fn exact_gaussian(release: &RoundRelease, rounds: u64) -> Result<Option<f64>, PrivacyError> {
    if rounds == 0 {
        return Err(PrivacyError::invalid("rounds", 0.0, "must be at least 1"));
    }
    let (q, sigma) = release.effective()?;
    Ok((q == 1.0).then(|| crate::pld::composed_gaussian_noise_multiplier([(sigma, rounds)])))
}

fn composed_pld(release: &RoundRelease, rounds: u64) -> Result<PldAccountant, PrivacyError> {
    if rounds == 0 {
        return Err(PrivacyError::invalid("rounds", 0.0, "must be at least 1"));
    }
    let (q, sigma) = release.effective()?;
    let mut acc = PldAccountant::default();
    acc.compose_subsampled_gaussian(q, sigma, rounds)?;
    Ok(acc)
}

fn composed(
    release: &RoundRelease,
    rounds: u64,
    orders: &OrderGrid,
) -> Result<RdpAccountant, PrivacyError> {
    if rounds == 0 {
        return Err(PrivacyError::invalid("rounds", 0.0, "must be at least 1"));
    }
    let (q, sigma) = release.effective()?;
    let mut acc = RdpAccountant::new(orders.clone());
    acc.compose_subsampled_gaussian(q, sigma, rounds)?;
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_mode_halves_sigma_and_refuses_sampling() {
        let grid = OrderGrid::default();
        let local = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: 2.0,
            sampling_rate: 1.0,
        };
        let central = RoundRelease {
            mode: PrivacyMode::Central,
            noise_multiplier: 1.0,
            sampling_rate: 1.0,
        };
        let a = epsilon_after(&local, 10, 1e-5, &grid).unwrap();
        let b = epsilon_after(&central, 10, 1e-5, &grid).unwrap();
        assert_eq!(a.epsilon, b.epsilon);
        assert_eq!(a.audience, Audience::Anyone);
        assert_eq!(b.audience, Audience::ReleaseObservers);
        let sampled = RoundRelease {
            sampling_rate: 0.1,
            ..local
        };
        let err = epsilon_after(&sampled, 10, 1e-5, &grid).unwrap_err();
        assert!(
            err.to_string().contains("sampling does not amplify"),
            "{err}"
        );
    }

    #[test]
    fn sampled_central_rounds_hold_only_for_observers_unaware_of_participation() {
        let r = RoundRelease {
            mode: PrivacyMode::Central,
            noise_multiplier: 1.0,
            sampling_rate: 0.01,
        };
        assert_eq!(r.audience(), Audience::ObserversUnawareOfParticipation);
        assert_eq!(
            Audience::Anyone.narrowest(Audience::ObserversUnawareOfParticipation),
            Audience::ObserversUnawareOfParticipation
        );
    }

    #[test]
    fn pld_statements_name_their_accountant_and_are_below_rdp() {
        let grid = OrderGrid::default();
        for release in [
            RoundRelease {
                mode: PrivacyMode::Local,
                noise_multiplier: 4.0,
                sampling_rate: 1.0,
            },
            RoundRelease {
                mode: PrivacyMode::Central,
                noise_multiplier: 1.0,
                sampling_rate: 0.02,
            },
        ] {
            let pld = epsilon_after_with(Accountant::Pld, &release, 50, 1e-6, &grid).unwrap();
            let rdp = epsilon_after_with(Accountant::Rdp, &release, 50, 1e-6, &grid).unwrap();
            assert_eq!(pld.accountant, Accountant::Pld);
            assert_eq!(rdp.accountant, Accountant::Rdp);
            assert!(pld.order.is_none() && rdp.order.unwrap() > 1.0);
            assert!(
                pld.epsilon < rdp.epsilon,
                "{} vs {}",
                pld.epsilon,
                rdp.epsilon
            );
            assert_eq!(pld.audience, rdp.audience);
            let d = delta_after_with(Accountant::Pld, &release, 50, pld.epsilon, &grid).unwrap();
            assert!((d.delta - 1e-6).abs() < 1e-9, "{}", d.delta);
        }
        let sampled_local = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: 4.0,
            sampling_rate: 0.5,
        };
        assert!(epsilon_after_with(Accountant::Pld, &sampled_local, 5, 1e-6, &grid).is_err());
    }

    #[test]
    fn pld_calibration_needs_less_noise_than_rdp_and_meets_the_target() {
        let grid = OrderGrid::default();
        let (pld, s) = calibrate_with(
            Accountant::Pld,
            PrivacyMode::Local,
            3.0,
            1e-5,
            1.0,
            10,
            &grid,
        )
        .unwrap();
        let (rdp, _) = calibrate_with(
            Accountant::Rdp,
            PrivacyMode::Local,
            3.0,
            1e-5,
            1.0,
            10,
            &grid,
        )
        .unwrap();
        assert!(pld < rdp, "{pld} vs {rdp}");
        assert!(s.epsilon <= 3.0 && s.accountant == Accountant::Pld);
        let release = RoundRelease {
            mode: PrivacyMode::Local,
            noise_multiplier: pld,
            sampling_rate: 1.0,
        };
        let check = epsilon_after_with(Accountant::Pld, &release, 10, 1e-5, &grid).unwrap();
        assert!(check.epsilon <= 3.0);
    }

    #[test]
    fn a_stored_statement_without_an_accountant_reads_as_rdp() {
        let text = r#"{"epsilon":1.0,"delta":1e-5,"order":8.0,"mode":"central","audience":"release_observers"}"#;
        let s: PrivacyStatement = serde_json::from_str(text).unwrap();
        assert_eq!(s.accountant, Accountant::Rdp);
    }

    #[test]
    fn local_calibration_returns_twice_the_effective_sigma() {
        let grid = OrderGrid::default();
        let (local, _) = calibrate(PrivacyMode::Local, 3.0, 1e-5, 1.0, 10, &grid).unwrap();
        let (central, _) = calibrate(PrivacyMode::Central, 3.0, 1e-5, 1.0, 10, &grid).unwrap();
        assert!((local - 2.0 * central).abs() < 1e-12 * local);
    }
}
