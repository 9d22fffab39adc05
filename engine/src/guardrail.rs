//! Guardrail metrics: what the coordinator derives from the devices' released (noised)
//! federated-evaluation rates, and when a manifest threshold is crossed.
//!
//! Pure functions over an [`EvaluationSum`] (the store's sum of one model version's
//! releases, one per device): no device's release is ever looked at on its own. Every metric
//! is a ratio of **noised** sums ([`EvaluationSum::ratio`]), a mean over the devices that
//! had something to say (e.g. the negative-feedback rate is the mean, over devices that were
//! shown lists, of each device's rate), clamped to [0, 1]. A guardrail is evaluated only
//! once at least its `minimum_reporting_devices` distinct devices' releases are summed
//! (each device reports at most once per model version), and the report shows a version's
//! metrics only from [`MINIMUM_DEVICES_SHOWN`] devices.

use std::collections::BTreeMap;

use fedpref_privacy::evaluation::{Coordinate, EvaluationSum};
use serde::Serialize;

use crate::manifest::{GuardrailMetric, GuardrailMetricKind};

/// The fewest devices whose releases a version's metrics are shown for (in the report and
/// the admin API). Below it the report shows the number of devices only.
pub const MINIMUM_DEVICES_SHOWN: u64 = 20;

/// The guardrail metrics of one model version, from its noised sums.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionMetrics {
    /// The model version the releases evaluate.
    pub model_version: u64,
    /// Releases summed (one per device).
    pub reports: u64,
    /// Distinct devices whose releases are summed (equal to `reports`: one per device).
    pub reporting_devices: u64,
    /// Each metric's value from the noised sums; absent where its denominator's noised sum
    /// is below one device's worth (nothing shown, fewer than two cohorts evaluated, …).
    pub values: BTreeMap<GuardrailMetricKind, f64>,
}

impl VersionMetrics {
    /// Computes every metric of `version` from its noised sum.
    pub fn compute(version: u64, sum: &EvaluationSum) -> Self {
        use Coordinate as C;
        let mut values = BTreeMap::new();
        let mut put = |k, v: Option<f64>| {
            if let Some(v) = v {
                values.insert(k, v);
            }
        };
        put(
            GuardrailMetricKind::IntraListDiversity,
            sum.ratio(C::IntraListDiversity, Some(C::ListsShown)),
        );
        put(
            GuardrailMetricKind::TopicCoverage,
            sum.ratio(C::TopicCoverage, Some(C::HasCatalogue)),
        );
        put(
            GuardrailMetricKind::NegativeFeedbackRate,
            sum.ratio(C::NegativeFeedbackRate, Some(C::ListsShown)),
        );
        put(
            GuardrailMetricKind::OptOutRate,
            sum.ratio(C::PersonalisationOptOut, None),
        );
        put(
            GuardrailMetricKind::CohortAccuracyGap,
            sum.ratio(C::LightAccuracy, Some(C::LightEvaluated))
                .zip(sum.ratio(C::HeavyAccuracy, Some(C::HeavyEvaluated)))
                .map(|(light, heavy)| (light - heavy).abs()),
        );
        put(
            GuardrailMetricKind::InjectedShare,
            sum.ratio(C::InjectedShare, Some(C::ListsShown)),
        );
        Self {
            model_version: version,
            reports: sum.reports,
            reporting_devices: sum.reports,
            values,
        }
    }

    /// The guardrails of `guardrails` this version's noised metrics cross, with their values.
    /// A guardrail is not evaluated below its minimum number of reporting devices.
    pub fn crossed<'a>(
        &self,
        guardrails: &'a [GuardrailMetric],
    ) -> Vec<(&'a GuardrailMetric, f64)> {
        guardrails
            .iter()
            .filter(|g| self.reporting_devices >= g.minimum_reporting_devices.max(1))
            .filter_map(|g| {
                let v = *self.values.get(&g.metric)?;
                g.direction.crossed(v, g.threshold).then_some((g, v))
            })
            .collect()
    }

    /// The version's metrics as the report shows them: all of them from
    /// [`MINIMUM_DEVICES_SHOWN`] devices, none below.
    pub fn shown(mut self) -> Self {
        if self.reporting_devices < MINIMUM_DEVICES_SHOWN {
            self.values.clear();
        }
        self
    }
}

/// The metrics of every model version that has releases, in version order, as the report
/// shows them ([`VersionMetrics::shown`]).
pub fn all_versions(sums: &[(u64, EvaluationSum)]) -> Vec<VersionMetrics> {
    sums.iter()
        .map(|(v, sum)| VersionMetrics::compute(*v, sum).shown())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{AlertAction, ThresholdDirection};
    use fedpref_privacy::evaluation::{COORDINATES, EvaluationCounts, EvaluationRates};

    /// The sum of `n` devices' noiseless (centred) rates.
    fn sum_of(devices: &[(u64, EvaluationCounts)]) -> EvaluationSum {
        let mut sum = EvaluationSum::default();
        for (n, c) in devices {
            let r = EvaluationRates::from_counts(c);
            let mut v = [0.0; COORDINATES];
            for (slot, x) in v.iter_mut().zip(r.values()) {
                *slot = x - 0.5;
            }
            for _ in 0..*n {
                sum.add(&v);
            }
        }
        sum
    }

    #[test]
    fn metrics_are_means_of_the_devices_rates_over_those_with_a_denominator() {
        let light = EvaluationCounts {
            lists_shown: 2,
            items_shown: 20,
            injected_shown: 4,
            intra_list_diversity_sum: 1.0,
            negative_feedback: 2,
            distinct_topics_shown: 1,
            catalogue_topics: 4,
            predictions: 10,
            predictions_within_half: 9,
            ..Default::default()
        };
        let heavy = EvaluationCounts {
            lists_shown: 1,
            items_shown: 10,
            negative_feedback: 5,
            intra_list_diversity_sum: 0.2,
            catalogue_topics: 4,
            distinct_topics_shown: 3,
            personalisation_opt_out: true,
            predictions: 10,
            predictions_within_half: 5,
            heavy: true,
            ..Default::default()
        };
        let m = VersionMetrics::compute(2, &sum_of(&[(3, light), (1, heavy)]));
        let v = |k| m.values[&k];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(m.reporting_devices, 4);
        assert!(close(
            v(GuardrailMetricKind::NegativeFeedbackRate),
            (3.0 * 0.1 + 0.5) / 4.0
        ));
        assert!(close(
            v(GuardrailMetricKind::IntraListDiversity),
            (3.0 * 0.5 + 0.2) / 4.0
        ));
        assert!(close(
            v(GuardrailMetricKind::TopicCoverage),
            (3.0 * 0.25 + 0.75) / 4.0
        ));
        assert!(close(v(GuardrailMetricKind::OptOutRate), 0.25));
        assert!(close(v(GuardrailMetricKind::CohortAccuracyGap), 0.4));
        assert!(close(
            v(GuardrailMetricKind::InjectedShare),
            3.0 * 0.2 / 4.0
        ));
        // One cohort only: no gap to speak of.
        let single = VersionMetrics::compute(3, &sum_of(&[(5, light)]));
        assert!(
            !single
                .values
                .contains_key(&GuardrailMetricKind::CohortAccuracyGap)
        );
    }

    #[test]
    fn a_guardrail_is_not_evaluated_below_its_minimum_of_reporting_devices() {
        let bad = EvaluationCounts {
            lists_shown: 1,
            items_shown: 10,
            negative_feedback: 9,
            ..Default::default()
        };
        let g = [GuardrailMetric {
            metric: GuardrailMetricKind::NegativeFeedbackRate,
            direction: ThresholdDirection::Above,
            threshold: 0.5,
            on_alert: AlertAction::Log,
            minimum_reporting_devices: 3,
        }];
        assert!(
            VersionMetrics::compute(1, &sum_of(&[(2, bad)]))
                .crossed(&g)
                .is_empty()
        );
        assert_eq!(
            VersionMetrics::compute(1, &sum_of(&[(3, bad)]))
                .crossed(&g)
                .len(),
            1
        );
    }

    #[test]
    fn the_report_shows_no_metric_below_its_minimum_of_devices() {
        let opted_out = EvaluationCounts {
            personalisation_opt_out: true,
            ..Default::default()
        };
        let few = all_versions(&[(1, sum_of(&[(1, opted_out)]))]);
        assert!(few[0].values.is_empty(), "{few:?}");
        assert_eq!(few[0].reporting_devices, 1);
        let many = all_versions(&[(1, sum_of(&[(MINIMUM_DEVICES_SHOWN, opted_out)]))]);
        assert_eq!(many[0].values[&GuardrailMetricKind::OptOutRate], 1.0);
    }
}
