//! Global model versions: the shared parameters of the matrix-factorisation model as a flat
//! `f32` vector, and their encoding as a `fedpref.v1.ModelSnapshot` (what `DownloadModel`
//! streams and what the store keeps for rollback).
//!
//! Layout of the flat vector: item factors V (items × k, row-major), then item biases
//! (items), then the global offset (1).

use fedpref_proto::prost::Message;
use fedpref_proto::v1::{ModelSnapshot, NamedTensor};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};

use crate::manifest::ModelSpec;

/// Tensor names in a snapshot and an update, as the protocol defines them.
pub use fedpref_proto::tensor_names::{GLOBAL_OFFSET, ITEM_FACTORS};
/// Item biases.
pub const ITEM_BIAS: &str = fedpref_proto::tensor_names::ITEM_BIASES;

/// A model version as stored: its number (from 1; the initial model is version 1), the
/// encoded snapshot and the snapshot's SHA-256.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelBlob {
    /// The version number (1 is the initial model).
    pub version: u64,
    /// The encoded `ModelSnapshot`.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, hex.
    pub sha256: String,
}

/// A model that cannot be decoded or does not match its spec.
#[derive(Debug, thiserror::Error)]
#[error("model version {version}: {problem}")]
pub struct ModelError {
    /// The version.
    pub version: u64,
    /// What is wrong.
    pub problem: String,
}

/// The initial parameters: V ~ N(0, init_scale²) from a seeded ChaCha20, biases 0, the
/// global offset from the spec.
pub fn initial_parameters(spec: &ModelSpec, seed: u64) -> Vec<f32> {
    let (items, k) = (spec.items as usize, spec.factors as usize);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, spec.init_scale).expect("init_scale is validated");
    let mut params: Vec<f32> = (0..items * k)
        .map(|_| normal.sample(&mut rng) as f32)
        .collect();
    params.extend(std::iter::repeat_n(0.0, items));
    params.push(spec.initial_offset as f32);
    params
}

/// Encodes parameters as a snapshot.
pub fn encode(
    run_id: &str,
    version: u64,
    round: u64,
    spec: &ModelSpec,
    params: &[f32],
) -> ModelBlob {
    let (items, k) = (spec.items as usize, spec.factors as usize);
    assert_eq!(
        params.len(),
        items * (k + 1) + 1,
        "parameters match the spec"
    );
    let tensor = |name: &str, shape: Vec<u64>, values: &[f32]| {
        NamedTensor::from_f32(name, shape, values).expect("shapes match by construction")
    };
    let snapshot = ModelSnapshot {
        run_id: run_id.to_string(),
        model_version: version,
        tensors: vec![
            tensor(
                ITEM_FACTORS,
                vec![items as u64, k as u64],
                &params[..items * k],
            ),
            tensor(
                ITEM_BIAS,
                vec![items as u64],
                &params[items * k..items * (k + 1)],
            ),
            tensor(GLOBAL_OFFSET, vec![], &params[items * (k + 1)..]),
        ],
        produced_by_round: round,
        ..Default::default()
    };
    let bytes = snapshot.encode_to_vec();
    let sha256 = crate::hex(&Sha256::digest(&bytes));
    ModelBlob {
        version,
        bytes,
        sha256,
    }
}

/// Decodes a snapshot back into flat parameters, checking its hash and its shapes.
pub fn decode(blob: &ModelBlob, spec: &ModelSpec) -> Result<Vec<f32>, ModelError> {
    let bad = |problem: String| ModelError {
        version: blob.version,
        problem,
    };
    if crate::hex(&Sha256::digest(&blob.bytes)) != blob.sha256 {
        return Err(bad("its bytes do not match its SHA-256".into()));
    }
    let snapshot = ModelSnapshot::decode(blob.bytes.as_slice()).map_err(|e| bad(e.to_string()))?;
    let (items, k) = (spec.items, spec.factors);
    let mut params = Vec::with_capacity((items * (k + 1) + 1) as usize);
    for (name, shape) in [
        (ITEM_FACTORS, vec![items, k]),
        (ITEM_BIAS, vec![items]),
        (GLOBAL_OFFSET, vec![]),
    ] {
        let t = snapshot
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
        if t.shape != shape {
            return Err(bad(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        params.extend(t.to_f32_vec().map_err(|e| bad(e.to_string()))?);
    }
    Ok(params)
}

/// A model version's shared parameters as tensors, the shape in which a reader works with
/// them: V (items × k), b (one per item) and μ. The engine itself keeps the flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedModel {
    /// V: one row of k factors per item (row r is catalogue item r).
    pub item_factors: Array2<f32>,
    /// b: one bias per item.
    pub item_biases: Array1<f32>,
    /// μ, the global offset.
    pub global_offset: f32,
}

impl SharedModel {
    /// The tensors of a flat parameter vector laid out for `spec` (V, then b, then μ). The
    /// factors' storage is taken over without copying.
    pub fn from_parameters(spec: &ModelSpec, mut params: Vec<f32>) -> Result<Self, String> {
        let (items, k) = (spec.items as usize, spec.factors as usize);
        let want = items * (k + 1) + 1;
        if params.len() != want {
            return Err(format!(
                "{} parameters; {items} items with k = {k} need {want}",
                params.len()
            ));
        }
        let global_offset = params[want - 1];
        let item_biases = Array1::from(params[items * k..want - 1].to_vec());
        params.truncate(items * k);
        let item_factors = Array2::from_shape_vec((items, k), params).map_err(|e| e.to_string())?;
        Ok(Self {
            item_factors,
            item_biases,
            global_offset,
        })
    }

    /// The flat parameter vector (V row-major, b, μ), as [`encode`] takes it.
    pub fn to_parameters(&self) -> Vec<f32> {
        let mut params: Vec<f32> = self.item_factors.iter().copied().collect();
        params.extend(self.item_biases.iter().copied());
        params.push(self.global_offset);
        params
    }
}

/// [`decode`], as tensors.
pub fn decode_tensors(blob: &ModelBlob, spec: &ModelSpec) -> Result<SharedModel, ModelError> {
    let params = decode(blob, spec)?;
    SharedModel::from_parameters(spec, params).map_err(|problem| ModelError {
        version: blob.version,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            items: 5,
            factors: 3,
            init_scale: 0.1,
            initial_offset: 3.0,
        }
    }

    #[test]
    fn snapshot_round_trips_and_is_deterministic_per_seed() {
        let p = initial_parameters(&spec(), 7);
        assert_eq!(p, initial_parameters(&spec(), 7));
        assert_eq!(p.len(), 5 * 4 + 1);
        assert_eq!(*p.last().unwrap(), 3.0);
        let blob = encode("r", 1, 0, &spec(), &p);
        assert_eq!(decode(&blob, &spec()).unwrap(), p);
        let tensors = decode_tensors(&blob, &spec()).unwrap();
        let s = spec();
        assert_eq!(
            tensors.item_factors.dim(),
            (s.items as usize, s.factors as usize)
        );
        assert_eq!(tensors.item_biases.len(), s.items as usize);
        assert_eq!(tensors.item_factors[[1, 0]], p[s.factors as usize]);
        assert_eq!(tensors.global_offset, *p.last().unwrap());
        assert_eq!(tensors.to_parameters(), p);
        assert!(SharedModel::from_parameters(&s, p[1..].to_vec()).is_err());
    }

    #[test]
    fn corrupted_blob_is_refused() {
        let mut blob = encode("r", 1, 1, &spec(), &initial_parameters(&spec(), 1));
        blob.bytes[5] ^= 1;
        let err = decode(&blob, &spec()).unwrap_err().to_string();
        assert!(err.contains("SHA-256"), "{err}");
    }
}
