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
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::Client;
use crate::config::{ListenerConfig, ListenerProtocol, ServiceConfig};
use crate::discovery::etcd::WatchStatus;
use crate::server::{self, Acceptor};
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
        let route = Arc::new(ArcSwap::new(route));
        let stop = parent.child_token();
        tracker.spawn(accept_loop(socket, config.protocol, route.clone(), tracker.clone(), stop.clone()));
        tracing::info!(listener = %config.name, addr = %local_addr, protocol = ?config.protocol, service = %config.service, "listening");
        Ok(Listener { config, local_addr, route, stop })
    }

    /// Stops accepting; open connections finish their in-flight requests, then close.
    pub(crate) fn stop(&self) {
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

/// Serves HTTP/1.1 and HTTP/2 prior knowledge (h2c, as gRPC clients speak) on one
/// connection, told apart by the HTTP/2 preface.
async fn serve_http(stream: TcpStream, route: Arc<ArcSwap<Upstream>>, stop: CancellationToken) {
    let service = service_fn(move |req| {
        let up = route.load_full();
        async move { Ok::<_, Infallible>(http::handle(&up, req).await) }
    });
    let result = match server::sniff(&stream).await {
        Ok(server::Protocol::Http2) => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Ok(server::Protocol::Http1) => {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Err(e) => {
            tracing::debug!("connection ended before its first request: {e}");
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}
