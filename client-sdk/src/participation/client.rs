//! [`CoordinatorClient`]: the `fedpref.v1.DeviceService` calls over TLS, with retries.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fedpref_proto::metadata::{AUTHORIZATION, bearer};
use fedpref_proto::prost::Message;
use fedpref_proto::v1::{
    self as pb, device_service_client::DeviceServiceClient,
    secure_aggregation_service_client::SecureAggregationServiceClient, upload_update_request::Part,
};
use fedpref_secagg::MaskedInput;
use rand::rngs::{ChaCha8Rng, SysRng};
use rand::{RngExt, SeedableRng};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::backoff::{pushback, retryable};
use super::snapshot::{Enrolment, model_from_snapshot};
use super::{ParticipationConfig, ParticipationError};
use crate::device::Device;
use crate::time::Timestamp;
use crate::upload::{PreparedShare, PreparedUpload};

/// The one tensor of a distributed round's upload (the protocol's name).
pub use fedpref_proto::tensor_names::MASKED_UPDATE;

/// Upload chunks never exceed this, whatever the task allows (256 KiB keeps a retried
/// chunk cheap on a phone's network).
const UPLOAD_CHUNK_CAP: usize = 256 * 1024;

/// How a download call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownloadProgress {
    /// The snapshot is complete, verified and installed.
    Installed {
        /// The version installed.
        model_version: u64,
        /// The snapshot's size in bytes.
        size_bytes: u64,
        /// Bytes that were already held from an earlier, interrupted download.
        resumed_from: u64,
    },
    /// Stopped after the requested number of chunks; the bytes so far are kept in the
    /// store and the next call resumes from them.
    Partial {
        /// Bytes held.
        held_bytes: u64,
        /// The snapshot's size.
        size_bytes: u64,
    },
}

/// How many [`CallTime`]s a client keeps before it forgets the oldest.
pub const CALL_TIMES_KEPT: usize = 256;

/// One request to the coordinator as the device saw it: which call, how long it took from
/// sending to the answer, and whether the answer was a success. Kept on the device only
/// (nothing of it is sent): an app can log its own latency, and the soak test measures with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallTime {
    /// The RPC: `CheckIn`, `DownloadModel` (the whole stream) or `UploadUpdate`.
    pub call: &'static str,
    /// From sending the request to the last byte of the answer.
    pub took: Duration,
    /// Whether the coordinator answered OK (a refused or failed attempt is kept too).
    pub ok: bool,
}

/// A TLS connection to a coordinator's DeviceService, and the device's credentials there.
pub struct CoordinatorClient {
    endpoint: String,
    /// The CA certificate(s) the connection trusts, kept to follow redirects.
    ca_pem: Vec<u8>,
    inner: DeviceServiceClient<Channel>,
    secagg: SecureAggregationServiceClient<Channel>,
    config: ParticipationConfig,
    enrolment: Option<Enrolment>,
    rng: ChaCha8Rng,
    /// The latest [`CALL_TIMES_KEPT`] calls' timings, oldest first.
    call_times: VecDeque<CallTime>,
}

impl std::fmt::Debug for CoordinatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorClient")
            .field("endpoint", &self.endpoint)
            .field("enrolment", &self.enrolment)
            .finish_non_exhaustive()
    }
}

/// Everything in an error's source chain, for messages that say what really failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out += ": ";
            out += &text;
        }
        source = s.source();
    }
    out
}

fn is_certificate_problem(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("certificate") || m.contains("unknownissuer") || m.contains("badsignature")
}

impl CoordinatorClient {
    /// Connects over TLS to `url` (`https://host:port`), trusting only the CA certificate(s)
    /// in `ca_pem`. Unreachable coordinators are retried per the policy; a certificate the
    /// CA does not validate fails at once with [`ParticipationError::Certificate`].
    pub async fn connect(
        url: &str,
        ca_pem: &[u8],
        config: ParticipationConfig,
    ) -> Result<Self, ParticipationError> {
        let invalid = |message: String| ParticipationError::InvalidEndpoint {
            url: url.to_string(),
            message,
        };
        if !url.starts_with("https://") {
            return Err(invalid(
                "must be an https:// URL: the SDK talks to coordinators over TLS only".into(),
            ));
        }
        let text = std::str::from_utf8(ca_pem).map_err(|_| {
            ParticipationError::InvalidCaCertificate("not a PEM file (not UTF-8)".into())
        })?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ParticipationError::InvalidCaCertificate(
                "no PEM `CERTIFICATE` block in it".into(),
            ));
        }
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| invalid(chain(&e)))?
            .tls_config(tls)
            .map_err(|e| invalid(chain(&e)))?
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .tcp_nodelay(true);
        let mut rng = ChaCha8Rng::try_from_rng(&mut SysRng)
            .unwrap_or_else(|_| ChaCha8Rng::seed_from_u64(Timestamp::now().millis() as u64));
        let mut attempt = 0;
        let channel = loop {
            attempt += 1;
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) => {
                    let message = chain(&e);
                    if is_certificate_problem(&message) {
                        return Err(ParticipationError::Certificate {
                            endpoint: url.to_string(),
                            message,
                        });
                    }
                    match config.retry.delay(attempt, None, rng.random::<f64>()) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => {
                            return Err(ParticipationError::Unreachable {
                                endpoint: url.to_string(),
                                attempts: attempt,
                                message,
                            });
                        }
                    }
                }
            }
        };
        Ok(Self {
            endpoint: url.to_string(),
            ca_pem: ca_pem.to_vec(),
            inner: DeviceServiceClient::new(channel.clone()),
            secagg: SecureAggregationServiceClient::new(channel),
            config,
            enrolment: None,
            rng,
            call_times: VecDeque::new(),
        })
    }

    /// The timings of the latest calls (at most [`CALL_TIMES_KEPT`], oldest first), removed
    /// from the client.
    pub fn take_call_times(&mut self) -> Vec<CallTime> {
        self.call_times.drain(..).collect()
    }

    fn record_call(&mut self, call: &'static str, sent: Instant, ok: bool) {
        if self.call_times.len() == CALL_TIMES_KEPT {
            self.call_times.pop_front();
        }
        self.call_times.push_back(CallTime {
            call,
            took: sent.elapsed(),
            ok,
        });
    }

    /// Moves to the coordinator replica at `url`, as a check-in's `Redirect` asks: the same
    /// rules as [`connect`](Self::connect) (https only, the same CA certificates, retries), and
    /// the same enrolment, since replicas share one database. The old connection is dropped
    /// only once the new one is up.
    pub async fn follow_redirect(&mut self, url: &str) -> Result<(), ParticipationError> {
        let mut next = Self::connect(url, &self.ca_pem, self.config.clone()).await?;
        next.enrolment = self.enrolment.take();
        *self = next;
        Ok(())
    }

    /// The coordinator's URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The configuration.
    pub fn config(&self) -> &ParticipationConfig {
        &self.config
    }

    /// A uniform draw in [0, 1), for jitter.
    pub(crate) fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    fn authed<T>(&self, message: T, call: &'static str) -> Result<Request<T>, ParticipationError> {
        let enrolment = self
            .enrolment
            .as_ref()
            .ok_or(ParticipationError::NotEnrolled { call })?;
        let mut r = Request::new(message);
        let value =
            bearer(&enrolment.device_token)
                .parse()
                .map_err(|_| ParticipationError::Rejected {
                    call,
                    code: Code::Unauthenticated,
                    message: "the stored device token is not valid metadata; enrol again".into(),
                })?;
        r.metadata_mut().insert(AUTHORIZATION, value);
        Ok(r)
    }

    /// Waits before the next attempt of `call`, or turns `status` into the final error.
    async fn backoff(
        &mut self,
        call: &'static str,
        attempt: u32,
        status: Status,
    ) -> Result<(), ParticipationError> {
        if !retryable(status.code()) {
            return Err(ParticipationError::from_status(call, &status));
        }
        let uniform = self.uniform();
        match self.config.retry.delay(attempt, pushback(&status), uniform) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(ParticipationError::RetriesExhausted {
                call,
                attempts: attempt,
                code: status.code(),
                message: chain(&status),
            }),
        }
    }

    /// Uses the device's stored enrolment at this coordinator, or enrols with `app_key` and
    /// stores the credentials (the token only in the store, never in a message or log).
    /// Returns the enrolment and whether it is new.
    pub async fn ensure_enrolled(
        &mut self,
        device: &mut Device,
        app_key: &str,
    ) -> Result<(Enrolment, bool), ParticipationError> {
        if let Some(e) = device.enrolment()?
            && e.endpoint == self.endpoint
        {
            self.enrolment = Some(e.clone());
            return Ok((e, false));
        }
        let e = self.enroll(app_key).await?;
        device.store_enrolment(&e, Timestamp::now().millis())?;
        self.enrolment = Some(e.clone());
        Ok((e, true))
    }

    /// `Enroll`: trades the app key for a device id and token (not stored; see
    /// [`CoordinatorClient::ensure_enrolled`]).
    pub async fn enroll(&mut self, app_key: &str) -> Result<Enrolment, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = pb::EnrollRequest {
                app_key: app_key.trim().to_string(),
                sdk_version: self.config.sdk_version.clone(),
                grant: self.config.enrolment_grant.clone(),
            };
            match self.inner.enroll(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok(Enrolment {
                        endpoint: self.endpoint.clone(),
                        device_id: r.device_id,
                        device_token: r.device_token,
                    });
                }
                Err(s) => self.backoff("Enroll", attempt, s).await?,
            }
        }
    }

    /// `CheckIn`: reports the model held and whether the device may train.
    pub async fn check_in(
        &mut self,
        held_model: Option<pb::ModelVersionRef>,
        eligibility: pb::Eligibility,
    ) -> Result<pb::CheckInResponse, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self.authed(
                pb::CheckInRequest {
                    sdk_version: self.config.sdk_version.clone(),
                    held_model: held_model.clone(),
                    eligibility: Some(eligibility),
                },
                "CheckIn",
            )?;
            let sent = Instant::now();
            let answer = self.inner.check_in(request).await;
            self.record_call("CheckIn", sent, answer.is_ok());
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => self.backoff("CheckIn", attempt, s).await?,
            }
        }
    }

    /// `DownloadModel`: downloads `model` into the device's store, resuming from the bytes
    /// an earlier call kept, then verifies its SHA-256 and installs it. With `max_chunks`,
    /// stops after that many chunks (e.g. when the app only has a moment of connectivity);
    /// the next call resumes. A broken stream is resumed where it broke.
    pub async fn download_model(
        &mut self,
        device: &mut Device,
        model: &pb::ModelVersionRef,
        max_chunks: Option<usize>,
    ) -> Result<DownloadProgress, ParticipationError> {
        let bad = |m: String| ParticipationError::Download(m);
        if model.sha256.len() != fedpref_proto::SHA256_LEN || model.size_bytes == 0 {
            return Err(bad(format!(
                "model version {}: the coordinator sent no valid SHA-256 and size",
                model.model_version
            )));
        }
        let partial = device.partial_download()?;
        let same = partial.as_ref().is_some_and(|p| {
            p.run_id == model.run_id
                && p.model_version == model.model_version
                && p.sha256 == model.sha256
                && p.size_bytes == model.size_bytes
                && p.held_bytes <= p.size_bytes
        });
        let mut held = if same {
            partial.map_or(0, |p| p.held_bytes)
        } else {
            device.begin_download(model)?;
            0
        };
        let resumed_from = held;
        let mut chunks = 0usize;
        let mut attempt = 0;
        while held < model.size_bytes {
            attempt += 1;
            let request = self.authed(
                pb::DownloadModelRequest {
                    run_id: model.run_id.clone(),
                    model_version: Some(model.model_version),
                    offset: held,
                    max_chunk_bytes: self.config.download_chunk_bytes,
                    expected_sha256: model.sha256.clone(),
                },
                "DownloadModel",
            )?;
            let sent = Instant::now();
            let mut stream = match self.inner.download_model(request).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    self.record_call("DownloadModel", sent, false);
                    self.backoff("DownloadModel", attempt, s).await?;
                    continue;
                }
            };
            loop {
                let chunk = match stream.message().await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        self.record_call("DownloadModel", sent, true);
                        break;
                    }
                    Err(s) => {
                        self.record_call("DownloadModel", sent, false);
                        self.backoff("DownloadModel", attempt, s).await?;
                        break;
                    }
                };
                if chunk.offset != held
                    || chunk.total_size_bytes != model.size_bytes
                    || chunk.model_sha256 != model.sha256
                    || chunk.model_version != model.model_version
                    || chunk.content.is_empty()
                    || held + chunk.content.len() as u64 > model.size_bytes
                {
                    device.discard_download()?;
                    return Err(bad(format!(
                        "model version {}: a chunk at offset {} does not continue the download at byte {held} of {}; the partial download was discarded",
                        model.model_version, chunk.offset, model.size_bytes
                    )));
                }
                device.append_download_chunk(held, &chunk.content)?;
                held += chunk.content.len() as u64;
                chunks += 1;
                if max_chunks.is_some_and(|m| chunks >= m) && held < model.size_bytes {
                    return Ok(DownloadProgress::Partial {
                        held_bytes: held,
                        size_bytes: model.size_bytes,
                    });
                }
            }
        }
        let bytes = device.download_bytes()?;
        if Sha256::digest(&bytes).as_slice() != model.sha256.as_slice() {
            device.discard_download()?;
            return Err(bad(format!(
                "model version {}: the downloaded bytes do not match the SHA-256 the coordinator announced; the download was discarded",
                model.model_version
            )));
        }
        let snapshot = pb::ModelSnapshot::decode(bytes.as_slice()).map_err(|e| {
            bad(format!(
                "model version {}: not a ModelSnapshot: {e}",
                model.model_version
            ))
        })?;
        if snapshot.model_version != model.model_version || snapshot.run_id != model.run_id {
            device.discard_download()?;
            return Err(bad(format!(
                "the snapshot is run {:?} version {}, not the announced run {:?} version {}",
                snapshot.run_id, snapshot.model_version, model.run_id, model.model_version
            )));
        }
        let mf = model_from_snapshot(&snapshot, &self.config.item_key_prefix)?;
        device.install_snapshot(mf, model)?;
        Ok(DownloadProgress::Installed {
            model_version: model.model_version,
            size_bytes: model.size_bytes,
            resumed_from,
        })
    }

    /// The upload stream for a prepared update: the header, then each tensor's bytes in
    /// chunks of at most the task's `max_chunk_bytes`. Fails (sending nothing) if the update
    /// is larger than the task's `max_upload_bytes`.
    pub fn upload_messages(
        task: &pb::Task,
        upload: &PreparedUpload,
    ) -> Result<Vec<pb::UploadUpdateRequest>, ParticipationError> {
        let tensors = upload
            .tensors()
            .map_err(|e| ParticipationError::Upload(e.to_string()))?;
        let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        if task.max_upload_bytes > 0 && total > task.max_upload_bytes {
            return Err(ParticipationError::Upload(format!(
                "the update is {total} bytes, more than the coordinator's max_upload_bytes of {}",
                task.max_upload_bytes
            )));
        }
        let header = pb::UpdateHeader {
            task: Some(task_ref(task)),
            base_model_version: upload.base_model_version(),
            tensors: tensors.iter().map(pb::NamedTensor::spec).collect(),
            privacy_mode: task.privacy_mode,
            clip_norm: upload.clip_norm(),
            noise_multiplier: upload.noise_multiplier(),
            clip_bit: upload.clip_bit(),
            update_sha256: vec![],
        };
        Ok(stream(task, header, &tensors))
    }

    /// `UploadUpdate`: streams a prepared update (the only thing that may be uploaded) and
    /// returns the coordinator's receipt. A retry resends the very same noised values, so it
    /// spends nothing more.
    pub async fn upload_update(
        &mut self,
        task: &pb::Task,
        upload: &PreparedUpload,
    ) -> Result<pb::UploadReceipt, ParticipationError> {
        let messages = Self::upload_messages(task, upload)?;
        self.upload_stream(messages).await
    }

    async fn upload_stream(
        &mut self,
        messages: Vec<pb::UploadUpdateRequest>,
    ) -> Result<pb::UploadReceipt, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self.authed(tokio_stream::iter(messages.clone()), "UploadUpdate")?;
            let sent = Instant::now();
            let answer = self.inner.upload_update(request).await;
            self.record_call("UploadUpdate", sent, answer.is_ok());
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => self.backoff("UploadUpdate", attempt, s).await?,
            }
        }
    }

    /// The upload stream for a distributed-mode masked input: one `DTYPE_U32` tensor,
    /// [`MASKED_UPDATE`] of shape \[d\], the masked values modulo 2³² in the layout's order
    /// (item factors, item biases, global offset, flattened). The header's example count is
    /// 1: in distributed mode every user weighs the same, and the device's own count is not
    /// revealed.
    pub fn masked_input_messages(
        task: &pb::Task,
        share: &PreparedShare,
        masked: &MaskedInput,
    ) -> Result<Vec<pb::UploadUpdateRequest>, ParticipationError> {
        let layout = share.layout();
        if masked.values.len() != layout.dimension() {
            return Err(ParticipationError::Upload(format!(
                "the masked input has {} values, the layout {}",
                masked.values.len(),
                layout.dimension()
            )));
        }
        let tensors = vec![
            pb::NamedTensor::from_values(
                MASKED_UPDATE,
                vec![masked.values.len() as u64],
                &masked.values,
            )
            .map_err(|e| ParticipationError::Upload(e.to_string()))?,
        ];
        let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        if task.max_upload_bytes > 0 && total > task.max_upload_bytes {
            return Err(ParticipationError::Upload(format!(
                "the masked input is {total} bytes, more than the coordinator's max_upload_bytes of {}",
                task.max_upload_bytes
            )));
        }
        let header = pb::UpdateHeader {
            task: Some(task_ref(task)),
            base_model_version: share.base_model_version(),
            tensors: tensors.iter().map(pb::NamedTensor::spec).collect(),
            privacy_mode: task.privacy_mode,
            clip_norm: share.clip_norm(),
            noise_multiplier: share.noise_multiplier(),
            clip_bit: None,
            update_sha256: vec![],
        };
        Ok(stream(task, header, &tensors))
    }

    /// `UploadUpdate` of a masked input (distributed mode; see
    /// [`CoordinatorClient::masked_input_messages`]). A retry resends the same bytes.
    pub async fn upload_masked_input(
        &mut self,
        task: &pb::Task,
        share: &PreparedShare,
        masked: &MaskedInput,
    ) -> Result<pb::UploadReceipt, ParticipationError> {
        let messages = Self::masked_input_messages(task, share, masked)?;
        self.upload_stream(messages).await
    }

    /// `SecureAggregationService.AdvertiseKeys`; returns how long to wait before polling.
    pub async fn advertise_keys(
        &mut self,
        request: pb::AdvertiseKeysRequest,
    ) -> Result<Duration, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.authed(request.clone(), "AdvertiseKeys")?;
            match self.secagg.advertise_keys(r).await {
                Ok(r) => {
                    return Ok(r
                        .into_inner()
                        .poll_after
                        .map_or(Duration::ZERO, super::to_duration));
                }
                Err(s) => self.backoff("AdvertiseKeys", attempt, s).await?,
            }
        }
    }

    /// `SecureAggregationService.GetStage`.
    pub async fn get_stage(
        &mut self,
        task: &pb::Task,
    ) -> Result<pb::StageUpdate, ParticipationError> {
        let request = pb::GetStageRequest {
            task: Some(task_ref(task)),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.authed(request.clone(), "GetStage")?;
            match self.secagg.get_stage(r).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => self.backoff("GetStage", attempt, s).await?,
            }
        }
    }

    /// `SecureAggregationService.ShareKeys`; returns how long to wait before polling.
    pub async fn share_keys(
        &mut self,
        request: pb::ShareKeysRequest,
    ) -> Result<Duration, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.authed(request.clone(), "ShareKeys")?;
            match self.secagg.share_keys(r).await {
                Ok(r) => {
                    return Ok(r
                        .into_inner()
                        .poll_after
                        .map_or(Duration::ZERO, super::to_duration));
                }
                Err(s) => self.backoff("ShareKeys", attempt, s).await?,
            }
        }
    }

    /// `SecureAggregationService.Unmask`.
    pub async fn unmask(&mut self, request: pb::UnmaskRequest) -> Result<(), ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.authed(request.clone(), "Unmask")?;
            match self.secagg.unmask(r).await {
                Ok(_) => return Ok(()),
                Err(s) => self.backoff("Unmask", attempt, s).await?,
            }
        }
    }

    /// `DeclineTask`: gives a task back; returns how long to wait before checking in again.
    pub async fn decline_task(
        &mut self,
        task: &pb::Task,
        reason: pb::DeclineReason,
    ) -> Result<Duration, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self.authed(
                pb::DeclineTaskRequest {
                    task: Some(pb::TaskRef {
                        run_id: task.run_id.clone(),
                        round_id: task.round_id,
                        task_token: task.task_token.clone(),
                    }),
                    reason: reason as i32,
                },
                "DeclineTask",
            )?;
            match self.inner.decline_task(request).await {
                Ok(r) => {
                    return Ok(r
                        .into_inner()
                        .retry_after
                        .map_or(Duration::ZERO, super::to_duration));
                }
                Err(s) => self.backoff("DeclineTask", attempt, s).await?,
            }
        }
    }

    /// Gives `task` back with [`decline_task`](Self::decline_task), except that a round the
    /// coordinator has already closed (`FAILED_PRECONDITION`) takes nothing back and is not an
    /// error: the device is simply not in it. Returns how long to wait before checking in
    /// again, or `None` when the round had closed.
    pub async fn give_back(
        &mut self,
        task: &pb::Task,
        reason: pb::DeclineReason,
    ) -> Result<Option<Duration>, ParticipationError> {
        match self.decline_task(task, reason).await {
            Ok(wait) => Ok(Some(wait)),
            Err(ParticipationError::Rejected {
                code: Code::FailedPrecondition,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ReportMetrics`: sends one window's aggregate counts; returns how long to wait
    /// before the next report.
    pub async fn report_metrics(
        &mut self,
        request: pb::ReportMetricsRequest,
    ) -> Result<Duration, ParticipationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.authed(request.clone(), "ReportMetrics")?;
            match self.inner.report_metrics(r).await {
                Ok(r) => {
                    return Ok(r
                        .into_inner()
                        .next_report_after
                        .map_or(Duration::ZERO, super::to_duration));
                }
                Err(s) => self.backoff("ReportMetrics", attempt, s).await?,
            }
        }
    }
}

fn task_ref(task: &pb::Task) -> pb::TaskRef {
    pb::TaskRef {
        run_id: task.run_id.clone(),
        round_id: task.round_id,
        task_token: task.task_token.clone(),
    }
}

/// The header (its SHA-256 of the tensor bytes filled in), then each tensor's bytes in
/// chunks of at most the task's `max_chunk_bytes`.
fn stream(
    task: &pb::Task,
    mut header: pb::UpdateHeader,
    tensors: &[pb::NamedTensor],
) -> Vec<pb::UploadUpdateRequest> {
    let chunk = match task.max_chunk_bytes as usize {
        0 => UPLOAD_CHUNK_CAP,
        n => n.min(UPLOAD_CHUNK_CAP),
    };
    let mut digest = Sha256::new();
    for t in tensors {
        digest.update(&t.data);
    }
    header.update_sha256 = digest.finalize().to_vec();
    let mut messages = vec![pb::UploadUpdateRequest {
        part: Some(Part::Header(header)),
    }];
    for (index, t) in tensors.iter().enumerate() {
        for (n, piece) in t.data.chunks(chunk).enumerate() {
            messages.push(pb::UploadUpdateRequest {
                part: Some(Part::Chunk(pb::TensorChunk {
                    tensor_index: index as u32,
                    offset: (n * chunk) as u64,
                    content: piece.to_vec().into(),
                })),
            });
        }
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_keeps_only_the_latest_call_times() {
        let channel = Endpoint::from_static("https://127.0.0.1:9").connect_lazy();
        let mut client = CoordinatorClient {
            endpoint: "https://127.0.0.1:9".into(),
            ca_pem: vec![],
            inner: DeviceServiceClient::new(channel.clone()),
            secagg: SecureAggregationServiceClient::new(channel),
            config: ParticipationConfig::default(),
            enrolment: None,
            rng: ChaCha8Rng::seed_from_u64(1),
            call_times: VecDeque::new(),
        };
        let sent = Instant::now();
        for n in 0..CALL_TIMES_KEPT + 10 {
            client.record_call(
                if n < 10 { "CheckIn" } else { "UploadUpdate" },
                sent,
                n % 2 == 0,
            );
        }
        let times = client.take_call_times();
        assert_eq!(times.len(), CALL_TIMES_KEPT);
        // The ten oldest (the check-ins) were forgotten first.
        assert!(times.iter().all(|t| t.call == "UploadUpdate"));
        assert!(times[0].ok && !times[1].ok);
        assert!(client.take_call_times().is_empty());
    }
}
