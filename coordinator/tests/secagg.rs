//! Distributed mode end to end, over the real gRPC services on 127.0.0.1 with TLS from a
//! certificate generated here: cohorts of 50 devices, each driven by `fedpref_secagg::Client`
//! and a tonic client, running concurrently on tokio, with 0 %, 10 % and 30 % of them dropping
//! out before each stage; rounds with too few survivors abandoned without spending; the
//! unmasking safety rule against a device that tries to break it; bad inputs and their
//! statuses.
//!
//! The devices' inputs are random integers on the round's lattice with no noise, so the
//! coordinator's unmasked sum must equal their plain sum exactly: any lost mask, double
//! counting or decoding slip shows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fedpref_coordinator::config::{Config, Limits};
use fedpref_coordinator::ledger::{LedgerEntry, LedgerEvent};
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_proto::metadata::bearer;
use fedpref_proto::prost_types;
use fedpref_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient, check_in_response::Outcome,
    device_service_client::DeviceServiceClient,
    secure_aggregation_service_client::SecureAggregationServiceClient, upload_update_request::Part,
};
use fedpref_secagg::encoding::FixedPoint;
use fedpref_secagg::{
    AwaitingKeyDirectory, Client, EncodedInput, EncodingParams, Graph, KeyDirectory,
    ParticipantKeys, RoundConfig, RoundContext, ShareInbox, UnmaskingPlan,
};
use rand_core::Rng;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Request};

const APP_KEY: &str = "test-app-key-0123456789abcdef";
const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
const COHORT: u32 = 50;

struct TestServer {
    running: Running,
    channel: Channel,
    admin: Channel,
    _dir: tempfile::TempDir,
}

fn limits() -> Limits {
    Limits {
        max_upload_bytes: 1 << 20,
        max_upload_chunks: 64,
        max_chunk_bytes: 4096,
        download_chunk_bytes: 4096,
        device_requests_per_second: 100_000.0,
        device_burst: 100_000,
        max_concurrent_requests: 512,
        tick_millis: 20,
        ..Limits::default()
    }
}

async fn connect(port: u16, ca_pem: &str) -> Channel {
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(limits()).await
    }

    async fn start_with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cert.pem", &cert.cert.pem());
        write("key.pem", &cert.signing_key.serialize_pem());
        write("app.key", APP_KEY);
        write("admin.token", ADMIN_TOKEN);
        let config = r#"
[listen]
device = "127.0.0.1:0"
admin = "127.0.0.1:1"
[store]
path = "coordinator.db"
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[auth]
app_key_file = "app.key"
admin_token_file = "admin.token"
"#;
        let mut config = Config::from_toml(config, "test.toml", dir.path()).unwrap();
        config.limits = limits;
        let options = ServeOptions {
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let running = start(&config, &options).await.unwrap();
        let ca = cert.cert.pem();
        let channel = connect(running.device_addr.port(), &ca).await;
        let admin = connect(running.admin_addr.port(), &ca).await;
        Self {
            running,
            channel,
            admin,
            _dir: dir,
        }
    }

    fn device(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.channel.clone())
    }

    fn secagg(&self) -> SecureAggregationServiceClient<Channel> {
        SecureAggregationServiceClient::new(self.channel.clone())
    }

    async fn create_run(&self, m: pb::RunManifest) -> String {
        AdminServiceClient::new(self.admin.clone())
            .create_run(authed(
                pb::CreateRunRequest {
                    manifest: Some(m),
                    request_id: "create-1".into(),
                    simulation_seed: None,
                },
                ADMIN_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .run_id
    }

    async fn enroll(&self, n: usize) -> Vec<String> {
        let mut tokens = vec![];
        for _ in 0..n {
            tokens.push(
                self.device()
                    .enroll(pb::EnrollRequest {
                        app_key: APP_KEY.into(),
                        sdk_version: "0.1.0".into(),
                        grant: None,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .device_token,
            );
        }
        tokens
    }

    /// The ledger's events, read from the store.
    fn ledger(&self, run_id: &str) -> Vec<LedgerEvent> {
        let c = self.running.coordinator();
        let c = c.lock().unwrap();
        c.store()
            .ledger(run_id)
            .unwrap()
            .iter()
            .map(|e| serde_json::from_str::<LedgerEntry>(&e.body).unwrap().event)
            .collect()
    }

    /// The last sum a distributed round unmasked: its round, integers and contributors.
    fn last_sum(&self, run_id: &str) -> Option<(u64, Vec<i64>, BTreeSet<String>)> {
        let c = self.running.coordinator();
        let c = c.lock().unwrap();
        c.engine(run_id)?.last_unmasked_sum().map(|s| {
            (
                s.round,
                s.integers.clone(),
                s.contributors.iter().cloned().collect(),
            )
        })
    }

    /// The device id behind each token (the coordinator's, from the store).
    fn device_ids(&self, tokens: &[String]) -> Vec<String> {
        let c = self.running.coordinator();
        let c = c.lock().unwrap();
        tokens
            .iter()
            .map(|t| {
                let hash = fedpref_coordinator::hex(&fedpref_coordinator::service::auth::sha256(
                    t.as_bytes(),
                ));
                c.store().device_by_token_hash(&hash).unwrap().unwrap()
            })
            .collect()
    }
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        bearer(token).parse().unwrap(),
    );
    r
}

fn seconds(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// A distributed run of 10 items × 2 factors (31 parameters) for a cohort of `n`, each stage
/// lasting `stage_seconds` (stages close early once everyone has answered).
fn manifest(n: u32, minimum: u32, stage_seconds: i64, rounds: u64) -> pb::RunManifest {
    pb::RunManifest {
        title: "Distributed test".into(),
        purpose: "Exercise secure aggregation over gRPC".into(),
        owner: "tests@example.com".into(),
        data_elements_used: vec![pb::DataElement {
            element: "ratings".into(),
            rationale: String::new(),
        }],
        privacy_mode: pb::PrivacyMode::Distributed as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: 1000.0,
            delta: 1e-5,
        }),
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        sampling: Some(pb::Sampling {
            method: Some(pb::sampling::Method::Cohort(pb::CohortSampling {
                target_cohort_size: n,
                round_deadline: seconds(600),
                minimum_cohort_size: minimum,
            })),
        }),
        rounds,
        server_optimizer: Some(pb::ServerOptimizer {
            optimizer: Some(pb::server_optimizer::Optimizer::Fedavg(pb::FedAvg {
                server_learning_rate: 1.0,
            })),
        }),
        model: Some(pb::ModelSpec {
            model: Some(pb::model_spec::Model::MatrixFactorization(
                pb::MatrixFactorizationSpec {
                    item_count: 10,
                    factor_dimension: 2,
                    item_biases: true,
                    global_offset: true,
                    init_stddev: 0.1,
                    init_seed: Some(7),
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: pb::ConsentModel::OptIn as i32,
            description: String::new(),
            withdrawal_effect: String::new(),
        }),
        secure_aggregation: Some(pb::SecureAggregationConfig {
            noise: pb::DistributedNoise::DiscreteGaussian as i32,
            dropout_rate: 0.3,
            corruption_rate: 0.0,
            advertise_keys_duration: seconds(stage_seconds),
            share_keys_duration: seconds(stage_seconds),
            masked_input_duration: seconds(stage_seconds),
            unmasking_duration: seconds(stage_seconds),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The round's config as a device rebuilds it from its task (see `SecureAggregationRound`).
fn round_config(task: &pb::Task) -> RoundConfig {
    let r = task
        .secure_aggregation_round
        .as_ref()
        .expect("a distributed task");
    assert!(task.secure_aggregation.is_some());
    assert_eq!(task.privacy_mode, pb::PrivacyMode::Distributed as i32);
    let graph = if r.neighbour_count == 0 {
        Graph::Complete
    } else {
        Graph::Harary {
            degree: r.neighbour_count,
            seed: r.graph_seed.as_slice().try_into().unwrap(),
        }
    };
    let config = RoundConfig {
        context: RoundContext(r.round_context.as_slice().try_into().unwrap()),
        cohort_size: r.cohort_size,
        threshold: r.threshold,
        graph,
        min_contributors: r.min_contributors,
        encoding: FixedPoint::new(EncodingParams {
            clip_norm: task.clip_norm,
            scale: r.fixed_point_scale,
            cohort_size: r.cohort_size as usize,
            dimension: r.dimension as usize,
            device_noise_std: (r.device_noise_variance as f64).sqrt() / r.fixed_point_scale,
        })
        .unwrap(),
    };
    config.validate().unwrap();
    config
}

/// Where a device stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    BeforeKeys,
    BeforeShares,
    BeforeInput,
    BeforeUnmask,
    Never,
}

/// What a device saw.
#[derive(Debug)]
struct DeviceResult {
    /// Its masked input was accepted.
    uploaded: bool,
    /// The round's end as GetStage reported it (for devices that stayed to the end).
    ended: Option<pb::SecAggStage>,
    /// The unmasking plan it received, with its own index.
    plan: Option<(u32, UnmaskingPlan)>,
    /// The round it took part in.
    round: u64,
    /// The round's Shamir threshold.
    threshold: u32,
}

fn task_ref(task: &pb::Task) -> Option<pb::TaskRef> {
    Some(pb::TaskRef {
        run_id: task.run_id.clone(),
        round_id: task.round_id,
        task_token: task.task_token.clone(),
    })
}

async fn check_in_task(device: &mut DeviceServiceClient<Channel>, token: &str) -> pb::Task {
    let request = pb::CheckInRequest {
        sdk_version: "0.1.0".into(),
        held_model: None,
        eligibility: Some(pb::Eligibility {
            device_conditions_met: true,
            privacy_budget_available: true,
        }),
    };
    match device
        .check_in(authed(request, token))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
    {
        Outcome::Task(t) => t,
        Outcome::ComeBackLater(c) => panic!("no task: {}", c.detail),
        other => panic!("no task: {other:?}"),
    }
}

/// Polls GetStage (no faster than it asks) until the round leaves `stage`.
async fn wait_past(
    client: &mut SecureAggregationServiceClient<Channel>,
    token: &str,
    task: &pb::Task,
    stage: pb::SecAggStage,
) -> pb::StageUpdate {
    loop {
        let update = client
            .get_stage(authed(
                pb::GetStageRequest {
                    task: task_ref(task),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        if update.stage != stage as i32 {
            return update;
        }
        let wait = update.poll_after.unwrap();
        tokio::time::sleep(Duration::from_millis(
            wait.seconds as u64 * 1000 + wait.nanos as u64 / 1_000_000,
        ))
        .await;
    }
}

fn directory_from(d: pb::KeyDirectory) -> KeyDirectory {
    KeyDirectory {
        own_index: d.own_index,
        threshold: d.threshold,
        neighbours: d
            .neighbours
            .into_iter()
            .map(|k| ParticipantKeys {
                participant_index: k.participant_index,
                encryption_public_key: k.encryption_public_key.as_slice().try_into().unwrap(),
                masking_public_key: k.masking_public_key.as_slice().try_into().unwrap(),
            })
            .collect(),
    }
}

fn inbox_from(i: pb::ShareInbox) -> ShareInbox {
    ShareInbox {
        shares: i
            .shares
            .into_iter()
            .map(|s| fedpref_secagg::EncryptedShare {
                sender_index: s.sender_index,
                recipient_index: s.recipient_index,
                ciphertext: s.ciphertext,
            })
            .collect(),
    }
}

fn shares_to_proto(shares: &fedpref_secagg::ShareKeys) -> Vec<pb::EncryptedShare> {
    shares
        .shares
        .iter()
        .map(|s| pb::EncryptedShare {
            sender_index: s.sender_index,
            recipient_index: s.recipient_index,
            ciphertext: s.ciphertext.clone(),
        })
        .collect()
}

fn unmask_to_proto(u: &fedpref_secagg::Unmask) -> Vec<pb::RevealedShare> {
    u.shares
        .iter()
        .map(|s| pb::RevealedShare {
            owner_index: s.owner_index,
            kind: match s.kind {
                fedpref_secagg::ShareKind::SelfMaskSeed => pb::ShareKind::SelfMaskSeed,
                fedpref_secagg::ShareKind::MaskingKey => pb::ShareKind::MaskingKey,
            } as i32,
            share: s.share.clone(),
        })
        .collect()
}

/// The upload stream of a masked input.
fn masked_upload(
    task: &pb::Task,
    values: &[u32],
    chunk_bytes: usize,
) -> Vec<pb::UploadUpdateRequest> {
    let header = pb::UpdateHeader {
        task: task_ref(task),
        base_model_version: task.model.as_ref().unwrap().model_version,
        tensors: task.update_tensors.clone(),
        privacy_mode: task.privacy_mode,
        clip_norm: task.clip_norm,
        noise_multiplier: task.noise_multiplier,
        ..Default::default()
    };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::iter::once(pb::UploadUpdateRequest {
        part: Some(Part::Header(header)),
    })
    .chain(
        bytes
            .chunks(chunk_bytes)
            .enumerate()
            .map(|(n, piece)| pb::UploadUpdateRequest {
                part: Some(Part::Chunk(pb::TensorChunk {
                    tensor_index: 0,
                    offset: (n * chunk_bytes) as u64,
                    content: piece.to_vec().into(),
                })),
            }),
    )
    .collect()
}

/// One honest device through a whole round, stopping before `drop`. `input` gives its
/// encoded update once it knows the round's encoding.
async fn run_device(
    server: Arc<TestServer>,
    token: String,
    drop: Drop,
    input: Vec<i64>,
) -> DeviceResult {
    let mut device = server.device();
    let mut secagg = server.secagg();
    let task = check_in_task(&mut device, &token).await;
    let config = round_config(&task);
    assert_eq!(task.update_tensors.len(), 1);
    assert_eq!(task.update_tensors[0].dtype, pb::Dtype::U32 as i32);
    let mut result = DeviceResult {
        uploaded: false,
        ended: None,
        plan: None,
        round: task.round_id,
        threshold: config.threshold,
    };
    let mut rng = fedpref_secagg::rng::os_rng().unwrap();
    let (state, keys): (AwaitingKeyDirectory, _) =
        Client::advertise(config.clone(), &mut rng).unwrap();
    if drop == Drop::BeforeKeys {
        return result;
    }
    secagg
        .advertise_keys(authed(
            pb::AdvertiseKeysRequest {
                task: task_ref(&task),
                encryption_public_key: keys.encryption_public_key.to_vec(),
                masking_public_key: keys.masking_public_key.to_vec(),
            },
            &token,
        ))
        .await
        .unwrap();
    let update = wait_past(&mut secagg, &token, &task, pb::SecAggStage::AdvertiseKeys).await;
    let Some(pb::stage_update::Input::KeyDirectory(directory)) = update.input else {
        panic!("no key directory: {update:?}");
    };
    let (state, shares) = state
        .share_keys(&directory_from(directory), &mut rng)
        .unwrap();
    if drop == Drop::BeforeShares {
        return result;
    }
    secagg
        .share_keys(authed(
            pb::ShareKeysRequest {
                task: task_ref(&task),
                shares: shares_to_proto(&shares),
            },
            &token,
        ))
        .await
        .unwrap();
    let update = wait_past(&mut secagg, &token, &task, pb::SecAggStage::ShareKeys).await;
    let Some(pb::stage_update::Input::ShareInbox(inbox)) = update.input else {
        panic!("no share inbox: {update:?}");
    };
    let x: EncodedInput = config.encoding.encode_integers(&input).unwrap();
    let (state, masked) = state.masked_input(&inbox_from(inbox), &x).unwrap();
    if drop == Drop::BeforeInput {
        return result;
    }
    device
        .upload_update(authed(
            tokio_stream::iter(masked_upload(&task, &masked.values, 40)),
            &token,
        ))
        .await
        .unwrap();
    result.uploaded = true;
    let update = wait_past(&mut secagg, &token, &task, pb::SecAggStage::MaskedInput).await;
    let Some(pb::stage_update::Input::UnmaskingPlan(plan)) = update.input else {
        panic!("no unmasking plan: {update:?}");
    };
    let plan = UnmaskingPlan {
        survivor_indices: plan.survivor_indices,
        dropped_indices: plan.dropped_indices,
    };
    result.plan = Some((state.own_index(), plan.clone()));
    let reply = state.unmask(&plan).unwrap();
    if drop == Drop::BeforeUnmask {
        return result;
    }
    secagg
        .unmask(authed(
            pb::UnmaskRequest {
                task: task_ref(&task),
                shares: unmask_to_proto(&reply),
            },
            &token,
        ))
        .await
        .unwrap();
    let update = wait_past(&mut secagg, &token, &task, pb::SecAggStage::Unmasking).await;
    result.ended = pb::SecAggStage::try_from(update.stage).ok();
    result
}

/// Random inputs within the round's per-device bound (≤ C·scale per coordinate).
fn random_inputs(n: usize, dimension: usize, bound: i64) -> Vec<Vec<i64>> {
    let mut rng = fedpref_secagg::rng::os_rng().unwrap();
    (0..n)
        .map(|_| {
            (0..dimension)
                .map(|_| (rng.next_u64() % (2 * bound as u64 + 1)) as i64 - bound)
                .collect()
        })
        .collect()
}

/// Runs one round with `drops[i]` for device i, all devices concurrently; returns what each
/// saw.
async fn round(
    server: &Arc<TestServer>,
    tokens: &[String],
    drops: &[Drop],
    inputs: &[Vec<i64>],
) -> Vec<DeviceResult> {
    let handles: Vec<_> = tokens
        .iter()
        .zip(drops)
        .zip(inputs)
        .map(|((token, &drop), input)| {
            tokio::spawn(run_device(
                Arc::clone(server),
                token.clone(),
                drop,
                input.clone(),
            ))
        })
        .collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// `count` devices dropping before `stage`, the others staying (a different choice per
/// `salt`).
fn drops_at(stage: Drop, count: usize, salt: usize) -> Vec<Drop> {
    let n = COHORT as usize;
    let mut drops = vec![Drop::Never; n];
    for k in 0..count {
        drops[(salt * 7 + k * 3) % n] = stage;
    }
    if stage != Drop::Never {
        assert_eq!(drops.iter().filter(|d| **d == stage).count(), count);
    }
    drops
}

/// Σ of the inputs of the devices that uploaded.
fn plain_sum(results: &[DeviceResult], inputs: &[Vec<i64>]) -> Vec<i64> {
    let mut sum = vec![0i64; inputs[0].len()];
    for (r, x) in results.iter().zip(inputs) {
        if r.uploaded {
            for (s, v) in sum.iter_mut().zip(x) {
                *s += v;
            }
        }
    }
    sum
}

fn committed_rounds(events: &[LedgerEvent]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            LedgerEvent::RoundCommitted {
                round, cohort_size, ..
            } => Some((*round, *cohort_size)),
            _ => None,
        })
        .collect()
}

fn spent(events: &[LedgerEvent]) -> Option<f64> {
    events.iter().rev().find_map(|e| match e {
        LedgerEvent::RoundCommitted {
            cumulative_epsilon, ..
        } => Some(cumulative_epsilon[0].epsilon),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cohort_of_50_unmasks_the_exact_sum_with_0_10_and_30_percent_dropout_at_each_stage() {
    // Two coordinators side by side (a round with drop-outs mostly waits for a deadline):
    // 0 % and 10 % on one, 30 % on the other.
    let stages = [
        Drop::BeforeKeys,
        Drop::BeforeShares,
        Drop::BeforeInput,
        Drop::BeforeUnmask,
    ];
    let mut low = vec![(0.0, Drop::Never)];
    low.extend(stages.iter().map(|&s| (0.1, s)));
    let high: Vec<(f64, Drop)> = stages.iter().map(|&s| (0.3, s)).collect();
    tokio::join!(dropout_rounds(low), dropout_rounds(high));
}

/// One run on its own coordinator, a round per (drop-out rate, stage).
async fn dropout_rounds(scenarios: Vec<(f64, Drop)>) {
    let server = Arc::new(TestServer::start().await);
    let run_id = server.create_run(manifest(COHORT, 20, 5, 100)).await;
    let tokens = server.enroll(COHORT as usize).await;
    let ids = server.device_ids(&tokens);
    let mut epsilons = vec![];
    for (salt, (rate, stage)) in scenarios.into_iter().enumerate() {
        let count = (rate * f64::from(COHORT)).round() as usize;
        let drops = drops_at(stage, count, salt);
        // 31 coordinates, each well inside ⌈C·scale⌉ (the encoding refuses anything else).
        let bound = 1 << 10;
        let inputs = random_inputs(COHORT as usize, 31, bound);
        let results = round(&server, &tokens, &drops, &inputs).await;
        let what = format!("{}% drop-out {stage:?}", rate * 100.0);
        // Everyone who stayed saw the round complete.
        for (r, d) in results.iter().zip(&drops) {
            if *d == Drop::Never {
                assert_eq!(r.ended, Some(pb::SecAggStage::Completed), "{what}");
            }
        }
        let (sum_round, sum, contributors) = server.last_sum(&run_id).expect("a sum");
        assert_eq!(sum_round, results[0].round, "{what}");
        // The unmasked sum is exactly the plain sum of the uploaded inputs.
        assert_eq!(sum, plain_sum(&results, &inputs), "{what}");
        let uploaded: BTreeSet<String> = results
            .iter()
            .zip(&ids)
            .filter(|(r, _)| r.uploaded)
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(contributors, uploaded, "{what}");
        let expected = if stage == Drop::BeforeUnmask {
            COHORT as usize
        } else {
            COHORT as usize - count
        };
        assert_eq!(uploaded.len(), expected, "{what}");
        let events = server.ledger(&run_id);
        let last = *committed_rounds(&events).last().unwrap();
        assert_eq!(last, (sum_round, expected as u64), "{what}");
        epsilons.push(spent(&events).unwrap());
    }
    // ε grows by the same mechanism's increment every round.
    assert!(epsilons.windows(2).all(|w| w[1] > w[0]), "{epsilons:?}");
    let events = server.ledger(&run_id);
    let Some(LedgerEvent::RoundCommitted {
        distributed: Some(record),
        epsilon_assumption: Some(assumption),
        mode,
        ..
    }) = events
        .iter()
        .rev()
        .find(|e| matches!(e, LedgerEvent::RoundCommitted { .. }))
    else {
        panic!("no distributed record");
    };
    assert_eq!(mode, "distributed");
    assert_eq!(record.mechanism_name, "distributed_discrete_gaussian");
    assert_eq!(record.neighbouring, "zero-out");
    assert!(assumption.contains("honest devices"), "{assumption}");
    // The chain verifies, distributed rounds included.
    let entries = {
        let c = server.running.coordinator();
        let c = c.lock().unwrap();
        c.store().ledger(&run_id).unwrap()
    };
    fedpref_coordinator::ledger::verify(&run_id, &entries).unwrap();
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, words: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(words),
        "message {:?} should contain {words:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fewer_than_t_survivors_abandon_the_round_and_nothing_is_spent() {
    let server = Arc::new(TestServer::start().await);
    let run_id = server.create_run(manifest(COHORT, 20, 5, 100)).await;
    let tokens = server.enroll(COHORT as usize).await;
    let inputs = random_inputs(COHORT as usize, 31, 1000);
    // One committed round, so that there is a spend to compare with.
    let results = round(
        &server,
        &tokens,
        &vec![Drop::Never; COHORT as usize],
        &inputs,
    )
    .await;
    let t = results[0].threshold as usize;
    let events = server.ledger(&run_id);
    let before = spent(&events).expect("round 1 committed");
    // Every device uploads, but only t − 1 answer the unmasking request.
    let mut drops = vec![Drop::BeforeUnmask; COHORT as usize];
    for d in drops.iter_mut().take(t - 1) {
        *d = Drop::Never;
    }
    let results = round(&server, &tokens, &drops, &inputs).await;
    for (r, d) in results.iter().zip(&drops) {
        assert!(r.uploaded);
        if *d == Drop::Never {
            assert_eq!(r.ended, Some(pb::SecAggStage::Aborted));
        }
    }
    let events = server.ledger(&run_id);
    let abandoned = events.last().unwrap();
    let LedgerEvent::RoundAbandoned {
        round,
        contributions,
        reason,
    } = abandoned
    else {
        panic!("round 2 was not abandoned: {abandoned:?}");
    };
    assert_eq!(*round, 2);
    assert_eq!(*contributions, u64::from(COHORT));
    assert!(reason.contains("fewer than the threshold"), "{reason}");
    assert_eq!(committed_rounds(&events).len(), 1, "nothing committed");
    assert_eq!(spent(&events), Some(before), "nothing spent");
    let (sum_round, ..) = server.last_sum(&run_id).unwrap();
    assert_eq!(sum_round, 1, "nothing unmasked in round 2");
    {
        let c = server.running.coordinator();
        let c = c.lock().unwrap();
        let engine = c.engine(&run_id).unwrap();
        assert_eq!(engine.spent()[0].epsilon, before);
        assert_eq!(engine.rounds_committed(), 1);
    }
    // Too few devices to even share keys: abandoned at the first stage, nothing spent.
    let few = (results[0].threshold as usize).min(19) - 1;
    let mut drops = vec![Drop::BeforeKeys; COHORT as usize];
    for d in drops.iter_mut().take(few) {
        *d = Drop::Never;
    }
    let handles: Vec<_> = tokens
        .iter()
        .zip(&drops)
        .filter(|(_, d)| **d == Drop::Never)
        .map(|(token, _)| {
            let server = Arc::clone(&server);
            let token = token.clone();
            tokio::spawn(async move {
                let mut device = server.device();
                let mut secagg = server.secagg();
                let task = check_in_task(&mut device, &token).await;
                let config = round_config(&task);
                let mut rng = fedpref_secagg::rng::os_rng().unwrap();
                let (_, keys) = Client::advertise(config, &mut rng).unwrap();
                secagg
                    .advertise_keys(authed(
                        pb::AdvertiseKeysRequest {
                            task: task_ref(&task),
                            encryption_public_key: keys.encryption_public_key.to_vec(),
                            masking_public_key: keys.masking_public_key.to_vec(),
                        },
                        &token,
                    ))
                    .await
                    .unwrap();
                wait_past(&mut secagg, &token, &task, pb::SecAggStage::AdvertiseKeys).await
            })
        })
        .collect();
    for h in handles {
        let update = h.await.unwrap();
        assert_eq!(update.stage, pb::SecAggStage::Aborted as i32);
        // Devices get a generic reason; the coordinator's own (with counts, and in other
        // cases participants) stays in its log and ledger.
        assert_eq!(
            update.abort_reason,
            fedpref_coordinator::service::secagg::ABORT_REASON_FOR_DEVICES
        );
    }
    let events = server.ledger(&run_id);
    assert!(matches!(
        events.last(),
        Some(LedgerEvent::RoundAbandoned {
            round: 3,
            contributions: 0,
            reason,
            ..
        }) if reason.contains("fewer than")
    ));
    assert_eq!(spent(&events), Some(before), "nothing spent");
}

/// One device of a small cohort, driven stage by stage.
struct Participant {
    token: String,
    task: pb::Task,
    config: RoundConfig,
    rng: rand::rngs::ChaCha20Rng,
    keys: Option<fedpref_secagg::AdvertiseKeys>,
    advertised: Option<AwaitingKeyDirectory>,
    sharing: Option<fedpref_secagg::AwaitingShareInbox>,
    shares: Option<fedpref_secagg::ShareKeys>,
    masked: Option<fedpref_secagg::AwaitingUnmaskingPlan>,
    values: Vec<u32>,
    input: Vec<i64>,
}

impl Participant {
    async fn join(server: &TestServer, token: &str) -> Self {
        let task = check_in_task(&mut server.device(), token).await;
        let config = round_config(&task);
        let mut rng = fedpref_secagg::rng::os_rng().unwrap();
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        Self {
            token: token.to_string(),
            input: random_inputs(1, config.dimension(), 1000).remove(0),
            task,
            config,
            rng,
            keys: Some(keys),
            advertised: Some(state),
            sharing: None,
            shares: None,
            masked: None,
            values: vec![],
        }
    }

    fn keys_request(&self) -> Request<pb::AdvertiseKeysRequest> {
        let keys = self.keys.as_ref().unwrap();
        authed(
            pb::AdvertiseKeysRequest {
                task: task_ref(&self.task),
                encryption_public_key: keys.encryption_public_key.to_vec(),
                masking_public_key: keys.masking_public_key.to_vec(),
            },
            &self.token,
        )
    }

    async fn stage(&self, server: &TestServer, past: pb::SecAggStage) -> pb::StageUpdate {
        wait_past(&mut server.secagg(), &self.token, &self.task, past).await
    }

    async fn share(&mut self, server: &TestServer) {
        let update = self.stage(server, pb::SecAggStage::AdvertiseKeys).await;
        let Some(pb::stage_update::Input::KeyDirectory(d)) = update.input else {
            panic!("no directory: {update:?}");
        };
        let (state, shares) = self
            .advertised
            .take()
            .unwrap()
            .share_keys(&directory_from(d), &mut self.rng)
            .unwrap();
        self.sharing = Some(state);
        self.shares = Some(shares);
    }

    fn shares_request(&self, shares: Vec<pb::EncryptedShare>) -> Request<pb::ShareKeysRequest> {
        authed(
            pb::ShareKeysRequest {
                task: task_ref(&self.task),
                shares,
            },
            &self.token,
        )
    }

    async fn mask(&mut self, server: &TestServer) {
        let update = self.stage(server, pb::SecAggStage::ShareKeys).await;
        let Some(pb::stage_update::Input::ShareInbox(inbox)) = update.input else {
            panic!("no inbox: {update:?}");
        };
        let x = self.config.encoding.encode_integers(&self.input).unwrap();
        let (state, masked) = self
            .sharing
            .take()
            .unwrap()
            .masked_input(&inbox_from(inbox), &x)
            .unwrap();
        self.masked = Some(state);
        self.values = masked.values;
    }

    async fn upload(
        &self,
        server: &TestServer,
        messages: Vec<pb::UploadUpdateRequest>,
    ) -> Result<pb::UploadReceipt, tonic::Status> {
        server
            .device()
            .upload_update(authed(tokio_stream::iter(messages), &self.token))
            .await
            .map(|r| r.into_inner())
    }

    async fn plan(&mut self, server: &TestServer) -> (fedpref_secagg::Unmask, UnmaskingPlan) {
        let update = self.stage(server, pb::SecAggStage::MaskedInput).await;
        let Some(pb::stage_update::Input::UnmaskingPlan(p)) = update.input else {
            panic!("no plan: {update:?}");
        };
        let plan = UnmaskingPlan {
            survivor_indices: p.survivor_indices,
            dropped_indices: p.dropped_indices,
        };
        (self.masked.take().unwrap().unmask(&plan).unwrap(), plan)
    }

    fn unmask_request(&self, shares: Vec<pb::RevealedShare>) -> Request<pb::UnmaskRequest> {
        authed(
            pb::UnmaskRequest {
                task: task_ref(&self.task),
                shares,
            },
            &self.token,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_never_takes_both_shares_of_a_device_and_bad_inputs_name_the_field() {
    let server = Arc::new(TestServer::start().await);
    // Five devices; long stages, so every stage closes only when everyone has answered.
    let run_id = server.create_run(manifest(5, 3, 600, 10)).await;
    let tokens = server.enroll(6).await;
    let mut p = vec![];
    for token in &tokens[..5] {
        p.push(Participant::join(&server, token).await);
    }
    let mut secagg = server.secagg();

    // ADVERTISE_KEYS: malformed and misplaced messages first.
    let mut short = p[0].keys_request();
    short.get_mut().encryption_public_key.pop();
    assert_status(
        secagg.advertise_keys(short).await,
        Code::InvalidArgument,
        "encryption_public_key is 31 bytes",
    );
    let mut unauthenticated = p[0].keys_request();
    unauthenticated.metadata_mut().remove("authorization");
    assert_status(
        secagg.advertise_keys(unauthenticated).await,
        Code::Unauthenticated,
        "authorization",
    );
    let mut wrong_token = p[0].keys_request();
    wrong_token.get_mut().task.as_mut().unwrap().task_token = "0".repeat(32);
    assert_status(
        secagg.advertise_keys(wrong_token).await,
        Code::InvalidArgument,
        "unknown task token",
    );
    let stranger = &tokens[5];
    let mut not_selected = p[0].keys_request();
    not_selected
        .metadata_mut()
        .insert("authorization", bearer(stranger).parse().unwrap());
    // A device with no task in the run is refused before anything about the run is told.
    assert_status(
        secagg.advertise_keys(not_selected).await,
        Code::PermissionDenied,
        "no task in run",
    );
    assert_status(
        secagg.share_keys(p[0].shares_request(vec![])).await,
        Code::InvalidArgument,
        "shares",
    );
    assert_status(
        secagg
            .unmask(p[0].unmask_request(vec![pb::RevealedShare {
                owner_index: 2,
                kind: pb::ShareKind::SelfMaskSeed as i32,
                share: vec![1; 8],
            }]))
            .await,
        Code::FailedPrecondition,
        "stage",
    );
    assert_status(
        secagg
            .get_stage(authed(pb::GetStageRequest { task: None }, &p[0].token))
            .await,
        Code::InvalidArgument,
        "task",
    );
    secagg.advertise_keys(p[0].keys_request()).await.unwrap();
    assert_status(
        secagg.advertise_keys(p[0].keys_request()).await,
        Code::FailedPrecondition,
        "already advertised",
    );
    // Another device replaying device 0's keys: refused, naming the field and not the
    // device whose keys they are.
    let mut replay = p[0].keys_request();
    replay
        .metadata_mut()
        .insert("authorization", bearer(&p[1].token).parse().unwrap());
    replay.get_mut().task = task_ref(&p[1].task);
    let refused = secagg.advertise_keys(replay).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("encryption_public_key: this key was already advertised in this run"),
        "{refused:?}"
    );
    assert!(!refused.message().contains("participant"), "{refused:?}");
    for d in &p[1..] {
        secagg.advertise_keys(d.keys_request()).await.unwrap();
    }

    // SHARE_KEYS.
    for d in p.iter_mut() {
        d.share(&server).await;
    }
    let honest = shares_to_proto(p[0].shares.as_ref().unwrap());
    let mut to_self = honest.clone();
    let own = to_self[0].sender_index;
    to_self[0].recipient_index = own;
    assert_status(
        secagg.share_keys(p[0].shares_request(to_self)).await,
        Code::InvalidArgument,
        "not one of its neighbours",
    );
    let mut unnumbered = honest.clone();
    unnumbered[1].recipient_index = 0;
    assert_status(
        secagg.share_keys(p[0].shares_request(unnumbered)).await,
        Code::InvalidArgument,
        "shares[1].recipient_index",
    );
    secagg
        .share_keys(p[0].shares_request(honest.clone()))
        .await
        .unwrap();
    assert_status(
        secagg.share_keys(p[0].shares_request(honest)).await,
        Code::FailedPrecondition,
        "already sent",
    );
    for d in &p[1..] {
        let shares = shares_to_proto(d.shares.as_ref().unwrap());
        secagg.share_keys(d.shares_request(shares)).await.unwrap();
    }

    // MASKED_INPUT: device 4 (participant 5) drops before uploading.
    for d in p.iter_mut() {
        d.mask(&server).await;
    }
    let d = p[0].config.dimension();
    let mut f64_upload = masked_upload(&p[0].task, &p[0].values, 64);
    if let Some(Part::Header(h)) = f64_upload[0].part.as_mut() {
        h.tensors[0].dtype = pb::Dtype::F64 as i32;
    }
    assert_status(
        p[0].upload(&server, f64_upload).await,
        Code::InvalidArgument,
        "header.tensors[0].dtype",
    );
    let mut short_upload = masked_upload(&p[0].task, &p[0].values[..d - 1], 64);
    if let Some(Part::Header(h)) = short_upload[0].part.as_mut() {
        h.tensors[0].shape = vec![d as u64 - 1];
    }
    assert_status(
        p[0].upload(&server, short_upload).await,
        Code::InvalidArgument,
        "header.tensors[0].shape",
    );
    let mut truncated = masked_upload(&p[0].task, &p[0].values, 64);
    truncated.pop();
    assert_status(
        p[0].upload(&server, truncated).await,
        Code::InvalidArgument,
        "chunk",
    );
    for d in &p[..4] {
        d.upload(&server, masked_upload(&d.task, &d.values, 64))
            .await
            .unwrap();
    }
    assert_status(
        p[0].upload(&server, masked_upload(&p[0].task, &p[0].values, 64))
            .await,
        Code::FailedPrecondition,
        "already uploaded",
    );
    // Participant 5 never uploads; the stage closes at its deadline. Move it along by having
    // the coordinator tick past it: the stage is long, so wait for the plan via a late
    // upload attempt after the stage closed instead.
    let late = p.pop().unwrap();
    {
        // Close the masked-input stage now, as its deadline would.
        let c = server.running.coordinator();
        let mut c = c.lock().unwrap();
        let deadline = c.engine(&run_id).unwrap().next_wakeup().unwrap();
        c.handle(&run_id, fedpref_coordinator::engine::Event::Tick, deadline)
            .unwrap();
    }
    assert_status(
        late.upload(&server, masked_upload(&late.task, &late.values, 64))
            .await,
        Code::FailedPrecondition,
        "stage",
    );
    // The dropped device is out of the round: no plan for it, and nothing it reveals is taken.
    let update = late.stage(&server, pb::SecAggStage::MaskedInput).await;
    assert_eq!(update.stage, pb::SecAggStage::Unmasking as i32);
    assert!(update.input.is_none(), "{update:?}");
    assert_status(
        secagg
            .unmask(late.unmask_request(vec![pb::RevealedShare {
                owner_index: 1,
                kind: pb::ShareKind::SelfMaskSeed as i32,
                share: vec![1; 40],
            }]))
            .await,
        Code::FailedPrecondition,
        "not asked to reveal shares",
    );

    // UNMASKING: every plan treats participant 5 as dropped and the others as survivors;
    // no device is ever asked for both kinds of share.
    let mut replies = vec![];
    let (mut survivors, mut dropped) = (BTreeSet::new(), BTreeSet::new());
    for d in p.iter_mut() {
        let (reply, plan) = d.plan(&server).await;
        survivors.extend(plan.survivor_indices.iter().copied());
        dropped.extend(plan.dropped_indices.iter().copied());
        replies.push(reply);
    }
    assert!(survivors.is_disjoint(&dropped), "{survivors:?} {dropped:?}");
    assert_eq!(dropped.len(), 1);
    let gone = *dropped.first().unwrap();
    // Device 0 tries to get the dropped device's self-mask seed share accepted (with it and
    // the masking-key shares the coordinator could unmask that device's input alone).
    let honest = unmask_to_proto(&replies[0]);
    let mut attack = honest.clone();
    let about_gone = attack.iter().position(|s| s.owner_index == gone).unwrap();
    attack[about_gone].kind = pb::ShareKind::SelfMaskSeed as i32;
    assert_status(
        secagg.unmask(p[0].unmask_request(attack)).await,
        Code::InvalidArgument,
        "safety rule",
    );
    // And the masking-key share of a survivor.
    let mut attack = honest.clone();
    let about_survivor = attack.iter().position(|s| s.owner_index != gone).unwrap();
    attack[about_survivor].kind = pb::ShareKind::MaskingKey as i32;
    assert_status(
        secagg.unmask(p[0].unmask_request(attack)).await,
        Code::InvalidArgument,
        "safety rule",
    );
    let mut unspecified = honest.clone();
    unspecified[0].kind = pb::ShareKind::Unspecified as i32;
    assert_status(
        secagg.unmask(p[0].unmask_request(unspecified)).await,
        Code::InvalidArgument,
        "shares[0].kind",
    );
    // The refused messages left nothing behind: the honest one is accepted, once.
    secagg
        .unmask(p[0].unmask_request(honest.clone()))
        .await
        .unwrap();
    assert_status(
        secagg.unmask(p[0].unmask_request(honest)).await,
        Code::FailedPrecondition,
        "already revealed",
    );
    for (d, reply) in p.iter().zip(&replies).skip(1) {
        secagg
            .unmask(d.unmask_request(unmask_to_proto(reply)))
            .await
            .unwrap();
    }
    let update = p[0].stage(&server, pb::SecAggStage::Unmasking).await;
    assert_eq!(update.stage, pb::SecAggStage::Completed as i32);
    let (_, sum, contributors) = server.last_sum(&run_id).unwrap();
    assert_eq!(contributors.len(), 4);
    let mut expected = vec![0i64; d];
    for part in &p {
        for (e, v) in expected.iter_mut().zip(&part.input) {
            *e += v;
        }
    }
    assert_eq!(sum, expected, "the exact sum of the four uploaded inputs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_calls_for_a_central_run_are_refused() {
    let server = TestServer::start().await;
    let mut m = manifest(5, 3, 60, 10);
    m.privacy_mode = pb::PrivacyMode::Central as i32;
    m.secure_aggregation = None;
    server.create_run(m).await;
    let token = server.enroll(1).await.remove(0);
    let task = check_in_task(&mut server.device(), &token).await;
    assert!(task.secure_aggregation.is_none() && task.secure_aggregation_round.is_none());
    assert_status(
        server
            .secagg()
            .get_stage(authed(
                pb::GetStageRequest {
                    task: task_ref(&task),
                },
                &token,
            ))
            .await,
        Code::FailedPrecondition,
        "no secure-aggregation stages",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_manifest_round_trips_through_the_admin_api() {
    let server = TestServer::start().await;
    let run_id = server.create_run(manifest(COHORT, 20, 60, 10)).await;
    let mut admin = AdminServiceClient::new(server.admin.clone());
    let run = admin
        .get_run(authed(pb::GetRunRequest { run_id }, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let stored = run.manifest.unwrap();
    let c = stored.secure_aggregation.unwrap();
    assert_ne!(run.manifest_sha256, Vec::<u8>::new());
    assert!(c.threshold > 0 && c.fixed_point_scale > 0.0 && c.assumed_honest_devices > 0);
    assert_eq!(c.modulus_bits, 32);
    // The stored manifest, derived values and all, creates the same run again.
    let again = admin
        .create_run(authed(
            pb::CreateRunRequest {
                manifest: Some(stored.clone()),
                request_id: "create-2".into(),
                simulation_seed: None,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    // Same parameters (the derived values are now explicit, so the TOML and its hash differ).
    assert_eq!(again.manifest.unwrap().secure_aggregation, Some(c));
    // Values that cannot be honoured are refused, naming the field.
    for (change, field) in [
        (
            (|c: &mut pb::SecureAggregationConfig| c.neighbour_count += 2)
                as fn(&mut pb::SecureAggregationConfig),
            "manifest.secure_aggregation.neighbour_count",
        ),
        (
            |c| c.modulus_bits = 64,
            "manifest.secure_aggregation.modulus_bits",
        ),
        (
            |c| c.noise = pb::DistributedNoise::Unspecified as i32,
            "manifest.secure_aggregation.noise",
        ),
        (|c| c.threshold = 2, "secure_aggregation.threshold"),
        (|c| c.dropout_rate = 0.7, "secure_aggregation.dropout_rate"),
    ] {
        let mut m = stored.clone();
        change(m.secure_aggregation.as_mut().unwrap());
        assert_status(
            admin
                .create_run(authed(
                    pb::CreateRunRequest {
                        manifest: Some(m),
                        request_id: format!("bad-{field}"),
                        simulation_seed: None,
                    },
                    ADMIN_TOKEN,
                ))
                .await,
            Code::InvalidArgument,
            field,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_following_the_poll_hints_stays_within_the_default_request_rate() {
    let limits = Limits::default();
    let server = TestServer::start_with(limits.clone()).await;
    // Stages long enough that the key stage stays open while the device polls.
    server.create_run(manifest(5, 3, 600, 10)).await;
    let tokens = server.enroll(5).await;
    let mut tasks = vec![];
    for token in &tokens {
        tasks.push(check_in_task(&mut server.device(), token).await);
    }
    let (token, task) = (&tokens[0], &tasks[0]);
    let config = round_config(task);
    let mut rng = fedpref_secagg::rng::os_rng().unwrap();
    let (_, keys) = Client::advertise(config, &mut rng).unwrap();
    let mut secagg = server.secagg();
    let millis = |d: prost_types::Duration| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000;
    let response = secagg
        .advertise_keys(authed(
            pb::AdvertiseKeysRequest {
                task: task_ref(task),
                encryption_public_key: keys.encryption_public_key.to_vec(),
                masking_public_key: keys.masking_public_key.to_vec(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut wait = millis(response.poll_after.unwrap());
    // The device's bucket holds `device_burst` requests and refills at the sustained rate;
    // polling at the hint must leave at least half of that rate unused, so more polls than
    // the burst go through without RESOURCE_EXHAUSTED.
    let polls = limits.device_burst as usize + 5;
    for _ in 0..polls {
        assert!(
            wait as f64 * limits.device_requests_per_second >= 2_000.0,
            "a poll every {wait} ms takes more than half of {} requests/s",
            limits.device_requests_per_second
        );
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        let update = secagg
            .get_stage(authed(
                pb::GetStageRequest {
                    task: task_ref(task),
                },
                token,
            ))
            .await
            .expect("a device following the hints is not refused")
            .into_inner();
        assert_eq!(update.stage, pb::SecAggStage::AdvertiseKeys as i32);
        wait = millis(update.poll_after.unwrap());
    }
}

#[test]
fn a_rounding_beta_of_zero_survives_the_admin_api_conversion() {
    use fedpref_coordinator::service::convert::{manifest_from_proto, manifest_to_proto};

    let text = |beta: &str| {
        let m = manifest_to_proto_base();
        format!("{m}\nrounding_beta = {beta}\n")
    };
    for (toml, expected) in [(text("0.0"), 0.0), (text("0.3"), 0.3)] {
        let m = fedpref_coordinator::manifest::RunManifest::from_toml(&toml, "test").unwrap();
        assert_eq!(m.distributed_plan().unwrap().rounding_beta, expected);
        let back = manifest_from_proto(&manifest_to_proto(&m)).unwrap();
        assert_eq!(
            back.distributed_plan().unwrap().rounding_beta,
            expected,
            "β = {expected} must not become the default"
        );
    }
    // Unset over the API is the default e^(−1/2).
    let m = fedpref_coordinator::manifest::RunManifest::from_toml(&manifest_to_proto_base(), "t")
        .unwrap();
    let mut p = manifest_to_proto(&m);
    p.secure_aggregation.as_mut().unwrap().rounding_beta = None;
    let back = manifest_from_proto(&p).unwrap();
    assert_eq!(
        back.distributed_plan().unwrap().rounding_beta,
        (-0.5f64).exp()
    );
}

/// A distributed manifest in TOML ending inside its `[secure_aggregation]` section.
fn manifest_to_proto_base() -> String {
    r#"
title = "Distributed test"
purpose = "Exercise the manifest conversion"
owner = "tests@example.com"
data_elements_used = ["ratings"]
privacy_mode = "distributed"
rounds = 5
clip_norm = 1.0
noise_multiplier = 1.0
seed = 7

[budget]
epsilon = 20.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 5
minimum_size = 3
round_seconds = 60

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 10
factors = 2

[opt_out_policy]
consent_model = "opt-in"

[secure_aggregation]
noise = "discrete_gaussian"
dropout_rate = 0.3
corruption_rate = 0.0"#
        .to_string()
}
