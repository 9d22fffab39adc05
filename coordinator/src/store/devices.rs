//! Enrolled devices and their participations.

use super::*;

/// The enrolment caps [`Store::enrol_device_within_caps`] holds.
#[derive(Clone, Copy, Debug)]
pub struct EnrolmentCaps {
    /// Count all enrolments from this time on (ms).
    pub window_since_ms: i64,
    /// At most this many in that window.
    pub max_in_window: u64,
    /// Count one person's enrolments from this time on (ms).
    pub person_since_ms: i64,
    /// At most this many of one person's.
    pub max_per_person: u64,
}

/// Which cap an enrolment reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrolmentCap {
    /// All devices' enrolments in the window (`limits.max_enrolments_per_window`).
    Window,
    /// One person's (`limits.max_enrolments_per_person`).
    Person,
}

impl Store {
    pub(super) fn rounds_of(&self, sql: &str, params: &[Value]) -> Result<Vec<u64>, StoreError> {
        self.read(|tx| tx.query(sql, params)?.iter().map(|r| r.u64(0)).collect())
    }

    /// The rounds a device took part in, for one run.
    pub fn participations(&self, run_id: &str, device_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM participations WHERE run_id = ?1 AND device_id = ?2 ORDER BY round",
            vals![run_id, device_id],
        )
    }

    /// Enrols a device — its opaque id, the SHA-256 (hex) of its token and, for an enrolment
    /// with a grant, the person it acts as ([`crate::enrolment::Person::principal`]); the token
    /// itself is never stored — unless an enrolment cap is reached:
    /// at most `caps.max_in_window` devices since `caps.window_since_ms` and, for a person, at
    /// most `caps.max_per_person` of theirs since `caps.person_since_ms`. The counts and the
    /// insert are one transaction that replicas sharing a PostgreSQL database take one at a
    /// time (an advisory lock; SQLite's write transactions are exclusive already), so
    /// concurrent enrolments on several replicas cannot pass a cap together. Returns the cap
    /// that was reached and its count, and stores nothing then.
    pub fn enrol_device_within_caps(
        &self,
        device_id: &str,
        token_sha256: &str,
        sdk_version: &str,
        at_ms: i64,
        principal: Option<&str>,
        caps: &EnrolmentCaps,
    ) -> Result<Option<(EnrolmentCap, u64)>, StoreError> {
        self.write(|tx| {
            if tx.dialect() == Dialect::Postgres {
                tx.batch("SELECT pg_advisory_xact_lock(7218309215)")?;
            }
            let recent = tx
                .query_one(
                    "SELECT COUNT(*) FROM devices WHERE enrolled_at_ms >= ?1",
                    vals![caps.window_since_ms],
                )?
                .u64(0)?;
            if recent >= caps.max_in_window {
                return Ok(Some((EnrolmentCap::Window, recent)));
            }
            if let Some(p) = principal {
                let theirs = tx
                    .query_one(
                        "SELECT COUNT(*) FROM devices WHERE principal = ?1 AND enrolled_at_ms >= ?2",
                        vals![p, caps.person_since_ms],
                    )?
                    .u64(0)?;
                if theirs >= caps.max_per_person {
                    return Ok(Some((EnrolmentCap::Person, theirs)));
                }
            }
            tx.execute(
                "INSERT INTO devices (id, token_sha256, sdk_version, enrolled_at_ms, principal) VALUES (?1, ?2, ?3, ?4, ?5)",
                vals![device_id, token_sha256, sdk_version, at_ms, principal],
            )?;
            Ok(None)
        })
    }

    /// Enrolments of the person `principal` at or after `since_ms`.
    pub fn person_enrolments_since(
        &self,
        principal: &str,
        since_ms: i64,
    ) -> Result<u64, StoreError> {
        self.read(|tx| {
            tx.query_one(
                "SELECT COUNT(*) FROM devices WHERE principal = ?1 AND enrolled_at_ms >= ?2",
                vals![principal, since_ms],
            )?
            .u64(0)
        })
    }

    /// The enrolment whose token hashes to `token_sha256` (hex), if any: its device id and
    /// the person it enrolled as (`None` without a grant).
    pub fn enrolment_by_token_hash(
        &self,
        token_sha256: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT id, principal FROM devices WHERE token_sha256 = ?1",
                vals![token_sha256],
            )?
            .map(|r| Ok((r.text(0)?, r.opt_text(1)?)))
            .transpose()
        })
    }

    /// Devices enrolled at or after `since_ms`.
    pub fn enrolments_since(&self, since_ms: i64) -> Result<u64, StoreError> {
        self.read(|tx| {
            tx.query_one(
                "SELECT COUNT(*) FROM devices WHERE enrolled_at_ms >= ?1",
                vals![since_ms],
            )?
            .u64(0)
        })
    }

    /// The device whose token hashes to `token_sha256` (hex), if any.
    pub fn device_by_token_hash(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT id FROM devices WHERE token_sha256 = ?1",
                vals![token_sha256],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// Enrolled devices.
    pub fn device_count(&self) -> Result<u64, StoreError> {
        self.read(|tx| tx.query_one("SELECT COUNT(*) FROM devices", &[])?.u64(0))
    }

    /// Whether `device_id` took part in a committed round of `run_id`.
    pub fn took_part(&self, run_id: &str, device_id: &str) -> Result<bool, StoreError> {
        self.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 FROM participations WHERE run_id = ?1 AND device_id = ?2 LIMIT 1",
                    vals![run_id, device_id],
                )?
                .is_some())
        })
    }

    /// The run's committed rounds, in order: a round's position in this list (from 1) is the
    /// release index the participation limits count in.
    pub fn committed_rounds(&self, run_id: &str) -> Result<Vec<u64>, StoreError> {
        self.rounds_of(
            "SELECT round FROM rounds WHERE run_id = ?1 AND outcome = 'committed' ORDER BY round",
            vals![run_id],
        )
    }

    /// The rounds each device took part in, for one run, by device id. Device ids stay
    /// inside the coordinator; reports show only the distribution.
    pub fn participations_by_device(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, Vec<u64>)>, StoreError> {
        let rows = self.read(|tx| {
            tx.query(
                "SELECT device_id, round FROM participations WHERE run_id = ?1 ORDER BY device_id, round",
                vals![run_id],
            )
        })?;
        let mut out: Vec<(String, Vec<u64>)> = vec![];
        for row in rows {
            let (device, round) = (row.text(0)?, row.u64(1)?);
            match out.last_mut() {
                Some((d, rounds)) if *d == device => rounds.push(round),
                _ => out.push((device, vec![round])),
            }
        }
        Ok(out)
    }
}
