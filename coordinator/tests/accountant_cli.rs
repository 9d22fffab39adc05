//! The `fedpref-coordinator accountant` command, run as a user runs it.

use std::process::{Command, Output};

use fedpref_privacy::{
    Accountant, OrderGrid, PrivacyMode, RoundRelease, epsilon_after, epsilon_after_with,
};
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn usage_error(args: &[&str]) -> String {
    let out = run(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?} should be a usage error"
    );
    assert!(out.stdout.is_empty());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn epsilon_json_has_exactly_the_documented_keys_and_matches_the_library() {
    // Pinned to RDP: this checks the Rényi order, which only RDP has.
    let v = json(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "1.1",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
        "--json",
    ]);
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "accountant",
            "audience",
            "delta",
            "epsilon",
            "mode",
            "noise_multiplier",
            "order",
            "rounds",
            "sampling_rate"
        ]
    );
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 1.1,
        sampling_rate: 0.01,
    };
    let want = epsilon_after(&release, 1000, 1e-5, &OrderGrid::default()).unwrap();
    assert_eq!(v["epsilon"].as_f64().unwrap(), want.epsilon);
    assert_eq!(v["order"].as_f64(), want.order);
    assert_eq!(v["delta"], 1e-5);
    assert_eq!(v["rounds"], 1000);
    assert_eq!(v["sampling_rate"], 0.01);
    assert_eq!(v["noise_multiplier"], 1.1);
    assert_eq!(v["mode"], "central");
    assert_eq!(v["audience"], "observers_unaware_of_participation");
    assert_eq!(v["accountant"], "rdp");
}

#[test]
fn the_default_accountant_is_pld_and_spends_less_than_rdp() {
    let args = [
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "1.1",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ];
    let pld = json(&args);
    let mut keys: Vec<&str> = pld
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "accountant",
            "audience",
            "delta",
            "epsilon",
            "mode",
            "noise_multiplier",
            "order",
            "rounds",
            "sampling_rate"
        ]
    );
    assert_eq!(pld["accountant"], "pld");
    assert!(pld["order"].is_null(), "PLD has no Rényi order: {pld}");
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 1.1,
        sampling_rate: 0.01,
    };
    let want =
        epsilon_after_with(Accountant::Pld, &release, 1000, 1e-5, &OrderGrid::default()).unwrap();
    assert_eq!(pld["epsilon"].as_f64().unwrap(), want.epsilon);
    let mut explicit = args.to_vec();
    explicit.splice(explicit.len() - 1.., ["--accountant", "pld", "--json"]);
    assert_eq!(json(&explicit), pld);
    let mut rdp = args.to_vec();
    rdp.splice(rdp.len() - 1.., ["--accountant", "rdp", "--json"]);
    let rdp = json(&rdp);
    assert!(pld["epsilon"].as_f64().unwrap() < rdp["epsilon"].as_f64().unwrap());

    let text = run(&args[..args.len() - 1]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("accountant: PLD"), "{text}");
    let err = usage_error(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "1",
        "--rounds",
        "3",
        "--delta",
        "1e-5",
        "--accountant",
        "prv",
    ]);
    assert!(err.contains("--accountant"), "{err}");
}

#[test]
fn local_mode_counts_each_upload_at_half_the_noise_multiplier() {
    let local = json(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "4",
        "--rounds",
        "10",
        "--delta",
        "1e-6",
        "--mode",
        "local",
        "--json",
    ]);
    let central = json(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "2",
        "--rounds",
        "10",
        "--delta",
        "1e-6",
        "--mode",
        "central",
        "--json",
    ]);
    assert_eq!(local["epsilon"], central["epsilon"]);
    assert_eq!(local["audience"], "anyone");
    assert_eq!(local["sampling_rate"], 1.0);
}

#[test]
fn delta_and_calibrate_round_trip_through_epsilon() {
    let cal = json(&[
        "accountant",
        "calibrate",
        "--target-epsilon",
        "2",
        "--sampling-rate",
        "0.05",
        "--rounds",
        "200",
        "--delta",
        "1e-5",
        "--json",
    ]);
    let sigma = cal["noise_multiplier"].as_f64().unwrap();
    assert!(cal["epsilon"].as_f64().unwrap() <= 2.0);
    let sigma_arg = sigma.to_string();
    let eps = json(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        &sigma_arg,
        "--sampling-rate",
        "0.05",
        "--rounds",
        "200",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert!(eps["epsilon"].as_f64().unwrap() <= 2.0);
    let delta = json(&[
        "accountant",
        "delta",
        "--noise-multiplier",
        &sigma_arg,
        "--sampling-rate",
        "0.05",
        "--rounds",
        "200",
        "--epsilon",
        "2",
        "--json",
    ]);
    assert!(delta["delta"].as_f64().unwrap() <= 1e-5 * (1.0 + 1e-6));
    assert_eq!(delta["epsilon"], 2.0);
}

#[test]
fn text_output_states_the_audience() {
    let out = run(&[
        "accountant",
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sampling-rate",
        "0.1",
        "--rounds",
        "10",
        "--delta",
        "1e-5",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ε = "), "{text}");
    assert!(text.contains("do not learn who was sampled"), "{text}");
}

#[test]
fn bad_flags_are_usage_errors_naming_the_flag() {
    let base = ["accountant", "epsilon"];
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "--noise-multiplier",
                "0",
                "--rounds",
                "3",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            &[
                "--noise-multiplier",
                "-1",
                "--rounds",
                "3",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            &[
                "--noise-multiplier",
                "nan",
                "--rounds",
                "3",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0",
                "--rounds",
                "3",
                "--delta",
                "1e-5",
            ],
            "--sampling-rate",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "1.5",
                "--rounds",
                "3",
                "--delta",
                "1e-5",
            ],
            "--sampling-rate",
        ),
        (
            &["--noise-multiplier", "1", "--rounds", "3", "--delta", "0"],
            "--delta",
        ),
        (
            &["--noise-multiplier", "1", "--rounds", "3", "--delta", "1"],
            "--delta",
        ),
        (
            &[
                "--noise-multiplier",
                "1",
                "--rounds",
                "0",
                "--delta",
                "1e-5",
            ],
            "--rounds",
        ),
        (&["--noise-multiplier", "1", "--rounds", "3"], "--delta"),
    ];
    for (flags, named) in cases {
        let args: Vec<&str> = base.iter().chain(flags).copied().collect();
        let err = usage_error(&args);
        assert!(err.contains(named), "{args:?}: {err}");
    }
    let err = usage_error(&[
        "accountant",
        "calibrate",
        "--target-epsilon",
        "0",
        "--rounds",
        "3",
        "--delta",
        "1e-5",
    ]);
    assert!(err.contains("--target-epsilon"), "{err}");
    let err = usage_error(&[
        "accountant",
        "delta",
        "--noise-multiplier",
        "1",
        "--rounds",
        "3",
        "--epsilon",
        "-1",
    ]);
    assert!(err.contains("--epsilon"), "{err}");
}

#[test]
fn sampling_in_local_mode_is_refused_with_the_reason() {
    for cmd in [
        vec![
            "accountant",
            "epsilon",
            "--noise-multiplier",
            "2",
            "--delta",
            "1e-5",
        ],
        vec![
            "accountant",
            "calibrate",
            "--target-epsilon",
            "2",
            "--delta",
            "1e-5",
        ],
    ] {
        let mut args = cmd.clone();
        args.extend(["--rounds", "5", "--mode", "local", "--sampling-rate", "0.1"]);
        let err = usage_error(&args);
        assert!(err.contains("--sampling-rate"), "{err}");
        assert!(err.contains("sampling does not amplify"), "{err}");
    }
}

#[test]
fn tree_accountant_matches_the_library_and_calibration_inverts_it() {
    use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant, TreeSchedule};
    let base = [
        "accountant",
        "tree",
        "--delta",
        "1e-6",
        "--rounds",
        "512",
        "--min-separation",
        "64",
        "--max-participations",
        "8",
        "--restart-every",
        "128",
        "--completion",
        "--json",
    ];
    let mut args = base.to_vec();
    args.extend(["--noise-multiplier", "6"]);
    let v = json(&args);
    let expected = TreeAccountant::new(
        6.0,
        TreeSchedule::restart_every(128, true).unwrap(),
        ParticipationLimits::new(64, 8).unwrap(),
    )
    .unwrap()
    .spend(512, 1e-6)
    .unwrap();
    assert_eq!(v["epsilon"].as_f64().unwrap(), expected.epsilon);
    assert_eq!(v["sensitivity_squared"], expected.sensitivity_squared);
    assert_eq!(
        v["assumption"],
        "participation limits (separation 64, at most 8)"
    );
    let mut args = base.to_vec();
    args.extend(["--target-epsilon", "5"]);
    let v = json(&args);
    assert!((v["epsilon"].as_f64().unwrap() - 5.0).abs() < 1e-6, "{v}");
    assert!(v["noise_multiplier"].as_f64().unwrap() > 6.0);
    let e = usage_error(&[
        "accountant",
        "tree",
        "--noise-multiplier",
        "1",
        "--delta",
        "1e-6",
        "--rounds",
        "10",
        "--min-separation",
        "0",
        "--max-participations",
        "2",
    ]);
    assert!(e.contains("min_separation"), "{e}");
}
