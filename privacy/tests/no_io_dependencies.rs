//! The architecture invariant "`privacy` has no dependency on tokio, tonic, a database or any
//! IO", checked on the crate's own manifest: every normal dependency must be on the list below,
//! and adding one means deciding here, in review, that it does no IO.

const ALLOWED: &[&str] = &[
    "libm",
    "rand",
    "rand_core",
    "rand_distr",
    // FFTs for the PLD accountant (realfft wraps rustfft): pure arithmetic.
    "realfft",
    "serde",
    "thiserror",
];

#[test]
fn the_privacy_crate_depends_only_on_arithmetic_and_randomness() {
    let manifest = include_str!("../Cargo.toml");
    let mut in_dependencies = false;
    let mut names = vec![];
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        if in_dependencies && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.']).next().unwrap().trim();
            names.push(name.to_string());
        }
    }
    assert!(!names.is_empty(), "no [dependencies] section found");
    for name in &names {
        assert!(
            ALLOWED.contains(&name.as_str()),
            "privacy depends on {name:?}, which is not on the no-IO list {ALLOWED:?}"
        );
    }
}
