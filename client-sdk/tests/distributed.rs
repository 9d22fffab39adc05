//! Distributed mode on real devices (SQLite stores in temporary directories): the checked
//! round parameters, the share prepared and recorded before it can leave, and a real SecAgg+
//! round over the devices' shares whose unmasked sum is exactly the sum of what they
//! encoded.

use fedpref_client_sdk::fedpref_privacy::PrivacyMode;
use fedpref_client_sdk::fedpref_proto::v1::{self as pb, Dtype, upload_update_request::Part};
use fedpref_client_sdk::secure_aggregation::DistributedRound;
use fedpref_client_sdk::{
    CoordinatorClient, Device, DeviceConfig, LocalTraining, MatrixFactorization, PreparedShare,
    SdkError, Timestamp, TrainingTask,
};
use fedpref_secagg::{Client, Server, rng::os_rng};

const DIMENSION: usize = 40 * 4 + 40 + 1;
const COHORT: u32 = 5;

fn now() -> Timestamp {
    Timestamp::parse_rfc3339("2026-06-01T12:00:00Z").unwrap()
}

fn device(dir: &tempfile::TempDir, user: usize) -> Device {
    let mut d = Device::open(dir.path().join("device.db"), DeviceConfig::default()).unwrap();
    let mut catalogue = String::new();
    for i in 0..40 {
        catalogue += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"t{}\"],\"popularity\":{}}}\n",
            i % 5,
            100 - i
        );
    }
    d.ingest_jsonl(&catalogue, false, now()).unwrap();
    let mut events = String::new();
    for k in 0..6 {
        let item = (user * 7 + k * 3) % 40;
        events += &format!(
            "{{\"type\":\"rating\",\"item\":\"i{item}\",\"value\":{}.0,\"at\":\"2026-05-30T20:0{k}:00Z\"}}\n",
            1 + (user + k) % 5
        );
    }
    d.ingest_jsonl(&events, false, now()).unwrap();
    d.install_model(
        MatrixFactorization::initial(3, (0..40).map(|i| format!("i{i}")).collect(), 4, 0.3, 5)
            .unwrap(),
    )
    .unwrap();
    d
}

/// A round of five devices, complete graph, t = 3, m = 4: σ = 5 carried by the 3 honest
/// devices besides the user.
fn task(sigma: f64) -> pb::Task {
    let scale = 65_536.0;
    let honest = 3u32;
    let variance = ((sigma * scale).powi(2) / f64::from(honest)).ceil() as u64;
    pb::Task {
        run_id: "run".into(),
        round_id: 7,
        task_token: "token".into(),
        privacy_mode: pb::PrivacyMode::Distributed as i32,
        clip_norm: 1.0,
        noise_multiplier: sigma,
        secure_aggregation_round: Some(pb::SecureAggregationRound {
            round_context: vec![9; 32],
            cohort_size: COHORT,
            threshold: 3,
            neighbour_count: 0,
            graph_seed: vec![],
            min_contributors: 4,
            fixed_point_scale: scale,
            dimension: DIMENSION as u64,
            device_noise_variance: variance,
            rounding_beta: (-0.5f64).exp(),
            assumed_honest_devices: honest,
            ..pb::SecureAggregationRound::default()
        }),
        ..pb::Task::default()
    }
}

fn training_task(mode: PrivacyMode) -> TrainingTask {
    TrainingTask {
        round_id: 7,
        model_version: 3,
        training: LocalTraining::default(),
        clip_norm: 1.0,
        noise_multiplier: 5.0,
        mode,
        clip_bit_noise_std: None,
    }
}

fn share(d: &mut Device, round: &DistributedRound) -> PreparedShare {
    d.prepare_share(&training_task(PrivacyMode::Distributed), round, now())
        .unwrap()
}

#[test]
fn a_share_is_recorded_before_it_leaves_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir, 1);
    let round = DistributedRound::from_task(&task(5.0), DIMENSION).unwrap();
    let s = share(&mut d, &round);
    assert_eq!(s.encoded().values().len(), DIMENSION);
    let spent = d.budget().unwrap();
    assert_eq!(spent.rounds, 1);
    assert_eq!(spent.audience, "release_observers");
    assert!(spent.epsilon_spent > 0.0 && spent.epsilon_spent == s.spent().epsilon);
    assert_eq!(spent.uploads[0].mode, "distributed");
    // The recorded σ bounds the mechanism's RDP: a little below σ = 5 (rounding adds to the
    // sensitivity), never above.
    let recorded = spent.uploads[0].noise_multiplier;
    assert!(recorded > 4.5 && recorded <= 5.0, "{recorded}");
    // It names the honest fraction the ε rests on: the task's, as a record of the device's own.
    assert_eq!(
        (
            spent.uploads[0].assumed_honest_devices,
            spent.uploads[0].min_contributors
        ),
        (
            Some(u64::from(
                task(5.0)
                    .secure_aggregation_round
                    .unwrap()
                    .assumed_honest_devices
            )),
            Some(4)
        )
    );
    drop(d);
    let d = Device::open(dir.path().join("device.db"), DeviceConfig::default()).unwrap();
    assert_eq!(d.budget().unwrap().epsilon_spent, spent.epsilon_spent);
}

#[test]
fn no_share_is_prepared_when_training_is_off_the_budget_would_be_exceeded_or_the_mode_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir, 2);
    let round = DistributedRound::from_task(&task(5.0), DIMENSION).unwrap();
    assert!(matches!(
        d.prepare_share(&training_task(PrivacyMode::Local), &round, now()),
        Err(SdkError::UnsupportedMode(PrivacyMode::Local))
    ));
    d.set_training(false).unwrap();
    assert!(matches!(d.check_share(&round), Err(SdkError::TrainingOff)));
    assert!(matches!(
        d.prepare_share(&training_task(PrivacyMode::Distributed), &round, now()),
        Err(SdkError::TrainingOff)
    ));
    d.set_training(true).unwrap();
    // σ = 0.05: one round costs far more than the default budget.
    let greedy = DistributedRound::from_task(&task(0.05), DIMENSION).unwrap();
    let err = d
        .prepare_share(&training_task(PrivacyMode::Distributed), &greedy, now())
        .unwrap_err();
    assert!(matches!(err, SdkError::BudgetExceeded(_)), "{err}");
    let b = d.budget().unwrap();
    assert_eq!((b.rounds, b.uploads.len()), (0, 0));
}

#[test]
fn the_masked_input_is_uploaded_as_one_u32_tensor_of_the_models_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir, 3);
    let t = task(5.0);
    let round = DistributedRound::from_task(&t, DIMENSION).unwrap();
    let s = share(&mut d, &round);
    let masked = fedpref_secagg::MaskedInput {
        values: s.encoded().values().to_vec(),
    };
    let messages = CoordinatorClient::masked_input_messages(&t, &s, &masked).unwrap();
    let Some(Part::Header(header)) = &messages[0].part else {
        panic!("no header first");
    };
    assert_eq!(header.privacy_mode, pb::PrivacyMode::Distributed as i32);
    assert_eq!(
        header.tensors,
        [pb::TensorSpec {
            name: "masked_update".into(),
            shape: vec![DIMENSION as u64],
            dtype: Dtype::U32 as i32,
        }]
    );
    let bytes: usize = messages[1..]
        .iter()
        .map(|m| match &m.part {
            Some(Part::Chunk(c)) => c.content.len(),
            _ => panic!("a second header"),
        })
        .sum();
    assert_eq!(bytes, DIMENSION * 4);
}

#[test]
fn five_devices_shares_through_a_real_secagg_round_unmask_to_the_exact_sum_of_what_they_encoded() {
    let t = task(5.0);
    let round = DistributedRound::from_task(&t, DIMENSION).unwrap();
    let dirs: Vec<_> = (0..COHORT).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut shares = vec![];
    for (user, dir) in dirs.iter().enumerate() {
        let mut d = device(dir, user);
        shares.push(share(&mut d, &round));
    }
    let config = round.config.clone();
    let mut server = Server::new(config.clone()).unwrap();
    let mut rng = os_rng().unwrap();
    let mut waiting = vec![];
    for i in 1..=COHORT {
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        server.receive_keys(i, keys).unwrap();
        waiting.push(state);
    }
    let mut sharing = vec![];
    for ((i, directory), state) in server
        .close_advertise_keys()
        .unwrap()
        .into_iter()
        .zip(waiting)
    {
        let (state, s) = state.share_keys(&directory, &mut rng).unwrap();
        server.receive_shares(i, s).unwrap();
        sharing.push((i, state));
    }
    let mut uploaded = vec![];
    for ((i, inbox), (_, state)) in server.close_share_keys().unwrap().into_iter().zip(sharing) {
        if i == 2 {
            continue; // device 2 drops before uploading
        }
        let (state, masked) = state
            .masked_input(&inbox, shares[i as usize - 1].encoded())
            .unwrap();
        server.receive_masked_input(i, masked).unwrap();
        uploaded.push(state);
    }
    for ((i, plan), state) in server
        .close_masked_input()
        .unwrap()
        .into_iter()
        .zip(uploaded)
    {
        server
            .receive_unmask(i, state.unmask(&plan).unwrap())
            .unwrap();
    }
    let output = server.finish().unwrap();
    assert_eq!(output.contributors, vec![1, 3, 4, 5]);
    let mut expected = vec![0u32; DIMENSION];
    for i in [1usize, 3, 4, 5] {
        for (e, v) in expected.iter_mut().zip(shares[i - 1].encoded().values()) {
            *e = e.wrapping_add(*v);
        }
    }
    assert_eq!(output.sum, expected);
}
