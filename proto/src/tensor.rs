//! Conversions between [`NamedTensor`] and slices of numbers, with validation.
//!
//! A tensor on the wire is a name, a shape, a [`Dtype`] and little-endian bytes.
//! Everything here checks that those four agree before a number is read or
//! written, and every error names the tensor and says what is wrong with it.
//! NaN and infinities are refused in both directions: fedpref never puts them on
//! the wire, so they can never reach an aggregate or a released model.

use crate::v1::{Dtype, NamedTensor, TensorSpec};

/// Why a tensor could not be built, read or validated. Every variant but
/// [`TensorError::EmptyName`] names the tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The tensor's name is empty.
    #[error("a tensor has an empty name")]
    EmptyName,
    /// The dtype is `DTYPE_UNSPECIFIED`.
    #[error("tensor `{name}`: dtype is DTYPE_UNSPECIFIED")]
    UnspecifiedDtype {
        /// Name of the tensor.
        name: String,
    },
    /// The dtype is a number that no [`Dtype`] variant has.
    #[error("tensor `{name}`: dtype {value} is not a known Dtype")]
    UnknownDtype {
        /// Name of the tensor.
        name: String,
        /// The raw enum value.
        value: i32,
    },
    /// The element count, or the byte length it implies, does not fit in this
    /// platform's `usize`.
    #[error("tensor `{name}`: shape {shape:?} is too large (its size overflows)")]
    ShapeOverflow {
        /// Name of the tensor.
        name: String,
        /// The shape.
        shape: Vec<u64>,
    },
    /// The number of values given does not match the shape.
    #[error(
        "tensor `{name}`: shape {shape:?} has {expected} elements but {actual} values were given"
    )]
    ElementCountMismatch {
        /// Name of the tensor.
        name: String,
        /// The shape.
        shape: Vec<u64>,
        /// Element count the shape implies.
        expected: usize,
        /// Number of values given.
        actual: usize,
    },
    /// The byte payload's length does not match shape x dtype size.
    #[error(
        "tensor `{name}`: data is {actual} bytes but shape {shape:?} of {} needs {expected}",
        .dtype.as_str_name()
    )]
    ByteLengthMismatch {
        /// Name of the tensor.
        name: String,
        /// The shape.
        shape: Vec<u64>,
        /// The dtype.
        dtype: Dtype,
        /// Byte length the shape and dtype imply.
        expected: usize,
        /// Byte length of the payload.
        actual: usize,
    },
    /// The tensor holds a different element type than the one asked for.
    #[error(
        "tensor `{name}`: is {} but {} was expected",
        .actual.as_str_name(),
        .expected.as_str_name()
    )]
    DtypeMismatch {
        /// Name of the tensor.
        name: String,
        /// The dtype asked for.
        expected: Dtype,
        /// The tensor's dtype.
        actual: Dtype,
    },
    /// A floating-point element is NaN or infinite.
    #[error("tensor `{name}`: element {index} is not finite ({value})")]
    NonFinite {
        /// Name of the tensor.
        name: String,
        /// Row-major index of the first non-finite element.
        index: usize,
        /// The element, widened to `f64`.
        value: f64,
    },
}

impl Dtype {
    /// Size in bytes of one element, or `None` for [`Dtype::Unspecified`],
    /// which is never valid.
    ///
    /// ```
    /// use fedpref_proto::v1::Dtype;
    /// assert_eq!(Dtype::F32.size_bytes(), Some(4));
    /// assert_eq!(Dtype::F64.size_bytes(), Some(8));
    /// assert_eq!(Dtype::Unspecified.size_bytes(), None);
    /// ```
    pub const fn size_bytes(self) -> Option<usize> {
        match self {
            Dtype::Unspecified => None,
            Dtype::F32 | Dtype::U32 => Some(4),
            Dtype::F64 => Some(8),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for u32 {}
}

/// A Rust number type that a [`NamedTensor`] can hold: `f32` ([`Dtype::F32`]),
/// `f64` ([`Dtype::F64`]) or `u32` ([`Dtype::U32`]). Sealed.
pub trait TensorElement: Copy + sealed::Sealed {
    /// The dtype of a tensor of this element type.
    const DTYPE: Dtype;
    /// Size of one element in bytes.
    const SIZE: usize;
    /// Writes the element's little-endian bytes into exactly [`Self::SIZE`] bytes.
    fn write_le(self, out: &mut [u8]);
    /// Reads one element from exactly [`Self::SIZE`] little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Whether the element is finite (always true for integers).
    fn is_finite(self) -> bool;
    /// The element widened to `f64`, for error messages.
    fn to_f64(self) -> f64;
}

macro_rules! tensor_element {
    ($ty:ty, $dtype:expr, $finite:expr) => {
        impl TensorElement for $ty {
            const DTYPE: Dtype = $dtype;
            const SIZE: usize = std::mem::size_of::<$ty>();
            #[inline]
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn from_le(bytes: &[u8]) -> Self {
                let mut le = [0u8; std::mem::size_of::<$ty>()];
                le.copy_from_slice(bytes);
                <$ty>::from_le_bytes(le)
            }
            #[inline]
            fn is_finite(self) -> bool {
                ($finite)(self)
            }
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
        }
    };
}

tensor_element!(f32, Dtype::F32, f32::is_finite);
tensor_element!(f64, Dtype::F64, f64::is_finite);
tensor_element!(u32, Dtype::U32, |_| true);

impl NamedTensor {
    /// Builds a tensor from values in row-major order, checking that the name
    /// is non-empty, that the shape's element count equals `values.len()`, and
    /// that every value is finite.
    ///
    /// ```
    /// use fedpref_proto::v1::{Dtype, NamedTensor};
    /// let t = NamedTensor::from_values("item_biases", vec![3], &[0.5f32, -0.25, 0.0])?;
    /// assert_eq!(t.dtype(), Dtype::F32);
    /// assert_eq!(t.data.len(), 12);
    /// # Ok::<(), fedpref_proto::TensorError>(())
    /// ```
    pub fn from_values<T: TensorElement>(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[T],
    ) -> Result<Self, TensorError> {
        let name = name.into();
        if name.is_empty() {
            return Err(TensorError::EmptyName);
        }
        let expected = element_count(&name, &shape)?;
        if expected != values.len() {
            return Err(TensorError::ElementCountMismatch {
                name,
                shape,
                expected,
                actual: values.len(),
            });
        }
        // A branch-free pass over every value first (it vectorises); the index is looked for
        // only when there is one to report.
        if !values.iter().fold(true, |all, v| all & v.is_finite())
            && let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite())
        {
            return Err(TensorError::NonFinite {
                name,
                index,
                value: value.to_f64(),
            });
        }
        let mut data = vec![0u8; values.len() * T::SIZE];
        for (bytes, value) in data.chunks_exact_mut(T::SIZE).zip(values) {
            value.write_le(bytes);
        }
        Ok(NamedTensor {
            name,
            shape,
            dtype: T::DTYPE as i32,
            data,
        })
    }

    /// Builds a [`Dtype::F64`] tensor; see [`NamedTensor::from_values`].
    pub fn from_f64(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[f64],
    ) -> Result<Self, TensorError> {
        Self::from_values(name, shape, values)
    }

    /// Builds a [`Dtype::F32`] tensor; see [`NamedTensor::from_values`].
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[f32],
    ) -> Result<Self, TensorError> {
        Self::from_values(name, shape, values)
    }

    /// Reads the elements, which must be of exactly type `T`, after checking
    /// the name, the dtype, the byte length and (for floats) finiteness.
    pub fn values<T: TensorElement>(&self) -> Result<Vec<T>, TensorError> {
        let dtype = self.checked_dtype()?;
        if dtype != T::DTYPE {
            return Err(self.dtype_mismatch(T::DTYPE, dtype));
        }
        self.check_byte_length(dtype)?;
        let mut values = Vec::with_capacity(self.data.len() / T::SIZE);
        for (index, bytes) in self.data.chunks_exact(T::SIZE).enumerate() {
            let value = T::from_le(bytes);
            if !value.is_finite() {
                return Err(TensorError::NonFinite {
                    name: self.name.clone(),
                    index,
                    value: value.to_f64(),
                });
            }
            values.push(value);
        }
        Ok(values)
    }

    /// Reads a floating-point tensor as `f64`: a [`Dtype::F64`] tensor as is,
    /// a [`Dtype::F32`] tensor widened (exactly). Any other dtype is an error.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, TensorError> {
        match self.checked_dtype()? {
            Dtype::F32 => Ok(self.values::<f32>()?.into_iter().map(f64::from).collect()),
            Dtype::F64 => self.values::<f64>(),
            other => Err(self.dtype_mismatch(Dtype::F64, other)),
        }
    }

    /// Reads a [`Dtype::F32`] tensor. An `F64` tensor is an error rather than
    /// a silent narrowing.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, TensorError> {
        self.values::<f32>()
    }

    /// Number of elements the shape implies (1 for a scalar).
    pub fn element_count(&self) -> Result<usize, TensorError> {
        element_count(&self.name, &self.shape)
    }

    /// Checks everything [`NamedTensor::values`] checks, without keeping the
    /// values: non-empty name, a known dtype, byte length = element count x
    /// dtype size, and finite floats.
    pub fn validate(&self) -> Result<(), TensorError> {
        match self.checked_dtype()? {
            Dtype::F32 => self.values::<f32>().map(drop),
            Dtype::F64 => self.values::<f64>().map(drop),
            Dtype::U32 => self.values::<u32>().map(drop),
            Dtype::Unspecified => unreachable!("checked_dtype refuses Unspecified"),
        }
    }

    /// The tensor's name, shape and dtype, e.g. for an upload header.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
            dtype: self.dtype,
        }
    }

    /// The dtype, refusing an empty name, `DTYPE_UNSPECIFIED` and unknown values.
    fn checked_dtype(&self) -> Result<Dtype, TensorError> {
        if self.name.is_empty() {
            return Err(TensorError::EmptyName);
        }
        match Dtype::try_from(self.dtype) {
            Ok(Dtype::Unspecified) => Err(TensorError::UnspecifiedDtype {
                name: self.name.clone(),
            }),
            Ok(dtype) => Ok(dtype),
            Err(_) => Err(TensorError::UnknownDtype {
                name: self.name.clone(),
                value: self.dtype,
            }),
        }
    }

    fn check_byte_length(&self, dtype: Dtype) -> Result<(), TensorError> {
        let count = self.element_count()?;
        let size = dtype
            .size_bytes()
            .expect("checked_dtype refuses Unspecified");
        let expected = count
            .checked_mul(size)
            .ok_or_else(|| TensorError::ShapeOverflow {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })?;
        if expected != self.data.len() {
            return Err(TensorError::ByteLengthMismatch {
                name: self.name.clone(),
                shape: self.shape.clone(),
                dtype,
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    fn dtype_mismatch(&self, expected: Dtype, actual: Dtype) -> TensorError {
        TensorError::DtypeMismatch {
            name: self.name.clone(),
            expected,
            actual,
        }
    }
}

/// Product of the dimensions, checked for overflow of `u64` and `usize`.
fn element_count(name: &str, shape: &[u64]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1u64, |count, &dim| count.checked_mul(dim))
        .and_then(|count| usize::try_from(count).ok())
        .ok_or_else(|| TensorError::ShapeOverflow {
            name: name.to_owned(),
            shape: shape.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: Vec<u64>, dtype: Dtype, data: Vec<u8>) -> NamedTensor {
        NamedTensor {
            name: name.to_owned(),
            shape,
            dtype: dtype as i32,
            data,
        }
    }

    #[test]
    fn f64_values_round_trip_through_little_endian_bytes() {
        let values = [1.5, -0.0, f64::MIN_POSITIVE, 1e300, -7.25, 0.1];
        let t = NamedTensor::from_f64("item_factors", vec![3, 2], &values).unwrap();
        assert_eq!(t.dtype(), Dtype::F64);
        assert_eq!(&t.data[..8], &1.5f64.to_le_bytes());
        let back = t.to_f64_vec().unwrap();
        assert_eq!(back.len(), values.len());
        for (a, b) in back.iter().zip(values) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn f32_values_round_trip_and_widen_exactly_to_f64() {
        let values = [0.1f32, -3.5, 1e-30];
        let t = NamedTensor::from_f32("item_biases", vec![3], &values).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), values);
        let widened = t.to_f64_vec().unwrap();
        assert_eq!(widened, values.map(f64::from));
    }

    #[test]
    fn u32_values_round_trip() {
        let values = [0u32, 1, u32::MAX];
        let t = NamedTensor::from_values("masked_item_factors", vec![3], &values).unwrap();
        assert_eq!(t.dtype(), Dtype::U32);
        assert_eq!(t.values::<u32>().unwrap(), values);
        assert!(t.validate().is_ok());
    }

    #[test]
    fn scalar_has_empty_shape_and_one_element() {
        let t = NamedTensor::from_f64("global_offset", vec![], &[3.5]).unwrap();
        assert_eq!(t.element_count().unwrap(), 1);
        assert_eq!(t.to_f64_vec().unwrap(), vec![3.5]);
    }

    #[test]
    fn zero_dimension_means_no_elements() {
        let t = NamedTensor::from_f32("item_factors", vec![0, 16], &[]).unwrap();
        assert!(t.data.is_empty());
        assert_eq!(t.to_f32_vec().unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn dtype_sizes_match_their_rust_types() {
        assert_eq!(Dtype::F32.size_bytes(), Some(<f32 as TensorElement>::SIZE));
        assert_eq!(Dtype::F64.size_bytes(), Some(<f64 as TensorElement>::SIZE));
        assert_eq!(Dtype::U32.size_bytes(), Some(<u32 as TensorElement>::SIZE));
        assert_eq!(Dtype::Unspecified.size_bytes(), None);
    }

    #[test]
    fn values_not_matching_the_shape_are_rejected_naming_the_tensor() {
        let err = NamedTensor::from_f64("item_biases", vec![2, 2], &[1.0, 2.0, 3.0]).unwrap_err();
        assert_eq!(
            err,
            TensorError::ElementCountMismatch {
                name: "item_biases".into(),
                shape: vec![2, 2],
                expected: 4,
                actual: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "tensor `item_biases`: shape [2, 2] has 4 elements but 3 values were given"
        );
    }

    #[test]
    fn tensor_with_an_empty_name_is_rejected() {
        let err = NamedTensor::from_f64("", vec![1], &[1.0]).unwrap_err();
        assert_eq!(err, TensorError::EmptyName);
        let decoded = tensor("", vec![1], Dtype::F64, vec![0; 8]);
        assert_eq!(decoded.to_f64_vec().unwrap_err(), TensorError::EmptyName);
    }

    #[test]
    fn non_finite_values_are_refused_when_building_naming_the_index() {
        let err =
            NamedTensor::from_f64("item_factors", vec![3], &[1.0, f64::NAN, 2.0]).unwrap_err();
        assert!(
            matches!(err, TensorError::NonFinite { ref name, index: 1, .. } if name == "item_factors"),
            "{err:?}"
        );
        let err = NamedTensor::from_f32("item_factors", vec![1], &[f32::INFINITY]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `item_factors`: element 0 is not finite (inf)"
        );
    }

    #[test]
    fn non_finite_values_are_refused_when_reading() {
        let mut data = Vec::new();
        data.extend_from_slice(&1.0f64.to_le_bytes());
        data.extend_from_slice(&f64::NEG_INFINITY.to_le_bytes());
        let t = tensor("item_biases", vec![2], Dtype::F64, data);
        let err = t.to_f64_vec().unwrap_err();
        assert!(
            matches!(err, TensorError::NonFinite { index: 1, .. }),
            "{err:?}"
        );
        assert!(t.validate().is_err());
    }

    #[test]
    fn tensor_with_wrong_byte_length_is_rejected_naming_the_tensor() {
        let t = tensor("item_factors", vec![2, 3], Dtype::F32, vec![0; 23]);
        let err = t.to_f32_vec().unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `item_factors`: data is 23 bytes but shape [2, 3] of DTYPE_F32 needs 24"
        );
        assert_eq!(t.validate().unwrap_err(), err);
    }

    #[test]
    fn tensor_with_unspecified_dtype_is_rejected() {
        let t = tensor("item_factors", vec![1], Dtype::Unspecified, vec![0; 8]);
        assert_eq!(
            t.to_f64_vec().unwrap_err().to_string(),
            "tensor `item_factors`: dtype is DTYPE_UNSPECIFIED"
        );
        assert!(t.validate().is_err());
    }

    #[test]
    fn tensor_with_unknown_dtype_is_rejected() {
        let mut t = tensor("item_factors", vec![1], Dtype::F64, vec![0; 8]);
        t.dtype = 99;
        assert_eq!(
            t.validate().unwrap_err(),
            TensorError::UnknownDtype {
                name: "item_factors".into(),
                value: 99
            }
        );
    }

    #[test]
    fn reading_a_tensor_as_the_wrong_dtype_is_rejected() {
        let t = NamedTensor::from_f64("item_factors", vec![1], &[1.0]).unwrap();
        assert_eq!(
            t.to_f32_vec().unwrap_err().to_string(),
            "tensor `item_factors`: is DTYPE_F64 but DTYPE_F32 was expected"
        );
        let masked = NamedTensor::from_values("item_factors", vec![1], &[7u32]).unwrap();
        assert!(matches!(
            masked.to_f64_vec().unwrap_err(),
            TensorError::DtypeMismatch {
                expected: Dtype::F64,
                actual: Dtype::U32,
                ..
            }
        ));
    }

    #[test]
    fn shape_whose_element_count_overflows_is_rejected() {
        let t = tensor("item_factors", vec![u64::MAX, 2], Dtype::F64, vec![]);
        assert!(matches!(
            t.validate().unwrap_err(),
            TensorError::ShapeOverflow { .. }
        ));
        // The element count fits but the byte length does not.
        let t = tensor("item_factors", vec![u64::MAX / 4], Dtype::F64, vec![]);
        let err = t.validate().unwrap_err();
        assert!(matches!(err, TensorError::ShapeOverflow { .. }), "{err:?}");
        assert!(err.to_string().starts_with("tensor `item_factors`: shape"));
    }

    #[test]
    fn spec_copies_name_shape_and_dtype() {
        let t = NamedTensor::from_f32("item_factors", vec![1, 2], &[1.0, 2.0]).unwrap();
        let spec = t.spec();
        assert_eq!(spec.name, "item_factors");
        assert_eq!(spec.shape, vec![1, 2]);
        assert_eq!(spec.dtype(), Dtype::F32);
    }
}
