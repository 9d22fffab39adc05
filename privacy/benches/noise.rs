//! Clipping + noising a dense update, per sampler, beside the cost of the RNG alone.
//!
//! `cargo bench -p fedpref-privacy --bench noise`. Criterion reports elements/s; one
//! element is one coordinate, so ns per coordinate = 1e9 / (elements/s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fedpref_privacy::{GaussianMechanism, SecureSampler, SimulationSampler, clip_l2};
use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng, Xoshiro256PlusPlus};
use rand_core::Rng;

fn update(dimension: usize) -> Vec<f64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    (0..dimension)
        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
    for dimension in [16_384usize, 1_048_576] {
        let mut group = c.benchmark_group(format!("d={dimension}"));
        group.throughput(Throughput::Elements(dimension as u64));
        if dimension > 100_000 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(8));
        }
        let values = update(dimension);

        // The floor: one 64-bit word per coordinate from each sampler's generator.
        let mut chacha = ChaCha20Rng::try_from_rng(&mut SysRng).unwrap();
        group.bench_function(BenchmarkId::new("rng_floor", "chacha20"), |b| {
            b.iter(|| (0..dimension).fold(0u64, |acc, _| acc ^ chacha.next_u64()))
        });
        let mut xoshiro = Xoshiro256PlusPlus::seed_from_u64(2);
        group.bench_function(BenchmarkId::new("rng_floor", "xoshiro256pp"), |b| {
            b.iter(|| (0..dimension).fold(0u64, |acc, _| acc ^ xoshiro.next_u64()))
        });

        group.bench_function(
            BenchmarkId::new("rng_floor", "xoshiro256pp_ziggurat_normal"),
            |b| {
                b.iter(|| {
                    (0..dimension).fold(0.0f64, |acc, _| {
                        acc + rand_distr::Distribution::<f64>::sample(
                            &rand_distr::StandardNormal,
                            &mut xoshiro,
                        )
                    })
                })
            },
        );

        group.bench_function("clip_only", |b| {
            b.iter(|| clip_l2(black_box(values.clone()), 1.0).unwrap())
        });

        let mut secure = SecureSampler::from_os().unwrap();
        group.bench_function(BenchmarkId::new("clip_and_noise", "secure"), |b| {
            b.iter(|| {
                let clipped = clip_l2(black_box(values.clone()), 1.0).unwrap();
                mechanism.release_update(clipped, &mut secure).unwrap()
            })
        });

        let mut simulation = SimulationSampler::seed_from_u64(3);
        group.bench_function(BenchmarkId::new("clip_and_noise", "simulation"), |b| {
            b.iter(|| {
                let clipped = clip_l2(black_box(values.clone()), 1.0).unwrap();
                mechanism.release_update(clipped, &mut simulation).unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
