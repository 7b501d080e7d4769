//! The retry budget: retries may add at most `ratio` of the requests seen in a sliding
//! window, plus `min_per_second`, so a failing upstream never gets a retry storm.
//!
//! Owns: the budget's window of atomic counters. Must not: lock (it is on the request path).

use std::time::Duration;

use super::window::Window;
use crate::config::RetryBudget;

#[derive(Debug)]
pub struct Budget {
    cfg: RetryBudget,
    /// (requests, retries) over the window.
    window: Window,
}

// === impl Budget ===

impl Budget {
    pub fn new(cfg: &RetryBudget) -> Self {
        Budget { cfg: cfg.clone(), window: Window::new(cfg.window) }
    }

    pub fn config(&self) -> &RetryBudget {
        &self.cfg
    }

    pub fn record_request(&self) {
        self.window.add(1, 0);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self) -> bool {
        let (requests, retries) = self.window.sums();
        let window_secs = self.cfg.window.as_secs_f64();
        let allowed = self.cfg.ratio * requests as f64 + f64::from(self.cfg.min_per_second) * window_secs;
        if (retries as f64) < allowed.floor() {
            self.window.add(0, 1);
            true
        } else {
            false
        }
    }
}

/// Full jitter: a random delay up to `base × 2^(retry-1)`, capped at `max`.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let cap = base.saturating_mul(1 << retry.saturating_sub(1).min(20)).min(max);
    cap.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> Budget {
        Budget::new(&RetryBudget { ratio, min_per_second, window: Duration::from_secs(10) })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_by_the_ratio() {
        let b = budget(0.2, 0);
        for _ in 0..100 {
            b.record_request();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_rate_allows_retries_at_low_traffic_and_the_window_slides() {
        let b = budget(0.0, 1);
        assert_eq!((0..50).filter(|_| b.try_retry()).count(), 10, "1/s over a 10 s window");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!((0..50).filter(|_| b.try_retry()).count(), 10, "old retries left the window");
    }

    #[test]
    fn backoff_is_jittered_and_never_exceeds_max() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for retry in 1..30 {
            for _ in 0..50 {
                assert!(backoff(retry, base, max) <= max);
            }
        }
        assert!((0..50).all(|_| backoff(1, base, max) <= base));
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(3, base, max)).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
