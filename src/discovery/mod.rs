//! Discovery: sources that find a service's endpoints and hand the *whole* set to its
//! [`Balancer`]; the balancer works out what changed.
//!
//! Owns: starting, keeping and stopping one source per service across reloads. Must not:
//! be awaited by the request path — requests only ever read the balancer's snapshot.
//! The etcd source plugs in as another `DiscoveryConfig` variant with a task of its own.

pub mod decode;

use std::sync::Arc;

use crate::config::DiscoveryConfig;
use crate::upstream::Balancer;

/// A running discovery source for one service.
#[derive(Debug)]
pub struct Discovery {
    config: DiscoveryConfig,
}

// === impl Discovery ===

impl Discovery {
    /// Starts `config` feeding `balancer`. Static sources deliver their set at once.
    pub fn start(service: &str, config: &DiscoveryConfig, balancer: &Arc<Balancer>) -> Discovery {
        match config {
            DiscoveryConfig::Static { endpoints } => {
                if endpoints.is_empty() {
                    tracing::warn!(
                        service,
                        "static discovery with no endpoints: requests will get 503 no_endpoints"
                    );
                }
                balancer.update(endpoints);
            }
        }
        Discovery {
            config: config.clone(),
        }
    }

    /// Keeps this source when `config` is unchanged, otherwise replaces it.
    pub fn reconfigure(
        self,
        service: &str,
        config: &DiscoveryConfig,
        balancer: &Arc<Balancer>,
    ) -> Discovery {
        if self.config == *config {
            return self;
        }
        Discovery::start(service, config, balancer)
    }
}
