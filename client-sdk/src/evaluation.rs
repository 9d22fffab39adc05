//! Federated evaluation: the counts a device keeps about how the shared model serves its
//! user, reported with `fedpref.v1.DeviceService/ReportMetrics` as aggregate counts only.
//!
//! # What is counted
//! Counts are kept per **window**, one window per shared model version (and the run it
//! came from): a window opens with the first thing counted for that version and closes
//! when a report of it is acknowledged by the coordinator. Only a model downloaded from a
//! coordinator run is evaluated (a model installed by hand belongs to no run, so there is
//! nothing to report it to); lists shown without a shared model evaluate no model and are
//! not counted.
//!
//! - **Lists shown.** Every list [`Device::recommend`] returns counts as shown: the SDK's
//!   contract is that the app calls `recommend` when it is about to display the list. A
//!   list counts its items, its diversity-injected slots ([`crate::Reason::Diversity`]),
//!   and its **intra-list diversity**: the mean over pairs of items of the Jaccard distance
//!   `1 − |A ∩ B| / |A ∪ B|` between their topic sets (two items without topics are at
//!   distance 0); a list of fewer than two items has diversity 0.
//! - **Topic coverage.** The distinct topics among the items shown in the window, against
//!   the number of topics in the device's catalogue at report time.
//! - **Feedback on recommended items.** Thumbs up and save are positive, thumbs down and
//!   dismiss negative, counted when the item was shown in an open window (to the window of
//!   the newest version that showed it). Ratings and dwell are not feedback here.
//! - **Opt-outs.** `personalisation_opt_outs` / `training_opt_outs` are 1 when the user
//!   turned the switch from on to off during the window (while a model from a run was
//!   installed), else 0 — as the protocol defines them.
//! - **Held-out accuracy (test, then train).** The SDK has no fixed held-out split; the
//!   rule is prequential: each rating ingested while a model from a run is installed is
//!   first predicted — by what the device would rank with at that moment: μ + b_j + b_u +
//!   V_j·u when personalisation is on and the model is warm, μ + b_j otherwise — and only
//!   then stored, so no fit (neither the private part nor any update sent before) has seen
//!   it. The error against the rating counts towards `predictions_evaluated`,
//!   `predictions_within_half` (|error| ≤ 0.5), and the absolute and squared error sums.
//!   Items that may not be used to personalise (sensitive without consent, muted) and items
//!   the model does not know are not evaluated.
//!
//! # Cohort
//! [`cohort`]: `light` when the user has rated fewer than [`HEAVY_FROM_RATED_ITEMS`]
//! distinct items (ratings currently held in the store), `heavy` otherwise. Activity only:
//! never identity, never topics.
//!
//! # What leaves the device
//! A window's counts never leave the device as they are. [`Device::prepare_evaluation`]
//! maps them to K = 12 rates in \[0, 1\], each count bounded by its definition
//! ([`fedpref_privacy::evaluation::EvaluationRates::from_counts`]; the cohort becomes which
//! pair of accuracy rates is filled in), centres and clips them, adds Gaussian noise from the
//! OS-seeded [`fedpref_privacy::SecureSampler`] with the noise multiplier the task gave, and
//! records the release in the on-device accountant (one local release, `uploads.kind =
//! evaluation`) before anything is sent — the same clip, noise, record order as a model
//! update. What is sent: the noised rates, the run, the model version (the window: no time
//! is sent), the noise multiplier and the single-use evaluation token the task carried. A
//! window is reported only with a token, so only for a model version the device was given
//! in a task, once; a window without one is closed unsent. Distributed-mode devices release
//! their evaluation the same way, with local noise (the release needs no trust in the
//! aggregation); in their accountant it joins their shares, stated under zero-out
//! neighbouring ([`fedpref_privacy::Budget`]). A device whose user turned training participation off
//! sends nothing. The item ids and topics kept to count feedback and coverage stay in the
//! store (tables `evaluation_shown` and `evaluation_topics`), are deleted with the window
//! once it is reported, and by [`Device::reset_model`] and [`Device::delete_everything`].

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::SdkError;
use crate::device::Device;
use crate::event::{Event, Signal};
use crate::model::PreferenceModel;
use crate::recommend::{Reason, Recommendation};
use crate::store;
use crate::time::Timestamp;

/// A user with at least this many distinct rated items is in the `heavy` cohort.
pub const HEAVY_FROM_RATED_ITEMS: usize = 20;

use crate::store::NEXT_REPORT_KEY;

/// The counts of one window, as `fedpref.v1.EvaluationCounts` carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EvaluationCounts {
    /// Recommendation lists shown.
    pub recommendation_lists_shown: u64,
    /// Items shown, over all lists.
    pub recommendations_shown: u64,
    /// Slots filled by diversity injection, over all lists.
    pub injected_recommendations_shown: u64,
    /// Sum over lists of their intra-list diversity (each in [0, 1]).
    pub intra_list_diversity_sum: f64,
    /// Distinct topics among the items shown.
    pub distinct_topics_shown: u64,
    /// Topics in the catalogue.
    pub catalogue_topic_count: u64,
    /// Thumbs up and saves on recommended items.
    pub positive_feedback_count: u64,
    /// Thumbs down and dismissals of recommended items.
    pub negative_feedback_count: u64,
    /// 1 if personalisation was turned off in the window.
    pub personalisation_opt_outs: u64,
    /// 1 if training participation was turned off in the window.
    pub training_opt_outs: u64,
    /// Held-out ratings predicted.
    pub predictions_evaluated: u64,
    /// Of those, predictions within 0.5 of the rating.
    pub predictions_within_half: u64,
    /// Sum of absolute prediction errors.
    pub prediction_absolute_error_sum: f64,
    /// Sum of squared prediction errors.
    pub prediction_squared_error_sum: f64,
}

/// One open window: what a `ReportMetrics` request would carry.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluationWindow {
    /// The run the model came from.
    pub run_id: String,
    /// The model version evaluated.
    pub model_version: u64,
    /// When the first count of the window was recorded.
    pub start: Timestamp,
    /// The device's cohort (see [`cohort`]).
    pub cohort: &'static str,
    /// The counts.
    pub counts: EvaluationCounts,
}

/// The cohort of a user who rated `rated_items` distinct items: `light` below
/// [`HEAVY_FROM_RATED_ITEMS`], else `heavy`.
pub fn cohort(rated_items: usize) -> &'static str {
    if rated_items < HEAVY_FROM_RATED_ITEMS {
        "light"
    } else {
        "heavy"
    }
}

/// The intra-list diversity of a list given its items' topic sets: the mean pairwise
/// Jaccard distance; 0 for fewer than two items.
pub fn intra_list_diversity(topics: &[&[u32]]) -> f64 {
    let n = topics.len();
    if n < 2 {
        return 0.0;
    }
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (topics[i], topics[j]);
            let common = a.iter().filter(|t| b.contains(t)).count();
            let union = a.len() + b.len() - common;
            if union > 0 {
                sum += 1.0 - common as f64 / union as f64;
            }
        }
    }
    sum / (n * (n - 1) / 2) as f64
}

/// A change to one window's counters.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Delta {
    lists: i64,
    shown: i64,
    injected: i64,
    diversity: f64,
    positive: i64,
    negative: i64,
    personalisation_off: bool,
    training_off: bool,
    predictions: i64,
    within_half: i64,
    abs_error: f64,
    sq_error: f64,
}

/// Opens the window of (run, version) if needed and adds `d` to it.
fn add(
    conn: &Connection,
    run_id: &str,
    version: u64,
    d: &Delta,
    now: Timestamp,
) -> Result<(), SdkError> {
    conn.execute(
        "INSERT INTO evaluation_window (run_id, model_version, start_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (run_id, model_version) DO NOTHING",
        params![run_id, version as i64, now.millis()],
    )?;
    conn.execute(
        "UPDATE evaluation_window SET
           lists = lists + ?3, shown = shown + ?4, injected = injected + ?5,
           diversity_sum = diversity_sum + ?6, positive = positive + ?7,
           negative = negative + ?8,
           personalisation_opt_out = max(personalisation_opt_out, ?9),
           training_opt_out = max(training_opt_out, ?10),
           predictions = predictions + ?11, within_half = within_half + ?12,
           abs_error_sum = abs_error_sum + ?13, sq_error_sum = sq_error_sum + ?14
         WHERE run_id = ?1 AND model_version = ?2",
        params![
            run_id,
            version as i64,
            d.lists,
            d.shown,
            d.injected,
            d.diversity,
            d.positive,
            d.negative,
            d.personalisation_off,
            d.training_off,
            d.predictions,
            d.within_half,
            d.abs_error,
            d.sq_error
        ],
    )?;
    Ok(())
}

/// The run and version of the installed model, if it came from a run.
fn evaluated_model(conn: &Connection) -> Result<Option<(String, u64)>, SdkError> {
    Ok(conn
        .query_row(
            "SELECT s.run_id, g.version FROM installed_snapshot s JOIN global_model g
             ON g.version = s.model_version",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
        )
        .optional()?)
}

impl Device {
    /// Counts a list returned by [`Device::recommend`] as shown.
    pub(crate) fn count_shown(
        &mut self,
        recs: &[Recommendation],
        now: Timestamp,
    ) -> Result<(), SdkError> {
        if recs.is_empty() {
            return Ok(());
        }
        let Some((run, version)) = evaluated_model(&self.conn)? else {
            return Ok(());
        };
        let catalogue = self.ranker.catalogue();
        let topic_sets: Vec<&[u32]> = recs
            .iter()
            .map(|r| {
                catalogue
                    .position(&r.item)
                    .map_or(&[][..], |p| catalogue.topic_ids(p))
            })
            .collect();
        let d = Delta {
            lists: 1,
            shown: recs.len() as i64,
            injected: recs
                .iter()
                .filter(|r| r.reason == Reason::Diversity)
                .count() as i64,
            diversity: intra_list_diversity(&topic_sets),
            ..Delta::default()
        };
        let tx = self.conn.transaction()?;
        add(&tx, &run, version, &d, now)?;
        for (r, topics) in recs.iter().zip(&topic_sets) {
            tx.execute(
                "INSERT OR IGNORE INTO evaluation_shown (run_id, model_version, item) VALUES (?1, ?2, ?3)",
                params![run, version as i64, r.item],
            )?;
            for t in *topics {
                tx.execute(
                    "INSERT OR IGNORE INTO evaluation_topics (run_id, model_version, topic) VALUES (?1, ?2, ?3)",
                    params![run, version as i64, catalogue.topic_name(*t)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records that the user turned a switch from on to off.
    pub(crate) fn count_opt_out(
        &mut self,
        personalisation: bool,
        now: Timestamp,
    ) -> Result<(), SdkError> {
        let Some((run, version)) = evaluated_model(&self.conn)? else {
            return Ok(());
        };
        let d = Delta {
            personalisation_off: personalisation,
            training_off: !personalisation,
            ..Delta::default()
        };
        add(&self.conn, &run, version, &d, now)
    }

    /// Before `events` are stored: predicts each incoming rating (test, then train) and
    /// counts feedback on recommended items. Returns the changes to apply, per window.
    pub(crate) fn evaluate_incoming(
        &mut self,
        events: &[Event],
        now: Timestamp,
    ) -> Result<Vec<(String, u64, Delta)>, SdkError> {
        // Only what will be stored: feedback already past its retention window is not.
        let oldest = now.minus_days(self.config.retention.feedback_days);
        let feedback: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Feedback(f) if f.at >= oldest => Some(f),
                _ => None,
            })
            .collect();
        if feedback.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<(String, u64, Delta)> = Vec::new();
        fn entry(out: &mut Vec<(String, u64, Delta)>, run: &str, version: u64) -> usize {
            match out.iter().position(|(r, v, _)| r == run && *v == version) {
                Some(i) => i,
                None => {
                    out.push((run.to_owned(), version, Delta::default()));
                    out.len() - 1
                }
            }
        }
        // Feedback on items shown in an open window.
        let mut positives = Vec::new();
        for f in &feedback {
            let sign = match f.signal {
                Signal::ThumbsUp | Signal::Save => 1,
                Signal::ThumbsDown | Signal::Dismiss => -1,
                _ => continue,
            };
            let window: Option<(String, i64)> = self
                .conn
                .query_row(
                    "SELECT run_id, model_version FROM evaluation_shown WHERE item = ?1
                     ORDER BY model_version DESC LIMIT 1",
                    [&f.item],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((run, version)) = window {
                positives.push((run, version as u64, sign));
            }
        }
        for (run, version, sign) in positives {
            let i = entry(&mut out, &run, version);
            if sign > 0 {
                out[i].2.positive += 1;
            } else {
                out[i].2.negative += 1;
            }
        }
        // Held-out predictions of incoming ratings.
        let ratings: Vec<(&str, f64)> = feedback
            .iter()
            .filter_map(|f| match f.signal {
                Signal::Rating(v) => Some((f.item.as_str(), v)),
                _ => None,
            })
            .collect();
        if ratings.is_empty() {
            return Ok(out);
        }
        let Some((run, version)) = evaluated_model(&self.conn)? else {
            return Ok(out);
        };
        let personalised = self.settings().personalisation;
        let cache = self.user_cache(now)?;
        let usable = cache.view.usable.clone();
        let private = if personalised {
            cache.view.private.clone()
        } else {
            None
        };
        let model = self.model().expect("an evaluated model is installed");
        let catalogue = self.catalogue();
        let mut d = Delta::default();
        for (item, rating) in ratings {
            let Some(p) = catalogue.position(item) else {
                continue;
            };
            let Some(row) = model.item_index(item) else {
                continue;
            };
            if !usable.get(p).copied().unwrap_or(false) {
                continue;
            }
            let predicted = match &private {
                Some(u) => model.predict(u, row),
                None => model.global_offset() + model.item_biases()[row],
            };
            let err = (predicted - rating).abs();
            if !err.is_finite() {
                continue;
            }
            d.predictions += 1;
            d.within_half += i64::from(err <= 0.5);
            d.abs_error += err;
            d.sq_error += err * err;
        }
        if d.predictions > 0 {
            let i = entry(&mut out, &run, version);
            let e = &mut out[i].2;
            e.predictions += d.predictions;
            e.within_half += d.within_half;
            e.abs_error += d.abs_error;
            e.sq_error += d.sq_error;
        }
        Ok(out)
    }

    /// Applies what [`Device::evaluate_incoming`] found, in the ingestion's transaction.
    pub(crate) fn apply_incoming(
        conn: &Connection,
        deltas: &[(String, u64, Delta)],
        now: Timestamp,
    ) -> Result<(), SdkError> {
        for (run, version, d) in deltas {
            add(conn, run, *version, d, now)?;
        }
        Ok(())
    }

    /// The cohort of this device now (see [`cohort`]).
    pub fn evaluation_cohort(&self) -> Result<&'static str, SdkError> {
        let rated: i64 = self.conn.query_row(
            "SELECT count(DISTINCT item) FROM feedback WHERE kind = 'rating'",
            [],
            |r| r.get(0),
        )?;
        Ok(cohort(usize::try_from(rated).unwrap_or(0)))
    }

    /// The open windows, oldest version first, with the topic counts and cohort filled in
    /// as a report made now would carry them.
    pub fn evaluation_windows(&self) -> Result<Vec<EvaluationWindow>, SdkError> {
        let catalogue_topics = self.catalogue().topic_count() as u64;
        let cohort = self.evaluation_cohort()?;
        let mut stmt = self.conn.prepare(
            "SELECT w.run_id, w.model_version, w.start_ms, w.lists, w.shown, w.injected,
                    w.diversity_sum, w.positive, w.negative, w.personalisation_opt_out,
                    w.training_opt_out, w.predictions, w.within_half, w.abs_error_sum,
                    w.sq_error_sum,
                    (SELECT count(*) FROM evaluation_topics t
                     WHERE t.run_id = w.run_id AND t.model_version = w.model_version)
             FROM evaluation_window w ORDER BY w.model_version, w.run_id",
        )?;
        let u = |v: i64| v.max(0) as u64;
        let rows = stmt.query_map([], |r| {
            Ok(EvaluationWindow {
                run_id: r.get(0)?,
                model_version: u(r.get(1)?),
                start: Timestamp::from_millis(r.get(2)?),
                cohort,
                counts: EvaluationCounts {
                    recommendation_lists_shown: u(r.get(3)?),
                    recommendations_shown: u(r.get(4)?),
                    injected_recommendations_shown: u(r.get(5)?),
                    intra_list_diversity_sum: r.get(6)?,
                    positive_feedback_count: u(r.get(7)?),
                    negative_feedback_count: u(r.get(8)?),
                    personalisation_opt_outs: u(r.get(9)?).min(1),
                    training_opt_outs: u(r.get(10)?).min(1),
                    predictions_evaluated: u(r.get(11)?),
                    predictions_within_half: u(r.get(12)?),
                    prediction_absolute_error_sum: r.get(13)?,
                    prediction_squared_error_sum: r.get(14)?,
                    distinct_topics_shown: u(r.get(15)?).min(catalogue_topics),
                    catalogue_topic_count: catalogue_topics,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Closes a reported window: deletes its counts, the items and topics kept for it and its
    /// evaluation token. Counts added for the same version afterwards open a new window, which
    /// is never sent (the version's one report is used).
    pub fn close_evaluation_window(
        &mut self,
        run_id: &str,
        model_version: u64,
    ) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        for table in [
            "evaluation_window",
            "evaluation_shown",
            "evaluation_topics",
            "evaluation_token",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE run_id = ?1 AND model_version = ?2"),
                params![run_id, model_version as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// When the coordinator last asked the device to report again (None: never asked, so
    /// a report is due as soon as there is something to report).
    pub fn next_evaluation_report(&self) -> Result<Option<Timestamp>, SdkError> {
        Ok(store::get_setting(&self.conn, NEXT_REPORT_KEY)?
            .and_then(|v| v.parse::<i64>().ok())
            .map(Timestamp::from_millis))
    }

    /// Records the earliest time of the next report.
    pub fn set_next_evaluation_report(&mut self, at: Timestamp) -> Result<(), SdkError> {
        store::set_setting(&self.conn, NEXT_REPORT_KEY, &at.millis().to_string())?;
        Ok(())
    }

    /// Whether a report is due at `now`: there is an open window and the coordinator's
    /// `next_report_after` (if it gave one) has passed.
    pub fn evaluation_report_due(&self, now: Timestamp) -> Result<bool, SdkError> {
        let open: bool =
            self.conn
                .query_row("SELECT EXISTS (SELECT 1 FROM evaluation_window)", [], |r| {
                    r.get(0)
                })?;
        Ok(open && self.next_evaluation_report()?.is_none_or(|t| t <= now))
    }

    /// The windows and the items and topics kept for them, for [`Device::export`].
    pub(crate) fn evaluation_export(&self) -> Result<serde_json::Value, SdkError> {
        let windows: Vec<serde_json::Value> = self
            .evaluation_windows()?
            .into_iter()
            .map(|w| {
                serde_json::json!({
                    "run_id": w.run_id,
                    "model_version": w.model_version,
                    "window_start": w.start.to_rfc3339(),
                    "cohort": w.cohort,
                    "counts": w.counts,
                })
            })
            .collect();
        let kept = |table: &str, column: &str| -> Result<Vec<serde_json::Value>, SdkError> {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT run_id, model_version, {column} FROM {table} ORDER BY run_id, model_version, {column}"
            ))?;
            let rows = stmt.query_map([], |r| {
                Ok(serde_json::json!({
                    "run_id": r.get::<_, String>(0)?,
                    "model_version": r.get::<_, i64>(1)?,
                    column: r.get::<_, String>(2)?,
                }))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        Ok(serde_json::json!({
            "windows": windows,
            "items_shown": kept("evaluation_shown", "item")?,
            "topics_shown": kept("evaluation_topics", "topic")?,
        }))
    }

    /// Deletes every window and what was kept for them (reset and delete-everything).
    pub(crate) fn clear_evaluation(conn: &Connection) -> Result<(), SdkError> {
        for table in ["evaluation_window", "evaluation_shown", "evaluation_topics"] {
            conn.execute(&format!("DELETE FROM {table}"), [])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceConfig, MatrixFactorization};

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-06-01T12:00:00Z").unwrap()
    }

    /// A device with 20 items over 4 topics (one sensitive), a model from run `r1`
    /// version 3, and 4 ratings.
    fn device(dir: &tempfile::TempDir) -> Device {
        let mut d = Device::open(dir.path().join("d.db"), DeviceConfig::default()).unwrap();
        let mut lines = String::new();
        for i in 0..20 {
            let topic = ["Comedy", "Drama", "Jazz", "Health"][i % 4];
            let sensitive = topic == "Health";
            lines += &format!(
                "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"],\"sensitive\":{sensitive}}}\n"
            );
        }
        for (item, value) in [("i0", 5.0), ("i4", 4.5), ("i1", 2.0), ("i8", 4.0)] {
            lines += &format!(
                "{{\"type\":\"rating\",\"item\":\"{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
            );
        }
        d.ingest_jsonl(&lines, false, now()).unwrap();
        let items = (0..20).map(|i| format!("i{i}")).collect();
        d.install_model(MatrixFactorization::initial(3, items, 4, 0.1, 7).unwrap())
            .unwrap();
        mark_from_run(&d, "r1", 3);
        d
    }

    fn mark_from_run(d: &Device, run: &str, version: u64) {
        d.conn
            .execute(
                "INSERT OR REPLACE INTO installed_snapshot (id, run_id, model_version, sha256, size_bytes)
                 VALUES (1, ?1, ?2, x'00', 1)",
                params![run, version as i64],
            )
            .unwrap();
    }

    #[test]
    fn intra_list_diversity_is_the_mean_pairwise_jaccard_distance() {
        assert_eq!(intra_list_diversity(&[]), 0.0);
        assert_eq!(intra_list_diversity(&[&[1]]), 0.0);
        assert_eq!(intra_list_diversity(&[&[1], &[1]]), 0.0);
        assert_eq!(intra_list_diversity(&[&[1], &[2]]), 1.0);
        // {1,2} vs {2,3}: 1 − 1/3; {1,2} vs {1,2}: 0; {2,3} vs {1,2}: 1 − 1/3.
        let v = intra_list_diversity(&[&[1, 2], &[2, 3], &[1, 2]]);
        assert!((v - (2.0 * (2.0 / 3.0)) / 3.0).abs() < 1e-12, "{v}");
        assert_eq!(intra_list_diversity(&[&[], &[]]), 0.0);
    }

    #[test]
    fn the_cohort_rule_is_by_rated_items_only() {
        assert_eq!(cohort(0), "light");
        assert_eq!(cohort(HEAVY_FROM_RATED_ITEMS - 1), "light");
        assert_eq!(cohort(HEAVY_FROM_RATED_ITEMS), "heavy");
    }

    #[test]
    fn nothing_is_counted_without_a_model_from_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Device::open(dir.path().join("d.db"), DeviceConfig::default()).unwrap();
        d.ingest_jsonl(
            "{\"type\":\"item\",\"item\":\"a\",\"topics\":[\"X\"]}\n{\"type\":\"item\",\"item\":\"b\",\"topics\":[\"Y\"]}\n",
            false,
            now(),
        )
        .unwrap();
        assert_eq!(d.recommend(2, now()).unwrap().len(), 2);
        d.set_personalisation(false).unwrap();
        assert!(d.evaluation_windows().unwrap().is_empty());
        assert!(!d.evaluation_report_due(now()).unwrap());
        // A model installed by hand belongs to no run: still nothing.
        d.install_model(
            MatrixFactorization::initial(1, vec!["a".into(), "b".into()], 2, 0.1, 1).unwrap(),
        )
        .unwrap();
        d.recommend(2, now()).unwrap();
        assert!(d.evaluation_windows().unwrap().is_empty());
    }

    #[test]
    fn lists_feedback_and_coverage_are_counted_from_what_recommend_returned() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(&dir);
        let a = d.recommend(5, now()).unwrap();
        let b = d.recommend(3, now()).unwrap();
        let w = d.evaluation_windows().unwrap();
        assert_eq!(w.len(), 1);
        let (w, c) = (&w[0], w[0].counts);
        assert_eq!((w.run_id.as_str(), w.model_version), ("r1", 3));
        assert_eq!(w.cohort, "light");
        assert_eq!(c.recommendation_lists_shown, 2);
        assert_eq!(c.recommendations_shown, (a.len() + b.len()) as u64);
        let injected = a
            .iter()
            .chain(&b)
            .filter(|r| r.reason == Reason::Diversity)
            .count();
        assert_eq!(c.injected_recommendations_shown, injected as u64);
        let catalogue = d.catalogue();
        let ild = |l: &[Recommendation]| {
            let t: Vec<&[u32]> = l
                .iter()
                .map(|r| catalogue.topic_ids(catalogue.position(&r.item).unwrap()))
                .collect();
            intra_list_diversity(&t)
        };
        assert!((c.intra_list_diversity_sum - ild(&a) - ild(&b)).abs() < 1e-12);
        let mut topics: Vec<u32> = a
            .iter()
            .chain(&b)
            .flat_map(|r| {
                catalogue
                    .topic_ids(catalogue.position(&r.item).unwrap())
                    .to_vec()
            })
            .collect();
        topics.sort_unstable();
        topics.dedup();
        assert_eq!(c.distinct_topics_shown, topics.len() as u64);
        assert_eq!(c.catalogue_topic_count, 4);
        // Feedback: only on shown items, by kind.
        let shown = &a[0].item;
        let not_shown = (0..20)
            .map(|i| format!("i{i}"))
            .find(|i| !a.iter().chain(&b).any(|r| &r.item == i))
            .unwrap();
        let line = |kind: &str, item: &str| {
            format!("{{\"type\":\"{kind}\",\"item\":\"{item}\",\"at\":\"2026-06-01T11:00:00Z\"}}\n")
        };
        let text = line("save", shown)
            + &line("dismiss", shown)
            + &line("dismiss", &a[1].item)
            + &line("dismiss", &not_shown)
            + &format!(
                "{{\"type\":\"thumbs\",\"item\":\"{shown}\",\"value\":\"down\",\"at\":\"2026-06-01T11:00:00Z\"}}\n"
            );
        d.ingest_jsonl(&text, false, now()).unwrap();
        let c = d.evaluation_windows().unwrap()[0].counts;
        assert_eq!(
            (c.positive_feedback_count, c.negative_feedback_count),
            (1, 3)
        );
        // Nothing about the user's switches yet; no ratings arrived since the model.
        assert_eq!((c.personalisation_opt_outs, c.training_opt_outs), (0, 0));
        assert_eq!(c.predictions_evaluated, 0);
    }

    #[test]
    fn incoming_ratings_are_predicted_before_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(&dir);
        let private = d.private_state(now()).unwrap().expect("warm: 4 examples");
        let model = d.model().unwrap().clone();
        let (r5, r9) = (
            model.item_index("i5").unwrap(),
            model.item_index("i9").unwrap(),
        );
        let p5 = model.predict(&private, r5);
        let p9 = model.predict(&private, r9);
        // i3 is sensitive without consent: not evaluated; "zz" is not in the catalogue.
        let text = "{\"type\":\"rating\",\"item\":\"i5\",\"value\":4.0,\"at\":\"2026-06-01T11:00:00Z\"}\n\
                    {\"type\":\"rating\",\"item\":\"i9\",\"value\":1.0,\"at\":\"2026-06-01T11:00:00Z\"}\n\
                    {\"type\":\"rating\",\"item\":\"i3\",\"value\":1.0,\"at\":\"2026-06-01T11:00:00Z\"}\n\
                    {\"type\":\"rating\",\"item\":\"zz\",\"value\":1.0,\"at\":\"2026-06-01T11:00:00Z\"}\n";
        d.ingest_jsonl(text, false, now()).unwrap();
        let c = d.evaluation_windows().unwrap()[0].counts;
        let (e5, e9) = ((p5 - 4.0).abs(), (p9 - 1.0).abs());
        assert_eq!(c.predictions_evaluated, 2);
        assert_eq!(
            c.predictions_within_half,
            u64::from(e5 <= 0.5) + u64::from(e9 <= 0.5)
        );
        assert!((c.prediction_absolute_error_sum - (e5 + e9)).abs() < 1e-9);
        assert!((c.prediction_squared_error_sum - (e5 * e5 + e9 * e9)).abs() < 1e-9);
        // With personalisation off the prediction is the baseline μ + b_j.
        d.set_personalisation(false).unwrap();
        d.ingest_jsonl(
            "{\"type\":\"rating\",\"item\":\"i6\",\"value\":3.0,\"at\":\"2026-06-01T11:30:00Z\"}\n",
            false,
            now(),
        )
        .unwrap();
        let base = model.global_offset() + model.item_biases()[model.item_index("i6").unwrap()];
        let c2 = d.evaluation_windows().unwrap()[0].counts;
        assert_eq!(c2.predictions_evaluated, 3);
        assert!(
            (c2.prediction_absolute_error_sum
                - c.prediction_absolute_error_sum
                - (base - 3.0).abs())
            .abs()
                < 1e-9
        );
        assert_eq!(c2.personalisation_opt_outs, 1);
    }

    #[test]
    fn windows_survive_a_restart_and_close_after_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(&dir);
        d.recommend(4, now()).unwrap();
        d.set_training(false).unwrap();
        // Turning a switch off that is already off counts nothing new.
        d.set_training(false).unwrap();
        let before = d.evaluation_windows().unwrap();
        assert_eq!(before[0].counts.training_opt_outs, 1);
        assert!(d.evaluation_report_due(now()).unwrap());
        drop(d);
        let mut d = Device::open(dir.path().join("d.db"), DeviceConfig::default()).unwrap();
        assert_eq!(d.evaluation_windows().unwrap(), before);
        d.set_next_evaluation_report(Timestamp::from_millis(now().millis() + 1000))
            .unwrap();
        assert!(!d.evaluation_report_due(now()).unwrap());
        assert!(
            d.evaluation_report_due(Timestamp::from_millis(now().millis() + 1000))
                .unwrap()
        );
        d.close_evaluation_window("r1", 3).unwrap();
        assert!(d.evaluation_windows().unwrap().is_empty());
        let shown: i64 = d
            .conn
            .query_row("SELECT count(*) FROM evaluation_shown", [], |r| r.get(0))
            .unwrap();
        assert_eq!(shown, 0);
        // A new list opens a new window for the same version.
        d.recommend(2, now()).unwrap();
        let w = d.evaluation_windows().unwrap();
        assert_eq!(w[0].counts.recommendation_lists_shown, 1);
        assert_eq!(w[0].counts.training_opt_outs, 0);
    }

    #[test]
    fn reset_and_delete_everything_clear_the_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(&dir);
        d.recommend(4, now()).unwrap();
        d.reset_model().unwrap();
        assert!(d.evaluation_windows().unwrap().is_empty());
        d.recommend(4, now()).unwrap();
        assert_eq!(d.evaluation_windows().unwrap().len(), 1);
        let export = d.export(now()).unwrap();
        assert_eq!(export["evaluation"]["windows"][0]["run_id"], "r1");
        assert_eq!(
            export["evaluation"]["windows"][0]["counts"]["recommendation_lists_shown"],
            1
        );
        assert!(
            !export["evaluation"]["items_shown"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        d.set_next_evaluation_report(now()).unwrap();
        d.delete_everything().unwrap();
        assert!(d.evaluation_windows().unwrap().is_empty());
        assert_eq!(d.next_evaluation_report().unwrap(), None);
        let export = d.export(now()).unwrap();
        assert_eq!(export["evaluation"]["items_shown"], serde_json::json!([]));
    }
}

/// A federated-evaluation release whose spend is recorded: the only evaluation the SDK
/// sends. Built only by [`Device::prepare_evaluation`].
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedEvaluation {
    run_id: String,
    model_version: u64,
    token: String,
    noise_multiplier: f64,
    released: Vec<f64>,
}

impl PreparedEvaluation {
    /// The run.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    /// The model version evaluated.
    pub fn model_version(&self) -> u64 {
        self.model_version
    }
    /// The single-use token from the task.
    pub fn token(&self) -> &str {
        &self.token
    }
    /// σ applied.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }
    /// The released (centred, noised, clamped) rates, in wire order.
    pub fn released_rates(&self) -> &[f64] {
        &self.released
    }
}

/// What became of a window [`Device::prepare_evaluation`] was asked to release.
#[derive(Clone, Debug, PartialEq)]
pub enum EvaluationRelease {
    /// Released and recorded: send it.
    Ready(PreparedEvaluation),
    /// Not released, and why; the window was closed, so its counts never leave the device.
    Dropped(String),
}

impl Device {
    /// Keeps the evaluation token a task gave for (run, model version).
    #[cfg(feature = "grpc")]
    pub(crate) fn store_evaluation_token(
        &mut self,
        run_id: &str,
        model_version: u64,
        token: &str,
        noise_multiplier: f64,
    ) -> Result<(), SdkError> {
        self.conn.execute(
            "INSERT INTO evaluation_token (run_id, model_version, token, noise_multiplier)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (run_id, model_version) DO UPDATE SET token = excluded.token,
               noise_multiplier = excluded.noise_multiplier",
            params![run_id, model_version as i64, token, noise_multiplier],
        )?;
        Ok(())
    }

    /// Releases one window's evaluation: bound, centre, clip, noise (OS-seeded secure
    /// sampler), record the spend (in one `BEGIN IMMEDIATE` transaction with the budget
    /// check) — in that order — or refuses. Training off: [`SdkError::TrainingOff`], nothing
    /// recorded, the window kept. No token for the window's model version, a noise
    /// multiplier below [`fedpref_privacy::evaluation::MIN_NOISE_MULTIPLIER`], or a budget
    /// that would be exceeded: [`EvaluationRelease::Dropped`], the window closed unsent.
    pub fn prepare_evaluation(
        &mut self,
        window: &EvaluationWindow,
        now: Timestamp,
    ) -> Result<EvaluationRelease, SdkError> {
        use fedpref_privacy::evaluation as ev;
        if !self.settings().training {
            return Err(SdkError::TrainingOff);
        }
        let token: Option<(String, f64)> = self
            .conn
            .query_row(
                "SELECT token, noise_multiplier FROM evaluation_token WHERE run_id = ?1 AND model_version = ?2",
                params![window.run_id, window.model_version as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let drop = |d: &mut Self, why: String| -> Result<EvaluationRelease, SdkError> {
            d.close_evaluation_window(&window.run_id, window.model_version)?;
            Ok(EvaluationRelease::Dropped(why))
        };
        let Some((token, sigma)) = token else {
            return drop(
                self,
                format!(
                    "no task for run {} model version {} carried an evaluation token",
                    window.run_id, window.model_version
                ),
            );
        };
        if !(sigma.is_finite() && sigma >= ev::MIN_NOISE_MULTIPLIER) {
            return drop(
                self,
                format!(
                    "the task's evaluation noise multiplier {sigma} is below the SDK's minimum"
                ),
            );
        }
        let c = &window.counts;
        let rates = ev::EvaluationRates::from_counts(&ev::EvaluationCounts {
            lists_shown: c.recommendation_lists_shown,
            items_shown: c.recommendations_shown,
            injected_shown: c.injected_recommendations_shown,
            intra_list_diversity_sum: c.intra_list_diversity_sum,
            distinct_topics_shown: c.distinct_topics_shown,
            catalogue_topics: c.catalogue_topic_count,
            positive_feedback: c.positive_feedback_count,
            negative_feedback: c.negative_feedback_count,
            personalisation_opt_out: c.personalisation_opt_outs > 0,
            predictions: c.predictions_evaluated,
            predictions_within_half: c.predictions_within_half,
            heavy: window.cohort == "heavy",
        });
        let mut sampler = fedpref_privacy::SecureSampler::from_os()?;
        let released = ev::release_rates(&rates, sigma, &mut sampler)?;
        let spent = self.record_spend(
            &ev::release(sigma),
            &crate::upload::UploadRow {
                kind: "evaluation",
                round_id: 0,
                model_version: window.model_version,
                noise_multiplier: sigma,
                clip_norm: ev::clip_norm(),
                honest: None,
            },
            now,
        );
        match spent {
            Ok(_) => {}
            Err(SdkError::BudgetExceeded(e)) => {
                return drop(self, format!("the privacy budget does not allow it: {e}"));
            }
            Err(e) => return Err(e),
        }
        // The token stays until the coordinator acknowledges the report (closing the window
        // deletes it): a report lost on the way is released afresh, and spent again, next time.
        Ok(EvaluationRelease::Ready(PreparedEvaluation {
            run_id: window.run_id.clone(),
            model_version: window.model_version,
            token,
            noise_multiplier: sigma,
            released: released.into_values(),
        }))
    }
}
