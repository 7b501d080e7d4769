//! Discovery: sources that find a service's endpoints and hand the *whole* set to the
//! service's owner task (through a [`ServiceHandle`]); the balancer works out what changed.
//!
//! Owns: starting, keeping and stopping one source per service across reloads. Must not:
//! be awaited by the request path — requests only ever read the balancer's snapshot.

pub mod decode;
pub(crate) mod etcd;

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{DiscoveryConfig, EtcdConfig, UpstreamProtocol};
use crate::etcd::Etcd;
use crate::upstream::ServiceHandle;

/// The process-wide clients discovery sources share: one etcd connection for every watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    pub(crate) etcd: Option<Arc<Etcd>>,
}

/// A running discovery source for one service. Dropping it stops the source.
#[derive(Debug)]
pub(crate) struct Discovery {
    key: Key,
    /// Live state of an etcd watch, for `/upstreams`.
    pub(crate) etcd: Option<Arc<etcd::WatchStatus>>,
    _stop: Option<DropGuard>,
}

/// What a source depends on: a static list only on itself; an etcd watch also on the
/// cluster settings and the upstream protocol (Kratos values offer one address per scheme).
type Key = (DiscoveryConfig, Option<EtcdConfig>, Option<UpstreamProtocol>);

fn key(config: &DiscoveryConfig, sources: &Sources, protocol: UpstreamProtocol) -> Key {
    match config {
        DiscoveryConfig::Static { .. } => (config.clone(), None, None),
        DiscoveryConfig::Etcd { .. } => {
            (config.clone(), sources.etcd.as_ref().map(|e| e.config().clone()), Some(protocol))
        }
    }
}

// === impl Discovery ===

impl Discovery {
    /// Starts `config` feeding `service`. Static sources deliver their set before this returns; etcd
    /// sources run a watch task until this value is dropped.
    pub(crate) async fn start(
        name: &str,
        config: &DiscoveryConfig,
        sources: &Sources,
        protocol: UpstreamProtocol,
        service: &ServiceHandle,
    ) -> Discovery {
        let key = key(config, sources, protocol);
        match (config, &sources.etcd) {
            (DiscoveryConfig::Static { endpoints }, _) => {
                if endpoints.is_empty() {
                    tracing::warn!(
                        service = name,
                        "static discovery with no endpoints: requests will get 503 no_endpoints"
                    );
                }
                service.update_now(endpoints.clone()).await;
                Discovery { key, etcd: None, _stop: None }
            }
            (DiscoveryConfig::Etcd { prefix, selector, allowed_networks }, Some(cluster)) => {
                let stop = CancellationToken::new();
                let watch = etcd::Watch {
                    service: name.to_string(),
                    prefix: prefix.clone(),
                    selector: selector.clone(),
                    allowed: allowed_networks.clone(),
                    protocol,
                    snapshot_dir: cluster.config().snapshot_dir.clone(),
                };
                let status = Arc::new(etcd::WatchStatus::default());
                tokio::spawn(watch.run(cluster.clone(), service.clone(), status.clone(), stop.clone()));
                Discovery { key, etcd: Some(status), _stop: Some(stop.drop_guard()) }
            }
            (DiscoveryConfig::Etcd { .. }, None) => {
                // Validation rejects this; keep the service empty rather than panic.
                tracing::error!(service = name, "discovery: etcd without an etcd block");
                Discovery { key, etcd: None, _stop: None }
            }
        }
    }

    /// Keeps this source when nothing it depends on changed, otherwise replaces it.
    pub(crate) async fn reconfigure(
        self,
        name: &str,
        config: &DiscoveryConfig,
        sources: &Sources,
        protocol: UpstreamProtocol,
        service: &ServiceHandle,
    ) -> Discovery {
        if self.key == key(config, sources, protocol) {
            return self;
        }
        drop(self);
        Discovery::start(name, config, sources, protocol, service).await
    }
}
