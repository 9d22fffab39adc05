//! Evaluation of a shared model on every user's held-out ratings.
//!
//! Every user refits its private part (u, b_u) on its training ratings with the SDK's
//! [`PreferenceModel::fit_private`] against the shared model, then:
//! - **rating metrics** on the held-out ratings, predictions clipped to [1, 5]: RMSE
//!   √(Σ SSE / Σ n), MAE, and `rating_accuracy`, the share predicted within 0.5 (the metric
//!   of TFF's federated-reconstruction tutorial);
//! - **ranking metrics** over the list the SDK would show: [`Ranker::rank`] — the
//!   guardrailed `recommend(10)` of the client SDK, with its diversity injection
//!   (⌊10·0.2 + ½⌋ = 2 slots from outside the user's established interests) — given the
//!   user's refitted private part, the items it rated in training as seen, every item usable
//!   (the simulated users have consented to every sensitive topic, as they train on them),
//!   and as established interests the topics carried by at least two of its liked (≥ 4)
//!   training items. Hit rate@10 (a held-out rating ≥ 4 is in the list) and NDCG@10 (binary
//!   relevance: held-out ratings ≥ 4), over users with at least one such rating; catalogue
//!   coverage (the share of items in anyone's list), intra-list diversity (the mean over
//!   pairs of a list of 1 − Jaccard similarity of the items' topics) and the injected share
//!   (the share of slots filled by diversity injection).
//! - **per-cohort RMSE** and the largest gap between two cohorts.
//!
//! Users are evaluated in parallel and reduced in user order, so the figures are the same
//! bytes on any number of threads.

use fedpref_client_sdk::{
    Catalogue, CatalogueItem, Example, Guardrails, LocalTraining, MatrixFactorization,
    PersonalView, PreferenceModel, Ranker, Reason, Recommendation, Timestamp, UserState,
};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{Dataset, Rating, User};

/// A rating held out as relevant for ranking metrics.
pub const RELEVANT_RATING: f32 = 4.0;
/// The list length of the ranking metrics.
pub const TOP_K: usize = 10;

/// What an evaluation measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// Root mean squared error over all held-out ratings.
    pub rmse: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// Share of held-out ratings predicted within 0.5.
    pub rating_accuracy: f64,
    /// Hit rate@10 (`None` without ranking, or no user with a relevant held-out rating).
    pub hit_rate_at_10: Option<f64>,
    /// NDCG@10.
    pub ndcg_at_10: Option<f64>,
    /// Share of the catalogue in anyone's top 10.
    pub coverage: Option<f64>,
    /// Mean topic dissimilarity within a top 10 (`None` without topics).
    pub intra_list_diversity: Option<f64>,
    /// Share of the recommended slots filled by diversity injection.
    pub injected_share: Option<f64>,
    /// RMSE per cohort, in the data set's cohort order (`None` for an empty cohort).
    pub cohort_rmse: Vec<Option<f64>>,
    /// The largest difference between two cohorts' RMSE.
    pub cohort_rmse_gap: Option<f64>,
}

/// Training examples of a user: the most recent `max_examples` training ratings.
pub fn examples(train: &[Rating], training: &LocalTraining) -> Vec<Example> {
    example_iter(train, training).collect()
}

/// [`examples`] without collecting them (to fill a reused buffer).
pub fn example_iter<'a>(
    train: &'a [Rating],
    training: &LocalTraining,
) -> impl ExactSizeIterator<Item = Example> + 'a {
    let skip = train.len().saturating_sub(training.max_examples);
    train[skip..].iter().map(|r| Example {
        item: r.item as usize,
        target: f64::from(r.value),
        weight: 1.0,
    })
}

#[derive(Default)]
struct UserEval {
    sse: f64,
    ae: f64,
    within: usize,
    n: usize,
    ranked: Option<Ranked>,
}

struct Ranked {
    relevant: bool,
    injected: usize,
    hit: f64,
    ndcg: f64,
    top: Vec<u32>,
}

fn evaluate_user(
    model: &MatrixFactorization,
    data: &Dataset,
    user: &User,
    training: &LocalTraining,
    ranker: Option<&Ranker>,
    now: Timestamp,
) -> UserEval {
    let mut e = UserEval::default();
    if user.test.is_empty() {
        // A training-only user (the TFF preset): nothing held out to evaluate.
        return e;
    }
    let private = model.fit_private(&examples(&user.train, training), training);
    for r in &user.test {
        let p = model.predict(&private, r.item as usize).clamp(1.0, 5.0);
        let err = p - f64::from(r.value);
        e.sse += err * err;
        e.ae += err.abs();
        e.within += usize::from(err.abs() <= 0.5);
        e.n += 1;
    }
    if let Some(ranker) = ranker {
        let recs = recommend(model, data, user, private, ranker, now);
        let k = recs.len();
        let injected = recs
            .iter()
            .filter(|r| r.reason == Reason::Diversity)
            .count();
        let rows: Vec<u32> = recs
            .iter()
            .filter_map(|r| model.item_index(&r.item).map(|row| row as u32))
            .collect();
        let relevant: Vec<u32> = user
            .test
            .iter()
            .filter(|r| r.value >= RELEVANT_RATING)
            .map(|r| r.item)
            .collect();
        let dcg: f64 = rows
            .iter()
            .enumerate()
            .filter(|(_, j)| relevant.contains(j))
            .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
            .sum();
        let ideal: f64 = (0..relevant.len().min(k))
            .map(|i| 1.0 / ((i + 2) as f64).log2())
            .sum();
        e.ranked = Some(Ranked {
            relevant: !relevant.is_empty(),
            injected,
            hit: if dcg > 0.0 { 1.0 } else { 0.0 },
            ndcg: if ideal > 0.0 { dcg / ideal } else { 0.0 },
            top: rows,
        });
    }
    e
}

/// The list the SDK would show `user`: [`Ranker::rank`] — the guardrailed `recommend(10)` —
/// given its refitted private part, the items it rated in training as seen, every item
/// usable, and as established interests the topics of at least two of its liked (≥ 4)
/// training items.
pub fn recommend(
    model: &MatrixFactorization,
    data: &Dataset,
    user: &User,
    private: UserState,
    ranker: &Ranker,
    now: Timestamp,
) -> Vec<Recommendation> {
    let (items, topics) = (data.items.len(), data.topics.len());
    let mut seen = vec![false; items];
    for r in &user.train {
        seen[r.item as usize] = true;
    }
    let mut liked_topics = vec![0u32; topics];
    let mut liked = vec![];
    for r in user
        .train
        .iter()
        .rev()
        .filter(|r| r.value >= RELEVANT_RATING)
    {
        liked.push(r.item as usize);
        for &t in &data.items[r.item as usize].topics {
            liked_topics[t as usize] += 1;
        }
    }
    let view = PersonalView {
        private: Some(private),
        seen,
        usable: vec![true; items],
        followed: vec![false; topics],
        interests: liked_topics.iter().map(|&n| n >= 2).collect(),
        liked,
    };
    ranker.rank(Some(model), Some(&view), &Guardrails::default(), TOP_K, now)
}

/// The SDK's ranker over the data set's catalogue (topics by name, sensitive flags; no
/// publication times, so the recency floor never applies).
pub fn ranker(data: &Dataset, model: &MatrixFactorization) -> Ranker {
    let items = data
        .items
        .iter()
        .map(|i| CatalogueItem {
            item: i.id.clone(),
            topics: i
                .topics
                .iter()
                .map(|&t| data.topics[t as usize].clone())
                .collect(),
            sensitive: i.sensitive,
            published: None,
            title: None,
            format: None,
            popularity: None,
        })
        .collect();
    Ranker::new(Catalogue::new(items), Some(model))
}

/// The instant rankings are made at. No item has a publication time, so it does not matter.
pub fn ranking_time() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").expect("a valid timestamp")
}

fn dissimilarity(a: &[u16], b: &[u16]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 0.0;
    }
    let common = a.iter().filter(|t| b.contains(t)).count();
    let union = a.len() + b.len() - common;
    1.0 - common as f64 / union as f64
}

/// Evaluates `model` on every user (ranking metrics only when `ranking`).
pub fn evaluate(
    model: &MatrixFactorization,
    data: &Dataset,
    training: &LocalTraining,
    ranking: bool,
) -> Evaluation {
    let ranker = ranking.then(|| ranker(data, model));
    let now = ranking_time();
    let per_user: Vec<UserEval> = data
        .users
        .par_iter()
        .map(|u| evaluate_user(model, data, u, training, ranker.as_ref(), now))
        .collect();
    let cohorts = data.cohorts.len().max(1);
    let mut cohort_sse = vec![(0.0, 0usize); cohorts];
    let (mut sse, mut ae, mut within, mut n) = (0.0, 0.0, 0usize, 0usize);
    let (mut hits, mut ndcg, mut ranked_users) = (0.0, 0.0, 0usize);
    let (mut injected, mut slots) = (0usize, 0usize);
    let mut covered = vec![false; data.items.len()];
    let (mut diversity, mut lists) = (0.0, 0usize);
    for (u, e) in data.users.iter().zip(&per_user) {
        sse += e.sse;
        ae += e.ae;
        within += e.within;
        n += e.n;
        let c = &mut cohort_sse[(u.cohort as usize).min(cohorts - 1)];
        c.0 += e.sse;
        c.1 += e.n;
        if let Some(r) = &e.ranked {
            if r.relevant {
                hits += r.hit;
                ndcg += r.ndcg;
                ranked_users += 1;
            }
            injected += r.injected;
            slots += r.top.len();
            for &j in &r.top {
                covered[j as usize] = true;
            }
            if !data.topics.is_empty() && r.top.len() >= 2 {
                let mut pairs = (0.0, 0usize);
                for a in 0..r.top.len() {
                    for b in a + 1..r.top.len() {
                        pairs.0 += dissimilarity(
                            &data.items[r.top[a] as usize].topics,
                            &data.items[r.top[b] as usize].topics,
                        );
                        pairs.1 += 1;
                    }
                }
                diversity += pairs.0 / pairs.1 as f64;
                lists += 1;
            }
        }
    }
    let n = n.max(1) as f64;
    let cohort_rmse: Vec<Option<f64>> = cohort_sse
        .iter()
        .map(|&(s, k)| (k > 0).then(|| (s / k as f64).sqrt()))
        .collect();
    let present: Vec<f64> = cohort_rmse.iter().flatten().copied().collect();
    let cohort_rmse_gap = (present.len() >= 2).then(|| {
        present.iter().copied().fold(f64::MIN, f64::max)
            - present.iter().copied().fold(f64::MAX, f64::min)
    });
    Evaluation {
        rmse: (sse / n).sqrt(),
        mae: ae / n,
        rating_accuracy: within as f64 / n,
        hit_rate_at_10: (ranking && ranked_users > 0).then(|| hits / ranked_users as f64),
        ndcg_at_10: (ranking && ranked_users > 0).then(|| ndcg / ranked_users as f64),
        coverage: ranking
            .then(|| covered.iter().filter(|&&c| c).count() as f64 / covered.len() as f64),
        intra_list_diversity: (ranking && lists > 0).then(|| diversity / lists as f64),
        injected_share: (ranking && slots > 0).then(|| injected as f64 / slots as f64),
        cohort_rmse,
        cohort_rmse_gap,
    }
}

/// Ranking metrics of the non-personalised popularity ranking, the reference for
/// [`Evaluation::hit_rate_at_10`] and [`Evaluation::ndcg_at_10`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PopularityRanking {
    /// Hit rate@10 of the popularity list.
    pub hit_rate_at_10: f64,
    /// NDCG@10 of the popularity list.
    pub ndcg_at_10: f64,
}

/// Hit rate@10 and NDCG@10 of showing every user the 10 items with the most training
/// ratings (over all training users) that it has not rated in training, ties by row —
/// measured exactly as [`evaluate`] measures the SDK's lists: over users with at least one
/// held-out rating ≥ 4, binary relevance. `None` when no user has such a rating.
pub fn popularity_ranking(data: &Dataset) -> Option<PopularityRanking> {
    let mut count = vec![0u64; data.items.len()];
    for u in data.users.iter().filter(|u| u.trains) {
        for r in &u.train {
            count[r.item as usize] += 1;
        }
    }
    let mut by_popularity: Vec<u32> = (0..data.items.len() as u32).collect();
    by_popularity.sort_by_key(|&j| (std::cmp::Reverse(count[j as usize]), j));
    let (mut hits, mut ndcg, mut users) = (0.0, 0.0, 0usize);
    for user in &data.users {
        let relevant: Vec<u32> = user
            .test
            .iter()
            .filter(|r| r.value >= RELEVANT_RATING)
            .map(|r| r.item)
            .collect();
        if relevant.is_empty() {
            continue;
        }
        let top: Vec<u32> = by_popularity
            .iter()
            .copied()
            .filter(|j| !user.train.iter().any(|r| r.item == *j))
            .take(TOP_K)
            .collect();
        let dcg: f64 = top
            .iter()
            .enumerate()
            .filter(|(_, j)| relevant.contains(j))
            .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
            .sum();
        let ideal: f64 = (0..relevant.len().min(top.len()))
            .map(|i| 1.0 / ((i + 2) as f64).log2())
            .sum();
        hits += if dcg > 0.0 { 1.0 } else { 0.0 };
        ndcg += if ideal > 0.0 { dcg / ideal } else { 0.0 };
        users += 1;
    }
    (users > 0).then(|| PopularityRanking {
        hit_rate_at_10: hits / users as f64,
        ndcg_at_10: ndcg / users as f64,
    })
}

/// The RMSE of predicting the training mean for every held-out rating.
pub fn global_mean_rmse(data: &Dataset) -> f64 {
    let mean = data.train_mean();
    let (sse, n) = data
        .users
        .iter()
        .flat_map(|u| &u.test)
        .fold((0.0, 0usize), |(s, n), r| {
            (s + (f64::from(r.value) - mean).powi(2), n + 1)
        });
    (sse / n.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{RawRating, from_raw};

    fn rating(user: &str, item: &str, value: f32, time: i64) -> RawRating {
        RawRating {
            user: user.into(),
            item: item.into(),
            value,
            time,
        }
    }

    #[test]
    fn the_popularity_list_skips_what_the_user_rated_and_scores_like_the_sdks_lists() {
        // Training counts: item 1 four times; 2, 8 and 9 three times; 4, 5 and 6 once; 3 and
        // 7 never. User a rated 1, 4, 5 and 6 in training, so its list is 2, 8, 9 (ties by
        // row), then 3 and 7: its held-out 5-star item 3 comes fourth.
        let mut raw = vec![];
        for (u, t) in [("b", 1), ("c", 1), ("d", 1)] {
            raw.push(rating(u, "1", 3.0, t));
            raw.push(rating(u, "2", 3.0, t + 1));
            raw.push(rating(u, "9", 1.0, t + 2));
            raw.push(rating(u, "8", 2.0, t + 3));
            raw.push(rating(u, "7", 2.0, t + 4));
        }
        for (item, t) in [("1", 1), ("4", 2), ("5", 3), ("6", 4), ("3", 5)] {
            raw.push(rating("a", item, if item == "3" { 5.0 } else { 2.0 }, t));
        }
        let data = from_raw("tiny", raw, vec![]).unwrap();
        let a = data.users.iter().find(|u| u.id == "a").unwrap();
        assert_eq!(a.test.len(), 1);
        let p = popularity_ranking(&data).unwrap();
        // Only user a has a relevant held-out rating: a hit at rank 4, NDCG 1/log2(5).
        assert_eq!(p.hit_rate_at_10, 1.0);
        assert!((p.ndcg_at_10 - 1.0 / 5f64.log2()).abs() < 1e-12, "{p:?}");
    }
}
