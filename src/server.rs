//! Inbound connections, shared by proxy listeners and the admin port: accepting without
//! spinning when the process runs out of file descriptors.
//!
//! Owns: the accept loop's error handling (backoff, a rate-limited log line). Must not: know
//! what is served on a connection.

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

/// The pause after the `failures`-th consecutive accept error.
fn backoff(failures: u32) -> Duration {
    let (first, last) = ACCEPT_BACKOFF;
    first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let seen: Vec<_> = [1, 2, 3, 8, 9, 40].into_iter().map(|n| backoff(n).as_millis()).collect();
        assert_eq!(seen, [5, 10, 20, 640, 1000, 1000]);
    }
}
