//! Wiring: config in, running listeners, admin server and discovery out; then hot reload
//! and graceful shutdown (reload lives in `reload.rs`).
//!
//! Owns: the current [`Runtime`] (one config generation), the set of bound listeners, and
//! the lifecycle (ready → draining → stopped). Must not: sit on the request path — requests
//! hold an `Arc<Upstream>` of their generation and never touch `App`.

mod overlay;
mod reload;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::discovery::Sources;
use crate::leader::Leader;
use crate::proxy::{Listener, Upstream};
use crate::register::Registrar;
use crate::server::InboundMetrics;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ServiceMetrics;
use crate::upstream::Balancer;
use reload::{Context, ServiceTasks, bind, build_upstreams, listener_tls, local_addr};

/// One config generation: what every new request and connection uses.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) generation: u64,
    pub(crate) hash: String,
    pub(crate) config: Arc<Config>,
    pub(crate) upstreams: BTreeMap<String, Arc<Upstream>>,
    pub(crate) loaded_at: SystemTime,
}

/// What reload watchers (tests, the admin page) can observe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub generation: u64,
    pub hash: String,
    pub reload_failures: u64,
    pub last_reload_error: Option<String>,
    /// Certificates, keys and CA bundles replaced by rotation so far.
    pub tls_rotations: u64,
    /// Re-reads of TLS files that failed (the old material stayed).
    pub tls_reload_failures: u64,
    /// The last reload failed (until one succeeds).
    pub last_reload_failed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    #[error("shutting down: reload refused")]
    ShuttingDown,
    #[error("cannot set up tracing: {0}")]
    Telemetry(String),
    #[error("TLS: {0}")]
    Tls(String),
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
    /// Counters of every inbound socket (listeners by name, and `admin`), for `/metrics`.
    inbound: ArcSwap<Vec<(String, Arc<InboundMetrics>)>>,
    /// Configured listeners that could not be (re)bound on the last reload: not ready.
    unbound: std::sync::Mutex<Vec<String>>,
    discoveries: Mutex<HashMap<String, ServiceTasks>>,
    /// The one etcd connection and the one resolver (each kept across reloads while its
    /// block stays the same).
    sources: std::sync::Mutex<Sources>,
    registrar: Mutex<Option<Registrar>>,
    /// Leader election, when the config has a `leader` block.
    leader: Mutex<Option<Leader>>,
    /// Locks held for the app (released on shutdown).
    locks: crate::locks::Locks,
    /// Live overlays from etcd, laid over the file on every change and reload.
    overlays: std::sync::Mutex<overlay::Overlays>,
    telemetry: Arc<Telemetry>,
    /// TLS material in use, re-read on file changes and SIGHUP.
    tls: Arc<crate::tls::Registry>,
    status: watch::Sender<Status>,
    config_path: Option<PathBuf>,
    admin_addr: SocketAddr,
    admin_metrics: Arc<InboundMetrics>,
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
        let tracker = TaskTracker::new();
        let tls = Arc::new(crate::tls::Registry::default());
        let sources = Sources::default().update(&config);
        let cx = Context { telemetry: &telemetry, tracker: &tracker, tls: &tls, sources: &sources };
        let upstreams = build_upstreams(&config, None, &mut discoveries, cx).await?;
        let stop_accepting = CancellationToken::new();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket = bind(&l.name, l.bind)?;
            let tls = listener_tls(l, None, &tls)?;
            let up = upstreams[&l.service].clone();
            let listener = Listener::spawn(socket, l.clone(), up, tls, &tracker, &stop_accepting)
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
                inbound: ArcSwap::from_pointee(Vec::new()),
                unbound: std::sync::Mutex::new(Vec::new()),
                discoveries: Mutex::new(discoveries),
                sources: std::sync::Mutex::new(sources.clone()),
                registrar: Mutex::new(None),
                leader: Mutex::new(None),
                locks: crate::locks::Locks::default(),
                overlays: std::sync::Mutex::default(),
                telemetry,
                tls,
                status: watch::Sender::new(status),
                config_path,
                admin_addr,
                admin_metrics: Arc::default(),
                tracker,
                stop_accepting,
                shutdown_requested: CancellationToken::new(),
                skip_drain: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                finished: CancellationToken::new(),
            }),
        };
        app.set_inbound(&app.inner.listeners.lock().await);
        app.set_registration(&app.runtime().config).await;
        app.set_leader(&app.runtime().config).await;
        app.set_overlay_watch(&app.runtime().config);
        let admin_stop = CancellationToken::new();
        let (limits, metrics) = (app.config().admin.limits.clone(), app.inner.admin_metrics.clone());
        tokio::spawn(crate::admin::serve(admin_socket, app.admin(), limits, metrics, admin_stop.clone()));
        tokio::spawn(app.clone().lifecycle(admin_stop));
        tokio::spawn(app.clone().expiry_warnings());
        tracing::info!(admin = %admin_addr, "outrider started");
        Ok(app)
    }

    pub(crate) fn runtime(&self) -> Arc<Runtime> {
        self.inner.runtime.load_full()
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.runtime().config.clone()
    }

    /// A service's live endpoint set (what `/upstreams` shows), or `None` if there is no
    /// such service.
    pub fn balancer(&self, service: &str) -> Option<Arc<Balancer>> {
        Some(self.runtime().upstreams.get(service)?.balancer.clone())
    }

    /// Re-reads every certificate, key and CA bundle in use; new handshakes use what changed.
    /// A file that fails to load keeps the old material (logged and counted). Returns how
    /// many pieces changed.
    pub fn reload_tls(&self) -> usize {
        let (changed, failed) = self.inner.tls.reload();
        if changed + failed > 0 {
            self.inner.status.send_modify(|s| {
                s.tls_rotations += changed as u64;
                s.tls_reload_failures += failed as u64;
            });
        }
        changed
    }

    /// Warns, every hour, of each loaded certificate that has less than 7 days left (loading
    /// one warns at once): a certificate nobody rotates must not expire silently.
    async fn expiry_warnings(self) {
        let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
        hourly.tick().await; // loading has just warned
        loop {
            tokio::select! {
                () = self.finished() => return,
                _ = hourly.tick() => self.inner.tls.warn_expiring(),
            }
        }
    }

    /// The TLS files the running config uses (to watch for rotation).
    pub fn tls_files(&self) -> Vec<PathBuf> {
        self.inner.tls.files()
    }

    pub(crate) fn tls(&self) -> &crate::tls::Registry {
        &self.inner.tls
    }

    /// What `/metrics` answers a scrape that does not ask for OpenMetrics (Prometheus text).
    pub fn metrics_text(&self) -> String {
        crate::admin::metrics::prometheus_text(&crate::admin::metrics::render(self.clone()))
    }

    /// The admin API over this instance (what the admin port serves).
    pub(crate) fn admin(&self) -> crate::admin::Admin<App> {
        let app = self.clone();
        crate::admin::Admin::new(self.clone(), std::sync::Arc::new(move || app.shutdown(false)))
    }

    /// A service's request counters, kept across reloads.
    pub fn service_metrics(&self, service: &str) -> Option<Arc<ServiceMetrics>> {
        Some(self.runtime().upstreams.get(service)?.metrics.clone())
    }

    pub(crate) fn telemetry(&self) -> &Arc<Telemetry> {
        &self.inner.telemetry
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    /// Counters of every inbound socket: the listeners by name, then `admin`.
    pub(crate) fn inbound_metrics(&self) -> Arc<Vec<(String, Arc<InboundMetrics>)>> {
        self.inner.inbound.load_full()
    }

    /// Records which listeners serve now (after start and every reload).
    fn set_inbound(&self, listeners: &[Listener]) {
        let mut all: Vec<_> =
            listeners.iter().map(|l| (l.config.name.clone(), l.front.metrics.clone())).collect();
        all.push(("admin".to_string(), self.inner.admin_metrics.clone()));
        self.inner.inbound.store(Arc::new(all));
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

    /// Ready when not draining, every configured listener serves, and every service has
    /// received its first endpoint set.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("draining: shutdown in progress".to_string());
        }
        for name in self.inner.unbound.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            reasons.push(format!("listener {name}: not serving (its address could not be bound)"));
        }
        for (name, up) in &self.runtime().upstreams {
            if !up.balancer.snapshot().synced {
                reasons.push(format!("service {name}: no endpoint set from discovery yet"));
            }
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }

    /// Live discovery state per service (etcd revision and watch state, or DNS resolution), for
    /// `/upstreams`.
    pub async fn discovery_status(&self) -> BTreeMap<String, serde_json::Value> {
        let discoveries = self.inner.discoveries.lock().await;
        discoveries
            .iter()
            .filter_map(|(name, t)| {
                let d = &t.discovery;
                let json =
                    d.etcd.as_ref().map(|w| w.to_json()).or_else(|| Some(d.dns.as_ref()?.to_json()))?;
                Some((name.clone(), json))
            })
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
        let etcd = self.sources(config).etcd;
        *registrar = config.register.clone().zip(etcd).map(|(r, e)| Registrar::start(r, e));
    }

    /// Starts, keeps or replaces the leader election to match `config`.
    pub(crate) async fn set_leader(&self, config: &Config) {
        let mut leader = self.inner.leader.lock().await;
        let wanted = config.leader.clone().map(|l| (l, config.jobs.clone()));
        if leader.as_ref().map(|l| &l.config) == wanted.as_ref() {
            return;
        }
        if let Some(old) = leader.take() {
            old.resign().await;
        }
        let etcd = self.sources(config).etcd;
        *leader = wanted.zip(etcd).map(|((l, jobs), e)| Leader::start(l, jobs, e));
    }

    /// Leadership now; `None` when no election is configured.
    pub async fn leadership(&self) -> Option<crate::leader::View> {
        self.inner.leader.lock().await.as_ref().map(Leader::view)
    }

    /// The app's locks, and the etcd connection they need (`None`: no `etcd` block).
    pub(crate) fn locks(&self) -> (&crate::locks::Locks, Option<Arc<crate::etcd::Etcd>>) {
        let config = self.runtime().config.clone();
        (&self.inner.locks, self.sources(&config).etcd)
    }

    /// The leader-only jobs; `None` when no election is configured.
    pub async fn jobs(&self) -> Option<Vec<crate::jobs::JobView>> {
        self.inner.leader.lock().await.as_ref().map(Leader::jobs)
    }

    /// Like [`App::jobs`] without waiting: `None` also while a reload holds it.
    pub fn jobs_now(&self) -> Option<Vec<crate::jobs::JobView>> {
        self.inner.leader.try_lock().ok()?.as_ref().map(Leader::jobs)
    }

    /// Like [`App::leadership`] without waiting: `None` also while a reload holds it.
    pub fn leadership_now(&self) -> Option<crate::leader::View> {
        self.inner.leader.try_lock().ok()?.as_ref().map(Leader::view)
    }

    /// The shared clients for `config`, replacing the running ones whose block changed.
    pub(crate) fn sources(&self, config: &Config) -> Sources {
        let mut slot = self.inner.sources.lock().unwrap_or_else(|e| e.into_inner());
        *slot = slot.update(config);
        slot.clone()
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
        // A leader resigns first, so another instance takes over at once, not after the TTL.
        let leader = inner.leader.lock().await.take();
        if let Some(leader) = leader {
            leader.resign().await;
        }
        // Locks held for the app go with it (others may take them at once).
        if let (locks, Some(etcd)) = self.locks() {
            locks.release_all(&etcd).await;
        }
        // Peers must stop sending to us before we stop accepting: withdraw the key first.
        // Taken out first: the lock must not be held across the delay (`/upstreams` reads it).
        let registrar = inner.registrar.lock().await.take();
        if let Some(registrar) = registrar {
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
}
