//! How feedback becomes training examples: the documented, configurable event table.
//!
//! # The default table
//! The model predicts ratings on the scale [1, 5]; every signal is mapped to a *target* on
//! that scale and a *weight* (how much the example counts in the fit and the update):
//!
//! | signal | target | weight |
//! |---|---|---|
//! | `rating` v | v | 1.0 |
//! | `thumbs` up | 4.5 | 1.0 |
//! | `thumbs` down | 1.5 | 1.0 |
//! | `save` | 4.5 | 0.5 |
//! | `dismiss` | 2.0 | 0.5 |
//! | `dwell` s seconds | 2.5 + 2.0 · min(s / 60, 1) | 0.25 |
//!
//! # One example per item
//! The workload's update assumes a user's examples are on distinct items, so the events on
//! one item are combined: if the item has a rating, its **latest rating** alone is the
//! example (what the user said beats what they did); otherwise the target is the
//! weight-averaged target of its signals and the weight is their summed weight, capped at
//! one.
//!
//! Items that may not be used to personalise (sensitive without consent, muted topics, not
//! in the catalogue) give no example at all.

use std::collections::HashMap;

use crate::event::{Feedback, Signal};
use crate::time::Timestamp;

/// A target and a weight for one kind of signal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignalMapping {
    /// The target on the rating scale.
    pub target: f64,
    /// The example weight, in (0, 1].
    pub weight: f64,
}

/// The event → example table. See the module docs for the defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExampleTable {
    /// Weight of a rating (its target is the rating).
    pub rating_weight: f64,
    /// Thumbs up.
    pub thumbs_up: SignalMapping,
    /// Thumbs down.
    pub thumbs_down: SignalMapping,
    /// Save.
    pub save: SignalMapping,
    /// Dismiss.
    pub dismiss: SignalMapping,
    /// Dwell: target at 0 seconds.
    pub dwell_min_target: f64,
    /// Dwell: target at `dwell_full_seconds` and beyond.
    pub dwell_max_target: f64,
    /// Dwell: seconds at which the target reaches its maximum.
    pub dwell_full_seconds: f64,
    /// Dwell: weight.
    pub dwell_weight: f64,
    /// Examples with a target at least this count as "liked" (for "Because you liked …").
    pub liked_threshold: f64,
}

impl Default for ExampleTable {
    fn default() -> Self {
        Self {
            rating_weight: 1.0,
            thumbs_up: SignalMapping {
                target: 4.5,
                weight: 1.0,
            },
            thumbs_down: SignalMapping {
                target: 1.5,
                weight: 1.0,
            },
            save: SignalMapping {
                target: 4.5,
                weight: 0.5,
            },
            dismiss: SignalMapping {
                target: 2.0,
                weight: 0.5,
            },
            dwell_min_target: 2.5,
            dwell_max_target: 4.5,
            dwell_full_seconds: 60.0,
            dwell_weight: 0.25,
            liked_threshold: 4.0,
        }
    }
}

impl ExampleTable {
    /// The (target, weight) of one signal.
    pub fn map(&self, signal: Signal) -> SignalMapping {
        match signal {
            Signal::Rating(v) => SignalMapping {
                target: v,
                weight: self.rating_weight,
            },
            Signal::ThumbsUp => self.thumbs_up,
            Signal::ThumbsDown => self.thumbs_down,
            Signal::Save => self.save,
            Signal::Dismiss => self.dismiss,
            Signal::Dwell(s) => SignalMapping {
                target: self.dwell_min_target
                    + (self.dwell_max_target - self.dwell_min_target)
                        * (s / self.dwell_full_seconds).clamp(0.0, 1.0),
                weight: self.dwell_weight,
            },
        }
    }

    /// Checks that every weight is in (0, 1] and every number is finite, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let weights = [
            ("rating_weight", self.rating_weight),
            ("thumbs_up.weight", self.thumbs_up.weight),
            ("thumbs_down.weight", self.thumbs_down.weight),
            ("save.weight", self.save.weight),
            ("dismiss.weight", self.dismiss.weight),
            ("dwell_weight", self.dwell_weight),
        ];
        for (name, w) in weights {
            if !(w > 0.0 && w <= 1.0) {
                return Err(format!("example table: {name} = {w} must be in (0, 1]"));
            }
        }
        let numbers = [
            ("thumbs_up.target", self.thumbs_up.target),
            ("thumbs_down.target", self.thumbs_down.target),
            ("save.target", self.save.target),
            ("dismiss.target", self.dismiss.target),
            ("dwell_min_target", self.dwell_min_target),
            ("dwell_max_target", self.dwell_max_target),
            ("liked_threshold", self.liked_threshold),
        ];
        for (name, v) in numbers {
            if !v.is_finite() {
                return Err(format!("example table: {name} = {v} must be finite"));
            }
        }
        if !(self.dwell_full_seconds.is_finite() && self.dwell_full_seconds > 0.0) {
            return Err(format!(
                "example table: dwell_full_seconds = {} must be > 0",
                self.dwell_full_seconds
            ));
        }
        Ok(())
    }

    /// One example per usable item, most recent first (ties by item id).
    pub fn item_examples(
        &self,
        feedback: &[Feedback],
        usable: impl Fn(&str) -> bool,
    ) -> Vec<ItemExample> {
        #[derive(Default)]
        struct Acc {
            rating: Option<(Timestamp, f64)>,
            weighted_target: f64,
            weight: f64,
            last: Option<Timestamp>,
        }
        let mut by_item: HashMap<&str, Acc> = HashMap::new();
        for f in feedback {
            if !usable(&f.item) {
                continue;
            }
            let acc = by_item.entry(&f.item).or_default();
            acc.last = acc.last.max(Some(f.at));
            if let Signal::Rating(v) = f.signal {
                if acc.rating.is_none_or(|(t, _)| f.at >= t) {
                    acc.rating = Some((f.at, v));
                }
            } else {
                let m = self.map(f.signal);
                acc.weighted_target += m.target * m.weight;
                acc.weight += m.weight;
            }
        }
        let mut out: Vec<ItemExample> = by_item
            .into_iter()
            .map(|(item, acc)| {
                let (target, weight) = match acc.rating {
                    Some((_, v)) => (v, self.rating_weight),
                    None => (acc.weighted_target / acc.weight, acc.weight.min(1.0)),
                };
                ItemExample {
                    item: item.to_owned(),
                    target,
                    weight,
                    last_at: acc.last.expect("at least one event"),
                }
            })
            .collect();
        out.sort_by(|a, b| b.last_at.cmp(&a.last_at).then_with(|| a.item.cmp(&b.item)));
        out
    }
}

/// The combined example of one item, before it is tied to a model row.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemExample {
    /// The item's id.
    pub item: String,
    /// The target on the rating scale.
    pub target: f64,
    /// The weight, in (0, 1].
    pub weight: f64,
    /// The latest event on the item.
    pub last_at: Timestamp,
}

/// A training example tied to a model row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Example {
    /// The item's row in the shared model.
    pub item: usize,
    /// The target on the rating scale.
    pub target: f64,
    /// The weight, in (0, 1].
    pub weight: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(item: &str, signal: Signal, minute: i64) -> Feedback {
        Feedback {
            item: item.into(),
            signal,
            at: Timestamp::from_millis(minute * 60_000),
        }
    }

    #[test]
    fn the_latest_rating_of_an_item_beats_every_other_signal_on_it() {
        let t = ExampleTable::default();
        let ex = t.item_examples(
            &[
                fb("a", Signal::Rating(2.0), 1),
                fb("a", Signal::ThumbsUp, 2),
                fb("a", Signal::Rating(5.0), 3),
                fb("a", Signal::Rating(1.0), 0),
            ],
            |_| true,
        );
        assert_eq!(ex.len(), 1);
        assert_eq!((ex[0].target, ex[0].weight), (5.0, 1.0));
    }

    #[test]
    fn implicit_signals_average_their_targets_and_cap_their_weight_at_one() {
        let t = ExampleTable::default();
        let ex = t.item_examples(
            &[
                fb("a", Signal::Save, 1),
                fb("a", Signal::Dwell(120.0), 2),
                fb("b", Signal::ThumbsUp, 3),
                fb("b", Signal::Dismiss, 4),
            ],
            |_| true,
        );
        // b is the more recent.
        assert_eq!(ex[0].item, "b");
        assert!((ex[0].target - (4.5 + 1.0) / 1.5).abs() < 1e-12);
        assert_eq!(ex[0].weight, 1.0);
        assert!((ex[1].target - 4.5).abs() < 1e-12);
        assert_eq!(ex[1].weight, 0.75);
    }

    #[test]
    fn dwell_targets_rise_linearly_to_the_full_time_then_stay() {
        let t = ExampleTable::default();
        assert_eq!(t.map(Signal::Dwell(0.0)).target, 2.5);
        assert_eq!(t.map(Signal::Dwell(30.0)).target, 3.5);
        assert_eq!(t.map(Signal::Dwell(600.0)).target, 4.5);
    }

    #[test]
    fn unusable_items_give_no_example() {
        let t = ExampleTable::default();
        let ex = t.item_examples(
            &[fb("a", Signal::ThumbsUp, 1), fb("h", Signal::ThumbsUp, 2)],
            |i| i != "h",
        );
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].item, "a");
    }

    #[test]
    fn a_weight_outside_zero_to_one_is_refused_naming_it() {
        let mut t = ExampleTable::default();
        t.save.weight = 1.5;
        assert!(t.validate().unwrap_err().contains("save.weight"));
    }
}
