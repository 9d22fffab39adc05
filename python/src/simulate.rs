//! The simulator: `fedpref-sim run` from a dictionary of its `--config` settings.
//!
//! The configuration has the keys of `fedpref-sim run --config FILE` (`rounds`,
//! `cohort_size` or `sampling_rate`, `privacy_mode`, `noise_multiplier` or
//! `target_epsilon`, `delta`, `clip_norm`, `server_optimizer`, `seed`, `factors`,
//! `local_epochs`, `learning_rate`, `eval_every`, `users`, `items`, `dataset`, `path`,
//! `transport`, …), resolved by [`fedpref_simulations::cli::plan_from_table`] with the same
//! defaults and checks, plus `centralised` (the no-privacy baseline trained in one place).
//! `out` is accepted and ignored: nothing is left on disk.
//!
//! The result is one JSON object: `summary` (the object `fedpref-sim run --json` prints),
//! `dataset` and `settings` (as in `metrics.json`), `records` (the `rounds` of
//! `metrics.json`), `rounds` (one flat object per round, the columns of `metrics.csv`,
//! with `null` for an empty cell) and `alerts` (the guardrail alerts of `alerts.json`, if
//! the run raised any).

use fedpref_engine::manifest::ManifestPrivacyMode;
use fedpref_simulations::cli::{CliError, plan_from_table, simulate};
use fedpref_simulations::data::Dataset;
use fedpref_simulations::progress::Quiet;
use fedpref_simulations::report;
use fedpref_simulations::sim::RoundRecord;
use ndarray::{Array1, Array2};
use serde_json::{Map, Value, json};

use crate::Error;

/// A JSON value as TOML; `null` has no TOML form and is refused, naming the key.
fn to_toml(value: Value, key: &str) -> Result<toml::Value, Error> {
    Ok(match value {
        Value::Null => {
            return Err(Error::Invalid(format!(
                "config key `{key}`: None has no meaning here; leave the key out for the default"
            )));
        }
        Value::Bool(b) => toml::Value::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().ok_or_else(|| {
                Error::Invalid(format!("config key `{key}`: {n} is out of range"))
            })?),
        },
        Value::String(s) => toml::Value::String(s),
        Value::Array(items) => toml::Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_toml(v, &format!("{key}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => toml::Value::Table(
            map.into_iter()
                .map(|(k, v)| {
                    let path = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    Ok((k, to_toml(v, &path)?))
                })
                .collect::<Result<_, Error>>()?,
        ),
    })
}

/// The per-round rows: the columns of `metrics.csv`, `null` for an empty cell.
pub fn rows(data: &Dataset, records: &[RoundRecord]) -> Vec<Value> {
    let audiences: Vec<String> = records
        .first()
        .map(|r| r.epsilon.iter().map(|e| e.audience.clone()).collect())
        .unwrap_or_default();
    records
        .iter()
        .map(|r| {
            let mut row = Map::new();
            row.insert("round".into(), json!(r.round));
            row.insert("contributions".into(), json!(r.contributions));
            row.insert("abandoned".into(), json!(r.abandoned.is_some()));
            let e = r.evaluation.as_ref();
            let metric = |f: &dyn Fn(&fedpref_simulations::metrics::Evaluation) -> Option<f64>| {
                json!(e.and_then(f))
            };
            row.insert("rmse".into(), metric(&|e| Some(e.rmse)));
            row.insert("mae".into(), metric(&|e| Some(e.mae)));
            row.insert(
                "rating_accuracy".into(),
                metric(&|e| Some(e.rating_accuracy)),
            );
            row.insert("hit_rate_at_10".into(), metric(&|e| e.hit_rate_at_10));
            row.insert("ndcg_at_10".into(), metric(&|e| e.ndcg_at_10));
            row.insert("coverage".into(), metric(&|e| e.coverage));
            row.insert(
                "intra_list_diversity".into(),
                metric(&|e| e.intra_list_diversity),
            );
            row.insert("injected_share".into(), metric(&|e| e.injected_share));
            for (c, name) in data.cohorts.iter().enumerate() {
                row.insert(
                    format!("rmse_{name}"),
                    metric(&|e| e.cohort_rmse.get(c).copied().flatten()),
                );
            }
            row.insert("cohort_rmse_gap".into(), metric(&|e| e.cohort_rmse_gap));
            for a in &audiences {
                let eps = r
                    .epsilon
                    .iter()
                    .find(|e| &e.audience == a)
                    .map(|e| e.epsilon);
                row.insert(format!("epsilon_{a}"), json!(eps));
            }
            Value::Object(row)
        })
        .collect()
}

/// A run's numbers for NumPy: the trained model's tensors and one array per numeric column of
/// the per-round metrics, all owned here and handed to NumPy without copying.
#[derive(Debug, Default)]
pub struct Arrays {
    /// The trained shared model's V (items × k) and b, and μ; `None` when the run has no
    /// model to hand back (`centralised`, `transport = "grpc"`).
    pub model: Option<(Array2<f64>, Array1<f64>, f64)>,
    /// The per-round columns of `metrics.csv` that hold numbers, in the order of the first
    /// row: whole numbers (`round`, counts) as integers, the rest as floats with NaN for an
    /// empty cell.
    pub columns: Vec<(String, Column)>,
}

/// One per-round column.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    /// Every cell a whole number.
    Integers(Array1<i64>),
    /// Numbers, NaN where a round has no value.
    Floats(Array1<f64>),
}

/// The numeric columns of `rows`, by name, in the first row's key order. A column holding
/// text anywhere is left out (the DataFrame has it).
pub fn columns(rows: &[Value]) -> Vec<(String, Column)> {
    let Some(Value::Object(first)) = rows.first() else {
        return vec![];
    };
    let mut out = vec![];
    for key in first.keys() {
        let cells: Vec<&Value> = rows.iter().map(|r| &r[key.as_str()]).collect();
        if cells.iter().all(|v| v.is_i64()) {
            let ints = cells.iter().filter_map(|v| v.as_i64()).collect::<Vec<_>>();
            out.push((key.clone(), Column::Integers(Array1::from(ints))));
        } else if cells.iter().all(|v| v.is_number() || v.is_null()) {
            let floats = cells
                .iter()
                .map(|v| v.as_f64().unwrap_or(f64::NAN))
                .collect::<Vec<_>>();
            out.push((key.clone(), Column::Floats(Array1::from(floats))));
        }
    }
    out
}

/// Runs the simulation a JSON configuration object describes; returns the result object and
/// its arrays.
///
/// The run goes through [`fedpref_simulations::cli::simulate`], the very function behind
/// `fedpref-sim run`, in memory: no file is written, and the numbers, keys and guardrail
/// alerts are the command line's by construction (`metrics.json`'s object is built by the
/// same [`fedpref_simulations::report::metrics_json`]).
pub fn simulate_json(config_json: &str) -> Result<(String, Arrays), Error> {
    let config: Value = serde_json::from_str(config_json)
        .map_err(|e| Error::Invalid(format!("config: not a JSON object: {e}")))?;
    let Value::Object(mut config) = config else {
        return Err(Error::Invalid("config: must be a dict of settings".into()));
    };
    let centralised = match config.remove("centralised") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "config key `centralised`: {other} is not a bool"
            )));
        }
    };
    let toml::Value::Table(table) = to_toml(Value::Object(config), "")? else {
        unreachable!("an object converts to a table")
    };
    let cli_error = |e: CliError| match e {
        CliError::Usage(m) => Error::Invalid(m),
        CliError::Failed(e) => Error::Failed(format!("{e:#}")),
    };
    let plan = plan_from_table(table, "config").map_err(cli_error)?;
    if centralised && plan.settings.privacy_mode != ManifestPrivacyMode::None {
        return Err(Error::Invalid(
            "config key `centralised`: trains without privacy (the baseline): drop `privacy_mode`"
                .into(),
        ));
    }
    let run = simulate(&plan, centralised, &Quiet, "python").map_err(cli_error)?;
    let metrics = report::metrics_json(&plan.data, run.settings.clone(), &run.records);
    let alerts = serde_json::to_value(&run.alerts)
        .map_err(|e| Error::Failed(format!("guardrail alerts: {e}")))?;
    let rounds = rows(&plan.data, &run.records);
    let arrays = Arrays {
        columns: columns(&rounds),
        model: run.model.map(|m| {
            let (_, factors, biases, offset) = m.into_arrays();
            (factors, biases, offset)
        }),
    };
    let document = json!({
        "summary": run.summary,
        "dataset": metrics["dataset"],
        "settings": metrics["settings"],
        "records": metrics["rounds"],
        "rounds": rounds,
        "alerts": alerts,
    });
    Ok((document.to_string(), arrays))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: &str) -> Result<Value, Error> {
        simulate_json(config).map(|(s, _)| serde_json::from_str(&s).unwrap())
    }

    #[test]
    fn a_small_run_gives_one_row_per_round_and_the_same_numbers_twice() {
        let config = r#"{"users": 40, "items": 30, "rounds": 3, "cohort_size": 10,
                         "factors": 4, "seed": 7, "privacy_mode": "central",
                         "noise_multiplier": 1.0}"#;
        let (text, arrays) = simulate_json(config).unwrap();
        let a: Value = serde_json::from_str(&text).unwrap();
        let rows = a["rounds"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2]["round"], 3);
        assert!(rows[2]["rmse"].as_f64().unwrap().is_finite());
        assert_eq!(rows[2]["rmse"], a["records"][2]["evaluation"]["rmse"]);
        let audience = a["records"][2]["epsilon"][0]["audience"].as_str().unwrap();
        let eps = &rows[2][format!("epsilon_{audience}")];
        assert!(eps.as_f64().unwrap() > 0.0, "{eps}");
        assert_eq!(a["summary"]["seed"], 7);
        let (text_b, arrays_b) = simulate_json(config).unwrap();
        let b: Value = serde_json::from_str(&text_b).unwrap();
        assert_eq!(a["records"], b["records"]);
        // The trained model comes back: 30 items × 4 factors, 30 biases, one offset.
        let (factors, biases, offset) = arrays.model.as_ref().unwrap();
        assert_eq!(factors.dim(), (30, 4));
        assert_eq!(biases.len(), 30);
        assert!(offset.is_finite() && factors.iter().all(|x| x.is_finite()));
        assert_eq!(
            arrays.model, arrays_b.model,
            "the same seed trains the same model"
        );
        // One array per numeric column, as many entries as rounds; `round` is whole.
        let column = |name: &str| {
            arrays
                .columns
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| panic!("no column {name}"))
        };
        assert_eq!(
            column("round"),
            Column::Integers(Array1::from(vec![1, 2, 3]))
        );
        let Column::Floats(rmse) = column("rmse") else {
            panic!("rmse is a float column")
        };
        assert_eq!(rmse[2], rows[2]["rmse"].as_f64().unwrap());
        assert_eq!(arrays.columns.len(), arrays_b.columns.len());
    }

    #[test]
    fn bad_configuration_is_refused_naming_the_key() {
        let e = run(r#"{"rounds": 0}"#).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains("rounds"), "{e}");
        let e = run(r#"{"colour": "blue"}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = run(r#"{"seed": null}"#).unwrap_err();
        assert!(e.to_string().contains("`seed`"), "{e}");
        let e = run("[1]").unwrap_err();
        assert!(e.to_string().contains("dict"), "{e}");
    }
}
