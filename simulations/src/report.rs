//! What a run writes: per-round metrics as CSV and JSON, and the summary object.
//!
//! `metrics.csv` and `metrics.json` hold only what the seed determines (no timings), so
//! the same seed gives the same bytes on any number of threads; `summary.json` adds the
//! speed and memory figures, which depend on the machine. With `[guardrails]` configured,
//! `alerts.json` lists every alert (round, metric, value, threshold, baseline).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::data::Dataset;
use crate::sim::{RoundRecord, Timings};

fn opt(x: Option<f64>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

/// The per-round metrics as CSV: one row per round, empty cells where a round was not
/// evaluated or a metric does not apply. Runs with the feedback scenario get two more
/// columns at the end, `negative_feedback_rate` and `opt_out_rate`.
pub fn metrics_csv(data: &Dataset, records: &[RoundRecord]) -> String {
    let feedback = records.iter().any(|r| r.feedback.is_some());
    let audiences: Vec<String> = records
        .first()
        .map(|r| r.epsilon.iter().map(|e| e.audience.clone()).collect())
        .unwrap_or_default();
    let mut s = String::from(
        "round,contributions,abandoned,rmse,mae,rating_accuracy,hit_rate_at_10,ndcg_at_10,coverage,intra_list_diversity,injected_share",
    );
    for c in &data.cohorts {
        let _ = write!(s, ",rmse_{c}");
    }
    s.push_str(",cohort_rmse_gap");
    for a in &audiences {
        let _ = write!(s, ",epsilon_{a}");
    }
    if feedback {
        s.push_str(",negative_feedback_rate,opt_out_rate");
    }
    s.push('\n');
    for r in records {
        let _ = write!(
            s,
            "{},{},{}",
            r.round,
            r.contributions,
            u8::from(r.abandoned.is_some())
        );
        match &r.evaluation {
            Some(e) => {
                let _ = write!(
                    s,
                    ",{},{},{},{},{},{},{},{}",
                    e.rmse,
                    e.mae,
                    e.rating_accuracy,
                    opt(e.hit_rate_at_10),
                    opt(e.ndcg_at_10),
                    opt(e.coverage),
                    opt(e.intra_list_diversity),
                    opt(e.injected_share)
                );
                for c in 0..data.cohorts.len() {
                    let _ = write!(s, ",{}", opt(e.cohort_rmse.get(c).copied().flatten()));
                }
                let _ = write!(s, ",{}", opt(e.cohort_rmse_gap));
            }
            None => s.push_str(&",".repeat(9 + data.cohorts.len())),
        }
        for a in &audiences {
            let eps = r
                .epsilon
                .iter()
                .find(|e| &e.audience == a)
                .map(|e| e.epsilon);
            let _ = write!(s, ",{}", opt(eps));
        }
        if feedback {
            let f = r.feedback.as_ref();
            let _ = write!(
                s,
                ",{},{}",
                opt(f.and_then(|f| f.negative_feedback_rate)),
                opt(f.map(|f| f.opt_out_rate))
            );
        }
        s.push('\n');
    }
    s
}

/// The per-round metrics as one JSON document: the data set, the settings and the rounds.
pub fn metrics_json(data: &Dataset, settings: Value, records: &[RoundRecord]) -> Value {
    json!({
        "dataset": {
            "name": data.name,
            "users": data.users.len(),
            "items": data.items.len(),
            "train_ratings": data.train_ratings(),
            "test_ratings": data.test_ratings(),
            "cohorts": data.cohorts,
        },
        "settings": settings,
        "rounds": records,
    })
}

/// Peak resident memory of this process (`VmHWM` of `/proc/self/status`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The summary object `--json` prints, with the documented keys in their order (the
/// feedback scenario's keys and the alert count are appended by the caller). Privacy keys
/// are null in mode `none`; metrics of a run that was never evaluated are null.
pub fn summary(
    records: &[RoundRecord],
    delta: Option<f64>,
    seed: u64,
    client_updates: u64,
    timings: &Timings,
) -> Value {
    let last = records.iter().rev().find_map(|r| r.evaluation.as_ref());
    let get = |f: &dyn Fn(&crate::metrics::Evaluation) -> Option<f64>| last.and_then(f);
    let spent = records.last().and_then(|r| r.epsilon.first());
    let seconds = timings.rounds_wall_ns as f64 / 1e9;
    json!({
        "rmse": get(&|e| Some(e.rmse)),
        "mae": get(&|e| Some(e.mae)),
        "rating_accuracy": get(&|e| Some(e.rating_accuracy)),
        "hit_rate_at_10": get(&|e| e.hit_rate_at_10),
        "ndcg_at_10": get(&|e| e.ndcg_at_10),
        "intra_list_diversity": get(&|e| e.intra_list_diversity),
        "coverage": get(&|e| e.coverage),
        "injected_share": get(&|e| e.injected_share),
        "cohort_rmse_gap": get(&|e| e.cohort_rmse_gap),
        "epsilon": spent.map(|s| s.epsilon),
        "epsilon_accountant": spent.and_then(|s| s.accountant).map(|a| a.as_str()),
        "delta": spent.and(delta),
        "epsilon_assumption": spent.map(|s| s.audience.clone()),
        "rounds": records.iter().filter(|r| r.abandoned.is_none()).count(),
        "client_updates": client_updates,
        "client_updates_per_s": (seconds > 0.0).then(|| client_updates as f64 / seconds),
        "peak_rss_bytes": peak_rss_bytes(),
        "seed": seed,
    })
}

/// Adds, after the other keys, `epsilon_rests_on` — the assumption the run's ε rests on, in
/// words: "Poisson sampling from a population of N", "participation limits (separation s, at
/// most k)" or "none (worst case per device)" — when the run spent privacy, and `clip_norm`
/// (adaptive clipping's final C) when the run clipped adaptively.
pub fn add_privacy_details(summary: &mut Value, records: &[RoundRecord], assumption: Option<&str>) {
    if summary["epsilon"].is_number()
        && let Some(a) = assumption
    {
        summary["epsilon_rests_on"] = json!(a);
    }
    if let Some(c) = records.iter().rev().find_map(|r| r.clip_norm) {
        summary["clip_norm"] = json!(c);
    }
}

/// Adds the feedback scenario's figures to a summary, after its other keys, when the run
/// modelled them: `opt_out_rate` (the share of the training population opted out by the
/// end) and `negative_feedback_rate` (disliked ÷ recommended slots over the whole run).
pub fn add_feedback(summary: &mut Value, records: &[RoundRecord]) {
    let rounds: Vec<_> = records.iter().filter_map(|r| r.feedback.as_ref()).collect();
    let Some(last) = rounds.last() else {
        return;
    };
    let recommended: u64 = rounds.iter().map(|f| f.recommended).sum();
    let negative: u64 = rounds.iter().map(|f| f.negative).sum();
    summary["opt_out_rate"] = json!(last.opt_out_rate);
    summary["negative_feedback_rate"] =
        json!((recommended > 0).then(|| negative as f64 / recommended as f64));
}

/// Writes `metrics.csv`, `metrics.json` and `summary.json` under `out` (created if needed)
/// and returns their paths.
pub fn write(
    out: &Path,
    csv: &str,
    metrics: &Value,
    summary: &Value,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let files = [
        (out.join("metrics.csv"), csv.to_string()),
        (
            out.join("metrics.json"),
            serde_json::to_string_pretty(metrics).expect("serialisable") + "\n",
        ),
        (
            out.join("summary.json"),
            serde_json::to_string_pretty(summary).expect("serialisable") + "\n",
        ),
    ];
    for (path, text) in &files {
        std::fs::write(path, text)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}
