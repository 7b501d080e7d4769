//! The upstream connection layer: connecting to endpoints, keeping their connections, and
//! sending one request on one connection.
//!
//! Owns: the [`Connector`] (TCP with a timeout; TLS origination plugs in here), the
//! per-endpoint [`Pool`] of idle HTTP/1.1 senders and multiplexed HTTP/2 connections built
//! on `hyper::client::conn`, the [`Lease`] a response body holds until its last frame, and
//! the request bodies it sends (`body`: sendable once or replayable across attempts).
//! Must not: pick endpoints, decide retries, or know about services — a request that a
//! reused connection could not take (it was closing) is the one thing sent again here, on a
//! fresh connection, because it provably never left.

pub(crate) mod body;
mod connect;
mod pool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

pub(crate) use connect::{ConnectError, Connector, Stream};
pub(crate) use pool::{Lease, Pool};

use crate::config::{ServiceConfig, UpstreamProtocol};
use crate::tls::Registry;
use crate::tls::client::ClientTls;
use body::UpstreamBody;

/// How a service's connections are made and kept. Cheap to share; one per service and
/// settings (a reload that changes them makes a new one, whose pool entries are separate).
#[derive(Debug)]
pub(crate) struct Client {
    /// Tags pooled connections: entries made under other settings are never reused.
    id: u64,
    protocol: UpstreamProtocol,
    connector: Connector,
    idle: Duration,
    /// The TLS settings it was built from (`None`: plaintext).
    tls: Option<crate::config::UpstreamTls>,
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent, and the request comes back.
    Connect(ConnectError, Box<Request<UpstreamBody>>),
    /// The connection failed with the request on it (it may have reached the upstream).
    Http(hyper::Error),
}

// === impl Client ===

impl Client {
    /// Fails only when TLS material that validated a moment ago cannot be loaded now.
    pub(crate) fn new(config: &ServiceConfig, registry: &Registry) -> Result<Client, crate::pki::PkiError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let tls = config.tls.as_ref().map(|t| ClientTls::new(t, registry).map(Arc::new)).transpose()?;
        Ok(Client {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            protocol: config.protocol,
            connector: Connector::new(config.timeouts.connect, tls),
            idle: config.timeouts.idle,
            tls: config.tls.clone(),
        })
    }

    /// Whether `config` would build the same client (so its connections can be kept).
    pub(crate) fn serves(&self, config: &ServiceConfig) -> bool {
        self.protocol == config.protocol
            && self.connector.timeout() == config.timeouts.connect
            && self.idle == config.timeouts.idle
            && self.tls == config.tls
    }

    /// A raw connection (TCP listeners), with TLS when the service has it.
    pub(crate) async fn connect(&self, addr: SocketAddr, pool: &Pool) -> Result<Stream, ConnectError> {
        self.connector.connect(addr, pool.server_name().as_deref().map(String::as_str)).await
    }

    /// Sends `req` to `endpoint`, on an idle connection or a new one.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        pool: &Pool,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let (conn, reused) = match pool.checkout(self.id, self.protocol) {
            Some(conn) => (conn, true),
            None => match self.open(addr, pool).await {
                Ok(conn) => (conn, false),
                Err(e) => return Err(SendError::Connect(e, Box::new(req))),
            },
        };
        match conn.send(req).await {
            Ok(sent) => Ok(sent),
            // A reused connection that was closing took nothing: once more on a fresh one.
            Err((_, Some(req))) if reused => {
                tracing::debug!(endpoint = %addr, "pooled connection was closing; sending on a new one");
                match self.open(addr, pool).await {
                    Ok(conn) => conn.send(*req).await.map_err(|e| SendError::from_fresh(e, addr)),
                    Err(e) => Err(SendError::Connect(e, req)),
                }
            }
            Err(e) => Err(SendError::from_fresh(e, addr)),
        }
    }

    /// A new connection: HTTP/1.1, HTTP/2 (shared by concurrent requests), or whatever ALPN
    /// picks (`auto`; HTTP/2 connections then go to the pool's shared list).
    async fn open(&self, addr: SocketAddr, pool: &Pool) -> Result<pool::Conn, ConnectError> {
        let connect = || self.connect(addr, pool);
        match self.protocol {
            UpstreamProtocol::Http1 => pool::Conn::http1(connect().await?, self.id, self.idle, addr).await,
            UpstreamProtocol::Http2 => pool.http2(self.id, self.idle, addr, connect).await,
            UpstreamProtocol::Auto if pool.speaks_h2() => pool.http2(self.id, self.idle, addr, connect).await,
            UpstreamProtocol::Auto => {
                let stream = connect().await?;
                if stream.negotiated_h2() {
                    pool.adopt_http2(stream, self.id, self.idle, addr).await
                } else {
                    pool::Conn::http1(stream, self.id, self.idle, addr).await
                }
            }
        }
    }
}

// === impl SendError ===

impl SendError {
    /// A connection that refused a request it was never given counts as a failed connect.
    fn from_fresh((e, req): (hyper::Error, Option<Box<Request<UpstreamBody>>>), addr: SocketAddr) -> Self {
        match req {
            Some(req) => SendError::Connect(ConnectError::Closed(addr, error_chain(&e)), req),
            None => SendError::Http(e),
        }
    }
}

/// The error and its causes on one line ("a: b: c").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
