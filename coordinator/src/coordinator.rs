//! The durable driver: round engines for every run, persisted in the [`Store`], noised with
//! the production [`SecureSampler`] only.
//!
//! [`Coordinator::handle`] passes an event to the run's engine and carries out what the
//! engine asks, in order: a `CommitRound` is one store transaction (ledger entry, model
//! version, participations, counters); the `PublishModel` that follows is a second one. On
//! [`Coordinator::open`], a version that was committed but not published (the process died
//! in between) is published; nothing is spent again, because the spend was recorded with the
//! commit and the engines' budgets are rebuilt from the committed rounds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use fedpref_privacy::{Accountant, OrderGrid, SecureSampler};
use rand::SeedableRng;
use rand::rngs::{ChaCha20Rng, SysRng};

use crate::accounting::LedgerSpend;
use crate::aggregation::ServerState;
use crate::engine::{Action, AdminCommand, Engine, Event, Progress, RunState};
use crate::grants::TaskGrants;
use crate::guardrail::VersionMetrics;
use crate::ledger::{LedgerEntry, LedgerEvent};
use crate::manifest::{
    AlertAction, GuardrailMetricKind, ManifestPrivacyMode, RunManifest, ThresholdDirection,
};
use crate::metrics::Metrics;
use crate::model::{self, ModelError};
use crate::store::{RoundCommit, RunStatus, Store, StoreError};

/// A driver failure.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored model is unreadable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The run does not exist (or is not loaded).
    #[error("no run with id {0:?}")]
    NoSuchRun(String),
    /// The request is not allowed.
    #[error("{0}")]
    Refused(String),
    /// The operating system's random source failed.
    #[error("the operating system's random source failed")]
    Entropy,
}

/// How a pause made by a guardrail begins its ledger reason.
pub const GUARDRAIL_PAUSE_PREFIX: &str = "guardrail: ";

/// Characters of a request's string that an error message quotes.
const QUOTED_CHARS: usize = 64;

/// A string from a request as an error message quotes it: whole when short, else its first
/// characters and its length, so that a hostile megabyte string is not sent back.
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(QUOTED_CHARS) {
        None => s.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()),
    }
}

/// The longest run id, in bytes.
pub const MAX_RUN_ID_LEN: usize = 128;

/// Whether `id` can name a run: 1 to [`MAX_RUN_ID_LEN`] ASCII letters, digits, `-` or `_`.
pub fn is_run_id(id: &str) -> bool {
    (1..=MAX_RUN_ID_LEN).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Points between the steps of carrying out actions, for crash tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A round's commit transaction is durable; its model is not yet published.
    RoundCommitted,
    /// The model is published.
    ModelPublished,
}

type StageHook = Box<dyn FnMut(Stage) + Send>;

/// One device's federated-evaluation release, as the service layer checked it.
#[derive(Clone, Debug)]
pub struct EvaluationRelease<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The model version evaluated.
    pub model_version: u64,
    /// SHA-256 of the evaluation token the report came with.
    pub token_hash: [u8; 32],
    /// σ the device applied.
    pub noise_multiplier: f64,
    /// The released, centred, noised rates (checked with `EvaluationSum::check`).
    pub values: [f64; fedpref_privacy::evaluation::COORDINATES],
}

/// All runs of one database, each with its engine.
pub struct Coordinator {
    store: Store,
    engines: BTreeMap<String, Engine>,
    rng: ChaCha20Rng,
    sampler: SecureSampler,
    hook: Option<StageHook>,
    metrics: Option<Arc<Metrics>>,
    remote_owners: BTreeMap<String, String>,
    grants: TaskGrants,
    grant_keys: crate::enrolment::GrantKeys,
    /// Whether each run's `run_created` says it counts per person (read once per run).
    per_person: BTreeMap<String, bool>,
    /// (run, model version) whose `evaluation_released` line is known to be in the ledger.
    evaluation_charged: std::collections::BTreeSet<(String, u64)>,
}

/// Restores a run's engine from the store (publishing a committed, unpublished version
/// first); `None` for a stopped run.
fn load_engine(
    store: &mut Store,
    run_id: &str,
    now_ms: i64,
) -> Result<Option<Engine>, CoordinatorError> {
    close_orphan_releases(store, run_id, now_ms)?;
    close_open_charge(store, run_id, now_ms)?;
    let mut run = store.run(run_id)?;
    if run.current_version > run.published_version {
        store.publish(&run.id, run.current_version, now_ms)?;
        run.published_version = run.current_version;
    }
    if run.status == RunStatus::Stopped {
        return Ok(None);
    }
    let blob = store.model(&run.id, run.current_version)?;
    let params = model::decode(&blob, &run.manifest.model)?;
    let server_state: ServerState = serde_json::from_str(&run.server_state)
        .map_err(|e| StoreError::Corrupt(format!("server state of run {}: {e}", run.id)))?;
    let state = match run.status {
        RunStatus::Active => RunState::Active,
        RunStatus::Paused => RunState::Paused,
        RunStatus::Stopped => RunState::Stopped,
    };
    // The spend is rebuilt from the ledger, not from the `runs` row's counter: a counter
    // that says fewer rounds than the ledger records must not hand budget back.
    let entries = ledger_entries(store, &run.id)?;
    let spend = LedgerSpend::from_entries(&entries);
    // The run keeps the accountant its ledger was written with.
    let mut manifest = run.manifest.clone();
    manifest.accountant = Some(recorded_accountant(&entries));
    let ledger_rounds = spend.committed;
    if ledger_rounds != run.rounds_committed {
        tracing::warn!(run = %run.id, ledger = ledger_rounds, counter = run.rounds_committed,
            "the runs table's round counter disagrees with the ledger; restoring the larger");
    }
    let mut engine = Engine::restore(
        &run.id,
        manifest,
        Progress {
            state,
            rounds_committed: ledger_rounds.max(run.rounds_committed),
            next_round: run.next_round,
            current_version: run.current_version,
            params,
            server_state,
            uncommitted_charges: spend.uncommitted_charges,
        },
    );
    engine.restore_participations(
        &store.committed_rounds(&run.id)?,
        &store.participations_by_device(&run.id)?,
    );
    // A distributed run created before limits bounded its ε keeps composing every release,
    // as its ledger (and `ledger verify`) does.
    let cap_recorded = match (
        run.manifest.participation,
        store.created_assumption(&run.id)?,
    ) {
        (Some(limits), Some(assumption)) => {
            crate::ledger::assumption_names_limits(limits, &assumption)
        }
        _ => false,
    };
    engine.restore_releases(store.released_rounds(&run.id)?.len() as u64, cap_recorded);
    Ok(Some(engine))
}

/// What a run's ledger says was spent ([`LedgerSpend::from_entries`]), read from the store.
fn ledger_spend(store: &Store, run_id: &str) -> Result<LedgerSpend, CoordinatorError> {
    Ok(LedgerSpend::from_entries(&ledger_entries(store, run_id)?))
}

/// The accountant a run's `run_created` entry records: the one its ε were computed with. A run
/// created before runs named their accountant is RDP's.
fn recorded_accountant(entries: &[LedgerEntry]) -> Accountant {
    match entries.first().map(|e| &e.event) {
        Some(LedgerEvent::RunCreated {
            accountant: Some(a),
            ..
        }) => *a,
        _ => Accountant::Rdp,
    }
}

/// A run's ledger entries, parsed, in sequence order.
fn ledger_entries(store: &Store, run_id: &str) -> Result<Vec<LedgerEntry>, CoordinatorError> {
    let mut entries = vec![];
    for sealed in store.ledger(run_id)? {
        let entry: LedgerEntry = serde_json::from_str(&sealed.body).map_err(|e| {
            StoreError::Corrupt(format!(
                "ledger entry {} of run {run_id}: {e}",
                sealed.sequence
            ))
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Records as abandoned a local round that was charged (an update arrived) but never ended:
/// the coordinator stopped while it was open. Its ε stays spent.
fn close_open_charge(store: &mut Store, run_id: &str, now_ms: i64) -> Result<(), CoordinatorError> {
    if let Some(round) = ledger_spend(store, run_id)?.open_charge {
        let reason =
            "open when the coordinator stopped; updates may have arrived, so its ε stays spent";
        store.abandon_round(run_id, round, 0, reason, now_ms)?;
        tracing::warn!(run = %run_id, round, "charged round closed as abandoned after a restart or takeover");
    }
    Ok(())
}

/// Records as abandoned every distributed round whose release was recorded but that never
/// ended (the process stopped, or lost its lease, in between): its ε stays spent and its
/// contributors' participations stay counted; its sum, if it was unmasked, is discarded.
fn close_orphan_releases(
    store: &mut Store,
    run_id: &str,
    now_ms: i64,
) -> Result<(), CoordinatorError> {
    for (round, contributions) in store.orphan_releases(run_id)? {
        let reason = "its release had been recorded when the coordinator holding the round stopped; the round is lost and its ε stays spent";
        store.abandon_round(run_id, round, contributions, reason, now_ms)?;
        tracing::warn!(run = %run_id, round, "recorded release closed as abandoned after a restart or takeover");
    }
    Ok(())
}

impl Coordinator {
    /// Opens the database, publishes any committed-but-unpublished model versions, and
    /// restores an engine for every run that has not stopped.
    pub fn open(path: &Path, now_ms: i64) -> Result<Self, CoordinatorError> {
        Self::with_store(Store::open(path)?, now_ms)
    }

    /// As [`Coordinator::open`], for a `postgres://` URL or a SQLite path.
    pub fn open_location(location: &str, now_ms: i64) -> Result<Self, CoordinatorError> {
        Self::with_store(Store::open_location(location)?, now_ms)
    }

    /// As [`Coordinator::open`], over an already open store.
    pub fn with_store(mut store: Store, now_ms: i64) -> Result<Self, CoordinatorError> {
        let mut engines = BTreeMap::new();
        for run in store.runs()? {
            if let Some(engine) = load_engine(&mut store, &run.id, now_ms)? {
                engines.insert(run.id.clone(), engine);
            }
        }
        Self::assemble(store, engines)
    }

    /// A replica's coordinator over a store with fencing on
    /// ([`Store::enable_fencing`]): no run is loaded until its lease is taken and
    /// [`Coordinator::adopt`] loads it.
    pub fn replica(store: Store) -> Result<Self, CoordinatorError> {
        Self::assemble(store, BTreeMap::new())
    }

    fn assemble(store: Store, engines: BTreeMap<String, Engine>) -> Result<Self, CoordinatorError> {
        Ok(Self {
            store,
            engines,
            rng: ChaCha20Rng::try_from_rng(&mut SysRng).map_err(|_| CoordinatorError::Entropy)?,
            sampler: SecureSampler::from_os().map_err(|_| CoordinatorError::Entropy)?,
            hook: None,
            metrics: None,
            remote_owners: BTreeMap::new(),
            grants: TaskGrants::default(),
            grant_keys: Default::default(),
            per_person: BTreeMap::new(),
            evaluation_charged: Default::default(),
        })
    }

    /// Loads a run whose lease this replica has just taken, resuming from the store: a
    /// committed but unpublished version is published, and when the lease was taken over from
    /// `previous_owner` (whose lease lapsed), the round it may have had in flight is recorded
    /// as abandoned — nothing of it was released, so nothing of it is spent. Returns whether
    /// an engine was loaded (a stopped run has none).
    pub fn adopt(
        &mut self,
        run_id: &str,
        previous_owner: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, CoordinatorError> {
        self.remote_owners.remove(run_id);
        close_orphan_releases(&mut self.store, run_id, now_ms)?;
        let record = self.store.run(run_id)?;
        if let Some(previous) = previous_owner
            && record.status != RunStatus::Stopped
        {
            let reason = format!(
                "replica {previous:?} stopped renewing its lease; the round it had open (if any) is abandoned and its contributions discarded"
            );
            self.store
                .abandon_round(run_id, record.next_round, 0, &reason, now_ms)?;
            tracing::warn!(run = %run_id, round = record.next_round, previous = %previous, "run taken over: in-flight round abandoned");
        }
        let Some(engine) = load_engine(&mut self.store, run_id, now_ms)? else {
            self.engines.remove(run_id);
            return Ok(false);
        };
        if let Some(m) = &self.metrics {
            m.set_spent(run_id, &engine.spent());
        }
        self.engines.insert(run_id.to_string(), engine);
        Ok(true)
    }

    /// Unloads a run this replica no longer owns (its open round, if any, is dropped: the
    /// new owner records it as abandoned). `owner_endpoint` is where devices are sent.
    pub fn disown(&mut self, run_id: &str, owner_endpoint: Option<String>) {
        self.engines.remove(run_id);
        self.store.forget_lease(run_id);
        match owner_endpoint {
            Some(e) if !e.is_empty() => {
                self.remote_owners.insert(run_id.to_string(), e);
            }
            _ => {
                self.remote_owners.remove(run_id);
            }
        }
    }

    /// Where the runs that another replica owns are served (run id → device endpoint).
    pub fn remote_owners(&self) -> &BTreeMap<String, String> {
        &self.remote_owners
    }

    /// The store, for lease renewal.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Ids of the runs this process has loaded.
    pub fn loaded_runs(&self) -> Vec<String> {
        self.engines.keys().cloned().collect()
    }

    /// Calls `hook` between the steps of carrying out actions (crash tests abort there).
    pub fn set_stage_hook(&mut self, hook: impl FnMut(Stage) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// Reports every engine step to `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        for (id, engine) in &self.engines {
            metrics.set_spent(id, &engine.spent());
        }
        self.metrics = Some(metrics);
    }

    /// The store, for reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A run's engine.
    pub fn engine(&self, run_id: &str) -> Option<&Engine> {
        self.engines.get(run_id)
    }

    /// The app backend's keys enrolment grants are checked against (`auth.enrolment_grant_keys`;
    /// none by default). With keys, devices act as the person their grant names and new runs
    /// record `"privacy_unit": "person"` in `run_created`.
    pub fn set_grant_keys(&mut self, keys: crate::enrolment::GrantKeys) {
        self.grant_keys = keys;
    }

    /// The keys enrolment grants are checked against.
    pub fn grant_keys(&self) -> &crate::enrolment::GrantKeys {
        &self.grant_keys
    }

    /// Whether `run_id`'s `run_created` records per-person accounting (cached per run).
    pub fn counts_per_person(&mut self, run_id: &str) -> Result<bool, CoordinatorError> {
        if let Some(&p) = self.per_person.get(run_id) {
            return Ok(p);
        }
        let p = matches!(
            ledger_entries(&self.store, run_id)?.first().map(|e| &e.event),
            Some(LedgerEvent::RunCreated { privacy_unit: Some(u), .. }) if u == PRIVACY_UNIT_PERSON
        );
        self.per_person.insert(run_id.to_string(), p);
        Ok(p)
    }

    /// Runs whose `run_created` records per-person accounting ([`PRIVACY_UNIT_PERSON`]) and
    /// that have not stopped: a coordinator without grant keys must not go on with them.
    pub fn runs_counting_per_person(&mut self) -> Result<Vec<String>, CoordinatorError> {
        let mut out = vec![];
        for run in self.store.runs()? {
            if run.status != RunStatus::Stopped && self.counts_per_person(&run.id)? {
                out.push(run.id);
            }
        }
        Ok(out)
    }

    /// Creates a run from a validated manifest: initial model (seeded from the manifest's
    /// `seed`, or randomly), the `run_created` ledger entry, and its engine. With enrolment
    /// grant keys set, the run records that its guarantees hold per person.
    pub fn create_run(
        &mut self,
        run_id: &str,
        manifest: RunManifest,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let unit = self.grant_keys.required().then_some(PRIVACY_UNIT_PERSON);
        create_run_counting(&mut self.store, run_id, &manifest, now_ms, unit)?;
        let record = self.store.run(run_id)?;
        let params = model::decode(&self.store.model(run_id, 1)?, &record.manifest.model)?;
        self.engines.insert(
            run_id.to_string(),
            Engine::new(run_id, record.manifest, params),
        );
        Ok(())
    }

    /// Passes an event to a run's engine and carries out its actions. Returns the actions
    /// the service layer answers devices and operators with (tasks, rejections, …).
    pub fn handle(
        &mut self,
        run_id: &str,
        event: Event,
        now_ms: i64,
    ) -> Result<Vec<Action>, CoordinatorError> {
        let mut actions = self.handle_once(run_id, event, now_ms)?;
        // A release the store has just recorded may now be unmasked.
        if let Some(round) = crate::engine::release_to_record(&actions) {
            actions.extend(self.handle_once(run_id, Event::ReleaseRecorded { round }, now_ms)?);
        }
        Ok(actions)
    }

    /// One event through the engine, its actions carried out in order.
    fn handle_once(
        &mut self,
        run_id: &str,
        event: Event,
        now_ms: i64,
    ) -> Result<Vec<Action>, CoordinatorError> {
        if !self.engines.contains_key(run_id) {
            return Err(CoordinatorError::NoSuchRun(run_id.to_string()));
        }
        // A run that counts per person takes part only through persons: whatever replica
        // serves it, with or without grant keys, an enrolment without a grant cannot add a
        // second update for someone (or a Sybil) to it.
        if let Some(device) = event.device()
            && !device.starts_with(crate::enrolment::PRINCIPAL_PREFIX)
            && self.counts_per_person(run_id)?
        {
            return Err(CoordinatorError::Refused(format!(
                "run {run_id:?} counts privacy per person: only devices enrolled with an enrolment grant take part in it"
            )));
        }
        let engine = self
            .engines
            .get_mut(run_id)
            .ok_or_else(|| CoordinatorError::NoSuchRun(run_id.to_string()))?;
        let _run_span = tracing::info_span!("run", run = %run_id).entered();
        let check_in = matches!(event, Event::CheckIn { .. });
        let actions = engine.handle(event, now_ms, &mut self.rng, &mut self.sampler);
        if let Some(m) = &self.metrics {
            m.observe(run_id, check_in, &actions, now_ms, &engine.spent());
        }
        for action in &actions {
            if let Err(e) = self.execute(run_id, action, now_ms) {
                if matches!(e, CoordinatorError::Store(StoreError::LeaseLost { .. })) {
                    // The engine ran ahead of what the store accepted: drop it; whoever owns
                    // the run now resumes from the store.
                    tracing::warn!(run = %run_id, error = %e, "lease lost: run unloaded");
                    self.disown(run_id, None);
                } else {
                    // The engine has moved on (parameters, spend, progress) past what the
                    // store holds: rebuild it from the store, so that memory matches what is
                    // durable and the next commit does not publish an unrecorded round.
                    match load_engine(&mut self.store, run_id, now_ms) {
                        Ok(Some(engine)) => {
                            self.engines.insert(run_id.to_string(), engine);
                        }
                        _ => {
                            self.engines.remove(run_id);
                        }
                    }
                }
                return Err(e);
            }
        }
        Ok(actions)
    }

    /// Records that `device` was given a task in `run_id` on `model_version` (see
    /// [`crate::grants`]); returns the evaluation token the task carries, if one is issued
    /// (the first task of the device on that version, in every privacy mode). The store
    /// remembers who was issued a version's token, so a device that had one before a
    /// restart, or from another replica, gets none.
    ///
    /// Before the first token of a model version leaves, the run's ledger gets that
    /// version's `evaluation_released` line: what one device's evaluation release of it
    /// costs. The line is written whether or not anyone reports, so the ledger bounds every
    /// release a token allows, including one that arrives after the run has stopped.
    pub fn task_given(
        &mut self,
        run_id: &str,
        device: &str,
        model_version: u64,
        new_token: impl FnOnce() -> String,
        now_ms: i64,
    ) -> Result<Option<String>, CoordinatorError> {
        // A stopped run's ledger is closed: it gives no token it could not charge for.
        let running = self
            .engines
            .get(run_id)
            .is_some_and(|e| e.state() != RunState::Stopped);
        if !running {
            return Ok(None);
        }
        if !self
            .grants
            .evaluation_issued_to(run_id, device, model_version)
        {
            let forget_below = model_version.saturating_sub(crate::grants::KEEP_VERSIONS);
            if !self
                .store
                .claim_evaluation_token(run_id, model_version, device, forget_below)?
            {
                // Marked: the grants below issue no token.
                self.grants
                    .mark_evaluation_issued(run_id, device, model_version);
            }
        }
        let token = self
            .grants
            .task_given(run_id, device, model_version, new_token, |t| {
                <sha2::Sha256 as sha2::Digest>::digest(t.as_bytes()).into()
            });
        if token.is_some() {
            self.charge_evaluation(run_id, model_version, now_ms)?;
        }
        Ok(token)
    }

    /// Appends `model_version`'s `evaluation_released` line to the run's ledger unless it
    /// has one (checked once per version and coordinator process).
    fn charge_evaluation(
        &mut self,
        run_id: &str,
        model_version: u64,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        let key = (run_id.to_owned(), model_version);
        if self.evaluation_charged.contains(&key) {
            return Ok(());
        }
        let charged = self
            .store
            .ledger(run_id)?
            .iter()
            .filter_map(|e| serde_json::from_str::<LedgerEntry>(&e.body).ok())
            .any(|e| {
                matches!(e.event, LedgerEvent::EvaluationReleased { model_version: v, .. } if v == model_version)
            });
        if !charged {
            let delta = self.store.run(run_id)?.manifest.budget.delta;
            let event = crate::ledger::evaluation_release_event(
                model_version,
                fedpref_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER,
                delta,
            );
            self.store.append_event(run_id, event, now_ms)?;
        }
        self.evaluation_charged.insert(key);
        Ok(())
    }

    /// Whether `device` may download `run_id`'s models: it was given a task in the run since
    /// this coordinator started, or took part in one of its committed rounds.
    pub fn may_download(&self, run_id: &str, device: &str) -> Result<bool, CoordinatorError> {
        Ok(self.grants.was_tasked(run_id, device) || self.store.took_part(run_id, device)?)
    }

    /// Adds one device's released evaluation to the run's noised sums and checks the
    /// manifest's guardrails on that model version. The report is accepted once per
    /// evaluation token (one per device and version; see [`crate::grants`]); nothing that
    /// identifies the device is stored with it. Each guardrail alerts at most once per
    /// model version, and only once at least its `minimum_reporting_devices` devices' noised
    /// releases are summed: the alert is logged, counted in Prometheus, written to the ledger
    /// and, where the guardrail says `pause` and the run is active, followed by a pause (its
    /// own ledger entry). Returns the alerts written.
    pub fn record_evaluation(
        &mut self,
        release: &EvaluationRelease<'_>,
        now_ms: i64,
    ) -> Result<Vec<LedgerEvent>, CoordinatorError> {
        let run_id = release.run_id;
        let record = self.store.run(run_id)?;
        if release.model_version > record.current_version {
            return Err(CoordinatorError::Refused(format!(
                "model_version: run {run_id:?} has no model version {}",
                release.model_version
            )));
        }
        self.grants
            .redeem(&release.token_hash, run_id, release.model_version)
            .map_err(|e| CoordinatorError::Refused(e.to_string()))?;
        // The version's `evaluation_released` line was written before its first token left
        // (`task_given`), so the ledger already bounds this release.
        self.store
            .add_evaluation_release(run_id, release.model_version, &release.values)?;
        let guardrails = &record.manifest.guardrail_metrics;
        // A stopped run's ledger is closed: its counts are still summed for the report, but
        // no alert is appended after the stop.
        // A replica checks guardrails only on the runs it owns (their alerts go to the ledger,
        // which only the owner writes); the owner checks them on the next report it gets.
        let not_owner = self.store.replica_id().is_some() && !self.engines.contains_key(run_id);
        if guardrails.is_empty() || record.status == RunStatus::Stopped || not_owner {
            return Ok(vec![]);
        }
        let version = release.model_version;
        let sum = self.store.evaluation_sum(run_id, version)?;
        let metrics = VersionMetrics::compute(version, &sum);
        let devices = metrics.reporting_devices;
        let crossed = metrics.crossed(guardrails);
        if crossed.is_empty() {
            return Ok(vec![]);
        }
        let already: Vec<(GuardrailMetricKind, ThresholdDirection)> = self
            .store
            .ledger(run_id)?
            .iter()
            .filter_map(|e| serde_json::from_str::<LedgerEntry>(&e.body).ok())
            .filter_map(|e| match e.event {
                LedgerEvent::GuardrailAlert {
                    metric,
                    direction,
                    model_version,
                    ..
                } if model_version == version => Some((metric, direction)),
                _ => None,
            })
            .collect();
        let mut written = vec![];
        let mut pause = None;
        for (g, value) in crossed {
            if already.contains(&(g.metric, g.direction)) {
                continue;
            }
            let event = LedgerEvent::GuardrailAlert {
                metric: g.metric,
                value,
                threshold: g.threshold,
                direction: g.direction,
                action_taken: g.on_alert,
                model_version: version,
                reporting_devices: devices,
                // The window is the model version: no device sends a time. These are the
                // coordinator's clock at the alert.
                window_start_ms: now_ms,
                window_end_ms: now_ms,
            };
            self.store.append_event(run_id, event.clone(), now_ms)?;
            tracing::warn!(
                run = %run_id,
                metric = g.metric.as_str(),
                value,
                threshold = g.threshold,
                direction = g.direction.as_str(),
                model_version = version,
                reporting_devices = devices,
                action = g.on_alert.as_str(),
                "guardrail alert"
            );
            if let Some(m) = &self.metrics {
                m.guardrail_alert(run_id, g.metric.as_str());
            }
            if g.on_alert == AlertAction::Pause && pause.is_none() {
                pause = Some(format!(
                    "{GUARDRAIL_PAUSE_PREFIX}{} = {value:.4} is {} the threshold {} on model version {version} ({devices} reporting devices; a ratio of noised sums)",
                    g.metric.as_str(),
                    g.direction.as_str(),
                    g.threshold
                ));
            }
            written.push(event);
        }
        if let Some(reason) = pause
            && self.engines.get(run_id).map(Engine::state) == Some(RunState::Active)
        {
            self.handle(run_id, Event::Admin(AdminCommand::Pause { reason }), now_ms)?;
        }
        Ok(written)
    }

    /// A rollback, reading the earlier version's parameters from the store; `reason` is
    /// recorded in the ledger.
    pub fn rollback(
        &mut self,
        run_id: &str,
        to_version: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Action>, CoordinatorError> {
        let record = self.store.run(run_id)?;
        let params = model::decode(
            &self.store.model(run_id, to_version)?,
            &record.manifest.model,
        )?;
        self.handle(
            run_id,
            Event::Admin(AdminCommand::Rollback {
                to_version,
                reason: reason.to_string(),
                params,
            }),
            now_ms,
        )
    }

    /// Ticks every loaded run.
    pub fn tick_all(&mut self, now_ms: i64) -> Result<(), CoordinatorError> {
        let ids: Vec<String> = self.engines.keys().cloned().collect();
        let mut first_error = None;
        for id in ids {
            // One run's failure (a lost lease) does not stop the others' deadlines.
            if let Err(e) = self.handle(&id, Event::Tick, now_ms) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn stage(&mut self, stage: Stage) {
        if let Some(hook) = self.hook.as_mut() {
            hook(stage);
        }
    }

    fn execute(
        &mut self,
        run_id: &str,
        action: &Action,
        now_ms: i64,
    ) -> Result<(), CoordinatorError> {
        match action {
            Action::CommitRound(outcome) => {
                let _round_span = tracing::info_span!("round", round = outcome.round).entered();
                self.store.commit_round(&RoundCommit {
                    run_id,
                    round: outcome.round,
                    participants: &outcome.participants,
                    model: &outcome.model,
                    server_state: &outcome.server_state,
                    event: outcome.event.clone(),
                    stop: outcome.stop.clone(),
                    at_ms: now_ms,
                })?;
                tracing::info!(
                    cohort = outcome.participants.len(),
                    version = outcome.model.version,
                    "round committed: ledger entry and model version written"
                );
                self.stage(Stage::RoundCommitted);
            }
            Action::PublishModel { version } => {
                self.store.publish(run_id, *version, now_ms)?;
                tracing::info!(version, "model published");
                self.stage(Stage::ModelPublished);
            }
            Action::RecordRelease(release) => {
                self.store.record_release(
                    run_id,
                    release.round,
                    &release.participants,
                    &release.event,
                    now_ms,
                )?;
                tracing::info!(
                    round = release.round,
                    contributors = release.participants.len(),
                    "release recorded: the round's ε is spent before its sum is unmasked"
                );
            }
            Action::ChargeRound { round, event } => {
                self.store.append_event(run_id, event.clone(), now_ms)?;
                tracing::info!(
                    round,
                    "round charged: an update arrived, so the round's ε is spent whether it commits or not"
                );
            }
            Action::AbandonRound {
                round,
                contributions,
                reason,
            } => {
                tracing::info!(round, contributions, reason = %reason, "round abandoned");
                self.store
                    .abandon_round(run_id, *round, *contributions, reason, now_ms)?
            }
            Action::StatusChanged { status, event } => {
                let status = match status {
                    RunState::Active => RunStatus::Active,
                    RunState::Paused => RunStatus::Paused,
                    RunState::Stopped => RunStatus::Stopped,
                };
                self.store
                    .set_status(run_id, status, event.clone(), now_ms)?;
            }
            Action::RolledBack {
                to_version,
                model,
                server_state,
                reason,
                ..
            } => self
                .store
                .rollback(run_id, *to_version, model, server_state, reason, now_ms)?,
            Action::SendTask(_)
            | Action::ComeBackLater { .. }
            | Action::Reject { .. }
            | Action::UpdateAccepted { .. }
            | Action::SecAggAccepted { .. }
            | Action::TaskDeclined { .. }
            | Action::AdminRefused { .. } => {}
        }
        Ok(())
    }
}

/// `run_created`'s `privacy_unit` for a run whose devices enrolled with grants naming a person.
pub const PRIVACY_UNIT_PERSON: &str = "person";

/// Creates a run in the store (offline: `fedpref-coordinator run create`). Refuses privacy
/// mode `none`, which exists for simulations only. Its guarantees are recorded as holding per
/// enrolment ([`create_run_counting`] records them per person).
pub fn create_run(
    store: &mut Store,
    run_id: &str,
    manifest: &RunManifest,
    now_ms: i64,
) -> Result<(), CoordinatorError> {
    create_run_counting(store, run_id, manifest, now_ms, None)
}

/// [`create_run`], recording in `run_created` the unit its participation and ε count in:
/// `Some("person")` with enrolment grants, `None` (per enrolment) without.
pub fn create_run_counting(
    store: &mut Store,
    run_id: &str,
    manifest: &RunManifest,
    now_ms: i64,
    privacy_unit: Option<&str>,
) -> Result<(), CoordinatorError> {
    if manifest.privacy_mode == ManifestPrivacyMode::None {
        return Err(CoordinatorError::Refused(
            "privacy_mode = \"none\" is for simulations only; a coordinator run needs local, central or distributed".into(),
        ));
    }
    if !is_run_id(run_id) {
        return Err(CoordinatorError::Refused(format!(
            "run id {:?} must be 1 to {MAX_RUN_ID_LEN} ASCII letters, digits, '-' or '_'",
            shorten(run_id)
        )));
    }
    let seed = match manifest.seed {
        Some(s) => s,
        None => {
            let mut rng =
                ChaCha20Rng::try_from_rng(&mut SysRng).map_err(|_| CoordinatorError::Entropy)?;
            rand_core::Rng::next_u64(&mut rng)
        }
    };
    let params = model::initial_parameters(&manifest.model, seed);
    let blob = model::encode(run_id, 1, 0, &manifest.model, &params);
    let server_state =
        serde_json::to_string(&ServerState::new(&manifest.server_optimizer, params.len()))
            .expect("serialisable");
    let created = LedgerEvent::RunCreated {
        manifest_sha256: manifest.sha256(),
        privacy_mode: manifest.privacy_mode.as_str().to_string(),
        budget_epsilon: manifest.budget.epsilon,
        budget_delta: manifest.budget.delta,
        budget_audience: Some(manifest.budget_audience().as_str().to_string()),
        noise_multiplier: manifest.noise_multiplier,
        clip_norm: manifest.clip_norm,
        orders: OrderGrid::default().orders().to_vec(),
        accountant: Some(manifest.accountant()),
        initial_model_sha256: blob.sha256.clone(),
        participation_limits: manifest.participation,
        epsilon_assumption: (manifest.participation.is_some()
            || manifest.adaptive_clipping.is_some()
            || manifest.privacy_mode == ManifestPrivacyMode::Distributed)
            .then(|| manifest.epsilon_assumption()),
        privacy_unit: privacy_unit.map(str::to_string),
    };
    store.create_run(run_id, manifest, &blob, &server_state, created, now_ms)?;
    Ok(())
}
