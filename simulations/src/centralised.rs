//! The centralised baseline: the same model trained in one place on every user's training
//! ratings, by alternating least squares, with the number of sweeps chosen on validation
//! data.
//!
//! The model and its objective are the federated run's (see the SDK's `model` module):
//! predictions μ + b_j + b_u + V_j·u, squared error over the training ratings, a user's
//! (u, b_u) penalised by λ_u = `private_l2` + `private_l2_per_example`·n_u (the bias β times
//! as much), and each item's (V_j, b_j) by ρ per rating (ρ = `l2_regularization`, the bias
//! β ρ), which is what the federated update's decay term is the gradient of. One sweep
//! solves every user exactly (the SDK's own [`PreferenceModel::fit_private`]), then every
//! item exactly given the users: the same ridge solve with users and items swapped. μ is the
//! training mean.
//!
//! The number of sweeps is chosen on a validation split carved from the training ratings
//! ([`Dataset::validation_split`]): sweeps run on the carved training ratings until the
//! validation RMSE has not improved for [`PATIENCE`] sweeps (or `rounds` sweeps have run),
//! then the model is trained afresh on all training ratings for the best number of sweeps
//! and evaluated on the test ratings, which the choice never saw.

use std::time::Instant;

use fedpref_client_sdk::{Example, LocalTraining, MatrixFactorization, PreferenceModel};
use fedpref_engine::manifest::ModelSpec;
use fedpref_engine::model::initial_parameters;
use ndarray::Array2;
use rayon::prelude::*;

use crate::data::Dataset;
use crate::metrics::{evaluate, examples};
use crate::sim::{RoundRecord, Settings, SimError, shared_model};

/// Sweeps without a better validation RMSE before the search stops.
pub const PATIENCE: usize = 2;

/// A centralised run: the test records of the final training, and how its length was
/// chosen.
#[derive(Clone, Debug)]
pub struct CentralisedRun {
    /// One record per sweep of the final training on all training ratings; evaluated on the
    /// test ratings as `eval_every` says (always after the last).
    pub records: Vec<RoundRecord>,
    /// The validation RMSE after each sweep of the search.
    pub validation_rmse: Vec<f64>,
    /// The sweeps chosen: the first with the lowest validation RMSE.
    pub sweeps: u64,
    /// Wall time of the search and the final training, in nanoseconds.
    pub wall_ns: u64,
}

/// Trains the baseline (see the module docs).
pub fn centralised(settings: &Settings, data: &Dataset) -> Result<CentralisedRun, SimError> {
    let start = Instant::now();
    let validation = data
        .validation_split()
        .map_err(|e| SimError::Settings(format!("--centralised: {e}")))?;
    let mut validation_rmse = vec![];
    let mut search = Als::new(settings, &validation)?;
    let mut best = (f64::INFINITY, 0u64);
    for sweep in 1..=settings.rounds {
        search.sweep()?;
        let rmse = evaluate(&search.model, &validation, &settings.training, false).rmse;
        validation_rmse.push(rmse);
        if rmse < best.0 {
            best = (rmse, sweep);
        } else if sweep - best.1 >= PATIENCE as u64 {
            break;
        }
    }
    let sweeps = best.1.max(1);
    let mut als = Als::new(settings, data)?;
    let mut records = vec![];
    for sweep in 1..=sweeps {
        als.sweep()?;
        let due = sweep == sweeps
            || (settings.eval_every > 0 && sweep.is_multiple_of(settings.eval_every));
        records.push(RoundRecord {
            round: sweep,
            contributions: data.users.iter().filter(|u| u.trains).count() as u64,
            abandoned: None,
            epsilon: vec![],
            evaluation: due
                .then(|| evaluate(&als.model, data, &settings.training, settings.ranking)),
            feedback: None,
            clip_norm: None,
        });
    }
    Ok(CentralisedRun {
        records,
        validation_rmse,
        sweeps,
        wall_ns: start.elapsed().as_nanos() as u64,
    })
}

/// Alternating least squares over one data set's training ratings.
struct Als<'d> {
    data: &'d Dataset,
    training: LocalTraining,
    /// Each item's ratings: (user, rating).
    by_item: Vec<Vec<(u32, f32)>>,
    item_ids: Vec<String>,
    user_ids: Vec<String>,
    factors: usize,
    model: MatrixFactorization,
}

impl<'d> Als<'d> {
    fn new(settings: &Settings, data: &'d Dataset) -> Result<Self, SimError> {
        let spec = ModelSpec {
            items: data.items.len() as u64,
            factors: settings.factors as u64,
            init_scale: 0.1,
            initial_offset: 3.0,
        };
        let item_ids: Vec<String> = data.items.iter().map(|i| i.id.clone()).collect();
        let mut params = initial_parameters(&spec, settings.seed);
        let n = item_ids.len();
        params[n * (settings.factors + 1)] = data.train_mean() as f32;
        let model = shared_model(0, &item_ids, settings.factors, &params)?;
        let mut by_item = vec![vec![]; n];
        for (u, user) in data.users.iter().enumerate() {
            if user.trains {
                for r in &user.train {
                    by_item[r.item as usize].push((u as u32, r.value));
                }
            }
        }
        Ok(Self {
            data,
            training: settings.training,
            by_item,
            user_ids: (0..data.users.len()).map(|u| format!("u{u}")).collect(),
            item_ids,
            factors: settings.factors,
            model,
        })
    }

    /// Solves every user, then every item.
    fn sweep(&mut self) -> Result<(), SimError> {
        let (model, training, data) = (&self.model, &self.training, self.data);
        let users: Vec<_> = data
            .users
            .par_iter()
            .map(|u| {
                let ex = if u.trains {
                    examples(&u.train, training)
                } else {
                    vec![]
                };
                model.fit_private(&ex, training)
            })
            .collect();
        let k = self.factors;
        // The item step is the user step with the roles swapped: the "catalogue" is the
        // users (factor u, bias b_u), and λ is ρ per rating, as the federated update decays.
        let transposed = MatrixFactorization::new(
            0,
            self.user_ids.clone(),
            rows_of(users.iter().map(|p| &p.factor[..]), k),
            users.iter().map(|p| p.bias).collect(),
            model.global_offset(),
        )?;
        let item_training = LocalTraining {
            private_l2: 0.0,
            private_l2_per_example: training.l2_regularization,
            ..*training
        };
        let solved: Vec<_> = self
            .by_item
            .par_iter()
            .map(|ratings| {
                let ex: Vec<Example> = ratings
                    .iter()
                    .map(|&(u, r)| Example {
                        item: u as usize,
                        target: f64::from(r),
                        weight: 1.0,
                    })
                    .collect();
                transposed.fit_private(&ex, &item_training)
            })
            .collect();
        self.model = MatrixFactorization::new(
            model.version() + 1,
            self.item_ids.clone(),
            rows_of(solved.iter().map(|p| &p.factor[..]), k),
            solved.iter().map(|p| p.bias).collect(),
            model.global_offset(),
        )?;
        Ok(())
    }
}

/// Rows of k factors stacked into an n × k array.
fn rows_of<'a>(rows: impl ExactSizeIterator<Item = &'a [f64]>, k: usize) -> Array2<f64> {
    let n = rows.len();
    let flat: Vec<f64> = rows.flat_map(|r| r.iter().copied()).collect();
    Array2::from_shape_vec((n, k), flat).expect("every row has k factors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticSpec, synthetic};

    #[test]
    fn the_baseline_beats_the_global_mean_and_never_reads_the_test_ratings() {
        let data = synthetic(&SyntheticSpec {
            users: 300,
            items: 120,
            ..SyntheticSpec::default()
        })
        .unwrap();
        let settings = Settings {
            rounds: 8,
            factors: 8,
            ranking: false,
            eval_every: 0,
            training: LocalTraining {
                private_l2: 0.0,
                private_l2_per_example: 0.2,
                l2_regularization: 0.1,
                bias_l2_ratio: 0.3,
                ..LocalTraining::default()
            },
            ..Settings::default()
        };
        let run = centralised(&settings, &data).unwrap();
        let rmse = run
            .records
            .last()
            .unwrap()
            .evaluation
            .as_ref()
            .unwrap()
            .rmse;
        assert!(
            rmse < 0.9 * crate::metrics::global_mean_rmse(&data),
            "{rmse}"
        );
        assert_eq!(run.records.len() as u64, run.sweeps);
        // The search depends on the training ratings only: rewriting every test rating
        // changes the test RMSE, not the sweeps chosen nor the validation curve.
        let mut other = data.clone();
        for u in &mut other.users {
            for r in &mut u.test {
                r.value = 6.0 - r.value;
            }
        }
        let again = centralised(&settings, &other).unwrap();
        assert_eq!(again.validation_rmse, run.validation_rmse);
        assert_eq!(again.sweeps, run.sweeps);
    }
}
