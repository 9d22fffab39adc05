//! `--privacy-mode distributed` in-process: distributed DP under secure aggregation, with
//! simulated drop-out, driving **the coordinator's round engine** (its secure-aggregation
//! stages, aggregation, server optimiser and accountant) as `sim.rs` does for the other
//! modes.
//!
//! Each round:
//! 1. the cohort is drawn exactly as in the other modes ([`crate::sim::candidates`], stream
//!    (seed, 3, round)) and checks in (`Event::CheckIn`); distributed mode needs
//!    `--cohort-size` (the coordinator knows who took part, so no amplification by sampling is
//!    claimed and rounds compose at q = 1). The engine gives each a task carrying the round's
//!    secure-aggregation config (context and graph seed from the engine's RNG, stream
//!    (seed, 5, round));
//! 2. the devices train in parallel with the SDK's sparse local round
//!    ([`local_round_sparse`], scattered into the dense update), clip to C with
//!    [`clip_l2`], and make their noised integer share with the task's
//!    [`DistributedDiscreteGaussian`] (conditional randomised rounding to the lattice γ·Z, plus
//!    the discrete Gaussian share of variance s²), drawn by a [`SimulationShareSampler`] seeded
//!    from (seed, round, user) — so reruns are byte-identical whatever the thread count — and
//!    encode it modulo 2³² with the round's checked [`FixedPoint`] encoding;
//! 3. the four stages run through the engine with the real SecAgg+ client
//!    ([`fedpref_secagg::Client`]: X25519 key agreement, Shamir sharing, ChaCha20 masks,
//!    unmasking; keys from [`fedpref_secagg::rng::simulation_rng`] on stream (seed, round)):
//!    `Event::SecAggKeys`, `SecAggShares`, `MaskedUpdate`, `SecAggUnmask`, each device reading
//!    its input with `Engine::secure_stage`. A stage closes as soon as every device has
//!    answered; otherwise the simulated clock jumps to its deadline and a tick closes it;
//! 4. drop-out (`--dropout RATE`): each cohort member independently drops out with probability
//!    RATE, at a stage drawn uniformly from the four (before advertising keys, before sharing
//!    them, before uploading its masked input, before answering the unmasking request), from
//!    stream (seed, 13, round). Devices that drop after uploading are recovered by the
//!    unmasking stage; when fewer than the threshold t (or the minimum number of contributors
//!    m) survive a stage, the engine abandons the round: nothing is unmasked, the model does
//!    not move and **no ε is spent**;
//! 5. the engine decodes the unmasked sum, divides it by its contributors, takes a server
//!    optimiser step, and composes the mechanism's RDP (KLS21 Prop. 14) into the run's
//!    accountant; ε is reported for the audience `release_observers`.
//!
//! # Parameters of the round
//! The settings make a run manifest in mode `distributed` (with a `[secure_aggregation]`
//! section: `--dropout` as its drop-out rate, `--corruption-rate` as its corruption rate, and
//! `sampling.minimum_size` = ⌈(1 − 2·RATE)·n⌉: the expected survivors at drop-out rate RATE,
//! minus as many again), validated by the coordinator's manifest code; the engine takes every
//! round's parameters from the coordinator's [`fedpref_engine::distributed::plan`]: the
//! graph degree k and threshold t ([`SecAggParams::choose`]), m = max(t, minimum_size), the
//! lattice step, and the per-device noise variance sized so that the `m − ⌈γn⌉ − 1` honest
//! devices guaranteed in a released sum (m, minus the colluders, minus the user) carry (σC)²
//! between them.
//!
//! # What is simulated
//! The engine, the protocol, the noise and the encoding are the real ones; the devices run in
//! one process, every message is handed over in memory, and the clock is simulated.

use std::time::Instant;

use fedpref_client_sdk::{LocalTraining, local_round_sparse};
use fedpref_engine::engine::{Action, Engine, Event, RunState, Task};
use fedpref_engine::ledger::AudienceEpsilon;
use fedpref_engine::manifest::{ManifestPrivacyMode, RunManifest};
use fedpref_engine::model::initial_parameters;
use fedpref_engine::secure_round::StageInput;
use fedpref_privacy::distributed::{DistributedDiscreteGaussian, SimulationShareSampler};
use fedpref_privacy::{SimulationSampler, clip_l2};
use fedpref_secagg::inprocess::Dropouts;
use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::{Client, EncodedInput, FixedPoint, SecAggParams, ServerStage};
use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
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
    /// [`fedpref_engine::distributed::plan`], so the in-process run and a coordinator
    /// pick the very same n, t, graph, m, lattice and noise. Errors name the flag.
    pub fn from_manifest(manifest: &RunManifest) -> Result<Self, SimError> {
        let plan = fedpref_engine::distributed::plan(manifest).map_err(|e| {
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
}

/// A simulated run in mode `distributed` (see the module docs).
pub struct DistributedSimulation<'d> {
    settings: Settings,
    data: &'d Dataset,
    plan: DistributedPlan,
    engine: Engine,
    now: i64,
    item_ids: Vec<String>,
    cohort: u32,
    step: u64,
    /// Where the time went so far (aggregation: the secure-aggregation stages in the engine,
    /// aggregation and the server step).
    pub timings: Timings,
    /// Masked inputs that entered a released sum so far.
    pub client_updates: u64,
    /// Bytes the devices sent, summed over devices and rounds (protobuf sizes): advertise,
    /// share keys, masked input, unmask.
    pub bytes_sent: [u64; 4],
}

/// A device still in the round, with the secagg client state of its next stage.
struct Participant<S> {
    /// 1-based position in check-in order: the index `Dropouts` refers to.
    number: u32,
    task: Task,
    state: S,
}

/// How a round ended.
#[derive(Default)]
struct Outcome {
    contributions: u64,
    abandoned: Option<String>,
    ended: bool,
}

/// The round's RNG and noise sampler for the engine (its round context and graph seed).
struct EngineRandomness {
    rng: Xoshiro256PlusPlus,
    sampler: SimulationSampler,
}

impl<'d> DistributedSimulation<'d> {
    /// A fresh run at the engine's version 0 (initial parameters from the coordinator's
    /// `initial_parameters` with the run's seed).
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
        let plan = DistributedPlan::from_manifest(&manifest)?;
        let params = initial_parameters(&manifest.model, settings.seed);
        Ok(Self {
            settings: settings.clone(),
            data,
            plan,
            engine: Engine::new("fedpref-sim", manifest, params),
            now: 1_700_000_000_000,
            item_ids: data.items.iter().map(|i| i.id.clone()).collect(),
            cohort,
            step: 0,
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
        self.engine.epsilon_assumption()
    }

    /// The cohort size n of every round.
    pub fn cohort_size(&self) -> u32 {
        self.cohort
    }

    /// Rounds whose sum was released.
    pub fn rounds_committed(&self) -> u64 {
        self.engine.rounds_committed()
    }

    /// The round engine (read-only).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The current shared model, as the SDK sees it after a download.
    pub fn model(&self) -> Result<fedpref_client_sdk::MatrixFactorization, SimError> {
        let (version, params) = self.engine.model();
        Ok(shared_model(
            version,
            &self.item_ids,
            self.settings.factors,
            params,
        )?)
    }

    /// Cumulative ε (audience `release_observers`) at the run's δ, from the engine.
    pub fn spent(&self) -> Vec<AudienceEpsilon> {
        self.engine.spent()
    }

    /// Runs every round, calling `progress` after each. As in the other modes the engine
    /// stops the run after its last committed round (abandoned rounds do not count); the
    /// bound only guards against a run in which no round ever commits.
    pub fn run(
        &mut self,
        mut progress: impl FnMut(&RoundRecord),
    ) -> Result<Vec<RoundRecord>, SimError> {
        let mut records = vec![];
        let limit = self.settings.rounds.saturating_mul(100).max(1_000);
        while self.engine.state() == RunState::Active && self.step < limit {
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
        let t = Instant::now();
        let mut random = EngineRandomness {
            rng: stream_rng(seed, &[5, round]),
            sampler: SimulationSampler::for_stream(seed, &[round, u64::MAX - 1]),
        };
        let mut tasks = Vec::new();
        for user in candidates(&self.settings, self.data, round) {
            let actions = self.engine.handle(
                Event::CheckIn {
                    device: format!("u{user}"),
                    eligible: true,
                },
                self.now,
                &mut random.rng,
                &mut random.sampler,
            );
            for a in actions {
                if let Action::SendTask(task) = a {
                    tasks.push((user, task));
                }
            }
        }
        self.timings.aggregation_ns += t.elapsed().as_nanos() as u64;

        let mut outcome = Outcome::default();
        if let Some(info) = tasks
            .first()
            .and_then(|(_, t)| t.secure_aggregation.clone())
        {
            let model = self.model()?;
            let training = self.settings.training;
            let data = self.data;
            let clip_norm = self.settings.clip_norm;
            let mechanism = info.plan.mechanism;
            let encoding = info.config.encoding;
            let shares: Vec<DeviceShare> = tasks
                .par_iter()
                .map(|(user, _)| {
                    device_share(
                        &model, data, *user, &training, clip_norm, &mechanism, &encoding, seed,
                        round,
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
            let tasks: Vec<Task> = tasks.into_iter().map(|(_, task)| task).collect();
            self.secure_round(
                round,
                &info.config,
                tasks,
                &inputs,
                dropouts,
                &mut random,
                &mut outcome,
            )?;
            self.timings.aggregation_ns += t.elapsed().as_nanos() as u64;
        } else {
            outcome.abandoned = Some(if tasks.is_empty() {
                "no device checked in, so the engine opened no round".into()
            } else {
                "the engine's tasks carry no secure-aggregation round".into()
            });
        }
        self.client_updates += outcome.contributions;
        self.timings.rounds_wall_ns += start.elapsed().as_nanos() as u64;

        let last = self.engine.state() != RunState::Active;
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
            contributions: outcome.contributions,
            abandoned: outcome.abandoned,
            epsilon: self.spent(),
            evaluation,
            feedback: None,
            clip_norm: None,
        })
    }

    /// Hands one event to the engine, recording a commit or an abandonment; a refusal of
    /// what a simulated device did is an error.
    fn send(
        &mut self,
        round: u64,
        event: Event,
        device: &str,
        random: &mut EngineRandomness,
        outcome: &mut Outcome,
    ) -> Result<(), SimError> {
        let mut actions = self
            .engine
            .handle(event, self.now, &mut random.rng, &mut random.sampler);
        // A simulation keeps no store: a release the engine asks to record is recorded.
        if let Some(round) = fedpref_engine::engine::release_to_record(&actions) {
            actions.extend(self.engine.handle(
                Event::ReleaseRecorded { round },
                self.now,
                &mut random.rng,
                &mut random.sampler,
            ));
        }
        for a in actions {
            match a {
                Action::CommitRound(o) => {
                    outcome.contributions = o.participants.len() as u64;
                    outcome.ended = true;
                }
                Action::AbandonRound { reason, .. } => {
                    outcome.abandoned = Some(format!("secure aggregation: {reason}"));
                    outcome.ended = true;
                }
                Action::Reject { rejection, .. } => {
                    return Err(SimError::Refused {
                        round,
                        device: device.to_string(),
                        message: rejection.message,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// If the round is still in `stage` (someone did not answer), jumps the simulated clock
    /// to the stage's deadline and ticks, which closes it.
    fn close(
        &mut self,
        round: u64,
        anchor: &Task,
        stage: ServerStage,
        random: &mut EngineRandomness,
        outcome: &mut Outcome,
    ) -> Result<(), SimError> {
        if outcome.ended {
            return Ok(());
        }
        let current = self
            .engine
            .secure_stage(&anchor.device, anchor.round, &anchor.task_token)
            .map(|v| v.stage)
            .map_err(|r| SimError::Refused {
                round,
                device: anchor.device.clone(),
                message: r.message,
            })?;
        if current == stage {
            self.now = self.engine.next_wakeup().unwrap_or(self.now).max(self.now);
            self.send(round, Event::Tick, "(the clock)", random, outcome)?;
        }
        Ok(())
    }

    /// The device's input for the current stage (`StageInput::None` once it is out).
    fn input(&self, task: &Task) -> StageInput {
        self.engine
            .secure_stage(&task.device, task.round, &task.task_token)
            .map_or(StageInput::None, |v| v.input)
    }

    /// The four stages of one round (see the module docs).
    #[allow(clippy::too_many_arguments)]
    fn secure_round(
        &mut self,
        round: u64,
        config: &fedpref_secagg::RoundConfig,
        tasks: Vec<Task>,
        inputs: &[EncodedInput],
        dropouts: &Dropouts,
        random: &mut EngineRandomness,
        outcome: &mut Outcome,
    ) -> Result<(), SimError> {
        let mut keys_rng = simulation_rng(self.settings.seed, &[round]);
        let secagg = |e: fedpref_secagg::SecAggError| {
            SimError::Settings(format!("round {round}: secure aggregation failed: {e}"))
        };
        let anchor = tasks[0].clone();
        // Stage 1: advertise keys.
        let mut advertised = vec![];
        for (k, task) in tasks.into_iter().enumerate() {
            let number = k as u32 + 1;
            if dropouts.before_keys.contains(&number) {
                continue;
            }
            let (state, keys) = Client::advertise(config.clone(), &mut keys_rng).map_err(secagg)?;
            self.bytes_sent[0] += keys.wire_len() as u64;
            let event = Event::SecAggKeys {
                device: task.device.clone(),
                round: task.round,
                task_token: task.task_token.clone(),
                keys,
            };
            self.send(round, event, &task.device, random, outcome)?;
            advertised.push(Participant {
                number,
                task,
                state,
            });
        }
        self.close(round, &anchor, ServerStage::AdvertiseKeys, random, outcome)?;
        // Stage 2: share keys.
        let mut sharing = vec![];
        for p in advertised {
            if outcome.ended {
                break;
            }
            let StageInput::KeyDirectory(directory) = self.input(&p.task) else {
                continue;
            };
            if dropouts.before_shares.contains(&p.number) {
                continue;
            }
            let (state, shares) = p
                .state
                .share_keys(&directory, &mut keys_rng)
                .map_err(secagg)?;
            self.bytes_sent[1] += shares.wire_len() as u64;
            let event = Event::SecAggShares {
                device: p.task.device.clone(),
                round: p.task.round,
                task_token: p.task.task_token.clone(),
                shares,
            };
            self.send(round, event, &p.task.device, random, outcome)?;
            sharing.push(Participant {
                number: p.number,
                task: p.task,
                state,
            });
        }
        self.close(round, &anchor, ServerStage::ShareKeys, random, outcome)?;
        // Stage 3: masked input.
        let mut uploaded = vec![];
        for p in sharing {
            if outcome.ended {
                break;
            }
            let StageInput::ShareInbox(inbox) = self.input(&p.task) else {
                continue;
            };
            if dropouts.before_input.contains(&p.number) {
                continue;
            }
            let (state, masked) = p
                .state
                .masked_input(&inbox, &inputs[p.number as usize - 1])
                .map_err(secagg)?;
            self.bytes_sent[2] += masked.wire_len() as u64;
            let event = Event::MaskedUpdate {
                device: p.task.device.clone(),
                round: p.task.round,
                task_token: p.task.task_token.clone(),
                values: masked.values,
            };
            self.send(round, event, &p.task.device, random, outcome)?;
            uploaded.push(Participant {
                number: p.number,
                task: p.task,
                state,
            });
        }
        self.close(round, &anchor, ServerStage::MaskedInput, random, outcome)?;
        // Stage 4: unmasking.
        for p in uploaded {
            if outcome.ended {
                break;
            }
            let StageInput::UnmaskingPlan(plan) = self.input(&p.task) else {
                continue;
            };
            if dropouts.before_unmask.contains(&p.number) {
                continue;
            }
            let reply = p.state.unmask(&plan).map_err(secagg)?;
            self.bytes_sent[3] += reply.wire_len() as u64;
            let event = Event::SecAggUnmask {
                device: p.task.device.clone(),
                round: p.task.round,
                task_token: p.task.task_token.clone(),
                unmask: reply,
            };
            self.send(round, event, &p.task.device, random, outcome)?;
        }
        self.close(round, &anchor, ServerStage::Unmasking, random, outcome)?;
        if !outcome.ended {
            return Err(SimError::Settings(format!(
                "round {round}: the engine neither committed nor abandoned the round after its last stage"
            )));
        }
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
             and dp-ftrl's tree are not available in mode distributed (participation limits \
             are: --min-separation, --max-participations)",
            settings.server_optimizer.kind()
        )));
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
    // The sparse local round (the rated items' rows, their biases and the offset); secure
    // aggregation then needs the dense vector, masked and noised on every coordinate.
    let (_private, update) = local_round_sparse(model, &examples, training);
    let fit_ns = t.elapsed().as_nanos() as u64;
    let t = Instant::now();
    let clipped = clip_l2(update.to_dense(), clip_norm)?;
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
