//! Wiring: config in, running listeners, admin server and discovery out; then hot reload
//! and graceful shutdown.
//!
//! Owns: the current [`Runtime`] (one config generation), the set of bound listeners, and
//! the lifecycle (ready → draining → stopped). Must not: sit on the request path — requests
//! hold an `Arc<Upstream>` of their generation and never touch `App`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenerConfig};
use crate::discovery::Discovery;
use crate::proxy::{Listener, Shared, Upstream};
use crate::register::Registrar;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::upstream::Balancer;
use crate::upstream::health::Checker;

/// One config generation: what every new request and connection uses.
#[derive(Debug)]
pub struct Runtime {
    pub generation: u64,
    pub hash: String,
    pub config: Arc<Config>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub loaded_at: SystemTime,
}

/// What reload watchers (tests, the admin page) can observe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub generation: u64,
    pub hash: String,
    pub reload_failures: u64,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    #[error("shutting down: reload refused")]
    ShuttingDown,
    #[error("cannot set up tracing: {0}")]
    Telemetry(String),
}

/// A running Outrider. Cheap to clone; all clones control the same instance.
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runtime: ArcSwap<Runtime>,
    /// Held across a whole reload, so reloads apply one at a time.
    listeners: Mutex<Vec<Listener>>,
    discoveries: Mutex<HashMap<String, ServiceTasks>>,
    registrar: Mutex<Option<Registrar>>,
    telemetry: Arc<Telemetry>,
    status: watch::Sender<Status>,
    config_path: Option<PathBuf>,
    admin_addr: SocketAddr,
    /// Connection and accept-loop tasks; shutdown waits on them.
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    shutdown_requested: CancellationToken,
    skip_drain: AtomicBool,
    draining: AtomicBool,
    finished: CancellationToken,
}

// === impl App ===

impl App {
    /// Binds every socket in `config`, starts serving, and returns once all are bound.
    /// `config_path` is what [`App::reload_from_file`] re-reads.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<App, AppError> {
        let admin_socket = bind("admin", config.admin.bind)?;
        let admin_addr = local_addr("admin", config.admin.bind, &admin_socket)?;
        let telemetry = Arc::new(Telemetry::new(&config).map_err(|e| AppError::Telemetry(e.to_string()))?);
        let mut discoveries = HashMap::new();
        let upstreams = build_upstreams(&config, None, &mut discoveries, &telemetry);
        let tracker = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket = bind(&l.name, l.bind)?;
            let listener =
                Listener::spawn(socket, l.clone(), upstreams[&l.service].clone(), &tracker, &stop_accepting)
                    .map_err(|source| AppError::Bind { what: l.name.clone(), addr: l.bind, source })?;
            listeners.push(listener);
        }
        let hash = config.hash();
        let status = Status { generation: 1, hash: hash.clone(), ..Status::default() };
        let runtime = Runtime {
            generation: 1,
            hash,
            config: Arc::new(config),
            upstreams,
            loaded_at: SystemTime::now(),
        };
        let app = App {
            inner: Arc::new(Inner {
                runtime: ArcSwap::from_pointee(runtime),
                listeners: Mutex::new(listeners),
                discoveries: Mutex::new(discoveries),
                registrar: Mutex::new(None),
                telemetry,
                status: watch::Sender::new(status),
                config_path,
                admin_addr,
                tracker,
                stop_accepting,
                shutdown_requested: CancellationToken::new(),
                skip_drain: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                finished: CancellationToken::new(),
            }),
        };
        app.set_registration(&app.runtime().config).await;
        let admin_stop = CancellationToken::new();
        tokio::spawn(crate::admin::serve(admin_socket, app.clone(), admin_stop.clone()));
        tokio::spawn(app.clone().lifecycle(admin_stop));
        tracing::info!(admin = %admin_addr, "outrider started");
        Ok(app)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.inner.runtime.load_full()
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.inner.telemetry
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    /// The bound address of a listener (useful when the config says port 0).
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let listeners = self.inner.listeners.lock().await;
        listeners.iter().find(|l| l.config.name == name).map(|l| l.local_addr)
    }

    pub async fn listener_addrs(&self) -> BTreeMap<String, SocketAddr> {
        let listeners = self.inner.listeners.lock().await;
        listeners.iter().map(|l| (l.config.name.clone(), l.local_addr)).collect()
    }

    /// Generation, hash and reload failures; `changed()` on it awaits the next reload outcome.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }

    /// Ready when not draining and every service has received its first endpoint set.
    /// Listeners are bound before `start` returns and on every reload, so they always are.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("draining: shutdown in progress".to_string());
        }
        for (name, up) in &self.runtime().upstreams {
            if !up.balancer.snapshot().synced {
                reasons.push(format!("service {name}: no endpoint set from discovery yet"));
            }
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }

    /// Live discovery state per service (etcd revision, watch state), for `/upstreams`.
    pub async fn discovery_status(&self) -> BTreeMap<String, serde_json::Value> {
        let discoveries = self.inner.discoveries.lock().await;
        discoveries
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.discovery.etcd.as_ref()?.to_json())))
            .collect()
    }

    /// Starts, keeps or replaces the registration of the local app to match `config`.
    async fn set_registration(&self, config: &Config) {
        let wanted = config.register.clone().zip(config.etcd.clone());
        let mut registrar = self.inner.registrar.lock().await;
        if registrar.as_ref().map(|r| &r.config) == wanted.as_ref() {
            return;
        }
        if let Some(old) = registrar.take() {
            old.withdraw().await;
        }
        *registrar = wanted.map(|(r, e)| Registrar::start(r, e));
    }

    /// `None` when registration is not configured.
    pub async fn registration_state(&self) -> Option<&'static str> {
        self.inner.registrar.lock().await.as_ref().map(Registrar::state)
    }

    /// Like [`App::registration_state`] without waiting: `None` also while a reload holds it.
    pub fn registration_state_now(&self) -> Option<&'static str> {
        self.inner.registrar.try_lock().ok()?.as_ref().map(Registrar::state)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Starts graceful shutdown. `drain` keeps listeners open for the drain window first
    /// (SIGTERM: the app may still be calling out); without it they stop at once (the app
    /// asked through `POST /shutdown`, so it is done calling out).
    pub fn shutdown(&self, drain: bool) {
        if !drain {
            self.inner.skip_drain.store(true, Ordering::Relaxed);
        }
        self.inner.shutdown_requested.cancel();
    }

    /// Resolves once shutdown has finished (in-flight work done or the grace period over).
    pub async fn finished(&self) {
        self.inner.finished.cancelled().await;
    }

    async fn lifecycle(self, admin_stop: CancellationToken) {
        let inner = &self.inner;
        inner.shutdown_requested.cancelled().await;
        inner.draining.store(true, Ordering::Relaxed);
        let config = self.runtime().config.clone();
        // Peers must stop sending to us before we stop accepting: withdraw the key first.
        if let Some(registrar) = inner.registrar.lock().await.take() {
            registrar.withdraw().await;
            if let Some(r) = &config.register {
                tracing::info!(delay = ?r.deregistration_delay, "shutdown: deregistered; waiting for peers to see it");
                tokio::time::sleep(r.deregistration_delay).await;
            }
        }
        let shutdown = config.shutdown.clone();
        if !inner.skip_drain.load(Ordering::Relaxed) && !shutdown.drain_window.is_zero() {
            tracing::info!(drain_window = ?shutdown.drain_window, "shutdown: not ready; still proxying during the drain window");
            tokio::time::sleep(shutdown.drain_window).await;
        }
        tracing::info!(grace_period = ?shutdown.grace_period, "shutdown: stopped accepting; waiting for in-flight requests");
        inner.stop_accepting.cancel();
        inner.tracker.close();
        if tokio::time::timeout(shutdown.grace_period, inner.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = inner.tracker.len(),
                "shutdown: grace period over; closing what is still open"
            );
        }
        inner.telemetry.flush().await;
        admin_stop.cancel();
        tracing::info!("shutdown complete");
        inner.finished.cancel();
    }

    /// Re-reads the config file. An invalid file is logged and counted; the old config stays.
    pub async fn reload_from_file(&self) -> bool {
        let Some(path) = &self.inner.config_path else {
            return false;
        };
        let result = match Config::load(path) {
            Ok(config) => self.reload(config).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(changed) => changed,
            Err(e) => {
                self.reload_failed(path, &e);
                false
            }
        }
    }

    fn reload_failed(&self, path: &Path, error: &str) {
        tracing::error!(path = %path.display(), "config reload failed; keeping the running config:\n{error}");
        self.inner.status.send_modify(|s| {
            s.reload_failures += 1;
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
        let plan = plan_listeners(&listeners, &config.listeners)?;
        let upstreams = {
            let mut discoveries = self.inner.discoveries.lock().await;
            build_upstreams(&config, Some(&current), &mut discoveries, &self.inner.telemetry)
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
        self.inner.status.send_modify(|s| {
            s.generation = generation;
            s.hash = hash;
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
                    old.route.store(upstreams[&l.service].clone());
                    old.config = l.clone();
                    next.push(old);
                }
                None => old.stop(),
            }
        }
        for l in plan.rebinds {
            match rebind(l.bind)
                .await
                .and_then(|s| Listener::spawn(s, l.clone(), upstreams[&l.service].clone(), tracker, stop))
            {
                Ok(listener) => next.push(listener),
                Err(e) => {
                    tracing::error!(listener = %l.name, addr = %l.bind, "cannot rebind listener: {e}")
                }
            }
        }
        for (l, socket) in plan.fresh {
            match Listener::spawn(socket, l.clone(), upstreams[&l.service].clone(), tracker, stop) {
                Ok(listener) => next.push(listener),
                Err(e) => tracing::error!(listener = %l.name, "cannot start listener: {e}"),
            }
        }
        *listeners = next;
    }
}

/// Binds the sockets a reload needs before anything changes: listeners with a new address are
/// bound now (failure aborts the reload); those whose address stays but protocol changes are
/// rebound after the old one closes.
fn plan_listeners(current: &[Listener], wanted: &[ListenerConfig]) -> Result<ListenerPlan, AppError> {
    let mut fresh = Vec::new();
    let mut rebinds = Vec::new();
    for l in wanted {
        match current.iter().find(|o| o.config.bind == l.bind) {
            Some(o) if o.config.protocol == l.protocol => {}
            Some(_) => rebinds.push(l.clone()),
            None => fresh.push((l.clone(), bind(&l.name, l.bind)?)),
        }
    }
    Ok(ListenerPlan { fresh, rebinds })
}

/// Sockets bound ahead of a reload, and listeners to rebind once their old socket closes.
struct ListenerPlan {
    fresh: Vec<(ListenerConfig, TcpListener)>,
    rebinds: Vec<ListenerConfig>,
}

/// Builds each service's generation view, reusing balancers (endpoint state), connection
/// pools and discovery sources of services that exist already.
fn build_upstreams(
    config: &Config,
    previous: Option<&Runtime>,
    tasks: &mut HashMap<String, ServiceTasks>,
    telemetry: &Arc<Telemetry>,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut next = HashMap::new();
    let mut upstreams = BTreeMap::new();
    let etcd = config.etcd.as_ref();
    for (name, svc) in &config.services {
        let prev = previous.and_then(|r| r.upstreams.get(name));
        let outlier = &svc.resilience.outlier;
        let balancer =
            prev.map_or_else(|| Balancer::new(svc.load_balancing, outlier), |p| p.balancer.clone());
        balancer.configure(svc.load_balancing, outlier);
        let old = tasks.remove(name);
        let (old_discovery, old_checker) = old.map_or((None, None), |t| (Some(t.discovery), t.checker));
        let discovery = match old_discovery {
            Some(d) => d.reconfigure(name, &svc.discovery, etcd, svc.protocol, &balancer),
            None => Discovery::start(name, &svc.discovery, etcd, svc.protocol, &balancer),
        };
        let metrics: Arc<ServiceMetrics> = prev.map_or_else(Default::default, |p| p.metrics.clone());
        let checker = match (old_checker, &svc.resilience.health_check) {
            (Some(c), Some(cfg)) if c.config == *cfg => Some(c),
            (_, cfg) => {
                if cfg.is_none() {
                    // No checks any more: nothing may stay marked unhealthy by old ones.
                    balancer.snapshot().endpoints.iter().for_each(|e| {
                        e.state.health.set_healthy(true);
                    });
                    balancer.refresh();
                }
                cfg.as_ref().map(|c| Checker::start(name, c, &balancer, &metrics))
            }
        };
        let watch = discovery.etcd.clone();
        next.insert(name.clone(), ServiceTasks { discovery, checker });
        let generation = previous.map_or(1, |r| r.generation + 1);
        let shared = Shared { balancer, metrics, telemetry, generation, watch };
        let upstream = Upstream::new(name, svc.clone(), shared, prev.map(|p| &**p));
        upstreams.insert(name.clone(), Arc::new(upstream));
    }
    *tasks = next;
    upstreams
}

/// What runs per service beside the request path: discovery and active health checks.
#[derive(Debug)]
struct ServiceTasks {
    discovery: Discovery,
    checker: Option<Checker>,
}

fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    let err = |source| AppError::Bind { what: what.to_string(), addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

fn local_addr(what: &str, addr: SocketAddr, socket: &TcpListener) -> Result<SocketAddr, AppError> {
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
