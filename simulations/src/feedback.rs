//! The user-feedback scenario: simulated users who dislike bad recommendations and, when they
//! dislike enough of them, opt out of training.
//!
//! When a run's config has a `[scenario]` table (or `--user-feedback` is given), every device
//! that is given a task in a round (over `--transport grpc`: every device whose upload the
//! round accepted) is shown the list the SDK would show it — the guardrailed
//! `recommend(10)` of [`crate::metrics::recommend`] — ranked by the shared model it downloaded
//! for the round (the model before the round's update), with its private part refitted on its
//! training ratings. Then:
//!
//! - **Negative feedback.** The user dislikes a recommended item whose *true* preference is
//!   below `negative_below` (default 2.5 stars). On synthetic data the true preference is the
//!   generator's noise-free expected rating ([`crate::data::Truth::preference`]); on MovieLens
//!   it is the user's held-out rating of the item, and an item the user never rated gets no
//!   feedback (it is counted as shown, not as disliked). `negative_feedback_rate` is the share
//!   of the round's recommended slots that were disliked.
//! - **Opt-out.** Each user remembers its dislikes over the last `memory` lists it was shown
//!   (default 3, this round's included), d of them, and opts out with probability
//!   1 − (1 − `opt_out_per_negative`)^d (default 0.02 per dislike): each remembered dislike is
//!   an independent chance to leave. The draw is the user's own stream (seed, 13, round, user),
//!   so it does not depend on threads or on other users. An opted-out user is never a
//!   candidate again: from the next round on it neither checks in nor trains (with
//!   `--transport grpc` its SDK device is also switched off with `Device::set_training(false)`,
//!   the control an app gives its users). `opt_out_rate` is the share of the training
//!   population that has opted out by the end of the round. A run in which everyone has
//!   opted out ends early.
//!
//! The centralised baseline has no devices and so no feedback.

use std::collections::VecDeque;

use fedpref_client_sdk::{LocalTraining, MatrixFactorization, PreferenceModel};
use rand::RngExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, stream_rng};
use crate::metrics::{examples, ranker, ranking_time, recommend};

/// The scenario's parameters (`[scenario]` in `--config`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A recommended item whose true preference (stars) is below this is disliked.
    pub negative_below: f64,
    /// The chance that one remembered dislike makes the user opt out, in [0, 1].
    pub opt_out_per_negative: f64,
    /// How many of its most recent lists a user remembers (≥ 1).
    pub memory: u32,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            negative_below: 2.5,
            opt_out_per_negative: 0.02,
            memory: 3,
        }
    }
}

impl Scenario {
    /// Checks the parameters; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.negative_below.is_finite()) {
            return Err(format!(
                "[scenario] negative_below {}: must be a finite number of stars",
                self.negative_below
            ));
        }
        if !(0.0..=1.0).contains(&self.opt_out_per_negative) {
            return Err(format!(
                "[scenario] opt_out_per_negative {}: must be in [0, 1]",
                self.opt_out_per_negative
            ));
        }
        if self.memory == 0 {
            return Err("[scenario] memory 0: must be at least 1 list".into());
        }
        Ok(())
    }
}

/// What the scenario observed in one round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundFeedback {
    /// Users shown a list this round (the round's devices with a task).
    pub exposed_users: u64,
    /// Recommended slots shown.
    pub recommended: u64,
    /// Slots disliked.
    pub negative: u64,
    /// `negative / recommended` (`None` when nothing was shown).
    pub negative_feedback_rate: Option<f64>,
    /// Users who opted out this round.
    pub opted_out: u64,
    /// Users opted out so far.
    pub opted_out_total: u64,
    /// `opted_out_total` over the training population.
    pub opt_out_rate: f64,
}

/// The scenario's state over a run: who has opted out, and each user's recent dislikes.
pub struct FeedbackModel {
    scenario: Scenario,
    opted_out: Vec<bool>,
    recent: Vec<VecDeque<u32>>,
    population: u64,
    total: u64,
}

impl FeedbackModel {
    /// A fresh state: nobody has opted out.
    pub fn new(scenario: Scenario, data: &Dataset) -> Self {
        Self {
            scenario,
            opted_out: vec![false; data.users.len()],
            recent: vec![VecDeque::new(); data.users.len()],
            population: data.users.iter().filter(|u| u.trains).count() as u64,
            total: 0,
        }
    }

    /// Which users have opted out, by user index.
    pub fn opted_out(&self) -> &[bool] {
        &self.opted_out
    }

    /// Whether every user of the training population has opted out (nobody is left to
    /// train, so the run ends).
    pub fn everyone_opted_out(&self) -> bool {
        self.total >= self.population
    }

    /// Shows `users` (this round's devices with a task, in any order) their lists under
    /// `model`, records their dislikes, and draws who opts out. Returns the round's figures
    /// and the users who opted out this round (ascending).
    pub fn observe(
        &mut self,
        model: &MatrixFactorization,
        data: &Dataset,
        training: &LocalTraining,
        seed: u64,
        round: u64,
        users: &[usize],
    ) -> (RoundFeedback, Vec<usize>) {
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let ranker = ranker(data, model);
        let now = ranking_time();
        let below = self.scenario.negative_below;
        // (shown, disliked) per user, in parallel, reduced in user order.
        let seen: Vec<(u32, u32)> = users
            .par_iter()
            .map(|&u| {
                let user = &data.users[u];
                let private = model.fit_private(&examples(&user.train, training), training);
                let list = recommend(model, data, user, private, &ranker, now);
                let disliked = list
                    .iter()
                    .filter_map(|r| model.item_index(&r.item))
                    .filter(|&j| true_preference(data, u, j).is_some_and(|p| p < below))
                    .count();
                (list.len() as u32, disliked as u32)
            })
            .collect();
        let (mut recommended, mut negative) = (0u64, 0u64);
        let mut left = vec![];
        for (&u, &(shown, disliked)) in users.iter().zip(&seen) {
            recommended += u64::from(shown);
            negative += u64::from(disliked);
            let memory = &mut self.recent[u];
            memory.push_back(disliked);
            while memory.len() > self.scenario.memory as usize {
                memory.pop_front();
            }
            let d: u32 = memory.iter().sum();
            let p = 1.0 - (1.0 - self.scenario.opt_out_per_negative).powi(d as i32);
            let draw = stream_rng(seed, &[13, round, u as u64]).random::<f64>();
            if !self.opted_out[u] && draw < p {
                self.opted_out[u] = true;
                left.push(u);
            }
        }
        self.total += left.len() as u64;
        let feedback = RoundFeedback {
            exposed_users: users.len() as u64,
            recommended,
            negative,
            negative_feedback_rate: (recommended > 0).then(|| negative as f64 / recommended as f64),
            opted_out: left.len() as u64,
            opted_out_total: self.total,
            opt_out_rate: self.total as f64 / self.population.max(1) as f64,
        };
        (feedback, left)
    }
}

/// The user's true preference for an item: the generator's expected rating on synthetic
/// data, else the user's held-out rating of it, if any.
pub fn true_preference(data: &Dataset, user: usize, item: usize) -> Option<f64> {
    match &data.truth {
        Some(truth) => Some(truth.preference(user, item)),
        None => data.users[user]
            .test
            .iter()
            .find(|r| r.item as usize == item)
            .map(|r| f64::from(r.value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticSpec, synthetic};
    use crate::sim::{Settings, shared_model};
    use fedpref_engine::manifest::ModelSpec;
    use fedpref_engine::model::initial_parameters;

    fn setup() -> (Dataset, MatrixFactorization) {
        let data = synthetic(&SyntheticSpec {
            users: 60,
            items: 40,
            ..SyntheticSpec::default()
        })
        .unwrap();
        let spec = ModelSpec {
            items: 40,
            factors: 4,
            init_scale: 0.1,
            initial_offset: 3.0,
        };
        let ids: Vec<String> = data.items.iter().map(|i| i.id.clone()).collect();
        let model = shared_model(0, &ids, 4, &initial_parameters(&spec, 1)).unwrap();
        (data, model)
    }

    #[test]
    fn everyone_dislikes_everything_below_six_stars_and_nobody_above_zero() {
        let (data, model) = setup();
        let training = Settings::default().training;
        let users: Vec<usize> = (0..20).collect();
        let all = Scenario {
            negative_below: 6.0,
            opt_out_per_negative: 0.0,
            memory: 1,
        };
        let (f, left) =
            FeedbackModel::new(all, &data).observe(&model, &data, &training, 1, 1, &users);
        assert_eq!(f.exposed_users, 20);
        assert_eq!(f.recommended, 200);
        assert_eq!(f.negative, 200);
        assert_eq!(f.negative_feedback_rate, Some(1.0));
        assert!(
            left.is_empty() && f.opt_out_rate == 0.0,
            "π = 0 never opts out"
        );
        let none = Scenario {
            negative_below: 0.0,
            opt_out_per_negative: 1.0,
            ..all
        };
        let (f, left) =
            FeedbackModel::new(none, &data).observe(&model, &data, &training, 1, 1, &users);
        assert_eq!((f.negative, f.opted_out), (0, 0));
        assert!(left.is_empty(), "no dislike, no opt-out even at π = 1");
    }

    #[test]
    fn a_certain_opt_out_removes_every_disliking_user_once_and_is_counted_in_the_rate() {
        let (data, model) = setup();
        let training = Settings::default().training;
        let scenario = Scenario {
            negative_below: 6.0,
            opt_out_per_negative: 1.0,
            memory: 2,
        };
        let mut state = FeedbackModel::new(scenario, &data);
        let (f, left) = state.observe(&model, &data, &training, 1, 1, &[5, 3, 3, 9]);
        assert_eq!(left, vec![3, 5, 9]);
        assert_eq!(f.opted_out_total, 3);
        assert_eq!(f.opt_out_rate, 3.0 / 60.0);
        assert!(state.opted_out()[3] && !state.opted_out()[4]);
        let (f, left) = state.observe(&model, &data, &training, 1, 2, &[3, 4]);
        assert_eq!(left, vec![4], "an opted-out user is not counted twice");
        assert_eq!(f.opted_out_total, 4);
    }

    #[test]
    fn opt_outs_are_seeded_per_user_and_round() {
        let (data, model) = setup();
        let training = Settings::default().training;
        let scenario = Scenario {
            negative_below: 6.0,
            opt_out_per_negative: 0.05,
            memory: 1,
        };
        // p = 1 − 0.95^10 ≈ 0.40 for every user: some leave, some stay, the same ones twice.
        let users: Vec<usize> = (0..60).collect();
        let run = |seed| {
            FeedbackModel::new(scenario, &data)
                .observe(&model, &data, &training, seed, 1, &users)
                .1
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert!(a.len() > 10 && a.len() < 40, "{} of 60 left", a.len());
        assert_ne!(a, run(8));
    }

    #[test]
    fn bad_parameters_name_the_key() {
        for (s, key) in [
            (
                Scenario {
                    opt_out_per_negative: 1.5,
                    ..Scenario::default()
                },
                "opt_out_per_negative",
            ),
            (
                Scenario {
                    memory: 0,
                    ..Scenario::default()
                },
                "memory",
            ),
            (
                Scenario {
                    negative_below: f64::NAN,
                    ..Scenario::default()
                },
                "negative_below",
            ),
        ] {
            assert!(s.validate().unwrap_err().contains(key), "{key}");
        }
    }

    #[test]
    fn movielens_style_data_judges_only_items_with_a_held_out_rating() {
        let (mut data, _) = setup();
        data.truth = None;
        let u = &data.users[0];
        let held = u.test[0];
        assert_eq!(
            true_preference(&data, 0, held.item as usize),
            Some(f64::from(held.value))
        );
        let unrated = (0..data.items.len())
            .find(|&j| !u.test.iter().chain(&u.train).any(|r| r.item as usize == j))
            .unwrap();
        assert_eq!(true_preference(&data, 0, unrated), None);
    }
}
