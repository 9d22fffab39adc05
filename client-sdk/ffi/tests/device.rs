//! The exported API as a Kotlin or Swift app sees it, called from Rust: ingest, recommend
//! with labels, the user controls, the budget and the typed errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedpref_ffi::{FedprefDevice, FedprefError, ProfileEdit, Reason};

fn at(rfc3339_day: u64) -> Option<SystemTime> {
    // 2026-06-01T12:00:00Z plus whole days.
    Some(UNIX_EPOCH + Duration::from_secs(1_780_315_200 + rfc3339_day * 86_400))
}

fn catalogue_and_ratings() -> String {
    let mut lines = String::new();
    for i in 0..20 {
        let topic = ["Comedy", "Drama", "Jazz", "Health"][i % 4];
        let sensitive = topic == "Health";
        lines += &format!(
            "{{\"type\":\"item\",\"item\":\"i{i}\",\"topics\":[\"{topic}\"],\"sensitive\":{sensitive}}}\n"
        );
    }
    for (item, value) in [("i0", 5.0), ("i4", 4.5), ("i1", 2.0), ("i8", 4.0)] {
        lines += &format!(
            "{{\"type\":\"rating\",\"item\":\"{item}\",\"value\":{value},\"at\":\"2026-05-30T20:00:00Z\"}}\n"
        );
    }
    lines
}

fn model_json() -> String {
    let items: Vec<_> = (0..20)
        .map(|i| {
            let f = [(i % 4) as f64 * 0.1, 0.2 - (i % 3) as f64 * 0.05];
            serde_json::json!({"item": format!("i{i}"), "factors": f, "bias": (i % 5) as f64 * 0.1})
        })
        .collect();
    serde_json::json!({"model_version": 1, "factor_dimension": 2, "global_offset": 3.5, "items": items})
        .to_string()
}

fn open(dir: &tempfile::TempDir) -> std::sync::Arc<FedprefDevice> {
    FedprefDevice::open(dir.path().join("device.db").display().to_string()).unwrap()
}

#[test]
fn ingest_then_recommend_cold_and_warm_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(&dir);
    let r = d
        .ingest_jsonl(catalogue_and_ratings(), false, at(0))
        .unwrap();
    assert_eq!((r.items, r.explicit, r.feedback, r.expired), (20, 0, 4, 0));
    assert!(r.skipped.is_empty());

    let cold = d.recommend(5, at(0)).unwrap();
    assert_eq!(cold.len(), 5);
    assert!(
        cold.iter()
            .all(|r| r.reason == Reason::Popular && !r.label.is_empty())
    );

    d.install_model_json(model_json()).unwrap();
    let warm = d.recommend(5, at(0)).unwrap();
    assert_eq!(warm.len(), 5);
    assert!(warm.iter().any(|r| r.reason == Reason::Personal));
    assert_eq!(
        warm.iter()
            .filter(|r| r.reason == Reason::Diversity)
            .count(),
        1
    );
    // Sensitive items (Health) are never used without the user's opt-in.
    let health = ["i3", "i7", "i11", "i15", "i19"];
    assert!(warm.iter().all(|r| !health.contains(&r.item.as_str())));
    assert!(d.profile(at(0)).unwrap().personalised);

    // The same store, reopened: the model and events are still there.
    drop(d);
    let again = open(&dir);
    assert_eq!(again.recommend(5, at(0)).unwrap(), warm);
}

#[test]
fn user_controls_change_what_the_device_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(&dir);
    d.ingest_jsonl(catalogue_and_ratings(), false, at(0))
        .unwrap();
    d.install_model_json(model_json()).unwrap();

    d.set_personalisation(false).unwrap();
    assert!(!d.settings().personalisation);
    let recs = d.recommend(4, at(0)).unwrap();
    assert!(recs.iter().all(|r| r.reason != Reason::Personal));
    assert!(!d.profile(at(0)).unwrap().personalised);
    d.set_personalisation(true).unwrap();
    d.set_training(false).unwrap();
    assert!(!d.settings().training);

    d.edit_profile(
        ProfileEdit::SetRole {
            role: Some("nurse".into()),
        },
        at(0),
    )
    .unwrap();
    d.edit_profile(
        ProfileEdit::AddGoal {
            goal: "sleep".into(),
        },
        at(0),
    )
    .unwrap();
    d.edit_profile(
        ProfileEdit::MuteTopic {
            topic: "Jazz".into(),
        },
        at(0),
    )
    .unwrap();
    let p = d.profile(at(0)).unwrap();
    assert_eq!(p.role.as_deref(), Some("nurse"));
    assert_eq!(p.goals, vec!["sleep".to_string()]);
    assert_eq!(p.muted_topics, vec!["Jazz".to_string()]);
    assert_eq!(p.feedback_counts.values().sum::<u64>(), 4);

    let export: serde_json::Value = serde_json::from_str(&d.export(at(0)).unwrap()).unwrap();
    assert_eq!(export["format"], "fedpref-device-export");

    d.reset_model().unwrap();
    let p = d.profile(at(0)).unwrap();
    assert_eq!(p.feedback_counts.values().sum::<u64>(), 0);
    assert_eq!(
        p.role.as_deref(),
        Some("nurse"),
        "explicit data survives a reset"
    );

    d.delete_everything().unwrap();
    let p = d.profile(at(0)).unwrap();
    assert_eq!(p.role, None);
    assert!(
        d.recommend(3, at(0)).unwrap().is_empty(),
        "the catalogue is gone too"
    );
    assert!(!d.settings().training, "the switches are kept");
}

#[test]
fn budget_of_a_new_store_and_its_chosen_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db").display().to_string();
    let d = FedprefDevice::open_with_budget(path.clone(), 4.0, 1e-6).unwrap();
    let b = d.budget().unwrap();
    assert_eq!((b.epsilon_budget, b.delta), (4.0, 1e-6));
    assert_eq!(
        (b.epsilon_spent, b.epsilon_remaining, b.rounds),
        (0.0, 4.0, 0)
    );
    assert!(b.uploads.is_empty());
    drop(d);
    // An existing store keeps the budget it was created with.
    let d = FedprefDevice::open(path).unwrap();
    assert_eq!(d.budget().unwrap().epsilon_budget, 4.0);
}

#[test]
fn errors_are_typed_and_carry_the_sdks_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(&dir);
    let e = d
        .ingest_jsonl(
            "{\"type\":\"item\",\"item\":\"a\",\"topics\":[\"Jazz\"]}\n{\"type\":\"rating\",\"item\":\"a\",\"value\":9}\n"
                .into(),
            false,
            at(0),
        )
        .unwrap_err();
    let FedprefError::InvalidLines(message) = &e else {
        panic!("{e:?}")
    };
    assert!(
        message.starts_with("1 invalid line(s), nothing was stored; first: line 2"),
        "{message}"
    );
    assert_eq!(
        d.recommend(3, at(0)).unwrap().len(),
        0,
        "nothing was stored"
    );

    // skip_invalid stores the valid line and reports the other.
    let r = d
        .ingest_jsonl(
            "{\"type\":\"item\",\"item\":\"a\",\"topics\":[\"Jazz\"]}\n{\"type\":\"rating\",\"item\":\"a\",\"value\":9}\n"
                .into(),
            true,
            at(0),
        )
        .unwrap();
    assert_eq!(r.items, 1);
    assert_eq!(r.skipped.len(), 1);
    assert!(r.skipped[0].starts_with("line 2"), "{:?}", r.skipped);

    let e = d
        .edit_profile(ProfileEdit::AddInterest { topic: " ".into() }, at(0))
        .unwrap_err();
    assert!(matches!(e, FedprefError::InvalidInput(_)), "{e:?}");

    let e = d.install_model_json("{".into()).unwrap_err();
    assert!(
        matches!(e, FedprefError::InvalidInput(ref m) if m.starts_with("model: not valid JSON")),
        "{e:?}"
    );
    let e = d
        .install_model_json(r#"{"model_version":1,"factor_dimension":2,"global_offset":3,"items":[{"item":"a","factors":[1],"bias":0}]}"#.into())
        .unwrap_err();
    assert!(
        matches!(e, FedprefError::Model(ref m) if m.starts_with("model: ")),
        "{e:?}"
    );

    let e =
        FedprefDevice::open_with_budget(dir.path().join("x.db").display().to_string(), -1.0, 1e-6)
            .err()
            .unwrap();
    assert!(matches!(e, FedprefError::Privacy(_)), "{e:?}");

    let e = FedprefDevice::open(dir.path().join("no/such/dir/d.db").display().to_string())
        .err()
        .unwrap();
    assert!(
        matches!(e, FedprefError::Storage(ref m) if m.starts_with("store: ")),
        "{e:?}"
    );
}
