//! Cost of the metrics a request records (`cargo bench --bench record`): the same calls the
//! request path makes — two matrix cells and two histogram observations — single-threaded
//! and from two threads at once (contended cache lines). Plain timing loop, best of five.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrider::telemetry::metrics::{Matrix, ServiceMetrics};

const N: u32 = 2_000_000;

fn record(m: &ServiceMetrics, endpoint: &Matrix, i: u32) {
    m.requests.add(0, 1);
    endpoint.add(0, 1);
    m.request_duration.observe(Duration::from_micros(u64::from(i % 2000)));
    m.upstream_duration.observe(Duration::from_micros(u64::from(i % 1500)));
}

fn run(threads: usize) -> f64 {
    let m = Arc::new(ServiceMetrics::default());
    let e = Arc::new(Matrix::default());
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (m, e) = (m.clone(), e.clone());
                    std::thread::spawn(move || (0..N).for_each(|i| record(&m, &e, black_box(i))))
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
            start.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    println!("metrics recorded per request: {:.1} ns (1 thread), {:.1} ns (2 threads, shared)", run(1), run(2));
}
