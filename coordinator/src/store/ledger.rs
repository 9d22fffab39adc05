//! The privacy ledger as stored: its entries, their signed heads, and what `run_created` recorded.

use super::*;

/// Appends one entry to a run's chain inside `tx` and, with a signing key, stores the key's
/// signature of the new head in the same transaction.
pub(super) fn append(
    tx: &mut Tx<'_>,
    signer: Option<&crate::checkpoint::LedgerSigner>,
    run_id: &str,
    at_ms: i64,
    event: LedgerEvent,
) -> Result<(), StoreError> {
    let last = tx.query_opt(
        "SELECT sequence, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence DESC LIMIT 1",
        vals![run_id],
    )?;
    let (sequence, prev_hash) = match last {
        Some(r) => (r.u64(0)? + 1, r.text(1)?),
        None => (1, GENESIS_HASH.to_string()),
    };
    let kind = event.kind();
    let entry = LedgerEntry {
        run_id: run_id.to_string(),
        sequence,
        at_ms,
        event,
    };
    let sealed = seal(&entry, &prev_hash);
    tx.execute(
        "INSERT INTO ledger (run_id, sequence, at_ms, kind, body, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        vals![run_id, sequence as i64, at_ms, kind, &sealed.body, &sealed.prev_hash, &sealed.hash],
    )?;
    if let Some(signer) = signer {
        let s = signer.sign_head(run_id, sequence, &sealed.hash, at_ms);
        tx.execute(
            "INSERT INTO ledger_signatures (run_id, sequence, at_ms, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            vals![run_id, sequence as i64, at_ms, &s.public_key, &s.signature],
        )?;
    }
    Ok(())
}

impl Store {
    /// A run's ledger, in sequence order.
    pub fn ledger(&self, run_id: &str) -> Result<Vec<SealedEntry>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT sequence, body, prev_hash, hash FROM ledger WHERE run_id = ?1 ORDER BY sequence",
                vals![run_id],
            )?
            .iter()
            .map(|r| {
                Ok(SealedEntry {
                    sequence: r.u64(0)?,
                    body: r.text(1)?,
                    prev_hash: r.text(2)?,
                    hash: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// The stored head signatures of a run's ledger, in sequence order.
    pub fn ledger_signatures(
        &self,
        run_id: &str,
    ) -> Result<Vec<crate::checkpoint::HeadSignature>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT sequence, at_ms, public_key, signature FROM ledger_signatures WHERE run_id = ?1 ORDER BY sequence",
                vals![run_id],
            )?
            .iter()
            .map(|r| {
                Ok(crate::checkpoint::HeadSignature {
                    sequence: r.u64(0)?,
                    at_ms: r.i64(1)?,
                    public_key: r.text(2)?,
                    signature: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// Every run id that has ledger entries or head signatures, or a row in `runs`, sorted:
    /// what `ledger verify` checks. The ledger itself is the authority; a run whose `runs`
    /// row was deleted is still listed, and one with a row but no entries fails verification.
    pub fn ledger_run_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT run_id FROM ledger UNION SELECT run_id FROM ledger_signatures \
                 UNION SELECT id FROM runs ORDER BY 1",
                &[],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// A run's stored manifest TOML, if its `runs` row exists.
    pub fn manifest_toml(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT manifest_toml FROM runs WHERE id = ?1",
                vals![run_id],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// Signs every ledger entry appended from now on with `signer` (see
    /// [`crate::checkpoint`]).
    pub fn set_ledger_signer(&mut self, signer: Option<crate::checkpoint::LedgerSigner>) {
        self.signer = signer;
    }

    /// The public key entries are signed with, hex.
    pub fn ledger_public_key(&self) -> Option<String> {
        self.signer.as_ref().map(|s| s.public_key_hex())
    }

    /// The `epsilon_assumption` a run's `run_created` entry records, if any.
    pub fn created_assumption(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        let body = self.read(|tx| {
            tx.query_opt(
                "SELECT body FROM ledger WHERE run_id = ?1 AND sequence = 1",
                vals![run_id],
            )?
            .map(|r| r.text(0))
            .transpose()
        })?;
        let Some(body) = body else {
            return Ok(None);
        };
        let entry: crate::ledger::LedgerEntry = serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("run_created of run {run_id}: {e}")))?;
        Ok(match entry.event {
            LedgerEvent::RunCreated {
                epsilon_assumption, ..
            } => epsilon_assumption,
            _ => None,
        })
    }
}
