//! Guardrail metrics: what the coordinator derives from the devices' summed
//! federated-evaluation counts, and when a manifest threshold is crossed.
//!
//! Pure functions over [`EvaluationRow`]s (the store's sums per model version and cohort):
//! no device's own report is ever looked at on its own. A metric is evaluated per model
//! version over all cohorts, and only once at least the guardrail's
//! `minimum_reporting_devices` distinct devices have reported on that version.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::manifest::{GuardrailMetric, GuardrailMetricKind};
use crate::store::EvaluationRow;

/// The guardrail metrics of one model version, from its summed counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionMetrics {
    /// The model version the reports evaluate.
    pub model_version: u64,
    /// Reports summed (a device may report more than once).
    pub reports: u64,
    /// Distinct devices that reported.
    pub reporting_devices: u64,
    /// The earliest window start (ms since the epoch), if any report had one.
    pub window_start_ms: Option<i64>,
    /// The latest window end.
    pub window_end_ms: Option<i64>,
    /// Each metric's value; absent where its denominator is zero (nothing shown, fewer
    /// than two cohorts with predictions, …).
    pub values: BTreeMap<GuardrailMetricKind, f64>,
}

impl VersionMetrics {
    /// Computes every metric of `version` from the rows of that version (other rows are
    /// ignored).
    pub fn compute(version: u64, rows: &[EvaluationRow], reporting_devices: u64) -> Self {
        let rows: Vec<&EvaluationRow> =
            rows.iter().filter(|r| r.model_version == version).collect();
        let mut lists = 0i64;
        let mut shown = 0i64;
        let mut injected = 0i64;
        let mut negative = 0i64;
        let mut diversity = 0.0;
        let mut coverage = 0.0;
        let mut coverage_reports = 0i64;
        let mut opted_out = 0i64;
        let mut reports = 0u64;
        let mut accuracy = vec![];
        for r in &rows {
            let s = &r.sums;
            lists += s.recommendation_lists_shown;
            shown += s.recommendations_shown;
            injected += s.injected_recommendations_shown;
            negative += s.negative_feedback_count;
            diversity += s.intra_list_diversity_sum;
            coverage += s.topic_coverage_sum;
            coverage_reports += s.topic_coverage_reports;
            opted_out += s.opted_out_reports;
            reports += r.reports;
            if s.predictions_evaluated > 0 {
                accuracy.push(s.predictions_within_half as f64 / s.predictions_evaluated as f64);
            }
        }
        let ratio = |num: f64, den: i64| (den > 0).then(|| num / den as f64);
        let mut values = BTreeMap::new();
        let mut put = |k, v: Option<f64>| {
            if let Some(v) = v {
                values.insert(k, v);
            }
        };
        put(
            GuardrailMetricKind::IntraListDiversity,
            ratio(diversity, lists),
        );
        put(
            GuardrailMetricKind::TopicCoverage,
            ratio(coverage, coverage_reports),
        );
        put(
            GuardrailMetricKind::NegativeFeedbackRate,
            ratio(negative as f64, shown),
        );
        put(
            GuardrailMetricKind::OptOutRate,
            ratio(opted_out as f64, reports as i64),
        );
        put(
            GuardrailMetricKind::CohortAccuracyGap,
            (accuracy.len() >= 2).then(|| {
                let max = accuracy.iter().copied().fold(f64::MIN, f64::max);
                let min = accuracy.iter().copied().fold(f64::MAX, f64::min);
                max - min
            }),
        );
        put(
            GuardrailMetricKind::InjectedShare,
            ratio(injected as f64, shown),
        );
        Self {
            model_version: version,
            reports,
            reporting_devices,
            window_start_ms: rows.iter().filter_map(|r| r.window_start_ms).min(),
            window_end_ms: rows.iter().filter_map(|r| r.window_end_ms).max(),
            values,
        }
    }

    /// The guardrails of `guardrails` this version's metrics cross, with their values. A
    /// guardrail is not evaluated below its minimum number of reporting devices.
    pub fn crossed<'a>(
        &self,
        guardrails: &'a [GuardrailMetric],
    ) -> Vec<(&'a GuardrailMetric, f64)> {
        guardrails
            .iter()
            .filter(|g| self.reporting_devices >= g.minimum_reporting_devices)
            .filter_map(|g| {
                let v = *self.values.get(&g.metric)?;
                g.direction.crossed(v, g.threshold).then_some((g, v))
            })
            .collect()
    }
}

/// The metrics of every model version that has reports, in version order.
pub fn all_versions(
    rows: &[EvaluationRow],
    reporting_devices: impl Fn(u64) -> u64,
) -> Vec<VersionMetrics> {
    let mut versions: Vec<u64> = rows.iter().map(|r| r.model_version).collect();
    versions.dedup();
    versions
        .into_iter()
        .map(|v| VersionMetrics::compute(v, rows, reporting_devices(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{AlertAction, ThresholdDirection};
    use crate::store::EvaluationSums;

    fn row(version: u64, cohort: &str, reports: u64, sums: EvaluationSums) -> EvaluationRow {
        EvaluationRow {
            model_version: version,
            cohort: cohort.into(),
            reports,
            sums,
            window_start_ms: Some(1000),
            window_end_ms: Some(2000),
        }
    }

    #[test]
    fn metrics_are_ratios_of_the_summed_counts_over_cohorts() {
        let light = EvaluationSums {
            recommendation_lists_shown: 10,
            recommendations_shown: 100,
            injected_recommendations_shown: 20,
            negative_feedback_count: 5,
            predictions_evaluated: 10,
            predictions_within_half: 9,
            intra_list_diversity_sum: 6.0,
            topic_coverage_sum: 1.5,
            topic_coverage_reports: 3,
            opted_out_reports: 1,
            ..Default::default()
        };
        let heavy = EvaluationSums {
            recommendation_lists_shown: 30,
            recommendations_shown: 300,
            injected_recommendations_shown: 40,
            negative_feedback_count: 35,
            predictions_evaluated: 20,
            predictions_within_half: 10,
            intra_list_diversity_sum: 10.0,
            topic_coverage_sum: 0.5,
            topic_coverage_reports: 1,
            opted_out_reports: 0,
            ..Default::default()
        };
        let rows = [
            row(2, "heavy", 1, heavy),
            row(2, "light", 3, light),
            row(3, "light", 1, light),
        ];
        let m = VersionMetrics::compute(2, &rows, 4);
        let v = |k| m.values[&k];
        assert_eq!(m.reports, 4);
        assert_eq!(v(GuardrailMetricKind::IntraListDiversity), 16.0 / 40.0);
        assert_eq!(v(GuardrailMetricKind::TopicCoverage), 2.0 / 4.0);
        assert_eq!(v(GuardrailMetricKind::NegativeFeedbackRate), 40.0 / 400.0);
        assert_eq!(v(GuardrailMetricKind::OptOutRate), 1.0 / 4.0);
        assert!((v(GuardrailMetricKind::CohortAccuracyGap) - 0.4).abs() < 1e-12);
        assert_eq!(v(GuardrailMetricKind::InjectedShare), 60.0 / 400.0);
        // One cohort only: no gap to speak of.
        let single = VersionMetrics::compute(3, &rows, 1);
        assert!(
            !single
                .values
                .contains_key(&GuardrailMetricKind::CohortAccuracyGap)
        );
    }

    #[test]
    fn a_guardrail_is_not_evaluated_below_its_minimum_of_reporting_devices() {
        let sums = EvaluationSums {
            recommendations_shown: 10,
            negative_feedback_count: 9,
            ..Default::default()
        };
        let rows = [row(1, "light", 3, sums)];
        let g = [GuardrailMetric {
            metric: GuardrailMetricKind::NegativeFeedbackRate,
            direction: ThresholdDirection::Above,
            threshold: 0.5,
            on_alert: AlertAction::Log,
            minimum_reporting_devices: 3,
        }];
        assert!(VersionMetrics::compute(1, &rows, 2).crossed(&g).is_empty());
        let crossed = VersionMetrics::compute(1, &rows, 3).crossed(&g).len();
        assert_eq!(crossed, 1);
    }
}
