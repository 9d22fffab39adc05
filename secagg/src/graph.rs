//! The masking graph and the choice of its degree k and the Shamir threshold t.
//!
//! # Graphs
//! - [`Graph::Complete`]: SecAgg (Bonawitz et al. 2017): every participant masks with, and
//!   shares its secrets among, all the others. Cost O(n) per device.
//! - [`Graph::Harary`]: SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova 2020): the Harary
//!   graph H(n, k) — each node joined to the k/2 nearest on each side of a cycle — over a
//!   uniformly random order of the participants drawn from a public 32-byte seed. By
//!   symmetry each participant's k neighbours are a uniformly random k-subset of the others.
//!   Cost O(k) = O(log n) per device.
//!
//! # Choosing k and t ([`SecAggParams::choose`])
//! For a cohort of n, a drop-out rate δ and a corruption rate γ (the fractions of devices that
//! may drop before unmasking, and that collude with the server), we take the smallest even k
//! and, for it, the smallest t meeting, with σ = 40 security bits and η = 20 correctness bits:
//! 1. *Secrecy of every honest device's shares*: its corrupted neighbours, a hypergeometric
//!    count of mean γk, reach t with probability ≤ exp(−k·D(t/k ‖ γ)) (Chernoff–Hoeffding,
//!    which holds for sampling without replacement, Hoeffding 1963 §6), required ≤ 2^−σ/n.
//! 2. *Majority*: t > k/2, so no two disjoint sets of t neighbours exist.
//! 3. *Correctness*: a device's neighbours that survive to unmasking fall below t with
//!    probability ≤ exp(−k·D((t−1)/k ‖ 1−δ)), required ≤ 2^−η/n.
//! 4. *No partial sums*: the server learns only the sum over each connected component of the
//!    graph on honest survivors. In H(n, k) over a random order that graph is connected unless
//!    k/2 consecutive nodes of the order are all corrupted or dropped; a union bound over the n
//!    starting points gives ≤ n·(γ + δ)^(k/2), required ≤ 2^−σ.
//!
//! The seed must be one the server cannot grind: a server free to try seeds could pick a graph
//! whose neighbourhoods suit colluding devices. Derive it from values fixed before the cohort
//! is known (e.g. a hash of the run id and round number).
//!
//! These are the conditions of Bell et al. (Sec. 3–4), evaluated with the bounds above rather
//! than the paper's asymptotic constants. If no k < n − 1 meets them the complete graph is
//! used (small cohorts), with t from 1–2 and the correctness bound of 3 reported as it is.

use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rand_core::Rng;
use serde::{Deserialize, Serialize};

use crate::SecAggError;

/// Statistical security parameter σ (bits) of [`SecAggParams::choose`].
pub const SECURITY_BITS: f64 = 40.0;
/// Correctness parameter η (bits) of [`SecAggParams::choose`].
pub const CORRECTNESS_BITS: f64 = 20.0;

/// Who masks with whom. Participants are numbered 1..=n.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Graph {
    /// Everyone with everyone (SecAgg).
    Complete,
    /// The Harary graph H(n, degree) over a random order drawn from `seed` (SecAgg+).
    Harary {
        /// k, even, at least 2.
        degree: u32,
        /// The public seed of the order.
        seed: [u8; 32],
    },
}

impl Graph {
    /// Every participant's neighbours (sorted), for a cohort of n: `result[i − 1]` is the
    /// neighbourhood of participant i.
    pub fn neighbourhoods(&self, n: u32) -> Result<Vec<Vec<u32>>, SecAggError> {
        self.check(n)?;
        match *self {
            Graph::Complete => Ok((1..=n)
                .map(|i| (1..=n).filter(|&j| j != i).collect())
                .collect()),
            Graph::Harary { degree, seed } => {
                let order = random_order(n, &seed);
                let mut out = vec![Vec::new(); n as usize];
                for (pos, &node) in order.iter().enumerate() {
                    out[node as usize - 1] = harary_around(&order, pos, degree);
                }
                Ok(out)
            }
        }
    }

    /// Participant i's neighbours (sorted), for a cohort of n, without building the others'
    /// (what a device checks its key directory against).
    pub fn neighbours_of(&self, n: u32, i: u32) -> Result<Vec<u32>, SecAggError> {
        self.check(n)?;
        if i == 0 || i > n {
            return Err(SecAggError::InvalidParameter(format!(
                "participant {i} is outside 1..={n}"
            )));
        }
        match *self {
            Graph::Complete => Ok((1..=n).filter(|&j| j != i).collect()),
            Graph::Harary { degree, seed } => {
                let order = random_order(n, &seed);
                let pos = order
                    .iter()
                    .position(|&x| x == i)
                    .expect("a permutation of 1..=n");
                Ok(harary_around(&order, pos, degree))
            }
        }
    }

    fn check(&self, n: u32) -> Result<(), SecAggError> {
        if n < 2 {
            return Err(SecAggError::InvalidParameter(format!(
                "a cohort of {n} cannot aggregate securely: at least 2 participants are needed"
            )));
        }
        if let Graph::Harary { degree, .. } = *self
            && (degree < 2 || degree % 2 != 0 || degree >= n - 1)
        {
            return Err(SecAggError::InvalidParameter(format!(
                "Harary degree {degree} for a cohort of {n}: it must be even, ≥ 2 and \
                 below n − 1 (use the complete graph otherwise)"
            )));
        }
        Ok(())
    }
}

/// The k/2 nodes on each side of position `pos` in the cyclic order, sorted.
fn harary_around(order: &[u32], pos: usize, degree: u32) -> Vec<u32> {
    let n = order.len();
    let half = degree as usize / 2;
    let mut list = Vec::with_capacity(degree as usize);
    for step in 1..=half {
        list.push(order[(pos + step) % n]);
        list.push(order[(pos + n - step) % n]);
    }
    list.sort_unstable();
    list.dedup();
    list
}

/// A uniformly random order of 1..=n from the seed (Fisher–Yates with unbiased draws).
fn random_order(n: u32, seed: &[u8; 32]) -> Vec<u32> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut order: Vec<u32> = (1..=n).collect();
    for i in (1..order.len()).rev() {
        let bound = i as u64 + 1;
        let zone = u64::MAX - u64::MAX % bound;
        let j = loop {
            let x = rng.next_u64();
            if x < zone {
                break (x % bound) as usize;
            }
        };
        order.swap(i, j);
    }
    order
}

/// The graph degree and threshold for a round, with the bounds they were chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// Cohort size n.
    pub cohort_size: u32,
    /// Neighbours per participant: k, or n − 1 for the complete graph.
    pub degree: u32,
    /// Shamir threshold t: shares needed to reconstruct a participant's secret.
    pub threshold: u32,
    /// Whether k = n − 1 (SecAgg) rather than a Harary graph (SecAgg+).
    pub complete: bool,
    /// log₂ of the bound on a device's shares being reconstructible by colluders (condition 1,
    /// summed over the cohort).
    pub log2_secrecy_failure: f64,
    /// log₂ of the bound on the round failing for lack of surviving share holders
    /// (condition 3, summed over the cohort).
    pub log2_correctness_failure: f64,
    /// log₂ of the bound on the honest survivors' graph being disconnected (condition 4; −∞
    /// for the complete graph).
    pub log2_disconnection: f64,
}

/// Kullback–Leibler divergence D(a ‖ p) of Bernoulli distributions, in nats.
fn kl(a: f64, p: f64) -> f64 {
    let term = |x: f64, y: f64| if x == 0.0 { 0.0 } else { x * (x / y).ln() };
    term(a, p) + term(1.0 - a, 1.0 - p)
}

/// ln of the Chernoff–Hoeffding bound on P[X ≥ t], X a count among k with rate p.
fn ln_upper_tail(k: u32, p: f64, t: u32) -> f64 {
    let a = f64::from(t) / f64::from(k);
    if a <= p {
        0.0
    } else if p == 0.0 {
        f64::NEG_INFINITY
    } else {
        -f64::from(k) * kl(a, p)
    }
}

impl SecAggParams {
    /// Chooses k and t for a cohort of n with drop-out rate δ and corruption rate γ (see the
    /// module docs). Errors if the rates are out of range or no threshold keeps shares secret.
    pub fn choose(
        cohort_size: u32,
        dropout_rate: f64,
        corruption_rate: f64,
    ) -> Result<Self, SecAggError> {
        let n = cohort_size;
        if n < 3 {
            return Err(SecAggError::InvalidParameter(format!(
                "cohort_size = {n}: secure aggregation needs at least 3 devices"
            )));
        }
        for (name, v) in [
            ("dropout_rate", dropout_rate),
            ("corruption_rate", corruption_rate),
        ] {
            if !(0.0..0.5).contains(&v) {
                return Err(SecAggError::InvalidParameter(format!(
                    "{name} = {v}: must be in [0, 0.5)"
                )));
            }
        }
        if dropout_rate + corruption_rate >= 0.5 {
            return Err(SecAggError::InvalidParameter(format!(
                "dropout_rate + corruption_rate = {}: must be below 0.5",
                dropout_rate + corruption_rate
            )));
        }
        let ln2 = std::f64::consts::LN_2;
        let ln_n = f64::from(n).ln();
        let secrecy_target = -SECURITY_BITS * ln2 - ln_n;
        let correctness_target = -CORRECTNESS_BITS * ln2 - ln_n;
        let evaluate = |k: u32| -> Option<(u32, f64, f64)> {
            let mut t = k / 2 + 1;
            while t <= k && ln_upper_tail(k, corruption_rate, t) > secrecy_target {
                t += 1;
            }
            if t > k {
                return None;
            }
            // Survivors < t ⇔ dropped ≥ k − t + 1.
            let correctness = ln_upper_tail(k, dropout_rate, k - t + 1);
            Some((t, ln_upper_tail(k, corruption_rate, t), correctness))
        };
        let mut k = 2;
        while k < n - 1 {
            let disconnection = ln_n + f64::from(k / 2) * (dropout_rate + corruption_rate).ln();
            if disconnection <= -SECURITY_BITS * ln2
                && let Some((t, secrecy, correctness)) = evaluate(k)
                && correctness <= correctness_target
            {
                return Ok(Self {
                    cohort_size: n,
                    degree: k,
                    threshold: t,
                    complete: false,
                    log2_secrecy_failure: (secrecy + ln_n) / ln2,
                    log2_correctness_failure: (correctness + ln_n) / ln2,
                    log2_disconnection: disconnection / ln2,
                });
            }
            k += 2;
        }
        let k = n - 1;
        let (t, secrecy, correctness) = evaluate(k).ok_or_else(|| {
            SecAggError::InvalidParameter(format!(
                "no threshold keeps shares secret for a cohort of {n} at corruption rate \
                 {corruption_rate}"
            ))
        })?;
        Ok(Self {
            cohort_size: n,
            degree: k,
            threshold: t,
            complete: true,
            log2_secrecy_failure: (secrecy + ln_n) / ln2,
            log2_correctness_failure: (correctness + ln_n).min(0.0) / ln2,
            log2_disconnection: f64::NEG_INFINITY,
        })
    }

    /// The graph these parameters call for, with `seed` for the Harary graph's order.
    pub fn graph(&self, seed: [u8; 32]) -> Graph {
        if self.complete {
            Graph::Complete
        } else {
            Graph::Harary {
                degree: self.degree,
                seed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_neighbourhoods_are_symmetric_and_of_degree_k() {
        let g = Graph::Harary {
            degree: 6,
            seed: [3; 32],
        };
        let hoods = g.neighbourhoods(40).unwrap();
        for (i, hood) in hoods.iter().enumerate() {
            let me = i as u32 + 1;
            assert_eq!(hood.len(), 6);
            assert!(!hood.contains(&me));
            for &j in hood {
                assert!(hoods[j as usize - 1].contains(&me));
            }
        }
        for i in [1, 17, 40] {
            assert_eq!(g.neighbours_of(40, i).unwrap(), hoods[i as usize - 1]);
        }
        // A different seed, a different graph.
        let other = Graph::Harary {
            degree: 6,
            seed: [4; 32],
        }
        .neighbourhoods(40)
        .unwrap();
        assert_ne!(hoods, other);
    }

    #[test]
    fn small_cohorts_use_the_complete_graph_and_large_ones_a_logarithmic_degree() {
        let small = SecAggParams::choose(50, 0.3, 0.0).unwrap();
        assert!(small.complete && small.degree == 49 && small.threshold == 25);
        let large = SecAggParams::choose(1000, 0.1, 0.1).unwrap();
        assert!(!large.complete, "{large:?}");
        assert!(
            large.degree < 200 && large.threshold > large.degree / 2,
            "{large:?}"
        );
        assert!(large.log2_secrecy_failure <= -SECURITY_BITS + 1e-9);
        assert!(large.log2_correctness_failure <= -CORRECTNESS_BITS + 1e-9);
        let larger = SecAggParams::choose(100_000, 0.1, 0.1).unwrap();
        assert!(
            larger.degree > large.degree && larger.degree < 2 * large.degree,
            "{larger:?}"
        );
    }

    #[test]
    fn bad_rates_are_refused_by_name() {
        let e = SecAggParams::choose(100, 0.6, 0.0).unwrap_err();
        assert!(e.to_string().contains("dropout_rate"), "{e}");
        let e = SecAggParams::choose(100, 0.3, 0.3).unwrap_err();
        assert!(e.to_string().contains("below 0.5"), "{e}");
    }
}
