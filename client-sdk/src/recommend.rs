//! `recommend(k)`: ranking with the guardrails of the product brief.
//!
//! # Modes
//! - **Personalised** when personalisation is on, a shared model is installed and the
//!   user has at least [`Guardrails::min_examples`] usable examples (the model is *warm*).
//!   Items are ranked by the predicted rating μ + b_j + b_u + V_j·u.
//! - **Non-personalised** otherwise, by the *popularity score*: μ + b_j when the model knows
//!   the item (items it does not know come after those it does), else the app's
//!   `popularity`, else 0; ties go to the newer item, then the smaller id. With
//!   personalisation **off** this ranking uses no data about the user at all, not even what
//!   they have seen; with personalisation on and a cold model it skips items the user has
//!   already given feedback on.
//!
//! # Guardrails
//! - **Eligibility** (personalised mode): items the user already gave feedback on are not
//!   recommended; items that may not be used to personalise (sensitive without the user's
//!   opt-in for every one of their topics, or with a muted topic) never fill any slot.
//! - **Diversity injection** (personalised mode only): `n_div = ⌊k·f + ½⌋` slots (round half
//!   up; f = [`Guardrails::diversity_fraction`], default 0.2, so k = 10 gives 2, k = 5
//!   gives 1, k = 2 gives 0) go to items *outside the user's established interests* (none
//!   of their topics is an explicit interest or an inferred topic at or above
//!   [`Guardrails::interest_threshold`]). Selection rule: walk the eligible outside items in
//!   popularity order and take each whose primary (first) topic is not yet among the
//!   picks' primary topics; if that yields fewer than `n_div`, fill with the most popular
//!   remaining outside items. Fewer than `n_div` only when the catalogue has fewer eligible
//!   outside items. They are placed at positions ⌊(j+1)·k/(n_div+1)⌋ (0-based), so they are
//!   seen, not buried. Label "Exploring something new".
//! - **Recency floor** (both modes): at least `n_rec = ⌊k·r + ½⌋` items (r =
//!   [`Guardrails::recency_fraction`], default 0.2) published within
//!   [`Guardrails::recency_window_days`] (default 14). If the list has fewer, the
//!   lowest-ranked non-recent personal (or popular) items are replaced by the most popular
//!   eligible recent items; diversity slots are never replaced. Label "Recently published".
//! - **Transparency labels** (personal slots): "Because you follow topic T" when the item
//!   has a topic the user follows (explicitly), else "Because you liked X" for the liked
//!   item most similar in the model's item space (liked: target ≥ the example table's
//!   `liked_threshold`; only usable items), else "Picked for you". Popular slots say
//!   "Popular now".
//!
//! `score` is what the slot was ranked by: the predicted rating for `personal` slots, the
//! popularity score for `diversity`, `recency` and `popular` slots.

use std::cmp::Ordering;

use serde::Serialize;

use crate::catalogue::Catalogue;
use crate::model::{MatrixFactorization, PreferenceModel, UserState};
use crate::time::Timestamp;

/// The guardrails' settings. See the module docs for what each does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guardrails {
    /// Fraction f of the k slots for diversity injection. Default 0.2.
    pub diversity_fraction: f64,
    /// Minimum fraction r of recent items. Default 0.2.
    pub recency_fraction: f64,
    /// What "recent" means, in days since publication. Default 14.
    pub recency_window_days: u32,
    /// An inferred topic counts as an established interest from this affinity on. Default 1.0.
    pub interest_threshold: f64,
    /// Usable examples needed before ranking is personalised. Default 3.
    pub min_examples: usize,
}

impl Default for Guardrails {
    fn default() -> Self {
        Self {
            diversity_fraction: 0.2,
            recency_fraction: 0.2,
            recency_window_days: 14,
            interest_threshold: 1.0,
            min_examples: 3,
        }
    }
}

impl Guardrails {
    /// Checks the fractions are in [0, 1] and the threshold finite, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, f) in [
            ("diversity_fraction", self.diversity_fraction),
            ("recency_fraction", self.recency_fraction),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("guardrails: {name} = {f} must be in [0, 1]"));
            }
        }
        if !self.interest_threshold.is_finite() {
            return Err("guardrails: interest_threshold must be finite".into());
        }
        Ok(())
    }

    /// The number of diversity slots for k: ⌊k·f + ½⌋.
    pub fn diversity_slots(&self, k: usize) -> usize {
        slots(k, self.diversity_fraction)
    }

    /// The minimum number of recent items for k: ⌊k·r + ½⌋.
    pub fn recency_slots(&self, k: usize) -> usize {
        slots(k, self.recency_fraction)
    }
}

fn slots(k: usize, fraction: f64) -> usize {
    ((k as f64 * fraction + 0.5).floor() as usize).min(k)
}

/// Why an item is in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Ranked by the user's own model.
    Personal,
    /// Injected from outside the user's established interests.
    Diversity,
    /// Added to meet the recency floor.
    Recency,
    /// Non-personalised ranking.
    Popular,
}

impl Reason {
    /// The name JSON uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Personal => "personal",
            Self::Diversity => "diversity",
            Self::Recency => "recency",
            Self::Popular => "popular",
        }
    }
}

/// One recommended item. Serialises as `{"item", "score", "label", "reason"}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// The item's id.
    pub item: String,
    /// What the slot was ranked by (see the module docs).
    pub score: f64,
    /// The transparency label shown to the user.
    pub label: String,
    /// Why the item is here.
    pub reason: Reason,
}

/// What ranking may know about the user (personalisation on). Positions are catalogue
/// positions.
#[derive(Clone, Debug, Default)]
pub struct PersonalView {
    /// The fitted private part, when the model is warm.
    pub private: Option<UserState>,
    /// Items the user gave feedback on.
    pub seen: Vec<bool>,
    /// Items that may be used to personalise (see [`crate::Permissions::usable`]).
    pub usable: Vec<bool>,
    /// Topic ids the user follows explicitly.
    pub followed: Vec<bool>,
    /// Topic ids that are established interests (followed, or inferred above threshold).
    pub interests: Vec<bool>,
    /// Liked usable items, most recent first.
    pub liked: Vec<usize>,
}

/// The catalogue joined with the model, with the popularity order precomputed.
#[derive(Clone, Debug, Default)]
pub struct Ranker {
    catalogue: Catalogue,
    rows: Vec<Option<u32>>,
    popularity: Vec<f64>,
    popular_order: Vec<u32>,
    topic_masks: Vec<u64>,
}

impl Ranker {
    /// Joins a catalogue with a model (or none).
    pub fn new(catalogue: Catalogue, model: Option<&MatrixFactorization>) -> Self {
        let rows = catalogue.model_rows(model);
        let popularity: Vec<f64> = (0..catalogue.len())
            .map(|i| match (model, rows[i]) {
                (Some(m), Some(r)) => m.baseline(r as usize),
                _ => catalogue.get(i).popularity.unwrap_or(0.0),
            })
            .collect();
        let mut popular_order: Vec<u32> = (0..catalogue.len() as u32).collect();
        popular_order.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            rows[b]
                .is_some()
                .cmp(&rows[a].is_some())
                .then(popularity[b].total_cmp(&popularity[a]))
                .then(catalogue.get(b).published.cmp(&catalogue.get(a).published))
                .then(catalogue.get(a).item.cmp(&catalogue.get(b).item))
        });
        let topic_masks = (0..catalogue.len())
            .map(|i| {
                catalogue
                    .topic_ids(i)
                    .iter()
                    .filter(|&&t| t < 64)
                    .fold(0u64, |m, &t| m | 1 << t)
            })
            .collect();
        Self {
            catalogue,
            rows,
            popularity,
            popular_order,
            topic_masks,
        }
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The popularity score of a position.
    pub fn popularity(&self, position: usize) -> f64 {
        self.popularity[position]
    }

    /// Ranks up to `k` items. `user` is `None` when personalisation is off.
    pub fn rank(
        &self,
        model: Option<&MatrixFactorization>,
        user: Option<&PersonalView>,
        guardrails: &Guardrails,
        k: usize,
        now: Timestamp,
    ) -> Vec<Recommendation> {
        let recent_since = now.minus_days(guardrails.recency_window_days);
        let is_recent = |i: usize| {
            self.catalogue
                .get(i)
                .published
                .is_some_and(|p| p >= recent_since)
        };
        let personal = match (model, user) {
            (Some(m), Some(u)) => u.private.as_ref().map(|p| (m, u, p)),
            _ => None,
        };
        let mut picks: Vec<(usize, Reason, f64)> = Vec::with_capacity(k);
        let mut diversity: Vec<(usize, Reason, f64)> = Vec::new();
        match personal {
            Some((model, user, private)) => {
                let eligible = |i: usize| user.usable[i] && !user.seen[i];
                let n_div = guardrails.diversity_slots(k);
                let mut taken = vec![false; self.catalogue.len()];
                // Diversity: popular eligible items outside the established interests,
                // one per primary topic first.
                // With at most 64 topics the interest test is one AND of bit masks.
                let interest_mask = (self.catalogue.topic_count() <= 64).then(|| {
                    user.interests
                        .iter()
                        .enumerate()
                        .filter(|(_, on)| **on)
                        .fold(0u64, |m, (t, _)| m | 1 << t)
                });
                let outside = |i: usize| {
                    eligible(i)
                        && match interest_mask {
                            Some(mask) => self.topic_masks[i] & mask == 0,
                            None => !self
                                .catalogue
                                .topic_ids(i)
                                .iter()
                                .any(|&t| user.interests[t as usize]),
                        }
                };
                // One walk does both passes of the rule: `spare` keeps, in popularity
                // order, the first outside items the topic-spread pass skipped, which are
                // exactly what the fill pass would take.
                let mut primaries: Vec<Option<u32>> = Vec::new();
                let mut spare: Vec<usize> = Vec::new();
                for &i in &self.popular_order {
                    if diversity.len() == n_div {
                        break;
                    }
                    let i = i as usize;
                    if !outside(i) {
                        continue;
                    }
                    let primary = self.catalogue.topic_ids(i).first().copied();
                    if !primaries.contains(&primary) {
                        primaries.push(primary);
                        taken[i] = true;
                        diversity.push((i, Reason::Diversity, self.popularity[i]));
                    } else if spare.len() < n_div {
                        spare.push(i);
                    }
                }
                for i in spare {
                    if diversity.len() == n_div {
                        break;
                    }
                    taken[i] = true;
                    diversity.push((i, Reason::Diversity, self.popularity[i]));
                }
                // Personal: the best predicted ratings among the other eligible items.
                let n_personal = k - diversity.len();
                let mut best = TopK::new(n_personal);
                for (i, row) in self.rows.iter().enumerate() {
                    if let Some(row) = *row
                        && eligible(i)
                        && !taken[i]
                    {
                        best.offer(i, model.predict(private, row as usize));
                    }
                }
                for (i, score) in best.into_sorted() {
                    taken[i] = true;
                    picks.push((i, Reason::Personal, score));
                }
                self.fill_recency(
                    &mut picks,
                    &diversity,
                    &mut taken,
                    guardrails.recency_slots(k),
                    &is_recent,
                    &eligible,
                );
            }
            None => {
                let seen = |i: usize| user.is_some_and(|u| u.seen[i]);
                let mut taken = vec![false; self.catalogue.len()];
                for &i in &self.popular_order {
                    if picks.len() == k {
                        break;
                    }
                    let i = i as usize;
                    if !seen(i) {
                        taken[i] = true;
                        picks.push((i, Reason::Popular, self.popularity[i]));
                    }
                }
                self.fill_recency(
                    &mut picks,
                    &[],
                    &mut taken,
                    guardrails.recency_slots(k),
                    &is_recent,
                    &|i| !seen(i),
                );
            }
        }
        // Place the diversity picks at ⌊(j+1)·k/(n+1)⌋.
        let n = diversity.len();
        for (j, pick) in diversity.into_iter().enumerate() {
            let at = ((j + 1) * k / (n + 1)).min(picks.len());
            picks.insert(at, pick);
        }
        picks
            .into_iter()
            .map(|(i, reason, score)| Recommendation {
                item: self.catalogue.get(i).item.clone(),
                score,
                label: self.label(i, reason, model, personal.map(|(_, u, _)| u)),
                reason,
            })
            .collect()
    }

    fn fill_recency(
        &self,
        picks: &mut Vec<(usize, Reason, f64)>,
        diversity: &[(usize, Reason, f64)],
        taken: &mut [bool],
        n_rec: usize,
        is_recent: &dyn Fn(usize) -> bool,
        eligible: &dyn Fn(usize) -> bool,
    ) {
        let have = picks
            .iter()
            .chain(diversity)
            .filter(|(i, _, _)| is_recent(*i))
            .count();
        let mut need = n_rec.saturating_sub(have);
        if need == 0 {
            return;
        }
        let mut order = self.popular_order.iter().map(|&i| i as usize);
        while need > 0 {
            let Some(slot) = picks.iter().rposition(|(i, _, _)| !is_recent(*i)) else {
                break;
            };
            let Some(i) = order.find(|&i| is_recent(i) && eligible(i) && !taken[i]) else {
                break;
            };
            taken[i] = true;
            picks.remove(slot);
            picks.push((i, Reason::Recency, self.popularity[i]));
            need -= 1;
        }
    }

    fn label(
        &self,
        i: usize,
        reason: Reason,
        model: Option<&MatrixFactorization>,
        user: Option<&PersonalView>,
    ) -> String {
        match reason {
            Reason::Diversity => "Exploring something new".into(),
            Reason::Recency => "Recently published".into(),
            Reason::Popular => "Popular now".into(),
            Reason::Personal => {
                let (Some(model), Some(user)) = (model, user) else {
                    return "Picked for you".into();
                };
                if let Some(&t) = self
                    .catalogue
                    .topic_ids(i)
                    .iter()
                    .find(|&&t| user.followed[t as usize])
                {
                    return format!("Because you follow topic {}", self.catalogue.topic_name(t));
                }
                let Some(row) = self.rows[i] else {
                    return "Picked for you".into();
                };
                user.liked
                    .iter()
                    .take(50)
                    .filter_map(|&l| self.rows[l].map(|r| (l, r)))
                    .map(|(l, r)| (l, model.item_similarity(row as usize, r as usize)))
                    .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                    .map(|(l, _)| format!("Because you liked {}", self.catalogue.display_name(l)))
                    .unwrap_or_else(|| "Picked for you".into())
            }
        }
    }
}

/// The k best (position, score) pairs, ties to the smaller position.
struct TopK {
    k: usize,
    best: Vec<(usize, f64)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            best: Vec::with_capacity(k + 1),
        }
    }

    fn better(a: &(usize, f64), b: &(usize, f64)) -> Ordering {
        b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
    }

    #[inline]
    fn offer(&mut self, i: usize, score: f64) {
        if self.k == 0 {
            return;
        }
        if self.best.len() == self.k {
            let worst = self.best[self.k - 1];
            if Self::better(&(i, score), &worst) != Ordering::Less {
                return;
            }
            self.best.pop();
        }
        let at = self
            .best
            .partition_point(|p| Self::better(p, &(i, score)) == Ordering::Less);
        self.best.insert(at, (i, score));
    }

    fn into_sorted(self) -> Vec<(usize, f64)> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CatalogueItem;

    #[test]
    fn slot_counts_round_half_up() {
        let g = Guardrails::default();
        let expected = [
            (1, 0),
            (2, 0),
            (3, 1),
            (5, 1),
            (7, 1),
            (8, 2),
            (10, 2),
            (13, 3),
        ];
        for (k, n) in expected {
            assert_eq!(g.diversity_slots(k), n, "k = {k}");
        }
        let half = Guardrails {
            diversity_fraction: 0.5,
            ..g
        };
        assert_eq!(half.diversity_slots(3), 2);
        assert_eq!(half.diversity_slots(1), 1);
    }

    #[test]
    fn top_k_keeps_the_best_scores_in_order_with_ties_to_the_smaller_position() {
        let mut t = TopK::new(3);
        for (i, s) in [(0, 1.0), (1, 5.0), (2, 3.0), (3, 5.0), (4, 0.5), (5, 4.0)] {
            t.offer(i, s);
        }
        assert_eq!(t.into_sorted(), vec![(1, 5.0), (3, 5.0), (5, 4.0)]);
    }

    fn item(id: usize, topic: &str, days_old: Option<i64>, popularity: f64) -> CatalogueItem {
        CatalogueItem {
            item: format!("i{id}"),
            topics: vec![topic.into()],
            sensitive: false,
            published: days_old
                .map(|d| Timestamp::from_millis(1_000 * 86_400_000 - d * 86_400_000)),
            title: None,
            format: None,
            popularity: Some(popularity),
        }
    }

    #[test]
    fn the_cold_ranking_is_by_popularity_and_meets_the_recency_floor() {
        let items: Vec<CatalogueItem> = (0..10)
            .map(|i| {
                item(
                    i,
                    "T",
                    if i >= 8 { Some(1) } else { Some(100) },
                    100.0 - i as f64,
                )
            })
            .collect();
        let ranker = Ranker::new(Catalogue::new(items), None);
        let now = Timestamp::from_millis(1_000 * 86_400_000);
        let recs = ranker.rank(None, None, &Guardrails::default(), 5, now);
        let ids: Vec<&str> = recs.iter().map(|r| r.item.as_str()).collect();
        // n_rec = 1: the least popular of the top five gives way to the most popular recent.
        assert_eq!(ids, ["i0", "i1", "i2", "i3", "i8"]);
        assert_eq!(recs[4].reason, Reason::Recency);
        assert!(
            recs[..4]
                .iter()
                .all(|r| r.reason == Reason::Popular && r.label == "Popular now")
        );
    }
}
