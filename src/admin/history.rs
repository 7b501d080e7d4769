//! The dashboard's memory: each service's counters sampled once a second into a bounded ring
//! (five minutes), and each endpoint's over the last ten seconds. Rates, success ratios and
//! latency quantiles are differences between samples, computed when the page asks.
//!
//! Owns: the rings. Must not: grow without bound — a ring per service the running config
//! has and one per endpoint its snapshot has; gone services and endpoints are dropped at
//! the next sample.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::proxy::Upstream;
use crate::telemetry::metrics::{BUCKETS, get};

pub(super) const INTERVAL: Duration = Duration::from_secs(1);
/// Chart points kept per service: five minutes at one a second.
const KEEP: usize = 300;
/// The span the charts cover.
pub(super) const KEPT: Duration = Duration::from_secs(KEEP as u64 * INTERVAL.as_secs());
/// Samples the tables' rates span: the last ten seconds.
const WINDOW: usize = 10;

/// A service's counters at one instant (cumulative since start).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Totals {
    pub(super) requests: u64,
    /// Answered 5xx, or no answer at all.
    pub(super) failed: u64,
    pub(super) retries: u64,
    pub(super) rate_limited: u64,
    pub(super) budget_exhausted: u64,
    /// Request latency per bucket of `BUCKETS`, +Inf last.
    pub(super) latency: [u64; BUCKETS.len() + 1],
}

/// An endpoint's attempt counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct EndpointTotals {
    pub(super) attempts: u64,
    pub(super) failed: u64,
    pub(super) micros: u64,
}

/// Rates over the last `WINDOW` seconds.
#[derive(Debug, Default, Serialize, PartialEq)]
pub(super) struct Rates {
    pub(super) rps: f64,
    /// `None`: no requests in the window.
    pub(super) success_rate: Option<f64>,
    pub(super) p50_ms: Option<f64>,
    pub(super) p99_ms: Option<f64>,
    pub(super) retries_per_s: f64,
    pub(super) rate_limited_per_s: f64,
    pub(super) budget_exhausted_per_s: f64,
}

/// One point per sample interval, oldest first; `None` where no request was answered.
#[derive(Debug, Default, Serialize)]
pub(super) struct Chart {
    /// Seconds before now (≤ 0).
    pub(super) t: Vec<f64>,
    pub(super) rps: Vec<f64>,
    pub(super) success_rate: Vec<Option<f64>>,
    pub(super) p99_ms: Vec<Option<f64>>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub(super) struct EndpointRates {
    pub(super) rps: f64,
    /// Share of attempts that failed (5xx or no answer); `None`: no attempts.
    pub(super) error_rate: Option<f64>,
    /// Mean attempt latency; `None`: no attempts.
    pub(super) mean_ms: Option<f64>,
}

#[derive(Debug, Default)]
pub(super) struct History {
    services: Mutex<HashMap<String, Series>>,
}

#[derive(Debug, Default)]
struct Series {
    points: VecDeque<(Instant, Totals)>,
    endpoints: HashMap<SocketAddr, VecDeque<(Instant, EndpointTotals)>>,
}

impl History {
    /// Reads every service's counters now.
    pub(super) fn sample(&self, at: Instant, services: &[(String, Arc<Upstream>)]) {
        let mut all = self.lock();
        all.retain(|name, _| services.iter().any(|(n, _)| n == name));
        for (name, up) in services {
            let (requests, failed) = up.metrics.requests.totals();
            let mut latency = [0; BUCKETS.len() + 1];
            for (slot, (_, n)) in latency.iter_mut().zip(up.metrics.request_duration.snapshot().2) {
                *slot = n;
            }
            let totals = Totals {
                requests,
                failed,
                retries: get(&up.metrics.retries),
                rate_limited: get(&up.metrics.rate_limited),
                budget_exhausted: get(&up.metrics.budget_exhausted),
                latency,
            };
            let snap = up.balancer.snapshot();
            let endpoints = snap.endpoints.iter().map(|e| {
                let (attempts, failed) = e.state.requests.totals();
                let micros = get(&e.state.attempt_micros);
                (e.addr, EndpointTotals { attempts, failed, micros })
            });
            all.entry(name.clone()).or_default().record(at, totals, endpoints);
        }
    }

    /// The service's rates over the last ten seconds and its chart; `None` before the first
    /// sample.
    pub(super) fn service(&self, name: &str) -> Option<(Rates, Chart)> {
        let all = self.lock();
        let series = all.get(name)?;
        let (now, last) = *series.points.back()?;
        let window = match series.points.iter().rev().nth(WINDOW.min(series.points.len() - 1)) {
            Some((then, first)) if *then < now => rates(first, &last, now - *then),
            _ => Rates::default(),
        };
        let mut chart = Chart::default();
        for ((t0, a), (t1, b)) in series.points.iter().zip(series.points.iter().skip(1)) {
            // Rounded: the page polls this every second, and a chart needs no more digits.
            let r = rates(a, b, *t1 - *t0);
            chart.t.push(round(-(now - *t1).as_secs_f64(), 10.0));
            chart.rps.push(round(r.rps, 100.0));
            chart.success_rate.push(r.success_rate.map(|s| round(s, 10_000.0)));
            chart.p99_ms.push(r.p99_ms.map(|ms| round(ms, 1000.0)));
        }
        Some((window, chart))
    }

    /// An endpoint's rates over the last ten seconds.
    pub(super) fn endpoint(&self, service: &str, addr: SocketAddr) -> EndpointRates {
        let all = self.lock();
        let Some(ring) = all.get(service).and_then(|s| s.endpoints.get(&addr)) else {
            return EndpointRates::default();
        };
        let (Some((t0, a)), Some((t1, b))) = (ring.front(), ring.back()) else {
            return EndpointRates::default();
        };
        let secs = (*t1 - *t0).as_secs_f64();
        let attempts = b.attempts.saturating_sub(a.attempts);
        if secs <= 0.0 || attempts == 0 {
            return EndpointRates::default();
        }
        EndpointRates {
            rps: attempts as f64 / secs,
            error_rate: Some(b.failed.saturating_sub(a.failed) as f64 / attempts as f64),
            mean_ms: Some(b.micros.saturating_sub(a.micros) as f64 / attempts as f64 / 1000.0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Series>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Series {
    fn record(
        &mut self,
        at: Instant,
        totals: Totals,
        endpoints: impl Iterator<Item = (SocketAddr, EndpointTotals)>,
    ) {
        push(&mut self.points, (at, totals), KEEP + 1);
        for (addr, totals) in endpoints {
            push(self.endpoints.entry(addr).or_default(), (at, totals), WINDOW + 1);
        }
        // An endpoint not in this sample is gone.
        self.endpoints.retain(|_, ring| ring.back().is_some_and(|(t, _)| *t == at));
    }
}

fn round(x: f64, per_unit: f64) -> f64 {
    (x * per_unit).round() / per_unit
}

fn push<T>(ring: &mut VecDeque<T>, item: T, cap: usize) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(item);
}

fn rates(a: &Totals, b: &Totals, over: Duration) -> Rates {
    let secs = over.as_secs_f64();
    if secs <= 0.0 {
        return Rates::default();
    }
    let per_s = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    let requests = b.requests.saturating_sub(a.requests);
    let mut latency = [0; BUCKETS.len() + 1];
    for (i, slot) in latency.iter_mut().enumerate() {
        *slot = b.latency[i].saturating_sub(a.latency[i]);
    }
    Rates {
        rps: requests as f64 / secs,
        success_rate: (requests > 0)
            .then(|| 1.0 - b.failed.saturating_sub(a.failed) as f64 / requests as f64),
        p50_ms: quantile(0.5, &latency).map(|s| s * 1000.0),
        p99_ms: quantile(0.99, &latency).map(|s| s * 1000.0),
        retries_per_s: per_s(a.retries, b.retries),
        rate_limited_per_s: per_s(a.rate_limited, b.rate_limited),
        budget_exhausted_per_s: per_s(a.budget_exhausted, b.budget_exhausted),
    }
}

/// The `q` quantile in seconds of per-bucket counts (`BUCKETS`, +Inf last), interpolated
/// linearly inside its bucket as Prometheus' `histogram_quantile` does; the +Inf bucket
/// answers the highest finite bound.
fn quantile(q: f64, counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = BUCKETS.get(i) else { return BUCKETS.last().copied() };
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            return Some(lower + (upper - lower) * (rank - below as f64) / n as f64);
        }
        below += n;
    }
    BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64, failed: u64, bucket: usize) -> Totals {
        let mut latency = [0; BUCKETS.len() + 1];
        latency[bucket] = requests;
        Totals { requests, failed, retries: requests / 10, latency, ..Totals::default() }
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut counts = [0; BUCKETS.len() + 1];
        assert_eq!(quantile(0.5, &counts), None);
        counts[2] = 100; // 1 ms .. 2.5 ms
        assert!((quantile(0.5, &counts).unwrap() - 0.00175).abs() < 1e-9);
        counts[14] = 1; // +Inf
        assert_eq!(quantile(1.0, &counts), Some(10.0));
    }

    #[test]
    fn rates_span_the_last_ten_seconds_and_the_chart_every_interval() {
        let series = History::default();
        let start = Instant::now();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut all = series.lock();
        for s in 0..=20u64 {
            // 100 requests a second, 5 of them failing, all in the 5–10 ms bucket.
            let ep = EndpointTotals { attempts: 50 * s, failed: 5 * s, micros: 50 * s * 4000 };
            let t = totals(100 * s, 5 * s, 4);
            all.entry("svc".into()).or_default().record(
                start + INTERVAL * s as u32,
                t,
                [(addr, ep)].into_iter(),
            );
        }
        drop(all);
        let (rates, chart) = series.service("svc").unwrap();
        assert!((rates.rps - 100.0).abs() < 1e-9 && (rates.retries_per_s - 10.0).abs() < 1e-9);
        assert!((rates.success_rate.unwrap() - 0.95).abs() < 1e-9);
        assert!((rates.p50_ms.unwrap() - 7.5).abs() < 1e-9, "{rates:?}");
        assert_eq!(chart.t.len(), 20);
        assert_eq!((chart.t[0], chart.t[19]), (-19.0, 0.0));
        let ep = series.endpoint("svc", addr);
        assert_eq!(ep, EndpointRates { rps: 50.0, error_rate: Some(0.1), mean_ms: Some(4.0) });
        assert_eq!(series.endpoint("svc", "127.0.0.1:2".parse().unwrap()), EndpointRates::default());
    }

    #[test]
    fn rings_are_bounded_and_forget_gone_endpoints() {
        let mut series = Series::default();
        let start = Instant::now();
        let (a, b): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        for s in 0..1000u32 {
            let eps = [(a, EndpointTotals::default()), (b, EndpointTotals::default())];
            let eps = if s < 500 { &eps[..] } else { &eps[..1] };
            series.record(start + INTERVAL * s, Totals::default(), eps.iter().copied());
        }
        assert_eq!(series.points.len(), KEEP + 1);
        assert_eq!(series.endpoints.len(), 1);
        assert_eq!(series.endpoints[&a].len(), WINDOW + 1);
    }
}
