//! `/metrics`: every counter and gauge, encoded with prometheus-client at scrape time from
//! the live state of an [`App`]. Endpoint labels come from the endpoints that exist now.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::metrics::{Histogram, get};
use crate::app::App;

/// Renders the exposition text for one scrape.
pub fn render(app: &App) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AppCollector(app.clone())));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[derive(Debug)]
struct AppCollector(App);

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

impl Collector for AppCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let app = &self.0;
        let runtime = app.runtime();
        let ups: Vec<_> = runtime.upstreams.iter().collect();

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
        let rows: Vec<_> = ups
            .iter()
            .map(|(n, up)| {
                let ejected = up
                    .balancer
                    .describe()
                    .iter()
                    .filter(|e| e.state == "ejected" || e.state == "probing")
                    .count();
                (svc(n), ejected as i64)
            })
            .collect();
        gauge(&mut enc, "outrider_endpoints_ejected", "Endpoints currently ejected.", &rows)?;
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

        if let Some(refused) = app.overlay_failures() {
            counter(
                &mut enc,
                "outrider_overlay_refused",
                "etcd overlays refused as invalid (each distinct text once).",
                &[(vec![], refused)],
            )?;
        }

        let inbound = app.inbound_metrics();
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
        let certs = app.tls().certificates();
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
            &[(vec![], app.tls().failures.load(Ordering::Relaxed))],
        )?;
        if let Some(state) = app.registration_state_now() {
            gauge(
                &mut enc,
                "outrider_registration_registered",
                "1 while the app is registered in etcd.",
                &[(vec![], i64::from(state == "registered"))],
            )?;
        }
        if let Some(view) = app.leadership_now() {
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
        if let Some(jobs) = app.jobs_now() {
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
        let status = app.status().borrow().clone();
        counter(
            &mut enc,
            "outrider_config_reloads",
            "Config reloads by result.",
            &[
                (vec![("result", "success")], status.generation.saturating_sub(1)),
                (vec![("result", "failure")], status.reload_failures),
            ],
        )?;
        gauge(
            &mut enc,
            "outrider_config_generation",
            "Generation of the running config.",
            &[(vec![], status.generation as i64)],
        )?;
        if let Some(log) = &app.telemetry().access {
            counter(
                &mut enc,
                "outrider_access_log_dropped",
                "Access log lines dropped: stdout could not keep up.",
                &[(vec![], log.dropped.load(Ordering::Relaxed))],
            )?;
        }
        if let Some(t) = &app.telemetry().tracing {
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
