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
            "not available yet",
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
            "delta",
            "epsilon_assumption",
            "rounds",
            "client_updates",
            "client_updates_per_s",
            "peak_rss_bytes",
            "seed",
        ]
    );
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["client_updates"], 40);
    assert_eq!(v["epsilon_assumption"], "release_observers");
    let injected = v["injected_share"].as_f64().unwrap();
    assert!(injected > 0.0 && injected <= 0.2, "{injected}");
    assert!(v["epsilon"].as_f64().unwrap() > 0.0);
    for f in ["metrics.csv", "metrics.json", "summary.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn bench_runs_a_tiny_workload_and_reports_speed_memory_and_rmse() {
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
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["client_updates_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["rmse"].as_f64().unwrap().is_finite());
    assert_eq!(v["client_updates"], 20);
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
