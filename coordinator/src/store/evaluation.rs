//! The noised sums of federated-evaluation releases, per run and model version.

use super::*;

/// Reads the noised evaluation sum of (run, version) inside a transaction.
pub(super) fn read_evaluation_sum(
    tx: &mut Tx<'_>,
    run_id: &str,
    version: i64,
) -> Result<EvaluationSum, StoreError> {
    match tx.query_opt(
        "SELECT reports, sums FROM evaluation_releases WHERE run_id = ?1 AND model_version = ?2",
        vals![run_id, version],
    )? {
        Some(r) => evaluation_sum_from(r.u64(0)?, &r.text(1)?),
        None => Ok(EvaluationSum::default()),
    }
}

pub(super) fn evaluation_sum_from(reports: u64, sums: &str) -> Result<EvaluationSum, StoreError> {
    let sums: [f64; COORDINATES] = serde_json::from_str(sums)
        .map_err(|e| StoreError::Corrupt(format!("evaluation sums {sums:?}: {e}")))?;
    if sums.iter().any(|v| !v.is_finite()) {
        return Err(StoreError::Corrupt(format!(
            "evaluation sums {sums:?}: not finite"
        )));
    }
    Ok(EvaluationSum { reports, sums })
}

impl Store {
    /// Adds one device's released evaluation (checked with
    /// [`EvaluationSum::check`]) to the noised sums of (run, model version), in one
    /// transaction; returns whether it is the version's first. Nothing else is stored: no
    /// device, no time. Sums commute, so any replica may add them: this write is not fenced.
    pub fn add_evaluation_release(
        &mut self,
        run_id: &str,
        model_version: u64,
        values: &[f64; COORDINATES],
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let version = i64::try_from(model_version)
                .map_err(|_| StoreError::Corrupt(format!("model version {model_version}")))?;
            let mut sum = read_evaluation_sum(tx, run_id, version)?;
            let first = sum.reports == 0;
            sum.add(values);
            let text = serde_json::to_string(&sum.sums).expect("finite sums serialise");
            if first {
                tx.execute(
                    "INSERT INTO evaluation_releases (run_id, model_version, reports, sums) VALUES (?1, ?2, ?3, ?4)",
                    vals![run_id, version, sum.reports as i64, text],
                )?;
            } else {
                tx.execute(
                    "UPDATE evaluation_releases SET reports = ?3, sums = ?4 WHERE run_id = ?1 AND model_version = ?2",
                    vals![run_id, version, sum.reports as i64, text],
                )?;
            }
            Ok(first)
        })
    }

    /// Records that `principal` (a device id, or a person's principal) is issued the
    /// evaluation token of (run, model version), and forgets the run's versions below
    /// `forget_below`, in one transaction. Returns false, recording nothing, when it already
    /// was (by this process before a restart, or by another replica): a device reports at
    /// most once per version whatever happens to the coordinator. Not fenced: it says who may
    /// report, never what anyone reported.
    pub fn claim_evaluation_token(
        &mut self,
        run_id: &str,
        model_version: u64,
        principal: &str,
        forget_below: u64,
    ) -> Result<bool, StoreError> {
        let version = i64::try_from(model_version)
            .map_err(|_| StoreError::Corrupt(format!("model version {model_version}")))?;
        let below = i64::try_from(forget_below).unwrap_or(i64::MAX);
        self.write(|tx| {
            let insert = match tx.dialect() {
                Dialect::Postgres => {
                    "INSERT INTO evaluation_tokens_issued (run_id, model_version, principal) \
                     VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING"
                }
                Dialect::Sqlite => {
                    "INSERT OR IGNORE INTO evaluation_tokens_issued (run_id, model_version, principal) \
                     VALUES (?1, ?2, ?3)"
                }
            };
            let claimed = tx.execute(insert, vals![run_id, version, principal])? == 1;
            if claimed && below > 0 {
                tx.execute(
                    "DELETE FROM evaluation_tokens_issued WHERE run_id = ?1 AND model_version < ?2",
                    vals![run_id, below],
                )?;
            }
            Ok(claimed)
        })
    }

    /// The noised evaluation sum of (run, model version); empty if none was reported.
    pub fn evaluation_sum(
        &self,
        run_id: &str,
        model_version: u64,
    ) -> Result<EvaluationSum, StoreError> {
        let version = i64::try_from(model_version)
            .map_err(|_| StoreError::Corrupt(format!("model version {model_version}")))?;
        self.read(|tx| read_evaluation_sum(tx, run_id, version))
    }

    /// Every model version of the run with evaluation reports, with its noised sum, in
    /// version order.
    pub fn evaluation_sums(&self, run_id: &str) -> Result<Vec<(u64, EvaluationSum)>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT model_version, reports, sums FROM evaluation_releases WHERE run_id = ?1 ORDER BY model_version",
                vals![run_id],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, evaluation_sum_from(r.u64(1)?, &r.text(2)?)?)))
            .collect()
        })
    }
}
