//! What links what. Architecture invariants: the engine is the pure core, its normal
//! dependencies (what a program that links it links) contain no async runtime, no gRPC or HTTP
//! stack, no TLS, no database client, no certificate generator and no terminal or plotting
//! crate; the Python wheel links no part of the coordinator (its HTTP server, PostgreSQL
//! client or certificate generator).

use std::collections::BTreeSet;
use std::process::Command;

/// Crates that mean IO or presentation; none may be a normal dependency of the engine.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tonic",
    "hyper",
    "axum",
    "h2",
    "rustls",
    "rusqlite",
    "postgres",
    "rcgen",
    "indicatif",
    "plotters",
];

/// The package names in `cargo tree -p <package> -e normal`.
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_engine_links_no_io_crate() {
    let deps = normal_dependencies("fedpref-engine");
    // The tree is real: it names the engine and the privacy crate it is built on.
    assert!(deps.contains("fedpref-engine"), "{deps:?}");
    assert!(deps.contains("fedpref-privacy"), "{deps:?}");
    let found: Vec<&String> = deps
        .iter()
        .filter(|name| {
            FORBIDDEN
                .iter()
                .any(|bad| *name == bad || name.starts_with(&format!("{bad}-")) && *bad != "h2")
        })
        .collect();
    assert!(
        found.is_empty(),
        "fedpref-engine must stay free of IO crates, but its normal dependencies include {found:?}"
    );
}

/// The wheel's simulator runs in process: no coordinator, so no HTTP server, database client
/// or certificate generator. (The SDK's gRPC client, tonic over hyper and rustls, is still
/// linked through the simulator's use of the SDK's training: not built yet.)
#[test]
fn the_python_wheel_links_no_part_of_the_coordinator() {
    let deps = normal_dependencies("fedpref-python");
    assert!(deps.contains("fedpref-simulations"), "{deps:?}");
    let found: Vec<&String> = deps
        .iter()
        .filter(|name| {
            ["fedpref-coordinator", "axum", "postgres", "rcgen"]
                .iter()
                .any(|bad| *name == bad || name.starts_with(&format!("{bad}-")))
        })
        .collect();
    assert!(
        found.is_empty(),
        "the Python wheel must not link the coordinator, but its normal dependencies include {found:?}"
    );
}
