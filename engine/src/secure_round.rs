//! One round of a distributed run, as the round engine holds it: the secure-aggregation
//! server ([`fedpref_secagg::Server`]) with its stages' deadlines, and the map between the
//! coordinator's device ids and the round's participant indices. Sans-IO like the engine: the
//! caller passes the time, and the round's randomness (its context and graph seed) is drawn
//! by the engine from the RNG it is handed.
//!
//! # Stages
//! A distributed round goes through the four stages of [`fedpref_secagg`], each lasting at
//! most its `[secure_aggregation]` duration from the moment the previous stage closed. The
//! task carries the latest each stage can close (the durations added up from the opening); a
//! stage that closes early brings the later ones forward, and `GetStage` reports the current
//! stage's actual deadline:
//!
//! | stage | ends at its deadline, or as soon as | then |
//! |---|---|---|
//! | advertise keys | every one of the n slots was taken and advertised keys | key directories |
//! | share keys | every device in U1 sent its shares | share inboxes |
//! | masked input | every device in U2 uploaded | unmasking plans (U3 frozen) |
//! | unmasking | every device in U3 revealed its shares | the sum is unmasked |
//!
//! A stage that cannot go on (fewer than m devices left, fewer than t answers, inconsistent
//! shares) abandons the round: nothing is unmasked, released or spent. Right before the sum
//! is unmasked the engine checks that the round's ε still fits the budget (an unmasked sum
//! is a release: its ε is spent whatever happens next), and abandons the round otherwise. A
//! round that fails after unmasking (decoding, the server step) counts its ε and stops the
//! run.
//!
//! # Selection
//! The cohort has a fixed size n (`sampling.target_size`): the first n eligible devices that
//! check in while the advertise-keys stage is open get a task and a provisional slot (the
//! lowest free one); a device that declines before advertising frees its slot for the next.
//! Devices that check in later are told to come back for the next round.
//!
//! # Participant indices
//! A device's participant index, and with it its place in the SecAgg+ graph and so its
//! neighbours, is drawn only when the advertise-keys stage closes (U1 is fixed): the slots
//! are renumbered by a uniformly random permutation of 1..=n from the engine's RNG
//! ([`fedpref_secagg::server::random_permutation`]). Devices learn their index only from
//! their key directory (`KeyDirectory.own_index`), after that. The graph seed is public from
//! the task on, but a device cannot steer where it lands: neither the order of check-ins nor
//! declines, nor anything else a device does before the stage closes, changes the index it
//! gets. This is what the threshold's bound assumes (colluders among a device's k neighbours
//! are as many as among k devices drawn at random).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use fedpref_secagg::server::random_permutation;
use fedpref_secagg::{
    AdvertiseKeys, AggregateOutput, KeyDirectory, MaskedInput, RoundConfig, RoundContext,
    SecAggError, Server, ServerStage, ShareInbox, ShareKeys, Unmask, UnmaskingPlan,
};
use rand_core::Rng;

use crate::distributed::DistributedPlan;
use crate::protocol::{RejectKind, Rejection};
pub use crate::protocol::{SecureRoundInfo, StageInput, StageView};

/// How a round ended, once it has.
#[derive(Debug)]
pub(crate) enum Ending {
    /// Still running.
    Running,
    /// Abandoned; nothing unmasked.
    Abandoned {
        /// Masked inputs received.
        contributions: u64,
        /// Why.
        reason: String,
    },
    /// Ready to unmask: every earlier stage succeeded, enough devices answered the
    /// unmasking request and the budget allows the release. The sum of these participants'
    /// inputs is unmasked only after [`SecureRound::release_recorded`], so that the release
    /// is durable before it exists.
    ReadyToRelease(Vec<u32>),
    /// The sum was unmasked.
    Completed(AggregateOutput),
}

/// Where a round stands with its release (the unmasked sum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// Not asked for yet.
    NotRequested,
    /// [`Ending::ReadyToRelease`] was reported; waiting for the release to be recorded.
    Requested,
    /// Recorded: the sum may be unmasked.
    Recorded,
}

/// A distributed round in flight.
pub(crate) struct SecureRound {
    info: Arc<SecureRoundInfo>,
    server: Server,
    indices: HashMap<String, u32>,
    devices: BTreeMap<u32, String>,
    free: BTreeSet<u32>,
    advertised: BTreeSet<u32>,
    shared: BTreeSet<u32>,
    unmasked: BTreeSet<u32>,
    directories: BTreeMap<u32, KeyDirectory>,
    inboxes: BTreeMap<u32, ShareInbox>,
    plans: BTreeMap<u32, UnmaskingPlan>,
    /// When the current stage closes.
    deadline: i64,
    ended: bool,
    release: Release,
}

fn rejection(kind: RejectKind, message: impl Into<String>) -> Rejection {
    Rejection {
        kind,
        message: message.into(),
    }
}

/// A protocol error as a rejection: a closed stage or a refused state is a precondition,
/// anything about the message's content is an invalid argument.
fn refuse(field: &str, e: SecAggError) -> Rejection {
    match e {
        SecAggError::StageClosed(m) => rejection(RejectKind::FailedPrecondition, m),
        // The protocol's reason can name participants; the device gets none of it.
        SecAggError::Abandoned(_) => {
            rejection(RejectKind::FailedPrecondition, "the round was abandoned")
        }
        other => rejection(RejectKind::InvalidArgument, format!("{field}: {other}")),
    }
}

impl SecureRound {
    /// Opens a round at `now` with a fresh random context and graph seed.
    pub(crate) fn open<R: Rng + ?Sized>(
        plan: &DistributedPlan,
        now: i64,
        rng: &mut R,
    ) -> Result<Self, SecAggError> {
        let mut context = [0u8; 32];
        rng.fill_bytes(&mut context);
        let mut graph_seed = [0u8; 32];
        rng.fill_bytes(&mut graph_seed);
        let config = RoundConfig::new(
            RoundContext(context),
            &plan.params,
            graph_seed,
            plan.encoding,
            plan.min_contributors,
        )?;
        let server = Server::new(config.clone())?;
        let mut deadlines = [0i64; 4];
        let mut at = now;
        for (d, ms) in deadlines.iter_mut().zip(plan.stage_millis) {
            at = at.saturating_add(ms);
            *d = at;
        }
        Ok(Self {
            deadline: deadlines[0],
            free: (1..=config.cohort_size).collect(),
            info: Arc::new(SecureRoundInfo {
                config,
                plan: *plan,
                deadlines,
            }),
            server,
            indices: HashMap::new(),
            devices: BTreeMap::new(),
            advertised: BTreeSet::new(),
            shared: BTreeSet::new(),
            unmasked: BTreeSet::new(),
            directories: BTreeMap::new(),
            inboxes: BTreeMap::new(),
            plans: BTreeMap::new(),
            ended: false,
            release: Release::NotRequested,
        })
    }

    /// The round's public description.
    pub(crate) fn info(&self) -> &Arc<SecureRoundInfo> {
        &self.info
    }

    /// The end of the round (the unmasking deadline).
    pub(crate) fn end_ms(&self) -> i64 {
        self.info.deadlines[3]
    }

    /// When the current stage closes.
    pub(crate) fn stage_deadline(&self) -> i64 {
        self.deadline
    }

    /// The stage that just closed at `now` hands over to the one at `next` (0-based):
    /// its deadline is its duration after the close (a late tick counts from the deadline).
    fn next_deadline(&mut self, now: i64, next: usize) {
        let closed_at = now.min(self.deadline);
        self.deadline = closed_at
            .saturating_add(self.info.plan.stage_millis[next])
            .min(self.info.deadlines[next]);
    }

    /// Whether the cohort still takes devices: the advertise-keys stage is open and an
    /// index is free.
    pub(crate) fn can_assign(&self) -> bool {
        *self.server.stage() == ServerStage::AdvertiseKeys && !self.free.is_empty()
    }

    /// Gives `device` the lowest free slot (its provisional index, renumbered at random when
    /// the advertise-keys stage closes).
    pub(crate) fn assign(&mut self, device: &str) -> Option<u32> {
        if !self.can_assign() {
            return None;
        }
        let index = self.free.pop_first()?;
        self.indices.insert(device.to_string(), index);
        self.devices.insert(index, device.to_string());
        Some(index)
    }

    /// A declined task: the slot is freed if the device has not advertised keys yet (its
    /// keys, once advertised, stay in the round and it counts as dropped).
    pub(crate) fn release(&mut self, device: &str) {
        if let Some(&index) = self.indices.get(device)
            && !self.advertised.contains(&index)
            && *self.server.stage() == ServerStage::AdvertiseKeys
        {
            self.indices.remove(device);
            self.devices.remove(&index);
            self.free.insert(index);
        }
    }

    fn index(&self, device: &str) -> Result<u32, Rejection> {
        self.indices.get(device).copied().ok_or_else(|| {
            rejection(
                RejectKind::FailedPrecondition,
                "this device has no participant index in the round",
            )
        })
    }

    fn expect(&self, stage: ServerStage, what: &str) -> Result<(), Rejection> {
        let now = self.server.stage();
        if *now == stage {
            return Ok(());
        }
        Err(rejection(
            RejectKind::FailedPrecondition,
            format!(
                "{what} belongs to stage {}, but the round is in stage {}",
                stage_name(&stage),
                stage_name(now)
            ),
        ))
    }

    /// Stage 1 from `device`.
    pub(crate) fn receive_keys(
        &mut self,
        device: &str,
        keys: AdvertiseKeys,
    ) -> Result<(), Rejection> {
        let index = self.index(device)?;
        self.expect(ServerStage::AdvertiseKeys, "AdvertiseKeys")?;
        if self.advertised.contains(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device already advertised its keys for the round",
            ));
        }
        self.server
            .receive_keys(index, keys)
            .map_err(|e| refuse("encryption_public_key/masking_public_key", e))?;
        self.advertised.insert(index);
        Ok(())
    }

    /// Stage 2 from `device`.
    pub(crate) fn receive_shares(
        &mut self,
        device: &str,
        shares: ShareKeys,
    ) -> Result<(), Rejection> {
        let index = self.index(device)?;
        self.expect(ServerStage::ShareKeys, "ShareKeys")?;
        if self.shared.contains(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device already sent its shares for the round",
            ));
        }
        if !self.directories.contains_key(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device is not in the round's key directory (it did not advertise keys in time)",
            ));
        }
        self.server
            .receive_shares(index, shares)
            .map_err(|e| refuse("shares", e))?;
        self.shared.insert(index);
        Ok(())
    }

    /// Stage 3 from `device`: its masked input, `dimension` values modulo 2³².
    pub(crate) fn receive_masked_input(
        &mut self,
        device: &str,
        values: Vec<u32>,
    ) -> Result<(), Rejection> {
        let index = self.index(device)?;
        self.expect(ServerStage::MaskedInput, "a masked input (UploadUpdate)")?;
        if self.server.contributors().any(|i| i == index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device already uploaded its masked input for the round",
            ));
        }
        if !self.inboxes.contains_key(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device did not complete the key sharing in time, so its masked input cannot be unmasked",
            ));
        }
        let expected = self.info.config.dimension();
        if values.len() != expected {
            return Err(rejection(
                RejectKind::InvalidArgument,
                format!(
                    "masked_update: {} values, the round's dimension is {expected}",
                    values.len()
                ),
            ));
        }
        self.server
            .receive_masked_input(index, MaskedInput { values })
            .map_err(|e| refuse("masked_update", e))
    }

    /// Stage 4 from `device`.
    pub(crate) fn receive_unmask(&mut self, device: &str, unmask: Unmask) -> Result<(), Rejection> {
        let index = self.index(device)?;
        self.expect(ServerStage::Unmasking, "Unmask")?;
        if self.unmasked.contains(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device already revealed its shares for the round",
            ));
        }
        if !self.plans.contains_key(&index) {
            return Err(rejection(
                RejectKind::FailedPrecondition,
                "this device's masked input is not in the sum, so it is not asked to reveal shares",
            ));
        }
        self.server
            .receive_unmask(index, unmask)
            .map_err(|e| refuse("shares", e))?;
        self.unmasked.insert(index);
        Ok(())
    }

    /// The stage as `device` sees it.
    pub(crate) fn view(&self, device: &str) -> Result<StageView, Rejection> {
        let index = self.index(device)?;
        let stage = self.server.stage().clone();
        let input = match stage {
            ServerStage::ShareKeys => self
                .directories
                .get(&index)
                .cloned()
                .map_or(StageInput::None, StageInput::KeyDirectory),
            ServerStage::MaskedInput => self
                .inboxes
                .get(&index)
                .cloned()
                .map_or(StageInput::None, StageInput::ShareInbox),
            ServerStage::Unmasking => self
                .plans
                .get(&index)
                .cloned()
                .map_or(StageInput::None, StageInput::UnmaskingPlan),
            _ => StageInput::None,
        };
        Ok(StageView {
            deadline_ms: self.stage_deadline(),
            stage,
            input,
            poll_after_ms: poll_after_ms(self.info.config.cohort_size),
        })
    }

    /// The device ids of participants in `indices`.
    pub(crate) fn devices_of(&self, indices: &[u32]) -> Vec<String> {
        indices
            .iter()
            .filter_map(|i| self.devices.get(i).cloned())
            .collect()
    }

    /// Masked inputs received so far.
    pub(crate) fn contributions(&self) -> u64 {
        self.server.contributors().count() as u64
    }

    /// Closes every stage whose deadline has passed or that waits for nobody, in order, and
    /// says how the round ended if it has. Reports an ending once.
    /// `rng` draws the participant indices when the advertise-keys stage closes.
    /// `may_unmask` is asked just before the sum would be unmasked (once every earlier stage
    /// succeeded): an error abandons the round with nothing unmasked. The engine checks there
    /// that the round's ε still fits the budget, since after unmasking it is spent.
    pub(crate) fn advance<R: Rng + ?Sized>(
        &mut self,
        now: i64,
        rng: &mut R,
        may_unmask: impl FnOnce() -> Result<(), String>,
    ) -> Ending {
        let mut may_unmask = Some(may_unmask);
        if self.ended {
            return Ending::Running;
        }
        loop {
            let due = now >= self.stage_deadline() || self.server.awaiting().is_empty();
            if !due {
                return Ending::Running;
            }
            let result = match self.server.stage() {
                ServerStage::AdvertiseKeys => {
                    self.renumber(rng);
                    self.server.close_advertise_keys().map(|d| {
                        self.directories = d.into_iter().collect();
                        1
                    })
                }
                ServerStage::ShareKeys => self.server.close_share_keys().map(|i| {
                    self.inboxes = i.into_iter().collect();
                    2
                }),
                ServerStage::MaskedInput => self.server.close_masked_input().map(|p| {
                    self.plans = p.into_iter().collect();
                    3
                }),
                ServerStage::Unmasking => match self.release {
                    Release::Requested => return Ending::Running,
                    Release::Recorded => {
                        self.ended = true;
                        return match self.server.finish() {
                            Ok(output) => Ending::Completed(output),
                            Err(e) => self.abandoned(e),
                        };
                    }
                    Release::NotRequested => {
                        let t = self.info.config.threshold as usize;
                        let answers = self.server.unmask_answers();
                        if answers < t {
                            // `finish` would refuse too: nothing to release, nothing to spend.
                            self.ended = true;
                            let e = self.server.abandon(format!(
                                "only {answers} participants answered the unmasking request, fewer than the threshold {t}"
                            ));
                            return self.abandoned(e);
                        }
                        if let Some(Err(reason)) = may_unmask.take().map(|check| check()) {
                            self.ended = true;
                            let e = self.server.abandon(reason);
                            return self.abandoned(e);
                        }
                        self.release = Release::Requested;
                        return Ending::ReadyToRelease(self.server.contributors().collect());
                    }
                },
                ServerStage::Completed | ServerStage::Aborted(_) => return Ending::Running,
            };
            match result {
                Ok(next) => self.next_deadline(now, next),
                Err(e) => {
                    self.ended = true;
                    return self.abandoned(e);
                }
            }
        }
    }

    /// The release [`Ending::ReadyToRelease`] asked for is recorded: the next
    /// [`SecureRound::advance`] unmasks the sum.
    pub(crate) fn release_recorded(&mut self) {
        if self.release == Release::Requested {
            self.release = Release::Recorded;
        }
    }

    /// Whether this round's release was recorded (its ε is spent, whatever happens next).
    pub(crate) fn release_was_recorded(&self) -> bool {
        self.release == Release::Recorded
    }

    /// Renumbers the slots by a uniformly random permutation (see the module's doc).
    fn renumber<R: Rng + ?Sized>(&mut self, rng: &mut R) {
        let permutation = random_permutation(self.info.config.cohort_size, rng);
        self.server
            .permute_participants(&permutation)
            .expect("a permutation of 1..=n while advertise keys is open");
        let to = |i: u32| permutation[i as usize - 1];
        for index in self.indices.values_mut() {
            *index = to(*index);
        }
        self.devices = std::mem::take(&mut self.devices)
            .into_iter()
            .map(|(i, d)| (to(i), d))
            .collect();
        self.advertised = self.advertised.iter().map(|&i| to(i)).collect();
        self.free.clear();
    }

    fn abandoned(&mut self, e: SecAggError) -> Ending {
        let reason = match e {
            SecAggError::Abandoned(r) => r,
            other => other.to_string(),
        };
        Ending::Abandoned {
            contributions: self.contributions(),
            reason: format!("secure aggregation: {reason}; nothing was unmasked"),
        }
    }
}

/// The polling interval for a cohort of `n` (see [`StageView::poll_after_ms`]).
pub fn poll_after_ms(n: u32) -> i64 {
    (100 * i64::from(n.div_ceil(50))).clamp(100, 5_000)
}

/// The stage's name in messages.
pub fn stage_name(stage: &ServerStage) -> &'static str {
    match stage {
        ServerStage::AdvertiseKeys => "ADVERTISE_KEYS",
        ServerStage::ShareKeys => "SHARE_KEYS",
        ServerStage::MaskedInput => "MASKED_INPUT",
        ServerStage::Unmasking => "UNMASKING",
        ServerStage::Completed => "COMPLETED",
        ServerStage::Aborted(_) => "ABORTED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_slows_down_with_the_cohort_size() {
        assert_eq!(poll_after_ms(5), 100);
        assert_eq!(poll_after_ms(50), 100);
        assert_eq!(poll_after_ms(51), 200);
        assert_eq!(poll_after_ms(1_000), 2_000);
        assert_eq!(poll_after_ms(1_000_000), 5_000);
    }
}
