//! L7 forwarding: one request in, an endpoint per attempt, the response streamed back.
//! Plain `async fn`s a reader can step through: `handle` (telemetry around) → `forward`
//! (admission, then the attempt loop) → `send` (one attempt) → `finish`.
//!
//! Owns: header hygiene (RFC 9110 hop-by-hop), the request line per upstream protocol,
//! upgrades (WebSocket), and mapping upstream failures to [`ProxyError`]. Must not: buffer
//! bodies beyond the replay cap, retry a request that may have reached an upstream unless it
//! is safe to repeat, or panic on any input.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::attempt::{Attempts, Verdict};
use super::body::{Held, ProxyBody};
use super::error::ProxyError;
use super::observe::{
    Exchange, endpoint_attributes, record_attempt, span_attributes, tls_error_attribute, trace_attempt,
};
use super::retry::{self, Outcome};
use super::{Front, Upstream};
use crate::client::body::{Outbound, RequestBody, UpstreamBody};
use crate::client::{Lease, SendError, error_chain};
use crate::config::UpstreamProtocol;
use crate::routing::{self as route, Routed};
use crate::server::{self, HeadError};
use crate::telemetry::{access, metrics, trace};
use crate::tls::server::Peer;
use crate::upstream::InFlight;
use crate::upstream::breaker::{Admission, Refused};

/// The identity of a client that presented a certificate to a TLS listener (Envoy's form).
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Reports how many attempts a request took (retries are visible to the app).
pub(crate) const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-outrider-attempts");

/// Where a request came from: the client's address, a TLS listener, and with a client
/// certificate, who.
#[derive(Debug)]
pub(crate) struct From {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) peer: Option<Arc<Peer>>,
}

/// Proxies one request; every failure becomes a response carrying `x-outrider-error`.
pub(crate) async fn handle(
    up: &Upstream,
    req: Request<Incoming>,
    front: &Front,
    from: &From,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone(); // shares the bytes: no allocation
    let trace = up.telemetry.tracing.as_ref().and_then(|t| {
        Some((
            t,
            t.start(req.headers(), trace::span_name(&method), || {
                span_attributes(up, &req, from.peer.as_deref())
            })?,
        ))
    });
    let mut ex = Exchange::new(trace, &method);
    let (mut reason, mut tls_error) = (None, None);
    let result = match check_head(&req, front) {
        Ok(()) => forward(up, req, from, &mut ex).await,
        Err(e) => Err(e),
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            let endpoint = e.endpoint().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(
                service = %up.name, %endpoint, %method, path = uri.path(), reason = e.code(),
                tls_error = e.tls_failure().map(|f| f.as_str()), attempts = ex.attempts,
                elapsed_ms = started.elapsed().as_millis() as u64, "request failed: {e}"
            );
            reason = Some(e.code());
            tls_error = e.tls_failure();
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
        trace::finish(cx, Some(status.as_u16()), error, || {
            let mut attrs = endpoint_attributes(&ex);
            attrs.extend(tls_error.map(tls_error_attribute));
            attrs
        });
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

/// What hyper leaves to us about a request head (size and count for HTTP/2, transfer codings
/// for HTTP/1.1); refusals are counted per listener.
fn check_head(req: &Request<Incoming>, front: &Front) -> Result<(), ProxyError> {
    server::check_head(req, &front.limits()).map_err(|e| {
        let m = &front.metrics;
        metrics::inc(match e {
            HeadError::TooLarge => &m.heads_too_large,
            HeadError::UnsupportedCoding => &m.unsupported_codings,
        });
        ProxyError::Head(e)
    })
}

/// Admission (rate limit, breaker), routing, then attempts until one answers or no retry is
/// allowed.
async fn forward<'a>(
    up: &'a Upstream,
    req: Request<Incoming>,
    from: &From,
    ex: &mut Exchange<'a>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let admission = admit(up, req.headers())?;
    let routed = routed(up, &req, from);
    if wants_upgrade(&req) {
        return upgrade(up, req, from, admission, routed, ex).await;
    }
    let policy = &up.config.resilience.retries;
    let safe = retry::safe_to_repeat(req.method(), req.headers(), policy);
    let (mut head, body) = req.into_parts();
    prepare(&mut head, from);
    let mut body = RequestBody::new(body, policy.max_attempts, policy.buffer_bytes);
    let mut attempts = Attempts::new(up, policy.max_attempts, routed);
    ex.routed(&attempts);
    loop {
        let endpoint = attempts.pick()?;
        ex.attempt(&endpoint, &attempts);
        // `verdict` allows a retry only with a body to send, so this is always `Some`.
        let outbound =
            body.next().ok_or_else(|| ProxyError::BadRequest("request body already sent".into()))?;
        // A later attempt needs the head again, unless this one hands it back unsent.
        let req = request(&mut head, outbound, &endpoint, up.config.protocol, attempts.more_after())?;
        let (outcome, lease, failed) =
            exchange(up, ex, &attempts, &endpoint, req, &mut head, &mut body).await;
        let retry_after = retry::retry_after(&outcome);
        if let Verdict::Retry(delay) =
            attempts.verdict(outcome.retry(policy), safe, body.replayable(), retry_after)
        {
            tracing::debug!(service = %up.name, endpoint = %endpoint.addr(), attempt = attempts.count(), ?delay, "retrying");
            drop((outcome, lease, endpoint));
            tokio::time::sleep(delay).await;
            continue;
        }
        return finish(up, outcome, lease, endpoint, admission, failed);
    }
}

/// The subset (and ring key) the service's routing gives this request.
fn routed<'a>(up: &'a Upstream, req: &Request<Incoming>, from: &From) -> Routed<'a> {
    let routing = &up.config.routing;
    if routing.routes.is_empty() && routing.hash_key.is_none() {
        return Routed::default();
    }
    let view = route::Request {
        method: req.method(),
        path: req.uri().path(),
        headers: req.headers(),
        source: Some(from.addr.ip()),
    };
    route::route(routing, &view)
}

/// The rate limit, then the breaker and the concurrency limit: refused requests fail fast.
fn admit(up: &Upstream, headers: &HeaderMap) -> Result<Admission, ProxyError> {
    if let Some(limiter) = &up.limiter {
        limiter.check_headers(headers).map_err(|wait| {
            metrics::inc(&up.metrics.rate_limited);
            ProxyError::RateLimited(up.name.clone(), wait)
        })?;
    }
    up.breaker.admit().map_err(|r| match r {
        Refused::Open => ProxyError::CircuitOpen(up.name.clone()),
        Refused::Overloaded => ProxyError::Overloaded(up.name.clone(), up.breaker.config().max_in_flight),
    })
}

/// One attempt, booked: its span and counters, and (unless the app's own body failed) the
/// endpoint's outlier report. Also whether it counts as the endpoint's failure.
async fn exchange(
    up: &Upstream,
    ex: &mut Exchange<'_>,
    attempts: &Attempts<'_>,
    endpoint: &InFlight,
    mut req: Request<UpstreamBody>,
    head: &mut http::request::Parts,
    body: &mut RequestBody<Incoming>,
) -> (Outcome<Incoming>, Option<Lease>, bool) {
    let span = trace_attempt(ex, &mut req);
    let sent = Instant::now();
    let (outcome, lease) = send(up, attempts, endpoint, req, head, body).await;
    let took = sent.elapsed();
    record_attempt(up, ex, endpoint, &outcome, took, span);
    let failed = outcome.is_failure(&up.config.resilience.outlier);
    if !client_fault(&outcome) {
        attempts.report(endpoint, failed, took);
    }
    (outcome, lease, failed)
}

/// One attempt: the request on a pooled or new connection to `endpoint`, bounded by the
/// per-try timeout. A request that never left hands its head and body back for the next.
async fn send(
    up: &Upstream,
    attempts: &Attempts<'_>,
    endpoint: &InFlight,
    req: Request<UpstreamBody>,
    head: &mut http::request::Parts,
    body: &mut RequestBody<Incoming>,
) -> (Outcome<Incoming>, Option<Lease>) {
    let (addr, per_try) = (endpoint.addr(), attempts.per_try_timeout());
    let sent = up.client.send(addr, &endpoint.state().pool, req);
    match tokio::time::timeout(per_try, sent).await {
        Err(_) => (Outcome::Failed(ProxyError::Timeout(addr, per_try)), None),
        Ok(Ok((resp, lease))) => (Outcome::Response(resp), Some(lease)),
        Ok(Err(SendError::Connect(e, req))) => {
            let (unsent_head, unsent_body) = req.into_parts();
            head.headers = unsent_head.headers;
            body.restore(unsent_body);
            (Outcome::Failed(connect_error(addr, e)), None)
        }
        Ok(Err(SendError::Http(e))) => (Outcome::Failed(classify(addr, &e, body)), None),
    }
}

/// A failed connect; a TLS handshake failure keeps its reason.
pub(super) fn connect_error(addr: SocketAddr, e: crate::client::ConnectError) -> ProxyError {
    match e {
        crate::client::ConnectError::Tls(_, failure, _) => ProxyError::Tls(addr, failure, e.to_string()),
        e => ProxyError::Connect(addr, e.to_string()),
    }
}

/// The final outcome becomes the answer; the breaker hears of it unless it was the client's
/// doing. A response keeps its endpoint, admission and connection until its last frame.
fn finish(
    up: &Upstream,
    outcome: Outcome<Incoming>,
    lease: Option<Lease>,
    endpoint: InFlight,
    mut admission: Admission,
    failed: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    match outcome {
        Outcome::Failed(e) => {
            if !e.is_client_fault() {
                admission.record(false);
            }
            Err(e)
        }
        Outcome::Response(mut resp) => {
            admission.record(!failed);
            strip_hop_by_hop(resp.headers_mut());
            let orca = up.config.client_weighted;
            if let Some(cfg) = &orca {
                endpoint.state().load.record_from(resp.headers(), cfg);
            }
            let held = Held { in_flight: endpoint, _admission: Some(admission), lease, orca };
            Ok(resp.map(|b| ProxyBody::upstream(b, held)))
        }
    }
}

fn client_fault<B>(outcome: &Outcome<B>) -> bool {
    matches!(outcome, Outcome::Failed(e) if e.is_client_fault())
}

/// A single attempt for an upgrade (WebSocket): on 101 the two connections are spliced on
/// the shutdown-tracked task set; never retried.
async fn upgrade<'a>(
    up: &'a Upstream,
    mut req: Request<Incoming>,
    from: &From,
    mut admission: Admission,
    routed: Routed<'a>,
    ex: &mut Exchange<'a>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut attempts = Attempts::new(up, 1, routed);
    ex.routed(&attempts);
    let endpoint = attempts.pick()?;
    ex.attempt(&endpoint, &attempts);
    let downstream = hyper::upgrade::on(&mut req);
    let (mut head, body) = req.into_parts();
    let protocol = head.headers.get(header::UPGRADE).cloned();
    prepare(&mut head, from);
    let mut body = RequestBody::new(body, 1, 0);
    let outbound = body.next().unwrap_or(Outbound::Empty);
    let mut req = request(&mut head, outbound, &endpoint, UpstreamProtocol::Http1, false)?;
    if let Some(protocol) = protocol {
        req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, protocol);
    }
    let (outcome, lease, failed) = exchange(up, ex, &attempts, &endpoint, req, &mut head, &mut body).await;
    match outcome {
        Outcome::Response(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            admission.record(true);
            let upstream = hyper::upgrade::on(&mut resp);
            up.tasks.spawn(tunnel(downstream, upstream, endpoint, up.config.timeouts.tcp_idle));
            let (parts, _) = resp.into_parts();
            Ok(Response::from_parts(parts, ProxyBody::empty()))
        }
        outcome => finish(up, outcome, lease, endpoint, admission, failed),
    }
}

/// Header hygiene done once per request, before any attempt. On a TLS listener the client's
/// own `x-forwarded-client-cert` is never trusted: it is replaced by the verified identity.
fn prepare(head: &mut http::request::Parts, from: &From) {
    if from.tls {
        head.headers.remove(XFCC);
        if let Some(value) = from.peer.as_ref().and_then(|p| p.forwarded.clone()) {
            head.headers.insert(XFCC, value);
        }
    }
    // HTTP/2 requests carry the host in the URI only; an HTTP/1.1 upstream needs a Host header.
    if !head.headers.contains_key(header::HOST)
        && let Some(host) = head.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        head.headers.insert(header::HOST, host);
    }
    strip_hop_by_hop(&mut head.headers);
}

/// The request for one attempt at `endpoint`: origin-form for HTTP/1.1, scheme and authority
/// for HTTP/2 (its pseudo-headers). The headers are copied when `keep` (another attempt may
/// need them), otherwise moved.
fn request(
    head: &mut http::request::Parts,
    body: UpstreamBody,
    endpoint: &InFlight,
    protocol: UpstreamProtocol,
    keep: bool,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let path = head.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut req = Request::new(body);
    // `auto` is built for HTTP/2; a connection that negotiated HTTP/1.1 rewrites it.
    *req.uri_mut() = match protocol {
        UpstreamProtocol::Http1 => Uri::from(path),
        UpstreamProtocol::Http2 | UpstreamProtocol::Auto => {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(endpoint.authority().clone());
            uri.path_and_query = Some(path);
            Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(e.to_string()))?
        }
    };
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = if keep { head.headers.clone() } else { std::mem::take(&mut head.headers) };
    *req.version_mut() = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 | UpstreamProtocol::Auto => Version::HTTP_2,
    };
    Ok(req)
}

/// Why an attempt failed after its connection was up: the app's own body broke (its fault),
/// the upstream's TLS refused our client certificate after our side of the handshake (it
/// never processed the request), the upstream refused the stream without processing it
/// (HTTP/2 REFUSED_STREAM, or a GOAWAY whose last stream id is below ours), or the
/// connection failed with the request on it.
fn classify(addr: SocketAddr, e: &hyper::Error, body: &RequestBody<Incoming>) -> ProxyError {
    let detail = error_chain(e);
    if let Some(aborted) = body.fault() {
        return ProxyError::ClientBody { aborted, detail };
    }
    if let Some(failure) = crate::tls::client::rejected(e) {
        return ProxyError::Tls(addr, failure, detail);
    }
    if refused(e) { ProxyError::Refused(addr, detail) } else { ProxyError::Upstream(addr, detail) }
}

/// REFUSED_STREAM, or our stream above a GOAWAY's last stream id: provably not processed
/// (RFC 9113 §8.7), so safe to send again whatever the method.
fn refused(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
        }
        source = err.source();
    }
    false
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| connection_value_has(v, token))
}

fn connection_value_has(v: &HeaderValue, token: &str) -> bool {
    v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Removes the headers that describe one connection rather than the message (RFC 9110
/// §7.6.1): those named in `Connection`, and the fixed set below. `TE: trailers` is kept
/// (gRPC needs it). An upgrade puts its own `Connection: upgrade` and `Upgrade` back.
/// One pass over the names finds what to remove, so a message without any (most) costs
/// no hash lookups.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: SmallVec<[HeaderName; 4]> = SmallVec::new();
    let mut keep_te = false;
    {
        // The names `Connection` lists, besides the hop-by-hop ones it usually carries.
        let mut named: SmallVec<[&str; 4]> = SmallVec::new();
        for value in headers.get_all(header::CONNECTION) {
            let tokens = value.to_str().unwrap_or_default().split(',').map(str::trim);
            named.extend(
                tokens.filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close")),
            );
        }
        for (name, value) in headers.iter() {
            if name == header::TE {
                keep_te |= connection_value_has(value, "trailers");
            }
            if is_hop_by_hop(name) || named.iter().any(|t| t.eq_ignore_ascii_case(name.as_str())) {
                doomed.push(name.clone());
            }
        }
    }
    for name in doomed.iter().rev() {
        headers.remove(name);
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    const FIXED: [HeaderName; 5] = [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::TE,
    ];
    FIXED.contains(name) || name.as_str() == "keep-alive" || name.as_str() == "proxy-connection"
}

/// Splices an upgraded connection (e.g. WebSocket) to the upstream's, byte for byte, until
/// both sides close or nothing moves for `idle` (the service's `tcp_idle`).
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
    idle: std::time::Duration,
) {
    let addr = in_flight.addr();
    match tokio::try_join!(downstream, upstream) {
        Ok((d, u)) => {
            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
            match super::tcp::copy_until_idle(&mut d, &mut u, idle).await {
                Ok(Some(_)) => {}
                Ok(None) => tracing::debug!(endpoint = %addr, "upgraded connection idle: closed"),
                Err(e) => tracing::debug!(endpoint = %addr, "upgraded connection ended: {e}"),
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
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(h[header::TE], "trailers");
    }

    proptest::proptest! {
        /// Whatever the headers, none that describe the connection survive, and every other
        /// one does, untouched.
        #[test]
        fn stripping_removes_exactly_the_hop_by_hop_headers(
            headers in proptest::collection::vec(
                ("(connection|keep-alive|te|transfer-encoding|upgrade|proxy-connection|proxy-authenticate|x-[a-c]|host|accept)",
                 "(close|keep-alive|trailers|gzip, trailers|x-a|x-b, x-c|upgrade|[a-z0-9 ,]{0,12})"),
                0..12,
            )
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in &headers {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            let named: Vec<String> = h
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.to_str().unwrap().split(',').map(|t| t.trim().to_ascii_lowercase()))
                .collect();
            let before = h.clone();
            strip_hop_by_hop(&mut h);
            for (name, value) in &h {
                let n = name.as_str();
                proptest::prop_assert!(!is_hop_by_hop(name) || (n == "te" && value == "trailers"), "{n} survived");
                proptest::prop_assert!(!named.iter().any(|t| t == n), "{n} was named by Connection");
            }
            for (name, value) in &before {
                let n = name.as_str();
                if !is_hop_by_hop(name) && !named.iter().any(|t| t == n) {
                    proptest::prop_assert!(h.get_all(name).iter().any(|v| v == value), "{n} was lost");
                }
            }
        }
    }
}
