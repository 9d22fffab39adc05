//! Distributed mode: the manifest's `[secure_aggregation]` section and the parameters every
//! round of a `privacy_mode = "distributed"` run derives from it.
//!
//! ```toml
//! privacy_mode = "distributed"
//! noise_multiplier = 1.0       # σ of the noise all honest devices add together
//!
//! [sampling]
//! kind = "cohort"              # distributed mode needs the cohort size n up front
//! target_size = 100            # n: participants 1..=n, the first n eligible check-ins
//! minimum_size = 60            # the fewest masked inputs whose sum is ever unmasked
//! round_seconds = 600          # unused in distributed mode: the stages' durations rule
//!
//! [secure_aggregation]
//! noise = "discrete_gaussian"  # KLS21's distributed discrete Gaussian
//! dropout_rate = 0.2           # δ: expected share of devices lost during a round
//! corruption_rate = 0.1        # γ: share of devices assumed to collude with the server
//! # threshold = 40             # optional: raise t above what δ and γ call for
//! # scale = 1024.0             # optional: lattice points per model unit (default: the
//! #                            # largest power of two the overflow check allows)
//! # rounding_beta = 0.6065     # optional: conditional rounding's β (default e^(−1/2))
//! # assumed_honest_devices = 49 # optional: at most the guaranteed minimum (the default)
//! advertise_keys_seconds = 60
//! share_keys_seconds = 60
//! masked_input_seconds = 600
//! unmasking_seconds = 60
//! ```
//!
//! From it [`plan`] derives, once per run, a [`DistributedPlan`]:
//! - **k and t** from [`SecAggParams::choose`] (n, δ, γ): SecAgg+ on a Harary graph of
//!   degree k when that meets the paper's conditions, else SecAgg on the complete graph;
//!   `threshold` may raise t (never lower it: a lower t lets fewer colluders reconstruct a
//!   device's secrets).
//! - **m**, the fewest masked inputs the coordinator unmasks, `max(t, sampling.minimum_size)`.
//! - **The honest devices the noise is calibrated for**, by default the guaranteed minimum
//!   `m − ⌈γn⌉ − 1` (contributors, minus the assumed colluders, minus the target user
//!   itself); a manifest may assume fewer, never more.
//! - **The mechanism**: [`DistributedDiscreteGaussian::for_noise_multiplier`] with C, the
//!   granularity 1/scale, d, β, σ and those honest devices, so the honest devices' noise adds
//!   up to at least (σC)² per coordinate.
//! - **The encoding**, whose overflow check ([`FixedPoint::new`]) runs here for n devices,
//!   C, the scale and each device's noise.

use fedpref_privacy::distributed::DistributedDiscreteGaussian;
use fedpref_secagg::encoding::FixedPoint;
use fedpref_secagg::{EncodingParams, SecAggParams};
use serde::{Deserialize, Serialize};

/// Conditional randomised rounding's default β, KLS21's e^(−1/2).
pub const DEFAULT_ROUNDING_BETA: f64 = 0.606_530_659_712_633_4;

/// The integer noise devices add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistributedNoiseKind {
    /// The distributed discrete Gaussian (Kairouz, Liu, Steinke 2021).
    DiscreteGaussian,
    /// The Skellam mechanism (Agarwal, Kairouz, Liu 2021): not implemented, refused.
    Skellam,
}

/// The manifest's `[secure_aggregation]` section (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationSpec {
    /// The devices' integer noise.
    pub noise: DistributedNoiseKind,
    /// δ ∈ [0, 0.5): the share of a cohort expected to drop out during a round.
    pub dropout_rate: f64,
    /// γ ∈ [0, 0.5): the share of a cohort assumed to collude with the coordinator.
    pub corruption_rate: f64,
    /// Raises the Shamir threshold t above the one δ and γ call for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    /// Lattice points per model unit (1/granularity); default: the largest power of two
    /// that passes the overflow check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Conditional randomised rounding's β ∈ [0, 0.99] (default e^(−1/2)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounding_beta: Option<f64>,
    /// Honest devices besides the target that the noise calibration assumes (default, and
    /// maximum: m − ⌈γn⌉ − 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assumed_honest_devices: Option<u64>,
    /// How long devices have to advertise keys (the cohort fills in this stage).
    #[serde(default = "default_stage_seconds")]
    pub advertise_keys_seconds: u64,
    /// How long devices have to send their encrypted shares.
    #[serde(default = "default_stage_seconds")]
    pub share_keys_seconds: u64,
    /// How long devices have to train and upload their masked input.
    #[serde(default = "default_masked_input_seconds")]
    pub masked_input_seconds: u64,
    /// How long surviving devices have to reveal their shares.
    #[serde(default = "default_stage_seconds")]
    pub unmasking_seconds: u64,
}

fn default_stage_seconds() -> u64 {
    60
}
fn default_masked_input_seconds() -> u64 {
    600
}

/// What every round of a distributed run uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedPlan {
    /// k, t and the graph kind for the cohort.
    pub params: SecAggParams,
    /// m: the fewest masked inputs whose sum is unmasked.
    pub min_contributors: u32,
    /// The checked encoding's parameters.
    pub encoding: EncodingParams,
    /// The devices' noise, and the accountant of one round.
    pub mechanism: DistributedDiscreteGaussian,
    /// β of conditional randomised rounding.
    pub rounding_beta: f64,
    /// γ: the share of the cohort assumed to collude with the coordinator.
    pub corruption_rate: f64,
    /// How long each stage lasts, ms: advertise keys, share keys, masked input, unmasking.
    pub stage_millis: [i64; 4],
}

impl DistributedPlan {
    /// The assumption the run's ε rests on, in words.
    pub fn assumption(&self) -> String {
        format!(
            "distributed discrete Gaussian under secure aggregation (zero-out neighbouring): at least {} honest devices besides the target have their masked, noised input in every unmasked sum, and the coordinator follows the protocol (honest-but-curious, colluding with at most a {:.3} share of the cohort)",
            self.mechanism.honest_devices(),
            self.corruption_rate
        )
    }
}

/// A manifest key at fault, its value and why.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanError {
    /// The key, dotted (`secure_aggregation.threshold`).
    pub key: String,
    /// The offending value.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

fn fail(key: &str, value: impl ToString, reason: impl Into<String>) -> PlanError {
    PlanError {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// What a distributed plan is derived from: the parts of a run's manifest it reads (a
/// `&RunManifest` converts into it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanInputs {
    /// The manifest's `[secure_aggregation]` section.
    pub secure_aggregation: Option<SecureAggregationSpec>,
    /// `sampling`: `Some((target_size, minimum_size))` for a cohort, `None` for Poisson
    /// sampling (which distributed mode refuses).
    pub cohort: Option<(u32, u32)>,
    /// σ.
    pub noise_multiplier: Option<f64>,
    /// The number of model parameters d.
    pub dimension: usize,
    /// The clip norm C.
    pub clip_norm: f64,
}

/// Derives a distributed run's per-round parameters from its manifest, checking each one
/// (see the module docs). The manifest must be in distributed mode with its section.
pub fn plan(inputs: impl Into<PlanInputs>) -> Result<DistributedPlan, PlanError> {
    let inputs = inputs.into();
    let spec = inputs.secure_aggregation.ok_or_else(|| {
        fail(
            "secure_aggregation",
            "(missing)",
            "privacy_mode = \"distributed\" needs a [secure_aggregation] section",
        )
    })?;
    if spec.noise == DistributedNoiseKind::Skellam {
        return Err(fail(
            "secure_aggregation.noise",
            "\"skellam\"",
            "the Skellam mechanism is not implemented: use \"discrete_gaussian\"",
        ));
    }
    let (n, minimum_size) = match inputs.cohort {
        Some(cohort) => cohort,
        None => {
            return Err(fail(
                "sampling.kind",
                "\"poisson\"",
                "distributed mode needs sampling.kind = \"cohort\": secure aggregation fixes the cohort size n before the round starts, and the coordinator knows who took part, so no amplification by sampling could be claimed",
            ));
        }
    };
    for (key, rate) in [
        ("secure_aggregation.dropout_rate", spec.dropout_rate),
        ("secure_aggregation.corruption_rate", spec.corruption_rate),
    ] {
        if !(rate.is_finite() && (0.0..0.5).contains(&rate)) {
            return Err(fail(key, rate, "must be in [0, 0.5)"));
        }
    }
    let mut params = SecAggParams::choose(n, spec.dropout_rate, spec.corruption_rate)
        .map_err(|e| fail("sampling.target_size", n, e.to_string()))?;
    if let Some(t) = spec.threshold {
        if t < params.threshold || t > params.degree {
            return Err(fail(
                "secure_aggregation.threshold",
                t,
                format!(
                    "must be between {} (what dropout_rate and corruption_rate call for) and the graph degree {}",
                    params.threshold, params.degree
                ),
            ));
        }
        params.threshold = t;
    }
    let min_contributors = params.threshold.max(minimum_size);
    if min_contributors > n {
        return Err(fail(
            "sampling.minimum_size",
            minimum_size,
            format!("must be at most sampling.target_size = {n}"),
        ));
    }
    let colluders = (spec.corruption_rate * f64::from(n)).ceil() as u64;
    let guaranteed = u64::from(min_contributors)
        .saturating_sub(colluders)
        .saturating_sub(1);
    if guaranteed == 0 {
        return Err(fail(
            "sampling.minimum_size",
            minimum_size,
            format!(
                "with the threshold {} and {colluders} assumed colluders no honest device besides the target is guaranteed to add noise: raise sampling.minimum_size",
                params.threshold
            ),
        ));
    }
    let honest = match spec.assumed_honest_devices {
        Some(0) => {
            return Err(fail(
                "secure_aggregation.assumed_honest_devices",
                0,
                "must be at least 1",
            ));
        }
        Some(h) if h > guaranteed => {
            return Err(fail(
                "secure_aggregation.assumed_honest_devices",
                h,
                format!(
                    "at most {guaranteed} honest devices besides the target are guaranteed (the {min_contributors} contributors the round needs, minus ⌈γn⌉ = {colluders} colluders, minus the target)"
                ),
            ));
        }
        Some(h) => h,
        None => guaranteed,
    };
    let beta = spec.rounding_beta.unwrap_or(DEFAULT_ROUNDING_BETA);
    if !(beta.is_finite() && (0.0..=0.99).contains(&beta)) {
        return Err(fail(
            "secure_aggregation.rounding_beta",
            beta,
            "must be in [0, 0.99]",
        ));
    }
    let sigma = inputs.noise_multiplier.ok_or_else(|| {
        fail(
            "noise_multiplier",
            "(missing)",
            "distributed mode needs noise_multiplier",
        )
    })?;
    let dimension = inputs.dimension;
    let clip_norm = inputs.clip_norm;
    let mechanism_at = |scale: f64| {
        DistributedDiscreteGaussian::for_noise_multiplier(
            clip_norm,
            1.0 / scale,
            dimension,
            beta,
            sigma,
            honest,
        )
    };
    let encoding_at = |scale: f64, mechanism: &DistributedDiscreteGaussian| EncodingParams {
        clip_norm,
        scale,
        cohort_size: n as usize,
        dimension,
        device_noise_std: mechanism.device_noise_std(),
    };
    let scale = match spec.scale {
        Some(s) => {
            if !(s.is_finite() && s > 0.0) {
                return Err(fail(
                    "secure_aggregation.scale",
                    s,
                    "must be a finite number > 0",
                ));
            }
            s
        }
        None => {
            // Noise in model units barely depends on the scale (s² is rounded up to an
            // integer), so start from the bound for the nominal noise and halve until the
            // exact check passes.
            let nominal = sigma * clip_norm / (honest as f64).sqrt();
            let mut s = FixedPoint::largest_scale(clip_norm, n as usize, dimension, nominal)
                .map_err(|e| fail("clip_norm", clip_norm, e.to_string()))?;
            let mut tries = 0;
            loop {
                let ok = mechanism_at(s)
                    .ok()
                    .is_some_and(|m| FixedPoint::new(encoding_at(s, &m)).is_ok());
                if ok || tries > 64 {
                    break s;
                }
                s /= 2.0;
                tries += 1;
            }
        }
    };
    let mechanism =
        mechanism_at(scale).map_err(|e| fail("secure_aggregation.scale", scale, e.to_string()))?;
    let encoding = encoding_at(scale, &mechanism);
    FixedPoint::new(encoding)
        .map_err(|e| fail("secure_aggregation.scale", scale, e.to_string()))?;
    let seconds = [
        (
            "secure_aggregation.advertise_keys_seconds",
            spec.advertise_keys_seconds,
        ),
        (
            "secure_aggregation.share_keys_seconds",
            spec.share_keys_seconds,
        ),
        (
            "secure_aggregation.masked_input_seconds",
            spec.masked_input_seconds,
        ),
        (
            "secure_aggregation.unmasking_seconds",
            spec.unmasking_seconds,
        ),
    ];
    let mut stage_millis = [0i64; 4];
    for (slot, (key, s)) in stage_millis.iter_mut().zip(seconds) {
        if s == 0 || s > 7 * 24 * 3600 {
            return Err(fail(key, s, "must be between 1 second and 7 days"));
        }
        *slot = (s as i64) * 1000;
    }
    Ok(DistributedPlan {
        params,
        min_contributors,
        encoding,
        mechanism,
        rounding_beta: beta,
        corruption_rate: spec.corruption_rate,
        stage_millis,
    })
}
