//! Typed settings for the resilience features of a service: retries, outlier ejection,
//! circuit breaking, active health checks and rate limiting. Defaults live in
//! `validate::defaults`; `config/reference.yaml` documents each with its reason.

use std::num::NonZeroU32;
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

use super::human;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resilience {
    pub retries: Retries,
    pub outlier: Outlier,
    pub breaker: Breaker,
    pub health_check: Option<ActiveHealth>,
    pub rate_limit: Option<RateLimit>,
}

/// What a failed attempt was, for `retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The TCP connect failed: the request never left.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process it.
    RefusedStream,
    /// The connection broke before a response arrived.
    Reset,
    /// No response within the per-try timeout.
    Timeout,
    /// `grpc-status: 14` in the response headers (a trailers-only gRPC error).
    GrpcUnavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retries {
    /// Attempts in total, the first included (1 = no retries).
    pub max_attempts: u32,
    pub retry_on: Vec<RetryOn>,
    /// Response statuses that are retried (e.g. 502, 503, 504).
    #[serde(serialize_with = "statuses")]
    pub retry_statuses: Vec<StatusCode>,
    /// Retry POST/PATCH (without `Idempotency-Key`) even after bytes may have reached the
    /// upstream. Off by default: that is how payments get made twice.
    pub non_idempotent: bool,
    #[serde(with = "human")]
    pub per_try_timeout: Duration,
    #[serde(with = "human")]
    pub backoff_base: Duration,
    #[serde(with = "human")]
    pub backoff_max: Duration,
    /// Request bodies up to this size are kept for replay; larger ones stream unkept.
    pub buffer_bytes: usize,
    pub budget: RetryBudget,
}

/// Retries may add at most `ratio` of the requests seen in `window`, plus `min_per_second`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    #[serde(with = "human")]
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outlier {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// Whether any 5xx counts as a failure (otherwise only 502/503/504 and transport errors).
    pub count_5xx: bool,
    #[serde(with = "human")]
    pub base_ejection: Duration,
    #[serde(with = "human")]
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Below this percentage of routable endpoints, route over all of them (panic mode).
    pub panic_threshold_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breaker {
    /// Open when failures / requests in the window reach this ratio; 0 disables it.
    pub failure_ratio: f64,
    pub min_requests: u32,
    #[serde(with = "human")]
    pub window: Duration,
    #[serde(with = "human")]
    pub open_for: Duration,
    pub half_open_requests: NonZeroU32,
    /// Requests in flight to the service beyond which new ones fail fast (no queue).
    pub max_in_flight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ProbeKind {
    Http {
        path: String,
        host: Option<String>,
        /// Inclusive ranges of healthy statuses.
        statuses: Vec<(u16, u16)>,
    },
    Tcp,
    /// grpc.health.v1.Health/Check for `service` ("" = the server as a whole).
    Grpc {
        service: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveHealth {
    pub probe: ProbeKind,
    #[serde(with = "human")]
    pub interval: Duration,
    /// Each round starts up to this much later, so sidecars do not probe in lockstep.
    #[serde(with = "human")]
    pub jitter: Duration,
    #[serde(with = "human")]
    pub timeout: Duration,
    pub healthy_threshold: NonZeroU32,
    pub unhealthy_threshold: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    /// Separate quotas per value of this request header (e.g. a tenant id).
    pub key_header: Option<String>,
    /// Keys tracked at most; beyond it, new keys share one overflow quota.
    pub max_keys: usize,
}

fn statuses<S: serde::Serializer>(v: &[StatusCode], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(StatusCode::as_u16))
}

impl Default for Outlier {
    /// The same values a config that says nothing gets.
    fn default() -> Self {
        use super::defaults as d;
        Outlier {
            consecutive_failures: d::CONSECUTIVE_FAILURES,
            count_5xx: true,
            base_ejection: d::BASE_EJECTION,
            max_ejection: d::MAX_EJECTION,
            max_ejection_percent: d::MAX_EJECTION_PERCENT,
            panic_threshold_percent: d::PANIC_THRESHOLD,
        }
    }
}
