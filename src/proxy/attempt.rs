//! The attempt loop's bookkeeping, shared by HTTP requests, upgrades and TCP connects: pick
//! an endpoint (another one on each retry), report each attempt's outcome to the endpoint's
//! passive health, and decide whether to try again.
//!
//! A retry needs all of: attempts left; a listed retry condition; a request that is safe to
//! send again — it provably never reached the upstream, or its method is idempotent / it
//! carries an `Idempotency-Key` (or the service opted into `non_idempotent`); a body that can
//! be sent again; time left before the request deadline; and, last, a token from the retry
//! budget, spent only when everything else allows the retry.
//! Must not: do I/O (the callers send; this decides).

use std::net::SocketAddr;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use super::Upstream;
use super::error::ProxyError;
use super::retry::Retry;
use crate::telemetry::metrics;
use crate::upstream::InFlight;
use crate::upstream::budget::backoff;

/// The attempts of one request (or TCP connection).
#[derive(Debug)]
pub(crate) struct Attempts<'a> {
    up: &'a Upstream,
    max: u32,
    count: u32,
    /// Endpoints already tried (inline: no allocation for the usual one or two).
    tried: SmallVec<[SocketAddr; 4]>,
    deadline: Instant,
}

/// What to do after an attempt that did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Try again, on another endpoint if there is one, after this pause.
    Retry(Duration),
    /// This outcome is the answer.
    Final,
}

// === impl Attempts ===

impl<'a> Attempts<'a> {
    /// At most `max` attempts (1 for an upgrade), within the service's request timeout.
    pub(crate) fn new(up: &'a Upstream, max: u32) -> Attempts<'a> {
        up.budget.record_request();
        let deadline = Instant::now() + up.config.timeouts.request;
        Attempts { up, max: max.max(1), count: 0, tried: SmallVec::new(), deadline }
    }

    /// Attempts made so far.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Whether a retry could still follow this attempt (after the request may have left).
    pub(crate) fn more_after(&self) -> bool {
        self.count < self.max
    }

    /// The endpoint for the next attempt, preferring one not tried yet; counts the attempt.
    pub(crate) fn pick(&mut self) -> Result<InFlight, ProxyError> {
        self.count += 1;
        let endpoint = self.up.balancer.pick_avoiding(&self.tried);
        let endpoint = endpoint.ok_or_else(|| ProxyError::NoEndpoints(self.up.name.clone()))?;
        self.tried.push(endpoint.addr());
        Ok(endpoint)
    }

    /// How long this attempt may wait for response headers.
    pub(crate) fn per_try_timeout(&self) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.up.config.resilience.retries.per_try_timeout.min(left)
    }

    /// Feeds an attempt's result to the endpoint's passive health.
    pub(crate) fn report(&self, endpoint: &InFlight, failed: bool) {
        self.up.balancer.report(endpoint.state(), failed);
    }

    /// Whether to try again after an attempt whose outcome meets `retry`. `safe`: the
    /// request may be repeated after it reached the upstream; `replayable`: its body can be
    /// sent again; `retry_after`: the upstream's `Retry-After`, honoured when longer.
    pub(crate) fn verdict(
        &mut self,
        retry: Retry,
        safe: bool,
        replayable: bool,
        retry_after: Option<Duration>,
    ) -> Verdict {
        let allowed = match retry {
            Retry::No => false,
            Retry::Unsent => true,
            Retry::MaybeSent => safe,
        };
        if !allowed || !replayable || self.count >= self.max {
            return Verdict::Final;
        }
        let policy = &self.up.config.resilience.retries;
        let delay = backoff(self.count, policy.backoff_base, policy.backoff_max);
        let delay = delay.max(retry_after.unwrap_or_default());
        if Instant::now() + delay >= self.deadline {
            return Verdict::Final;
        }
        if !self.up.budget.try_retry() {
            metrics::inc(&self.up.metrics.budget_exhausted);
            tracing::warn!(service = %self.up.name, "retry budget exhausted: not retrying");
            return Verdict::Final;
        }
        metrics::inc(&self.up.metrics.retries);
        Verdict::Retry(delay)
    }
}
