//! `fedpref-sim frontier`: a tiny grid's CSV has the documented columns, one row per
//! (mode, ε) asked for plus the reference lines, every ε within its target, and a plot.

use std::process::Command;

use fedpref_simulations::frontier::COLUMNS;

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

/// Splits a CSV line on commas outside double quotes.
fn cells(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (vec![], String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[test]
fn a_quick_frontier_writes_every_requested_point_and_the_reference_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let (code, _, stderr) = sim(&[
        "frontier",
        "--quick",
        "--epsilons",
        "16,2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(out.join("frontier.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), COLUMNS.join(","));
    let rows: Vec<Vec<String>> = lines.map(cells).collect();
    assert!(rows.iter().all(|r| r.len() == COLUMNS.len()), "{text}");
    let col = |name: &str| COLUMNS.iter().position(|c| *c == name).unwrap();
    let (mode, target, eps, rmse) = (
        col("mode"),
        col("target_epsilon"),
        col("epsilon"),
        col("rmse"),
    );
    let number = |r: &Vec<String>, c: usize| r[c].parse::<f64>().unwrap();
    // Three lines with no ε, then 3 modes × 2 ε: every private row's target is one asked
    // for, and its accountant's ε does not exceed it.
    let line = |name: &str| {
        let found: Vec<_> = rows.iter().filter(|r| r[mode] == name).collect();
        assert_eq!(found.len(), 1, "{name}: {text}");
        assert!(found[0][target].is_empty() && found[0][eps].is_empty());
        number(found[0], rmse)
    };
    let (no_noise, bias_only, global_mean) =
        (line("no-noise"), line("bias-only"), line("global-mean"));
    assert!(bias_only < global_mean, "{text}");
    assert!(no_noise.is_finite() && no_noise < global_mean, "{text}");
    for m in ["local", "central", "distributed"] {
        let mine: Vec<_> = rows.iter().filter(|r| r[mode] == m).collect();
        let mut targets: Vec<f64> = mine.iter().map(|r| number(r, target)).collect();
        targets.sort_by(f64::total_cmp);
        assert_eq!(targets, vec![2.0, 16.0], "{m}: {text}");
        for r in &mine {
            let (t, e) = (number(r, target), number(r, eps));
            assert!(
                e > 0.0 && e <= t * (1.0 + 1e-9),
                "{m}: ε {e} for target {t}"
            );
            assert!(number(r, rmse).is_finite());
        }
    }
    // Central DP over the same cohort: more ε, no worse (a little slack for the seed).
    let central = |t: f64| {
        rows.iter()
            .find(|r| r[mode] == "central" && number(r, target) == t)
            .map(|r| number(r, rmse))
            .unwrap()
    };
    assert!(central(16.0) <= central(2.0) + 0.02, "{text}");
    for f in ["frontier.png", "frontier.svg", "frontier.json"] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 1000, "{f}");
    }
    let svg = std::fs::read_to_string(out.join("frontier.svg")).unwrap();
    for label in ["local", "central", "distributed", "clipped, no noise"] {
        assert!(svg.contains(label), "the plot's legend lacks {label}");
    }
}

#[test]
fn bad_frontier_flags_are_errors_naming_the_flag() {
    for (args, expected) in [
        (vec!["frontier", "--epsilons", "0"], "--epsilons"),
        (vec!["frontier", "--epsilons", "1,nan"], "--epsilons"),
        (vec!["frontier", "--populations", "lots"], "--populations"),
        (vec!["frontier", "--populations", "1"], "--populations"),
        (vec!["frontier", "--cohort-share", "0"], "--cohort-share"),
        (vec!["frontier", "--cohort-share", "1.5"], "--cohort-share"),
        (vec!["frontier", "--delta", "1"], "--delta"),
        (vec!["frontier", "--rounds", "0"], "--rounds"),
        (vec!["frontier", "--modes", "none"], "--modes"),
        (
            vec!["frontier", "--server-learning-rate", "-1"],
            "--server-learning-rate",
        ),
    ] {
        let (code, _, stderr) = sim(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn distributed_points_above_the_cohort_cap_are_left_out_and_the_rest_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let (code, _, stderr) = sim(&[
        "frontier",
        "--quick",
        "--epsilons",
        "4",
        "--modes",
        "central,distributed",
        "--distributed-max-cohort",
        "99",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("--distributed-max-cohort 99"), "{stderr}");
    let text = std::fs::read_to_string(out.join("frontier.csv")).unwrap();
    let modes: Vec<String> = text.lines().skip(1).map(|l| cells(l)[4].clone()).collect();
    assert_eq!(
        modes,
        ["global-mean", "bias-only", "no-noise", "central"],
        "{text}"
    );
    // --replot merges earlier frontiers' tables into one table and plot, running nothing.
    let merged = dir.path().join("merged");
    let (code, _, stderr) = sim(&[
        "frontier",
        "--replot",
        &format!("{},{}", out.display(), out.display()),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let again = std::fs::read_to_string(merged.join("frontier.csv")).unwrap();
    let (before, after): (Vec<_>, Vec<_>) = (
        text.lines().skip(1).map(cells).collect(),
        again.lines().skip(1).map(cells).collect(),
    );
    assert_eq!(after.len(), 2 * before.len(), "{again}");
    for (a, b) in after.iter().zip(before.iter().chain(before.iter())) {
        assert_eq!(a[4], b[4]);
        let (x, y) = (a[10].parse::<f64>().unwrap(), b[10].parse::<f64>().unwrap());
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
    assert!(
        std::fs::metadata(merged.join("frontier.png"))
            .unwrap()
            .len()
            > 1000
    );
    let missing = dir.path().join("nowhere");
    let (code, _, stderr) = sim(&[
        "frontier",
        "--replot",
        missing.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--replot") && stderr.contains("nowhere"),
        "{stderr}"
    );
}
