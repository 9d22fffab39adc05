//! Fixed-point encoding of updates into Z/2³²Z, and the overflow check made before a round.
//!
//! A device's update (already clipped to L2 norm C, and for distributed DP already rounded
//! and noised in integers by `fedpref_privacy::distributed`) is a vector of integers on the
//! lattice (1/scale)·Z. Secure aggregation sums such vectors modulo 2³²; the server reads the
//! sum back as the centred representative in [−2³¹, 2³¹). That is exact as long as no
//! coordinate of the true integer sum leaves that range, which [`FixedPoint::new`] checks at
//! the start of the round from:
//! - the per-device bound: a vector of L2 norm ≤ C has every coordinate ≤ C, so after scaling
//!   and rounding (to nearest, or randomised) every coordinate is at most ⌈C·scale⌉;
//! - the cohort size n (every device contributes at most that);
//! - the noise: the sum of n independent discrete Gaussians of standard deviation s (in lattice
//!   units) is n·s²-sub-Gaussian (Canonne, Kamath, Steinke 2020, Cor. 9), so by the union bound
//!   over d coordinates its largest coordinate exceeds z·s·√n with probability at most
//!   2d·e^(−z²/2); z is chosen to make that below 2⁻⁴⁰.
//!
//! The round is refused unless `n·⌈C·scale⌉ + z·s·√n < 2³¹`.

use serde::{Deserialize, Serialize};

use crate::SecAggError;

/// Bits of the modulus: arithmetic is in Z/2³²Z (`u32` with wrapping).
pub const MODULUS_BITS: u32 = 32;
/// The largest magnitude the centred decoding represents: 2³¹ − 1.
pub const MAX_CENTRED: u64 = (1 << 31) - 1;
/// Probability, per round, that the noise alone breaks the overflow bound: 2⁻⁴⁰.
pub const OVERFLOW_FAILURE_BITS: f64 = 40.0;

/// What the overflow check needs to know about a round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodingParams {
    /// L2 clip norm C of each device's update, in model units.
    pub clip_norm: f64,
    /// Lattice points per model unit: an update value v is encoded near v·scale.
    pub scale: f64,
    /// The most devices whose inputs can enter the sum.
    pub cohort_size: usize,
    /// Coordinates per update.
    pub dimension: usize,
    /// Standard deviation of each device's integer noise share, in model units (0 without
    /// distributed noise).
    pub device_noise_std: f64,
}

/// A checked fixed-point encoding for one round. It serialises as its [`EncodingParams`] and
/// is checked again when deserialised, so a config received over the wire cannot skip the
/// overflow check.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "EncodingParams", into = "EncodingParams")]
pub struct FixedPoint {
    params: EncodingParams,
    /// ⌈C·scale⌉: the largest coordinate of one device's signal.
    signal_bound: u64,
    /// The largest coordinate one honest device's signal plus noise reaches, but with
    /// probability below 2⁻⁴⁰.
    device_bound: u64,
    /// The bound on any coordinate of the sum, signal and noise.
    sum_bound: f64,
}

/// z with 2d·e^(−z²/2) ≤ 2^−bits.
fn tail_z(dimension: usize) -> f64 {
    (2.0 * ((2.0 * dimension as f64).ln() + OVERFLOW_FAILURE_BITS * std::f64::consts::LN_2)).sqrt()
}

impl FixedPoint {
    /// Checks the round's parameters and that the sum cannot overflow Z/2³²Z (but with
    /// probability below 2⁻⁴⁰ from the noise), with an error that names the numbers if it can.
    pub fn new(params: EncodingParams) -> Result<Self, SecAggError> {
        let EncodingParams {
            clip_norm,
            scale,
            cohort_size,
            dimension,
            device_noise_std,
        } = params;
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SecAggError::InvalidParameter(format!(
                    "{name} = {v}: must be a finite number greater than 0"
                )))
            }
        };
        positive("clip_norm", clip_norm)?;
        positive("scale", scale)?;
        if !(device_noise_std.is_finite() && device_noise_std >= 0.0) {
            return Err(SecAggError::InvalidParameter(format!(
                "device_noise_std = {device_noise_std}: must be a finite number ≥ 0"
            )));
        }
        if cohort_size == 0 || dimension == 0 {
            return Err(SecAggError::InvalidParameter(format!(
                "cohort_size = {cohort_size}, dimension = {dimension}: both must be at least 1"
            )));
        }
        let signal = (clip_norm * scale).ceil();
        let z = tail_z(dimension);
        let noise_lattice = device_noise_std * scale;
        let sum_bound =
            cohort_size as f64 * signal + z * noise_lattice * (cohort_size as f64).sqrt();
        if !sum_bound.is_finite() || sum_bound >= MAX_CENTRED as f64 {
            return Err(SecAggError::Overflow(format!(
                "the sum can reach {sum_bound:.4e} > 2^31 − 1 in a coordinate: {cohort_size} devices × \
                 ⌈C·scale⌉ = {signal:.4e} plus {z:.2} × noise std {:.4e} × √{cohort_size}; lower the \
                 scale (at most {:.4e} for these C, n and noise), the cohort or the noise",
                noise_lattice,
                Self::largest_scale(clip_norm, cohort_size, dimension, device_noise_std)
                    .unwrap_or(0.0)
            )));
        }
        let device_bound = (signal + z * noise_lattice).ceil();
        Ok(Self {
            params,
            signal_bound: signal as u64,
            device_bound: device_bound as u64,
            sum_bound,
        })
    }

    /// The largest power-of-two scale that passes [`FixedPoint::new`] for these C, n, d and
    /// noise (noise in model units). Errors if even scale 2⁻³⁰ fails.
    pub fn largest_scale(
        clip_norm: f64,
        cohort_size: usize,
        dimension: usize,
        device_noise_std: f64,
    ) -> Result<f64, SecAggError> {
        let mut exponent = 40i32;
        while exponent >= -30 {
            let scale = 2f64.powi(exponent);
            let params = EncodingParams {
                clip_norm,
                scale,
                cohort_size,
                dimension,
                device_noise_std,
            };
            if Self::check_sum(&params) {
                return Ok(scale);
            }
            exponent -= 1;
        }
        Err(SecAggError::Overflow(format!(
            "no scale ≥ 2^-30 keeps {cohort_size} devices of clip norm {clip_norm} within 2^31"
        )))
    }

    fn check_sum(p: &EncodingParams) -> bool {
        let signal = (p.clip_norm * p.scale).ceil();
        let bound = p.cohort_size as f64 * signal
            + tail_z(p.dimension) * p.device_noise_std * p.scale * (p.cohort_size as f64).sqrt();
        bound < MAX_CENTRED as f64
    }

    /// The round's parameters.
    pub fn params(&self) -> &EncodingParams {
        &self.params
    }

    /// ⌈C·scale⌉, the largest coordinate of one device's (un-noised) encoded update.
    pub fn signal_bound(&self) -> u64 {
        self.signal_bound
    }

    /// The bound the overflow check proved for every coordinate of the sum.
    pub fn sum_bound(&self) -> f64 {
        self.sum_bound
    }

    /// Encodes an update of real values by rounding v·scale to the nearest integer. Refuses
    /// a wrong length, NaN/±∞ and an L2 norm above the clip norm (naming the coordinate or the
    /// norm).
    pub fn encode_f64(&self, values: &[f64]) -> Result<EncodedInput, SecAggError> {
        self.check_len(values.len())?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(SecAggError::InvalidInput(format!(
                "coordinate {i} is {v}: NaN and infinite values are refused"
            )));
        }
        let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
        // A relative 1e-9 of slack for the caller's own floating-point clipping.
        if norm > self.params.clip_norm * (1.0 + 1e-9) {
            return Err(SecAggError::InvalidInput(format!(
                "the update's L2 norm {norm} exceeds the clip norm {}",
                self.params.clip_norm
            )));
        }
        let bound = self.signal_bound as f64;
        Ok(EncodedInput(
            values
                .iter()
                .map(|v| (v * self.params.scale).round().clamp(-bound, bound) as i64 as u32)
                .collect(),
        ))
    }

    /// Encodes a vector already on the lattice (signal plus noise, from the distributed noise
    /// mechanism). Refuses a wrong length and any coordinate beyond the per-device bound
    /// (⌈C·scale⌉ plus the noise's 2⁻⁴⁰ tail): such a value could break the overflow check.
    pub fn encode_integers(&self, values: &[i64]) -> Result<EncodedInput, SecAggError> {
        self.check_len(values.len())?;
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| v.unsigned_abs() > self.device_bound)
        {
            return Err(SecAggError::InvalidInput(format!(
                "coordinate {i} is {v}, beyond the per-device bound ±{} this round's overflow \
                 check allows",
                self.device_bound
            )));
        }
        Ok(EncodedInput(values.iter().map(|&v| v as u32).collect()))
    }

    /// Reads a sum modulo 2³² back as signed integers (the centred representative).
    pub fn decode_integers(&self, sum: &[u32]) -> Vec<i64> {
        decode_centred(sum)
    }

    /// Reads a sum modulo 2³² back in model units (centred representative / scale).
    pub fn decode_f64(&self, sum: &[u32]) -> Vec<f64> {
        sum.iter()
            .map(|&v| f64::from(v as i32) / self.params.scale)
            .collect()
    }

    fn check_len(&self, len: usize) -> Result<(), SecAggError> {
        if len != self.params.dimension {
            return Err(SecAggError::InvalidInput(format!(
                "the update has {len} coordinates, the round expects {}",
                self.params.dimension
            )));
        }
        Ok(())
    }
}

impl TryFrom<EncodingParams> for FixedPoint {
    type Error = SecAggError;
    fn try_from(params: EncodingParams) -> Result<Self, Self::Error> {
        Self::new(params)
    }
}

impl From<FixedPoint> for EncodingParams {
    fn from(fixed_point: FixedPoint) -> Self {
        fixed_point.params
    }
}

/// The centred representative in [−2³¹, 2³¹) of each value modulo 2³².
pub fn decode_centred(sum: &[u32]) -> Vec<i64> {
    sum.iter().map(|&v| i64::from(v as i32)).collect()
}

/// An update encoded in Z/2³²Z, ready to be masked. Only [`FixedPoint`] makes one, so holding
/// one means the overflow bound was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedInput(Vec<u32>);

impl EncodedInput {
    /// The encoded values.
    pub fn values(&self) -> &[u32] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: usize, scale: f64, noise: f64) -> EncodingParams {
        EncodingParams {
            clip_norm: 1.0,
            scale,
            cohort_size: n,
            dimension: 16_384,
            device_noise_std: noise,
        }
    }

    #[test]
    fn an_overflowing_round_is_refused_naming_the_numbers() {
        let e = FixedPoint::new(params(1000, 2f64.powi(22), 0.0)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("2^31") && text.contains("1000 devices"),
            "{text}"
        );
        assert!(FixedPoint::new(params(1000, 2f64.powi(20), 0.0)).is_ok());
    }

    #[test]
    fn a_deserialised_encoding_is_checked_again() {
        let fp = FixedPoint::new(params(1000, 2f64.powi(20), 0.0)).unwrap();
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(serde_json::from_str::<FixedPoint>(&json).unwrap(), fp);
        let bad = json.replace("1048576.0", "4194304.0");
        assert_ne!(bad, json);
        let e = serde_json::from_str::<FixedPoint>(&bad).unwrap_err();
        assert!(e.to_string().contains("2^31"), "{e}");
    }

    #[test]
    fn largest_scale_passes_and_twice_it_fails() {
        let s = FixedPoint::largest_scale(1.0, 1000, 16_384, 0.01).unwrap();
        assert!(FixedPoint::new(params(1000, s, 0.01)).is_ok());
        assert!(FixedPoint::new(params(1000, 2.0 * s, 0.01)).is_err());
    }

    #[test]
    fn encoding_refuses_bad_updates() {
        let fp = FixedPoint::new(EncodingParams {
            dimension: 3,
            ..params(10, 1024.0, 0.0)
        })
        .unwrap();
        assert!(
            fp.encode_f64(&[0.1, 0.2])
                .unwrap_err()
                .to_string()
                .contains("3")
        );
        assert!(
            fp.encode_f64(&[0.1, f64::NAN, 0.0])
                .unwrap_err()
                .to_string()
                .contains("coordinate 1")
        );
        assert!(
            fp.encode_f64(&[1.0, 1.0, 0.0])
                .unwrap_err()
                .to_string()
                .contains("clip norm")
        );
        assert!(
            fp.encode_integers(&[0, 2000, 0])
                .unwrap_err()
                .to_string()
                .contains("coordinate 1")
        );
        assert_eq!(
            fp.decode_integers(fp.encode_f64(&[-0.5, 0.25, 0.0]).unwrap().values()),
            vec![-512, 256, 0]
        );
    }
}
