//! `UploadUpdate`, received as it streams: the header is checked against the task, then each
//! chunk is checked for order and size, hashed and decoded straight into the engine's flat
//! `f32` layout, refusing the first non-finite element. Nothing is buffered but the decoded
//! values (and at most one element's bytes split across two chunks), so an upload in flight
//! costs its `f32` values and no more; the engine sees the update only once it is complete
//! and every byte has been checked.
//!
//! The checks themselves do no IO ([`check_header`], [`UpdateDecoder`], [`MaskedDecoder`]):
//! the stream's driver feeds them, and so do the fuzz targets under `fuzz/`.

use std::sync::Arc;

use fedpref_proto::TensorError;
use fedpref_proto::v1::{self as pb, upload_update_request::Part};
use sha2::{Digest, Sha256};
use tonic::{Status, Streaming};

use super::convert::{proto_mode, reject_status, task_ref, update_tensors};
use super::{Shared, auth, coordinator_status, invalid, now_ms, shorten, timestamp};
use crate::config::Limits;
use crate::engine::{Action, Event, RunState};
use crate::manifest::RunManifest;

/// Bytes per element of an update dtype (F32 or F64), or `None`.
fn float_width(dtype: i32) -> Option<u64> {
    match pb::Dtype::try_from(dtype) {
        Ok(pb::Dtype::F32) => Some(4),
        Ok(pb::Dtype::F64) => Some(8),
        _ => None,
    }
}

/// Receives one upload from `device`: validates, decodes, hands it to the engine and answers
/// with the receipt, or with a status whose message names the field that was wrong.
pub(super) async fn receive(
    shared: &Arc<Shared>,
    device: String,
    mut stream: Streaming<pb::UploadUpdateRequest>,
) -> Result<pb::UploadReceipt, Status> {
    let header = match stream.message().await?.and_then(|m| m.part) {
        Some(Part::Header(h)) => h,
        Some(Part::Chunk(_)) => {
            return Err(invalid("header", "the first message must be the header"));
        }
        None => {
            return Err(invalid(
                "header",
                "missing: the first message must be the header",
            ));
        }
    };
    let task = task_ref(header.task.as_ref(), "header.task")?;
    // One trip to the coordinator before any chunk is read: the run's manifest, its open round
    // and model version. Besides checking the header early, this paces how many uploads are
    // decoded at once (measured: skipping it for a cached manifest raised the coordinator's
    // CPU per upload and its memory under load).
    let run_id = task.run_id.clone();
    let state = Arc::clone(shared);
    let cached = shared.cached_manifest(&run_id).is_some();
    let uploader = device.clone();
    let lookup = move |c: &mut crate::coordinator::Coordinator| {
        // Before anything about the run is told: to a device without a task in it, a run
        // and no run look the same.
        super::require_task_in_run(c, &run_id, &uploader)?;
        let manifest = state.manifest(c, &run_id)?;
        let (open, version) = match c.engine(&run_id) {
            Some(e) => (e.open_round(), e.model().0),
            None => (None, 0),
        };
        Ok((manifest, open, version))
    };
    let (manifest, open_round, version) = shared.in_memory_if(|_| cached, lookup).await?;
    if open_round == Some(task.round_id) && header.base_model_version != version {
        return Err(invalid(
            "header.base_model_version",
            format!(
                "{} is not the task's model version {version}",
                header.base_model_version
            ),
        ));
    }
    let (mut decoder, clip_bit) = match check_header(&header, &manifest, &shared.limits)? {
        Plan::Update { decoder, clip_bit } => (decoder, clip_bit),
        Plan::Masked(decoder) => {
            return receive_masked(shared, device, header, task, decoder, stream).await;
        }
    };
    check_header_and_charge(shared, &device, &task, header.base_model_version).await?;
    while let Some(message) = stream.message().await? {
        let chunk = match message.part {
            Some(Part::Chunk(c)) => c,
            _ => {
                return Err(invalid(
                    "chunk",
                    "every message after the header must be a chunk",
                ));
            }
        };
        decoder.push(&chunk, &shared.limits)?;
    }
    let (values, digest, received) = decoder.finish()?;
    if !header.update_sha256.is_empty() && header.update_sha256 != digest {
        return Err(Status::data_loss(
            "header.update_sha256: does not match the bytes received",
        ));
    }
    let run_id = task.run_id.clone();
    let round = task.round_id;
    let device_for_engine = device.clone();
    // Devices send no example count (it would be unnoised side information): under DP every
    // update weighs the same, and a run without DP has no devices.
    let examples = 1;
    let base_version = header.base_model_version;
    let in_memory_run = run_id.clone();
    shared
        .in_memory_if(
            |c| {
                c.engine(&in_memory_run)
                    .is_some_and(|e| e.update_stays_in_memory(now_ms()))
            },
            move |c| {
                super::require_task_in_run(c, &run_id, &device_for_engine)?;
                check_run_and_version(c, &run_id, round, base_version)?;
                let actions = c
                    .handle(
                        &run_id,
                        Event::Update {
                            device: device_for_engine.clone(),
                            round,
                            task_token: task.task_token,
                            values,
                            examples,
                            clip_bit,
                        },
                        now_ms(),
                    )
                    .map_err(coordinator_status)?;
                // `None`: the round closed at this very moment (its deadline passed): too late.
                outcome_for(actions, &device_for_engine).unwrap_or_else(|| {
                    Err(Status::failed_precondition(format!(
                        "round {round} closed before the update arrived"
                    )))
                })
            },
        )
        .await?;
    let (receipt_id, _) = auth::new_credentials()?;
    tracing::info!(device = %device, run = %task.run_id, round, bytes = received, "update accepted");
    Ok(pb::UploadReceipt {
        receipt_id: receipt_id.replacen("dev-", "rcpt-", 1),
        run_id: task.run_id,
        round_id: round,
        update_sha256: digest,
        bytes_received: received,
        accepted_at: Some(timestamp(now_ms())),
    })
}

/// What a checked header says is coming: a plain update, decoded into the engine's `f32`
/// layout, with its clip bit (adaptive clipping in local mode); or, in distributed mode, the
/// masked fixed-point update.
pub enum Plan {
    /// Local or central mode.
    Update {
        /// Decodes the chunks that follow.
        decoder: UpdateDecoder,
        /// The noised clip bit the header carried.
        clip_bit: Option<crate::engine::ClipBit>,
    },
    /// Distributed mode.
    Masked(MaskedDecoder),
}

/// Checks an upload's header against the run's manifest and this coordinator's limits: the
/// privacy settings must repeat the task's, the tensors must be the task's (names, shapes,
/// dtypes) and fit `limits.max_upload_bytes`. What only the engine knows (the round, the task
/// token, the model version) is checked elsewhere. No IO: the service calls it before reading
/// any chunk, and the fuzz targets call it on arbitrary headers.
pub fn check_header(
    header: &pb::UpdateHeader,
    manifest: &RunManifest,
    limits: &Limits,
) -> Result<Plan, Status> {
    // The header must repeat the task: privacy settings and tensors.
    if header.privacy_mode != proto_mode(manifest.privacy_mode) as i32 {
        return Err(invalid(
            "header.privacy_mode",
            format!("must be the task's {:?}", proto_mode(manifest.privacy_mode)),
        ));
    }
    // With adaptive clipping in local mode C changes with the rounds: the engine checks the
    // header's C against the open round's, under the lock.
    let local_bits = manifest.local_clip_bits();
    if !local_bits && header.clip_norm != manifest.clip_norm {
        return Err(invalid(
            "header.clip_norm",
            format!(
                "{} is not the task's {}",
                header.clip_norm, manifest.clip_norm
            ),
        ));
    }
    let sigma = manifest.task_noise_multiplier();
    if header.noise_multiplier != sigma {
        return Err(invalid(
            "header.noise_multiplier",
            format!("{} is not the task's {sigma}", header.noise_multiplier),
        ));
    }
    let clip_bit = match (local_bits, header.clip_bit) {
        (true, Some(bit)) => match crate::engine::check_clip_bit(bit, manifest) {
            Ok(()) => Some(crate::engine::ClipBit {
                clip_norm: header.clip_norm,
                noised_bit: bit,
            }),
            Err(message) => return Err(Status::invalid_argument(message)),
        },
        (true, None) => {
            return Err(invalid(
                "header.clip_bit",
                "missing: the task requested a clip bit (adaptive clipping in local mode)",
            ));
        }
        (false, Some(_)) => {
            return Err(invalid(
                "header.clip_bit",
                "must be unset: the task did not request a clip bit",
            ));
        }
        (false, None) => None,
    };
    if !header.update_sha256.is_empty() && header.update_sha256.len() != fedpref_proto::SHA256_LEN {
        return Err(invalid("header.update_sha256", "must be empty or 32 bytes"));
    }
    if manifest.privacy_mode == crate::manifest::ManifestPrivacyMode::Distributed {
        return masked_plan(header, manifest.dimension(), limits).map(Plan::Masked);
    }
    let expected = update_tensors(manifest);
    if header.tensors.len() != expected.len() {
        return Err(invalid(
            "header.tensors",
            format!(
                "{} tensors, but the task asks for {} ({})",
                header.tensors.len(),
                expected.len(),
                expected
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let mut widths = vec![];
    for (i, (got, want)) in header.tensors.iter().zip(&expected).enumerate() {
        if got.name != want.name {
            return Err(invalid(
                &format!("header.tensors[{i}].name"),
                format!(
                    "`{}`, but the task asks for `{}`",
                    shorten(&got.name),
                    want.name
                ),
            ));
        }
        if got.shape != want.shape {
            return Err(invalid(
                &format!("header.tensors[{i}].shape"),
                format!(
                    "tensor `{}` has shape {}, but the task asks for {:?}",
                    got.name,
                    shorten(&format!("{:?}", got.shape)),
                    want.shape
                ),
            ));
        }
        let width = float_width(got.dtype).ok_or_else(|| {
            invalid(
                &format!("header.tensors[{i}].dtype"),
                "must be DTYPE_F64 or DTYPE_F32",
            )
        })?;
        widths.push(width);
    }
    let decoder = UpdateDecoder::new(header.tensors.clone(), widths, manifest.dimension());
    if decoder.total > limits.max_upload_bytes {
        return Err(invalid(
            "header.tensors",
            format!(
                "the update is {} bytes, more than this coordinator's limit of {} bytes",
                decoder.total, limits.max_upload_bytes
            ),
        ));
    }
    Ok(Plan::Update { decoder, clip_bit })
}

/// Before any chunk is read: the engine checks the header against the device's task (round,
/// token, not yet uploaded) and, in local mode, charges the round in the ledger, so that an
/// update the coordinator reads is always counted, whether it is then accepted or refused.
async fn check_header_and_charge(
    shared: &Arc<Shared>,
    device: &str,
    task: &pb::TaskRef,
    base_version: u64,
) -> Result<(), Status> {
    let (run_id, round, device) = (task.run_id.clone(), task.round_id, device.to_string());
    let task_token = task.task_token.clone();
    let probe = run_id.clone();
    shared
        .in_memory_if(
            |c| {
                c.engine(&probe)
                    .is_some_and(|e| !e.update_header_charges(round))
            },
            move |c| {
                check_run_and_version(c, &run_id, round, base_version)?;
                let actions = c
                    .handle(
                        &run_id,
                        Event::UpdateHeader {
                            device: device.clone(),
                            round,
                            task_token,
                        },
                        now_ms(),
                    )
                    .map_err(coordinator_status)?;
                match outcome_for(actions, &device) {
                    Some(Err(status)) => Err(status),
                    _ => Ok(()),
                }
            },
        )
        .await
}

/// What the engine's actions say about `device`'s update: accepted, refused (with the
/// rejection as a status), or `None` when they name neither.
fn outcome_for(actions: Vec<Action>, device: &str) -> Option<Result<(), Status>> {
    actions.into_iter().find_map(|action| match action {
        Action::UpdateAccepted { device: d, .. } if d == device => Some(Ok(())),
        Action::Reject {
            device: d,
            rejection,
        } if d == device => Some(Err(reject_status(rejection.kind, rejection.message))),
        _ => None,
    })
}

/// Under the coordinator's lock, before the engine sees an update: the run must be live, and
/// while the task's round is open the update must be computed from its model version.
fn check_run_and_version(
    c: &crate::coordinator::Coordinator,
    run_id: &str,
    round: u64,
    base_version: u64,
) -> Result<(), Status> {
    let Some(engine) = c.engine(run_id).filter(|e| e.state() != RunState::Stopped) else {
        return Err(Status::failed_precondition(format!(
            "run {run_id:?} has stopped"
        )));
    };
    let version = engine.model().0;
    if engine.open_round() == Some(round) && base_version != version {
        return Err(invalid(
            "header.base_model_version",
            format!("{base_version} is not the task's model version {version}"),
        ));
    }
    Ok(())
}

/// Distributed mode: the upload is one `DTYPE_U32` tensor, `masked_update` of shape \[d\],
/// the masked fixed-point update. Its chunks are checked for order and size like any
/// upload's, then the values go to the engine, which checks the stage and the device's place
/// in the round.
async fn receive_masked(
    shared: &Arc<Shared>,
    device: String,
    header: pb::UpdateHeader,
    task: pb::TaskRef,
    mut decoder: MaskedDecoder,
    mut stream: Streaming<pb::UploadUpdateRequest>,
) -> Result<pb::UploadReceipt, Status> {
    while let Some(message) = stream.message().await? {
        let Some(Part::Chunk(chunk)) = message.part else {
            return Err(invalid(
                "chunk",
                "every message after the header must be a chunk",
            ));
        };
        decoder.push(&chunk, &shared.limits)?;
    }
    let (values, digest, total) = decoder.finish()?;
    if !header.update_sha256.is_empty() && header.update_sha256 != digest {
        return Err(Status::data_loss(
            "header.update_sha256: does not match the bytes received",
        ));
    }
    let run_id = task.run_id.clone();
    let round = task.round_id;
    let device_for_engine = device.clone();
    let base_version = header.base_model_version;
    shared
        .blocking(move |c| {
            super::require_task_in_run(c, &run_id, &device_for_engine)?;
            check_run_and_version(c, &run_id, round, base_version)?;
            let actions = c
                .handle(
                    &run_id,
                    Event::MaskedUpdate {
                        device: device_for_engine.clone(),
                        round,
                        task_token: task.task_token,
                        values,
                    },
                    now_ms(),
                )
                .map_err(coordinator_status)?;
            outcome_for(actions, &device_for_engine).unwrap_or_else(|| {
                Err(Status::failed_precondition(format!(
                    "round {round} closed before the masked input arrived"
                )))
            })
        })
        .await?;
    let (receipt_id, _) = auth::new_credentials()?;
    tracing::info!(device = %device, run = %task.run_id, round, bytes = total, "masked input accepted");
    Ok(pb::UploadReceipt {
        receipt_id: receipt_id.replacen("dev-", "rcpt-", 1),
        run_id: task.run_id,
        round_id: round,
        update_sha256: digest,
        bytes_received: total,
        accepted_at: Some(timestamp(now_ms())),
    })
}

/// A distributed round's header: exactly the one tensor `masked_update`, `DTYPE_U32` of
/// shape \[d\], within `limits.max_upload_bytes`.
fn masked_plan(
    header: &pb::UpdateHeader,
    dimension: usize,
    limits: &Limits,
) -> Result<MaskedDecoder, Status> {
    let expected = pb::TensorSpec {
        name: fedpref_proto::tensor_names::MASKED_UPDATE.to_string(),
        shape: vec![dimension as u64],
        dtype: pb::Dtype::U32 as i32,
    };
    match header.tensors.as_slice() {
        [t] if *t == expected => {}
        [t] if t.name != expected.name => {
            return Err(invalid(
                "header.tensors[0].name",
                format!(
                    "`{}`, but a distributed round takes `{}`",
                    shorten(&t.name),
                    expected.name
                ),
            ));
        }
        [t] if t.dtype != expected.dtype => {
            return Err(invalid(
                "header.tensors[0].dtype",
                "must be DTYPE_U32: a distributed round takes the masked fixed-point update",
            ));
        }
        [t] => {
            return Err(invalid(
                "header.tensors[0].shape",
                format!(
                    "{}, but the round's dimension is [{dimension}]",
                    shorten(&format!("{:?}", t.shape))
                ),
            ));
        }
        other => {
            return Err(invalid(
                "header.tensors",
                format!(
                    "{} tensors, but a distributed round takes exactly one, `{}`",
                    other.len(),
                    expected.name
                ),
            ));
        }
    }
    let total = 4 * dimension as u64;
    if total > limits.max_upload_bytes {
        return Err(invalid(
            "header.tensors",
            format!(
                "the update is {total} bytes, more than this coordinator's limit of {} bytes",
                limits.max_upload_bytes
            ),
        ));
    }
    Ok(MaskedDecoder {
        total,
        bytes: Vec::with_capacity(total as usize),
        chunks: 0,
        hasher: Sha256::new(),
    })
}

/// The chunks of a masked upload, checked as they arrive: one tensor, in order, without gaps.
pub struct MaskedDecoder {
    total: u64,
    bytes: Vec<u8>,
    chunks: u32,
    hasher: Sha256,
}

impl MaskedDecoder {
    /// Checks one chunk's place and size, then hashes and keeps its bytes.
    pub fn push(&mut self, chunk: &pb::TensorChunk, limits: &Limits) -> Result<(), Status> {
        let total = self.total;
        self.chunks += 1;
        if self.chunks > limits.max_upload_chunks {
            return Err(invalid(
                "chunk",
                format!(
                    "more than this coordinator's limit of {} chunks",
                    limits.max_upload_chunks
                ),
            ));
        }
        let len = chunk.content.len() as u64;
        if len == 0 || len > u64::from(limits.max_chunk_bytes) {
            return Err(invalid(
                "chunk.content",
                format!("{len} bytes; must be 1 to {} bytes", limits.max_chunk_bytes),
            ));
        }
        if chunk.tensor_index != 0 {
            return Err(invalid(
                "chunk.tensor_index",
                format!("{}, but the upload has one tensor, 0", chunk.tensor_index),
            ));
        }
        if chunk.offset != self.bytes.len() as u64 {
            return Err(invalid(
                "chunk.offset",
                format!(
                    "{}, but the next byte is {}",
                    chunk.offset,
                    self.bytes.len()
                ),
            ));
        }
        if self.bytes.len() as u64 + len > total {
            return Err(invalid(
                "chunk.content",
                format!("more bytes than the header's {total} bytes of tensors"),
            ));
        }
        self.hasher.update(&chunk.content);
        self.bytes.extend_from_slice(&chunk.content);
        Ok(())
    }

    /// The masked values, the SHA-256 of every byte received and the byte count, once the
    /// upload is complete.
    pub fn finish(self) -> Result<(Vec<u32>, Vec<u8>, u64), Status> {
        let total = self.total;
        if self.bytes.len() as u64 != total {
            return Err(invalid(
                "chunk",
                format!(
                    "the upload ended after {} of its {total} bytes",
                    self.bytes.len()
                ),
            ));
        }
        let values = self
            .bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Ok((values, self.hasher.finalize().to_vec(), total))
    }
}

/// The chunks of one upload, checked and decoded as they arrive: in tensor order, each
/// tensor's bytes in order and without gaps, every element finite and within `f32`.
pub struct UpdateDecoder {
    specs: Vec<pb::TensorSpec>,
    /// Bytes per element of each tensor.
    widths: Vec<u64>,
    /// Bytes of each tensor.
    sizes: Vec<u64>,
    /// Bytes of all tensors.
    total: u64,
    /// The tensor being received, and how many of its bytes have arrived.
    current: usize,
    at: u64,
    /// How many values the tensors before the current one hold.
    base: usize,
    /// The first bytes of an element split across two chunks.
    carry: [u8; 8],
    carry_len: usize,
    chunks: u32,
    received: u64,
    hasher: Sha256,
    values: Vec<f32>,
}

impl UpdateDecoder {
    fn new(specs: Vec<pb::TensorSpec>, widths: Vec<u64>, dimension: usize) -> Self {
        let sizes: Vec<u64> = specs
            .iter()
            .zip(&widths)
            .map(|(spec, w)| spec.shape.iter().product::<u64>() * w)
            .collect();
        UpdateDecoder {
            specs,
            widths,
            total: sizes.iter().sum(),
            sizes,
            current: 0,
            at: 0,
            base: 0,
            carry: [0; 8],
            carry_len: 0,
            chunks: 0,
            received: 0,
            hasher: Sha256::new(),
            values: Vec::with_capacity(dimension),
        }
    }

    /// Checks one chunk's place and size, then hashes and decodes its bytes.
    pub fn push(&mut self, chunk: &pb::TensorChunk, limits: &Limits) -> Result<(), Status> {
        self.chunks += 1;
        if self.chunks > limits.max_upload_chunks {
            return Err(invalid(
                "chunk",
                format!(
                    "more than this coordinator's limit of {} chunks",
                    limits.max_upload_chunks
                ),
            ));
        }
        let len = chunk.content.len() as u64;
        if len == 0 || len > u64::from(limits.max_chunk_bytes) {
            return Err(invalid(
                "chunk.content",
                format!("{len} bytes; must be 1 to {} bytes", limits.max_chunk_bytes),
            ));
        }
        self.received += len;
        if self.received > self.total {
            return Err(invalid(
                "chunk.content",
                format!(
                    "more bytes than the header's {} bytes of tensors",
                    self.total
                ),
            ));
        }
        while self.current < self.sizes.len() && self.at == self.sizes[self.current] {
            self.current += 1;
            self.at = 0;
            self.base = self.values.len();
        }
        let current = self.current;
        let index = chunk.tensor_index as usize;
        if index != current {
            return Err(invalid(
                "chunk.tensor_index",
                format!(
                    "{index}, but tensor {current} is not complete yet (tensors in header order)"
                ),
            ));
        }
        if chunk.offset != self.at {
            return Err(invalid(
                "chunk.offset",
                format!(
                    "{}, but the next byte of tensor {current} is {}",
                    chunk.offset, self.at
                ),
            ));
        }
        if self.at + len > self.sizes[current] {
            return Err(invalid(
                "chunk.content",
                format!(
                    "runs past the end of tensor {current} (`{}`, {} bytes)",
                    self.specs[current].name, self.sizes[current]
                ),
            ));
        }
        self.hasher.update(&chunk.content);
        self.decode(&chunk.content)?;
        self.at += len;
        Ok(())
    }

    /// Decodes the current tensor's next bytes, completing a split element first.
    fn decode(&mut self, mut bytes: &[u8]) -> Result<(), Status> {
        let width = self.widths[self.current] as usize;
        if self.carry_len > 0 {
            let take = (width - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < width {
                return Ok(());
            }
            let element = self.carry;
            self.carry_len = 0;
            self.element(&element[..width])?;
        }
        let mut elements = bytes.chunks_exact(width);
        if width == 4 {
            // The common case, in one pass the compiler can vectorise: widen nothing, check
            // afterwards, and report the first bad element exactly as `element` would.
            let start = self.values.len();
            self.values.extend(
                elements
                    .by_ref()
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
            if let Some(i) = self.values[start..].iter().position(|v| !v.is_finite()) {
                let bad = self.values[start + i];
                self.values.truncate(start + i);
                return self.element(&bad.to_le_bytes());
            }
        } else {
            for element in &mut elements {
                self.element(element)?;
            }
        }
        let rest = elements.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        Ok(())
    }

    /// One element: finite in its own dtype, and within `f32`, the model's precision.
    fn element(&mut self, bytes: &[u8]) -> Result<(), Status> {
        let value = match bytes.len() {
            4 => f64::from(f32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
            _ => f64::from_le_bytes(bytes.try_into().expect("8 bytes")),
        };
        let spec = &self.specs[self.current];
        let offset = self.base;
        if !value.is_finite() {
            let error = TensorError::NonFinite {
                name: spec.name.clone(),
                index: self.values.len() - offset,
                value,
            };
            return Err(Status::invalid_argument(error.to_string()));
        }
        let narrowed = value as f32;
        if !narrowed.is_finite() {
            return Err(Status::invalid_argument(format!(
                "tensor `{}`: element {} ({value:e}) is outside the f32 range of the model",
                spec.name,
                self.values.len() - offset
            )));
        }
        self.values.push(narrowed);
        Ok(())
    }

    /// The decoded values, the SHA-256 of every byte received and the byte count, once the
    /// upload is complete.
    pub fn finish(self) -> Result<(Vec<f32>, Vec<u8>, u64), Status> {
        if self.received != self.total {
            return Err(invalid(
                "chunk",
                format!(
                    "the upload ended after {} of {} bytes",
                    self.received, self.total
                ),
            ));
        }
        Ok((self.values, self.hasher.finalize().to_vec(), self.received))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: Vec<u64>, dtype: pb::Dtype) -> pb::TensorSpec {
        pb::TensorSpec {
            name: name.into(),
            shape,
            dtype: dtype as i32,
        }
    }

    fn chunk(tensor_index: u32, offset: u64, content: &[u8]) -> pb::TensorChunk {
        pb::TensorChunk {
            tensor_index,
            offset,
            content: content.to_vec().into(),
        }
    }

    /// Sends `tensors` (one byte string each) in chunks of `step` bytes.
    fn decode(
        specs: &[pb::TensorSpec],
        tensors: &[Vec<u8>],
        step: usize,
    ) -> Result<(Vec<f32>, Vec<u8>, u64), Status> {
        let widths: Vec<u64> = specs
            .iter()
            .map(|s| float_width(s.dtype).unwrap())
            .collect();
        let mut decoder = UpdateDecoder::new(specs.to_vec(), widths, 0);
        let limits = Limits::default();
        for (i, bytes) in tensors.iter().enumerate() {
            for (k, piece) in bytes.chunks(step).enumerate() {
                decoder.push(&chunk(i as u32, (k * step) as u64, piece), &limits)?;
            }
        }
        decoder.finish()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f64_bytes(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn elements_split_across_chunks_decode_as_whole_ones() {
        let specs = [
            spec("a", vec![2, 3], pb::Dtype::F32),
            spec("b", vec![3], pb::Dtype::F64),
        ];
        let a = [1.5f32, -2.25, 3.0, 0.1, 1e-30, -7.0];
        let b = [0.5f64, -1.0e10, 2.0];
        let tensors = [f32_bytes(&a), f64_bytes(&b)];
        let mut hasher = Sha256::new();
        hasher.update(&tensors[0]);
        hasher.update(&tensors[1]);
        let digest = hasher.finalize().to_vec();
        let mut want: Vec<f32> = a.to_vec();
        want.extend(b.iter().map(|&x| x as f32));
        // Chunk sizes that split elements at every possible place, and whole elements.
        for step in [1, 3, 5, 7, 8, 13, 64] {
            let (values, sha, bytes) = decode(&specs, &tensors, step).unwrap();
            assert_eq!(values, want, "step {step}");
            assert_eq!(sha, digest, "step {step}");
            assert_eq!(bytes, 24 + 24);
        }
    }

    #[test]
    fn a_non_finite_element_is_named_by_its_tensor_and_index() {
        let specs = [
            spec("a", vec![2], pb::Dtype::F32),
            spec("b", vec![3], pb::Dtype::F64),
        ];
        let tensors = [f32_bytes(&[1.0, 2.0]), f64_bytes(&[0.0, 1.0, f64::NAN])];
        for step in [3, 8] {
            let e = decode(&specs, &tensors, step).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert_eq!(e.message(), "tensor `b`: element 2 is not finite (NaN)");
        }
        let tensors = [f32_bytes(&[1.0, f32::INFINITY]), f64_bytes(&[0.0; 3])];
        // Split across chunks (the element-by-element path) and whole (the batch path).
        for step in [5, 64] {
            let e = decode(&specs, &tensors, step).unwrap_err();
            assert_eq!(e.message(), "tensor `a`: element 1 is not finite (inf)");
        }
        let tensors = [f32_bytes(&[f32::NAN, 1.0]), f64_bytes(&[0.0; 3])];
        let e = decode(&specs, &tensors, 64).unwrap_err();
        assert_eq!(e.message(), "tensor `a`: element 0 is not finite (NaN)");
    }

    #[test]
    fn an_f64_beyond_the_f32_range_is_refused() {
        let specs = [spec("b", vec![2], pb::Dtype::F64)];
        let e = decode(&specs, &[f64_bytes(&[1.0, 1e300])], 16).unwrap_err();
        assert!(
            e.message()
                .contains("tensor `b`: element 1 (1e300) is outside the f32 range"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn a_tensor_name_or_shape_of_megabytes_is_not_quoted_back() {
        let manifest = RunManifest::from_toml(
            r#"
title = "t"
purpose = "p"
owner = "o@example.com"
privacy_mode = "central"
rounds = 2
clip_norm = 1.0
noise_multiplier = 1.0
[budget]
epsilon = 10.0
delta = 1e-6
[sampling]
kind = "cohort"
target_size = 2
minimum_size = 1
round_seconds = 60
[server_optimizer]
kind = "fedavg"
[model]
items = 5
factors = 2
[opt_out_policy]
consent_model = "opt-in"
"#,
            "t",
        )
        .unwrap();
        let mut header = pb::UpdateHeader {
            privacy_mode: pb::PrivacyMode::Central as i32,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            tensors: update_tensors(&manifest),
            ..Default::default()
        };
        assert!(check_header(&header, &manifest, &Limits::default()).is_ok());
        header.tensors[0].name = "x".repeat(3 << 20);
        let Err(e) = check_header(&header, &manifest, &Limits::default()) else {
            panic!("accepted");
        };
        assert!(
            e.message().starts_with("header.tensors[0].name: `xxx"),
            "{}",
            e.message()
        );
        assert!(e.message().len() < 200, "{} bytes", e.message().len());
        header.tensors = update_tensors(&manifest);
        header.tensors[0].shape = vec![7; 500_000];
        let Err(e) = check_header(&header, &manifest, &Limits::default()) else {
            panic!("accepted");
        };
        assert!(
            e.message()
                .starts_with("header.tensors[0].shape: tensor `item_factors` has shape [7, 7"),
            "{}",
            e.message()
        );
        assert!(e.message().len() < 300, "{} bytes", e.message().len());
    }

    #[test]
    fn out_of_order_gapped_short_and_overlong_uploads_are_refused() {
        let specs = [
            spec("a", vec![2], pb::Dtype::F32),
            spec("b", vec![1], pb::Dtype::F32),
        ];
        let widths = [4, 4];
        let limits = Limits::default();
        let bytes = f32_bytes(&[1.0, 2.0]);
        // Tensor 1 before tensor 0 is complete.
        let mut d = UpdateDecoder::new(specs.to_vec(), widths.to_vec(), 3);
        d.push(&chunk(0, 0, &bytes[..4]), &limits).unwrap();
        let e = d.push(&chunk(1, 0, &bytes[..4]), &limits).unwrap_err();
        assert!(
            e.message().starts_with("chunk.tensor_index: 1"),
            "{}",
            e.message()
        );
        // A gap.
        let mut d = UpdateDecoder::new(specs.to_vec(), widths.to_vec(), 3);
        let e = d.push(&chunk(0, 4, &bytes[..4]), &limits).unwrap_err();
        assert!(
            e.message().starts_with("chunk.offset: 4"),
            "{}",
            e.message()
        );
        // Past the end of a tensor.
        let mut d = UpdateDecoder::new(specs.to_vec(), widths.to_vec(), 3);
        let e = d.push(&chunk(0, 0, &[0; 12]), &limits).unwrap_err();
        assert!(
            e.message().contains("runs past the end of tensor 0"),
            "{}",
            e.message()
        );
        // Short.
        let mut d = UpdateDecoder::new(specs.to_vec(), widths.to_vec(), 3);
        d.push(&chunk(0, 0, &bytes), &limits).unwrap();
        let e = d.finish().unwrap_err();
        assert!(
            e.message().contains("ended after 8 of 12 bytes"),
            "{}",
            e.message()
        );
        // An empty chunk.
        let mut d = UpdateDecoder::new(specs.to_vec(), widths.to_vec(), 3);
        let e = d.push(&chunk(0, 0, &[]), &limits).unwrap_err();
        assert!(
            e.message().starts_with("chunk.content: 0 bytes"),
            "{}",
            e.message()
        );
    }
}
