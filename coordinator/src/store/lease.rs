//! Leases and fencing: which replica holds a run, and the check every write of a run makes.

use super::*;

/// The rows a run's lease keeps (see [`Store::acquire_lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The run.
    pub run_id: String,
    /// The replica that holds (or last held) it.
    pub owner: String,
    /// Where that replica serves devices, for redirects.
    pub owner_endpoint: String,
    /// The fencing token: raised by one every time the lease changes hands.
    pub token: u64,
    /// When it lapses unless renewed, by the database's clock (ms since the epoch).
    pub expires_at_ms: i64,
}

/// What [`Store::acquire_lease`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// This replica took the lease: it was free, released or lapsed (the token went up).
    Acquired {
        /// The lease now held.
        lease: Lease,
        /// The replica whose lease lapsed, if it was taken over (not free or released).
        taken_from: Option<String>,
    },
    /// This replica held it and renewed it (same token).
    Renewed(Lease),
    /// Another replica holds it and it has not lapsed.
    HeldBy(Lease),
}

impl Store {
    /// Inside a write for `run_id`: when this store is a replica's, checks — holding the
    /// lease row's lock until the transaction ends — that this replica still holds the run's
    /// lease with the fencing token it took, and that the lease has not lapsed.
    pub(super) fn fence(&self, tx: &mut Tx<'_>, run_id: &str) -> Result<(), StoreError> {
        let Some(f) = &self.fencing else {
            return Ok(());
        };
        let lost = |why: String| StoreError::LeaseLost {
            run: run_id.to_string(),
            replica: f.replica_id.clone(),
            why,
        };
        let Some(&token) = f.tokens.get(run_id) else {
            return Err(lost("this replica does not hold the run's lease".into()));
        };
        let lock = match tx.dialect() {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let row = tx.query_opt(
            &format!(
                "SELECT owner, token, expires_at_ms > {} FROM run_leases WHERE run_id = ?1{lock}",
                now_ms_sql(tx.dialect())
            ),
            vals![run_id],
        )?;
        let Some(row) = row else {
            return Err(lost("the run has no lease row".into()));
        };
        let (owner, current, live) = (row.text(0)?, row.u64(1)?, row.i64(2)? != 0);
        if owner != f.replica_id || current != token {
            return Err(lost(format!(
                "fencing token {token} is stale: the lease is now {owner:?}'s with token {current}"
            )));
        }
        if !live {
            return Err(lost(format!("the lease (token {token}) has lapsed")));
        }
        Ok(())
    }

    /// Makes this store a replica's: from now on every write a run makes (round commits and
    /// abandons, publishes, status changes, rollbacks, ledger entries) checks in its own
    /// transaction that `replica_id` holds the run's lease ([`Store::acquire_lease`]) with the
    /// token it took. `endpoint` is where this replica serves devices (for redirects);
    /// `lease_ms` is how long a lease lasts unless renewed.
    pub fn enable_fencing(&mut self, replica_id: &str, endpoint: &str, lease_ms: u64) {
        self.fencing = Some(Fencing {
            replica_id: replica_id.to_string(),
            endpoint: endpoint.to_string(),
            lease_ms: lease_ms.min(i64::MAX as u64) as i64,
            tokens: Default::default(),
        });
    }

    /// This store's replica id, if fencing is on.
    pub fn replica_id(&self) -> Option<&str> {
        self.fencing.as_ref().map(|f| f.replica_id.as_str())
    }

    /// The fencing token this replica holds for `run_id`, if it believes it holds the lease.
    pub fn held_token(&self, run_id: &str) -> Option<u64> {
        self.fencing.as_ref()?.tokens.get(run_id).copied()
    }

    /// Takes or renews a run's lease, in one transaction, by the database's clock: taken when
    /// there is no lease row, when it was released, when it lapsed, or when it is held under
    /// this replica's id by an earlier process of it (this one holds no token for the run)
    /// (the fencing token goes up by one); renewed (same token) when this replica holds it
    /// with the token it remembers. Otherwise another replica holds it, and this replica forgets any token it
    /// had for the run. Needs [`Store::enable_fencing`].
    pub fn acquire_lease(&mut self, run_id: &str) -> Result<LeaseOutcome, StoreError> {
        let f = self.fencing.clone().ok_or_else(|| {
            StoreError::Corrupt("leases need a replica id (Store::enable_fencing)".into())
        })?;
        let held = f.tokens.get(run_id).copied();
        let outcome = self.write(|tx| {
            let now = tx
                .query_one(&format!("SELECT {}", now_ms_sql(tx.dialect())), &[])?
                .i64(0)?;
            let expires = now.saturating_add(f.lease_ms);
            if tx.dialect() == Dialect::Postgres {
                tx.execute(
                    "INSERT INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, '', '', 0, 0) ON CONFLICT (run_id) DO NOTHING",
                    vals![run_id],
                )?;
            } else {
                tx.execute(
                    "INSERT OR IGNORE INTO run_leases (run_id, owner, owner_endpoint, token, expires_at_ms) \
                     VALUES (?1, '', '', 0, 0)",
                    vals![run_id],
                )?;
            }
            let lock = match tx.dialect() {
                Dialect::Postgres => " FOR UPDATE",
                Dialect::Sqlite => "",
            };
            let row = tx.query_one(
                &format!(
                    "SELECT owner, owner_endpoint, token, expires_at_ms FROM run_leases WHERE run_id = ?1{lock}"
                ),
                vals![run_id],
            )?;
            let current = Lease {
                run_id: run_id.to_string(),
                owner: row.text(0)?,
                owner_endpoint: row.text(1)?,
                token: row.u64(2)?,
                expires_at_ms: row.i64(3)?,
            };
            let mine = current.owner == f.replica_id && Some(current.token) == held;
            // Held under this replica's id by a process of it that this one is not: an
            // earlier process that stopped without releasing it (killed, crashed). Waiting
            // for it to lapse would only redirect devices to this very replica; the token
            // goes up, so a process that were still alive could write nothing more.
            let predecessor = current.owner == f.replica_id && held.is_none();
            let free = current.owner.is_empty() || current.expires_at_ms <= now || predecessor;
            if !mine && !free {
                return Ok(LeaseOutcome::HeldBy(current));
            }
            let token = if mine { current.token } else { current.token + 1 };
            tx.execute(
                "UPDATE run_leases SET owner = ?2, owner_endpoint = ?3, token = ?4, expires_at_ms = ?5 WHERE run_id = ?1",
                vals![run_id, &f.replica_id, &f.endpoint, token as i64, expires],
            )?;
            let lease = Lease {
                run_id: run_id.to_string(),
                owner: f.replica_id.clone(),
                owner_endpoint: f.endpoint.clone(),
                token,
                expires_at_ms: expires,
            };
            Ok(if mine {
                LeaseOutcome::Renewed(lease)
            } else {
                LeaseOutcome::Acquired {
                    lease,
                    taken_from: (!current.owner.is_empty()).then_some(current.owner),
                }
            })
        })?;
        if let Some(f) = self.fencing.as_mut() {
            match &outcome {
                LeaseOutcome::Acquired { lease: l, .. } | LeaseOutcome::Renewed(l) => {
                    f.tokens.insert(run_id.to_string(), l.token);
                }
                LeaseOutcome::HeldBy(_) => {
                    f.tokens.remove(run_id);
                }
            }
        }
        Ok(outcome)
    }

    /// Gives a held lease up (shutdown): the row stays, with no owner, so the next replica
    /// takes it at once with a higher token. A lease this replica no longer holds is left
    /// alone.
    pub fn release_lease(&mut self, run_id: &str) -> Result<(), StoreError> {
        let Some(f) = self.fencing.as_mut() else {
            return Ok(());
        };
        let Some(token) = f.tokens.remove(run_id) else {
            return Ok(());
        };
        let owner = f.replica_id.clone();
        self.write(|tx| {
            tx.execute(
                "UPDATE run_leases SET owner = '', expires_at_ms = 0 WHERE run_id = ?1 AND owner = ?2 AND token = ?3",
                vals![run_id, &owner, token as i64],
            )?;
            Ok(())
        })
    }

    /// Forgets a lease without touching the database (after a write was refused as fenced).
    pub fn forget_lease(&mut self, run_id: &str) {
        if let Some(f) = self.fencing.as_mut() {
            f.tokens.remove(run_id);
        }
    }

    /// A run's lease row, if it ever had one.
    pub fn lease(&self, run_id: &str) -> Result<Option<Lease>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT owner, owner_endpoint, token, expires_at_ms FROM run_leases WHERE run_id = ?1",
                vals![run_id],
            )?
            .map(|row| {
                Ok(Lease {
                    run_id: run_id.to_string(),
                    owner: row.text(0)?,
                    owner_endpoint: row.text(1)?,
                    token: row.u64(2)?,
                    expires_at_ms: row.i64(3)?,
                })
            })
            .transpose()
        })
    }

    /// The database's clock (ms since the epoch), which times leases.
    pub fn database_now_ms(&self) -> Result<i64, StoreError> {
        self.read(|tx| {
            tx.query_one(&format!("SELECT {}", now_ms_sql(tx.dialect())), &[])?
                .i64(0)
        })
    }
}
