//! [`Device`]: the SDK's façade over the store, the model and the guardrails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fedpref_privacy::{Budget, PrivacyStatement};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::catalogue::{Catalogue, Permissions};
use crate::event::{Event, EventError, EventLimits, ExplicitKind, Feedback};
use crate::examples::{Example, ExampleTable, ItemExample};
use crate::model::{LocalTraining, MatrixFactorization, PreferenceModel, UserState};
use crate::recommend::{Guardrails, PersonalView, Ranker, Recommendation};
use crate::store::{self, ImplicitRow};
use crate::time::Timestamp;
use crate::{LineError, SdkError};

/// Retention windows per kind of data, in days: rows older than this are deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Explicit data (role, goals, interests). Default 730 days.
    pub explicit_days: u32,
    /// Implicit data derived from use. Default 90 days.
    pub implicit_days: u32,
    /// Feedback signals. Default 365 days.
    pub feedback_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            explicit_days: 730,
            implicit_days: 90,
            feedback_days: 365,
        }
    }
}

/// Everything a device is configured with. Defaults are documented on each part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceConfig {
    /// What events are checked against.
    pub limits: EventLimits,
    /// Retention windows.
    pub retention: Retention,
    /// The event → example table.
    pub examples: ExampleTable,
    /// The recommendation guardrails.
    pub guardrails: Guardrails,
    /// The fit used for recommendations (λ_u and `max_examples` matter).
    pub training: LocalTraining,
    /// The user's privacy budget ε, set when the store is created. Default 10.
    pub budget_epsilon: f64,
    /// The budget's δ. Default 1e-6.
    pub budget_delta: f64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            limits: EventLimits::default(),
            retention: Retention::default(),
            examples: ExampleTable::default(),
            guardrails: Guardrails::default(),
            training: LocalTraining::default(),
            budget_epsilon: 10.0,
            budget_delta: 1e-6,
        }
    }
}

/// The user's two switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Whether recommendations use the user's data.
    pub personalisation: bool,
    /// Whether the device takes part in training.
    pub training: bool,
}

/// What one ingestion stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IngestReport {
    /// Catalogue entries stored (new or replaced).
    pub items: usize,
    /// Feedback events stored.
    pub feedback: usize,
    /// Explicit records stored.
    pub explicit: usize,
    /// Consents stored.
    pub consents: usize,
    /// Valid events not stored because they were already past their retention window.
    pub expired: usize,
    /// Lines refused (only with `skip_invalid`).
    pub skipped: Vec<LineError>,
}

/// What a purge deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Explicit rows deleted.
    pub explicit: usize,
    /// Implicit rows deleted.
    pub implicit: usize,
    /// Feedback rows deleted.
    pub feedback: usize,
}

/// A change to the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileEdit {
    /// Sets the role, or clears it with `None`.
    SetRole(Option<String>),
    /// Adds a goal.
    AddGoal(String),
    /// Removes a goal.
    RemoveGoal(String),
    /// Follows a topic.
    AddInterest(String),
    /// Unfollows a topic.
    RemoveInterest(String),
    /// Removes a topic from the profile: never inferred, never used to personalise.
    MuteTopic(String),
    /// Undoes [`ProfileEdit::MuteTopic`].
    UnmuteTopic(String),
    /// Opts in or out of personalising with a sensitive topic.
    SetConsent {
        /// The topic.
        topic: String,
        /// Whether it may be used.
        personalise: bool,
    },
}

/// A topic, format or hour with its summed affinity.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Affinity {
    /// The topic, the format, or the hour (`00`–`23`, UTC).
    pub value: String,
    /// The summed weight of the rows behind it.
    pub weight: f64,
}

/// A sensitive-topic choice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Consent {
    /// The topic.
    pub topic: String,
    /// Whether it may be used to personalise.
    pub personalise: bool,
}

/// What the device knows about the user, for the app's "your profile" screen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// The two switches.
    pub settings: Settings,
    /// Explicit: the role.
    pub role: Option<String>,
    /// Explicit: goals.
    pub goals: Vec<String>,
    /// Explicit: followed topics.
    pub interests: Vec<String>,
    /// Implicit: topic affinities, strongest first.
    pub inferred_topics: Vec<Affinity>,
    /// Implicit: format affinities, strongest first.
    pub inferred_formats: Vec<Affinity>,
    /// Implicit: active hours (UTC), busiest first.
    pub active_hours: Vec<Affinity>,
    /// Sensitive-topic choices.
    pub consents: Vec<Consent>,
    /// Topics removed from the profile.
    pub muted_topics: Vec<String>,
    /// Feedback events held, by kind.
    pub feedback_counts: BTreeMap<String, usize>,
    /// Usable training examples.
    pub examples: usize,
    /// Whether recommendations are personalised right now.
    pub personalised: bool,
}

/// The on-device accountant, for the app's UI.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetStatus {
    /// The budget's ε.
    pub epsilon_budget: f64,
    /// The budget's δ.
    pub delta: f64,
    /// ε spent so far, at δ.
    pub epsilon_spent: f64,
    /// ε left (never negative).
    pub epsilon_remaining: f64,
    /// Updates released.
    pub rounds: u64,
    /// Against whom the spent ε holds.
    pub audience: String,
    /// Which accountant computed the spent ε: `pld` (the default), or `rdp` (distributed-mode
    /// releases, and budgets stored before the PLD accountant existed).
    pub accountant: String,
    /// The uploads, oldest first.
    pub uploads: Vec<UploadRecord>,
}

/// One released update, as the device recorded it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UploadRecord {
    /// When.
    pub at: String,
    /// The round.
    pub round_id: u64,
    /// The model version trained against.
    pub model_version: u64,
    /// The privacy mode.
    pub mode: String,
    /// σ.
    pub noise_multiplier: f64,
    /// C.
    pub clip_norm: f64,
    /// ε spent after this upload.
    pub epsilon_after: f64,
    /// `update` (a model update or share) or `evaluation` (a federated-evaluation release).
    pub kind: String,
    /// Distributed mode only: `epsilon_after` holds if at least this many of the devices
    /// in the released sum were honest (added their noise and kept the protocol). Shares
    /// recorded before this was kept have none.
    pub assumed_honest_devices: Option<u64>,
    /// Distributed mode only: the fewest devices a released sum holds, the user's own among
    /// them; `assumed_honest_devices` of these is the assumed honest fraction.
    pub min_contributors: Option<u32>,
}

pub(crate) struct UserCache {
    pub(crate) view: PersonalView,
    pub(crate) examples: Vec<Example>,
    pub(crate) item_examples: Vec<ItemExample>,
}

/// A device: one user's store, model and controls.
///
/// Every operation that depends on time takes `now`; retention is applied at each of
/// them (expired rows are deleted before anything is read).
pub struct Device {
    pub(crate) conn: Connection,
    path: PathBuf,
    pub(crate) config: DeviceConfig,
    pub(crate) settings: Settings,
    pub(crate) budget: Budget,
    pub(crate) model: Option<MatrixFactorization>,
    pub(crate) ranker: Ranker,
    pub(crate) user: Option<UserCache>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens (creating and migrating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>, config: DeviceConfig) -> Result<Self, SdkError> {
        config
            .examples
            .validate()
            .map_err(SdkError::InvalidConfig)?;
        config
            .guardrails
            .validate()
            .map_err(SdkError::InvalidConfig)?;
        config.training.validate()?;
        let path = path.as_ref().to_path_buf();
        let conn = store::open(&path)?;
        // Insert-if-missing, so two handles creating one store agree on a single budget.
        let initial = Budget::new(config.budget_epsilon, config.budget_delta)?;
        conn.execute(
            "INSERT INTO privacy_budget (id, budget) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
            [serde_json::to_string(&initial).expect("budget serialises")],
        )?;
        let budget = stored_budget(&conn)?;
        let model = load_model(&conn)?;
        let mut device = Self {
            settings: read_settings(&conn)?,
            ranker: Ranker::default(),
            conn,
            path,
            config,
            budget,
            model,
            user: None,
        };
        device.rebuild_ranker()?;
        Ok(device)
    }

    /// The store's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The user's switches.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The installed shared model.
    pub fn model(&self) -> Option<&MatrixFactorization> {
        self.model.as_ref()
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &Catalogue {
        self.ranker.catalogue()
    }

    fn rebuild_ranker(&mut self) -> Result<(), SdkError> {
        let catalogue = Catalogue::new(store::load_items(&self.conn)?);
        self.ranker = Ranker::new(catalogue, self.model.as_ref());
        self.user = None;
        Ok(())
    }

    /// Turns personalisation on or off. Off: recommendations use no data about the user.
    /// Turning it off while a model from a run is installed counts as an opt-out in the
    /// evaluation window ([`crate::evaluation`]).
    pub fn set_personalisation(&mut self, on: bool) -> Result<(), SdkError> {
        if !on && self.settings.personalisation {
            self.count_opt_out(true, Timestamp::now())?;
        }
        store::set_setting(&self.conn, "personalisation", if on { "on" } else { "off" })?;
        self.settings.personalisation = on;
        Ok(())
    }

    /// Turns training participation on or off. Off: [`Device::prepare_upload`] refuses.
    /// Turning it off while a model from a run is installed counts as an opt-out in the
    /// evaluation window ([`crate::evaluation`]).
    pub fn set_training(&mut self, on: bool) -> Result<(), SdkError> {
        if !on && self.settings.training {
            self.count_opt_out(false, Timestamp::now())?;
        }
        store::set_setting(&self.conn, "training", if on { "on" } else { "off" })?;
        self.settings.training = on;
        Ok(())
    }

    /// Validates every event, then stores them all in one transaction; if any is invalid
    /// nothing is stored and the error names the event's index and field.
    pub fn record(&mut self, events: &[Event], now: Timestamp) -> Result<IngestReport, SdkError> {
        for (index, event) in events.iter().enumerate() {
            event
                .validate(now, &self.config.limits)
                .map_err(|e| SdkError::InvalidEvent {
                    index,
                    field: e.field,
                    message: e.message,
                })?;
        }
        self.store_events(events, now, Vec::new())
    }

    /// Ingests JSON Lines (see [`crate::event`] for the records). Blank lines are skipped.
    /// If any line is invalid, nothing is stored and [`SdkError::InvalidLines`] lists every
    /// bad line with its number and field — unless `skip_invalid`, in which case the valid
    /// lines are stored and the bad ones reported in [`IngestReport::skipped`].
    pub fn ingest_jsonl(
        &mut self,
        text: &str,
        skip_invalid: bool,
        now: Timestamp,
    ) -> Result<IngestReport, SdkError> {
        let mut events = Vec::new();
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = Event::from_json_line(line)
                .and_then(|e| e.validate(now, &self.config.limits).map(|()| e));
            match parsed {
                Ok(e) => events.push(e),
                Err(EventError { field, message }) => errors.push(LineError {
                    line: n + 1,
                    field,
                    message,
                }),
            }
        }
        if !errors.is_empty() && !skip_invalid {
            return Err(SdkError::InvalidLines(errors));
        }
        self.store_events(&events, now, errors)
    }

    fn store_events(
        &mut self,
        events: &[Event],
        now: Timestamp,
        skipped: Vec<LineError>,
    ) -> Result<IngestReport, SdkError> {
        let r = self.config.retention;
        let mut report = IngestReport {
            skipped,
            ..IngestReport::default()
        };
        // Test, then train: incoming ratings are predicted before they are stored.
        let evaluated = self.evaluate_incoming(events, now)?;
        let tx = self.conn.transaction()?;
        Device::apply_incoming(&tx, &evaluated, now)?;
        for event in events {
            match event {
                Event::Item(item) => {
                    store::upsert_item(&tx, item)?;
                    report.items += 1;
                }
                Event::Feedback(f) if f.at < now.minus_days(r.feedback_days) => report.expired += 1,
                Event::Feedback(f) => {
                    store::insert_feedback(&tx, f)?;
                    report.feedback += 1;
                }
                Event::Explicit { kind, value, at } => {
                    let at = at.unwrap_or(now);
                    if at < now.minus_days(r.explicit_days) {
                        report.expired += 1;
                    } else {
                        store::put_explicit(&tx, *kind, value, at)?;
                        report.explicit += 1;
                    }
                }
                Event::Consent {
                    topic,
                    personalise,
                    at,
                } => {
                    store::put_consent(&tx, topic, *personalise, at.unwrap_or(now))?;
                    report.consents += 1;
                }
            }
        }
        purge_in(&tx, now, &r)?;
        rebuild_implicit(&tx, now, &self.config)?;
        tx.commit()?;
        if report.items > 0 {
            self.rebuild_ranker()?;
        }
        self.user = None;
        Ok(report)
    }

    /// Deletes every row past its retention window (and the inferences drawn from deleted
    /// feedback).
    pub fn purge_expired(&mut self, now: Timestamp) -> Result<PurgeReport, SdkError> {
        let r = self.config.retention;
        let any = store::has_rows_before(&self.conn, "explicit", now.minus_days(r.explicit_days))?
            || store::has_rows_before(&self.conn, "implicit", now.minus_days(r.implicit_days))?
            || store::has_rows_before(&self.conn, "feedback", now.minus_days(r.feedback_days))?;
        if !any {
            return Ok(PurgeReport::default());
        }
        let tx = self.conn.transaction()?;
        let report = purge_in(&tx, now, &r)?;
        rebuild_implicit(&tx, now, &self.config)?;
        tx.commit()?;
        self.user = None;
        Ok(report)
    }

    /// Applies a profile edit (and re-derives the implicit profile).
    pub fn edit_profile(&mut self, edit: ProfileEdit, now: Timestamp) -> Result<(), SdkError> {
        let check = |field: &str, v: &str| -> Result<(), SdkError> {
            if v.trim().is_empty() || v.len() > crate::event::MAX_TEXT_BYTES {
                Err(SdkError::InvalidInput(format!(
                    "{field}: must be 1 to {} bytes",
                    crate::event::MAX_TEXT_BYTES
                )))
            } else {
                Ok(())
            }
        };
        let tx = self.conn.transaction()?;
        match &edit {
            ProfileEdit::SetRole(Some(role)) => {
                check("role", role)?;
                store::put_explicit(&tx, ExplicitKind::Role, role, now)?;
            }
            ProfileEdit::SetRole(None) => {
                store::remove_explicit(&tx, ExplicitKind::Role, None)?;
            }
            ProfileEdit::AddGoal(g) => {
                check("goal", g)?;
                store::put_explicit(&tx, ExplicitKind::Goal, g, now)?;
            }
            ProfileEdit::RemoveGoal(g) => {
                store::remove_explicit(&tx, ExplicitKind::Goal, Some(g))?;
            }
            ProfileEdit::AddInterest(t) => {
                check("interest", t)?;
                store::put_explicit(&tx, ExplicitKind::Interest, t, now)?;
            }
            ProfileEdit::RemoveInterest(t) => {
                store::remove_explicit(&tx, ExplicitKind::Interest, Some(t))?;
            }
            ProfileEdit::MuteTopic(t) => {
                check("topic", t)?;
                tx.execute(
                    "INSERT OR REPLACE INTO muted_topics (topic, at_ms) VALUES (?1, ?2)",
                    params![t, now.millis()],
                )?;
            }
            ProfileEdit::UnmuteTopic(t) => {
                tx.execute("DELETE FROM muted_topics WHERE topic = ?1", [t])?;
            }
            ProfileEdit::SetConsent { topic, personalise } => {
                check("topic", topic)?;
                store::put_consent(&tx, topic, *personalise, now)?;
            }
        }
        rebuild_implicit(&tx, now, &self.config)?;
        tx.commit()?;
        self.user = None;
        Ok(())
    }

    /// Installs a shared model (replacing any other). The private part is refitted
    /// against it at the next use.
    pub fn install_model(&mut self, model: MatrixFactorization) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM global_model", [])?;
        tx.execute(
            "INSERT INTO global_model (id, version, factor_dimension, item_ids, item_factors, item_biases, global_offset)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                model.version() as i64,
                model.factor_dimension() as i64,
                serde_json::to_string(model.item_ids()).expect("strings serialise"),
                store::f64_blob(model.factors_flat()),
                store::f64_blob(model.biases_flat()),
                model.global_offset()
            ],
        )?;
        tx.execute("DELETE FROM private_model", [])?;
        // Which snapshot the model came from is recorded by the download path only.
        tx.execute("DELETE FROM installed_snapshot", [])?;
        tx.commit()?;
        self.model = Some(model);
        self.rebuild_ranker()
    }

    /// The usable training examples, most recent first, at most `max_examples`.
    pub fn training_examples(&mut self, now: Timestamp) -> Result<Vec<Example>, SdkError> {
        self.purge_expired(now)?;
        Ok(self.user_cache(now)?.examples.clone())
    }

    /// The private part, fitted against the installed model (None when cold).
    pub fn private_state(&mut self, now: Timestamp) -> Result<Option<UserState>, SdkError> {
        self.purge_expired(now)?;
        Ok(self.user_cache(now)?.view.private.clone())
    }

    pub(crate) fn user_cache(&mut self, now: Timestamp) -> Result<&UserCache, SdkError> {
        if self.user.is_none() {
            let cache = self.build_user_cache(now)?;
            self.user = Some(cache);
        }
        Ok(self.user.as_ref().expect("just built"))
    }

    fn build_user_cache(&self, now: Timestamp) -> Result<UserCache, SdkError> {
        let catalogue = self.ranker.catalogue();
        let permissions = load_permissions(&self.conn)?;
        let feedback = store::load_feedback(&self.conn)?;
        let usable: Vec<bool> = catalogue
            .items()
            .iter()
            .map(|i| permissions.usable(i))
            .collect();
        let usable_id = |id: &str| catalogue.position(id).is_some_and(|p| usable[p]);
        let item_examples = self.config.examples.item_examples(&feedback, usable_id);
        let mut seen = vec![false; catalogue.len()];
        for f in &feedback {
            if let Some(p) = catalogue.position(&f.item) {
                seen[p] = true;
            }
        }
        let liked: Vec<usize> = item_examples
            .iter()
            .filter(|e| e.target >= self.config.examples.liked_threshold)
            .filter_map(|e| catalogue.position(&e.item))
            .collect();
        let examples: Vec<Example> = match &self.model {
            Some(m) => item_examples
                .iter()
                .filter_map(|e| {
                    m.item_index(&e.item).map(|row| Example {
                        item: row,
                        target: e.target,
                        weight: e.weight,
                    })
                })
                .take(self.config.training.max_examples)
                .collect(),
            None => Vec::new(),
        };
        let mut followed = vec![false; catalogue.topic_count()];
        for (kind, value, _) in store::load_explicit(&self.conn)? {
            if kind == ExplicitKind::Interest
                && let Some(t) = catalogue.topic_id(&value)
            {
                followed[t as usize] = true;
            }
        }
        let mut interests = followed.clone();
        for a in sum_affinities(&store::load_implicit(&self.conn)?, "topic") {
            if a.weight >= self.config.guardrails.interest_threshold
                && let Some(t) = catalogue.topic_id(&a.value)
            {
                interests[t as usize] = true;
            }
        }
        let private = match &self.model {
            Some(m) if examples.len() >= self.config.guardrails.min_examples.max(1) => {
                let p = m.fit_private(&examples, &self.config.training);
                self.conn.execute(
                    "INSERT OR REPLACE INTO private_model (id, model_version, user_factor, user_bias, example_count, fitted_ms)
                     VALUES (1, ?1, ?2, ?3, ?4, ?5)",
                    params![m.version() as i64, store::f64_blob(&p.factor), p.bias, examples.len() as i64, now.millis()],
                )?;
                Some(p)
            }
            _ => {
                self.conn.execute("DELETE FROM private_model", [])?;
                None
            }
        };
        Ok(UserCache {
            view: PersonalView {
                private,
                seen,
                usable,
                followed,
                interests,
                liked,
            },
            examples,
            item_examples,
        })
    }

    /// Up to `k` recommendations with scores, labels and reasons (see [`crate::recommend`]
    /// for the guardrails and the fallback).
    ///
    /// The list counts as **shown** for federated evaluation ([`crate::evaluation`]): call
    /// this when the app is about to display the list.
    pub fn recommend(&mut self, k: usize, now: Timestamp) -> Result<Vec<Recommendation>, SdkError> {
        self.purge_expired(now)?;
        let guardrails = self.config.guardrails;
        let recs = if !self.settings.personalisation {
            self.ranker
                .rank(self.model.as_ref(), None, &guardrails, k, now)
        } else {
            self.user_cache(now)?;
            let user = self.user.as_ref().map(|u| &u.view);
            self.ranker
                .rank(self.model.as_ref(), user, &guardrails, k, now)
        };
        self.count_shown(&recs, now)?;
        Ok(recs)
    }

    /// The profile: explicit data, what was inferred, consents and switches.
    pub fn profile(&mut self, now: Timestamp) -> Result<Profile, SdkError> {
        self.purge_expired(now)?;
        let mut role = None;
        let (mut goals, mut interests) = (Vec::new(), Vec::new());
        for (kind, value, _) in store::load_explicit(&self.conn)? {
            match kind {
                ExplicitKind::Role => role = Some(value),
                ExplicitKind::Goal => goals.push(value),
                ExplicitKind::Interest => interests.push(value),
            }
        }
        let implicit = store::load_implicit(&self.conn)?;
        let mut feedback_counts = BTreeMap::new();
        for f in store::load_feedback(&self.conn)? {
            *feedback_counts
                .entry(f.signal.kind().to_owned())
                .or_insert(0) += 1;
        }
        let settings = self.settings;
        let consents = store::load_consents(&self.conn)?
            .into_iter()
            .map(|(topic, personalise, _)| Consent { topic, personalise })
            .collect();
        let muted_topics = store::load_muted(&self.conn)?;
        let cache = self.user_cache(now)?;
        Ok(Profile {
            settings,
            role,
            goals,
            interests,
            inferred_topics: sum_affinities(&implicit, "topic"),
            inferred_formats: sum_affinities(&implicit, "format"),
            active_hours: sum_affinities(&implicit, "hour"),
            consents,
            muted_topics,
            feedback_counts,
            examples: cache.item_examples.len(),
            personalised: settings.personalisation && cache.view.private.is_some(),
        })
    }

    /// Forgets what was learned from use: the private parameters, the implicit profile,
    /// the feedback it came from and the federated-evaluation windows (unreported counts and
    /// the items shown kept for them). Explicit data, consents, settings, the catalogue, the
    /// shared model and the privacy budget stay (the budget records spending that cannot be
    /// undone).
    pub fn reset_model(&mut self) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        for table in ["private_model", "implicit", "feedback"] {
            tx.execute(&format!("DELETE FROM {table}"), [])?;
        }
        // What was shown and counted for evaluation is derived from use too.
        Device::clear_evaluation(&tx)?;
        tx.commit()?;
        self.user = None;
        Ok(())
    }

    /// Deletes everything the store holds about the user and everything derived from it —
    /// events, profile, consents, settings, private parameters, the catalogue and the
    /// shared model, the coordinator enrolment, any partial download and the
    /// federated-evaluation windows (with the items shown kept for them) — then `VACUUM`s, so that (with `secure_delete`) the file holds none of
    /// it. What remains: the schema, the two switches (so that a user who turned training
    /// off does not find it on again) and the privacy accountant (ε spent, the count and
    /// parameters of past uploads, none of their content), because a spend cannot be
    /// undone and deleting it would let the device overspend.
    pub fn delete_everything(&mut self) -> Result<(), SdkError> {
        let tx = self.conn.transaction()?;
        // The enrolment goes too: a device that deleted everything re-enrols as a new,
        // unlinkable device id.
        for table in store::USER_TABLES.iter().chain(&[
            "items",
            "global_model",
            "installed_snapshot",
            "model_download",
            "model_download_chunks",
            "enrolment",
            "evaluation_token",
        ]) {
            tx.execute(&format!("DELETE FROM {table}"), [])?;
        }
        Device::clear_evaluation(&tx)?;
        // The coordinator's report schedule belonged to the old enrolment.
        tx.execute(
            "DELETE FROM settings WHERE key = ?1",
            [store::NEXT_REPORT_KEY],
        )?;
        tx.commit()?;
        self.conn.execute_batch("VACUUM")?;
        self.model = None;
        self.rebuild_ranker()
    }

    /// Re-reads the on-device accountant from the store: another handle or process on the
    /// same store may have recorded a spend since this one last looked.
    pub(crate) fn reload_budget(&mut self) -> Result<(), SdkError> {
        self.budget = stored_budget(&self.conn)?;
        Ok(())
    }

    /// The on-device accountant as stored: ε spent and left, and the uploads (read from the
    /// store on each call, so a spend by another handle on the same store shows).
    pub fn budget(&self) -> Result<BudgetStatus, SdkError> {
        let budget = stored_budget(&self.conn)?;
        let spent: PrivacyStatement = budget.spent();
        let mut stmt = self.conn.prepare(
            "SELECT at_ms, round_id, model_version, mode, noise_multiplier, clip_norm, epsilon_after, kind, assumed_honest_devices, min_contributors FROM uploads ORDER BY id",
        )?;
        let uploads = stmt
            .query_map([], |r| {
                Ok(UploadRecord {
                    at: Timestamp::from_millis(r.get(0)?).to_rfc3339(),
                    round_id: r.get::<_, i64>(1)? as u64,
                    model_version: r.get::<_, i64>(2)? as u64,
                    mode: r.get(3)?,
                    noise_multiplier: r.get(4)?,
                    clip_norm: r.get(5)?,
                    epsilon_after: r.get(6)?,
                    kind: r.get(7)?,
                    assumed_honest_devices: r.get::<_, Option<i64>>(8)?.map(|h| h as u64),
                    min_contributors: r.get::<_, Option<i64>>(9)?.map(|m| m as u32),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BudgetStatus {
            epsilon_budget: budget.epsilon(),
            delta: budget.delta(),
            epsilon_spent: spent.epsilon,
            epsilon_remaining: budget.remaining(),
            rounds: budget.rounds(),
            audience: spent.audience.as_str().to_owned(),
            accountant: spent.accountant.as_str().to_owned(),
            uploads,
        })
    }

    /// Everything the store holds, as one JSON document (format `fedpref-device-export`,
    /// version 1; see docs/app-developers.md). `records` are in the JSON Lines input format, so they
    /// can be ingested again.
    pub fn export(&mut self, now: Timestamp) -> Result<Value, SdkError> {
        self.purge_expired(now)?;
        let mut records: Vec<Value> = store::load_items(&self.conn)?
            .into_iter()
            .map(|i| Event::Item(i).to_json())
            .collect();
        for (topic, personalise, at) in store::load_consents(&self.conn)? {
            records.push(
                Event::Consent {
                    topic,
                    personalise,
                    at: Some(at),
                }
                .to_json(),
            );
        }
        for (kind, value, at) in store::load_explicit(&self.conn)? {
            records.push(
                Event::Explicit {
                    kind,
                    value,
                    at: Some(at),
                }
                .to_json(),
            );
        }
        for f in store::load_feedback(&self.conn)? {
            records.push(Event::Feedback(f).to_json());
        }
        let inferred: Vec<Value> = store::load_implicit(&self.conn)?
            .into_iter()
            .map(|r| json!({"kind": r.kind, "value": r.value, "weight": r.weight, "at": r.at.to_rfc3339(), "source_item": r.source_item}))
            .collect();
        let private = self
            .conn
            .query_row(
                "SELECT model_version, user_factor, user_bias, example_count, fitted_ms FROM private_model",
                [],
                |r| {
                    Ok(json!({
                        "model_version": r.get::<_, i64>(0)?,
                        "user_factor": store::blob_f64(&r.get::<_, Vec<u8>>(1)?),
                        "user_bias": r.get::<_, f64>(2)?,
                        "example_count": r.get::<_, i64>(3)?,
                        "fitted_at": Timestamp::from_millis(r.get(4)?).to_rfc3339(),
                    }))
                },
            )
            .optional()?;
        let shared = self.model.as_ref().map(|m| {
            json!({"model_version": m.version(), "items": m.item_count(), "factor_dimension": m.factor_dimension()})
        });
        Ok(json!({
            "format": "fedpref-device-export",
            "format_version": 1,
            "exported_at": now.to_rfc3339(),
            "settings": self.settings,
            "records": records,
            "inferred": inferred,
            "muted_topics": store::load_muted(&self.conn)?,
            "private_model": private,
            "shared_model": shared,
            "privacy": self.budget()?,
            "evaluation": self.evaluation_export()?,
        }))
    }
}

fn read_settings(conn: &Connection) -> Result<Settings, SdkError> {
    let on = |key| -> Result<bool, SdkError> {
        Ok(store::get_setting(conn, key)?.is_none_or(|v| v == "on"))
    };
    Ok(Settings {
        personalisation: on("personalisation")?,
        training: on("training")?,
    })
}

fn load_model(conn: &Connection) -> Result<Option<MatrixFactorization>, SdkError> {
    let row = conn
        .query_row(
            "SELECT version, factor_dimension, item_ids, item_factors, item_biases, global_offset FROM global_model",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, f64>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((version, k, ids, factors, biases, offset)) = row else {
        return Ok(None);
    };
    let ids: Vec<String> = serde_json::from_str(&ids).map_err(|e| {
        SdkError::Storage(format!("the stored model's item ids are unreadable: {e}"))
    })?;
    Ok(Some(MatrixFactorization::from_flat(
        version as u64,
        ids,
        k as usize,
        store::blob_f64(&factors),
        store::blob_f64(&biases),
        offset,
    )?))
}

fn load_permissions(conn: &Connection) -> Result<Permissions, SdkError> {
    Ok(Permissions {
        consented: store::load_consents(conn)?
            .into_iter()
            .filter(|(_, personalise, _)| *personalise)
            .map(|(t, _, _)| t)
            .collect(),
        muted: store::load_muted(conn)?.into_iter().collect(),
    })
}

fn purge_in(conn: &Connection, now: Timestamp, r: &Retention) -> Result<PurgeReport, SdkError> {
    Ok(PurgeReport {
        explicit: store::delete_before(conn, "explicit", now.minus_days(r.explicit_days))?,
        implicit: store::delete_before(conn, "implicit", now.minus_days(r.implicit_days))?,
        feedback: store::delete_before(conn, "feedback", now.minus_days(r.feedback_days))?,
    })
}

/// Derives the implicit rows from feedback on usable, catalogued items within the
/// implicit window: per event, a `topic` row per topic and a `format` row with weight
/// w·(t − 3)/2 (t, w from the example table: liking is positive, disliking negative), and
/// an `hour` row with weight w. Unusable items (sensitive without consent, muted) give
/// nothing, so they never reach the profile.
pub fn derive_implicit(
    feedback: &[Feedback],
    catalogue: &Catalogue,
    permissions: &Permissions,
    table: &ExampleTable,
    since: Timestamp,
) -> Vec<ImplicitRow> {
    let mut rows = Vec::new();
    for f in feedback.iter().filter(|f| f.at >= since) {
        let Some(p) = catalogue.position(&f.item) else {
            continue;
        };
        let item = catalogue.get(p);
        if !permissions.usable(item) {
            continue;
        }
        let m = table.map(f.signal);
        let affinity = m.weight * (m.target - 3.0) / 2.0;
        let row = |kind, value: &str, weight| ImplicitRow {
            kind,
            value: value.to_owned(),
            weight,
            at: f.at,
            source_item: f.item.clone(),
        };
        rows.extend(item.topics.iter().map(|t| row("topic", t, affinity)));
        if let Some(format) = &item.format {
            rows.push(row("format", format, affinity));
        }
        rows.push(row("hour", &format!("{:02}", f.at.hour_utc()), m.weight));
    }
    rows
}

fn rebuild_implicit(
    conn: &Connection,
    now: Timestamp,
    config: &DeviceConfig,
) -> Result<(), SdkError> {
    let catalogue = Catalogue::new(store::load_items(conn)?);
    let rows = derive_implicit(
        &store::load_feedback(conn)?,
        &catalogue,
        &load_permissions(conn)?,
        &config.examples,
        now.minus_days(config.retention.implicit_days),
    );
    store::replace_implicit(conn, &rows)?;
    Ok(())
}

/// Sums the rows of one kind by value, strongest first (ties by value).
fn sum_affinities(rows: &[ImplicitRow], kind: &str) -> Vec<Affinity> {
    let mut sums: HashMap<&str, f64> = HashMap::new();
    for r in rows.iter().filter(|r| r.kind == kind) {
        *sums.entry(&r.value).or_insert(0.0) += r.weight;
    }
    let mut out: Vec<Affinity> = sums
        .into_iter()
        .map(|(value, weight)| Affinity {
            value: value.to_owned(),
            weight,
        })
        .collect();
    out.sort_by(|a, b| {
        b.weight
            .total_cmp(&a.weight)
            .then_with(|| a.value.cmp(&b.value))
    });
    out
}

/// The on-device accountant as the store holds it now.
pub(crate) fn stored_budget(conn: &Connection) -> Result<Budget, SdkError> {
    let json: String =
        conn.query_row("SELECT budget FROM privacy_budget WHERE id = 1", [], |r| {
            r.get(0)
        })?;
    serde_json::from_str(&json)
        .map_err(|e| SdkError::Storage(format!("the stored privacy budget is unreadable: {e}")))
}
