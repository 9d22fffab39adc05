//! One round of tree aggregation at d = 16,384: take the round's clipped sum, add one node's
//! noise, release the prefix sum. Compare with the `noise` bench's single release.
//!
//! `cargo bench -p fedpref-privacy --bench tree`. Criterion reports elements/s; one element
//! is one coordinate.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fedpref_privacy::tree::{TreeAggregator, TreeSchedule};
use fedpref_privacy::{GaussianMechanism, SecureSampler, SimulationSampler, clip_l2};

const DIMENSION: usize = 16_384;

fn bench(c: &mut Criterion) {
    let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
    let mut group = c.benchmark_group(format!("tree d={DIMENSION}"));
    group.throughput(Throughput::Elements(DIMENSION as u64));
    let update = clip_l2(vec![1e-3; DIMENSION], 1.0).unwrap();
    let mut round_sum = mechanism.sum(DIMENSION).unwrap();
    round_sum.add(&update, 1.0).unwrap();

    let mut tree = TreeAggregator::new(mechanism, DIMENSION, TreeSchedule::single_tree()).unwrap();
    let mut sampler = SimulationSampler::seed_from_u64(1);
    group.bench_function(BenchmarkId::new("release_round", "simulation"), |b| {
        b.iter(|| tree.release_round(&round_sum, &mut sampler).unwrap())
    });

    let mut tree = TreeAggregator::new(mechanism, DIMENSION, TreeSchedule::single_tree()).unwrap();
    let mut sampler = SecureSampler::from_os().unwrap();
    group.bench_function(BenchmarkId::new("release_round", "secure"), |b| {
        b.iter(|| tree.release_round(&round_sum, &mut sampler).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
