//! What a request leaves for operators: span attributes, per-attempt spans and counters.
//! Kept apart from `http.rs` so the request path reads without telemetry in the way.
//! Must not: build strings for spans nobody samples.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use opentelemetry::{Context, KeyValue};

use super::Upstream;
use super::attempt::Attempts;
use super::error::ProxyError;
use super::retry::Outcome;
use crate::client::body::UpstreamBody;
use crate::config::Selector;
use crate::telemetry::metrics;
use crate::telemetry::trace::{self, Tracing};
use crate::tls::server::Peer;
use crate::upstream::{InFlight, Placement};

/// What one request's attempts leave behind for metrics, spans and the access log.
pub(super) struct Exchange<'a> {
    pub(super) attempts: u32,
    pub(super) endpoint: Option<SocketAddr>,
    /// The last endpoint's state when it was picked (span attribute).
    endpoint_state: &'static str,
    pub(super) trace: Option<(&'a Tracing, Context)>,
    pub(super) method: usize,
    /// The route that matched and the subset the last pick drew from (for the span).
    route: Option<&'a str>,
    subset: Option<&'a Selector>,
    fell_back: bool,
    placement: Placement,
}

impl<'a> Exchange<'a> {
    pub(super) fn new(trace: Option<(&'a Tracing, Context)>, method: &http::Method) -> Self {
        Exchange {
            attempts: 0,
            endpoint: None,
            endpoint_state: "",
            trace,
            method: metrics::method_class(method),
            route: None,
            subset: None,
            fell_back: false,
            placement: Placement::Any,
        }
    }

    /// An attempt was started on `endpoint`.
    pub(super) fn attempt(&mut self, endpoint: &InFlight, attempts: &Attempts<'a>) {
        self.attempts = attempts.count();
        self.endpoint = Some(endpoint.addr());
        if self.trace.is_some() {
            self.endpoint_state = endpoint.state().state_name();
        }
        self.routed(attempts);
        self.placement = attempts.placement;
    }

    /// Routing's decision (or the fallback's, once it applied).
    pub(super) fn routed(&mut self, attempts: &Attempts<'a>) {
        let routed = attempts.routed();
        self.route = routed.route.map(|r| r.name.as_str());
        self.subset = attempts.subset_selector();
        self.fell_back = attempts.fell_back;
    }
}

pub(super) fn span_attributes(up: &Upstream, req: &Request<Incoming>, peer: Option<&Peer>) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
        KeyValue::new("outrider.service", up.name.to_string()),
        KeyValue::new("outrider.picker", format!("{:?}", up.config.load_balancing)),
        KeyValue::new("outrider.config_generation", up.generation as i64),
        KeyValue::new("outrider.breaker_state", up.breaker.state_name()),
    ];
    if let Some(peer) = peer {
        attrs.push(KeyValue::new("outrider.peer_identity", peer.info.identity().to_string()));
    }
    if let Some(w) = &up.watch {
        attrs.push(KeyValue::new(
            "outrider.discovery_revision",
            w.revision.load(std::sync::atomic::Ordering::Relaxed),
        ));
    }
    attrs
}

pub(super) fn endpoint_attributes(ex: &Exchange<'_>) -> Vec<KeyValue> {
    let mut attrs = vec![KeyValue::new("outrider.attempts", i64::from(ex.attempts))];
    if let Some(addr) = ex.endpoint {
        attrs.push(KeyValue::new("server.address", addr.ip().to_string()));
        attrs.push(KeyValue::new("server.port", i64::from(addr.port())));
        attrs.push(KeyValue::new("network.peer.address", addr.ip().to_string()));
        attrs.push(KeyValue::new("outrider.endpoint", addr.to_string()));
        attrs.push(KeyValue::new("outrider.endpoint_state", ex.endpoint_state));
        attrs.push(KeyValue::new("outrider.locality", ex.placement.as_str()));
    }
    if let Some(route) = ex.route {
        attrs.push(KeyValue::new("outrider.route", route.to_string()));
        attrs.push(KeyValue::new("outrider.fallback", ex.fell_back));
    }
    if let Some(subset) = ex.subset.filter(|s| !s.is_empty()) {
        let text: Vec<String> = subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
        attrs.push(KeyValue::new("outrider.subset", text.join(",")));
    }
    attrs
}

/// Injects trace context into an attempt; retries (attempt 2+) get a child span of their own.
pub(super) fn trace_attempt(ex: &Exchange<'_>, out: &mut Request<UpstreamBody>) -> Option<Context> {
    let (tracer, cx) = ex.trace.as_ref()?;
    let child = (ex.attempts > 1).then(|| {
        let attempt = i64::from(ex.attempts);
        tracer.child(cx, trace::span_name(out.method()), || vec![KeyValue::new("outrider.attempt", attempt)])
    });
    tracer.inject(child.as_ref().unwrap_or(cx), out.headers_mut());
    child
}

pub(super) fn record_attempt(
    up: &Upstream,
    ex: &Exchange<'_>,
    in_flight: &InFlight,
    outcome: &Outcome<Incoming>,
    took: Duration,
    span: Option<Context>,
) {
    up.metrics.upstream_duration.observe(took);
    let status = match outcome {
        Outcome::Response(r) => Some(r.status()),
        Outcome::Failed(_) => None,
    };
    in_flight.state().requests.add(ex.method, metrics::status_class(status));
    in_flight.state().attempt_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    match outcome {
        Outcome::Failed(ProxyError::Connect(..)) => metrics::inc(&up.metrics.connect_errors),
        Outcome::Failed(ProxyError::Tls(_, failure, _)) => {
            metrics::inc(&up.metrics.connect_errors);
            up.metrics.tls_failure(*failure);
        }
        _ => {}
    }
    if let Some(cx) = span {
        let error = match outcome {
            Outcome::Failed(e) => Some(e.code()),
            Outcome::Response(r) if r.status().is_server_error() => Some("5xx"),
            Outcome::Response(_) => None,
        };
        let endpoint = in_flight.addr();
        let tls_error = match outcome {
            Outcome::Failed(e) => e.tls_failure(),
            Outcome::Response(_) => None,
        };
        let attrs = || {
            let mut attrs = vec![
                KeyValue::new("server.address", endpoint.ip().to_string()),
                KeyValue::new("server.port", i64::from(endpoint.port())),
                KeyValue::new("outrider.endpoint", endpoint.to_string()),
            ];
            attrs.extend(tls_error.map(tls_error_attribute));
            attrs
        };
        trace::finish(&cx, status.map(|s| s.as_u16()), error, attrs);
    }
}

/// Why a TLS handshake with the upstream failed (`unknown_ca`, `expired`, …).
pub(super) fn tls_error_attribute(failure: crate::tls::client::Failure) -> KeyValue {
    KeyValue::new("outrider.tls_error", failure.as_str())
}
