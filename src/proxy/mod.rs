//! Listeners and forwarding: what happens between the app's socket and an endpoint's.
//!
//! Owns: accept loops ([`Listener`]), per-connection HTTP serving (HTTP/1.1 and h2c on one
//! port), the pooled upstream HTTP client, and the TCP splice. Must not: await discovery or
//! config — a request reads one [`Upstream`] (one config generation) and keeps it to the end.

pub mod body;
pub mod error;
pub mod http;
mod observe;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, ListenerProtocol, ServiceConfig, UpstreamProtocol};
use crate::discovery::etcd::WatchStatus;
use crate::server::Acceptor;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::upstream::Balancer;
use crate::upstream::breaker::Breaker;
use crate::upstream::budget::Budget;
use ratelimit::Limiter;

pub type HttpClient = Client<HttpConnector, replay::UpstreamBody>;

/// A service as one config generation sees it: settings, live endpoints, connection pool,
/// and the guards (breaker, retry budget, rate limit) that outlive a reload when unchanged.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub config: ServiceConfig,
    pub balancer: Arc<Balancer>,
    pub client: HttpClient,
    pub breaker: Arc<Breaker>,
    pub budget: Arc<Budget>,
    pub limiter: Option<Arc<Limiter>>,
    pub metrics: Arc<ServiceMetrics>,
    pub telemetry: Arc<Telemetry>,
    /// Context for spans: the config generation and the etcd watch (if any).
    pub generation: u64,
    pub watch: Option<Arc<WatchStatus>>,
}

/// What `Upstream::new` needs besides the service's own settings.
#[derive(Debug)]
pub struct Shared<'a> {
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<ServiceMetrics>,
    pub telemetry: &'a Arc<Telemetry>,
    pub generation: u64,
    pub watch: Option<Arc<WatchStatus>>,
}

/// A bound listener's accept loop; its route is swapped on reload without rebinding.
#[derive(Debug)]
pub struct Listener {
    pub config: ListenerConfig,
    pub local_addr: SocketAddr,
    pub route: Arc<ArcSwap<Upstream>>,
    stop: CancellationToken,
}

// === impl Upstream ===

impl Upstream {
    /// Builds the generation's view of a service, reusing `previous`'s connection pool when
    /// the settings it depends on are unchanged (so reload does not drop connections).
    pub fn new(
        name: &str,
        config: ServiceConfig,
        shared: Shared<'_>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let r = &config.resilience;
        let client = match previous {
            Some(p) if same_client(&p.config, &config) => p.client.clone(),
            _ => client(&config),
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
            generation: shared.generation,
            watch: shared.watch,
        }
    }
}

fn same_client(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.protocol == b.protocol && a.timeouts.connect == b.timeouts.connect && a.timeouts.idle == b.timeouts.idle
}

fn client(config: &ServiceConfig) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.timeouts.connect));
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.timeouts.idle)
        .http2_only(config.protocol == UpstreamProtocol::Http2);
    builder.build(connector)
}

// === impl Listener ===

impl Listener {
    /// Starts accepting on an already bound socket. Connections run on `tracker`; cancelling
    /// `parent` (or [`Listener::stop`]) stops accepting and drains them gracefully.
    pub fn spawn(
        socket: TcpListener,
        config: ListenerConfig,
        route: Arc<Upstream>,
        tracker: &TaskTracker,
        parent: &CancellationToken,
    ) -> std::io::Result<Listener> {
        let local_addr = socket.local_addr()?;
        let route = Arc::new(ArcSwap::new(route));
        let stop = parent.child_token();
        tracker.spawn(accept_loop(socket, config.protocol, route.clone(), tracker.clone(), stop.clone()));
        tracing::info!(listener = %config.name, addr = %local_addr, protocol = ?config.protocol, service = %config.service, "listening");
        Ok(Listener { config, local_addr, route, stop })
    }

    /// Stops accepting; open connections finish their in-flight requests, then close.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    socket: TcpListener,
    protocol: ListenerProtocol,
    route: Arc<ArcSwap<Upstream>>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut acceptor = Acceptor::new(socket, "listener");
    while let Some((stream, _)) = acceptor.next(&stop).await {
        let _ = stream.set_nodelay(true);
        match protocol {
            ListenerProtocol::Http => tracker.spawn(serve_http(stream, route.clone(), stop.clone())),
            ListenerProtocol::Tcp => tracker.spawn(tcp::handle(route.load_full(), stream)),
        };
    }
    let addr = acceptor.local_addr().map(|a| a.to_string()).unwrap_or_default();
    drop(acceptor);
    tracing::info!(%addr, "listener closed: new connections are refused");
}

/// Serves HTTP/1.1 and HTTP/2 prior knowledge (h2c, as gRPC clients speak) on one connection.
async fn serve_http(stream: TcpStream, route: Arc<ArcSwap<Upstream>>, stop: CancellationToken) {
    let service = service_fn(move |req| {
        let up = route.load_full();
        async move { Ok::<_, Infallible>(http::handle(&up, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}
