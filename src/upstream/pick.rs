//! Pickers: choose one endpoint of a snapshot, synchronously and without locks.
//!
//! Owns: the per-policy state precomputed when a snapshot is built (the smooth weighted
//! round-robin schedule, the hash ring), and the pick itself. Must not: await, lock, or
//! allocate per pick.
//! A new policy is a new variant here plus a `build` arm; callers do not change.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Endpoint;
use crate::config::Policy;

/// Up to this many `weight × endpoints` steps nginx's smooth schedule is built as is (O(n)
/// per entry); above it, a fair-queuing schedule of the same period built with a heap
/// (O(log n) per entry) — both give O(1) picks.
const SMOOTH_BUDGET: u64 = 4_000_000;
/// Periods longer than this (in entries, 4 bytes each) are not unrolled; a golden-ratio
/// stride over the weight line is used instead (same exact shares per period, well
/// spread, O(log n) per pick).
const SCHEDULE_MAX: u64 = 1 << 20;

/// At or below this many endpoints least-request scans them all instead of sampling two.
const SCAN_ALL: usize = 8;

#[derive(Debug)]
pub(crate) enum Picker {
    /// Equal weights: plain round-robin in endpoint order.
    RoundRobin,
    /// nginx's smooth weighted round-robin, unrolled into one period of endpoint indices.
    Schedule(Box<[u32]>),
    /// Point `(n × step) mod total` on the line of cumulative weights.
    Stride {
        cumulative: Box<[u64]>,
        step: u64,
    },
    LeastRequest,
    /// Lowest peak-EWMA latency × (in-flight + 1) per unit of weight.
    PeakEwma,
    /// Points on a 64-bit hash ring, sorted, each owned by an endpoint index; `index[b]` is
    /// the first point in the `b`-th of `2^bits` equal arcs, so a lookup searches one arc.
    Ring {
        points: Box<[u64]>,
        owners: Box<[u32]>,
        index: Box<[u32]>,
        bits: u32,
    },
}

/// Ring points per unit of weight: 160 keeps each endpoint's share within a few percent of
/// its weight. A ring is capped at `RING_MAX` points (weights are scaled down to fit).
const RING_POINTS_PER_WEIGHT: u64 = 160;
const RING_MAX: u64 = 1 << 20;

// === impl Picker ===

impl Picker {
    pub(crate) fn build(policy: Policy, endpoints: &[Endpoint]) -> Picker {
        match policy {
            Policy::LeastRequest => Picker::LeastRequest,
            Policy::PeakEwma => Picker::PeakEwma,
            Policy::WeightedRoundRobin | Policy::ClientWeighted => weighted(endpoints),
            Policy::RingHash => ring(endpoints),
        }
    }

    /// Index of the chosen endpoint; `None` only when `endpoints` is empty. `hash` is the
    /// request's key for a ring (a random point without one).
    pub(crate) fn pick(
        &self,
        endpoints: &[Endpoint],
        counter: &AtomicUsize,
        hash: Option<u64>,
    ) -> Option<usize> {
        self.pick_with(endpoints, || counter.fetch_add(1, Ordering::Relaxed), hash)
    }

    /// What the next pick would be, without taking a turn (for `/explain`).
    pub(crate) fn peek(
        &self,
        endpoints: &[Endpoint],
        counter: &AtomicUsize,
        hash: Option<u64>,
    ) -> Option<usize> {
        self.pick_with(endpoints, || counter.load(Ordering::Relaxed), hash)
    }

    fn pick_with(
        &self,
        endpoints: &[Endpoint],
        tick: impl FnOnce() -> usize,
        hash: Option<u64>,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        Some(match self {
            Picker::RoundRobin => tick() % n,
            Picker::Schedule(s) => s[tick() % s.len()] as usize,
            Picker::Stride { cumulative, step } => {
                let total = cumulative[n - 1];
                let point = (tick() as u64 % total) * step % total;
                cumulative.partition_point(|&c| c <= point)
            }
            Picker::LeastRequest => two_choices(endpoints, lighter),
            Picker::PeakEwma => {
                let now = crate::clock::now_ms(); // one clock read per pick, not per comparison
                two_choices(endpoints, |a, b| faster(a, b, now))
            }
            Picker::Ring { points, owners, index, bits } => {
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                let arc = (h >> (64 - bits)) as usize;
                let (lo, hi) = (index[arc] as usize, index[arc + 1] as usize);
                let i = lo + points[lo..hi].partition_point(|&p| p < h);
                owners[if i == points.len() { 0 } else { i }] as usize
            }
        })
    }
}

/// A consistent-hash ring (Karger et al., as in ketama and Envoy's `RING_HASH`): each
/// endpoint owns points in proportion to its weight, placed by hashing its address with the
/// point's number; a key belongs to the first point at or after its hash. Removing one of N
/// endpoints moves only the keys it owned (about 1/N); every Outrider builds the same ring.
/// A retry (or a key whose endpoint is not admitted) moves to another point.
fn ring(endpoints: &[Endpoint]) -> Picker {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum::<u64>() * RING_POINTS_PER_WEIGHT;
    // An endpoint's points depend on its own weight only (unless the ring must shrink), so a
    // change to one endpoint moves no other endpoint's points.
    let scale = |w: u32| match total <= RING_MAX {
        true => u64::from(w) * RING_POINTS_PER_WEIGHT,
        false => (u64::from(w) * RING_POINTS_PER_WEIGHT * RING_MAX / total).max(1),
    };
    let mut ring: Vec<(u64, u32)> = Vec::with_capacity(total.min(RING_MAX) as usize + endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let share = scale(e.weight);
        let id = endpoint_id(&e.addr);
        ring.extend((0..share).map(|k| (xxhash_rust::xxh3::xxh3_64_with_seed(&id, k), i as u32)));
    }
    ring.sort_unstable();
    let (points, owners): (Vec<u64>, Vec<u32>) = ring.into_iter().unzip();
    // About four points per arc: a lookup reads the index, then a few adjacent points.
    let bits = (points.len() / 4).max(1).ilog2().clamp(1, 20);
    let index = (0..=1u64 << bits)
        .map(|b| match b.checked_shl(64 - bits) {
            Some(start) if b < 1 << bits => points.partition_point(|&p| p < start) as u32,
            _ => points.len() as u32,
        })
        .collect();
    Picker::Ring { points: points.into(), owners: owners.into(), index, bits }
}

/// An address as bytes (IP octets, then the port), the same on every host.
fn endpoint_id(addr: &std::net::SocketAddr) -> Vec<u8> {
    let mut id = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    id.extend_from_slice(&addr.port().to_be_bytes());
    id
}

/// The ring position of a request's key.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

fn weighted(endpoints: &[Endpoint]) -> Picker {
    let g = endpoints.iter().fold(0, |g, e| gcd(g, u64::from(e.weight)));
    if endpoints.iter().all(|e| u64::from(e.weight) == g) {
        return Picker::RoundRobin;
    }
    let weights: Vec<u64> = endpoints.iter().map(|e| u64::from(e.weight) / g).collect();
    let total: u64 = weights.iter().sum();
    if total.saturating_mul(weights.len() as u64) <= SMOOTH_BUDGET {
        return Picker::Schedule(smooth_schedule(&weights, total));
    }
    if total <= SCHEDULE_MAX {
        return Picker::Schedule(fair_schedule(&weights, total));
    }
    let cumulative = weights
        .iter()
        .scan(0, |acc, w| {
            *acc += w;
            Some(*acc)
        })
        .collect();
    Picker::Stride { cumulative, step: golden_step(total) }
}

/// One period of nginx's smooth weighted round-robin: each step adds every weight to its
/// endpoint's credit, picks the highest credit (first on ties) and charges it the total.
fn smooth_schedule(weights: &[u64], total: u64) -> Box<[u32]> {
    let mut credit = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                credit[i] += *w as i64;
                if credit[i] > credit[best] {
                    best = i;
                }
            }
            credit[best] -= total as i64;
            best as u32
        })
        .collect()
}

/// One period of weighted fair queuing: endpoint `i`'s `k`-th turn is due at virtual time
/// `(k + ½) / w_i`; turns are taken in due order (ties by index). Each endpoint gets exactly
/// its weight's share, spread evenly over the period.
fn fair_schedule(weights: &[u64], total: u64) -> Box<[u32]> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Due times compared exactly as fractions (2k + 1) / (2w), by cross-multiplication.
    #[derive(PartialEq, Eq)]
    struct Due {
        num: u64,
        den: u64,
        index: u32,
    }
    impl Ord for Due {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            (u128::from(self.num) * u128::from(o.den))
                .cmp(&(u128::from(o.num) * u128::from(self.den)))
                .then(self.index.cmp(&o.index))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Reverse(Due { num: 1, den: 2 * w, index: i as u32 }))
        .collect();
    (0..total)
        .map(|_| {
            let Some(Reverse(due)) = heap.pop() else { return 0 };
            let index = due.index;
            heap.push(Reverse(Due { num: due.num + 2, ..due }));
            index
        })
        .collect()
}

/// A step near `total / φ` that is coprime with `total`, so `n × step mod total` visits every
/// point once per period while consecutive points land far apart.
fn golden_step(total: u64) -> u64 {
    let mut step = ((total as f64) * 0.618_033_988_75) as u64;
    step = step.max(1);
    while gcd(step, total) != 1 {
        step += 1;
    }
    step
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The better endpoint by `better`: all endpoints compared when there are few (from a random
/// start, so ties spread), otherwise the better of two random choices (P2C).
fn two_choices(endpoints: &[Endpoint], better: impl Fn(&Endpoint, &Endpoint) -> bool) -> usize {
    let n = endpoints.len();
    if n <= SCAN_ALL {
        let start = fastrand::usize(..n);
        return (0..n)
            .map(|k| (start + k) % n)
            .reduce(|best, i| if better(&endpoints[i], &endpoints[best]) { i } else { best })
            .unwrap_or(0);
    }
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    if better(&endpoints[b], &endpoints[a]) { b } else { a }
}

/// Peak-EWMA cost `latency × (in_flight + 1) / weight` at `now`, compared without division.
fn faster(a: &Endpoint, b: &Endpoint, now: u64) -> bool {
    let cost = |e: &Endpoint| e.state.latency.estimate_at(now) * (e.state.in_flight() as f64 + 1.0);
    cost(a) * f64::from(b.weight) < cost(b) * f64::from(a.weight)
}

/// `(load_a + 1) / weight_a < (load_b + 1) / weight_b`, without division. Load counts
/// in-flight requests *and* consecutive failures, so an endpoint that fails fast (and so has
/// nothing in flight) does not attract traffic before it is ejected.
fn lighter(a: &Endpoint, b: &Endpoint) -> bool {
    let load =
        |e: &Endpoint| e.state.in_flight() as u64 + u64::from(e.state.health.consecutive_failures()) + 1;
    load(a) * u64::from(b.weight) < load(b) * u64::from(a.weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::tests::endpoints;

    fn sequence(picker: &Picker, eps: &[Endpoint], n: usize) -> Vec<usize> {
        let counter = AtomicUsize::new(0);
        (0..n).map(|_| picker.pick(eps, &counter, None).unwrap()).collect()
    }

    #[test]
    fn smooth_wrr_interleaves_heavy_endpoint() {
        let eps = endpoints(&[5, 1, 1]);
        let picker = Picker::build(Policy::WeightedRoundRobin, &eps);
        assert_eq!(sequence(&picker, &eps, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let eps = endpoints(&[3, 3, 3]);
        let picker = Picker::build(Policy::WeightedRoundRobin, &eps);
        assert!(matches!(picker, Picker::RoundRobin));
        assert_eq!(sequence(&picker, &eps, 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn fair_schedule_gives_exact_spread_shares_for_many_weighted_endpoints() {
        let weights: Vec<u32> = (0..10_000).map(|i| 1 + (i % 5) as u32).collect();
        let eps = endpoints(&weights);
        let picker = Picker::build(Policy::WeightedRoundRobin, &eps);
        let Picker::Schedule(s) = &picker else { panic!("expected a schedule") };
        assert_eq!(s.len(), 30_000);
        let mut counts = vec![0u32; eps.len()];
        let mut last = vec![None; eps.len()];
        let mut max_gap = vec![0usize; eps.len()];
        for (pos, &i) in s.iter().enumerate() {
            let i = i as usize;
            counts[i] += 1;
            if let Some(prev) = last[i] {
                max_gap[i] = max_gap[i].max(pos - prev);
            }
            last[i] = Some(pos);
        }
        assert!(counts.iter().zip(&weights).all(|(c, w)| c == w), "shares are exact");
        // Evenly spread: a weight-5 endpoint recurs about every 30,000 / 5 = 6,000 picks
        // (± the endpoints due at the same moment, taken in index order).
        let worst = (0..weights.len()).filter(|i| weights[*i] == 5).map(|i| max_gap[i]).max().unwrap();
        assert!(worst <= 2 * 6_000, "a weight-5 endpoint waited {worst} picks");
    }

    #[test]
    fn stride_gives_exact_shares_for_large_weight_sums() {
        let mut weights = vec![1000u32; 4000];
        weights[0] = 60_000;
        weights[1] = 1; // total over 4M: no schedule is unrolled
        let eps = endpoints(&weights);
        let picker = Picker::build(Policy::WeightedRoundRobin, &eps);
        let Picker::Stride { cumulative, .. } = &picker else { panic!("expected stride") };
        let total = cumulative[cumulative.len() - 1] as usize;
        let mut counts = vec![0usize; eps.len()];
        for i in sequence(&picker, &eps, total) {
            counts[i] += 1;
        }
        assert_eq!(counts[0], 60_000);
        assert_eq!(counts[1], 1);
        assert!(counts[2..].iter().all(|&c| c == 1000));
    }

    #[test]
    fn least_request_avoids_busy_endpoints() {
        let eps = endpoints(&[1, 1, 1]);
        let _busy = [eps[0].state.begin(), eps[0].state.begin()];
        let _one = eps[1].state.begin();
        let picker = Picker::build(Policy::LeastRequest, &eps);
        let counter = AtomicUsize::new(0);
        for _ in 0..100 {
            assert_eq!(picker.pick(&eps, &counter, None), Some(2));
        }
    }

    #[test]
    fn least_request_weighs_in_flight_by_weight() {
        // 3 in flight on weight 4 costs (3+1)/4 = 1; 0 in flight on weight 1 costs 1/1: a tie,
        // but one more on the heavy endpoint must tip to the light one.
        let eps = endpoints(&[4, 1]);
        let _held: Vec<_> = (0..4).map(|_| eps[0].state.begin()).collect();
        assert!(lighter(&eps[1], &eps[0]));
    }

    #[test]
    fn ring_shares_follow_weights_and_removal_moves_only_the_removed_endpoints_keys() {
        let eps = endpoints(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 2]);
        let picker = Picker::build(Policy::RingHash, &eps);
        let counter = AtomicUsize::new(0);
        let keys: Vec<u64> = (0..20_000u32).map(|k| key_hash(&k.to_be_bytes())).collect();
        let owner = |p: &Picker, eps: &[Endpoint], h| eps[p.pick(eps, &counter, Some(h)).unwrap()].addr;
        let before: Vec<_> = keys.iter().map(|&h| owner(&picker, &eps, h)).collect();
        let heavy = before.iter().filter(|a| **a == eps[9].addr).count() as f64 / keys.len() as f64;
        assert!((heavy - 2.0 / 11.0).abs() < 0.03, "weight 2 of 11 got {heavy}");
        let fewer: Vec<Endpoint> = eps[1..].to_vec();
        let smaller = Picker::build(Policy::RingHash, &fewer);
        let moved = keys.iter().zip(&before).filter(|(h, was)| owner(&smaller, &fewer, **h) != **was).count();
        let owned = before.iter().filter(|a| **a == eps[0].addr).count();
        assert_eq!(moved, owned, "only the removed endpoint's keys move");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_prefers_the_fast_endpoint_and_weighs_in_flight() {
        let eps = endpoints(&[1, 1, 1]);
        eps[0].state.latency.record(std::time::Duration::from_millis(50), false);
        eps[1].state.latency.record(std::time::Duration::from_millis(2), false);
        for _ in 0..2 {
            eps[2].state.latency.record(std::time::Duration::from_millis(1), true); // fast 503s: 30, then 300 ms
        }
        let picker = Picker::build(Policy::PeakEwma, &eps);
        let counter = AtomicUsize::new(0);
        assert!((0..100).all(|_| picker.pick(&eps, &counter, None) == Some(1)));
        // 2 ms with 30 in flight costs 62 ms: the 50 ms idle endpoint is cheaper now.
        let _held: Vec<_> = (0..30).map(|_| eps[1].state.begin()).collect();
        assert_eq!(picker.pick(&eps, &counter, None), Some(0));
    }

    #[test]
    fn p2c_never_picks_the_same_index_twice_for_a_pair() {
        let eps = endpoints(&[1; 20]);
        let _busy: Vec<_> = (0..19).map(|i| eps[i].state.begin()).collect();
        // Only endpoint 19 is idle; P2C picks it whenever it is sampled, and picks are valid.
        let picks: Vec<_> = (0..2000).map(|_| two_choices(&eps, lighter)).collect();
        assert!(picks.iter().all(|&i| i < 20));
        assert!(picks.iter().filter(|&&i| i == 19).count() > 100);
    }
}
