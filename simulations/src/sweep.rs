//! `fedpref-sim sweep --grid FILE`: every combination of a grid of `run` settings, run in
//! parallel, summarised in one table (`sweep.csv`, `sweep.json`), each run's metrics under
//! `run-NNN/`.
//!
//! ```toml
//! [base]                      # any `run` setting, for every run
//! dataset = "synthetic"
//! rounds = 20
//! privacy_mode = "central"
//! sampling_rate = 0.1
//!
//! [grid]                      # a list per setting; runs are numbered in this order
//! noise_multiplier = [0.5, 1.0, 2.0]
//! clip_norm = [0.5, 1.0]
//! ```
//!
//! The table holds only what the seed determines, so it is the same bytes on any number of
//! threads.

use std::path::PathBuf;

use crate::progress::{self, Quiet};
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::cli::{CliError, SweepArgs, plan_from_table, run_plan};

fn usage(m: String) -> CliError {
    CliError::Usage(m)
}

/// The combinations of a grid file: (the grid's settings for the run, the run's full table).
pub fn combinations(text: &str, file: &str) -> Result<Vec<(toml::Table, toml::Table)>, CliError> {
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| usage(format!("--grid {file}: {}", e.to_string().trim_end())))?;
    if let Some(key) = doc.keys().find(|k| *k != "base" && *k != "grid") {
        return Err(usage(format!(
            "--grid {file}: unknown key `{key}` (expected [base] and [grid])"
        )));
    }
    let table = |doc: &mut toml::Table, key: &str| match doc.remove(key) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(_) => Err(usage(format!("--grid {file}: `{key}` must be a table"))),
    };
    let base = table(&mut doc, "base")?;
    let grid = table(&mut doc, "grid")?;
    let mut runs = vec![(toml::Table::new(), base)];
    for (key, values) in grid {
        let toml::Value::Array(values) = values else {
            return Err(usage(format!(
                "--grid {file}: grid.{key} must be a list of values"
            )));
        };
        if values.is_empty() {
            return Err(usage(format!("--grid {file}: grid.{key} is empty")));
        }
        let mut next = Vec::with_capacity(runs.len() * values.len());
        for (chosen, table) in &runs {
            for v in &values {
                let (mut chosen, mut table) = (chosen.clone(), table.clone());
                chosen.insert(key.clone(), v.clone());
                table.insert(key.clone(), v.clone());
                next.push((chosen, table));
            }
        }
        runs = next;
    }
    Ok(runs)
}

/// Runs the sweep and returns the text (or JSON) to print.
pub fn run(args: &SweepArgs) -> Result<String, CliError> {
    let file = args.grid.display().to_string();
    let text =
        std::fs::read_to_string(&args.grid).map_err(|e| usage(format!("--grid {file}: {e}")))?;
    let runs = combinations(&text, &file)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("fedpref-sim-sweep"));
    // Resolve every plan first, so a bad combination fails before anything runs.
    let plans = runs
        .iter()
        .enumerate()
        .map(|(i, (_, table))| {
            plan_from_table(table.clone(), &format!("--grid {file}, run {}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bar = progress::bar(plans.len() as u64, "run", false);
    let rows: Vec<Value> = plans
        .par_iter()
        .zip(&runs)
        .enumerate()
        .map(|(i, (plan, (chosen, _)))| {
            let dir = out.join(format!("run-{:03}", i + 1));
            let outcome = run_plan(plan, false, &dir, &Quiet)?;
            let s = &outcome.summary;
            let mut row = json!({ "run": i + 1 });
            for (k, v) in chosen {
                row[k] = serde_json::to_value(v).expect("TOML is JSON-representable");
            }
            for k in [
                "rmse",
                "mae",
                "rating_accuracy",
                "hit_rate_at_10",
                "ndcg_at_10",
                "coverage",
                "cohort_rmse_gap",
                "epsilon",
                "epsilon_assumption",
                "client_updates",
            ] {
                row[k] = s[k].clone();
            }
            // Present only where the runs model feedback or configure guardrails.
            for k in ["opt_out_rate", "negative_feedback_rate", "alerts"] {
                if let Some(v) = s.get(k) {
                    row[k] = v.clone();
                }
            }
            row["noise_multiplier_used"] = json!(outcome.noise_multiplier);
            bar.advance();
            Ok(row)
        })
        .collect::<Result<_, CliError>>()?;
    bar.finish();
    let keys: Vec<String> = rows
        .first()
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let mut csv = keys.join(",") + "\n";
    for row in &rows {
        let cells: Vec<String> = keys
            .iter()
            .map(|k| match &row[k] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect();
        csv += &(cells.join(",") + "\n");
    }
    let table = Value::Array(rows);
    std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("sweep.csv"), &csv))
        .and_then(|()| {
            std::fs::write(
                out.join("sweep.json"),
                serde_json::to_string_pretty(&table).expect("serialisable") + "\n",
            )
        })
        .map_err(|e| CliError::Failed(anyhow::anyhow!("--out {}: {e}", out.display())))?;
    let mut privacy_utility: Vec<(f64, f64)> = table
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|r| Some((r["epsilon"].as_f64()?, r["rmse"].as_f64()?)))
        .collect();
    privacy_utility.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let plots = crate::plot::line_plot(
        &out.join("rmse_vs_epsilon"),
        "test RMSE vs ε (one point per run)",
        "ε",
        "test RMSE",
        &privacy_utility,
    )
    .map_err(|e| CliError::Failed(e.into()))?;
    if args.json {
        return Ok(table.to_string());
    }
    let mut written = vec![out.join("sweep.csv"), out.join("sweep.json")];
    written.extend(plots);
    Ok(format!(
        "{csv}wrote {} ({} runs)",
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        runs.len()
    ))
}
