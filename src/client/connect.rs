//! Opening TCP connections to endpoints, with a timeout. TLS origination wraps this.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Opens connections to endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    timeout: Duration,
}

/// Why no connection was made. Nothing was sent in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect to {0} failed: {1}")]
    Refused(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out after {t}", t = humantime::format_duration(*.1))]
    Timeout(SocketAddr, Duration),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, String),
    #[error("new connection to {0} closed before taking the request: {1}")]
    Closed(SocketAddr, String),
}

// === impl Connector ===

impl Connector {
    pub(crate) fn new(timeout: Duration) -> Connector {
        Connector { timeout }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connected socket with Nagle off (requests and responses are small and latency-bound).
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr, self.timeout)),
            Ok(Err(e)) => return Err(ConnectError::Refused(addr, e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
