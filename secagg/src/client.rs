//! The device's side: a typestate machine. Each stage consumes the previous state with the
//! server's input and returns the next state with the device's message, so a stage cannot be
//! run twice or out of order, and secrets never outlive the round.
//!
//! ```text
//! Client::advertise ──AdvertiseKeys──▶ AwaitingKeyDirectory
//!   .share_keys(KeyDirectory) ──ShareKeys──▶ AwaitingShareInbox
//!   .masked_input(ShareInbox, EncodedInput) ──MaskedInput──▶ AwaitingUnmaskingPlan
//!   .unmask(UnmaskingPlan) ──Unmask──▶ (done)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::config::RoundConfig;
use crate::crypto::{self, KeyPair, Sign};
use crate::encoding::EncodedInput;
use crate::messages::{
    AdvertiseKeys, KeyDirectory, MaskedInput, ParticipantKeys, RevealedShare, ShareInbox,
    ShareKeys, ShareKind, Unmask, UnmaskingPlan,
};
use crate::shamir::{self, SHARE_BYTES, Share};
use crate::{EncryptedShare, SecAggError};

/// Plaintext of one share message: sender, recipient, self-mask seed share, masking key share.
const PLAINTEXT_BYTES: usize = 8 + 2 * SHARE_BYTES;

/// Entry point of the device's side.
pub struct Client;

impl Client {
    /// Stage 1: makes the round's two key pairs and the message advertising them. The config
    /// is checked first.
    pub fn advertise<R: CryptoRng + ?Sized>(
        config: RoundConfig,
        rng: &mut R,
    ) -> Result<(AwaitingKeyDirectory, AdvertiseKeys), SecAggError> {
        config.validate()?;
        let encryption = KeyPair::generate(rng);
        let masking = KeyPair::generate(rng);
        let message = AdvertiseKeys {
            encryption_public_key: encryption.public,
            masking_public_key: masking.public,
        };
        Ok((
            AwaitingKeyDirectory {
                config,
                encryption,
                masking,
            },
            message,
        ))
    }
}

/// After stage 1: waiting for the key directory.
pub struct AwaitingKeyDirectory {
    config: RoundConfig,
    encryption: KeyPair,
    masking: KeyPair,
}

/// After stage 2: waiting for the shares addressed to this device.
pub struct AwaitingShareInbox {
    config: RoundConfig,
    own_index: u32,
    masking: KeyPair,
    self_mask_seed: Zeroizing<[u8; 32]>,
    neighbours: BTreeMap<u32, ParticipantKeys>,
    /// For each neighbour, the key of its share message to this device.
    inbound_keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

/// After stage 3: waiting for the unmasking plan. Holds the neighbours' shares.
pub struct AwaitingUnmaskingPlan {
    own_index: u32,
    threshold: u32,
    /// For each neighbour that sent shares (and so was masked with): its self-mask seed share
    /// and its masking key share, at this device's x-coordinate.
    held: BTreeMap<u32, (Share, Share)>,
}

impl std::fmt::Debug for AwaitingKeyDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AwaitingKeyDirectory { .. }")
    }
}
impl std::fmt::Debug for AwaitingShareInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AwaitingShareInbox {{ own_index: {}, .. }}",
            self.own_index
        )
    }
}
impl std::fmt::Debug for AwaitingUnmaskingPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AwaitingUnmaskingPlan {{ own_index: {}, .. }}",
            self.own_index
        )
    }
}

impl AwaitingKeyDirectory {
    /// The public keys this device advertised.
    pub fn advertised(&self) -> AdvertiseKeys {
        AdvertiseKeys {
            encryption_public_key: self.encryption.public,
            masking_public_key: self.masking.public,
        }
    }

    /// Stage 2: checks the directory, draws the self-mask seed, Shamir-shares it and the
    /// masking secret key among the neighbours (threshold t, x-coordinate = their index) and
    /// encrypts each neighbour's pair of shares to it.
    ///
    /// Refuses a directory whose threshold differs from the config's, with a bad or repeated
    /// index, with a neighbour outside this device's neighbourhood in the public graph, or
    /// with fewer than t neighbours (its secrets could not be recovered).
    pub fn share_keys<R: CryptoRng + ?Sized>(
        self,
        directory: &KeyDirectory,
        rng: &mut R,
    ) -> Result<(AwaitingShareInbox, ShareKeys), SecAggError> {
        let config = self.config;
        let own = directory.own_index;
        if own == 0 || own > config.cohort_size {
            return Err(SecAggError::Protocol(format!(
                "own index {own} is outside 1..={}",
                config.cohort_size
            )));
        }
        if directory.threshold != config.threshold {
            return Err(SecAggError::Protocol(format!(
                "the directory's threshold {} differs from the round's {}",
                directory.threshold, config.threshold
            )));
        }
        let allowed: BTreeSet<u32> = config
            .graph
            .neighbours_of(config.cohort_size, own)?
            .into_iter()
            .collect();
        let mut neighbours = BTreeMap::new();
        for keys in &directory.neighbours {
            let j = keys.participant_index;
            if !allowed.contains(&j) {
                return Err(SecAggError::Protocol(format!(
                    "participant {j} is not a neighbour of {own} in the round's graph"
                )));
            }
            if neighbours.insert(j, keys.clone()).is_some() {
                return Err(SecAggError::Protocol(format!(
                    "participant {j} appears twice in the directory"
                )));
            }
        }
        if neighbours.len() < config.threshold as usize {
            return Err(SecAggError::Abandoned(format!(
                "only {} neighbours advertised keys, fewer than the threshold {}",
                neighbours.len(),
                config.threshold
            )));
        }
        let mut self_mask_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(self_mask_seed.as_mut());
        let holders: Vec<u32> = neighbours.keys().copied().collect();
        let t = config.threshold as usize;
        let seed_shares = shamir::split(&self_mask_seed, t, &holders, rng)?;
        let masking_secret = Zeroizing::new(self.masking.secret.to_bytes());
        let key_shares = shamir::split(&masking_secret, t, &holders, rng)?;
        let mut shares = Vec::with_capacity(holders.len());
        let mut inbound_keys = BTreeMap::new();
        for ((j, seed_share), key_share) in holders.iter().zip(&seed_shares).zip(&key_shares) {
            let keys = &neighbours[j];
            let (key, inbound) = crypto::share_keys(
                &self.encryption.secret,
                &keys.encryption_public_key,
                &config.context,
                own,
                *j,
            )?;
            let key = Zeroizing::new(key);
            inbound_keys.insert(*j, Zeroizing::new(inbound));
            let mut plaintext = Zeroizing::new(Vec::with_capacity(PLAINTEXT_BYTES));
            plaintext.extend_from_slice(&own.to_be_bytes());
            plaintext.extend_from_slice(&j.to_be_bytes());
            plaintext.extend_from_slice(&Zeroizing::new(seed_share.to_bytes()));
            plaintext.extend_from_slice(&Zeroizing::new(key_share.to_bytes()));
            shares.push(EncryptedShare {
                sender_index: own,
                recipient_index: *j,
                ciphertext: crypto::seal(&key, &config.context, own, *j, &plaintext),
            });
        }
        Ok((
            AwaitingShareInbox {
                config,
                own_index: own,
                masking: self.masking,
                self_mask_seed,
                neighbours,
                inbound_keys,
            },
            ShareKeys { shares },
        ))
    }
}

impl AwaitingShareInbox {
    /// This device's participant index.
    pub fn own_index(&self) -> u32 {
        self.own_index
    }

    /// Stage 3: decrypts and keeps the neighbours' shares, then masks the encoded update:
    /// `y = x + PRG(b) + Σ_{j in inbox, own < j} PRG(s_j) − Σ_{j in inbox, own > j} PRG(s_j)`
    /// modulo 2³².
    ///
    /// Refuses an inbox with a share from a non-neighbour, for another recipient, repeated, or
    /// that does not authenticate, and an inbox with fewer than t senders (then too few
    /// devices hold this device's shares for its mask to be removed).
    pub fn masked_input(
        self,
        inbox: &ShareInbox,
        input: &EncodedInput,
    ) -> Result<(AwaitingUnmaskingPlan, MaskedInput), SecAggError> {
        let own = self.own_index;
        let config = &self.config;
        if input.values().len() != config.dimension() {
            return Err(SecAggError::InvalidInput(format!(
                "the encoded update has {} coordinates, the round expects {}",
                input.values().len(),
                config.dimension()
            )));
        }
        let mut held = BTreeMap::new();
        for share in &inbox.shares {
            let j = share.sender_index;
            if share.recipient_index != own {
                return Err(SecAggError::Protocol(format!(
                    "a share for participant {} was delivered to {own}",
                    share.recipient_index
                )));
            }
            let Some(key) = self.inbound_keys.get(&j) else {
                return Err(SecAggError::Protocol(format!(
                    "a share from participant {j}, which is not a neighbour of {own}"
                )));
            };
            if held.contains_key(&j) {
                return Err(SecAggError::Protocol(format!(
                    "two shares from participant {j}"
                )));
            }
            let plaintext = Zeroizing::new(crypto::open(
                key,
                &config.context,
                j,
                own,
                &share.ciphertext,
            )?);
            if plaintext.len() != PLAINTEXT_BYTES
                || plaintext[..4] != j.to_be_bytes()
                || plaintext[4..8] != own.to_be_bytes()
            {
                return Err(SecAggError::Protocol(format!(
                    "the share from participant {j} is malformed"
                )));
            }
            let seed_share = Share::from_bytes(own, &plaintext[8..8 + SHARE_BYTES])?;
            let key_share = Share::from_bytes(own, &plaintext[8 + SHARE_BYTES..])?;
            held.insert(j, (seed_share, key_share));
        }
        if held.len() < config.threshold as usize {
            return Err(SecAggError::Abandoned(format!(
                "only {} neighbours completed the key sharing, fewer than the threshold {}",
                held.len(),
                config.threshold
            )));
        }
        let mut values = input.values().to_vec();
        crypto::apply_mask(&mut values, &self.self_mask_seed, Sign::Add);
        for j in held.keys() {
            let seed = Zeroizing::new(crypto::pairwise_seed(
                &self.masking.secret,
                &self.neighbours[j].masking_public_key,
                &config.context,
                own,
                *j,
            )?);
            let sign = if own < *j { Sign::Add } else { Sign::Subtract };
            crypto::apply_mask(&mut values, &seed, sign);
        }
        Ok((
            AwaitingUnmaskingPlan {
                own_index: own,
                threshold: config.threshold,
                held,
            },
            MaskedInput { values },
        ))
    }
}

impl AwaitingUnmaskingPlan {
    /// This device's participant index.
    pub fn own_index(&self) -> u32 {
        self.own_index
    }

    /// Stage 4: reveals, for each neighbour in the plan, the self-mask seed share if it
    /// survived or the masking-key share if it dropped — **never both for one neighbour**.
    ///
    /// Refuses (revealing nothing) a plan that lists a neighbour in both lists, lists this
    /// device or a participant whose shares it does not hold, repeats an index, or shows fewer
    /// than t survivors counting this device.
    pub fn unmask(self, plan: &UnmaskingPlan) -> Result<Unmask, SecAggError> {
        let own = self.own_index;
        let survivors: BTreeSet<u32> = plan.survivor_indices.iter().copied().collect();
        let dropped: BTreeSet<u32> = plan.dropped_indices.iter().copied().collect();
        if survivors.len() != plan.survivor_indices.len()
            || dropped.len() != plan.dropped_indices.len()
        {
            return Err(SecAggError::Protocol(
                "the unmasking plan repeats an index".into(),
            ));
        }
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::SafetyViolation(format!(
                "the unmasking plan lists participant {both} as both survived and dropped: \
                 revealing both of its shares would expose its input"
            )));
        }
        for j in survivors.iter().chain(&dropped) {
            if *j == own || !self.held.contains_key(j) {
                return Err(SecAggError::Protocol(format!(
                    "the unmasking plan names participant {j}, whose shares {own} does not hold"
                )));
            }
        }
        if survivors.len() + 1 < self.threshold as usize {
            return Err(SecAggError::Abandoned(format!(
                "the unmasking plan shows {} survivors around participant {own}, fewer than the \
                 threshold {}",
                survivors.len() + 1,
                self.threshold
            )));
        }
        let shares = survivors
            .iter()
            .map(|j| (j, ShareKind::SelfMaskSeed))
            .chain(dropped.iter().map(|j| (j, ShareKind::MaskingKey)))
            .map(|(j, kind)| {
                let (seed_share, key_share) = &self.held[j];
                let share = match kind {
                    ShareKind::SelfMaskSeed => seed_share,
                    ShareKind::MaskingKey => key_share,
                };
                RevealedShare {
                    owner_index: *j,
                    kind,
                    share: share.to_bytes(),
                }
            })
            .collect();
        Ok(Unmask { shares })
    }
}
