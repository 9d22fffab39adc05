//! Data sets: the seeded synthetic generator (the embedded default), the standard workload's
//! generator (`../shared/bench/WORKLOAD.md`), and loaders for MovieLens 100K and 1M.
//!
//! One user is one simulated device. Each user's ratings are split by time: the last 20 %
//! (`round(0.2·n)`, at least one when n ≥ 2) are held out for testing, the rest are the
//! device's training data ([`split_by_time`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A data set problem, naming the file and line (or the parameter) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The path.
        file: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// A line could not be parsed.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// The path.
        file: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// None of the expected files exists in the directory.
    #[error("{dir}: none of {candidates} found (give the data set's directory with --path)")]
    Missing {
        /// The directory searched.
        dir: String,
        /// The file names looked for.
        candidates: String,
    },
    /// The data set has nothing to train or test on.
    #[error("{0}")]
    Empty(String),
}

/// One rating of one item by one user.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rating {
    /// The item's row in the catalogue.
    pub item: u32,
    /// The rating (1–5).
    pub value: f32,
    /// When (seconds, or any increasing order).
    pub time: i64,
}

/// A catalogue item.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Its id in the source data.
    pub id: String,
    /// Indices into [`Dataset::topics`].
    pub topics: Vec<u16>,
    /// Whether any of its topics is sensitive.
    pub sensitive: bool,
}

/// One simulated device: a user's ratings, split by time.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    /// Its id in the source data.
    pub id: String,
    /// Index into [`Dataset::cohorts`].
    pub cohort: u8,
    /// Whether the device takes part in training (false: an evaluation-only user, as in the
    /// TFF preset's unseen test users).
    pub trains: bool,
    /// Training ratings (the earliest 80 %), oldest first.
    pub train: Vec<Rating>,
    /// Held-out ratings (the latest 20 %).
    pub test: Vec<Rating>,
}

/// A data set ready to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// A short name (`synthetic`, `movielens-100k`, …).
    pub name: String,
    /// Topic names (genres for MovieLens).
    pub topics: Vec<String>,
    /// Cohort names (`light`, `heavy`).
    pub cohorts: Vec<String>,
    /// The catalogue, by row.
    pub items: Vec<Item>,
    /// The users (devices), by index.
    pub users: Vec<User>,
    /// The preference model that generated the ratings, where one did (synthetic data).
    pub truth: Option<Truth>,
}

/// The noise-free preference model behind synthetic ratings: a user's expected rating of an
/// item is `3.5 + b_u + b_i + 1.5·p_u·q_i`, clipped to [1, 5] (the generator adds N(0, 0.5²)
/// noise and rounds to draw a rating).
#[derive(Clone, Debug, PartialEq)]
pub struct Truth {
    /// The rank of the factors.
    pub rank: usize,
    /// User factors p_u, row-major (users × rank).
    pub user_factors: Vec<f64>,
    /// User biases b_u.
    pub user_bias: Vec<f64>,
    /// Item factors q_i, row-major (items × rank).
    pub item_factors: Vec<f64>,
    /// Item biases b_i.
    pub item_bias: Vec<f64>,
}

impl Truth {
    /// The expected rating of `item` by `user`, in [1, 5].
    pub fn preference(&self, user: usize, item: usize) -> f64 {
        let k = self.rank;
        let p = &self.user_factors[user * k..(user + 1) * k];
        let q = &self.item_factors[item * k..(item + 1) * k];
        let dot: f64 = p.iter().zip(q).map(|(a, b)| a * b).sum();
        (3.5 + self.user_bias[user] + self.item_bias[item] + 1.5 * dot).clamp(1.0, 5.0)
    }
}

impl Dataset {
    /// Training ratings over all users.
    pub fn train_ratings(&self) -> usize {
        self.users.iter().map(|u| u.train.len()).sum()
    }

    /// Held-out ratings over all users.
    pub fn test_ratings(&self) -> usize {
        self.users.iter().map(|u| u.test.len()).sum()
    }

    /// The mean training rating (the global-mean baseline's prediction).
    pub fn train_mean(&self) -> f64 {
        let (sum, n) = self
            .users
            .iter()
            .flat_map(|u| &u.train)
            .fold((0.0, 0usize), |(s, n), r| (s + f64::from(r.value), n + 1));
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// The data set for tuning: every user's training ratings split again as the test split
    /// was made — the last [`test_count`] of them (the latest, for data with times) become the
    /// held-out ratings, the rest the training ratings — and the test ratings dropped. A run
    /// on it never sees the test split, so settings chosen by its RMSE are chosen on
    /// validation data only. Cohorts and topics are kept.
    pub fn validation_split(&self) -> Result<Dataset, DataError> {
        let users = self
            .users
            .iter()
            .map(|u| {
                let mut train = u.train.clone();
                let test = train.split_off(train.len() - test_count(train.len()));
                User {
                    train,
                    test,
                    ..u.clone()
                }
            })
            .collect();
        Dataset {
            name: format!("{} (validation)", self.name),
            users,
            ..self.clone()
        }
        .check()
    }

    fn check(self) -> Result<Self, DataError> {
        if self.items.is_empty() || self.train_ratings() == 0 || self.test_ratings() == 0 {
            return Err(DataError::Empty(format!(
                "{}: the data set needs items, training ratings and held-out ratings ({} items, {} train, {} test)",
                self.name,
                self.items.len(),
                self.train_ratings(),
                self.test_ratings()
            )));
        }
        Ok(self)
    }
}

/// The number of held-out ratings out of n: `round(0.2·n)`, at least 1 when n ≥ 2.
pub fn test_count(n: usize) -> usize {
    let t = (0.2 * n as f64).round() as usize;
    if n >= 2 { t.max(1) } else { 0 }
}

/// Splits one user's ratings by time: the last [`test_count`] (by time, ties by item row)
/// are held out. Returns (train, test), each oldest first.
pub fn split_by_time(mut ratings: Vec<Rating>) -> (Vec<Rating>, Vec<Rating>) {
    ratings.sort_by_key(|r| (r.time, r.item));
    let test = ratings.split_off(ratings.len() - test_count(ratings.len()));
    (ratings, test)
}

/// The seeded synthetic generator's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSpec {
    /// Users (devices).
    pub users: usize,
    /// Items.
    pub items: usize,
    /// True rank of the preferences.
    pub rank: usize,
    /// Share of light users (the rest are heavy).
    pub light_share: f64,
    /// Ratings per light user, inclusive range.
    pub light_ratings: (usize, usize),
    /// Ratings per heavy user, inclusive range.
    pub heavy_ratings: (usize, usize),
    /// Zipf exponent of item popularity.
    pub popularity_exponent: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            users: 1_000,
            items: 500,
            rank: 8,
            light_share: 0.7,
            light_ratings: (10, 30),
            heavy_ratings: (60, 150),
            popularity_exponent: 0.8,
            seed: 42,
        }
    }
}

/// Topics of the synthetic catalogue; the last one, `health`, is sensitive.
pub const SYNTHETIC_TOPICS: [&str; 10] = [
    "news", "sport", "music", "film", "travel", "food", "tech", "fashion", "games", "health",
];

fn rng(seed: u64, stream: &[u64]) -> Xoshiro256PlusPlus {
    // The same SplitMix64 mixing as the privacy crate's simulation streams.
    let mixed = stream.iter().fold(splitmix64(seed), |acc, &id| {
        splitmix64(acc ^ splitmix64(id))
    });
    Xoshiro256PlusPlus::seed_from_u64(mixed)
}

/// SplitMix64's output function.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded RNG for a stream path under `seed` (e.g. `[3, round]` for a round's selection).
pub fn stream_rng(seed: u64, stream: &[u64]) -> Xoshiro256PlusPlus {
    rng(seed, stream)
}

fn gaussians(rng: &mut Xoshiro256PlusPlus, n: usize, std: f64) -> Vec<f64> {
    let normal = Normal::new(0.0, std).expect("std is finite and ≥ 0");
    (0..n).map(|_| normal.sample(rng)).collect()
}

/// Samples `n` distinct rows from `weights` (proportional), by rejection of repeats.
fn weighted_distinct(rng: &mut Xoshiro256PlusPlus, cumulative: &[f64], n: usize) -> Vec<u32> {
    let total = *cumulative.last().expect("non-empty");
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let x = rng.random::<f64>() * total;
        let row = cumulative
            .partition_point(|&c| c <= x)
            .min(cumulative.len() - 1) as u32;
        if seen.insert(row) {
            out.push(row);
        }
    }
    out
}

/// Samples `n` distinct rows of `0..items` uniformly, in random order (Floyd, then shuffled).
fn uniform_distinct(rng: &mut Xoshiro256PlusPlus, items: usize, n: usize) -> Vec<u32> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for j in items - n..items {
        let t = rng.random_range(0..=j);
        let pick = if seen.contains(&t) { j } else { t };
        seen.insert(pick);
        out.push(pick as u32);
    }
    for i in (1..out.len()).rev() {
        out.swap(i, rng.random_range(0..=i));
    }
    out
}

/// The embedded default: users with low-rank preferences built from topic affinities,
/// items with one or two of [`SYNTHETIC_TOPICS`] (`health` is sensitive), a Zipf-skewed
/// popularity deciding which items users rate, light and heavy cohorts, integer ratings 1–5
/// and increasing timestamps.
///
/// ```
/// use fedpref_simulations::data::{synthetic, SyntheticSpec};
/// let spec = SyntheticSpec { users: 50, items: 40, ..SyntheticSpec::default() };
/// let a = synthetic(&spec).unwrap();
/// assert_eq!(a, synthetic(&spec).unwrap()); // seeded
/// assert_eq!(a.users.len(), 50);
/// ```
pub fn synthetic(spec: &SyntheticSpec) -> Result<Dataset, DataError> {
    let bad = |what: &str| DataError::Empty(format!("synthetic data: {what}"));
    if spec.users == 0 || spec.items < 2 || spec.rank == 0 {
        return Err(bad("needs at least 1 user, 2 items and rank 1"));
    }
    let topics = SYNTHETIC_TOPICS.len();
    let s = (spec.rank as f64).powf(-0.25);
    let mut r = rng(spec.seed, &[1]);
    let centroids: Vec<Vec<f64>> = (0..topics)
        .map(|_| gaussians(&mut r, spec.rank, s))
        .collect();
    let mut items = Vec::with_capacity(spec.items);
    let mut item_factors = Vec::with_capacity(spec.items);
    let mut item_bias = Vec::with_capacity(spec.items);
    for j in 0..spec.items {
        let first = r.random_range(0..topics) as u16;
        let mut item_topics = vec![first];
        if r.random::<f64>() < 0.3 {
            let second = r.random_range(0..topics) as u16;
            if second != first {
                item_topics.push(second);
            }
        }
        let noise = gaussians(&mut r, spec.rank, 0.5 * s);
        let factor: Vec<f64> = (0..spec.rank)
            .map(|c| {
                item_topics
                    .iter()
                    .map(|&t| centroids[t as usize][c])
                    .sum::<f64>()
                    / item_topics.len() as f64
                    + noise[c]
            })
            .collect();
        item_factors.push(factor);
        item_bias.push(gaussians(&mut r, 1, 0.4)[0]);
        let sensitive = item_topics.contains(&((topics - 1) as u16));
        items.push(Item {
            id: format!("i{j}"),
            topics: item_topics,
            sensitive,
        });
    }
    // Zipf popularity over a random order of the items.
    let mut order: Vec<usize> = (0..spec.items).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, r.random_range(0..=i));
    }
    let mut weight = vec![0.0; spec.items];
    for (rank, &j) in order.iter().enumerate() {
        weight[j] = 1.0 / ((rank + 1) as f64).powf(spec.popularity_exponent);
    }
    let cumulative: Vec<f64> = weight
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w;
            Some(*acc)
        })
        .collect();
    let mut users = Vec::with_capacity(spec.users);
    let mut user_factors = Vec::with_capacity(spec.users * spec.rank);
    let mut user_bias = Vec::with_capacity(spec.users);
    for u in 0..spec.users {
        let mut r = rng(spec.seed, &[2, u as u64]);
        let heavy = r.random::<f64>() >= spec.light_share;
        let (lo, hi) = if heavy {
            spec.heavy_ratings
        } else {
            spec.light_ratings
        };
        let n = r.random_range(lo..=hi.max(lo)).min(spec.items / 2).max(2);
        let liked: Vec<usize> = (0..2).map(|_| r.random_range(0..topics)).collect();
        let noise = gaussians(&mut r, spec.rank, 0.5 * s);
        let factor: Vec<f64> = (0..spec.rank)
            .map(|c| 0.5 * (centroids[liked[0]][c] + centroids[liked[1]][c]) + noise[c])
            .collect();
        let bias = gaussians(&mut r, 1, 0.4)[0];
        user_factors.extend_from_slice(&factor);
        user_bias.push(bias);
        let eps = Normal::new(0.0, 0.5).expect("valid");
        let mut time = 1_700_000_000 + r.random_range(0..86_400i64);
        let ratings = weighted_distinct(&mut r, &cumulative, n)
            .into_iter()
            .map(|j| {
                let f = &item_factors[j as usize];
                let dot: f64 = f.iter().zip(&factor).map(|(a, b)| a * b).sum();
                let value = (3.5 + bias + item_bias[j as usize] + 1.5 * dot + eps.sample(&mut r))
                    .round()
                    .clamp(1.0, 5.0);
                time += r.random_range(60..86_400i64);
                Rating {
                    item: j,
                    value: value as f32,
                    time,
                }
            })
            .collect();
        let (train, test) = split_by_time(ratings);
        users.push(User {
            id: format!("u{u}"),
            cohort: u8::from(heavy),
            trains: true,
            train,
            test,
        });
    }
    Dataset {
        name: "synthetic".into(),
        topics: SYNTHETIC_TOPICS.iter().map(|s| s.to_string()).collect(),
        cohorts: vec!["light".into(), "heavy".into()],
        items,
        users,
        truth: Some(Truth {
            rank: spec.rank,
            user_factors,
            user_bias,
            item_factors: item_factors.concat(),
            item_bias,
        }),
    }
    .check()
}

/// The standard workload's data (`../shared/bench/WORKLOAD.md`): P, Q ~ N(0, s²) with
/// s = 8^−¼, user and item biases and noise ~ N(0, 0.5²), `ratings_per_user` distinct items
/// per user drawn uniformly, r = clip(3.5 + b_u + b_i + p·q + ε, 1, 5) real-valued. The
/// held-out ratings are the last `round(0.2·n)` of a seeded random order (the items are drawn
/// in random order and timestamped in that order). Same distributions as the peers', not the
/// same draws (their streams are NumPy's PCG64).
pub fn workload(
    users: usize,
    items: usize,
    ratings_per_user: usize,
    seed: u64,
) -> Result<Dataset, DataError> {
    if users == 0 || items == 0 || ratings_per_user < 2 || ratings_per_user > items {
        return Err(DataError::Empty(format!(
            "workload data: needs users ≥ 1 and 2 ≤ ratings per user ≤ items (users {users}, items {items}, ratings per user {ratings_per_user})"
        )));
    }
    const RANK: usize = 8;
    let s = (RANK as f64).powf(-0.25);
    let mut r = rng(seed, &[11]);
    let q = gaussians(&mut r, items * RANK, s);
    let item_bias = gaussians(&mut r, items, 0.5);
    let users: Vec<User> = (0..users)
        .map(|u| {
            let mut r = rng(seed, &[12, u as u64]);
            let p = gaussians(&mut r, RANK, s);
            let bias = gaussians(&mut r, 1, 0.5)[0];
            let eps = Normal::new(0.0, 0.5).expect("valid");
            let ratings = uniform_distinct(&mut r, items, ratings_per_user)
                .into_iter()
                .enumerate()
                .map(|(t, j)| {
                    let row = &q[j as usize * RANK..(j as usize + 1) * RANK];
                    let dot: f64 = row.iter().zip(&p).map(|(a, b)| a * b).sum();
                    let value = (3.5 + bias + item_bias[j as usize] + dot + eps.sample(&mut r))
                        .clamp(1.0, 5.0);
                    Rating {
                        item: j,
                        value: value as f32,
                        time: t as i64,
                    }
                })
                .collect();
            let (train, test) = split_by_time(ratings);
            User {
                id: format!("u{u}"),
                cohort: 0,
                trains: true,
                train,
                test,
            }
        })
        .collect();
    Dataset {
        name: "workload".into(),
        topics: vec![],
        cohorts: vec!["all".into()],
        items: (0..items)
            .map(|j| Item {
                id: format!("i{j}"),
                topics: vec![],
                sensitive: false,
            })
            .collect(),
        users,
        truth: None,
    }
    .check()
}

/// The genres the examples treat as sensitive: `Horror`. (No MovieLens genre is sensitive in
/// itself; one stands in for a sensitive topic.)
pub const SENSITIVE_GENRES: [&str; 1] = ["Horror"];

/// The 19 genres of ML-100K's `u.item`, in column order.
pub const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

fn read(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        file: path.display().to_string(),
        source,
    })?;
    // The original u.item is Latin-1; titles are not used, so a lossy decode is enough.
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

fn first_existing(dir: &Path, names: &[&str]) -> Result<PathBuf, DataError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::Missing {
            dir: dir.display().to_string(),
            candidates: names.join(", "),
        })
}

fn split_fields(line: &str) -> Vec<&str> {
    if line.contains("::") {
        line.split("::").map(str::trim).collect()
    } else if line.contains('\t') {
        line.split('\t').map(str::trim).collect()
    } else if line.contains(',') {
        line.split(',').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

/// A raw rating as read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRating {
    /// The user id.
    pub user: String,
    /// The item id.
    pub item: String,
    /// The rating.
    pub value: f32,
    /// The timestamp (0 when absent).
    pub time: i64,
}

/// Parses a ratings file: `user item rating [timestamp]` per line, separated by tab, `::`,
/// `,` or whitespace; blank lines are skipped, and a first line whose rating is not a number
/// is taken as a header. Errors name the file and line.
pub fn parse_ratings(text: &str, file: &str) -> Result<Vec<RawRating>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| DataError::Parse {
            file: file.to_string(),
            line: i + 1,
            message,
        };
        let f = split_fields(line);
        if f.len() < 3 {
            return Err(err(format!(
                "expected `user item rating [timestamp]`, found {} field(s): {line:?}",
                f.len()
            )));
        }
        let value: f32 = match f[2].parse() {
            Ok(v) => v,
            Err(_) if i == 0 => continue, // a header
            Err(_) => return Err(err(format!("rating {:?} is not a number", f[2]))),
        };
        if !(value.is_finite() && (0.0..=10.0).contains(&value)) {
            return Err(err(format!("rating {value} is outside [0, 10]")));
        }
        let time = match f.get(3) {
            Some(t) => t
                .parse::<i64>()
                .map_err(|_| err(format!("timestamp {t:?} is not a whole number")))?,
            None => 0,
        };
        if f[0].is_empty() || f[1].is_empty() {
            return Err(err("empty user or item id".into()));
        }
        out.push(RawRating {
            user: f[0].to_string(),
            item: f[1].to_string(),
            value,
            time,
        });
    }
    Ok(out)
}

/// Parses an items file into (id, genres): `items.tsv` (header `item_id title year genres`,
/// genres `|`-separated), ML-100K's `u.item` (`id|title|date|video|url|` then 19 genre
/// flags) or ML-1M's `movies.dat` (`id::title::genres`). Errors name the file and line.
pub fn parse_items(text: &str, file: &str) -> Result<Vec<(String, Vec<String>)>, DataError> {
    let mut out = Vec::new();
    let mut genres_column = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Parse {
            file: file.to_string(),
            line: i + 1,
            message,
        };
        let genres = |s: &str| -> Vec<String> {
            s.split('|')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect()
        };
        if line.contains("::") {
            let f: Vec<&str> = line.split("::").collect();
            if f.len() < 3 {
                return Err(err("expected `id::title::genres`".into()));
            }
            out.push((f[0].trim().to_string(), genres(f[2])));
        } else if line.contains('\t') {
            let f: Vec<&str> = line.split('\t').collect();
            if i == 0 && genres_column.is_none() {
                let column = f.iter().position(|h| h.trim() == "genres");
                if f[0].trim() == "item_id" {
                    genres_column = Some(
                        column.ok_or_else(|| err("the header has no `genres` column".into()))?,
                    );
                    continue;
                }
            }
            let column = genres_column.unwrap_or(f.len() - 1);
            let g = f
                .get(column)
                .ok_or_else(|| err(format!("expected a genres column {}", column + 1)))?;
            out.push((f[0].trim().to_string(), genres(g)));
        } else if line.contains('|') {
            let f: Vec<&str> = line.split('|').collect();
            if f.len() != 5 + ML100K_GENRES.len() {
                return Err(err(format!(
                    "expected {} `|`-separated fields (u.item), found {}",
                    5 + ML100K_GENRES.len(),
                    f.len()
                )));
            }
            let mut g = vec![];
            for (flag, name) in f[5..].iter().zip(ML100K_GENRES) {
                match flag.trim() {
                    "1" => g.push(name.to_string()),
                    "0" => {}
                    other => {
                        return Err(err(format!(
                            "genre flag {other:?} for {name} is not 0 or 1"
                        )));
                    }
                }
            }
            out.push((f[0].trim().to_string(), g));
        } else {
            return Err(err(format!("unrecognised item line {line:?}")));
        }
    }
    Ok(out)
}

/// Orders ids numerically when they are all numbers, otherwise as strings.
fn dense_ids<'a>(ids: impl Iterator<Item = &'a str>) -> HashMap<String, u32> {
    let set: std::collections::BTreeSet<&str> = ids.collect();
    let mut v: Vec<&str> = set.into_iter().collect();
    if v.iter().all(|s| s.parse::<u64>().is_ok()) {
        v.sort_by_key(|s| s.parse::<u64>().expect("checked"));
    }
    v.into_iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect()
}

/// Builds a data set from raw ratings and item genres. Items are the union of the rated
/// and the catalogued ones; ids are re-indexed densely in sorted order. Users are split into
/// cohorts `light` (fewer training ratings than the median) and `heavy`.
pub fn from_raw(
    name: &str,
    ratings: Vec<RawRating>,
    genres: Vec<(String, Vec<String>)>,
) -> Result<Dataset, DataError> {
    let item_index = dense_ids(
        ratings
            .iter()
            .map(|r| r.item.as_str())
            .chain(genres.iter().map(|(id, _)| id.as_str())),
    );
    let mut topic_names: Vec<String> = genres
        .iter()
        .flat_map(|(_, g)| g.iter().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    topic_names.sort();
    let topic_index: HashMap<&str, u16> = topic_names
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u16))
        .collect();
    let mut items: Vec<Item> = vec![
        Item {
            id: String::new(),
            topics: vec![],
            sensitive: false,
        };
        item_index.len()
    ];
    for (id, row) in &item_index {
        items[*row as usize].id = id.clone();
    }
    for (id, g) in &genres {
        let item = &mut items[item_index[id] as usize];
        item.topics = g.iter().map(|t| topic_index[t.as_str()]).collect();
        item.sensitive = g.iter().any(|t| SENSITIVE_GENRES.contains(&t.as_str()));
    }
    let mut by_user: BTreeMap<String, Vec<Rating>> = BTreeMap::new();
    for r in ratings {
        by_user.entry(r.user).or_default().push(Rating {
            item: item_index[&r.item],
            value: r.value,
            time: r.time,
        });
    }
    let user_index = dense_ids(by_user.keys().map(String::as_str));
    let mut users: Vec<User> = by_user
        .into_iter()
        .map(|(id, ratings)| {
            let (train, test) = split_by_time(ratings);
            User {
                id,
                cohort: 0,
                trains: true,
                train,
                test,
            }
        })
        .collect();
    users.sort_by_key(|u| user_index[&u.id]);
    let mut counts: Vec<usize> = users.iter().map(|u| u.train.len()).collect();
    counts.sort_unstable();
    let median = counts.get(counts.len() / 2).copied().unwrap_or(0);
    for u in &mut users {
        u.cohort = u8::from(u.train.len() >= median);
    }
    Dataset {
        name: name.to_string(),
        topics: topic_names,
        cohorts: vec!["light".into(), "heavy".into()],
        items,
        users,
        truth: None,
    }
    .check()
}

/// Loads MovieLens 100K from a directory: `u.data` and `items.tsv` (or the original
/// `u.item`).
pub fn movielens_100k(dir: &Path) -> Result<Dataset, DataError> {
    load_dir(
        "movielens-100k",
        dir,
        &["u.data", "ratings.tsv"],
        &["items.tsv", "u.item"],
    )
}

/// Loads MovieLens 1M from a directory: `ratings.dat` or `ratings.tsv`, and `movies.dat`
/// or `items.tsv`.
pub fn movielens_1m(dir: &Path) -> Result<Dataset, DataError> {
    load_dir(
        "movielens-1m",
        dir,
        &["ratings.dat", "ratings.tsv"],
        &["movies.dat", "items.tsv"],
    )
}

fn load_dir(
    name: &str,
    dir: &Path,
    rating_files: &[&str],
    item_files: &[&str],
) -> Result<Dataset, DataError> {
    let ratings_path = first_existing(dir, rating_files)?;
    let items_path = first_existing(dir, item_files)?;
    let ratings = parse_ratings(&read(&ratings_path)?, &ratings_path.display().to_string())?;
    let genres = parse_items(&read(&items_path)?, &items_path.display().to_string())?;
    from_raw(name, ratings, genres)
}

/// The setting of TensorFlow Federated's federated-reconstruction tutorial for matrix
/// factorisation, applied to a loaded MovieLens 1M: users with at most 300 ratings, 2,000 of
/// them drawn with the seed, split by user 80/10/10. The 1,600 training users train on all
/// their ratings; the 200 validation users are left out; the 200 test users never train
/// (they are unseen), and each reconstructs its private part from the earlier half of its
/// ratings (by time) and is evaluated on the later half. The half/half split of a test user's
/// ratings is this simulator's choice.
pub fn tff_fedrecon(data: Dataset, seed: u64) -> Result<Dataset, DataError> {
    let mut r = rng(seed, &[21]);
    let mut eligible: Vec<User> = data
        .users
        .into_iter()
        .filter(|u| u.train.len() + u.test.len() <= 300)
        .collect();
    for i in (1..eligible.len()).rev() {
        eligible.swap(i, r.random_range(0..=i));
    }
    eligible.truncate(2_000);
    let n = eligible.len();
    let (train_end, val_end) = (n * 8 / 10, n * 9 / 10);
    let users: Vec<User> = eligible
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i < train_end || *i >= val_end)
        .map(|(i, mut u)| {
            let mut all = std::mem::take(&mut u.train);
            all.append(&mut u.test);
            all.sort_by_key(|r| (r.time, r.item));
            if i < train_end {
                User {
                    train: all,
                    test: vec![],
                    trains: true,
                    ..u
                }
            } else {
                let test = all.split_off(all.len() / 2);
                User {
                    train: all,
                    test,
                    trains: false,
                    ..u
                }
            }
        })
        .collect();
    Dataset {
        name: format!("{}-tff-fedrecon", data.name),
        users,
        ..data
    }
    .check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_split_holds_out_the_latest_fifth() {
        let ratings: Vec<Rating> = (0..10)
            .map(|t| Rating {
                item: t as u32,
                value: 3.0,
                time: 100 - t,
            })
            .collect();
        let (train, test) = split_by_time(ratings);
        assert_eq!((train.len(), test.len()), (8, 2));
        assert!(test.iter().all(|r| r.time >= 99));
        assert_eq!(test_count(2), 1);
        assert_eq!(test_count(1), 0);
        assert_eq!(test_count(50), 10);
    }

    #[test]
    fn the_validation_split_holds_out_the_latest_training_ratings_and_no_test_rating() {
        let d = synthetic(&SyntheticSpec {
            users: 30,
            items: 40,
            ..SyntheticSpec::default()
        })
        .unwrap();
        let v = d.validation_split().unwrap();
        assert_eq!(v.users.len(), d.users.len());
        for (full, carved) in d.users.iter().zip(&v.users) {
            assert_eq!(carved.train.len() + carved.test.len(), full.train.len());
            assert_eq!(carved.test.len(), test_count(full.train.len()));
            // The carve is the tail of the training ratings, in order.
            let mut joined = carved.train.clone();
            joined.extend(&carved.test);
            assert_eq!(joined, full.train);
            assert!(carved.test.iter().all(|r| !full.test.contains(r)));
        }
    }

    #[test]
    fn workload_data_has_the_specified_shape() {
        let d = workload(30, 40, 10, 1).unwrap();
        assert_eq!(d.users.len(), 30);
        assert!(
            d.users
                .iter()
                .all(|u| u.train.len() == 8 && u.test.len() == 2)
        );
        let mut items: Vec<u32> = d.users[0]
            .train
            .iter()
            .chain(&d.users[0].test)
            .map(|r| r.item)
            .collect();
        items.sort_unstable();
        items.dedup();
        assert_eq!(items.len(), 10, "distinct items per user");
    }

    #[test]
    fn the_tff_preset_splits_users_80_10_10_and_keeps_test_users_out_of_training() {
        let d = tff_fedrecon(workload(50, 40, 10, 2).unwrap(), 9).unwrap();
        assert_eq!(d.users.len(), 45, "the 5 validation users are left out");
        let train: Vec<&User> = d.users.iter().filter(|u| u.trains).collect();
        assert_eq!(train.len(), 40);
        assert!(
            train
                .iter()
                .all(|u| u.train.len() == 10 && u.test.is_empty())
        );
        for u in d.users.iter().filter(|u| !u.trains) {
            assert_eq!((u.train.len(), u.test.len()), (5, 5));
            assert!(u.train.last().unwrap().time <= u.test[0].time);
        }
    }

    #[test]
    fn synthetic_data_has_cohorts_and_sensitive_items() {
        let d = synthetic(&SyntheticSpec {
            users: 200,
            items: 100,
            ..SyntheticSpec::default()
        })
        .unwrap();
        assert!(d.users.iter().any(|u| u.cohort == 0) && d.users.iter().any(|u| u.cohort == 1));
        assert!(d.items.iter().any(|i| i.sensitive));
        assert!(
            d.users
                .iter()
                .flat_map(|u| &u.train)
                .all(|r| (1.0..=5.0).contains(&r.value))
        );
    }
}
