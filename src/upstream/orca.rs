//! Backend-reported load (ORCA) turned into weights, as gRPC's and Envoy's client-side
//! weighted round-robin do: `weight = qps / (utilization + eps / qps × error_penalty)`.
//!
//! Reports arrive per response in the `endpoint-load-metrics` header or trailer, in ORCA's
//! text form (`TEXT cpu_utilization=0.3, application_utilization=0.4, rps_fractional=120,
//! eps=2`). Utilization is `application_utilization` when positive, else `cpu_utilization`.
//! An endpoint's weight counts only after a blackout since its reports began (a new
//! instance's first numbers are noise) and until its last report expires; without one it
//! gets the mean of the others. Weights are recomputed when the snapshot is rebuilt, every
//! `update_period` — not per request.
//!
//! Owns: parsing, the per-endpoint report in atomics, and the formula. Must not: lock or
//! allocate on the request path (recording is a parse of one header and four stores).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Endpoint;
use crate::clock;
use crate::config::ClientWeighted;

/// The header (or trailer) an upstream reports its load in.
pub(crate) const HEADER: &str = "endpoint-load-metrics";

/// One load report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Report {
    pub(crate) utilization: f64,
    pub(crate) qps: f64,
    pub(crate) eps: f64,
}

/// The last report of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct Load {
    utilization: AtomicU64,
    qps: AtomicU64,
    eps: AtomicU64,
    /// When the last report came (`clock::now_ms`); 0: never.
    last_ms: AtomicU64,
    /// When the current unbroken run of reports began (for the blackout).
    since_ms: AtomicU64,
}

/// Parses ORCA's text form; `None` for anything else (JSON and binary forms are not read).
pub(crate) fn parse(value: &[u8]) -> Option<Report> {
    let text = std::str::from_utf8(value).ok()?.trim().strip_prefix("TEXT")?;
    let (mut cpu, mut app, mut report) = (0.0, 0.0, Report::default());
    for pair in text.split(',') {
        let (key, number) = pair.trim().split_once('=')?;
        let number: f64 = number.trim().parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
        match key.trim() {
            "cpu_utilization" => cpu = number,
            "application_utilization" => app = number,
            "rps_fractional" => report.qps = number,
            "eps" => report.eps = number,
            _ => {}
        }
    }
    report.utilization = if app > 0.0 { app } else { cpu };
    Some(report)
}

impl Load {
    /// Records the report in `headers` (a response's headers or trailers), if there is one.
    pub(crate) fn record_from(&self, headers: &http::HeaderMap, cfg: &ClientWeighted) {
        if let Some(report) = headers.get(HEADER).and_then(|v| parse(v.as_bytes())) {
            self.record(report, cfg);
        }
    }

    pub(crate) fn record(&self, r: Report, cfg: &ClientWeighted) {
        let now = clock::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > cfg.expiration.as_millis() as u64 {
            self.since_ms.store(now, Ordering::Relaxed);
        }
        self.utilization.store(r.utilization.to_bits(), Ordering::Relaxed);
        self.qps.store(r.qps.to_bits(), Ordering::Relaxed);
        self.eps.store(r.eps.to_bits(), Ordering::Relaxed);
        self.last_ms.store(now.max(1), Ordering::Relaxed); // 0 means "never"
    }

    /// The learned weight; `None` without a usable report (none yet, in the blackout,
    /// expired, or no qps or utilization reported).
    pub(crate) fn weight(&self, cfg: &ClientWeighted) -> Option<f64> {
        let now = clock::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > cfg.expiration.as_millis() as u64 {
            return None;
        }
        if now.saturating_sub(self.since_ms.load(Ordering::Relaxed)) < cfg.blackout.as_millis() as u64 {
            return None;
        }
        let get = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let (utilization, qps, eps) = (get(&self.utilization), get(&self.qps), get(&self.eps));
        if qps <= 0.0 || utilization <= 0.0 {
            return None;
        }
        Some(qps / (utilization + eps / qps * cfg.error_penalty))
    }
}

/// Weights learned from reports, in place of the configured ones (a drained endpoint stays
/// at 0): scaled so the heaviest is 10,000; endpoints without a weight get the mean. `None`
/// while no endpoint has a usable report (the configured weights stand).
pub(crate) fn apply(cfg: &ClientWeighted, endpoints: &[Endpoint]) -> Option<Vec<Endpoint>> {
    let learned: Vec<Option<f64>> = endpoints.iter().map(|e| e.state.load.weight(cfg)).collect();
    let known: Vec<f64> = learned.iter().flatten().copied().collect();
    if known.is_empty() {
        return None;
    }
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    let max = known.iter().copied().fold(mean, f64::max);
    let weighted = endpoints.iter().zip(learned).map(|(e, w)| {
        let weight =
            if e.weight == 0 { 0 } else { ((w.unwrap_or(mean) / max * 10_000.0).round() as u32).max(1) };
        Endpoint { weight, ..e.clone() }
    });
    Some(weighted.collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(blackout: u64) -> ClientWeighted {
        ClientWeighted {
            blackout: Duration::from_secs(blackout),
            expiration: Duration::from_secs(180),
            update_period: Duration::from_secs(1),
            error_penalty: 1.0,
        }
    }

    #[test]
    fn parses_the_text_form() {
        let r = parse(b"TEXT cpu_utilization=0.3, application_utilization=0.4, rps_fractional=120, eps=2")
            .unwrap();
        assert_eq!(r, Report { utilization: 0.4, qps: 120.0, eps: 2.0 });
        assert_eq!(parse(b"TEXT cpu_utilization=0.9, rps_fractional=10").unwrap().utilization, 0.9);
        assert!(parse(b"JSON {\"cpu_utilization\": 0.3}").is_none());
        assert!(parse(b"TEXT cpu_utilization=-1").is_none());
        assert!(parse(b"TEXT cpu_utilization").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_formula_blackout_and_expiration() {
        let c = cfg(10);
        let load = Load::default();
        load.record(Report { utilization: 0.5, qps: 100.0, eps: 10.0 }, &c);
        assert_eq!(load.weight(&c), None, "in the blackout");
        tokio::time::advance(Duration::from_secs(10)).await;
        load.record(Report { utilization: 0.5, qps: 100.0, eps: 10.0 }, &c);
        // 100 / (0.5 + 10/100 × 1.0) = 166.7
        assert!((load.weight(&c).unwrap() - 100.0 / 0.6).abs() < 1e-9);
        tokio::time::advance(Duration::from_secs(181)).await;
        assert_eq!(load.weight(&c), None, "expired");
        load.record(Report { utilization: 0.5, qps: 100.0, eps: 0.0 }, &c);
        assert_eq!(load.weight(&c), None, "a new blackout after expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_without_reports_get_the_mean() {
        let c = cfg(0);
        let eps = crate::upstream::tests::endpoints(&[1, 1, 1]);
        eps[0].state.load.record(Report { utilization: 0.9, qps: 90.0, eps: 0.0 }, &c);
        eps[1].state.load.record(Report { utilization: 0.1, qps: 90.0, eps: 0.0 }, &c);
        let weights: Vec<u32> = apply(&c, &eps).unwrap().iter().map(|e| e.weight).collect();
        // 100 and 900: the heaviest is 10,000, the unreported one gets the mean (500).
        assert_eq!(weights, vec![1_111, 10_000, 5_556]);
    }
}
