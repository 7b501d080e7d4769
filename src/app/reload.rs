//! Hot reload: validate, bind what is new, then swap — and the per-service tasks that carry
//! state across generations. Must not: change anything before every new socket is bound.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::task::TaskTracker;

use super::{App, AppError, Runtime};
use crate::config::{Config, ListenerConfig};
use crate::discovery::Discovery;
use crate::proxy::{Listener, Shared, Upstream};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::tls::server::ServerTls;
use crate::upstream::health::Checker;
use crate::upstream::{Service, Settings};

// === impl App ===

impl App {
    /// Re-reads the config file. An invalid file is logged and counted; the old config stays.
    pub async fn reload_from_file(&self) -> bool {
        let Some(path) = &self.inner.config_path else {
            return false;
        };
        match Config::load(path) {
            Ok(config) => self.apply(config).await,
            Err(e) => {
                self.reload_failed(&e.to_string());
                false
            }
        }
    }

    /// Applies config text (as read by the file watcher). An invalid text is logged and
    /// counted; the old config stays. True when a new generation was applied.
    pub async fn reload_text(&self, text: &str) -> bool {
        match Config::parse(text) {
            Ok(config) => self.apply(config).await,
            Err(e) => {
                self.reload_failed(&e.to_string());
                false
            }
        }
    }

    pub(super) async fn apply(&self, config: Config) -> bool {
        match self.reload(config).await {
            Ok(changed) => changed,
            Err(e) => {
                self.reload_failed(&e.to_string());
                false
            }
        }
    }

    fn reload_failed(&self, error: &str) {
        let path = self.inner.config_path.as_deref().unwrap_or(Path::new("<embedded>"));
        tracing::error!(path = %path.display(), "config reload failed; keeping the running config:\n{error}");
        self.inner.status.send_modify(|s| {
            s.reload_failures += 1;
            s.last_reload_failed = true;
            s.last_reload_error = Some(error.to_string());
        });
    }

    /// Applies a validated config. Unchanged configs (same hash) are a no-op; listeners whose
    /// address and protocol are unchanged keep their socket and connections; services keep
    /// their endpoint state. If a new socket cannot be bound nothing changes.
    pub async fn reload(&self, config: Config) -> Result<bool, AppError> {
        let mut listeners = self.inner.listeners.lock().await;
        if self.is_draining() {
            return Err(AppError::ShuttingDown);
        }
        let config = self.layer(config);
        let current = self.runtime();
        let hash = config.hash();
        if hash == current.hash {
            return Ok(false);
        }
        if config.admin != current.config.admin {
            tracing::warn!("admin.bind changed: takes effect only after a restart");
        }
        if (&config.tracing, &config.access_log, &config.logging)
            != (&current.config.tracing, &current.config.access_log, &current.config.logging)
        {
            tracing::warn!("tracing, access_log and logging changes take effect only after a restart");
        }
        let plan = plan_listeners(&listeners, &config.listeners, &self.inner.tls)?;
        let upstreams = {
            let mut discoveries = self.inner.discoveries.lock().await;
            let sources = self.sources(&config);
            let cx = Context {
                telemetry: &self.inner.telemetry,
                tracker: &self.inner.tracker,
                tls: &self.inner.tls,
                sources: &sources,
            };
            build_upstreams(&config, Some(&current), &mut discoveries, cx).await?
        };
        let generation = current.generation + 1;
        let config = Arc::new(config);
        self.inner.runtime.store(Arc::new(Runtime {
            generation,
            hash: hash.clone(),
            config: config.clone(),
            upstreams: upstreams.clone(),
            loaded_at: SystemTime::now(),
        }));
        self.swap_listeners(&mut listeners, &config, &upstreams, plan).await;
        self.set_registration(&config).await;
        self.set_leader(&config).await;
        self.set_overlay_watch(&config);
        self.inner.status.send_modify(|s| {
            s.generation = generation;
            s.hash = hash;
            s.last_reload_failed = false;
        });
        tracing::info!(generation, "config reloaded");
        Ok(true)
    }

    async fn swap_listeners(
        &self,
        listeners: &mut Vec<Listener>,
        config: &Config,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        plan: ListenerPlan,
    ) {
        let (tracker, stop) = (&self.inner.tracker, &self.inner.stop_accepting);
        let mut next = Vec::new();
        for mut old in listeners.drain(..) {
            let same = config
                .listeners
                .iter()
                .find(|l| l.bind == old.config.bind && l.protocol == old.config.protocol);
            match same {
                Some(l) => {
                    old.update(l, upstreams[&l.service].clone(), plan.tls[&l.name].clone());
                    next.push(old);
                }
                None => old.stop(),
            }
        }
        for l in plan.rebinds {
            match rebind(l.bind).await.and_then(|s| {
                let tls = plan.tls[&l.name].clone();
                Listener::spawn(s, l.clone(), upstreams[&l.service].clone(), tls, tracker, stop)
            }) {
                Ok(listener) => next.push(listener),
                Err(e) => {
                    tracing::error!(listener = %l.name, addr = %l.bind, "cannot rebind listener: {e}")
                }
            }
        }
        for (l, socket) in plan.fresh {
            let tls = plan.tls[&l.name].clone();
            match Listener::spawn(socket, l.clone(), upstreams[&l.service].clone(), tls, tracker, stop) {
                Ok(listener) => next.push(listener),
                Err(e) => tracing::error!(listener = %l.name, "cannot start listener: {e}"),
            }
        }
        let unbound: Vec<String> = config
            .listeners
            .iter()
            .filter(|l| !next.iter().any(|n| n.config.name == l.name))
            .map(|l| l.name.clone())
            .collect();
        *self.inner.unbound.lock().unwrap_or_else(|e| e.into_inner()) = unbound;
        self.set_inbound(&next);
        *listeners = next;
    }
}

/// Binds the sockets a reload needs before anything changes: listeners with a new address are
/// bound now (failure aborts the reload); those whose address stays but protocol changes are
/// rebound after the old one closes.
fn plan_listeners(
    current: &[Listener],
    wanted: &[ListenerConfig],
    registry: &crate::tls::Registry,
) -> Result<ListenerPlan, AppError> {
    let mut fresh = Vec::new();
    let mut rebinds = Vec::new();
    let mut tls = HashMap::new();
    for l in wanted {
        let same = current.iter().find(|o| o.config.name == l.name);
        tls.insert(l.name.clone(), listener_tls(l, same, registry)?);
    }
    for l in wanted {
        match current.iter().find(|o| o.config.bind == l.bind) {
            Some(o) if o.config.protocol == l.protocol => {}
            Some(_) => rebinds.push(l.clone()),
            None => fresh.push((l.clone(), bind(&l.name, l.bind)?)),
        }
    }
    Ok(ListenerPlan { fresh, rebinds, tls })
}

/// Sockets bound ahead of a reload, listeners to rebind once their old socket closes, and
/// each listener's TLS termination (loaded before anything changes).
struct ListenerPlan {
    fresh: Vec<(ListenerConfig, TcpListener)>,
    rebinds: Vec<ListenerConfig>,
    tls: HashMap<String, Option<Arc<ServerTls>>>,
}

/// A listener's TLS termination: the running one when its settings are unchanged (material
/// rotates on its own), otherwise built anew — failing only when its files cannot be loaded.
pub(super) fn listener_tls(
    l: &ListenerConfig,
    current: Option<&Listener>,
    registry: &crate::tls::Registry,
) -> Result<Option<Arc<ServerTls>>, AppError> {
    let Some(cfg) = &l.tls else { return Ok(None) };
    if let Some(running) = current.and_then(|c| c.tls_if(cfg)) {
        return Ok(Some(running));
    }
    let alpn: &[&str] = match l.protocol {
        crate::config::ListenerProtocol::Http => &["h2", "http/1.1"],
        crate::config::ListenerProtocol::Tcp => &[],
    };
    let tls = ServerTls::new(cfg, alpn, registry)
        .map_err(|e| AppError::Tls(format!("listener {}: {e}", l.name)))?;
    Ok(Some(Arc::new(tls)))
}

/// What building a generation needs from the app.
pub(super) struct Context<'a> {
    pub(super) telemetry: &'a Arc<Telemetry>,
    pub(super) tracker: &'a TaskTracker,
    pub(super) tls: &'a crate::tls::Registry,
    /// Clients discovery shares (the etcd connection).
    pub(super) sources: &'a crate::discovery::Sources,
}

/// Builds each service's generation view, reusing the owner tasks (endpoint state),
/// connection pools and discovery sources of services that exist already. Returns once every
/// service's settings and static endpoints are in force. Fails — before anything changed —
/// only when TLS material cannot be loaded.
pub(super) async fn build_upstreams(
    config: &Config,
    previous: Option<&Runtime>,
    tasks: &mut HashMap<String, ServiceTasks>,
    cx: Context<'_>,
) -> Result<BTreeMap<String, Arc<Upstream>>, AppError> {
    let mut clients = HashMap::new();
    for (name, svc) in &config.services {
        let prev = previous.and_then(|r| r.upstreams.get(name)).map(|p| &**p);
        let client = Upstream::client(svc, prev, cx.tls).map_err(|e| AppError::Tls(e.to_string()))?;
        clients.insert(name.as_str(), client);
    }
    let mut next = HashMap::new();
    let mut upstreams = BTreeMap::new();
    for (name, svc) in &config.services {
        let prev = previous.and_then(|r| r.upstreams.get(name));
        let settings = Settings::of(svc);
        let old = tasks.remove(name);
        let (service, old_discovery, old_checker) = match old {
            Some(t) => (t.service, Some(t.discovery), t.checker),
            None => (Service::spawn(name, &settings), None, None),
        };
        let handle = service.handle();
        handle.configure(settings).await;
        let discovery = match old_discovery {
            Some(d) => d.reconfigure(name, &svc.discovery, cx.sources, svc.protocol, handle).await,
            None => Discovery::start(name, &svc.discovery, cx.sources, svc.protocol, handle).await,
        };
        let balancer = handle.balancer().clone();
        let metrics: Arc<ServiceMetrics> = prev.map_or_else(Default::default, |p| p.metrics.clone());
        let checker = match (old_checker, &svc.resilience.health_check) {
            (Some(c), Some(cfg)) if c.config == *cfg => Some(c),
            (_, cfg) => {
                if cfg.is_none() {
                    // No checks any more: nothing may stay marked unhealthy by old ones.
                    balancer.snapshot().endpoints.iter().for_each(|e| {
                        e.state.health.set_healthy(true);
                    });
                    balancer.changed();
                }
                cfg.as_ref().map(|c| Checker::start(name, c, &balancer, &metrics))
            }
        };
        let (watch, dns) = (discovery.etcd.clone(), discovery.dns.clone());
        next.insert(name.clone(), ServiceTasks { service, discovery, checker });
        let generation = previous.map_or(1, |r| r.generation + 1);
        let client = clients[name.as_str()].clone();
        let shared = Shared {
            balancer,
            metrics,
            telemetry: cx.telemetry,
            tasks: cx.tracker,
            client,
            generation,
            watch,
            dns,
        };
        let upstream = Upstream::new(name, svc.clone(), shared, prev.map(|p| &**p));
        upstreams.insert(name.clone(), Arc::new(upstream));
    }
    *tasks = next;
    Ok(upstreams)
}

/// What runs per service beside the request path: the owner of its endpoint state,
/// discovery, and active health checks.
#[derive(Debug)]
pub(super) struct ServiceTasks {
    service: Service,
    pub(super) discovery: Discovery,
    checker: Option<Checker>,
}

pub(super) fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    let err = |source| AppError::Bind { what: what.to_string(), addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

pub(super) fn local_addr(what: &str, addr: SocketAddr, socket: &TcpListener) -> Result<SocketAddr, AppError> {
    socket.local_addr().map_err(|source| AppError::Bind { what: what.to_string(), addr, source })
}

/// Binds an address an old listener is releasing: its accept loop drops the socket as soon
/// as it sees the stop, so a few short retries are enough.
async fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut attempt = 0;
    loop {
        match bind("listener", addr) {
            Ok(s) => return Ok(s),
            Err(AppError::Bind { source, .. })
                if attempt < 20 && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(AppError::Bind { source, .. }) => return Err(source),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}
