//! Sending federated-evaluation counts ([`crate::evaluation`]) with `ReportMetrics`.
//!
//! **When.** After [`super::participate`] has checked in (whatever the answer) and after
//! any upload, if a window is open and the coordinator's `next_report_after` from the
//! previous `ReportMetricsResponse` has passed (`CheckIn` says nothing about reports; a
//! device that never reported may report at once). [`report_metrics`] with
//! [`ReportWhen::Now`] ignores the wait, for an app that wants to report now.
//!
//! **The user's switches.** A device whose user turned training participation off still
//! reports its counts: they are aggregate numbers about how the recommendations served the
//! user, never a model update and never spending the privacy budget, and the coordinator's
//! opt-out rate is only meaningful if the devices that opted out are counted among those
//! that report. Turning personalisation off does not stop reports either, for the same
//! reason. Deleting everything deletes the windows, so nothing about the deleted data is
//! ever reported.
//!
//! **Failures.** Inside `participate` a failed report never fails participation: it is
//! recorded in [`crate::ParticipationReport::metrics`] and the window stays open for the
//! next attempt.

use std::time::Duration;

use fedpref_proto::prost_types;
use fedpref_proto::v1 as pb;

use super::{CoordinatorClient, ParticipationError};
use crate::device::Device;
use crate::evaluation::EvaluationWindow;
use crate::time::Timestamp;

/// Whether to wait for the coordinator's `next_report_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportWhen {
    /// Only if a report is due.
    Due,
    /// Now, whatever the coordinator asked.
    Now,
}

/// What a call of [`report_metrics`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricsOutcome {
    /// Windows reported and closed.
    Reported {
        /// (run, model version) of each window sent.
        windows: Vec<(String, u64)>,
        /// The coordinator's wait before the next report.
        next_report_after: Duration,
    },
    /// Nothing was sent, and why (no open window, not due yet).
    NotSent {
        /// Why.
        why: String,
    },
    /// Sending failed (inside [`super::participate`] only; the window stays open).
    Failed {
        /// The error.
        message: String,
    },
}

impl std::fmt::Display for MetricsOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reported {
                windows,
                next_report_after,
            } => {
                let list: Vec<String> = windows
                    .iter()
                    .map(|(run, v)| format!("run {run} version {v}"))
                    .collect();
                write!(
                    f,
                    "evaluation counts reported for {}; next report in {:.0} s",
                    list.join(", "),
                    next_report_after.as_secs_f64()
                )
            }
            Self::NotSent { why } => write!(f, "no evaluation report: {why}"),
            Self::Failed { message } => write!(f, "evaluation report failed: {message}"),
        }
    }
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let ms = t.millis();
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The request for one window ending at `end`. The window's start is kept strictly before
/// its end (a start recorded with a clock ahead of `end` is moved to just before it).
pub fn request(window: &EvaluationWindow, end: Timestamp) -> pb::ReportMetricsRequest {
    let start = Timestamp::from_millis(window.start.millis().min(end.millis() - 1));
    let c = &window.counts;
    pb::ReportMetricsRequest {
        run_id: window.run_id.clone(),
        model_version: window.model_version,
        window_start: Some(timestamp(start)),
        window_end: Some(timestamp(end)),
        cohort: window.cohort.to_string(),
        counts: Some(pb::EvaluationCounts {
            recommendation_lists_shown: c.recommendation_lists_shown,
            recommendations_shown: c.recommendations_shown,
            injected_recommendations_shown: c.injected_recommendations_shown,
            intra_list_diversity_sum: c.intra_list_diversity_sum,
            distinct_topics_shown: c.distinct_topics_shown,
            catalogue_topic_count: c.catalogue_topic_count,
            positive_feedback_count: c.positive_feedback_count,
            negative_feedback_count: c.negative_feedback_count,
            personalisation_opt_outs: c.personalisation_opt_outs,
            training_opt_outs: c.training_opt_outs,
            predictions_evaluated: c.predictions_evaluated,
            predictions_within_half: c.predictions_within_half,
            prediction_absolute_error_sum: c.prediction_absolute_error_sum,
            prediction_squared_error_sum: c.prediction_squared_error_sum,
        }),
        counters: Vec::new(),
        histograms: Vec::new(),
    }
}

/// Sends one `ReportMetrics` per open window (one per model version used since the last
/// report) and closes each window the coordinator acknowledged, recording its
/// `next_report_after`. Enrols first if needed (with `app_key`). With nothing to report —
/// no model from a run was ever used, or everything was reported — or (with
/// [`ReportWhen::Due`]) before the coordinator's wait has passed, nothing is sent. A
/// coordinator error is returned; the windows not yet acknowledged stay open.
pub async fn report_metrics(
    device: &mut Device,
    client: &mut CoordinatorClient,
    app_key: &str,
    when: ReportWhen,
) -> Result<MetricsOutcome, ParticipationError> {
    let windows = device.evaluation_windows()?;
    if windows.is_empty() {
        return Ok(MetricsOutcome::NotSent {
            why: "nothing to report (no recommendations, feedback or ratings counted for a model from a run since the last report)".into(),
        });
    }
    let now = Timestamp::now();
    if when == ReportWhen::Due && !device.evaluation_report_due(now)? {
        let at = device
            .next_evaluation_report()?
            .map_or_else(String::new, |t| t.to_rfc3339());
        return Ok(MetricsOutcome::NotSent {
            why: format!("the coordinator asked for the next report no sooner than {at}"),
        });
    }
    client.ensure_enrolled(device, app_key).await?;
    let mut sent = Vec::new();
    let mut wait = Duration::ZERO;
    for w in &windows {
        wait = client.report_metrics(request(w, now)).await?;
        device.close_evaluation_window(&w.run_id, w.model_version)?;
        let next = now
            .millis()
            .saturating_add(wait.as_millis().min(i64::MAX as u128) as i64);
        device.set_next_evaluation_report(Timestamp::from_millis(next))?;
        sent.push((w.run_id.clone(), w.model_version));
    }
    Ok(MetricsOutcome::Reported {
        windows: sent,
        next_report_after: wait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::EvaluationCounts;

    #[test]
    fn the_request_carries_the_counts_and_a_window_that_ends_after_it_starts() {
        let counts = EvaluationCounts {
            recommendation_lists_shown: 2,
            recommendations_shown: 9,
            injected_recommendations_shown: 1,
            intra_list_diversity_sum: 1.25,
            distinct_topics_shown: 3,
            catalogue_topic_count: 4,
            negative_feedback_count: 2,
            training_opt_outs: 1,
            predictions_evaluated: 5,
            predictions_within_half: 2,
            prediction_absolute_error_sum: 3.5,
            prediction_squared_error_sum: 4.0,
            ..EvaluationCounts::default()
        };
        let w = EvaluationWindow {
            run_id: "r".into(),
            model_version: 4,
            start: Timestamp::from_millis(10_500),
            cohort: "heavy",
            counts,
        };
        let r = request(&w, Timestamp::from_millis(20_250));
        assert_eq!(
            r.window_start,
            Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 500_000_000
            })
        );
        assert_eq!(r.window_end.unwrap().seconds, 20);
        assert_eq!((r.run_id.as_str(), r.model_version), ("r", 4));
        assert_eq!(r.cohort, "heavy");
        let c = r.counts.unwrap();
        assert_eq!(c.recommendations_shown, 9);
        assert_eq!(c.training_opt_outs, 1);
        assert_eq!(c.prediction_squared_error_sum, 4.0);
        // A start recorded ahead of the end is moved to just before it.
        let r = request(&w, Timestamp::from_millis(10_000));
        assert_eq!(
            r.window_start,
            Some(prost_types::Timestamp {
                seconds: 9,
                nanos: 999_000_000
            })
        );
    }
}
