//! The bodies of fedpref's fuzz targets: every decoder a remote party reaches, fed arbitrary
//! bytes. Each function must return normally for every input — a panic, an abort or an
//! allocation beyond the configured limits is a finding. Where a decoder accepts its input,
//! the body also checks what the acceptance promises (an accepted upload has the layout's
//! length and only finite values; an accepted manifest survives the admin API's round trip).
//!
//! `fuzz_targets/*.rs` hand these to libFuzzer (`cargo fuzz run <name>`); the workspace test
//! `simulations/tests/fuzz_corpus.rs` replays the committed corpora through the same bodies.
//!
//! Several targets read a sequence of protobuf messages from one input: each message is
//! length-delimited (a varint length, then the message), as `prost`'s
//! `decode_length_delimited` reads it; decoding stops at the first that does not decode.

use std::path::Path;
use std::sync::OnceLock;

use fedpref_client_sdk::fedpref_proto::prost::Message;
use fedpref_client_sdk::fedpref_proto::v1 as pb;
use fedpref_coordinator::config::{Config, Limits};
use fedpref_coordinator::manifest::RunManifest;
use fedpref_coordinator::service::upload::{Plan, check_header};

/// Up to `max` length-delimited messages of type `M` from the front of `data`.
fn messages<M: Message + Default>(mut data: &[u8], max: usize) -> Vec<M> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < max {
        match M::decode_length_delimited(&mut data) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    out
}

const BASE_MANIFEST: &str = r#"
title = "Fuzz"
purpose = "Fuzz the decoders"
owner = "fuzz@example.com"
privacy_mode = "central"
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

[model]
items = 3
factors = 2

[opt_out_policy]
consent_model = "opt-in"
"#;

/// Manifests of the three privacy modes a coordinator run has (3 items, 2 factors: 10
/// parameters).
fn manifests() -> &'static [RunManifest; 3] {
    static MANIFESTS: OnceLock<[RunManifest; 3]> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let local = BASE_MANIFEST.replace("\"central\"", "\"local\"");
        let distributed = BASE_MANIFEST.replace("\"central\"", "\"distributed\"")
            + "\n[secure_aggregation]\nnoise = \"discrete_gaussian\"\ndropout_rate = 0.3\ncorruption_rate = 0.0\n";
        [local.as_str(), BASE_MANIFEST, distributed.as_str()]
            .map(|text| RunManifest::from_toml(text, "fuzz").expect("the fuzz manifests are valid"))
    })
}

/// The default limits, and small ones that the fuzzer reaches easily.
fn limits(small: bool) -> Limits {
    if small {
        Limits {
            max_upload_bytes: 64,
            max_upload_chunks: 8,
            max_chunk_bytes: 16,
            ..Limits::default()
        }
    } else {
        Limits::default()
    }
}

/// `UploadUpdate` as the coordinator receives it: the first byte picks the run's privacy mode
/// and the limits, the rest is the stream of `UploadUpdateRequest`s. The header is checked
/// against the manifest, then each chunk is decoded into the engine's layout.
pub fn upload(data: &[u8]) {
    let Some((&select, data)) = data.split_first() else {
        return;
    };
    let manifest = &manifests()[usize::from(select % 3)];
    let limits = limits(select & 0x80 != 0);
    let stream: Vec<pb::UploadUpdateRequest> = messages(data, 10_000);
    let mut stream = stream.into_iter().map(|m| m.part);
    let Some(Some(pb::upload_update_request::Part::Header(header))) = stream.next() else {
        return;
    };
    let Ok(plan) = check_header(&header, manifest, &limits) else {
        return;
    };
    let chunks = stream.map_while(|part| match part {
        Some(pb::upload_update_request::Part::Chunk(c)) => Some(c),
        _ => None,
    });
    match plan {
        Plan::Update {
            mut decoder,
            clip_bit,
        } => {
            for chunk in chunks {
                if decoder.push(&chunk, &limits).is_err() {
                    return;
                }
            }
            if let Ok((values, digest, received)) = decoder.finish() {
                assert_eq!(values.len(), manifest.dimension());
                assert!(values.iter().all(|v| v.is_finite()));
                assert_eq!(digest.len(), 32);
                assert!(received <= limits.max_upload_bytes);
                assert!(clip_bit.is_none_or(|b| b.noised_bit.is_finite()));
            }
        }
        Plan::Masked(mut decoder) => {
            for chunk in chunks {
                if decoder.push(&chunk, &limits).is_err() {
                    return;
                }
            }
            if let Ok((values, _, received)) = decoder.finish() {
                assert_eq!(values.len(), manifest.dimension());
                assert_eq!(received, 4 * values.len() as u64);
            }
        }
    }
}

/// `CreateRun`'s manifest over the admin API: a `RunManifest` message converted and
/// validated as the TOML manifest is. What the admin API then shows for the run
/// (`manifest_to_proto`, with derived values such as the secure-aggregation threshold filled
/// in) must be accepted again, describe the same run, and be shown unchanged.
pub fn admin_manifest(data: &[u8]) {
    use fedpref_coordinator::service::convert::{manifest_from_proto, manifest_to_proto};
    let Ok(proto) = pb::RunManifest::decode(data) else {
        return;
    };
    let Ok(manifest) = manifest_from_proto(&proto) else {
        return;
    };
    let shown = manifest_to_proto(&manifest);
    let back = manifest_from_proto(&shown).expect("the manifest the admin API shows is accepted");
    assert_eq!(
        manifest_to_proto(&back),
        shown,
        "the shown manifest is a fixed point"
    );
    assert_eq!(back.dimension(), manifest.dimension());
    assert_eq!(
        back.task_noise_multiplier(),
        manifest.task_noise_multiplier()
    );
}

/// A run manifest in TOML (`run create --manifest`), parsed and validated.
pub fn manifest_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = RunManifest::from_toml(text, "fuzz.toml") {
        let _ = m.dimension();
        let _ = m.sha256();
    }
}

/// The coordinator's configuration file, parsed and validated.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_toml(text, "fuzz.toml", Path::new("/nonexistent"));
}

/// A check-in's answer as the device reads it: the task's secure-aggregation parameters,
/// checked for each dimension the task's tensors could give.
pub fn device_task(data: &[u8]) {
    let Ok(answer) = pb::CheckInResponse::decode(data) else {
        return;
    };
    let Some(pb::check_in_response::Outcome::Task(task)) = answer.outcome else {
        return;
    };
    for dimension in [0, 1, 10, 10_000] {
        if let Ok(round) =
            fedpref_client_sdk::secure_aggregation::DistributedRound::from_task(&task, dimension)
        {
            assert_eq!(round.config.dimension(), dimension);
        }
    }
}

/// A downloaded model snapshot, decoded and turned into the device's model.
pub fn model_snapshot(data: &[u8]) {
    let Ok(snapshot) = pb::ModelSnapshot::decode(data) else {
        return;
    };
    let _ = fedpref_client_sdk::participation::snapshot::model_from_snapshot(&snapshot, "item-");
}

/// A distributed round from the device's side: a task, then the key directory, share inbox
/// and unmasking plan of the stage views, each decoded and fed to the device's protocol
/// state as it would be (seeded RNG, an all-zero update).
pub fn stage_views(data: &[u8]) {
    use fedpref_secagg::client::Client;
    let Some((&dimension, data)) = data.split_first() else {
        return;
    };
    let dimension = usize::from(dimension % 16) + 1;
    let mut data = data;
    let Ok(task) = pb::Task::decode_length_delimited(&mut data) else {
        return;
    };
    let Ok(round) =
        fedpref_client_sdk::secure_aggregation::DistributedRound::from_task(&task, dimension)
    else {
        return;
    };
    // At most 64 devices: the protocol's work grows with the cohort.
    if round.config.cohort_size > 64 {
        return;
    }
    let mut rng = fedpref_secagg::rng::simulation_rng(7, &[]);
    let Ok((state, _keys)) = Client::advertise(round.config.clone(), &mut rng) else {
        return;
    };
    let Ok(directory) = pb::KeyDirectory::decode_length_delimited(&mut data) else {
        return;
    };
    let Ok(directory) = fedpref_client_sdk::secure_aggregation::key_directory(&directory) else {
        return;
    };
    let Ok((state, _shares)) = state.share_keys(&directory, &mut rng) else {
        return;
    };
    let Ok(inbox) = pb::ShareInbox::decode_length_delimited(&mut data) else {
        return;
    };
    let zeros = vec![0i64; dimension];
    let Ok(input) = round.config.encoding.encode_integers(&zeros) else {
        return;
    };
    let inbox = fedpref_client_sdk::secure_aggregation::share_inbox(&inbox);
    let Ok((state, masked)) = state.masked_input(&inbox, &input) else {
        return;
    };
    assert_eq!(masked.values.len(), dimension);
    let Ok(plan) = pb::UnmaskingPlan::decode_length_delimited(&mut data) else {
        return;
    };
    let _ = state.unmask(&fedpref_client_sdk::secure_aggregation::unmasking_plan(
        &plan,
    ));
}

/// `fedpref-device ingest`'s JSON Lines: each line parsed and validated as `ingest_jsonl`
/// does, against the default limits, at a fixed time.
pub fn ingest_jsonl(data: &[u8]) {
    use fedpref_client_sdk::{Event, EventLimits, Timestamp};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = Timestamp::from_millis(1_800_000_000_000);
    let limits = EventLimits::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(event) = Event::from_json_line(line) {
            let _ = event.validate(now, &limits);
        }
    }
}
