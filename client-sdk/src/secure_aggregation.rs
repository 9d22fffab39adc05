//! Distributed mode on the device: the round's parameters, checked before anything is sent,
//! and the conversions between `fedpref.v1`'s `SecureAggregationService` messages and the
//! `fedpref-secagg` state machines.
//!
//! A task in `PRIVACY_MODE_DISTRIBUTED` carries a `SecureAggregationRound`: the public
//! parameters every device of the round shares. [`DistributedRound::from_task`] turns it into
//! a checked [`RoundConfig`] (the Shamir threshold against the graph, m ≥ t, and the
//! fixed-point encoding's overflow bound for this cohort, C and noise, via
//! [`RoundConfig::validate`] and [`FixedPoint::new`]) and the [`DistributedDiscreteGaussian`]
//! the device applies. It refuses, naming the field, a round that:
//! - is malformed (a context or graph seed that is not 32 bytes, a dimension that is not the
//!   installed model's, a threshold outside the graph's bounds, …);
//! - could overflow modulo 2³² (the encoding's check);
//! - assumes more honest devices than a released sum is guaranteed to hold
//!   (`assumed_honest_devices` ≥ `min_contributors`);
//! - would carry less noise than the task's σ promises: the assumed honest devices' shares
//!   must add up to at least (σC)² of variance.
//!
//! The secagg [`Client`](fedpref_secagg::Client) also refuses an unmasking plan that asks for
//! both shares of one neighbour. Everything random on the device — its keys, its self-mask
//! seed, its Shamir polynomials, its rounding and noise — comes from the operating system's
//! random source ([`fedpref_secagg::rng::os_rng`],
//! [`fedpref_privacy::distributed::SecureShareSampler`]); the SDK never uses a seeded
//! simulation generator.

use fedpref_privacy::distributed::DistributedDiscreteGaussian;
use fedpref_privacy::{OrderGrid, PrivacyError};
use fedpref_proto::v1 as pb;
use fedpref_secagg::messages::public_key_from_slice;
use fedpref_secagg::{
    AdvertiseKeys, EncodingParams, EncryptedShare, FixedPoint, Graph, KeyDirectory,
    ParticipantKeys, RoundConfig, RoundContext, SecAggError, ShareInbox, ShareKeys, ShareKind,
    Unmask, UnmaskingPlan,
};
use thiserror::Error;

/// A task whose secure-aggregation parameters the device refuses: the field and why.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("task field `{field}`: {message}")]
pub struct TaskParameterError {
    /// The field at fault, e.g. `secure_aggregation_round.threshold`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> TaskParameterError {
    TaskParameterError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The instants (Unix milliseconds) at which the stages close, where the task gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageDeadlines {
    /// ADVERTISE_KEYS.
    pub advertise_keys: Option<i64>,
    /// SHARE_KEYS.
    pub share_keys: Option<i64>,
    /// MASKED_INPUT (the upload deadline).
    pub masked_input: Option<i64>,
    /// UNMASKING.
    pub unmasking: Option<i64>,
}

/// One DISTRIBUTED round's checked parameters (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct DistributedRound {
    /// The secure-aggregation round: context, n, t, graph, m, encoding.
    pub config: RoundConfig,
    /// The noise every device adds.
    pub mechanism: DistributedDiscreteGaussian,
    /// When the stages close.
    pub deadlines: StageDeadlines,
}

fn millis(t: &Option<fedpref_proto::prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| crate::time::Timestamp::from_proto(t).millis())
}

const ROUND: &str = "secure_aggregation_round";

impl DistributedRound {
    /// Checks a DISTRIBUTED task's parameters for an update of `dimension` coordinates (the
    /// installed model's), before the device sends anything.
    pub fn from_task(task: &pb::Task, dimension: usize) -> Result<Self, TaskParameterError> {
        if task.privacy_mode != pb::PrivacyMode::Distributed as i32 {
            return Err(bad(
                "privacy_mode",
                format!(
                    "{}: secure-aggregation parameters are for PRIVACY_MODE_DISTRIBUTED tasks",
                    task.privacy_mode
                ),
            ));
        }
        let r = task
            .secure_aggregation_round
            .as_ref()
            .ok_or_else(|| bad(ROUND, "missing: a DISTRIBUTED task must carry it"))?;
        let field = |name: &str| format!("{ROUND}.{name}");
        let context: [u8; 32] = r.round_context.as_slice().try_into().map_err(|_| {
            bad(
                &field("round_context"),
                format!("{} bytes; it must be 32", r.round_context.len()),
            )
        })?;
        let graph = match r.neighbour_count {
            0 if r.graph_seed.is_empty() => Graph::Complete,
            0 => {
                return Err(bad(
                    &field("graph_seed"),
                    "must be empty for the complete graph (neighbour_count 0)",
                ));
            }
            degree => Graph::Harary {
                degree,
                seed: r.graph_seed.as_slice().try_into().map_err(|_| {
                    bad(
                        &field("graph_seed"),
                        format!("{} bytes; a Harary graph needs 32", r.graph_seed.len()),
                    )
                })?,
            },
        };
        if r.dimension != dimension as u64 {
            return Err(bad(
                &field("dimension"),
                format!(
                    "{}: the installed model's update has {dimension} coordinates",
                    r.dimension
                ),
            ));
        }
        if !(r.fixed_point_scale.is_finite() && r.fixed_point_scale > 0.0) {
            return Err(bad(
                &field("fixed_point_scale"),
                format!("{}: must be a finite number > 0", r.fixed_point_scale),
            ));
        }
        let honest = u64::from(r.assumed_honest_devices);
        if honest == 0 || honest >= u64::from(r.min_contributors) {
            return Err(bad(
                &field("assumed_honest_devices"),
                format!(
                    "{honest}: must be at least 1 and below min_contributors ({}), since a \
                     released sum is only guaranteed to hold min_contributors devices, the user's \
                     own among them",
                    r.min_contributors
                ),
            ));
        }
        let mechanism = DistributedDiscreteGaussian::new(
            task.clip_norm,
            1.0 / r.fixed_point_scale,
            dimension,
            r.rounding_beta,
            r.device_noise_variance,
            honest,
        )
        .map_err(|e| match &e {
            PrivacyError::InvalidParameter { name, .. } => bad(
                &match *name {
                    "clip_norm" => "clip_norm".to_string(),
                    "beta" => field("rounding_beta"),
                    "device_variance" => field("device_noise_variance"),
                    "granularity" => field("fixed_point_scale"),
                    other => field(other),
                },
                e.to_string(),
            ),
            _ => bad(ROUND, e.to_string()),
        })?;
        // The honest devices' shares must carry the σ the task states: m·s²·γ² ≥ (σC)².
        let sigma = task.noise_multiplier;
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(bad(
                "noise_multiplier",
                format!("{sigma}: must be a finite number > 0 in distributed mode"),
            ));
        }
        let promised = (sigma * task.clip_norm).powi(2);
        let carried = honest as f64 * mechanism.device_noise_std().powi(2);
        if carried < promised * (1.0 - 1e-9) {
            return Err(bad(
                &field("device_noise_variance"),
                format!(
                    "{}: {honest} honest devices' shares add up to a noise variance of {carried:.4e}, \
                     less than the (σC)² = {promised:.4e} the task's noise multiplier promises",
                    r.device_noise_variance
                ),
            ));
        }
        let encoding = FixedPoint::new(EncodingParams {
            clip_norm: task.clip_norm,
            scale: r.fixed_point_scale,
            cohort_size: r.cohort_size as usize,
            dimension,
            device_noise_std: mechanism.device_noise_std(),
        })
        .map_err(|e| bad(&field("fixed_point_scale"), e.to_string()))?;
        let config = RoundConfig {
            context: RoundContext(context),
            cohort_size: r.cohort_size,
            threshold: r.threshold,
            graph,
            min_contributors: r.min_contributors,
            encoding,
        };
        config.validate().map_err(|e| bad(ROUND, e.to_string()))?;
        Ok(Self {
            config,
            mechanism,
            deadlines: StageDeadlines {
                advertise_keys: millis(&r.advertise_keys_deadline),
                share_keys: millis(&r.share_keys_deadline),
                masked_input: millis(&r.masked_input_deadline).or(millis(&task.upload_deadline)),
                unmasking: millis(&r.unmasking_deadline),
            },
        })
    }

    /// The noise multiplier the device's accountant records for one round of this
    /// mechanism: the largest σ′ whose Gaussian RDP α/(2σ′²) is at least the mechanism's
    /// RDP (KLS21 Prop. 14) at every order of `orders`, so the recorded spend never
    /// understates it. With τ negligible it is exactly √(m·s²)/Δ₂ (the rounded update's
    /// sensitivity Δ₂ in lattice units), a little below σ because rounding adds to the norm.
    pub fn recorded_noise_multiplier(&self, orders: &OrderGrid) -> f64 {
        let curve = self.mechanism.rdp_curve(orders);
        orders
            .orders()
            .iter()
            .zip(&curve)
            .map(|(&a, &rdp)| (a / (2.0 * rdp)).sqrt())
            .fold(f64::INFINITY, f64::min)
    }
}

fn task_ref(task: &pb::Task) -> pb::TaskRef {
    pb::TaskRef {
        run_id: task.run_id.clone(),
        round_id: task.round_id,
        task_token: task.task_token.clone(),
    }
}

/// `AdvertiseKeysRequest` for a task.
pub fn advertise_request(task: &pb::Task, keys: &AdvertiseKeys) -> pb::AdvertiseKeysRequest {
    pb::AdvertiseKeysRequest {
        task: Some(task_ref(task)),
        encryption_public_key: keys.encryption_public_key.to_vec(),
        masking_public_key: keys.masking_public_key.to_vec(),
    }
}

/// A `KeyDirectory` from the coordinator, with every key checked to be 32 bytes.
pub fn key_directory(d: &pb::KeyDirectory) -> Result<KeyDirectory, SecAggError> {
    let neighbours = d
        .neighbours
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Ok(ParticipantKeys {
                participant_index: n.participant_index,
                encryption_public_key: public_key_from_slice(
                    &format!("key_directory.neighbours[{i}].encryption_public_key"),
                    &n.encryption_public_key,
                )?,
                masking_public_key: public_key_from_slice(
                    &format!("key_directory.neighbours[{i}].masking_public_key"),
                    &n.masking_public_key,
                )?,
            })
        })
        .collect::<Result<_, SecAggError>>()?;
    Ok(KeyDirectory {
        own_index: d.own_index,
        neighbours,
        threshold: d.threshold,
    })
}

fn encrypted_to_pb(s: &EncryptedShare) -> pb::EncryptedShare {
    pb::EncryptedShare {
        sender_index: s.sender_index,
        recipient_index: s.recipient_index,
        ciphertext: s.ciphertext.clone(),
    }
}

/// `ShareKeysRequest` for a task.
pub fn share_keys_request(task: &pb::Task, shares: &ShareKeys) -> pb::ShareKeysRequest {
    pb::ShareKeysRequest {
        task: Some(task_ref(task)),
        shares: shares.shares.iter().map(encrypted_to_pb).collect(),
    }
}

/// A `ShareInbox` from the coordinator.
pub fn share_inbox(inbox: &pb::ShareInbox) -> ShareInbox {
    ShareInbox {
        shares: inbox
            .shares
            .iter()
            .map(|s| EncryptedShare {
                sender_index: s.sender_index,
                recipient_index: s.recipient_index,
                ciphertext: s.ciphertext.clone(),
            })
            .collect(),
    }
}

/// An `UnmaskingPlan` from the coordinator.
pub fn unmasking_plan(plan: &pb::UnmaskingPlan) -> UnmaskingPlan {
    UnmaskingPlan {
        survivor_indices: plan.survivor_indices.clone(),
        dropped_indices: plan.dropped_indices.clone(),
    }
}

/// `UnmaskRequest` for a task.
pub fn unmask_request(task: &pb::Task, unmask: &Unmask) -> pb::UnmaskRequest {
    pb::UnmaskRequest {
        task: Some(task_ref(task)),
        shares: unmask
            .shares
            .iter()
            .map(|s| pb::RevealedShare {
                owner_index: s.owner_index,
                kind: match s.kind {
                    ShareKind::SelfMaskSeed => pb::ShareKind::SelfMaskSeed,
                    ShareKind::MaskingKey => pb::ShareKind::MaskingKey,
                } as i32,
                share: s.share.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpref_proto::prost_types::Timestamp;

    /// A valid round for 20 devices, 4 coordinates, C = 1, σ = 1.
    pub(crate) fn task() -> pb::Task {
        let scale = 1024.0;
        let honest = 9u32;
        let variance = ((scale * 1.0f64).powi(2) / f64::from(honest)).ceil() as u64;
        pb::Task {
            run_id: "run".into(),
            round_id: 3,
            task_token: "token".into(),
            privacy_mode: pb::PrivacyMode::Distributed as i32,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            secure_aggregation_round: Some(pb::SecureAggregationRound {
                round_context: vec![7; 32],
                cohort_size: 20,
                threshold: 3,
                neighbour_count: 4,
                graph_seed: vec![1; 32],
                min_contributors: 10,
                fixed_point_scale: scale,
                dimension: 4,
                device_noise_variance: variance,
                rounding_beta: (-0.5f64).exp(),
                assumed_honest_devices: honest,
                advertise_keys_deadline: Some(Timestamp {
                    seconds: 100,
                    nanos: 0,
                }),
                share_keys_deadline: None,
                masked_input_deadline: None,
                unmasking_deadline: None,
            }),
            ..pb::Task::default()
        }
    }

    fn refused(mutate: impl Fn(&mut pb::Task)) -> TaskParameterError {
        let mut t = task();
        mutate(&mut t);
        DistributedRound::from_task(&t, 4).expect_err("accepted")
    }

    fn round(t: &mut pb::Task) -> &mut pb::SecureAggregationRound {
        t.secure_aggregation_round.as_mut().unwrap()
    }

    #[test]
    fn a_valid_round_is_accepted_with_its_deadlines() {
        let r = DistributedRound::from_task(&task(), 4).unwrap();
        assert_eq!(r.config.threshold, 3);
        assert_eq!(r.mechanism.honest_devices(), 9);
        assert_eq!(r.deadlines.advertise_keys, Some(100_000));
        assert_eq!(r.deadlines.share_keys, None);
    }

    type Mutation = dyn Fn(&mut pb::Task);

    /// A scale at which 20 devices' signal alone passes 2³¹ (with the noise scaled to match).
    fn overflowing(t: &mut pb::Task) {
        let scale = 2f64.powi(27);
        round(t).fixed_point_scale = scale;
        round(t).device_noise_variance = (scale * scale / 9.0).ceil() as u64;
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        let cases: Vec<(Box<Mutation>, &str)> = vec![
            (
                Box::new(|t| t.secure_aggregation_round = None),
                "secure_aggregation_round",
            ),
            (
                Box::new(|t| round(t).round_context = vec![1; 31]),
                "secure_aggregation_round.round_context",
            ),
            (
                Box::new(|t| round(t).graph_seed = vec![]),
                "secure_aggregation_round.graph_seed",
            ),
            (
                Box::new(|t| round(t).dimension = 5),
                "secure_aggregation_round.dimension",
            ),
            (
                Box::new(|t| round(t).assumed_honest_devices = 10),
                "secure_aggregation_round.assumed_honest_devices",
            ),
            (
                Box::new(|t| round(t).device_noise_variance = 1000),
                "secure_aggregation_round.device_noise_variance",
            ),
            (
                Box::new(|t| round(t).rounding_beta = 1.5),
                "secure_aggregation_round.rounding_beta",
            ),
            (
                Box::new(overflowing),
                "secure_aggregation_round.fixed_point_scale",
            ),
            (
                Box::new(|t| round(t).threshold = 2),
                "secure_aggregation_round",
            ),
            (Box::new(|t| t.noise_multiplier = 0.0), "noise_multiplier"),
            (
                Box::new(|t| t.privacy_mode = pb::PrivacyMode::Local as i32),
                "privacy_mode",
            ),
        ];
        for (mutate, field) in cases {
            let e = refused(mutate);
            assert_eq!(e.field, field, "{e}");
        }
        // The overflow check names the numbers.
        let e = refused(overflowing);
        assert!(e.message.contains("2^31"), "{e}");
        // A threshold at most half the degree is refused by the config check.
        let e = refused(|t| round(t).threshold = 2);
        assert!(e.message.contains("threshold"), "{e}");
    }

    #[test]
    fn the_recorded_noise_multiplier_never_understates_the_spend() {
        let r = DistributedRound::from_task(&task(), 4).unwrap();
        let orders = OrderGrid::default();
        let sigma = r.recorded_noise_multiplier(&orders);
        assert!(sigma > 0.9 && sigma <= 1.0 + 1e-9, "{sigma}");
        for (&a, rdp) in orders.orders().iter().zip(r.mechanism.rdp_curve(&orders)) {
            assert!(a / (2.0 * sigma * sigma) >= rdp * (1.0 - 1e-12));
        }
    }
}
