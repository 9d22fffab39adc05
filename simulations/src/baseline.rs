//! The models with no personal factors that a personalised model must beat, computed on a
//! data set's own split: the global training mean, and global mean + user and item biases
//! fitted by alternating least squares exactly as Surprise's `BaselineOnly` fits them
//! (Koren 2010, §2.1; Surprise 1.1.5's defaults: 10 sweeps, λ_item = 10, λ_user = 15).
//!
//! One sweep sets every item's bias to Σ_u (r_uj − μ − b_u) / (λ_item + n_j) over its
//! training ratings, then every user's bias to Σ_j (r_uj − μ − b_j) / (λ_user + n_u), from
//! all-zero biases. A prediction is μ + b_u + b_j clipped to [1, 5]; an item no one rated
//! has b_j = 0. On MovieLens 1M's split this gives Surprise's own figure (the tests pin the
//! arithmetic on a small hand-checked case).

use crate::data::Dataset;

/// Surprise `BaselineOnly`'s ALS defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasOnly {
    /// Sweeps (Surprise's `n_epochs`).
    pub sweeps: usize,
    /// λ_item (Surprise's `reg_i`).
    pub item_l2: f64,
    /// λ_user (Surprise's `reg_u`).
    pub user_l2: f64,
}

impl Default for BiasOnly {
    fn default() -> Self {
        Self {
            sweeps: 10,
            item_l2: 10.0,
            user_l2: 15.0,
        }
    }
}

/// A fitted bias-only model: μ, one bias per user (the data set's order) and per item.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasModel {
    /// The training mean μ.
    pub mean: f64,
    /// b_u per user.
    pub user_bias: Vec<f64>,
    /// b_j per item.
    pub item_bias: Vec<f64>,
}

impl BiasModel {
    /// μ + b_u + b_j, clipped to [1, 5].
    pub fn predict(&self, user: usize, item: usize) -> f64 {
        (self.mean + self.user_bias[user] + self.item_bias[item]).clamp(1.0, 5.0)
    }

    /// RMSE over every user's held-out ratings (0 when there are none).
    pub fn test_rmse(&self, data: &Dataset) -> f64 {
        let (sse, n) = data
            .users
            .iter()
            .enumerate()
            .flat_map(|(u, user)| user.test.iter().map(move |r| (u, r)))
            .fold((0.0, 0usize), |(s, n), (u, r)| {
                let e = self.predict(u, r.item as usize) - f64::from(r.value);
                (s + e * e, n + 1)
            });
        if n == 0 { 0.0 } else { (sse / n as f64).sqrt() }
    }
}

impl BiasOnly {
    /// Fits the biases on every user's training ratings (see the module docs).
    pub fn fit(&self, data: &Dataset) -> BiasModel {
        let mean = data.train_mean();
        let mut user_bias = vec![0.0; data.users.len()];
        let mut item_bias = vec![0.0; data.items.len()];
        let mut item_count = vec![0usize; data.items.len()];
        for r in data.users.iter().flat_map(|u| &u.train) {
            item_count[r.item as usize] += 1;
        }
        for _ in 0..self.sweeps {
            let mut item_sum = vec![0.0; data.items.len()];
            for (u, user) in data.users.iter().enumerate() {
                for r in &user.train {
                    item_sum[r.item as usize] += f64::from(r.value) - mean - user_bias[u];
                }
            }
            for ((b, s), &n) in item_bias.iter_mut().zip(&item_sum).zip(&item_count) {
                *b = s / (self.item_l2 + n as f64);
            }
            for (u, user) in data.users.iter().enumerate() {
                let s: f64 = user
                    .train
                    .iter()
                    .map(|r| f64::from(r.value) - mean - item_bias[r.item as usize])
                    .sum();
                user_bias[u] = s / (self.user_l2 + user.train.len() as f64);
            }
        }
        BiasModel {
            mean,
            user_bias,
            item_bias,
        }
    }
}

/// The test RMSE of Surprise-`BaselineOnly`-equivalent biases fitted on `data`'s training
/// ratings.
pub fn bias_only_rmse(data: &Dataset) -> f64 {
    BiasOnly::default().fit(data).test_rmse(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{RawRating, SyntheticSpec, from_raw, synthetic};
    use crate::metrics::global_mean_rmse;

    fn rating(user: &str, item: &str, value: f32, time: i64) -> RawRating {
        RawRating {
            user: user.into(),
            item: item.into(),
            value,
            time,
        }
    }

    #[test]
    fn one_sweep_matches_the_closed_form_by_hand() {
        // Two users, two items; each user's latest rating is held out (round(0.2·n) of n
        // ratings, at least one).
        let raw = vec![
            rating("a", "x", 5.0, 1),
            rating("a", "y", 3.0, 2),
            rating("a", "x", 4.0, 3),
            rating("b", "x", 4.0, 1),
            rating("b", "y", 1.0, 2),
            rating("b", "y", 2.0, 3),
        ];
        let data = from_raw("hand", raw, vec![]).unwrap();
        let fit = BiasOnly {
            sweeps: 1,
            item_l2: 1.0,
            user_l2: 2.0,
        }
        .fit(&data);
        // Training: a rated x 5 and y 3; b rated x 4 and y 1. μ = 13 / 4.
        let mu = 13.0 / 4.0;
        assert!((fit.mean - mu).abs() < 1e-12);
        let bx = ((5.0 - mu) + (4.0 - mu)) / (1.0 + 2.0);
        let by = ((3.0 - mu) + (1.0 - mu)) / (1.0 + 2.0);
        let ia = data.users.iter().position(|u| u.id == "a").unwrap();
        let (jx, jy) = (
            data.items.iter().position(|i| i.id == "x").unwrap(),
            data.items.iter().position(|i| i.id == "y").unwrap(),
        );
        assert!((fit.item_bias[jx] - bx).abs() < 1e-12);
        assert!((fit.item_bias[jy] - by).abs() < 1e-12);
        let ba = ((5.0 - mu - bx) + (3.0 - mu - by)) / (2.0 + 2.0);
        assert!((fit.user_bias[ia] - ba).abs() < 1e-12);
        assert!((fit.predict(ia, jx) - (mu + ba + bx).clamp(1.0, 5.0)).abs() < 1e-12);
    }

    #[test]
    fn biases_beat_the_global_mean_on_data_with_biases() {
        // The synthetic generator draws user and item biases of std 0.4.
        let data = synthetic(&SyntheticSpec {
            users: 400,
            items: 100,
            ..SyntheticSpec::default()
        })
        .unwrap();
        let (biases, mean) = (bias_only_rmse(&data), global_mean_rmse(&data));
        assert!(
            biases.is_finite() && biases < mean - 0.05,
            "{biases} vs {mean}"
        );
        // No sweeps leaves every bias at zero: the global mean's RMSE (clipping aside).
        let none = BiasOnly {
            sweeps: 0,
            ..BiasOnly::default()
        }
        .fit(&data);
        assert!((none.test_rmse(&data) - mean).abs() < 1e-9);
    }
}
