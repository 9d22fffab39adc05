//! Federated evaluation as a differentially private release.
//!
//! A device's evaluation of one shared model version (how the recommendations served its
//! user) is reduced to [`COORDINATES`] numbers, each in \[0, 1\] by its definition
//! ([`EvaluationRates::from_counts`]), so that one user's contribution is bounded whatever
//! the user did: negatives are capped by the items shown, the diversity of a list is in
//! \[0, 1\], an opt-out is 0 or 1, and so on. The vector is centred (each coordinate minus ½),
//! which bounds its L2 norm by C = √K / 2 ([`clip_norm`]), clipped to C with
//! [`crate::clip_l2`] (a no-op for a well-formed vector, kept as the guarantee), and released
//! by the device with the Gaussian mechanism ([`crate::GaussianMechanism::release_update`])
//! from the caller's sampler — in production the OS-seeded
//! [`crate::SecureSampler`].
//!
//! **Neighbouring relation and sensitivity.** Replace-one user, local DP: two users' centred
//! vectors differ by at most 1 in each coordinate, so by at most √K = 2C in L2 — the same
//! relation and sensitivity as a local-mode model update, so one evaluation release with
//! noise multiplier σ (noise std σC per coordinate) is accounted as one local release
//! ([`release`]): ρ = 1 / (2σ²) zCDP, α / (2σ²) RDP at order α (Mironov 2017, Prop. 7).
//!
//! **Post-processing.** The released coordinates are clamped to ±[`value_bound`] (½ plus
//! ten noise standard deviations), which changes nothing of the guarantee and lets the
//! coordinator refuse anything larger: a hostile device moves a sum by at most that bound.
//!
//! **What the coordinator computes.** It sums the released vectors of a model version (one
//! per device: the coordinator accepts one report per device and version) and reads ratios
//! of the noised sums ([`EvaluationSum::metric`]): each metric is a mean over the devices
//! that had something to say (e.g. the mean negative-feedback rate of the devices that were
//! shown lists), not a pooled ratio of counts.

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{
    GaussianMechanism, GaussianSampler, PrivacyError, PrivacyMode, Released, RoundRelease,
};

/// The coordinates of a released evaluation, in wire order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coordinate {
    /// 1 if at least one recommendation list was shown, else 0.
    ListsShown,
    /// The mean intra-list diversity of the lists shown (0 if none).
    IntraListDiversity,
    /// The share of the items shown that diversity injection placed (0 if none shown).
    InjectedShare,
    /// Positive feedback on recommended items ÷ items shown, at most 1.
    PositiveFeedbackRate,
    /// Negative feedback on recommended items ÷ items shown, at most 1.
    NegativeFeedbackRate,
    /// 1 if the device had a catalogue with topics, else 0.
    HasCatalogue,
    /// Distinct topics shown ÷ topics in the catalogue, at most 1 (0 without a catalogue).
    TopicCoverage,
    /// 1 if the user turned personalisation off in the window, else 0.
    PersonalisationOptOut,
    /// 1 if the device is in the `light` cohort and predicted at least one rating.
    LightEvaluated,
    /// Share of the light device's predictions within 0.5 of the rating (0 otherwise).
    LightAccuracy,
    /// 1 if the device is in the `heavy` cohort and predicted at least one rating.
    HeavyEvaluated,
    /// Share of the heavy device's predictions within 0.5 of the rating (0 otherwise).
    HeavyAccuracy,
}

/// Every coordinate, in wire order.
pub const ALL: [Coordinate; COORDINATES] = [
    Coordinate::ListsShown,
    Coordinate::IntraListDiversity,
    Coordinate::InjectedShare,
    Coordinate::PositiveFeedbackRate,
    Coordinate::NegativeFeedbackRate,
    Coordinate::HasCatalogue,
    Coordinate::TopicCoverage,
    Coordinate::PersonalisationOptOut,
    Coordinate::LightEvaluated,
    Coordinate::LightAccuracy,
    Coordinate::HeavyEvaluated,
    Coordinate::HeavyAccuracy,
];

/// K, the number of released coordinates.
pub const COORDINATES: usize = 12;

/// The noise multiplier the coordinator asks for by default: noise std σC = 4·√12/2 ≈ 6.9
/// per coordinate, so a mean over n devices has noise of standard deviation ≈ 6.9/√n
/// (±0.022 for 100,000 devices): local DP needs large populations.
pub const DEFAULT_NOISE_MULTIPLIER: f64 = 4.0;

/// The smallest noise multiplier a device accepts for an evaluation release.
pub const MIN_NOISE_MULTIPLIER: f64 = 1.0;

impl Coordinate {
    /// Its name in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ListsShown => "lists_shown",
            Self::IntraListDiversity => "intra_list_diversity",
            Self::InjectedShare => "injected_share",
            Self::PositiveFeedbackRate => "positive_feedback_rate",
            Self::NegativeFeedbackRate => "negative_feedback_rate",
            Self::HasCatalogue => "has_catalogue",
            Self::TopicCoverage => "topic_coverage",
            Self::PersonalisationOptOut => "personalisation_opt_out",
            Self::LightEvaluated => "light_evaluated",
            Self::LightAccuracy => "light_accuracy",
            Self::HeavyEvaluated => "heavy_evaluated",
            Self::HeavyAccuracy => "heavy_accuracy",
        }
    }

    /// Its index in the released vector.
    pub fn index(self) -> usize {
        ALL.iter()
            .position(|c| *c == self)
            .expect("every coordinate is listed")
    }
}

/// A device's raw evaluation counts of one window (they never leave the device).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvaluationCounts {
    /// Recommendation lists shown.
    pub lists_shown: u64,
    /// Items shown over all lists.
    pub items_shown: u64,
    /// Of those, placed by diversity injection.
    pub injected_shown: u64,
    /// Sum over lists of each list's intra-list diversity (each in \[0, 1\]).
    pub intra_list_diversity_sum: f64,
    /// Distinct topics among the items shown.
    pub distinct_topics_shown: u64,
    /// Topics in the device's catalogue.
    pub catalogue_topics: u64,
    /// Thumbs up and saves on recommended items.
    pub positive_feedback: u64,
    /// Thumbs down and dismissals of recommended items.
    pub negative_feedback: u64,
    /// Whether the user turned personalisation off in the window.
    pub personalisation_opt_out: bool,
    /// Held-out ratings predicted.
    pub predictions: u64,
    /// Of those, within 0.5 of the rating.
    pub predictions_within_half: u64,
    /// Whether the device is in the `heavy` activity cohort (else `light`).
    pub heavy: bool,
}

/// The K numbers of one device's evaluation, each in \[0, 1\].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvaluationRates([f64; COORDINATES]);

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part.min(whole) as f64 / whole as f64
    }
}

impl EvaluationRates {
    /// Bounds each count by its definition (injected, positives and negatives ≤ items shown,
    /// distinct topics ≤ catalogue topics, hits ≤ predictions, diversity per list in \[0, 1\])
    /// and maps them to rates in \[0, 1\]. A non-finite diversity sum counts as 0.
    pub fn from_counts(c: &EvaluationCounts) -> Self {
        let mut v = [0.0; COORDINATES];
        let mut set = |k: Coordinate, x: f64| v[k.index()] = x.clamp(0.0, 1.0);
        let shown_any = c.lists_shown > 0;
        set(Coordinate::ListsShown, f64::from(u8::from(shown_any)));
        let diversity = if shown_any && c.intra_list_diversity_sum.is_finite() {
            c.intra_list_diversity_sum / c.lists_shown as f64
        } else {
            0.0
        };
        set(Coordinate::IntraListDiversity, diversity);
        set(
            Coordinate::InjectedShare,
            share(c.injected_shown, c.items_shown),
        );
        set(
            Coordinate::PositiveFeedbackRate,
            share(c.positive_feedback, c.items_shown),
        );
        set(
            Coordinate::NegativeFeedbackRate,
            share(c.negative_feedback, c.items_shown),
        );
        set(
            Coordinate::HasCatalogue,
            f64::from(u8::from(c.catalogue_topics > 0)),
        );
        set(
            Coordinate::TopicCoverage,
            share(c.distinct_topics_shown, c.catalogue_topics),
        );
        set(
            Coordinate::PersonalisationOptOut,
            f64::from(u8::from(c.personalisation_opt_out)),
        );
        let evaluated = f64::from(u8::from(c.predictions > 0));
        let accuracy = share(c.predictions_within_half, c.predictions);
        let (flag, acc) = if c.heavy {
            (Coordinate::HeavyEvaluated, Coordinate::HeavyAccuracy)
        } else {
            (Coordinate::LightEvaluated, Coordinate::LightAccuracy)
        };
        set(flag, evaluated);
        set(acc, accuracy);
        Self(v)
    }

    /// The rates, in wire order.
    pub fn values(&self) -> &[f64; COORDINATES] {
        &self.0
    }
}

/// C = √K / 2: the L2 norm bound of a centred rate vector.
pub fn clip_norm() -> f64 {
    (COORDINATES as f64).sqrt() / 2.0
}

/// The largest magnitude a released coordinate may have: ½ + 10σC. The device clamps its
/// noised values to it (post-processing); the coordinator refuses anything beyond it.
pub fn value_bound(noise_multiplier: f64) -> f64 {
    0.5 + 10.0 * noise_multiplier * clip_norm()
}

/// What the on-device accountant records for one evaluation release with noise multiplier
/// σ: a local release (replace-one, sensitivity 2C, noise σC), q = 1, in every privacy mode
/// of the run evaluated. On a device that also releases distributed-mode shares it joins
/// them in one budget stated under zero-out neighbouring ([`crate::Budget`]): the
/// replace-one bound covers the zero-out pair too.
pub fn release(noise_multiplier: f64) -> RoundRelease {
    RoundRelease {
        mode: PrivacyMode::Local,
        noise_multiplier,
        sampling_rate: 1.0,
    }
}

/// Releases `rates`: centre, clip to C, add N(0, (σC)²) to each coordinate from `sampler`,
/// clamp to ±[`value_bound`]. Refused unless σ ≥ [`MIN_NOISE_MULTIPLIER`].
pub fn release_rates<S: GaussianSampler>(
    rates: &EvaluationRates,
    noise_multiplier: f64,
    sampler: &mut S,
) -> Result<Released<S::Provenance>, PrivacyError> {
    let sigma = check::positive("noise_multiplier", noise_multiplier)?;
    if sigma < MIN_NOISE_MULTIPLIER {
        return Err(PrivacyError::invalid(
            "noise_multiplier",
            sigma,
            "an evaluation release needs a noise multiplier of at least 1",
        ));
    }
    let centred: Vec<f64> = rates.values().iter().map(|x| x - 0.5).collect();
    let clipped = crate::clip_l2(centred, clip_norm())?;
    let bound = value_bound(sigma);
    let released = GaussianMechanism::new(sigma, clip_norm())?.release_update(clipped, sampler)?;
    Ok(released.map_values(|x| x.clamp(-bound, bound)))
}

/// Why a released evaluation was refused by [`EvaluationSum::add`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidRelease {
    /// The field (`values`, `values[i]`).
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The sum of the released vectors of one model version, and how many there are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSum {
    /// Reports summed (one per device).
    pub reports: u64,
    /// The sums of the released, centred coordinates.
    pub sums: [f64; COORDINATES],
}

impl EvaluationSum {
    /// Checks one released vector (K finite values, each within ±[`value_bound`] of σ) and
    /// returns it, so that a caller can validate before it stores anything.
    pub fn check(
        values: &[f64],
        noise_multiplier: f64,
    ) -> Result<[f64; COORDINATES], InvalidRelease> {
        if values.len() != COORDINATES {
            return Err(InvalidRelease {
                field: "values".into(),
                reason: format!("must have {COORDINATES} values, got {}", values.len()),
            });
        }
        let bound = value_bound(noise_multiplier);
        let mut out = [0.0; COORDINATES];
        for (i, (&v, slot)) in values.iter().zip(&mut out).enumerate() {
            if !(v.is_finite() && v.abs() <= bound) {
                return Err(InvalidRelease {
                    field: format!("values[{i}]"),
                    reason: format!("must be a finite number within ±{bound:.3}"),
                });
            }
            *slot = v;
        }
        Ok(out)
    }

    /// Adds one checked vector.
    pub fn add(&mut self, values: &[f64; COORDINATES]) {
        self.reports += 1;
        for (s, v) in self.sums.iter_mut().zip(values) {
            *s += v;
        }
    }

    /// The noised sum of coordinate `k` over the devices, de-centred (Σ rate + noise).
    pub fn total(&self, k: Coordinate) -> f64 {
        self.sums[k.index()] + 0.5 * self.reports as f64
    }

    /// The ratio of two noised totals, clamped to \[0, 1\]; `None` when the denominator's
    /// noised total is below 1 (fewer than about one device's worth).
    pub fn ratio(&self, numerator: Coordinate, denominator: Option<Coordinate>) -> Option<f64> {
        let den = match denominator {
            Some(d) => self.total(d),
            None => self.reports as f64,
        };
        (den >= 1.0).then(|| (self.total(numerator) / den).clamp(0.0, 1.0))
    }
}

/// The noise standard deviation of one released coordinate: σC.
pub fn noise_std(noise_multiplier: f64) -> Result<f64, PrivacyError> {
    Ok(check::positive("noise_multiplier", noise_multiplier)? * clip_norm())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimulationSampler;

    #[test]
    fn each_count_is_bounded_by_its_definition_whatever_the_device_claims() {
        let r = EvaluationRates::from_counts(&EvaluationCounts {
            lists_shown: 1,
            items_shown: 3,
            injected_shown: u64::MAX,
            intra_list_diversity_sum: 1e300,
            distinct_topics_shown: 9,
            catalogue_topics: 4,
            positive_feedback: 7,
            negative_feedback: u64::MAX,
            personalisation_opt_out: true,
            predictions: 2,
            predictions_within_half: 50,
            heavy: true,
        });
        assert!(r.values().iter().all(|v| (0.0..=1.0).contains(v)), "{r:?}");
        let centred: f64 = r
            .values()
            .iter()
            .map(|x| (x - 0.5).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(centred <= clip_norm() + 1e-12);
        assert_eq!(r.values()[Coordinate::LightEvaluated.index()], 0.0);
        assert_eq!(r.values()[Coordinate::HeavyAccuracy.index()], 1.0);
    }

    #[test]
    fn a_release_is_noised_and_clamped_and_the_sum_refuses_what_a_device_could_not_send() {
        let rates = EvaluationRates::from_counts(&EvaluationCounts::default());
        let mut sampler = SimulationSampler::seed_from_u64(3);
        let r = release_rates(&rates, 2.0, &mut sampler).unwrap();
        assert_eq!(r.values().len(), COORDINATES);
        assert!(r.values().iter().any(|v| (v + 0.5).abs() > 1e-9), "noised");
        let checked = EvaluationSum::check(r.values(), 2.0).unwrap();
        let mut sum = EvaluationSum::default();
        sum.add(&checked);
        assert_eq!(sum.reports, 1);
        let mut huge = r.values().to_vec();
        huge[4] = 1e300;
        let err = EvaluationSum::check(&huge, 2.0).unwrap_err();
        assert_eq!(err.field, "values[4]");
        assert!(EvaluationSum::check(&[f64::NAN; COORDINATES], 2.0).is_err());
        assert!(EvaluationSum::check(&[0.0; 3], 2.0).is_err());
        assert!(release_rates(&rates, 0.5, &mut sampler).is_err());
    }

    #[test]
    fn the_mean_of_many_releases_recovers_the_rates() {
        let rates = EvaluationRates::from_counts(&EvaluationCounts {
            lists_shown: 4,
            items_shown: 40,
            negative_feedback: 10,
            ..EvaluationCounts::default()
        });
        let mut sampler = SimulationSampler::seed_from_u64(9);
        let mut sum = EvaluationSum::default();
        for _ in 0..20_000 {
            let r = release_rates(&rates, 1.0, &mut sampler).unwrap();
            sum.add(&EvaluationSum::check(r.values(), 1.0).unwrap());
        }
        let rate = sum
            .ratio(
                Coordinate::NegativeFeedbackRate,
                Some(Coordinate::ListsShown),
            )
            .unwrap();
        assert!((rate - 0.25).abs() < 0.03, "{rate}");
    }
}
