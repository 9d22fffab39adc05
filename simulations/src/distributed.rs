//! `--privacy-mode distributed` in-process: distributed DP under secure aggregation, with
//! simulated drop-out.
//!
//! Each round:
//! 1. the cohort is drawn exactly as in the other modes ([`crate::sim::candidates`], stream
//!    (seed, 3, round)); distributed mode needs `--cohort-size` (the coordinator knows who
//!    took part, so no amplification by sampling is claimed and rounds compose at q = 1);
//! 2. the devices train in parallel with the SDK's [`local_round`], clip to C with
//!    [`clip_l2`], and make their noised integer share with the privacy crate's
//!    [`DistributedDiscreteGaussian`] (conditional randomised rounding to the lattice γ·Z, plus
//!    the discrete Gaussian share of variance s²), drawn by a [`SimulationShareSampler`] seeded
//!    from (seed, round, user) — so reruns are byte-identical whatever the thread count;
//! 3. the shares are encoded modulo 2³² with the round's checked [`FixedPoint`] encoding and go
//!    through the real SecAgg+ protocol ([`fedpref_secagg::inprocess::run_round`]: X25519 key
//!    agreement, Shamir sharing, ChaCha20 masks, unmasking) with keys from
//!    [`fedpref_secagg::rng::simulation_rng`] on stream (seed, round);
//! 4. drop-out (`--dropout RATE`): each cohort member independently drops out with probability
//!    RATE, at a stage drawn uniformly from the four (before advertising keys, before sharing
//!    them, before uploading its masked input, before answering the unmasking request), from
//!    stream (seed, 13, round). Devices that drop after uploading are recovered by the
//!    unmasking stage; when fewer than the threshold t (or the minimum number of contributors
//!    m) survive a stage, the server abandons the round: nothing is unmasked, the model does
//!    not move and **no ε is spent**;
//! 5. the unmasked sum is decoded (centred, times γ) and aggregated as the coordinator does
//!    in this mode (`Aggregate::from_unmasked_sum`): Δ = noised sum / the number of
//!    contributors (under zero-out neighbouring they are the same in both worlds, so this is
//!    post-processing), then one step of the server optimiser
//!    ([`fedpref_coordinator::aggregation::apply`]). The noised sum enters the coordinator's
//!    aggregator as a single already-noised value (its `local` treatment: post-processing of a
//!    DP release, with simulated provenance), so no noise is added on the server;
//! 6. ε: each committed round composes the mechanism's RDP curve (KLS21 Prop. 14) into an
//!    [`RdpAccountant`] over the default order grid; ε at δ is reported for the audience
//!    `release_observers`.
//!
//! # Parameters of the round
//! The settings make a run manifest in mode `distributed` (with a `[secure_aggregation]`
//! section: `--dropout` as its drop-out rate, `--corruption-rate` as its corruption rate, and
//! `sampling.minimum_size` = ⌈(1 − 2·RATE)·n⌉: the expected survivors at drop-out rate RATE,
//! minus as many again), validated by the coordinator's manifest code, and every round's
//! parameters come from the coordinator's own [`fedpref_coordinator::distributed::plan`]: the
//! graph degree k and threshold t ([`SecAggParams::choose`]), m = max(t, minimum_size), the
//! lattice step, and the per-device noise variance sized so that the `m − ⌈γn⌉ − 1` honest
//! devices guaranteed in a released sum (m, minus the colluders, minus the user) carry (σC)²
//! between them. A coordinator given the same manifest picks the same numbers.
//!
//! # What is simulated
//! The protocol, the noise and the encoding are the real ones; the devices and the server
//! run in one process and every message is handed over in memory. The coordinator's round
//! engine is not driven here: its ledger and run manifest do not take part.

use std::time::Instant;

use fedpref_client_sdk::{LocalTraining, local_round};
use fedpref_coordinator::aggregation::{
    AggregationPrivacy, RoundAggregator, ServerOptimizer, ServerState, apply,
};
use fedpref_coordinator::ledger::AudienceEpsilon;
use fedpref_coordinator::manifest::{ManifestPrivacyMode, RunManifest};
use fedpref_coordinator::model::initial_parameters;
use fedpref_privacy::distributed::{DistributedDiscreteGaussian, SimulationShareSampler};
use fedpref_privacy::{Audience, OrderGrid, RdpAccountant, SimulationSampler, clip_l2};
use fedpref_secagg::inprocess::{Dropouts, run_round};
use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::{
    EncodedInput, FixedPoint, RoundConfig, RoundContext, SecAggError, SecAggParams,
};
use rand::RngExt;
use rayon::prelude::*;

use crate::data::{Dataset, splitmix64, stream_rng};
use crate::metrics::{evaluate, examples};
use crate::sim::{RoundRecord, Sampling, Settings, SimError, Timings, candidates, shared_model};

/// The stream of the drop-out draws, (seed, 13, round).
const DROPOUT_STREAM: u64 = 13;

/// The fixed parameters of a distributed run: the secure-aggregation round shape and the
/// mechanism, the same every round (the cohort size does not change).
#[derive(Clone, Debug, PartialEq)]
pub struct DistributedPlan {
    /// k and t for the cohort, drop-out and corruption rates.
    pub secagg: SecAggParams,
    /// m: the fewest masked inputs the server unmasks a sum of, max(t, ⌈(1 − 2·RATE)·n⌉).
    pub min_contributors: u32,
    /// Devices assumed corrupted: ⌈γn⌉.
    pub assumed_corrupted: u32,
    /// The checked fixed-point encoding.
    pub encoding: FixedPoint,
    /// The distributed discrete Gaussian every device applies.
    pub mechanism: DistributedDiscreteGaussian,
    assumption: String,
}

impl DistributedPlan {
    /// The plan of a validated distributed run manifest, from the coordinator's own
    /// [`fedpref_coordinator::distributed::plan`], so the in-process run and a coordinator
    /// pick the very same n, t, graph, m, lattice and noise. Errors name the flag.
    pub fn from_manifest(manifest: &RunManifest) -> Result<Self, SimError> {
        let plan = fedpref_coordinator::distributed::plan(manifest).map_err(|e| {
            SimError::Settings(crate::sim::flag_names(&format!(
                "{} = {}: {}",
                e.key, e.value, e.reason
            )))
        })?;
        let encoding = FixedPoint::new(plan.encoding)
            .map_err(|e| SimError::Settings(format!("the round's encoding: {e}")))?;
        Ok(Self {
            secagg: plan.params,
            min_contributors: plan.min_contributors,
            assumed_corrupted: (plan.corruption_rate * f64::from(plan.params.cohort_size)).ceil()
                as u32,
            encoding,
            mechanism: plan.mechanism,
            assumption: plan.assumption(),
        })
    }

    /// The assumption the run's ε rests on, in words (the coordinator's wording).
    pub fn assumption(&self) -> String {
        self.assumption.clone()
    }

    fn round_config(&self, seed: u64, round: u64) -> Result<RoundConfig, SecAggError> {
        let mut context = [0u8; 32];
        let mut graph_seed = [0u8; 32];
        for (i, chunk) in context.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&splitmix64(seed ^ splitmix64(round) ^ i as u64).to_le_bytes());
        }
        for (i, chunk) in graph_seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &splitmix64(seed ^ splitmix64(round ^ 0x5eed) ^ (i as u64 + 4)).to_le_bytes(),
            );
        }
        RoundConfig::new(
            RoundContext(context),
            &self.secagg,
            graph_seed,
            *self.encoding.params(),
            self.min_contributors,
        )
    }
}

/// A simulated run in mode `distributed` (see the module docs).
pub struct DistributedSimulation<'d> {
    settings: Settings,
    data: &'d Dataset,
    plan: DistributedPlan,
    optimizer: ServerOptimizer,
    state: ServerState,
    params: Vec<f32>,
    version: u64,
    accountant: RdpAccountant,
    item_ids: Vec<String>,
    cohort: u32,
    committed: u64,
    step: u64,
    /// Where the time went so far (aggregation: the secure-aggregation round and the server
    /// step).
    pub timings: Timings,
    /// Masked inputs that entered a released sum so far.
    pub client_updates: u64,
    /// Bytes each device sent, summed over devices and rounds: advertise, share keys, masked
    /// input, unmask.
    pub bytes_sent: [u64; 4],
}

impl<'d> DistributedSimulation<'d> {
    /// A fresh run from the coordinator's initial parameters for the run's seed.
    pub fn new(settings: &Settings, data: &'d Dataset) -> Result<Self, SimError> {
        if settings.privacy_mode != ManifestPrivacyMode::Distributed {
            return Err(SimError::Settings(format!(
                "a distributed simulation needs --privacy-mode distributed (got {})",
                settings.privacy_mode.as_str()
            )));
        }
        check(settings)?;
        let population = data.users.iter().filter(|u| u.trains).count();
        let Sampling::Cohort(k) = settings.sampling else {
            unreachable!("checked");
        };
        let cohort = k.min(population as u32);
        let manifest = settings.manifest(population, data.items.len())?;
        let params = initial_parameters(&manifest.model, settings.seed);
        let plan = DistributedPlan::from_manifest(&manifest)?;
        Ok(Self {
            settings: settings.clone(),
            data,
            optimizer: settings.server_optimizer,
            state: ServerState::new(&settings.server_optimizer, params.len()),
            params,
            version: 0,
            accountant: RdpAccountant::new(OrderGrid::default()),
            item_ids: data.items.iter().map(|i| i.id.clone()).collect(),
            cohort,
            committed: 0,
            step: 0,
            plan,
            timings: Timings::default(),
            client_updates: 0,
            bytes_sent: [0; 4],
        })
    }

    /// The round parameters every round uses.
    pub fn plan(&self) -> &DistributedPlan {
        &self.plan
    }

    /// The assumption the run's ε rests on, in words.
    pub fn epsilon_assumption(&self) -> String {
        self.plan.assumption()
    }

    /// The cohort size n of every round.
    pub fn cohort_size(&self) -> u32 {
        self.cohort
    }

    /// Rounds whose sum was released.
    pub fn rounds_committed(&self) -> u64 {
        self.committed
    }

    /// The current shared model, as the SDK sees it after a download.
    pub fn model(&self) -> Result<fedpref_client_sdk::MatrixFactorization, SimError> {
        Ok(shared_model(
            self.version,
            &self.item_ids,
            self.settings.factors,
            &self.params,
        )?)
    }

    /// Cumulative ε (audience `release_observers`) at the run's δ.
    pub fn spent(&self) -> Result<Vec<AudienceEpsilon>, SimError> {
        let epsilon = if self.committed == 0 {
            0.0
        } else {
            self.accountant.epsilon(self.settings.delta)?.epsilon
        };
        Ok(vec![AudienceEpsilon {
            audience: Audience::ReleaseObservers.as_str().into(),
            epsilon,
        }])
    }

    /// Runs every round, calling `progress` after each.
    pub fn run(
        &mut self,
        mut progress: impl FnMut(&RoundRecord),
    ) -> Result<Vec<RoundRecord>, SimError> {
        let mut records = vec![];
        while self.step < self.settings.rounds {
            let record = self.run_round()?;
            progress(&record);
            records.push(record);
        }
        Ok(records)
    }

    /// Runs the next round with drop-outs drawn at the `--dropout` rate.
    pub fn run_round(&mut self) -> Result<RoundRecord, SimError> {
        let round = self.step + 1;
        let dropouts = draw_dropouts(
            self.settings.seed,
            round,
            self.cohort,
            self.settings.dropout,
        );
        self.run_round_with(&dropouts)
    }

    /// Runs the next round with the given drop-outs (participants are numbered 1..=n in
    /// check-in order), e.g. to script a round that loses too many devices.
    pub fn run_round_with(&mut self, dropouts: &Dropouts) -> Result<RoundRecord, SimError> {
        self.step += 1;
        let round = self.step;
        let start = Instant::now();
        let seed = self.settings.seed;
        let users = candidates(&self.settings, self.data, round);
        let model = self.model()?;
        let training = self.settings.training;
        let data = self.data;
        let clip_norm = self.settings.clip_norm;
        let mechanism = self.plan.mechanism;
        let encoding = self.plan.encoding;
        let shares: Vec<DeviceShare> = users
            .par_iter()
            .map(|&user| {
                device_share(
                    &model, data, user, &training, clip_norm, &mechanism, &encoding, seed, round,
                )
            })
            .collect::<Result<_, _>>()?;
        let mut inputs = Vec::with_capacity(shares.len());
        for s in shares {
            self.timings.fit_ns += s.fit_ns;
            self.timings.privacy_ns += s.privacy_ns;
            inputs.push(s.input);
        }

        let t = Instant::now();
        let config = self
            .plan
            .round_config(seed, round)
            .map_err(|e| SimError::Settings(format!("round {round}: {e}")))?;
        let mut rng = simulation_rng(seed, &[round]);
        let (contributions, abandoned) = match run_round(&config, &inputs, dropouts, &mut rng) {
            Ok((output, bytes)) => {
                for sent in bytes.by_participant.values() {
                    for (total, b) in self.bytes_sent.iter_mut().zip(sent) {
                        *total += *b as u64;
                    }
                }
                let sum = config.encoding.decode_integers(&output.sum);
                self.release(&sum, output.contributors.len())?;
                (output.contributors.len() as u64, None)
            }
            Err(SecAggError::Abandoned(reason)) => {
                (0, Some(format!("secure aggregation: {reason}")))
            }
            Err(e) => {
                return Err(SimError::Settings(format!(
                    "round {round}: secure aggregation failed: {e}"
                )));
            }
        };
        self.client_updates += contributions;
        self.timings.aggregation_ns += t.elapsed().as_nanos() as u64;
        self.timings.rounds_wall_ns += start.elapsed().as_nanos() as u64;

        let last = round >= self.settings.rounds;
        let every = self.settings.eval_every;
        let evaluation = if last || (every > 0 && round.is_multiple_of(every)) {
            let t = Instant::now();
            let e = evaluate(
                &self.model()?,
                self.data,
                &self.settings.training,
                self.settings.ranking,
            );
            self.timings.evaluation_ns += t.elapsed().as_nanos() as u64;
            Some(e)
        } else {
            None
        };
        Ok(RoundRecord {
            round,
            contributions,
            abandoned,
            epsilon: self.spent()?,
            evaluation,
            feedback: None,
            clip_norm: None,
        })
    }

    /// Δ = noised sum · γ / contributors, one server-optimiser step, and the round's ε.
    fn release(&mut self, sum: &[i64], contributors: usize) -> Result<(), SimError> {
        let denominator = contributors as f64;
        let granularity = self.plan.mechanism.granularity();
        let delta: Vec<f32> = sum
            .iter()
            .map(|&v| (v as f64 * granularity / denominator) as f32)
            .collect();
        let refused = |e: &dyn std::fmt::Display| SimError::Settings(format!("aggregation: {e}"));
        // The sum is already noised: the aggregator's `local` treatment (a weighted mean, here
        // of one value) is post-processing and adds nothing.
        let mut aggregator =
            RoundAggregator::new(&self.optimizer, &AggregationPrivacy::Local, delta.len())
                .map_err(|e| refused(&e))?;
        aggregator.add(&delta, 1.0).map_err(|e| refused(&e))?;
        let aggregate = aggregator
            .finish(&mut SimulationSampler::seed_from_u64(0))
            .map_err(|e| refused(&e))?;
        apply(
            &self.optimizer,
            &mut self.state,
            &mut self.params,
            &aggregate,
        )
        .map_err(|e| refused(&e))?;
        self.plan.mechanism.compose_into(&mut self.accountant, 1)?;
        self.version += 1;
        self.committed += 1;
        Ok(())
    }
}

/// Refuses settings that distributed mode does not support, naming the flag.
pub fn check(settings: &Settings) -> Result<(), SimError> {
    let refuse = |m: &str| Err(SimError::Settings(m.to_string()));
    if !matches!(settings.sampling, Sampling::Cohort(_)) {
        return refuse(
            "--privacy-mode distributed needs --cohort-size: the coordinator knows who took part, \
             so Poisson sampling brings no amplification here",
        );
    }
    if settings.target_epsilon.is_some() {
        return refuse(
            "--target-epsilon: not calibrated in --privacy-mode distributed; give --noise-multiplier",
        );
    }
    if !(0.0..0.5).contains(&settings.dropout) {
        return Err(SimError::Settings(format!(
            "--dropout {}: must be in [0, 0.5)",
            settings.dropout
        )));
    }
    if !(0.0..0.5).contains(&settings.corruption_rate) {
        return Err(SimError::Settings(format!(
            "--corruption-rate {}: must be in [0, 0.5)",
            settings.corruption_rate
        )));
    }
    if settings.server_optimizer.is_robust() || settings.server_optimizer.is_tree() {
        return Err(SimError::Settings(format!(
            "--server-optimizer {}: secure aggregation reveals only the sum, so robust statistics \
             and dp-ftrl's tree are not available in mode distributed",
            settings.server_optimizer.kind()
        )));
    }
    if settings.participation.is_some() {
        return refuse(
            "--min-separation: participation limits are not available in mode distributed",
        );
    }
    if settings.adaptive_clipping.is_some() {
        return refuse("--adaptive-clipping: not available in mode distributed");
    }
    if settings.scenario.is_some() {
        return refuse("--user-feedback: not available in mode distributed");
    }
    Ok(())
}

/// Which cohort members drop out, and before which stage (see the module docs).
pub fn draw_dropouts(seed: u64, round: u64, cohort: u32, rate: f64) -> Dropouts {
    let mut rng = stream_rng(seed, &[DROPOUT_STREAM, round]);
    let mut dropouts = Dropouts::default();
    for i in 1..=cohort {
        let drops = rng.random::<f64>() < rate;
        let stage = rng.random_range(0..4u32);
        if drops {
            match stage {
                0 => dropouts.before_keys.insert(i),
                1 => dropouts.before_shares.insert(i),
                2 => dropouts.before_input.insert(i),
                _ => dropouts.before_unmask.insert(i),
            };
        }
    }
    dropouts
}

struct DeviceShare {
    input: EncodedInput,
    fit_ns: u64,
    privacy_ns: u64,
}

#[allow(clippy::too_many_arguments)]
fn device_share(
    model: &fedpref_client_sdk::MatrixFactorization,
    data: &Dataset,
    user: usize,
    training: &LocalTraining,
    clip_norm: f64,
    mechanism: &DistributedDiscreteGaussian,
    encoding: &FixedPoint,
    seed: u64,
    round: u64,
) -> Result<DeviceShare, SimError> {
    let t = Instant::now();
    let examples = examples(&data.users[user].train, training);
    let (_private, update) = local_round(model, &examples, training);
    let fit_ns = t.elapsed().as_nanos() as u64;
    let t = Instant::now();
    let clipped = clip_l2(update, clip_norm)?;
    let stream = splitmix64(seed ^ splitmix64(round ^ splitmix64(user as u64 ^ 0xd15d)));
    let mut sampler = SimulationShareSampler::seed_from_u64(stream);
    let share = mechanism.noised_share(&clipped, &mut sampler)?;
    let input = encoding
        .encode_integers(share.values())
        .map_err(|e| SimError::Settings(format!("round {round}, user {user}: {e}")))?;
    Ok(DeviceShare {
        input,
        fit_ns,
        privacy_ns: t.elapsed().as_nanos() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropouts_follow_the_rate_and_are_reproducible() {
        let a = draw_dropouts(7, 3, 1000, 0.2);
        assert_eq!(a, draw_dropouts(7, 3, 1000, 0.2));
        let total = a.before_keys.len()
            + a.before_shares.len()
            + a.before_input.len()
            + a.before_unmask.len();
        assert!((150..250).contains(&total), "{total} of 1000 dropped");
        assert!(draw_dropouts(7, 3, 1000, 0.0).before_keys.is_empty());
    }

    #[test]
    fn the_plan_sizes_noise_from_the_guaranteed_honest_devices() {
        let settings = Settings {
            privacy_mode: ManifestPrivacyMode::Distributed,
            noise_multiplier: Some(1.0),
            sampling: Sampling::Cohort(50),
            dropout: 0.1,
            corruption_rate: 0.05,
            ..Settings::default()
        };
        let manifest = settings.manifest(200, 20).unwrap();
        let plan = DistributedPlan::from_manifest(&manifest).unwrap();
        let m = plan.min_contributors;
        assert_eq!(m, plan.secagg.threshold.max(40));
        assert_eq!(plan.assumed_corrupted, 3);
        assert_eq!(plan.mechanism.honest_devices(), u64::from(m) - 3 - 1);
        // The honest devices' noise alone carries at least (σC)².
        let total =
            plan.mechanism.honest_devices() as f64 * plan.mechanism.device_noise_std().powi(2);
        assert!(total >= 1.0 - 1e-9, "{total}");
        assert_eq!(
            plan.encoding.params().scale,
            1.0 / plan.mechanism.granularity()
        );
    }
}
