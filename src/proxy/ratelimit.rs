//! Rate limiting with governor (GCRA): one quota per service, or one per value of a request
//! header (e.g. a tenant id), with the number of tracked keys bounded.
//!
//! Owns: the limiters. Must not: grow without bound — past `max_keys`, idle keys are purged,
//! and if that is not enough new keys share a single overflow quota.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};

use crate::clock::now_ms;
use crate::config::RateLimit;

#[derive(Debug)]
pub(crate) struct Limiter {
    pub(crate) config: RateLimit,
    direct: DefaultDirectRateLimiter,
    /// Keyed by the header's value as received: no allocation per request.
    keyed: Option<DefaultKeyedRateLimiter<HeaderValue>>,
    /// When idle keys were last purged; at most once a second, not on every request.
    purged_ms: AtomicU64,
}

/// How often a full key table may be purged of idle keys.
const PURGE_EVERY_MS: u64 = 1000;

// === impl Limiter ===

impl Limiter {
    pub(crate) fn new(config: &RateLimit) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        Limiter {
            config: config.clone(),
            direct: RateLimiter::direct(quota),
            keyed: config.key_header.as_ref().map(|_| RateLimiter::keyed(quota)),
            purged_ms: AtomicU64::new(0),
        }
    }

    /// Checks a request: by its key header's value when the limit is keyed.
    pub(crate) fn check_headers(&self, headers: &HeaderMap) -> Result<(), Duration> {
        let key = self.config.key_header.as_ref().and_then(|h| headers.get(h));
        self.check(key)
    }

    /// `Err(wait)` when over the quota: how long until a request would be allowed. Without
    /// a key (no such header, or a TCP connection) the empty key's quota applies.
    pub(crate) fn check(&self, key: Option<&HeaderValue>) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let Some(keyed) = &self.keyed else {
            return self.direct.check().map_err(|n| n.wait_time_from(clock.now()));
        };
        if keyed.len() >= self.config.max_keys {
            self.purge(keyed);
            if keyed.len() >= self.config.max_keys {
                // Still full of active keys: new and old alike share the overflow quota.
                return self.direct.check().map_err(|n| n.wait_time_from(clock.now()));
            }
        }
        let empty = HeaderValue::from_static("");
        keyed.check_key(key.unwrap_or(&empty)).map_err(|n| n.wait_time_from(clock.now()))
    }

    fn purge(&self, keyed: &DefaultKeyedRateLimiter<HeaderValue>) {
        let now = now_ms();
        let last = self.purged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PURGE_EVERY_MS
            && self.purged_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }
}

/// Seconds for `Retry-After`: at least 1, rounded up.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
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
        assert!((0..3).all(|_| l.check_headers(&h).is_ok()));
        let wait = l.check_headers(&h).unwrap_err();
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
        assert!(l.check_headers(&tenant("a")).is_ok());
        assert!(l.check_headers(&tenant("a")).is_err());
        assert!(l.check_headers(&tenant("b")).is_ok(), "b has its own quota");
        for i in 0..100 {
            let _ = l.check_headers(&tenant(&format!("t{i}")));
        }
        assert!(l.keyed.as_ref().unwrap().len() <= 2, "key storage stays bounded");
    }
}
