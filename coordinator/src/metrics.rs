//! Prometheus metrics, served as text on `GET /metrics` at the configured metrics address.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `fedpref_checkins_total` | counter | |
//! | `fedpref_tasks_sent_total` | counter | |
//! | `fedpref_come_back_later_total` | counter | |
//! | `fedpref_uploads_accepted_total` | counter | |
//! | `fedpref_uploads_rejected_total` | counter | `reason`: the gRPC status the upload was refused with (`invalid_argument`, `failed_precondition`, `unauthenticated`, `resource_exhausted`, …) |
//! | `fedpref_rounds_committed_total`, `fedpref_rounds_abandoned_total` | counter | |
//! | `fedpref_round_duration_seconds` | histogram | from the round's first task to its commit or abandonment |
//! | `fedpref_cohort_size` | histogram | devices aggregated in a committed round |
//! | `fedpref_epsilon_spent` | gauge | `run`, `audience` |
//! | `fedpref_guardrail_alerts_total` | counter | `run`, `metric` (the manifest's guardrail metric name) |
//!
//! Nothing secret or device-identifying is a label; run ids are operator-chosen names.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::Action;
use crate::ledger::AudienceEpsilon;

/// The coordinator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    checkins: IntCounter,
    tasks: IntCounter,
    come_back: IntCounter,
    accepted: IntCounter,
    rejected: IntCounterVec,
    committed: IntCounter,
    abandoned: IntCounter,
    round_duration: Histogram,
    cohort_size: Histogram,
    epsilon: GaugeVec,
    guardrail_alerts: IntCounterVec,
    round_started_ms: Mutex<HashMap<(String, u64), i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let checkins = counter(
            "fedpref_checkins_total",
            "Device check-ins handled by the round engine.",
        );
        let tasks = counter("fedpref_tasks_sent_total", "Tasks given to devices.");
        let come_back = counter(
            "fedpref_come_back_later_total",
            "Check-ins answered with come back later.",
        );
        let accepted = counter(
            "fedpref_uploads_accepted_total",
            "Updates accepted into a round.",
        );
        let committed = counter(
            "fedpref_rounds_committed_total",
            "Rounds committed (spend recorded).",
        );
        let abandoned = counter(
            "fedpref_rounds_abandoned_total",
            "Rounds abandoned (nothing released or spent).",
        );
        let rejected = IntCounterVec::new(
            Opts::new(
                "fedpref_uploads_rejected_total",
                "Updates rejected, by gRPC status.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(rejected.clone()))
            .expect("unique metric");
        let round_duration = Histogram::with_opts(
            HistogramOpts::new(
                "fedpref_round_duration_seconds",
                "From a round's first task to its commit or abandonment.",
            )
            .buckets(vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(round_duration.clone()))
            .expect("unique metric");
        let cohort_size = Histogram::with_opts(
            HistogramOpts::new(
                "fedpref_cohort_size",
                "Devices aggregated in a committed round.",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 10000.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(cohort_size.clone()))
            .expect("unique metric");
        let epsilon = GaugeVec::new(
            Opts::new(
                "fedpref_epsilon_spent",
                "Cumulative ε spent by a run, per audience, at its δ.",
            ),
            &["run", "audience"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(epsilon.clone()))
            .expect("unique metric");
        let guardrail_alerts = IntCounterVec::new(
            Opts::new(
                "fedpref_guardrail_alerts_total",
                "Guardrail alerts fired (a metric crossed its manifest threshold), by run and metric.",
            ),
            &["run", "metric"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(guardrail_alerts.clone()))
            .expect("unique metric");
        Self {
            registry,
            guardrail_alerts,
            checkins,
            tasks,
            come_back,
            accepted,
            rejected,
            committed,
            abandoned,
            round_duration,
            cohort_size,
            epsilon,
            round_started_ms: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an update refused before it reached the engine, by gRPC status code.
    pub fn upload_rejected(&self, code: tonic::Code) {
        self.rejected.with_label_values(&[&code_label(code)]).inc();
    }

    /// Records one engine step: the event and the actions it produced.
    pub fn observe(
        &self,
        run_id: &str,
        check_in: bool,
        actions: &[Action],
        now_ms: i64,
        spent: &[AudienceEpsilon],
    ) {
        if check_in {
            self.checkins.inc();
        }
        let mut started = self
            .round_started_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for action in actions {
            match action {
                Action::SendTask(task) => {
                    self.tasks.inc();
                    started
                        .entry((run_id.to_string(), task.round))
                        .or_insert(now_ms);
                }
                Action::ComeBackLater { .. } => self.come_back.inc(),
                Action::UpdateAccepted { .. } => self.accepted.inc(),
                Action::CommitRound(outcome) => {
                    self.committed.inc();
                    self.cohort_size.observe(outcome.participants.len() as f64);
                    if let Some(t0) = started.remove(&(run_id.to_string(), outcome.round)) {
                        self.round_duration
                            .observe((now_ms - t0).max(0) as f64 / 1000.0);
                    }
                    for a in spent {
                        self.epsilon
                            .with_label_values(&[run_id, &a.audience])
                            .set(a.epsilon);
                    }
                }
                Action::AbandonRound { round, .. } => {
                    self.abandoned.inc();
                    if let Some(t0) = started.remove(&(run_id.to_string(), *round)) {
                        self.round_duration
                            .observe((now_ms - t0).max(0) as f64 / 1000.0);
                    }
                }
                _ => {}
            }
        }
    }

    /// Counts a guardrail alert.
    pub fn guardrail_alert(&self, run_id: &str, metric: &str) {
        self.guardrail_alerts
            .with_label_values(&[run_id, metric])
            .inc();
    }

    /// Sets a run's ε gauges (at start-up, for runs restored from the store).
    pub fn set_spent(&self, run_id: &str, spent: &[AudienceEpsilon]) {
        for a in spent {
            self.epsilon
                .with_label_values(&[run_id, &a.audience])
                .set(a.epsilon);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

fn code_label(code: tonic::Code) -> String {
    // `InvalidArgument` → `invalid_argument`.
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_become_snake_case_labels() {
        assert_eq!(code_label(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(code_label(tonic::Code::Unauthenticated), "unauthenticated");
    }

    #[test]
    fn rendering_lists_every_metric() {
        let m = Metrics::new();
        m.upload_rejected(tonic::Code::FailedPrecondition);
        let text = m.render();
        for name in [
            "fedpref_checkins_total",
            "fedpref_uploads_rejected_total{reason=\"failed_precondition\"} 1",
            "fedpref_round_duration_seconds_bucket",
            "fedpref_cohort_size_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
