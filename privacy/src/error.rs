use thiserror::Error;

/// Everything that can go wrong in the privacy crate. Each variant names the parameter or
/// value at fault, so that callers can turn it into a CLI error or a gRPC status as it is.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PrivacyError {
    /// A parameter is outside its domain.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        /// The parameter's name as the user knows it (`noise_multiplier`, `delta`, …).
        name: &'static str,
        /// The offending value.
        value: f64,
        /// Why it is not allowed.
        reason: &'static str,
    },
    /// An update contains NaN or ±∞; it is refused, never clipped into an aggregate.
    #[error("update coordinate {index} is {value}: NaN and infinite values are refused")]
    NonFinite {
        /// Index of the first offending coordinate (over all shared tensors, concatenated).
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// Two vectors that must have the same length do not.
    #[error("dimension mismatch: expected {expected} coordinates, got {actual}")]
    DimensionMismatch {
        /// The length that was expected.
        expected: usize,
        /// The length that was given.
        actual: usize,
    },
    /// The requested release cannot be accounted for in this privacy mode.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Spending the next round would exceed the budget; nothing was recorded.
    #[error(
        "budget exceeded: the next round would bring ε to {would_be} (δ = {delta}) against a budget of ε = {budget}"
    )]
    BudgetExceeded {
        /// ε after the refused round.
        would_be: f64,
        /// The budget's ε.
        budget: f64,
        /// The budget's δ.
        delta: f64,
    },
    /// Calibration found no noise multiplier that meets the target.
    #[error("calibration failed: {0}")]
    Calibration(&'static str),
}

impl PrivacyError {
    pub(crate) fn invalid(name: &'static str, value: f64, reason: &'static str) -> Self {
        Self::InvalidParameter {
            name,
            value,
            reason,
        }
    }
}

/// Validation helpers shared by the public constructors.
pub(crate) mod check {
    use super::PrivacyError;

    pub(crate) fn positive(name: &'static str, v: f64) -> Result<f64, PrivacyError> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(PrivacyError::invalid(
                name,
                v,
                "must be a finite number greater than 0",
            ))
        }
    }

    pub(crate) fn sampling_rate(v: f64) -> Result<f64, PrivacyError> {
        if v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(PrivacyError::invalid(
                "sampling_rate",
                v,
                "must be in (0, 1]",
            ))
        }
    }

    pub(crate) fn delta(v: f64) -> Result<f64, PrivacyError> {
        if v > 0.0 && v < 1.0 {
            Ok(v)
        } else {
            Err(PrivacyError::invalid("delta", v, "must be in (0, 1)"))
        }
    }

    pub(crate) fn epsilon(v: f64) -> Result<f64, PrivacyError> {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(PrivacyError::invalid(
                "epsilon",
                v,
                "must be a finite number ≥ 0",
            ))
        }
    }
}
