//! The budget binds one named audience, by default the strictest the run tracks: a central run
//! with Poisson sampling does not spend past its budget for observers of the released models
//! just because the amplified ε (for observers unaware of who took part) still fits.

mod common;

use common::{COHORT_MANIFEST, manifest};
use fedpref_coordinator::aggregation::ServerState;
use fedpref_coordinator::engine::{Action, Engine, Event, Progress, RunState};
use fedpref_coordinator::model::initial_parameters;
use fedpref_privacy::{
    Audience, OrderGrid, PrivacyMode, RoundRelease, SimulationSampler, epsilon_after,
};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

fn poisson(audience: &str) -> String {
    COHORT_MANIFEST
        .replace(
            "kind = \"cohort\"\ntarget_size = 4\nminimum_size = 2",
            "kind = \"poisson\"\nrate = 0.1\npopulation = 1000",
        )
        .replace("rounds = 5", "rounds = 100000")
        .replace("epsilon = 20.0", &format!("epsilon = 8.0\n{audience}"))
}

fn epsilon(q: f64, rounds: u64) -> f64 {
    let release = RoundRelease {
        mode: PrivacyMode::Central,
        noise_multiplier: 1.0,
        sampling_rate: q,
    };
    epsilon_after(&release, rounds, 1e-6, &OrderGrid::default())
        .unwrap()
        .epsilon
}

/// An engine restored after `rounds` committed rounds, ticked once.
fn after(text: &str, rounds: u64) -> (Engine, Vec<Action>) {
    let m = manifest(text);
    let params = initial_parameters(&m.model, 7);
    let server_state = ServerState::new(&m.server_optimizer, params.len());
    let mut e = Engine::restore(
        "r",
        m,
        Progress {
            state: RunState::Active,
            rounds_committed: rounds,
            next_round: rounds + 1,
            current_version: rounds + 1,
            params,
            server_state,
            uncommitted_charges: 0,
        },
    );
    let actions = e.handle(
        Event::Tick,
        1,
        &mut ChaCha20Rng::seed_from_u64(1),
        &mut SimulationSampler::seed_from_u64(2),
    );
    (e, actions)
}

#[test]
fn by_default_a_poisson_central_budget_binds_the_release_observers() {
    // The largest round count whose unamplified ε fits in 8.
    let fits = (1..10_000)
        .take_while(|&t| epsilon(1.0, t) <= 8.0)
        .last()
        .unwrap();
    assert!(epsilon(0.1, fits + 1) < 8.0, "the amplified ε still fits");
    let m = manifest(&poisson(""));
    assert_eq!(m.budget_audience(), Audience::ReleaseObservers);
    // After `fits` rounds the run stops: one more would take the release observers' ε past 8,
    // though the amplified ε would still fit.
    let (e, actions) = after(&poisson(""), fits);
    assert_eq!(e.state(), RunState::Stopped, "{actions:?}");
    let spent = e.spent();
    let observers = spent
        .iter()
        .find(|a| a.audience == "release_observers")
        .unwrap();
    assert!(observers.epsilon <= 8.0, "{spent:?}");
    let (e, _) = after(&poisson(""), fits - 1);
    assert_eq!(e.state(), RunState::Active);
}

#[test]
fn a_manifest_may_bind_the_amplified_audience_by_name() {
    let fits = (1..10_000)
        .take_while(|&t| epsilon(1.0, t) <= 8.0)
        .last()
        .unwrap();
    let text = poisson("audience = \"observers_unaware_of_participation\"");
    let m = manifest(&text);
    assert_eq!(
        m.budget_audience(),
        Audience::ObserversUnawareOfParticipation
    );
    assert_eq!(m.budget_release().unwrap().sampling_rate, 0.1);
    let (e, _) = after(&text, fits);
    assert_eq!(e.state(), RunState::Active);
}

#[test]
fn a_budget_audience_the_run_does_not_track_is_refused_by_name() {
    let e = fedpref_coordinator::manifest::RunManifest::from_toml(
        &poisson("audience = \"anyone\""),
        "m.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("budget.audience"), "{e}");
    let cohort = COHORT_MANIFEST.replace(
        "epsilon = 20.0",
        "epsilon = 20.0\naudience = \"observers_unaware_of_participation\"",
    );
    let e = fedpref_coordinator::manifest::RunManifest::from_toml(&cohort, "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("budget.audience"), "{e}");
}

#[test]
fn the_report_names_the_bound_audience_and_that_limits_hold_per_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let mut c =
        fedpref_coordinator::coordinator::Coordinator::open(&dir.path().join("c.db"), 1).unwrap();
    c.create_run("r", manifest(&poisson("")), 1).unwrap();
    let report = fedpref_coordinator::report::ImpactReport::build(c.store(), "r", 2).unwrap();
    let md = report.to_markdown();
    assert!(
        md.contains("- **The budget binds:** the ε for `release_observers`"),
        "{md}"
    );
    assert!(
        md.contains("hold per enrolment, not per person") && md.contains("Sybil enrolment"),
        "{md}"
    );
    let html = report.to_html();
    assert!(html.contains("One user is"), "{html}");
}

#[test]
fn a_target_epsilon_is_calibrated_for_the_audience_the_budget_binds() {
    let strict = manifest(&poisson("").replace("noise_multiplier = 1.0", "target_epsilon = 8.0"));
    let amplified = manifest(
        &poisson("audience = \"observers_unaware_of_participation\"")
            .replace("noise_multiplier = 1.0", "target_epsilon = 8.0")
            .replace("rounds = 100000", "rounds = 100"),
    );
    let strict_sigma = strict.noise_multiplier.unwrap();
    let amplified_sigma = amplified.noise_multiplier.unwrap();
    assert!(
        strict_sigma > amplified_sigma,
        "{strict_sigma} vs {amplified_sigma}"
    );
}
