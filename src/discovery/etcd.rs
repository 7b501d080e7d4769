//! etcd discovery: follow a service's key prefix (the shared connection's `etcd::watch`),
//! decode every value, and hand the set to the service's owner.
//!
//! Each published set is also written to a snapshot file (when configured) so a restart can
//! serve while etcd is down; the snapshot is served until etcd first answers.
//! Must not: block the request path, or drop endpoints it cannot decode silently (they are
//! logged and counted, and never take the other endpoints with them).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::decode::decode;
use crate::config::{EndpointSpec, UpstreamProtocol};
pub use crate::etcd::watch::WatchStatus;
use crate::etcd::{Etcd, watch};
use crate::upstream::ServiceHandle;

/// One service's watch, as configured.
#[derive(Debug, Clone)]
pub struct Watch {
    pub service: String,
    pub prefix: String,
    pub selector: BTreeMap<String, String>,
    /// Networks endpoints must be in (empty: any); others are refused and counted.
    pub allowed: Vec<ipnet::IpNet>,
    pub protocol: UpstreamProtocol,
    /// Where the last-known-good set is kept (`None`: nowhere).
    pub snapshot_dir: Option<PathBuf>,
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

// === impl Watch ===

impl Watch {
    pub(crate) async fn run(
        self,
        etcd: Arc<Etcd>,
        service: ServiceHandle,
        status: Arc<WatchStatus>,
        stop: CancellationToken,
    ) {
        if let Some(snap) = self.load_snapshot() {
            tracing::warn!(service = %self.service, revision = snap.revision, endpoints = snap.endpoints.len(),
                "serving the last-known-good snapshot until etcd answers");
            service.update(snap.endpoints.into_iter().map(Into::into).collect());
            status.set_state("snapshot");
        }
        let what = format!("endpoints of {}", self.service);
        let prefix = self.prefix.clone();
        let counters = status.clone();
        let publish =
            move |values: &watch::Values, revision| self.publish(values, revision, &service, &counters);
        watch::follow(etcd, prefix, what, status, stop, publish).await;
    }

    /// Decodes every value, applies the selector, and hands the set to the balancer.
    fn publish(&self, values: &watch::Values, revision: i64, service: &ServiceHandle, status: &WatchStatus) {
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
    }

    /// Whether the address is in an allowed network; a refusal is logged and counted (a
    /// poisoned registry entry, such as a cloud metadata address, never gets traffic).
    fn allowed(&self, key: &str, e: &EndpointSpec, status: &WatchStatus) -> bool {
        if super::in_networks(&self.allowed, e.addr.ip()) {
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
        let dir = self.snapshot_dir.as_ref()?;
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
