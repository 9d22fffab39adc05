//! What links what. Architecture invariants: the engine is the pure core, its normal
//! dependencies (what a program that links it links) contain no async runtime, no gRPC or HTTP
//! stack, no TLS, no database client, no certificate generator and no terminal or plotting
//! crate; the Python wheel links no part of the coordinator (its HTTP server, PostgreSQL
//! client or certificate generator).

use std::collections::BTreeSet;
use std::process::Command;

/// An async runtime, gRPC, HTTP, TLS, a PostgreSQL client, a certificate generator and a
/// progress bar: a server's or a gRPC client's crates. Neither the engine nor the Python wheel
/// may link any of them.
const SERVER_AND_GRPC: &[&str] = &[
    "tokio",
    "tonic",
    "hyper",
    "axum",
    "h2",
    "rustls",
    "postgres",
    "rcgen",
    "indicatif",
];

/// What the engine must not link beyond [`SERVER_AND_GRPC`]: storage and plotting (the wheel
/// links both, through the simulator).
const ENGINE_ALSO_FORBIDDEN: &[&str] = &["rusqlite", "plotters"];

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

/// The packages of `deps` that are one of `crates` or a crate of its family (`tokio-util` for
/// `tokio`; `h2` alone, since other crates share its prefix).
fn named<'a>(deps: &'a BTreeSet<String>, crates: &[&str]) -> Vec<&'a String> {
    deps.iter()
        .filter(|name| {
            crates
                .iter()
                .any(|bad| *name == bad || name.starts_with(&format!("{bad}-")) && *bad != "h2")
        })
        .collect()
}

#[test]
fn the_engine_links_no_io_crate() {
    let deps = normal_dependencies("fedpref-engine");
    // The tree is real: it names the engine and the privacy crate it is built on.
    assert!(deps.contains("fedpref-engine"), "{deps:?}");
    assert!(deps.contains("fedpref-privacy"), "{deps:?}");
    let forbidden: Vec<&str> = SERVER_AND_GRPC
        .iter()
        .chain(ENGINE_ALSO_FORBIDDEN)
        .copied()
        .collect();
    let found = named(&deps, &forbidden);
    assert!(
        found.is_empty(),
        "fedpref-engine must stay free of IO crates, but its normal dependencies include {found:?}"
    );
}

/// The wheel's simulator runs in process: it links the engine and the SDK's training, not
/// the coordinator (its HTTP server, database client and certificate generator), not the SDK's
/// gRPC client (tonic over hyper, h2 and rustls) and not the command line's progress bar.
#[test]
fn the_python_wheel_links_no_server_no_grpc_and_no_progress_bar() {
    let deps = normal_dependencies("fedpref-python");
    // The tree is real: the simulator, the engine and the SDK are in it.
    for needed in [
        "fedpref-simulations",
        "fedpref-engine",
        "fedpref-client-sdk",
    ] {
        assert!(deps.contains(needed), "{needed} missing from {deps:?}");
    }
    let forbidden: Vec<&str> = SERVER_AND_GRPC
        .iter()
        .copied()
        .chain(["fedpref-coordinator"])
        .collect();
    let found = named(&deps, &forbidden);
    assert!(
        found.is_empty(),
        "the Python wheel must link neither the coordinator, a gRPC client nor a progress bar, but its normal dependencies include {found:?}"
    );
}
