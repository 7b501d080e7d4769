//! Peak-EWMA latency estimate of one endpoint (Linkerd's, as in tower's `PeakEwma`), in
//! atomics so requests update it without a lock.
//!
//! A slower sample than the estimate replaces it at once (peak sensitivity); a faster one
//! moves it by `1 − e^(−Δt/τ)` (τ = 10 s), so the estimate falls back over seconds. Read
//! without samples, the estimate decays toward zero the same way, so an endpoint that stopped
//! being picked is tried again. A failed attempt never counts as fast: it is a sample of
//! ten times the current estimate (at least the 30 ms default, at most 10 s), so an endpoint
//! answering 503 in 1 ms loses traffic, and one that keeps failing is avoided for longer.
//!
//! Must not: lock or allocate. Concurrent updates may overwrite each other (last one wins):
//! an estimate, not a ledger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock;

/// Linkerd's decay time constant.
const DECAY_MS: f64 = 10_000.0;
/// The estimate of an endpoint without samples (Linkerd's default RTT).
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Bounds of a failed attempt's sample.
const FAILURE_FLOOR: Duration = DEFAULT_RTT;
const FAILURE_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub(crate) struct Ewma {
    /// The estimate in nanoseconds, as `f64` bits; 0: no sample yet.
    rtt_ns: AtomicU64,
    /// When it was last updated (`clock::now_ms`).
    stamp_ms: AtomicU64,
}

impl Ewma {
    /// Folds in one attempt that took `rtt` (to response headers, or to a failure).
    pub(crate) fn record(&self, rtt: Duration, failed: bool) {
        let now = clock::now_ms();
        let bits = self.rtt_ns.load(Ordering::Relaxed);
        let stored = f64::from_bits(bits);
        let mut sample = rtt.as_nanos() as f64;
        if failed {
            let base = if bits == 0 { 0.0 } else { stored * 10.0 };
            sample = sample.max(base.clamp(FAILURE_FLOOR.as_nanos() as f64, FAILURE_CAP.as_nanos() as f64));
        }
        let next = if bits == 0 || sample > stored {
            sample
        } else {
            let w = decay(now.saturating_sub(self.stamp_ms.load(Ordering::Relaxed)));
            stored * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.stamp_ms.store(now, Ordering::Relaxed);
    }

    /// The estimate now, in nanoseconds: the last one decayed by the time since it was made.
    #[cfg(test)]
    pub(crate) fn estimate(&self) -> f64 {
        self.estimate_at(clock::now_ms())
    }

    /// The estimate at `now` (`clock::now_ms`), so a pick reads the clock once.
    pub(crate) fn estimate_at(&self, now: u64) -> f64 {
        let bits = self.rtt_ns.load(Ordering::Relaxed);
        if bits == 0 {
            return DEFAULT_RTT.as_nanos() as f64;
        }
        f64::from_bits(bits) * decay(now.saturating_sub(self.stamp_ms.load(Ordering::Relaxed)))
    }
}

/// `e^(−Δt/τ)`.
fn decay(elapsed_ms: u64) -> f64 {
    (-(elapsed_ms as f64) / DECAY_MS).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1_000_000.0;

    #[tokio::test(start_paused = true)]
    async fn peaks_at_once_and_falls_back_over_the_decay_time() {
        let e = Ewma::default();
        assert_eq!(e.estimate(), 30.0 * MS, "no samples: the default RTT");
        e.record(Duration::from_millis(5), false);
        assert_eq!(e.estimate(), 5.0 * MS, "the first sample is the estimate");
        tokio::time::advance(Duration::from_millis(100)).await;
        e.record(Duration::from_millis(1), false);
        let moved = e.estimate() / MS;
        assert!(moved > 4.9 && moved < 5.0, "a faster sample moves it by 1 - e^(-0.1 s / 10 s): {moved}");
        e.record(Duration::from_millis(200), false);
        assert_eq!(e.estimate(), 200.0 * MS, "a slow sample is taken at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        let decayed = e.estimate();
        assert!((decayed / MS - 200.0 / std::f64::consts::E).abs() < 1.0, "one time constant: {decayed}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_failure_never_looks_fast_and_repeated_ones_escalate() {
        let (ok, failing) = (Ewma::default(), Ewma::default());
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(50)).await;
            ok.record(Duration::from_millis(5), false);
            failing.record(Duration::from_millis(1), true);
        }
        assert!(failing.estimate() > 100.0 * ok.estimate(), "{} vs {}", failing.estimate(), ok.estimate());
        assert!(failing.estimate() <= FAILURE_CAP.as_nanos() as f64);
    }
}
