//! `fedpref-sim frontier`: test RMSE against ε for the privacy modes `local`, `central` and
//! `distributed`, at several synthetic populations and on MovieLens 1M, as one CSV
//! (`frontier.csv`, also `frontier.json`) and one plot (`frontier.png`, `frontier.svg`: a
//! panel per data set, ε on a log scale), with reference lines that do not depend on ε.
//!
//! # The grid
//! For every data set in `--populations` (a synthetic population size, or `movielens-1m`),
//! every mode in `--modes` and every ε in `--epsilons`, one `run` with the same settings
//! apart from the privacy mode and ε:
//! - synthetic data: `--items` items (1,000), a cohort of `--cohort-share` (1 %) of the
//!   population each round, drawn uniformly without replacement; MovieLens 1M: every user
//!   in every round (its 6,040 users would make a 1 % cohort of 60);
//! - `--rounds` (50), `--factors` (16), `--clip-norm` (1), FedAdam at
//!   `--server-learning-rate`, every other setting `run`'s default;
//! - the unit of privacy is a user (one device); δ = `--delta` (10⁻⁷) everywhere; ε is the
//!   engine's for the audience `release_observers` (no assumption about who was sampled);
//! - σ for the target ε: modes `local` and `central` are calibrated by the run manifest
//!   (as `run --target-epsilon` is); mode `distributed` by bisection on σ over the very
//!   distributed discrete Gaussian plan the coordinator would run (its RDP accountant),
//!   to the smallest σ whose ε does not exceed the target.
//!
//! # The reference lines
//! Per data set, with no ε: `no-noise` — the same run with devices clipping to C and no
//! noise (what the noise costs is the gap to it); `bias-only` — global mean + user and item
//! biases, no factors, fitted centrally as Surprise's `BaselineOnly` does
//! ([`crate::baseline`]); `global-mean` — the training mean. A private model is worth having
//! when it is below `bias-only`.
//!
//! `--quick` is a grid small enough for tests: 1,000 synthetic users, 100 items, a cohort of
//! 100, 3 rounds, ε ∈ {1, 16}. Mode `distributed` runs real SecAgg+ on every device, so it is
//! left out where the cohort exceeds `--distributed-max-cohort` (100). Runs go one after another (each uses every core), so only one
//! data set is in memory at a time.

use std::path::PathBuf;
use std::time::Instant;

use crate::progress::Quiet;
use fedpref_engine::manifest::ManifestPrivacyMode;
use fedpref_privacy::OrderGrid;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::baseline::bias_only_rmse;
use crate::cli::{CliError, FrontierArgs, FrontierMode, plan_from_table, run_plan};
use crate::distributed::DistributedPlan;
use crate::metrics::global_mean_rmse;
use crate::plot::{COLOURS, FONT, PlotError, register_font};

/// A data set of the frontier.
#[derive(Clone, Debug, PartialEq)]
pub enum Population {
    /// The synthetic generator with this many users.
    Synthetic(usize),
    /// MovieLens 1M.
    Movielens1m,
}

impl Population {
    fn parse(s: &str) -> Result<Self, CliError> {
        let s = s.trim();
        if s == "movielens-1m" {
            return Ok(Self::Movielens1m);
        }
        match s.replace('_', "").parse::<usize>() {
            Ok(n) if n >= 2 => Ok(Self::Synthetic(n)),
            _ => Err(CliError::Usage(format!(
                "--populations {s}: each entry must be a synthetic population of at least 2 users or `movielens-1m`"
            ))),
        }
    }

    fn label(&self) -> String {
        match self {
            Self::Synthetic(n) => format!("synthetic, {} users", thousands(*n)),
            Self::Movielens1m => "MovieLens 1M".into(),
        }
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The grid, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Data sets.
    pub populations: Vec<Population>,
    /// Modes.
    pub modes: Vec<FrontierMode>,
    /// Target ε values, ascending.
    pub epsilons: Vec<f64>,
    /// δ.
    pub delta: f64,
    /// Rounds.
    pub rounds: u64,
    /// Synthetic items.
    pub items: usize,
    /// Synthetic cohort share.
    pub cohort_share: f64,
    /// k.
    pub factors: usize,
    /// C.
    pub clip_norm: f64,
    /// FedAdam's η.
    pub server_learning_rate: f64,
    /// The largest cohort mode distributed is simulated at.
    pub distributed_max_cohort: u64,
    /// MovieLens 1M's directory.
    pub path: Option<PathBuf>,
    /// Score on validation data.
    pub validation: bool,
    /// Seed.
    pub seed: u64,
}

/// The default server learning rate of the frontier's runs: `run`'s, so that the
/// million-user central point at ε = 1 is `run`'s own command for it.
pub const DEFAULT_SERVER_LEARNING_RATE: f64 = 0.03;

impl Grid {
    /// Resolves the flags (with `--quick`'s defaults when given); errors name the flag.
    pub fn from_args(args: &FrontierArgs) -> Result<Self, CliError> {
        let usage = |m: String| CliError::Usage(m);
        let quick = args.quick;
        let populations = match &args.populations {
            Some(list) => list
                .iter()
                .map(|s| Population::parse(s))
                .collect::<Result<Vec<_>, _>>()?,
            None if quick => vec![Population::Synthetic(1_000)],
            None => vec![
                Population::Synthetic(10_000),
                Population::Synthetic(100_000),
                Population::Synthetic(1_000_000),
                Population::Movielens1m,
            ],
        };
        if populations.is_empty() {
            return Err(usage("--populations: give at least one data set".into()));
        }
        let modes = args.modes.clone().unwrap_or_else(|| {
            vec![
                FrontierMode::Local,
                FrontierMode::Central,
                FrontierMode::Distributed,
            ]
        });
        let mut epsilons = args.epsilons.clone().unwrap_or_else(|| {
            if quick {
                vec![1.0, 16.0]
            } else {
                vec![1.0, 4.0, 16.0]
            }
        });
        if let Some(e) = epsilons.iter().find(|e| !(e.is_finite() && **e > 0.0)) {
            return Err(usage(format!(
                "--epsilons {e}: every ε must be a finite number > 0"
            )));
        }
        if epsilons.is_empty() || modes.is_empty() {
            return Err(usage(
                "--epsilons and --modes: give at least one value each".into(),
            ));
        }
        epsilons.sort_by(f64::total_cmp);
        epsilons.dedup();
        let delta = args.delta.unwrap_or(1e-7);
        if !(delta > 0.0 && delta < 1.0) {
            return Err(usage(format!("--delta {delta}: must be in (0, 1)")));
        }
        let cohort_share = args.cohort_share.unwrap_or(if quick { 0.1 } else { 0.01 });
        if !(cohort_share > 0.0 && cohort_share <= 1.0) {
            return Err(usage(format!(
                "--cohort-share {cohort_share}: must be in (0, 1]"
            )));
        }
        let rounds = args.rounds.unwrap_or(if quick { 3 } else { 50 });
        if rounds == 0 {
            return Err(usage("--rounds 0: must be at least 1".into()));
        }
        let items = args.items.unwrap_or(if quick { 100 } else { 1_000 });
        if items < 2 {
            return Err(usage(format!("--items {items}: must be at least 2")));
        }
        let clip_norm = args.clip_norm.unwrap_or(1.0);
        let server_learning_rate = args
            .server_learning_rate
            .unwrap_or(DEFAULT_SERVER_LEARNING_RATE);
        for (flag, v) in [
            ("--clip-norm", clip_norm),
            ("--server-learning-rate", server_learning_rate),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(usage(format!("{flag} {v}: must be a finite number > 0")));
            }
        }
        Ok(Self {
            populations,
            modes,
            epsilons,
            delta,
            rounds,
            items,
            cohort_share,
            factors: args.factors.unwrap_or(16),
            clip_norm,
            server_learning_rate,
            distributed_max_cohort: args.distributed_max_cohort.unwrap_or(100),
            path: args.path.clone(),
            validation: args.validation,
            seed: args.seed.unwrap_or(42),
        })
    }

    /// Devices per round on `population` (`users` of them train).
    pub fn cohort(&self, population: &Population, users: usize) -> u64 {
        match population {
            Population::Synthetic(n) => ((*n as f64) * self.cohort_share).round().max(1.0) as u64,
            Population::Movielens1m => users as u64,
        }
    }

    /// The `run` settings every run on `population` shares (as a `--config` table).
    fn base(&self, population: &Population) -> toml::Table {
        let mut t = toml::Table::new();
        let mut set = |k: &str, v: toml::Value| {
            t.insert(k.into(), v);
        };
        match population {
            Population::Synthetic(n) => {
                set("dataset", "synthetic".into());
                set("users", (*n as i64).into());
                set("items", (self.items as i64).into());
                set("cohort_size", (self.cohort(population, *n) as i64).into());
            }
            Population::Movielens1m => {
                set("dataset", "movielens-1m".into());
                set("cohort_size", i64::from(u32::MAX).into());
                if let Some(p) = &self.path {
                    set("path", p.display().to_string().into());
                }
            }
        }
        set("rounds", (self.rounds as i64).into());
        set("factors", (self.factors as i64).into());
        set("clip_norm", self.clip_norm.into());
        set("server_optimizer", "fedadam".into());
        set("server_learning_rate", self.server_learning_rate.into());
        set("fedavg_weighting", "uniform".into());
        set("seed", (self.seed as i64).into());
        set("eval_every", 0.into());
        set("validation", self.validation.into());
        t
    }
}

/// One row of the frontier: a private run, or a reference line (no ε).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontierRow {
    /// The data set's label.
    pub data: String,
    /// Users in the data set.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// Devices per round (0 for the centrally fitted lines).
    pub cohort: u64,
    /// `local`, `central`, `distributed`, or a line: `no-noise`, `bias-only`, `global-mean`.
    pub mode: String,
    /// The ε asked for.
    pub target_epsilon: Option<f64>,
    /// The ε the run's accountant reports after the last round.
    pub epsilon: Option<f64>,
    /// δ.
    pub delta: Option<f64>,
    /// σ.
    pub noise_multiplier: Option<f64>,
    /// Rounds (0 for the centrally fitted lines).
    pub rounds: u64,
    /// RMSE on the held-out ratings.
    pub rmse: f64,
    /// Hit rate@10 of `recommend(10)`.
    pub hit_rate_at_10: Option<f64>,
    /// NDCG@10.
    pub ndcg_at_10: Option<f64>,
    /// Wall-clock seconds of the run (data loading excluded).
    pub seconds: f64,
}

/// The CSV's columns, in order.
pub const COLUMNS: [&str; 14] = [
    "data",
    "users",
    "items",
    "cohort",
    "mode",
    "target_epsilon",
    "epsilon",
    "delta",
    "noise_multiplier",
    "rounds",
    "rmse",
    "hit_rate_at_10",
    "ndcg_at_10",
    "seconds",
];

fn csv(rows: &[FrontierRow]) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    let mut text = COLUMNS.join(",") + "\n";
    for r in rows {
        text += &format!(
            "\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{:.1}\n",
            r.data,
            r.users,
            r.items,
            r.cohort,
            r.mode,
            opt(r.target_epsilon),
            opt(r.epsilon),
            opt(r.delta),
            opt(r.noise_multiplier),
            r.rounds,
            r.rmse,
            opt(r.hit_rate_at_10),
            opt(r.ndcg_at_10),
            r.seconds
        );
    }
    text
}

/// The smallest σ (to a relative 10⁻⁴) whose distributed discrete Gaussian, as the
/// coordinator would plan it for `settings`, spends at most `target` ε over the run's
/// rounds at its δ (RDP; ε is non-increasing in σ).
pub fn calibrate_distributed(
    settings: &crate::sim::Settings,
    users: usize,
    items: usize,
    target: f64,
) -> Result<f64, CliError> {
    let failed = |e: String| CliError::Failed(anyhow::anyhow!("calibrating distributed σ: {e}"));
    let epsilon = |sigma: f64| -> Result<f64, CliError> {
        let s = crate::sim::Settings {
            noise_multiplier: Some(sigma),
            target_epsilon: None,
            ..settings.clone()
        };
        let manifest = s
            .manifest(users, items)
            .map_err(|e| failed(e.to_string()))?;
        let plan = DistributedPlan::from_manifest(&manifest).map_err(|e| failed(e.to_string()))?;
        Ok(plan
            .mechanism
            .epsilon_after(settings.rounds, settings.delta, &OrderGrid::default())
            .map_err(|e| failed(e.to_string()))?
            .epsilon)
    };
    let (mut lo, mut hi) = (0.05, 1.0);
    while epsilon(hi)? > target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e5 {
            return Err(failed(format!("no σ up to 1e5 meets ε = {target}")));
        }
    }
    while lo > 0.05 && epsilon(lo)? <= target {
        hi = lo;
        lo /= 2.0;
    }
    if epsilon(lo)? <= target {
        return Ok(lo);
    }
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if epsilon(mid)? <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

fn f64_at(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(serde_json::Value::as_f64)
}

/// Runs the frontier and returns the rows, writing `frontier.csv`, `frontier.json`,
/// `frontier.png`, `frontier.svg` and each run's metrics (`<data>/<mode>-eps<ε>/`) under
/// `out`. `progress` is told each finished row.
pub fn frontier(
    grid: &Grid,
    out: &std::path::Path,
    mut progress: impl FnMut(&FrontierRow),
) -> Result<(Vec<FrontierRow>, Vec<PathBuf>), CliError> {
    let mut rows = vec![];
    for (p, population) in grid.populations.iter().enumerate() {
        let label = population.label();
        let dir = out.join(format!("data-{}", p + 1));
        let base = grid.base(population);
        let source = format!("frontier, {label}");
        // The reference lines: the run with clipping and no noise, then the centrally
        // fitted bias-only model and the global mean, on the same split.
        let plan = plan_from_table(base.clone(), &source)?;
        let users = plan.data.users.iter().filter(|u| u.trains).count();
        let items = plan.data.items.len();
        let start = Instant::now();
        let global_mean = global_mean_rmse(&plan.data);
        let bias_only = bias_only_rmse(&plan.data);
        let fitted = start.elapsed().as_secs_f64();
        let line = |mode: &str, rmse: f64| FrontierRow {
            data: label.clone(),
            users,
            items,
            cohort: 0,
            mode: mode.into(),
            target_epsilon: None,
            epsilon: None,
            delta: None,
            noise_multiplier: None,
            rounds: 0,
            rmse,
            hit_rate_at_10: None,
            ndcg_at_10: None,
            seconds: fitted,
        };
        for row in [
            line("global-mean", global_mean),
            line("bias-only", bias_only),
        ] {
            progress(&row);
            rows.push(row);
        }
        let start = Instant::now();
        let outcome = run_plan(&plan, false, &dir.join("no-noise"), &Quiet)?;
        let row = FrontierRow {
            cohort: outcome.summary["client_updates"].as_u64().unwrap_or(0) / grid.rounds,
            rounds: grid.rounds,
            rmse: f64_at(&outcome.summary, "rmse").unwrap_or(f64::NAN),
            hit_rate_at_10: f64_at(&outcome.summary, "hit_rate_at_10"),
            ndcg_at_10: f64_at(&outcome.summary, "ndcg_at_10"),
            seconds: start.elapsed().as_secs_f64(),
            ..line("no-noise", 0.0)
        };
        progress(&row);
        rows.push(row);
        drop(plan);
        for &mode in &grid.modes {
            if mode == FrontierMode::Distributed
                && grid.cohort(population, users) > grid.distributed_max_cohort
            {
                eprintln!(
                    "{label}: mode distributed left out: {} devices a round is more than --distributed-max-cohort {}",
                    grid.cohort(population, users),
                    grid.distributed_max_cohort
                );
                continue;
            }
            for &target in &grid.epsilons {
                let mut table = base.clone();
                table.insert("privacy_mode".into(), mode.as_str().into());
                table.insert("delta".into(), grid.delta.into());
                match mode {
                    // Calibrated below, on the plan's own data.
                    FrontierMode::Distributed => {
                        table.insert("noise_multiplier".into(), 1.0.into())
                    }
                    _ => table.insert("target_epsilon".into(), target.into()),
                };
                let mut plan =
                    plan_from_table(table, &format!("{source}, {} ε = {target}", mode.as_str()))?;
                if mode == FrontierMode::Distributed {
                    let sigma = calibrate_distributed(&plan.settings, users, items, target)?;
                    plan.settings.noise_multiplier = Some(sigma);
                    plan.settings_json["noise_multiplier"] = json!(sigma);
                }
                debug_assert_eq!(
                    plan.settings.privacy_mode,
                    match mode {
                        FrontierMode::Local => ManifestPrivacyMode::Local,
                        FrontierMode::Central => ManifestPrivacyMode::Central,
                        FrontierMode::Distributed => ManifestPrivacyMode::Distributed,
                    }
                );
                let start = Instant::now();
                let outcome = run_plan(
                    &plan,
                    false,
                    &dir.join(format!("{}-eps{target}", mode.as_str())),
                    &Quiet,
                )?;
                let s = &outcome.summary;
                let row = FrontierRow {
                    cohort: s["client_updates"].as_u64().unwrap_or(0) / grid.rounds,
                    mode: mode.as_str().into(),
                    target_epsilon: Some(target),
                    epsilon: f64_at(s, "epsilon"),
                    delta: Some(grid.delta),
                    noise_multiplier: outcome.noise_multiplier,
                    rounds: grid.rounds,
                    rmse: f64_at(s, "rmse").unwrap_or(f64::NAN),
                    hit_rate_at_10: f64_at(s, "hit_rate_at_10"),
                    ndcg_at_10: f64_at(s, "ndcg_at_10"),
                    seconds: start.elapsed().as_secs_f64(),
                    ..line("", 0.0)
                };
                progress(&row);
                rows.push(row);
                // What has run so far survives an interrupted grid.
                write_table(out, &rows)?;
            }
        }
    }
    let written = write(out, grid, &rows)?;
    Ok((rows, written))
}

fn write_table(out: &std::path::Path, rows: &[FrontierRow]) -> Result<(), CliError> {
    let failed =
        |e: std::io::Error| CliError::Failed(anyhow::anyhow!("--out {}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(failed)?;
    std::fs::write(out.join("frontier.csv"), csv(rows)).map_err(failed)?;
    std::fs::write(
        out.join("frontier.json"),
        serde_json::to_string_pretty(rows).expect("serialisable") + "\n",
    )
    .map_err(failed)
}

fn write(
    out: &std::path::Path,
    grid: &Grid,
    rows: &[FrontierRow],
) -> Result<Vec<PathBuf>, CliError> {
    write_table(out, rows)?;
    let mut written = vec![out.join("frontier.csv"), out.join("frontier.json")];
    let title = format!(
        "test RMSE against ε (user-level, δ = {:e}, {} rounds, C = {})",
        grid.delta, grid.rounds, grid.clip_norm
    );
    written
        .extend(plot(&out.join("frontier"), &title, rows).map_err(|e| CliError::Failed(e.into()))?);
    Ok(written)
}

/// The reference lines' names in the legend.
const LINES: [(&str, &str); 3] = [
    ("no-noise", "clipped, no noise"),
    ("bias-only", "biases only (BaselineOnly)"),
    ("global-mean", "global mean"),
];

/// Draws one panel per data set: RMSE against ε (log scale) per mode, and the reference
/// lines across the panel. Points above the panel's top (the global mean's RMSE plus a
/// margin) are drawn on the top edge as triangles.
fn plot(
    stem: &std::path::Path,
    title: &str,
    rows: &[FrontierRow],
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let panels = data_labels(rows).len();
    let size = (1100, 420 * panels.div_ceil(2).max(1) as u32);
    let err = |file: &std::path::Path| {
        let file = file.display().to_string();
        move |message: String| PlotError { file, message }
    };
    draw(
        BitMapBackend::new(&png, size).into_drawing_area(),
        title,
        rows,
    )
    .map_err(err(&png))?;
    draw(SVGBackend::new(&svg, size).into_drawing_area(), title, rows).map_err(err(&svg))?;
    Ok(vec![png, svg])
}

/// The data sets of `rows`, in their first appearance's order.
fn data_labels(rows: &[FrontierRow]) -> Vec<String> {
    let mut labels: Vec<String> = vec![];
    for r in rows {
        if !labels.contains(&r.data) {
            labels.push(r.data.clone());
        }
    }
    labels
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    rows: &[FrontierRow],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root.titled(title, (FONT, 20)).map_err(|e| e.to_string())?;
    let labels = data_labels(rows);
    let columns = if labels.len() > 1 { 2 } else { 1 };
    let panels = root.split_evenly((labels.len().div_ceil(columns), columns));
    let (e0, e1) = rows
        .iter()
        .filter_map(|r| r.target_epsilon)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), e| {
            (lo.min(e), hi.max(e))
        });
    let (e0, e1) = if e0 <= e1 { (e0, e1) } else { (1.0, 1.0) };
    let (x0, x1) = (e0 / 1.5, e1 * 1.5);
    for (label, area) in labels.iter().zip(panels) {
        let mine: Vec<&FrontierRow> = rows.iter().filter(|r| &r.data == label).collect();
        let Some(first) = mine.first() else { continue };
        let value = |mode: &str| mine.iter().find(|r| r.mode == mode).map(|r| r.rmse);
        let top = value("global-mean")
            .into_iter()
            .chain(value("no-noise"))
            .chain(value("bias-only"))
            .fold(f64::NEG_INFINITY, f64::max)
            + 0.1;
        let bottom = mine
            .iter()
            .map(|r| r.rmse)
            .filter(|v| v.is_finite())
            .fold(f64::INFINITY, f64::min)
            - 0.03;
        let (bottom, top) = if bottom < top {
            (bottom, top)
        } else {
            (top - 0.5, top)
        };
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "{label}: {} items, {} devices a round",
                    thousands(first.items),
                    thousands(mine.iter().map(|r| r.cohort as usize).max().unwrap_or(0))
                ),
                (FONT, 15),
            )
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(55)
            // The band above `top` holds the legend, clear of the points.
            .build_cartesian_2d((x0..x1).log_scale(), bottom..top + 0.6 * (top - bottom))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(6)
            .x_label_formatter(&|x| format!("{x}"))
            .x_desc("ε (log scale)")
            .y_desc("test RMSE")
            .label_style((FONT, 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, mode) in [
            FrontierMode::Local,
            FrontierMode::Central,
            FrontierMode::Distributed,
        ]
        .iter()
        .enumerate()
        {
            let colour = COLOURS[i];
            let mut points: Vec<(f64, f64)> = mine
                .iter()
                .filter(|r| r.mode == mode.as_str())
                .filter_map(|r| Some((r.target_epsilon?, r.rmse)))
                .filter(|p| p.1.is_finite())
                .collect();
            if points.is_empty() {
                continue;
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let clipped: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x, y.min(top))).collect();
            chart
                .draw_series(LineSeries::new(
                    clipped.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(mode.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&(x, y)| {
                    if y > top {
                        TriangleMarker::new((x, top), 6, colour.filled()).into_dyn()
                    } else {
                        Circle::new((x, y), 4, colour.filled()).into_dyn()
                    }
                }))
                .map_err(|e| e.to_string())?;
        }
        for (i, (mode, name)) in LINES.iter().enumerate() {
            let Some(y) = value(mode) else { continue };
            let colour = [BLACK, COLOURS[4], RGBColor(128, 128, 128)][i];
            chart
                .draw_series(LineSeries::new([(x0, y), (x1, y)], colour.stroke_width(1)))
                .map_err(|e| e.to_string())?
                .label(format!("{name} {y:.4}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 11))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Merges the rows of earlier frontiers' `frontier.json` files and writes the table and
/// the plot under `out`; errors name `--replot` and the file.
pub fn replot(
    dirs: &[PathBuf],
    out: &std::path::Path,
) -> Result<(Vec<FrontierRow>, Vec<PathBuf>), CliError> {
    if dirs.is_empty() {
        return Err(CliError::Usage(
            "--replot: give at least one directory".into(),
        ));
    }
    let mut rows: Vec<FrontierRow> = vec![];
    for dir in dirs {
        let file = dir.join("frontier.json");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| CliError::Usage(format!("--replot {}: {e}", file.display())))?;
        let mine: Vec<FrontierRow> = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("--replot {}: {e}", file.display())))?;
        rows.extend(mine);
    }
    let private = rows.iter().find(|r| r.target_epsilon.is_some());
    let title = format!(
        "test RMSE against ε (user-level, δ = {:e}, {} rounds)",
        private.and_then(|r| r.delta).unwrap_or(f64::NAN),
        private.map_or(0, |r| r.rounds)
    );
    write_table(out, &rows)?;
    let mut written = vec![out.join("frontier.csv"), out.join("frontier.json")];
    written.extend(
        plot(&out.join("frontier"), &title, &rows).map_err(|e| CliError::Failed(e.into()))?,
    );
    Ok((rows, written))
}

/// `fedpref-sim frontier`: runs the grid (or `--replot`s earlier ones) and returns what to
/// print.
pub fn run(args: &FrontierArgs) -> Result<String, CliError> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("fedpref-sim-frontier"));
    if let Some(dirs) = &args.replot {
        let (rows, written) = replot(dirs, &out)?;
        if args.json {
            return Ok(serde_json::to_string(&rows).expect("serialisable"));
        }
        return Ok(format!(
            "{}wrote {}",
            csv(&rows),
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let grid = Grid::from_args(args)?;
    let (rows, written) = frontier(&grid, &out, |r| {
        if !args.json {
            eprintln!(
                "{}  {:<11} ε {:>6}  rmse {:.4}  ({:.0} s)",
                r.data,
                r.mode,
                r.target_epsilon
                    .map(|e| e.to_string())
                    .unwrap_or("—".into()),
                r.rmse,
                r.seconds
            );
        }
    })?;
    if args.json {
        return Ok(serde_json::to_string(&rows).expect("serialisable"));
    }
    Ok(format!(
        "{}wrote {}",
        csv(&rows),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}
