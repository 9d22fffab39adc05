//! The accountant, as `fedpref-coordinator accountant {epsilon,delta,calibrate} --json`.
//!
//! Modes and their neighbouring relations are the privacy crate's
//! ([`fedpref_privacy::PrivacyMode`]): `central` accounts the Poisson-subsampled Gaussian
//! with add/remove-one neighbours (sensitivity C, amplified by sampling at rate q),
//! `distributed` the same numbers under zero-out neighbours; `local` accounts each device's own uploads with replace-one
//! neighbours (sensitivity 2C, so the accountant uses σ/2) and no amplification, so q must
//! be 1. `accountant` is `"pld"` (privacy loss distributions, the default) or `"rdp"`. The
//! output is one JSON object with the keys `epsilon` (`null` for +∞), `delta`, `order`
//! (`null` for PLD, which has no Rényi order), `noise_multiplier`, `sampling_rate`, `rounds`,
//! `mode`, `audience` and `accountant`.

use fedpref_privacy::{Accountant, OrderGrid, PrivacyMode, PrivacyStatement, RoundRelease};
use serde_json::json;

use crate::Error;

fn invalid(m: impl Into<String>) -> Error {
    Error::Invalid(m.into())
}

fn mode(name: &str) -> Result<PrivacyMode, Error> {
    match name {
        "local" => Ok(PrivacyMode::Local),
        "central" => Ok(PrivacyMode::Central),
        "distributed" => Ok(PrivacyMode::Distributed),
        other => Err(invalid(format!(
            "mode {other:?}: must be one of \"local\", \"central\", \"distributed\""
        ))),
    }
}

fn accountant(name: &str) -> Result<Accountant, Error> {
    name.parse()
        .map_err(|_| invalid(format!("accountant {name:?}: must be \"pld\" or \"rdp\"")))
}

/// The schedule's checks, with the command line's rules and the argument names.
fn schedule(rounds: u64, sampling_rate: f64, mode_name: &str) -> Result<PrivacyMode, Error> {
    let mode = mode(mode_name)?;
    if rounds == 0 {
        return Err(invalid("rounds: the number of rounds must be at least 1"));
    }
    if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
        return Err(invalid(format!(
            "sampling_rate {sampling_rate}: the sampling rate must be in (0, 1]"
        )));
    }
    if mode == PrivacyMode::Local && sampling_rate != 1.0 {
        return Err(invalid(format!(
            "sampling_rate {sampling_rate} cannot be used with mode \"local\": each upload is \
             seen by the coordinator, which knows who uploaded, so sampling does not amplify \
             what it sees. Give rounds as the device's own uploads and leave sampling_rate at 1"
        )));
    }
    Ok(mode)
}

fn check_delta(delta: f64) -> Result<(), Error> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(invalid(format!("delta {delta}: δ must be in (0, 1)")))
    }
}

fn check_sigma(sigma: f64) -> Result<(), Error> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(invalid(format!(
            "noise_multiplier {sigma}: the noise multiplier must be a finite number greater than 0"
        )))
    }
}

fn render(s: &PrivacyStatement, sigma: f64, sampling_rate: f64, rounds: u64) -> String {
    json!({
        "epsilon": if s.epsilon.is_finite() { json!(s.epsilon) } else { serde_json::Value::Null },
        "delta": s.delta,
        "order": s.order,
        "noise_multiplier": sigma,
        "sampling_rate": sampling_rate,
        "rounds": rounds,
        "mode": s.mode.as_str(),
        "audience": s.audience.as_str(),
        "accountant": s.accountant.as_str(),
    })
    .to_string()
}

fn failed(e: fedpref_privacy::PrivacyError) -> Error {
    // The privacy crate refuses only values the checks above let through (e.g. a σ too
    // small for the order grid): still a matter of the caller's input.
    invalid(e.to_string())
}

/// ε after `rounds` releases with noise multiplier σ at sampling rate q, at δ.
pub fn epsilon(
    noise_multiplier: f64,
    delta: f64,
    rounds: u64,
    sampling_rate: f64,
    mode_name: &str,
    accountant_name: &str,
) -> Result<String, Error> {
    let mode = schedule(rounds, sampling_rate, mode_name)?;
    let accountant = accountant(accountant_name)?;
    check_sigma(noise_multiplier)?;
    check_delta(delta)?;
    let release = RoundRelease {
        mode,
        noise_multiplier,
        sampling_rate,
    };
    let s = fedpref_privacy::epsilon_after_with(
        accountant,
        &release,
        rounds,
        delta,
        &OrderGrid::default(),
    )
    .map_err(failed)?;
    Ok(render(&s, noise_multiplier, sampling_rate, rounds))
}

/// δ after `rounds` releases, at ε.
pub fn delta(
    noise_multiplier: f64,
    epsilon: f64,
    rounds: u64,
    sampling_rate: f64,
    mode_name: &str,
    accountant_name: &str,
) -> Result<String, Error> {
    let mode = schedule(rounds, sampling_rate, mode_name)?;
    let accountant = accountant(accountant_name)?;
    check_sigma(noise_multiplier)?;
    if !(epsilon.is_finite() && epsilon >= 0.0) {
        return Err(invalid(format!(
            "epsilon {epsilon}: ε must be a finite number ≥ 0"
        )));
    }
    let release = RoundRelease {
        mode,
        noise_multiplier,
        sampling_rate,
    };
    let s = fedpref_privacy::delta_after_with(
        accountant,
        &release,
        rounds,
        epsilon,
        &OrderGrid::default(),
    )
    .map_err(failed)?;
    Ok(render(&s, noise_multiplier, sampling_rate, rounds))
}

/// The smallest σ that keeps `rounds` releases within (target ε, δ).
pub fn calibrate(
    target_epsilon: f64,
    delta: f64,
    rounds: u64,
    sampling_rate: f64,
    mode_name: &str,
    accountant_name: &str,
) -> Result<String, Error> {
    let mode = schedule(rounds, sampling_rate, mode_name)?;
    let accountant = accountant(accountant_name)?;
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(invalid(format!(
            "target_epsilon {target_epsilon}: the target ε must be a finite number greater than 0"
        )));
    }
    check_delta(delta)?;
    let (sigma, s) = fedpref_privacy::calibrate_with(
        accountant,
        mode,
        target_epsilon,
        delta,
        sampling_rate,
        rounds,
        &OrderGrid::default(),
    )
    .map_err(failed)?;
    Ok(render(&s, sigma, sampling_rate, rounds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn local_mode_uses_half_the_noise_multiplier() {
        let local = parse(&epsilon(2.0, 1e-5, 10, 1.0, "local", "pld").unwrap());
        let central = parse(&epsilon(1.0, 1e-5, 10, 1.0, "central", "pld").unwrap());
        assert_eq!(local["epsilon"], central["epsilon"]);
        assert_eq!(local["noise_multiplier"], 2.0);
        assert_eq!(local["mode"], "local");
    }

    #[test]
    fn calibrated_sigma_meets_the_target_and_delta_inverts_epsilon() {
        let c = parse(&calibrate(3.0, 1e-5, 100, 0.01, "central", "pld").unwrap());
        let sigma = c["noise_multiplier"].as_f64().unwrap();
        let e = parse(&epsilon(sigma, 1e-5, 100, 0.01, "central", "pld").unwrap());
        let eps = e["epsilon"].as_f64().unwrap();
        assert!(eps <= 3.0 * (1.0 + 1e-9) && eps > 2.99, "{eps}");
        let d = parse(&delta(sigma, eps, 100, 0.01, "central", "pld").unwrap());
        let got = d["delta"].as_f64().unwrap();
        assert!(got <= 1e-5 * (1.0 + 1e-6), "{got}");
    }

    #[test]
    fn the_accountant_is_named_and_pld_is_tighter() {
        let pld = parse(&epsilon(1.1, 1e-5, 100, 0.01, "central", "pld").unwrap());
        let rdp = parse(&epsilon(1.1, 1e-5, 100, 0.01, "central", "rdp").unwrap());
        assert_eq!(pld["accountant"], "pld");
        assert_eq!(rdp["accountant"], "rdp");
        assert!(pld["order"].is_null() && rdp["order"].as_f64().unwrap() > 1.0);
        assert!(pld["epsilon"].as_f64().unwrap() < rdp["epsilon"].as_f64().unwrap());
        let e = epsilon(1.0, 1e-5, 10, 1.0, "central", "prv").unwrap_err();
        assert!(e.to_string().starts_with("accountant \"prv\""), "{e}");
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = epsilon(1.0, 1e-5, 10, 0.5, "local", "pld").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("sampling_rate 0.5 cannot be used"),
            "{e}"
        );
        let e = epsilon(0.0, 1e-5, 10, 1.0, "central", "pld").unwrap_err();
        assert!(e.to_string().starts_with("noise_multiplier 0"), "{e}");
        let e = epsilon(1.0, 1.0, 10, 1.0, "central", "pld").unwrap_err();
        assert!(e.to_string().starts_with("delta 1"), "{e}");
        let e = epsilon(1.0, 1e-5, 0, 1.0, "central", "pld").unwrap_err();
        assert!(e.to_string().starts_with("rounds"), "{e}");
        let e = calibrate(1.0, 1e-5, 1, 1.0, "none", "pld").unwrap_err();
        assert!(e.to_string().starts_with("mode \"none\""), "{e}");
    }
}
