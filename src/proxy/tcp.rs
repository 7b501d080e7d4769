//! L4 forwarding: one endpoint per accepted connection, bytes copied both ways.
//!
//! Owns: connect timeout, idle timeout (no bytes either way), and half-close (EOF one way
//! shuts down the write side of the other, so request/response protocols still finish).
//! Must not: read or alter the bytes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::Upstream;
use super::attempt::{Attempts, Verdict};
use super::retry::Retry;
use crate::client::Stream;
use crate::config::{HashKey, RetryOn};
use crate::routing::{self as route, Routed};
use crate::telemetry::{metrics, trace};
use crate::upstream::breaker::Refused;
use crate::upstream::{InFlight, Target};
use opentelemetry::KeyValue;

/// Proxies one accepted connection to the chosen endpoint until both sides close. A refused
/// connection (rate limit, open breaker, no endpoint, connect failure) is simply closed.
pub(crate) async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    up: Arc<Upstream>,
    mut inbound: S,
    client: SocketAddr,
) {
    let refuse = |reason: &str| tracing::warn!(service = %up.name, reason, "tcp connection refused");
    if up.limiter.as_ref().is_some_and(|l| l.check(None).is_err()) {
        metrics::inc(&up.metrics.rate_limited);
        return refuse("rate_limited");
    }
    let mut admission = match up.breaker.admit() {
        Ok(a) => a,
        Err(Refused::Open) => return refuse("circuit_open"),
        Err(Refused::Overloaded) => return refuse("overloaded"),
    };
    metrics::inc(&up.metrics.tcp_connections);
    let span = up.telemetry.tracing.as_ref().and_then(|t| {
        let attrs = || {
            vec![
                KeyValue::new("network.transport", "tcp"),
                KeyValue::new("outrider.service", up.name.to_string()),
            ]
        };
        t.start(&http::HeaderMap::new(), "tcp", attrs)
    });
    let Some((mut outbound, in_flight)) = connect(&up, client).await else {
        admission.record(false);
        if let Some(cx) = span {
            trace::finish(&cx, None, Some("connect_failed"), Vec::new);
        }
        return;
    };
    admission.record(true);
    let addr = in_flight.addr();
    let (mut sent, mut received) = (0, 0);
    match copy_until_idle(&mut inbound, &mut outbound, up.config.timeouts.tcp_idle).await {
        Ok(Some((up_bytes, down_bytes))) => {
            (sent, received) = (up_bytes, down_bytes);
            tracing::debug!(service = %up.name, endpoint = %addr, up_bytes, down_bytes, "tcp connection closed")
        }
        Ok(None) => tracing::debug!(service = %up.name, endpoint = %addr, "tcp connection idle: closed"),
        Err(e) => tracing::debug!(service = %up.name, endpoint = %addr, "tcp connection ended: {e}"),
    }
    up.metrics.tcp_bytes_up.fetch_add(sent, Ordering::Relaxed);
    up.metrics.tcp_bytes_down.fetch_add(received, Ordering::Relaxed);
    if let Some(cx) = span {
        let attrs = || {
            vec![
                KeyValue::new("server.address", addr.ip().to_string()),
                KeyValue::new("server.port", i64::from(addr.port())),
                KeyValue::new("outrider.endpoint", addr.to_string()),
                KeyValue::new("outrider.bytes_sent", sent as i64),
                KeyValue::new("outrider.bytes_received", received as i64),
            ]
        };
        trace::finish(&cx, None, None, attrs);
    }
}

/// Connects to an endpoint through the same attempt loop as HTTP: after a connect failure
/// (nothing was sent, so always safe) another endpoint, with backoff, within the budget and
/// the request timeout. A `ring_hash` service keyed on `source` hashes the client's address
/// (the only key a connection has).
async fn connect(up: &Upstream, client: SocketAddr) -> Option<(Stream, InFlight)> {
    let policy = &up.config.resilience.retries;
    let by_source = matches!(up.config.routing.hash_key, Some(HashKey::Source));
    let hash = by_source.then(|| route::source_hash(client.ip()));
    let routed = Routed { route: None, target: Target { subset: 0, hash } };
    let mut attempts = Attempts::new(up, policy.max_attempts, routed);
    loop {
        let endpoint = match attempts.pick() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(service = %up.name, reason = e.code(), "tcp connection refused: {e}");
                return None;
            }
        };
        let started = Instant::now();
        let error = match up.client.connect(endpoint.addr(), &endpoint.state().pool).await {
            Ok(stream) => {
                attempts.report(&endpoint, false, started.elapsed());
                return Some((stream, endpoint));
            }
            Err(e) => e,
        };
        attempts.report(&endpoint, true, started.elapsed());
        metrics::inc(&up.metrics.connect_errors);
        let tls_error = match &error {
            crate::client::ConnectError::Tls(_, failure, _) => Some(*failure),
            _ => None,
        };
        if let Some(failure) = tls_error {
            up.metrics.tls_failure(failure);
        }
        let reason = if tls_error.is_some() { "tls_handshake_failed" } else { "connect_failed" };
        let (attempt, addr) = (attempts.count(), endpoint.addr());
        tracing::warn!(
            service = %up.name, endpoint = %addr, reason, tls_error = tls_error.map(|f| f.as_str()), attempt,
            "tcp connect failed: {error}"
        );
        let retry =
            if policy.retry_on.contains(&RetryOn::ConnectFailure) { Retry::Unsent } else { Retry::No };
        match attempts.verdict(retry, true, true, None) {
            Verdict::Retry(delay) => tokio::time::sleep(delay).await,
            Verdict::Final => return None,
        }
    }
}

/// Copies both ways with half-close; `Ok(None)` when no byte moved for `idle`.
pub(crate) async fn copy_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> std::io::Result<Option<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Activity::new();
    let mut a = Watched { inner: a, clock: &clock };
    let mut b = Watched { inner: b, clock: &clock };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => r.map(Some),
        () = clock.idle_for(idle) => Ok(None),
    }
}

/// Time of the last byte moved, in milliseconds since `base`.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { base: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if Instant::now() >= last + idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

/// A stream that records activity on every read or write that moves bytes.
struct Watched<'a, S> {
    inner: &'a mut S,
    clock: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test(start_paused = true)]
    async fn idle_connection_is_closed_after_the_idle_timeout() {
        let (mut app, mut a) = duplex(64);
        let (mut b, mut server) = duplex(64);
        let copy =
            tokio::spawn(async move { copy_until_idle(&mut a, &mut b, Duration::from_secs(10)).await });
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!copy.is_finished(), "closed before the idle timeout");
        server.write_all(b"pong").await.unwrap(); // activity resets the clock
        app.read_exact(&mut buf).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        tokio::task::yield_now().await;
        assert!(!copy.is_finished(), "activity did not reset the idle clock");
        let result = copy.await.unwrap().unwrap();
        assert_eq!(result, None, "expected an idle close");
    }
}
