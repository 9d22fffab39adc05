//! Verifying a run's ledger as stored: the hash chain and every ε re-derived
//! ([`crate::ledger::verify`]), the head signatures ([`crate::checkpoint`]), the rounds against
//! the manifest whose hash `run_created` records ([`crate::ledger::check_against_manifest`]),
//! and any checkpoints kept outside the database. What `ledger verify`, `ledger checkpoint` and
//! the impact report call.

use crate::checkpoint::{Checkpoint, SignedHead, check_head_signatures};
use crate::ledger::{VerifiedTotals, VerifyFailure, check_against_manifest, verify};
use crate::store::{Store, StoreError};

/// What a run's stored ledger was verified to say.
#[derive(Clone, Debug, PartialEq)]
pub struct RunVerification {
    /// The re-derived totals.
    pub totals: VerifiedTotals,
    /// Who signed the head.
    pub signed: SignedHead,
    /// Checkpoints of this run the chain extends.
    pub checkpoints: usize,
}

/// Verifies one run's ledger in `store`, and that it extends each of `checkpoints` that names
/// this run. The outer error is the store's; the inner one the first problem found.
pub fn verify_stored_run(
    store: &Store,
    run_id: &str,
    checkpoints: &[Checkpoint],
) -> Result<Result<RunVerification, VerifyFailure>, StoreError> {
    let entries = store.ledger(run_id)?;
    let signatures = store.ledger_signatures(run_id)?;
    let manifest = store.manifest_toml(run_id)?;
    let mine: Vec<&Checkpoint> = checkpoints.iter().filter(|c| c.run_id == run_id).collect();
    Ok((|| {
        // A missing or truncated chain is named as such before anything else.
        for c in &mine {
            c.check_extended_by(&entries)?;
        }
        let totals = verify(run_id, &entries)?;
        let expected_key = mine.first().map(|c| c.public_key.as_str());
        if let Some(other) = mine
            .iter()
            .find(|c| Some(c.public_key.as_str()) != expected_key)
        {
            return Err(VerifyFailure {
                sequence: other.entry_count,
                problem: format!(
                    "checkpoints of run {run_id} are signed by different keys ({} and {})",
                    expected_key.unwrap_or_default(),
                    other.public_key
                ),
            });
        }
        let signed = check_head_signatures(run_id, &entries, &signatures, expected_key)?;
        check_against_manifest(run_id, &entries, manifest.as_deref())?;
        Ok(RunVerification {
            totals,
            signed,
            checkpoints: mine.len(),
        })
    })())
}

/// The runs `ledger verify` checks: every run in the ledger (or with a `runs` row), and every
/// run a checkpoint names, sorted; or only `only`.
pub fn runs_to_verify(
    store: &Store,
    only: Option<&str>,
    checkpoints: &[Checkpoint],
) -> Result<Vec<String>, StoreError> {
    if let Some(id) = only {
        return Ok(vec![id.to_string()]);
    }
    let mut ids = store.ledger_run_ids()?;
    ids.extend(checkpoints.iter().map(|c| c.run_id.clone()));
    ids.sort();
    ids.dedup();
    Ok(ids)
}
