//! The admin server: probes, introspection and a shutdown hook, on loopback by default.
//!
//! Owns: `/live`, `/ready`, `/config`, `/upstreams`, `/explain`, `POST /shutdown`. Must not: change
//! routing — it reads `App` state, and its only write is asking for shutdown, which it
//! answers only to loopback clients (the admin port may be bound on the pod IP for probes).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::server::{self, Acceptor, Tracked};

/// Serves the admin API on an already bound socket until `stop` is cancelled, under the
/// admin port's own limits (connections, header timeout, head size).
pub async fn serve(socket: TcpListener, app: App, stop: CancellationToken) {
    let limits = app.config().admin.limits.clone();
    let metrics = app.admin_metrics().clone();
    let mut acceptor = Acceptor::new(socket, "admin", metrics.clone());
    while let Some((stream, peer, slot)) = acceptor.next(&stop, limits.max_connections).await {
        let (app, limits, metrics, stop) = (app.clone(), limits.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            server::serve(stream, false, None, &limits, &metrics, &stop, |activity, _| {
                service_fn(move |req| {
                    let guard = activity.begin();
                    let app = app.clone();
                    async move {
                        Ok::<_, Infallible>(route(&app, req, peer).await.map(|b| Tracked::new(b, guard)))
                    }
                })
            })
            .await;
            drop(slot);
        });
    }
}

async fn route<B>(app: &App, req: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if let Some(name) = req.uri().path().strip_prefix("/locks/") {
        return lock(app, req.method(), name, req.uri().query().unwrap_or(""), peer).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/locks") => {
            let held = app.locks().0.list().await;
            json_response(StatusCode::OK, &json!({ "held": held }))
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => ready(app),
        (&Method::GET, "/config") => config(app).await,
        (&Method::GET, "/upstreams") => upstreams(app).await,
        (&Method::GET, "/explain") => explain(app, req.uri().query().unwrap_or("")),
        (&Method::GET, "/jobs") => match app.jobs().await {
            Some(jobs) => {
                json_response(StatusCode::OK, &json!({ "jobs": jobs, "leader": app.leadership().await }))
            }
            None => {
                json_response(StatusCode::NOT_FOUND, &json!({ "error": "no `leader` block in the config" }))
            }
        },
        (&Method::GET, "/leader") => match app.leadership().await {
            Some(view) => json_response(StatusCode::OK, &json!(view)),
            None => {
                json_response(StatusCode::NOT_FOUND, &json!({ "error": "no `leader` block in the config" }))
            }
        },
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(crate::telemetry::expose::render(app))));
            let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.parse().expect("static"));
            resp
        }
        (&Method::POST, "/shutdown") if !peer.ip().to_canonical().is_loopback() => {
            tracing::warn!(%peer, "refused POST /shutdown from outside the pod");
            text(StatusCode::FORBIDDEN, "forbidden: /shutdown is answered only to loopback clients\n")
        }
        (&Method::POST, "/shutdown") => {
            tracing::info!("shutdown requested through the admin API");
            app.shutdown(false);
            json_response(StatusCode::ACCEPTED, &json!({ "shutting_down": true }))
        }
        (
            _,
            "/live" | "/ready" | "/config" | "/upstreams" | "/explain" | "/leader" | "/jobs" | "/metrics"
            | "/shutdown",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => {
            text(StatusCode::NOT_FOUND, "not found; try /live /ready /config /upstreams /explain /metrics\n")
        }
    }
}

fn ready(app: &App) -> Response<Full<Bytes>> {
    match app.readiness() {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ready": true })),
        Err(reasons) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "ready": false, "reasons": reasons }))
        }
    }
}

async fn config(app: &App) -> Response<Full<Bytes>> {
    let runtime = app.runtime();
    let status = app.status().borrow().clone();
    let loaded_at = humantime::format_rfc3339_seconds(runtime.loaded_at).to_string();
    let body = json!({
        "generation": runtime.generation,
        "hash": runtime.hash,
        "loaded_at": loaded_at,
        "reload_failures": status.reload_failures,
        "last_reload_error": status.last_reload_error,
        "listeners": app.listener_addrs().await,
        "tls": app.tls().to_json(),
        "overlays": app.overlay_status(),
        "config": runtime.config.to_json(),
    });
    json_response(StatusCode::OK, &body)
}

async fn upstreams(app: &App) -> Response<Full<Bytes>> {
    let runtime = app.runtime();
    let mut watches = app.discovery_status().await;
    let services: serde_json::Map<_, _> = runtime
        .upstreams
        .iter()
        .map(|(name, up)| {
            let view = json!({
                "load_balancing": up.config.load_balancing,
                "protocol": up.config.protocol,
                "discovery": discovery_name(&up.config.discovery),
                "synced": up.balancer.snapshot().synced,
                "panic_mode": up.balancer.snapshot().panic(),
                "circuit_breaker": up.breaker.state_name(),
                "in_flight": up.breaker.in_flight(),
                "watch": watches.remove(name),
                "endpoints": up.balancer.describe_learning(up.config.client_weighted.as_ref()),
            });
            (name.clone(), view)
        })
        .collect();
    let registration = app.registration_state().await;
    let body =
        json!({ "generation": runtime.generation, "registration": registration, "services": services });
    json_response(StatusCode::OK, &body)
}

/// `/explain?service=S&method=GET&path=/x&header=name:value&source=IP`: what would happen
/// to such a request now (`header` may repeat; method GET and path / by default).
fn explain(app: &App, query: &str) -> Response<Full<Bytes>> {
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
    let runtime = app.runtime();
    let Some(name) = service else {
        let msg = "give ?service=NAME (and optionally method, path, header=name:value, source)";
        return json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }));
    };
    let Some(up) = runtime.upstreams.get(&name) else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no service {name:?}") }));
    };
    let req = crate::routing::Request { method: &method, path: &path, headers: &headers, source };
    json_response(StatusCode::OK, &crate::proxy::explain::explain(up, &req))
}

/// `POST /locks/NAME?ttl=10s&wait=0s` acquires (wait 0: one short attempt), `DELETE` releases;
/// loopback clients only, like every call that changes something.
async fn lock(
    app: &App,
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
    let (locks, Some(etcd)) = app.locks() else {
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

fn discovery_name(d: &crate::config::DiscoveryConfig) -> &'static str {
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
    use crate::config::Config;

    #[tokio::test]
    async fn shutdown_is_answered_only_to_loopback_peers() {
        let yaml = "admin: { bind: 127.0.0.1:0 }\nlisteners:\n  - { name: f, bind: 127.0.0.1:0, service: s }\n\
                    services:\n  s:\n    endpoints: []\n";
        let app = App::start(Config::parse(yaml).unwrap(), None).await.unwrap();
        let shutdown = || Request::post("/shutdown").body(()).unwrap();
        for peer in ["10.1.2.3:4567", "[fd00::2]:80", "192.0.2.2:1"] {
            let resp = route(&app, shutdown(), peer.parse().unwrap()).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{peer}");
        }
        assert!(!app.is_draining(), "a refused request must not start a shutdown");
        let get = route(&app, Request::get("/live").body(()).unwrap(), "10.1.2.3:4567".parse().unwrap());
        assert_eq!(get.await.status(), StatusCode::OK, "probes stay open to the network");
        // A dual-stack admin socket sees IPv4 loopback as ::ffff:127.0.0.1.
        let resp = route(&app, shutdown(), "[::ffff:127.0.0.1]:9".parse().unwrap()).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        tokio::time::timeout(std::time::Duration::from_secs(10), app.finished()).await.unwrap();
    }
}
