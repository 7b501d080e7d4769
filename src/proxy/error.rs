//! Errors the proxy answers itself, each knowing its HTTP status and its machine-readable
//! reason (sent as `x-outrider-error`, so an app can tell *why* without reading our logs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::server::HeadError;
use crate::tls::client::Failure;

pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("x-outrider-error");
/// With `tls_handshake_failed`: why (unknown_ca, expired, name_mismatch, …).
pub(crate) const TLS_ERROR_HEADER: HeaderName = HeaderName::from_static("x-outrider-tls-error");

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("service {0} has no endpoints")]
    NoEndpoints(Arc<str>),
    #[error("service {0}: no routable endpoint in the subset route {1} chose (nor in its fallback)")]
    NoSubsetEndpoints(Arc<str>, String),
    #[error("{1}")]
    Connect(SocketAddr, String),
    #[error("{2}")]
    Tls(SocketAddr, Failure, String),
    #[error("no response from {0} within {t}", t = humantime::format_duration(*.1))]
    Timeout(SocketAddr, Duration),
    #[error("upstream {0} failed before responding: {1}")]
    Upstream(SocketAddr, String),
    #[error("upstream {0} refused the stream (it did not process it): {1}")]
    Refused(SocketAddr, String),
    /// The app's request body was broken (`aborted`: the app went away mid-body).
    #[error("the request body from the app failed: {detail}")]
    ClientBody { aborted: bool, detail: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{}", head_message(*.0))]
    Head(HeadError),
    #[error("rate limit of service {0} exceeded")]
    RateLimited(Arc<str>, Duration),
    #[error("circuit breaker of service {0} is open: failing fast")]
    CircuitOpen(Arc<str>),
    #[error("service {0} has {1} requests in flight, its limit")]
    Overloaded(Arc<str>, u32),
}

// === impl ProxyError ===

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoEndpoints(_) | ProxyError::NoSubsetEndpoints(..) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(..)
            | ProxyError::Tls(..)
            | ProxyError::Upstream(..)
            | ProxyError::Refused(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody { .. } | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Head(HeadError::TooLarge) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Head(HeadError::UnsupportedCoding) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::CircuitOpen(_) | ProxyError::Overloaded(..) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `x-outrider-error` value.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::NoSubsetEndpoints(..) => "no_subset_endpoints",
            ProxyError::Connect(..) => "connect_failed",
            ProxyError::Tls(..) => "tls_handshake_failed",
            ProxyError::Timeout(..) => "upstream_timeout",
            ProxyError::Upstream(..) => "upstream_reset",
            ProxyError::Refused(..) => "refused_stream",
            ProxyError::ClientBody { aborted: true, .. } => "client_aborted",
            ProxyError::ClientBody { aborted: false, .. } => "bad_request_body",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Head(HeadError::TooLarge) => "headers_too_large",
            ProxyError::Head(HeadError::UnsupportedCoding) => "unsupported_transfer_coding",
            ProxyError::RateLimited(..) => "rate_limited",
            ProxyError::CircuitOpen(_) => "circuit_open",
            ProxyError::Overloaded(..) => "overloaded",
        }
    }

    /// Why a TLS handshake failed, for `tls_handshake_failed`.
    pub(crate) fn tls_failure(&self) -> Option<Failure> {
        match self {
            ProxyError::Tls(_, failure, _) => Some(*failure),
            _ => None,
        }
    }

    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            ProxyError::Connect(a, _)
            | ProxyError::Tls(a, ..)
            | ProxyError::Timeout(a, _)
            | ProxyError::Upstream(a, _)
            | ProxyError::Refused(a, _) => Some(*a),
            _ => None,
        }
    }

    /// The client's doing, not the upstream's: never counted against an endpoint or the
    /// service, never retried.
    pub(crate) fn is_client_fault(&self) -> bool {
        matches!(self, ProxyError::ClientBody { .. } | ProxyError::BadRequest(_) | ProxyError::Head(_))
    }

    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let body = Bytes::from(format!("outrider: {self}\n"));
        let mut resp = Response::new(ProxyBody::local(body));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if let Some(failure) = self.tls_failure() {
            headers.insert(TLS_ERROR_HEADER, HeaderValue::from_static(failure.as_str()));
        }
        if let ProxyError::RateLimited(_, wait) = &self {
            let secs = super::ratelimit::retry_after_secs(*wait);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn head_message(e: HeadError) -> &'static str {
    match e {
        HeadError::TooLarge => "request head too large (max_header_bytes or max_headers of the listener)",
        HeadError::UnsupportedCoding => "transfer coding not implemented: only chunked is accepted",
    }
}
