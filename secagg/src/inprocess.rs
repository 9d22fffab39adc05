//! A whole round in one process: every device's state machine and the server's, with
//! scripted drop-outs. For simulations (`fedpref-sim --privacy-mode distributed`) and tests;
//! a real deployment runs the two sides on different machines.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::CryptoRng;

use crate::{AggregateOutput, Client, EncodedInput, RoundConfig, SecAggError, Server};

/// Which participants drop out just before sending each stage's message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dropouts {
    /// Never advertise keys.
    pub before_keys: BTreeSet<u32>,
    /// Advertise keys, then never share them.
    pub before_shares: BTreeSet<u32>,
    /// Share keys, then never upload a masked input.
    pub before_input: BTreeSet<u32>,
    /// Upload, then never answer the unmasking request.
    pub before_unmask: BTreeSet<u32>,
}

/// Bytes each participant sent in a round, by stage (protobuf encodings, see
/// [`crate::messages`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BytesSent {
    /// Per participant: advertise, share keys, masked input, unmask.
    pub by_participant: BTreeMap<u32, [usize; 4]>,
}

/// Runs one round. `inputs[i − 1]` is participant i's encoded update. All randomness (keys,
/// seeds, shares) comes from `rng`: pass [`crate::rng::simulation_rng`] for a reproducible
/// simulation. Returns the server's output, or the error that abandoned the round.
pub fn run_round<R: CryptoRng + ?Sized>(
    config: &RoundConfig,
    inputs: &[EncodedInput],
    dropouts: &Dropouts,
    rng: &mut R,
) -> Result<(AggregateOutput, BytesSent), SecAggError> {
    let n = config.cohort_size;
    if inputs.len() != n as usize {
        return Err(SecAggError::InvalidInput(format!(
            "{} inputs for a cohort of {n}",
            inputs.len()
        )));
    }
    let mut bytes = BytesSent::default();
    let mut server = Server::new(config.clone())?;

    let mut advertised = BTreeMap::new();
    for i in (1..=n).filter(|i| !dropouts.before_keys.contains(i)) {
        let (state, keys) = Client::advertise(config.clone(), rng)?;
        bytes.by_participant.entry(i).or_default()[0] = keys.wire_len();
        server.receive_keys(i, keys)?;
        advertised.insert(i, state);
    }
    let mut shared = BTreeMap::new();
    for (i, directory) in server.close_advertise_keys()? {
        let state = advertised
            .remove(&i)
            .expect("the server only lists advertisers");
        if dropouts.before_shares.contains(&i) {
            continue;
        }
        let (state, shares) = state.share_keys(&directory, rng)?;
        bytes.by_participant.entry(i).or_default()[1] = shares.wire_len();
        server.receive_shares(i, shares)?;
        shared.insert(i, state);
    }
    let mut uploaded = BTreeMap::new();
    for (i, inbox) in server.close_share_keys()? {
        let state = shared.remove(&i).expect("the server only lists sharers");
        if dropouts.before_input.contains(&i) {
            continue;
        }
        let (state, masked) = state.masked_input(&inbox, &inputs[i as usize - 1])?;
        bytes.by_participant.entry(i).or_default()[2] = masked.wire_len();
        server.receive_masked_input(i, masked)?;
        uploaded.insert(i, state);
    }
    for (i, plan) in server.close_masked_input()? {
        let state = uploaded
            .remove(&i)
            .expect("the server only plans for uploaders");
        if dropouts.before_unmask.contains(&i) {
            continue;
        }
        let reply = state.unmask(&plan)?;
        bytes.by_participant.entry(i).or_default()[3] = reply.wire_len();
        server.receive_unmask(i, reply)?;
    }
    Ok((server.finish()?, bytes))
}
