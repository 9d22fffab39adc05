//! Whole rounds in process: cohorts of 50 with 0 %, 10 % and 30 % drop-out at each stage, the
//! unmasked sum against the plain sum of the encoded inputs, abandoned rounds, the unmasking
//! safety rule, and SecAgg+ on a Harary graph.

use std::collections::BTreeSet;

use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::{
    AggregateOutput, Client, EncodedInput, EncodingParams, Graph, RoundConfig, RoundContext,
    SecAggError, SecAggParams, Server, ServerStage, ShareKind, UnmaskingPlan,
};
use rand::RngExt;
use rand_core::Rng;

const DIMENSION: usize = 64;

/// Which participants drop before each of the four stages' messages.
#[derive(Default, Clone)]
struct Drops {
    before_keys: BTreeSet<u32>,
    before_shares: BTreeSet<u32>,
    before_input: BTreeSet<u32>,
    before_unmask: BTreeSet<u32>,
}

fn config_for(n: u32, dropout: f64, corruption: f64, seed: u8) -> RoundConfig {
    let params = SecAggParams::choose(n, dropout, corruption).unwrap();
    let encoding = EncodingParams {
        clip_norm: 1.0,
        scale: 2f64.powi(16),
        cohort_size: n as usize,
        dimension: DIMENSION,
        device_noise_std: 0.0,
    };
    RoundConfig::new(
        RoundContext([seed; 32]),
        &params,
        [seed; 32],
        encoding,
        params.threshold,
    )
    .unwrap()
}

fn random_input(config: &RoundConfig, rng: &mut impl Rng) -> EncodedInput {
    let mut v: Vec<f64> = (0..DIMENSION)
        .map(|_| (rng.next_u32() as f64 / u32::MAX as f64) - 0.5)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for x in &mut v {
        *x /= norm.max(1.0);
    }
    config.encoding.encode_f64(&v).unwrap()
}

/// Runs one round; returns the server's result and the plain sum of the inputs of the
/// participants that uploaded.
fn run_round(
    config: &RoundConfig,
    drops: &Drops,
    seed: u64,
) -> (Result<AggregateOutput, SecAggError>, Vec<u32>, Server) {
    let mut rng = simulation_rng(seed, &[]);
    let mut server = Server::new(config.clone()).unwrap();
    let n = config.cohort_size;
    let inputs: Vec<EncodedInput> = (0..n).map(|_| random_input(config, &mut rng)).collect();

    let mut stage1 = Vec::new();
    for i in 1..=n {
        if drops.before_keys.contains(&i) {
            continue;
        }
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        server.receive_keys(i, keys).unwrap();
        stage1.push((i, state));
    }
    let directories = match server.close_advertise_keys() {
        Ok(d) => d,
        Err(e) => return (Err(e), vec![], server),
    };
    let mut stage2 = Vec::new();
    for (i, directory) in directories {
        let pos = stage1.iter().position(|(j, _)| *j == i).unwrap();
        let (_, state) = stage1.swap_remove(pos);
        if drops.before_shares.contains(&i) {
            continue;
        }
        let (state, shares) = state.share_keys(&directory, &mut rng).unwrap();
        server.receive_shares(i, shares).unwrap();
        stage2.push((i, state));
    }
    let inboxes = match server.close_share_keys() {
        Ok(d) => d,
        Err(e) => return (Err(e), vec![], server),
    };
    let mut stage3 = Vec::new();
    let mut expected = vec![0u32; DIMENSION];
    for (i, inbox) in inboxes {
        let pos = stage2.iter().position(|(j, _)| *j == i).unwrap();
        let (_, state) = stage2.swap_remove(pos);
        if drops.before_input.contains(&i) {
            continue;
        }
        let input = &inputs[i as usize - 1];
        let (state, masked) = state.masked_input(&inbox, input).unwrap();
        assert_ne!(masked.values, input.values(), "the upload must be masked");
        server.receive_masked_input(i, masked).unwrap();
        for (e, v) in expected.iter_mut().zip(input.values()) {
            *e = e.wrapping_add(*v);
        }
        stage3.push((i, state));
    }
    let plans = match server.close_masked_input() {
        Ok(p) => p,
        Err(e) => return (Err(e), expected, server),
    };
    for (i, plan) in plans {
        let pos = stage3.iter().position(|(j, _)| *j == i).unwrap();
        let (_, state) = stage3.swap_remove(pos);
        if drops.before_unmask.contains(&i) {
            continue;
        }
        server
            .receive_unmask(i, state.unmask(&plan).unwrap())
            .unwrap();
    }
    let result = server.finish();
    (result, expected, server)
}

fn pick(n: u32, count: usize, seed: u64, exclude: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut rng = simulation_rng(seed, &[99]);
    let mut out = BTreeSet::new();
    while out.len() < count {
        let i = rng.random_range(1..=n);
        if !exclude.contains(&i) {
            out.insert(i);
        }
    }
    out
}

#[test]
fn cohort_of_50_sums_exactly_with_0_10_and_30_percent_dropout_at_each_stage() {
    let n = 50;
    let config = config_for(n, 0.3, 0.0, 1);
    for (r, rate) in [0.0, 0.1, 0.3].into_iter().enumerate() {
        let count = (rate * f64::from(n)).round() as usize;
        for stage in 0..4 {
            let seed = 100 + 10 * r as u64 + stage as u64;
            let dropped = pick(n, count, seed, &BTreeSet::new());
            let mut drops = Drops::default();
            match stage {
                0 => drops.before_keys = dropped.clone(),
                1 => drops.before_shares = dropped.clone(),
                2 => drops.before_input = dropped.clone(),
                _ => drops.before_unmask = dropped.clone(),
            }
            let (result, expected, _) = run_round(&config, &drops, seed);
            let output = result.unwrap_or_else(|e| panic!("rate {rate} stage {stage}: {e}"));
            assert_eq!(
                output.sum,
                expected,
                "rate {rate}, drop before stage {}",
                stage + 1
            );
            let contributors = if stage == 3 {
                n as usize
            } else {
                n as usize - count
            };
            assert_eq!(output.contributors.len(), contributors);
            for d in &dropped {
                assert_eq!(output.contributors.contains(d), stage == 3);
            }
        }
    }
}

#[test]
fn cohort_of_50_sums_exactly_with_10_percent_dropout_at_every_stage_in_one_round() {
    let n = 50;
    let config = config_for(n, 0.3, 0.0, 2);
    let mut gone = BTreeSet::new();
    let mut drops = Drops::default();
    for (stage, set) in [
        &mut drops.before_keys,
        &mut drops.before_shares,
        &mut drops.before_input,
        &mut drops.before_unmask,
    ]
    .into_iter()
    .enumerate()
    {
        *set = pick(n, 4, 7 + stage as u64, &gone);
        gone.extend(set.iter().copied());
    }
    let (result, expected, _) = run_round(&config, &drops, 3);
    let output = result.unwrap();
    assert_eq!(output.sum, expected);
    assert_eq!(output.contributors.len(), 50 - 12);
    // The decoded sum is the plain integer sum of the inputs.
    assert_eq!(
        config.encoding.decode_integers(&output.sum),
        expected
            .iter()
            .map(|&v| i64::from(v as i32))
            .collect::<Vec<_>>()
    );
}

#[test]
fn fewer_than_t_masked_inputs_abandon_the_round_and_nothing_is_unmasked() {
    let n = 50;
    let config = config_for(n, 0.3, 0.0, 3);
    let t = config.threshold as usize;
    let drops = Drops {
        before_input: pick(n, n as usize - t + 1, 5, &BTreeSet::new()),
        ..Drops::default()
    };
    let (result, _, mut server) = run_round(&config, &drops, 5);
    let e = result.unwrap_err();
    assert!(
        matches!(&e, SecAggError::Abandoned(m) if m.contains("fewer than the 25 needed")),
        "{e}"
    );
    assert!(matches!(server.stage(), ServerStage::Aborted(_)));
    assert!(matches!(server.finish(), Err(SecAggError::StageClosed(_))));
}

#[test]
fn fewer_than_t_unmasking_answers_abandon_the_round() {
    let n = 50;
    let config = config_for(n, 0.3, 0.0, 4);
    let t = config.threshold as usize;
    let drops = Drops {
        before_unmask: pick(n, n as usize - t + 1, 6, &BTreeSet::new()),
        ..Drops::default()
    };
    let (result, _, server) = run_round(&config, &drops, 6);
    let e = result.unwrap_err();
    assert!(
        matches!(&e, SecAggError::Abandoned(m) if m.contains("fewer than the threshold")),
        "{e}"
    );
    assert!(matches!(server.stage(), ServerStage::Aborted(_)));
}

#[test]
fn too_few_keys_abandon_the_round_at_the_first_stage() {
    let config = config_for(50, 0.3, 0.0, 5);
    let drops = Drops {
        before_keys: pick(50, 30, 8, &BTreeSet::new()),
        ..Drops::default()
    };
    let (result, _, _) = run_round(&config, &drops, 8);
    assert!(matches!(result, Err(SecAggError::Abandoned(m)) if m.contains("advertising keys")));
}

/// Drives a complete-graph round of 10 to the unmasking stage with participant 4 dropped
/// before uploading; returns the server, the survivors' states and their plans.
fn round_at_unmasking() -> (
    Server,
    Vec<(u32, fedpref_secagg::AwaitingUnmaskingPlan, UnmaskingPlan)>,
    fedpref_secagg::MaskedInput,
) {
    let config = config_for(10, 0.3, 0.0, 9);
    let mut rng = simulation_rng(9, &[]);
    let mut server = Server::new(config.clone()).unwrap();
    let mut s1 = Vec::new();
    for i in 1..=10 {
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        server.receive_keys(i, keys).unwrap();
        s1.push(state);
    }
    let mut s2 = Vec::new();
    for ((i, d), state) in server.close_advertise_keys().unwrap().into_iter().zip(s1) {
        let (state, shares) = state.share_keys(&d, &mut rng).unwrap();
        server.receive_shares(i, shares).unwrap();
        s2.push(state);
    }
    let mut s3 = Vec::new();
    let mut late = None;
    for ((i, inbox), state) in server.close_share_keys().unwrap().into_iter().zip(s2) {
        let input = random_input(&config, &mut rng);
        let (state, masked) = state.masked_input(&inbox, &input).unwrap();
        if i == 4 {
            late = Some(masked); // delayed past the stage's deadline
            continue;
        }
        server.receive_masked_input(i, masked).unwrap();
        s3.push((i, state));
    }
    let plans = server.close_masked_input().unwrap();
    let states = s3
        .into_iter()
        .zip(plans)
        .map(|((i, state), (j, plan))| {
            assert_eq!(i, j);
            (i, state, plan)
        })
        .collect();
    (server, states, late.unwrap())
}

#[test]
fn server_never_asks_for_both_shares_of_a_device_even_when_its_input_arrives_late() {
    let (mut server, states, late) = round_at_unmasking();
    assert_eq!(server.requested_kind(4), Some(ShareKind::MaskingKey));
    // The late input would make 4 a survivor whose masking key is also being revealed.
    let e = server.receive_masked_input(4, late).unwrap_err();
    assert!(matches!(e, SecAggError::StageClosed(_)), "{e}");
    assert_eq!(server.requested_kind(4), Some(ShareKind::MaskingKey));
    // Every plan lists 4 only as dropped, and every survivor only as a survivor.
    for (_, _, plan) in &states {
        assert!(plan.dropped_indices == vec![4]);
        assert!(!plan.survivor_indices.contains(&4));
    }
    // A device that reveals 4's self-mask seed share is refused, and nothing of it is kept.
    let (i, state, plan) = states.into_iter().next().unwrap();
    let mut reply = state.unmask(&plan).unwrap();
    for share in &mut reply.shares {
        if share.owner_index == 4 {
            share.kind = ShareKind::SelfMaskSeed;
        }
    }
    let e = server.receive_unmask(i, reply).unwrap_err();
    assert!(matches!(e, SecAggError::SafetyViolation(_)), "{e}");
}

#[test]
fn a_device_refuses_a_plan_asking_for_both_shares_of_a_neighbour() {
    let (_, states, _) = round_at_unmasking();
    let (_, state, plan) = states.into_iter().next().unwrap();
    let forged = UnmaskingPlan {
        survivor_indices: plan.survivor_indices.clone(),
        dropped_indices: vec![4, plan.survivor_indices[0]],
    };
    let e = state.unmask(&forged).unwrap_err();
    assert!(
        matches!(&e, SecAggError::SafetyViolation(m) if m.contains("both")),
        "{e}"
    );
}

#[test]
fn a_device_refuses_a_plan_with_fewer_than_t_survivors() {
    let (_, states, _) = round_at_unmasking();
    let (_, state, plan) = states.into_iter().next().unwrap();
    let forged = UnmaskingPlan {
        survivor_indices: plan.survivor_indices[..2].to_vec(),
        dropped_indices: plan.survivor_indices[2..].to_vec(),
    };
    assert!(matches!(
        state.unmask(&forged),
        Err(SecAggError::Abandoned(_))
    ));
}

#[test]
fn secagg_plus_on_a_harary_graph_sums_exactly_with_dropouts() {
    let n = 150;
    let config = config_for(n, 0.1, 0.05, 11);
    let Graph::Harary { degree, .. } = config.graph else {
        panic!("expected a Harary graph for n = {n}: {:?}", config.graph)
    };
    assert!(degree < n - 1);
    let mut gone = BTreeSet::new();
    let mut drops = Drops::default();
    for (stage, set) in [
        &mut drops.before_keys,
        &mut drops.before_shares,
        &mut drops.before_input,
        &mut drops.before_unmask,
    ]
    .into_iter()
    .enumerate()
    {
        *set = pick(n, 5, 20 + stage as u64, &gone);
        gone.extend(set.iter().copied());
    }
    let (result, expected, _) = run_round(&config, &drops, 12);
    let output = result.unwrap();
    assert_eq!(output.sum, expected);
    assert_eq!(output.contributors.len(), 150 - 15);
}

#[test]
fn a_directory_with_a_non_neighbour_is_refused() {
    let config = config_for(150, 0.1, 0.05, 13);
    let hoods = config.graph.neighbourhoods(150).unwrap();
    let outsider = (2..=150).find(|j| !hoods[0].contains(j)).unwrap();
    let mut rng = simulation_rng(13, &[]);
    let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
    let directory = fedpref_secagg::KeyDirectory {
        own_index: 1,
        neighbours: vec![fedpref_secagg::ParticipantKeys {
            participant_index: outsider,
            encryption_public_key: keys.encryption_public_key,
            masking_public_key: keys.masking_public_key,
        }],
        threshold: config.threshold,
    };
    let e = state.share_keys(&directory, &mut rng).unwrap_err();
    assert!(e.to_string().contains("not a neighbour"), "{e}");
}

#[test]
fn the_server_refuses_malformed_messages_and_keeps_nothing_of_them() {
    let config = config_for(10, 0.3, 0.0, 14);
    let mut rng = simulation_rng(14, &[]);
    let mut server = Server::new(config.clone()).unwrap();
    let mut states = Vec::new();
    for i in 1..=10 {
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        if i == 1 {
            let e = server.receive_keys(11, keys.clone()).unwrap_err();
            assert!(e.to_string().contains("outside 1..=10"), "{e}");
            server.receive_keys(1, keys.clone()).unwrap();
            let e = server.receive_keys(1, keys).unwrap_err();
            assert!(e.to_string().contains("already advertised"), "{e}");
        } else {
            server.receive_keys(i, keys).unwrap();
        }
        states.push(state);
    }
    assert!(server.awaiting().is_empty());
    let directories = server.close_advertise_keys().unwrap();
    assert_eq!(server.awaiting().len(), 10);
    let mut next = Vec::new();
    for ((i, d), state) in directories.into_iter().zip(states) {
        let (state, shares) = state.share_keys(&d, &mut rng).unwrap();
        if i == 2 {
            let mut short = shares.clone();
            short.shares.pop();
            assert!(
                server
                    .receive_shares(2, short)
                    .unwrap_err()
                    .to_string()
                    .contains("8 shares")
            );
            let mut forged = shares.clone();
            forged.shares[0].sender_index = 3;
            assert!(server.receive_shares(2, forged).is_err());
            let mut cut = shares.clone();
            cut.shares[0].ciphertext.pop();
            assert!(
                server
                    .receive_shares(2, cut)
                    .unwrap_err()
                    .to_string()
                    .contains("bytes")
            );
        }
        server.receive_shares(i, shares).unwrap();
        next.push(state);
    }
    let inboxes = server.close_share_keys().unwrap();
    // A tampered ciphertext does not authenticate at the device.
    let (_, mut inbox) = inboxes[0].clone();
    inbox.shares[0].ciphertext[0] ^= 1;
    let input = random_input(&config, &mut rng);
    let e = next.remove(0).masked_input(&inbox, &input).unwrap_err();
    assert!(e.to_string().contains("does not authenticate"), "{e}");
    let e = server
        .receive_masked_input(1, fedpref_secagg::MaskedInput { values: vec![0; 3] })
        .unwrap_err();
    assert!(e.to_string().contains("3 coordinates"), "{e}");
}

#[test]
fn the_server_refuses_low_order_and_replayed_public_keys_so_neighbours_can_go_on() {
    let config = config_for(10, 0.3, 0.0, 15);
    let mut rng = simulation_rng(15, &[]);
    let mut server = Server::new(config.clone()).unwrap();
    let mut states = Vec::new();
    let (state, first) = Client::advertise(config.clone(), &mut rng).unwrap();
    server.receive_keys(1, first.clone()).unwrap();
    states.push(state);
    // Points of order 1 and 4 on Curve25519: every neighbour's key agreement with them would
    // be non-contributory, so every neighbour would have to give up its round.
    let mut order_four = [0u8; 32];
    order_four[0] = 1;
    for bad in [[0u8; 32], order_four] {
        let (_, mut keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        keys.masking_public_key = bad;
        let e = server.receive_keys(2, keys.clone()).unwrap_err();
        assert!(
            matches!(&e, SecAggError::Malformed(m) if m.contains("masking public key is of low order")),
            "{e}"
        );
        std::mem::swap(
            &mut keys.masking_public_key,
            &mut keys.encryption_public_key,
        );
        let e = server.receive_keys(2, keys).unwrap_err();
        assert!(e.to_string().contains("encryption public key"), "{e}");
    }
    // Participant 1's advertisement replayed under another index: refused, without saying
    // whose it was.
    let e = server.receive_keys(3, first).unwrap_err().to_string();
    assert!(e.contains("already advertised in this round"), "{e}");
    assert!(!e.contains("participant 1"), "{e}");
    // Nothing of the refused messages was kept: 2 and 3 can still advertise, and the round
    // goes on for everyone.
    for i in 2..=10 {
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        server.receive_keys(i, keys).unwrap();
        states.push(state);
    }
    for ((i, directory), state) in server
        .close_advertise_keys()
        .unwrap()
        .into_iter()
        .zip(states)
    {
        let (_, shares) = state.share_keys(&directory, &mut rng).unwrap();
        server.receive_shares(i, shares).unwrap();
    }
    assert!(server.awaiting().is_empty());
}

#[test]
fn messages_are_bound_to_their_participants_and_stages() {
    let config = config_for(10, 0.3, 0.0, 16);
    let mut rng = simulation_rng(16, &[]);
    let mut server = Server::new(config.clone()).unwrap();
    let mut states = Vec::new();
    for i in 1..=10 {
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        server.receive_keys(i, keys).unwrap();
        states.push(state);
    }
    let mut sharing = Vec::new();
    for ((i, directory), state) in server
        .close_advertise_keys()
        .unwrap()
        .into_iter()
        .zip(states)
    {
        let (state, shares) = state.share_keys(&directory, &mut rng).unwrap();
        // Participant 10 drops before its shares reach the server.
        if i == 10 {
            continue;
        }
        for bad in [0, 11] {
            let e = server.receive_shares(bad, shares.clone()).unwrap_err();
            assert!(e.to_string().contains("outside 1..=10"), "{e}");
        }
        server.receive_shares(i, shares).unwrap();
        sharing.push((i, state));
    }
    let inboxes = server.close_share_keys().unwrap();
    let from = |inbox: &fedpref_secagg::ShareInbox, j: u32| {
        inbox
            .shares
            .iter()
            .position(|s| s.sender_index == j)
            .unwrap()
    };
    let input = random_input(&config, &mut rng);

    // 1's share from 2 replaced by the ciphertext 2 sent to 3, relabelled for 1.
    let (_, state) = sharing.remove(0);
    let mut inbox = inboxes[0].1.clone();
    let stolen = inboxes[2].1.shares[from(&inboxes[2].1, 2)]
        .ciphertext
        .clone();
    let k = from(&inbox, 2);
    inbox.shares[k].ciphertext = stolen;
    let e = state.masked_input(&inbox, &input).unwrap_err();
    assert!(e.to_string().contains("does not authenticate"), "{e}");

    // 2's share from 3 relabelled as coming from 4 (4's own share removed).
    let (_, state) = sharing.remove(0);
    let mut inbox = inboxes[1].1.clone();
    inbox.shares.remove(from(&inbox, 4));
    let k = from(&inbox, 3);
    inbox.shares[k].sender_index = 4;
    let e = state.masked_input(&inbox, &input).unwrap_err();
    assert!(e.to_string().contains("does not authenticate"), "{e}");

    // The others upload; 10, which never completed the key sharing, cannot.
    let mut uploaded = Vec::new();
    for ((i, inbox), (j, state)) in inboxes.into_iter().skip(2).zip(sharing) {
        assert_eq!(i, j);
        let (state, masked) = state.masked_input(&inbox, &input).unwrap();
        if i == 9 {
            let e = server.receive_masked_input(10, masked.clone()).unwrap_err();
            assert!(
                e.to_string().contains("did not complete the key sharing"),
                "{e}"
            );
            let e = server.receive_masked_input(0, masked.clone()).unwrap_err();
            assert!(e.to_string().contains("outside 1..=10"), "{e}");
        }
        server.receive_masked_input(i, masked).unwrap();
        uploaded.push((i, state));
    }
    let plans = server.close_masked_input().unwrap();
    assert_eq!(
        server.contributors().collect::<Vec<_>>(),
        (3..=9).collect::<Vec<_>>()
    );
    // 1 and 2 never uploaded: they are unmasked as dropped, and cannot answer the request.
    for (_, plan) in &plans {
        assert_eq!(plan.dropped_indices, vec![1, 2]);
    }
    let (i, plan) = &plans[0];
    let (_, state) = uploaded.remove(0);
    let reply = state.unmask(plan).unwrap();
    for outsider in [1, 2, 10] {
        let e = server.receive_unmask(outsider, reply.clone()).unwrap_err();
        assert!(e.to_string().contains("not asked to reveal"), "{e}");
    }
    server.receive_unmask(*i, reply.clone()).unwrap();
    let e = server.receive_unmask(*i, reply).unwrap_err();
    assert!(e.to_string().contains("already revealed"), "{e}");
}
