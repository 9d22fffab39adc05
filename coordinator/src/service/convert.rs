//! Conversions between the coordinator's types and `fedpref.v1` messages.
//!
//! `CreateRun` takes the protocol's `RunManifest`. It is mapped onto the TOML manifest
//! ([`crate::manifest::RunManifest`]) and validated by the same code as
//! `run create --manifest`, so errors name the manifest's TOML key (`sampling.rate`). Fields
//! of the protocol manifest that this coordinator does not implement yet (participation
//! limits, adaptive clipping, local-training settings, secure aggregation, DP-FTRL) are refused with `INVALID_ARGUMENT` naming the field,
//! rather than silently dropped.

use fedpref_privacy::pld::Accountant;
use fedpref_proto::v1 as pb;
use tonic::Status;

use super::{duration, invalid, timestamp, unhex};
use crate::aggregation::ServerOptimizer;
use crate::ledger::{AudienceEpsilon, LedgerEntry, LedgerEvent, SealedEntry, VerifiedTotals};
use crate::manifest::{
    AlertAction, BudgetSpec, GuardrailMetric, GuardrailMetricKind, HarmScenario, Kpi,
    ManifestPrivacyMode, ModelSpec, OptOutPolicy, RunManifest, SamplingSpec, ThresholdDirection,
};

/// The protocol's name for a guardrail metric.
pub fn guardrail_kind_to_proto(k: GuardrailMetricKind) -> pb::GuardrailMetricKind {
    match k {
        GuardrailMetricKind::IntraListDiversity => pb::GuardrailMetricKind::IntraListDiversity,
        GuardrailMetricKind::TopicCoverage => pb::GuardrailMetricKind::TopicCoverage,
        GuardrailMetricKind::NegativeFeedbackRate => pb::GuardrailMetricKind::NegativeFeedbackRate,
        GuardrailMetricKind::OptOutRate => pb::GuardrailMetricKind::OptOutRate,
        GuardrailMetricKind::CohortAccuracyGap => pb::GuardrailMetricKind::CohortAccuracyGap,
        GuardrailMetricKind::InjectedShare => pb::GuardrailMetricKind::InjectedShare,
    }
}

fn guardrail_kind_from_proto(k: pb::GuardrailMetricKind) -> Option<GuardrailMetricKind> {
    Some(match k {
        pb::GuardrailMetricKind::Unspecified => return None,
        pb::GuardrailMetricKind::IntraListDiversity => GuardrailMetricKind::IntraListDiversity,
        pb::GuardrailMetricKind::TopicCoverage => GuardrailMetricKind::TopicCoverage,
        pb::GuardrailMetricKind::NegativeFeedbackRate => GuardrailMetricKind::NegativeFeedbackRate,
        pb::GuardrailMetricKind::OptOutRate => GuardrailMetricKind::OptOutRate,
        pb::GuardrailMetricKind::CohortAccuracyGap => GuardrailMetricKind::CohortAccuracyGap,
        pb::GuardrailMetricKind::InjectedShare => GuardrailMetricKind::InjectedShare,
    })
}
use crate::engine::RejectKind;
use crate::model::{GLOBAL_OFFSET, ITEM_BIAS, ITEM_FACTORS};
use crate::store::{RunRecord, RunStatus};

/// The file name manifest errors carry.
pub const MANIFEST_SOURCE: &str = "CreateRunRequest.manifest";

fn unsupported(field: &str) -> Status {
    invalid(
        &format!("manifest.{field}"),
        "not supported by this coordinator yet; leave it unset",
    )
}

fn whole_seconds(field: &str, d: Option<&prost_types::Duration>) -> Result<u64, Status> {
    let d = d.ok_or_else(|| invalid(field, "must be set"))?;
    if d.nanos != 0 || d.seconds <= 0 {
        return Err(invalid(
            field,
            "must be a whole number of seconds, at least 1",
        ));
    }
    Ok(d.seconds as u64)
}

/// The largest protocol manifest accepted, encoded, in bytes: a manifest is kilobytes of
/// text, and the bound keeps megabyte strings out of the store and the ledger.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// A protocol manifest as a validated TOML manifest (σ calibrated from a target ε).
pub fn manifest_from_proto(m: &pb::RunManifest) -> Result<RunManifest, Status> {
    let size = prost::Message::encoded_len(m);
    if size > MAX_MANIFEST_BYTES {
        return Err(invalid(
            MANIFEST_SOURCE,
            format!("{size} bytes encoded; at most {MAX_MANIFEST_BYTES}"),
        ));
    }
    let participation = match &m.participation_limits {
        None => None,
        Some(p) => Some(
            // 0 means "no limit" in the protocol: separation 1 (consecutive rounds allowed),
            // and at most every round of the run.
            fedpref_privacy::tree::ParticipationLimits::new(
                p.min_separation_rounds.max(1),
                if p.max_participations == 0 {
                    m.rounds.max(1)
                } else {
                    p.max_participations
                },
            )
            .map_err(|e| invalid("manifest.participation_limits", e))?,
        ),
    };
    let adaptive_clipping =
        m.adaptive_clipping
            .as_ref()
            .map(|a| crate::manifest::AdaptiveClippingSpec {
                target_quantile: a.target_quantile,
                learning_rate: a.learning_rate,
                // A count of bits has sensitivity 1, so its noise multiplier is its noise
                // standard deviation σ_b; 0 takes the default.
                bit_noise_std: (a.count_noise_multiplier != 0.0)
                    .then_some(a.count_noise_multiplier),
                // The admin API's manifest carries no bounds: the defaults apply.
                min_clip_norm: None,
                max_clip_norm: None,
            });
    if m.local_training.is_some() {
        return Err(unsupported("local_training"));
    }
    let secure_aggregation = m
        .secure_aggregation
        .as_ref()
        .map(secure_aggregation_from_proto)
        .transpose()?;
    let kpis = m
        .kpis
        .iter()
        .map(|k| Kpi {
            metric: k.metric.clone(),
            description: k.description.clone(),
            target: k.target,
            higher_is_better: k.higher_is_better,
        })
        .collect();
    let mut guardrail_metrics = vec![];
    for (i, g) in m.guardrail_metrics.iter().enumerate() {
        let field = |f: &str| format!("manifest.guardrail_metrics[{i}].{f}");
        let metric = pb::GuardrailMetricKind::try_from(g.metric)
            .ok()
            .and_then(guardrail_kind_from_proto)
            .ok_or_else(|| {
                invalid(
                    &field("metric"),
                    "must be a GUARDRAIL_METRIC_KIND_ value other than UNSPECIFIED",
                )
            })?;
        let direction = match pb::ThresholdDirection::try_from(g.direction) {
            Ok(pb::ThresholdDirection::Above) => ThresholdDirection::Above,
            Ok(pb::ThresholdDirection::Below) => ThresholdDirection::Below,
            _ => {
                return Err(invalid(
                    &field("direction"),
                    "must be THRESHOLD_DIRECTION_ABOVE or THRESHOLD_DIRECTION_BELOW",
                ));
            }
        };
        let on_alert = match pb::AlertAction::try_from(g.on_alert) {
            Ok(pb::AlertAction::Log) => AlertAction::Log,
            Ok(pb::AlertAction::Pause) => AlertAction::Pause,
            _ => {
                return Err(invalid(
                    &field("on_alert"),
                    "must be ALERT_ACTION_LOG or ALERT_ACTION_PAUSE",
                ));
            }
        };
        guardrail_metrics.push(GuardrailMetric {
            metric,
            direction,
            threshold: g.threshold,
            on_alert,
            minimum_reporting_devices: g.minimum_reporting_devices,
        });
    }
    let privacy_mode = match pb::PrivacyMode::try_from(m.privacy_mode) {
        Ok(pb::PrivacyMode::Local) => ManifestPrivacyMode::Local,
        Ok(pb::PrivacyMode::Central) => ManifestPrivacyMode::Central,
        Ok(pb::PrivacyMode::Distributed) => ManifestPrivacyMode::Distributed,
        Ok(pb::PrivacyMode::None) => ManifestPrivacyMode::None,
        _ => {
            return Err(invalid(
                "manifest.privacy_mode",
                "must be PRIVACY_MODE_LOCAL or PRIVACY_MODE_CENTRAL",
            ));
        }
    };
    // UNSPECIFIED stays absent, as in a TOML manifest without the key: the default (PLD).
    let accountant = match pb::Accountant::try_from(m.accountant) {
        Ok(pb::Accountant::Unspecified) => None,
        Ok(pb::Accountant::Pld) => Some(Accountant::Pld),
        Ok(pb::Accountant::Rdp) => Some(Accountant::Rdp),
        Err(_) => {
            return Err(invalid(
                "manifest.accountant",
                format!(
                    "{} is not an Accountant: use ACCOUNTANT_PLD, ACCOUNTANT_RDP or leave it unset for PLD",
                    m.accountant
                ),
            ));
        }
    };
    let budget = m
        .budget
        .as_ref()
        .ok_or_else(|| invalid("manifest.budget", "must be set"))?;
    let sampling = match m.sampling.as_ref().and_then(|s| s.method.as_ref()) {
        Some(pb::sampling::Method::Poisson(p)) => SamplingSpec::Poisson {
            rate: p.sampling_rate,
            population: p.population_size,
            round_seconds: whole_seconds(
                "manifest.sampling.poisson.round_duration",
                p.round_duration.as_ref(),
            )?,
            minimum_size: 1,
        },
        Some(pb::sampling::Method::Cohort(c)) => SamplingSpec::Cohort {
            target_size: c.target_cohort_size,
            minimum_size: c.minimum_cohort_size,
            round_seconds: whole_seconds(
                "manifest.sampling.cohort.round_deadline",
                c.round_deadline.as_ref(),
            )?,
        },
        None => return Err(invalid("manifest.sampling", "one method must be set")),
    };
    use pb::server_optimizer::Optimizer as O;
    let server_optimizer = match m
        .server_optimizer
        .as_ref()
        .and_then(|o| o.optimizer.as_ref())
    {
        Some(O::Fedavg(o)) => ServerOptimizer::Fedavg {
            server_learning_rate: o.server_learning_rate,
        },
        Some(O::Fedavgm(o)) => ServerOptimizer::Fedavgm {
            server_learning_rate: o.server_learning_rate,
            momentum: o.momentum,
        },
        Some(O::Fedadam(o)) => ServerOptimizer::Fedadam {
            server_learning_rate: o.server_learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        },
        Some(O::Fedyogi(o)) => ServerOptimizer::Fedyogi {
            server_learning_rate: o.server_learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            tau: o.tau,
        },
        Some(O::Fedadagrad(o)) => ServerOptimizer::Fedadagrad {
            server_learning_rate: o.server_learning_rate,
            beta1: o.beta1,
            tau: o.tau,
        },
        Some(O::Median(_)) => ServerOptimizer::Median {
            server_learning_rate: 1.0,
        },
        Some(O::TrimmedMean(t)) => ServerOptimizer::TrimmedMean {
            server_learning_rate: 1.0,
            trim_fraction: t.trim_fraction,
        },
        Some(O::DpFtrl(o)) => ServerOptimizer::DpFtrl {
            server_learning_rate: o.server_learning_rate,
            momentum: o.momentum,
            restart_every: (o.restart_every_rounds > 0).then_some(o.restart_every_rounds),
            completion: o.tree_completion,
        },
        None => {
            return Err(invalid(
                "manifest.server_optimizer",
                "one optimiser must be set",
            ));
        }
    };
    let (model, seed) = match m.model.as_ref().and_then(|s| s.model.as_ref()) {
        Some(pb::model_spec::Model::MatrixFactorization(mf)) => {
            if !mf.item_biases || !mf.global_offset {
                return Err(invalid(
                    "manifest.model.matrix_factorization",
                    "item_biases and global_offset must both be true: the coordinator's model always has them",
                ));
            }
            (
                ModelSpec {
                    items: mf.item_count,
                    factors: u64::from(mf.factor_dimension),
                    init_scale: mf.init_stddev,
                    initial_offset: 3.0,
                },
                mf.init_seed,
            )
        }
        None => return Err(invalid("manifest.model", "must be set")),
    };
    let opt_out = m
        .opt_out_policy
        .as_ref()
        .ok_or_else(|| invalid("manifest.opt_out_policy", "must be set"))?;
    let consent_model = match pb::ConsentModel::try_from(opt_out.consent_model) {
        Ok(pb::ConsentModel::OptIn) => "opt-in",
        Ok(pb::ConsentModel::OptOut) => "opt-out",
        _ => {
            return Err(invalid(
                "manifest.opt_out_policy.consent_model",
                "must be CONSENT_MODEL_OPT_IN or CONSENT_MODEL_OPT_OUT",
            ));
        }
    };
    let mut harm_scenarios = vec![];
    for h in &m.harm_scenarios {
        harm_scenarios.push(HarmScenario {
            scenario: h.scenario.clone(),
            affected_groups: h.affected_groups.clone(),
            mitigation: h.mitigation.clone(),
            residual_risk: h.residual_risk.clone(),
        });
    }
    let elements = |v: &[pb::DataElement], field: &str| -> Result<Vec<String>, Status> {
        v.iter()
            .enumerate()
            .map(|(i, e)| {
                if !e.rationale.is_empty() {
                    Err(unsupported(&format!("{field}[{i}].rationale")))
                } else {
                    Ok(e.element.clone())
                }
            })
            .collect()
    };
    let manifest = RunManifest {
        title: m.title.clone(),
        purpose: m.purpose.clone(),
        owner: m.owner.clone(),
        data_elements_used: elements(&m.data_elements_used, "data_elements_used")?,
        data_elements_not_used: elements(&m.data_elements_not_used, "data_elements_not_used")?,
        privacy_mode,
        budget: BudgetSpec {
            epsilon: budget.epsilon,
            delta: budget.delta,
            audience: None,
        },
        clip_norm: m.clip_norm,
        noise_multiplier: m.target_epsilon.is_none().then_some(m.noise_multiplier),
        target_epsilon: m.target_epsilon,
        accountant,
        rounds: m.rounds,
        sampling,
        server_optimizer,
        model,
        opt_out_policy: OptOutPolicy {
            consent_model: consent_model.to_string(),
            description: opt_out.description.clone(),
            withdrawal_effect: opt_out.withdrawal_effect.clone(),
        },
        harm_scenarios,
        kpis,
        guardrail_metrics,
        seed,
        participation,
        adaptive_clipping,
        secure_aggregation,
    };
    // The same validation (and σ calibration) as a manifest file.
    let manifest = RunManifest::from_toml(&manifest.to_toml(), MANIFEST_SOURCE)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // A neighbour count is derived; one that repeats the derived value (as `GetRun` reports
    // it) is accepted, any other refused.
    if let (Some(c), Some(plan)) = (&m.secure_aggregation, manifest.distributed_plan()) {
        let derived = if plan.params.complete {
            0
        } else {
            plan.params.degree
        };
        if c.neighbour_count != 0 && c.neighbour_count != derived {
            return Err(invalid(
                "manifest.secure_aggregation.neighbour_count",
                format!(
                    "{}: the neighbour count is derived from dropout_rate and corruption_rate ({derived} here, 0 meaning the complete graph); give 0",
                    c.neighbour_count
                ),
            ));
        }
    }
    Ok(manifest)
}

/// A TOML manifest as the protocol's `RunManifest`.
pub fn manifest_to_proto(m: &RunManifest) -> pb::RunManifest {
    let privacy_mode = match m.privacy_mode {
        ManifestPrivacyMode::None => pb::PrivacyMode::None,
        ManifestPrivacyMode::Local => pb::PrivacyMode::Local,
        ManifestPrivacyMode::Central => pb::PrivacyMode::Central,
        ManifestPrivacyMode::Distributed => pb::PrivacyMode::Distributed,
    };
    let sampling = match &m.sampling {
        SamplingSpec::Poisson {
            rate,
            population,
            round_seconds,
            ..
        } => pb::sampling::Method::Poisson(pb::PoissonSampling {
            sampling_rate: *rate,
            population_size: *population,
            round_duration: Some(duration(*round_seconds as i64 * 1000)),
        }),
        SamplingSpec::Cohort {
            target_size,
            minimum_size,
            round_seconds,
        } => pb::sampling::Method::Cohort(pb::CohortSampling {
            target_cohort_size: *target_size,
            round_deadline: Some(duration(*round_seconds as i64 * 1000)),
            minimum_cohort_size: *minimum_size,
        }),
    };
    use pb::server_optimizer::Optimizer as O;
    let optimizer = match m.server_optimizer {
        ServerOptimizer::Fedavg {
            server_learning_rate,
        } => O::Fedavg(pb::FedAvg {
            server_learning_rate,
        }),
        ServerOptimizer::Fedavgm {
            server_learning_rate,
            momentum,
        } => O::Fedavgm(pb::FedAvgM {
            server_learning_rate,
            momentum,
        }),
        ServerOptimizer::Fedadam {
            server_learning_rate,
            beta1,
            beta2,
            tau,
        } => O::Fedadam(pb::FedAdaptive {
            server_learning_rate,
            beta1,
            beta2,
            tau,
        }),
        ServerOptimizer::Fedyogi {
            server_learning_rate,
            beta1,
            beta2,
            tau,
        } => O::Fedyogi(pb::FedAdaptive {
            server_learning_rate,
            beta1,
            beta2,
            tau,
        }),
        ServerOptimizer::Fedadagrad {
            server_learning_rate,
            beta1,
            tau,
        } => O::Fedadagrad(pb::FedAdaptive {
            server_learning_rate,
            beta1,
            beta2: 0.0,
            tau,
        }),
        ServerOptimizer::Median { .. } => O::Median(pb::CoordinateMedian {}),
        ServerOptimizer::TrimmedMean { trim_fraction, .. } => {
            O::TrimmedMean(pb::TrimmedMean { trim_fraction })
        }
        ServerOptimizer::DpFtrl {
            server_learning_rate,
            momentum,
            restart_every,
            completion,
        } => O::DpFtrl(pb::DpFtrl {
            server_learning_rate,
            momentum,
            restart_every_rounds: restart_every.unwrap_or(0),
            tree_completion: completion,
        }),
    };
    let elements = |v: &[String]| {
        v.iter()
            .map(|e| pb::DataElement {
                element: e.clone(),
                rationale: String::new(),
            })
            .collect()
    };
    pb::RunManifest {
        title: m.title.clone(),
        purpose: m.purpose.clone(),
        owner: m.owner.clone(),
        data_elements_used: elements(&m.data_elements_used),
        data_elements_not_used: elements(&m.data_elements_not_used),
        privacy_mode: privacy_mode as i32,
        budget: Some(pb::PrivacyBudget {
            epsilon: m.budget.epsilon,
            delta: m.budget.delta,
        }),
        clip_norm: m.clip_norm,
        noise_multiplier: m.noise_multiplier.unwrap_or(0.0),
        target_epsilon: m.target_epsilon,
        sampling: Some(pb::Sampling {
            method: Some(sampling),
        }),
        rounds: m.rounds,
        server_optimizer: Some(pb::ServerOptimizer {
            optimizer: Some(optimizer),
        }),
        model: Some(pb::ModelSpec {
            model: Some(pb::model_spec::Model::MatrixFactorization(
                pb::MatrixFactorizationSpec {
                    item_count: m.model.items,
                    factor_dimension: m.model.factors as u32,
                    item_biases: true,
                    global_offset: true,
                    init_stddev: m.model.init_scale,
                    init_seed: m.seed,
                },
            )),
        }),
        opt_out_policy: Some(pb::OptOutPolicy {
            consent_model: match m.opt_out_policy.consent_model.as_str() {
                "opt-in" => pb::ConsentModel::OptIn,
                "opt-out" => pb::ConsentModel::OptOut,
                _ => pb::ConsentModel::Unspecified,
            } as i32,
            description: m.opt_out_policy.description.clone(),
            withdrawal_effect: m.opt_out_policy.withdrawal_effect.clone(),
        }),
        harm_scenarios: m
            .harm_scenarios
            .iter()
            .map(|h| pb::HarmScenario {
                scenario: h.scenario.clone(),
                affected_groups: h.affected_groups.clone(),
                mitigation: h.mitigation.clone(),
                residual_risk: h.residual_risk.clone(),
            })
            .collect(),
        kpis: m
            .kpis
            .iter()
            .map(|k| pb::Kpi {
                metric: k.metric.clone(),
                description: k.description.clone(),
                target: k.target,
                higher_is_better: k.higher_is_better,
            })
            .collect(),
        guardrail_metrics: m
            .guardrail_metrics
            .iter()
            .map(|g| pb::GuardrailMetric {
                metric: guardrail_kind_to_proto(g.metric) as i32,
                direction: match g.direction {
                    ThresholdDirection::Above => pb::ThresholdDirection::Above,
                    ThresholdDirection::Below => pb::ThresholdDirection::Below,
                } as i32,
                threshold: g.threshold,
                on_alert: match g.on_alert {
                    AlertAction::Log => pb::AlertAction::Log,
                    AlertAction::Pause => pb::AlertAction::Pause,
                } as i32,
                minimum_reporting_devices: g.minimum_reporting_devices,
            })
            .collect(),
        participation_limits: m.participation.map(|p| pb::ParticipationLimits {
            min_separation_rounds: p.min_separation(),
            max_participations: p.max_participations(),
        }),
        adaptive_clipping: m.adaptive_clipping.map(|a| pb::AdaptiveClipping {
            target_quantile: a.target_quantile,
            learning_rate: a.learning_rate,
            count_noise_multiplier: m.bit_noise_std().unwrap_or(0.0),
        }),
        secure_aggregation: secure_aggregation_to_proto(m),
        accountant: m
            .accountant
            .map_or(pb::Accountant::Unspecified, accountant_to_proto) as i32,
        ..Default::default()
    }
}

/// The accountant as the protocol names it.
pub fn accountant_to_proto(a: Accountant) -> pb::Accountant {
    match a {
        Accountant::Pld => pb::Accountant::Pld,
        Accountant::Rdp => pb::Accountant::Rdp,
    }
}

/// The manifest section of a distributed run as the protocol's `SecureAggregationConfig`,
/// with the derived threshold, neighbour count, scale and honest devices filled in (also
/// what a DISTRIBUTED task carries).
pub fn secure_aggregation_to_proto(m: &RunManifest) -> Option<pb::SecureAggregationConfig> {
    let spec = m.secure_aggregation?;
    let plan = m.distributed_plan()?;
    let secs = |s: u64| Some(duration(s as i64 * 1000));
    Some(pb::SecureAggregationConfig {
        threshold: plan.params.threshold,
        neighbour_count: if plan.params.complete {
            0
        } else {
            plan.params.degree
        },
        modulus_bits: fedpref_secagg::encoding::MODULUS_BITS,
        fixed_point_scale: plan.encoding.scale,
        noise: match spec.noise {
            crate::distributed::DistributedNoiseKind::DiscreteGaussian => {
                pb::DistributedNoise::DiscreteGaussian
            }
            crate::distributed::DistributedNoiseKind::Skellam => pb::DistributedNoise::Skellam,
        } as i32,
        assumed_honest_devices: u32::try_from(plan.mechanism.honest_devices()).unwrap_or(u32::MAX),
        dropout_rate: spec.dropout_rate,
        corruption_rate: spec.corruption_rate,
        rounding_beta: Some(plan.rounding_beta),
        advertise_keys_duration: secs(spec.advertise_keys_seconds),
        share_keys_duration: secs(spec.share_keys_seconds),
        masked_input_duration: secs(spec.masked_input_seconds),
        unmasking_duration: secs(spec.unmasking_seconds),
    })
}

/// A protocol `SecureAggregationConfig` as the manifest's section. 0 (or unset) takes the
/// default for `threshold`, `fixed_point_scale`, `assumed_honest_devices` and the
/// durations; `rounding_beta` takes the default only when unset (0 is β = 0); `neighbour_count` is derived (checked by the caller: 0 or the derived
/// value), `modulus_bits` must be 0 or 32.
fn secure_aggregation_from_proto(
    c: &pb::SecureAggregationConfig,
) -> Result<crate::distributed::SecureAggregationSpec, Status> {
    use crate::distributed::DistributedNoiseKind;
    const F: &str = "manifest.secure_aggregation";
    if c.modulus_bits != 0 && c.modulus_bits != fedpref_secagg::encoding::MODULUS_BITS {
        return Err(invalid(
            &format!("{F}.modulus_bits"),
            format!("{}: only 32 (DTYPE_U32) is supported", c.modulus_bits),
        ));
    }
    let noise = match pb::DistributedNoise::try_from(c.noise) {
        Ok(pb::DistributedNoise::DiscreteGaussian) => DistributedNoiseKind::DiscreteGaussian,
        Ok(pb::DistributedNoise::Skellam) => DistributedNoiseKind::Skellam,
        _ => {
            return Err(invalid(
                &format!("{F}.noise"),
                "must be DISTRIBUTED_NOISE_DISCRETE_GAUSSIAN",
            ));
        }
    };
    let seconds = |field: &str, d: Option<&prost_types::Duration>, default: u64| match d {
        None => Ok(default),
        Some(_) => whole_seconds(&format!("{F}.{field}"), d),
    };
    Ok(crate::distributed::SecureAggregationSpec {
        noise,
        dropout_rate: c.dropout_rate,
        corruption_rate: c.corruption_rate,
        threshold: (c.threshold != 0).then_some(c.threshold),
        scale: (c.fixed_point_scale != 0.0).then_some(c.fixed_point_scale),
        rounding_beta: c.rounding_beta,
        assumed_honest_devices: (c.assumed_honest_devices != 0)
            .then_some(u64::from(c.assumed_honest_devices)),
        advertise_keys_seconds: seconds(
            "advertise_keys_duration",
            c.advertise_keys_duration.as_ref(),
            60,
        )?,
        share_keys_seconds: seconds("share_keys_duration", c.share_keys_duration.as_ref(), 60)?,
        masked_input_seconds: seconds(
            "masked_input_duration",
            c.masked_input_duration.as_ref(),
            600,
        )?,
        unmasking_seconds: seconds("unmasking_duration", c.unmasking_duration.as_ref(), 60)?,
    })
}

/// The protocol's audience for one of the privacy crate's audience names, with the
/// assumption its ε rests on.
pub fn audience_epsilon(a: &AudienceEpsilon, manifest: &RunManifest) -> pb::AudienceEpsilon {
    let worst = || pb::EpsilonAssumption {
        assumption: Some(pb::epsilon_assumption::Assumption::WorstCase(
            pb::WorstCaseAssumption {},
        )),
    };
    let (audience, assumption) = match a.audience.as_str() {
        "observers_unaware_of_participation" => (
            pb::Audience::ReleasedModels,
            match &manifest.sampling {
                SamplingSpec::Poisson {
                    rate, population, ..
                } => pb::EpsilonAssumption {
                    assumption: Some(pb::epsilon_assumption::Assumption::PoissonSampling(
                        pb::PoissonSamplingAssumption {
                            population_size: *population,
                            sampling_rate: *rate,
                        },
                    )),
                },
                SamplingSpec::Cohort { .. } => worst(),
            },
        ),
        // dp-ftrl: no sampling is assumed, the tree's ε rests on the participation limits.
        "release_observers" if manifest.server_optimizer.is_tree() => (
            pb::Audience::ReleasedModelsKnownParticipants,
            match manifest.participation {
                Some(p) => pb::EpsilonAssumption {
                    assumption: Some(pb::epsilon_assumption::Assumption::ParticipationLimits(
                        pb::ParticipationLimits {
                            min_separation_rounds: p.min_separation(),
                            max_participations: p.max_participations(),
                        },
                    )),
                },
                None => worst(),
            },
        ),
        "release_observers" => (pb::Audience::ReleasedModelsKnownParticipants, worst()),
        // "anyone": holds against whoever sees an upload, the coordinator included.
        _ => (pb::Audience::Coordinator, worst()),
    };
    pb::AudienceEpsilon {
        audience: audience as i32,
        epsilon: a.epsilon,
        assumption: Some(assumption),
        // Statements written before runs named their accountant are RDP's.
        accountant: accountant_to_proto(a.accountant.unwrap_or(Accountant::Rdp)) as i32,
    }
}

/// Decoded ledger entries (the stored canonical JSON).
pub fn decode_entries(entries: &[SealedEntry]) -> Result<Vec<LedgerEntry>, Status> {
    entries
        .iter()
        .map(|e| {
            serde_json::from_str(&e.body).map_err(|err| {
                tracing::error!(sequence = e.sequence, error = %err, "unreadable ledger entry");
                Status::internal("a ledger entry is unreadable; run VerifyLedger")
            })
        })
        .collect()
}

/// How a stopped run ended, from its last `run_stopped` entry.
fn stop_status(reason: &str) -> pb::RunStatus {
    if reason == "completed" {
        pb::RunStatus::Completed
    } else if reason.starts_with("budget exhausted") {
        pb::RunStatus::BudgetExhausted
    } else {
        pb::RunStatus::Stopped
    }
}

/// A run as the admin service shows it.
pub fn run_to_proto(
    record: &RunRecord,
    entries: &[LedgerEntry],
    sealed: &[SealedEntry],
    totals: Option<&VerifiedTotals>,
    open_round: Option<u64>,
) -> pb::Run {
    let mut status_reason = String::new();
    let mut stopped_as = pb::RunStatus::Stopped;
    let mut abandoned = 0;
    for e in entries {
        match &e.event {
            LedgerEvent::Paused { reason } => status_reason = reason.clone(),
            LedgerEvent::Resumed { .. } => status_reason.clear(),
            LedgerEvent::RunStopped { reason, .. } => {
                status_reason = reason.clone();
                stopped_as = stop_status(reason);
            }
            LedgerEvent::RoundAbandoned { .. } => abandoned += 1,
            _ => {}
        }
    }
    let status = match record.status {
        RunStatus::Active => pb::RunStatus::Active,
        RunStatus::Paused => pb::RunStatus::Paused,
        RunStatus::Stopped => stopped_as,
    };
    let epsilon_spent = entries
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            LedgerEvent::RoundCommitted {
                cumulative_epsilon, ..
            }
            | LedgerEvent::RoundReleased {
                cumulative_epsilon, ..
            }
            | LedgerEvent::RoundCharged {
                cumulative_epsilon, ..
            }
            | LedgerEvent::RunStopped {
                cumulative_epsilon, ..
            } => Some(cumulative_epsilon.clone()),
            _ => None,
        })
        .or_else(|| totals.map(|t| t.cumulative_epsilon.clone()))
        .unwrap_or_default();
    pb::Run {
        run_id: record.id.clone(),
        manifest: Some(manifest_to_proto(&record.manifest)),
        manifest_sha256: unhex(&record.manifest_sha256),
        status: status as i32,
        status_reason,
        created_at: entries.first().map(|e| timestamp(e.at_ms)),
        updated_at: entries.last().map(|e| timestamp(e.at_ms)),
        current_round: open_round.unwrap_or(record.next_round.saturating_sub(1)),
        rounds_committed: record.rounds_committed,
        rounds_abandoned: abandoned,
        latest_model_version: record.published_version,
        epsilon_spent: epsilon_spent
            .iter()
            .map(|a| audience_epsilon(a, &record.manifest))
            .collect(),
        // Adaptive clipping: the C the last committed round chose for the next.
        current_clip_norm: entries
            .iter()
            .rev()
            .find_map(|e| match &e.event {
                LedgerEvent::RoundCommitted { next_clip_norm, .. } => *next_clip_norm,
                _ => None,
            })
            .unwrap_or(record.manifest.clip_norm),
        ledger_head_sha256: sealed.last().map(|e| unhex(&e.hash)).unwrap_or_default(),
    }
}

/// One ledger entry as the protocol's `LedgerEntry`.
pub fn ledger_entry_to_proto(
    entry: &LedgerEntry,
    sealed: &SealedEntry,
    manifest: &RunManifest,
) -> pb::LedgerEntry {
    use pb::LedgerEntryKind as K;
    let mode = |s: &str| match s {
        "local" => pb::PrivacyMode::Local,
        "central" => pb::PrivacyMode::Central,
        "distributed" => pb::PrivacyMode::Distributed,
        "none" => pb::PrivacyMode::None,
        _ => pb::PrivacyMode::Unspecified,
    } as i32;
    let spend = |eps: &[AudienceEpsilon]| -> Vec<pb::AudienceSpend> {
        eps.iter()
            .map(|a| {
                let p = audience_epsilon(a, manifest);
                pb::AudienceSpend {
                    audience: p.audience,
                    epsilon_spent: 0.0,
                    epsilon_cumulative: a.epsilon,
                    assumption: p.assumption,
                    rdp_increments: vec![],
                    accountant: p.accountant,
                }
            })
            .collect()
    };
    // Each audience's cumulative ε with this entry's RDP increments at the ledger's orders.
    let spend_with_increments =
        |eps: &[AudienceEpsilon], increments: &[crate::ledger::AudienceRdp]| {
            let orders = fedpref_privacy::OrderGrid::default();
            let mut out = spend(eps);
            for (s, inc) in out.iter_mut().zip(increments) {
                s.rdp_increments = orders
                    .orders()
                    .iter()
                    .zip(&inc.rdp)
                    .map(|(&order, &rdp_epsilon)| pb::RdpPoint { order, rdp_epsilon })
                    .collect();
            }
            out
        };
    let mut out = pb::LedgerEntry {
        sequence: entry.sequence,
        run_id: entry.run_id.clone(),
        recorded_at: Some(timestamp(entry.at_ms)),
        delta: manifest.budget.delta,
        previous_hash: unhex(&sealed.prev_hash),
        entry_hash: unhex(&sealed.hash),
        actor: "coordinator".into(),
        ..Default::default()
    };
    match &entry.event {
        LedgerEvent::RunCreated {
            manifest_sha256,
            privacy_mode,
            budget_epsilon,
            budget_delta,
            noise_multiplier,
            clip_norm,
            initial_model_sha256,
            ..
        } => {
            out.kind = K::RunCreated as i32;
            out.manifest_sha256 = unhex(manifest_sha256);
            out.privacy_mode = mode(privacy_mode);
            out.budget = Some(pb::PrivacyBudget {
                epsilon: *budget_epsilon,
                delta: *budget_delta,
            });
            out.noise_multiplier = noise_multiplier.unwrap_or(0.0);
            out.clip_norm = *clip_norm;
            out.model_sha256 = unhex(initial_model_sha256);
        }
        LedgerEvent::RoundCommitted {
            round,
            cohort_size,
            noise_multiplier,
            clip_norm,
            mode: m,
            rdp_increments,
            cumulative_epsilon,
            model_version,
            model_sha256,
            ..
        } => {
            out.kind = K::RoundSpent as i32;
            out.round_id = *round;
            out.participants = *cohort_size;
            out.noise_multiplier = *noise_multiplier;
            out.clip_norm = *clip_norm;
            out.privacy_mode = mode(m);
            out.sampling_rate = manifest.sampling.accounting_rate();
            out.expected_cohort_size = manifest.sampling.expected_cohort_size().round() as u64;
            out.model_version = *model_version;
            out.model_sha256 = unhex(model_sha256);
            out.spend = spend_with_increments(cumulative_epsilon, rdp_increments);
        }
        LedgerEvent::RoundReleased {
            round,
            contributors,
            rdp_increments,
            cumulative_epsilon,
            ..
        } => {
            out.kind = K::RoundReleased as i32;
            out.round_id = *round;
            out.participants = *contributors;
            out.noise_multiplier = manifest.noise_multiplier.unwrap_or(0.0);
            out.clip_norm = manifest.clip_norm;
            out.privacy_mode = mode("distributed");
            out.spend = spend_with_increments(cumulative_epsilon, rdp_increments);
        }
        LedgerEvent::RoundCharged {
            round,
            noise_multiplier,
            rdp_increments,
            cumulative_epsilon,
            ..
        } => {
            // A local round's spend, recorded when its first update arrived.
            out.kind = K::RoundReleased as i32;
            out.round_id = *round;
            out.noise_multiplier = *noise_multiplier;
            out.clip_norm = manifest.clip_norm;
            out.privacy_mode = mode("local");
            out.reason = "charged when the round's first update arrived".into();
            out.spend = spend_with_increments(cumulative_epsilon, rdp_increments);
        }
        LedgerEvent::RoundAbandoned {
            round,
            contributions,
            reason,
            ..
        } => {
            out.kind = K::RoundAbandoned as i32;
            out.round_id = *round;
            out.participants = *contributions;
            out.reason = reason.clone();
        }
        LedgerEvent::ModelPublished {
            model_version,
            model_sha256,
        } => {
            out.kind = K::ModelPublished as i32;
            out.model_version = *model_version;
            out.model_sha256 = unhex(model_sha256);
        }
        LedgerEvent::Paused { reason } => {
            out.kind = K::Paused as i32;
            out.reason = reason.clone();
            out.actor = if reason.starts_with(crate::coordinator::GUARDRAIL_PAUSE_PREFIX) {
                "guardrail"
            } else {
                "operator"
            }
            .into();
        }
        LedgerEvent::Resumed { reason } => {
            out.kind = K::Resumed as i32;
            out.reason = reason.clone();
            out.actor = "operator".into();
        }
        LedgerEvent::RolledBack {
            to_version,
            new_version,
            model_sha256,
            reason,
        } => {
            out.reason = reason.clone();
            out.kind = K::RolledBack as i32;
            out.restored_model_version = *to_version;
            out.model_version = *new_version;
            out.model_sha256 = unhex(model_sha256);
            out.actor = "operator".into();
        }
        LedgerEvent::GuardrailAlert {
            metric,
            value,
            threshold,
            direction,
            action_taken,
            model_version,
            reporting_devices,
            window_start_ms,
            window_end_ms,
        } => {
            out.kind = K::GuardrailAlert as i32;
            out.model_version = *model_version;
            out.actor = "guardrail".into();
            out.guardrail_alert = Some(pb::GuardrailAlert {
                metric: guardrail_kind_to_proto(*metric) as i32,
                value: *value,
                threshold: *threshold,
                direction: match direction {
                    ThresholdDirection::Above => pb::ThresholdDirection::Above,
                    ThresholdDirection::Below => pb::ThresholdDirection::Below,
                } as i32,
                action_taken: match action_taken {
                    AlertAction::Log => pb::AlertAction::Log,
                    AlertAction::Pause => pb::AlertAction::Pause,
                } as i32,
                window_start: Some(timestamp(*window_start_ms)),
                window_end: Some(timestamp(*window_end_ms)),
                reporting_devices: *reporting_devices,
            });
        }
        LedgerEvent::EvaluationReleased {
            model_version,
            noise_multiplier,
            clip_norm,
            epsilon,
            delta,
        } => {
            out.kind = K::EvaluationReleased as i32;
            out.model_version = *model_version;
            out.noise_multiplier = *noise_multiplier;
            out.clip_norm = *clip_norm;
            out.sampling_rate = 1.0;
            out.reason = format!(
                "each device's evaluation of model version {model_version}: one local release, ε = {epsilon:.4} at δ = {delta:e}"
            );
        }
        LedgerEvent::RunStopped {
            reason,
            cumulative_epsilon,
            ..
        } => {
            out.kind = match stop_status(reason) {
                pb::RunStatus::Completed => K::RunCompleted,
                pb::RunStatus::BudgetExhausted => K::BudgetStop,
                _ => {
                    out.actor = "operator".into();
                    K::RunStopped
                }
            } as i32;
            out.reason = reason.clone();
            out.spend = spend(cumulative_epsilon);
        }
    }
    out
}

use fedpref_proto::prost_types;
/// The tensors an update must contain, in order, as `fedpref.v1.MatrixFactorizationSpec`
/// names them (and the client SDK builds them): `item_factors` [items, k], `item_biases`
/// \[items\], `global_offset` \[\] (a scalar), F64. Flattened in this order they are the
/// engine's parameter layout ([`crate::model`]: factors, biases, offset).
///
/// In distributed mode the update is one tensor instead, [`MASKED_UPDATE`](fedpref_proto::tensor_names::MASKED_UPDATE): the same values
/// flattened in that order, encoded in fixed point, noised and masked, `DTYPE_U32` of shape
/// \[d\].
pub fn update_tensors(manifest: &RunManifest) -> Vec<pb::TensorSpec> {
    if manifest.privacy_mode == ManifestPrivacyMode::Distributed {
        return vec![pb::TensorSpec {
            name: fedpref_proto::tensor_names::MASKED_UPDATE.to_string(),
            shape: vec![manifest.dimension() as u64],
            dtype: pb::Dtype::U32 as i32,
        }];
    }
    let (items, k) = (manifest.model.items, manifest.model.factors);
    [
        (ITEM_FACTORS, vec![items, k]),
        (ITEM_BIAS, vec![items]),
        (GLOBAL_OFFSET, vec![]),
    ]
    .into_iter()
    .map(|(name, shape)| pb::TensorSpec {
        name: name.to_string(),
        shape,
        dtype: pb::Dtype::F64 as i32,
    })
    .collect()
}

pub(super) fn proto_mode(m: ManifestPrivacyMode) -> pb::PrivacyMode {
    match m {
        ManifestPrivacyMode::None => pb::PrivacyMode::None,
        ManifestPrivacyMode::Local => pb::PrivacyMode::Local,
        ManifestPrivacyMode::Central => pb::PrivacyMode::Central,
        ManifestPrivacyMode::Distributed => pb::PrivacyMode::Distributed,
    }
}

pub(super) fn reject_status(kind: RejectKind, message: String) -> Status {
    match kind {
        RejectKind::InvalidArgument => Status::invalid_argument(message),
        RejectKind::FailedPrecondition => Status::failed_precondition(message),
    }
}

pub(super) fn task_ref(task: Option<&pb::TaskRef>, field: &str) -> Result<pb::TaskRef, Status> {
    let t = task.ok_or_else(|| invalid(field, "must be set"))?;
    super::check_run_id(&format!("{field}.run_id"), &t.run_id)?;
    if t.round_id == 0 {
        return Err(invalid(&format!("{field}.round_id"), "must be at least 1"));
    }
    if t.task_token.is_empty() {
        return Err(invalid(&format!("{field}.task_token"), "must not be empty"));
    }
    Ok(t.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
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
"#;

    #[test]
    fn the_accountant_round_trips_and_every_epsilon_names_its_own() {
        let m = RunManifest::from_toml(MANIFEST, "t").unwrap();
        let mut p = manifest_to_proto(&m);
        assert_eq!(p.accountant, pb::Accountant::Unspecified as i32);
        assert_eq!(manifest_from_proto(&p).unwrap().accountant, None);
        for (proto, ours) in [
            (pb::Accountant::Pld, Accountant::Pld),
            (pb::Accountant::Rdp, Accountant::Rdp),
        ] {
            p.accountant = proto as i32;
            let back = manifest_from_proto(&p).unwrap();
            assert_eq!(back.accountant, Some(ours));
            assert_eq!(manifest_to_proto(&back).accountant, proto as i32);
        }
        p.accountant = -1;
        let e = manifest_from_proto(&p).unwrap_err();
        assert!(
            e.message().contains("manifest.accountant"),
            "{}",
            e.message()
        );

        let statement = |accountant| AudienceEpsilon {
            audience: "anyone".into(),
            epsilon: 1.5,
            accountant,
        };
        for (accountant, expected) in [
            (Some(Accountant::Pld), pb::Accountant::Pld),
            (Some(Accountant::Rdp), pb::Accountant::Rdp),
            // Written before statements named their accountant: RDP's.
            (None, pb::Accountant::Rdp),
        ] {
            let out = audience_epsilon(&statement(accountant), &m);
            assert_eq!(out.accountant, expected as i32);
            assert_eq!(out.epsilon, 1.5);
        }
    }

    #[test]
    fn a_manifest_with_a_title_of_megabytes_is_refused_before_it_is_stored() {
        let m = RunManifest::from_toml(MANIFEST, "t").unwrap();
        let mut p = manifest_to_proto(&m);
        assert!(manifest_from_proto(&p).is_ok());
        p.title = "x".repeat(3 << 20);
        let e = manifest_from_proto(&p).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("CreateRunRequest.manifest: 3145")
                && e.message().ends_with("bytes encoded; at most 262144"),
            "{}",
            e.message()
        );
    }
}
