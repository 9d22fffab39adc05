//! The server's side: one state machine per round, driven by the caller's events (a message
//! from participant i, or "close the stage", which the caller decides on at the stage's
//! deadline). It does no IO and reads no clock.
//!
//! Participants are numbered 1..=n by the caller (the coordinator maps its device ids to
//! them). Participant sets follow Bonawitz et al.: U1 advertised keys, U2 shared keys, U3
//! uploaded a masked input, U4 answered the unmasking request.
//!
//! # The safety rule
//! For each participant the server asks either for shares of its self-mask seed (it is in U3)
//! or for shares of its masking key (it is in U2 \ U3), never both: with both, the server
//! could remove every mask from that participant's input alone. The rule holds because U3 is
//! frozen when the masked-input stage closes: a masked input arriving later is refused, the
//! kind asked for each participant is fixed then ([`Server::requested_kind`]), and revealed
//! shares of any other kind are refused.

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::config::RoundConfig;
use crate::crypto::{self, KeyPair, Sign};
use crate::messages::{
    AdvertiseKeys, KeyDirectory, MaskedInput, ParticipantKeys, ShareInbox, ShareKeys, ShareKind,
    Unmask, UnmaskingPlan,
};
use crate::shamir::{self, SHARE_BYTES, Share};
use crate::{EncryptedShare, SecAggError};

/// Length of a share ciphertext: the plaintext plus the 16-byte Poly1305 tag.
const CIPHERTEXT_BYTES: usize = 8 + 2 * SHARE_BYTES + 16;

/// Where a round stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerStage {
    /// Collecting public keys.
    AdvertiseKeys,
    /// Collecting encrypted shares.
    ShareKeys,
    /// Collecting masked inputs.
    MaskedInput,
    /// Collecting revealed shares.
    Unmasking,
    /// The sum was unmasked.
    Completed,
    /// The round was abandoned; nothing was unmasked.
    Aborted(String),
}

/// The result of a completed round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateOutput {
    /// Σ of the contributors' encoded inputs modulo 2³² (decode with
    /// [`crate::FixedPoint::decode_integers`]).
    pub sum: Vec<u32>,
    /// The participants whose inputs are in the sum (U3), ascending.
    pub contributors: Vec<u32>,
}

/// The server's state machine for one round.
#[derive(Debug)]
pub struct Server {
    config: RoundConfig,
    neighbourhoods: Vec<Vec<u32>>,
    stage: ServerStage,
    keys: BTreeMap<u32, AdvertiseKeys>,
    /// Every public key advertised so far, with its participant (no key is accepted twice).
    advertised_keys: BTreeMap<[u8; 32], u32>,
    u1: BTreeSet<u32>,
    shares: BTreeMap<u32, Vec<EncryptedShare>>,
    u2: BTreeSet<u32>,
    sum: Vec<u32>,
    u3: BTreeSet<u32>,
    requested: BTreeMap<u32, ShareKind>,
    plans: BTreeMap<u32, UnmaskingPlan>,
    revealed: BTreeMap<u32, Vec<Share>>,
    u4: BTreeSet<u32>,
}

impl Server {
    /// A round in its first stage, after checking the config.
    pub fn new(config: RoundConfig) -> Result<Self, SecAggError> {
        config.validate()?;
        let neighbourhoods = config.graph.neighbourhoods(config.cohort_size)?;
        let dimension = config.dimension();
        Ok(Self {
            config,
            neighbourhoods,
            stage: ServerStage::AdvertiseKeys,
            keys: BTreeMap::new(),
            advertised_keys: BTreeMap::new(),
            u1: BTreeSet::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            sum: vec![0; dimension],
            u3: BTreeSet::new(),
            requested: BTreeMap::new(),
            plans: BTreeMap::new(),
            revealed: BTreeMap::new(),
            u4: BTreeSet::new(),
        })
    }

    /// The round's config.
    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// The current stage.
    pub fn stage(&self) -> &ServerStage {
        &self.stage
    }

    /// Which share the server asks for about `owner`, once the masked-input stage has closed:
    /// one kind per participant, or none.
    pub fn requested_kind(&self, owner: u32) -> Option<ShareKind> {
        self.requested.get(&owner).copied()
    }

    /// How many participants have answered the unmasking request (U4).
    pub fn unmask_answers(&self) -> usize {
        self.u4.len()
    }

    /// Participants whose masked inputs were accepted (U3).
    pub fn contributors(&self) -> impl Iterator<Item = u32> + '_ {
        self.u3.iter().copied()
    }

    /// The participants the current stage still waits for (so the caller can close it early
    /// once this is empty, or at its deadline otherwise).
    pub fn awaiting(&self) -> Vec<u32> {
        match self.stage {
            ServerStage::AdvertiseKeys => (1..=self.config.cohort_size)
                .filter(|i| !self.keys.contains_key(i))
                .collect(),
            ServerStage::ShareKeys => self
                .u1
                .iter()
                .copied()
                .filter(|i| !self.shares.contains_key(i))
                .collect(),
            ServerStage::MaskedInput => self.u2.difference(&self.u3).copied().collect(),
            ServerStage::Unmasking => self
                .plans
                .keys()
                .copied()
                .filter(|i| !self.u4.contains(i))
                .collect(),
            ServerStage::Completed | ServerStage::Aborted(_) => Vec::new(),
        }
    }

    /// Abandons the round (e.g. a deadline the caller cannot extend). Nothing is unmasked.
    pub fn abandon(&mut self, reason: impl Into<String>) -> SecAggError {
        let reason = reason.into();
        self.stage = ServerStage::Aborted(reason.clone());
        SecAggError::Abandoned(reason)
    }

    fn expect_stage(&self, expected: ServerStage, what: &str) -> Result<(), SecAggError> {
        if self.stage == expected {
            Ok(())
        } else {
            Err(SecAggError::StageClosed(format!(
                "{what} arrived in stage {:?}, expected {expected:?}",
                self.stage
            )))
        }
    }

    fn check_index(&self, index: u32) -> Result<(), SecAggError> {
        if index == 0 || index > self.config.cohort_size {
            return Err(SecAggError::Protocol(format!(
                "participant index {index} is outside 1..={}",
                self.config.cohort_size
            )));
        }
        Ok(())
    }

    fn neighbours_in<'a>(
        &'a self,
        i: u32,
        set: &'a BTreeSet<u32>,
    ) -> impl Iterator<Item = u32> + 'a {
        self.neighbourhoods[i as usize - 1]
            .iter()
            .copied()
            .filter(move |j| set.contains(j))
    }

    /// Drops, until none is left, every member of `set` with fewer than t neighbours in it.
    fn prune(&self, set: &mut BTreeSet<u32>) {
        let t = self.config.threshold as usize;
        loop {
            let weak: Vec<u32> = set
                .iter()
                .copied()
                .filter(|&i| self.neighbours_in(i, set).count() < t)
                .collect();
            if weak.is_empty() {
                return;
            }
            for i in weak {
                set.remove(&i);
            }
        }
    }

    /// Stage 1 input: participant `index` advertises its keys. Refused after the stage closed,
    /// for an index outside the cohort, twice for one index, for identical keys, for a key of
    /// low order (every neighbour's key agreement with it would fail, stalling the round) and
    /// for a key another participant already advertised (a replayed advertisement).
    pub fn receive_keys(&mut self, index: u32, message: AdvertiseKeys) -> Result<(), SecAggError> {
        self.expect_stage(ServerStage::AdvertiseKeys, "advertised keys")?;
        self.check_index(index)?;
        if message.encryption_public_key == message.masking_public_key {
            return Err(SecAggError::Protocol(format!(
                "participant {index} advertised the same key twice"
            )));
        }
        if self.keys.contains_key(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} already advertised keys"
            )));
        }
        for (name, key) in [
            ("encryption", &message.encryption_public_key),
            ("masking", &message.masking_public_key),
        ] {
            if !crypto::is_contributory_public_key(key) {
                return Err(SecAggError::Malformed(format!(
                    "participant {index}'s {name} public key is of low order: its neighbours' \
                     key agreement with it would fail"
                )));
            }
            // The message goes back to the sender: it does not say who advertised the key.
            if self.advertised_keys.contains_key(key) {
                return Err(SecAggError::Protocol(format!(
                    "participant {index}'s {name} public key was already advertised in this \
                     round"
                )));
            }
        }
        self.advertised_keys
            .insert(message.encryption_public_key, index);
        self.advertised_keys
            .insert(message.masking_public_key, index);
        self.keys.insert(index, message);
        Ok(())
    }

    /// Renumbers the participants of stage 1: the one that advertised keys as `i` becomes
    /// `permutation[i - 1]`. `permutation` must be a permutation of 1..=n, and the stage must
    /// still be open. The caller draws it at random when it is about to close the stage (see
    /// [`random_permutation`]), so that where a participant sits in the graph, and therefore
    /// who its neighbours are, is fixed only once U1 is and cannot be steered by the order in
    /// which participants joined (the threshold's bound assumes randomly placed neighbours).
    pub fn permute_participants(&mut self, permutation: &[u32]) -> Result<(), SecAggError> {
        self.expect_stage(ServerStage::AdvertiseKeys, "renumbering participants")?;
        let n = self.config.cohort_size as usize;
        let mut seen = vec![false; n];
        if permutation.len() != n
            || permutation.iter().any(|&p| {
                p == 0 || p as usize > n || std::mem::replace(&mut seen[p as usize - 1], true)
            })
        {
            return Err(SecAggError::InvalidInput(format!(
                "the renumbering is not a permutation of 1..={n}"
            )));
        }
        let to = |i: u32| permutation[i as usize - 1];
        self.keys = std::mem::take(&mut self.keys)
            .into_iter()
            .map(|(i, k)| (to(i), k))
            .collect();
        for owner in self.advertised_keys.values_mut() {
            *owner = to(*owner);
        }
        Ok(())
    }

    /// Closes stage 1: U1 is every participant that advertised keys and keeps at least t
    /// neighbours that did. Returns each one's key directory. Abandons the round if fewer
    /// than m remain.
    pub fn close_advertise_keys(&mut self) -> Result<Vec<(u32, KeyDirectory)>, SecAggError> {
        self.expect_stage(ServerStage::AdvertiseKeys, "closing the key stage")?;
        let mut u1: BTreeSet<u32> = self.keys.keys().copied().collect();
        self.prune(&mut u1);
        if u1.len() < self.config.min_contributors as usize {
            return Err(self.abandon(format!(
                "only {} participants can continue after advertising keys, fewer than the {} \
                 the round needs",
                u1.len(),
                self.config.min_contributors
            )));
        }
        let directories = u1
            .iter()
            .map(|&i| {
                let neighbours = self
                    .neighbours_in(i, &u1)
                    .map(|j| {
                        let keys = &self.keys[&j];
                        ParticipantKeys {
                            participant_index: j,
                            encryption_public_key: keys.encryption_public_key,
                            masking_public_key: keys.masking_public_key,
                        }
                    })
                    .collect();
                (
                    i,
                    KeyDirectory {
                        own_index: i,
                        neighbours,
                        threshold: self.config.threshold,
                    },
                )
            })
            .collect();
        self.u1 = u1;
        self.stage = ServerStage::ShareKeys;
        Ok(directories)
    }

    /// Stage 2 input: participant `index`'s ciphertexts, exactly one for each of its
    /// neighbours in U1, each of the expected length. Refused otherwise, with nothing stored.
    pub fn receive_shares(&mut self, index: u32, message: ShareKeys) -> Result<(), SecAggError> {
        self.expect_stage(ServerStage::ShareKeys, "shares")?;
        self.check_index(index)?;
        if !self.u1.contains(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} is not in this round's key directory"
            )));
        }
        if self.shares.contains_key(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} already sent its shares"
            )));
        }
        let expected: BTreeSet<u32> = self.neighbours_in(index, &self.u1).collect();
        let mut seen = BTreeSet::new();
        for share in &message.shares {
            if share.sender_index != index {
                return Err(SecAggError::Protocol(format!(
                    "participant {index} sent a share marked as from {}",
                    share.sender_index
                )));
            }
            if !expected.contains(&share.recipient_index) || !seen.insert(share.recipient_index) {
                return Err(SecAggError::Protocol(format!(
                    "participant {index} sent a share for {}, which is not one of its neighbours \
                     or appears twice",
                    share.recipient_index
                )));
            }
            if share.ciphertext.len() != CIPHERTEXT_BYTES {
                return Err(SecAggError::Protocol(format!(
                    "participant {index}'s share for {} is {} bytes, expected {CIPHERTEXT_BYTES}",
                    share.recipient_index,
                    share.ciphertext.len()
                )));
            }
        }
        if seen.len() != expected.len() {
            return Err(SecAggError::Protocol(format!(
                "participant {index} sent {} shares for its {} neighbours",
                seen.len(),
                expected.len()
            )));
        }
        self.shares.insert(index, message.shares);
        Ok(())
    }

    /// Closes stage 2: U2 is every participant that sent its shares and keeps at least t
    /// neighbours that did. Returns each one's inbox (the ciphertexts addressed to it from
    /// U2). Abandons the round if fewer than m remain.
    pub fn close_share_keys(&mut self) -> Result<Vec<(u32, ShareInbox)>, SecAggError> {
        self.expect_stage(ServerStage::ShareKeys, "closing the share stage")?;
        let mut u2: BTreeSet<u32> = self.shares.keys().copied().collect();
        self.prune(&mut u2);
        if u2.len() < self.config.min_contributors as usize {
            return Err(self.abandon(format!(
                "only {} participants completed the key sharing, fewer than the {} the round \
                 needs",
                u2.len(),
                self.config.min_contributors
            )));
        }
        let mut inboxes: BTreeMap<u32, Vec<EncryptedShare>> =
            u2.iter().map(|&i| (i, Vec::new())).collect();
        for (sender, shares) in &self.shares {
            if !u2.contains(sender) {
                continue;
            }
            for share in shares {
                if let Some(inbox) = inboxes.get_mut(&share.recipient_index) {
                    inbox.push(share.clone());
                }
            }
        }
        self.shares.clear();
        self.u2 = u2;
        self.stage = ServerStage::MaskedInput;
        Ok(inboxes
            .into_iter()
            .map(|(i, shares)| (i, ShareInbox { shares }))
            .collect())
    }

    /// Stage 3 input: participant `index`'s masked input, added to the running sum at once.
    /// Refused from a participant outside U2, twice, with the wrong length, or **after the
    /// stage closed** (the participant is then being unmasked as dropped).
    pub fn receive_masked_input(
        &mut self,
        index: u32,
        message: MaskedInput,
    ) -> Result<(), SecAggError> {
        self.expect_stage(ServerStage::MaskedInput, "a masked input")?;
        self.check_index(index)?;
        if !self.u2.contains(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} did not complete the key sharing"
            )));
        }
        if self.u3.contains(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} already sent its masked input"
            )));
        }
        if message.values.len() != self.sum.len() {
            return Err(SecAggError::InvalidInput(format!(
                "participant {index}'s masked input has {} coordinates, the round expects {}",
                message.values.len(),
                self.sum.len()
            )));
        }
        for (s, v) in self.sum.iter_mut().zip(&message.values) {
            *s = s.wrapping_add(*v);
        }
        self.u3.insert(index);
        Ok(())
    }

    /// Closes stage 3: freezes U3 and fixes, for each participant, the one kind of share
    /// asked about it. Returns each survivor's unmasking plan. Abandons the round if fewer
    /// than max(t, m) masked inputs arrived.
    pub fn close_masked_input(&mut self) -> Result<Vec<(u32, UnmaskingPlan)>, SecAggError> {
        self.expect_stage(ServerStage::MaskedInput, "closing the masked-input stage")?;
        let needed = self.config.min_contributors.max(self.config.threshold) as usize;
        if self.u3.len() < needed {
            return Err(self.abandon(format!(
                "only {} masked inputs arrived, fewer than the {needed} needed to unmask",
                self.u3.len()
            )));
        }
        let dropped: BTreeSet<u32> = self.u2.difference(&self.u3).copied().collect();
        let mut requested = BTreeMap::new();
        let mut plans = BTreeMap::new();
        for &i in &self.u3 {
            requested.insert(i, ShareKind::SelfMaskSeed);
            let survivor_indices: Vec<u32> = self.neighbours_in(i, &self.u3).collect();
            let dropped_indices: Vec<u32> = self.neighbours_in(i, &dropped).collect();
            for &j in &dropped_indices {
                let previous = requested.insert(j, ShareKind::MaskingKey);
                debug_assert_ne!(previous, Some(ShareKind::SelfMaskSeed));
            }
            plans.insert(
                i,
                UnmaskingPlan {
                    survivor_indices,
                    dropped_indices,
                },
            );
        }
        self.requested = requested;
        self.plans = plans.clone();
        self.stage = ServerStage::Unmasking;
        Ok(plans.into_iter().collect())
    }

    /// Stage 4 input: participant `index`'s revealed shares. Every share must be one its plan
    /// asked for, of the kind fixed for its owner; otherwise the whole message is refused and
    /// nothing from it is kept.
    pub fn receive_unmask(&mut self, index: u32, message: Unmask) -> Result<(), SecAggError> {
        self.expect_stage(ServerStage::Unmasking, "revealed shares")?;
        self.check_index(index)?;
        let Some(plan) = self.plans.get(&index) else {
            return Err(SecAggError::Protocol(format!(
                "participant {index} was not asked to reveal shares"
            )));
        };
        if self.u4.contains(&index) {
            return Err(SecAggError::Protocol(format!(
                "participant {index} already revealed its shares"
            )));
        }
        let asked: BTreeSet<u32> = plan
            .survivor_indices
            .iter()
            .chain(&plan.dropped_indices)
            .copied()
            .collect();
        let mut parsed = Vec::with_capacity(message.shares.len());
        let mut seen = BTreeSet::new();
        for revealed in &message.shares {
            let owner = revealed.owner_index;
            if !asked.contains(&owner) || !seen.insert(owner) {
                return Err(SecAggError::Protocol(format!(
                    "participant {index} revealed a share about {owner}, which its plan did not \
                     ask for or which appears twice"
                )));
            }
            if self.requested.get(&owner) != Some(&revealed.kind) {
                return Err(SecAggError::SafetyViolation(format!(
                    "participant {index} revealed a {:?} share of {owner}, but only its {:?} \
                     share is asked for: the server never takes both",
                    revealed.kind,
                    self.requested.get(&owner)
                )));
            }
            parsed.push((owner, Share::from_bytes(index, &revealed.share)?));
        }
        for (owner, share) in parsed {
            self.revealed.entry(owner).or_default().push(share);
        }
        self.u4.insert(index);
        Ok(())
    }

    /// Closes stage 4 and unmasks: reconstructs each survivor's self-mask seed and each
    /// dropped participant's masking key from t shares, checks them, and removes the masks.
    /// Abandons the round if fewer than t participants answered, if a secret has fewer than t
    /// shares, or if shares are inconsistent.
    pub fn finish(&mut self) -> Result<AggregateOutput, SecAggError> {
        self.expect_stage(ServerStage::Unmasking, "finishing")?;
        let t = self.config.threshold as usize;
        if self.u4.len() < t {
            return Err(self.abandon(format!(
                "only {} participants answered the unmasking request, fewer than the threshold \
                 {t}",
                self.u4.len()
            )));
        }
        let context = self.config.context;
        let mut sum = std::mem::take(&mut self.sum);
        let requested = std::mem::take(&mut self.requested);
        for (&owner, &kind) in &requested {
            let shares = self.revealed.get(&owner).map(Vec::as_slice).unwrap_or(&[]);
            let secret = match reconstruct_checked(shares, t) {
                Ok(secret) => Zeroizing::new(secret),
                Err(reason) => {
                    return Err(self.abandon(format!(
                        "cannot recover the {kind:?} of participant {owner}: {reason}"
                    )));
                }
            };
            match kind {
                ShareKind::SelfMaskSeed => crypto::apply_mask(&mut sum, &secret, Sign::Subtract),
                ShareKind::MaskingKey => {
                    let key = KeyPair::from_secret_bytes(*secret);
                    if key.public != self.keys[&owner].masking_public_key {
                        return Err(self.abandon(format!(
                            "the shares of participant {owner}'s masking key are inconsistent \
                             with its advertised key"
                        )));
                    }
                    let survivors: Vec<u32> = self.neighbours_in(owner, &self.u3).collect();
                    for j in survivors {
                        let public = self.keys[&j].masking_public_key;
                        let seed =
                            match crypto::pairwise_seed(&key.secret, &public, &context, owner, j) {
                                Ok(seed) => Zeroizing::new(seed),
                                Err(e) => return Err(self.abandon(e.to_string())),
                            };
                        // j added +PRG if j < owner, −PRG otherwise; undo it.
                        let sign = if j < owner { Sign::Subtract } else { Sign::Add };
                        crypto::apply_mask(&mut sum, &seed, sign);
                    }
                }
            }
        }
        self.revealed.clear();
        self.stage = ServerStage::Completed;
        Ok(AggregateOutput {
            sum,
            contributors: self.u3.iter().copied().collect(),
        })
    }
}

/// A uniformly random permutation of 1..=n (Fisher–Yates with unbiased draws), for
/// [`Server::permute_participants`]. `rng` should be a CSPRNG whose output participants
/// cannot predict.
pub fn random_permutation<R: rand_core::Rng + ?Sized>(n: u32, rng: &mut R) -> Vec<u32> {
    let mut p: Vec<u32> = (1..=n).collect();
    for i in (1..p.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// A uniform draw from 0..bound (bound ≥ 1), by rejection so that no value is favoured.
fn uniform_below<R: rand_core::Rng + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % bound;
        }
    }
}

/// Reconstructs from the first t shares and, when there are more, checks that the last t
/// give the same secret.
fn reconstruct_checked(shares: &[Share], t: usize) -> Result<[u8; 32], String> {
    if shares.len() < t {
        return Err(format!(
            "{} shares arrived, the threshold is {t}",
            shares.len()
        ));
    }
    let secret = shamir::combine(shares, t).map_err(|e| e.to_string())?;
    if shares.len() > t {
        let other = shamir::combine(&shares[shares.len() - t..], t).map_err(|e| e.to_string())?;
        if other != secret {
            return Err("the revealed shares are inconsistent".into());
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::SecAggParams;
    use crate::{Client, EncodingParams, RoundContext, rng::simulation_rng};

    fn server(n: u32) -> Server {
        let params = SecAggParams::choose(n, 0.3, 0.0).unwrap();
        let encoding = EncodingParams {
            clip_norm: 1.0,
            scale: 16.0,
            cohort_size: n as usize,
            dimension: 2,
            device_noise_std: 0.0,
        };
        let config =
            RoundConfig::new(RoundContext([3; 32]), &params, [4; 32], encoding, 2).unwrap();
        Server::new(config).unwrap()
    }

    #[test]
    fn random_permutations_are_permutations_and_vary() {
        let mut rng = simulation_rng(1, &[]);
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let p = random_permutation(6, &mut rng);
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (1..=6).collect::<Vec<_>>());
            seen.insert(p);
        }
        assert!(
            seen.len() > 30,
            "{} distinct permutations of 50",
            seen.len()
        );
    }

    #[test]
    fn participants_are_renumbered_before_the_key_stage_closes_and_not_after() {
        let mut s = server(4);
        let mut rng = simulation_rng(2, &[]);
        let mut keys = vec![];
        for i in 1..=3 {
            let (_, k) = Client::advertise(s.config().clone(), &mut rng).unwrap();
            s.receive_keys(i, k.clone()).unwrap();
            keys.push(k);
        }
        for bad in [
            vec![1, 2, 3],
            vec![1, 1, 2, 3],
            vec![0, 1, 2, 3],
            vec![1, 2, 3, 5],
        ] {
            assert!(matches!(
                s.permute_participants(&bad),
                Err(SecAggError::InvalidInput(_))
            ));
        }
        s.permute_participants(&[4, 1, 2, 3]).unwrap();
        // 1 became 4, 2 became 1, 3 became 2; 3 is now free, and a replayed key is still
        // refused, without naming whose it is.
        let err = s.receive_keys(3, keys[0].clone()).unwrap_err().to_string();
        assert!(err.contains("already advertised"), "{err}");
        assert!(
            !err.contains('4') && !err.contains("participant 1"),
            "{err}"
        );
        let directories = s.close_advertise_keys().unwrap();
        let own: Vec<u32> = directories.iter().map(|(i, _)| *i).collect();
        assert_eq!(own, [1, 2, 4]);
        let key_of = |i: u32| {
            directories[0]
                .1
                .neighbours
                .iter()
                .chain(&directories[1].1.neighbours)
                .find(|k| k.participant_index == i)
                .unwrap()
                .masking_public_key
        };
        assert_eq!(key_of(4), keys[0].masking_public_key);
        assert_eq!(key_of(1), keys[1].masking_public_key);
        assert_eq!(key_of(2), keys[2].masking_public_key);
        assert!(matches!(
            s.permute_participants(&[1, 2, 3, 4]),
            Err(SecAggError::StageClosed(_))
        ));
    }
}
