//! L2 clipping of a whole update, in f64.

use crate::PrivacyError;
use crate::error::check;

/// Relative safety margin applied when scaling down, so that the clipped norm is at most C
/// even after the rounding errors of computing the norm (blocked summation keeps those below
/// (1024 + n/1024)·2⁻⁵³ relative, under 1e-9 for any n up to 2³⁰ coordinates).
const CLIP_MARGIN: f64 = 1.0 - 1.0 / (1u64 << 30) as f64;

/// An update whose L2 norm, over all shared tensors together, is at most its clip norm C.
///
/// The only way to build one is [`clip_l2`] (or [`clip_l2_tensors`]), so holding a `Clipped`
/// is proof that the bound holds and that every coordinate is finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Clipped {
    values: Vec<f64>,
    clip_norm: f64,
    norm_before: f64,
}

impl Clipped {
    /// `dimension` zeros, which are within any clip norm C > 0: what a release of pure noise
    /// starts from (the simulator's aggregate noise draw), without [`clip_l2`]'s passes over
    /// them. Refuses a C that is not finite and positive, as [`clip_l2`] does.
    pub fn zeros(dimension: usize, clip_norm: f64) -> Result<Self, PrivacyError> {
        Ok(Self {
            values: vec![0.0; dimension],
            clip_norm: check::positive("clip_norm", clip_norm)?,
            norm_before: 0.0,
        })
    }

    /// The clipped coordinates.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The clipped coordinates, by value.
    pub fn into_values(self) -> Vec<f64> {
        self.values
    }

    /// The clip norm C the update was clipped to.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The L2 norm before clipping. It is private: it may feed a *noised* quantile estimate
    /// (adaptive clipping), never an upload as it is.
    pub fn norm_before(&self) -> f64 {
        self.norm_before
    }

    /// Whether clipping scaled the update down.
    pub fn was_clipped(&self) -> bool {
        self.norm_before > self.clip_norm
    }

    /// The number of coordinates.
    pub fn dimension(&self) -> usize {
        self.values.len()
    }
}

/// The L2 norm of a vector of finite values, safe against overflow and underflow of the
/// sum of squares (values up to f64::MAX are fine).
pub fn l2_norm(values: &[f64]) -> f64 {
    let sum = blocked_sum_of_squares(values, 1.0);
    if sum.is_finite() && sum > 1e-280 {
        return sum.sqrt();
    }
    let max = values.iter().fold(0.0_f64, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return max;
    }
    max * blocked_sum_of_squares(values, 1.0 / max).sqrt()
}

fn blocked_sum_of_squares(values: &[f64], scale: f64) -> f64 {
    values
        .chunks(1024)
        .map(|block| lane_sum_of_squares(block, scale))
        .sum()
}

/// Σ (x·scale)² over at most a block, in [`LANES`] interleaved partial sums added at the end:
/// the additions of different lanes do not wait for each other, so the loop vectorises and is
/// not bound by the latency of one chain of additions. The rounding error is that of a
/// sequential sum of a block (each lane sums a quarter of the block or less).
fn lane_sum_of_squares(block: &[f64], scale: f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let (chunks, rest) = block.as_chunks::<LANES>();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            let y = x * scale;
            *lane += y * y;
        }
    }
    for (lane, x) in lanes.iter_mut().zip(rest) {
        let y = x * scale;
        *lane += y * y;
    }
    lanes.iter().sum()
}

/// Partial sums in [`lane_sum_of_squares`].
const LANES: usize = 8;

/// Σ x² of f32 values, widened to f64 and summed like [`l2_norm`]'s sum (blocks of 1024
/// values, [`LANES`] partial sums in each): for the aggregator's and the coordinator's
/// norm checks of uploaded f32 updates. Not overflow-safe beyond f32 range, which f32 values
/// cannot leave (their squares fit in f64).
pub fn sum_of_squares_f32(values: &[f32]) -> f64 {
    values
        .chunks(1024)
        .map(|block| {
            let mut lanes = [0.0f64; LANES];
            let (chunks, rest) = block.as_chunks::<LANES>();
            for chunk in chunks {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    let y = f64::from(x);
                    *lane += y * y;
                }
            }
            for (lane, &x) in lanes.iter_mut().zip(rest) {
                let y = f64::from(x);
                *lane += y * y;
            }
            lanes.iter().sum::<f64>()
        })
        .sum()
}

/// Clips `update` to L2 norm at most `clip_norm` (C): if its norm exceeds C it is scaled by
/// C/‖update‖, otherwise it is returned unchanged. The norm is taken over the whole vector,
/// which callers build by concatenating all shared tensors.
///
/// NaN and ±∞ are refused with [`PrivacyError::NonFinite`] naming the first bad coordinate:
/// they are never clipped into an aggregate.
///
/// ```
/// use fedpref_privacy::{clip_l2, l2_norm};
/// let c = clip_l2(vec![3.0, 4.0], 1.0).unwrap();
/// assert!(l2_norm(c.values()) <= 1.0);
/// assert!(c.was_clipped());
/// assert!(clip_l2(vec![1.0, f64::NAN], 1.0).is_err());
/// ```
pub fn clip_l2(mut update: Vec<f64>, clip_norm: f64) -> Result<Clipped, PrivacyError> {
    let clip_norm = check::positive("clip_norm", clip_norm)?;
    // One pass in the common case: a finite sum of squares means every value is finite.
    let sum = blocked_sum_of_squares(&update, 1.0);
    if !sum.is_finite()
        && let Some((index, &value)) = update.iter().enumerate().find(|(_, x)| !x.is_finite())
    {
        return Err(PrivacyError::NonFinite { index, value });
    }
    let norm_before = if sum.is_finite() && sum > 1e-280 {
        sum.sqrt()
    } else {
        l2_norm(&update)
    };
    if norm_before > clip_norm {
        let factor = clip_norm / norm_before * CLIP_MARGIN;
        update.iter_mut().for_each(|x| *x *= factor);
        // The margin covers the norm's rounding error (module docs); checked in debug builds.
        debug_assert!(l2_norm(&update) <= clip_norm);
    }
    Ok(Clipped {
        values: update,
        clip_norm,
        norm_before,
    })
}

/// Clips several tensors together, as one vector (their concatenation, in the order given).
pub fn clip_l2_tensors(tensors: &[&[f64]], clip_norm: f64) -> Result<Clipped, PrivacyError> {
    let update: Vec<f64> = tensors.iter().flat_map(|t| t.iter().copied()).collect();
    clip_l2(update, clip_norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_what_clipping_zeros_gives() {
        assert_eq!(
            Clipped::zeros(5, 0.7).unwrap(),
            clip_l2(vec![0.0; 5], 0.7).unwrap()
        );
        assert!(Clipped::zeros(5, 0.0).is_err());
        assert!(Clipped::zeros(5, f64::NAN).is_err());
    }

    #[test]
    fn the_lane_sums_of_squares_agree_with_a_plain_sum_to_rounding() {
        // Lengths around the lane count and the block size, values of mixed magnitude.
        for n in [0usize, 1, 7, 8, 9, 17, 1023, 1024, 1025, 5000] {
            let values: Vec<f64> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f64 - 500.0) * 10f64.powi((i % 5) as i32 - 2))
                .collect();
            let plain: f64 = values.iter().map(|x| x * x).sum();
            let lanes = blocked_sum_of_squares(&values, 1.0);
            assert!(
                (lanes - plain).abs() <= plain * 1e-12,
                "n = {n}: {lanes} vs {plain}"
            );
            let narrow: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            let widened: Vec<f64> = narrow.iter().map(|&x| f64::from(x)).collect();
            assert_eq!(
                sum_of_squares_f32(&narrow),
                blocked_sum_of_squares(&widened, 1.0),
                "n = {n}"
            );
        }
    }

    #[test]
    fn short_updates_are_left_unchanged() {
        let c = clip_l2(vec![0.3, -0.4], 1.0).unwrap();
        assert_eq!(c.values(), &[0.3, -0.4]);
        assert!(!c.was_clipped());
        assert!((c.norm_before() - 0.5).abs() < 1e-15);
    }

    #[test]
    fn infinite_coordinate_is_refused_naming_its_index() {
        let err = clip_l2(vec![0.0, 1.0, f64::INFINITY], 1.0).unwrap_err();
        assert_eq!(
            err,
            PrivacyError::NonFinite {
                index: 2,
                value: f64::INFINITY
            }
        );
        assert!(err.to_string().contains("coordinate 2"));
    }

    #[test]
    fn bad_clip_norm_is_refused() {
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = clip_l2(vec![1.0], c).unwrap_err();
            assert!(err.to_string().contains("clip_norm"), "{err}");
        }
    }

    #[test]
    fn huge_and_tiny_values_do_not_overflow_the_norm() {
        let c = clip_l2(vec![1e300, 1e300], 2.0).unwrap();
        assert!(l2_norm(c.values()) <= 2.0);
        assert!((c.values()[0] - 2.0_f64.sqrt()).abs() < 1e-6);
        assert!((l2_norm(&[1e-200, 1e-200]) - 1e-200 * 2.0_f64.sqrt()).abs() < 1e-210);
    }

    #[test]
    fn tensors_are_clipped_together() {
        let c = clip_l2_tensors(&[&[3.0], &[4.0]], 1.0).unwrap();
        assert_eq!(c.dimension(), 2);
        assert!((c.values()[0] - 0.6).abs() < 1e-8 && (c.values()[1] - 0.8).abs() < 1e-8);
    }
}
