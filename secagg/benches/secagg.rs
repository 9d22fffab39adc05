//! Per-device cost of secure aggregation against a plain upload: computation time and bytes
//! sent per round, for cohorts of 100 and 1,000 and a model of 16,384 parameters.
//!
//! `cargo bench -p fedpref-secagg --bench secagg` runs whole rounds in process (every device
//! and the server, one thread), with 5 % of the devices dropping after key sharing so that
//! the server also recovers their masks. Times are wall-clock per call, summed per device;
//! bytes are the protobuf encodings of the device's four messages (task references and gRPC
//! framing, common to every upload, left out). `-- --quick` runs only n = 100.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedpref_secagg::rng::simulation_rng;
use fedpref_secagg::{
    Client, EncodedInput, EncodingParams, EncryptedShare, RoundConfig, RoundContext, SecAggParams,
    Server, ShareKeys, Unmask,
};

const DIMENSION: usize = 16_384;
const DROPOUT_RATE: f64 = 0.1;
const CORRUPTION_RATE: f64 = 0.05;
const DROPPED_BEFORE_UPLOAD: f64 = 0.05;

struct Figures {
    label: String,
    n: u32,
    degree: u32,
    threshold: u32,
    device_time: Vec<Duration>,
    device_bytes: Vec<usize>,
    server_time: Duration,
}

fn run(n: u32, complete: bool) -> Figures {
    let mut params = SecAggParams::choose(n, DROPOUT_RATE, CORRUPTION_RATE).unwrap();
    if complete && !params.complete {
        params.complete = true;
        params.degree = n - 1;
        params.threshold = n / 2 + 1;
    }
    let encoding = EncodingParams {
        clip_norm: 1.0,
        scale: FixedPointScale::for_cohort(n),
        cohort_size: n as usize,
        dimension: DIMENSION,
        device_noise_std: 0.0,
    };
    let config = RoundConfig::new(
        RoundContext([1; 32]),
        &params,
        [2; 32],
        encoding,
        params.threshold,
    )
    .unwrap();
    let mut rng = simulation_rng(42, &[u64::from(n)]);
    let dropped: BTreeSet<u32> = (1..=n)
        .filter(|i| f64::from(*i % 100) < DROPPED_BEFORE_UPLOAD * 100.0)
        .collect();
    let input: EncodedInput = config
        .encoding
        .encode_f64(&vec![0.5 / (DIMENSION as f64).sqrt(); DIMENSION])
        .unwrap();

    let mut time = vec![Duration::ZERO; n as usize + 1];
    let mut bytes = vec![0usize; n as usize + 1];
    let mut server_time = Duration::ZERO;
    let mut server = Server::new(config.clone()).unwrap();

    let mut s1 = Vec::new();
    for i in 1..=n {
        let start = Instant::now();
        let (state, keys) = Client::advertise(config.clone(), &mut rng).unwrap();
        time[i as usize] += start.elapsed();
        bytes[i as usize] += keys.wire_len();
        let start = Instant::now();
        server.receive_keys(i, keys).unwrap();
        server_time += start.elapsed();
        s1.push(state);
    }
    let start = Instant::now();
    let directories = server.close_advertise_keys().unwrap();
    server_time += start.elapsed();
    let mut s2 = Vec::new();
    for ((i, d), state) in directories.into_iter().zip(s1) {
        let start = Instant::now();
        let (state, shares) = state.share_keys(&d, &mut rng).unwrap();
        time[i as usize] += start.elapsed();
        bytes[i as usize] += shares.wire_len();
        let start = Instant::now();
        server.receive_shares(i, shares).unwrap();
        server_time += start.elapsed();
        s2.push(state);
    }
    let start = Instant::now();
    let inboxes = server.close_share_keys().unwrap();
    server_time += start.elapsed();
    let mut s3 = Vec::new();
    for ((i, inbox), state) in inboxes.into_iter().zip(s2) {
        if dropped.contains(&i) {
            continue;
        }
        let start = Instant::now();
        let (state, masked) = state.masked_input(&inbox, &input).unwrap();
        time[i as usize] += start.elapsed();
        bytes[i as usize] += masked.wire_len();
        let start = Instant::now();
        server.receive_masked_input(i, masked).unwrap();
        server_time += start.elapsed();
        s3.push(state);
    }
    let start = Instant::now();
    let plans = server.close_masked_input().unwrap();
    server_time += start.elapsed();
    for ((i, plan), state) in plans.into_iter().zip(s3) {
        let start = Instant::now();
        let reply = state.unmask(&plan).unwrap();
        time[i as usize] += start.elapsed();
        bytes[i as usize] += reply.wire_len();
        let start = Instant::now();
        server.receive_unmask(i, reply).unwrap();
        server_time += start.elapsed();
    }
    let start = Instant::now();
    let output = server.finish().unwrap();
    server_time += start.elapsed();
    // The sum is exact: every contributor sent the same input.
    let contributors = output.contributors.len() as u32;
    let expected: Vec<u32> = input
        .values()
        .iter()
        .map(|v| v.wrapping_mul(contributors))
        .collect();
    assert_eq!(output.sum, expected);

    let survivors: Vec<usize> = (1..=n as usize)
        .filter(|i| !dropped.contains(&(*i as u32)))
        .collect();
    Figures {
        label: if params.complete {
            "SecAgg (complete graph)".into()
        } else {
            "SecAgg+ (Harary graph)".into()
        },
        n,
        degree: params.degree,
        threshold: params.threshold,
        device_time: survivors.iter().map(|&i| time[i]).collect(),
        device_bytes: survivors.iter().map(|&i| bytes[i]).collect(),
        server_time,
    }
}

/// A scale that passes the overflow check for the cohort.
struct FixedPointScale;
impl FixedPointScale {
    fn for_cohort(n: u32) -> f64 {
        fedpref_secagg::FixedPoint::largest_scale(1.0, n as usize, DIMENSION, 0.0).unwrap()
    }
}

/// Bytes a device of the complete graph sends at cohort n, from the message sizes alone.
fn complete_graph_bytes(n: u32) -> usize {
    let share = EncryptedShare {
        sender_index: 1,
        recipient_index: n,
        ciphertext: vec![0; 104],
    };
    let shares = ShareKeys {
        shares: vec![share; n as usize - 1],
    };
    let reveal = fedpref_secagg::RevealedShare {
        owner_index: n,
        kind: fedpref_secagg::ShareKind::SelfMaskSeed,
        share: vec![0; 40],
    };
    let unmask = Unmask {
        shares: vec![reveal; n as usize - 1],
    };
    let keys = 2 * (2 + 32);
    keys + shares.wire_len() + (4 * DIMENSION + 4) + unmask.wire_len()
}

fn report(f: &Figures) {
    let plain = 4 * DIMENSION;
    let mean_t = f.device_time.iter().sum::<Duration>() / f.device_time.len() as u32;
    let max_t = f.device_time.iter().max().unwrap();
    let mean_b = f.device_bytes.iter().sum::<usize>() as f64 / f.device_bytes.len() as f64;
    let max_b = *f.device_bytes.iter().max().unwrap();
    println!(
        "n = {:>5}  {:<24} k = {:>4}  t = {:>4}  device time mean {:>8.2} ms, max {:>8.2} ms  \
         bytes sent mean {:>9.0}, max {:>9} = {:.3}× plain ({plain} B)  server {:>8.1} ms",
        f.n,
        f.label,
        f.degree,
        f.threshold,
        mean_t.as_secs_f64() * 1e3,
        max_t.as_secs_f64() * 1e3,
        mean_b,
        max_b,
        max_b as f64 / plain as f64,
        f.server_time.as_secs_f64() * 1e3,
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "d = {DIMENSION}, drop-out rate {DROPOUT_RATE}, corruption rate {CORRUPTION_RATE} for k and t; \
         {:.0} % of devices drop after key sharing",
        DROPPED_BEFORE_UPLOAD * 100.0
    );
    println!("k and t chosen by SecAggParams::choose (σ = 40, η = 20 bits):");
    for (dropout, corruption) in [(0.1, 0.05), (0.3, 0.0), (0.2, 0.1)] {
        let row: Vec<String> = [50u32, 100, 1000, 10_000, 100_000]
            .iter()
            .map(|&n| {
                let p = SecAggParams::choose(n, dropout, corruption).unwrap();
                format!(
                    "n = {n}: k = {}, t = {}{}",
                    p.degree,
                    p.threshold,
                    if p.complete { " (complete)" } else { "" }
                )
            })
            .collect();
        println!("  δ = {dropout}, γ = {corruption}: {}", row.join("; "));
    }
    // Plain upload: a fixed-point encoding only, 4 bytes per parameter.
    let plain_cost = {
        let fp = fedpref_secagg::FixedPoint::new(EncodingParams {
            clip_norm: 1.0,
            scale: 1024.0,
            cohort_size: 100,
            dimension: DIMENSION,
            device_noise_std: 0.0,
        })
        .unwrap();
        let v = vec![0.5 / (DIMENSION as f64).sqrt(); DIMENSION];
        let start = Instant::now();
        for _ in 0..100 {
            std::hint::black_box(fp.encode_f64(std::hint::black_box(&v)).unwrap());
        }
        start.elapsed() / 100
    };
    println!(
        "plain upload: {} B, encoding {:.3} ms",
        4 * DIMENSION,
        plain_cost.as_secs_f64() * 1e3
    );
    report(&run(100, false));
    report(&run(100, true));
    if !quick {
        report(&run(1000, false));
        let b = complete_graph_bytes(1000);
        println!(
            "n =  1000  SecAgg (complete graph)  k =  999  (not run) bytes sent {b} = {:.3}× plain",
            b as f64 / (4 * DIMENSION) as f64
        );
    }
}
