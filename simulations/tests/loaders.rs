//! MovieLens loaders on tiny files written in a temp dir, and on ../shared/data when it is
//! there (skipped, saying why, when it is not).

use std::path::{Path, PathBuf};

use fedpref_simulations::data::{DataError, movielens_1m, movielens_100k, parse_ratings};

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Ten ratings by two users, in the u.data format.
const U_DATA: &str = "1\t10\t5\t100\n1\t20\t3\t101\n1\t30\t4\t102\n1\t40\t2\t103\n1\t50\t5\t104\n\
2\t10\t1\t200\n2\t20\t2\t201\n2\t30\t3\t202\n2\t40\t4\t203\n2\t60\t5\t204\n";

#[test]
fn ml_100k_with_items_tsv_loads_splits_by_time_and_reads_genres() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "u.data", U_DATA);
    write(
        dir.path(),
        "items.tsv",
        "item_id\ttitle\tyear\tgenres\n10\tA\t1995\tAction|Horror\n20\tB\t1995\tComedy\n30\tC\t1996\t\n",
    );
    let d = movielens_100k(dir.path()).unwrap();
    assert_eq!(d.users.len(), 2);
    assert_eq!(d.items.len(), 6, "rated ∪ catalogued items");
    assert_eq!(d.items[0].id, "10");
    assert!(d.items[0].sensitive, "Horror is the sensitive genre");
    assert!(!d.items[1].sensitive);
    assert_eq!(d.users[0].train.len(), 4);
    assert_eq!(d.users[0].test.len(), 1);
    assert_eq!(
        d.users[0].test[0].time, 104,
        "the latest rating is held out"
    );
    assert_eq!(d.topics, ["Action", "Comedy", "Horror"]);
}

#[test]
fn ml_100k_with_the_original_u_item_genre_flags_loads() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "u.data", U_DATA);
    let flags = |on: usize| {
        (0..19)
            .map(|i| if i == on { "1" } else { "0" })
            .collect::<Vec<_>>()
            .join("|")
    };
    write(
        dir.path(),
        "u.item",
        &format!(
            "10|A (1995)|01-Jan-1995||http://x|{}\n20|B (1995)|01-Jan-1995||http://x|{}\n",
            flags(11),
            flags(5)
        ),
    );
    let d = movielens_100k(dir.path()).unwrap();
    assert!(d.items[0].sensitive);
    assert_eq!(d.topics, ["Comedy", "Horror"]);
}

#[test]
fn ml_1m_dat_files_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ratings.dat", &U_DATA.replace('\t', "::"));
    write(
        dir.path(),
        "movies.dat",
        "10::A (1995)::Action|War\n20::B (1995)::Comedy\n",
    );
    let d = movielens_1m(dir.path()).unwrap();
    assert_eq!(d.users.len(), 2);
    assert_eq!(d.topics, ["Action", "Comedy", "War"]);
}

#[test]
fn a_bad_line_is_an_error_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "u.data",
        &U_DATA.replace("1\t30\t4\t102", "1\t30\tfour\t102"),
    );
    write(dir.path(), "items.tsv", "item_id\ttitle\tyear\tgenres\n");
    let err = movielens_100k(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("u.data:3:") && err.contains("\"four\""),
        "{err}"
    );
    let err = parse_ratings("1 2\n", "r.txt").unwrap_err();
    assert!(matches!(err, DataError::Parse { line: 1, .. }), "{err}");
}

#[test]
fn a_missing_file_names_the_directory_and_the_files_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let err = movielens_1m(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("ratings.dat") && err.contains("ratings.tsv"),
        "{err}"
    );
}

fn shared(name: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: {} is absent (MovieLens is not redistributable, so it is not in the repo)",
            dir.display()
        );
        None
    }
}

#[test]
fn the_shared_movielens_100k_copy_loads_with_its_published_statistics() {
    let Some(dir) = shared("ml-100k") else { return };
    let d = movielens_100k(&dir).unwrap();
    assert_eq!(d.users.len(), 943);
    assert_eq!(d.items.len(), 1682);
    assert_eq!(d.train_ratings() + d.test_ratings(), 100_000);
    assert!(
        d.users.iter().all(|u| u.test.len() >= 4),
        "every user has ≥ 20 ratings"
    );
}
