//! The fuzz targets' committed inputs, replayed on every `cargo test`: each file under
//! `fuzz/corpus/<target>/` (the minimised corpus) and `fuzz/regressions/<target>/` (every
//! input that once found a bug) runs through the same body that `cargo fuzz run <target>`
//! drives (`fuzz/src/lib.rs`). A panic names the target and the file.
//!
//! It lives here because this crate already depends on the coordinator, the client SDK and
//! the secure-aggregation crate, so the replay costs one test binary and no extra build.

#[allow(dead_code, missing_docs)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

/// A target's body: arbitrary bytes in, a panic on a finding.
type Body = fn(&[u8]);

const TARGETS: &[(&str, Body)] = &[
    ("upload", targets::upload),
    ("admin_manifest", targets::admin_manifest),
    ("manifest_toml", targets::manifest_toml),
    ("config_toml", targets::config_toml),
    ("device_task", targets::device_task),
    ("model_snapshot", targets::model_snapshot),
    ("stage_views", targets::stage_views),
    ("ingest_jsonl", targets::ingest_jsonl),
];

#[test]
fn every_committed_fuzz_input_runs_through_its_target_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut failures = vec![];
    for (name, body) in TARGETS {
        let dir = root.join("corpus").join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!files.is_empty(), "{}: no committed inputs", dir.display());
        if let Ok(found) = std::fs::read_dir(root.join("regressions").join(name)) {
            files.extend(found.map(|e| e.unwrap().path()));
        }
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            if std::panic::catch_unwind(|| body(&bytes)).is_err() {
                failures.push(format!("{name}: {}", file.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "inputs that panic:\n{}",
        failures.join("\n")
    );
}
