//! Load limits: a token bucket per device and one concurrency limit over both services.
//! Both refuse at once with `RESOURCE_EXHAUSTED`, a message saying when to retry and the
//! standard `grpc-retry-pushback-ms` trailer; nothing waits in a queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The metadata key of gRPC's retry pushback (milliseconds).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// `RESOURCE_EXHAUSTED` with a retry hint.
pub fn exhausted(what: &str, retry_after_ms: u64) -> Status {
    let retry_after_ms = retry_after_ms.max(1);
    let mut status = Status::resource_exhausted(format!("{what}; retry after {retry_after_ms} ms"));
    if let Ok(v) = retry_after_ms.to_string().parse() {
        status.metadata_mut().insert(RETRY_PUSHBACK, v);
    }
    status
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-device token buckets.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `device`, or refuses with `RESOURCE_EXHAUSTED`.
    pub fn check(&self, device: &str) -> Result<(), Status> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Status::internal("rate limiter unavailable"))?;
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(device) {
            let (rate, burst) = (self.rate, self.burst);
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(device.to_string()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * self.rate)
            .min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - bucket.tokens) / self.rate * 1000.0).ceil() as u64;
            Err(exhausted("this device is over its request rate", wait_ms))
        }
    }
}

/// The limit on requests in progress over both services.
pub struct Concurrency {
    semaphore: Arc<Semaphore>,
}

impl Concurrency {
    /// At most `limit` requests at once.
    pub fn new(limit: u32) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit as usize)),
        }
    }

    /// A permit, held for as long as the request (or its response stream) lives, or
    /// `RESOURCE_EXHAUSTED` at once.
    pub fn acquire(&self) -> Result<OwnedSemaphorePermit, Status> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .map_err(|_| exhausted("the coordinator is at its concurrency limit", 1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_over_its_burst_is_refused_with_a_retry_hint() {
        let limiter = RateLimiter::new(1.0, 2);
        assert!(limiter.check("d").is_ok());
        assert!(limiter.check("d").is_ok());
        let s = limiter.check("d").unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("retry after"), "{}", s.message());
        assert!(s.metadata().get(RETRY_PUSHBACK).is_some());
        assert!(limiter.check("other").is_ok());
    }

    #[test]
    fn the_concurrency_limit_refuses_instead_of_queueing() {
        let c = Concurrency::new(1);
        let held = c.acquire().unwrap();
        assert_eq!(
            c.acquire().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(held);
        assert!(c.acquire().is_ok());
    }
}
