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
        self.values.iter().map(|x| x * x).sum::<f64>().sqrt()
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
    /// A model from its parts: `factors` is I × k row-major. Every number must be finite,
    /// item ids unique and non-empty.
    pub fn new(
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
        Self::new(
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

    /// V, I × k row-major.
    pub fn item_factors(&self) -> &[f64] {
        &self.factors
    }

    /// b, one per item.
    pub fn item_biases(&self) -> &[f64] {
        &self.biases
    }

    /// μ.
    pub fn global_offset(&self) -> f64 {
        self.offset
    }

    fn row(&self, j: usize) -> &[f64] {
        &self.factors[j * self.k..(j + 1) * self.k]
    }

    /// The local epochs on the touched rows only: the new rows of V (in example order,
    /// k each), the new item biases (in example order) and the new global offset. The
    /// shared update is their difference from the downloaded values; every other
    /// coordinate's update is exactly 0.
    fn touched_rows(
        &self,
        private: &UserState,
        examples: &[Example],
        training: &LocalTraining,
    ) -> (Vec<f64>, Vec<f64>, f64) {
        let k = self.k;
        let mut rows: Vec<f64> = examples
            .iter()
            .flat_map(|e| self.row(e.item).iter().copied())
            .collect();
        let mut biases: Vec<f64> = examples.iter().map(|e| self.biases[e.item]).collect();
        let mut mu = self.offset;
        let total_weight: f64 = examples.iter().map(|e| e.weight).sum();
        let (lr, reg) = (training.learning_rate, training.l2_regularization);
        let bias_reg = reg * training.bias_l2_ratio;
        let mut errors = vec![0.0; examples.len()];
        for _ in 0..training.epochs {
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
        (rows, biases, mu)
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
        let (rows, biases, mu) = self.touched_rows(private, examples, training);
        // Sorted by item; with a repeated item the last example wins, as in the dense update.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| (examples[i].item, std::cmp::Reverse(i)));
        order.dedup_by_key(|i| examples[*i].item);
        let nnz = order.len() * (k + 1) + 1;
        let mut indices = Vec::with_capacity(nnz);
        let mut values = Vec::with_capacity(nnz);
        for &i in &order {
            let item = examples[i].item;
            let old = self.row(item);
            for c in 0..k {
                indices.push((item * k + c) as u32);
                values.push(rows[i * k + c] - old[c]);
            }
        }
        for &i in &order {
            let item = examples[i].item;
            indices.push((n * k + item) as u32);
            values.push(biases[i] - self.biases[item]);
        }
        indices.push((n * k + n) as u32);
        values.push(mu - self.offset);
        SparseUpdate {
            dimension,
            indices,
            values,
        }
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
        Self::new(version, ids, k, factors, biases, offset)
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

/// Solves A x = b for symmetric positive-definite A (d × d, row-major) by Cholesky, in
/// place: on return `b` holds x. Returns false if A is not positive definite.
fn solve_spd(a: &mut [f64], b: &mut [f64], d: usize) -> bool {
    for j in 0..d {
        let mut s = a[j * d + j];
        for p in 0..j {
            s -= a[j * d + p] * a[j * d + p];
        }
        if s <= 0.0 || !s.is_finite() {
            return false;
        }
        let l = s.sqrt();
        a[j * d + j] = l;
        for i in j + 1..d {
            let mut s = a[i * d + j];
            for p in 0..j {
                s -= a[i * d + p] * a[j * d + p];
            }
            a[i * d + j] = s / l;
        }
    }
    for i in 0..d {
        let mut s = b[i];
        for p in 0..i {
            s -= a[i * d + p] * b[p];
        }
        b[i] = s / a[i * d + i];
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
        let k = self.k;
        let d = k + 1;
        if examples.is_empty() {
            return UserState {
                factor: vec![0.0; k],
                bias: 0.0,
            };
        }
        let mut a = vec![0.0; d * d];
        let mut rhs = vec![0.0; d];
        let mut x = vec![1.0; d];
        for e in examples {
            x[..k].copy_from_slice(self.row(e.item));
            let y = e.target - self.offset - self.biases[e.item];
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
        let mut jitter = training.private_lambda(total_weight);
        loop {
            let mut m = a.clone();
            for i in 0..k {
                m[i * d + i] += jitter;
            }
            m[k * d + k] += jitter * training.bias_l2_ratio;
            let mut w = rhs.clone();
            if solve_spd(&mut m, &mut w, d) {
                let bias = w.pop().expect("d ≥ 2");
                return UserState { factor: w, bias };
            }
            // Only reachable with λ_u = 0 and a singular system: regularise minimally.
            jitter = if jitter == 0.0 { 1e-9 } else { jitter * 10.0 };
        }
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
        let (rows, biases, mu) = self.touched_rows(private, examples, training);
        for (i, e) in examples.iter().enumerate() {
            let old = self.row(e.item);
            for c in 0..k {
                update[e.item * k + c] = rows[i * k + c] - old[c];
            }
            update[n * k + e.item] = biases[i] - self.biases[e.item];
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
        let m = MatrixFactorization::new(1, ids(2), 2, vec![0.0; 4], vec![0.0; 2], 3.0).unwrap();
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
