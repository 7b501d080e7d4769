//! Listeners and forwarding: what happens between the app's socket and an endpoint's.
//!
//! Owns: accept loops ([`Listener`]), per-connection HTTP serving (HTTP/1.1 and h2c on one
//! port), the pooled upstream HTTP client, and the TCP splice. Must not: await discovery or
//! config — a request reads one [`Upstream`] (one config generation) and keeps it to the end.

mod attempt;
mod body;
mod error;
pub(crate) mod explain;
mod http;
mod observe;
mod ratelimit;
mod retry;
mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::Client;
use crate::config::{InboundLimits, ListenerConfig, ListenerProtocol, ServiceConfig};
use crate::discovery::dns::DnsStatus;
use crate::discovery::etcd::WatchStatus;
use crate::pki::PkiError;
use crate::server::{self, Acceptor, InboundMetrics, Slot, Tracked};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::tls::server::ServerTls;
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
    /// DNS resolution of the service's names (if any), for `/metrics`.
    pub dns: Option<Arc<DnsStatus>>,
}

/// What `Upstream::new` needs besides the service's own settings.
#[derive(Debug)]
pub(crate) struct Shared<'a> {
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) metrics: Arc<ServiceMetrics>,
    pub(crate) telemetry: &'a Arc<Telemetry>,
    pub(crate) tasks: &'a TaskTracker,
    pub(crate) client: Arc<Client>,
    pub(crate) generation: u64,
    pub(crate) watch: Option<Arc<WatchStatus>>,
    pub(crate) dns: Option<Arc<DnsStatus>>,
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
    /// TLS termination, when the listener has it.
    tls: ArcSwapOption<ServerTls>,
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
        let client = shared.client;
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
            dns: shared.dns,
        }
    }

    /// The connection layer for `config`: the previous generation's when the settings it
    /// depends on are unchanged (so a reload keeps pooled connections), else a new one —
    /// which fails only when TLS material that validated a moment ago cannot be loaded now.
    pub(crate) fn client(
        config: &ServiceConfig,
        previous: Option<&Upstream>,
        tls: &crate::tls::Registry,
    ) -> Result<Arc<Client>, PkiError> {
        match previous {
            Some(p) if p.client.serves(config) => Ok(p.client.clone()),
            _ => Ok(Arc::new(Client::new(config, tls)?)),
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
        tls: Option<Arc<ServerTls>>,
        tracker: &TaskTracker,
        parent: &CancellationToken,
    ) -> std::io::Result<Listener> {
        let local_addr = socket.local_addr()?;
        let front = Arc::new(Front {
            route: ArcSwap::new(route),
            limits: ArcSwap::from_pointee(config.limits.clone()),
            tls: ArcSwapOption::new(tls),
            metrics: Arc::default(),
        });
        let stop = parent.child_token();
        let acceptor = Acceptor::new(socket, &config.name, front.metrics.clone());
        tracker.spawn(accept_loop(acceptor, config.protocol, front.clone(), tracker.clone(), stop.clone()));
        tracing::info!(listener = %config.name, addr = %local_addr, protocol = ?config.protocol, service = %config.service, "listening");
        Ok(Listener { config, local_addr, front, stop })
    }

    /// Points the listener at a new generation's service, limits and TLS (reload).
    pub(crate) fn update(
        &mut self,
        config: &ListenerConfig,
        route: Arc<Upstream>,
        tls: Option<Arc<ServerTls>>,
    ) {
        self.front.route.store(route);
        self.front.limits.store(Arc::new(config.limits.clone()));
        self.front.tls.store(tls);
        self.config = config.clone();
    }

    /// The running TLS termination, if it was built from `cfg` (so a reload can keep it).
    pub(crate) fn tls_if(&self, cfg: &crate::config::ListenerTls) -> Option<Arc<ServerTls>> {
        (self.config.tls.as_ref() == Some(cfg)).then(|| self.front.tls.load_full()).flatten()
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
    while let Some((stream, client, slot)) = acceptor.next(&stop, front.limits.load().max_connections).await {
        let _ = stream.set_nodelay(true);
        match protocol {
            ListenerProtocol::Http => {
                tracker.spawn(serve_http(stream, client, slot, front.clone(), stop.clone()))
            }
            ListenerProtocol::Tcp => {
                let (up, front) = (front.route.load_full(), front.clone());
                tracker.spawn(async move {
                    match front.tls.load_full() {
                        None => tcp::handle(up, stream, client).await,
                        Some(tls) => {
                            let limits = front.limits.load_full();
                            if let Some((stream, _, _)) =
                                server::tls_handshake(stream, &tls, &limits, &front.metrics).await
                            {
                                tcp::handle(up, stream, client).await;
                            }
                        }
                    }
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
async fn serve_http(
    stream: TcpStream,
    client: SocketAddr,
    slot: Slot,
    front: Arc<Front>,
    stop: CancellationToken,
) {
    let limits = front.limits.load_full();
    let (metrics, tls) = (front.metrics.clone(), front.tls.load_full());
    server::serve(stream, true, tls.as_deref(), &limits, &metrics, &stop, |activity, peer| {
        let from = Arc::new(http::From { addr: client, tls: tls.is_some(), peer });
        service_fn(move |req| {
            let guard = activity.begin();
            let up = front.route.load_full();
            let (front, from) = (front.clone(), from.clone());
            async move {
                let resp = http::handle(&up, req, &front, &from).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, guard)))
            }
        })
    })
    .await;
    drop(slot);
}
