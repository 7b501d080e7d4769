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
use crate::config::{Fallback, Policy, RetryScope};
use crate::routing::Routed;
use crate::telemetry::metrics;
use crate::upstream::budget::backoff;
use crate::upstream::{InFlight, Placement};

/// The attempts of one request (or TCP connection).
#[derive(Debug)]
pub(crate) struct Attempts<'a> {
    up: &'a Upstream,
    /// The subset (and ring key) picks draw from; the fallback's once that applied.
    routed: Routed<'a>,
    /// The route's subset had no routable endpoint and its fallback was used.
    pub(crate) fell_back: bool,
    /// Where the last pick landed (zone preference, panic).
    pub(crate) placement: Placement,
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
    /// At most `max` attempts (1 for an upgrade) to `routed`'s subset, within the service's
    /// request timeout.
    pub(crate) fn new(up: &'a Upstream, max: u32, routed: Routed<'a>) -> Attempts<'a> {
        up.budget.record_request();
        let deadline = Instant::now() + up.config.timeouts.request;
        Attempts {
            up,
            routed,
            fell_back: false,
            placement: Placement::Any,
            max: max.max(1),
            count: 0,
            tried: SmallVec::new(),
            deadline,
        }
    }

    pub(crate) fn routed(&self) -> &Routed<'a> {
        &self.routed
    }

    /// The tags of the subset picks draw from now.
    pub(crate) fn subset_selector(&self) -> Option<&'a crate::config::Selector> {
        self.up.config.routing.subsets.get(self.routed.target.subset)
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
    /// A subset with no routable endpoint gives way to its route's fallback; a retry stays
    /// in the subset unless the route's `retries: service` lets it go anywhere.
    pub(crate) fn pick(&mut self) -> Result<InFlight, ProxyError> {
        self.count += 1;
        if self.count > 1 && self.routed.retries() == RetryScope::Service {
            self.routed.target.subset = 0;
        }
        let balancer = &self.up.balancer;
        let mut picked = balancer.pick_avoiding(self.routed.target, &self.tried);
        if picked.is_none() && self.routed.target.subset != 0 {
            let to = match self.routed.fallback() {
                Fallback::Service => Some(0),
                Fallback::Subset(s) => Some(s),
                Fallback::Fail => None,
            };
            if let Some(to) = to {
                self.routed.target.subset = to;
                self.fell_back = true;
                picked = balancer.pick_avoiding(self.routed.target, &self.tried);
            }
        }
        let Some((endpoint, placement)) = picked else {
            return Err(match self.routed.route {
                Some(route) if self.routed.target.subset != 0 => {
                    ProxyError::NoSubsetEndpoints(self.up.name.clone(), route.name.clone())
                }
                _ => ProxyError::NoEndpoints(self.up.name.clone()),
            });
        };
        self.placement = placement;
        self.tried.push(endpoint.addr());
        Ok(endpoint)
    }

    /// How long this attempt may wait for response headers.
    pub(crate) fn per_try_timeout(&self) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.up.config.resilience.retries.per_try_timeout.min(left)
    }

    /// Feeds an attempt's result (and, under `peak_ewma`, how long it took) to the endpoint's
    /// passive health and latency estimate.
    pub(crate) fn report(&self, endpoint: &InFlight, failed: bool, took: Duration) {
        if self.up.config.load_balancing == Policy::PeakEwma {
            endpoint.state().latency.record(took, failed);
        }
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
