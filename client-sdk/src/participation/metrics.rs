//! Sending federated-evaluation counts ([`crate::evaluation`]) with `ReportMetrics`.
//!
//! **When.** After [`super::participate`] has checked in (whatever the answer) and after
//! any upload, if a window is open and the coordinator's `next_report_after` from the
//! previous `ReportMetricsResponse` has passed (`CheckIn` says nothing about reports; a
//! device that never reported may report at once). [`report_metrics`] with
//! [`ReportWhen::Now`] ignores the wait, for an app that wants to report now.
//!
//! **What is sent.** Each window is released with differential privacy on the device first
//! ([`Device::prepare_evaluation`]: bounded rates, Gaussian noise from the secure sampler,
//! the spend recorded in the on-device accountant); only the noised rates, the run, the model
//! version, σ and the task's single-use evaluation token are sent — in distributed mode too,
//! where the report follows the share's upload just as it follows a local update. A window
//! without a token (its version came with no task that carried one) or that the budget
//! cannot pay for is closed unsent.
//!
//! **The user's switches.** A device whose user turned training participation off sends
//! nothing (its windows stay on the device until the user turns it on again, resets or
//! deletes everything). Turning personalisation off does not stop reports. Deleting
//! everything deletes the windows and the tokens, so nothing about the deleted data is ever
//! reported.
//!
//! **Failures.** Inside `participate` a failed report never fails participation: it is
//! recorded in [`crate::ParticipationReport::metrics`] and the window stays open for the
//! next attempt.

use std::time::Duration;

use fedpref_proto::v1 as pb;

use super::{CoordinatorClient, ParticipationError};
use crate::device::Device;
use crate::evaluation::{EvaluationRelease, PreparedEvaluation};
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
                    "evaluation reported for {}; next report in {:.0} s",
                    list.join(", "),
                    next_report_after.as_secs_f64()
                )
            }
            Self::NotSent { why } => write!(f, "no evaluation report: {why}"),
            Self::Failed { message } => write!(f, "evaluation report failed: {message}"),
        }
    }
}

/// The request that sends one prepared release.
pub fn request(release: &PreparedEvaluation) -> pb::ReportMetricsRequest {
    pb::ReportMetricsRequest {
        run_id: release.run_id().to_owned(),
        model_version: release.model_version(),
        evaluation_token: release.token().to_owned(),
        released_rates: release.released_rates().to_vec(),
        noise_multiplier: release.noise_multiplier(),
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
    if !device.settings().training {
        return Ok(MetricsOutcome::NotSent {
            why: "training participation is off: the device sends no evaluation".into(),
        });
    }
    client.ensure_enrolled(device, app_key).await?;
    let mut sent = Vec::new();
    let mut dropped = Vec::new();
    let mut wait = Duration::ZERO;
    for w in &windows {
        let release = match device.prepare_evaluation(w, now)? {
            EvaluationRelease::Ready(release) => release,
            EvaluationRelease::Dropped(why) => {
                dropped.push(why);
                continue;
            }
        };
        wait = client.report_metrics(request(&release)).await?;
        device.close_evaluation_window(&w.run_id, w.model_version)?;
        let next = now
            .millis()
            .saturating_add(wait.as_millis().min(i64::MAX as u128) as i64);
        device.set_next_evaluation_report(Timestamp::from_millis(next))?;
        sent.push((w.run_id.clone(), w.model_version));
    }
    if sent.is_empty() {
        return Ok(MetricsOutcome::NotSent {
            why: dropped.join("; "),
        });
    }
    Ok(MetricsOutcome::Reported {
        windows: sent,
        next_report_after: wait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::{EvaluationCounts, EvaluationWindow};
    use crate::{Device, DeviceConfig};

    #[test]
    fn the_request_carries_only_the_noised_release_the_run_the_version_and_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Device::open(dir.path().join("d.db"), DeviceConfig::default()).unwrap();
        d.store_evaluation_token("r", 4, "tok", 4.0).unwrap();
        let w = EvaluationWindow {
            run_id: "r".into(),
            model_version: 4,
            start: Timestamp::from_millis(10_500),
            cohort: "heavy",
            counts: EvaluationCounts {
                recommendation_lists_shown: 2,
                recommendations_shown: 9,
                negative_feedback_count: u64::MAX,
                ..EvaluationCounts::default()
            },
        };
        let EvaluationRelease::Ready(release) = d
            .prepare_evaluation(&w, Timestamp::from_millis(20_000))
            .unwrap()
        else {
            panic!("released")
        };
        let r = request(&release);
        assert_eq!((r.run_id.as_str(), r.model_version), ("r", 4));
        assert_eq!(r.evaluation_token, "tok");
        assert_eq!(r.noise_multiplier, 4.0);
        assert_eq!(
            r.released_rates.len(),
            fedpref_privacy::evaluation::COORDINATES
        );
        let bound = fedpref_privacy::evaluation::value_bound(4.0);
        assert!(
            r.released_rates
                .iter()
                .all(|v| v.is_finite() && v.abs() <= bound)
        );
        // Recorded before it could be sent.
        let b = d.budget().unwrap();
        assert_eq!(b.rounds, 1);
        assert_eq!(b.uploads[0].kind, "evaluation");
    }
}
