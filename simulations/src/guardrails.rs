//! Guardrail alerts: thresholds on how far a run's metrics may drift, checked after every
//! round.
//!
//! ```toml
//! [guardrails]                       # in --config; every key is optional
//! max_rmse_rise = 0.05               # test RMSE above the baseline evaluation's, in stars
//! max_diversity_drop = 0.05          # intra-list diversity below the baseline's
//! max_coverage_drop = 0.10           # catalogue coverage below the baseline's
//! max_cohort_rmse_gap = 0.15         # the largest RMSE gap between two cohorts
//! max_opt_out_rate = 0.05            # the share of users opted out (the feedback scenario)
//! max_negative_feedback_rate = 0.30  # the round's share of disliked recommendations
//! baseline_round = 1                 # drifts are measured from the first evaluation at or after it
//! ```
//!
//! Drifts are absolute differences in the metric's own unit, measured against the **first
//! evaluated round at or after `baseline_round`** (default 1; no drift is checked before
//! it); gaps and rates are the round's value. The model of round 1 is barely trained and
//! its lists are close to random, so diversity and coverage naturally fall from it as the
//! model learns: a later baseline measures drift from a trained model instead. A rule fires in a
//! round when the value is strictly above its threshold, so a rule keeps firing every round
//! the metric stays past it. A rule whose metric a round does not have (a round that was not
//! evaluated, ranking metrics without topics, rates without the feedback scenario) is silent
//! that round.

use serde::{Deserialize, Serialize};

use crate::metrics::Evaluation;
use crate::sim::RoundRecord;

/// The thresholds (`[guardrails]` in `--config`); an absent key is no rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrails {
    /// Largest allowed rise of test RMSE above the baseline evaluation's.
    pub max_rmse_rise: Option<f64>,
    /// Largest allowed drop of intra-list diversity below the baseline evaluation's.
    pub max_diversity_drop: Option<f64>,
    /// Largest allowed drop of catalogue coverage below the baseline evaluation's.
    pub max_coverage_drop: Option<f64>,
    /// Largest allowed RMSE gap between cohorts.
    pub max_cohort_rmse_gap: Option<f64>,
    /// Largest allowed share of opted-out users.
    pub max_opt_out_rate: Option<f64>,
    /// Largest allowed share of disliked recommendations in a round.
    pub max_negative_feedback_rate: Option<f64>,
    /// Drifts are measured from the first evaluated round at or after this one (default 1).
    pub baseline_round: Option<u64>,
}

impl Guardrails {
    fn rules(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("max_rmse_rise", self.max_rmse_rise),
            ("max_diversity_drop", self.max_diversity_drop),
            ("max_coverage_drop", self.max_coverage_drop),
            ("max_cohort_rmse_gap", self.max_cohort_rmse_gap),
            ("max_opt_out_rate", self.max_opt_out_rate),
            (
                "max_negative_feedback_rate",
                self.max_negative_feedback_rate,
            ),
        ]
    }

    /// Checks the thresholds (finite and ≥ 0); the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in self.rules() {
            if let Some(x) = v
                && !(x.is_finite() && x >= 0.0)
            {
                return Err(format!(
                    "[guardrails] {key} {x}: must be a finite number ≥ 0"
                ));
            }
        }
        Ok(())
    }
}

/// One guardrail that fired.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    /// The round.
    pub round: u64,
    /// What was measured: `rmse_rise`, `intra_list_diversity_drop`, `coverage_drop`,
    /// `cohort_rmse_gap`, `opt_out_rate` or `negative_feedback_rate`.
    pub metric: &'static str,
    /// Its value this round.
    pub value: f64,
    /// The threshold it passed.
    pub threshold: f64,
    /// The baseline evaluation's value of the underlying metric, for drifts.
    pub baseline: Option<f64>,
}

impl std::fmt::Display for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "round {}: {} {:.4} > max {}",
            self.round, self.metric, self.value, self.threshold
        )?;
        if let Some(b) = self.baseline {
            write!(f, " (baseline {b:.4})")?;
        }
        Ok(())
    }
}

/// Checks rounds in order against [`Guardrails`], remembering the baseline evaluation.
#[derive(Clone, Debug)]
pub struct Monitor {
    rules: Guardrails,
    first: Option<Evaluation>,
}

impl Monitor {
    /// A monitor that has seen no round.
    pub fn new(rules: Guardrails) -> Self {
        Self { rules, first: None }
    }

    /// The alerts of `record` (the next round), in rule order.
    pub fn check(&mut self, record: &RoundRecord) -> Vec<Alert> {
        if self.first.is_none() && record.round >= self.rules.baseline_round.unwrap_or(1) {
            self.first = record.evaluation.clone();
        }
        let r = &self.rules;
        let mut alerts = vec![];
        let mut fire = |metric, value: Option<f64>, threshold: Option<f64>, baseline| {
            if let (Some(value), Some(threshold)) = (value, threshold)
                && value > threshold
            {
                alerts.push(Alert {
                    round: record.round,
                    metric,
                    value,
                    threshold,
                    baseline,
                });
            }
        };
        if let (Some(e), Some(first)) = (&record.evaluation, &self.first) {
            fire(
                "rmse_rise",
                Some(e.rmse - first.rmse),
                r.max_rmse_rise,
                Some(first.rmse),
            );
            let drop = |now: Option<f64>, then: Option<f64>| Some(then? - now?);
            fire(
                "intra_list_diversity_drop",
                drop(e.intra_list_diversity, first.intra_list_diversity),
                r.max_diversity_drop,
                first.intra_list_diversity,
            );
            fire(
                "coverage_drop",
                drop(e.coverage, first.coverage),
                r.max_coverage_drop,
                first.coverage,
            );
            fire(
                "cohort_rmse_gap",
                e.cohort_rmse_gap,
                r.max_cohort_rmse_gap,
                None,
            );
        }
        if let Some(f) = &record.feedback {
            fire(
                "opt_out_rate",
                Some(f.opt_out_rate),
                r.max_opt_out_rate,
                None,
            );
            fire(
                "negative_feedback_rate",
                f.negative_feedback_rate,
                r.max_negative_feedback_rate,
                None,
            );
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::RoundFeedback;

    fn evaluation(rmse: f64, diversity: f64, coverage: f64, gap: f64) -> Evaluation {
        Evaluation {
            rmse,
            mae: 0.0,
            rating_accuracy: 0.0,
            hit_rate_at_10: None,
            ndcg_at_10: None,
            coverage: Some(coverage),
            intra_list_diversity: Some(diversity),
            injected_share: None,
            cohort_rmse: vec![],
            cohort_rmse_gap: Some(gap),
        }
    }

    fn record(
        round: u64,
        evaluation: Option<Evaluation>,
        rates: Option<(f64, f64)>,
    ) -> RoundRecord {
        RoundRecord {
            round,
            contributions: 1,
            abandoned: None,
            epsilon: vec![],
            evaluation,
            feedback: rates.map(|(opt_out, negative)| RoundFeedback {
                exposed_users: 10,
                recommended: 100,
                negative: (negative * 100.0) as u64,
                negative_feedback_rate: Some(negative),
                opted_out: 0,
                opted_out_total: 0,
                opt_out_rate: opt_out,
            }),
            clip_norm: None,
        }
    }

    #[test]
    fn drifts_are_measured_from_the_first_evaluated_round_and_fire_strictly_past_the_threshold() {
        // Values a binary fraction can hold exactly, so "at the threshold" is exact.
        let mut m = Monitor::new(Guardrails {
            max_rmse_rise: Some(0.0625),
            max_diversity_drop: Some(0.0625),
            max_coverage_drop: Some(0.25),
            max_cohort_rmse_gap: Some(0.25),
            ..Guardrails::default()
        });
        assert!(
            m.check(&record(1, None, None)).is_empty(),
            "no evaluation yet"
        );
        assert!(
            m.check(&record(2, Some(evaluation(1.0, 0.75, 0.5, 0.125)), None))
                .is_empty()
        );
        // Exactly at a threshold is not past it.
        assert!(
            m.check(&record(
                3,
                Some(evaluation(1.0625, 0.6875, 0.25, 0.25)),
                None
            ))
            .is_empty()
        );
        let alerts = m.check(&record(4, Some(evaluation(1.25, 0.625, 0.125, 0.5)), None));
        let fired: Vec<(&str, f64)> = alerts.iter().map(|a| (a.metric, a.value)).collect();
        assert_eq!(
            fired,
            [
                ("rmse_rise", 0.25),
                ("intra_list_diversity_drop", 0.125),
                ("coverage_drop", 0.375),
                ("cohort_rmse_gap", 0.5),
            ]
        );
        assert_eq!(alerts[0].baseline, Some(1.0));
        assert_eq!(alerts[0].round, 4);
        assert_eq!(
            alerts[0].to_string(),
            "round 4: rmse_rise 0.2500 > max 0.0625 (baseline 1.0000)"
        );
    }

    #[test]
    fn a_later_baseline_round_skips_earlier_evaluations() {
        let mut m = Monitor::new(Guardrails {
            max_rmse_rise: Some(0.0625),
            baseline_round: Some(3),
            ..Guardrails::default()
        });
        // Round 1's RMSE is low, but the baseline is round 3's: no drift before it, and
        // round 4 is measured from round 3.
        assert!(
            m.check(&record(1, Some(evaluation(0.5, 0.0, 0.0, 0.0)), None))
                .is_empty()
        );
        assert!(
            m.check(&record(2, Some(evaluation(2.0, 0.0, 0.0, 0.0)), None))
                .is_empty()
        );
        assert!(
            m.check(&record(3, Some(evaluation(1.0, 0.0, 0.0, 0.0)), None))
                .is_empty()
        );
        let alerts = m.check(&record(4, Some(evaluation(1.25, 0.0, 0.0, 0.0)), None));
        assert_eq!(alerts.len(), 1);
        assert_eq!((alerts[0].value, alerts[0].baseline), (0.25, Some(1.0)));
    }

    #[test]
    fn rate_rules_fire_only_where_the_scenario_reports_rates() {
        let mut m = Monitor::new(Guardrails {
            max_opt_out_rate: Some(0.05),
            max_negative_feedback_rate: Some(0.2),
            ..Guardrails::default()
        });
        assert!(m.check(&record(1, None, None)).is_empty());
        assert!(m.check(&record(2, None, Some((0.05, 0.2)))).is_empty());
        let alerts = m.check(&record(3, None, Some((0.06, 0.5))));
        assert_eq!(
            alerts.iter().map(|a| a.metric).collect::<Vec<_>>(),
            ["opt_out_rate", "negative_feedback_rate"]
        );
    }

    #[test]
    fn no_rules_never_fire_and_bad_thresholds_name_the_key() {
        let mut m = Monitor::new(Guardrails::default());
        assert!(
            m.check(&record(
                1,
                Some(evaluation(9.0, 0.0, 0.0, 9.0)),
                Some((1.0, 1.0))
            ))
            .is_empty()
        );
        let bad = Guardrails {
            max_coverage_drop: Some(-0.1),
            ..Guardrails::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_coverage_drop"));
        assert!(Guardrails::default().validate().is_ok());
    }
}
