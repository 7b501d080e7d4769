//! etcd discovery: list a prefix, then watch it, for as long as the service exists.
//!
//! Algorithm: get the prefix at revision R, publish, watch from R+1. A compacted watch is
//! re-listed and resumed; any other error reconnects with jittered exponential backoff while
//! the balancer keeps serving the last known set — never an empty one because etcd is away.
//! Watches require a leader and the channel sends HTTP/2 keepalives, so a partitioned member
//! surfaces as an error instead of a silent hang. Each published set is also written to a
//! snapshot file (when configured) so a restart can serve while etcd is down.
//! Must not: block the request path, or drop endpoints it cannot decode silently (they are
//! logged and counted, and never take the other endpoints with them).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::decode::decode;
use crate::config::{EndpointSpec, EtcdConfig, UpstreamProtocol};
use crate::upstream::ServiceHandle;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a disconnected watch checks whether etcd accepts connections again.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// One service's watch, as configured.
#[derive(Debug, Clone)]
pub struct Watch {
    pub service: String,
    pub cluster: EtcdConfig,
    pub prefix: String,
    pub selector: BTreeMap<String, String>,
    /// Networks endpoints must be in (empty: any); others are refused and counted.
    pub allowed: Vec<ipnet::IpNet>,
    pub protocol: UpstreamProtocol,
}

/// What `/upstreams` shows of a watch.
#[derive(Debug, Default)]
pub struct WatchStatus {
    pub revision: AtomicI64,
    pub reconnects: AtomicU64,
    pub undecodable: AtomicU64,
    /// Endpoints refused because their address is outside `allowed_networks`.
    pub refused: AtomicU64,
    state: Mutex<(&'static str, Option<SystemTime>)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("watch ended: {0}")]
    Ended(String),
}

impl WatchError {
    /// The failure was reaching etcd (transport, unavailable, timeout), not what it answered.
    fn is_connectivity(&self) -> bool {
        match self {
            WatchError::Timeout(_) => true,
            WatchError::Etcd(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
            WatchError::Etcd(etcd_client::Error::GRpcStatus(s)) => {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                )
            }
            _ => false,
        }
    }
}

/// The persisted last-known-good set of one service.
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    revision: i64,
    endpoints: Vec<SnapshotEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEndpoint {
    addr: std::net::SocketAddr,
    weight: u32,
    tags: BTreeMap<String, String>,
}

// === impl WatchStatus ===

impl WatchStatus {
    fn set_state(&self, state: &'static str) {
        self.lock().0 = state;
    }

    fn updated(&self, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.lock().1 = Some(SystemTime::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (&'static str, Option<SystemTime>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn seconds_since_update(&self) -> Option<f64> {
        self.lock().1.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let since = self.seconds_since_update();
        let (state, _) = *self.lock();
        serde_json::json!({
            "state": state,
            "revision": self.revision.load(Ordering::Relaxed),
            "seconds_since_update": since,
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "undecodable_values": self.undecodable.load(Ordering::Relaxed),
            "refused_endpoints": self.refused.load(Ordering::Relaxed),
        })
    }
}

// === impl Watch ===

impl Watch {
    pub(crate) async fn run(self, service: ServiceHandle, status: Arc<WatchStatus>, stop: CancellationToken) {
        status.set_state("connecting");
        if let Some(snap) = self.load_snapshot() {
            tracing::warn!(service = %self.service, revision = snap.revision, endpoints = snap.endpoints.len(),
                "serving the last-known-good snapshot until etcd answers");
            service.update(snap.endpoints.into_iter().map(Into::into).collect());
            status.set_state("snapshot");
        }
        let mut attempt = 0u32;
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.session(&service, &status, &mut attempt) => r,
            };
            let Err(e) = result;
            status.reconnects.fetch_add(1, Ordering::Relaxed);
            status.set_state("disconnected");
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tracing::warn!(service = %self.service, retry_in = ?delay, "etcd watch failed, keeping the last known endpoints: {e}");
            tokio::select! {
                () = stop.cancelled() => return,
                back = wait_for_retry(&self.cluster, delay, e.is_connectivity()) => if back {
                    tracing::info!(service = %self.service, "etcd is reachable again: reconnecting now");
                    attempt = 0;
                },
            }
        }
    }

    /// One connection: list, then watch until an error. Never returns `Ok`.
    async fn session(
        &self,
        service: &ServiceHandle,
        status: &WatchStatus,
        attempt: &mut u32,
    ) -> Result<std::convert::Infallible, WatchError> {
        let mut client = connect(&self.cluster).await?;
        let mut values = BTreeMap::new();
        let mut revision = self.list(&mut client, &mut values, service, status).await?;
        *attempt = 0;
        loop {
            let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
            // Creating a watch waits for a ready channel: bound it like any request.
            let t = self.cluster.request_timeout;
            let create = client.watch(self.prefix.as_str(), Some(options));
            let mut stream = tokio::time::timeout(t, create).await.map_err(|_| WatchError::Timeout(t))??;
            status.set_state("watching");
            loop {
                let Some(resp) = stream.message().await? else {
                    return Err(WatchError::Ended("stream closed by etcd".into()));
                };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        tracing::info!(service = %self.service, compacted = resp.compact_revision(), "watch fell behind a compaction; re-listing");
                        revision = self.list(&mut client, &mut values, service, status).await?;
                        break;
                    }
                    return Err(WatchError::Ended(resp.cancel_reason().to_string()));
                }
                let events = resp.events();
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match event.event_type() {
                        EventType::Put => {
                            values.insert(key, kv.value().to_vec());
                        }
                        EventType::Delete => {
                            values.remove(&key);
                        }
                    }
                }
                if let Some(h) = resp.header() {
                    revision = revision.max(h.revision());
                }
                if !events.is_empty() {
                    self.publish(&values, revision, service, status);
                }
            }
        }
    }

    /// Reads the whole prefix, publishes it, and returns the revision it was read at.
    async fn list(
        &self,
        client: &mut Client,
        values: &mut BTreeMap<String, Vec<u8>>,
        service: &ServiceHandle,
        status: &WatchStatus,
    ) -> Result<i64, WatchError> {
        let timeout = self.cluster.request_timeout;
        let get = client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let resp = tokio::time::timeout(timeout, get).await.map_err(|_| WatchError::Timeout(timeout))??;
        values.clear();
        for kv in resp.kvs() {
            values.insert(String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec());
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.publish(values, revision, service, status);
        Ok(revision)
    }

    /// Decodes every value, applies the selector, and hands the set to the balancer.
    fn publish(
        &self,
        values: &BTreeMap<String, Vec<u8>>,
        revision: i64,
        service: &ServiceHandle,
        status: &WatchStatus,
    ) {
        let mut seen = HashSet::new();
        let mut endpoints = Vec::new();
        for (key, value) in values {
            match decode(value, self.protocol) {
                Ok(found) => {
                    let found = found.into_iter().filter(|e| self.allowed(key, e, status));
                    endpoints.extend(found.filter(|e| self.selected(e) && seen.insert(e.addr)))
                }
                Err(e) => {
                    status.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %self.service, %key, "skipping undecodable etcd value: {e}");
                }
            }
        }
        tracing::debug!(service = %self.service, revision, endpoints = endpoints.len(), "etcd endpoint set");
        self.save_snapshot(revision, &endpoints);
        service.update(endpoints);
        status.updated(revision);
    }

    /// Whether the address is in an allowed network; a refusal is logged and counted (a
    /// poisoned registry entry, such as a cloud metadata address, never gets traffic).
    fn allowed(&self, key: &str, e: &EndpointSpec, status: &WatchStatus) -> bool {
        if self.allowed.is_empty() || self.allowed.iter().any(|n| n.contains(&e.addr.ip())) {
            return true;
        }
        status.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(service = %self.service, %key, endpoint = %e.addr, "refusing a discovered endpoint outside allowed_networks");
        false
    }

    fn selected(&self, e: &EndpointSpec) -> bool {
        self.selector.iter().all(|(k, v)| e.tags.get(k) == Some(v))
    }

    fn snapshot_path(&self) -> Option<PathBuf> {
        let dir = self.cluster.snapshot_dir.as_ref()?;
        Some(dir.join(format!("{}.json", self.service)))
    }

    fn load_snapshot(&self) -> Option<Snapshot> {
        let path = self.snapshot_path()?;
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unreadable snapshot: {e}");
                None
            }
        }
    }

    /// Written off the runtime (blocking file I/O), to a temporary file then renamed, so a
    /// crash never leaves half a snapshot.
    fn save_snapshot(&self, revision: i64, endpoints: &[EndpointSpec]) {
        let Some(path) = self.snapshot_path() else {
            return;
        };
        let snap = Snapshot { revision, endpoints: endpoints.iter().map(Into::into).collect() };
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension(format!("json.{revision}.tmp"));
            let result = serde_json::to_vec(&snap)
                .map_err(std::io::Error::other)
                .and_then(|bytes| {
                    std::fs::create_dir_all(path.parent().unwrap_or(&path))
                        .and_then(|()| std::fs::write(&tmp, bytes))
                })
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = result {
                tracing::warn!(path = %path.display(), "cannot write the endpoint snapshot: {e}");
            }
        });
    }
}

/// A client for `c` whose calls fail instead of hanging on a dead or partitioned member:
/// HTTP/2 keepalives on an idle channel, and watches that require a leader. Shared with
/// registration.
pub(crate) async fn connect(c: &EtcdConfig) -> Result<Client, WatchError> {
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
    tokio::time::timeout(limit, connect).await.map_err(|_| WatchError::Timeout(limit))?.map_err(Into::into)
}

fn tls_options(tls: &crate::config::EtcdTls) -> Result<etcd_client::TlsOptions, WatchError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| WatchError::Ended(format!("cannot read {}: {e}", p.display())))
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

/// Waits out a reconnect backoff, but ends it early when etcd comes back: every
/// `PROBE_EVERY` a plain TCP connect (no TLS, no gRPC — nothing etcd has to serve) checks
/// whether an endpoint that refused connections accepts them again. So a long outage, whose
/// backoff has grown to its cap, is followed by a reconnect within a probe interval, while a
/// down etcd sees only SYNs. After a connectivity failure, an etcd that accepts connections
/// at the first probe counts as back too (it returned while we were failing). True when it
/// ended early (reset the backoff: etcd may still be starting up, so the next attempts
/// should be quick).
async fn wait_for_retry(cluster: &EtcdConfig, delay: Duration, connectivity: bool) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    let mut was_down = connectivity || !reachable(cluster).await;
    loop {
        let jitter = PROBE_EVERY.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + jitter)).await;
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        let up = reachable(cluster).await;
        if up && was_down {
            return true;
        }
        was_down = !up;
    }
}

/// Whether any endpoint accepts a TCP connection within the dial timeout.
async fn reachable(cluster: &EtcdConfig) -> bool {
    for url in &cluster.endpoints {
        let hostport = url.split_once("://").map_or(url.as_str(), |(_, r)| r).trim_end_matches('/');
        let connect = tokio::net::TcpStream::connect(hostport);
        if matches!(tokio::time::timeout(cluster.dial_timeout, connect).await, Ok(Ok(_))) {
            return true;
        }
    }
    false
}

/// Full jitter: a random delay up to `base × 2^attempt`, capped.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    cap.mul_f64(fastrand::f64()).max(Duration::from_millis(10))
}

impl From<&EndpointSpec> for SnapshotEndpoint {
    fn from(e: &EndpointSpec) -> Self {
        SnapshotEndpoint { addr: e.addr, weight: e.weight.get(), tags: e.tags.clone() }
    }
}

impl From<SnapshotEndpoint> for EndpointSpec {
    fn from(e: SnapshotEndpoint) -> Self {
        let weight = std::num::NonZeroU32::new(e.weight).unwrap_or(std::num::NonZeroU32::MIN);
        EndpointSpec { addr: e.addr, weight, tags: e.tags }
    }
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
