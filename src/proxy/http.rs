//! L7 forwarding: one request in, one endpoint picked, one request out, the response
//! streamed back. Plain `async fn`s a reader can step through.
//!
//! Owns: header hygiene (RFC 9110 hop-by-hop), URI rewriting, upgrades (WebSocket), and
//! mapping upstream failures to [`ProxyError`]. Must not: buffer bodies, retry a request
//! whose bytes may have reached an upstream, or panic on any input.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Upstream;
use super::body::ProxyBody;
use super::error::ProxyError;
use super::observe::{Exchange, endpoint_attributes, record_attempt, span_attributes, trace_attempt};
use super::replay::{Replay, UpstreamBody};
use super::retry::{self, Outcome};
use crate::config::UpstreamProtocol;
use crate::telemetry::access;
use crate::telemetry::metrics;
use crate::telemetry::trace;
use crate::upstream::InFlight;
use crate::upstream::breaker::Refused;
use crate::upstream::budget::backoff;

/// Reports how many attempts a request took (retries are visible to the app).
pub const ATTEMPTS_HEADER: &str = "x-outrider-attempts";

/// Proxies one request; every failure becomes a response carrying `x-outrider-error`.
pub async fn handle(up: &Upstream, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone(); // shares the bytes: no allocation
    let trace = up.telemetry.tracing.as_ref().and_then(|t| {
        Some((t, t.start(req.headers(), trace::span_name(&method), || span_attributes(up, &req))?))
    });
    let mut ex = Exchange { attempts: 0, endpoint: None, trace, method: metrics::method_class(&method) };
    let mut reason = None;
    let mut resp = match forward(up, req, &mut ex).await {
        Ok(resp) => resp,
        Err(e) => {
            let endpoint = e.endpoint().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(
                service = %up.name, %endpoint, %method, path = uri.path(), reason = e.code(), attempts = ex.attempts,
                elapsed_ms = started.elapsed().as_millis() as u64, "request failed: {e}"
            );
            reason = Some(e.code());
            e.into_response()
        }
    };
    if ex.attempts > 0 {
        resp.headers_mut().insert(ATTEMPTS_HEADER, HeaderValue::from(ex.attempts));
    }
    let status = resp.status();
    up.metrics.requests.add(ex.method, metrics::status_class(Some(status)));
    up.metrics.request_duration.observe(started.elapsed());
    if let Some((_, cx)) = &ex.trace {
        // Our reason when Outrider answered; the status class for an upstream 5xx.
        let error = reason.or_else(|| status.is_server_error().then_some("5xx"));
        trace::finish(cx, Some(status.as_u16()), error, || endpoint_attributes(up, &ex));
    }
    if let Some(log) = &up.telemetry.access {
        let trace_id = ex.trace.as_ref().and_then(|(_, cx)| trace::trace_id(cx));
        let bytes = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        log.record(&access::Entry {
            service: &up.name,
            endpoint: ex.endpoint,
            method: method.as_str(),
            path: uri.path(),
            status: status.as_u16(),
            duration: started.elapsed(),
            attempts: ex.attempts,
            bytes,
            reason,
            trace_id,
        });
    }
    resp
}

/// Admission (rate limit, breaker), then attempts until one answers or no retry is allowed.
async fn forward(
    up: &Upstream,
    req: Request<Incoming>,
    ex: &mut Exchange<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Some(limiter) = &up.limiter {
        limiter.check(req.headers()).map_err(|wait| {
            metrics::inc(&up.metrics.rate_limited);
            ProxyError::RateLimited(up.name.to_string(), wait)
        })?;
    }
    let mut admission = up.breaker.admit().map_err(|r| match r {
        Refused::Open => ProxyError::CircuitOpen(up.name.to_string()),
        Refused::Overloaded => ProxyError::Overloaded(up.name.to_string(), up.breaker.config().max_in_flight),
    })?;
    if wants_upgrade(&req) {
        ex.attempts = 1;
        return forward_upgrade(up, req, ex).await;
    }
    let policy = &up.config.resilience.retries;
    let safe = retry::safe_to_repeat(req.method(), req.headers(), policy);
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts);
    let empty = body.is_end_stream();
    let (replay, mut direct) = match policy.max_attempts {
        _ if empty => (None, None),
        1 => (None, Some(body)),
        _ => (Some(Replay::new(body, policy.buffer_bytes)), None),
    };
    up.budget.record_request();
    let deadline = Instant::now() + up.config.timeouts.request;
    let mut tried = Vec::new();
    loop {
        ex.attempts += 1;
        let in_flight =
            up.balancer.pick_avoiding(&tried).ok_or_else(|| ProxyError::NoEndpoints(up.name.to_string()))?;
        let addr = in_flight.addr();
        ex.endpoint = Some(addr);
        let body = match (&replay, empty) {
            (_, true) => UpstreamBody::Empty,
            (Some(r), false) => r.attempt(),
            (None, false) => UpstreamBody::Direct(
                direct.take().ok_or_else(|| ProxyError::BadRequest("body already sent".into()))?,
            ),
        };
        let mut out = outbound(&parts, body, &in_flight, up.config.protocol)?;
        let attempt_span = trace_attempt(ex, &mut out);
        let sent = Instant::now();
        let outcome = attempt(up, out, addr, deadline).await;
        record_attempt(up, ex, &in_flight, &outcome, sent.elapsed(), attempt_span);
        let failed = outcome.is_failure(&up.config.resilience.outlier);
        up.balancer.report(in_flight.state(), failed);
        if let Some(delay) = next_retry(up, &outcome, ex.attempts, safe, replay.as_ref(), deadline) {
            tracing::debug!(service = %up.name, endpoint = %addr, attempt = ex.attempts, ?delay, "retrying");
            metrics::inc(&up.metrics.retries);
            tried.push(addr);
            drop(outcome);
            tokio::time::sleep(delay).await;
            continue;
        }
        admission.record(!failed);
        return match outcome {
            Outcome::Failed(e) => Err(e),
            Outcome::Response(mut resp) => {
                strip_hop_by_hop(resp.headers_mut(), false);
                Ok(resp.map(|body| ProxyBody::upstream(body, in_flight, admission)))
            }
        };
    }
}

async fn attempt(
    up: &Upstream,
    req: Request<UpstreamBody>,
    addr: SocketAddr,
    deadline: Instant,
) -> Outcome<Incoming> {
    let per_try =
        up.config.resilience.retries.per_try_timeout.min(deadline.saturating_duration_since(Instant::now()));
    match tokio::time::timeout(per_try, up.client.request(req)).await {
        Err(_) => Outcome::Failed(ProxyError::Timeout(addr, per_try)),
        Ok(Err(e)) => Outcome::Failed(classify(addr, &e)),
        Ok(Ok(resp)) => Outcome::Response(resp),
    }
}

/// The delay before the next attempt, or `None` when this outcome is final.
fn next_retry(
    up: &Upstream,
    outcome: &Outcome<Incoming>,
    attempts: u32,
    safe: bool,
    replay: Option<&Replay>,
    deadline: Instant,
) -> Option<Duration> {
    let policy = &up.config.resilience.retries;
    if attempts >= policy.max_attempts {
        return None;
    }
    let never_sent = outcome.retryable(policy)?;
    // No replay buffer: an empty body (always replayable) or a single-attempt policy.
    if !(never_sent || safe) || !replay.is_none_or(Replay::replayable) {
        return None;
    }
    let delay = backoff(attempts, policy.backoff_base, policy.backoff_max);
    let delay = delay.max(retry::retry_after(outcome).unwrap_or_default());
    if Instant::now() + delay >= deadline {
        return None;
    }
    if !up.budget.try_retry() {
        metrics::inc(&up.metrics.budget_exhausted);
        tracing::warn!(service = %up.name, "retry budget exhausted: not retrying");
        return None;
    }
    Some(delay)
}

/// A single attempt for an upgrade (WebSocket): the connection is spliced, never retried.
async fn forward_upgrade(
    up: &Upstream,
    mut req: Request<Incoming>,
    ex: &mut Exchange<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let in_flight = up.balancer.pick().ok_or_else(|| ProxyError::NoEndpoints(up.name.to_string()))?;
    let addr = in_flight.addr();
    ex.endpoint = Some(addr);
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    prepare(&mut parts);
    let mut out = outbound(&parts, UpstreamBody::Direct(body), &in_flight, up.config.protocol)?;
    if let Some((tracer, cx)) = &ex.trace {
        tracer.inject(cx, out.headers_mut());
    }
    if let Some(upgrade) = upgrade {
        out.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.headers_mut().insert(header::UPGRADE, upgrade);
    }
    let timeout = up.config.timeouts.request;
    let mut resp = match tokio::time::timeout(timeout, up.client.request(out)).await {
        Err(_) => return Err(ProxyError::Timeout(addr, timeout)),
        Ok(Err(e)) => return Err(classify(addr, &e)),
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(downstream, upstream, in_flight));
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    Ok(resp.map(|body| ProxyBody::upstream(body, in_flight, None)))
}

/// Header hygiene done once per request, before any attempt.
fn prepare(parts: &mut http::request::Parts) {
    // HTTP/2 requests carry the host in the URI only; an HTTP/1.1 upstream needs a Host header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    strip_hop_by_hop(&mut parts.headers, false);
}

/// The request for one attempt at the chosen endpoint.
fn outbound(
    parts: &http::request::Parts,
    body: UpstreamBody,
    endpoint: &InFlight,
    protocol: UpstreamProtocol,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(endpoint.authority().clone());
    uri.path_and_query = Some(path);
    let mut req = Request::new(body);
    *req.uri_mut() = Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    Ok(req)
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the headers that describe one connection rather than the message (RFC 9110
/// §7.6.1): those named in `Connection`, and the fixed set below. `TE: trailers` is kept
/// (gRPC needs it); an upgrade keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade.then(|| headers.get(header::UPGRADE).cloned()).flatten();
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHENTICATE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    let te_trailers = headers.get(header::TE).is_some_and(|v| connection_value_has(v, "trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

fn connection_value_has(v: &HeaderValue, token: &str) -> bool {
    v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn classify(addr: std::net::SocketAddr, e: &hyper_util::client::legacy::Error) -> ProxyError {
    let detail = error_chain(e);
    if e.is_connect() { ProxyError::Connect(addr, detail) } else { ProxyError::Upstream(addr, detail) }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Splices an upgraded connection (e.g. WebSocket) to the upstream's, byte for byte.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
) {
    let addr = in_flight.addr();
    match tokio::try_join!(downstream, upstream) {
        Ok((d, u)) => {
            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                tracing::debug!(endpoint = %addr, "upgraded connection ended: {e}");
            }
        }
        Err(e) => tracing::warn!(endpoint = %addr, "upgrade failed: {e}"),
    }
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
