//! The per-service circuit breaker and concurrency limit.
//!
//! Closed → Open when the failure ratio over a rolling window reaches the threshold (with a
//! minimum number of requests); Open fails fast until `open_for` passes; HalfOpen admits
//! `half_open_requests` probes: all succeeding closes it, any failure opens it again
//! (gobreaker's semantics). Independently, at most `max_in_flight` requests run at once.
//! Nothing queues: a request that cannot run is refused at once.
//! Owns: that state. Must not: hold its lock across an await.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::config::Breaker as Config;

#[derive(Debug)]
pub struct Breaker {
    cfg: Config,
    in_flight: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// (bucket start, requests, failures), oldest first.
    window: Vec<(Instant, u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Open,
    Overloaded,
}

/// A request's place in the limit; report its outcome with [`Admission::record`].
#[derive(Debug)]
pub struct Admission {
    breaker: Arc<Breaker>,
    recorded: bool,
}

// === impl Breaker ===

impl Breaker {
    pub fn new(cfg: &Config) -> Arc<Self> {
        let state = State { phase: Phase::Closed, window: Vec::new() };
        Arc::new(Breaker { cfg: cfg.clone(), in_flight: AtomicU32::new(0), state: Mutex::new(state) })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refused> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Overloaded);
        }
        let admission = Admission { breaker: self.clone(), recorded: false };
        if self.cfg.failure_ratio <= 0.0 {
            return Ok(admission);
        }
        let mut s = self.lock();
        let now = Instant::now();
        if let Phase::Open { until } = s.phase {
            if now < until {
                return Err(Refused::Open);
            }
            s.phase = Phase::HalfOpen { admitted: 0, succeeded: 0 };
            tracing::info!("circuit half-open: letting probe requests through");
        }
        if let Phase::HalfOpen { admitted, .. } = &mut s.phase {
            if *admitted >= self.cfg.half_open_requests.get() {
                return Err(Refused::Open);
            }
            *admitted += 1;
        }
        Ok(admission)
    }

    fn record(&self, success: bool) {
        if self.cfg.failure_ratio <= 0.0 {
            return;
        }
        let mut s = self.lock();
        let now = Instant::now();
        match s.phase {
            Phase::Open { .. } => {}
            Phase::HalfOpen { admitted, succeeded } => {
                if !success {
                    self.open(&mut s, now);
                } else if succeeded + 1 >= self.cfg.half_open_requests.get() {
                    tracing::info!("circuit closed: probes succeeded");
                    s.phase = Phase::Closed;
                    s.window.clear();
                } else {
                    s.phase = Phase::HalfOpen { admitted, succeeded: succeeded + 1 };
                }
            }
            Phase::Closed => {
                self.count(&mut s, now, success);
                let (requests, failures) = s.window.iter().fold((0, 0), |(r, f), b| (r + b.1, f + b.2));
                if requests >= self.cfg.min_requests.max(1)
                    && f64::from(failures) >= self.cfg.failure_ratio * f64::from(requests)
                {
                    self.open(&mut s, now);
                }
            }
        }
    }

    fn count(&self, s: &mut State, now: Instant, success: bool) {
        let bucket = self.cfg.window / 10;
        s.window.retain(|b| now.saturating_duration_since(b.0) < self.cfg.window);
        match s.window.last_mut() {
            Some(b) if now.saturating_duration_since(b.0) < bucket => {
                b.1 += 1;
                b.2 += u32::from(!success);
            }
            _ => s.window.push((now, 1, u32::from(!success))),
        }
    }

    fn open(&self, s: &mut State, now: Instant) {
        tracing::warn!(open_for = ?self.cfg.open_for, "circuit opened: failing fast");
        s.phase = Phase::Open { until: now + self.cfg.open_for };
        s.window.clear();
    }

    pub fn state_name(&self) -> &'static str {
        match self.lock().phase {
            Phase::Closed => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half_open",
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Admission ===

impl Admission {
    /// Reports the request's outcome (once); the slot is held until the admission drops.
    pub fn record(&mut self, success: bool) {
        if !std::mem::replace(&mut self.recorded, true) {
            self.breaker.record(success);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.breaker.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A request dropped without an outcome (client went away) counts as nothing: a
        // half-open probe slot it held is given back by recording a success.
        if !self.recorded {
            let mut s = self.breaker.lock();
            if let Phase::HalfOpen { admitted, succeeded } = s.phase
                && admitted > succeeded
            {
                s.phase = Phase::HalfOpen { admitted: admitted - 1, succeeded };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;

    fn cfg() -> Config {
        Config {
            failure_ratio: 0.5,
            min_requests: 4,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_requests: NonZeroU32::new(2).unwrap(),
            max_in_flight: 100,
        }
    }

    fn run(b: &Arc<Breaker>, success: bool) -> Result<(), Refused> {
        b.admit().map(|mut a| a.record(success))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_half_opens_and_closes() {
        let b = Breaker::new(&cfg());
        run(&b, true).unwrap();
        run(&b, false).unwrap();
        run(&b, true).unwrap();
        assert_eq!(b.state_name(), "closed");
        run(&b, false).unwrap(); // 2 of 4 failed: ratio 0.5 reached
        assert_eq!(b.state_name(), "open");
        assert_eq!(run(&b, true), Err(Refused::Open));
        tokio::time::advance(Duration::from_secs(5)).await;
        let (mut p1, mut p2) = (b.admit().unwrap(), b.admit().unwrap());
        assert_eq!(b.state_name(), "half_open");
        assert_eq!(b.admit().err(), Some(Refused::Open), "only two probes");
        p1.record(true);
        p2.record(true);
        assert_eq!(b.state_name(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again_and_old_failures_leave_the_window() {
        let b = Breaker::new(&cfg());
        for _ in 0..4 {
            run(&b, false).unwrap();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        run(&b, false).unwrap();
        assert_eq!(b.state_name(), "open");

        let b = Breaker::new(&cfg());
        run(&b, false).unwrap();
        run(&b, false).unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        run(&b, true).unwrap();
        run(&b, true).unwrap();
        assert_eq!(b.state_name(), "closed", "failures older than the window do not count");
    }

    #[tokio::test]
    async fn concurrency_limit_refuses_instead_of_queueing() {
        let b = Breaker::new(&Config { max_in_flight: 2, ..cfg() });
        let held = (b.admit().unwrap(), b.admit().unwrap());
        assert_eq!(b.admit().err(), Some(Refused::Overloaded));
        drop(held);
        assert!(b.admit().is_ok());
    }
}
