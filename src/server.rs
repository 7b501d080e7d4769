//! Inbound connections, shared by proxy listeners and the admin port: accepting (with a cap,
//! and without spinning when the process runs out of file descriptors), telling HTTP/2 prior
//! knowledge from HTTP/1.1, and the limits a peer cannot exceed — time to send a request
//! head, idle time, head size, header count, transfer codings.
//!
//! Owns: the accept loop, the connection watchdog ([`Activity`]) and the per-socket counters
//! ([`InboundMetrics`]). Must not: know what is served on a connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, Request, Version, header};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::InboundLimits;
use crate::telemetry::metrics::inc;

/// Backoff after a failed `accept` (usually EMFILE): doubles from the first to the last.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// At most one warning of a kind per this long; the ones in between are counted.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Counters of one inbound socket (a listener or the admin port), kept across reloads.
#[derive(Debug, Default)]
pub struct InboundMetrics {
    pub accepted: AtomicU64,
    pub open: AtomicUsize,
    /// Closed at once: `max_connections` were already open.
    pub over_capacity: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Answered 431: head over `max_header_bytes` or more than `max_headers` fields.
    pub heads_too_large: AtomicU64,
    /// Answered 501: a transfer coding other than chunked.
    pub unsupported_codings: AtomicU64,
    /// TLS handshakes refused, by reason (see `tls::server::REFUSALS`).
    pub(crate) tls_refusals: [AtomicU64; 5],
}

/// Accepts from a socket: errors back off, connections over the cap are closed at once, and
/// both are logged at most once a second.
#[derive(Debug)]
pub(crate) struct Acceptor {
    socket: TcpListener,
    what: String,
    metrics: Arc<InboundMetrics>,
    failures: u32,
    errors: Throttle,
    refusals: Throttle,
}

/// Holds one place under the connection cap until dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<InboundMetrics>);

/// A log line at most once per `LOG_EVERY`, counting the ones it held back.
#[derive(Debug, Default)]
struct Throttle {
    suppressed: u64,
    logged: Option<Instant>,
}

// === impl Acceptor ===

impl Acceptor {
    pub(crate) fn new(socket: TcpListener, what: &str, metrics: Arc<InboundMetrics>) -> Acceptor {
        Acceptor {
            socket,
            what: what.to_string(),
            metrics,
            failures: 0,
            errors: Throttle::default(),
            refusals: Throttle::default(),
        }
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next connection within `max` open ones, or `None` once `stop` is cancelled.
    pub(crate) async fn next(
        &mut self,
        stop: &CancellationToken,
        max: u32,
    ) -> Option<(TcpStream, SocketAddr, Slot)> {
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return None,
                r = self.socket.accept() => r,
            };
            let (stream, peer) = match result {
                Ok(conn) => conn,
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    let delay = backoff(self.failures);
                    if let Some(suppressed) = self.errors.allow() {
                        tracing::warn!(what = %self.what, suppressed, retry_in = ?delay, "accept failed: {e}");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            self.failures = 0;
            inc(&self.metrics.accepted);
            if self.metrics.open.fetch_add(1, Ordering::AcqRel) >= max as usize {
                self.metrics.open.fetch_sub(1, Ordering::AcqRel);
                inc(&self.metrics.over_capacity);
                if let Some(suppressed) = self.refusals.allow() {
                    tracing::warn!(what = %self.what, %peer, max, suppressed, "connection refused: max_connections open");
                }
                continue; // dropping the stream closes it
            }
            return Some((stream, peer, Slot(self.metrics.clone())));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Throttle ===

impl Throttle {
    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.logged.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The pause after the `failures`-th consecutive accept error.
fn backoff(failures: u32) -> Duration {
    let (first, last) = ACCEPT_BACKOFF;
    first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(last)
}

/// What a new connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    /// It starts with the HTTP/2 connection preface (`PRI * HTTP/2.0`).
    Http2,
}

/// Tells the protocol from the first bytes, without consuming them: only the HTTP/2 preface
/// starts with "PRI" (HTTP/1.1 methods that start with "P" differ by the third byte).
pub(crate) async fn sniff(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut head = [0u8; 3];
    loop {
        let n = stream.peek(&mut head).await?;
        match &head[..n] {
            [] => return Ok(Protocol::Http1), // closed at once: HTTP/1.1 handles the EOF
            b"PRI" => return Ok(Protocol::Http2),
            [b'P'] | [b'P', b'R'] => {
                // A first packet of one or two bytes: rare; look again shortly (peek would
                // only return the same bytes at once).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return Ok(Protocol::Http1),
        }
    }
}

mod serve;
mod watchdog;

pub(crate) use serve::{serve, tls_handshake};
pub(crate) use watchdog::{Activity, Tracked};

/// Why a request head is refused before it reaches a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// 431: over `max_header_bytes` or `max_headers`.
    TooLarge,
    /// 501: a transfer coding other than chunked (RFC 9112 §6.1).
    UnsupportedCoding,
}

/// Checks what hyper leaves to us: HTTP/2 head size and header count (HTTP/1.1 heads are
/// bounded by hyper with the same limits), and HTTP/1.1 transfer codings. (A request with both
/// Transfer-Encoding and Content-Length reaches us without the latter: hyper drops it, as
/// RFC 9112 §6.3 asks of an intermediary, and closes the connection after the response.)
pub(crate) fn check_head<B>(req: &Request<B>, limits: &InboundLimits) -> Result<(), HeadError> {
    let headers = req.headers();
    if headers.len() > limits.max_headers {
        return Err(HeadError::TooLarge);
    }
    if req.version() == Version::HTTP_2 {
        // The decoded header list as SETTINGS_MAX_HEADER_LIST_SIZE counts it (32 per field).
        let size: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        if size > limits.max_header_bytes {
            return Err(HeadError::TooLarge);
        }
        return Ok(());
    }
    framing(headers)
}

fn framing(headers: &HeaderMap) -> Result<(), HeadError> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let codings = headers.get_all(header::TRANSFER_ENCODING).iter().flat_map(|v| {
        let text = v.to_str().unwrap_or("\u{0}");
        text.split(',').map(|c| c.trim().to_ascii_lowercase()).collect::<Vec<_>>()
    });
    if codings.collect::<Vec<_>>() != ["chunked"] {
        return Err(HeadError::UnsupportedCoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LISTENER_LIMITS;

    #[tokio::test]
    async fn sniffs_the_http2_preface_without_consuming_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        for (first, rest, expected) in [
            (&b"PRI * HTTP/2.0\r\n"[..], &b""[..], Protocol::Http2),
            (b"GET / HTTP/1.1\r\n", b"", Protocol::Http1),
            (b"PROPFIND / HTTP/1.1\r\n", b"", Protocol::Http1),
            (b"P", b"RI * HTTP/2.0", Protocol::Http2), // the preface split over two packets
            (b"P", b"OST / HTTP/1.1", Protocol::Http1),
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = socket.accept().await.unwrap();
            client.write_all(first).await.unwrap();
            let sniffing = tokio::spawn(async move { (sniff(&server).await.unwrap(), server) });
            if !rest.is_empty() {
                tokio::task::yield_now().await;
                client.write_all(rest).await.unwrap();
            }
            let (protocol, mut server) = sniffing.await.unwrap();
            assert_eq!(protocol, expected, "{:?}", String::from_utf8_lossy(first));
            let mut got = vec![0u8; first.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, first, "nothing consumed");
        }
    }

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let seen: Vec<_> = [1, 2, 3, 8, 9, 40].into_iter().map(|n| backoff(n).as_millis()).collect();
        assert_eq!(seen, [5, 10, 20, 640, 1000, 1000]);
    }

    fn head(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().version(version);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_refused() {
        let ok = head(Version::HTTP_11, &[("transfer-encoding", "chunked")]);
        assert_eq!(check_head(&ok, &LISTENER_LIMITS), Ok(()));
        for te in ["identity, chunked", "gzip, chunked", "chunked, chunked", "chunked, gzip", "x-custom"] {
            let req = head(Version::HTTP_11, &[("transfer-encoding", te)]);
            assert_eq!(check_head(&req, &LISTENER_LIMITS), Err(HeadError::UnsupportedCoding), "{te}");
        }
    }

    #[test]
    fn http2_heads_are_bounded_by_size_and_count() {
        let limits = InboundLimits { max_header_bytes: 1024, max_headers: 3, ..LISTENER_LIMITS };
        let big = "x".repeat(1000);
        let req = head(Version::HTTP_2, &[("x-big", &big)]);
        assert_eq!(check_head(&req, &limits), Err(HeadError::TooLarge));
        let many = head(Version::HTTP_2, &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")]);
        assert_eq!(check_head(&many, &limits), Err(HeadError::TooLarge));
        let fine = head(Version::HTTP_2, &[("a", "1"), ("b", "1")]);
        assert_eq!(check_head(&fine, &limits), Ok(()));
    }
}
