//! The one way an update leaves the SDK: [`Device::prepare_upload`] → [`PreparedUpload`].
//!
//! `prepare_upload` fits the private part, computes the dense update, **clips** it
//! ([`fedpref_privacy::clip_l2`]), **noises** it ([`GaussianMechanism::release_update`]
//! with a [`SecureSampler`]) and **records the spend** in the on-device accountant (the
//! [`fedpref_privacy::Budget`] persisted in the store, committed before it returns), in
//! that order. It refuses — and records nothing — when training participation is off,
//! the budget would be exceeded, the privacy mode is not one the SDK can honour, the task
//! is for another model version or there is nothing to learn from. [`PreparedUpload`] has
//! private fields and no constructor outside this module, so holding one proves all
//! three steps happened; the gRPC client will take nothing else.
//!
//! **Adaptive clipping (local mode).** When the task requests a clip bit
//! ([`TrainingTask::clip_bit_noise_std`]), `prepare_upload` also computes the update's L2 norm
//! *before* clipping, the bit b = 1 if it is at most C else 0, and releases b + N(0, σ_b²)
//! drawn from the same [`SecureSampler`] ([`fedpref_privacy::adaptive_clip::local_bit_release`]).
//! Neighbouring is replace-one (local DP): the bit's sensitivity is 1 and the update's 2C, so
//! the pair is one Gaussian mechanism, recorded in the accountant as one local release with
//! multiplier z, z⁻² = σ⁻² + (2σ_b)⁻² ([`fedpref_privacy::adaptive_clip::local_upload_noise_multiplier`])
//! — before either leaves the device.
//!
//! In distributed mode [`Device::prepare_share`] → [`PreparedShare`] is the counterpart: it
//! fits, **clips**, makes the device's **noised integer share** with the task's
//! [`DistributedDiscreteGaussian`] (conditional randomised rounding and discrete Gaussian
//! noise from a [`SecureShareSampler`] seeded by the operating system), **encodes** it in the
//! round's checked fixed point modulo 2³², and **records the spend** before returning. Only a
//! `PreparedShare` can be masked and uploaded in that mode.

use fedpref_privacy::distributed::{DistributedDiscreteGaussian, SecureShareSampler};
use fedpref_privacy::{
    GaussianMechanism, PrivacyError, PrivacyMode, PrivacyStatement, Released, RoundRelease, Secure,
    SecureSampler, adaptive_clip, clip_l2,
};
use fedpref_proto::TensorError;
use fedpref_proto::v1::NamedTensor;
use fedpref_secagg::EncodedInput;
use rusqlite::params;

use crate::SdkError;
use crate::device::Device;
use crate::model::{LocalTraining, PreferenceModel, TensorLayout, local_round};
use crate::secure_aggregation::DistributedRound;
use crate::time::Timestamp;

/// What the coordinator asks of the device for one round (the task's fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainingTask {
    /// The round.
    pub round_id: u64,
    /// The shared model version to train against; must be the installed one.
    pub model_version: u64,
    /// Local-training hyper-parameters.
    pub training: LocalTraining,
    /// The clip norm C.
    pub clip_norm: f64,
    /// The noise multiplier σ (noise std σC on every coordinate).
    pub noise_multiplier: f64,
    /// The privacy mode: [`PrivacyMode::Local`] for [`Device::prepare_upload`],
    /// [`PrivacyMode::Distributed`] for [`Device::prepare_share`].
    pub mode: PrivacyMode,
    /// Adaptive clipping in local mode: `Some(σ_b)` when the task requests a clip bit, the
    /// standard deviation of the noise the device adds to it (> 0); `None` otherwise.
    pub clip_bit_noise_std: Option<f64>,
}

/// A clipped, noised update whose spend is recorded: the only thing the SDK uploads.
/// Built only by [`Device::prepare_upload`].
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedUpload {
    round_id: u64,
    base_model_version: u64,
    example_count: u64,
    layout: TensorLayout,
    released: Released<Secure>,
    mode: PrivacyMode,
    clip_norm: f64,
    noise_multiplier: f64,
    clip_bit: Option<f64>,
    spent: PrivacyStatement,
}

impl PreparedUpload {
    /// Adaptive clipping: the noised clip bit (1 if the update's norm before clipping was at
    /// most C, else 0, plus N(0, σ_b²)), when the task requested one.
    pub fn clip_bit(&self) -> Option<f64> {
        self.clip_bit
    }
    /// The round.
    pub fn round_id(&self) -> u64 {
        self.round_id
    }
    /// The model version the update was computed from.
    pub fn base_model_version(&self) -> u64 {
        self.base_model_version
    }
    /// The number of examples it was computed from (capped at `max_examples`).
    pub fn example_count(&self) -> u64 {
        self.example_count
    }
    /// The tensors' names and shapes, in order.
    pub fn layout(&self) -> &TensorLayout {
        &self.layout
    }
    /// The noised coordinates, all tensors concatenated in layout order.
    pub fn released(&self) -> &Released<Secure> {
        &self.released
    }
    /// The privacy mode applied.
    pub fn mode(&self) -> PrivacyMode {
        self.mode
    }
    /// The clip norm applied.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }
    /// The noise multiplier applied.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }
    /// What the user had spent after this update was recorded.
    pub fn spent(&self) -> &PrivacyStatement {
        &self.spent
    }
    /// The update as `fedpref.v1.NamedTensor`s (F64), in layout order.
    pub fn tensors(&self) -> Result<Vec<NamedTensor>, TensorError> {
        let mut values = self.released.values();
        self.layout
            .tensors()
            .iter()
            .map(|spec| {
                let (head, rest) = values.split_at(spec.len());
                values = rest;
                NamedTensor::from_f64(spec.name.clone(), spec.shape.clone(), head)
            })
            .collect()
    }
}

impl Device {
    /// Trains locally and releases the update: fit, update, clip, noise, record — in that
    /// order — or refuses and records nothing. See the module docs.
    pub fn prepare_upload(
        &mut self,
        task: &TrainingTask,
        now: Timestamp,
    ) -> Result<PreparedUpload, SdkError> {
        if !self.settings().training {
            return Err(SdkError::TrainingOff);
        }
        if task.mode != PrivacyMode::Local {
            return Err(SdkError::UnsupportedMode(task.mode));
        }
        task.training.validate()?;
        let mechanism = GaussianMechanism::new(task.noise_multiplier, task.clip_norm)?;
        // With a clip bit the upload releases the pair (update, bit): one Gaussian mechanism
        // under replace-one neighbours, accounted with the combined multiplier.
        let accounted_multiplier = match task.clip_bit_noise_std {
            Some(sigma_b) => {
                adaptive_clip::local_upload_noise_multiplier(task.noise_multiplier, sigma_b)?
            }
            None => task.noise_multiplier,
        };
        let round = RoundRelease {
            mode: task.mode,
            noise_multiplier: accounted_multiplier,
            sampling_rate: 1.0,
        };
        // Ask before any work, against the stored accountant (another handle or process
        // may have spent since this one opened); `record_spend` checks again, atomically.
        self.reload_budget()?;
        if self.budget.would_exceed(&round)? {
            let mut probe = self.budget.clone();
            return Err(SdkError::BudgetExceeded(
                probe.spend(&round).expect_err("would_exceed said so"),
            ));
        }
        let held = self.model.as_ref().map(PreferenceModel::version);
        if held != Some(task.model_version) {
            return Err(SdkError::ModelVersionMismatch {
                task: task.model_version,
                held,
            });
        }
        self.purge_expired(now)?;
        let mut examples = self.user_cache(now)?.examples.clone();
        examples.truncate(task.training.max_examples);
        if examples.is_empty() {
            return Err(SdkError::NoExamples);
        }
        let model = self.model.as_ref().expect("checked above");
        let (_private, update) = local_round(model, &examples, &task.training);
        let layout = model.layout();
        // The clip bit compares the norm *before* clipping with C.
        let norm_before_clipping = update.iter().map(|x| x * x).sum::<f64>().sqrt();
        // 1. clip, 2. noise (update and bit from the same OS-seeded sampler) …
        let clipped = clip_l2(update, task.clip_norm)?;
        let mut sampler = SecureSampler::from_os()?;
        let released = mechanism.release_update(clipped, &mut sampler)?;
        let clip_bit = match task.clip_bit_noise_std {
            Some(sigma_b) => {
                let centred = adaptive_clip::local_bit_release(
                    norm_before_clipping,
                    task.clip_norm,
                    sigma_b,
                    &mut sampler,
                )?;
                // On the wire the bit is 0/1 plus noise: undo the centring, and clamp it to
                // the range the coordinator accepts (post-processing).
                let bit = adaptive_clip::clamp_local_bit(centred.values()[0] + 0.5, sigma_b);
                if !bit.is_finite() {
                    return Err(SdkError::Privacy(PrivacyError::NonFinite {
                        index: 0,
                        value: bit,
                    }));
                }
                Some(bit)
            }
            None => None,
        };
        // … 3. record, durably, before the update can go anywhere.
        let spent = self.record_spend(
            &round,
            &UploadRow {
                kind: "update",
                round_id: task.round_id,
                model_version: task.model_version,
                noise_multiplier: task.noise_multiplier,
                clip_norm: task.clip_norm,
                honest: None,
            },
            now,
        )?;
        Ok(PreparedUpload {
            round_id: task.round_id,
            base_model_version: task.model_version,
            example_count: examples.len() as u64,
            layout,
            released,
            mode: task.mode,
            clip_norm: task.clip_norm,
            noise_multiplier: task.noise_multiplier,
            clip_bit,
            spent,
        })
    }
}

/// A clipped, noised, encoded share whose spend is recorded: the only thing the SDK masks
/// and uploads in distributed mode. Built only by [`Device::prepare_share`].
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedShare {
    round_id: u64,
    base_model_version: u64,
    layout: TensorLayout,
    encoded: EncodedInput,
    clip_norm: f64,
    noise_multiplier: f64,
    spent: PrivacyStatement,
}

impl PreparedShare {
    /// The round.
    pub fn round_id(&self) -> u64 {
        self.round_id
    }
    /// The model version the update was computed from.
    pub fn base_model_version(&self) -> u64 {
        self.base_model_version
    }
    /// The tensors' names and shapes, in order (the masked input is cut along them).
    pub fn layout(&self) -> &TensorLayout {
        &self.layout
    }
    /// The encoded share, to be masked by the secure-aggregation client.
    pub fn encoded(&self) -> &EncodedInput {
        &self.encoded
    }
    /// The clip norm applied.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }
    /// The task's noise multiplier σ.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }
    /// What the user had spent after this share was recorded.
    pub fn spent(&self) -> &PrivacyStatement {
        &self.spent
    }
}

impl Device {
    /// The release the on-device accountant records for one distributed round: mode
    /// distributed, q = 1 (the coordinator knows the cohort), and the noise multiplier
    /// whose Gaussian RDP bounds the mechanism's at every order of the budget's grid
    /// ([`DistributedRound::recorded_noise_multiplier`]).
    pub fn distributed_release(&self, round: &DistributedRound) -> RoundRelease {
        RoundRelease {
            mode: PrivacyMode::Distributed,
            noise_multiplier: round.recorded_noise_multiplier(self.budget.accountant().orders()),
            sampling_rate: 1.0,
        }
    }

    /// Refuses, recording nothing, when the device may not take part in `round`: training
    /// is off, or the round would take the user past the budget. Cheap; called before the
    /// device advertises keys.
    pub fn check_share(&self, round: &DistributedRound) -> Result<(), SdkError> {
        if !self.settings().training {
            return Err(SdkError::TrainingOff);
        }
        let release = self.distributed_release(round);
        // Against the stored accountant, not this handle's copy: another handle or process
        // may have spent since. `record_spend` checks again, atomically, before recording.
        let budget = crate::device::stored_budget(&self.conn)?;
        if budget.would_exceed(&release)? {
            let mut probe = budget;
            return Err(SdkError::BudgetExceeded(
                probe.spend(&release).expect_err("would_exceed said so"),
            ));
        }
        Ok(())
    }

    /// Trains locally and prepares the distributed-mode share: fit, update, clip, noised
    /// integer share, encode, record — in that order — or refuses and records nothing. See
    /// the module docs. `task.mode` must be [`PrivacyMode::Distributed`].
    pub fn prepare_share(
        &mut self,
        task: &TrainingTask,
        round: &DistributedRound,
        now: Timestamp,
    ) -> Result<PreparedShare, SdkError> {
        if task.mode != PrivacyMode::Distributed {
            return Err(SdkError::UnsupportedMode(task.mode));
        }
        self.check_share(round)?;
        task.training.validate()?;
        let held = self.model.as_ref().map(PreferenceModel::version);
        if held != Some(task.model_version) {
            return Err(SdkError::ModelVersionMismatch {
                task: task.model_version,
                held,
            });
        }
        let mechanism: &DistributedDiscreteGaussian = &round.mechanism;
        self.purge_expired(now)?;
        let mut examples = self.user_cache(now)?.examples.clone();
        examples.truncate(task.training.max_examples);
        if examples.is_empty() {
            return Err(SdkError::NoExamples);
        }
        let model = self.model.as_ref().expect("checked above");
        let layout = model.layout();
        if layout.dimension() != round.config.dimension() {
            return Err(SdkError::InvalidInput(format!(
                "the round is for {} coordinates, the installed model makes {}",
                round.config.dimension(),
                layout.dimension()
            )));
        }
        let (_private, update) = local_round(model, &examples, &task.training);
        // 1. clip, 2. round and noise in integers, encode …
        let clipped = clip_l2(update, mechanism.clip_norm())?;
        let share = mechanism.noised_share(&clipped, &mut SecureShareSampler::from_os()?)?;
        let encoded = round
            .config
            .encoding
            .encode_integers(share.values())
            .map_err(|e| SdkError::InvalidInput(format!("encoding the share: {e}")))?;
        // … 3. record, durably, before the share can go anywhere.
        let release = self.distributed_release(round);
        let spent = self.record_spend(
            &release,
            &UploadRow {
                kind: "update",
                round_id: task.round_id,
                model_version: task.model_version,
                noise_multiplier: release.noise_multiplier,
                clip_norm: mechanism.clip_norm(),
                honest: Some((mechanism.honest_devices(), round.config.min_contributors)),
            },
            now,
        )?;
        Ok(PreparedShare {
            round_id: task.round_id,
            base_model_version: task.model_version,
            layout,
            encoded,
            clip_norm: mechanism.clip_norm(),
            noise_multiplier: task.noise_multiplier,
            spent,
        })
    }
}

/// The parameters of one release, as the `uploads` table records them.
pub(crate) struct UploadRow {
    pub(crate) kind: &'static str,
    pub(crate) round_id: u64,
    pub(crate) model_version: u64,
    pub(crate) noise_multiplier: f64,
    pub(crate) clip_norm: f64,
    /// Distributed mode: the honest devices the share's ε assumes, and the fewest devices
    /// a released sum holds (`assumed_honest_devices` of `min_contributors`).
    pub(crate) honest: Option<(u64, u32)>,
}

impl Device {
    /// Checks and records one release in a single SQLite write transaction
    /// (`BEGIN IMMEDIATE`): the accountant is re-read inside the transaction, the spend
    /// checked against the budget and, if it fits, written back with the `uploads` row
    /// before the transaction commits. Two handles or two processes on one store are
    /// serialised by SQLite's write lock, so no interleaving can take the user past the
    /// budget or lose a record. On refusal nothing is written.
    pub(crate) fn record_spend(
        &mut self,
        release: &RoundRelease,
        row: &UploadRow,
        now: Timestamp,
    ) -> Result<PrivacyStatement, SdkError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut budget = crate::device::stored_budget(&tx)?;
        let spent = budget.spend(release).map_err(|e| match e {
            e @ PrivacyError::BudgetExceeded { .. } => SdkError::BudgetExceeded(e),
            e => SdkError::Privacy(e),
        })?;
        tx.execute(
            "UPDATE privacy_budget SET budget = ?1 WHERE id = 1",
            [serde_json::to_string(&budget).expect("budget serialises")],
        )?;
        tx.execute(
            "INSERT INTO uploads (at_ms, round_id, model_version, mode, noise_multiplier, clip_norm, epsilon_after, kind, assumed_honest_devices, min_contributors)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                now.millis(),
                row.round_id as i64,
                row.model_version as i64,
                release.mode.as_str(),
                row.noise_multiplier,
                row.clip_norm,
                spent.epsilon,
                row.kind,
                row.honest.map(|(h, _)| h as i64),
                row.honest.map(|(_, m)| i64::from(m)),
            ],
        )?;
        tx.commit()?;
        self.budget = budget;
        Ok(spent)
    }
}
