//! `fedpref-device` run as a program.

use std::path::Path;
use std::process::{Command, Output};

const NOW: &str = "2026-06-01T12:00:00Z";

fn device(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedpref-device"))
        .arg("--store")
        .arg(store)
        .args(["--now", NOW])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn setup(dir: &Path) -> std::path::PathBuf {
    let mut lines = String::new();
    for i in 0..20 {
        let topic = ["Comedy", "Drama", "Jazz", "Health"][i % 4];
        lines += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"],\"sensitive\":{},\"published\":\"2026-01-05T00:00:00Z\"}}\n",
            topic == "Health"
        );
    }
    lines += r#"{"type":"rating","item":"i0","value":5.0,"at":"2026-05-30T20:00:00Z"}
{"type":"thumbs","item":"i1","value":"up","at":"2026-05-30T20:00:00Z"}
{"type":"dwell","item":"i2","seconds":31.5,"at":"2026-05-30T20:00:00Z"}
{"type":"save","item":"i4","at":"2026-05-30T20:00:00Z"}
{"type":"interest","topic":"Comedy"}
{"type":"role","value":"student"}
{"type":"consent","topic":"Health","personalise":false}
"#;
    let file = write(dir, "events.jsonl", &lines);
    let store = dir.join("device.db");
    let out = stdout(&device(&store, &["ingest", &file]));
    assert!(
        out.contains("stored 20 items, 4 feedback events, 2 explicit records, 1 consents"),
        "{out}"
    );
    store
}

#[test]
fn a_bad_line_is_reported_with_its_number_and_field_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let before = stdout(&device(&store, &["profile", "--json"]));
    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"type\":\"goal\",\"value\":\"run a marathon\"}\n\n{\"type\":\"dwell\",\"item\":\"i3\",\"seconds\":NaN,\"at\":\"2026-05-30T20:00:00Z\"}\n{\"type\":\"wink\"}\n",
    );
    let o = device(&store, &["ingest", &bad]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 3, field `seconds`"), "{err}");
    assert!(err.contains("line 4, field `type`"), "{err}");
    assert!(err.contains("nothing from the file was stored"), "{err}");
    assert_eq!(stdout(&device(&store, &["profile", "--json"])), before);
    let out = stdout(&device(&store, &["ingest", &bad, "--skip-invalid"]));
    assert!(
        out.contains("1 explicit records") && out.contains("skipped line 3"),
        "{out}"
    );
    assert!(stdout(&device(&store, &["profile"])).contains("run a marathon"));
}

#[test]
fn recommend_json_lists_item_score_label_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let o = stdout(&device(&store, &["recommend", "-k", "5", "--json"]));
    let recs: serde_json::Value = serde_json::from_str(&o).unwrap();
    let recs = recs.as_array().unwrap();
    assert_eq!(recs.len(), 5);
    for r in recs {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["item", "score", "label", "reason"]);
        assert_eq!(r["reason"], "popular"); // no model yet: cold
    }
    // With a model imported the ranking is personal, with one diversity slot of five.
    let items: Vec<serde_json::Value> = (0..20)
        .map(|i| serde_json::json!({"item": format!("i{i}"), "factors": [0.1 * (i % 3) as f64, -0.05 * (i % 5) as f64], "bias": 0.01 * i as f64}))
        .collect();
    let model = write(
        dir.path(),
        "model.json",
        &serde_json::json!({"model_version": 1, "factor_dimension": 2, "global_offset": 3.5, "items": items}).to_string(),
    );
    assert!(stdout(&device(&store, &["model", "import", &model])).contains("20 items, k = 2"));
    let o = stdout(&device(&store, &["recommend", "-k", "5", "--json"]));
    let recs: serde_json::Value = serde_json::from_str(&o).unwrap();
    let reasons: Vec<&str> = recs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.iter().filter(|r| **r == "diversity").count(), 1);
    assert!(reasons.contains(&"personal"));
    let text = stdout(&device(&store, &["recommend", "-k", "5"]));
    assert_eq!(text.lines().count(), 5);
}

#[test]
fn switches_profile_edits_reset_export_and_delete_work_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    assert_eq!(
        stdout(&device(&store, &["set", "training", "off"])).trim(),
        "training participation off"
    );
    let p: serde_json::Value =
        serde_json::from_str(&stdout(&device(&store, &["profile", "--json"]))).unwrap();
    assert_eq!(p["settings"]["training"], false);
    assert_eq!(p["settings"]["personalisation"], true);
    stdout(&device(&store, &["set", "personalisation", "off"]));
    let edited = stdout(&device(
        &store,
        &[
            "profile",
            "--add-goal",
            "learn jazz",
            "--remove-interest",
            "Comedy",
            "--set-role",
            "teacher",
        ],
    ));
    assert!(
        edited.contains("role: teacher") && edited.contains("learn jazz"),
        "{edited}"
    );
    assert!(edited.contains("interests: -"), "{edited}");
    let export = dir.path().join("export.json");
    stdout(&device(&store, &["export", export.to_str().unwrap()]));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();
    assert_eq!(doc["format"], "fedpref-device-export");
    assert!(
        doc["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["type"] == "role" && r["value"] == "teacher")
    );
    assert!(stdout(&device(&store, &["reset"])).contains("model reset"));
    let p: serde_json::Value =
        serde_json::from_str(&stdout(&device(&store, &["profile", "--json"]))).unwrap();
    assert_eq!(p["feedback_counts"], serde_json::json!({}));
    assert_eq!(p["role"], "teacher");
    stdout(&device(&store, &["delete"]));
    let raw = std::fs::read(&store).unwrap();
    for needle in ["teacher", "learn jazz", "Comedy", "Health"] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} survived delete"
        );
    }
}

#[test]
fn budget_reports_what_was_spent_as_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let text = stdout(&device(&store, &["budget"]));
    assert!(
        text.contains("ε spent 0.0000 of 10") && text.contains("nothing has left this device"),
        "{text}"
    );
    let b: serde_json::Value =
        serde_json::from_str(&stdout(&device(&store, &["budget", "--json"]))).unwrap();
    assert_eq!(b["rounds"], 0);
    assert_eq!(b["epsilon_remaining"], 10.0);
}

#[test]
fn usage_errors_exit_with_code_two_and_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fedpref-device"))
        .args(["recommend", "-k", "3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--store"));
    let o = device(&dir.path().join("d.db"), &["set", "training", "maybe"]);
    assert_eq!(o.status.code(), Some(2));
    let bad_model = write(
        dir.path(),
        "m.json",
        r#"{"model_version":1,"factor_dimension":2,"global_offset":3,"items":[{"item":"a","factors":[1],"bias":0}]}"#,
    );
    let o = device(&dir.path().join("d.db"), &["model", "import", &bad_model]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("items[0].factors"));
}
