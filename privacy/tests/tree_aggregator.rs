//! The tree aggregator's releases: exact prefix sums plus noise with the tree's covariance
//! (popcount(t) nodes at round t, shared nodes between rounds, one node after completion),
//! on the lattice with the secure sampler.

use fedpref_privacy::tree::{TreeAggregator, TreeSchedule};
use fedpref_privacy::{GaussianMechanism, SecureSampler, SimulationSampler, clip_l2};

const DIMENSION: usize = 40_000;

/// Releases `rounds` rounds of empty sums (so the releases are pure noise) and returns them.
fn noise_releases(schedule: TreeSchedule, rounds: usize, seed: u64) -> Vec<Vec<f64>> {
    let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
    let mut tree = TreeAggregator::new(mechanism, DIMENSION, schedule).unwrap();
    let mut sampler = SimulationSampler::seed_from_u64(seed);
    (0..rounds)
        .map(|_| {
            let sum = tree.begin_round().unwrap();
            tree.release_round(&sum, &mut sampler)
                .unwrap()
                .into_values()
        })
        .collect()
}

fn variance(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64
}

/// Asserts that the empirical variance (known mean 0) of DIMENSION draws is `nodes`·σ²,
/// within 6 standard errors (the variance estimate's relative sd is √(2/n)).
fn assert_nodes(label: &str, got: f64, nodes: f64) {
    assert_nodes_of(label, got, nodes, DIMENSION);
}

fn assert_nodes_of(label: &str, got: f64, nodes: f64, n: usize) {
    let se = nodes * (2.0 / n as f64).sqrt();
    assert!(
        (got - nodes).abs() < 6.0 * se,
        "{label}: variance {got}, expected {nodes} ± {se}"
    );
}

#[test]
fn round_t_carries_popcount_t_nodes_of_noise() {
    let releases = noise_releases(TreeSchedule::single_tree(), 8, 1);
    for (i, release) in releases.iter().enumerate() {
        let t = i as u64 + 1;
        assert_nodes(
            &format!("round {t}"),
            variance(release.iter().copied()),
            t.count_ones() as f64,
        );
    }
}

#[test]
fn consecutive_releases_share_the_nodes_they_have_in_common() {
    let r = noise_releases(TreeSchedule::single_tree(), 4, 2);
    // Round 3 = [1,2] + [3], round 2 = [1,2]: they differ by the node [3] alone.
    assert_nodes(
        "round 3 − round 2",
        variance(r[2].iter().zip(&r[1]).map(|(a, b)| a - b)),
        1.0,
    );
    // Round 4 = [1..4], a fresh node: independent of round 3's two nodes.
    assert_nodes(
        "round 4 − round 3",
        variance(r[3].iter().zip(&r[2]).map(|(a, b)| a - b)),
        3.0,
    );
}

#[test]
fn completion_releases_a_finished_tree_through_one_node_and_carries_it_over() {
    let completed = noise_releases(TreeSchedule::restart_every(3, true).unwrap(), 5, 3);
    assert_nodes(
        "round 3, completed",
        variance(completed[2].iter().copied()),
        1.0,
    );
    // Round 4 = finished tree (1 node) + the new tree's leaf; round 5 = 1 + 1.
    assert_nodes("round 4", variance(completed[3].iter().copied()), 2.0);
    assert_nodes("round 5", variance(completed[4].iter().copied()), 2.0);
    // The carried value is exactly round 3's release.
    assert_nodes(
        "round 4 − round 3",
        variance(completed[3].iter().zip(&completed[2]).map(|(a, b)| a - b)),
        1.0,
    );

    let plain = noise_releases(TreeSchedule::restart_every(3, false).unwrap(), 5, 4);
    assert_nodes(
        "round 3, not completed",
        variance(plain[2].iter().copied()),
        2.0,
    );
    assert_nodes("round 4", variance(plain[3].iter().copied()), 3.0);
    assert_nodes("round 5", variance(plain[4].iter().copied()), 3.0);
}

#[test]
fn reported_noise_std_counts_the_nodes_summed() {
    let mechanism = GaussianMechanism::new(2.0, 0.5).unwrap();
    let mut tree =
        TreeAggregator::new(mechanism, 3, TreeSchedule::restart_every(3, true).unwrap()).unwrap();
    let mut sampler = SimulationSampler::seed_from_u64(5);
    let expected_nodes = [1.0f64, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0];
    for nodes in expected_nodes {
        let sum = tree.begin_round().unwrap();
        let release = tree.release_round(&sum, &mut sampler).unwrap();
        assert!((release.noise_std() - nodes.sqrt()).abs() < 1e-12);
    }
    assert_eq!(tree.rounds(), 7);
}

#[test]
fn secure_releases_are_whole_lattice_steps_around_the_exact_prefix_sum() {
    let mechanism = GaussianMechanism::new(1.0, 1.0).unwrap();
    let dimension = 20_000;
    let mut tree = TreeAggregator::new(mechanism, dimension, TreeSchedule::single_tree()).unwrap();
    let step = mechanism.lattice(dimension).unwrap().step;
    let mut sampler = SecureSampler::from_os().unwrap();
    let update = clip_l2(vec![0.005; dimension], 1.0).unwrap();
    let mut last = None;
    for _ in 0..3 {
        let mut sum = tree.begin_round().unwrap();
        for _ in 0..4 {
            sum.add(&update, 1.0).unwrap();
        }
        last = Some(tree.release_round(&sum, &mut sampler).unwrap());
    }
    let release = last.unwrap();
    assert_eq!(release.provenance(), "secure");
    let values = release.values();
    for &v in values {
        let steps = v / step;
        assert!(
            (steps - steps.round()).abs() < 1e-6,
            "{v} is not on the lattice"
        );
    }
    // Prefix sum of 3 rounds × 4 updates × 0.005 = 0.06 per coordinate; round 3 has 2 nodes.
    let mean = values.iter().sum::<f64>() / dimension as f64;
    let se = (2.0 / dimension as f64).sqrt();
    assert!((mean - 0.06).abs() < 6.0 * se, "mean {mean}");
    assert_nodes_of(
        "secure round 3",
        variance(values.iter().map(|v| v - 0.06)),
        2.0,
        dimension,
    );
}
