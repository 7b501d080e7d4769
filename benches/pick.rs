//! Pick cost per policy and endpoint count: `cargo bench --bench pick`.
//!
//! A plain timing loop (no harness crate yet: the benchmark-suite issue picks one); each
//! figure is the best of five runs of one million picks, in ns per pick.

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Instant;

use outrider::config::{EndpointSpec, Policy};
use outrider::upstream::Balancer;

fn specs(n: usize) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| EndpointSpec {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            weight: NonZeroU32::new(1 + (i % 5) as u32).unwrap(),
            tags: Default::default(),
        })
        .collect()
}

fn ns_per_pick(balancer: &Balancer) -> f64 {
    const PICKS: u32 = 1_000_000;
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..PICKS {
                black_box(balancer.pick());
            }
            start.elapsed().as_nanos() as f64 / f64::from(PICKS)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    println!("{:<22} {:>8} {:>10}", "policy", "n", "ns/pick");
    for policy in [Policy::WeightedRoundRobin, Policy::LeastRequest] {
        for n in [3, 100, 1_000, 10_000] {
            let balancer = Balancer::new(policy, &Default::default());
            balancer.update(&specs(n));
            println!("{:<22} {:>8} {:>10.1}", format!("{policy:?}"), n, ns_per_pick(&balancer));
        }
    }
}
