//! The process's one connection to etcd, shared by every user: endpoint watches, overlay
//! watches, registration (and later leader election). etcd-client multiplexes all of their
//! requests and watch streams over one gRPC channel, which reconnects by itself; a watch
//! that fails retries on the same channel and never disturbs the others.
//!
//! Owns: connecting (options, TLS, credentials), the reconnect backoff and the cheap TCP
//! probe that ends it early when etcd comes back, and the watch-then-list loop of a prefix
//! (`watch.rs`). Must not: know what the values mean — its users decode them.

pub(crate) mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::config::EtcdConfig;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a disconnected user checks whether etcd accepts connections again.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// A shared, lazily connected etcd client for one cluster configuration.
pub(crate) struct Etcd {
    config: EtcdConfig,
    /// Connected on first use; replaced only when it must be (credentials rejected).
    client: tokio::sync::Mutex<Option<Client>>,
    /// Connections made (1 while it stays healthy), for `/metrics`.
    pub(crate) connects: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Ended(String),
}

// === impl Etcd ===

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("endpoints", &self.config.endpoints).finish_non_exhaustive()
    }
}

impl Etcd {
    pub(crate) fn new(config: EtcdConfig) -> Etcd {
        Etcd { config, client: tokio::sync::Mutex::new(None), connects: AtomicU64::new(0) }
    }

    pub(crate) fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// The shared client, connecting first if nobody has yet. Callers that arrive during a
    /// connect wait for it instead of opening their own.
    pub(crate) async fn client(&self) -> Result<Client, EtcdError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let client = connect(&self.config).await?;
        self.connects.fetch_add(1, Ordering::Relaxed);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// After `e`: whether the connection itself must go (rejected credentials: a new one
    /// authenticates again). Transport errors never need it — the channel reconnects.
    pub(crate) async fn failed(&self, e: &EtcdError) {
        if let EtcdError::Etcd(etcd_client::Error::GRpcStatus(s)) = e
            && s.code() == tonic::Code::Unauthenticated
        {
            tracing::warn!("etcd rejected our credentials: connecting again");
            *self.client.lock().await = None;
        }
    }

    /// Waits out a reconnect backoff, but ends it early when etcd comes back: every
    /// `PROBE_EVERY` a plain TCP connect (no TLS, no gRPC — nothing etcd has to serve)
    /// checks whether an endpoint that refused connections accepts them again. So a long
    /// outage, whose backoff has grown to its cap, is followed by a retry within a probe
    /// interval, while a down etcd sees only SYNs. After a connectivity failure, an etcd
    /// that accepts connections at the first probe counts as back too. True when it ended
    /// early (reset the backoff: etcd may still be starting up, so the next attempts should
    /// be quick).
    pub(crate) async fn wait_for_retry(&self, delay: Duration, connectivity: bool) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        let mut was_down = connectivity || !self.reachable().await;
        loop {
            let jitter = PROBE_EVERY.mul_f64(0.5 + fastrand::f64() / 2.0);
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + jitter)).await;
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let up = self.reachable().await;
            if up && was_down {
                return true;
            }
            was_down = !up;
        }
    }

    /// Whether any endpoint accepts a TCP connection within the dial timeout.
    async fn reachable(&self) -> bool {
        for url in &self.config.endpoints {
            let hostport = url.split_once("://").map_or(url.as_str(), |(_, r)| r).trim_end_matches('/');
            let connect = tokio::net::TcpStream::connect(hostport);
            if matches!(tokio::time::timeout(self.config.dial_timeout, connect).await, Ok(Ok(_))) {
                return true;
            }
        }
        false
    }
}

// === impl EtcdError ===

impl EtcdError {
    /// The failure was reaching etcd (transport, unavailable, timeout), not what it answered.
    pub(crate) fn is_connectivity(&self) -> bool {
        match self {
            EtcdError::Timeout(_) => true,
            EtcdError::Etcd(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
            EtcdError::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                )
            }
            _ => false,
        }
    }
}

/// A client whose calls fail instead of hanging on a dead or partitioned member: HTTP/2
/// keepalives on an idle channel, and watches that require a leader.
async fn connect(c: &EtcdConfig) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(c.dial_timeout)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let (Some(user), Some(password)) = (&c.username, &c.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &c.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    let limit = c.dial_timeout + c.request_timeout;
    let connect = Client::connect(c.endpoints.clone(), Some(options));
    tokio::time::timeout(limit, connect).await.map_err(|_| EtcdError::Timeout(limit))?.map_err(Into::into)
}

fn tls_options(tls: &crate::config::EtcdTls) -> Result<etcd_client::TlsOptions, EtcdError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| EtcdError::Ended(format!("cannot read {}: {e}", p.display())))
    };
    let mut options = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// Full jitter: a random delay up to `base × 2^attempt`, capped.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    cap.mul_f64(fastrand::f64()).max(Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_MAX, "{d:?}");
            assert!(d >= Duration::from_millis(10));
        }
        let early: Vec<_> = (0..50).map(|_| backoff(0)).collect();
        assert!(early.iter().all(|d| *d <= BACKOFF_BASE));
    }
}
