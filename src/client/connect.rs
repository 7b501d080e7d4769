//! Opening connections to endpoints: TCP with a timeout, then TLS when the service asks for
//! it. The handshake counts as part of connecting: it fails before anything was sent.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::client::{ClientTls, Failure};

/// Opens connections to endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    timeout: Duration,
    tls: Option<Arc<ClientTls>>,
}

/// A connection to an endpoint, plain or TLS.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why no connection was made. Nothing was sent in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect to {0} failed: {1}")]
    Refused(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out after {t}", t = humantime::format_duration(*.1))]
    Timeout(SocketAddr, Duration),
    #[error("TLS handshake with {0} failed ({r}): {2}", r = .1.as_str())]
    Tls(SocketAddr, Failure, String),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, String),
    #[error("new connection to {0} closed before taking the request: {1}")]
    Closed(SocketAddr, String),
}

// === impl Connector ===

impl Connector {
    pub(crate) fn new(timeout: Duration, tls: Option<Arc<ClientTls>>) -> Connector {
        Connector { timeout, tls }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connected socket with Nagle off (requests and responses are small and latency-bound),
    /// and TLS on top when configured; both within the connect timeout. `name`: the
    /// endpoint's `server_name` tag, for SNI and verification.
    pub(crate) async fn connect(&self, addr: SocketAddr, name: Option<&str>) -> Result<Stream, ConnectError> {
        let connect = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| ConnectError::Refused(addr, e))?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(Stream::Plain(stream)),
                Some(tls) => match tls.connect(stream, addr, name).await {
                    Ok(s) => Ok(Stream::Tls(Box::new(s))),
                    Err((failure, detail)) => Err(ConnectError::Tls(addr, failure, detail)),
                },
            }
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout(addr, self.timeout))?
    }
}

// === impl Stream ===

impl Stream {
    /// Whether TLS negotiated HTTP/2 through ALPN.
    pub(crate) fn negotiated_h2(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
