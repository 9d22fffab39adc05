//! The device through its public API, on real SQLite files in a temporary directory.

use fedpref_client_sdk::fedpref_privacy::{
    Accountant, OrderGrid, PrivacyMode, RoundRelease, epsilon_after_with, l2_norm,
};
use fedpref_client_sdk::{
    Device, DeviceConfig, LocalTraining, MatrixFactorization, PreferenceModel, ProfileEdit, Reason,
    SdkError, Timestamp, TrainingTask,
};
use serde_json::Value;

fn at(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

fn now() -> Timestamp {
    at("2026-06-01T12:00:00Z")
}

/// 40 items over five topics; Health is sensitive. Items 36–39 were published recently.
fn catalogue() -> String {
    let mut s = String::new();
    for i in 0..40 {
        let topic = ["Comedy", "Drama", "Jazz", "Health", "Science"][i % 5];
        let published = if i >= 36 {
            "2026-05-28T00:00:00Z"
        } else {
            "2025-01-01T00:00:00Z"
        };
        s += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"],\"sensitive\":{},\"published\":\"{published}\",\"popularity\":{}}}\n",
            topic == "Health",
            100 - i
        );
    }
    s
}

const USER: &str = r#"{"type":"rating","item":"i0","value":5.0,"at":"2026-05-30T20:00:00Z"}
{"type":"rating","item":"i5","value":4.5,"at":"2026-05-30T20:01:00Z"}
{"type":"thumbs","item":"i1","value":"down","at":"2026-05-30T20:02:00Z"}
{"type":"save","item":"i10","at":"2026-05-30T20:03:00Z"}
{"type":"dwell","item":"i15","seconds":31.5,"at":"2026-05-30T20:04:00Z"}
{"type":"rating","item":"i3","value":5.0,"at":"2026-05-30T20:05:00Z"}
{"type":"thumbs","item":"i8","value":"up","at":"2026-05-30T20:06:00Z"}
{"type":"interest","topic":"Jazz"}
{"type":"role","value":"night-shift nurse"}
{"type":"goal","value":"sleep better"}
"#;

fn model(version: u64) -> MatrixFactorization {
    MatrixFactorization::initial(
        version,
        (0..40).map(|i| format!("i{i}")).collect(),
        4,
        0.3,
        5,
    )
    .unwrap()
}

fn device(dir: &tempfile::TempDir) -> Device {
    let mut d = Device::open(dir.path().join("device.db"), DeviceConfig::default()).unwrap();
    d.ingest_jsonl(&catalogue(), false, now()).unwrap();
    d.ingest_jsonl(USER, false, now()).unwrap();
    d
}

fn task(version: u64, sigma: f64) -> TrainingTask {
    TrainingTask {
        round_id: 7,
        model_version: version,
        training: LocalTraining::default(),
        clip_norm: 1.0,
        noise_multiplier: sigma,
        mode: PrivacyMode::Local,
        clip_bit_noise_std: None,
    }
}

#[test]
fn a_file_with_one_bad_line_stores_nothing_and_names_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    let before = d.export(now()).unwrap();
    let bad = "{\"type\":\"save\",\"item\":\"i2\",\"at\":\"2026-05-30T20:00:00Z\"}\n\
               {\"type\":\"dwell\",\"item\":\"i2\",\"seconds\":NaN,\"at\":\"2026-05-30T20:00:00Z\"}\n";
    let err = d.ingest_jsonl(bad, false, now()).unwrap_err();
    let SdkError::InvalidLines(lines) = &err else {
        panic!("{err}")
    };
    assert_eq!((lines[0].line, lines[0].field.as_str()), (2, "seconds"));
    assert_eq!(d.export(now()).unwrap(), before);
    // With skip_invalid the valid line is stored and the bad one reported.
    let report = d.ingest_jsonl(bad, true, now()).unwrap();
    assert_eq!((report.feedback, report.skipped.len()), (1, 1));
}

#[test]
fn an_event_from_the_future_is_refused_through_the_api_naming_at() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    let events = [fedpref_client_sdk::Event::Feedback(
        fedpref_client_sdk::Feedback {
            item: "i2".into(),
            signal: fedpref_client_sdk::Signal::Save,
            at: now().plus_millis(3_600_000),
        },
    )];
    let err = d.record(&events, now()).unwrap_err();
    assert!(
        matches!(&err, SdkError::InvalidEvent { field, .. } if field == "at"),
        "{err}"
    );
}

#[test]
fn expired_rows_are_deleted_when_time_passes_their_retention_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    let p = d.profile(now()).unwrap();
    assert!(!p.inferred_topics.is_empty());
    // 100 days later the implicit rows (90 days) are gone, the feedback (365) is not.
    let later = now().plus_millis(100 * 86_400_000);
    let report = d.purge_expired(later).unwrap();
    assert!(report.implicit > 0 && report.feedback == 0, "{report:?}");
    let p = d.profile(later).unwrap();
    assert!(p.inferred_topics.is_empty());
    assert_eq!(p.feedback_counts.values().sum::<usize>(), 7);
    // 400 days later the feedback is gone too; explicit data (730 days) stays.
    let p = d.profile(now().plus_millis(400 * 86_400_000)).unwrap();
    assert!(p.feedback_counts.is_empty());
    assert_eq!(p.role.as_deref(), Some("night-shift nurse"));
    let export = d.export(now().plus_millis(400 * 86_400_000)).unwrap();
    assert!(!export.to_string().contains("\"rating\""));
}

#[test]
fn sensitive_items_feed_nothing_until_the_user_opts_in_for_their_topic() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(1)).unwrap();
    let rated_health = |d: &mut Device| {
        let row = d.model().unwrap().item_index("i3").unwrap();
        d.training_examples(now())
            .unwrap()
            .iter()
            .any(|e| e.item == row)
    };
    let p = d.profile(now()).unwrap();
    assert!(p.inferred_topics.iter().all(|a| a.value != "Health"));
    assert!(!rated_health(&mut d));
    for r in d.recommend(10, now()).unwrap() {
        let n: usize = r.item[1..].parse().unwrap();
        assert_ne!(
            n % 5,
            3,
            "sensitive item {} recommended without consent",
            r.item
        );
    }
    d.edit_profile(
        ProfileEdit::SetConsent {
            topic: "Health".into(),
            personalise: true,
        },
        now(),
    )
    .unwrap();
    assert!(
        d.profile(now())
            .unwrap()
            .inferred_topics
            .iter()
            .any(|a| a.value == "Health")
    );
    assert!(rated_health(&mut d));
}

#[test]
fn recommendations_fall_back_to_popularity_when_cold_or_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    let cold = d.recommend(10, now()).unwrap();
    assert!(
        cold.iter()
            .all(|r| matches!(r.reason, Reason::Popular | Reason::Recency))
    );
    assert_eq!(
        cold.iter().filter(|r| r.reason == Reason::Recency).count(),
        2
    );
    d.install_model(model(1)).unwrap();
    let warm = d.recommend(10, now()).unwrap();
    assert_eq!(warm.len(), 10);
    assert_eq!(
        warm.iter()
            .filter(|r| r.reason == Reason::Diversity)
            .count(),
        2
    );
    assert!(warm.iter().any(|r| r.reason == Reason::Personal));
    let seen = ["i0", "i5", "i1", "i10", "i15", "i3", "i8"];
    assert!(warm.iter().all(|r| !seen.contains(&r.item.as_str())));
    for r in warm.iter().filter(|r| r.reason == Reason::Personal) {
        assert!(
            r.label.starts_with("Because you follow topic Jazz")
                || r.label.starts_with("Because you liked ")
                || r.label == "Picked for you",
            "{}",
            r.label
        );
    }
    d.set_personalisation(false).unwrap();
    let off = d.recommend(10, now()).unwrap();
    assert!(
        off.iter()
            .all(|r| matches!(r.reason, Reason::Popular | Reason::Recency))
    );
    // Off uses nothing about the user: seen items may appear again.
    assert!(off.iter().any(|r| seen.contains(&r.item.as_str())));
}

#[test]
fn reset_forgets_the_private_part_and_everything_derived_but_keeps_explicit_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(1)).unwrap();
    assert!(d.private_state(now()).unwrap().is_some());
    d.reset_model().unwrap();
    let p = d.profile(now()).unwrap();
    assert!(p.inferred_topics.is_empty() && p.feedback_counts.is_empty() && !p.personalised);
    assert_eq!(p.interests, ["Jazz"]);
    let export = d.export(now()).unwrap();
    assert_eq!(export["private_model"], Value::Null);
    assert_eq!(export["inferred"], Value::Array(vec![]));
}

#[test]
fn an_export_reingested_into_a_new_store_reproduces_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.edit_profile(
        ProfileEdit::SetConsent {
            topic: "Health".into(),
            personalise: false,
        },
        now(),
    )
    .unwrap();
    let export = d.export(now()).unwrap();
    assert_eq!(export["format"], "fedpref-device-export");
    assert_eq!(export["format_version"], 1);
    let jsonl: String = export["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string() + "\n")
        .collect();
    let other = tempfile::tempdir().unwrap();
    let mut copy = Device::open(other.path().join("copy.db"), DeviceConfig::default()).unwrap();
    copy.ingest_jsonl(&jsonl, false, now()).unwrap();
    let again = copy.export(now()).unwrap();
    assert_eq!(again["records"], export["records"]);
    assert_eq!(again["inferred"], export["inferred"]);
}

#[test]
fn delete_everything_leaves_none_of_the_users_data_in_the_raw_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let mut d = device(&dir);
    d.install_model(model(1)).unwrap();
    d.recommend(10, now()).unwrap();
    d.edit_profile(ProfileEdit::MuteTopic("Astrology-secret".into()), now())
        .unwrap();
    d.set_training(false).unwrap();
    d.delete_everything().unwrap();
    // A user who turned training off does not find it on again.
    assert!(!d.settings().training);
    let needles = [
        "night-shift nurse",
        "sleep better",
        "Jazz",
        "Astrology-secret",
        "Comedy",
        "\"i15\"",
        "i10",
    ];
    let mut files = vec![path.clone()];
    for suffix in ["-journal", "-wal", "-shm"] {
        let p = dir.path().join(format!("device.db{suffix}"));
        if p.exists() {
            files.push(p);
        }
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} still holds {needle:?}",
                file.display()
            );
        }
    }
    // Before deletion the same scan finds them (the test can fail).
    let fresh = tempfile::tempdir().unwrap();
    drop(device(&fresh));
    let bytes = std::fs::read(fresh.path().join("device.db")).unwrap();
    assert!(bytes.windows(17).any(|w| w == b"night-shift nurse"));
    // The store is still usable and empty.
    let p = d.profile(now()).unwrap();
    assert!(p.role.is_none() && p.goals.is_empty() && d.catalogue().is_empty());
}

#[test]
fn an_upload_is_clipped_noised_and_recorded_and_the_record_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(3)).unwrap();
    let upload = d.prepare_upload(&task(3, 20.0), now()).unwrap();
    let dimension = 40 * 4 + 40 + 1;
    assert_eq!(upload.released().values().len(), dimension);
    assert_eq!(upload.layout().dimension(), dimension);
    assert_eq!(upload.released().provenance(), "secure");
    assert_eq!(upload.released().noise_std(), 20.0);
    // Noise of std 20 on 201 coordinates: the norm is far above C = 1.
    assert!(l2_norm(upload.released().values()) > 100.0);
    let tensors = upload.tensors().unwrap();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["item_factors", "item_biases", "global_offset"]);
    assert_eq!(tensors[0].shape, [40, 4]);
    let spent = d.budget().unwrap();
    assert_eq!(spent.rounds, 1);
    assert!(spent.epsilon_spent > 0.0 && spent.epsilon_spent == upload.spent().epsilon);
    drop(d);
    let d = Device::open(dir.path().join("device.db"), DeviceConfig::default()).unwrap();
    let b = d.budget().unwrap();
    assert_eq!((b.rounds, b.uploads.len()), (1, 1));
    assert_eq!(b.epsilon_spent, spent.epsilon_spent);
    // No honest devices are assumed outside distributed mode.
    assert_eq!(
        (
            b.uploads[0].assumed_honest_devices,
            b.uploads[0].min_contributors
        ),
        (None, None)
    );
}

#[test]
fn the_on_device_accountant_is_pld_names_itself_and_spends_less_than_rdp() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(3)).unwrap();
    for _ in 0..3 {
        d.prepare_upload(&task(3, 8.0), now()).unwrap();
    }
    let b = d.budget().unwrap();
    assert_eq!(b.accountant, "pld");
    // Three local uploads at σ = 8: what the PLD accountant says, below RDP's figure.
    let release = RoundRelease {
        mode: PrivacyMode::Local,
        noise_multiplier: 8.0,
        sampling_rate: 1.0,
    };
    let grid = OrderGrid::default();
    let pld = epsilon_after_with(Accountant::Pld, &release, 3, b.delta, &grid).unwrap();
    let rdp = epsilon_after_with(Accountant::Rdp, &release, 3, b.delta, &grid).unwrap();
    assert!(
        (b.epsilon_spent - pld.epsilon).abs() <= 1e-9 * pld.epsilon,
        "{b:?} vs {pld:?}"
    );
    assert!(b.epsilon_spent < rdp.epsilon);
    // Reopened from its store, the device states the same spend.
    drop(d);
    let d = Device::open(dir.path().join("device.db"), DeviceConfig::default()).unwrap();
    assert_eq!(d.budget().unwrap().epsilon_spent, b.epsilon_spent);
}

#[test]
fn a_requested_clip_bit_is_computed_before_clipping_noised_and_accounted_with_the_update() {
    // σ = 20 on the update, σ_b = 10 on the bit: replace-one, the pair is one Gaussian with
    // z⁻² = 20⁻² + (2·10)⁻², so z = 20/√2, and the device records exactly what an upload
    // without a bit at σ = 20/√2 records.
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(3)).unwrap();
    let with_bit = TrainingTask {
        clip_bit_noise_std: Some(10.0),
        ..task(3, 20.0)
    };
    let upload = d.prepare_upload(&with_bit, now()).unwrap();
    let bit = upload.clip_bit().expect("requested");
    assert!(bit.is_finite());
    assert_eq!(upload.noise_multiplier(), 20.0);
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = device(&other_dir);
    other.install_model(model(3)).unwrap();
    let plain = other
        .prepare_upload(&task(3, 20.0 / 2f64.sqrt()), now())
        .unwrap();
    assert!(plain.clip_bit().is_none());
    let (a, b) = (upload.spent().epsilon, plain.spent().epsilon);
    assert!(a > 0.0 && (a - b).abs() <= 1e-9 * b, "{a} vs {b}");
    // More than the update alone would cost.
    let third_dir = tempfile::tempdir().unwrap();
    let mut third = device(&third_dir);
    third.install_model(model(3)).unwrap();
    let alone = third.prepare_upload(&task(3, 20.0), now()).unwrap();
    assert!(alone.spent().epsilon < a);

    // With small bit noise (σ_b = 0.01, affordable only under a huge budget) the bit is the
    // comparison of the unclipped norm with C: under a huge C it is 1, under a tiny one 0
    // (the update itself is not zero).
    for (clip_norm, expected) in [(1e9, 1.0), (1e-9, 0.0)] {
        let dir = tempfile::tempdir().unwrap();
        let config = DeviceConfig {
            budget_epsilon: 1e9,
            ..DeviceConfig::default()
        };
        let mut d = Device::open(dir.path().join("device.db"), config).unwrap();
        d.ingest_jsonl(&catalogue(), false, now()).unwrap();
        d.ingest_jsonl(USER, false, now()).unwrap();
        d.install_model(model(3)).unwrap();
        let t = TrainingTask {
            clip_norm,
            clip_bit_noise_std: Some(0.01),
            ..task(3, 20.0)
        };
        let bit = d.prepare_upload(&t, now()).unwrap().clip_bit().unwrap();
        assert!((bit - expected).abs() < 0.08, "C = {clip_norm}: bit {bit}");
    }
    // A bit noise so small that one upload would blow the budget is refused, nothing recorded.
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(3)).unwrap();
    let t = TrainingTask {
        clip_bit_noise_std: Some(1e-9),
        ..task(3, 20.0)
    };
    assert!(matches!(
        d.prepare_upload(&t, now()),
        Err(SdkError::BudgetExceeded(_))
    ));
    assert_eq!(d.budget().unwrap().rounds, 0);
}

#[test]
fn no_upload_is_prepared_when_training_is_off_or_the_budget_would_be_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(&dir);
    d.install_model(model(3)).unwrap();
    d.set_training(false).unwrap();
    assert!(matches!(
        d.prepare_upload(&task(3, 20.0), now()),
        Err(SdkError::TrainingOff)
    ));
    // Training off does not turn personalisation off.
    assert!(d.settings().personalisation);
    d.set_training(true).unwrap();
    // σ = 0.5 in local mode costs far more than ε = 10 in one round.
    let err = d.prepare_upload(&task(3, 0.5), now()).unwrap_err();
    assert!(matches!(err, SdkError::BudgetExceeded(_)), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(d.budget().unwrap().rounds, 0);
    assert!(d.budget().unwrap().uploads.is_empty());
    // Other refusals record nothing either.
    assert!(matches!(
        d.prepare_upload(&task(4, 20.0), now()),
        Err(SdkError::ModelVersionMismatch {
            task: 4,
            held: Some(3)
        })
    ));
    let central = TrainingTask {
        mode: PrivacyMode::Central,
        ..task(3, 20.0)
    };
    assert!(matches!(
        d.prepare_upload(&central, now()),
        Err(SdkError::UnsupportedMode(_))
    ));
    assert_eq!(d.budget().unwrap().rounds, 0);
    // Rounds are spent until the budget is reached, then refused.
    let mut rounds = 0;
    while d.prepare_upload(&task(3, 20.0), now()).is_ok() {
        rounds += 1;
        assert!(rounds < 1_000);
    }
    let b = d.budget().unwrap();
    assert_eq!(b.rounds, rounds);
    assert!(b.epsilon_spent <= b.epsilon_budget);
}
