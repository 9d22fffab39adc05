//! What every participant and the server agree on before a round starts.

use serde::{Deserialize, Serialize};

use crate::encoding::{EncodingParams, FixedPoint};
use crate::graph::{Graph, SecAggParams};
use crate::{RoundContext, SecAggError};

/// The public parameters of one secure-aggregation round. The coordinator sends the same
/// config to every selected device with the task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Binds every key and ciphertext to this round.
    pub context: RoundContext,
    /// n: participants are numbered 1..=n.
    pub cohort_size: u32,
    /// Shamir threshold t.
    pub threshold: u32,
    /// The masking graph (complete, or Harary over a public seed).
    pub graph: Graph,
    /// The fewest masked inputs the server will unmask a sum of (m ≥ t): the sum of fewer is
    /// never revealed.
    pub min_contributors: u32,
    /// The checked fixed-point encoding.
    pub encoding: FixedPoint,
}

impl RoundConfig {
    /// Builds and checks a round's config: k and t from [`SecAggParams`], the graph's public
    /// seed, the encoding (whose overflow check runs here, for this cohort) and m.
    pub fn new(
        context: RoundContext,
        params: &SecAggParams,
        graph_seed: [u8; 32],
        encoding: EncodingParams,
        min_contributors: u32,
    ) -> Result<Self, SecAggError> {
        if encoding.cohort_size != params.cohort_size as usize {
            return Err(SecAggError::InvalidParameter(format!(
                "the encoding is checked for {} devices, the round has {}",
                encoding.cohort_size, params.cohort_size
            )));
        }
        let config = Self {
            context,
            cohort_size: params.cohort_size,
            threshold: params.threshold,
            graph: params.graph(graph_seed),
            min_contributors,
            encoding: FixedPoint::new(encoding)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants between the fields (a config received from elsewhere is checked
    /// with this before use).
    pub fn validate(&self) -> Result<(), SecAggError> {
        let n = self.cohort_size;
        let degree = match self.graph {
            Graph::Complete => n.saturating_sub(1),
            Graph::Harary { degree, .. } => degree,
        };
        if n < 3 {
            return Err(SecAggError::InvalidParameter(format!(
                "cohort_size = {n}: secure aggregation needs at least 3 devices"
            )));
        }
        if self.threshold < 2 || self.threshold > degree {
            return Err(SecAggError::InvalidParameter(format!(
                "threshold = {}: must be between 2 and the graph degree {degree}",
                self.threshold
            )));
        }
        if 2 * self.threshold <= degree {
            return Err(SecAggError::InvalidParameter(format!(
                "threshold = {}: must exceed half the graph degree {degree}",
                self.threshold
            )));
        }
        if self.min_contributors < self.threshold || self.min_contributors > n {
            return Err(SecAggError::InvalidParameter(format!(
                "min_contributors = {}: must be between the threshold {} and the cohort size {n}",
                self.min_contributors, self.threshold
            )));
        }
        if self.encoding.params().cohort_size < n as usize {
            return Err(SecAggError::InvalidParameter(format!(
                "the encoding's overflow check covers {} devices, the round has {n}",
                self.encoding.params().cohort_size
            )));
        }
        if let Graph::Harary { degree, .. } = self.graph
            && (degree < 2 || degree % 2 != 0 || degree >= n - 1)
        {
            return Err(SecAggError::InvalidParameter(format!(
                "Harary degree {degree} for a cohort of {n}: it must be even, ≥ 2 and below n − 1"
            )));
        }
        Ok(())
    }

    /// Coordinates per update.
    pub fn dimension(&self) -> usize {
        self.encoding.params().dimension
    }
}
