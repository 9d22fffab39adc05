//! Coordinate-wise robust statistics of a buffered cohort: the median and the β-trimmed mean
//! (Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
//! Optimal Statistical Rates", Definitions 1 and 2).
//!
//! **Not streaming**: a per-coordinate order statistic needs every update's value at that
//! coordinate, so the cohort is buffered — O(d × K) memory for K updates of d coordinates,
//! and O(d · K log K) time in [`Statistic::aggregate`]. The statistics are unweighted, as in
//! the paper: a weight would let one update that claims a large weight move the median,
//! which defeats the point. Updates with weight 0 are left out.

use super::ServerOptimizer;

/// Which statistic, with its parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Statistic {
    /// med{x_1, …, x_K} per coordinate; the mean of the two middle values when K is even.
    Median,
    /// Per coordinate: sort, drop the ⌊βK⌋ smallest and ⌊βK⌋ largest values, average the
    /// remaining K − 2⌊βK⌋ (at least one, as β < 1/2).
    TrimmedMean {
        /// β ∈ [0, 1/2).
        trim_fraction: f64,
    },
}

/// Coordinates transposed at a time: K × BLOCK f32 values of scratch, so that each update is
/// read in contiguous runs rather than one coordinate at a time.
const BLOCK: usize = 64;

impl Statistic {
    /// The statistic an optimiser asks for, if it is a robust one.
    pub(super) fn of(optimizer: &ServerOptimizer) -> Option<Self> {
        match *optimizer {
            ServerOptimizer::Median { .. } => Some(Self::Median),
            ServerOptimizer::TrimmedMean { trim_fraction, .. } => {
                Some(Self::TrimmedMean { trim_fraction })
            }
            _ => None,
        }
    }

    /// The statistic of every coordinate of `updates` (non-empty, each of `dimension`
    /// finite values). Sorting by the total order makes the result independent of the
    /// updates' order, bit for bit.
    pub(super) fn aggregate(&self, updates: &[Box<[f32]>], dimension: usize) -> Vec<f64> {
        let cohort = updates.len();
        let mut out = Vec::with_capacity(dimension);
        let mut columns = vec![0.0_f32; cohort * BLOCK];
        for start in (0..dimension).step_by(BLOCK) {
            let width = BLOCK.min(dimension - start);
            for (k, update) in updates.iter().enumerate() {
                for (j, &x) in update[start..start + width].iter().enumerate() {
                    columns[j * cohort + k] = x;
                }
            }
            for column in columns.chunks_exact_mut(cohort).take(width) {
                column.sort_unstable_by(f32::total_cmp);
                out.push(self.of_sorted(column));
            }
        }
        out
    }

    /// The statistic of one sorted, non-empty column.
    fn of_sorted(&self, sorted: &[f32]) -> f64 {
        let n = sorted.len();
        match *self {
            Self::Median => {
                if n % 2 == 1 {
                    f64::from(sorted[n / 2])
                } else {
                    0.5 * (f64::from(sorted[n / 2 - 1]) + f64::from(sorted[n / 2]))
                }
            }
            Self::TrimmedMean { trim_fraction } => {
                let trimmed = trimmed_count(trim_fraction, n);
                let kept = &sorted[trimmed..n - trimmed];
                kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
            }
        }
    }
}

/// ⌊βn⌋, the number of values dropped at each end; 2⌊βn⌋ < n for β < 1/2.
fn trimmed_count(trim_fraction: f64, n: usize) -> usize {
    ((trim_fraction * n as f64).floor() as usize).min((n - 1) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cohort(rows: &[&[f32]]) -> Vec<Box<[f32]>> {
        rows.iter().map(|r| (*r).into()).collect()
    }

    #[test]
    fn median_of_odd_and_even_cohorts_per_coordinate() {
        let odd = cohort(&[&[1.0, -5.0], &[100.0, 2.0], &[3.0, 0.0]]);
        assert_eq!(Statistic::Median.aggregate(&odd, 2), vec![3.0, 0.0]);
        let even = cohort(&[&[1.0], &[100.0], &[3.0], &[-7.0]]);
        assert_eq!(Statistic::Median.aggregate(&even, 1), vec![2.0]);
    }

    #[test]
    fn trimmed_mean_drops_floor_beta_n_at_each_end() {
        // n = 5, β = 0.2: drop 1 at each end; mean of {2, 3, 4}.
        let c = cohort(&[&[1000.0], &[2.0], &[-1000.0], &[4.0], &[3.0]]);
        let t = Statistic::TrimmedMean { trim_fraction: 0.2 };
        assert_eq!(t.aggregate(&c, 1), vec![3.0]);
        // β = 0.19: ⌊0.95⌋ = 0 dropped, the plain mean.
        let t = Statistic::TrimmedMean {
            trim_fraction: 0.19,
        };
        assert_eq!(t.aggregate(&c, 1), vec![9.0 / 5.0]);
        // β = 0.49 with n = 2: ⌊0.98⌋ = 0, both kept.
        let t = Statistic::TrimmedMean {
            trim_fraction: 0.49,
        };
        assert_eq!(t.aggregate(&cohort(&[&[1.0], &[2.0]]), 1), vec![1.5]);
        assert_eq!(trimmed_count(0.49, 101), 49);
        assert_eq!(trimmed_count(0.0, 1), 0);
    }

    #[test]
    fn blocked_transpose_covers_every_coordinate_of_a_ragged_last_block() {
        let dimension = 2 * BLOCK + 3;
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|k| (0..dimension).map(|j| (j * 10 + k) as f32).collect())
            .collect();
        let c: Vec<Box<[f32]>> = rows.iter().map(|r| r.as_slice().into()).collect();
        let median = Statistic::Median.aggregate(&c, dimension);
        let expected: Vec<f64> = (0..dimension).map(|j| (j * 10 + 1) as f64).collect();
        assert_eq!(median, expected);
    }
}
