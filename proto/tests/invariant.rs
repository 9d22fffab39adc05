//! The protocol's architecture invariant and shape, checked on the compiled
//! descriptors (`FILE_DESCRIPTOR_SET`), so that a `.proto` edit that breaks
//! them fails `cargo test`.
//!
//! Invariant: no message carries a user's private parameters (user factor,
//! user bias), raw events, or identity beyond an opaque device id.

use std::collections::BTreeMap;

use fedpref_proto::FILE_DESCRIPTOR_SET;
use fedpref_proto::prost::Message;
use fedpref_proto::prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};

/// Names (as snake_case word sequences) that smell of a user's private
/// parameters, raw events or identity. A field, message, enum or method name
/// is refused when one of these appears in it as a whole run of words, so
/// `user_factor` and `last_user_factor` are refused but `clip_norm` is not.
const DENIED: &[&str] = &[
    // private parameters of the preference model
    "user_factor",
    "user_factors",
    "user_vector",
    "user_embedding",
    "user_bias",
    "user_state",
    "private_parameters",
    // raw events and what they are made of
    "event",
    "events",
    "rating",
    "ratings",
    "interaction",
    "interactions",
    "dwell",
    "history",
    "profile",
    "interests",
    // identity and quasi-identifiers
    "user_id",
    "user_ids",
    "user_name",
    "username",
    "name_of_user",
    "full_name",
    "first_name",
    "last_name",
    "display_name",
    "email",
    "phone",
    "phone_number",
    "ip",
    "ip_address",
    "mac_address",
    "postal_address",
    "home_address",
    "location",
    "latitude",
    "longitude",
    "gps",
    "imei",
    "serial_number",
    "advertising_id",
    "android_id",
    "idfa",
    "idfv",
    "birthday",
    "date_of_birth",
    "age",
    "gender",
    "contacts",
];

/// Names that are allowed even if a future deny-list entry would match them.
const ALLOWED: &[&str] = &["device_id"];

/// Splits a snake_case or CamelCase name into lower-case words.
fn words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let chars: Vec<char> = name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == '_' {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            continue;
        }
        let boundary = c.is_ascii_uppercase()
            && i > 0
            && (chars[i - 1].is_ascii_lowercase()
                || chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase()));
        if boundary && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        current.push(c.to_ascii_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// The deny-list entry a name matches, if any.
fn denied_by(name: &str) -> Option<&'static str> {
    let name_words = words(name);
    if ALLOWED.contains(&name_words.join("_").as_str()) {
        return None;
    }
    DENIED.iter().copied().find(|denied| {
        let denied_words: Vec<&str> = denied.split('_').collect();
        name_words
            .windows(denied_words.len())
            .any(|window| window.iter().zip(&denied_words).all(|(a, b)| a == b))
    })
}

fn descriptors() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
}

/// The fedpref.v1 files, i.e. the set without the imported well-known types.
fn fedpref_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    let files: Vec<_> = set
        .file
        .iter()
        .filter(|f| f.package() == "fedpref.v1")
        .collect();
    assert!(
        files.len() >= 4,
        "expected the fedpref.v1 files, found {}",
        files.len()
    );
    files
}

/// Every name in a message, qualified for error messages: the message itself,
/// its fields, oneofs, nested messages and nested enums with their values.
fn message_names(prefix: &str, message: &DescriptorProto, out: &mut Vec<(String, String)>) {
    let path = format!("{prefix}.{}", message.name());
    out.push((path.clone(), message.name().to_owned()));
    for field in &message.field {
        out.push((format!("{path}.{}", field.name()), field.name().to_owned()));
    }
    for oneof in &message.oneof_decl {
        out.push((format!("{path}.{}", oneof.name()), oneof.name().to_owned()));
    }
    for nested in &message.nested_type {
        message_names(&path, nested, out);
    }
    for nested in &message.enum_type {
        enum_names(&path, nested, out);
    }
}

/// The enum's name and its values' names.
fn enum_names(prefix: &str, e: &EnumDescriptorProto, out: &mut Vec<(String, String)>) {
    let path = format!("{prefix}.{}", e.name());
    out.push((path.clone(), e.name().to_owned()));
    for value in &e.value {
        out.push((format!("{path}.{}", value.name()), value.name().to_owned()));
    }
}

fn all_names(set: &FileDescriptorSet) -> Vec<(String, String)> {
    let mut names = Vec::new();
    for file in fedpref_files(set) {
        for message in &file.message_type {
            message_names("fedpref.v1", message, &mut names);
        }
        for e in &file.enum_type {
            enum_names("fedpref.v1", e, &mut names);
        }
        for service in &file.service {
            let path = format!("fedpref.v1.{}", service.name());
            names.push((path.clone(), service.name().to_owned()));
            for method in &service.method {
                names.push((
                    format!("{path}.{}", method.name()),
                    method.name().to_owned(),
                ));
            }
        }
    }
    names
}

/// The one identity the protocol carries besides the coordinator's device id: the app
/// backend's opaque pseudonym in an enrolment grant. Pinned, so the grant cannot grow into a
/// carrier of anything else about the person.
#[test]
fn an_enrolment_grant_claims_only_a_pseudonym_and_an_expiry() {
    let set = descriptors();
    let claims = fedpref_files(&set)
        .iter()
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "GrantClaims")
        .expect("GrantClaims exists");
    let fields: Vec<(&str, Type)> = claims
        .field
        .iter()
        .map(|f| (f.name(), f.r#type()))
        .collect();
    assert_eq!(
        fields,
        [("pseudonym", Type::String), ("expires_at", Type::Message)]
    );
}

#[test]
fn no_field_message_or_method_name_looks_like_private_user_data() {
    let violations: Vec<String> = all_names(&descriptors())
        .into_iter()
        .filter_map(|(path, name)| {
            denied_by(&name).map(|denied| format!("{path} (matches `{denied}`)"))
        })
        .collect();
    assert!(
        violations.is_empty(),
        "the protocol must not carry private parameters, raw events or identity \
         beyond an opaque device id; offending names:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn the_deny_list_catches_what_it_should_and_spares_device_id() {
    for bad in [
        "user_factor",
        "UserFactor",
        "last_user_bias",
        "raw_events",
        "RatingHistory",
        "ip_address",
        "email",
        "name_of_user",
        "userId",
        "DECLINE_REASON_USER_EMAIL",
    ] {
        assert!(denied_by(bad).is_some(), "`{bad}` should be denied");
    }
    for good in [
        "device_id",
        "clip_norm",
        "usage",
        "page_token",
        "item_factors",
        "strip",
        "message",
        "EvaluationCounts",
    ] {
        assert_eq!(denied_by(good), None, "`{good}` should be allowed");
    }
}

#[test]
fn the_only_identity_the_protocol_carries_is_the_opaque_device_id() {
    let identity_fields: Vec<String> = all_names(&descriptors())
        .into_iter()
        .filter(|(_, name)| {
            let w = words(name);
            w.len() >= 2 && w.ends_with(&["id".to_owned()]) && w[w.len() - 2] == "device"
        })
        .map(|(path, _)| path)
        .collect();
    assert_eq!(
        identity_fields,
        vec!["fedpref.v1.EnrollResponse.device_id".to_owned()],
        "the device id is handed to the device once, at enrolment, and never sent back"
    );
}

/// (service, method, client streaming, server streaming)
const REQUIRED_METHODS: &[(&str, &str, bool, bool)] = &[
    ("DeviceService", "Enroll", false, false),
    ("DeviceService", "CheckIn", false, false),
    ("DeviceService", "DownloadModel", false, true),
    ("DeviceService", "UploadUpdate", true, false),
    ("DeviceService", "DeclineTask", false, false),
    ("DeviceService", "ReportMetrics", false, false),
    ("AdminService", "CreateRun", false, false),
    ("AdminService", "GetRun", false, false),
    ("AdminService", "ListRuns", false, false),
    ("AdminService", "PauseRun", false, false),
    ("AdminService", "ResumeRun", false, false),
    ("AdminService", "StopRun", false, false),
    ("AdminService", "RollbackRun", false, false),
    ("AdminService", "ListModelVersions", false, false),
    ("AdminService", "ReadLedger", false, false),
    ("AdminService", "VerifyLedger", false, false),
    ("AdminService", "GetReport", false, false),
    ("SecureAggregationService", "AdvertiseKeys", false, false),
    ("SecureAggregationService", "GetStage", false, false),
    ("SecureAggregationService", "ShareKeys", false, false),
    ("SecureAggregationService", "Unmask", false, false),
];

#[test]
fn every_required_service_and_method_exists_with_its_streaming_shape() {
    let set = descriptors();
    let mut methods = BTreeMap::new();
    for file in fedpref_files(&set) {
        for service in &file.service {
            for method in &service.method {
                methods.insert(
                    (service.name().to_owned(), method.name().to_owned()),
                    (method.client_streaming(), method.server_streaming()),
                );
            }
        }
    }
    for &(service, method, client_streaming, server_streaming) in REQUIRED_METHODS {
        let found = methods.get(&(service.to_owned(), method.to_owned()));
        assert_eq!(
            found,
            Some(&(client_streaming, server_streaming)),
            "{service}.{method}: expected client_streaming={client_streaming}, \
             server_streaming={server_streaming}"
        );
    }
}

/// Fields later issues rely on: (message, field, type, repeated).
const REQUIRED_FIELDS: &[(&str, &str, Type, bool)] = &[
    ("NamedTensor", "name", Type::String, false),
    ("NamedTensor", "shape", Type::Uint64, true),
    ("NamedTensor", "dtype", Type::Enum, false),
    ("NamedTensor", "data", Type::Bytes, false),
    ("EnrollResponse", "device_token", Type::String, false),
    ("CheckInRequest", "held_model", Type::Message, false),
    ("CheckInRequest", "eligibility", Type::Message, false),
    ("CheckInRequest", "sdk_version", Type::String, false),
    ("CheckInResponse", "task", Type::Message, false),
    ("CheckInResponse", "come_back_later", Type::Message, false),
    ("Task", "run_id", Type::String, false),
    ("Task", "round_id", Type::Uint64, false),
    ("Task", "task_token", Type::String, false),
    ("Task", "model", Type::Message, false),
    ("Task", "local_training", Type::Message, false),
    ("Task", "clip_norm", Type::Double, false),
    ("Task", "noise_multiplier", Type::Double, false),
    ("Task", "privacy_mode", Type::Enum, false),
    ("Task", "upload_deadline", Type::Message, false),
    ("Task", "clip_bit_requested", Type::Bool, false),
    ("ComeBackLater", "retry_after", Type::Message, false),
    ("ComeBackLater", "reason", Type::Enum, false),
    ("DownloadModelRequest", "offset", Type::Uint64, false),
    ("ModelChunk", "model_version", Type::Uint64, false),
    ("ModelChunk", "total_size_bytes", Type::Uint64, false),
    ("ModelChunk", "model_sha256", Type::Bytes, false),
    ("UploadUpdateRequest", "header", Type::Message, false),
    ("UploadUpdateRequest", "chunk", Type::Message, false),
    ("UpdateHeader", "task", Type::Message, false),
    ("UpdateHeader", "tensors", Type::Message, true),
    ("TaskRef", "run_id", Type::String, false),
    ("TaskRef", "round_id", Type::Uint64, false),
    ("TaskRef", "task_token", Type::String, false),
    ("RunManifest", "purpose", Type::String, false),
    ("RunManifest", "owner", Type::String, false),
    ("RunManifest", "data_elements_used", Type::Message, true),
    ("RunManifest", "data_elements_not_used", Type::Message, true),
    ("RunManifest", "privacy_mode", Type::Enum, false),
    ("RunManifest", "budget", Type::Message, false),
    ("RunManifest", "clip_norm", Type::Double, false),
    ("RunManifest", "noise_multiplier", Type::Double, false),
    ("RunManifest", "sampling", Type::Message, false),
    ("RunManifest", "rounds", Type::Uint64, false),
    ("RunManifest", "opt_out_policy", Type::Message, false),
    ("RunManifest", "harm_scenarios", Type::Message, true),
    ("RunManifest", "kpis", Type::Message, true),
    ("RunManifest", "guardrail_metrics", Type::Message, true),
    ("RunManifest", "server_optimizer", Type::Message, false),
    ("RunManifest", "model", Type::Message, false),
    ("RunManifest", "accountant", Type::Enum, false),
    ("AudienceEpsilon", "accountant", Type::Enum, false),
    ("AudienceSpend", "accountant", Type::Enum, false),
    ("PrivacyBudget", "epsilon", Type::Double, false),
    ("PrivacyBudget", "delta", Type::Double, false),
    ("Sampling", "poisson", Type::Message, false),
    ("Sampling", "cohort", Type::Message, false),
    ("GuardrailMetric", "threshold", Type::Double, false),
    ("LedgerEntry", "sequence", Type::Uint64, false),
    ("LedgerEntry", "run_id", Type::String, false),
    ("LedgerEntry", "round_id", Type::Uint64, false),
    ("LedgerEntry", "kind", Type::Enum, false),
    ("LedgerEntry", "spend", Type::Message, true),
    ("LedgerEntry", "delta", Type::Double, false),
    ("LedgerEntry", "noise_multiplier", Type::Double, false),
    ("LedgerEntry", "sampling_rate", Type::Double, false),
    ("LedgerEntry", "clip_norm", Type::Double, false),
    ("LedgerEntry", "participants", Type::Uint64, false),
    ("LedgerEntry", "recorded_at", Type::Message, false),
    ("LedgerEntry", "previous_hash", Type::Bytes, false),
    ("LedgerEntry", "entry_hash", Type::Bytes, false),
    ("AudienceSpend", "epsilon_spent", Type::Double, false),
    ("AudienceSpend", "epsilon_cumulative", Type::Double, false),
    ("ReadLedgerRequest", "page_token", Type::String, false),
    ("GetReportRequest", "format", Type::Enum, false),
];

#[test]
fn every_field_later_issues_rely_on_exists_with_its_type() {
    let set = descriptors();
    let mut messages = BTreeMap::new();
    for file in fedpref_files(&set) {
        for message in &file.message_type {
            messages.insert(message.name().to_owned(), message);
        }
    }
    for &(message, field, ty, repeated) in REQUIRED_FIELDS {
        let descriptor = messages
            .get(message)
            .unwrap_or_else(|| panic!("message {message} is missing"));
        let f = descriptor
            .field
            .iter()
            .find(|f| f.name() == field)
            .unwrap_or_else(|| panic!("{message}.{field} is missing"));
        assert_eq!(f.r#type(), ty, "{message}.{field} has the wrong type");
        assert_eq!(
            f.label() == Label::Repeated,
            repeated,
            "{message}.{field}: repeated should be {repeated}"
        );
    }
}

#[test]
fn required_enum_values_exist() {
    let set = descriptors();
    let mut enums: BTreeMap<String, &EnumDescriptorProto> = BTreeMap::new();
    for file in fedpref_files(&set) {
        for e in &file.enum_type {
            enums.insert(e.name().to_owned(), e);
        }
    }
    let required: &[(&str, &[&str])] = &[
        ("Dtype", &["DTYPE_F32", "DTYPE_F64"]),
        (
            "PrivacyMode",
            &[
                "PRIVACY_MODE_LOCAL",
                "PRIVACY_MODE_CENTRAL",
                "PRIVACY_MODE_DISTRIBUTED",
            ],
        ),
        (
            "LedgerEntryKind",
            &[
                "LEDGER_ENTRY_KIND_ROUND_SPENT",
                "LEDGER_ENTRY_KIND_ROUND_ABANDONED",
                "LEDGER_ENTRY_KIND_BUDGET_STOP",
                "LEDGER_ENTRY_KIND_PAUSED",
                "LEDGER_ENTRY_KIND_RESUMED",
                "LEDGER_ENTRY_KIND_ROLLED_BACK",
            ],
        ),
        (
            "ReportFormat",
            &[
                "REPORT_FORMAT_HTML",
                "REPORT_FORMAT_MARKDOWN",
                "REPORT_FORMAT_JSON",
            ],
        ),
    ];
    for (name, values) in required {
        let e = enums
            .get(*name)
            .unwrap_or_else(|| panic!("enum {name} is missing"));
        for value in *values {
            assert!(
                e.value.iter().any(|v| v.name() == *value),
                "{name}.{value} is missing"
            );
        }
    }
}

/// `PrivacyMode` -> `PRIVACY_MODE`, `Dtype` -> `DTYPE`, `SecAggStage` -> `SEC_AGG_STAGE`.
fn shouty(name: &str) -> String {
    words(name).join("_").to_ascii_uppercase()
}

fn check_enum(path: &str, e: &EnumDescriptorProto, problems: &mut Vec<String>) {
    let zero = e.value.iter().find(|v| v.number() == 0);
    let expected = format!("{}_UNSPECIFIED", shouty(e.name()));
    match zero {
        Some(v) if v.name() == expected => {}
        Some(v) => problems.push(format!(
            "{path}.{}: zero value is {}, expected {expected}",
            e.name(),
            v.name()
        )),
        None => problems.push(format!("{path}.{}: has no zero value", e.name())),
    }
    let prefix = format!("{}_", shouty(e.name()));
    for v in &e.value {
        if !v.name().starts_with(&prefix) {
            problems.push(format!(
                "{path}.{}.{}: values must start with {prefix}",
                e.name(),
                v.name()
            ));
        }
    }
}

#[test]
fn every_enum_starts_with_an_unspecified_zero_value() {
    fn nested(path: &str, m: &DescriptorProto, problems: &mut Vec<String>) {
        let path = format!("{path}.{}", m.name());
        for e in &m.enum_type {
            check_enum(&path, e, problems);
        }
        for n in &m.nested_type {
            nested(&path, n, problems);
        }
    }
    let set = descriptors();
    let mut problems = Vec::new();
    for file in fedpref_files(&set) {
        for e in &file.enum_type {
            check_enum("fedpref.v1", e, &mut problems);
        }
        for m in &file.message_type {
            nested("fedpref.v1", m, &mut problems);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Paths into `FileDescriptorProto` (see descriptor.proto's field numbers).
const MESSAGE_TYPE: i32 = 4;
const ENUM_TYPE: i32 = 5;
const SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF_DECL: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn expect_message_docs(
    path: Vec<i32>,
    name: &str,
    m: &DescriptorProto,
    out: &mut Vec<(Vec<i32>, String)>,
) {
    let name = format!("{name}.{}", m.name());
    out.push((path.clone(), name.clone()));
    for (i, f) in m.field.iter().enumerate() {
        out.push((
            [path.as_slice(), &[MESSAGE_FIELD, i as i32]].concat(),
            format!("{name}.{}", f.name()),
        ));
    }
    for (i, o) in m.oneof_decl.iter().enumerate() {
        // proto3 `optional` fields live in a synthetic oneof that has no source.
        let synthetic = m
            .field
            .iter()
            .any(|f| f.oneof_index == Some(i as i32) && f.proto3_optional());
        if synthetic {
            continue;
        }
        out.push((
            [path.as_slice(), &[MESSAGE_ONEOF_DECL, i as i32]].concat(),
            format!("{name}.{} (oneof)", o.name()),
        ));
    }
    for (i, n) in m.nested_type.iter().enumerate() {
        expect_message_docs(
            [path.as_slice(), &[MESSAGE_NESTED_TYPE, i as i32]].concat(),
            &name,
            n,
            out,
        );
    }
    for (i, e) in m.enum_type.iter().enumerate() {
        expect_enum_docs(
            [path.as_slice(), &[MESSAGE_ENUM_TYPE, i as i32]].concat(),
            &name,
            e,
            out,
        );
    }
}

fn expect_enum_docs(
    path: Vec<i32>,
    name: &str,
    e: &EnumDescriptorProto,
    out: &mut Vec<(Vec<i32>, String)>,
) {
    let name = format!("{name}.{}", e.name());
    out.push((path.clone(), name.clone()));
    for (i, v) in e.value.iter().enumerate() {
        out.push((
            [path.as_slice(), &[ENUM_VALUE, i as i32]].concat(),
            format!("{name}.{}", v.name()),
        ));
    }
}

#[test]
fn every_message_field_enum_value_service_and_method_has_a_doc_comment() {
    let set = descriptors();
    let mut missing = Vec::new();
    for file in fedpref_files(&set) {
        let documented: BTreeMap<&[i32], bool> = file
            .source_code_info
            .as_ref()
            .expect("protox keeps source info")
            .location
            .iter()
            .map(|l| (l.path.as_slice(), !l.leading_comments().trim().is_empty()))
            .collect();
        let mut expected = Vec::new();
        for (i, m) in file.message_type.iter().enumerate() {
            expect_message_docs(vec![MESSAGE_TYPE, i as i32], "", m, &mut expected);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            expect_enum_docs(vec![ENUM_TYPE, i as i32], "", e, &mut expected);
        }
        for (i, s) in file.service.iter().enumerate() {
            expected.push((vec![SERVICE, i as i32], format!(".{}", s.name())));
            for (j, m) in s.method.iter().enumerate() {
                expected.push((
                    vec![SERVICE, i as i32, SERVICE_METHOD, j as i32],
                    format!(".{}.{}", s.name(), m.name()),
                ));
            }
        }
        for (path, name) in expected {
            if !documented.get(path.as_slice()).copied().unwrap_or(false) {
                missing.push(format!("{}: fedpref.v1{name}", file.name()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the .proto comments are the API reference; undocumented:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn every_proto_file_states_the_architecture_invariant_at_the_top() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fedpref/v1");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("the proto directory exists") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "proto") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with("//") || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            header.contains("ARCHITECTURE INVARIANT")
                && header.contains("private")
                && header.contains("raw events")
                && header.contains("opaque device id"),
            "{} must open with the architecture invariant comment",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 4, "found only {checked} .proto files");
}

#[test]
fn the_descriptor_set_includes_the_well_known_types_reflection_needs() {
    let set = descriptors();
    let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
    for needed in [
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
        "fedpref/v1/device.proto",
        "fedpref/v1/admin.proto",
    ] {
        assert!(names.contains(&needed), "{needed} missing from {names:?}");
    }
}

/// What each field of each message a device sends is, as
/// `docs/what-leaves-the-device.md` documents it:
/// - `noised`: a differentially private release (or a function of one alone);
/// - `bounded`: chosen by the device from a small, documented set, never from the user's data;
/// - `public`: copied from what the coordinator sent, or protocol bookkeeping (sizes, offsets,
///   keys of the secure-aggregation protocol).
const DEVICE_SENT: &[(&str, &str, &str)] = &[
    ("EnrollRequest", "app_key", "public"),
    ("EnrollRequest", "sdk_version", "public"),
    ("EnrollRequest", "grant", "public"),
    ("EnrolmentGrant", "claims", "public"),
    ("EnrolmentGrant", "signature", "public"),
    ("CheckInRequest", "sdk_version", "public"),
    ("CheckInRequest", "held_model", "public"),
    ("CheckInRequest", "eligibility", "bounded"),
    ("Eligibility", "device_conditions_met", "bounded"),
    ("Eligibility", "privacy_budget_available", "bounded"),
    ("ModelVersionRef", "run_id", "public"),
    ("ModelVersionRef", "model_version", "public"),
    ("ModelVersionRef", "sha256", "public"),
    ("ModelVersionRef", "size_bytes", "public"),
    ("DownloadModelRequest", "run_id", "public"),
    ("DownloadModelRequest", "model_version", "public"),
    ("DownloadModelRequest", "offset", "public"),
    ("DownloadModelRequest", "max_chunk_bytes", "public"),
    ("DownloadModelRequest", "expected_sha256", "public"),
    ("UploadUpdateRequest", "header", "public"),
    ("UploadUpdateRequest", "chunk", "noised"),
    ("UpdateHeader", "task", "public"),
    ("UpdateHeader", "base_model_version", "public"),
    ("UpdateHeader", "tensors", "public"),
    ("UpdateHeader", "privacy_mode", "public"),
    ("UpdateHeader", "clip_norm", "public"),
    ("UpdateHeader", "noise_multiplier", "public"),
    ("UpdateHeader", "clip_bit", "noised"),
    ("UpdateHeader", "update_sha256", "noised"),
    ("TensorSpec", "name", "public"),
    ("TensorSpec", "shape", "public"),
    ("TensorSpec", "dtype", "public"),
    ("TensorChunk", "tensor_index", "public"),
    ("TensorChunk", "offset", "public"),
    ("TensorChunk", "content", "noised"),
    ("TaskRef", "run_id", "public"),
    ("TaskRef", "round_id", "public"),
    ("TaskRef", "task_token", "public"),
    ("DeclineTaskRequest", "task", "public"),
    ("DeclineTaskRequest", "reason", "bounded"),
    ("ReportMetricsRequest", "run_id", "public"),
    ("ReportMetricsRequest", "model_version", "public"),
    ("ReportMetricsRequest", "evaluation_token", "public"),
    ("ReportMetricsRequest", "released_rates", "noised"),
    ("ReportMetricsRequest", "noise_multiplier", "public"),
    ("AdvertiseKeysRequest", "task", "public"),
    ("AdvertiseKeysRequest", "encryption_public_key", "public"),
    ("AdvertiseKeysRequest", "masking_public_key", "public"),
    ("GetStageRequest", "task", "public"),
    ("ShareKeysRequest", "task", "public"),
    ("ShareKeysRequest", "shares", "public"),
    ("EncryptedShare", "sender_index", "public"),
    ("EncryptedShare", "recipient_index", "public"),
    ("EncryptedShare", "ciphertext", "public"),
    ("UnmaskRequest", "task", "public"),
    ("UnmaskRequest", "shares", "public"),
    ("RevealedShare", "owner_index", "public"),
    ("RevealedShare", "kind", "public"),
    ("RevealedShare", "share", "public"),
];

/// Fields that carried unnoised information about the user's data and must never return.
const NEVER_SENT: &[(&str, &str)] = &[
    ("UpdateHeader", "example_count"),
    ("ReportMetricsRequest", "window_start"),
    ("ReportMetricsRequest", "window_end"),
    ("ReportMetricsRequest", "cohort"),
    ("ReportMetricsRequest", "counts"),
];

#[test]
fn every_field_a_device_sends_is_classified_noised_bounded_or_public() {
    let set = descriptors();
    let mut messages: BTreeMap<String, &DescriptorProto> = BTreeMap::new();
    for file in fedpref_files(&set) {
        for m in &file.message_type {
            messages.insert(format!(".fedpref.v1.{}", m.name()), m);
        }
    }
    // The request types of every method of the services devices call, and every fedpref.v1
    // message reachable from them.
    let mut todo: Vec<String> = fedpref_files(&set)
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| ["DeviceService", "SecureAggregationService"].contains(&s.name()))
        .flat_map(|s| &s.method)
        .map(|m| m.input_type().to_owned())
        .collect();
    assert!(todo.len() >= 10, "{todo:?}");
    let mut seen = std::collections::BTreeSet::new();
    let mut found = vec![];
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(m) = messages.get(&name) else {
            panic!("{name}: a device sends a message from outside fedpref.v1");
        };
        for f in &m.field {
            found.push((m.name().to_owned(), f.name().to_owned()));
            if f.r#type() == Type::Message {
                todo.push(f.type_name().to_owned());
            }
        }
    }
    let classified: Vec<(String, String)> = DEVICE_SENT
        .iter()
        .map(|(m, f, class)| {
            assert!(
                ["noised", "bounded", "public"].contains(class),
                "{m}.{f}: {class}"
            );
            (m.to_string(), f.to_string())
        })
        .collect();
    let unclassified: Vec<_> = found.iter().filter(|f| !classified.contains(f)).collect();
    assert!(
        unclassified.is_empty(),
        "fields a device sends that DEVICE_SENT (and docs/what-leaves-the-device.md) do not classify: {unclassified:?}"
    );
    let stale: Vec<_> = classified.iter().filter(|f| !found.contains(f)).collect();
    assert!(
        stale.is_empty(),
        "classified fields no device sends: {stale:?}"
    );
    for (m, f) in NEVER_SENT {
        assert!(
            !found.contains(&(m.to_string(), f.to_string())),
            "{m}.{f} carried unnoised information about the user and must not return"
        );
    }
}
