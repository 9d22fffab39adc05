//! Property tests of the guardrails over random catalogues and profiles.

use std::collections::HashSet;

use fedpref_client_sdk::{
    Catalogue, CatalogueItem, ExampleTable, Feedback, Guardrails, MatrixFactorization, Permissions,
    PersonalView, Ranker, Reason, Signal, Timestamp, UserState, derive_implicit,
};
use proptest::prelude::*;

const TOPICS: [&str; 8] = [
    "Comedy", "Drama", "Jazz", "Science", "Sport", "Travel", "Food", "Art",
];
const SENSITIVE: [&str; 2] = ["Health", "Religion"];
const DAY: i64 = 86_400_000;

fn now() -> Timestamp {
    Timestamp::from_millis(20_000 * DAY)
}

#[derive(Debug, Clone)]
struct Case {
    items: Vec<(usize, bool, i64)>, // (topic index, sensitive, age in days)
    interests: Vec<usize>,
    seen: Vec<usize>,
    factor: Vec<f64>,
    bias: f64,
    k: usize,
    fraction_tenths: u32,
}

fn cases() -> impl Strategy<Value = Case> {
    (60usize..160).prop_flat_map(|n| {
        (
            prop::collection::vec((0usize..10, prop::bool::weighted(0.15), 0i64..60), n),
            prop::collection::vec(0usize..8, 0..4),
            prop::collection::vec(0..n, 0..20),
            prop::collection::vec(-1.0f64..1.0, 4),
            -1.0f64..1.0,
            1usize..=25,
            0u32..=10,
        )
            .prop_map(
                |(items, interests, seen, factor, bias, k, fraction_tenths)| Case {
                    items,
                    interests,
                    seen,
                    factor,
                    bias,
                    k,
                    fraction_tenths,
                },
            )
    })
}

fn build(case: &Case) -> (Ranker, MatrixFactorization, PersonalView, Guardrails) {
    let items: Vec<CatalogueItem> = case
        .items
        .iter()
        .enumerate()
        .map(|(i, &(t, sensitive, age))| {
            let topic = if t >= 8 { SENSITIVE[t - 8] } else { TOPICS[t] };
            CatalogueItem {
                item: format!("i{i}"),
                topics: vec![topic.into()],
                sensitive: sensitive || t >= 8,
                published: Some(now().plus_millis(-age * DAY)),
                title: None,
                format: None,
                popularity: None,
            }
        })
        .collect();
    let ids = items.iter().map(|i| i.item.clone()).collect();
    let model = MatrixFactorization::initial(1, ids, 4, 0.5, case.items.len() as u64).unwrap();
    let catalogue = Catalogue::new(items);
    let permissions = Permissions::default();
    let usable: Vec<bool> = catalogue
        .items()
        .iter()
        .map(|i| permissions.usable(i))
        .collect();
    let mut seen = vec![false; catalogue.len()];
    for &s in &case.seen {
        seen[s] = true;
    }
    let mut followed = vec![false; catalogue.topic_count()];
    for &t in &case.interests {
        if let Some(id) = catalogue.topic_id(TOPICS[t]) {
            followed[id as usize] = true;
        }
    }
    let view = PersonalView {
        private: Some(UserState {
            factor: case.factor.clone(),
            bias: case.bias,
        }),
        seen,
        usable,
        interests: followed.clone(),
        followed,
        liked: case.seen.clone(),
    };
    let guardrails = Guardrails {
        diversity_fraction: f64::from(case.fraction_tenths) / 10.0,
        ..Guardrails::default()
    };
    (
        Ranker::new(catalogue, Some(&model)),
        model,
        view,
        guardrails,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_injected_share_is_exactly_the_documented_rounding_of_k_times_the_fraction(case in cases()) {
        let (ranker, model, view, guardrails) = build(&case);
        let recs = ranker.rank(Some(&model), Some(&view), &guardrails, case.k, now());
        let catalogue = ranker.catalogue();
        let outside = |p: usize| {
            view.usable[p] && !view.seen[p]
                && !catalogue.topic_ids(p).iter().any(|&t| view.interests[t as usize])
        };
        let available = (0..catalogue.len()).filter(|&p| outside(p)).count();
        let expected = ((case.k as f64 * guardrails.diversity_fraction + 0.5).floor() as usize)
            .min(available);
        let injected: Vec<_> = recs.iter().filter(|r| r.reason == Reason::Diversity).collect();
        prop_assert_eq!(injected.len(), expected);
        for r in &injected {
            prop_assert!(outside(catalogue.position(&r.item).unwrap()), "{} is inside the interests", r.item);
        }
        // Never a seen, unusable (sensitive) or repeated item; the list is full when it can be.
        let mut ids = HashSet::new();
        for r in &recs {
            let p = catalogue.position(&r.item).unwrap();
            prop_assert!(view.usable[p] && !view.seen[p], "{} may not be recommended", r.item);
            prop_assert!(ids.insert(r.item.clone()));
        }
        let eligible = (0..catalogue.len()).filter(|&p| view.usable[p] && !view.seen[p]).count();
        prop_assert_eq!(recs.len(), case.k.min(eligible));
    }

    #[test]
    fn the_recency_floor_holds_whenever_enough_recent_items_exist(case in cases()) {
        let (ranker, model, view, guardrails) = build(&case);
        let recs = ranker.rank(Some(&model), Some(&view), &guardrails, case.k, now());
        let catalogue = ranker.catalogue();
        let recent_since = now().minus_days(guardrails.recency_window_days);
        let is_recent = |item: &str| {
            catalogue.get(catalogue.position(item).unwrap()).published.unwrap() >= recent_since
        };
        let recent_eligible = (0..catalogue.len())
            .filter(|&p| view.usable[p] && !view.seen[p] && is_recent(&catalogue.get(p).item))
            .count();
        let n_div = recs.iter().filter(|r| r.reason == Reason::Diversity).count();
        let floor = guardrails.recency_slots(case.k);
        let have = recs.iter().filter(|r| is_recent(&r.item)).count();
        // The floor can only be short when recent items or replaceable slots run out.
        prop_assert!(have >= floor.min(recent_eligible).min(case.k - n_div));
    }

    #[test]
    fn sensitive_items_never_feed_the_profile_or_the_examples_without_consent(
        events in prop::collection::vec((0usize..30, 0u8..6, 0i64..30), 0..80),
        consented in prop::bool::ANY,
    ) {
        let items: Vec<CatalogueItem> = (0..30)
            .map(|i| CatalogueItem {
                item: format!("i{i}"),
                topics: vec![if i % 3 == 0 { "Health".to_owned() } else { TOPICS[i % 8].to_owned() }],
                sensitive: i % 3 == 0,
                published: None,
                title: None,
                format: Some("video".into()),
                popularity: None,
            })
            .collect();
        let catalogue = Catalogue::new(items);
        let mut permissions = Permissions::default();
        if consented {
            permissions.consented.insert("Health".into());
        }
        let feedback: Vec<Feedback> = events
            .iter()
            .map(|&(i, s, age)| Feedback {
                item: format!("i{i}"),
                signal: [Signal::Rating(4.0), Signal::ThumbsUp, Signal::ThumbsDown, Signal::Save, Signal::Dismiss, Signal::Dwell(40.0)][s as usize],
                at: now().plus_millis(-age * DAY),
            })
            .collect();
        let table = ExampleTable::default();
        let rows = derive_implicit(&feedback, &catalogue, &permissions, &table, now().minus_days(90));
        let examples = table.item_examples(&feedback, |id| {
            catalogue.position(id).is_some_and(|p| permissions.usable(catalogue.get(p)))
        });
        let touched_sensitive = rows.iter().any(|r| r.value == "Health" || r.source_item[1..].parse::<usize>().unwrap() % 3 == 0)
            || examples.iter().any(|e| e.item[1..].parse::<usize>().unwrap() % 3 == 0);
        let any_sensitive_event = events.iter().any(|&(i, _, _)| i % 3 == 0);
        if consented {
            prop_assert_eq!(touched_sensitive, any_sensitive_event);
        } else {
            prop_assert!(!touched_sensitive);
        }
    }
}
