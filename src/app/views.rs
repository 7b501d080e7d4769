//! What the admin server reads of a running `App`: its [`Views`], built from `App` state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::App;
use crate::admin::{Generation, Reloads, Views};
use crate::server::InboundMetrics;
use crate::telemetry::Telemetry;

impl Views for App {
    fn generation(&self) -> Generation {
        let runtime = self.runtime();
        Generation {
            number: runtime.generation,
            hash: runtime.hash.clone(),
            loaded_at: runtime.loaded_at,
            config: runtime.config.clone(),
            services: runtime.upstreams.iter().map(|(n, up)| (n.clone(), up.clone())).collect(),
        }
    }

    fn reloads(&self) -> Reloads {
        let status = self.inner.status.borrow();
        Reloads {
            succeeded: status.generation.saturating_sub(1),
            failed: status.reload_failures,
            last_failed: status.last_reload_failed,
            last_error: status.last_reload_error.clone(),
        }
    }

    fn readiness(&self) -> Result<(), Vec<String>> {
        App::readiness(self)
    }

    async fn listener_addrs(&self) -> BTreeMap<String, SocketAddr> {
        App::listener_addrs(self).await
    }

    async fn discovery(&self) -> BTreeMap<String, serde_json::Value> {
        self.discovery_status().await
    }

    fn overlays(&self) -> serde_json::Value {
        self.overlay_status()
    }

    fn overlay_failures(&self) -> Option<u64> {
        App::overlay_failures(self)
    }

    async fn registration(&self) -> Option<&'static str> {
        self.registration_state().await
    }

    async fn leadership(&self) -> Option<crate::leader::View> {
        App::leadership(self).await
    }

    async fn jobs(&self) -> Option<Vec<crate::jobs::JobView>> {
        App::jobs(self).await
    }

    fn registration_now(&self) -> Option<&'static str> {
        self.registration_state_now()
    }

    fn leadership_now(&self) -> Option<crate::leader::View> {
        App::leadership_now(self)
    }

    fn jobs_now(&self) -> Option<Vec<crate::jobs::JobView>> {
        App::jobs_now(self)
    }

    fn locks(&self) -> (&crate::locks::Locks, Option<Arc<crate::etcd::Etcd>>) {
        App::locks(self)
    }

    fn tls(&self) -> &crate::tls::Registry {
        App::tls(self)
    }

    fn inbound(&self) -> Arc<Vec<(String, Arc<InboundMetrics>)>> {
        self.inbound_metrics()
    }

    fn telemetry(&self) -> &Telemetry {
        App::telemetry(self)
    }
}
