//! One local round (fit + update + clip + noise) at k = 16 for 1,000 and 100,000 items,
//! stage by stage, and `recommend(10)` over 100,000 items.
//!
//! `cargo bench -p fedpref-client-sdk --bench local_round`

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fedpref_client_sdk::fedpref_privacy::{GaussianMechanism, SecureSampler, clip_l2};
use fedpref_client_sdk::{
    CatalogueItem, Device, DeviceConfig, Event, Example, Feedback, LocalTraining,
    MatrixFactorization, PreferenceModel, Signal, Timestamp,
};

const K: usize = 16;
const EXAMPLES: usize = 50;

fn model(items: usize) -> MatrixFactorization {
    MatrixFactorization::initial(1, (0..items).map(|i| format!("i{i}")).collect(), K, 0.1, 42)
        .unwrap()
}

fn examples(items: usize) -> Vec<Example> {
    (0..EXAMPLES)
        .map(|j| Example {
            item: (j * 7919) % items,
            target: 1.0 + (j % 5) as f64,
            weight: 1.0,
        })
        .collect()
}

fn local_round(c: &mut Criterion) {
    let training = LocalTraining::default();
    let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
    for items in [1_000usize, 100_000] {
        let m = model(items);
        let ex = examples(items);
        let private = m.fit_private(&ex, &training);
        let update = m.shared_update(&private, &ex, &training);
        let clipped = clip_l2(update.clone(), 1.0).unwrap();
        let mut sampler = SecureSampler::from_os().unwrap();
        let mut g = c.benchmark_group(format!("local_round/{items}_items"));
        if items > 10_000 {
            g.sample_size(10);
        }
        g.bench_function("fit", |b| {
            b.iter(|| m.fit_private(black_box(&ex), &training))
        });
        g.bench_function("update", |b| {
            b.iter(|| m.shared_update(black_box(&private), &ex, &training))
        });
        g.bench_function("clip", |b| {
            b.iter_batched(
                || update.clone(),
                |u| clip_l2(u, 1.0).unwrap(),
                BatchSize::LargeInput,
            )
        });
        g.bench_function("noise", |b| {
            b.iter_batched(
                || clipped.clone(),
                |cl| mechanism.release_update(cl, &mut sampler).unwrap(),
                BatchSize::LargeInput,
            )
        });
        g.bench_function("total", |b| {
            b.iter(|| {
                let p = m.fit_private(black_box(&ex), &training);
                let u = m.shared_update(&p, &ex, &training);
                let cl = clip_l2(u, 1.0).unwrap();
                mechanism.release_update(cl, &mut sampler).unwrap()
            })
        });
        g.finish();
    }
}

fn recommend(c: &mut Criterion) {
    let items = 100_000;
    let now = Timestamp::parse_rfc3339("2026-06-01T12:00:00Z").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut device = Device::open(dir.path().join("bench.db"), DeviceConfig::default()).unwrap();
    let topics = [
        "Comedy", "Drama", "Jazz", "Science", "Sport", "Travel", "Food", "Art",
    ];
    let mut events: Vec<Event> = (0..items)
        .map(|i| {
            Event::Item(CatalogueItem {
                item: format!("i{i}"),
                topics: vec![topics[i % 8].into(), topics[(i / 8) % 8].into()],
                sensitive: i % 50 == 0,
                published: Some(now.plus_millis(-((i % 400) as i64) * 86_400_000)),
                title: None,
                format: None,
                popularity: None,
            })
        })
        .collect();
    events.extend((0..EXAMPLES).map(|j| {
        Event::Feedback(Feedback {
            item: format!("i{}", (j * 7919) % items),
            signal: if j % 3 == 0 {
                Signal::Rating(4.5)
            } else {
                Signal::ThumbsUp
            },
            at: now.plus_millis(-(j as i64) * 3_600_000),
        })
    }));
    device.record(&events, now).unwrap();
    device.install_model(model(items)).unwrap();
    assert_eq!(device.recommend(10, now).unwrap().len(), 10);
    let mut g = c.benchmark_group("recommend");
    g.bench_function("k10_100000_items", |b| {
        b.iter(|| device.recommend(black_box(10), now).unwrap())
    });
    g.finish();
}

criterion_group!(benches, local_round, recommend);
criterion_main!(benches);
