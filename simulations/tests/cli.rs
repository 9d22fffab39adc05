//! The `fedpref-sim` binary: errors name the flag; `--json` prints the documented keys.

use std::process::Command;

fn sim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedpref-sim"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_errors_naming_the_flag_with_exit_code_2() {
    for (args, expected) in [
        (vec!["run", "--sampling-rate", "2"], "--sampling-rate"),
        (vec!["run", "--rounds", "0"], "--rounds"),
        (
            vec!["run", "--privacy-mode", "distributed"],
            "--noise-multiplier",
        ),
        (vec!["run", "--privacy-mode", "local"], "--noise-multiplier"),
        (
            vec![
                "run",
                "--privacy-mode",
                "central",
                "--noise-multiplier",
                "-1",
            ],
            "--noise-multiplier",
        ),
        (vec!["run", "--clip-norm", "0"], "--clip-norm"),
        (vec!["run", "--delta", "2"], "--delta"),
        (
            vec!["run", "--server-optimizer", "sgd"],
            "--server-optimizer",
        ),
        (vec!["run", "--dataset", "movielens-100k"], "--path"),
        (
            vec!["run", "--sampling-rate", "0.1", "--cohort-size", "5"],
            "--cohort-size",
        ),
        (vec!["run", "--transport", "grpc"], "--transport"),
        (
            vec![
                "run",
                "--centralised",
                "--privacy-mode",
                "central",
                "--noise-multiplier",
                "1",
            ],
            "--centralised",
        ),
        (
            vec!["bench", "--clients-per-round", "0"],
            "--clients-per-round",
        ),
        (vec!["bench", "--repeat", "0"], "--repeat"),
    ] {
        let (code, _, stderr) = sim(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn a_config_file_with_an_unknown_key_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.toml");
    std::fs::write(&path, "rounds = 2\nroundz = 3\n").unwrap();
    let (code, _, stderr) = sim(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("sim.toml") && stderr.contains("roundz"),
        "{stderr}"
    );
}

#[test]
fn json_prints_one_summary_object_with_the_documented_keys_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sim.toml");
    std::fs::write(
        &config,
        "users = 80\nitems = 40\nrounds = 2\ncohort_size = 20\nprivacy_mode = \"central\"\nnoise_multiplier = 1.0\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = sim(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "rmse",
            "mae",
            "rating_accuracy",
            "hit_rate_at_10",
            "ndcg_at_10",
            "intra_list_diversity",
            "coverage",
            "injected_share",
            "cohort_rmse_gap",
            "epsilon",
            "epsilon_accountant",
            "delta",
            "epsilon_assumption",
            "rounds",
            "client_updates",
            "client_updates_per_s",
            "peak_rss_bytes",
            "seed",
            "epsilon_rests_on",
            "noise_warning",
            "popularity_hit_rate_at_10",
            "popularity_ndcg_at_10",
        ]
    );
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["client_updates"], 40);
    assert_eq!(v["epsilon_assumption"], "release_observers");
    assert_eq!(v["epsilon_accountant"], "pld");
    assert_eq!(v["epsilon_rests_on"], "none (worst case per device)");
    let injected = v["injected_share"].as_f64().unwrap();
    assert!(injected > 0.0 && injected <= 0.2, "{injected}");
    assert!(v["epsilon"].as_f64().unwrap() > 0.0);
    for f in ["metrics.csv", "metrics.json", "summary.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

/// `fedpref-sim bench --json` on a tiny workload (10 clients × 2 rounds) with `extra` flags.
fn tiny_bench(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--users",
        "50",
        "--items",
        "30",
        "--ratings-per-user",
        "10",
        "--clients-per-round",
        "10",
        "--rounds",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = sim(&args);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn bench_runs_a_tiny_workload_and_reports_speed_memory_and_rmse() {
    let v = tiny_bench(&[]);
    assert!(v["client_updates_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["rmse"].as_f64().unwrap().is_finite());
    assert_eq!(v["client_updates"], 20);
}

#[test]
fn bench_repeats_the_same_seeded_work_and_keeps_the_fastest() {
    let v = tiny_bench(&["--repeat", "3"]);
    let walls: Vec<f64> = v["rounds_wall_repeats_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert_eq!(walls.len(), 3);
    assert_eq!(v["repeat"], 3);
    // The reported wall time is the fastest repetition's, and the work is the same.
    let fastest = walls.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(v["rounds_wall_s"].as_f64().unwrap(), fastest);
    assert_eq!(v["client_updates"], 20);
    assert_eq!(v["rmse"], tiny_bench(&[])["rmse"]);
}

#[test]
fn sweep_runs_every_combination_and_writes_one_table() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(
        &grid,
        "[base]\nusers = 60\nitems = 30\nrounds = 2\ncohort_size = 10\nprivacy_mode = \"local\"\n\n[grid]\nnoise_multiplier = [0.5, 1.0]\nclip_norm = [0.5, 1.0]\n",
    )
    .unwrap();
    let out = dir.path().join("sweep");
    let (code, stdout, stderr) = sim(&[
        "sweep",
        "--grid",
        grid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 4);
    assert_eq!(rows[3]["clip_norm"], 1.0);
    assert_eq!(rows[3]["noise_multiplier"], 1.0);
    assert!(out.join("sweep.csv").is_file() && out.join("run-004/metrics.csv").is_file());

    std::fs::write(&grid, "[grid]\nnoise_multiplierz = [1.0]\n").unwrap();
    let (code, _, stderr) = sim(&[
        "sweep",
        "--grid",
        grid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("noise_multiplierz") && stderr.contains("grid.toml"),
        "{stderr}"
    );
}

#[test]
fn a_run_draws_its_metrics_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) = sim(&[
        "run",
        "--users",
        "40",
        "--items",
        "20",
        "--rounds",
        "2",
        "--cohort-size",
        "10",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let svg = std::fs::read_to_string(out.join("rmse_by_round.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("test RMSE"));
    let png = std::fs::read(out.join("rmse_by_round.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

/// Runs a small synthetic federated run with `config` (TOML) and returns (exit code,
/// summary, stderr, out dir).
fn run_with_config(
    dir: &std::path::Path,
    name: &str,
    config: &str,
) -> (i32, serde_json::Value, String, std::path::PathBuf) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("users = 150\nitems = 60\nrounds = 4\ncohort_size = 30\n{config}"),
    )
    .unwrap();
    let out = dir.join(name);
    let (code, stdout, stderr) = sim(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let summary = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (code, summary, stderr, out)
}

#[test]
fn guardrails_that_must_fire_write_alerts_to_the_file_stderr_and_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    // Any opt-out and any cohort gap pass a zero threshold; the scenario's dislikes are
    // certain opt-outs, so the first round already has some.
    let (code, summary, stderr, out) = run_with_config(
        dir.path(),
        "fire",
        "[scenario]\nnegative_below = 3.5\nopt_out_per_negative = 0.5\n\n[guardrails]\nmax_opt_out_rate = 0.0\nmax_cohort_rmse_gap = 0.0\n",
    );
    assert_eq!(code, 0, "{stderr}");
    let alerts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("alerts.json")).unwrap()).unwrap();
    let alerts = alerts.as_array().unwrap();
    // Both rules fire in every one of the 4 rounds.
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    assert_eq!(summary["alerts"], 8);
    assert_eq!(alerts[0]["round"], 1);
    assert_eq!(alerts[0]["metric"], "cohort_rmse_gap");
    assert_eq!(alerts[1]["metric"], "opt_out_rate");
    assert_eq!(alerts[1]["threshold"], 0.0);
    assert!(alerts[1]["value"].as_f64().unwrap() > 0.0);
    assert_eq!(
        stderr.matches("alert [").count(),
        8,
        "every alert is on stderr: {stderr}"
    );
    assert!(stderr.contains("round 4: opt_out_rate"), "{stderr}");
    // The scenario's keys come after the documented ones, then the alert count, then the
    // popularity ranking's figures.
    let keys: Vec<&str> = summary
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys[keys.len() - 6..],
        [
            "seed",
            "opt_out_rate",
            "negative_feedback_rate",
            "alerts",
            "popularity_hit_rate_at_10",
            "popularity_ndcg_at_10"
        ]
    );
    let negative = summary["negative_feedback_rate"].as_f64().unwrap();
    assert!(negative > 0.0 && negative < 1.0, "{negative}");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("round,") && csv.lines().next().unwrap().ends_with(",opt_out_rate"));
    let png = image::open(out.join("feedback_by_round.png")).unwrap();
    assert_eq!((png.width(), png.height()), (800, 500));
}

#[test]
fn guardrails_that_must_not_fire_write_an_empty_alert_list() {
    let dir = tempfile::tempdir().unwrap();
    let (code, summary, stderr, out) = run_with_config(
        dir.path(),
        "quiet",
        "user_feedback = true\n\n[guardrails]\nmax_rmse_rise = 0.5\nmax_diversity_drop = 0.5\nmax_coverage_drop = 0.5\nmax_cohort_rmse_gap = 1.0\nmax_opt_out_rate = 0.9\nmax_negative_feedback_rate = 0.9\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(summary["alerts"], 0);
    assert!(!stderr.contains("alert"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("alerts.json"))
            .unwrap()
            .trim(),
        "[]"
    );
    assert!(summary["opt_out_rate"].as_f64().unwrap() < 0.9);
}

#[test]
fn bad_scenario_and_guardrail_settings_name_the_key_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    for (config, expected) in [
        (
            "[scenario]\nopt_out_per_negative = 2.0\n",
            "opt_out_per_negative",
        ),
        ("[scenario]\nmemroy = 2\n", "memroy"),
        ("[guardrails]\nmax_rmse_rise = -1.0\n", "max_rmse_rise"),
        ("[guardrails]\nmax_rmse_drop = 0.1\n", "max_rmse_drop"),
    ] {
        let (code, _, stderr, _) = run_with_config(dir.path(), "bad", config);
        assert_eq!(code, 2, "{config}: {stderr}");
        assert!(stderr.contains(expected), "{config}: {stderr}");
    }
    let (code, _, stderr) = sim(&["run", "--centralised", "--user-feedback"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--user-feedback"), "{stderr}");
}

#[test]
fn the_png_plots_carry_rasterised_text_in_their_title_band() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) = sim(&[
        "run",
        "--users",
        "40",
        "--items",
        "20",
        "--rounds",
        "2",
        "--cohort-size",
        "10",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let png = image::open(out.join("rmse_by_round.png"))
        .unwrap()
        .to_rgb8();
    // Rows 20..40 hold only the title (the chart starts below it): without text they are
    // white; the caption's glyphs make dark pixels there.
    let dark = (20..40)
        .flat_map(|y| (0..png.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| png.get_pixel(x, y).0.iter().all(|&c| c < 128))
        .count();
    assert!(dark > 200, "{dark} dark pixels in the title band");
}

#[test]
fn the_fedavg_weighting_is_written_with_the_settings_and_refused_where_it_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) = sim(&[
        "run",
        "--users",
        "40",
        "--items",
        "20",
        "--rounds",
        "1",
        "--cohort-size",
        "10",
        "--fedavg-weighting",
        "uniform",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["settings"]["fedavg_weighting"], "uniform");
    // Every DP mode weighs users equally (devices send no example count), and so does a
    // real coordinator over gRPC.
    for args in [
        &["--privacy-mode", "central", "--noise-multiplier", "1"][..],
        &["--privacy-mode", "local", "--noise-multiplier", "1"][..],
        &["--transport", "grpc"][..],
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--fedavg-weighting", "examples"]);
        let (code, _, stderr) = sim(&all);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains("--fedavg-weighting"), "{stderr}");
    }
}

#[test]
fn sweep_rows_carry_feedback_rates_and_alert_counts_when_the_runs_have_them() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(
        &grid,
        "[base]\nusers = 60\nitems = 30\nrounds = 2\ncohort_size = 10\nuser_feedback = true\n\n[base.guardrails]\nmax_cohort_rmse_gap = 0.0\n\n[grid]\nseed = [1, 2]\n",
    )
    .unwrap();
    let out = dir.path().join("sweep");
    let (code, stdout, stderr) = sim(&[
        "sweep",
        "--grid",
        grid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for row in rows.as_array().unwrap() {
        assert!(row["opt_out_rate"].is_number(), "{row}");
        assert!(row["negative_feedback_rate"].is_number(), "{row}");
        assert_eq!(
            row["alerts"], 2,
            "a zero gap threshold fires every round: {row}"
        );
    }
    let header = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    assert!(header.lines().next().unwrap().contains("opt_out_rate"));
}

#[test]
fn a_run_whose_noise_swamps_the_signal_warns_before_training_and_names_the_cohort_needed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let common = [
        "run",
        "--users",
        "60",
        "--items",
        "30",
        "--rounds",
        "1",
        "--cohort-size",
        "20",
        "--quiet",
        "--json",
        "--out",
    ];
    let mut args = common.to_vec();
    args.extend([
        out.to_str().unwrap(),
        "--privacy-mode",
        "local",
        "--noise-multiplier",
        "1",
    ]);
    let (code, stdout, stderr) = sim(&args);
    assert_eq!(code, 0, "{stderr}");
    // 30 items × 17 + 1 = 511 coordinates: local DP needs σ²d = 511 devices a round.
    assert!(
        stderr.contains("warning: the noise will swamp the signal")
            && stderr.contains("a cohort of about 511 devices"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["noise_warning"].as_str().unwrap().contains("511"));
    // Without noise there is nothing to warn about.
    let mut args = common.to_vec();
    args.push(out.to_str().unwrap());
    let (code, stdout, stderr) = sim(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v.get("noise_warning").is_none());
}

#[test]
fn export_split_writes_the_runs_split_and_validation_holds_out_only_training_ratings() {
    let dir = tempfile::tempdir().unwrap();
    let read = |d: &std::path::Path, f: &str| -> Vec<String> {
        std::fs::read_to_string(d.join(f))
            .unwrap()
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    let full = dir.path().join("full");
    let (code, stdout, stderr) = sim(&[
        "export-split",
        "--dataset",
        "synthetic",
        "--users",
        "50",
        "--items",
        "40",
        "--out",
        full.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("training and"), "{stdout}");
    let (train, test) = (read(&full, "train.tsv"), read(&full, "test.tsv"));
    assert!(!train.is_empty() && !test.is_empty());
    assert!(test.iter().all(|l| !train.contains(l)));
    let val = dir.path().join("val");
    let (code, _, stderr) = sim(&[
        "export-split",
        "--dataset",
        "synthetic",
        "--users",
        "50",
        "--items",
        "40",
        "--validation",
        "--out",
        val.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (vtrain, vtest) = (read(&val, "train.tsv"), read(&val, "test.tsv"));
    // The validation split is the training split cut in two; no test rating is in it.
    assert_eq!(vtrain.len() + vtest.len(), train.len());
    assert!(vtrain.iter().chain(&vtest).all(|l| train.contains(l)));
    let (code, _, stderr) = sim(&[
        "export-split",
        "--dataset",
        "movielens-1m",
        "--path",
        "/nonexistent/ml-1m",
        "--out",
        val.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--path"), "{stderr}");
}

#[test]
fn the_centralised_baseline_says_how_many_sweeps_validation_chose() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = sim(&[
        "run",
        "--centralised",
        "--users",
        "80",
        "--items",
        "40",
        "--rounds",
        "6",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("sweeps of alternating least squares, chosen on validation data"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let sweeps = summary["centralised"]["sweeps"].as_u64().unwrap();
    assert!((1..=6).contains(&sweeps));
    assert!(
        !summary["centralised"]["validation_rmse"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn presets_and_their_overrides_are_written_with_the_settings() {
    // A preset reads MovieLens; without the files the error names --path.
    let (code, _, stderr) = sim(&[
        "run",
        "--preset",
        "movielens-100k",
        "--path",
        "/nonexistent",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--path"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) = sim(&[
        "run",
        "--users",
        "40",
        "--items",
        "20",
        "--rounds",
        "1",
        "--cohort-size",
        "10",
        "--private-l2-per-example",
        "0.5",
        "--bias-l2-ratio",
        "0.2",
        "--l2-regularization",
        "0.05",
        "--validation",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let s = &metrics["settings"];
    assert_eq!(s["private_l2_per_example"], 0.5);
    assert_eq!(s["bias_l2_ratio"], 0.2);
    assert_eq!(s["l2_regularization"], 0.05);
    assert_eq!(s["validation"], true);
    assert!(s["dataset"].as_str().unwrap().ends_with("(validation)"));
    let (code, _, stderr) = sim(&["run", "--bias-l2-ratio", "-1"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--bias-l2-ratio"), "{stderr}");
}

#[test]
fn the_noise_path_is_a_flag_of_run_and_bench_written_with_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let run = |path: Option<&str>, out: &std::path::Path| {
        let mut args = vec![
            "run",
            "--users",
            "40",
            "--items",
            "20",
            "--rounds",
            "1",
            "--cohort-size",
            "10",
            "--privacy-mode",
            "local",
            "--noise-multiplier",
            "1",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(p) = path {
            args.extend_from_slice(&["--noise-path", p]);
        }
        let (code, _, stderr) = sim(&args);
        assert_eq!(code, 0, "{stderr}");
        let text = std::fs::read_to_string(out.join("metrics.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["settings"]["noise_path"].clone()
    };
    // The default is the aggregate path; per-device files keep their old keys.
    assert_eq!(run(None, &dir.path().join("a")), "aggregate");
    assert_eq!(
        run(Some("per-device"), &dir.path().join("b")),
        serde_json::Value::Null
    );

    let (code, _, stderr) = sim(&["run", "--noise-path", "sparse"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--noise-path"), "{stderr}");
    let (code, _, stderr) = sim(&["run", "--transport", "grpc", "--noise-path", "aggregate"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--noise-path"), "{stderr}");

    for path in ["aggregate", "per-device"] {
        let (code, stdout, stderr) = sim(&[
            "bench",
            "--users",
            "50",
            "--items",
            "30",
            "--ratings-per-user",
            "10",
            "--clients-per-round",
            "10",
            "--rounds",
            "2",
            "--noise-path",
            path,
            "--json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["noise_path"], path);
        assert!(v["rmse"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn the_accountant_flag_calibrates_sigma_for_the_target_and_names_the_accountant() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sim.toml");
    std::fs::write(
        &config,
        "users = 80\nitems = 40\nrounds = 2\ncohort_size = 20\nprivacy_mode = \"central\"\ntarget_epsilon = 4.0\neval_every = 0\n",
    )
    .unwrap();
    let run = |accountant: Option<&str>| {
        let out = dir.path().join(accountant.unwrap_or("default"));
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        if let Some(a) = accountant {
            args.extend(["--accountant", a]);
        }
        let (code, stdout, stderr) = sim(&args);
        assert_eq!(code, 0, "{stderr}");
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        (summary, metrics["settings"].clone())
    };
    let (pld, pld_settings) = run(None);
    let (rdp, rdp_settings) = run(Some("rdp"));
    assert_eq!(pld_settings["accountant"], "pld", "pld is the default");
    assert_eq!(rdp_settings["accountant"], "rdp");
    assert_eq!(pld["epsilon_accountant"], "pld");
    assert_eq!(rdp["epsilon_accountant"], "rdp");
    let (pld_sigma, rdp_sigma) = (
        pld_settings["noise_multiplier"].as_f64().unwrap(),
        rdp_settings["noise_multiplier"].as_f64().unwrap(),
    );
    assert!(
        pld_sigma < rdp_sigma,
        "PLD σ {pld_sigma} < RDP σ {rdp_sigma}"
    );
    for s in [&pld, &rdp] {
        let e = s["epsilon"].as_f64().unwrap();
        assert!(
            e > 3.9 && e <= 4.0,
            "each spends up to the target by its accountant: {e}"
        );
    }
    let (code, _, stderr) = sim(&["run", "--accountant", "moments"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--accountant"), "{stderr}");
}
