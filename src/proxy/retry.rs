//! The retry policy: which failed attempts may be tried again, and when.
//!
//! A retry needs all of: attempts left; a condition listed in `retry_on` (or a listed
//! status); a request that is safe to send again — it provably never reached the upstream
//! (connect failure, REFUSED_STREAM), or its method is idempotent / it carries an
//! `Idempotency-Key` (or the service opted into `non_idempotent`); a body that can be sent
//! again; a token from the retry budget; and time left before the request deadline.
//! Owns: those rules. Must not: do I/O.

use std::time::Duration;

use http::{HeaderMap, HeaderName, Method, Response, StatusCode};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

use super::error::ProxyError;
use crate::config::{Outlier, Retries, RetryOn};

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Outcome<B> {
    Response(Response<B>),
    Failed(ProxyError),
}

/// Whether an outcome is a listed retry condition, and whether the request reached the
/// upstream: that decides which requests may go again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Not a listed condition (success, a status not listed, a client fault).
    No,
    /// Listed, and the request provably never reached the upstream: any request may go again.
    Unsent,
    /// Listed, but the upstream may have processed it: only requests safe to repeat go again.
    MaybeSent,
}

// === impl Outcome ===

impl<B> Outcome<B> {
    /// Whether this counts against the endpoint (outlier ejection) and the service (breaker).
    /// A fault of the client's request is neither.
    pub(crate) fn is_failure(&self, outlier: &Outlier) -> bool {
        match self {
            Outcome::Failed(e) => !e.is_client_fault(),
            Outcome::Response(r) => {
                let s = r.status();
                (outlier.count_5xx && s.is_server_error())
                    || matches!(
                        s,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    )
            }
        }
    }

    /// The retry condition this outcome meets under `policy`.
    pub(crate) fn retry(&self, policy: &Retries) -> Retry {
        let (condition, unsent) = match self {
            Outcome::Failed(ProxyError::Connect(..) | ProxyError::Tls(..)) => (RetryOn::ConnectFailure, true),
            Outcome::Failed(ProxyError::Refused(..)) => (RetryOn::RefusedStream, true),
            Outcome::Failed(ProxyError::Upstream(..)) => (RetryOn::Reset, false),
            Outcome::Failed(ProxyError::Timeout(..)) => (RetryOn::Timeout, false),
            Outcome::Failed(_) => return Retry::No,
            Outcome::Response(r) if policy.retry_statuses.contains(&r.status()) => return Retry::MaybeSent,
            Outcome::Response(r) if grpc_unavailable(r.headers()) => (RetryOn::GrpcUnavailable, false),
            Outcome::Response(_) => return Retry::No,
        };
        match (policy.retry_on.contains(&condition), unsent) {
            (false, _) => Retry::No,
            (true, true) => Retry::Unsent,
            (true, false) => Retry::MaybeSent,
        }
    }
}

/// A trailers-only gRPC response (status in the headers) saying UNAVAILABLE (14).
fn grpc_unavailable(headers: &HeaderMap) -> bool {
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    headers.get(GRPC_STATUS).is_some_and(|v| v == "14")
}

/// Whether a request may be sent again after it may have reached the upstream.
pub(crate) fn safe_to_repeat(method: &Method, headers: &HeaderMap, policy: &Retries) -> bool {
    policy.non_idempotent
        || headers.contains_key(IDEMPOTENCY_KEY)
        || matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        )
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured).
pub(crate) fn retry_after<B>(outcome: &Outcome<B>) -> Option<Duration> {
    let Outcome::Response(r) = outcome else { return None };
    let secs: u64 = r.headers().get(http::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Retries {
        Retries {
            max_attempts: 3,
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::GrpcUnavailable],
            retry_statuses: vec![StatusCode::SERVICE_UNAVAILABLE],
            non_idempotent: false,
            per_try_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            buffer_bytes: 1024,
            budget: crate::config::RetryBudget {
                ratio: 0.2,
                min_per_second: 10,
                window: Duration::from_secs(10),
            },
        }
    }

    fn status(code: u16, headers: &[(&str, &str)]) -> Outcome<()> {
        let mut r = Response::builder().status(code);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Outcome::Response(r.body(()).unwrap())
    }

    #[test]
    fn classifies_conditions() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let p = policy();
        let failed = |e| Outcome::<()>::Failed(e).retry(&p);
        assert_eq!(failed(ProxyError::Connect(addr, String::new())), Retry::Unsent);
        assert_eq!(failed(ProxyError::Refused(addr, String::new())), Retry::No, "not in this policy");
        assert_eq!(failed(ProxyError::Upstream(addr, String::new())), Retry::MaybeSent);
        assert_eq!(failed(ProxyError::Timeout(addr, Duration::ZERO)), Retry::No);
        let client = ProxyError::ClientBody { aborted: false, detail: String::new() };
        assert_eq!(failed(client), Retry::No, "a client fault is never retried");
        assert_eq!(status(503, &[]).retry(&p), Retry::MaybeSent);
        assert_eq!(status(500, &[]).retry(&p), Retry::No);
        assert_eq!(status(200, &[("grpc-status", "14")]).retry(&p), Retry::MaybeSent);
        assert_eq!(status(200, &[("grpc-status", "0")]).retry(&p), Retry::No);
        let refused = Retries { retry_on: vec![RetryOn::RefusedStream], ..p.clone() };
        assert_eq!(
            Outcome::<()>::Failed(ProxyError::Refused(addr, String::new())).retry(&refused),
            Retry::Unsent
        );
    }

    #[test]
    fn client_faults_count_against_nobody() {
        let outlier = crate::config::Outlier::default();
        let client = Outcome::<()>::Failed(ProxyError::ClientBody { aborted: true, detail: String::new() });
        assert!(!client.is_failure(&outlier));
        let reset =
            Outcome::<()>::Failed(ProxyError::Upstream("127.0.0.1:1".parse().unwrap(), String::new()));
        assert!(reset.is_failure(&outlier));
    }

    #[test]
    fn only_idempotent_or_keyed_requests_repeat() {
        let p = policy();
        let none = HeaderMap::new();
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "abc".parse().unwrap());
        assert!(safe_to_repeat(&Method::GET, &none, &p));
        assert!(safe_to_repeat(&Method::PUT, &none, &p));
        assert!(!safe_to_repeat(&Method::POST, &none, &p));
        assert!(!safe_to_repeat(&Method::PATCH, &none, &p));
        assert!(safe_to_repeat(&Method::POST, &keyed, &p));
        assert!(safe_to_repeat(&Method::POST, &none, &Retries { non_idempotent: true, ..p }));
    }

    #[test]
    fn reads_retry_after_seconds() {
        assert_eq!(retry_after(&status(503, &[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&status(503, &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])), None);
    }
}
