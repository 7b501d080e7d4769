//! Active health checks: probe every endpoint of a service on an interval (with jitter) and
//! mark it unhealthy/healthy after consecutive results; pickers skip unhealthy endpoints.
//!
//! Owns: the probes (HTTP, TCP, gRPC health v1 — also used by app registration) and the
//! checker task. Must not: touch the request path — it only flips endpoint state and asks
//! the balancer to rebuild its snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Balancer;
use crate::config::{ActiveHealth, ProbeKind};
use crate::telemetry::metrics::{ServiceMetrics, inc};

/// One probe kind with its clients; cheap to share between concurrent probes.
#[derive(Debug, Clone)]
pub struct Prober {
    kind: ProbeKind,
    timeout: Duration,
    h1: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
}

/// A running checker; dropping it stops the task.
#[derive(Debug)]
pub struct Checker {
    pub config: ActiveHealth,
    _stop: DropGuard,
}

// === impl Prober ===

impl Prober {
    pub fn new(kind: ProbeKind, timeout: Duration) -> Prober {
        let h1 = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
        let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
        Prober { kind, timeout, h1, h2 }
    }

    /// True when `addr` answers healthy within the timeout.
    pub async fn probe(&self, addr: SocketAddr) -> bool {
        let attempt = async {
            match &self.kind {
                ProbeKind::Tcp => tokio::net::TcpStream::connect(addr).await.is_ok(),
                ProbeKind::Http { path, host, statuses } => {
                    self.http(addr, path, host.as_deref(), statuses).await
                }
                ProbeKind::Grpc { service } => self.grpc(addr, service).await,
            }
        };
        tokio::time::timeout(self.timeout, attempt).await.unwrap_or(false)
    }

    async fn http(&self, addr: SocketAddr, path: &str, host: Option<&str>, statuses: &[(u16, u16)]) -> bool {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        if let Some(host) = host {
            req = req.header(http::header::HOST, host);
        }
        let Ok(req) = req.body(Full::new(Bytes::new())) else { return false };
        match self.h1.request(req).await {
            Ok(resp) => {
                let code = resp.status().as_u16();
                statuses.iter().any(|(lo, hi)| (*lo..=*hi).contains(&code))
            }
            Err(_) => false,
        }
    }

    /// grpc.health.v1.Health/Check: healthy when the answer is SERVING with grpc-status 0.
    async fn grpc(&self, addr: SocketAddr, service: &str) -> bool {
        let msg = HealthCheckRequest { service: service.to_string() }.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + msg.len());
        frame.push(0); // not compressed
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(frame)));
        let Ok(req) = req else { return false };
        let Ok(resp) = self.h2.request(req).await else { return false };
        let header_status = resp.headers().get("grpc-status").cloned();
        let Ok(collected) = resp.into_body().collect().await else { return false };
        let trailer_status = collected.trailers().and_then(|t| t.get("grpc-status").cloned());
        let ok = header_status.or(trailer_status).is_some_and(|s| s == "0");
        ok && serving(collected.to_bytes())
    }
}

/// grpc.health.v1's messages (health.proto), encoded with prost.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    /// UNKNOWN = 0, SERVING = 1, NOT_SERVING = 2, SERVICE_UNKNOWN = 3.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// Parses a gRPC frame holding a HealthCheckResponse: SERVING (1) is healthy.
fn serving(mut body: Bytes) -> bool {
    if body.len() < 5 || body[0] != 0 {
        return false;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.advance(5);
    body.len() == len && HealthCheckResponse::decode(body).is_ok_and(|r| r.status == 1)
}

/// Consecutive results that disagree with the current verdict; the verdict flips after
/// `healthy` passes or `unhealthy` failures in a row. Shared by the endpoint checker and the
/// registration gate.
#[derive(Debug, Default)]
pub struct Streak(u32);

impl Streak {
    /// The verdict after one more result.
    pub fn observe(&mut self, current: bool, ok: bool, healthy: NonZeroU32, unhealthy: NonZeroU32) -> bool {
        if ok == current {
            self.0 = 0;
            return current;
        }
        self.0 += 1;
        let needed = if ok { healthy } else { unhealthy };
        if self.0 < needed.get() {
            return current;
        }
        self.0 = 0;
        ok
    }
}

// === impl Checker ===

impl Checker {
    pub fn start(
        service: &str,
        config: &ActiveHealth,
        balancer: &Arc<Balancer>,
        metrics: &Arc<ServiceMetrics>,
    ) -> Checker {
        let stop = CancellationToken::new();
        let task =
            run(service.to_string(), config.clone(), Arc::downgrade(balancer), metrics.clone(), stop.clone());
        tokio::spawn(task);
        Checker { config: config.clone(), _stop: stop.drop_guard() }
    }
}

async fn run(
    service: String,
    cfg: ActiveHealth,
    balancer: std::sync::Weak<Balancer>,
    metrics: Arc<ServiceMetrics>,
    stop: CancellationToken,
) {
    let prober = Prober::new(cfg.probe.clone(), cfg.timeout);
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    loop {
        let jitter = cfg.jitter.mul_f64(fastrand::f64());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(cfg.interval + jitter) => {}
        }
        let Some(b) = balancer.upgrade() else { return };
        let endpoints = b.snapshot().endpoints.clone();
        let mut probes = JoinSet::new();
        for e in &endpoints {
            let (prober, addr) = (prober.clone(), e.addr);
            probes.spawn(async move { (addr, prober.probe(addr).await) });
        }
        let results: HashMap<SocketAddr, bool> = probes.join_all().await.into_iter().collect();
        let mut changed = false;
        for e in &endpoints {
            let ok = results.get(&e.addr).copied().unwrap_or(false);
            inc(if ok { &metrics.health_checks_ok } else { &metrics.health_checks_failed });
            let health = &e.state.health;
            let was = health.is_healthy();
            let now = streaks.entry(e.addr).or_default().observe(
                was,
                ok,
                cfg.healthy_threshold,
                cfg.unhealthy_threshold,
            );
            if now != was {
                health.set_healthy(now);
                changed = true;
                tracing::warn!(%service, endpoint = %e.addr, healthy = now, "active health check changed state");
            }
        }
        streaks.retain(|addr, _| results.contains_key(addr));
        if changed {
            b.changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_needs_thresholds_both_ways() {
        let (two, three) = (NonZeroU32::new(2).unwrap(), NonZeroU32::new(3).unwrap());
        let (mut verdict, mut streak) = (false, Streak::default());
        let seen: Vec<bool> = [true, false, true, true, false, false, true, false, false, false]
            .into_iter()
            .map(|ok| {
                verdict = streak.observe(verdict, ok, two, three);
                verdict
            })
            .collect();
        assert_eq!(seen, [false, false, false, true, true, true, true, true, true, false]);
    }

    #[test]
    fn encodes_long_service_names_whole() {
        let name = "x".repeat(300);
        let bytes = HealthCheckRequest { service: name.clone() }.encode_to_vec();
        assert_eq!(bytes.len(), 1 + 2 + 300, "tag, two-byte varint length, name");
        assert_eq!(HealthCheckRequest::decode(bytes.as_slice()).unwrap().service, name);
    }

    #[test]
    fn parses_serving_and_not_serving() {
        assert!(serving(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])));
        assert!(!serving(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x02])));
        assert!(!serving(Bytes::from_static(&[0, 0, 0, 0, 0])));
    }
}
