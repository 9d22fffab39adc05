//! The PLD accountant's two costs that matter:
//!
//! - `epsilon q=0.01 σ=1 T=10000`: build the single-round PLD at the reference grid
//!   (Δ = 1e-4), compose 10,000 rounds by FFT power, read ε at δ = 1e-5 (goal < 0.5 s);
//! - `run of 1000 rounds, one at a time`: what a coordinator or a device does, appending one
//!   round to its running PLD and reading ε after each; divide by 1000 for the amortised
//!   per-round step (goal < 10 ms);
//! - `one more round after 1000`: the step at the end of such a run.
//! - `engine: 1000 rounds q=0.01 σ=1 with ε after each`: what a run's accounting does
//!   (`RepeatedReleases`: every round releases the same mechanism, so ε after T rounds is
//!   one FFT power of the kept round); divide by 1000 for the per-round step.
//!
//! `cargo bench -p fedpref-privacy --bench pld`

use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fedpref_privacy::pld::{PldAccountant, RepeatedReleases};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pld");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    group.bench_function("epsilon q=0.01 σ=1 T=10000", |b| {
        b.iter(|| {
            let mut acc = PldAccountant::default();
            acc.compose_subsampled_gaussian(0.01, 1.0, 10_000).unwrap();
            acc.epsilon(1e-5).unwrap().epsilon
        })
    });

    group.bench_function("run of 1000 rounds q=0.01 σ=1, one at a time", |b| {
        b.iter(|| {
            let mut acc = PldAccountant::default();
            let mut eps = 0.0;
            for _ in 0..1000 {
                acc.compose_subsampled_gaussian(0.01, 1.0, 1).unwrap();
                eps = acc.epsilon(1e-5).unwrap().epsilon;
            }
            eps
        })
    });

    let mut after_1000 = PldAccountant::default();
    for _ in 0..1000 {
        after_1000
            .compose_subsampled_gaussian(0.01, 1.0, 1)
            .unwrap();
    }
    group.bench_function("one more round after 1000", |b| {
        b.iter_batched(
            || after_1000.clone(),
            |mut acc| {
                acc.compose_subsampled_gaussian(0.01, 1.0, 1).unwrap();
                acc.epsilon(1e-5).unwrap().epsilon
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("engine: 1000 rounds q=0.01 σ=1 with ε after each", |b| {
        b.iter(|| {
            let mut acc = RepeatedReleases::new();
            let mut eps = 0.0;
            for t in 1..=1000 {
                eps = acc.epsilon(0.01, 1.0, t, 1e-5).unwrap();
            }
            eps
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
