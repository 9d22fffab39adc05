//! The preference model: the [`PreferenceModel`] trait and federated matrix factorisation
//! with a private user part (federated reconstruction, Singhal et al. 2021).
//!
//! # The maths (shared with the simulator: `../shared/bench/WORKLOAD.md`)
//! Shared: item factors V (I × k), item biases b (I), global offset μ. Private, never sent:
//! user factor u (k) and user bias b_u. The prediction for item j is
//! μ + b_j + b_u + V_j·u. One local round, given the examples (j, r_j, w_j):
//!
//! 1. **Fit** (u, b_u) by a weighted ridge solve:
//!    X = [V_j, 1], y = r − μ − b_j, w = (XᵀWX + λ_u R)⁻¹ XᵀWy, where
//!    λ_u = `private_l2` + `private_l2_per_example` · Σ w_j and R = diag(1, …, 1, β) with
//!    β = `bias_l2_ratio` (the bias is regularised β times as much as a factor).
//! 2. **Update** the shared part with (u, b_u) fixed, for E epochs with rate η and
//!    regularisation ρ; each epoch, with e_j = r_j − (μ + b_j + b_u + V_j·u) computed at
//!    its start: V_j += η(w_j e_j u − ρ V_j), b_j += η(w_j e_j − βρ b_j),
//!    μ += η Σ w_j e_j / Σ w_j.
//!
//! With η = 1 and E = 1 the update is minus half the gradient, for the user's items, of
//! the regularised squared error Σ (r − r̂)² + ρ Σ_j (|V_j|² + β b_j²) per rating: summed
//! over every user it is the full gradient of the objective that alternating least squares
//! minimises with per-rating ("weighted-λ") regularisation (Zhou et al. 2008), so federated
//! rounds and the centralised baseline optimise the same model.
//! 3. The update is (V′, b′, μ′) − (V, b, μ) over **all** items, in the order
//!    `item_factors` (row-major), `item_biases`, `global_offset`: dense, so that its shape
//!    reveals nothing about which items the user touched.
//!
//! With every weight 1 this is exactly the workload's client round.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use std::collections::HashMap;

use serde_json::{Value, json};
use thiserror::Error;

use crate::examples::Example;

/// Why a model or a training configuration was refused, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct ModelError {
    /// The field at fault (`items[3].factors`, `learning_rate`, …).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn model_error(field: impl Into<String>, message: impl Into<String>) -> ModelError {
    ModelError {
        field: field.into(),
        message: message.into(),
    }
}

/// The name and shape of one shared tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name on the wire (`item_factors`, `item_biases`, `global_offset`).
    pub name: String,
    /// Its shape, outermost first; `[]` is a scalar.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shared tensors of a model, in the order an update concatenates them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    tensors: Vec<TensorSpec>,
}

impl TensorLayout {
    /// A layout from its tensors, in order.
    pub fn new(tensors: Vec<TensorSpec>) -> Self {
        Self { tensors }
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The total number of coordinates.
    pub fn dimension(&self) -> usize {
        self.tensors.iter().map(TensorSpec::len).sum()
    }
}

/// Local-training hyper-parameters (the task's `LocalTrainingConfig`). Defaults are the
/// workload's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalTraining {
    /// λ_u of the private ridge solve. Default 1.0.
    pub private_l2: f64,
    /// Epochs E of the shared update. Default 1.
    pub epochs: u32,
    /// Learning rate η of the shared update. Default 0.05.
    pub learning_rate: f64,
    /// Regularisation ρ of the shared update. Default 0.01.
    pub l2_regularization: f64,
    /// At most this many examples (the most recent) are used. Default 1,000.
    pub max_examples: usize,
    /// λ_u grows by this much per unit of example weight (per-rating regularisation of the
    /// private part, as in ALS-WR). Default 0.
    pub private_l2_per_example: f64,
    /// β: how much more (or less) the biases (user and item) are regularised than the
    /// factors. Default 1.
    pub bias_l2_ratio: f64,
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self {
            private_l2: 1.0,
            epochs: 1,
            learning_rate: 0.05,
            l2_regularization: 0.01,
            max_examples: 1_000,
            private_l2_per_example: 0.0,
            bias_l2_ratio: 1.0,
        }
    }
}

impl LocalTraining {
    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.private_l2.is_finite() && self.private_l2 >= 0.0) {
            return Err(model_error("private_l2", "must be a finite number ≥ 0"));
        }
        if self.epochs == 0 {
            return Err(model_error("epochs", "must be at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(model_error("learning_rate", "must be a finite number > 0"));
        }
        if !(self.l2_regularization.is_finite() && self.l2_regularization >= 0.0) {
            return Err(model_error(
                "l2_regularization",
                "must be a finite number ≥ 0",
            ));
        }
        if self.max_examples == 0 {
            return Err(model_error("max_examples", "must be at least 1"));
        }
        if !(self.private_l2_per_example.is_finite() && self.private_l2_per_example >= 0.0) {
            return Err(model_error(
                "private_l2_per_example",
                "must be a finite number ≥ 0",
            ));
        }
        if !(self.bias_l2_ratio.is_finite() && self.bias_l2_ratio >= 0.0) {
            return Err(model_error("bias_l2_ratio", "must be a finite number ≥ 0"));
        }
        Ok(())
    }

    /// λ_u for examples of total weight `total_weight`.
    pub fn private_lambda(&self, total_weight: f64) -> f64 {
        self.private_l2 + self.private_l2_per_example * total_weight
    }
}

/// A preference model with a shared part (from the coordinator) and a private part (only
/// on the device). The coordinator sees only [`PreferenceModel::layout`]-shaped updates.
pub trait PreferenceModel {
    /// The private per-user state.
    type Private: Clone + std::fmt::Debug;

    /// The shared model's version.
    fn version(&self) -> u64;
    /// The shared tensors, in update order.
    fn layout(&self) -> TensorLayout;
    /// The number of items.
    fn item_count(&self) -> usize;
    /// The row of an item id.
    fn item_index(&self, item: &str) -> Option<usize>;
    /// The id of a row.
    fn item_id(&self, row: usize) -> &str;
    /// Fits the private part to the examples against the current shared part.
    fn fit_private(&self, examples: &[Example], training: &LocalTraining) -> Self::Private;
    /// The dense update to the shared part, [`TensorLayout::dimension`] coordinates.
    fn shared_update(
        &self,
        private: &Self::Private,
        examples: &[Example],
        training: &LocalTraining,
    ) -> Vec<f64>;
    /// The non-personalised score of a row (what an average user would get).
    fn baseline(&self, row: usize) -> f64;
    /// The personalised score of a row.
    fn predict(&self, private: &Self::Private, row: usize) -> f64;
    /// Similarity of two rows in the model's item space, in [−1, 1].
    fn item_similarity(&self, a: usize, b: usize) -> f64;
}

/// Fit then update: one local round, before clipping and noise.
pub fn local_round<M: PreferenceModel>(
    model: &M,
    examples: &[Example],
    training: &LocalTraining,
) -> (M::Private, Vec<f64>) {
    let private = model.fit_private(examples, training);
    let update = model.shared_update(&private, examples, training);
    (private, update)
}

/// [`local_round`] for matrix factorisation with the sparse update
/// ([`MatrixFactorization::shared_update_sparse`]).
pub fn local_round_sparse(
    model: &MatrixFactorization,
    examples: &[Example],
    training: &LocalTraining,
) -> (UserState, SparseUpdate) {
    let private = model.fit_private(examples, training);
    let update = model.shared_update_sparse(&private, examples, training);
    (private, update)
}

/// [`local_round_sparse`] with reusable working memory ([`TrainingScratch`]): the same bits,
/// for callers that run many local rounds on one thread.
pub fn local_round_sparse_with(
    model: &MatrixFactorization,
    examples: &[Example],
    training: &LocalTraining,
    scratch: &mut TrainingScratch,
) -> (UserState, SparseUpdate) {
    let private = model.fit_private_with(examples, training, scratch);
    let update = model.shared_update_sparse_with(&private, examples, training, scratch);
    (private, update)
}

/// An update to the shared part that is zero outside `indices`: `values[j]` is coordinate
/// `indices[j]` of a `dimension`-long update. Indices are strictly increasing.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseUpdate {
    /// The dense update's length ([`TensorLayout::dimension`]).
    pub dimension: usize,
    /// The coordinates that may be non-zero, strictly increasing.
    pub indices: Vec<u32>,
    /// Their values.
    pub values: Vec<f64>,
}

impl SparseUpdate {
    /// The L2 norm (the dense update's: every other coordinate is 0).
    pub fn norm(&self) -> f64 {
        fedpref_privacy::l2_norm(&self.values)
    }

    /// The dense update.
    pub fn to_dense(&self) -> Vec<f64> {
        let mut dense = vec![0.0; self.dimension];
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            dense[i as usize] = v;
        }
        dense
    }
}

/// The private part of matrix factorisation: never leaves the device.
#[derive(Clone, Debug, PartialEq)]
pub struct UserState {
    /// The user factor u (k).
    pub factor: Vec<f64>,
    /// The user bias b_u.
    pub bias: f64,
}

/// An array's elements in logical (row-major) order: its own buffer when it is already laid
/// out that way, else a copy.
fn into_flat<D: ndarray::Dimension>(a: ndarray::Array<f64, D>) -> Vec<f64> {
    if a.is_standard_layout() {
        let len = a.len();
        let (v, offset) = a.into_raw_vec_and_offset();
        if offset.unwrap_or(0) == 0 && v.len() == len {
            return v;
        }
        let start = offset.unwrap_or(0);
        return v[start..start + len].to_vec();
    }
    a.iter().copied().collect()
}

/// Federated matrix factorisation's shared part, as downloaded from the coordinator.
#[derive(Clone, Debug, PartialEq)]
pub struct MatrixFactorization {
    version: u64,
    k: usize,
    item_ids: Vec<String>,
    index: HashMap<String, usize>,
    factors: Vec<f64>,
    biases: Vec<f64>,
    offset: f64,
}

impl MatrixFactorization {
    /// A model from its parts: `factors` is I × k (one row per item, in the order of
    /// `item_ids`), `biases` one per item. Every number must be finite, item ids unique and
    /// non-empty. A standard-layout `factors` is taken over without copying.
    pub fn new(
        version: u64,
        item_ids: Vec<String>,
        factors: Array2<f64>,
        biases: Array1<f64>,
        global_offset: f64,
    ) -> Result<Self, ModelError> {
        let (rows, factor_dimension) = factors.dim();
        if rows != item_ids.len() {
            return Err(model_error(
                "item_factors",
                format!("has {rows} rows for {} items", item_ids.len()),
            ));
        }
        let factors = into_flat(factors);
        let biases = into_flat(biases);
        Self::from_flat(
            version,
            item_ids,
            factor_dimension,
            factors,
            biases,
            global_offset,
        )
    }

    /// [`MatrixFactorization::new`] from row-major `factors` (I × k) and `biases`.
    pub(crate) fn from_flat(
        version: u64,
        item_ids: Vec<String>,
        factor_dimension: usize,
        factors: Vec<f64>,
        biases: Vec<f64>,
        global_offset: f64,
    ) -> Result<Self, ModelError> {
        if factor_dimension == 0 {
            return Err(model_error("factor_dimension", "must be at least 1"));
        }
        if item_ids.is_empty() {
            return Err(model_error("items", "must not be empty"));
        }
        let n = item_ids.len();
        if factors.len() != n * factor_dimension {
            return Err(model_error(
                "item_factors",
                format!(
                    "has {} values; {n} items × k = {factor_dimension} need {}",
                    factors.len(),
                    n * factor_dimension
                ),
            ));
        }
        if biases.len() != n {
            return Err(model_error(
                "item_biases",
                format!("has {} values for {n} items", biases.len()),
            ));
        }
        if let Some(i) = factors.iter().position(|x| !x.is_finite()) {
            return Err(model_error(
                format!("items[{}].factors", i / factor_dimension),
                "must be finite",
            ));
        }
        if let Some(i) = biases.iter().position(|x| !x.is_finite()) {
            return Err(model_error(format!("items[{i}].bias"), "must be finite"));
        }
        if !global_offset.is_finite() {
            return Err(model_error("global_offset", "must be finite"));
        }
        let mut index = HashMap::with_capacity(n);
        for (row, id) in item_ids.iter().enumerate() {
            if id.is_empty() {
                return Err(model_error(
                    format!("items[{row}].item"),
                    "must not be empty",
                ));
            }
            if index.insert(id.clone(), row).is_some() {
                return Err(model_error(
                    format!("items[{row}].item"),
                    format!("'{id}' appears twice"),
                ));
            }
        }
        Ok(Self {
            version,
            k: factor_dimension,
            item_ids,
            index,
            factors,
            biases,
            offset: global_offset,
        })
    }

    /// A model initialised as the workload's server does (V ~ N(0, s²), b = 0, μ = 3) from
    /// a deterministic seeded generator: for tests, benchmarks and demos, not the
    /// coordinator's CSPRNG-seeded initialisation.
    pub fn initial(
        version: u64,
        item_ids: Vec<String>,
        factor_dimension: usize,
        init_stddev: f64,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let n = item_ids.len();
        let mut state = seed;
        let mut factors = Vec::with_capacity(n * factor_dimension);
        while factors.len() < n * factor_dimension {
            // Box–Muller on two SplitMix64 uniforms in (0, 1].
            let u1 = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            let u2 = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * (1.0 - u1).ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            factors.push(init_stddev * r * theta.cos());
            factors.push(init_stddev * r * theta.sin());
        }
        factors.truncate(n * factor_dimension);
        Self::from_flat(
            version,
            item_ids,
            factor_dimension,
            factors,
            vec![0.0; n],
            3.0,
        )
    }

    /// The latent dimension k.
    pub fn factor_dimension(&self) -> usize {
        self.k
    }

    /// The item ids, by row.
    pub fn item_ids(&self) -> &[String] {
        &self.item_ids
    }

    /// V: one row of k factors per item, in the order of [`MatrixFactorization::item_ids`].
    pub fn item_factors(&self) -> ArrayView2<'_, f64> {
        ArrayView2::from_shape((self.item_ids.len(), self.k), &self.factors)
            .expect("the shape is checked when the model is made")
    }

    /// b, one per item.
    pub fn item_biases(&self) -> ArrayView1<'_, f64> {
        ArrayView1::from(&self.biases[..])
    }

    /// The model's parts, moved out without copying: item ids, V (I × k), b and μ.
    pub fn into_arrays(self) -> (Vec<String>, Array2<f64>, Array1<f64>, f64) {
        let factors = Array2::from_shape_vec((self.item_ids.len(), self.k), self.factors)
            .expect("the shape is checked when the model is made");
        (
            self.item_ids,
            factors,
            Array1::from(self.biases),
            self.offset,
        )
    }

    /// V, row-major, for kernels and the store.
    pub(crate) fn factors_flat(&self) -> &[f64] {
        &self.factors
    }

    /// b, for kernels and the store.
    pub(crate) fn biases_flat(&self) -> &[f64] {
        &self.biases
    }

    /// μ.
    pub fn global_offset(&self) -> f64 {
        self.offset
    }

    fn row(&self, j: usize) -> &[f64] {
        &self.factors[j * self.k..(j + 1) * self.k]
    }

    /// [`PreferenceModel::fit_private`] with reusable working memory: the same bits, without
    /// allocating anything but the returned state once `scratch` has grown to the model's
    /// size. For callers that fit many users in a row (a simulator's worker thread).
    pub fn fit_private_with(
        &self,
        examples: &[Example],
        training: &LocalTraining,
        scratch: &mut TrainingScratch,
    ) -> UserState {
        let k = self.k;
        let d = k + 1;
        if examples.is_empty() {
            return UserState {
                factor: vec![0.0; k],
                bias: 0.0,
            };
        }
        // The lower triangle of XᵀWX and XᵀWy with x = [V_j, 1]. Each entry sums the
        // examples in order, one product (w x_i) x_j at a time, so the bits do not depend on
        // how the loops are vectorised. Only the lower triangle is read by the solve.
        self.gather(examples, scratch);
        scratch.gram.clear();
        scratch.gram.resize(d * d, 0.0);
        scratch.rhs.clear();
        scratch.rhs.resize(d, 0.0);
        match k {
            4 => Self::gram_fixed::<4>(scratch),
            8 => Self::gram_fixed::<8>(scratch),
            16 => Self::gram_fixed::<16>(scratch),
            32 => Self::gram_fixed::<32>(scratch),
            _ => Self::gram_any(k, scratch),
        }
        let (gram, rhs) = (&scratch.gram, &scratch.rhs);
        let total_weight: f64 = examples.iter().map(|e| e.weight).sum();
        let mut jitter = training.private_lambda(total_weight);
        loop {
            let system = &mut scratch.system;
            system.clear();
            system.extend_from_slice(gram);
            for i in 0..k {
                system[i * d + i] += jitter;
            }
            system[k * d + k] += jitter * training.bias_l2_ratio;
            let mut w = Vec::with_capacity(d);
            w.extend_from_slice(rhs);
            if solve_spd(system, &mut w, d) {
                let bias = w.pop().expect("d ≥ 2");
                return UserState { factor: w, bias };
            }
            // Only reachable with λ_u = 0 and a singular system: regularise minimally.
            jitter = if jitter == 0.0 { 1e-9 } else { jitter * 10.0 };
        }
    }

    /// Gathers the examples' rows of V into `scratch.rows`, their residual targets
    /// y = r − μ − b_j into `scratch.residuals` and their weights into `scratch.weights`, so
    /// that the Gram loops read contiguous memory.
    fn gather(&self, examples: &[Example], scratch: &mut TrainingScratch) {
        scratch.rows.clear();
        scratch.residuals.clear();
        scratch.weights.clear();
        for e in examples {
            scratch.rows.extend_from_slice(self.row(e.item));
            scratch
                .residuals
                .push(e.target - self.offset - self.biases[e.item]);
            scratch.weights.push(e.weight);
        }
    }

    /// Writes the lower triangle of XᵀWX (d × d, x = [V_j, 1]) into `scratch.gram` and XᵀWy
    /// into `scratch.rhs`, from [`Self::gather`]'s rows for a compile-time k. Each entry
    /// starts at 0 and adds the examples' products (w x_i) x_j in example order, one at a
    /// time, exactly as a plain triple loop would: the bits do not depend on the
    /// vectorisation. Row i is accumulated in registers over all examples; its columns
    /// past i (the upper triangle) are computed and dropped.
    fn gram_fixed<const K: usize>(scratch: &mut TrainingScratch) {
        let d = K + 1;
        let TrainingScratch {
            gram,
            rhs,
            rows,
            residuals: ys,
            weights,
            ..
        } = scratch;
        let rows = rows.as_chunks::<K>().0;
        for i in 0..K {
            // Row i needs columns 0..=i: accumulate the narrowest whole block of 4 that
            // holds them (the rest of the block is upper triangle, dropped).
            let (acc, r) = match (i / 4 + 1) * 4 {
                4 => gram_row::<K, 4>(i, rows, ys, weights),
                8 => gram_row::<K, 8>(i, rows, ys, weights),
                12 => gram_row::<K, 12>(i, rows, ys, weights),
                16 => gram_row::<K, 16>(i, rows, ys, weights),
                20 => gram_row::<K, 20>(i, rows, ys, weights),
                24 => gram_row::<K, 24>(i, rows, ys, weights),
                28 => gram_row::<K, 28>(i, rows, ys, weights),
                _ => gram_row::<K, K>(i, rows, ys, weights),
            };
            gram[i * d..=i * d + i].copy_from_slice(&acc[..=i]);
            rhs[i] = r;
        }
        // The bias row: x_k = 1.
        let mut acc = [0.0f64; K];
        let (mut r, mut last) = (0.0, 0.0);
        for ((row, &y), &w) in rows.iter().zip(ys.iter()).zip(weights.iter()) {
            let wxk = w * 1.0;
            r += wxk * y;
            for j in 0..K {
                acc[j] += wxk * row[j];
            }
            last += wxk * 1.0;
        }
        gram[K * d..K * d + K].copy_from_slice(&acc);
        gram[K * d + K] = last;
        rhs[K] = r;
    }

    /// [`Self::gram_fixed`] for any k (the same arithmetic in the same order).
    fn gram_any(k: usize, scratch: &mut TrainingScratch) {
        let d = k + 1;
        let TrainingScratch {
            gram,
            rhs,
            rows,
            residuals: ys,
            weights,
            ..
        } = scratch;
        for ((row, &y), &w) in rows.chunks_exact(k).zip(ys.iter()).zip(weights.iter()) {
            for (i, (&xi, r)) in row.iter().zip(rhs.iter_mut()).enumerate() {
                let wxi = w * xi;
                *r += wxi * y;
                let lower = &mut gram[i * d..=i * d + i];
                for (a, &xj) in lower.iter_mut().zip(row) {
                    *a += wxi * xj;
                }
            }
            let wxk = w * 1.0;
            rhs[k] += wxk * y;
            let last = &mut gram[k * d..k * d + d];
            for (a, &xj) in last.iter_mut().zip(row) {
                *a += wxk * xj;
            }
            last[k] += wxk * 1.0;
        }
    }

    /// The local epochs on the touched rows only, into `scratch`: the new rows of V (in
    /// example order, k each) in `scratch.rows`, the new item biases (in example order) in
    /// `scratch.biases`; returns the new global offset. The shared update is their
    /// difference from the downloaded values; every other coordinate's update is exactly 0.
    fn touched_rows(
        &self,
        private: &UserState,
        examples: &[Example],
        training: &LocalTraining,
        scratch: &mut TrainingScratch,
    ) -> f64 {
        scratch.rows.clear();
        for e in examples {
            scratch.rows.extend_from_slice(self.row(e.item));
        }
        scratch.biases.clear();
        scratch
            .biases
            .extend(examples.iter().map(|e| self.biases[e.item]));
        scratch.errors.clear();
        scratch.errors.resize(examples.len(), 0.0);
        let mut mu = self.offset;
        let total_weight: f64 = examples.iter().map(|e| e.weight).sum();
        let (lr, reg) = (training.learning_rate, training.l2_regularization);
        let bias_reg = reg * training.bias_l2_ratio;
        let epoch = Epoch {
            examples,
            private,
            lr,
            reg,
            bias_reg,
            total_weight,
        };
        for _ in 0..training.epochs {
            mu = match self.k {
                4 if private.factor.len() == 4 => epoch.run::<4>(mu, scratch),
                8 if private.factor.len() == 8 => epoch.run::<8>(mu, scratch),
                16 if private.factor.len() == 16 => epoch.run::<16>(mu, scratch),
                32 if private.factor.len() == 32 => epoch.run::<32>(mu, scratch),
                _ => epoch.run_any(self.k, mu, scratch),
            };
        }
        mu
    }

    /// [`PreferenceModel::shared_update`] as a sparse vector: only the coordinates the
    /// examples can move (the rows of V of the rated items, their biases and the global
    /// offset), in increasing layout order. Scattered into zeros it is exactly the dense
    /// update (same values, same bytes), so its L2 norm is the dense update's and clipping
    /// it is clipping the dense update. Costs O(examples × k), not O(items × k).
    pub fn shared_update_sparse(
        &self,
        private: &UserState,
        examples: &[Example],
        training: &LocalTraining,
    ) -> SparseUpdate {
        self.shared_update_sparse_with(private, examples, training, &mut TrainingScratch::default())
    }

    /// [`MatrixFactorization::shared_update_sparse`] with reusable working memory (the same
    /// bits; it allocates only the returned vectors).
    pub fn shared_update_sparse_with(
        &self,
        private: &UserState,
        examples: &[Example],
        training: &LocalTraining,
        scratch: &mut TrainingScratch,
    ) -> SparseUpdate {
        let k = self.k;
        let n = self.item_ids.len();
        let dimension = n * k + n + 1;
        if examples.is_empty() {
            return SparseUpdate {
                dimension,
                indices: vec![],
                values: vec![],
            };
        }
        let mu = self.touched_rows(private, examples, training, scratch);
        // Sorted by item; with a repeated item the last example wins, as in the dense update.
        // Keys (item, position from the end) in one u64: distinct, so the unstable sort
        // gives the one order, and the first of each item is its last example.
        let order = &mut scratch.order;
        order.clear();
        let last = examples.len() as u64 - 1;
        order.extend(
            examples
                .iter()
                .enumerate()
                .map(|(i, e)| ((e.item as u64) << 32) | (last - i as u64)),
        );
        if !order.is_sorted_by(|a, b| a >> 32 < b >> 32) {
            order.sort_unstable();
            order.dedup_by_key(|key| *key >> 32);
        }
        let nnz = order.len() * (k + 1) + 1;
        let mut indices = Vec::with_capacity(nnz);
        let mut values = Vec::with_capacity(nnz);
        let position = |key: u64| (last - (key & 0xFFFF_FFFF)) as usize;
        for &key in order.iter() {
            let i = position(key);
            let item = examples[i].item;
            let first = (item * k) as u32;
            indices.extend(first..first + k as u32);
            let new = &scratch.rows[i * k..(i + 1) * k];
            values.extend(new.iter().zip(self.row(item)).map(|(v, old)| v - old));
        }
        for &key in order.iter() {
            let i = position(key);
            let item = examples[i].item;
            indices.push((n * k + item) as u32);
            values.push(scratch.biases[i] - self.biases[item]);
        }
        indices.push((n * k + n) as u32);
        values.push(mu - self.offset);
        SparseUpdate {
            dimension,
            indices,
            values,
        }
    }

    /// Replaces the shared part by a downloaded parameter vector of the same layout (in
    /// layout order: V row-major, the item biases, μ; f32 as the coordinator stores them,
    /// widened exactly to f64) at `version`. The item ids and their index stay, so this is
    /// what a new model version costs without rebuilding the catalogue's index. The same
    /// numbers as building the model anew from these parameters; refused, naming the field,
    /// and leaving the model unchanged, if the length differs or a value is not finite.
    pub fn load_parameters(&mut self, version: u64, parameters: &[f32]) -> Result<(), ModelError> {
        let dimension = self.layout().dimension();
        if parameters.len() != dimension {
            return Err(model_error(
                "parameters",
                format!(
                    "has {} values; the layout has {dimension}",
                    parameters.len()
                ),
            ));
        }
        let (v, rest) = parameters.split_at(self.factors.len());
        let (b, mu) = rest.split_at(self.biases.len());
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(model_error(
                format!("items[{}].factors", i / self.k),
                "must be finite",
            ));
        }
        if let Some(i) = b.iter().position(|x| !x.is_finite()) {
            return Err(model_error(format!("items[{i}].bias"), "must be finite"));
        }
        if !mu[0].is_finite() {
            return Err(model_error("global_offset", "must be finite"));
        }
        self.factors
            .iter_mut()
            .zip(v)
            .for_each(|(x, &p)| *x = f64::from(p));
        self.biases
            .iter_mut()
            .zip(b)
            .for_each(|(x, &p)| *x = f64::from(p));
        self.offset = f64::from(mu[0]);
        self.version = version;
        Ok(())
    }

    /// Adds `scale` × an update (in layout order) to the shared part: what the coordinator
    /// does with the aggregate; here for tests and the simulator.
    pub fn apply_update(&mut self, update: &[f64], scale: f64) -> Result<(), ModelError> {
        let dimension = self.layout().dimension();
        if update.len() != dimension {
            return Err(model_error(
                "update",
                format!("has {} values; the layout has {dimension}", update.len()),
            ));
        }
        let (v, rest) = update.split_at(self.factors.len());
        let (b, mu) = rest.split_at(self.biases.len());
        self.factors
            .iter_mut()
            .zip(v)
            .for_each(|(x, d)| *x += scale * d);
        self.biases
            .iter_mut()
            .zip(b)
            .for_each(|(x, d)| *x += scale * d);
        self.offset += scale * mu[0];
        Ok(())
    }

    /// Scores every row for a user (`None`: the baseline μ + b_j) into `out`.
    pub fn score_all(&self, private: Option<&UserState>, out: &mut Vec<f64>) {
        out.clear();
        match private {
            None => out.extend(self.biases.iter().map(|b| self.offset + b)),
            Some(p) => {
                let base = self.offset + p.bias;
                out.extend(
                    self.factors
                        .chunks_exact(self.k)
                        .zip(&self.biases)
                        .map(|(row, b)| base + b + dot(row, &p.factor)),
                );
            }
        }
    }

    /// The model in its portable JSON form (see [`MatrixFactorization::from_json`]).
    pub fn to_json(&self) -> Value {
        let items: Vec<Value> = (0..self.item_ids.len())
            .map(|j| json!({"item": self.item_ids[j], "factors": self.row(j), "bias": self.biases[j]}))
            .collect();
        json!({
            "model_version": self.version,
            "factor_dimension": self.k,
            "global_offset": self.offset,
            "items": items,
        })
    }

    /// Reads a model from its portable JSON form:
    ///
    /// ```json
    /// {"model_version": 3, "factor_dimension": 2, "global_offset": 3.5,
    ///  "items": [{"item": "i1", "factors": [0.1, -0.2], "bias": 0.05}]}
    /// ```
    ///
    /// Errors name the field, e.g. `items[3].factors`.
    pub fn from_json(value: &Value) -> Result<Self, ModelError> {
        let obj = value
            .as_object()
            .ok_or_else(|| model_error("model", "must be a JSON object"))?;
        let version = obj
            .get("model_version")
            .and_then(Value::as_u64)
            .ok_or_else(|| model_error("model_version", "must be a whole number ≥ 0"))?;
        let k = obj
            .get("factor_dimension")
            .and_then(Value::as_u64)
            .filter(|k| *k >= 1 && *k <= 4096)
            .ok_or_else(|| model_error("factor_dimension", "must be a whole number in [1, 4096]"))?
            as usize;
        let offset = obj
            .get("global_offset")
            .and_then(Value::as_f64)
            .ok_or_else(|| model_error("global_offset", "must be a number"))?;
        let items = obj
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| model_error("items", "must be an array"))?;
        let mut ids = Vec::with_capacity(items.len());
        let mut factors = Vec::with_capacity(items.len() * k);
        let mut biases = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let id = item
                .get("item")
                .and_then(Value::as_str)
                .ok_or_else(|| model_error(format!("items[{i}].item"), "must be a string"))?;
            let row = item
                .get("factors")
                .and_then(Value::as_array)
                .filter(|row| row.len() == k)
                .ok_or_else(|| {
                    model_error(
                        format!("items[{i}].factors"),
                        format!("must be an array of {k} numbers"),
                    )
                })?;
            for x in row {
                factors.push(x.as_f64().ok_or_else(|| {
                    model_error(format!("items[{i}].factors"), "must hold numbers only")
                })?);
            }
            biases.push(
                item.get("bias")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| model_error(format!("items[{i}].bias"), "must be a number"))?,
            );
            ids.push(id.to_owned());
        }
        Self::from_flat(version, ids, k, factors, biases, offset)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A dot product with four independent accumulators, so that the additions pipeline
/// (a single running sum is one long dependency chain).
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a4, b4) = (a[..n].chunks_exact(4), b[..n].chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0; 4];
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// One epoch of the shared update on the touched rows (module docs, step 2), over the
/// rows, biases and errors in a [`TrainingScratch`].
struct Epoch<'a> {
    examples: &'a [Example],
    private: &'a UserState,
    lr: f64,
    reg: f64,
    bias_reg: f64,
    total_weight: f64,
}

impl Epoch<'_> {
    /// The epoch for a compile-time k (`private.factor` has K entries); returns the new μ.
    fn run<const K: usize>(&self, mu: f64, scratch: &mut TrainingScratch) -> f64 {
        let u: &[f64; K] = self.private.factor[..].try_into().expect("K factors");
        let rows = scratch.rows.as_chunks_mut::<K>().0;
        for (((e, row), b), err) in self
            .examples
            .iter()
            .zip(rows.iter())
            .zip(scratch.biases.iter())
            .zip(scratch.errors.iter_mut())
        {
            *err = e.target - (mu + b + self.private.bias + dot(row, u));
        }
        let mut mean_error = 0.0;
        for (((e, row), b), err) in self
            .examples
            .iter()
            .zip(rows.iter_mut())
            .zip(scratch.biases.iter_mut())
            .zip(scratch.errors.iter())
        {
            let we = e.weight * err;
            for (v, u) in row.iter_mut().zip(u) {
                *v += self.lr * (we * u - self.reg * *v);
            }
            *b += self.lr * (we - self.bias_reg * *b);
            mean_error += we;
        }
        mu + self.lr * mean_error / self.total_weight
    }

    /// [`Epoch::run`] for any k.
    fn run_any(&self, k: usize, mu: f64, scratch: &mut TrainingScratch) -> f64 {
        let u = &self.private.factor[..];
        for (((e, row), b), err) in self
            .examples
            .iter()
            .zip(scratch.rows.chunks_exact(k))
            .zip(scratch.biases.iter())
            .zip(scratch.errors.iter_mut())
        {
            *err = e.target - (mu + b + self.private.bias + dot(row, u));
        }
        let mut mean_error = 0.0;
        for (((e, row), b), err) in self
            .examples
            .iter()
            .zip(scratch.rows.chunks_exact_mut(k))
            .zip(scratch.biases.iter_mut())
            .zip(scratch.errors.iter())
        {
            let we = e.weight * err;
            for (v, u) in row.iter_mut().zip(u) {
                *v += self.lr * (we * u - self.reg * *v);
            }
            *b += self.lr * (we - self.bias_reg * *b);
            mean_error += we;
        }
        mu + self.lr * mean_error / self.total_weight
    }
}

/// Row i of XᵀWX over columns 0..W (W ≤ K, past i when i < W − 1) and entry i of XᵀWy:
/// each sum starts at 0 and adds (w x_i) x_j example by example, in order. The row is
/// held in registers over all examples. Returns a K-wide array (columns ≥ W are 0).
#[inline(always)]
fn gram_row<const K: usize, const W: usize>(
    i: usize,
    rows: &[[f64; K]],
    ys: &[f64],
    weights: &[f64],
) -> ([f64; K], f64) {
    let mut acc = [0.0f64; W];
    let mut r = 0.0;
    for ((row, &y), &w) in rows.iter().zip(ys).zip(weights) {
        let wxi = w * row[i];
        r += wxi * y;
        for (a, &x) in acc.iter_mut().zip(&row[..W]) {
            *a += wxi * x;
        }
    }
    let mut out = [0.0f64; K];
    out[..W].copy_from_slice(&acc);
    (out, r)
}

/// Solves A x = b for symmetric positive-definite A (d × d, row-major; only the lower
/// triangle is read) by Cholesky, in place: on return `b` holds x. Returns false if A is
/// not positive definite. Every sum runs in index order, one term at a time.
fn solve_spd(a: &mut [f64], b: &mut [f64], d: usize) -> bool {
    for j in 0..d {
        let (head, tail) = a.split_at_mut((j + 1) * d);
        let row_j = &mut head[j * d..];
        let s = row_j[..j].iter().fold(row_j[j], |s, &x| s - x * x);
        if s <= 0.0 || !s.is_finite() {
            return false;
        }
        let l = s.sqrt();
        row_j[j] = l;
        let row_j = &row_j[..j];
        for row_i in tail.chunks_exact_mut(d) {
            let s = row_i[..j]
                .iter()
                .zip(row_j)
                .fold(row_i[j], |s, (&x, &y)| s - x * y);
            row_i[j] = s / l;
        }
    }
    for i in 0..d {
        let row_i = &a[i * d..i * d + i + 1];
        let s = row_i[..i]
            .iter()
            .zip(&b[..i])
            .fold(b[i], |s, (&x, &y)| s - x * y);
        b[i] = s / row_i[i];
    }
    for i in (0..d).rev() {
        let mut s = b[i];
        for p in i + 1..d {
            s -= a[p * d + i] * b[p];
        }
        b[i] = s / a[i * d + i];
    }
    true
}

/// Working memory for [`MatrixFactorization`]'s local rounds
/// ([`MatrixFactorization::fit_private_with`],
/// [`MatrixFactorization::shared_update_sparse_with`]), kept between rounds so that fitting
/// many users in a row allocates nothing per user but its results. It holds no state that
/// changes a result: a fresh one and a reused one give the same bits.
#[derive(Clone, Debug, Default)]
pub struct TrainingScratch {
    gram: Vec<f64>,
    rhs: Vec<f64>,
    system: Vec<f64>,
    rows: Vec<f64>,
    residuals: Vec<f64>,
    weights: Vec<f64>,
    biases: Vec<f64>,
    errors: Vec<f64>,
    order: Vec<u64>,
}

impl PreferenceModel for MatrixFactorization {
    type Private = UserState;

    fn version(&self) -> u64 {
        self.version
    }

    fn layout(&self) -> TensorLayout {
        let n = self.item_ids.len() as u64;
        TensorLayout::new(vec![
            TensorSpec {
                name: "item_factors".into(),
                shape: vec![n, self.k as u64],
            },
            TensorSpec {
                name: "item_biases".into(),
                shape: vec![n],
            },
            TensorSpec {
                name: "global_offset".into(),
                shape: vec![],
            },
        ])
    }

    fn item_count(&self) -> usize {
        self.item_ids.len()
    }

    fn item_index(&self, item: &str) -> Option<usize> {
        self.index.get(item).copied()
    }

    fn item_id(&self, row: usize) -> &str {
        &self.item_ids[row]
    }

    fn fit_private(&self, examples: &[Example], training: &LocalTraining) -> UserState {
        self.fit_private_with(examples, training, &mut TrainingScratch::default())
    }

    fn shared_update(
        &self,
        private: &UserState,
        examples: &[Example],
        training: &LocalTraining,
    ) -> Vec<f64> {
        let k = self.k;
        let n = self.item_ids.len();
        let mut update = vec![0.0; n * k + n + 1];
        if examples.is_empty() {
            return update;
        }
        let mut scratch = TrainingScratch::default();
        let mu = self.touched_rows(private, examples, training, &mut scratch);
        for (i, e) in examples.iter().enumerate() {
            let old = self.row(e.item);
            for c in 0..k {
                update[e.item * k + c] = scratch.rows[i * k + c] - old[c];
            }
            update[n * k + e.item] = scratch.biases[i] - self.biases[e.item];
        }
        update[n * k + n] = mu - self.offset;
        update
    }

    fn baseline(&self, row: usize) -> f64 {
        self.offset + self.biases[row]
    }

    fn predict(&self, private: &UserState, row: usize) -> f64 {
        self.offset + self.biases[row] + private.bias + dot(self.row(row), &private.factor)
    }

    fn item_similarity(&self, a: usize, b: usize) -> f64 {
        let (x, y) = (self.row(a), self.row(b));
        let norm = (dot(x, x) * dot(y, y)).sqrt();
        if norm > 0.0 { dot(x, y) / norm } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i{i}")).collect()
    }

    fn examples() -> Vec<Example> {
        vec![
            Example {
                item: 1,
                target: 5.0,
                weight: 1.0,
            },
            Example {
                item: 3,
                target: 1.0,
                weight: 1.0,
            },
            Example {
                item: 4,
                target: 4.0,
                weight: 0.5,
            },
        ]
    }

    #[test]
    fn the_sparse_update_scatters_to_the_dense_update_bytes() {
        let m = MatrixFactorization::initial(1, ids(6), 3, 0.5, 7).unwrap();
        let t = LocalTraining {
            epochs: 3,
            bias_l2_ratio: 0.3,
            ..LocalTraining::default()
        };
        // In example order 4, 1, 3; and a repeated item (the last example wins in both).
        let mut unordered = examples();
        unordered.rotate_left(2);
        let mut repeated = examples();
        repeated.push(Example {
            item: 1,
            target: 2.0,
            weight: 1.0,
        });
        for ex in [examples(), unordered, repeated, vec![]] {
            let p = m.fit_private(&ex, &t);
            let dense = m.shared_update(&p, &ex, &t);
            let sparse = m.shared_update_sparse(&p, &ex, &t);
            assert_eq!(sparse.dimension, dense.len());
            assert!(sparse.indices.windows(2).all(|w| w[0] < w[1]), "{sparse:?}");
            let back = sparse.to_dense();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(&dense));
            let norm = dense.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((sparse.norm() - norm).abs() <= 1e-12 * norm.max(1.0));
        }
        let ex = examples();
        let p = m.fit_private(&ex, &t);
        // 3 rated items: 3 rows of k = 3, 3 biases, the offset.
        assert_eq!(
            m.shared_update_sparse(&p, &ex, &t).indices.len(),
            3 * 3 + 3 + 1
        );
    }

    /// The ridge fit as first written (full symmetric Gram matrix, a fresh allocation per
    /// step): the reference the working-memory version must match bit for bit.
    fn reference_fit(
        m: &MatrixFactorization,
        examples: &[Example],
        t: &LocalTraining,
    ) -> UserState {
        let k = m.k;
        let d = k + 1;
        let mut a = vec![0.0; d * d];
        let mut rhs = vec![0.0; d];
        let mut x = vec![1.0; d];
        for e in examples {
            x[..k].copy_from_slice(m.row(e.item));
            let y = e.target - m.offset - m.biases[e.item];
            for i in 0..d {
                let wxi = e.weight * x[i];
                rhs[i] += wxi * y;
                for j in 0..=i {
                    a[i * d + j] += wxi * x[j];
                }
            }
        }
        for i in 0..d {
            for j in 0..i {
                a[j * d + i] = a[i * d + j];
            }
        }
        let total_weight: f64 = examples.iter().map(|e| e.weight).sum();
        let mut jitter = t.private_lambda(total_weight);
        loop {
            let mut m2 = a.clone();
            for i in 0..k {
                m2[i * d + i] += jitter;
            }
            m2[k * d + k] += jitter * t.bias_l2_ratio;
            let mut w = rhs.clone();
            // Cholesky, written with plain indices.
            let mut ok = true;
            'chol: for j in 0..d {
                let mut s = m2[j * d + j];
                for p in 0..j {
                    s -= m2[j * d + p] * m2[j * d + p];
                }
                if s <= 0.0 || !s.is_finite() {
                    ok = false;
                    break 'chol;
                }
                let l = s.sqrt();
                m2[j * d + j] = l;
                for i in j + 1..d {
                    let mut s = m2[i * d + j];
                    for p in 0..j {
                        s -= m2[i * d + p] * m2[j * d + p];
                    }
                    m2[i * d + j] = s / l;
                }
            }
            if ok {
                for i in 0..d {
                    let mut s = w[i];
                    for p in 0..i {
                        s -= m2[i * d + p] * w[p];
                    }
                    w[i] = s / m2[i * d + i];
                }
                for i in (0..d).rev() {
                    let mut s = w[i];
                    for p in i + 1..d {
                        s -= m2[p * d + i] * w[p];
                    }
                    w[i] = s / m2[i * d + i];
                }
                let bias = w.pop().unwrap();
                return UserState { factor: w, bias };
            }
            jitter = if jitter == 0.0 { 1e-9 } else { jitter * 10.0 };
        }
    }

    /// The dense shared update as first written: the reference for the epochs.
    fn reference_update(
        m: &MatrixFactorization,
        private: &UserState,
        examples: &[Example],
        t: &LocalTraining,
    ) -> Vec<f64> {
        let (k, n) = (m.k, m.item_ids.len());
        let mut update = vec![0.0; n * k + n + 1];
        if examples.is_empty() {
            return update;
        }
        let mut rows: Vec<f64> = examples
            .iter()
            .flat_map(|e| m.row(e.item).iter().copied())
            .collect();
        let mut biases: Vec<f64> = examples.iter().map(|e| m.biases[e.item]).collect();
        let mut mu = m.offset;
        let total_weight: f64 = examples.iter().map(|e| e.weight).sum();
        let (lr, reg) = (t.learning_rate, t.l2_regularization);
        let bias_reg = reg * t.bias_l2_ratio;
        let mut errors = vec![0.0; examples.len()];
        for _ in 0..t.epochs {
            for (i, e) in examples.iter().enumerate() {
                let row = &rows[i * k..(i + 1) * k];
                errors[i] = e.target - (mu + biases[i] + private.bias + dot(row, &private.factor));
            }
            let mut mean_error = 0.0;
            for (i, e) in examples.iter().enumerate() {
                let we = e.weight * errors[i];
                for (v, u) in rows[i * k..(i + 1) * k].iter_mut().zip(&private.factor) {
                    *v += lr * (we * u - reg * *v);
                }
                biases[i] += lr * (we - bias_reg * biases[i]);
                mean_error += we;
            }
            mu += lr * mean_error / total_weight;
        }
        for (i, e) in examples.iter().enumerate() {
            let old = m.row(e.item);
            for c in 0..k {
                update[e.item * k + c] = rows[i * k + c] - old[c];
            }
            update[n * k + e.item] = biases[i] - m.biases[e.item];
        }
        update[n * k + n] = mu - m.offset;
        update
    }

    #[test]
    fn the_local_round_with_working_memory_is_the_reference_round_bit_for_bit() {
        let bits = |p: &UserState| {
            let mut v: Vec<u64> = p.factor.iter().map(|x| x.to_bits()).collect();
            v.push(p.bias.to_bits());
            v
        };
        // One scratch across models of different k and example sets of different sizes,
        // weights and orders: reuse must not leak one fit into the next.
        let mut scratch = TrainingScratch::default();
        let mut state = 99u64;
        let mut uniform = move || (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        for (k, items, n) in [
            (16, 200, 40),
            (3, 6, 3),
            (7, 50, 1),
            (16, 200, 60),
            (1, 4, 9),
        ] {
            let m = MatrixFactorization::initial(1, ids(items), k, 0.3, k as u64).unwrap();
            for round in 0..4 {
                let ex: Vec<Example> = (0..n)
                    .map(|j| Example {
                        item: (j * 37 + round * 11) % items,
                        target: 1.0 + 4.0 * uniform(),
                        weight: if round % 2 == 0 { 1.0 } else { 0.1 + uniform() },
                    })
                    .collect();
                let t = LocalTraining {
                    private_l2: if round == 3 { 0.0 } else { 0.5 + uniform() },
                    private_l2_per_example: 0.01 * round as f64,
                    bias_l2_ratio: 0.5 + uniform(),
                    ..LocalTraining::default()
                };
                let want = reference_fit(&m, &ex, &t);
                assert_eq!(
                    bits(&m.fit_private_with(&ex, &t, &mut scratch)),
                    bits(&want)
                );
                assert_eq!(bits(&m.fit_private(&ex, &t)), bits(&want));
                let t = LocalTraining {
                    epochs: 1 + round as u32,
                    ..t
                };
                let dense_bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let want = reference_update(&m, &want, &ex, &t);
                let p = m.fit_private_with(&ex, &t, &mut scratch);
                let sparse = m.shared_update_sparse_with(&p, &ex, &t, &mut scratch);
                assert_eq!(dense_bits(&sparse.to_dense()), dense_bits(&want));
                assert_eq!(dense_bits(&m.shared_update(&p, &ex, &t)), dense_bits(&want));
            }
        }
    }

    #[test]
    fn loading_parameters_gives_the_model_built_from_them_and_refuses_bad_ones() {
        let mut m = MatrixFactorization::initial(1, ids(3), 2, 0.1, 1).unwrap();
        let params: Vec<f32> = (0..3 * 2 + 3 + 1).map(|i| 0.25 * i as f32 - 1.0).collect();
        m.load_parameters(7, &params).unwrap();
        let wide = |s: &[f32]| s.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let built = MatrixFactorization::new(
            7,
            ids(3),
            Array2::from_shape_vec((3, 2), wide(&params[..6])).unwrap(),
            Array1::from(wide(&params[6..9])),
            f64::from(params[9]),
        )
        .unwrap();
        assert_eq!(m, built);
        assert_eq!(m.item_index("i2"), Some(2));
        let before = m.clone();
        let err = m.load_parameters(8, &params[..9]).unwrap_err();
        assert_eq!(err.field, "parameters");
        for (at, field) in [
            (3, "items[1].factors"),
            (7, "items[1].bias"),
            (9, "global_offset"),
        ] {
            let mut bad = params.clone();
            bad[at] = f32::NAN;
            assert_eq!(m.load_parameters(8, &bad).unwrap_err().field, field);
            bad[at] = f32::INFINITY;
            assert_eq!(m.load_parameters(8, &bad).unwrap_err().field, field);
        }
        assert_eq!(m, before, "a refused load changes nothing");
    }

    #[test]
    fn the_ridge_fit_satisfies_its_normal_equations() {
        let m = MatrixFactorization::initial(1, ids(6), 3, 0.5, 7).unwrap();
        let ex = examples();
        let t = LocalTraining::default();
        let p = m.fit_private(&ex, &t);
        // Gradient of Σ w (y − x·w)² / 2 + λ/2 |w|² must vanish.
        let mut grad = [0.0; 4];
        for e in &ex {
            let mut x = m.row(e.item).to_vec();
            x.push(1.0);
            let y = e.target - m.offset - m.biases[e.item];
            let mut w = p.factor.clone();
            w.push(p.bias);
            let r = y - dot(&x, &w);
            for i in 0..4 {
                grad[i] += e.weight * r * x[i];
            }
        }
        for i in 0..4 {
            let wi = if i < 3 { p.factor[i] } else { p.bias };
            assert!((grad[i] - t.private_l2 * wi).abs() < 1e-10, "{grad:?}");
        }
    }

    #[test]
    fn the_per_example_and_bias_regularisation_enter_the_normal_equations() {
        let m = MatrixFactorization::initial(1, ids(6), 3, 0.5, 7).unwrap();
        let ex = examples();
        let t = LocalTraining {
            private_l2: 0.5,
            private_l2_per_example: 0.2,
            bias_l2_ratio: 0.3,
            ..LocalTraining::default()
        };
        let p = m.fit_private(&ex, &t);
        // λ_u = 0.5 + 0.2 · (1 + 1 + 0.5); the bias's penalty is 0.3 λ_u.
        let lambda = 0.5 + 0.2 * 2.5;
        let mut grad = [0.0; 4];
        for e in &ex {
            let mut x = m.row(e.item).to_vec();
            x.push(1.0);
            let y = e.target - m.offset - m.biases[e.item];
            let mut w = p.factor.clone();
            w.push(p.bias);
            let r = y - dot(&x, &w);
            for i in 0..4 {
                grad[i] += e.weight * r * x[i];
            }
        }
        for i in 0..3 {
            assert!((grad[i] - lambda * p.factor[i]).abs() < 1e-10, "{grad:?}");
        }
        assert!((grad[3] - 0.3 * lambda * p.bias).abs() < 1e-10, "{grad:?}");
        // The item bias's decay in the shared update is β ρ.
        let q = UserState {
            factor: vec![0.0; 3],
            bias: 0.0,
        };
        let one = [Example {
            item: 2,
            target: 3.0,
            weight: 1.0,
        }];
        let mut biased = m.clone();
        biased.biases[2] = 1.0;
        let update = biased.shared_update(&q, &one, &t);
        let e = 3.0 - (3.0 + 1.0);
        assert!((update[18 + 2] - 0.05 * (e - 0.3 * 0.01 * 1.0)).abs() < 1e-15);
        assert!(
            LocalTraining {
                bias_l2_ratio: f64::NAN,
                ..t
            }
            .validate()
            .unwrap_err()
            .field
                == "bias_l2_ratio"
        );
        assert!(
            LocalTraining {
                private_l2_per_example: -1.0,
                ..t
            }
            .validate()
            .unwrap_err()
            .field
                == "private_l2_per_example"
        );
    }

    #[test]
    fn the_update_is_dense_in_shape_and_zero_on_untouched_items() {
        let m = MatrixFactorization::initial(1, ids(6), 3, 0.5, 7).unwrap();
        let (_, update) = local_round(&m, &examples(), &LocalTraining::default());
        assert_eq!(update.len(), m.layout().dimension());
        assert_eq!(update.len(), 6 * 3 + 6 + 1);
        for untouched in [0, 2, 5] {
            assert!(
                update[untouched * 3..untouched * 3 + 3]
                    .iter()
                    .all(|&x| x == 0.0)
            );
            assert_eq!(update[18 + untouched], 0.0);
        }
        assert!(update[3..6].iter().any(|&x| x != 0.0));
        assert_ne!(update[24], 0.0);
    }

    #[test]
    fn one_epoch_matches_the_workload_formulas_written_out_by_hand() {
        let m = MatrixFactorization::initial(1, ids(5), 2, 0.3, 3).unwrap();
        let ex = [Example {
            item: 2,
            target: 4.0,
            weight: 1.0,
        }];
        let t = LocalTraining::default();
        let p = UserState {
            factor: vec![0.5, -0.25],
            bias: 0.1,
        };
        let update = m.shared_update(&p, &ex, &t);
        let v = m.row(2);
        let e = 4.0 - (3.0 + 0.0 + 0.1 + v[0] * 0.5 - v[1] * 0.25);
        assert!((update[4] - 0.05 * (e * 0.5 - 0.01 * v[0])).abs() < 1e-15);
        assert!((update[5] - 0.05 * (e * -0.25 - 0.01 * v[1])).abs() < 1e-15);
        assert!((update[10 + 2] - 0.05 * e).abs() < 1e-15);
        assert!((update[15] - 0.05 * e).abs() < 1e-15);
    }

    #[test]
    fn applying_rounds_of_updates_lowers_the_users_error() {
        let mut m = MatrixFactorization::initial(1, ids(20), 4, 0.1, 11).unwrap();
        let ex: Vec<Example> = (0..10)
            .map(|j| Example {
                item: j,
                target: if j % 2 == 0 { 5.0 } else { 1.0 },
                weight: 1.0,
            })
            .collect();
        let t = LocalTraining::default();
        let sse = |m: &MatrixFactorization| {
            let p = m.fit_private(&ex, &t);
            ex.iter()
                .map(|e| (m.predict(&p, e.item) - e.target).powi(2))
                .sum::<f64>()
        };
        let before = sse(&m);
        for _ in 0..50 {
            let (_, u) = local_round(&m, &ex, &t);
            m.apply_update(&u, 1.0).unwrap();
        }
        assert!(sse(&m) < 0.5 * before, "{} vs {before}", sse(&m));
    }

    #[test]
    fn the_json_form_round_trips_and_bad_rows_are_named() {
        let m = MatrixFactorization::initial(4, ids(3), 2, 0.1, 1).unwrap();
        assert_eq!(MatrixFactorization::from_json(&m.to_json()).unwrap(), m);
        let mut bad = m.to_json();
        bad["items"][1]["factors"] = json!([1.0]);
        let err = MatrixFactorization::from_json(&bad).unwrap_err();
        assert_eq!(err.field, "items[1].factors");
        let mut dup = m.to_json();
        dup["items"][2]["item"] = json!("i0");
        assert_eq!(
            MatrixFactorization::from_json(&dup).unwrap_err().field,
            "items[2].item"
        );
    }

    #[test]
    fn a_singular_system_without_regularisation_still_solves() {
        let m = MatrixFactorization::new(1, ids(2), Array2::zeros((2, 2)), Array1::zeros(2), 3.0)
            .unwrap();
        let t = LocalTraining {
            private_l2: 0.0,
            ..LocalTraining::default()
        };
        let p = m.fit_private(
            &examples()[..1]
                .iter()
                .map(|e| Example { item: 0, ..*e })
                .collect::<Vec<_>>(),
            &t,
        );
        assert!(p.bias.is_finite() && p.factor.iter().all(|x| x.is_finite()));
    }
}
