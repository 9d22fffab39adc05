//! `fedpref-sim`'s commands, dispatched: the one place that knows every command, so that the
//! command line's definitions ([`crate::cli`]) and the commands built on them
//! ([`crate::bench`], [`crate::sweep`], [`crate::frontier`]) do not depend on each other.

use crate::cli::{Cli, CliError, Command, export_split, plan, run_plan, with_threads};
use crate::progress;
use crate::{bench, frontier, sweep};
use serde_json::Value;

/// Runs the command and returns what to print on stdout.
pub fn execute(cli: &Cli) -> Result<String, CliError> {
    match &cli.command {
        Command::Run(args) => {
            let plan = plan(args)?;
            let bar = progress::bar(plan.settings.rounds, "round", args.quiet);
            let outcome = with_threads(args.threads, || {
                run_plan(&plan, args.centralised, &plan.out, bar.as_ref())
            })??;
            bar.finish();
            if args.json {
                return Ok(outcome.summary.to_string());
            }
            let s = &outcome.summary;
            let mut text = format!(
                "{} on {} ({} users, {} items): {} rounds, {} client updates\n",
                if args.centralised {
                    "centralised"
                } else {
                    "federated"
                },
                plan.data.name,
                plan.data.users.len(),
                plan.data.items.len(),
                s["rounds"],
                s["client_updates"],
            );
            text += &format!(
                "rmse {}  mae {}  rating_accuracy {}  hit_rate@10 {}  ndcg@10 {}  coverage {}  diversity {}  injected {}  cohort gap {}\n",
                fmt(&s["rmse"]),
                fmt(&s["mae"]),
                fmt(&s["rating_accuracy"]),
                fmt(&s["hit_rate_at_10"]),
                fmt(&s["ndcg_at_10"]),
                fmt(&s["coverage"]),
                fmt(&s["intra_list_diversity"]),
                fmt(&s["injected_share"]),
                fmt(&s["cohort_rmse_gap"]),
            );
            text += &format!(
                "global-mean baseline rmse {:.4}\n",
                crate::metrics::global_mean_rmse(&plan.data)
            );
            if s.get("popularity_hit_rate_at_10").is_some() {
                text += &format!(
                    "popularity ranking hit_rate@10 {}  ndcg@10 {}\n",
                    fmt(&s["popularity_hit_rate_at_10"]),
                    fmt(&s["popularity_ndcg_at_10"]),
                );
            }
            if let Some(c) = s.get("centralised") {
                text += &format!(
                    "centralised: {} sweeps of alternating least squares, chosen on validation data\n",
                    c["sweeps"]
                );
            }
            if s.get("opt_out_rate").is_some() {
                text += &format!(
                    "user feedback: negative_feedback_rate {}  opt_out_rate {}\n",
                    fmt(&s["negative_feedback_rate"]),
                    fmt(&s["opt_out_rate"]),
                );
            }
            if let Some(n) = s.get("alerts") {
                text += &format!("guardrail alerts: {n} (see alerts.json)\n");
            }
            if let Some(eps) = s["epsilon"].as_f64() {
                text += &format!(
                    "ε = {eps:.4} at δ = {} (σ = {:.4}), {}; assumption: {}\n",
                    s["delta"],
                    outcome.noise_multiplier.unwrap_or(0.0),
                    s["epsilon_assumption"].as_str().unwrap_or(""),
                    s["epsilon_rests_on"].as_str().unwrap_or("")
                );
                if let Some(c) = s.get("clip_norm").and_then(Value::as_f64) {
                    text += &format!("adaptive clipping: final C = {c:.4}\n");
                }
            }
            text += &format!(
                "wrote {}",
                outcome
                    .files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(text)
        }
        Command::Bench(args) => with_threads(args.threads, || bench::run(args))?,
        Command::Sweep(args) => with_threads(args.threads, || sweep::run(args))?,
        Command::ExportSplit(args) => export_split(args),
        Command::Frontier(args) => with_threads(args.threads, || frontier::run(args))?,
    }
}

/// A summary number to four decimals, or `n/a`.
fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.4}"),
        None => "n/a".into(),
    }
}
