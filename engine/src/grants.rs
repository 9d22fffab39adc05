//! What a task entitles a device to, beyond the round itself: downloading the run's models,
//! and one federated-evaluation report per model version. Pure bookkeeping, no IO.
//!
//! **Downloads.** A device may download a run's models only once it has been given a task
//! in that run ([`TaskGrants::task_given`]); after a restart, having taken part in a
//! committed round of the run (the store's participations) counts too. Any other device
//! learns nothing, not even whether the run exists.
//!
//! **Evaluation tokens.** The first task a device is given for a (run, model version) carries
//! a random, single-use evaluation token, in every privacy mode (a distributed-mode device
//! releases its evaluation with local noise too, so it needs no trust in the aggregation). The coordinator keeps only the token's SHA-256 with
//! the run and version — never the device it went to — so the report redeemed with it
//! ([`TaskGrants::redeem`]) cannot be tied to a device by what is stored, and each device
//! reports at most once per version. Tokens live in memory: after a restart, unredeemed
//! tokens are refused (their evaluation is simply not counted), and a version's tokens are
//! forgotten once the run is [`KEEP_VERSIONS`] versions past it. *Which* devices were issued
//! a version's token is also kept by the coordinator's store, so that a restart (or another
//! replica) never issues a device a second token for the same version
//! ([`TaskGrants::mark_evaluation_issued`]).

use std::collections::{BTreeMap, HashMap, HashSet};

/// Evaluation tokens are kept for this many model versions of a run: issuing one for version
/// V forgets the tokens (and the record of who had one) of versions below V − 8, so memory
/// stays bounded by the devices of the last few versions.
pub const KEEP_VERSIONS: u64 = 8;

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    /// Not issued for this run and model version, already used, expired with its version, or
    /// lost with a restart.
    #[error(
        "evaluation_token: not a token this coordinator issued for this run_id and model_version (or already used, or expired)"
    )]
    Unknown,
}

type Version = (String, u64);

/// Who was given a task in which run, and the outstanding evaluation tokens.
#[derive(Debug, Default)]
pub struct TaskGrants {
    tasked: HashMap<String, HashSet<String>>,
    evaluation_issued: BTreeMap<Version, HashSet<String>>,
    tokens: BTreeMap<Version, HashSet<[u8; 32]>>,
}

impl TaskGrants {
    /// Records that `device` was given a task in `run_id` for `model_version`. When the
    /// device has had no evaluation token for that version, issues one: `new_token` makes the
    /// secret, whose SHA-256 (`hash`) is kept with the run and version only. Returns the
    /// token to send, if any.
    pub fn task_given(
        &mut self,
        run_id: &str,
        device: &str,
        model_version: u64,
        new_token: impl FnOnce() -> String,
        hash: impl Fn(&str) -> [u8; 32],
    ) -> Option<String> {
        self.tasked
            .entry(run_id.to_owned())
            .or_default()
            .insert(device.to_owned());
        let key = (run_id.to_owned(), model_version);
        if !self
            .evaluation_issued
            .entry(key.clone())
            .or_default()
            .insert(device.to_owned())
        {
            return None;
        }
        let token = new_token();
        self.tokens.entry(key).or_default().insert(hash(&token));
        self.forget_before(run_id, model_version.saturating_sub(KEEP_VERSIONS));
        Some(token)
    }

    /// Forgets the tokens of `run_id`'s versions below `version`.
    fn forget_before(&mut self, run_id: &str, version: u64) {
        let expired: Vec<Version> = self
            .tokens
            .range((run_id.to_owned(), 0)..(run_id.to_owned(), version))
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.tokens.remove(&k);
        }
        let stale: Vec<Version> = self
            .evaluation_issued
            .range((run_id.to_owned(), 0)..(run_id.to_owned(), version))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.evaluation_issued.remove(&k);
        }
    }

    /// Whether this process issued `device` the evaluation token of (`run_id`,
    /// `model_version`), or learnt with [`TaskGrants::mark_evaluation_issued`] that it had one.
    pub fn evaluation_issued_to(&self, run_id: &str, device: &str, model_version: u64) -> bool {
        self.evaluation_issued
            .get(&(run_id.to_owned(), model_version))
            .is_some_and(|devices| devices.contains(device))
    }

    /// Records that `device` already had the evaluation token of (`run_id`, `model_version`)
    /// from elsewhere (a process before a restart, another replica): it is given no other.
    pub fn mark_evaluation_issued(&mut self, run_id: &str, device: &str, model_version: u64) {
        self.evaluation_issued
            .entry((run_id.to_owned(), model_version))
            .or_default()
            .insert(device.to_owned());
    }

    /// Whether `device` was given a task in `run_id` since this coordinator started.
    pub fn was_tasked(&self, run_id: &str, device: &str) -> bool {
        self.tasked
            .get(run_id)
            .is_some_and(|devices| devices.contains(device))
    }

    /// Consumes the token with SHA-256 `token_hash` for a report on (`run_id`,
    /// `model_version`). A token of another run or version is refused and not consumed.
    pub fn redeem(
        &mut self,
        token_hash: &[u8; 32],
        run_id: &str,
        model_version: u64,
    ) -> Result<(), RedeemError> {
        let removed = self
            .tokens
            .get_mut(&(run_id.to_owned(), model_version))
            .is_some_and(|bucket| bucket.remove(token_hash));
        if removed {
            Ok(())
        } else {
            Err(RedeemError::Unknown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in s.bytes().enumerate() {
            out[i % 32] ^= b;
        }
        out
    }

    #[test]
    fn one_token_per_device_and_version_redeemable_once_for_its_run_and_version_only() {
        let mut g = TaskGrants::default();
        assert!(!g.was_tasked("r", "d1"));
        let t = g.task_given("r", "d1", 3, || "tok-a".into(), h).unwrap();
        assert!(g.was_tasked("r", "d1"));
        assert!(!g.was_tasked("other", "d1"));
        // A second task on the same version carries no second token.
        assert_eq!(g.task_given("r", "d1", 3, || "tok-b".into(), h), None);
        assert_eq!(g.redeem(&h(&t), "r", 4), Err(RedeemError::Unknown));
        assert_eq!(g.redeem(&h(&t), "other", 3), Err(RedeemError::Unknown));
        assert_eq!(g.redeem(&h(&t), "r", 3), Ok(()));
        assert_eq!(g.redeem(&h(&t), "r", 3), Err(RedeemError::Unknown));
        // Every device gets its own token for the version, whatever the run's mode.
        let t2 = g.task_given("r", "d2", 3, || "tok-c".into(), h).unwrap();
        assert!(g.was_tasked("r", "d2"));
        assert_eq!(g.redeem(&h(&t2), "r", 3), Ok(()));
        assert_eq!(g.redeem(&h(&t2), "r", 3), Err(RedeemError::Unknown));
        // A device already known to have had the version's token gets none.
        g.mark_evaluation_issued("r", "d3", 3);
        assert_eq!(g.task_given("r", "d3", 3, || "tok-d".into(), h), None);
        assert!(g.was_tasked("r", "d3"));
    }

    #[test]
    fn tokens_of_versions_more_than_keep_versions_old_are_forgotten() {
        let mut g = TaskGrants::default();
        let old = g.task_given("r", "d1", 1, || "old".into(), h).unwrap();
        let other_run = g.task_given("s", "d1", 1, || "other".into(), h).unwrap();
        g.task_given("r", "d2", 1 + KEEP_VERSIONS, || "x".into(), h)
            .unwrap();
        // Version 1 is still within reach of version 1 + KEEP_VERSIONS …
        assert_eq!(g.redeem(&h(&old), "r", 1), Ok(()));
        let old = g.task_given("r", "d3", 1, || "old-2".into(), h).unwrap();
        g.task_given("r", "d2", 2 + KEEP_VERSIONS, || "y".into(), h)
            .unwrap();
        // … but not of 2 + KEEP_VERSIONS; another run's tokens stay.
        assert_eq!(g.redeem(&h(&old), "r", 1), Err(RedeemError::Unknown));
        assert_eq!(g.redeem(&h(&other_run), "s", 1), Ok(()));
    }
}
