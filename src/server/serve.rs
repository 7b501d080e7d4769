//! Serving one inbound HTTP connection: TLS first when the listener terminates it (ALPN then
//! picks HTTP/2 or HTTP/1.1), otherwise sniffing for the HTTP/2 preface; then hyper's server
//! under the listener's limits and the connection watchdog.

use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::watchdog::{Expired, Watched, supervise};
use super::{Activity, InboundMetrics, Protocol, sniff};
use crate::config::InboundLimits;
use crate::telemetry::metrics::inc;
use crate::tls::server::{Peer, REFUSALS, ServerTls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A TLS connection after its handshake, and who is on the other end.
type Accepted = (tokio_rustls::server::TlsStream<TcpStream>, bool, Option<Arc<Peer>>);

/// The TLS handshake within the header timeout; a refusal is counted by reason.
pub(crate) async fn tls_handshake(
    stream: TcpStream,
    tls: &ServerTls,
    limits: &InboundLimits,
    metrics: &InboundMetrics,
) -> Option<Accepted> {
    match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
        Ok(Ok(accepted)) => Some(accepted),
        Ok(Err((refusal, detail))) => {
            let i = REFUSALS.iter().position(|r| *r == refusal).unwrap_or(REFUSALS.len() - 1);
            inc(&metrics.tls_refusals[i]);
            tracing::info!(reason = refusal.as_str(), "TLS handshake refused: {detail}");
            None
        }
        Err(_) => {
            inc(&metrics.header_timeouts);
            None
        }
    }
}

/// Serves one HTTP connection — HTTP/2 or HTTP/1.1 (with upgrades) — under `limits`, until
/// it ends, a limit expires, or `stop` (then gracefully). With `tls`, the handshake comes
/// first. `service` is built with the connection's [`Activity`] and peer: it must call
/// [`Activity::begin`] per request and return the guard inside the response body.
pub(crate) async fn serve<S, B>(
    stream: TcpStream,
    http2: bool,
    tls: Option<&ServerTls>,
    limits: &InboundLimits,
    metrics: &InboundMetrics,
    stop: &CancellationToken,
    service: impl FnOnce(Arc<Activity>, Option<Arc<Peer>>) -> S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some(tls) = tls else {
        let protocol = match tokio::time::timeout(limits.header_read_timeout, sniff(&stream)).await {
            Ok(Ok(p)) if http2 || p == Protocol::Http1 => p,
            Ok(Ok(_)) => Protocol::Http1, // HTTP/1.1 only here: hyper answers the preface 400
            Ok(Err(e)) => return tracing::debug!("connection ended before its first request: {e}"),
            Err(_) => return inc(&metrics.header_timeouts),
        };
        let activity = Activity::new(protocol);
        let service = service(activity.clone(), None);
        return run(stream, protocol, activity, service, limits, metrics, stop).await;
    };
    let Some((stream, h2, peer)) = tls_handshake(stream, tls, limits, metrics).await else { return };
    let protocol = if h2 && http2 { Protocol::Http2 } else { Protocol::Http1 };
    let activity = Activity::new(protocol);
    let service = service(activity.clone(), peer);
    run(stream, protocol, activity, service, limits, metrics, stop).await;
}

async fn run<I, S, B>(
    io: I,
    protocol: Protocol,
    activity: Arc<Activity>,
    service: S,
    limits: &InboundLimits,
    metrics: &InboundMetrics,
    stop: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = TokioIo::new(Watched::new(io, activity.clone()));
    let result = match protocol {
        Protocol::Http2 => {
            // Twice the limit here: requests are checked against the exact limit (and counted)
            // by `check_head`; this bounds the memory a head can take before that.
            let list = u32::try_from(2 * limits.max_header_bytes).unwrap_or(u32::MAX);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(list)
                .serve_connection(io, service);
            tokio::pin!(conn);
            supervise(conn.as_mut(), |c| c.graceful_shutdown(), &activity, limits, stop).await
        }
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .max_headers(limits.max_headers)
                .max_header_size(limits.max_header_bytes)
                .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            supervise(conn.as_mut(), |c| c.graceful_shutdown(), &activity, limits, stop).await
        }
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_parse_too_large() => inc(&metrics.heads_too_large),
        Ok(Err(e)) => tracing::debug!("connection ended: {e}"),
        Err(Expired::HeaderTimeout) => inc(&metrics.header_timeouts),
        Err(Expired::IdleTimeout) => inc(&metrics.idle_timeouts),
    }
}
