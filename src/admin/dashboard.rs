//! The live dashboard: `GET /` serves one self-contained page (HTML, CSS and JS embedded in
//! the binary; no CDN, so it works in an air-gapped cluster) that polls `GET
//! /dashboard.json` every second — also what `outrider status` reads.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

use super::history::History;
use super::{Views, discovery_name};

const PAGE: &str = include_str!("dashboard.html");

/// Endpoints listed per service; the rest are counted (the states that need attention first).
const MAX_ENDPOINTS: usize = 200;

pub(super) fn page() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // The page may run its own inline script and style and fetch from this origin; nothing else.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `/dashboard.json`: compact, since the page asks every second.
pub(super) async fn data(views: &impl Views, history: &History) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&overview(views, history).await).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Everything the page shows, now.
async fn overview(views: &impl Views, history: &History) -> Value {
    let generation = views.generation();
    let reloads = views.reloads();
    let mut discovery = views.discovery().await;
    let services: Vec<Value> = generation
        .services
        .iter()
        .map(|(name, up)| {
            let kind = discovery_name(&up.config.discovery);
            let mut source = discovery.remove(name).unwrap_or_else(|| json!({}));
            if let Some(obj) = source.as_object_mut() {
                obj.insert("kind".into(), kind.into());
            }
            let (rates, chart) = history.service(name).unwrap_or_default();
            let snapshot = up.balancer.snapshot();
            let mut endpoints = up.balancer.describe_learning(up.config.client_weighted.as_ref());
            endpoints.sort_by_key(|e| (e.state == "active", e.addr));
            let omitted = endpoints.len().saturating_sub(MAX_ENDPOINTS);
            endpoints.truncate(MAX_ENDPOINTS);
            let endpoints: Vec<Value> = endpoints
                .into_iter()
                .map(|e| {
                    let rates = history.endpoint(name, e.addr);
                    let mut view = serde_json::to_value(e).unwrap_or_default();
                    view["rates"] = json!(rates);
                    view
                })
                .collect();
            json!({
                "name": name,
                "protocol": up.config.protocol,
                "load_balancing": up.config.load_balancing,
                "discovery": source,
                "synced": snapshot.synced,
                "panic_mode": snapshot.panic(),
                "circuit_breaker": up.breaker.state_name(),
                "in_flight": up.breaker.in_flight(),
                "rates": rates,
                "totals": {
                    "requests": up.metrics.requests.totals().0,
                    "retries": crate::telemetry::metrics::get(&up.metrics.retries),
                    "budget_exhausted": crate::telemetry::metrics::get(&up.metrics.budget_exhausted),
                    "rate_limited": crate::telemetry::metrics::get(&up.metrics.rate_limited),
                    "ejections": up.balancer.ejections.load(std::sync::atomic::Ordering::Relaxed),
                },
                "chart": chart,
                "endpoints": endpoints,
                "endpoints_omitted": omitted,
            })
        })
        .collect();
    let readiness = views.readiness();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "loaded_at": humantime::format_rfc3339_seconds(generation.loaded_at).to_string(),
        "reloads": {
            "succeeded": reloads.succeeded,
            "failed": reloads.failed,
            "last_failed": reloads.last_failed,
            "last_error": reloads.last_error,
        },
        "ready": readiness.is_ok(),
        "not_ready": readiness.err().unwrap_or_default(),
        "registration": views.registration_now(),
        "leader": views.leadership_now(),
        "interval_seconds": super::history::INTERVAL.as_secs_f64(),
        "history_seconds": super::history::KEPT.as_secs_f64(),
        "services": services,
    })
}
