//! Aggregation of one round's updates into the pseudo-gradient Δ, and the server optimiser
//! step that turns Δ into the next model.
//!
//! A round is aggregated by one [`RoundAggregator`]: the round engine feeds it each accepted
//! update with [`RoundAggregator::add`], then calls [`RoundAggregator::finish`] with a noise
//! sampler. The result is an [`Aggregate`] that carries the sampler's provenance
//! ([`Secure`] or [`Simulated`](fedpref_privacy::Simulated)), so a
//! model built from a simulation-noised aggregate cannot be published by code that asks for
//! `Aggregate<Secure>`. [`apply`] then takes one [`ServerOptimizer`] step with Δ, updating the
//! optimiser's [`ServerState`] (which the store persists between rounds).
//!
//! # The aggregate, per privacy mode
//! With updates Δ_k ∈ ℝᵈ and weights w_k (k = 1…K):
//!
//! - [`AggregationPrivacy::None`] and [`AggregationPrivacy::Local`] — the weighted mean
//!   Δ = Σ_k w_k Δ_k / Σ_k w_k (McMahan et al. 2017, "Communication-Efficient Learning of Deep
//!   Networks from Decentralized Data", Alg. 1). In local mode each Δ_k was already clipped
//!   and noised by its device, so the mean is post-processing of DP releases.
//! - [`AggregationPrivacy::Central`] — DP-FedAvg with a fixed denominator (McMahan, Ramage,
//!   Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models", Alg. 1,
//!   the estimator f̃_f): each update is clipped to L2 norm C, the weighted clipped updates
//!   (w_k ∈ [0, 1]) are summed exactly on the privacy crate's lattice, Gaussian noise
//!   N(0, (σC)²) is added **once** to the sum, and the noised sum is divided by a fixed
//!   denominator W — the paper's qW, the *expected* total weight of a round, which is the
//!   expected cohort size qN when every w_k = 1 — not by the realised one:
//!   Δ = (Σ_k w_k·clip_C(Δ_k) + N(0, σ²C²·I)) / W. Under add/remove-one-user neighbouring the
//!   sum's L2 sensitivity is C (each w_k ≤ 1), which is what the accountant assumes; the
//!   noise on each coordinate of Δ has standard deviation σC/W.
//! - Robust options ([`ServerOptimizer::Median`], [`ServerOptimizer::TrimmedMean`]) — the
//!   coordinate-wise median or β-trimmed mean of the updates (Yin, Chen, Ramchandran,
//!   Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
//!   Rates", Def. 1 and 2). They are refused in central mode: see [`ServerOptimizer::validate`].
//!
//! # Memory
//! The mean-based paths **stream**: an aggregator holds one f64 accumulator of the model's
//! size (d·8 bytes; in central mode the lattice sum and a scratch copy, d·16 bytes, plus a
//! transient d·16 bytes inside each `add`), whatever the cohort size. The robust statistics
//! cannot stream: they buffer every update (d·4 bytes each), so they take O(d·K) memory;
//! [`RoundAggregator::memory_bytes`] reports what an aggregator holds so the engine can bound
//! cohort × model for them.
//!
//! # Example
//! ```
//! use fedpref_engine::aggregation::{
//!     apply, AggregationPrivacy, RoundAggregator, ServerOptimizer, ServerState,
//! };
//! use fedpref_privacy::SimulationSampler;
//!
//! let optimizer = ServerOptimizer::Fedavg { server_learning_rate: 1.0 };
//! let mut round = RoundAggregator::new(&optimizer, &AggregationPrivacy::Local, 2)?;
//! round.add(&[1.0, 2.0], 1.0)?;
//! round.add(&[4.0, -1.0], 2.0)?; // e.g. weighted by example count
//! assert!(round.add(&[f32::NAN, 0.0], 1.0).is_err()); // refused, nothing accumulated
//! let aggregate = round.finish(&mut SimulationSampler::seed_from_u64(7))?;
//! assert_eq!(aggregate.delta(), &[3.0, 0.0]);
//!
//! let mut state = ServerState::new(&optimizer, 2);
//! let mut params = [0.5_f32, 0.5];
//! apply(&optimizer, &mut state, &mut params, &aggregate)?;
//! assert_eq!(params, [3.5, 0.5]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod ftrl;
mod kernel;
mod optimizer;
mod robust;

use std::any::TypeId;
use std::marker::PhantomData;

use fedpref_privacy::{
    Clipped, ClippedSum, GaussianMechanism, GaussianSampler, Provenance, Secure, clip_l2,
};

pub use error::{AggregationError, UpdateRejected};
pub use ftrl::FtrlTree;
pub use optimizer::{ServerOptimizer, ServerState, TreeProgress, apply, defaults};

/// The largest weight an update may carry in modes `none` and `local`. Weights are example
/// counts (or fractions of them); bounding them by 2⁵³ keeps every product w·x of a finite
/// f32 below 2⁵³·2¹²⁸ ≈ 3·10⁵⁴, so the f64 accumulator cannot overflow for any realistic
/// cohort (it would take 10²⁵³ such updates).
pub const MAX_WEIGHT: f64 = 9_007_199_254_740_992.0; // 2^53

/// Privacy treatment of a round's aggregate (from the run manifest).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AggregationPrivacy {
    /// No DP (simulations with privacy mode "none" only). Such an aggregate can never carry
    /// [`Secure`] provenance: [`RoundAggregator::finish`] refuses a secure sampler.
    None,
    /// Updates arrive already clipped and noised by devices (local DP): plain weighted mean.
    Local,
    /// The coordinator clips each update to `clip_norm`, sums on the privacy crate's lattice
    /// ([`GaussianMechanism::sum`] / [`ClippedSum::add`], weights in [0, 1]), adds
    /// N(0, (σC)²) once via [`GaussianMechanism::release_sum`] with the caller's sampler, and
    /// divides by `expected_cohort_size` (fixed denominator, DP-FedAvg, McMahan et al. 2018).
    Central {
        /// The clip norm C, > 0.
        clip_norm: f64,
        /// The noise multiplier σ, ≥ 0.001 (the lattice sampler's minimum).
        noise_multiplier: f64,
        /// The expected cohort size W = q·N (or the target cohort size), > 0: the fixed
        /// denominator.
        expected_cohort_size: f64,
    },
}

impl AggregationPrivacy {
    /// The mode's name as the manifest spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Central { .. } => "central",
        }
    }

    /// Checks the central parameters' ranges, naming the key at fault.
    pub fn validate(&self) -> Result<(), AggregationError> {
        if let Self::Central {
            clip_norm,
            noise_multiplier,
            expected_cohort_size,
        } = *self
        {
            error::positive("clip_norm", clip_norm)?;
            error::positive("noise_multiplier", noise_multiplier)?;
            if noise_multiplier < fedpref_privacy::noise::MIN_NOISE_MULTIPLIER {
                return Err(AggregationError::InvalidConfig {
                    key: "noise_multiplier",
                    value: noise_multiplier,
                    reason: "must be at least 0.001 in central mode (the lattice sampler's minimum)",
                });
            }
            error::positive("expected_cohort_size", expected_cohort_size)?;
        }
        Ok(())
    }
}

/// Aggregates one round's updates. Streaming for the mean-based optimisers (memory O(d),
/// not O(d × cohort)); buffering for the robust ones (O(d × cohort)). See the module docs.
///
/// Its `Debug` output shows the mode and the counts, never the accumulated values: in central
/// mode they are the un-noised sum, which must not reach a log.
pub struct RoundAggregator {
    dimension: usize,
    contributions: usize,
    privacy: AggregationPrivacy,
    accumulator: Accumulator,
    /// Σ w_k² (σC)² over the un-noised simulated updates ([`RoundAggregator::add_simulated`]):
    /// the variance of the one aggregate noise draw per coordinate that [`finish`](Self::finish)
    /// adds to the weighted sum in their devices' place.
    simulated_noise_variance: f64,
}

impl std::fmt::Debug for RoundAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match &self.accumulator {
            Accumulator::Mean { .. } => "weighted mean",
            Accumulator::Central { .. } => "central lattice sum",
            Accumulator::Robust { .. } => "robust (buffered)",
        };
        f.debug_struct("RoundAggregator")
            .field("privacy", &self.privacy.name())
            .field("path", &path)
            .field("dimension", &self.dimension)
            .field("contributions", &self.contributions)
            .field("memory_bytes", &self.memory_bytes())
            .finish_non_exhaustive()
    }
}

/// Derived `Debug` is for tests only (it prints every value exactly); see above.
#[derive(Debug)]
enum Accumulator {
    /// Σ w_k Δ_k in f64 and Σ w_k (modes none and local).
    Mean {
        weighted_sum: Vec<f64>,
        total_weight: f64,
    },
    /// The exact lattice sum Σ w_k clip_C(Δ_k) (central mode).
    Central {
        mechanism: GaussianMechanism,
        sum: ClippedSum,
        expected_cohort_size: f64,
        /// The f64 copy of the update that `clip_l2` takes by value, recycled from one `add`
        /// to the next (saves a d·8-byte allocation and its page faults per update).
        scratch: Vec<f64>,
    },
    /// Every update with a non-zero weight, as received (robust statistics).
    Robust {
        statistic: robust::Statistic,
        updates: Vec<Box<[f32]>>,
    },
}

impl RoundAggregator {
    /// An empty aggregator for one round of `dimension` coordinates. Validates the optimiser
    /// and privacy configuration ([`ServerOptimizer::validate`]) and, in central mode, builds
    /// the lattice sum (which refuses a σ too large for `dimension`).
    pub fn new(
        optimizer: &ServerOptimizer,
        privacy: &AggregationPrivacy,
        dimension: usize,
    ) -> Result<Self, AggregationError> {
        optimizer.validate(privacy)?;
        if dimension == 0 {
            return Err(AggregationError::EmptyModel);
        }
        let accumulator = if let Some(statistic) = robust::Statistic::of(optimizer) {
            Accumulator::Robust {
                statistic,
                updates: Vec::new(),
            }
        } else {
            match *privacy {
                AggregationPrivacy::None | AggregationPrivacy::Local => Accumulator::Mean {
                    weighted_sum: vec![0.0; dimension],
                    total_weight: 0.0,
                },
                AggregationPrivacy::Central {
                    clip_norm,
                    noise_multiplier,
                    expected_cohort_size,
                } => {
                    let mechanism = GaussianMechanism::new(noise_multiplier, clip_norm)?;
                    Accumulator::Central {
                        sum: mechanism.sum(dimension)?,
                        mechanism,
                        expected_cohort_size,
                        scratch: Vec::with_capacity(dimension),
                    }
                }
            }
        };
        Ok(Self {
            dimension,
            contributions: 0,
            privacy: *privacy,
            accumulator,
            simulated_noise_variance: 0.0,
        })
    }

    /// Validates one update and accumulates it with `weight`.
    ///
    /// The update must have exactly `dimension` values, every one finite; the weight must be
    /// finite and ≥ 0 — at most 1 in central mode (DP-FedAvg caps w_k = min(n_k/ŵ, 1), which
    /// is the caller's job; a larger weight would raise the sum's sensitivity above C), at
    /// most [`MAX_WEIGHT`] otherwise. On error nothing is accumulated and the error names the
    /// problem. An update with weight 0 is accepted and counted but moves nothing.
    pub fn add(&mut self, update: &[f32], weight: f64) -> Result<(), UpdateRejected> {
        if update.len() != self.dimension {
            return Err(UpdateRejected::WrongLength {
                expected: self.dimension,
                actual: update.len(),
            });
        }
        let max_weight = match self.privacy {
            AggregationPrivacy::Central { .. } => 1.0,
            AggregationPrivacy::None | AggregationPrivacy::Local => MAX_WEIGHT,
        };
        if !weight.is_finite() || weight < 0.0 {
            return Err(UpdateRejected::InvalidWeight {
                weight,
                reason: "weights must be finite and ≥ 0",
            });
        }
        if weight > max_weight {
            return Err(UpdateRejected::InvalidWeight {
                weight,
                reason: match self.privacy {
                    AggregationPrivacy::Central { .. } => {
                        "in central mode each user's weight is capped at 1 (DP-FedAvg's w_k = min(n_k/ŵ, 1)), so that one user moves the noised sum by at most the clip norm C"
                    }
                    _ => "weights above 2^53 are refused: they are example counts",
                },
            });
        }
        if let Some(index) = kernel::first_non_finite(update) {
            return Err(UpdateRejected::NonFinite {
                index,
                value: update[index],
            });
        }
        match &mut self.accumulator {
            Accumulator::Mean {
                weighted_sum,
                total_weight,
            } => {
                kernel::accumulate(weighted_sum, update, weight);
                *total_weight += weight;
            }
            Accumulator::Central {
                mechanism,
                sum,
                scratch,
                ..
            } => {
                let mut values = std::mem::take(scratch);
                values.clear();
                values.extend(update.iter().map(|&x| f64::from(x)));
                let clipped = clip_l2(values, mechanism.clip_norm())?;
                // ClippedSum::add commits nothing on error (it sums into a copy first).
                let added = sum.add(&clipped, weight);
                *scratch = clipped.into_values();
                added?;
            }
            Accumulator::Robust { updates, .. } => {
                if weight > 0.0 {
                    updates.push(update.into());
                }
            }
        }
        self.contributions += 1;
        Ok(())
    }

    /// Simulations only: accumulates one device's **clipped, un-noised** sparse update
    /// (`values[j]` at coordinate `indices[j]`, zero elsewhere) with `weight`, standing in for
    /// the dense update the device would have released with N(0, `noise_std`²) noise on every
    /// coordinate (local mode: `noise_std` = σC; 0 without DP).
    ///
    /// Why it is the same release: the devices' noises are independent, so the weighted sum
    /// Σ_k w_k (Δ_k + N(0, (σC)² I)) has exactly the distribution of Σ_k w_k Δ_k +
    /// N(0, Σ_k w_k² (σC)² I). [`finish`](Self::finish) draws that one aggregate noise vector
    /// from its sampler and refuses a secure sampler, so a model built from an aggregate of
    /// simulated updates can never carry [`Secure`] provenance (a real device's update is
    /// never un-noised). The per-update privacy guarantee (local DP, sensitivity C under
    /// replace-one-user neighbouring of the device's own data) holds only in this simulated
    /// sense: nobody but the simulator ever sees an un-noised update.
    ///
    /// Weighted-mean paths only (modes none and local, the FedAvg-family optimisers): the
    /// central lattice sum and the robust statistics need dense updates. Validation as
    /// [`add`](Self::add), plus: `indices` strictly increasing and below the dimension, as
    /// many values as indices, `noise_std` finite and ≥ 0. On error nothing is accumulated.
    pub fn add_simulated(
        &mut self,
        indices: &[u32],
        values: &[f32],
        weight: f64,
        noise_std: f64,
    ) -> Result<(), UpdateRejected> {
        let sparse = |reason: String| UpdateRejected::InvalidSparse { reason };
        let Accumulator::Mean {
            weighted_sum,
            total_weight,
        } = &mut self.accumulator
        else {
            return Err(sparse(format!(
                "a simulated sparse update needs the weighted-mean path (privacy mode none or local, a FedAvg-family optimiser); this round aggregates in mode {} with a dense-only path",
                self.privacy.name()
            )));
        };
        if indices.len() != values.len() {
            return Err(sparse(format!(
                "{} indices but {} values",
                indices.len(),
                values.len()
            )));
        }
        if let Some(j) = indices.windows(2).position(|w| w[0] >= w[1]) {
            return Err(sparse(format!(
                "indices must be strictly increasing: indices[{}] = {} then {}",
                j,
                indices[j],
                indices[j + 1]
            )));
        }
        if let Some(&last) = indices.last()
            && last as usize >= self.dimension
        {
            return Err(sparse(format!(
                "index {last} is out of range: the model has {} coordinates",
                self.dimension
            )));
        }
        if !(noise_std.is_finite() && noise_std >= 0.0) {
            return Err(sparse(format!(
                "noise_std {noise_std} must be finite and ≥ 0"
            )));
        }
        if !weight.is_finite() || weight < 0.0 {
            return Err(UpdateRejected::InvalidWeight {
                weight,
                reason: "weights must be finite and ≥ 0",
            });
        }
        if weight > MAX_WEIGHT {
            return Err(UpdateRejected::InvalidWeight {
                weight,
                reason: "weights above 2^53 are refused: they are example counts",
            });
        }
        if let Some(j) = kernel::first_non_finite(values) {
            return Err(UpdateRejected::NonFinite {
                index: indices[j] as usize,
                value: values[j],
            });
        }
        for (&i, &v) in indices.iter().zip(values) {
            weighted_sum[i as usize] += weight * f64::from(v);
        }
        *total_weight += weight;
        self.simulated_noise_variance += weight * weight * noise_std * noise_std;
        self.contributions += 1;
        Ok(())
    }

    /// The variance per coordinate of the aggregate noise [`finish`](Self::finish) will add
    /// to the weighted sum for the simulated updates so far: Σ_k w_k² (σC)².
    pub fn simulated_noise_variance(&self) -> f64 {
        self.simulated_noise_variance
    }

    /// The number of updates accepted so far.
    pub fn contributions(&self) -> usize {
        self.contributions
    }

    /// The number of coordinates d.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Bytes of heap this aggregator holds between calls to [`add`](Self::add), from its
    /// buffers' capacities. Constant in the cohort size for the mean-based paths: d·8 bytes
    /// in modes none/local; in central mode d·8 bytes of lattice sum plus a d·8-byte scratch
    /// copy, and the privacy crate's `ClippedSum::add` allocates a transient d·16 more inside
    /// each `add`. d·4 bytes per buffered update for the robust options.
    pub fn memory_bytes(&self) -> usize {
        match &self.accumulator {
            Accumulator::Mean { weighted_sum, .. } => weighted_sum.capacity() * size_of::<f64>(),
            Accumulator::Central { scratch, .. } => {
                self.dimension * size_of::<i64>() + scratch.capacity() * size_of::<f64>()
            }
            Accumulator::Robust { updates, .. } => {
                updates.capacity() * size_of::<Box<[f32]>>()
                    + updates.iter().map(|u| size_of_val(&**u)).sum::<usize>()
            }
        }
    }

    /// The aggregated update Δ (the pseudo-gradient, in f64):
    /// - modes none/local: the weighted mean Σ w_k Δ_k / Σ w_k;
    /// - central: (lattice sum + N(0, (σC)²·I)) / expected cohort size, noised by `sampler`;
    /// - median / trimmed mean: the coordinate-wise statistic of the updates with w_k > 0.
    ///
    /// The result carries `sampler`'s provenance. Errors: no update (or only weight-0
    /// updates) outside central mode, where the weighted mean is undefined; a secure sampler
    /// in mode none, since an un-noised aggregate must never look publishable.
    pub fn finish<S: GaussianSampler>(
        self,
        sampler: &mut S,
    ) -> Result<Aggregate<S::Provenance>, AggregationError> {
        if self.privacy == AggregationPrivacy::None
            && TypeId::of::<S::Provenance>() == TypeId::of::<Secure>()
        {
            return Err(AggregationError::NoDpWithSecureSampler);
        }
        if self.simulated_noise_variance > 0.0
            && TypeId::of::<S::Provenance>() == TypeId::of::<Secure>()
        {
            return Err(AggregationError::SimulatedNoiseWithSecureSampler);
        }
        let contributions = self.contributions;
        let simulated_noise_variance = self.simulated_noise_variance;
        let (delta, denominator, noise_std) = match self.accumulator {
            Accumulator::Mean {
                mut weighted_sum,
                total_weight,
            } => {
                if total_weight <= 0.0 {
                    return Err(AggregationError::NothingToAverage { contributions });
                }
                if simulated_noise_variance > 0.0 {
                    // One draw of N(0, Σ w_k² (σC)²) per coordinate in place of every
                    // simulated device's own noise (see `add_simulated`), added and divided
                    // in one pass (the same two roundings as two passes).
                    let std = simulated_noise_variance.sqrt();
                    let mechanism = GaussianMechanism::new(1.0, std)?;
                    let noise =
                        mechanism.release_update(Clipped::zeros(self.dimension, std)?, sampler)?;
                    for (x, n) in weighted_sum.iter_mut().zip(noise.values()) {
                        *x = (*x + n) / total_weight;
                    }
                } else {
                    weighted_sum.iter_mut().for_each(|x| *x /= total_weight);
                }
                (weighted_sum, total_weight, 0.0)
            }
            Accumulator::Central {
                mechanism,
                sum,
                expected_cohort_size,
                ..
            } => {
                let released = mechanism.release_sum(sum, sampler)?;
                let noise_std = released.noise_std() / expected_cohort_size;
                let mut delta = released.into_values();
                delta.iter_mut().for_each(|x| *x /= expected_cohort_size);
                (delta, expected_cohort_size, noise_std)
            }
            Accumulator::Robust { statistic, updates } => {
                if updates.is_empty() {
                    return Err(AggregationError::NothingToAverage { contributions });
                }
                let delta = statistic.aggregate(&updates, self.dimension);
                (delta, updates.len() as f64, 0.0)
            }
        };
        // Validated inputs cannot produce a non-finite Δ; checked anyway, because NaN must
        // never reach a model.
        if let Some(index) = delta.iter().position(|x| !x.is_finite()) {
            return Err(AggregationError::NonFiniteAggregate { index });
        }
        Ok(Aggregate {
            delta,
            contributions,
            denominator,
            noise_std,
            provenance: PhantomData,
        })
    }
}

impl Aggregate<Secure> {
    /// Distributed mode: Δ from the sum secure aggregation unmasked. The noise in it was
    /// added by the devices (each a share of the distributed discrete Gaussian, drawn from
    /// the operating system's randomness on the device), so the coordinator adds none; `sum`
    /// is in model units and is divided by the number of contributors. Under zero-out
    /// neighbouring the contributors are the same in both neighbouring worlds, so dividing by
    /// their number is post-processing. Errors if there are none or Δ is not finite.
    pub fn from_unmasked_sum(
        sum: Vec<f64>,
        contributions: usize,
        noise_std: f64,
    ) -> Result<Self, AggregationError> {
        if contributions == 0 {
            return Err(AggregationError::NothingToAverage { contributions });
        }
        let denominator = contributions as f64;
        let delta: Vec<f64> = sum.into_iter().map(|x| x / denominator).collect();
        if let Some(index) = delta.iter().position(|x| !x.is_finite()) {
            return Err(AggregationError::NonFiniteAggregate { index });
        }
        Ok(Self {
            delta,
            contributions,
            denominator,
            noise_std: noise_std / denominator,
            provenance: PhantomData,
        })
    }
}

/// One round's aggregated update Δ, with the provenance `P` of the noise in it
/// ([`Secure`] or [`Simulated`](fedpref_privacy::Simulated)); only this module makes one.
/// Code that publishes a model should take `Aggregate<Secure>`; a simulation-noised aggregate
/// does not type-check there:
///
/// ```compile_fail,E0308
/// use fedpref_engine::aggregation::{Aggregate, AggregationPrivacy, RoundAggregator, ServerOptimizer};
/// use fedpref_privacy::{Secure, SimulationSampler};
/// let privacy = AggregationPrivacy::Central { clip_norm: 1.0, noise_multiplier: 1.0, expected_cohort_size: 10.0 };
/// let round = RoundAggregator::new(&ServerOptimizer::default(), &privacy, 4).unwrap();
/// let published: Aggregate<Secure> = round.finish(&mut SimulationSampler::seed_from_u64(1)).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate<P: Provenance> {
    delta: Vec<f64>,
    contributions: usize,
    denominator: f64,
    noise_std: f64,
    provenance: PhantomData<P>,
}

impl<P: Provenance> Aggregate<P> {
    /// The aggregated update Δ (the pseudo-gradient of Reddi et al. 2021, Alg. 2).
    pub fn delta(&self) -> &[f64] {
        &self.delta
    }

    /// Δ, by value.
    pub fn into_delta(self) -> Vec<f64> {
        self.delta
    }

    /// The number of updates accepted into the round.
    pub fn contributions(&self) -> usize {
        self.contributions
    }

    /// What the sum was divided by: Σ w_k (none/local), the expected cohort size (central),
    /// or the number of updates with a non-zero weight (median, trimmed mean).
    pub fn denominator(&self) -> f64 {
        self.denominator
    }

    /// The standard deviation of the noise the coordinator added to each coordinate of Δ:
    /// σC / expected cohort size in central mode, 0 otherwise.
    pub fn noise_std(&self) -> f64 {
        self.noise_std
    }

    /// Where the noise came from (`"secure"` or `"simulated"`).
    pub fn provenance(&self) -> &'static str {
        P::NAME
    }
}

#[cfg(test)]
mod tests;
