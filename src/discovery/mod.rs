//! Discovery: sources that find a service's endpoints and hand the *whole* set to the
//! service's owner task (through a [`ServiceHandle`]); the balancer works out what changed.
//!
//! Owns: starting, keeping and stopping one source per service across reloads. Must not:
//! be awaited by the request path — requests only ever read the balancer's snapshot.

pub mod decode;
pub(crate) mod dns;
pub(crate) mod etcd;

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, DiscoveryConfig, DnsConfig, EtcdConfig, UpstreamProtocol};
use crate::etcd::Etcd;
use crate::upstream::ServiceHandle;

/// The process-wide clients discovery sources share: one etcd connection for every watch,
/// one resolver for every name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    pub(crate) etcd: Option<Arc<Etcd>>,
    pub(crate) dns: Option<Arc<dns::Resolver>>,
}

/// A running discovery source for one service. Dropping it stops the source.
#[derive(Debug)]
pub(crate) struct Discovery {
    key: Key,
    /// Live state of an etcd watch, for `/upstreams`.
    pub(crate) etcd: Option<Arc<etcd::WatchStatus>>,
    /// Live state of DNS resolution, for `/upstreams` and `/metrics`.
    pub(crate) dns: Option<Arc<dns::DnsStatus>>,
    _stop: Option<DropGuard>,
}

/// What a source depends on: a static list only on itself; an etcd watch also on the
/// cluster settings and the upstream protocol (Kratos values offer one address per scheme);
/// DNS names on the resolver settings.
#[derive(Debug, PartialEq)]
enum Key {
    Static(DiscoveryConfig),
    Etcd(DiscoveryConfig, Option<EtcdConfig>, UpstreamProtocol),
    Dns(DiscoveryConfig, Option<DnsConfig>),
}

fn key(config: &DiscoveryConfig, sources: &Sources, protocol: UpstreamProtocol) -> Key {
    let c = config.clone();
    match config {
        DiscoveryConfig::Static { .. } => Key::Static(c),
        DiscoveryConfig::Etcd { .. } => {
            Key::Etcd(c, sources.etcd.as_ref().map(|e| e.config().clone()), protocol)
        }
        DiscoveryConfig::Dns { .. } => Key::Dns(c, sources.dns.as_ref().map(|r| r.config().clone())),
    }
}

/// Whether a discovered address may get traffic: in one of `allowed` (empty: any).
fn in_networks(allowed: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    allowed.is_empty() || allowed.iter().any(|n| n.contains(&ip))
}

// === impl Sources ===

impl Sources {
    /// The clients `config` needs: these ones while their blocks are unchanged, new ones
    /// where a block changed. A resolver only when some service resolves names.
    pub(crate) fn update(&self, config: &Config) -> Sources {
        let etcd = match (&self.etcd, &config.etcd) {
            (Some(e), Some(c)) if e.config() == c => Some(e.clone()),
            (_, Some(c)) => Some(Arc::new(Etcd::new(c.clone()))),
            (_, None) => None,
        };
        let uses_dns = config.services.values().any(|s| matches!(s.discovery, DiscoveryConfig::Dns { .. }));
        let dns = match &self.dns {
            _ if !uses_dns => None,
            Some(r) if *r.config() == config.dns => Some(r.clone()),
            _ => dns::Resolver::new(&config.dns)
                .inspect_err(|e| tracing::error!("DNS discovery cannot resolve names: {e}"))
                .ok()
                .map(Arc::new),
        };
        Sources { etcd, dns }
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
        match config {
            DiscoveryConfig::Static { endpoints } => {
                if endpoints.is_empty() {
                    tracing::warn!(
                        service = name,
                        "static discovery with no endpoints: requests will get 503 no_endpoints"
                    );
                }
                service.update_now(endpoints.clone()).await;
                Discovery { key, etcd: None, dns: None, _stop: None }
            }
            DiscoveryConfig::Etcd { prefix, selector, allowed_networks } => {
                let Some(cluster) = &sources.etcd else {
                    // Validation rejects this; keep the service empty rather than panic.
                    tracing::error!(service = name, "discovery: etcd without an etcd block");
                    return Discovery { key, etcd: None, dns: None, _stop: None };
                };
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
                Discovery { key, etcd: Some(status), dns: None, _stop: Some(stop.drop_guard()) }
            }
            DiscoveryConfig::Dns { names, fixed, allowed_networks } => {
                let Some(resolver) = &sources.dns else {
                    tracing::error!(service = name, "DNS discovery without a resolver");
                    return Discovery { key, etcd: None, dns: None, _stop: None };
                };
                let stop = CancellationToken::new();
                let watch = dns::Watch {
                    service: name.to_string(),
                    names: names.clone(),
                    fixed: fixed.clone(),
                    allowed: allowed_networks.clone(),
                };
                let status = Arc::new(dns::DnsStatus::default());
                tokio::spawn(watch.run(resolver.clone(), service.clone(), status.clone(), stop.clone()));
                Discovery { key, etcd: None, dns: Some(status), _stop: Some(stop.drop_guard()) }
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
