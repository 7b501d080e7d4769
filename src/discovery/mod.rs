//! Discovery: sources that find a service's endpoints and hand the *whole* set to its
//! [`Balancer`]; the balancer works out what changed.
//!
//! Owns: starting, keeping and stopping one source per service across reloads. Must not:
//! be awaited by the request path — requests only ever read the balancer's snapshot.

pub mod decode;
pub mod etcd;

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{DiscoveryConfig, EtcdConfig, UpstreamProtocol};
use crate::upstream::Balancer;

/// A running discovery source for one service. Dropping it stops the source.
#[derive(Debug)]
pub struct Discovery {
    key: Key,
    /// Live state of an etcd watch, for `/upstreams`.
    pub etcd: Option<Arc<etcd::WatchStatus>>,
    _stop: Option<DropGuard>,
}

/// What a source depends on: a static list only on itself; an etcd watch also on the
/// cluster settings and the upstream protocol (Kratos values offer one address per scheme).
type Key = (DiscoveryConfig, Option<EtcdConfig>, Option<UpstreamProtocol>);

fn key(config: &DiscoveryConfig, etcd: Option<&EtcdConfig>, protocol: UpstreamProtocol) -> Key {
    match config {
        DiscoveryConfig::Static { .. } => (config.clone(), None, None),
        DiscoveryConfig::Etcd { .. } => (config.clone(), etcd.cloned(), Some(protocol)),
    }
}

// === impl Discovery ===

impl Discovery {
    /// Starts `config` feeding `balancer`. Static sources deliver their set at once; etcd
    /// sources run a watch task until this value is dropped.
    pub fn start(
        service: &str,
        config: &DiscoveryConfig,
        etcd: Option<&EtcdConfig>,
        protocol: UpstreamProtocol,
        balancer: &Arc<Balancer>,
    ) -> Discovery {
        let key = key(config, etcd, protocol);
        match (config, etcd) {
            (DiscoveryConfig::Static { endpoints }, _) => {
                if endpoints.is_empty() {
                    tracing::warn!(
                        service,
                        "static discovery with no endpoints: requests will get 503 no_endpoints"
                    );
                }
                balancer.update(endpoints);
                Discovery { key, etcd: None, _stop: None }
            }
            (DiscoveryConfig::Etcd { prefix, selector }, Some(cluster)) => {
                let stop = CancellationToken::new();
                let watch = etcd::Watch {
                    service: service.to_string(),
                    cluster: cluster.clone(),
                    prefix: prefix.clone(),
                    selector: selector.clone(),
                    protocol,
                };
                let status = Arc::new(etcd::WatchStatus::default());
                tokio::spawn(watch.run(balancer.clone(), status.clone(), stop.clone()));
                Discovery { key, etcd: Some(status), _stop: Some(stop.drop_guard()) }
            }
            (DiscoveryConfig::Etcd { .. }, None) => {
                // Validation rejects this; keep the service empty rather than panic.
                tracing::error!(service, "discovery: etcd without an etcd block");
                Discovery { key, etcd: None, _stop: None }
            }
        }
    }

    /// Keeps this source when nothing it depends on changed, otherwise replaces it.
    pub fn reconfigure(
        self,
        service: &str,
        config: &DiscoveryConfig,
        etcd: Option<&EtcdConfig>,
        protocol: UpstreamProtocol,
        balancer: &Arc<Balancer>,
    ) -> Discovery {
        if self.key == key(config, etcd, protocol) {
            return self;
        }
        drop(self);
        Discovery::start(service, config, etcd, protocol, balancer)
    }
}
