//! The admin server: probes, introspection, the dashboard and `/metrics`, on loopback by
//! default.
//!
//! Owns: the routes (`/`, `/dashboard.json`, `/live`, `/ready`, `/config`, `/upstreams`,
//! `/explain`, `/leader`, `/jobs`, `/locks`, `/metrics`, `POST /shutdown`), the metrics
//! exposition (`metrics.rs`) and the dashboard's in-memory history (`history.rs`).
//! Must not: change routing, or know `App`. It is built from narrow handles — [`Views`]
//! (read-only state, implemented by `App`) and a [`Shutdown`] sender, its one write, which it
//! answers only to loopback clients (the admin port may be bound on the pod IP for probes).
//! [`Admin`] is a `tower::Service`, so tests drive it with `oneshot` and no socket.

mod dashboard;
mod history;
pub(crate) mod metrics;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::{Config, InboundLimits};
use crate::proxy::Upstream;
use crate::server::{self, Acceptor, InboundMetrics, Tracked};
use crate::telemetry::Telemetry;

/// What the admin server reads of the running process. Read-only: the one thing the admin
/// API may do, ask for shutdown, goes through [`Shutdown`].
pub(crate) trait Views: Clone + Send + Sync + 'static {
    /// The running config generation and its services.
    fn generation(&self) -> Generation;
    /// Outcome counters of config reloads.
    fn reloads(&self) -> Reloads;
    /// `Ok` when ready; else the reasons.
    fn readiness(&self) -> Result<(), Vec<String>>;
    fn listener_addrs(&self) -> impl Future<Output = BTreeMap<String, SocketAddr>> + Send;
    /// Live discovery state per service (etcd watch or DNS resolution) as JSON.
    fn discovery(&self) -> impl Future<Output = BTreeMap<String, serde_json::Value>> + Send;
    fn overlays(&self) -> serde_json::Value;
    fn overlay_failures(&self) -> Option<u64>;
    /// Registration state (`None`: not configured), waiting for a reload that holds it.
    fn registration(&self) -> impl Future<Output = Option<&'static str>> + Send;
    fn leadership(&self) -> impl Future<Output = Option<crate::leader::View>> + Send;
    fn jobs(&self) -> impl Future<Output = Option<Vec<crate::jobs::JobView>>> + Send;
    /// The same three without waiting: `None` also while a reload holds them.
    fn registration_now(&self) -> Option<&'static str>;
    fn leadership_now(&self) -> Option<crate::leader::View>;
    fn jobs_now(&self) -> Option<Vec<crate::jobs::JobView>>;
    /// The app's locks and the etcd connection they need (`None`: no `etcd` block).
    fn locks(&self) -> (&crate::locks::Locks, Option<Arc<crate::etcd::Etcd>>);
    fn tls(&self) -> &crate::tls::Registry;
    /// Counters of every inbound socket: the listeners by name, then `admin`.
    fn inbound(&self) -> Arc<Vec<(String, Arc<InboundMetrics>)>>;
    fn telemetry(&self) -> &Telemetry;
}

/// One config generation as the admin server sees it.
pub(crate) struct Generation {
    pub(crate) number: u64,
    pub(crate) hash: String,
    pub(crate) loaded_at: SystemTime,
    pub(crate) config: Arc<Config>,
    pub(crate) services: Vec<(String, Arc<Upstream>)>,
}

impl Generation {
    fn service(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.services.iter().find(|(n, _)| n == name).map(|(_, up)| up)
    }
}

/// Config reloads so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reloads {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    /// The last reload failed (its error is `last_error`); false once one succeeds again.
    pub(crate) last_failed: bool,
    pub(crate) last_error: Option<String>,
}

/// Asks the process to shut down without a drain window (the app asked; it is done calling
/// out).
pub(crate) type Shutdown = Arc<dyn Fn() + Send + Sync>;

/// The admin API as a `tower::Service`, for one peer (mutating calls are answered only to
/// loopback peers).
pub(crate) struct Admin<V> {
    shared: Arc<Shared<V>>,
    peer: SocketAddr,
}

struct Shared<V> {
    views: V,
    shutdown: Shutdown,
    history: history::History,
}

impl<V> Clone for Admin<V> {
    fn clone(&self) -> Self {
        Admin { shared: self.shared.clone(), peer: self.peer }
    }
}

impl<V: Views> Admin<V> {
    /// The admin API over `views`. Until [`Admin::for_peer`] names the peer it answers as to
    /// an unknown one (0.0.0.0): calls that change something are refused.
    pub(crate) fn new(views: V, shutdown: Shutdown) -> Admin<V> {
        let shared = Shared { views, shutdown, history: history::History::default() };
        Admin { shared: Arc::new(shared), peer: SocketAddr::from(([0, 0, 0, 0], 0)) }
    }

    /// The same admin API, answering `peer`.
    pub(crate) fn for_peer(&self, peer: SocketAddr) -> Admin<V> {
        Admin { shared: self.shared.clone(), peer }
    }

    /// Samples the services for the dashboard's charts every second until `stop`.
    pub(crate) async fn sample(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(history::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    let generation = self.shared.views.generation();
                    self.shared.history.sample(tokio::time::Instant::now(), &generation.services);
                }
            }
        }
    }
}

impl<V: Views, B> tower::Service<Request<B>> for Admin<V> {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The admin API reads no request body: only the head travels into the future.
        let (head, _) = req.into_parts();
        let this = self.clone();
        Box::pin(async move { Ok(this.route(&head).await) })
    }
}

/// Serves the admin API on an already bound socket until `stop` is cancelled, under the
/// admin port's own limits (connections, header timeout, head size).
pub(crate) async fn serve<V: Views>(
    socket: TcpListener,
    admin: Admin<V>,
    limits: InboundLimits,
    metrics: Arc<InboundMetrics>,
    stop: CancellationToken,
) {
    tokio::spawn(admin.clone().sample(stop.clone()));
    let mut acceptor = Acceptor::new(socket, "admin", metrics.clone());
    while let Some((stream, peer, slot)) = acceptor.next(&stop, limits.max_connections).await {
        let (admin, limits, metrics, stop) =
            (admin.for_peer(peer), limits.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            server::serve(stream, false, None, &limits, &metrics, &stop, |activity, _| {
                service_fn(move |req| {
                    let guard = activity.begin();
                    let call = admin.clone().oneshot(req);
                    async move { call.await.map(|resp| resp.map(|b| Tracked::new(b, guard))) }
                })
            })
            .await;
            drop(slot);
        });
    }
}

impl<V: Views> Admin<V> {
    async fn route(&self, req: &http::request::Parts) -> Response<Full<Bytes>> {
        let views = &self.shared.views;
        let query = req.uri.query().unwrap_or("");
        if let Some(name) = req.uri.path().strip_prefix("/locks/") {
            return lock(views, &req.method, name, query, self.peer).await;
        }
        match (&req.method, req.uri.path()) {
            (&Method::GET, "/") => dashboard::page(),
            (&Method::GET, "/dashboard.json") => dashboard::data(views, &self.shared.history).await,
            (&Method::GET, "/locks") => {
                let held = views.locks().0.list().await;
                json_response(StatusCode::OK, &json!({ "held": held }))
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => ready(views),
            (&Method::GET, "/config") => config(views).await,
            (&Method::GET, "/upstreams") => upstreams(views).await,
            (&Method::GET, "/explain") => explain(views, query),
            (&Method::GET, "/jobs") => match views.jobs().await {
                Some(jobs) => json_response(
                    StatusCode::OK,
                    &json!({ "jobs": jobs, "leader": views.leadership().await }),
                ),
                None => no_leader(),
            },
            (&Method::GET, "/leader") => match views.leadership().await {
                Some(view) => json_response(StatusCode::OK, &json!(view)),
                None => no_leader(),
            },
            (&Method::GET, "/metrics") => metrics::respond(views, req.headers.get(header::ACCEPT)),
            (&Method::POST, "/shutdown") if !self.peer.ip().to_canonical().is_loopback() => {
                tracing::warn!(peer = %self.peer, "refused POST /shutdown from outside the pod");
                text(StatusCode::FORBIDDEN, "forbidden: /shutdown is answered only to loopback clients\n")
            }
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested through the admin API");
                (self.shared.shutdown)();
                json_response(StatusCode::ACCEPTED, &json!({ "shutting_down": true }))
            }
            (
                _,
                "/" | "/dashboard.json" | "/live" | "/ready" | "/config" | "/upstreams" | "/explain"
                | "/leader" | "/jobs" | "/metrics" | "/shutdown",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try / (dashboard) /live /ready /config /upstreams /explain /metrics\n",
            ),
        }
    }
}

fn no_leader() -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, &json!({ "error": "no `leader` block in the config" }))
}

fn ready(views: &impl Views) -> Response<Full<Bytes>> {
    match views.readiness() {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ready": true })),
        Err(reasons) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "ready": false, "reasons": reasons }))
        }
    }
}

async fn config(views: &impl Views) -> Response<Full<Bytes>> {
    let generation = views.generation();
    let reloads = views.reloads();
    let loaded_at = humantime::format_rfc3339_seconds(generation.loaded_at).to_string();
    let body = json!({
        "generation": generation.number,
        "hash": generation.hash,
        "loaded_at": loaded_at,
        "reload_failures": reloads.failed,
        "last_reload_error": reloads.last_error,
        "listeners": views.listener_addrs().await,
        "tls": views.tls().to_json(),
        "overlays": views.overlays(),
        "config": generation.config.to_json(),
    });
    json_response(StatusCode::OK, &body)
}

async fn upstreams(views: &impl Views) -> Response<Full<Bytes>> {
    let generation = views.generation();
    let mut watches = views.discovery().await;
    let services: serde_json::Map<_, _> = generation
        .services
        .iter()
        .map(|(name, up)| {
            let snapshot = up.balancer.snapshot();
            let view = json!({
                "load_balancing": up.config.load_balancing,
                "protocol": up.config.protocol,
                "discovery": discovery_name(&up.config.discovery),
                "synced": snapshot.synced,
                "panic_mode": snapshot.panic(),
                "circuit_breaker": up.breaker.state_name(),
                "in_flight": up.breaker.in_flight(),
                "watch": watches.remove(name),
                "endpoints": up.balancer.describe_learning(up.config.client_weighted.as_ref()),
            });
            (name.clone(), view)
        })
        .collect();
    let registration = views.registration().await;
    let body = json!({ "generation": generation.number, "registration": registration, "services": services });
    json_response(StatusCode::OK, &body)
}

/// `/explain?service=S&method=GET&path=/x&header=name:value&source=IP`: what would happen
/// to such a request now (`header` may repeat; method GET and path / by default).
fn explain(views: &impl Views, query: &str) -> Response<Full<Bytes>> {
    let (mut service, mut method, mut path, mut source) = (None, Method::GET, "/".to_string(), None);
    let mut headers = http::HeaderMap::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let refused = match key.as_ref() {
            "service" => {
                service = Some(value.to_string());
                None
            }
            "path" if value.starts_with('/') => {
                path = value.to_string();
                None
            }
            "path" => Some("a path starts with '/'"),
            "method" => {
                Method::from_bytes(value.as_bytes()).map(|m| method = m).err().map(|_| "not a method")
            }
            "source" => value.parse().map(|ip| source = Some(ip)).err().map(|_| "not an IP address"),
            "header" => {
                let pair = value.split_once(':').map(|(k, v)| {
                    (http::HeaderName::from_bytes(k.trim().as_bytes()), http::HeaderValue::from_str(v.trim()))
                });
                match pair {
                    Some((Ok(k), Ok(v))) => {
                        headers.append(k, v);
                        None
                    }
                    _ => Some("a header is name:value"),
                }
            }
            _ => Some("unknown parameter (service, method, path, header, source)"),
        };
        if let Some(why) = refused {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("{key}={value}: {why}") }),
            );
        }
    }
    let generation = views.generation();
    let Some(name) = service else {
        let msg = "give ?service=NAME (and optionally method, path, header=name:value, source)";
        return json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }));
    };
    let Some(up) = generation.service(&name) else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no service {name:?}") }));
    };
    let req = crate::routing::Request { method: &method, path: &path, headers: &headers, source };
    json_response(StatusCode::OK, &crate::proxy::explain::explain(up, &req))
}

/// `POST /locks/NAME?ttl=10s&wait=0s` acquires (wait 0: one short attempt), `DELETE` releases;
/// loopback clients only, like every call that changes something.
async fn lock(
    views: &impl Views,
    method: &Method,
    name: &str,
    query: &str,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    use crate::locks::LockError;
    if !peer.ip().to_canonical().is_loopback() {
        return text(StatusCode::FORBIDDEN, "forbidden: locks are answered only to loopback clients\n");
    }
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "a lock name is letters, digits, '.', '_' or '-'" }),
        );
    }
    let (locks, Some(etcd)) = views.locks() else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": "locks need the `etcd` block" }));
    };
    let (mut ttl, mut wait) = (Duration::from_secs(10), Duration::ZERO);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let parsed = humantime::parse_duration(&v);
        match (k.as_ref(), parsed) {
            ("ttl", Ok(d)) if (Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) => ttl = d,
            ("wait", Ok(d)) if d <= Duration::from_secs(300) => wait = d,
            _ => {
                let msg = format!("{k}={v}: ttl is 2s..1h, wait 0s..5m");
                return json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }));
            }
        }
    }
    let result = match *method {
        Method::POST => {
            locks.acquire(&etcd, name, ttl, wait.max(Duration::from_millis(200))).await.map(|g| json!(g))
        }
        Method::DELETE => locks.release(&etcd, name).await.map(|()| json!({ "released": name })),
        _ => {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: POST acquires, DELETE releases\n",
            );
        }
    };
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(e) => {
            let status = match e {
                LockError::Busy(..) | LockError::AlreadyHeld(..) => StatusCode::CONFLICT,
                LockError::NotHeld(_) => StatusCode::NOT_FOUND,
                LockError::Etcd(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            json_response(status, &json!({ "error": e.to_string() }))
        }
    }
}

pub(crate) fn discovery_name(d: &crate::config::DiscoveryConfig) -> &'static str {
    match d {
        crate::config::DiscoveryConfig::Static { .. } => "static",
        crate::config::DiscoveryConfig::Etcd { .. } => "etcd",
        crate::config::DiscoveryConfig::Dns { .. } => "dns",
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("static"));
    resp
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::App;

    async fn call(admin: &Admin<App>, peer: &str, req: Request<()>) -> Response<Full<Bytes>> {
        admin.for_peer(peer.parse().unwrap()).oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn shutdown_is_answered_only_to_loopback_peers() {
        let yaml = "admin: { bind: 127.0.0.1:0 }\nlisteners:\n  - { name: f, bind: 127.0.0.1:0, service: s }\n\
                    services:\n  s:\n    endpoints: []\n";
        let app = App::start(Config::parse(yaml).unwrap(), None).await.unwrap();
        let admin = app.admin();
        let shutdown = || Request::post("/shutdown").body(()).unwrap();
        for peer in ["10.1.2.3:4567", "[fd00::2]:80", "192.0.2.2:1"] {
            assert_eq!(call(&admin, peer, shutdown()).await.status(), StatusCode::FORBIDDEN, "{peer}");
        }
        assert!(!app.is_draining(), "a refused request must not start a shutdown");
        let get = call(&admin, "10.1.2.3:4567", Request::get("/live").body(()).unwrap());
        assert_eq!(get.await.status(), StatusCode::OK, "probes stay open to the network");
        let unnamed = admin.clone().oneshot(shutdown()).await.unwrap();
        assert_eq!(unnamed.status(), StatusCode::FORBIDDEN, "no peer named: not loopback");
        // A dual-stack admin socket sees IPv4 loopback as ::ffff:127.0.0.1.
        let resp = call(&admin, "[::ffff:127.0.0.1]:9", shutdown()).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        tokio::time::timeout(Duration::from_secs(10), app.finished()).await.unwrap();
    }

    #[tokio::test]
    async fn routes_answer_without_a_socket() {
        let yaml = "admin: { bind: 127.0.0.1:0 }\nlisteners:\n  - { name: f, bind: 127.0.0.1:0, service: s }\nservices:\n  s:\n    endpoints: [{ addr: 127.0.0.1:9 }]\n";
        let admin = App::start(Config::parse(yaml).unwrap(), None).await.unwrap().admin();
        let get = |path: &str| Request::get(path).body(()).unwrap();
        for (path, status, content_type) in [
            ("/", 200, "text/html; charset=utf-8"),
            ("/dashboard.json", 200, "application/json"),
            ("/upstreams", 200, "application/json"),
            ("/metrics", 200, "text/plain; version=0.0.4; charset=utf-8"),
            ("/leader", 404, "application/json"),
            ("/nope", 404, "text/plain; charset=utf-8"),
        ] {
            let resp = call(&admin, "127.0.0.1:1", get(path)).await;
            assert_eq!(resp.status(), status, "{path}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], content_type, "{path}");
        }
        let put = Request::put("/dashboard.json").body(()).unwrap();
        assert_eq!(call(&admin, "127.0.0.1:1", put).await.status(), StatusCode::METHOD_NOT_ALLOWED);
        let page = call(&admin, "127.0.0.1:1", get("/")).await;
        let csp = page.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
        assert_eq!(page.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }

    #[tokio::test]
    async fn the_dashboard_lists_at_most_200_endpoints_per_service_and_counts_the_rest() {
        let mut yaml =
            "admin: { bind: 127.0.0.1:0 }\nlisteners:\n  - { name: f, bind: 127.0.0.1:0, service: s }\n\
                        services:\n  s:\n    endpoints:\n"
                .to_string();
        for port in 10_000..10_250 {
            yaml.push_str(&format!("      - addr: 127.0.0.1:{port}\n"));
        }
        let admin = App::start(Config::parse(&yaml).unwrap(), None).await.unwrap().admin();
        let resp = call(&admin, "127.0.0.1:1", Request::get("/dashboard.json").body(()).unwrap()).await;
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        let overview: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let service = &overview["services"][0];
        assert_eq!(service["endpoints"].as_array().unwrap().len(), 200);
        assert_eq!(service["endpoints_omitted"], 50);
        assert_eq!(service["endpoints"][0]["addr"], "127.0.0.1:10000", "ordered by address within a state");
    }
}
