//! Aggregation throughput — `RoundAggregator::add` per privacy mode — beside a memory-bandwidth
//! bound measured in the same run.
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/target-agg cargo bench -p fedpref-coordinator --bench aggregation
//! ```
//!
//! For d = 16,384 and d = 1,048,576 f32 parameters:
//!
//! - `bound`: the streaming floor of the mean path, `acc[i] += f64::from(x[i])` over an f32
//!   update and an f64 accumulator of the model's size: 4 bytes read + 8 read + 8 written =
//!   20 bytes per coordinate, the bytes any f64 accumulation of f32 updates must move. It is
//!   timed exactly like the `add` benches (same update pool, same accumulator size).
//! - `add/none` (weighted FedAvg, weight 3), `add/local` (weight 1): validation (length,
//!   finiteness, weight) and the f64 accumulation.
//! - `add/central` (σ = 1, C = 1, weight 1): f32 → f64, `clip_l2`, and the privacy crate's
//!   exact lattice sum (`ClippedSum::add`).
//!
//! Updates cycle through a pool of 16 distinct updates (1 MiB at d = 16,384, where everything
//! stays in cache, so the "bandwidth" there is cache bandwidth; 64 MiB at d = 1,048,576, twice
//! the 32 MiB L3 of the machine docs/benchmarks.md's numbers come from, so updates stream from DRAM).
//! Criterion prints its own estimates; at the end a table gives, for each mode, ns per update,
//! ns per coordinate, updates/s, the effective bandwidth 20·d bytes / time, and the fraction
//! of the bound achieved (bound time / add time), from the mean time of all timed iterations.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use fedpref_coordinator::aggregation::{AggregationPrivacy, RoundAggregator, ServerOptimizer};

const DIMENSIONS: [usize; 2] = [16_384, 1_048_576];
const POOL: usize = 16;
/// Bytes the mean path must move per coordinate: read f32, read and write f64.
const BYTES_PER_COORDINATE: usize = 4 + 8 + 8;

/// (dimension, name) → (iterations, total time), over every timed call.
type Timings = BTreeMap<(usize, &'static str), (u64, Duration)>;
static TIMINGS: Mutex<Timings> = Mutex::new(BTreeMap::new());

fn record(dimension: usize, name: &'static str, iterations: u64, elapsed: Duration) {
    let mut timings = TIMINGS.lock().expect("no panics while holding the lock");
    let entry = timings.entry((dimension, name)).or_default();
    entry.0 += iterations;
    entry.1 += elapsed;
}

/// `POOL` updates with coordinates uniform in [−0.01, 0.01), from SplitMix64.
fn update_pool(dimension: usize) -> Vec<Vec<f32>> {
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..POOL)
        .map(|_| {
            (0..dimension)
                .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02)
                .collect()
        })
        .collect()
}

/// The bandwidth floor: the accumulation alone, as plainly as it can be written.
fn bound_kernel(accumulator: &mut [f64], update: &[f32]) {
    for (a, &x) in accumulator.iter_mut().zip(update) {
        *a += f64::from(x);
    }
}

fn bench(c: &mut Criterion) {
    let optimizer = ServerOptimizer::default();
    let modes: [(&'static str, AggregationPrivacy, f64); 3] = [
        ("add/none", AggregationPrivacy::None, 3.0),
        ("add/local", AggregationPrivacy::Local, 1.0),
        (
            "add/central",
            AggregationPrivacy::Central {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
                expected_cohort_size: 1000.0,
            },
            1.0,
        ),
    ];
    for dimension in DIMENSIONS {
        let pool = update_pool(dimension);
        let mut group = c.benchmark_group(format!("aggregation/d={dimension}"));
        group.throughput(Throughput::Bytes((BYTES_PER_COORDINATE * dimension) as u64));
        if dimension > 100_000 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(6));
        }

        let mut accumulator = vec![0.0_f64; dimension];
        group.bench_function("bound", |b| {
            b.iter_custom(|iterations| {
                let start = Instant::now();
                for i in 0..iterations {
                    bound_kernel(&mut accumulator, black_box(&pool[i as usize % POOL]));
                }
                let elapsed = start.elapsed();
                record(dimension, "bound", iterations, elapsed);
                elapsed
            })
        });
        black_box(&accumulator);

        for (name, privacy, weight) in modes {
            let mut round = RoundAggregator::new(&optimizer, &privacy, dimension)
                .expect("a valid configuration");
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iterations| {
                    let start = Instant::now();
                    for i in 0..iterations {
                        round
                            .add(black_box(&pool[i as usize % POOL]), weight)
                            .expect("a valid update");
                    }
                    let elapsed = start.elapsed();
                    record(dimension, name, iterations, elapsed);
                    elapsed
                })
            });
            black_box(round.contributions());
        }
        group.finish();
    }
}

fn print_summary() {
    let timings = TIMINGS.lock().expect("no panics while holding the lock");
    let per_update = |dimension: usize, name| {
        timings
            .get(&(dimension, name))
            .filter(|(n, _)| *n > 0)
            .map(|(n, t)| t.as_secs_f64() / *n as f64)
    };
    println!();
    println!(
        "| d | path | ns/update | ns/coordinate | updates/s | GB/s (20 B/coord) | fraction of bound |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for dimension in DIMENSIONS {
        let bound = per_update(dimension, "bound");
        for name in ["bound", "add/none", "add/local", "add/central"] {
            let Some(seconds) = per_update(dimension, name) else {
                continue;
            };
            let gigabytes = (BYTES_PER_COORDINATE * dimension) as f64 / seconds / 1e9;
            let fraction = bound.map_or("—".to_string(), |b| {
                format!("{:.0}%", 100.0 * b / seconds)
            });
            println!(
                "| {dimension} | {name} | {:.0} | {:.3} | {:.0} | {gigabytes:.1} | {fraction} |",
                seconds * 1e9,
                seconds * 1e9 / dimension as f64,
                1.0 / seconds,
            );
        }
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
    print_summary();
}
