//! `/metrics`: every counter and gauge, encoded with prometheus-client at scrape time from
//! the live state the admin [`Views`] give. Endpoint labels come from the endpoints that
//! exist now. A scrape that accepts OpenMetrics gets it; any other gets the Prometheus text
//! format 0.0.4 (what promtool's linter and older scrapers parse), converted from it.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;

use super::Views;
use crate::telemetry::metrics::{Histogram, get};
use crate::upstream::STATES;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `/metrics` answer, in the format the scrape's `Accept` header asks for.
pub(super) fn respond(views: &impl Views, accept: Option<&HeaderValue>) -> Response<Full<Bytes>> {
    let openmetrics =
        accept.and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("application/openmetrics-text"));
    let body = render(views.clone());
    let (body, content_type) =
        if openmetrics { (body, OPENMETRICS) } else { (prometheus_text(&body), PROMETHEUS_TEXT) };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The exposition for one scrape, in OpenMetrics.
pub(crate) fn render<V: Views>(views: V) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(views)));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's family is named with
/// its `_total` suffix, `info` becomes a gauge named `_info`, and `# EOF` / `# UNIT` go.
pub(crate) fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "unknown" => (family.to_string(), "untyped"),
                other => (family.to_string(), other),
            };
            if let Some((_, text)) = help.take().filter(|(h, _)| *h == family) {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if !(line.starts_with("# EOF") || line.starts_with("# UNIT ")) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

struct Scrape<V>(V);

impl<V> std::fmt::Debug for Scrape<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn svc(name: &str) -> Labels<'_> {
    vec![("service", name)]
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, u64)]) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Integer or float gauge rows.
fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, N)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &Histogram)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl<V: Views> Collector for Scrape<V> {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let views = &self.0;
        let generation = views.generation();
        let ups: Vec<_> = generation.services.iter().map(|(n, up)| (n, up)).collect();

        let mut rows = Vec::new();
        for (name, up) in &ups {
            for (m, c, n) in up.metrics.requests.cells() {
                rows.push((vec![("service", name.as_str()), ("method", m), ("status_class", c)], n));
            }
        }
        counter(
            &mut enc,
            "outrider_requests",
            "Requests answered to the app, by method and status class.",
            &rows,
        )?;

        let endpoints: Vec<_> = ups.iter().map(|(n, up)| (n.as_str(), up.balancer.snapshot())).collect();
        let addrs: Vec<Vec<String>> =
            endpoints.iter().map(|(_, s)| s.endpoints.iter().map(|e| e.addr.to_string()).collect()).collect();
        let mut rows = Vec::new();
        for ((name, snap), addrs) in endpoints.iter().zip(&addrs) {
            for (e, addr) in snap.endpoints.iter().zip(addrs) {
                for (m, c, n) in e.state.requests.cells() {
                    rows.push((
                        vec![
                            ("service", *name),
                            ("endpoint", addr.as_str()),
                            ("method", m),
                            ("status_class", c),
                        ],
                        n,
                    ));
                }
            }
        }
        counter(
            &mut enc,
            "outrider_upstream_requests",
            "Attempts sent to each endpoint; status_class=error: no response.",
            &rows,
        )?;
        let mut rows = Vec::new();
        for ((name, snap), addrs) in endpoints.iter().zip(&addrs) {
            for (e, addr) in snap.endpoints.iter().zip(addrs) {
                rows.push((
                    vec![("service", *name), ("endpoint", addr.as_str())],
                    e.state.in_flight() as i64,
                ));
            }
        }
        gauge(
            &mut enc,
            "outrider_endpoint_in_flight",
            "Requests (or TCP connections) in flight per endpoint.",
            &rows,
        )?;
        let mut rows = Vec::new();
        for (((name, snap), addrs), (_, up)) in endpoints.iter().zip(&addrs).zip(ups.iter()) {
            let Some(cfg) = &up.config.client_weighted else { continue };
            for (e, addr) in snap.endpoints.iter().zip(addrs) {
                if let Some(w) = e.state.load.weight(cfg) {
                    rows.push((vec![("service", *name), ("endpoint", addr.as_str())], w));
                }
            }
        }
        gauge(
            &mut enc,
            "outrider_endpoint_learned_weight",
            "client_weighted: the weight learned from the endpoint's ORCA load reports.",
            &rows,
        )?;

        let rows: Vec<_> = ups.iter().map(|(n, up)| (svc(n), &up.metrics.request_duration)).collect();
        histogram(
            &mut enc,
            "outrider_request_duration_seconds",
            "Time to answer the app (response headers).",
            &rows,
        )?;
        let rows: Vec<_> = ups.iter().map(|(n, up)| (svc(n), &up.metrics.upstream_duration)).collect();
        histogram(
            &mut enc,
            "outrider_upstream_duration_seconds",
            "Time per attempt until the upstream's response headers.",
            &rows,
        )?;

        let per_service = |f: &dyn Fn(&crate::proxy::Upstream) -> u64| -> Vec<(Labels, u64)> {
            ups.iter().map(|(n, up)| (svc(n), f(up))).collect()
        };
        let m = |up: &crate::proxy::Upstream| up.metrics.clone();
        counter(
            &mut enc,
            "outrider_connect_errors",
            "Failed TCP connects to endpoints.",
            &per_service(&|u| get(&m(u).connect_errors)),
        )?;
        let mut rows = Vec::new();
        for (n, up) in &ups {
            for (f, c) in crate::tls::client::FAILURES.iter().zip(&up.metrics.tls_failures) {
                rows.push((vec![("service", n.as_str()), ("reason", f.as_str())], get(c)));
            }
        }
        counter(
            &mut enc,
            "outrider_tls_handshake_failures",
            "TLS handshakes with endpoints that failed, by reason.",
            &rows,
        )?;
        counter(&mut enc, "outrider_retries", "Retries sent.", &per_service(&|u| get(&m(u).retries)))?;
        counter(
            &mut enc,
            "outrider_retry_budget_exhausted",
            "Retries not sent because the budget was spent.",
            &per_service(&|u| get(&m(u).budget_exhausted)),
        )?;
        counter(
            &mut enc,
            "outrider_rate_limited",
            "Requests refused by the rate limit.",
            &per_service(&|u| get(&m(u).rate_limited)),
        )?;
        counter(
            &mut enc,
            "outrider_ejections",
            "Endpoints ejected by outlier detection.",
            &per_service(&|u| u.balancer.ejections.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut enc,
            "outrider_tcp_connections",
            "TCP connections proxied.",
            &per_service(&|u| get(&m(u).tcp_connections)),
        )?;
        let mut rows = Vec::new();
        for (n, up) in &ups {
            rows.push((vec![("service", n.as_str()), ("direction", "sent")], get(&up.metrics.tcp_bytes_up)));
            rows.push((
                vec![("service", n.as_str()), ("direction", "received")],
                get(&up.metrics.tcp_bytes_down),
            ));
        }
        counter(&mut enc, "outrider_tcp_bytes", "TCP bytes proxied (sent: app to endpoint).", &rows)?;
        let mut rows = Vec::new();
        for (n, up) in &ups {
            rows.push((
                vec![("service", n.as_str()), ("result", "healthy")],
                get(&up.metrics.health_checks_ok),
            ));
            rows.push((
                vec![("service", n.as_str()), ("result", "unhealthy")],
                get(&up.metrics.health_checks_failed),
            ));
        }
        counter(&mut enc, "outrider_health_checks", "Active health check results.", &rows)?;

        let rows: Vec<_> = ups.iter().map(|(n, up)| (svc(n), i64::from(up.breaker.in_flight()))).collect();
        gauge(&mut enc, "outrider_requests_in_flight", "Requests in flight per service.", &rows)?;
        // One pass over each service's endpoints serves both gauges.
        let counts: Vec<_> = ups.iter().map(|(n, up)| (n.as_str(), up.balancer.state_counts())).collect();
        let at = |state: &str| STATES.iter().position(|s| *s == state).unwrap_or(0);
        let rows: Vec<_> =
            counts.iter().map(|(n, c)| (svc(n), (c[at("ejected")] + c[at("probing")]) as i64)).collect();
        gauge(&mut enc, "outrider_endpoints_ejected", "Endpoints currently ejected.", &rows)?;
        let mut rows = Vec::new();
        for (n, c) in &counts {
            for (state, count) in STATES.iter().zip(c) {
                rows.push((vec![("service", *n), ("state", *state)], *count as i64));
            }
        }
        gauge(
            &mut enc,
            "outrider_endpoints",
            "Endpoints discovered, by state (active, probing, ejected, unhealthy, draining).",
            &rows,
        )?;
        let rows: Vec<_> = ups
            .iter()
            .map(|(n, up)| {
                let v = match up.breaker.state_name() {
                    "open" => 2,
                    "half_open" => 1,
                    _ => 0,
                };
                (svc(n), v)
            })
            .collect();
        gauge(&mut enc, "outrider_circuit_breaker_state", "0 closed, 1 half-open, 2 open.", &rows)?;

        let watches: Vec<_> =
            ups.iter().filter_map(|(n, up)| Some((n.as_str(), up.watch.clone()?))).collect();
        let rows: Vec<_> =
            watches.iter().map(|(n, w)| (svc(n), w.revision.load(Ordering::Relaxed))).collect();
        gauge(&mut enc, "outrider_discovery_revision", "etcd revision of the last endpoint set.", &rows)?;
        let rows: Vec<_> =
            watches.iter().map(|(n, w)| (svc(n), i64::from(w.state() == "watching"))).collect();
        gauge(
            &mut enc,
            "outrider_discovery_watching",
            "1 while the etcd watch is established (0: connecting, disconnected or snapshot).",
            &rows,
        )?;
        let rows: Vec<_> = watches
            .iter()
            .map(|(n, w)| (svc(n), w.seconds_since_update().map_or(-1, |s| s as i64)))
            .collect();
        gauge(
            &mut enc,
            "outrider_discovery_seconds_since_update",
            "Seconds since etcd last changed the set (-1: never).",
            &rows,
        )?;
        let rows: Vec<_> =
            watches.iter().map(|(n, w)| (svc(n), w.reconnects.load(Ordering::Relaxed))).collect();
        counter(&mut enc, "outrider_discovery_reconnects", "etcd watch reconnects.", &rows)?;
        let rows: Vec<_> = watches.iter().map(|(n, w)| (svc(n), w.refused.load(Ordering::Relaxed))).collect();
        counter(
            &mut enc,
            "outrider_discovery_refused_endpoints",
            "Discovered endpoints refused: address outside allowed_networks.",
            &rows,
        )?;
        let rows: Vec<_> =
            watches.iter().map(|(n, w)| (svc(n), w.undecodable.load(Ordering::Relaxed))).collect();
        counter(
            &mut enc,
            "outrider_discovery_undecodable_values",
            "etcd values skipped as undecodable.",
            &rows,
        )?;

        let names: Vec<_> = ups.iter().filter_map(|(n, up)| Some((n.as_str(), up.dns.clone()?))).collect();
        let rows: Vec<_> =
            names.iter().map(|(n, d)| (svc(n), d.answers.load(Ordering::Relaxed) as i64)).collect();
        gauge(
            &mut enc,
            "outrider_dns_answers",
            "Endpoints in the set DNS discovery last handed over.",
            &rows,
        )?;
        let rows: Vec<_> =
            names.iter().map(|(n, d)| (svc(n), d.ttl_ms.load(Ordering::Relaxed) as f64 / 1000.0)).collect();
        gauge(&mut enc, "outrider_dns_ttl_seconds", "Shortest TTL among the last DNS answers.", &rows)?;
        let rows: Vec<_> = names.iter().map(|(n, d)| (svc(n), d.last_resolution().unwrap_or(0.0))).collect();
        gauge(
            &mut enc,
            "outrider_dns_last_resolution_timestamp_seconds",
            "When every name of the service last resolved (Unix time; 0: never).",
            &rows,
        )?;
        let rows: Vec<_> = names.iter().map(|(n, d)| (svc(n), d.failures.load(Ordering::Relaxed))).collect();
        counter(
            &mut enc,
            "outrider_dns_failures",
            "DNS lookups that failed (the last answer was kept).",
            &rows,
        )?;
        let rows: Vec<_> = names.iter().map(|(n, d)| (svc(n), d.refused.load(Ordering::Relaxed))).collect();
        counter(
            &mut enc,
            "outrider_dns_refused_endpoints",
            "DNS answers refused: address outside allowed_networks.",
            &rows,
        )?;

        if let Some(refused) = views.overlay_failures() {
            counter(
                &mut enc,
                "outrider_overlay_refused",
                "etcd overlays refused as invalid (each distinct text once).",
                &[(vec![], refused)],
            )?;
        }

        let inbound = views.inbound();
        let rows: Vec<_> =
            inbound.iter().map(|(n, m)| (vec![("listener", n.as_str())], get(&m.accepted))).collect();
        counter(
            &mut enc,
            "outrider_inbound_connections",
            "Connections accepted, by listener (admin: the admin port).",
            &rows,
        )?;
        let rows: Vec<_> = inbound
            .iter()
            .map(|(n, m)| (vec![("listener", n.as_str())], m.open.load(Ordering::Relaxed) as i64))
            .collect();
        gauge(&mut enc, "outrider_inbound_connections_open", "Connections open, by listener.", &rows)?;
        let mut rows = Vec::new();
        for (n, m) in inbound.iter() {
            for (reason, c) in [
                ("max_connections", &m.over_capacity),
                ("header_timeout", &m.header_timeouts),
                ("idle_timeout", &m.idle_timeouts),
                ("headers_too_large", &m.heads_too_large),
                ("unsupported_transfer_coding", &m.unsupported_codings),
            ] {
                rows.push((vec![("listener", n.as_str()), ("reason", reason)], get(c)));
            }
        }
        counter(
            &mut enc,
            "outrider_inbound_refused",
            "Connections closed or requests refused by a listener's limits, by reason.",
            &rows,
        )?;
        let mut rows = Vec::new();
        for (n, m) in inbound.iter() {
            for (r, c) in crate::tls::server::REFUSALS.iter().zip(&m.tls_refusals) {
                rows.push((vec![("listener", n.as_str()), ("reason", r.as_str())], get(c)));
            }
        }
        counter(
            &mut enc,
            "outrider_tls_inbound_refused",
            "TLS handshakes a listener refused, by reason.",
            &rows,
        )?;
        let certs = views.tls().certificates();
        let rows: Vec<_> = certs
            .iter()
            .map(|(file, i)| {
                (vec![("file", file.as_str()), ("subject", i.subject.as_str())], i.expiry_unix())
            })
            .collect();
        gauge(
            &mut enc,
            "outrider_tls_certificate_expiry_timestamp_seconds",
            "When each loaded certificate expires (seconds since the epoch).",
            &rows,
        )?;
        counter(
            &mut enc,
            "outrider_tls_reload_failures",
            "TLS files that failed to load on rotation (the old material stayed).",
            &[(vec![], views.tls().failures.load(Ordering::Relaxed))],
        )?;
        if let Some(state) = views.registration_now() {
            gauge(
                &mut enc,
                "outrider_registration_registered",
                "1 while the app is registered in etcd.",
                &[(vec![], i64::from(state == "registered"))],
            )?;
        }
        if let Some(view) = views.leadership_now() {
            let labels = vec![("election", view.election.as_str())];
            gauge(
                &mut enc,
                "outrider_leader",
                "1 while this instance leads its election.",
                &[(labels.clone(), i64::from(view.leader))],
            )?;
            gauge(
                &mut enc,
                "outrider_leader_term",
                "The fencing token of this instance's term (0: not leading).",
                &[(labels, view.term.unwrap_or(0))],
            )?;
            counter(
                &mut enc,
                "outrider_leadership_changes",
                "Times this instance gained or lost leadership.",
                &[(vec![], view.changes)],
            )?;
        }
        if let Some(jobs) = views.jobs_now() {
            let mut rows = Vec::new();
            for j in &jobs {
                for (result, n) in [
                    ("started", j.started),
                    ("succeeded", j.succeeded),
                    ("failed", j.failed),
                    ("skipped", j.skipped),
                ] {
                    rows.push((vec![("job", j.name.as_str()), ("result", result)], n));
                }
            }
            counter(&mut enc, "outrider_job_runs", "Leader-only job runs by result.", &rows)?;
        }
        let reloads = views.reloads();
        counter(
            &mut enc,
            "outrider_config_reloads",
            "Config reloads by result.",
            &[
                (vec![("result", "success")], reloads.succeeded),
                (vec![("result", "failure")], reloads.failed),
            ],
        )?;
        gauge(
            &mut enc,
            "outrider_config_last_reload_failed",
            "1 while the last config reload failed (the previous config still runs).",
            &[(vec![], i64::from(reloads.last_failed))],
        )?;
        gauge(
            &mut enc,
            "outrider_config_generation",
            "Generation of the running config.",
            &[(vec![], generation.number as i64)],
        )?;
        if let Some(log) = &views.telemetry().access {
            counter(
                &mut enc,
                "outrider_access_log_dropped",
                "Access log lines dropped: stdout could not keep up.",
                &[(vec![], log.dropped.load(Ordering::Relaxed))],
            )?;
        }
        if let Some(t) = &views.telemetry().tracing {
            counter(
                &mut enc,
                "outrider_trace_spans_dropped",
                "Spans dropped: export queue full or export failed.",
                &[(vec![], t.stats.dropped.load(Ordering::Relaxed))],
            )?;
            counter(
                &mut enc,
                "outrider_trace_spans_exported",
                "Spans exported.",
                &[(vec![], t.stats.exported.load(Ordering::Relaxed))],
            )?;
        }
        let mut m = enc.encode_descriptor("outrider_build", "Build information.", None, MetricType::Info)?;
        m.encode_info(&vec![("version", env!("CARGO_PKG_VERSION"))])?;
        Ok(())
    }
}
