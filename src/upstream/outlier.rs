//! Passive health: per-endpoint ejection after consecutive failures, return through a single
//! probe request, and the ejection-time schedule.
//!
//! Owns: the ejection state of an [`EndpointState`] (atomics, no locks) and the rules for
//! moving between states. Must not: rebuild snapshots itself — it tells the balancer.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{instant_at, now_ms};
use crate::config::Outlier;

/// Where an endpoint stands. Only `Active` and `Probing` are routable (outside panic mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ejection {
    Active = 0,
    Ejected = 1,
    /// Ejection time is over: the next request to it is the probe.
    Probing = 2,
    /// The probe is in flight: no other request goes there until it answers.
    ProbeInFlight = 3,
}

/// Failure counters and ejection state of one endpoint.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    ejection: AtomicU8,
    times_ejected: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// The active health checker's verdict (healthy until a checker says otherwise).
    unhealthy: AtomicBool,
}

/// What a reported result changed, for the balancer to act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Ejected until the given time: rebuild now, and again when it is over.
    Ejected(Duration),
    /// Back in rotation: rebuild.
    Returned,
}

// === impl Health ===

impl Health {
    pub fn ejection(&self) -> Ejection {
        match self.ejection.load(Ordering::Acquire) {
            1 => Ejection::Ejected,
            2 => Ejection::Probing,
            3 => Ejection::ProbeInFlight,
            _ => Ejection::Active,
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// Sets the active-check verdict; true when it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.unhealthy.swap(!healthy, Ordering::Relaxed) == healthy
    }

    /// Whether a request may go here now; claims the probe slot of a `Probing` endpoint.
    pub fn admit(&self) -> bool {
        match self.ejection() {
            Ejection::Active => true,
            Ejection::Probing => {
                self.ejection.compare_exchange(2, 3, Ordering::AcqRel, Ordering::Acquire).is_ok()
            }
            Ejection::Ejected | Ejection::ProbeInFlight => false,
        }
    }

    /// Records one result. `may_eject` is asked only when this failure would eject.
    pub fn report(&self, failed: bool, cfg: &Outlier, may_eject: impl FnOnce() -> bool) -> Change {
        if !failed {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            let probe_passed =
                self.ejection.compare_exchange(3, 0, Ordering::AcqRel, Ordering::Acquire).is_ok();
            return if probe_passed { Change::Returned } else { Change::None };
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        match self.ejection() {
            Ejection::ProbeInFlight => self.eject(cfg),
            Ejection::Active
                if cfg.consecutive_failures > 0 && n >= cfg.consecutive_failures && may_eject() =>
            {
                self.eject(cfg)
            }
            _ => Change::None,
        }
    }

    fn eject(&self, cfg: &Outlier) -> Change {
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = cfg.base_ejection.saturating_mul(times).min(cfg.max_ejection);
        self.ejected_until_ms.store(now_ms() + duration.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejection.store(Ejection::Ejected as u8, Ordering::Release);
        Change::Ejected(duration)
    }

    /// Moves an ejected endpoint whose time is over to `Probing`; true when it did.
    pub fn ejection_over(&self) -> bool {
        self.ejection() == Ejection::Ejected
            && now_ms() >= self.ejected_until_ms.load(Ordering::Relaxed)
            && self.ejection.compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    /// When the current ejection ends, while the endpoint is ejected.
    pub fn ejected_until(&self) -> Option<tokio::time::Instant> {
        (self.ejection() == Ejection::Ejected)
            .then(|| instant_at(self.ejected_until_ms.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            count_5xx: true,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(75),
            max_ejection_percent: 100,
            panic_threshold_percent: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_n_failures_then_returns_through_one_probe() {
        let (h, c) = (Health::default(), cfg());
        assert_eq!(h.report(true, &c, || true), Change::None);
        assert_eq!(h.report(false, &c, || true), Change::None, "a success resets the count");
        h.report(true, &c, || true);
        h.report(true, &c, || true);
        assert_eq!(h.report(true, &c, || true), Change::Ejected(Duration::from_secs(30)));
        assert!(!h.admit());
        assert!(!h.ejection_over());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(h.ejection_over());
        assert!(h.admit(), "the probe is admitted");
        assert!(!h.admit(), "only one probe at a time");
        assert_eq!(h.report(false, &c, || true), Change::Returned);
        assert!(h.admit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_for_longer_up_to_the_cap() {
        let (h, c) = (Health::default(), cfg());
        for _ in 0..3 {
            h.report(true, &c, || true);
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(300)).await;
            assert!(h.ejection_over());
            assert!(h.admit());
            let Change::Ejected(d) = h.report(true, &c, || true) else { panic!("probe failure must eject") };
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![60, 75, 75]);
    }

    #[test]
    fn max_ejection_veto_keeps_the_endpoint() {
        let (h, c) = (Health::default(), cfg());
        for _ in 0..5 {
            assert_eq!(h.report(true, &c, || false), Change::None);
        }
        assert!(h.admit());
    }
}
