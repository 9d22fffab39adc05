//! The round engine: a deterministic state machine with no sockets, clocks or global RNG.
//!
//! `Engine::handle(event, now, rng, sampler) -> Vec<Action>`. The caller passes the time, an
//! RNG (for selection coins and task tokens: OS-seeded ChaCha20 in production, seeded in
//! simulation) and the noise sampler; it executes the returned actions (send a task, write a
//! ledger entry and model version, publish) and calls `handle(Event::Tick, …)` when
//! [`Engine::next_wakeup`] has passed. The durable driver is
//! `fedpref_coordinator::coordinator::Coordinator`; simulations drive the engine directly.
//!
//! # Rounds
//! A round opens when a device checks in while the run is active, has rounds left and no
//! round is open (so an idle run writes nothing) — but first the engine asks the budget whether the round's release would take the run past its ε; if
//! so the run stops with a final ledger entry instead, so a run never overspends.
//!
//! - **Poisson sampling** (`sampling.kind = "poisson"`): each eligible device that checks in
//!   while the round is open is selected independently with probability q (one coin per
//!   device per round). The amplification claim covers exactly that population: the devices
//!   that checked in, eligible, during the round's window. It holds only against observers
//!   who do not learn who was selected.
//! - **Cohort** (`sampling.kind = "cohort"`): the first `target_size` eligible devices get a
//!   task; no amplification is claimed (q = 1 in the accountant).
//!
//! At the deadline a round with at least `minimum_size` contributions is aggregated, its
//! spend recorded (`Action::CommitRound`, carrying the ledger event) and its model published
//! (`Action::PublishModel`, always after the commit); a smaller round is abandoned: nothing
//! is released, nothing is spent, and the ledger says so.
//!
//! # Updates
//! One update per device per round. Stale round ids, unknown task tokens, devices that were
//! not selected, second uploads, wrong lengths and NaN/±∞ are rejected with a
//! [`Rejection`] whose kind maps to a gRPC status. In central mode every update is clipped to
//! C on the coordinator (devices are not trusted to have done it); in every DP mode updates are
//! weighted equally (devices send no example count); only runs without DP, driven by the
//! simulator, weigh by the example counts it passes in.
//!
//! A round in flight when the process dies is simply gone: nothing of it was released or
//! spent, and its round number is used again.
//!
//! # Participation limits
//! With `[participation]` in the manifest, a device whose committed participations would
//! break the limits gets no task: it is told to come back (reason `participation limit: …`)
//! when it may take part again. Limits count in **committed rounds** (releases), not round
//! numbers: an abandoned round releases nothing, so it does not separate two participations.
//! The history comes from the store ([`Engine::restore_participations`]) and is kept up to
//! date as rounds commit.
//!
//! # DP-FTRL
//! With `server_optimizer.kind = "dp-ftrl"` each committed round's clipped sum goes into a
//! binary tree ([`crate::aggregation::FtrlTree`], owned by [`crate::accounting::RunAccounting`]); Δ is the difference of consecutive noised prefix sums, and the
//! run's ε is the tree accountant's under the participation limits (no sampling assumed).
//! The tree's nodes live only in memory (they hold un-noised sums and secret noise): when
//! the process restarts, the engine starts a new **segment** with a new tree, and the
//! accountant charges the segments' ρ's added together ([`crate::ledger::TreeRound`]).
//! Restarts therefore never under-count ε; each one can cost some.
//!
//! # Distributed rounds
//! With `privacy_mode = "distributed"` a round is a secure-aggregation round
//! ([`crate::secure_round`]): it opens with a fresh round context and graph seed drawn from
//! the caller's RNG, gives the first n = `sampling.target_size` eligible devices a task and a
//! participant index while keys are advertised, and moves through the stages advertise keys →
//! share keys → masked input → unmasking on [`Event::SecAggKeys`], [`Event::SecAggShares`],
//! [`Event::MaskedUpdate`] and [`Event::SecAggUnmask`], each stage closing at its deadline or
//! as soon as it waits for nobody ([`Engine::next_wakeup`] is the current stage's deadline).
//! Devices read their input for a stage with [`Engine::secure_stage`]. When the sum is
//! unmasked it is decoded, scaled back to model units, divided by the number of contributors
//! and handed to the server optimiser; the round spends the distributed discrete Gaussian's
//! RDP (checked against the budget before the round opens) and its ledger entry names the
//! mechanism and the assumption. A stage that cannot go on abandons the round: nothing is
//! unmasked, released or spent.
//!
//! # Adaptive clipping
//! With `[adaptive_clipping]` the engine computes each accepted update's centred clip bit
//! against the current C from the update itself (in central mode the coordinator sees the
//! update before clipping it, so a device's own bit would add nothing it could be trusted
//! for), releases the noised bit sum when the round commits and moves C toward the target
//! quantile. Per-round optimisers use the new C from the next round; dp-ftrl from the next
//! tree.
//!
//! In local mode the coordinator sees only noised updates, so the bits come from the devices:
//! each task carries the round's C and asks for a bit ([`Task::clip_bit_noise_std`]); each
//! upload must carry the device's noised bit and repeat C ([`ClipBit`]); the engine sums the
//! centred noised bits (b + noise − ½) of the accepted updates and, when the round commits,
//! moves C with that sum. It adds no noise of its own: every bit is already protected by its
//! device's N(0, σ_b²) (local DP, replace-one, sensitivity 1), and the pair (update, bit) is
//! accounted per upload as the manifest's combined multiplier z on the device and in the
//! ledger (see [`fedpref_privacy::adaptive_clip::local_upload_noise_multiplier`]). The ε
//! then rests on no sampling assumption (worst case per device, its own uploads).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fedpref_privacy::adaptive_clip::centred_bit;
use fedpref_privacy::tree::ParticipationLimits;
use fedpref_privacy::{ClippedSum, GaussianSampler, Provenance};
use rand_core::Rng;

use fedpref_secagg::{AdvertiseKeys, AggregateOutput};

use crate::accounting::{CommitSpend, RunAccounting};
use crate::aggregation::{Aggregate, AggregationPrivacy, RoundAggregator, ServerState, apply};
use crate::ledger::{AudienceEpsilon, LedgerEvent};
use crate::manifest::{ManifestPrivacyMode, RunManifest, SamplingSpec};
use crate::model::encode;
use crate::secure_round::{Ending, SecureRound, StageView};

pub use crate::protocol::{
    Action, AdminCommand, ClipBit, Event, RejectKind, Rejection, ReleaseRecord, RoundOutcome,
    RunState, Task, release_to_record,
};

/// What an upload says besides its values.
struct UploadMeta {
    examples: u64,
    clip_bit: Option<ClipBit>,
}

/// An upload's values: a device's dense update, or a simulated sparse un-noised one.
#[derive(Clone, Copy)]
enum Upload<'a> {
    Dense(&'a [f32]),
    Simulated {
        indices: &'a [u32],
        values: &'a [f32],
    },
}

/// Where a run stands, for [`Engine::restore`].
#[derive(Clone, Debug)]
pub struct Progress {
    /// The state.
    pub state: RunState,
    /// Rounds committed.
    pub rounds_committed: u64,
    /// The next round number.
    pub next_round: u64,
    /// The newest model version.
    pub current_version: u64,
    /// That version's parameters.
    pub params: Vec<f32>,
    /// The server optimiser's state.
    pub server_state: ServerState,
    /// Releases the ledger charges beyond the committed rounds: local rounds charged when an
    /// update arrived, then abandoned (or open when the process stopped).
    pub uncommitted_charges: u64,
}

struct OpenRound {
    round: u64,
    deadline_ms: i64,
    tasks: HashMap<String, String>,
    not_selected: HashSet<String>,
    /// The devices whose updates were accepted, in the order they arrived.
    uploaded: Vec<String>,
    /// The same devices, for membership checks in constant time.
    uploaded_set: HashSet<String>,
    aggregator: RoundAggregator,
    /// The clip norm this round's updates are clipped to.
    clip_norm: f64,
    /// Adaptive clipping: the centred bits of the accepted updates, against `bit_clip_norm`.
    bits: Option<ClippedSum>,
    /// The C the bits are computed against (the clipper's current C).
    bit_clip_norm: f64,
    /// Adaptive clipping in local mode: the sum of the accepted devices' centred noised bits
    /// (no coordinator noise: each device noised its own).
    device_bits: Option<f64>,
    /// Distributed mode: the secure-aggregation round.
    secure: Option<SecureRound>,
    /// Local mode: whether the round's spend was charged (the first update header arrived).
    charged: bool,
}

/// The last sum a distributed round unmasked (the round's release, before the server
/// optimiser), kept for simulations and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct UnmaskedSum {
    /// The round.
    pub round: u64,
    /// The centred integer sum of the contributors' encoded, noised inputs.
    pub integers: Vec<i64>,
    /// The contributors' device ids.
    pub contributors: Vec<String>,
}

/// The round engine for one run.
pub struct Engine {
    run_id: String,
    manifest: RunManifest,
    /// The budget, the audiences' ε, participation history, DP-FTRL's tree, adaptive
    /// clipping and distributed accounting.
    accounting: RunAccounting,
    state: RunState,
    progress_rounds: u64,
    /// Set while an operator's command is handled: a distributed round that becomes ready
    /// to unmask then is abandoned with nothing spent, since the command would end it
    /// before its sum could be used.
    holding_release: bool,
    next_round: u64,
    version: u64,
    params: Vec<f32>,
    server_state: ServerState,
    open: Option<OpenRound>,
    /// Distributed mode: every public key (encryption or masking) a device advertised in an
    /// earlier or the current round of this run, since the engine was created or restored. A
    /// key is never accepted twice: a device reusing its masking key could, by surviving one
    /// round and dropping in another, hand the coordinator both its self-mask seed and its
    /// masking key for the first.
    seen_keys: Option<HashSet<[u8; 32]>>,
    last_unmasked: Option<UnmaskedSum>,
    ended_secure: Option<EndedSecureRound>,
}

/// The last distributed round that ended, so its devices can still learn how (`GetStage`).
struct EndedSecureRound {
    round: u64,
    tasks: HashMap<String, String>,
    stage: fedpref_secagg::ServerStage,
    end_ms: i64,
}

impl Engine {
    /// A fresh run at version 1 (the initial model) with the given parameters.
    pub fn new(run_id: &str, manifest: RunManifest, params: Vec<f32>) -> Self {
        let server_state = ServerState::new(&manifest.server_optimizer, params.len());
        Self::restore(
            run_id,
            manifest,
            Progress {
                state: RunState::Active,
                rounds_committed: 0,
                next_round: 1,
                current_version: 1,
                params,
                server_state,
                uncommitted_charges: 0,
            },
        )
    }

    /// An engine resumed from stored progress: the budget is rebuilt by spending the
    /// manifest's release once per committed round, exactly as the ledger recorded it
    /// ([`RunAccounting::restore`]).
    pub fn restore(run_id: &str, manifest: RunManifest, progress: Progress) -> Self {
        let mut server_state = progress.server_state;
        let accounting = RunAccounting::restore(
            &manifest,
            progress.rounds_committed,
            progress.uncommitted_charges,
            &mut server_state,
            progress.params.len(),
        );
        let state = if accounting.overspent() {
            RunState::Stopped
        } else {
            progress.state
        };
        Self {
            run_id: run_id.to_string(),
            seen_keys: accounting.is_distributed().then(HashSet::new),
            accounting,
            manifest,
            state,
            progress_rounds: progress.rounds_committed,
            holding_release: false,
            next_round: progress.next_round,
            version: progress.current_version,
            params: progress.params,
            server_state,
            open: None,
            last_unmasked: None,
            ended_secure: None,
        }
    }

    /// Loads the participation history from the store: `committed_rounds` are the run's
    /// committed round numbers in order (a round's position is its release index), and
    /// `by_device` the round numbers each device took part in. Rounds not in
    /// `committed_rounds` are ignored.
    pub fn restore_participations(
        &mut self,
        committed_rounds: &[u64],
        by_device: &[(String, Vec<u64>)],
    ) {
        self.accounting
            .restore_participations(committed_rounds, by_device);
    }

    /// Distributed mode: the number of rounds whose release the store recorded (committed or
    /// not; see [`Action::RecordRelease`]). The accountant is rebuilt from it, since a release
    /// recorded just before a crash was spent although it never committed. Other modes
    /// ignore it. `cap_recorded`: whether the run's `run_created` entry names its
    /// participation limits (a run created before they bounded the ε composes every release).
    pub fn restore_releases(&mut self, released: u64, cap_recorded: bool) {
        self.accounting.restore_releases(released, cap_recorded);
        if self.accounting.overspent() {
            self.state = RunState::Stopped;
        }
    }

    /// The participation limits in force, if any.
    pub fn participation_limits(&self) -> Option<ParticipationLimits> {
        self.accounting.participation_limits()
    }

    /// The run's accounting: budget, audiences, participations, clipping, trees.
    pub fn accounting(&self) -> &RunAccounting {
        &self.accounting
    }

    /// The clip norm C the next round will use (the manifest's, or adaptive clipping's
    /// current one).
    pub fn clip_norm(&self) -> f64 {
        self.accounting.clip_norm()
    }

    /// Adaptive clipping's C before each update so far in this process (the ledger holds the
    /// whole run's), or `None` without adaptive clipping.
    pub fn clip_trajectory(&self) -> Option<&[f64]> {
        self.accounting.clip_trajectory()
    }

    /// The sentence naming the assumption the run's ε rests on.
    pub fn epsilon_assumption(&self) -> String {
        self.manifest.epsilon_assumption()
    }

    /// The run's state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Rounds committed.
    pub fn rounds_committed(&self) -> u64 {
        self.progress_rounds
    }

    /// The newest model version and its parameters.
    pub fn model(&self) -> (u64, &[f32]) {
        (self.version, &self.params)
    }

    /// The open round's number, if any.
    pub fn open_round(&self) -> Option<u64> {
        self.open.as_ref().map(|r| r.round)
    }

    /// Whether a device's update at `now_ms` is handled in memory alone: a plain round is open
    /// and its deadline has not passed, so the event cannot close the round (no commit, nothing
    /// written). Distributed rounds advance their stages on any event, so they never are.
    pub fn update_stays_in_memory(&self, now_ms: i64) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.secure.is_none() && now_ms < o.deadline_ms)
    }

    /// Cumulative ε per tracked audience at the run's δ.
    pub fn spent(&self) -> Vec<AudienceEpsilon> {
        self.accounting.spent()
    }

    /// When the driver must call `handle(Event::Tick, …)` next (the open round's deadline,
    /// or in distributed mode its current stage's).
    pub fn next_wakeup(&self) -> Option<i64> {
        self.open.as_ref().map(|r| match &r.secure {
            Some(secure) => secure.stage_deadline(),
            None => r.deadline_ms,
        })
    }

    /// The last sum a distributed round unmasked, if any in this process.
    pub fn last_unmasked_sum(&self) -> Option<&UnmaskedSum> {
        self.last_unmasked.as_ref()
    }

    /// Distributed mode: the open round's stage as `device` sees it, with its input for it
    /// (`GetStage`). Checks the round, the task token and the device like an upload.
    pub fn secure_stage(
        &self,
        device: &str,
        round: u64,
        task_token: &str,
    ) -> Result<StageView, Rejection> {
        if let Some(ended) = &self.ended_secure
            && ended.round == round
            && self.open.as_ref().is_none_or(|o| o.round != round)
        {
            return match ended.tasks.get(device) {
                Some(t) if t.as_bytes() == task_token.as_bytes() => Ok(StageView {
                    stage: ended.stage.clone(),
                    deadline_ms: ended.end_ms,
                    input: crate::secure_round::StageInput::None,
                    poll_after_ms: crate::secure_round::poll_after_ms(1),
                }),
                Some(_) => Err(Rejection {
                    kind: RejectKind::InvalidArgument,
                    message: "unknown task token".into(),
                }),
                None => Err(Rejection {
                    kind: RejectKind::FailedPrecondition,
                    message: format!("this device was not selected for round {round}"),
                }),
            };
        }
        let open = self.task_round(device, round, task_token)?;
        let secure = open.secure.as_ref().ok_or_else(|| Rejection {
            kind: RejectKind::FailedPrecondition,
            message: format!(
                "run {:?} is in privacy mode {}, which has no secure-aggregation stages",
                self.run_id,
                self.manifest.privacy_mode.as_str()
            ),
        })?;
        secure.view(device)
    }

    /// The open round, if `device` holds the task `task_token` in round `round`.
    fn task_round(
        &self,
        device: &str,
        round: u64,
        task_token: &str,
    ) -> Result<&OpenRound, Rejection> {
        let failed = |message: String| Rejection {
            kind: RejectKind::FailedPrecondition,
            message,
        };
        let open = self
            .open
            .as_ref()
            .ok_or_else(|| failed(format!("round {round} is not open: no round is open")))?;
        if round != open.round {
            return Err(failed(format!(
                "stale round id {round}: round {} is open",
                open.round
            )));
        }
        match open.tasks.get(device) {
            None => Err(failed(format!(
                "this device was not selected for round {round}"
            ))),
            Some(t) if t.as_bytes() != task_token.as_bytes() => Err(Rejection {
                kind: RejectKind::InvalidArgument,
                message: "unknown task token".into(),
            }),
            Some(_) => Ok(open),
        }
    }

    /// Handles one event at time `now` (ms since the epoch).
    pub fn handle<R: Rng + ?Sized, S: GaussianSampler>(
        &mut self,
        event: Event,
        now: i64,
        rng: &mut R,
        sampler: &mut S,
    ) -> Vec<Action> {
        let mut actions = vec![];
        self.holding_release = matches!(event, Event::Admin(_));
        self.close_if_due(now, rng, sampler, &mut actions);
        self.holding_release = false;
        match event {
            Event::Tick => {
                self.stop_if_done(&mut actions);
            }
            Event::CheckIn { device, eligible } => {
                self.open_if_possible(now, rng, &mut actions);
                self.check_in(device, eligible, now, rng, &mut actions);
            }
            Event::Update {
                device,
                round,
                task_token,
                values,
                examples,
                clip_bit,
            } => self.update(
                device,
                round,
                &task_token,
                Upload::Dense(&values),
                UploadMeta { examples, clip_bit },
                &mut actions,
            ),
            Event::SimulatedUpdate {
                device,
                round,
                task_token,
                indices,
                values,
                examples,
                clip_bit,
            } => self.update(
                device,
                round,
                &task_token,
                Upload::Simulated {
                    indices: &indices,
                    values: &values,
                },
                UploadMeta { examples, clip_bit },
                &mut actions,
            ),
            Event::UpdateHeader {
                device,
                round,
                task_token,
            } => match self.check_update_header(&device, round, &task_token) {
                Err(rejection) => actions.push(Action::Reject { device, rejection }),
                Ok(()) => {
                    if let Err(rejection) = self.charge_open_round(&mut actions) {
                        actions.push(Action::Reject { device, rejection });
                    }
                }
            },
            Event::Decline {
                device,
                round,
                task_token,
            } => self.decline(device, round, &task_token, &mut actions),
            Event::SecAggKeys {
                device,
                round,
                task_token,
                keys,
            } => {
                if let Some(rejection) = self.reused_key(&keys) {
                    actions.push(Action::Reject { device, rejection });
                } else {
                    let sender = device.clone();
                    let pair = [keys.encryption_public_key, keys.masking_public_key];
                    self.secure_message(
                        device,
                        round,
                        &task_token,
                        now,
                        rng,
                        &mut actions,
                        |s, d| s.receive_keys(d, keys),
                    );
                    let accepted = actions.iter().any(
                        |a| matches!(a, Action::SecAggAccepted { device, .. } if *device == sender),
                    );
                    if let (true, Some(seen)) = (accepted, self.seen_keys.as_mut()) {
                        seen.extend(pair);
                    }
                }
            }
            Event::SecAggShares {
                device,
                round,
                task_token,
                shares,
            } => self.secure_message(
                device,
                round,
                &task_token,
                now,
                rng,
                &mut actions,
                |s, d| s.receive_shares(d, shares),
            ),
            Event::MaskedUpdate {
                device,
                round,
                task_token,
                values,
            } => self.secure_message(
                device,
                round,
                &task_token,
                now,
                rng,
                &mut actions,
                |s, d| s.receive_masked_input(d, values),
            ),
            Event::SecAggUnmask {
                device,
                round,
                task_token,
                unmask,
            } => self.secure_message(
                device,
                round,
                &task_token,
                now,
                rng,
                &mut actions,
                |s, d| s.receive_unmask(d, unmask),
            ),
            Event::ReleaseRecorded { round } => {
                if let Some(secure) = self
                    .open
                    .as_mut()
                    .filter(|o| o.round == round)
                    .and_then(|o| o.secure.as_mut())
                {
                    secure.release_recorded();
                }
                self.advance_secure(now, rng, &mut actions);
            }
            Event::Admin(cmd) => self.admin(cmd, now, &mut actions),
        }
        actions
    }

    fn check_in<R: Rng + ?Sized>(
        &mut self,
        device: String,
        eligible: bool,
        now: i64,
        rng: &mut R,
        actions: &mut Vec<Action>,
    ) {
        let later = |reason: &str, at: i64| Action::ComeBackLater {
            device: device.clone(),
            retry_at_ms: at,
            reason: reason.to_string(),
        };
        let Some(open) = self.open.as_mut() else {
            let reason = match self.state {
                RunState::Active => "no round is open",
                RunState::Paused => "the run is paused",
                RunState::Stopped => "the run has stopped",
            };
            actions.push(later(reason, now + self.manifest.sampling.round_millis()));
            return;
        };
        if !eligible {
            actions.push(later("the device is not eligible now", open.deadline_ms));
            return;
        }
        if let Some(token) = open.tasks.get(&device) {
            if open.uploaded_set.contains(&device) {
                // A distributed round's stages close as soon as they wait for nobody, long
                // before its planned deadlines: come back when the current stage ends.
                let at = open
                    .secure
                    .as_ref()
                    .map_or(open.deadline_ms, |s| s.stage_deadline());
                actions.push(later(
                    "this device has already contributed to the open round",
                    at,
                ));
            } else {
                actions.push(Action::SendTask(task_in(
                    open,
                    &device,
                    token.clone(),
                    self.version,
                    self.manifest.bit_noise_std(),
                )));
            }
            return;
        }
        if open.not_selected.contains(&device) {
            actions.push(later("not selected for this round", open.deadline_ms));
            return;
        }
        {
            let release = self.progress_rounds + 1;
            if let Some(refusal) = self.accounting.limit_refusal(&device, release) {
                let round_ms = self.manifest.sampling.round_millis();
                let (retry_at_ms, detail) = match refusal.next_allowed {
                    // Each release takes at least one round window: release n cannot open
                    // before (n − release − 1) windows after this round's deadline.
                    Some(n) => (
                        open.deadline_ms
                            .saturating_add(round_ms.saturating_mul((n - release - 1) as i64)),
                        format!(
                            "participation limit: at most once every {} committed rounds; this device may take part again from committed round {n}",
                            refusal.min_separation
                        ),
                    ),
                    None => (
                        now.saturating_add(round_ms.saturating_mul(
                            self.manifest.rounds.saturating_sub(self.progress_rounds) as i64,
                        )),
                        format!(
                            "participation limit: this device has taken part {} times, the most this run allows",
                            refusal.count
                        ),
                    ),
                };
                actions.push(later(&detail, retry_at_ms));
                return;
            }
        }
        let selected = match (open.secure.as_mut(), &self.manifest.sampling) {
            // Distributed mode: the first n devices while keys are being advertised.
            (Some(secure), _) => secure.assign(&device).is_some(),
            (None, SamplingSpec::Poisson { rate, .. }) => bernoulli(rng, *rate),
            (None, SamplingSpec::Cohort { target_size, .. }) => {
                open.tasks.len() < *target_size as usize
            }
        };
        if !selected {
            open.not_selected.insert(device.clone());
            actions.push(later("not selected for this round", open.deadline_ms));
            return;
        }
        let token = task_token(rng);
        open.tasks.insert(device.clone(), token.clone());
        actions.push(Action::SendTask(task_in(
            open,
            &device,
            token,
            self.version,
            self.manifest.bit_noise_std(),
        )));
    }

    fn update(
        &mut self,
        device: String,
        round: u64,
        task_token: &str,
        upload: Upload<'_>,
        UploadMeta { examples, clip_bit }: UploadMeta,
        actions: &mut Vec<Action>,
    ) {
        let reject = |kind, message: String| Action::Reject {
            device: device.clone(),
            rejection: Rejection { kind, message },
        };
        if let Err(rejection) = self.check_update_header(&device, round, task_token) {
            actions.push(Action::Reject { device, rejection });
            return;
        }
        // A driver that did not send the header first is charged here, still before the
        // update is looked at.
        if let Err(rejection) = self.charge_open_round(actions) {
            actions.push(Action::Reject { device, rejection });
            return;
        }
        let Some(open) = self.open.as_mut() else {
            unreachable!("check_update_header found the round open");
        };
        if open.secure.is_some() {
            actions.push(reject(
                RejectKind::InvalidArgument,
                format!(
                    "round {round} is a distributed round: it takes a masked DTYPE_U32 input, not a plain update"
                ),
            ));
            return;
        }
        // Adaptive clipping in local mode: the device's noised bit, for the round's C.
        let device_bit = match (open.device_bits.is_some(), clip_bit) {
            (true, Some(b)) => {
                if b.clip_norm != open.clip_norm {
                    actions.push(reject(
                        RejectKind::InvalidArgument,
                        format!(
                            "header.clip_norm {} is not round {round}'s clip norm {}",
                            b.clip_norm, open.clip_norm
                        ),
                    ));
                    return;
                }
                if let Err(message) = check_clip_bit(b.noised_bit, &self.manifest) {
                    actions.push(reject(RejectKind::InvalidArgument, message));
                    return;
                }
                Some(b.noised_bit - 0.5)
            }
            (true, None) => {
                actions.push(reject(
                    RejectKind::InvalidArgument,
                    format!(
                        "header.clip_bit is missing: round {round}'s task requested a clip bit"
                    ),
                ));
                return;
            }
            (false, Some(_)) => {
                actions.push(reject(
                    RejectKind::InvalidArgument,
                    format!("header.clip_bit must be unset: round {round}'s task did not request a clip bit"),
                ));
                return;
            }
            (false, None) => None,
        };
        // Under DP every update weighs the same: central DP because each contribution has
        // sensitivity C, local DP because a device sends nothing unnoised about its data (no
        // example count). Only runs without DP (the simulator's) weigh by example count.
        let weight = match self.manifest.aggregation_privacy() {
            AggregationPrivacy::None => examples.max(1) as f64,
            _ => 1.0,
        };
        // The clip bit is computed before the update enters the aggregator (which refuses
        // NaN and wrong lengths itself; such an update adds no bit either).
        // A simulated update stands in for a device's noised one: local mode's σC goes
        // into the aggregate noise draw, and the update must be clipped to the round's C.
        let simulated_noise_std = match self.manifest.privacy_mode {
            ManifestPrivacyMode::Local => self.manifest.task_noise_multiplier() * open.clip_norm,
            _ => 0.0,
        };
        if let Upload::Simulated { values, .. } = upload {
            let limit = match self.manifest.privacy_mode {
                ManifestPrivacyMode::Local => Some(open.clip_norm),
                ManifestPrivacyMode::None => None,
                mode => {
                    actions.push(reject(
                        RejectKind::InvalidArgument,
                        format!(
                            "a simulated sparse update is refused in privacy mode {}: it is taken in modes none and local only",
                            mode.as_str()
                        ),
                    ));
                    return;
                }
            };
            let norm = fedpref_privacy::sum_of_squares_f32(values).sqrt();
            // The f32 rounding of a clipped update can lift its norm by a few ulps.
            if let Some(c) = limit
                && norm > c * (1.0 + 1e-5)
            {
                actions.push(reject(
                    RejectKind::InvalidArgument,
                    format!(
                        "the simulated update's norm {norm} exceeds round {round}'s clip norm {c}: it must be clipped"
                    ),
                ));
                return;
            }
        }
        let values = match upload {
            Upload::Dense(values) => values,
            Upload::Simulated { values, .. } => values,
        };
        let bit = match &open.bits {
            Some(_) if matches!(upload, Upload::Dense(v) if v.len() == open.aggregator.dimension()) =>
            {
                let norm = fedpref_privacy::sum_of_squares_f32(values).sqrt();
                centred_bit(norm, open.bit_clip_norm).ok()
            }
            _ => None,
        };
        let added = match upload {
            Upload::Dense(values) => open.aggregator.add(values, weight),
            Upload::Simulated { indices, values } => {
                open.aggregator
                    .add_simulated(indices, values, weight, simulated_noise_std)
            }
        };
        match added {
            Ok(()) => {
                if let (Some(bits), Some(bit)) = (open.bits.as_mut(), bit) {
                    // One device moves the bit sum by at most ½; a failure here would be
                    // a lattice overflow, which the bit mechanism's σ rules out.
                    let _ = bits.add(&bit, 1.0);
                }
                if let (Some(sum), Some(bit)) = (open.device_bits.as_mut(), device_bit) {
                    *sum += bit;
                }
                open.uploaded.push(device.clone());
                open.uploaded_set.insert(device.clone());
                actions.push(Action::UpdateAccepted { device, round });
            }
            Err(e) => actions.push(reject(RejectKind::InvalidArgument, e.to_string())),
        }
    }

    /// Checks an update's header against the device's task: the round is open, the device
    /// was given a task in it with this token, and has not uploaded yet.
    fn check_update_header(
        &self,
        device: &str,
        round: u64,
        task_token: &str,
    ) -> Result<(), Rejection> {
        let reject = |kind, message: String| Err(Rejection { kind, message });
        let Some(open) = self.open.as_ref() else {
            return reject(
                RejectKind::FailedPrecondition,
                format!("round {round} is not open: no round is open"),
            );
        };
        if round != open.round {
            return reject(
                RejectKind::FailedPrecondition,
                format!("stale round id {round}: round {} is open", open.round),
            );
        }
        match open.tasks.get(device) {
            None => {
                return reject(
                    RejectKind::FailedPrecondition,
                    format!("this device was not selected for round {round}"),
                );
            }
            Some(t) if t.as_bytes() != task_token.as_bytes() => {
                return reject(RejectKind::InvalidArgument, "unknown task token".into());
            }
            Some(_) => {}
        }
        if open.uploaded_set.contains(device) {
            return reject(
                RejectKind::FailedPrecondition,
                format!("this device has already uploaded an update for round {round}"),
            );
        }
        Ok(())
    }

    /// Whether an update header for `round` would charge it now ([`Action::ChargeRound`]):
    /// a local round, open, not yet charged.
    pub fn update_header_charges(&self, round: u64) -> bool {
        self.charges_local_rounds()
            && self
                .open
                .as_ref()
                .is_some_and(|o| o.round == round && !o.charged && o.secure.is_none())
    }

    /// Local mode with per-round accounting: every upload is a release to the coordinator.
    fn charges_local_rounds(&self) -> bool {
        self.accounting.charges_local_rounds()
    }

    /// Charges the open round once, in local mode: spends its release from the budget, adds
    /// it to the run's ε and asks the driver to record it. The round only opened if one more
    /// release fitted the budget, so refusing here means the manifest changed under us.
    fn charge_open_round(&mut self, actions: &mut Vec<Action>) -> Result<(), Rejection> {
        if !self.charges_local_rounds() {
            return Ok(());
        }
        let Some(round) = self.open.as_ref().filter(|o| !o.charged).map(|o| o.round) else {
            return Ok(());
        };
        let (increments, cumulative_epsilon) =
            self.accounting.charge_local().map_err(|e| Rejection {
                kind: RejectKind::FailedPrecondition,
                message: format!("round {round} cannot take updates: refused by the budget: {e}"),
            })?;
        if let Some(open) = self.open.as_mut() {
            open.charged = true;
        }
        actions.push(Action::ChargeRound {
            round,
            event: LedgerEvent::RoundCharged {
                round,
                noise_multiplier: self.manifest.noise_multiplier.unwrap_or(0.0),
                mode: self.manifest.privacy_mode.as_str().to_string(),
                rdp_increments: increments,
                cumulative_epsilon,
            },
        });
        Ok(())
    }

    fn decline(&mut self, device: String, round: u64, task_token: &str, actions: &mut Vec<Action>) {
        let reject = |kind, message: String| Action::Reject {
            device: device.clone(),
            rejection: Rejection { kind, message },
        };
        let Some(open) = self.open.as_mut().filter(|o| o.round == round) else {
            actions.push(reject(
                RejectKind::FailedPrecondition,
                format!("round {round} is not open"),
            ));
            return;
        };
        match open.tasks.get(&device) {
            Some(t) if t.as_bytes() == task_token.as_bytes() => {}
            Some(_) => {
                actions.push(reject(
                    RejectKind::InvalidArgument,
                    "unknown task token".into(),
                ));
                return;
            }
            None => {
                actions.push(reject(
                    RejectKind::FailedPrecondition,
                    format!("this device has no task in round {round}"),
                ));
                return;
            }
        }
        if open.uploaded_set.contains(&device) {
            actions.push(reject(
                RejectKind::FailedPrecondition,
                format!("this device has already uploaded an update for round {round}"),
            ));
            return;
        }
        open.tasks.remove(&device);
        if let Some(secure) = open.secure.as_mut() {
            secure.release(&device);
        }
        open.not_selected.insert(device.clone());
        actions.push(Action::TaskDeclined { device, round });
    }

    fn admin(&mut self, cmd: AdminCommand, now: i64, actions: &mut Vec<Action>) {
        match cmd {
            AdminCommand::Pause { reason } if self.state == RunState::Active => {
                self.abandon_open(now, "the run was paused", actions);
                self.state = RunState::Paused;
                actions.push(Action::StatusChanged {
                    status: RunState::Paused,
                    event: LedgerEvent::Paused { reason },
                });
            }
            AdminCommand::Resume { reason } if self.state == RunState::Paused => {
                self.state = RunState::Active;
                actions.push(Action::StatusChanged {
                    status: RunState::Active,
                    event: LedgerEvent::Resumed { reason },
                });
            }
            AdminCommand::Stop { reason } if self.state != RunState::Stopped => {
                self.abandon_open(now, "the run was stopped", actions);
                self.stop(reason, actions);
            }
            AdminCommand::Rollback {
                to_version,
                params,
                reason,
            } if params.len() == self.params.len() => {
                self.abandon_open(now, "the model was rolled back", actions);
                self.version += 1;
                self.params.clone_from(&params);
                let tree_progress = self.server_state.tree_progress().cloned();
                let clip_norm = self.server_state.clip_norm();
                self.server_state = ServerState::new(&self.manifest.server_optimizer, params.len());
                self.server_state.set_tree_progress(tree_progress);
                self.server_state.set_clip_norm(clip_norm);
                let model = encode(&self.run_id, self.version, 0, &self.manifest.model, &params);
                actions.push(Action::RolledBack {
                    to_version,
                    new_version: self.version,
                    model,
                    server_state: serde_json::to_string(&self.server_state).expect("serialisable"),
                    reason,
                });
            }
            other => actions.push(Action::AdminRefused {
                message: format!(
                    "{} is not possible while the run is {}",
                    other.name(),
                    self.state.as_str()
                ),
            }),
        }
    }

    /// A plain round that fails after its deadline (aggregation or the server optimiser):
    /// it is abandoned, nothing is published from it. In a DP-FTRL run the tree may already
    /// hold the round's updates, so the run also stops ([`Self::abandon_tree_round`]).
    fn fail_plain_round(
        &mut self,
        round: u64,
        contributions: usize,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        if self.accounting.is_tree() {
            self.abandon_tree_round(round, contributions, reason, actions);
        } else {
            actions.push(Action::AbandonRound {
                round,
                contributions: contributions as u64,
                reason,
            });
        }
    }

    /// A DP-FTRL round that cannot be committed after the tree may have taken its sum: the
    /// round is abandoned (nothing is published from it) and the run stops, because the
    /// tree's exact sums may now hold that round's updates and any later release from the
    /// same tree would publish them without their participations and ρ being counted.
    fn abandon_tree_round(
        &mut self,
        round: u64,
        contributions: usize,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        self.accounting.retire_tree(&reason);
        actions.push(Action::AbandonRound {
            round,
            contributions: contributions as u64,
            reason: reason.clone(),
        });
        self.stop(
            format!(
                "DP-FTRL cannot continue: round {round} failed after tree aggregation ({reason})"
            ),
            actions,
        );
    }

    fn stop(&mut self, reason: String, actions: &mut Vec<Action>) {
        self.state = RunState::Stopped;
        actions.push(Action::StatusChanged {
            status: RunState::Stopped,
            event: LedgerEvent::RunStopped {
                reason,
                rounds_committed: self.progress_rounds,
                cumulative_epsilon: self.spent(),
            },
        });
    }

    /// Stops the run if it is complete or the next round would exceed the budget. Returns
    /// whether a round may open.
    fn stop_if_done(&mut self, actions: &mut Vec<Action>) -> bool {
        if self.state != RunState::Active || self.open.is_some() {
            return false;
        }
        if self.progress_rounds >= self.manifest.rounds {
            self.stop("completed".into(), actions);
            return false;
        }
        if let Err(reason) = self.accounting.check_next_round(&self.manifest) {
            self.stop(reason, actions);
            return false;
        }
        true
    }

    /// Opens a round when a device asks for work and the run can take one. Rounds open on
    /// check-in only, so an idle run writes nothing to the ledger.
    fn open_if_possible<R: Rng + ?Sized>(
        &mut self,
        now: i64,
        rng: &mut R,
        actions: &mut Vec<Action>,
    ) {
        if !self.stop_if_done(actions) {
            return;
        }
        let secure = match self.accounting.distributed_plan() {
            Some(plan) => match SecureRound::open(plan, now, rng) {
                Ok(round) => Some(round),
                Err(e) => {
                    // The plan is validated with the manifest; a failure here means the
                    // secure-aggregation config no longer holds, so nothing may be released.
                    self.stop(
                        format!("secure aggregation refused the round's config: {e}"),
                        actions,
                    );
                    return;
                }
            },
            None => None,
        };
        let clip_norm = self.clip_norm();
        let privacy = match self.manifest.aggregation_privacy() {
            AggregationPrivacy::Central {
                noise_multiplier,
                expected_cohort_size,
                ..
            } => AggregationPrivacy::Central {
                clip_norm,
                noise_multiplier,
                expected_cohort_size,
            },
            other => other,
        };
        let aggregator = match RoundAggregator::new(
            &self.manifest.server_optimizer,
            &privacy,
            self.params.len(),
        ) {
            Ok(a) => a,
            Err(e) => {
                // The manifest's settings are validated; only an adaptive clip norm that
                // wandered out of the lattice's range can get here. Stop rather than
                // release anything under settings that no longer hold.
                self.stop(
                    format!("the round aggregator refused clip norm C = {clip_norm}: {e}"),
                    actions,
                );
                return;
            }
        };
        let (bits, bit_clip_norm, device_bits) =
            self.accounting.begin_bits(self.manifest.local_clip_bits());
        self.open = Some(OpenRound {
            round: self.next_round,
            deadline_ms: secure.as_ref().map_or(
                now + self.manifest.sampling.round_millis(),
                SecureRound::end_ms,
            ),
            secure,
            tasks: HashMap::new(),
            not_selected: HashSet::new(),
            uploaded: vec![],
            uploaded_set: HashSet::new(),
            aggregator,
            clip_norm,
            bits,
            bit_clip_norm,
            device_bits,
            charged: false,
        });
    }

    fn abandon_open(&mut self, _now: i64, reason: &str, actions: &mut Vec<Action>) {
        if let Some(open) = self.open.take() {
            self.remember_ended(&open, fedpref_secagg::ServerStage::Aborted(reason.into()));
            actions.push(Action::AbandonRound {
                round: open.round,
                contributions: open.uploaded.len() as u64,
                reason: reason.to_string(),
            });
            self.next_round = open.round + 1;
        }
    }

    fn close_if_due<R: Rng + ?Sized, S: GaussianSampler>(
        &mut self,
        now: i64,
        rng: &mut R,
        sampler: &mut S,
        actions: &mut Vec<Action>,
    ) {
        if self.open.as_ref().is_some_and(|o| o.secure.is_some()) {
            self.advance_secure(now, rng, actions);
            return;
        }
        let due = matches!(&self.open, Some(open) if now >= open.deadline_ms);
        if !due {
            return;
        }
        let open = self.open.take().expect("checked");
        self.next_round = open.round + 1;
        let minimum = self.manifest.sampling.minimum_size() as usize;
        let contributions = open.uploaded.len();
        if contributions < minimum {
            actions.push(Action::AbandonRound {
                round: open.round,
                contributions: contributions as u64,
                reason: format!(
                    "{contributions} contributions at the deadline, fewer than the minimum of {minimum}"
                ),
            });
            return;
        }
        let finished = match self.accounting.ftrl_tree() {
            Some(Ok(tree)) => open.aggregator.finish_tree(tree, sampler),
            Some(Err(e)) => {
                let reason = format!("tree aggregation is unavailable: {e}");
                self.abandon_tree_round(open.round, contributions, reason, actions);
                return;
            }
            None => open.aggregator.finish(sampler),
        };
        let aggregate = match finished {
            Ok(a) => a,
            Err(e) => {
                let reason = format!("aggregation failed: {e}");
                self.fail_plain_round(open.round, contributions, reason, actions);
                return;
            }
        };
        let spend = CommitSpend::Plain {
            charged: open.charged,
            bits: open.bits,
            device_bits: open.device_bits,
        };
        self.commit_round(
            open.round,
            open.clip_norm,
            open.uploaded,
            &aggregate,
            spend,
            None,
            Some(sampler),
            actions,
        );
    }

    /// Commits a round whose aggregate was computed, plain or distributed: the server
    /// optimiser takes its step, the accounting commits the round's spend
    /// ([`RunAccounting::commit`]), and the new model version is recorded
    /// ([`Action::CommitRound`], with `RunStopped` when the run is complete) and then
    /// published. If the optimiser fails the round is abandoned (a plain round) or fails
    /// after unmasking (a distributed one); if the budget refuses a plain round it is
    /// abandoned with nothing spent.
    #[allow(clippy::too_many_arguments)]
    fn commit_round<P: Provenance, S: GaussianSampler>(
        &mut self,
        round: u64,
        clip_norm: f64,
        participants: Vec<String>,
        aggregate: &Aggregate<P>,
        spend: CommitSpend,
        unmasked: Option<UnmaskedSum>,
        sampler: Option<&mut S>,
        actions: &mut Vec<Action>,
    ) {
        let contributions = participants.len();
        let distributed = matches!(spend, CommitSpend::Distributed(_));
        let mut params = self.params.clone();
        let mut server_state = self.server_state.clone();
        if let Err(e) = apply(
            &self.manifest.server_optimizer,
            &mut server_state,
            &mut params,
            aggregate,
        ) {
            let reason = format!("the server optimiser failed: {e}");
            if distributed {
                self.fail_after_unmasking(round, contributions, reason, actions);
            } else {
                self.fail_plain_round(round, contributions, reason, actions);
            }
            return;
        }
        let committed = match self.accounting.commit(
            spend,
            round,
            &participants,
            self.progress_rounds + 1,
            &mut server_state,
            sampler,
        ) {
            Ok(c) => c,
            Err(reason) => {
                actions.push(Action::AbandonRound {
                    round,
                    contributions: contributions as u64,
                    reason,
                });
                return;
            }
        };
        if unmasked.is_some() {
            self.last_unmasked = unmasked;
        }
        self.params = params;
        self.server_state = server_state;
        self.version += 1;
        self.progress_rounds += 1;
        let model = encode(
            &self.run_id,
            self.version,
            round,
            &self.manifest.model,
            &self.params,
        );
        let event = LedgerEvent::RoundCommitted {
            round,
            cohort_size: contributions as u64,
            noise_multiplier: self.manifest.noise_multiplier.unwrap_or(0.0),
            clip_norm,
            mode: self.manifest.privacy_mode.as_str().to_string(),
            rdp_increments: committed.rdp_increments,
            cumulative_epsilon: self.spent(),
            model_version: self.version,
            model_sha256: model.sha256.clone(),
            epsilon_assumption: committed.epsilon_assumption,
            tree: committed.tree,
            next_clip_norm: committed.next_clip_norm,
            distributed: committed.distributed,
        };
        let stop = (self.progress_rounds >= self.manifest.rounds).then(|| {
            self.state = RunState::Stopped;
            LedgerEvent::RunStopped {
                reason: "completed".into(),
                rounds_committed: self.progress_rounds,
                cumulative_epsilon: self.spent(),
            }
        });
        actions.push(Action::CommitRound(Box::new(RoundOutcome {
            round,
            participants,
            model,
            server_state: serde_json::to_string(&self.server_state).expect("serialisable"),
            event,
            stop,
        })));
        actions.push(Action::PublishModel {
            version: self.version,
        });
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
}

impl Engine {
    /// A secure-aggregation message from `device`: checked like an upload (round, token,
    /// selection), handed to the round, answered, and any stage it completes is closed.
    #[allow(clippy::too_many_arguments)]
    fn secure_message<R: Rng + ?Sized>(
        &mut self,
        device: String,
        round: u64,
        task_token: &str,
        now: i64,
        rng: &mut R,
        actions: &mut Vec<Action>,
        receive: impl FnOnce(&mut SecureRound, &str) -> Result<(), Rejection>,
    ) {
        if let Err(rejection) = self.task_round(&device, round, task_token) {
            actions.push(Action::Reject { device, rejection });
            return;
        }
        let mode = self.manifest.privacy_mode.as_str();
        let open = self.open.as_mut().expect("checked by task_round");
        let Some(secure) = open.secure.as_mut() else {
            actions.push(Action::Reject {
                device,
                rejection: Rejection {
                    kind: RejectKind::FailedPrecondition,
                    message: format!(
                        "round {round} is in privacy mode {mode}, which has no secure-aggregation stages"
                    ),
                },
            });
            return;
        };
        let before = secure.contributions();
        match receive(secure, &device) {
            Ok(()) if secure.contributions() > before => {
                open.uploaded.push(device.clone());
                open.uploaded_set.insert(device.clone());
                actions.push(Action::UpdateAccepted { device, round });
            }
            Ok(()) => actions.push(Action::SecAggAccepted { device, round }),
            Err(rejection) => actions.push(Action::Reject { device, rejection }),
        }
        self.advance_secure(now, rng, actions);
    }

    /// Keeps how a distributed round ended (nothing for other rounds).
    fn remember_ended(&mut self, open: &OpenRound, stage: fedpref_secagg::ServerStage) {
        if let Some(secure) = &open.secure {
            self.ended_secure = Some(EndedSecureRound {
                round: open.round,
                tasks: open.tasks.clone(),
                stage,
                end_ms: secure.end_ms(),
            });
        }
    }

    /// Closes the distributed round's stages that are due; commits or abandons the round
    /// when it ends.
    fn advance_secure<R: Rng + ?Sized>(
        &mut self,
        now: i64,
        rng: &mut R,
        actions: &mut Vec<Action>,
    ) {
        let Some(secure) = self.open.as_mut().and_then(|o| o.secure.as_mut()) else {
            return;
        };
        let accounting = &self.accounting;
        let hold = self.holding_release;
        let may_unmask = || {
            if hold {
                return Err(
                    "an operator's command arrived as the round became ready to unmask: nothing was unmasked or spent"
                        .into(),
                );
            }
            accounting.may_release_distributed()
        };
        match secure.advance(now, rng, may_unmask) {
            Ending::Running => {}
            Ending::ReadyToRelease(indices) => self.release(&indices, actions),
            Ending::Abandoned {
                contributions,
                reason,
            } => {
                let open = self.open.take().expect("checked");
                let released = open
                    .secure
                    .as_ref()
                    .is_some_and(|s| s.release_was_recorded());
                let reason = if released {
                    format!("{reason}; its release had been recorded, so its ε stays spent")
                } else {
                    reason
                };
                self.remember_ended(&open, fedpref_secagg::ServerStage::Aborted(reason.clone()));
                self.next_round = open.round + 1;
                actions.push(Action::AbandonRound {
                    round: open.round,
                    contributions,
                    reason,
                });
            }
            Ending::Completed(output) => {
                let open = self.open.take().expect("checked");
                self.remember_ended(&open, fedpref_secagg::ServerStage::Completed);
                self.next_round = open.round + 1;
                let before = actions.len();
                self.commit_distributed(open, output, actions);
                if let (Some(Action::AbandonRound { reason, .. }), Some(ended)) =
                    (actions[before..].first(), self.ended_secure.as_mut())
                {
                    ended.stage = fedpref_secagg::ServerStage::Aborted(reason.clone());
                }
            }
        }
    }

    /// A distributed round is ready to unmask `indices`' inputs: spend the release now (the
    /// accountant, the contributors' participations) and ask the driver to record it; the
    /// sum is unmasked on [`Event::ReleaseRecorded`].
    fn release(&mut self, indices: &[u32], actions: &mut Vec<Action>) {
        let open = self.open.as_ref().expect("a distributed round is open");
        let secure = open.secure.as_ref().expect("a distributed round");
        let participants = secure.devices_of(indices);
        let record = secure.info().ledger_record(participants.len() as u64);
        let round = open.round;
        // The release counts towards each contributor's limits whether or not the round
        // commits.
        let rdp_increments = self
            .accounting
            .release_distributed(&participants, self.progress_rounds + 1);
        let event = LedgerEvent::RoundReleased {
            round,
            contributors: participants.len() as u64,
            rdp_increments,
            cumulative_epsilon: self.spent(),
            epsilon_assumption: self.manifest.epsilon_assumption(),
            distributed: Box::new(record),
        };
        actions.push(Action::RecordRelease(Box::new(ReleaseRecord {
            round,
            participants,
            event,
        })));
    }

    /// A refusal if `keys` repeats a public key already advertised in this run.
    fn reused_key(&self, keys: &AdvertiseKeys) -> Option<Rejection> {
        let seen = self.seen_keys.as_ref()?;
        [
            ("encryption_public_key", &keys.encryption_public_key),
            ("masking_public_key", &keys.masking_public_key),
        ]
        .into_iter()
        .find(|(_, key)| seen.contains(*key))
        .map(|(field, _)| Rejection {
            kind: RejectKind::FailedPrecondition,
            message: format!(
                "{field}: this key was already advertised in this run; a device draws fresh keys \
                 for every round"
            ),
        })
    }

    /// A distributed round that fails after its sum was unmasked: the coordinator has seen
    /// the noised sum, which is what the round's ε covers, so the ε is counted as spent (in
    /// the run-stopped entry's cumulative ε) and the run stops, as no later round can be
    /// accounted for without this one's release.
    fn fail_after_unmasking(
        &mut self,
        round: u64,
        contributions: usize,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::AbandonRound {
            round,
            contributions: contributions as u64,
            reason: format!(
                "{reason}; the sum had been unmasked, so the round's ε stays spent (its release is recorded)"
            ),
        });
        self.stop(
            format!(
                "distributed round {round} failed after its sum was unmasked ({reason}): \
                 its ε is counted and the run cannot go on"
            ),
            actions,
        );
    }

    /// A distributed round whose sum was unmasked: decode it and commit it like any other
    /// round ([`Self::commit_round`]); its release was spent when it was recorded.
    fn commit_distributed(
        &mut self,
        open: OpenRound,
        output: AggregateOutput,
        actions: &mut Vec<Action>,
    ) {
        let secure = open.secure.as_ref().expect("a distributed round");
        let info = Arc::clone(secure.info());
        let contributors = secure.devices_of(&output.contributors);
        let count = output.contributors.len();
        let mechanism = info.plan.mechanism;
        let integers = info.config.encoding.decode_integers(&output.sum);
        let granularity = mechanism.granularity();
        let sum: Vec<f64> = integers.iter().map(|&v| v as f64 * granularity).collect();
        let noise_std = mechanism.device_noise_std() * (count as f64).sqrt();
        let aggregate = match Aggregate::from_unmasked_sum(sum, count, noise_std) {
            Ok(a) => a,
            Err(e) => {
                self.fail_after_unmasking(
                    open.round,
                    count,
                    format!("aggregation failed: {e}"),
                    actions,
                );
                return;
            }
        };
        let record = info.ledger_record(count as u64);
        let unmasked = UnmaskedSum {
            round: open.round,
            integers,
            contributors: contributors.clone(),
        };
        // The coordinator adds no noise to a distributed round: it is committed without a
        // sampler.
        self.commit_round(
            open.round,
            open.clip_norm,
            contributors,
            &aggregate,
            CommitSpend::Distributed(Box::new(record)),
            Some(unmasked),
            None::<&mut fedpref_privacy::SecureSampler>,
            actions,
        );
    }
}

/// The task `device` holds in `open`.
fn task_in(
    open: &OpenRound,
    device: &str,
    token: String,
    model_version: u64,
    clip_bit_noise_std: Option<f64>,
) -> Task {
    let secure = open.secure.as_ref().map(|s| Arc::clone(s.info()));
    Task {
        clip_norm: open.clip_norm,
        clip_bit_noise_std: open.device_bits.and(clip_bit_noise_std),
        device: device.to_string(),
        round: open.round,
        task_token: token,
        model_version,
        // Distributed mode: the masked input's deadline.
        deadline_ms: secure.as_ref().map_or(open.deadline_ms, |s| s.deadlines[2]),
        secure_aggregation: secure,
    }
}

/// Bernoulli(p) from 53 random bits.
/// A local clip bit must be finite and in the range devices clamp it to
/// (`fedpref_privacy::adaptive_clip::local_bit_range`); the message names `header.clip_bit`.
pub fn check_clip_bit(noised_bit: f64, manifest: &RunManifest) -> Result<(), String> {
    let sigma_b = manifest.bit_noise_std().unwrap_or(0.0);
    let (lo, hi) = fedpref_privacy::adaptive_clip::local_bit_range(sigma_b);
    if noised_bit.is_finite() && (lo..=hi).contains(&noised_bit) {
        Ok(())
    } else {
        Err(format!(
            "header.clip_bit {noised_bit} is outside [{lo}, {hi}], the range devices clamp their noised bit to (±{} σ_b around [0, 1])",
            fedpref_privacy::adaptive_clip::LOCAL_BIT_RANGE_STDS
        ))
    }
}

fn bernoulli<R: Rng + ?Sized>(rng: &mut R, p: f64) -> bool {
    ((rng.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
}

/// A 128-bit random task token, hex.
fn task_token<R: Rng + ?Sized>(rng: &mut R) -> String {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    crate::hex(&bytes)
}
