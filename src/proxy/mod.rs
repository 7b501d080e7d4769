//! Listeners and forwarding: what happens between the app's socket and an endpoint's.
//!
//! Owns: accept loops ([`Listener`]), per-connection HTTP serving (HTTP/1.1 and h2c on one
//! port), the pooled upstream HTTP client, and the TCP splice. Must not: await discovery or
//! config — a request reads one [`Upstream`] (one config generation) and keeps it to the end.

mod attempt;
mod body;
mod error;
mod http;
mod observe;
mod ratelimit;
mod retry;
mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::Client;
use crate::config::{InboundLimits, ListenerConfig, ListenerProtocol, ServiceConfig};
use crate::discovery::etcd::WatchStatus;
use crate::server::{self, Acceptor, InboundMetrics, Slot, Tracked};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::upstream::Balancer;
use crate::upstream::breaker::Breaker;
use crate::upstream::budget::Budget;
use ratelimit::Limiter;

/// A service as one config generation sees it: settings, live endpoints, connection pool,
/// and the guards (breaker, retry budget, rate limit) that outlive a reload when unchanged.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub config: ServiceConfig,
    pub balancer: Arc<Balancer>,
    pub(crate) client: Arc<Client>,
    pub breaker: Arc<Breaker>,
    pub budget: Arc<Budget>,
    pub(crate) limiter: Option<Arc<Limiter>>,
    pub metrics: Arc<ServiceMetrics>,
    pub(crate) telemetry: Arc<Telemetry>,
    /// Where long-lived work a request starts (upgraded tunnels) runs: shutdown waits on it.
    pub(crate) tasks: TaskTracker,
    /// Context for spans: the config generation and the etcd watch (if any).
    pub generation: u64,
    pub watch: Option<Arc<WatchStatus>>,
}

/// What `Upstream::new` needs besides the service's own settings.
#[derive(Debug)]
pub(crate) struct Shared<'a> {
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) metrics: Arc<ServiceMetrics>,
    pub(crate) telemetry: &'a Arc<Telemetry>,
    pub(crate) tasks: &'a TaskTracker,
    pub(crate) generation: u64,
    pub(crate) watch: Option<Arc<WatchStatus>>,
}

/// A bound listener's accept loop; its route and limits are swapped on reload without
/// rebinding.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) config: ListenerConfig,
    pub(crate) local_addr: SocketAddr,
    pub(crate) front: Arc<Front>,
    stop: CancellationToken,
}

/// What a listener's connections share: the route and limits of the current generation,
/// and the listener's counters (kept across reloads).
#[derive(Debug)]
pub(crate) struct Front {
    route: ArcSwap<Upstream>,
    limits: ArcSwap<InboundLimits>,
    pub(crate) metrics: Arc<InboundMetrics>,
}

// === impl Upstream ===

impl Upstream {
    /// Builds the generation's view of a service, reusing `previous`'s connection pool when
    /// the settings it depends on are unchanged (so reload does not drop connections).
    pub(crate) fn new(
        name: &str,
        config: ServiceConfig,
        shared: Shared<'_>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let r = &config.resilience;
        let client = match previous {
            Some(p) if p.client.serves(&config) => p.client.clone(),
            _ => Arc::new(Client::new(&config)),
        };
        let breaker = match previous {
            Some(p) if *p.breaker.config() == r.breaker => p.breaker.clone(),
            _ => Breaker::new(&r.breaker),
        };
        let budget = match previous {
            Some(p) if *p.budget.config() == r.retries.budget => p.budget.clone(),
            _ => Arc::new(Budget::new(&r.retries.budget)),
        };
        let limiter = match (previous.and_then(|p| p.limiter.as_ref()), &r.rate_limit) {
            (Some(l), Some(cfg)) if l.config == *cfg => Some(l.clone()),
            (_, cfg) => cfg.as_ref().map(|c| Arc::new(Limiter::new(c))),
        };
        Upstream {
            name: name.into(),
            config,
            balancer: shared.balancer,
            client,
            breaker,
            budget,
            limiter,
            metrics: shared.metrics,
            telemetry: shared.telemetry.clone(),
            tasks: shared.tasks.clone(),
            generation: shared.generation,
            watch: shared.watch,
        }
    }
}

// === impl Front ===

impl Front {
    pub(crate) fn limits(&self) -> arc_swap::Guard<Arc<InboundLimits>> {
        self.limits.load()
    }
}

// === impl Listener ===

impl Listener {
    /// Starts accepting on an already bound socket. Connections run on `tracker`; cancelling
    /// `parent` (or [`Listener::stop`]) stops accepting and drains them gracefully.
    pub(crate) fn spawn(
        socket: TcpListener,
        config: ListenerConfig,
        route: Arc<Upstream>,
        tracker: &TaskTracker,
        parent: &CancellationToken,
    ) -> std::io::Result<Listener> {
        let local_addr = socket.local_addr()?;
        let front = Arc::new(Front {
            route: ArcSwap::new(route),
            limits: ArcSwap::from_pointee(config.limits.clone()),
            metrics: Arc::default(),
        });
        let stop = parent.child_token();
        let acceptor = Acceptor::new(socket, &config.name, front.metrics.clone());
        tracker.spawn(accept_loop(acceptor, config.protocol, front.clone(), tracker.clone(), stop.clone()));
        tracing::info!(listener = %config.name, addr = %local_addr, protocol = ?config.protocol, service = %config.service, "listening");
        Ok(Listener { config, local_addr, front, stop })
    }

    /// Points the listener at a new generation's service and limits (reload).
    pub(crate) fn update(&mut self, config: &ListenerConfig, route: Arc<Upstream>) {
        self.front.route.store(route);
        self.front.limits.store(Arc::new(config.limits.clone()));
        self.config = config.clone();
    }

    /// Stops accepting; open connections finish their in-flight requests, then close.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    mut acceptor: Acceptor,
    protocol: ListenerProtocol,
    front: Arc<Front>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    while let Some((stream, _, slot)) = acceptor.next(&stop, front.limits.load().max_connections).await {
        let _ = stream.set_nodelay(true);
        match protocol {
            ListenerProtocol::Http => tracker.spawn(serve_http(stream, slot, front.clone(), stop.clone())),
            ListenerProtocol::Tcp => {
                let up = front.route.load_full();
                tracker.spawn(async move {
                    tcp::handle(up, stream).await;
                    drop(slot);
                })
            }
        };
    }
    let addr = acceptor.local_addr().map(|a| a.to_string()).unwrap_or_default();
    drop(acceptor);
    tracing::info!(%addr, "listener closed: new connections are refused");
}

/// Serves HTTP/1.1 and HTTP/2 prior knowledge (h2c, as gRPC clients speak) on one
/// connection, under the listener's limits.
async fn serve_http(stream: TcpStream, slot: Slot, front: Arc<Front>, stop: CancellationToken) {
    let limits = front.limits.load_full();
    let metrics = front.metrics.clone();
    server::serve(stream, true, &limits, &metrics, &stop, |activity| {
        service_fn(move |req| {
            let guard = activity.begin();
            let up = front.route.load_full();
            let front = front.clone();
            async move {
                let resp = http::handle(&up, req, &front).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, guard)))
            }
        })
    })
    .await;
    drop(slot);
}
