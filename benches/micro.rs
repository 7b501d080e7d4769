//! Microbenchmarks (divan): `cargo bench --bench micro`.
//!
//! Pickers at 3 to 10,000 endpoints, alone and contended (2 threads on one balancer); the
//! per-request shared state (breaker, budget, pick, outlier report) alone and contended; an
//! endpoint-set update (diff + rebuild + swap) at the same sizes; validating the reference
//! config; and the metrics a request records.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use divan::Bencher;
use outrider::config::{Config, EndpointSpec, Policy};
use outrider::telemetry::metrics::{Matrix, ServiceMetrics};
use outrider::upstream::breaker::Breaker;
use outrider::upstream::budget::Budget;
use outrider::upstream::{Balancer, Owner, Settings};

fn main() {
    divan::main();
}

const SIZES: [usize; 4] = [3, 100, 1_000, 10_000];

fn specs(n: usize, weighted: bool) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| EndpointSpec {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            weight: NonZeroU32::new(if weighted { 1 + (i % 5) as u32 } else { 1 }).unwrap(),
            tags: Default::default(),
        })
        .collect()
}

fn balancer(policy: Policy, n: usize, weighted: bool) -> (std::sync::Arc<Balancer>, Owner) {
    let (b, mut owner) = Balancer::new(&Settings { policy, ..Default::default() });
    owner.update(&specs(n, weighted));
    (b, owner)
}

#[divan::bench(args = SIZES, threads = [1, 2])]
fn pick_weighted_round_robin(bencher: Bencher, n: usize) {
    let (b, _owner) = balancer(Policy::WeightedRoundRobin, n, true);
    bencher.bench(|| b.pick());
}

#[divan::bench(args = SIZES, threads = [1, 2])]
fn pick_round_robin_equal_weights(bencher: Bencher, n: usize) {
    let (b, _owner) = balancer(Policy::WeightedRoundRobin, n, false);
    bencher.bench(|| b.pick());
}

#[divan::bench(args = SIZES, threads = [1, 2])]
fn pick_least_request(bencher: Bencher, n: usize) {
    let (b, _owner) = balancer(Policy::LeastRequest, n, true);
    bencher.bench(|| b.pick());
}

/// Replace the set with one where a tenth of the endpoints changed (the usual churn).
#[divan::bench(args = SIZES)]
fn update_endpoint_set(bencher: Bencher, n: usize) {
    let (_b, mut owner) = balancer(Policy::WeightedRoundRobin, n, true);
    let (a, mut c) = (specs(n, true), specs(n, true));
    for (i, e) in c.iter_mut().enumerate().filter(|(i, _)| i % 10 == 0) {
        e.addr.set_port(9000 + (i % 1000) as u16);
    }
    let mut flip = false;
    bencher.bench_local(|| {
        flip = !flip;
        owner.update(if flip { &c } else { &a });
    });
}

/// What every request does to its service's shared state besides the pick: breaker admit
/// and record, the retry budget's request count, an outlier report and the in-flight guard.
/// Contended with two threads on one service, as a sidecar given two cores would be.
#[divan::bench(args = [10, 1_000], threads = [1, 2])]
fn per_request_service_state(bencher: Bencher, n: usize) {
    let (b, _owner) = balancer(Policy::WeightedRoundRobin, n, true);
    let breaker = Breaker::new(&outrider::config::Breaker {
        failure_ratio: 0.5,
        min_requests: 20,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(5),
        half_open_requests: NonZeroU32::new(1).unwrap(),
        max_in_flight: 1 << 20,
    });
    let budget = Budget::new(&outrider::config::RetryBudget {
        ratio: 0.2,
        min_per_second: 10,
        window: Duration::from_secs(10),
    });
    bencher.bench(|| {
        let mut admission = breaker.admit().unwrap();
        budget.record_request();
        let endpoint = b.pick().unwrap();
        b.report(endpoint.state(), false);
        admission.record(true);
    });
}

#[divan::bench]
fn validate_reference_config(bencher: Bencher) {
    let text = include_str!("../config/reference.yaml");
    bencher.bench(|| Config::parse_with_env(text, HashMap::new()).unwrap());
}

#[divan::bench(threads = [1, 2])]
fn record_request_metrics(bencher: Bencher) {
    let (m, e) = (ServiceMetrics::default(), Matrix::default());
    bencher.bench(|| {
        m.requests.add(0, 1);
        e.add(0, 1);
        m.request_duration.observe(Duration::from_micros(700));
        m.upstream_duration.observe(Duration::from_micros(600));
    });
}

/// A service's routing from `routes:` YAML (indented for a service block).
fn routing(routes: &str) -> outrider::config::Routing {
    let yaml = format!(
        "listeners: [{{ name: f, bind: 127.0.0.1:0, service: s }}]\nservices:\n  s:\n    endpoints: []\n{routes}"
    );
    Config::parse_with_env(&yaml, HashMap::new()).unwrap().services["s"].routing.clone()
}

/// A request head as an app sends it: eight ordinary headers.
fn typical_headers() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in [
        ("host", "payments.internal:8080"),
        ("user-agent", "okhttp/4.12.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-request-id", "6f1c2a4e-8b1d-4c55-9a7e-0d3b2f1e9c11"),
        ("x-user", "user-48213"),
        ("cookie", "theme=dark; session=abc123; lang=en"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

/// The cost routing adds per request: no rules at all, rules none of which match, the
/// first rule matching on a header, and a sticky 95/5 split on a cookie.
#[divan::bench(args = ["none", "three_miss", "first_header_match", "sticky_split"])]
fn route_request(bencher: Bencher, case: &str) {
    let r = match case {
        "none" => outrider::config::Routing::default(),
        "three_miss" => routing(
            "    routes:\n      - { match: { headers: [{ name: x-canary, equals: \"1\" }] }, to: { version: v2 } }\n\
             \x20     - { match: { path_prefix: /admin/ }, to: { track: internal } }\n\
             \x20     - { match: { methods: [DELETE] }, to: { track: careful } }\n",
        ),
        "first_header_match" => routing(
            "    routes:\n      - { match: { headers: [{ name: x-user, equals: user-48213 }] }, to: { version: v2 } }\n",
        ),
        _ => routing(
            "    routes:\n      - sticky: { cookie: session }\n        split:\n\
             \x20         - { to: { version: v1 }, weight: 95 }\n          - { to: { version: v2 }, weight: 5 }\n",
        ),
    };
    let headers = typical_headers();
    let method = http::Method::GET;
    let req = outrider::routing::Request {
        method: &method,
        path: "/v1/payments/42",
        headers: &headers,
        source: None,
    };
    bencher.bench(|| outrider::routing::route(divan::black_box(&r), divan::black_box(&req)).target);
}

#[divan::bench(args = SIZES)]
fn pick_ring_hash(bencher: Bencher, n: usize) {
    let (b, _owner) = balancer(Policy::RingHash, n, true);
    bencher.with_inputs(|| fastrand::u64(..)).bench_local_values(|key| {
        b.pick_avoiding(outrider::upstream::Target { subset: 0, hash: Some(key) }, &[])
    });
}
