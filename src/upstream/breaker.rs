//! The per-service circuit breaker and concurrency limit.
//!
//! Closed → Open when the failure ratio over a rolling window reaches the threshold (with a
//! minimum number of requests); Open fails fast until `open_for` passes; HalfOpen admits
//! `half_open_requests` probes: all succeeding closes it, any failure opens it again
//! (gobreaker's semantics). Independently, at most `max_in_flight` requests run at once.
//! Nothing queues: a request that cannot run is refused at once.
//! Owns: that state, in atomics (a window of buckets like the retry budget's). Must not:
//! lock — every request admits and records.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use super::window::Window;
use crate::clock::now_ms;
use crate::config::Breaker as Config;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// All state in atomics: requests admit and record without a lock.
#[derive(Debug)]
pub struct Breaker {
    cfg: Config,
    in_flight: AtomicU32,
    phase: AtomicU8,
    open_until_ms: AtomicU64,
    /// Counts openings, so a half-open probe slot is given back only in its own round.
    round: AtomicU32,
    probes_admitted: AtomicU32,
    probes_succeeded: AtomicU32,
    /// (requests, failures) while closed.
    window: Window,
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
    /// The half-open round whose probe slot this request holds.
    probe: Option<u32>,
}

// === impl Breaker ===

impl Breaker {
    pub fn new(cfg: &Config) -> Arc<Self> {
        Arc::new(Breaker {
            cfg: cfg.clone(),
            in_flight: AtomicU32::new(0),
            phase: AtomicU8::new(CLOSED),
            open_until_ms: AtomicU64::new(0),
            round: AtomicU32::new(0),
            probes_admitted: AtomicU32::new(0),
            probes_succeeded: AtomicU32::new(0),
            window: Window::new(cfg.window),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refused> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Overloaded);
        }
        let mut admission = Admission { breaker: self.clone(), recorded: false, probe: None };
        if self.cfg.failure_ratio <= 0.0 {
            return Ok(admission);
        }
        if self.phase.load(Ordering::Acquire) == OPEN {
            if now_ms() < self.open_until_ms.load(Ordering::Acquire) {
                return Err(Refused::Open);
            }
            if self.phase.compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                tracing::info!("circuit half-open: letting probe requests through");
            }
        }
        if self.phase.load(Ordering::Acquire) == HALF_OPEN {
            let round = self.round.load(Ordering::Acquire);
            if self.probes_admitted.fetch_add(1, Ordering::AcqRel) >= self.cfg.half_open_requests.get() {
                self.probes_admitted.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Open);
            }
            admission.probe = Some(round);
        }
        Ok(admission)
    }

    fn record(&self, success: bool) {
        if self.cfg.failure_ratio <= 0.0 {
            return;
        }
        match self.phase.load(Ordering::Acquire) {
            HALF_OPEN if !success => self.open(HALF_OPEN),
            HALF_OPEN => {
                let ok = self.probes_succeeded.fetch_add(1, Ordering::AcqRel) + 1;
                if ok >= self.cfg.half_open_requests.get()
                    && self
                        .phase
                        .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.window.clear();
                    tracing::info!("circuit closed: probes succeeded");
                }
            }
            CLOSED => {
                self.window.add(1, u32::from(!success));
                let (requests, failures) = self.window.sums();
                if requests >= u64::from(self.cfg.min_requests.max(1))
                    && failures as f64 >= self.cfg.failure_ratio * requests as f64
                {
                    self.open(CLOSED);
                }
            }
            _ => {}
        }
    }

    /// Opens the circuit from `from`; only the request that wins the change logs it.
    fn open(&self, from: u8) {
        self.open_until_ms.store(now_ms() + self.cfg.open_for.as_millis() as u64, Ordering::Release);
        self.probes_admitted.store(0, Ordering::Release);
        self.probes_succeeded.store(0, Ordering::Release);
        self.round.fetch_add(1, Ordering::AcqRel);
        if self.phase.compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.window.clear();
            tracing::warn!(open_for = ?self.cfg.open_for, "circuit opened: failing fast");
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.phase.load(Ordering::Relaxed) {
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "closed",
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
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
        let b = &self.breaker;
        b.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A request dropped without an outcome (the client went away, or the fault was the
        // client's) counts as nothing: a probe slot it held in this round is given back.
        if !self.recorded
            && let Some(round) = self.probe
            && b.round.load(Ordering::Acquire) == round
        {
            b.probes_admitted.fetch_sub(1, Ordering::AcqRel);
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
