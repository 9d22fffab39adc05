//! What a task entitles a device to, beyond the round itself: downloading the run's models,
//! and one federated-evaluation report per model version. Pure bookkeeping, no IO.
//!
//! **Downloads.** A device may download a run's models only once it has been given a task
//! in that run ([`TaskGrants::task_given`]); after a restart, having taken part in a
//! committed round of the run (the store's participations) counts too. Any other device
//! learns nothing, not even whether the run exists.
//!
//! **Evaluation tokens.** The first task a device is given for a (run, model version) carries
//! a random, single-use evaluation token. The coordinator keeps only the token's SHA-256 with
//! the run and version — never the device it went to — so the report redeemed with it
//! ([`TaskGrants::redeem`]) cannot be tied to a device by what is stored, and each device
//! reports at most once per version. Tokens live in memory: after a restart, unredeemed
//! tokens are refused (their evaluation is simply not counted).

use std::collections::{HashMap, HashSet};

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    /// Not issued by this coordinator, already used, or lost with a restart.
    #[error("evaluation_token: not a token this coordinator issued, or already used")]
    Unknown,
    /// Issued for another run or model version.
    #[error(
        "evaluation_token: issued for run {run:?} model version {version}, not for this report's run_id and model_version"
    )]
    Mismatch {
        /// The token's run.
        run: String,
        /// The token's model version.
        version: u64,
    },
}

/// Who was given a task in which run, and the outstanding evaluation tokens.
#[derive(Debug, Default)]
pub struct TaskGrants {
    tasked: HashMap<String, HashSet<String>>,
    evaluation_issued: HashSet<(String, u64, String)>,
    tokens: HashMap<[u8; 32], (String, u64)>,
}

impl TaskGrants {
    /// Records that `device` was given a task in `run_id` for `model_version`. When
    /// `evaluation` is true and the device has had no evaluation token for that version,
    /// issues one: `new_token` makes the secret, whose SHA-256 (`hash`) is kept with the run
    /// and version only. Returns the token to send, if any.
    pub fn task_given(
        &mut self,
        run_id: &str,
        device: &str,
        model_version: u64,
        evaluation: bool,
        new_token: impl FnOnce() -> String,
        hash: impl Fn(&str) -> [u8; 32],
    ) -> Option<String> {
        self.tasked
            .entry(run_id.to_owned())
            .or_default()
            .insert(device.to_owned());
        if !evaluation
            || !self
                .evaluation_issued
                .insert((run_id.to_owned(), model_version, device.to_owned()))
        {
            return None;
        }
        let token = new_token();
        self.tokens
            .insert(hash(&token), (run_id.to_owned(), model_version));
        Some(token)
    }

    /// Whether `device` was given a task in `run_id` since this coordinator started.
    pub fn was_tasked(&self, run_id: &str, device: &str) -> bool {
        self.tasked
            .get(run_id)
            .is_some_and(|devices| devices.contains(device))
    }

    /// Consumes the token with SHA-256 `token_hash` for a report on (`run_id`,
    /// `model_version`). A mismatched token is not consumed.
    pub fn redeem(
        &mut self,
        token_hash: &[u8; 32],
        run_id: &str,
        model_version: u64,
    ) -> Result<(), RedeemError> {
        let (run, version) = self.tokens.get(token_hash).ok_or(RedeemError::Unknown)?;
        if run != run_id || *version != model_version {
            return Err(RedeemError::Mismatch {
                run: run.clone(),
                version: *version,
            });
        }
        self.tokens.remove(token_hash);
        Ok(())
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
        let t = g
            .task_given("r", "d1", 3, true, || "tok-a".into(), h)
            .unwrap();
        assert!(g.was_tasked("r", "d1"));
        assert!(!g.was_tasked("other", "d1"));
        // A second task on the same version carries no second token.
        assert_eq!(g.task_given("r", "d1", 3, true, || "tok-b".into(), h), None);
        assert_eq!(
            g.redeem(&h(&t), "r", 4),
            Err(RedeemError::Mismatch {
                run: "r".into(),
                version: 3
            })
        );
        assert_eq!(g.redeem(&h(&t), "r", 3), Ok(()));
        assert_eq!(g.redeem(&h(&t), "r", 3), Err(RedeemError::Unknown));
        // Without evaluation (distributed mode) no token is issued.
        assert_eq!(
            g.task_given("r", "d2", 3, false, || "tok-c".into(), h),
            None
        );
        assert!(g.was_tasked("r", "d2"));
    }
}
