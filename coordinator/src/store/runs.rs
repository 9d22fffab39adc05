//! Runs, rounds and model versions: creating a run, committing a round in one transaction, publishing, pausing, stopping and rolling back.

use super::*;

/// A run's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Rounds run.
    Active,
    /// No rounds until resumed.
    Paused,
    /// Finished: completed, budget exhausted or stopped; see the ledger's last entry.
    Stopped,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "active" => Ok(Self::Active),
            "paused" => Ok(Self::Paused),
            "stopped" => Ok(Self::Stopped),
            other => Err(StoreError::Corrupt(format!("unknown run status {other:?}"))),
        }
    }
}

/// A run as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The id.
    pub id: String,
    /// The manifest.
    pub manifest: RunManifest,
    /// Its SHA-256.
    pub manifest_sha256: String,
    /// Its status.
    pub status: RunStatus,
    /// Rounds committed so far.
    pub rounds_committed: u64,
    /// The next round number to open (committed and abandoned rounds both use one).
    pub next_round: u64,
    /// The newest model version (committed, maybe not yet published).
    pub current_version: u64,
    /// The newest published model version.
    pub published_version: u64,
    /// The server optimiser's state, as JSON.
    pub server_state: String,
}

/// What a round commits, in one transaction.
#[derive(Clone, Debug)]
pub struct RoundCommit<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The round number.
    pub round: u64,
    /// Opaque ids of the devices whose updates were aggregated.
    pub participants: &'a [String],
    /// The model version produced.
    pub model: &'a ModelBlob,
    /// The server optimiser's state after the round, as JSON.
    pub server_state: &'a str,
    /// The round's ledger event (`RoundCommitted`).
    pub event: LedgerEvent,
    /// A final event to append in the same transaction when the round ends the run.
    pub stop: Option<LedgerEvent>,
    /// The coordinator's clock.
    pub at_ms: i64,
}

pub(super) fn run_status(tx: &mut Tx<'_>, run_id: &str) -> Result<RunStatus, StoreError> {
    let row = tx
        .query_opt("SELECT status FROM runs WHERE id = ?1", vals![run_id])?
        .ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?;
    RunStatus::parse(&row.text(0)?)
}

pub(super) fn insert_model(
    tx: &mut Tx<'_>,
    run_id: &str,
    round: u64,
    model: &ModelBlob,
    at_ms: i64,
    published_at_ms: Option<i64>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO model_versions (run_id, version, round, sha256, snapshot, created_at_ms, published_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        vals![run_id, model.version as i64, round as i64, &model.sha256, &model.bytes, at_ms, published_at_ms],
    )?;
    Ok(())
}

pub(super) fn row_to_run(r: &Row) -> Result<RunRecord, StoreError> {
    let id = r.text(0)?;
    let toml = r.text(1)?;
    Ok(RunRecord {
        manifest: RunManifest::from_toml(&toml, &format!("stored manifest of run {id}"))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        manifest_sha256: r.text(2)?,
        status: RunStatus::parse(&r.text(3)?)?,
        rounds_committed: r.u64(4)?,
        next_round: r.u64(5)?,
        current_version: r.u64(6)?,
        published_version: r.u64(7)?,
        server_state: r.text(8)?,
        id,
    })
}

impl Store {
    /// Creates a run with its initial model (version 1, published) and its first two ledger
    /// entries, in one transaction. A replica that creates a run takes its lease in the same
    /// transaction.
    pub fn create_run(
        &mut self,
        run_id: &str,
        manifest: &RunManifest,
        initial: &ModelBlob,
        server_state: &str,
        created: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let fencing = self.fencing.clone();
        let token = self.write(|tx| {
            if tx
                .query_opt("SELECT id FROM runs WHERE id = ?1", vals![run_id])?
                .is_some()
            {
                return Err(StoreError::RunExists(run_id.to_string()));
            }
            tx.execute(
                "INSERT INTO runs (id, manifest_toml, manifest_sha256, status, created_at_ms, rounds_committed, \
                 next_round, current_version, published_version, server_state) VALUES (?1, ?2, ?3, ?4, ?5, 0, 1, 1, 1, ?6)",
                vals![run_id, manifest.to_toml(), manifest.sha256(), RunStatus::Active.as_str(), at_ms, server_state],
            )?;
            insert_model(tx, run_id, 0, initial, at_ms, Some(at_ms))?;
            append(tx, self.signer.as_ref(), run_id, at_ms, created)?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: 1,
                    model_sha256: initial.sha256.clone(),
                },
            )?;
            let Some(f) = &fencing else {
                return Ok(None);
            };
            let now = now_ms_sql(tx.dialect());
            tx.execute(
                &format!(
                    "INSERT INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, ?2, ?3, 1, {now} + ?4)"
                ),
                vals![run_id, &f.replica_id, &f.endpoint, f.lease_ms],
            )?;
            Ok(Some(1))
        })?;
        if let (Some(f), Some(token)) = (self.fencing.as_mut(), token) {
            f.tokens.insert(run_id.to_string(), token);
        }
        Ok(())
    }

    /// A run by id.
    pub fn run(&self, run_id: &str) -> Result<RunRecord, StoreError> {
        self.read(|tx| {
            let row = tx.query_opt(
                "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
                 published_version, server_state FROM runs WHERE id = ?1",
                vals![run_id],
            )?;
            row_to_run(&row.ok_or_else(|| StoreError::NoSuchRun(run_id.to_string()))?)
        })
    }

    /// All runs, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT id, manifest_toml, manifest_sha256, status, rounds_committed, next_round, current_version, \
                 published_version, server_state FROM runs ORDER BY created_at_ms, id",
                &[],
            )?
            .iter()
            .map(row_to_run)
            .collect()
        })
    }

    /// Commits a round: everything in one transaction (see the module docs), fenced.
    pub fn commit_round(&mut self, c: &RoundCommit<'_>) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, c.run_id)?;
            tx.execute(
                "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'committed', ?3, ?4)",
                vals![c.run_id, c.round as i64, c.participants.len() as i64, c.at_ms],
            )?;
            for device in c.participants {
                // A distributed round's participations were written with its release.
                tx.execute(
                    "INSERT INTO participations (run_id, round, device_id) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                    vals![c.run_id, c.round as i64, device],
                )?;
            }
            insert_model(tx, c.run_id, c.round, c.model, c.at_ms, None)?;
            append(tx, self.signer.as_ref(), c.run_id, c.at_ms, c.event.clone())?;
            let status = if let Some(stop) = &c.stop {
                append(tx, self.signer.as_ref(), c.run_id, c.at_ms, stop.clone())?;
                RunStatus::Stopped
            } else {
                run_status(tx, c.run_id)?
            };
            tx.execute(
                "UPDATE runs SET rounds_committed = rounds_committed + 1, next_round = ?2, current_version = ?3, \
                 server_state = ?4, status = ?5 WHERE id = ?1",
                vals![c.run_id, c.round as i64 + 1, c.model.version as i64, c.server_state, status.as_str()],
            )?;
            Ok(())
        })
    }

    /// Records a distributed round's release before its sum is unmasked, in one fenced
    /// transaction: the `round_released` ledger entry, the contributors' participations, and
    /// the run's next round number (so that a restart never reuses this round's number). A
    /// replica that lost the run's lease gets [`StoreError::LeaseLost`] and never unmasks.
    pub fn record_release(
        &mut self,
        run_id: &str,
        round: u64,
        participants: &[String],
        event: &LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            for device in participants {
                tx.execute(
                    "INSERT INTO participations (run_id, round, device_id) VALUES (?1, ?2, ?3)",
                    vals![run_id, round as i64, device],
                )?;
            }
            append(tx, self.signer.as_ref(), run_id, at_ms, event.clone())?;
            tx.execute(
                "UPDATE runs SET next_round = ?2 WHERE id = ?1",
                vals![run_id, round as i64 + 1],
            )?;
            Ok(())
        })
    }

    /// Rounds whose data was released: the committed ones and those with a recorded release
    /// (participations), in order.
    pub fn released_rounds(&self, run_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM rounds WHERE run_id = ?1 AND outcome = 'committed' \
             UNION SELECT round FROM participations WHERE run_id = ?1 ORDER BY round",
            vals![run_id],
        )
    }

    /// Releases recorded for rounds that have neither committed nor been abandoned (the
    /// process that recorded them stopped before the round ended), with their contributor
    /// counts, in order.
    pub fn orphan_releases(&self, run_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT p.round, COUNT(*) FROM participations p WHERE p.run_id = ?1 AND NOT EXISTS \
                 (SELECT 1 FROM rounds r WHERE r.run_id = p.run_id AND r.round = p.round) \
                 GROUP BY p.round ORDER BY p.round",
                vals![run_id],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.u64(1)?)))
            .collect()
        })
    }

    /// Records an abandoned round: nothing released, nothing spent (unless its release was
    /// recorded first, see [`Store::record_release`]).
    pub fn abandon_round(
        &mut self,
        run_id: &str,
        round: u64,
        contributions: u64,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            tx.execute(
                "INSERT INTO rounds (run_id, round, outcome, contributions, closed_at_ms) VALUES (?1, ?2, 'abandoned', ?3, ?4)",
                vals![run_id, round as i64, contributions as i64, at_ms],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::RoundAbandoned {
                    round,
                    contributions,
                    reason: reason.to_string(),
                },
            )?;
            tx.execute(
                "UPDATE runs SET next_round = ?2 WHERE id = ?1",
                vals![run_id, round as i64 + 1],
            )?;
            Ok(())
        })
    }

    /// Publishes a committed version (a second transaction after [`Store::commit_round`]).
    /// Publishing a version that is already published is a no-op.
    pub fn publish(&mut self, run_id: &str, version: u64, at_ms: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            let row = tx.query_opt(
                "SELECT sha256, published_at_ms FROM model_versions WHERE run_id = ?1 AND version = ?2",
                vals![run_id, version as i64],
            )?;
            let row = row.ok_or_else(|| StoreError::NoSuchVersion {
                run: run_id.to_string(),
                version,
            })?;
            if row.opt_i64(1)?.is_some() {
                return Ok(());
            }
            let sha256 = row.text(0)?;
            tx.execute(
                "UPDATE model_versions SET published_at_ms = ?3 WHERE run_id = ?1 AND version = ?2",
                vals![run_id, version as i64, at_ms],
            )?;
            tx.execute(
                "UPDATE runs SET published_version = ?2 WHERE id = ?1 AND published_version < ?2",
                vals![run_id, version as i64],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: version,
                    model_sha256: sha256,
                },
            )
        })
    }

    /// Changes a run's status with its ledger entry, in one transaction.
    pub fn set_status(
        &mut self,
        run_id: &str,
        status: RunStatus,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            self.fence(tx, run_id)?;
            tx.execute(
                "UPDATE runs SET status = ?2 WHERE id = ?1",
                vals![run_id, status.as_str()],
            )?;
            append(tx, self.signer.as_ref(), run_id, at_ms, event)
        })
    }

    /// Stores an earlier version's parameters as a new, published version and records the
    /// rollback, in one transaction. The server optimiser's state is replaced.
    pub fn rollback(
        &mut self,
        run_id: &str,
        to_version: u64,
        new_model: &ModelBlob,
        server_state: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            insert_model(tx, run_id, 0, new_model, at_ms, Some(at_ms))?;
            tx.execute(
                "UPDATE runs SET current_version = ?2, published_version = ?2, server_state = ?3 WHERE id = ?1",
                vals![run_id, new_model.version as i64, server_state],
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::RolledBack {
                    to_version,
                    new_version: new_model.version,
                    model_sha256: new_model.sha256.clone(),
                    reason: reason.to_string(),
                },
            )?;
            append(
                tx,
                self.signer.as_ref(),
                run_id,
                at_ms,
                LedgerEvent::ModelPublished {
                    model_version: new_model.version,
                    model_sha256: new_model.sha256.clone(),
                },
            )
        })
    }

    /// A stored model version.
    pub fn model(&self, run_id: &str, version: u64) -> Result<ModelBlob, StoreError> {
        self.read(|tx| {
            let row = tx
                .query_opt(
                    "SELECT snapshot, sha256 FROM model_versions WHERE run_id = ?1 AND version = ?2",
                    vals![run_id, version as i64],
                )?
                .ok_or_else(|| StoreError::NoSuchVersion {
                    run: run_id.to_string(),
                    version,
                })?;
            Ok(ModelBlob {
                version,
                bytes: row.blob(0)?,
                sha256: row.text(1)?,
            })
        })
    }
}
