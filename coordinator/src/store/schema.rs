//! The schema: numbered migrations, one list per SQL dialect, kept side by side.

/// The SQLite schema, one script per version (the PostgreSQL one, [`POSTGRES_MIGRATIONS`],
/// is the same schema in its dialect).
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    manifest_toml TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    rounds_committed BIGINT NOT NULL,
    next_round BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    published_version BIGINT NOT NULL,
    server_state TEXT NOT NULL
);
CREATE TABLE model_versions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    version BIGINT NOT NULL,
    round BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    snapshot BLOB NOT NULL,
    created_at_ms BIGINT NOT NULL,
    published_at_ms BIGINT,
    PRIMARY KEY (run_id, version)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    contributions BIGINT NOT NULL,
    closed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE participations (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, round, device_id)
);
CREATE INDEX participations_by_device ON participations (device_id, run_id);
CREATE TABLE ledger (
    run_id TEXT NOT NULL REFERENCES runs(id),
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
    // 2: enrolled devices (only the SHA-256 of each token is kept) and the sums of the
    // devices' federated-evaluation counts, per run, model version and activity cohort.
    r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    sdk_version TEXT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL
);
CREATE TABLE evaluation_counts (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    cohort TEXT NOT NULL,
    reports BIGINT NOT NULL,
    recommendation_lists_shown BIGINT NOT NULL,
    recommendations_shown BIGINT NOT NULL,
    injected_recommendations_shown BIGINT NOT NULL,
    positive_feedback_count BIGINT NOT NULL,
    negative_feedback_count BIGINT NOT NULL,
    personalisation_opt_outs BIGINT NOT NULL,
    training_opt_outs BIGINT NOT NULL,
    predictions_evaluated BIGINT NOT NULL,
    predictions_within_half BIGINT NOT NULL,
    PRIMARY KEY (run_id, model_version, cohort)
);
"#,
    // 3: the evaluation sums the guardrail metrics also need (diversity, topic coverage,
    // devices that opted out, the windows covered), and which devices reported on which
    // model version, so a guardrail counts distinct devices rather than reports.
    r#"
ALTER TABLE evaluation_counts ADD COLUMN intra_list_diversity_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN opted_out_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN window_start_ms BIGINT;
ALTER TABLE evaluation_counts ADD COLUMN window_end_ms BIGINT;
CREATE TABLE evaluation_reporters (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, device_id)
);
"#,
    // 4: run leases, for replicas sharing one database (see Store::acquire_lease).
    r#"
CREATE TABLE run_leases (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    owner TEXT NOT NULL,
    owner_endpoint TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
"#,
    // 5: admin commands sent to a replica that does not own the run, for the owner to apply
    // (see crate::replica::forward).
    r#"
CREATE TABLE admin_commands (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX admin_commands_by_run ON admin_commands (run_id, status);
"#,
    // 6: federated evaluation as a DP release: the sums of the devices' released, noised
    // rates per model version (no device identity, no time, no raw count); the raw counts
    // and the table of which device reported on which version are dropped.
    r#"
DROP TABLE evaluation_reporters;
DROP TABLE evaluation_counts;
CREATE TABLE evaluation_releases (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    reports BIGINT NOT NULL,
    sums TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version)
);
"#,
    // 7: the ledger signing key's signature of each run's head after every entry (see
    // crate::checkpoint), written in the entry's transaction.
    r#"
CREATE TABLE ledger_signatures (
    run_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
    // 8: enrolment grants: the person (a hash of the app backend's pseudonym, see
    // crate::enrolment) a device enrolled as; NULL for an enrolment without a grant.
    r#"
ALTER TABLE devices ADD COLUMN principal TEXT;
CREATE INDEX devices_by_principal ON devices (principal, enrolled_at_ms);
"#,
    // 9: which devices (or persons) were issued the evaluation token of a model version, so
    // that no restart or other replica issues a second one (see crate::grants). The tokens'
    // hashes stay in memory, and nothing ties this table to the evaluation sums.
    r#"
CREATE TABLE evaluation_tokens_issued (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    principal TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, principal)
);
"#,
];

/// The PostgreSQL schema, one script per version, version for version the same as
/// [`MIGRATIONS`].
pub const POSTGRES_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    manifest_toml TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    rounds_committed BIGINT NOT NULL,
    next_round BIGINT NOT NULL,
    current_version BIGINT NOT NULL,
    published_version BIGINT NOT NULL,
    server_state TEXT NOT NULL
);
CREATE TABLE model_versions (
    run_id TEXT NOT NULL REFERENCES runs(id),
    version BIGINT NOT NULL,
    round BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    snapshot BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    published_at_ms BIGINT,
    PRIMARY KEY (run_id, version)
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    contributions BIGINT NOT NULL,
    closed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE participations (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, round, device_id)
);
CREATE INDEX participations_by_device ON participations (device_id, run_id);
CREATE TABLE ledger (
    run_id TEXT NOT NULL REFERENCES runs(id),
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"#,
    // 2: enrolled devices (only the SHA-256 of each token is kept) and the sums of the
    // devices' federated-evaluation counts, per run, model version and activity cohort.
    r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    sdk_version TEXT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL
);
CREATE TABLE evaluation_counts (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    cohort TEXT NOT NULL,
    reports BIGINT NOT NULL,
    recommendation_lists_shown BIGINT NOT NULL,
    recommendations_shown BIGINT NOT NULL,
    injected_recommendations_shown BIGINT NOT NULL,
    positive_feedback_count BIGINT NOT NULL,
    negative_feedback_count BIGINT NOT NULL,
    personalisation_opt_outs BIGINT NOT NULL,
    training_opt_outs BIGINT NOT NULL,
    predictions_evaluated BIGINT NOT NULL,
    predictions_within_half BIGINT NOT NULL,
    PRIMARY KEY (run_id, model_version, cohort)
);
"#,
    // 3: the evaluation sums the guardrail metrics also need (diversity, topic coverage,
    // devices that opted out, the windows covered), and which devices reported on which
    // model version, so a guardrail counts distinct devices rather than reports.
    r#"
ALTER TABLE evaluation_counts ADD COLUMN intra_list_diversity_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN topic_coverage_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN opted_out_reports BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluation_counts ADD COLUMN window_start_ms BIGINT;
ALTER TABLE evaluation_counts ADD COLUMN window_end_ms BIGINT;
CREATE TABLE evaluation_reporters (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, device_id)
);
"#,
    // 4: run leases, for replicas sharing one database (see Store::acquire_lease), and the
    // ledger made append-only for the role that runs the coordinator: it keeps SELECT and
    // INSERT, loses UPDATE, DELETE and TRUNCATE (as does PUBLIC). A table's owner could grant
    // them back to itself; a deployment that wants that impossible too runs the migrations as
    // a separate owner role and the coordinator as a role granted SELECT, INSERT only.
    r#"
CREATE TABLE run_leases (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    owner TEXT NOT NULL,
    owner_endpoint TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
REVOKE UPDATE, DELETE, TRUNCATE ON ledger FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger FROM CURRENT_USER;
"#,
    // 5: admin commands sent to a replica that does not own the run, for the owner to apply
    // (see crate::replica::forward).
    r#"
CREATE TABLE admin_commands (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX admin_commands_by_run ON admin_commands (run_id, status);
"#,
    // 6: federated evaluation as a DP release: the sums of the devices' released, noised
    // rates per model version (no device identity, no time, no raw count); the raw counts
    // and the table of which device reported on which version are dropped.
    r#"
DROP TABLE evaluation_reporters;
DROP TABLE evaluation_counts;
CREATE TABLE evaluation_releases (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    reports BIGINT NOT NULL,
    sums TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version)
);
"#,
    // 7: as in SQLite, and append-only like the ledger.
    r#"
CREATE TABLE ledger_signatures (
    run_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_signatures FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_signatures FROM CURRENT_USER;
"#,
    // 8: as in SQLite.
    r#"
ALTER TABLE devices ADD COLUMN principal TEXT;
CREATE INDEX devices_by_principal ON devices (principal, enrolled_at_ms);
"#,
    // 9: as in SQLite.
    r#"
CREATE TABLE evaluation_tokens_issued (
    run_id TEXT NOT NULL REFERENCES runs(id),
    model_version BIGINT NOT NULL,
    principal TEXT NOT NULL,
    PRIMARY KEY (run_id, model_version, principal)
);
"#,
];
