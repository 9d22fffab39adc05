//! DP-FTRL's aggregation: the round's exact lattice sum goes into a binary tree
//! ([`TreeAggregator`]) instead of being noised on its own, and Δ is the difference of two
//! consecutive noised prefix sums.
//!
//! Neighbouring relation, sensitivity and guarantee are those of
//! [`fedpref_privacy::tree`]: add/remove one device's whole participation sequence; squared
//! L2 sensitivity C²·max_S Σ_ν |S∩ν|² over the patterns S the participation limits allow;
//! ρ-zCDP with ρ = max_S Σ_ν |S∩ν|² / (2σ²) ([`fedpref_privacy::tree::TreeAccountant`]).
//! Everything computed here from the releases (differences, division by the fixed
//! denominator W) is post-processing.

use std::marker::PhantomData;

use fedpref_privacy::tree::{TreeAggregator, TreeSchedule};
use fedpref_privacy::{GaussianMechanism, GaussianSampler};

use super::{Accumulator, Aggregate, AggregationError, RoundAggregator};

/// The tree of one stretch of rounds (a **segment**: the rounds one coordinator process
/// released without restarting), with the last prefix sum it released.
///
/// The tree's nodes and exact sums live only in memory: they are the un-noised data and
/// the secret noise, and are never written anywhere. A restarted coordinator therefore
/// starts a new segment with a new tree; see the engine's documentation for how the
/// accounting treats that.
pub struct FtrlTree {
    tree: TreeAggregator,
    /// The previous release of this tree, in f64 (zero before its first round).
    previous: Vec<f64>,
}

impl std::fmt::Debug for FtrlTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FtrlTree")
            .field("tree", &self.tree)
            .finish_non_exhaustive()
    }
}

impl FtrlTree {
    /// A new tree for noise multiplier σ and clip norm C over `dimension` coordinates.
    pub fn new(
        noise_multiplier: f64,
        clip_norm: f64,
        dimension: usize,
        schedule: TreeSchedule,
    ) -> Result<Self, AggregationError> {
        let mechanism = GaussianMechanism::new(noise_multiplier, clip_norm)?;
        Ok(Self {
            tree: TreeAggregator::new(mechanism, dimension, schedule)?,
            previous: vec![0.0; dimension],
        })
    }

    /// Rounds released by this tree so far (over its own restarts).
    pub fn rounds(&self) -> u64 {
        self.tree.rounds()
    }

    /// The clip norm C the tree's noise is calibrated to.
    pub fn clip_norm(&self) -> f64 {
        self.tree.mechanism().clip_norm()
    }

    /// Whether the tree just finished one of its scheduled trees (so a new tree, e.g. with a
    /// new clip norm, may start without changing the schedule's node structure).
    pub fn at_tree_boundary(&self) -> bool {
        match self.tree.schedule().rounds_per_tree() {
            Some(r) => self.tree.rounds() > 0 && self.tree.rounds().is_multiple_of(r),
            None => false,
        }
    }
}

impl RoundAggregator {
    /// DP-FTRL's release: adds this round's exact lattice sum to `tree`, releases the noised
    /// prefix sum s_t with `sampler`, and returns Δ = (s_t − s_{t−1}) / W with W the expected
    /// cohort size. The aggregator must be central, with the tree's σ, C and dimension (a sum
    /// on another lattice is refused by the tree).
    pub fn finish_tree<S: GaussianSampler>(
        self,
        tree: &mut FtrlTree,
        sampler: &mut S,
    ) -> Result<Aggregate<S::Provenance>, AggregationError> {
        let contributions = self.contributions;
        let Accumulator::Central {
            sum,
            expected_cohort_size,
            ..
        } = self.accumulator
        else {
            return Err(AggregationError::NotATreeRound {
                mode: self.privacy.name(),
            });
        };
        let release = tree.tree.release_round(&sum, sampler)?;
        let noise_std = release.noise_std() / expected_cohort_size;
        let prefix = release.into_values();
        let delta: Vec<f64> = prefix
            .iter()
            .zip(&tree.previous)
            .map(|(now, before)| (now - before) / expected_cohort_size)
            .collect();
        if let Some(index) = delta.iter().position(|x| !x.is_finite()) {
            return Err(AggregationError::NonFiniteAggregate { index });
        }
        tree.previous = prefix;
        Ok(Aggregate {
            delta,
            contributions,
            denominator: expected_cohort_size,
            noise_std,
            provenance: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{AggregationPrivacy, ServerOptimizer};
    use fedpref_privacy::SimulationSampler;

    #[test]
    fn deltas_of_a_tree_sum_to_the_noised_prefix_sum() {
        let optimizer = ServerOptimizer::DpFtrl {
            server_learning_rate: 1.0,
            momentum: 0.0,
            restart_every: Some(4),
            completion: true,
        };
        let privacy = AggregationPrivacy::Central {
            clip_norm: 1.0,
            noise_multiplier: 0.01,
            expected_cohort_size: 2.0,
        };
        let schedule = optimizer.tree_schedule().unwrap().unwrap();
        let mut tree = FtrlTree::new(0.01, 1.0, 2, schedule).unwrap();
        let mut sampler = SimulationSampler::seed_from_u64(3);
        let mut total = [0.0f64; 2];
        for round in 1..=9u64 {
            let mut agg = RoundAggregator::new(&optimizer, &privacy, 2).unwrap();
            agg.add(&[0.5, 0.0], 1.0).unwrap();
            agg.add(&[0.0, 0.25], 1.0).unwrap();
            let a = agg.finish_tree(&mut tree, &mut sampler).unwrap();
            total[0] += a.delta()[0];
            total[1] += a.delta()[1];
            // With tiny noise the running total of Δ is the true mean per round times rounds.
            let t = round as f64;
            assert!((total[0] - 0.25 * t).abs() < 0.1, "{total:?} at {round}");
            assert!((total[1] - 0.125 * t).abs() < 0.1, "{total:?} at {round}");
            assert_eq!(tree.at_tree_boundary(), round % 4 == 0);
        }
    }

    #[test]
    fn a_non_central_round_is_refused() {
        let agg = RoundAggregator::new(&ServerOptimizer::default(), &AggregationPrivacy::Local, 2)
            .unwrap();
        let mut tree = FtrlTree::new(1.0, 1.0, 2, TreeSchedule::single_tree()).unwrap();
        let e = agg
            .finish_tree(&mut tree, &mut SimulationSampler::seed_from_u64(1))
            .unwrap_err();
        assert!(e.to_string().contains("central"), "{e}");
    }
}
