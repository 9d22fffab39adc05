//! When to retry: jittered exponential backoff, bounded, honouring the server's pushback.
//!
//! A pure function of the attempt number, the server's `grpc-retry-pushback-ms` (if any)
//! and a uniform draw the caller supplies, so it is tested without a clock or a socket.

use std::time::Duration;

use tonic::Code;

/// The metadata key of gRPC's retry pushback, in milliseconds (the coordinator sets it on
/// `RESOURCE_EXHAUSTED`).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// How often and how patiently a call is retried.
///
/// Only `UNAVAILABLE` (the coordinator is unreachable or restarting) and
/// `RESOURCE_EXHAUSTED` (over the rate or concurrency limit) are retried; every other status
/// is final. Attempt `n` (from 1) that failed waits a uniform draw from
/// `[b/2, b]` with `b = min(initial · multiplier^(n−1), max)` ("equal jitter": never less
/// than half the nominal backoff, so a crowd of devices spreads out without hammering),
/// or, when the server sent a pushback of `p` ms, `p` plus up to 10 % of it (the server's
/// number is a floor, and the jitter keeps devices that were refused together from coming
/// back together). A negative or unreadable pushback means "do not retry", as gRPC's
/// retry design (A6) says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 5.
    pub max_attempts: u32,
    /// The nominal backoff after the first failure. Default 200 ms.
    pub initial_backoff: Duration,
    /// The nominal backoff never exceeds this. Default 10 s.
    pub max_backoff: Duration,
    /// Growth per attempt. Default 2.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

/// Whether a status is worth retrying.
pub fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

/// The server's pushback in a status's metadata: `None` if absent, `Some(None)` if present
/// but negative or unreadable (do not retry), `Some(Some(ms))` otherwise.
pub fn pushback(status: &tonic::Status) -> Option<Option<u64>> {
    let value = status.metadata().get(RETRY_PUSHBACK)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok()),
    )
}

impl RetryPolicy {
    /// How long to wait after failed attempt `attempt` (from 1), or `None` to give up.
    /// `pushback` is [`pushback`]'s answer; `uniform` is a draw from [0, 1).
    pub fn delay(
        &self,
        attempt: u32,
        pushback: Option<Option<u64>>,
        uniform: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let uniform = if uniform.is_finite() {
            uniform.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match pushback {
            Some(None) => None,
            Some(Some(ms)) => Some(Duration::from_millis(ms).mul_f64(1.0 + 0.1 * uniform)),
            None => {
                let growth = self
                    .multiplier
                    .max(1.0)
                    .powi(attempt.saturating_sub(1).min(64) as i32);
                let nominal = (self.initial_backoff.as_secs_f64() * growth)
                    .min(self.max_backoff.as_secs_f64());
                Some(Duration::from_secs_f64(nominal * (0.5 + 0.5 * uniform)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_within_its_jitter_band_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 20,
            ..RetryPolicy::default()
        };
        for (attempt, nominal_ms) in [(1, 200.0), (2, 400.0), (3, 800.0), (10, 10_000.0)] {
            let low = p.delay(attempt, None, 0.0).unwrap().as_secs_f64() * 1000.0;
            let high = p.delay(attempt, None, 0.999_999).unwrap().as_secs_f64() * 1000.0;
            assert!((low - nominal_ms / 2.0).abs() < 1e-6, "{attempt}: {low}");
            assert!((high - nominal_ms).abs() < 1e-2, "{attempt}: {high}");
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy::default();
        assert!(p.delay(4, None, 0.5).is_some());
        assert_eq!(p.delay(5, None, 0.5), None);
    }

    #[test]
    fn the_servers_pushback_replaces_the_backoff_and_a_bad_one_stops_retrying() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Some(1500)), 0.0),
            Some(Duration::from_millis(1500))
        );
        assert!(p.delay(1, Some(Some(1500)), 0.99).unwrap() <= Duration::from_millis(1650));
        assert_eq!(p.delay(1, Some(None), 0.5), None);
    }

    #[test]
    fn pushback_is_read_from_the_status_metadata() {
        let mut s = tonic::Status::resource_exhausted("slow down");
        assert_eq!(pushback(&s), None);
        s.metadata_mut()
            .insert(RETRY_PUSHBACK, "250".parse().unwrap());
        assert_eq!(pushback(&s), Some(Some(250)));
        s.metadata_mut()
            .insert(RETRY_PUSHBACK, "-1".parse().unwrap());
        assert_eq!(pushback(&s), Some(None));
        assert!(retryable(Code::Unavailable) && retryable(Code::ResourceExhausted));
        assert!(!retryable(Code::Unauthenticated) && !retryable(Code::FailedPrecondition));
    }
}
