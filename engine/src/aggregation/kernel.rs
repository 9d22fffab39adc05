//! The streaming hot loops of the mean path. Safe Rust only (the workspace forbids
//! `unsafe`): iterator zips let LLVM drop the bounds checks and vectorise, and the f32 → f64
//! widening is exact, so accumulating in f64 loses nothing to the conversion.
//!
//! `add` must leave the accumulator untouched when an update is refused, and f64 addition
//! cannot be undone exactly, so the whole update is checked ([`first_non_finite`]) before any
//! of it is accumulated ([`accumulate`]): two passes over the update. The second pass finds
//! the update in cache (L2 for d = 16,384; L3 for d = 1,048,576), so the update is read from
//! memory once. Two alternatives were measured and rejected: checking and accumulating block
//! by block in one pass (as fast as the bound, but not atomic), and accumulating into a
//! second buffer that replaces the first only on success (atomic, but twice the accumulator
//! traffic: 2.3× slower at d = 1,048,576). A hand-unrolled 8-lane accumulation was slower
//! than the plain zip.

/// Coordinates checked per block before the exact position of a bad value is looked for.
const CHECK_BLOCK: usize = 4096;

/// The index of the first NaN or ±∞ in `update`, if any.
///
/// A float is NaN or ±∞ exactly when its exponent bits are all ones; adding one unit of the
/// exponent's lowest bit then carries into the sign bit. One branch-free OR over each block
/// (which vectorises) tells whether the block holds a bad value; only such a block is
/// searched again for its position.
pub(super) fn first_non_finite(update: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    const EXPONENT_LSB: u32 = 0x0080_0000;
    const CARRY: u32 = 0x8000_0000;
    update
        .chunks(CHECK_BLOCK)
        .enumerate()
        .find_map(|(block, values)| {
            let carries = values
                .iter()
                .fold(0, |any, x| any | ((x.to_bits() & EXPONENT) + EXPONENT_LSB));
            (carries & CARRY != 0).then(|| {
                let offset = values.iter().position(|x| !x.is_finite());
                block * CHECK_BLOCK + offset.expect("the block holds a non-finite value")
            })
        })
}

/// `weighted_sum[i] += weight · update[i]`, in f64, for every i. The lengths are equal
/// (checked by the caller); extra elements of either would be ignored.
pub(super) fn accumulate(weighted_sum: &mut [f64], update: &[f32], weight: f64) {
    for (sum, &value) in weighted_sum.iter_mut().zip(update) {
        *sum += weight * f64::from(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first_bad_coordinate_in_any_block() {
        let mut v = vec![1.5_f32; 3 * CHECK_BLOCK + 17];
        assert_eq!(first_non_finite(&v), None);
        for (index, bad) in [
            (0, f32::NAN),
            (CHECK_BLOCK - 1, f32::INFINITY),
            (2 * CHECK_BLOCK + 5, f32::NEG_INFINITY),
            (3 * CHECK_BLOCK + 16, f32::NAN),
        ] {
            let saved = v[index];
            v[index] = bad;
            assert_eq!(first_non_finite(&v), Some(index));
            v[index] = saved;
        }
        // Two bad values: the first is reported. Subnormals and f32::MAX are finite.
        v[10] = f32::MIN_POSITIVE / 4.0;
        v[11] = f32::MAX;
        v[CHECK_BLOCK + 3] = f32::NAN;
        v[2 * CHECK_BLOCK] = f32::INFINITY;
        assert_eq!(first_non_finite(&v), Some(CHECK_BLOCK + 3));
        assert_eq!(first_non_finite(&[]), None);
    }

    #[test]
    fn accumulate_widens_exactly_and_weights_each_value() {
        // 0.1_f32 is 0.100000001490116…; widened exactly, then weighted in f64.
        let mut sum = vec![1.0_f64, -2.0, 0.0];
        accumulate(&mut sum, &[0.1, 3.0, f32::MAX], 2.0);
        assert_eq!(
            sum,
            vec![
                1.0 + 2.0 * 0.100_000_001_490_116_12,
                4.0,
                2.0 * 3.402_823_466_385_288_6e38
            ]
        );
        // f32::MAX · 2 overflows f32 but not the f64 accumulator.
        assert!(sum[2].is_finite());
    }
}
