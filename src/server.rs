//! Inbound connections, shared by proxy listeners and the admin port: accepting without
//! spinning when the process runs out of file descriptors, and telling HTTP/2 prior
//! knowledge from HTTP/1.1 on a new connection.
//!
//! Owns: the accept loop's error handling (backoff, a rate-limited log line) and protocol
//! sniffing. Must not: know what is served on a connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Backoff after a failed `accept` (usually EMFILE): doubles from the first to the last.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// At most one "accept failed" line per this long; the lines in between are counted.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Accepts from a socket; errors back off and are logged at most once a second.
#[derive(Debug)]
pub(crate) struct Acceptor {
    socket: TcpListener,
    what: &'static str,
    failures: u32,
    suppressed: u64,
    logged: Option<Instant>,
}

// === impl Acceptor ===

impl Acceptor {
    pub(crate) fn new(socket: TcpListener, what: &'static str) -> Acceptor {
        Acceptor { socket, what, failures: 0, suppressed: 0, logged: None }
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next connection, or `None` once `stop` is cancelled.
    pub(crate) async fn next(&mut self, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return None,
                r = self.socket.accept() => r,
            };
            match result {
                Ok(conn) => {
                    self.failures = 0;
                    return Some(conn);
                }
                Err(e) => {
                    self.failed(&e);
                    let delay = backoff(self.failures);
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        self.failures = self.failures.saturating_add(1);
        let now = Instant::now();
        if self.logged.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        let (what, suppressed) = (self.what, std::mem::take(&mut self.suppressed));
        tracing::warn!(what, suppressed, retry_in = ?backoff(self.failures), "accept failed: {e}");
        self.logged = Some(now);
    }
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

/// The pause after the `failures`-th consecutive accept error.
fn backoff(failures: u32) -> Duration {
    let (first, last) = ACCEPT_BACKOFF;
    first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(last)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
