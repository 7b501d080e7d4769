//! The connection watchdog: closes an inbound connection that takes too long to send a
//! request head (slowloris) or moves no byte for the idle timeout.
//!
//! [`Watched`] records every byte read or written; the service marks each request with
//! [`Activity::begin`] and the response body ([`Tracked`]) ends it. One timer per connection
//! wakes only at header-timeout granularity while idle, or at the idle deadline while busy,
//! so a request costs a few atomic stores, never a timer reset.
//! A request head is timed from accept (nginx's rule) and, on HTTP/1.1, from the first byte
//! after the previous response; a head that starts while the timer sleeps is caught when it
//! wakes, then timed exactly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::Protocol;
use crate::clock::{instant_at, now_ms};
use crate::config::InboundLimits;

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No complete request head within `header_read_timeout`.
    HeaderTimeout,
    /// No byte either way for `idle_timeout`.
    IdleTimeout,
}

/// What one connection's watchdog knows. Shared by the I/O wrapper, the service and the
/// response bodies of that connection only.
#[derive(Debug)]
pub(crate) struct Activity {
    /// When the last byte moved.
    last_ms: AtomicU64,
    /// When the pending request head began, plus one (0: none pending).
    head_ms: AtomicU64,
    in_flight: AtomicU32,
    /// HTTP/1.1: every head is timed. HTTP/2: only the first (later reads may be pings).
    every_head: bool,
}

/// Counts one request as in flight until dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

/// An I/O stream whose reads and writes are recorded.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// A response body that ends its request's place in the connection's count.
#[derive(Debug)]
pub(crate) struct Tracked<B> {
    inner: B,
    _guard: RequestGuard,
}

// === impl Activity ===

impl Activity {
    /// A connection just accepted: its first head is timed from now.
    pub(crate) fn new(protocol: Protocol) -> Arc<Activity> {
        let now = now_ms();
        Arc::new(Activity {
            last_ms: AtomicU64::new(now),
            head_ms: AtomicU64::new(now + 1),
            in_flight: AtomicU32::new(0),
            every_head: protocol == Protocol::Http1,
        })
    }

    /// A request arrived (its head is complete).
    pub(crate) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_ms.store(0, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    fn read(&self) {
        let now = now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.every_head
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_ms.load(Ordering::Relaxed) == 0
        {
            self.head_ms.store(now + 1, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// When to look again: never later than a limit could expire.
    fn next_check(&self, limits: &InboundLimits) -> tokio::time::Instant {
        let (hrt, idle) = (ms(limits.header_read_timeout), ms(limits.idle_timeout));
        let idle_at = self.last_ms.load(Ordering::Relaxed) + idle;
        let at = match (self.in_flight.load(Ordering::Relaxed), self.head_ms.load(Ordering::Relaxed)) {
            (0, 0) => idle_at.min(now_ms() + hrt), // a head may start while asleep
            (0, head) => idle_at.min(head - 1 + hrt),
            _ => idle_at,
        };
        instant_at(at)
    }

    fn expired(&self, limits: &InboundLimits) -> Option<Expired> {
        let now = now_ms();
        let head = self.head_ms.load(Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && head > 0
            && now >= head - 1 + ms(limits.header_read_timeout)
        {
            return Some(Expired::HeaderTimeout);
        }
        (now >= self.last_ms.load(Ordering::Relaxed) + ms(limits.idle_timeout))
            .then_some(Expired::IdleTimeout)
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Runs a connection under the watchdog. `Ok`: it ended by itself (gracefully after `stop`);
/// `Err`: a limit expired and it was dropped, which closes it.
pub(crate) async fn supervise<C>(
    mut conn: Pin<&mut C>,
    graceful: impl Fn(Pin<&mut C>),
    activity: &Activity,
    limits: &InboundLimits,
    stop: &CancellationToken,
) -> Result<hyper::Result<()>, Expired>
where
    C: Future<Output = hyper::Result<()>>,
{
    let check = tokio::time::sleep_until(activity.next_check(limits));
    tokio::pin!(check);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => return Ok(r),
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                graceful(conn.as_mut());
            }
            () = check.as_mut() => match activity.expired(limits) {
                Some(why) => return Err(why),
                None => check.as_mut().reset(activity.next_check(limits)),
            },
        }
    }
}

// === impl Watched ===

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === impl Tracked ===

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, guard: RequestGuard) -> Self {
        Tracked { inner, _guard: guard }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::LISTENER_LIMITS;

    const LIMITS: InboundLimits = InboundLimits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        ..LISTENER_LIMITS
    };

    #[tokio::test(start_paused = true)]
    async fn a_head_is_timed_from_accept_then_from_its_first_byte() {
        let a = Activity::new(Protocol::Http1);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(a.expired(&LIMITS), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.expired(&LIMITS), Some(Expired::HeaderTimeout), "nothing sent in 10 s");

        let a = Activity::new(Protocol::Http1);
        let guard = a.begin(); // the first request arrived
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(a.expired(&LIMITS), None, "a slow upstream is not the client's fault");
        drop(guard);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(a.expired(&LIMITS), None, "idle keep-alive is fine until the idle timeout");
        a.read(); // a new head begins, and trickles
        tokio::time::advance(Duration::from_secs(10)).await;
        a.read();
        assert_eq!(a.expired(&LIMITS), Some(Expired::HeaderTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_after_the_idle_timeout() {
        let a = Activity::new(Protocol::Http2);
        drop(a.begin());
        tokio::time::advance(Duration::from_secs(250)).await;
        a.read(); // an HTTP/2 PING: activity, not a new head
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(a.expired(&LIMITS), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.expired(&LIMITS), Some(Expired::IdleTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_never_sleeps_past_a_limit() {
        let a = Activity::new(Protocol::Http1);
        drop(a.begin());
        // The clock keeps milliseconds: measure from its own reading of now.
        let start = instant_at(now_ms());
        let at = |a: &Activity| a.next_check(&LIMITS).duration_since(start).as_millis();
        assert_eq!(at(&a), 10_000, "idle: look again at header-timeout steps");
        tokio::time::advance(Duration::from_secs(3)).await;
        a.read();
        assert_eq!(at(&a), 13_000, "a head started 3 s in");
        let _busy = a.begin();
        assert_eq!(at(&a), 303_000, "busy: the idle deadline");
    }
}
