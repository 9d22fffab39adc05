//! DP-FTRL's tree aggregation and its accountant under participation limits, after Kairouz,
//! McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep) Learning without
//! Sampling or Shuffling" (ICML; arXiv:2103.00039), Sec. 3–4 and Appendix D.
//!
//! # The mechanism
//! Round r (r = 1, 2, …) produces a sum of clipped updates x_r (each device's update clipped
//! to L2 norm C, weight ≤ 1). The server wants the prefix sums s_t = x_1 + … + x_t. The
//! binary-tree mechanism keeps one noisy value per **node**, a dyadic block of rounds
//! [j·2ˡ + 1, (j+1)·2ˡ]: the node's exact sum plus fresh N(0, (σC)²) on every coordinate. The
//! release at round t is the sum of the nodes in t's binary decomposition (one node per set
//! bit of t), so its noise has variance popcount(t)·(σC)² ≤ (⌊log₂ t⌋ + 1)·(σC)² per
//! coordinate, and every release is post-processing of the noisy nodes.
//!
//! **Restarts** ([`TreeSchedule::restart_every`]): a new tree starts every R rounds; the
//! prefix sum carries over the last release of the finished trees. With **tree completion**
//! (the paper's "tree completion trick") the last round of a tree of R rounds is
//! released as the root of the tree padded with empty rounds to 2^⌈log₂ R⌉ leaves: one node,
//! so the carried-over value has the noise of a single node.
//!
//! # Neighbouring relation and sensitivity
//! Add/remove-one **device**: the two runs differ by one device's whole participation
//! sequence, i.e. by its clipped contributions in every round it took part in. If the
//! device took part in the set of rounds S, node ν changes by Σ_{r ∈ S∩ν} (its update in r),
//! whose norm is at most |S∩ν|·C, with equality when all its updates point the same way. All
//! nodes together are one Gaussian mechanism with noise σC per coordinate, so its L2
//! sensitivity is
//!
//! Δ² = C² · max_S Σ_ν |S ∩ ν|²,
//!
//! the maximum over every participation pattern S the [`ParticipationLimits`] allow, and ν
//! over every node of every tree (all dyadic blocks of rounds that fit in a tree; with
//! completion, those of the padded tree). That is Appendix D.2's quantity; it is computed
//! exactly here by dynamic programming over the trees ([`TreeAccountant::sensitivity_squared`]).
//! The release is then ρ-zCDP with ρ = Δ²/(2σ²C²) = max_S Σ_ν |S∩ν|² / (2σ²), and
//! (α, αρ)-RDP at every order α > 1. Restarted trees compose by adding their nodes to the
//! same sum (one worst-case pattern spans all trees). Since the mechanism is exactly a
//! Gaussian mechanism with sensitivity-to-noise ratio μ = √(2ρ), its (ε, δ) is computed
//! exactly (Balle & Wang 2018, Thm. 8) rather than through an RDP bound.
//!
//! The charge counts every dyadic node of each tree, used by a release or not, as the paper
//! and its reference implementation do; the plain binary decomposition uses a subset of them,
//! so for it the charge is an upper bound.
//!
//! # Participation assumption
//! The ε holds only if each device takes part **at most once every `min_separation` rounds**
//! (two participations in rounds r < r' need r' − r ≥ `min_separation`) and **at most
//! `max_participations` times** in all. No sampling is assumed: devices may arrive whenever
//! they like, and the adversary may pick the worst allowed pattern. The engine that hands
//! out tasks must enforce both limits; [`ParticipationLimits::assumption`] is the sentence the
//! ledger and report print.
//!
//! # Floating-point safety
//! As in [`crate::noise`], values live on the mechanism's lattice: the round sums are exact
//! lattice sums ([`ClippedSum`]), node noises are integer numbers of lattice steps drawn by
//! the sampler, and each release is one integer vector times the step.
//!
//! # Not covered
//! Distributed mode (noise added by devices under secure aggregation) needs each device to
//! add its share of every node's noise; this module adds the noise centrally. The
//! "efficient" estimator of Honaker 2015 (averaging all nodes that cover a prefix) is not
//! implemented; the accountant already charges every node it would use.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{ClippedSum, GaussianMechanism, GaussianSampler, Lattice, PrivacyError, Provenance};

/// How a device may take part over a run: at most once every `min_separation` rounds and at
/// most `max_participations` times. Deserialising checks the same ranges as
/// [`ParticipationLimits::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawLimits")]
pub struct ParticipationLimits {
    min_separation: u64,
    max_participations: u64,
}

#[derive(Deserialize)]
struct RawLimits {
    min_separation: u64,
    max_participations: u64,
}

impl TryFrom<RawLimits> for ParticipationLimits {
    type Error = PrivacyError;
    fn try_from(raw: RawLimits) -> Result<Self, PrivacyError> {
        Self::new(raw.min_separation, raw.max_participations)
    }
}

impl ParticipationLimits {
    /// Limits with `min_separation` ≥ 1 (1 allows consecutive rounds; s means rounds r and
    /// r + s may both be used, r + s − 1 may not) and `max_participations` ≥ 1.
    ///
    /// Note the convention: TensorFlow Privacy's `min_separation` counts the rounds strictly
    /// between two participations, i.e. it is this value minus one.
    pub fn new(min_separation: u64, max_participations: u64) -> Result<Self, PrivacyError> {
        if min_separation == 0 {
            return Err(PrivacyError::invalid(
                "min_separation",
                0.0,
                "must be at least 1 round (1 = consecutive rounds allowed)",
            ));
        }
        if max_participations == 0 {
            return Err(PrivacyError::invalid(
                "max_participations",
                0.0,
                "must be at least 1",
            ));
        }
        Ok(Self {
            min_separation,
            max_participations,
        })
    }

    /// Minimum number of rounds between two participations of one device.
    pub fn min_separation(&self) -> u64 {
        self.min_separation
    }

    /// Maximum number of participations of one device over the run.
    pub fn max_participations(&self) -> u64 {
        self.max_participations
    }

    /// Whether a device whose last participation was in `last_round` (if any), having taken
    /// part `participations` times, may take part in `round`. The engine's check.
    pub fn allows(&self, last_round: Option<u64>, participations: u64, round: u64) -> bool {
        participations < self.max_participations
            && last_round.is_none_or(|last| round >= last.saturating_add(self.min_separation))
    }

    /// The first round a device whose last participation was in `last_round` may take part
    /// in again (`None` if it has used all its participations).
    pub fn next_allowed_round(&self, last_round: Option<u64>, participations: u64) -> Option<u64> {
        if participations >= self.max_participations {
            return None;
        }
        Some(last_round.map_or(0, |last| last.saturating_add(self.min_separation)))
    }

    /// The assumption an ε under these limits rests on, for the ledger and the report:
    /// `participation limits (separation s, at most k)`.
    pub fn assumption(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ParticipationLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "participation limits (separation {}, at most {})",
            self.min_separation, self.max_participations
        )
    }
}

/// When the tree restarts, and whether a finished tree is completed. Deserialising refuses
/// `restart_every = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSchedule")]
pub struct TreeSchedule {
    restart_every: Option<u64>,
    completion: bool,
}

#[derive(Deserialize)]
struct RawSchedule {
    restart_every: Option<u64>,
    completion: bool,
}

impl TryFrom<RawSchedule> for TreeSchedule {
    type Error = PrivacyError;
    fn try_from(raw: RawSchedule) -> Result<Self, PrivacyError> {
        match raw.restart_every {
            None if raw.completion => Err(PrivacyError::Unsupported(
                "tree completion needs restarts (restart_every)",
            )),
            None => Ok(Self::single_tree()),
            Some(rounds) => Self::restart_every(rounds, raw.completion),
        }
    }
}

impl TreeSchedule {
    /// One tree for the whole run (the paper's DP-FTRL-NoTreeRestart).
    pub fn single_tree() -> Self {
        Self {
            restart_every: None,
            completion: false,
        }
    }

    /// A new tree every `rounds` rounds (DP-FTRL-TreeRestart, e.g. one tree per epoch), with
    /// or without tree completion.
    pub fn restart_every(rounds: u64, completion: bool) -> Result<Self, PrivacyError> {
        if rounds == 0 {
            return Err(PrivacyError::invalid(
                "restart_every",
                0.0,
                "a tree must span at least 1 round",
            ));
        }
        Ok(Self {
            restart_every: Some(rounds),
            completion,
        })
    }

    /// Rounds per tree, if the tree restarts.
    pub fn rounds_per_tree(&self) -> Option<u64> {
        self.restart_every
    }

    /// Whether finished trees are completed (released through the padded tree's root).
    pub fn completion(&self) -> bool {
        self.completion
    }

    /// The trees of a run of `rounds` rounds: (real rounds, leaves of the tree the nodes
    /// live in). A tree cut short by the end of the run is never completed.
    fn trees(&self, rounds: u64) -> Vec<(u64, u64)> {
        let Some(per_tree) = self.restart_every else {
            return vec![(rounds, rounds)];
        };
        let mut trees = Vec::new();
        let mut left = rounds;
        while left > 0 {
            let real = left.min(per_tree);
            let leaves = if self.completion && real == per_tree {
                real.next_power_of_two()
            } else {
                real
            };
            trees.push((real, leaves));
            left -= real;
        }
        trees
    }
}

impl fmt::Display for TreeSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.restart_every {
            None => f.write_str("single tree"),
            Some(r) if self.completion => write!(f, "tree restarted every {r} rounds, completed"),
            Some(r) => write!(f, "tree restarted every {r} rounds"),
        }
    }
}

/// The privacy of tree aggregation with noise multiplier σ, a restart schedule and
/// participation limits. See the [module documentation](self) for the neighbouring relation
/// (add/remove one device's whole participation sequence), the sensitivity and the proof.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TreeAccountant {
    noise_multiplier: f64,
    schedule: TreeSchedule,
    limits: ParticipationLimits,
}

/// What a run of tree aggregation has spent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TreeSpend {
    /// Rounds released.
    pub rounds: u64,
    /// max_S Σ_ν |S∩ν|²: the squared L2 sensitivity in units of C².
    pub sensitivity_squared: u64,
    /// ρ of ρ-zCDP (the RDP at order α is αρ).
    pub rho: f64,
    /// ε at `delta`, exact for the Gaussian mechanism with μ = √(2ρ).
    pub epsilon: f64,
    /// The δ of the statement.
    pub delta: f64,
    /// The assumption the statement rests on (see [`ParticipationLimits::assumption`]).
    pub assumption: String,
}

impl TreeAccountant {
    /// An accountant for node noise N(0, (σC)²) with σ = `noise_multiplier`.
    pub fn new(
        noise_multiplier: f64,
        schedule: TreeSchedule,
        limits: ParticipationLimits,
    ) -> Result<Self, PrivacyError> {
        Ok(Self {
            noise_multiplier: check::positive("noise_multiplier", noise_multiplier)?,
            schedule,
            limits,
        })
    }

    /// σ.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The restart schedule.
    pub fn schedule(&self) -> TreeSchedule {
        self.schedule
    }

    /// The participation limits the guarantee assumes.
    pub fn limits(&self) -> ParticipationLimits {
        self.limits
    }

    /// max over allowed participation patterns S within rounds 1..=`rounds` of Σ_ν |S∩ν|²,
    /// over every node ν of every tree. Exact (dynamic programming over the trees; see
    /// [`worst_case_sensitivity_squared`]).
    pub fn sensitivity_squared(&self, rounds: u64) -> u64 {
        worst_case_sensitivity_squared(self.schedule, self.limits, rounds)
    }

    /// ρ of ρ-zCDP after `rounds` rounds: sensitivity² / (2σ²).
    pub fn rho(&self, rounds: u64) -> f64 {
        self.sensitivity_squared(rounds) as f64 / (2.0 * self.noise_multiplier.powi(2))
    }

    /// RDP at `order` > 1 after `rounds` rounds: order·ρ.
    pub fn rdp(&self, order: f64, rounds: u64) -> Result<f64, PrivacyError> {
        if !(order > 1.0 && order.is_finite()) {
            return Err(PrivacyError::invalid(
                "order",
                order,
                "must be a finite number greater than 1",
            ));
        }
        Ok(order * self.rho(rounds))
    }

    /// (ε, δ) after `rounds` rounds, with the assumption it rests on.
    pub fn spend(&self, rounds: u64, delta: f64) -> Result<TreeSpend, PrivacyError> {
        let sensitivity_squared = self.sensitivity_squared(rounds);
        let rho = sensitivity_squared as f64 / (2.0 * self.noise_multiplier.powi(2));
        Ok(TreeSpend {
            rounds,
            sensitivity_squared,
            rho,
            epsilon: epsilon_from_zcdp_gaussian(rho, delta)?,
            delta,
            assumption: self.limits.assumption(),
        })
    }

    /// The smallest σ (to a relative 1e-9) for which `rounds` rounds cost at most
    /// `target_epsilon` at `delta`.
    pub fn calibrate_noise_multiplier(
        schedule: TreeSchedule,
        limits: ParticipationLimits,
        rounds: u64,
        target_epsilon: f64,
        delta: f64,
    ) -> Result<f64, PrivacyError> {
        let target_epsilon = check::positive("target_epsilon", target_epsilon)?;
        let delta = check::delta(delta)?;
        let sensitivity_squared = worst_case_sensitivity_squared(schedule, limits, rounds);
        if sensitivity_squared == 0 {
            return Err(PrivacyError::Calibration(
                "no round is released, so any noise multiplier meets the target",
            ));
        }
        // The largest μ whose ε(δ) is at most the target; σ = √(sensitivity²)/μ.
        let (mut low, mut high) = (0.0f64, 1.0f64);
        while gaussian_delta(high, target_epsilon) < delta {
            high *= 2.0;
            if high > 1e6 {
                return Err(PrivacyError::Calibration(
                    "the target ε is unboundedly large",
                ));
            }
        }
        for _ in 0..200 {
            let mid = 0.5 * (low + high);
            if gaussian_delta(mid, target_epsilon) <= delta {
                low = mid;
            } else {
                high = mid;
            }
            if high - low <= 1e-12 * high {
                break;
            }
        }
        if low == 0.0 {
            return Err(PrivacyError::Calibration(
                "the target ε is too small for this δ",
            ));
        }
        Ok((sensitivity_squared as f64).sqrt() / low)
    }
}

/// δ(ε) of the Gaussian mechanism whose sensitivity is μ noise standard deviations, exact
/// (Balle & Wang 2018, Thm. 8): Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2).
pub fn gaussian_delta(mu: f64, epsilon: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    let first = ln_normal_cdf(-epsilon / mu + mu / 2.0).exp();
    let second = (epsilon + ln_normal_cdf(-epsilon / mu - mu / 2.0)).exp();
    (first - second).max(0.0)
}

/// ln Φ(x), accurate far into the lower tail (where Φ underflows but e^ε·Φ does not).
fn ln_normal_cdf(x: f64) -> f64 {
    if x > -20.0 {
        return (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln();
    }
    // Φ(x) = φ(x)/|x| · (1 − 1/x² + 3/x⁴ − 15/x⁶ + 105/x⁸ − 945/x¹⁰ + …); the next term is
    // below 1e-10 relative for x ≤ −20.
    let inv = 1.0 / (x * x);
    let series =
        1.0 - inv * (1.0 - 3.0 * inv * (1.0 - 5.0 * inv * (1.0 - 7.0 * inv * (1.0 - 9.0 * inv))));
    -0.5 * x * x - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
}

/// The exact ε at `delta` of a Gaussian mechanism that is ρ-zCDP (sensitivity μ = √(2ρ)
/// noise standard deviations): the inverse of [`gaussian_delta`], by bisection to 1e-12.
pub fn epsilon_from_zcdp_gaussian(rho: f64, delta: f64) -> Result<f64, PrivacyError> {
    let delta = check::delta(delta)?;
    if !(rho.is_finite() && rho >= 0.0) {
        return Err(PrivacyError::invalid(
            "rho",
            rho,
            "must be a finite number ≥ 0",
        ));
    }
    let mu = (2.0 * rho).sqrt();
    if gaussian_delta(mu, 0.0) <= delta {
        return Ok(0.0);
    }
    // ε ≤ ρ + 2√(ρ ln(1/δ)) (Bun & Steinke 2016, Prop. 1.3) brackets the root.
    let mut high = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt() + 1.0;
    while gaussian_delta(mu, high) > delta {
        high *= 2.0;
    }
    let mut low = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if gaussian_delta(mu, mid) > delta {
            low = mid;
        } else {
            high = mid;
        }
        if high - low <= 1e-12 * high.max(1e-12) {
            break;
        }
    }
    Ok(high)
}

// ---------------------------------------------------------------------------------------
// Worst-case sensitivity by dynamic programming.
// ---------------------------------------------------------------------------------------

const IMPOSSIBLE: i64 = i64::MIN / 4;

/// Best Σ_ν |S∩ν|² over the patterns S inside one block of rounds, by (count, head, tail):
/// `head` = real rounds before S's first round inside the block, `tail` = real rounds after
/// its last, both capped at `cap` = min_separation − 1 (beyond which any neighbour fits).
#[derive(Clone, Debug)]
struct Block {
    /// Real rounds in the block (padding leaves count 0).
    width: u64,
    /// Largest count held (count 0 is the empty pattern, worth 0).
    max_count: usize,
    /// Side of the head/tail square: min(cap, width − 1) + 1.
    side: usize,
    /// `best[(count − 1)·side² + head·side + tail]`.
    best: Vec<i64>,
}

impl Block {
    fn empty(width: u64) -> Self {
        Self {
            width,
            max_count: 0,
            side: 0,
            best: Vec::new(),
        }
    }

    fn leaf(real: bool) -> Self {
        if real {
            Self {
                width: 1,
                max_count: 1,
                side: 1,
                best: vec![1],
            }
        } else {
            Self::empty(0)
        }
    }

    fn at(&self, count: usize, head: usize, tail: usize) -> i64 {
        self.best[(count - 1) * self.side * self.side + head * self.side + tail]
    }

    /// The block of `left` followed by `right`; if `node`, the two together form a node of
    /// the tree and each pattern gains count².
    fn join(left: &Self, right: &Self, node: bool, cap: usize, limit: usize) -> Self {
        let width = left.width + right.width;
        if width == 0 {
            return Self::empty(0);
        }
        let side = (cap as u64).min(width - 1) as usize + 1;
        let max_count = (left.max_count + right.max_count).min(limit);
        let mut out = Self {
            width,
            max_count,
            side,
            best: vec![IMPOSSIBLE; max_count * side * side],
        };
        let clamp = |v: u64| v.min(cap as u64) as usize;
        let put = |out: &mut Self, count: usize, head: usize, tail: usize, value: i64| {
            let slot = &mut out.best[(count - 1) * side * side + head * side + tail];
            if value > *slot {
                *slot = value;
            }
        };
        // Only the right block is used.
        for count in 1..=right.max_count.min(max_count) {
            for head in 0..right.side {
                for tail in 0..right.side {
                    let v = right.at(count, head, tail);
                    if v > IMPOSSIBLE {
                        put(&mut out, count, clamp(left.width + head as u64), tail, v);
                    }
                }
            }
        }
        // Only the left block is used.
        for count in 1..=left.max_count.min(max_count) {
            for head in 0..left.side {
                for tail in 0..left.side {
                    let v = left.at(count, head, tail);
                    if v > IMPOSSIBLE {
                        put(&mut out, count, head, clamp(tail as u64 + right.width), v);
                    }
                }
            }
        }
        // Both: the gap between the left's last round and the right's first is
        // left_tail + right_head + 1, which must be at least cap + 1.
        if left.max_count > 0 && right.max_count > 0 {
            // suffix[c][h][t] = max over right heads ≥ h of right(c, head, t).
            let rs = right.side;
            let mut suffix = vec![IMPOSSIBLE; right.max_count * rs * rs];
            for c in 0..right.max_count {
                for h in (0..rs).rev() {
                    for t in 0..rs {
                        let here = right.best[c * rs * rs + h * rs + t];
                        let above = if h + 1 < rs {
                            suffix[c * rs * rs + (h + 1) * rs + t]
                        } else {
                            IMPOSSIBLE
                        };
                        suffix[c * rs * rs + h * rs + t] = here.max(above);
                    }
                }
            }
            // Valid entries are ≥ 0 (sums of squares) and IMPOSSIBLE plus any valid value
            // stays negative, so the inner loop needs no test and vectorises.
            for lc in 1..=left.max_count {
                for head in 0..left.side {
                    for ltail in 0..left.side {
                        let lv = left.at(lc, head, ltail);
                        if lv < 0 {
                            continue;
                        }
                        // The right block must start at least `need` rounds in; a shorter
                        // block has no such pattern.
                        let need = cap - ltail.min(cap);
                        if need >= rs {
                            continue;
                        }
                        for rc in 1..=right.max_count.min(max_count.saturating_sub(lc)) {
                            let from = (rc - 1) * rs * rs + need * rs;
                            let to = (lc + rc - 1) * side * side + head * side;
                            let source = &suffix[from..from + rs];
                            let target = &mut out.best[to..to + rs];
                            for (slot, &rv) in target.iter_mut().zip(source) {
                                *slot = (*slot).max(lv + rv);
                            }
                        }
                    }
                }
            }
            // Entries that only an impossible pattern reached are impossible.
            for v in &mut out.best {
                if *v < 0 {
                    *v = IMPOSSIBLE;
                }
            }
        }
        if node {
            for count in 1..=max_count {
                let gain = (count * count) as i64;
                for v in &mut out.best[(count - 1) * side * side..count * side * side] {
                    if *v > IMPOSSIBLE {
                        *v += gain;
                    }
                }
            }
        }
        out
    }

    fn max_value(&self) -> i64 {
        self.best.iter().copied().fold(0, i64::max)
    }
}

/// Blocks of (leaves, real rounds) trees, memoised: equal subtrees recur at every level.
struct TreeBlocks {
    cap: usize,
    limit: usize,
    memo: std::collections::HashMap<(u64, u64), Block>,
}

impl TreeBlocks {
    /// The block of a tree over `leaves` leaves whose first `real` are real rounds. Its
    /// nodes are the dyadic blocks inside it: the whole tree if `leaves` is a power of two,
    /// else the nodes of its largest power-of-two prefix and of the rest.
    fn tree(&mut self, leaves: u64, real: u64) -> Block {
        if let Some(b) = self.memo.get(&(leaves, real)) {
            return b.clone();
        }
        let block = if leaves == 1 {
            Block::leaf(real == 1)
        } else {
            let half = if leaves.is_power_of_two() {
                leaves / 2
            } else {
                1u64 << (63 - leaves.leading_zeros())
            };
            let left_real = real.min(half);
            let left = self.tree(half, left_real);
            let right = self.tree(leaves - half, real - left_real);
            Block::join(
                &left,
                &right,
                leaves.is_power_of_two(),
                self.cap,
                self.limit,
            )
        };
        self.memo.insert((leaves, real), block.clone());
        block
    }
}

/// max over participation patterns S ⊆ {1, …, `rounds`} allowed by `limits` of
/// Σ_ν |S∩ν|², ν over the nodes of every tree of `schedule` (in units of C², the squared L2
/// sensitivity of the whole tree release).
///
/// Exact: dynamic programming over the trees with state (participations in a block, real
/// rounds before its first and after its last participation, capped at min_separation − 1).
/// Cost O(k²·s³) per distinct block, where k = min(max_participations, rounds) and s =
/// min_separation; equal subtrees are computed once.
pub fn worst_case_sensitivity_squared(
    schedule: TreeSchedule,
    limits: ParticipationLimits,
    rounds: u64,
) -> u64 {
    if rounds == 0 {
        return 0;
    }
    let cap = (limits.min_separation - 1).min(rounds) as usize;
    let feasible = (rounds - 1) / limits.min_separation + 1;
    let limit = limits.max_participations.min(feasible) as usize;
    let mut blocks = TreeBlocks {
        cap,
        limit,
        memo: std::collections::HashMap::new(),
    };
    let mut run: Option<Block> = None;
    for (real, leaves) in schedule.trees(rounds) {
        let tree = blocks.tree(leaves, real);
        run = Some(match run {
            None => tree,
            Some(before) => Block::join(&before, &tree, false, cap, limit),
        });
    }
    run.map_or(0, |b| b.max_value()) as u64
}

// ---------------------------------------------------------------------------------------
// The aggregator.
// ---------------------------------------------------------------------------------------

/// A noised prefix sum from [`TreeAggregator`]: the clipped update sums of every round so
/// far plus tree noise. Like [`crate::Released`], `TreeRelease<Secure>` can only come from a
/// [`crate::SecureSampler`].
#[derive(Clone, Debug, PartialEq)]
pub struct TreeRelease<P: Provenance> {
    round: u64,
    values: Vec<f64>,
    noise_std: f64,
    provenance: PhantomData<P>,
}

impl<P: Provenance> TreeRelease<P> {
    /// The round this prefix sum ends at (1-based: the first release is round 1).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The noised prefix sum.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The noised prefix sum, by value.
    pub fn into_values(self) -> Vec<f64> {
        self.values
    }

    /// The standard deviation of the noise on each coordinate: σC·√(nodes summed).
    pub fn noise_std(&self) -> f64 {
        self.noise_std
    }

    /// Where the noise came from.
    pub fn provenance(&self) -> &'static str {
        P::NAME
    }
}

/// One node of the current tree's binary decomposition: its level and its noise in lattice
/// steps.
#[derive(Clone, Debug)]
struct NoiseNode {
    level: u32,
    noise: Vec<i64>,
}

/// Online binary-tree aggregation of per-round clipped update sums (the mechanism of the
/// [module documentation](self): add/remove-one device neighbouring, sensitivity
/// C·√(max_S Σ_ν |S∩ν|²), privacy from [`TreeAccountant`] with the same schedule).
///
/// Each round: take a [`ClippedSum`] from [`TreeAggregator::begin_round`], add the round's
/// clipped updates to it, and pass it to [`TreeAggregator::release_round`], which returns
/// the noised sum of all rounds so far.
///
/// ```
/// use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant, TreeAggregator, TreeSchedule};
/// use fedpref_privacy::{GaussianMechanism, SimulationSampler, clip_l2};
///
/// // Devices at most once every 5 rounds and at most 4 times; a tree per 16 rounds.
/// let limits = ParticipationLimits::new(5, 4)?;
/// let schedule = TreeSchedule::restart_every(16, true)?;
/// let sigma = TreeAccountant::calibrate_noise_multiplier(schedule, limits, 40, 8.0, 1e-6)?;
/// let mut tree = TreeAggregator::new(GaussianMechanism::new(sigma, 1.0)?, 3, schedule)?;
/// let mut sampler = SimulationSampler::seed_from_u64(7);
/// for _ in 0..40 {
///     let mut sum = tree.begin_round()?;
///     sum.add(&clip_l2(vec![0.3, -0.1, 2.0], 1.0)?, 1.0)?;
///     let prefix = tree.release_round(&sum, &mut sampler)?; // the noised Σ of all rounds
///     assert_eq!(prefix.values().len(), 3);
/// }
/// let spent = TreeAccountant::new(sigma, schedule, limits)?.spend(tree.rounds(), 1e-6)?;
/// assert!((spent.epsilon - 8.0).abs() < 1e-6);
/// assert_eq!(spent.assumption, "participation limits (separation 5, at most 4)");
/// # Ok::<(), fedpref_privacy::PrivacyError>(())
/// ```
pub struct TreeAggregator {
    mechanism: GaussianMechanism,
    lattice: Lattice,
    dimension: usize,
    schedule: TreeSchedule,
    /// Rounds released so far, over all trees.
    rounds: u64,
    /// Rounds in the current tree.
    tree_rounds: u64,
    /// The released (noised) total of the finished trees, in lattice steps.
    carried: Vec<i64>,
    /// Nodes summed into `carried` (for the noise standard deviation).
    carried_nodes: u64,
    /// The exact sum of the current tree's rounds, in lattice steps.
    exact: Vec<i64>,
    /// The current tree's decomposition nodes, highest level first.
    stack: Vec<NoiseNode>,
    /// Σ of the stack's noises.
    stack_noise: Vec<i64>,
}

impl fmt::Debug for TreeAggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print sums or noise.
        f.debug_struct("TreeAggregator")
            .field("mechanism", &self.mechanism)
            .field("dimension", &self.dimension)
            .field("schedule", &self.schedule)
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

impl TreeAggregator {
    /// An aggregator whose nodes get N(0, (σC)²) per coordinate, for the mechanism's σ and C,
    /// over `dimension` coordinates.
    pub fn new(
        mechanism: GaussianMechanism,
        dimension: usize,
        schedule: TreeSchedule,
    ) -> Result<Self, PrivacyError> {
        if dimension == 0 {
            return Err(PrivacyError::invalid(
                "dimension",
                0.0,
                "must be at least 1 coordinate",
            ));
        }
        let lattice = mechanism.lattice(dimension)?;
        Ok(Self {
            mechanism,
            lattice,
            dimension,
            schedule,
            rounds: 0,
            tree_rounds: 0,
            carried: vec![0; dimension],
            carried_nodes: 0,
            exact: vec![0; dimension],
            stack: Vec::new(),
            stack_noise: vec![0; dimension],
        })
    }

    /// The mechanism (σ, C) of every node.
    pub fn mechanism(&self) -> GaussianMechanism {
        self.mechanism
    }

    /// The restart schedule.
    pub fn schedule(&self) -> TreeSchedule {
        self.schedule
    }

    /// Rounds released so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// An empty sum for the next round, on this aggregator's lattice.
    pub fn begin_round(&self) -> Result<ClippedSum, PrivacyError> {
        self.mechanism.sum(self.dimension)
    }

    /// Adds the round's sum to the tree and releases the noised prefix sum of all rounds so
    /// far. `sum` must come from [`TreeAggregator::begin_round`] (or from a
    /// [`GaussianMechanism::sum`] with the same σ, C and dimension); a sum on any other
    /// lattice is refused.
    pub fn release_round<S: GaussianSampler>(
        &mut self,
        sum: &ClippedSum,
        sampler: &mut S,
    ) -> Result<TreeRelease<S::Provenance>, PrivacyError> {
        let points = self.lattice_points(sum)?;
        // Check every coordinate first: a refused round leaves the tree as it was.
        if self
            .exact
            .iter()
            .zip(&points)
            .any(|(total, p)| total.checked_add(*p).is_none())
        {
            return Err(PrivacyError::Unsupported(
                "the tree's lattice sum overflowed: too many rounds for this σ",
            ));
        }
        for (total, p) in self.exact.iter_mut().zip(&points) {
            *total += *p;
        }
        self.rounds += 1;
        self.tree_rounds += 1;
        let t = self.tree_rounds;
        // t's decomposition replaces the nodes of t − 1's trailing set bits by one node.
        let level = t.trailing_zeros();
        while self.stack.last().is_some_and(|n| n.level < level) {
            let node = self.stack.pop().expect("checked non-empty");
            for (acc, n) in self.stack_noise.iter_mut().zip(&node.noise) {
                *acc -= n;
            }
        }
        let fresh = self.node_noise(sampler);
        for (acc, n) in self.stack_noise.iter_mut().zip(&fresh) {
            *acc += n;
        }
        self.stack.push(NoiseNode {
            level,
            noise: fresh,
        });

        let tree_done = self.schedule.restart_every == Some(t);
        let (tree_noise, tree_nodes) =
            if tree_done && self.schedule.completion && self.stack.len() > 1 {
                // Tree completion: the padded tree's root, a single node.
                (self.node_noise(sampler), 1)
            } else {
                (self.stack_noise.clone(), self.stack.len() as u64)
            };
        let tree_value: Vec<i64> = self
            .exact
            .iter()
            .zip(&tree_noise)
            .map(|(e, n)| e.saturating_add(*n))
            .collect();
        let total: Vec<i64> = self
            .carried
            .iter()
            .zip(&tree_value)
            .map(|(c, v)| c.saturating_add(*v))
            .collect();
        let nodes = self.carried_nodes + tree_nodes;
        if tree_done {
            self.carried.clone_from(&total);
            self.carried_nodes = nodes;
            self.exact.iter_mut().for_each(|v| *v = 0);
            self.stack_noise.iter_mut().for_each(|v| *v = 0);
            self.stack.clear();
            self.tree_rounds = 0;
        }
        Ok(TreeRelease {
            round: self.rounds,
            values: total
                .iter()
                .map(|&n| n as f64 * self.lattice.step)
                .collect(),
            noise_std: self.lattice.noise_std * (nodes as f64).sqrt(),
            provenance: PhantomData,
        })
    }

    /// Fresh noise for one node: N(0, (σC)²) per coordinate, in lattice steps.
    fn node_noise<S: GaussianSampler>(&self, sampler: &mut S) -> Vec<i64> {
        let zeros = vec![0i64; self.dimension];
        sampler
            .perturb_points(&zeros, &self.lattice)
            .into_iter()
            .map(|v| self.steps(v))
            .collect()
    }

    /// A value that is (up to f64 rounding) an integer number of lattice steps, as that
    /// integer. Exact for |n| < 2⁵⁰: the relative error of n·g/g is below 2⁻⁵².
    fn steps(&self, value: f64) -> i64 {
        (value / self.lattice.step).round() as i64
    }

    /// The sum's lattice points, refusing a sum built on another lattice.
    fn lattice_points(&self, sum: &ClippedSum) -> Result<Vec<i64>, PrivacyError> {
        let (lattice, points) = sum.lattice_and_points();
        if points.len() != self.dimension {
            return Err(PrivacyError::DimensionMismatch {
                expected: self.dimension,
                actual: points.len(),
            });
        }
        if lattice != self.lattice {
            return Err(PrivacyError::Unsupported(
                "the round sum was built for a different mechanism (σ, C or dimension)",
            ));
        }
        Ok(points.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SimulationSampler, clip_l2};

    fn limits(s: u64, k: u64) -> ParticipationLimits {
        ParticipationLimits::new(s, k).unwrap()
    }

    #[test]
    fn one_participation_in_a_single_tree_costs_the_depth() {
        // A leaf of a T-leaf tree is in ⌊log₂T⌋ + 1 complete dyadic nodes at most.
        for t in [1u64, 2, 3, 7, 8, 9, 100, 1024, 1500] {
            let got = worst_case_sensitivity_squared(TreeSchedule::single_tree(), limits(1, 1), t);
            assert_eq!(got, u64::from(t.ilog2()) + 1, "T = {t}");
        }
    }

    #[test]
    fn restarts_without_separation_charge_each_tree_its_depth() {
        // TF Privacy's compute_rdp_tree_restart: Σ over trees of ⌊log₂ steps⌋ + 1, for one
        // participation per tree (separation = tree length).
        let schedule = TreeSchedule::restart_every(10, false).unwrap();
        let got = worst_case_sensitivity_squared(schedule, limits(10, 5), 50);
        assert_eq!(got, 5 * 4);
        // A run cut short: trees of 10, 10, 5 rounds.
        let got = worst_case_sensitivity_squared(schedule, limits(10, 5), 25);
        assert_eq!(got, 4 + 4 + 3);
    }

    #[test]
    fn completion_adds_the_padded_root() {
        // 10 rounds padded to 16 leaves: a leaf is in 5 nodes (4 levels + the root).
        let schedule = TreeSchedule::restart_every(10, true).unwrap();
        assert_eq!(
            worst_case_sensitivity_squared(schedule, limits(10, 2), 20),
            10
        );
    }

    #[test]
    fn every_round_in_one_tree_of_four() {
        // S = {1,2,3,4}: leaves 4·1 + pairs 2·4 + root 16 = 28.
        assert_eq!(
            worst_case_sensitivity_squared(TreeSchedule::single_tree(), limits(1, 4), 4),
            28
        );
    }

    #[test]
    fn limits_say_what_they_assume_and_enforce_it() {
        let l = limits(5, 3);
        assert_eq!(
            l.assumption(),
            "participation limits (separation 5, at most 3)"
        );
        assert!(l.allows(None, 0, 0));
        assert!(!l.allows(Some(10), 1, 14));
        assert!(l.allows(Some(10), 1, 15));
        assert!(!l.allows(Some(10), 3, 100));
        assert_eq!(l.next_allowed_round(Some(10), 1), Some(15));
        assert_eq!(l.next_allowed_round(Some(10), 3), None);
        assert!(ParticipationLimits::new(0, 1).is_err());
        assert!(
            ParticipationLimits::new(1, 0)
                .unwrap_err()
                .to_string()
                .contains("max_participations")
        );
    }

    #[test]
    fn the_tail_expansion_of_ln_phi_meets_erfc_where_both_hold() {
        for x in [-20.0f64, -25.0, -30.0] {
            let direct = (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln();
            let inv = 1.0 / (x * x);
            let series = 1.0
                - inv
                    * (1.0 - 3.0 * inv * (1.0 - 5.0 * inv * (1.0 - 7.0 * inv * (1.0 - 9.0 * inv))));
            let expansion =
                -0.5 * x * x - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln();
            assert!((direct - expansion).abs() < 1e-9 * direct.abs(), "x = {x}");
        }
        assert!(ln_normal_cdf(-100.0).is_finite());
    }

    #[test]
    fn deserialising_checks_the_limits_and_the_schedule() {
        let parse = |s: &str| serde_json::from_str::<ParticipationLimits>(s);
        assert!(parse(r#"{"min_separation":0,"max_participations":3}"#).is_err());
        assert_eq!(
            parse(r#"{"min_separation":4,"max_participations":3}"#).unwrap(),
            limits(4, 3)
        );
        let schedule = |s: &str| serde_json::from_str::<TreeSchedule>(s);
        assert!(schedule(r#"{"restart_every":0,"completion":false}"#).is_err());
        assert!(schedule(r#"{"restart_every":null,"completion":true}"#).is_err());
        assert_eq!(
            schedule(r#"{"restart_every":8,"completion":true}"#).unwrap(),
            TreeSchedule::restart_every(8, true).unwrap()
        );
    }

    #[test]
    fn gaussian_delta_at_zero_epsilon_is_the_total_variation() {
        // μ = 1: Φ(½) − Φ(−½) = 0.382924922548026.
        assert!((gaussian_delta(1.0, 0.0) - 0.382_924_922_548_026).abs() < 1e-12);
    }

    #[test]
    fn release_is_the_exact_prefix_sum_when_noise_is_negligible() {
        let mechanism = GaussianMechanism::new(1e-3, 1.0).unwrap();
        let mut tree = TreeAggregator::new(mechanism, 2, TreeSchedule::single_tree()).unwrap();
        let mut sampler = SimulationSampler::seed_from_u64(1);
        let mut expected = [0.0, 0.0];
        for r in 0..9 {
            let mut sum = tree.begin_round().unwrap();
            let update = clip_l2(vec![0.1 * r as f64, -0.5], 1.0).unwrap();
            sum.add(&update, 1.0).unwrap();
            expected[0] += 0.1 * r as f64;
            expected[1] -= 0.5;
            let released = tree.release_round(&sum, &mut sampler).unwrap();
            assert_eq!(released.round(), r + 1);
            for (got, want) in released.values().iter().zip(expected) {
                assert!((got - want).abs() < 0.02, "round {r}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn a_sum_from_another_mechanism_is_refused() {
        let mut tree = TreeAggregator::new(
            GaussianMechanism::new(1.0, 1.0).unwrap(),
            3,
            TreeSchedule::single_tree(),
        )
        .unwrap();
        let other = GaussianMechanism::new(1.37, 1.0).unwrap();
        let mut sum = other.sum(3).unwrap();
        sum.add(&clip_l2(vec![0.31, 0.17, 0.05], 1.0).unwrap(), 1.0)
            .unwrap();
        let e = tree
            .release_round(&sum, &mut SimulationSampler::seed_from_u64(2))
            .unwrap_err();
        assert!(e.to_string().contains("different mechanism"), "{e}");
        // Twice σ: its lattice step is exactly twice this one's, so every point of it is a
        // whole number of this lattice's steps; it is refused all the same.
        let mut sum = GaussianMechanism::new(2.0, 1.0).unwrap().sum(3).unwrap();
        sum.add(&clip_l2(vec![0.31, 0.17, 0.05], 1.0).unwrap(), 1.0)
            .unwrap();
        let e = tree
            .release_round(&sum, &mut SimulationSampler::seed_from_u64(2))
            .unwrap_err();
        assert!(e.to_string().contains("different mechanism"), "{e}");
        let sum = GaussianMechanism::new(1.0, 1.0).unwrap().sum(4).unwrap();
        assert!(matches!(
            tree.release_round(&sum, &mut SimulationSampler::seed_from_u64(2)),
            Err(PrivacyError::DimensionMismatch { .. })
        ));
    }
}
