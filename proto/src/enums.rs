//! Reading enum fields strictly.
//!
//! prost stores enum fields as `i32` and its getters map unknown values to the
//! zero value, so `task.privacy_mode()` on a message carrying garbage quietly
//! answers `PrivacyMode::Unspecified`. Every fedpref.v1 enum's zero value is
//! `*_UNSPECIFIED` and is invalid wherever it appears;
//! [`require_specified`] turns both "unset" and "unknown" into an error that
//! names the field.

/// Why an enum field could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnumError {
    /// The field holds 0, the `*_UNSPECIFIED` value.
    #[error("field `{field}` is unspecified; set one of its values")]
    Unspecified {
        /// Path of the field, e.g. `manifest.privacy_mode`.
        field: String,
    },
    /// The field holds a number no value of the enum has.
    #[error("field `{field}` has unknown value {value}")]
    Unknown {
        /// Path of the field, e.g. `manifest.privacy_mode`.
        field: String,
        /// The raw value.
        value: i32,
    },
}

/// Reads the raw value of a fedpref.v1 enum field, refusing the
/// `*_UNSPECIFIED` zero value and values the enum does not have.
///
/// `field` is the path to name in the error, e.g. `task.privacy_mode`.
///
/// ```
/// use fedpref_proto::require_specified;
/// use fedpref_proto::v1::{PrivacyMode, Task};
///
/// let task = Task { privacy_mode: PrivacyMode::Local as i32, ..Default::default() };
/// let mode: PrivacyMode = require_specified("task.privacy_mode", task.privacy_mode)?;
/// assert_eq!(mode, PrivacyMode::Local);
///
/// let err = require_specified::<PrivacyMode>("task.privacy_mode", 0).unwrap_err();
/// assert_eq!(err.to_string(), "field `task.privacy_mode` is unspecified; set one of its values");
/// # Ok::<(), fedpref_proto::EnumError>(())
/// ```
pub fn require_specified<E>(field: &str, raw: i32) -> Result<E, EnumError>
where
    E: TryFrom<i32>,
{
    // Every fedpref.v1 enum's zero value is `*_UNSPECIFIED`; the protocol tests
    // check that for each enum in the descriptor set.
    if raw == 0 {
        return Err(EnumError::Unspecified {
            field: field.to_owned(),
        });
    }
    E::try_from(raw).map_err(|_| EnumError::Unknown {
        field: field.to_owned(),
        value: raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Dtype, LedgerEntryKind, ReportFormat};

    #[test]
    fn a_specified_value_is_returned() {
        let format: ReportFormat = require_specified("format", ReportFormat::Html as i32).unwrap();
        assert_eq!(format, ReportFormat::Html);
        let kind: LedgerEntryKind =
            require_specified("kind", LedgerEntryKind::RoundSpent as i32).unwrap();
        assert_eq!(kind, LedgerEntryKind::RoundSpent);
    }

    #[test]
    fn the_unspecified_zero_value_is_rejected_naming_the_field() {
        let err = require_specified::<Dtype>("header.tensors[2].dtype", 0).unwrap_err();
        assert_eq!(
            err,
            EnumError::Unspecified {
                field: "header.tensors[2].dtype".into()
            }
        );
    }

    #[test]
    fn an_unknown_value_is_rejected_naming_the_field_and_value() {
        let err = require_specified::<ReportFormat>("format", 42).unwrap_err();
        assert_eq!(err.to_string(), "field `format` has unknown value 42");
        assert!(require_specified::<ReportFormat>("format", -1).is_err());
    }
}
