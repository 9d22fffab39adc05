//! The two noise paths: `per-device` keeps every device's dense noised update (the bytes
//! of a phone's upload), `aggregate` clips sparse updates and draws one aggregate noise
//! vector per round. They agree in distribution; `per-device` keeps its bytes.

use fedpref_engine::manifest::ManifestPrivacyMode;
use fedpref_privacy::Accountant;
use fedpref_simulations::data::workload;
use fedpref_simulations::sim::{NoisePath, Sampling, Settings, Simulation, digest};

fn local(seed: u64) -> Settings {
    Settings {
        rounds: 4,
        sampling: Sampling::Cohort(30),
        privacy_mode: ManifestPrivacyMode::Local,
        noise_multiplier: Some(0.7),
        seed,
        factors: 4,
        eval_every: 2,
        ranking: false,
        ..Settings::default()
    }
}

fn record_bytes(settings: &Settings) -> Vec<u8> {
    let data = workload(150, 40, 10, 5).unwrap();
    let mut run = Simulation::new(settings, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    serde_json::to_vec(&records).unwrap()
}

/// The records without the `accountant` key that every ε statement gained later.
fn without_accountant(bytes: &[u8]) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.shift_remove("accountant");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    strip(&mut value);
    serde_json::to_vec(&value).unwrap()
}

fn with_path(mut s: Settings, path: NoisePath) -> Settings {
    s.noise_path = path;
    s
}

#[test]
fn the_per_device_path_keeps_the_bytes_it_had_before_the_aggregate_path_existed() {
    // The digest of these records on the code before `--noise-path` was added, when every ε
    // was RDP's (the records carry ε, so the accountant is pinned).
    let rdp = Settings {
        accountant: Accountant::Rdp,
        ..local(11)
    };
    let bytes = record_bytes(&with_path(rdp.clone(), NoisePath::PerDevice));
    // Each ε now names its accountant; without that key the bytes are the old ones.
    assert_eq!(digest(&without_accountant(&bytes)), 0x360b_5273_928d_0ce8);
    // The aggregate path draws other noise: not the same bytes.
    assert_ne!(record_bytes(&rdp), bytes);
}

#[test]
fn the_aggregate_path_gives_the_same_bytes_on_one_thread_and_on_three() {
    let on = |threads: usize, s: &Settings| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| record_bytes(s))
    };
    for settings in [
        local(3),
        Settings {
            privacy_mode: ManifestPrivacyMode::None,
            noise_multiplier: None,
            clip_without_privacy: true,
            ..local(3)
        },
    ] {
        assert_eq!(on(1, &settings), on(3, &settings));
    }
}

fn final_rmse(settings: &Settings) -> f64 {
    let data = workload(300, 60, 12, settings.seed).unwrap();
    let mut run = Simulation::new(settings, &data).unwrap();
    let records = run.run(|_| {}).unwrap();
    records.last().unwrap().evaluation.as_ref().unwrap().rmse
}

#[test]
fn both_paths_reach_the_same_final_rmse_over_seeds() {
    // 8 seeds per path, 10 rounds of 40 devices, σ = 1, C = 0.5: the noise moves the final
    // RMSE visibly from seed to seed. Tolerance: the two means differ by less than three
    // standard errors of their difference (plus 0.2 % of the mean, for a near-zero spread).
    let seeds: Vec<u64> = (1..=8).collect();
    let base = |seed| Settings {
        rounds: 10,
        sampling: Sampling::Cohort(40),
        privacy_mode: ManifestPrivacyMode::Local,
        noise_multiplier: Some(1.0),
        clip_norm: 0.5,
        seed,
        factors: 4,
        eval_every: 0,
        ranking: false,
        ..Settings::default()
    };
    let stats = |path| {
        let v: Vec<f64> = seeds
            .iter()
            .map(|&s| final_rmse(&with_path(base(s), path)))
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var / n, v)
    };
    let (ma, sa, va) = stats(NoisePath::Aggregate);
    let (mp, sp, vp) = stats(NoisePath::PerDevice);
    let tolerance = 3.0 * (sa + sp).sqrt() + 0.002 * mp;
    assert!(
        (ma - mp).abs() < tolerance,
        "aggregate {ma} {va:?} vs per-device {mp} {vp:?}: tolerance {tolerance}"
    );
    // The noise is real on both paths: the seeds do not all agree.
    assert!(sa > 0.0 && sp > 0.0);
}

#[test]
fn without_noise_the_paths_differ_only_by_rounding() {
    let none = Settings {
        privacy_mode: ManifestPrivacyMode::None,
        noise_multiplier: None,
        clip_without_privacy: true,
        ..local(4)
    };
    let a = final_rmse(&none);
    let b = final_rmse(&with_path(none.clone(), NoisePath::PerDevice));
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
}
