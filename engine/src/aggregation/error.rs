//! The aggregation errors: configuration and round errors ([`AggregationError`]) and the
//! reasons one update is refused ([`UpdateRejected`]).

use fedpref_privacy::PrivacyError;
use thiserror::Error;

/// A configuration error, or a round that cannot be aggregated or applied. Each variant
/// names the key, value or coordinate at fault.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AggregationError {
    /// A configuration value is out of range.
    #[error("invalid {key} = {value}: {reason}")]
    InvalidConfig {
        /// The key as the manifest spells it (`server_optimizer.tau`, `clip_norm`, …).
        key: &'static str,
        /// The offending value.
        value: f64,
        /// The allowed range.
        reason: &'static str,
    },
    /// A robust optimiser (median, trimmed mean) was configured in a mode whose privacy
    /// analysis does not cover it.
    #[error(
        "server_optimizer.kind = \"{optimizer}\" is refused in privacy mode \"{mode}\": the coordinate-wise {statistic} is not covered by the central-DP sensitivity analysis (the noise is calibrated to the add/remove-one sensitivity C of a sum of clipped updates, and a {statistic} of the updates is not such a sum); use fedavg, fedavgm, fedadam, fedyogi or fedadagrad, or privacy mode \"local\""
    )]
    RobustNotCoveredByDp {
        /// The optimiser's kind (`median`, `trimmed-mean`).
        optimizer: &'static str,
        /// The statistic, in words.
        statistic: &'static str,
        /// The privacy mode.
        mode: &'static str,
    },
    /// DP-FTRL's tree noise is added by the coordinator to the round sums: central mode only.
    #[error(
        "server_optimizer.kind = \"dp-ftrl\" is refused in privacy mode \"{mode}\": its tree noise is added by the coordinator to the sums of clipped updates, so privacy_mode must be \"central\" (distributed mode needs each device to add a share of every tree node's noise under secure aggregation, which is not built)"
    )]
    TreeNeedsCentral {
        /// The privacy mode.
        mode: &'static str,
    },
    /// A tree release was asked of an aggregator that is not central.
    #[error("tree aggregation needs the central lattice sum; this round aggregates in mode {mode}")]
    NotATreeRound {
        /// The privacy mode.
        mode: &'static str,
    },
    /// A model must have at least one coordinate.
    #[error("the model has no coordinates: dimension must be at least 1")]
    EmptyModel,
    /// A weighted mean of no updates, or of updates whose weights are all 0, is undefined.
    #[error(
        "nothing to average: {contributions} update(s) accepted, with total weight 0; the round should be abandoned"
    )]
    NothingToAverage {
        /// Updates accepted (all with weight 0).
        contributions: usize,
    },
    /// Privacy mode "none" adds no noise, so its aggregate may not carry secure provenance.
    #[error(
        "privacy mode \"none\" is for simulations only: its aggregate carries no DP noise and cannot be finished with the secure sampler"
    )]
    NoDpWithSecureSampler,
    /// Simulated (un-noised) updates were accumulated, and their aggregate noise would be
    /// drawn by the secure sampler: only a simulation may add them.
    #[error(
        "this round holds simulated un-noised updates: their aggregate noise is the simulator's, so the round cannot be finished with the secure sampler"
    )]
    SimulatedNoiseWithSecureSampler,
    /// The aggregate has a NaN or infinite coordinate (cannot happen with validated inputs).
    #[error("the aggregate's coordinate {index} is not finite; nothing was released")]
    NonFiniteAggregate {
        /// The first offending coordinate.
        index: usize,
    },
    /// The optimiser step would make a parameter or a moment NaN or infinite; nothing was
    /// changed.
    #[error(
        "the server step would make the {what} at coordinate {index} non-finite; parameters and optimiser state are unchanged"
    )]
    NonFiniteStep {
        /// The first offending coordinate.
        index: usize,
        /// What would overflow: `parameter` or `optimiser moment`.
        what: &'static str,
    },
    /// Lengths that must agree do not.
    #[error("dimension mismatch: {what} has {actual} coordinates, expected {expected}")]
    DimensionMismatch {
        /// Which vector.
        what: &'static str,
        /// The length expected.
        expected: usize,
        /// The length found.
        actual: usize,
    },
    /// The persisted optimiser state belongs to another optimiser.
    #[error(
        "the server state holds {found} moments, but server_optimizer.kind = \"{expected}\" needs {needed}"
    )]
    StateMismatch {
        /// The configured optimiser's kind.
        expected: &'static str,
        /// The moments it needs.
        needed: &'static str,
        /// The moments the state holds.
        found: &'static str,
    },
    /// The privacy crate refused the mechanism or the release.
    #[error("central aggregation: {0}")]
    Privacy(#[from] PrivacyError),
}

/// Why one update was refused. Nothing of a refused update is accumulated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum UpdateRejected {
    /// The update does not have the model's number of coordinates.
    #[error("expected {expected} values, got {actual}")]
    WrongLength {
        /// The model's dimension.
        expected: usize,
        /// The update's length.
        actual: usize,
    },
    /// A coordinate is NaN or ±∞.
    #[error("coordinate {index} is {value}: NaN and infinite values are refused")]
    NonFinite {
        /// The first offending coordinate.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// The weight is out of range.
    #[error("weight {weight} refused: {reason}")]
    InvalidWeight {
        /// The weight given.
        weight: f64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A simulated sparse update is malformed or this round's path cannot take it.
    #[error("sparse update refused: {reason}")]
    InvalidSparse {
        /// What is wrong.
        reason: String,
    },
    /// The privacy crate refused the update (e.g. the lattice sum would overflow).
    #[error("the central sum refused the update: {0}")]
    Privacy(#[from] PrivacyError),
}

/// `value` must be finite and > 0.
pub(super) fn positive(key: &'static str, value: f64) -> Result<f64, AggregationError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(AggregationError::InvalidConfig {
            key,
            value,
            reason: "must be a finite number greater than 0",
        })
    }
}

/// `value` must be in [0, 1).
pub(super) fn unit_interval(key: &'static str, value: f64) -> Result<f64, AggregationError> {
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(AggregationError::InvalidConfig {
            key,
            value,
            reason: "must be in [0, 1)",
        })
    }
}
