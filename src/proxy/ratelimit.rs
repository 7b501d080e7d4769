//! Rate limiting with governor (GCRA): one quota per service, or one per value of a request
//! header (e.g. a tenant id), with the number of tracked keys bounded.
//!
//! Owns: the limiters. Must not: grow without bound — past `max_keys`, idle keys are purged,
//! and if that is not enough new keys share a single overflow quota.

use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;

use crate::config::RateLimit;

#[derive(Debug)]
pub struct Limiter {
    pub config: RateLimit,
    direct: DefaultDirectRateLimiter,
    keyed: Option<DefaultKeyedRateLimiter<String>>,
}

// === impl Limiter ===

impl Limiter {
    pub fn new(config: &RateLimit) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        Limiter {
            config: config.clone(),
            direct: RateLimiter::direct(quota),
            keyed: config.key_header.as_ref().map(|_| RateLimiter::keyed(quota)),
        }
    }

    /// `Err(wait)` when over the quota: how long until a request would be allowed.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let (Some(keyed), Some(header)) = (&self.keyed, &self.config.key_header) else {
            return self.direct.check().map_err(|n| n.wait_time_from(clock.now()));
        };
        if keyed.len() >= self.config.max_keys {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
        if keyed.len() >= self.config.max_keys {
            // Still full of active keys: new and old alike share the overflow quota.
            return self.direct.check().map_err(|n| n.wait_time_from(clock.now()));
        }
        let key = headers.get(header).and_then(|v| v.to_str().ok()).unwrap_or("");
        keyed.check_key(&key.to_string()).map_err(|n| n.wait_time_from(clock.now()))
    }
}

/// Seconds for `Retry-After`: at least 1, rounded up.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn limit(per_second: u32, burst: u32, key: Option<&str>) -> RateLimit {
        RateLimit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            key_header: key.map(Into::into),
            max_keys: 2,
        }
    }

    #[test]
    fn burst_then_refused_with_a_wait() {
        let l = Limiter::new(&limit(1, 3, None));
        let h = HeaderMap::new();
        assert!((0..3).all(|_| l.check(&h).is_ok()));
        let wait = l.check(&h).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
    }

    #[test]
    fn keys_have_independent_quotas_and_storage_is_bounded() {
        let l = Limiter::new(&limit(1, 1, Some("x-tenant")));
        let tenant = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", t.parse().unwrap());
            h
        };
        assert!(l.check(&tenant("a")).is_ok());
        assert!(l.check(&tenant("a")).is_err());
        assert!(l.check(&tenant("b")).is_ok(), "b has its own quota");
        for i in 0..100 {
            let _ = l.check(&tenant(&format!("t{i}")));
        }
        assert!(l.keyed.as_ref().unwrap().len() <= 2, "key storage stays bounded");
    }
}
