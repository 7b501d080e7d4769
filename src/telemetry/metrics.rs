//! Request-path counters as plain atomics, and their Prometheus exposition.
//!
//! Owns: [`ServiceMetrics`] (one per service, kept across reloads), the atomic
//! [`Histogram`], and the label classes. Must not: lock or allocate on the request path —
//! recording is a few relaxed atomic adds; label sets are built only at scrape time, from the
//! endpoints that exist *now* (so endpoint labels never outlive their endpoint).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};

/// Request methods as labels: the common ones, everything else is `other`.
pub const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "other"];
/// Status classes as labels; `error` is a transport failure with no status.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

pub fn method_class(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        _ => 5,
    }
}

pub fn status_class(s: Option<StatusCode>) -> usize {
    s.map_or(5, |s| (s.as_u16() / 100).clamp(1, 5) as usize - 1)
}

/// A method × status-class matrix of counters.
#[derive(Debug, Default)]
pub struct Matrix([[AtomicU64; 6]; 6]);

impl Matrix {
    pub fn add(&self, method: usize, class: usize) {
        self.0[method][class].fetch_add(1, Ordering::Relaxed);
    }

    /// (all, failed): every count, and those of class 5xx or error.
    pub fn totals(&self) -> (u64, u64) {
        let (mut all, mut failed) = (0, 0);
        for row in &self.0 {
            for (class, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                all += n;
                if class >= 4 {
                    failed += n;
                }
            }
        }
        (all, failed)
    }

    /// Non-zero cells as (method, class, count).
    pub fn cells(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        (0..6).flat_map(move |m| {
            (0..6).filter_map(move |c| {
                let n = self.0[m][c].load(Ordering::Relaxed);
                (n > 0).then_some((METHODS[m], CLASSES[c], n))
            })
        })
    }
}

/// Seconds; roughly exponential from 0.5 ms to 10 s (sidecar latencies are small).
pub const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A fixed-bucket histogram of atomics (non-cumulative buckets; cumulated when encoded).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with +Inf last). Not cumulative: the
    /// prometheus-client encoder cumulates them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let out: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), b.load(Ordering::Relaxed)))
            .collect();
        let total = out.iter().map(|(_, n)| n).sum();
        (self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, total, out)
    }
}

/// Counters of one service. Kept across reloads while the service exists.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Final answers to the app, by method and status class.
    pub requests: Matrix,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub connect_errors: AtomicU64,
    pub retries: AtomicU64,
    pub budget_exhausted: AtomicU64,
    pub rate_limited: AtomicU64,
    pub health_checks_ok: AtomicU64,
    pub health_checks_failed: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_bytes_up: AtomicU64,
    pub tcp_bytes_down: AtomicU64,
    /// TLS handshake failures with endpoints, by reason (see `tls::client::FAILURES`).
    pub(crate) tls_failures: [AtomicU64; 9],
}

impl ServiceMetrics {
    pub(crate) fn tls_failure(&self, failure: crate::tls::client::Failure) {
        let i = crate::tls::client::FAILURES.iter().position(|f| *f == failure).unwrap_or(8);
        inc(&self.tls_failures[i]);
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_per_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0303).abs() < 1e-6);
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[6], (0.05, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 1));
    }

    #[test]
    fn classes() {
        assert_eq!(CLASSES[status_class(Some(StatusCode::NOT_FOUND))], "4xx");
        assert_eq!(CLASSES[status_class(None)], "error");
        assert_eq!(METHODS[method_class(&Method::from_bytes(b"PROPFIND").unwrap())], "other");
    }
}
