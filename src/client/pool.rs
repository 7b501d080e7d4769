//! One endpoint's connections: idle HTTP/1.1 senders (one request at a time each) and
//! multiplexed HTTP/2 connections (another is opened once every one carries as many streams
//! as its server allows).
//!
//! Checkout and checkin are a lock-free queue operation (HTTP/1.1) or an `ArcSwap` load and
//! an atomic add (HTTP/2); only opening an HTTP/2 connection takes a lock, so concurrent
//! requests share the one being opened. A connection unused for the idle timeout is closed
//! by its own task. Memory is taken on first use: endpoints that get no traffic cost a word.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::UpstreamBody;
use super::{ConnectError, Stream, error_chain};
use crate::clock::{instant_at, now_ms};
use crate::config::UpstreamProtocol;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when they come back.
const MAX_IDLE: usize = 128;
/// Streams per HTTP/2 connection until its server's SETTINGS say otherwise.
const DEFAULT_MAX_STREAMS: usize = 100;

/// The connections of one endpoint, and the name TLS connects to it by.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    inner: OnceLock<Box<Inner>>,
    /// The endpoint's `server_name` tag (discovery may change it; an endpoint that stays
    /// keeps its pool): SNI and the verified name, over the service's configured one.
    server_name: ArcSwapOption<String>,
}

#[derive(Debug)]
struct Inner {
    idle: ArrayQueue<H1>,
    h2: ArcSwap<Vec<H2>>,
    /// Held while an HTTP/2 connection is being opened, so concurrent requests share it.
    opening: tokio::sync::Mutex<()>,
    /// `protocol: auto`: this endpoint negotiated h2 before (so new requests wait for one
    /// shared connection instead of racing to open their own).
    speaks_h2: std::sync::atomic::AtomicBool,
}

/// What a connection's task and its users share.
#[derive(Debug)]
struct Meta {
    /// The client settings it was made under (see `Client::id`).
    client: u64,
    /// HTTP/1.1: a request is on it. HTTP/2: streams open on it.
    streams: AtomicUsize,
    /// HTTP/2: the server's SETTINGS_MAX_CONCURRENT_STREAMS, as the connection last saw it.
    max_streams: AtomicUsize,
    last_used_ms: AtomicU64,
    closed: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct H1 {
    sender: http1::SendRequest<UpstreamBody>,
    meta: Arc<Meta>,
}

#[derive(Debug, Clone)]
pub(crate) struct H2 {
    sender: http2::SendRequest<UpstreamBody>,
    meta: Arc<Meta>,
}

/// A connection checked out for one request.
#[derive(Debug)]
pub(crate) enum Conn {
    H1(H1),
    H2(H2),
}

/// Held by the response body until its last frame: then an HTTP/1.1 connection goes back to
/// the pool; an HTTP/2 stream is counted as closed when the lease drops, either way.
#[derive(Debug)]
pub(crate) enum Lease {
    H1(H1),
    H2(StreamSlot),
}

/// One counted stream on an HTTP/2 connection.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<Meta>);

type Sent = Result<(Response<Incoming>, Lease), (hyper::Error, Option<Box<Request<UpstreamBody>>>)>;

// === impl Pool ===

impl Pool {
    /// The TLS name from the endpoint's `server_name` tag, if it has one.
    pub(crate) fn server_name(&self) -> Option<Arc<String>> {
        self.server_name.load_full()
    }

    /// Takes the endpoint's current `server_name` tag (new connections use it).
    pub(crate) fn set_server_name(&self, name: Option<&String>) {
        if self.server_name.load().as_deref() != name {
            self.server_name.store(name.map(|n| Arc::new(n.clone())));
        }
    }

    fn inner(&self) -> &Inner {
        self.inner.get_or_init(|| {
            Box::new(Inner {
                idle: ArrayQueue::new(MAX_IDLE),
                h2: ArcSwap::from_pointee(Vec::new()),
                opening: tokio::sync::Mutex::new(()),
                speaks_h2: std::sync::atomic::AtomicBool::new(false),
            })
        })
    }

    /// An idle HTTP/1.1 connection or an HTTP/2 one with a free stream, made under `client`.
    pub(crate) fn checkout(&self, client: u64, protocol: UpstreamProtocol) -> Option<Conn> {
        let inner = self.inner.get()?;
        let h2 = || inner.h2.load().iter().find_map(|h2| h2.claim(client)).map(Conn::H2);
        let h1 = || {
            while let Some(h1) = inner.idle.pop() {
                if h1.meta.client == client && !h1.sender.is_closed() {
                    h1.meta.streams.store(1, Ordering::Relaxed);
                    return Some(Conn::H1(h1));
                }
            }
            None
        };
        match protocol {
            UpstreamProtocol::Http1 => h1(),
            UpstreamProtocol::Http2 => h2(),
            UpstreamProtocol::Auto => h2().or_else(h1),
        }
    }

    /// Whether ALPN chose h2 on this endpoint before (`protocol: auto`).
    pub(crate) fn speaks_h2(&self) -> bool {
        self.inner.get().is_some_and(|i| i.speaks_h2.load(Ordering::Relaxed))
    }

    /// Opens an HTTP/2 connection, unless a concurrent request just did and it has room.
    pub(crate) async fn http2<F, Fut>(
        &self,
        client: u64,
        idle: Duration,
        addr: SocketAddr,
        connect: F,
    ) -> Result<Conn, ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Stream, ConnectError>>,
    {
        let inner = self.inner();
        let _opening = inner.opening.lock().await;
        if let Some(conn) = inner.h2.load().iter().find_map(|h2| h2.claim(client)) {
            return Ok(Conn::H2(conn));
        }
        let h2 = H2::handshake(connect().await?, client, idle, addr).await?;
        self.share(h2.clone(), client);
        Ok(Conn::H2(h2))
    }

    /// Adds a connection on which ALPN chose h2 (`protocol: auto`) to the shared list.
    pub(crate) async fn adopt_http2(
        &self,
        stream: Stream,
        client: u64,
        idle: Duration,
        addr: SocketAddr,
    ) -> Result<Conn, ConnectError> {
        let inner = self.inner();
        inner.speaks_h2.store(true, Ordering::Relaxed);
        let h2 = H2::handshake(stream, client, idle, addr).await?;
        self.share(h2.clone(), client);
        Ok(Conn::H2(h2))
    }

    fn share(&self, h2: H2, client: u64) {
        self.inner().h2.rcu(|list| {
            let mut next: Vec<H2> = list.iter().filter(|c| c.usable(client)).cloned().collect();
            next.push(h2.clone());
            next
        });
    }

    fn checkin(&self, h1: H1) {
        h1.meta.last_used_ms.store(now_ms(), Ordering::Relaxed);
        h1.meta.streams.store(0, Ordering::Relaxed);
        // A full queue drops the sender, which closes that connection.
        let _ = self.inner().idle.push(h1);
    }
}

// === impl Conn ===

impl Conn {
    /// Opens an HTTP/1.1 connection on a connected socket.
    pub(crate) async fn http1(
        stream: Stream,
        client: u64,
        idle: Duration,
        addr: SocketAddr,
    ) -> Result<Conn, ConnectError> {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(addr, error_chain(&e)))?;
        let meta = Meta::new(client, 1);
        tokio::spawn(drive_http1(conn.with_upgrades(), meta.clone(), idle, addr));
        Ok(Conn::H1(H1 { sender, meta }))
    }

    /// Sends the request. An error carries the request back when it was provably not sent.
    pub(crate) async fn send(self, mut req: Request<UpstreamBody>) -> Sent {
        match self {
            Conn::H1(mut h1) => {
                if req.version() != http::Version::HTTP_11 {
                    // Built for HTTP/2 (`protocol: auto`), but ALPN chose HTTP/1.1 here.
                    *req.version_mut() = http::Version::HTTP_11;
                    if let Some(path) = req.uri().path_and_query().cloned() {
                        *req.uri_mut() = http::Uri::from(path);
                    }
                }
                if let Err(e) = h1.sender.ready().await {
                    return Err((e, Some(Box::new(req))));
                }
                match h1.sender.try_send_request(req).await {
                    Ok(resp) => Ok((resp, Lease::H1(h1))),
                    Err(mut e) => {
                        let unsent = e.take_message().map(Box::new);
                        Err((e.into_error(), unsent))
                    }
                }
            }
            Conn::H2(mut h2) => {
                let slot = StreamSlot(h2.meta.clone());
                match h2.sender.try_send_request(req).await {
                    Ok(resp) => Ok((resp, Lease::H2(slot))),
                    Err(mut e) => {
                        let unsent = e.take_message().map(Box::new);
                        Err((e.into_error(), unsent))
                    }
                }
            }
        }
    }
}

// === impl Lease ===

impl Lease {
    /// The response was read to its end: an HTTP/1.1 connection can take the next request.
    pub(crate) fn release(self, pool: &Pool) {
        match self {
            Lease::H1(h1) => pool.checkin(h1),
            Lease::H2(slot) => drop(slot),
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

// === impl H2 ===

impl H2 {
    async fn handshake(
        stream: Stream,
        client: u64,
        idle: Duration,
        addr: SocketAddr,
    ) -> Result<H2, ConnectError> {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(addr, error_chain(&e)))?;
        let meta = Meta::new(client, 1);
        tokio::spawn(drive_http2(conn, meta.clone(), idle, addr));
        Ok(H2 { sender, meta })
    }

    fn usable(&self, client: u64) -> bool {
        self.meta.client == client && !self.meta.closed.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    /// Takes a stream on this connection if it has one free.
    fn claim(&self, client: u64) -> Option<H2> {
        if !self.usable(client) {
            return None;
        }
        let max = self.meta.max_streams.load(Ordering::Relaxed);
        let taken = self.meta.streams.fetch_add(1, Ordering::Relaxed);
        if taken >= max {
            self.meta.streams.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(self.clone())
    }
}

// === impl Meta ===

impl Meta {
    fn new(client: u64, streams: usize) -> Arc<Meta> {
        Arc::new(Meta {
            client,
            streams: AtomicUsize::new(streams),
            max_streams: AtomicUsize::new(DEFAULT_MAX_STREAMS),
            last_used_ms: AtomicU64::new(now_ms()),
            closed: AtomicBool::new(false),
        })
    }

    /// When the connection may be closed for idleness, if nothing uses it until then.
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        instant_at(self.last_used_ms.load(Ordering::Relaxed) + idle.as_millis() as u64)
    }

    fn idle_for(&self, idle: Duration) -> bool {
        self.streams.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= self.idle_deadline(idle)
    }
}

/// Runs an HTTP/1.1 connection until it ends or sits unused for `idle`.
async fn drive_http1<C>(conn: C, meta: Arc<Meta>, idle: Duration, addr: SocketAddr)
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %addr, "upstream connection ended: {}", error_chain(&e));
                }
                break;
            }
            () = tokio::time::sleep_until(meta.idle_deadline(idle)) => {
                if meta.idle_for(idle) {
                    tracing::debug!(endpoint = %addr, "closing idle upstream connection");
                    break;
                }
                // In use: look again one idle period after its last use.
                meta.last_used_ms.fetch_max(now_ms(), Ordering::Relaxed);
            }
        }
    }
    meta.closed.store(true, Ordering::Relaxed);
}

/// Runs an HTTP/2 connection until it ends or has no stream for `idle`, keeping the server's
/// stream limit where checkouts can read it.
async fn drive_http2(
    conn: http2::Connection<TokioIo<Stream>, UpstreamBody, TokioExecutor>,
    meta: Arc<Meta>,
    idle: Duration,
    addr: SocketAddr,
) {
    let mut conn = Box::pin(conn);
    let polled = std::future::poll_fn(|cx| {
        let r = std::future::Future::poll(conn.as_mut(), cx);
        meta.max_streams.store(conn.current_max_send_streams().max(1), Ordering::Relaxed);
        r
    });
    let mut polled = std::pin::pin!(polled);
    loop {
        tokio::select! {
            r = polled.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %addr, "upstream HTTP/2 connection ended: {}", error_chain(&e));
                }
                break;
            }
            () = tokio::time::sleep_until(meta.idle_deadline(idle)) => {
                if meta.idle_for(idle) {
                    tracing::debug!(endpoint = %addr, "closing idle upstream HTTP/2 connection");
                    break;
                }
                meta.last_used_ms.fetch_max(now_ms(), Ordering::Relaxed);
            }
        }
    }
    meta.closed.store(true, Ordering::Relaxed);
}
