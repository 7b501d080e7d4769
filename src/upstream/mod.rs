//! The live endpoint set of one service, and the choice of an endpoint per request.
//!
//! Owns: [`Balancer`], the read side every request uses (an atomically swapped [`Snapshot`]
//! and the picker's counter); per-endpoint runtime state ([`EndpointState`]: in-flight count,
//! passive and active health, the connection pool) that survives updates for endpoints whose
//! address stays; and [`Owner`], the one writer that builds snapshots. The owner runs in the
//! service's task (`service.rs`), which applies new sets and settings, rebuilds after
//! ejections and health changes, and ends ejections on time.
//! Must not: await, lock or allocate on the pick and report paths — requests only do atomics
//! and a non-blocking wake of the owner; know where endpoints come from.

pub mod breaker;
pub mod budget;
pub(crate) mod health;
pub(crate) mod outlier;
mod pick;
mod service;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use http::uri::Authority;
use serde::Serialize;
use tokio::sync::mpsc;

pub(crate) use service::{Service, ServiceHandle};

use crate::client::Pool;
use crate::config::{EndpointSpec, Outlier, Policy};
use crate::telemetry::metrics::Matrix;
use outlier::{Change, Ejection, Health};
use pick::Picker;

/// Runtime state of one endpoint, shared by every snapshot that contains its address.
/// `repr(C)`, hot fields first: what a pick reads and writes (in-flight count, health) shares
/// one cache line with the `Arc`'s counts, which matters at thousands of endpoints.
#[derive(Debug)]
#[repr(C)]
pub struct EndpointState {
    in_flight: AtomicUsize,
    pub(crate) health: Health,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once so requests do not format it.
    pub(crate) authority: Authority,
    /// Attempts sent here, by method and status class (for `/metrics`).
    pub(crate) requests: Matrix,
    /// Connections to this endpoint (and the TLS name from its `server_name` tag).
    pub(crate) pool: Pool,
}

/// An endpoint as one snapshot sees it: its current weight and tags plus its shared state.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub tags: Arc<BTreeMap<String, String>>,
    pub state: Arc<EndpointState>,
}

/// One immutable view of a service's endpoints. Readers load it without locking.
#[derive(Debug)]
pub struct Snapshot {
    /// Every endpoint discovery reported.
    pub endpoints: Vec<Endpoint>,
    /// The ones requests may go to now; the picker's state is built over these.
    routable: Vec<Endpoint>,
    picker: Picker,
    /// The ejection rules reports are judged by.
    outlier: Arc<Outlier>,
    /// Too few endpoints were routable, so all of them are used (panic mode).
    pub panic: bool,
    /// Whether discovery has delivered a set yet (an empty set counts once delivered).
    pub synced: bool,
}

/// The endpoint set of one service as requests see it: swapped whole by its [`Owner`].
#[derive(Debug)]
pub struct Balancer {
    snapshot: ArcSwap<Snapshot>,
    /// Round-robin position; kept across updates so a swap does not restart the cycle.
    counter: AtomicUsize,
    /// Wakes the owner to rebuild. Capacity one: a full channel means a rebuild is already
    /// due, and the owner reads the endpoints' current state when it runs.
    wake: mpsc::Sender<()>,
    pub(crate) ejections: AtomicU64,
}

/// The one writer of a [`Balancer`]: applies sets and settings, rebuilds snapshots.
#[derive(Debug)]
pub struct Owner {
    balancer: Arc<Balancer>,
    policy: Policy,
    outlier: Arc<Outlier>,
    /// Weight overrides from the live overlay (0: drained), applied over discovery's set.
    weights: BTreeMap<SocketAddr, u32>,
    /// The set discovery last handed over, before overrides.
    specs: Vec<EndpointSpec>,
    woken: mpsc::Receiver<()>,
}

/// Holds one unit of an endpoint's in-flight count until dropped.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
}

// === impl EndpointState ===

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        EndpointState {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            health: Health::default(),
            requests: Matrix::default(),
            pool: Pool::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request (or TCP connection) until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { state: self.clone() }
    }

    /// Routable outside panic mode: healthy by active checks and not ejected.
    fn routable(&self) -> bool {
        self.health.is_healthy() && matches!(self.health.ejection(), Ejection::Active | Ejection::Probing)
    }

    pub fn state_name(&self) -> &'static str {
        match (self.health.is_healthy(), self.health.ejection()) {
            (false, _) => "unhealthy",
            (true, Ejection::Active) => "active",
            (true, Ejection::Ejected) => "ejected",
            (true, Ejection::Probing | Ejection::ProbeInFlight) => "probing",
        }
    }
}

// === impl InFlight ===

impl InFlight {
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    pub fn authority(&self) -> &Authority {
        &self.state.authority
    }

    pub fn state(&self) -> &Arc<EndpointState> {
        &self.state
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Balancer ===

impl Balancer {
    /// An empty, unsynced balancer and its owner.
    pub fn new(policy: Policy, outlier: &Outlier) -> (Arc<Balancer>, Owner) {
        let outlier = Arc::new(outlier.clone());
        let (wake, woken) = mpsc::channel(1);
        let balancer = Arc::new(Balancer {
            snapshot: ArcSwap::from_pointee(build(policy, &outlier, Vec::new(), false)),
            counter: AtomicUsize::new(0),
            wake,
            ejections: AtomicU64::new(0),
        });
        let owner = Owner {
            balancer: balancer.clone(),
            policy,
            outlier,
            weights: BTreeMap::new(),
            specs: Vec::new(),
            woken,
        };
        (balancer, owner)
    }

    /// Chooses an endpoint and counts the request against it; `None` when none is routable.
    pub fn pick(&self) -> Option<InFlight> {
        self.pick_avoiding(&[])
    }

    /// Like [`Balancer::pick`], preferring endpoints not in `avoid` (those a retry already
    /// tried). Skips endpoints ejected since the snapshot was built, and claims the probe
    /// slot of one returning from ejection.
    pub fn pick_avoiding(&self, avoid: &[SocketAddr]) -> Option<InFlight> {
        let snap = self.snapshot.load();
        let candidates = &snap.routable;
        let mut fallback = None;
        for _ in 0..candidates.len().clamp(1, 4) {
            let ep = &candidates[snap.picker.pick(candidates, &self.counter)?];
            if avoid.contains(&ep.addr) && candidates.len() > avoid.len() {
                fallback.get_or_insert(ep);
                continue;
            }
            if snap.panic || ep.state.health.admit() {
                return Some(ep.state.begin());
            }
        }
        fallback.map(|ep| ep.state.begin())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Records an attempt's outcome for passive health (outlier ejection): atomics, and a
    /// wake of the owner when the endpoint was ejected or came back.
    pub fn report(&self, endpoint: &EndpointState, failed: bool) {
        let snap = self.snapshot.load();
        match endpoint.health.report(failed, &snap.outlier, || may_eject(&snap)) {
            Change::None => return,
            Change::Returned => {
                tracing::info!(endpoint = %endpoint.addr, "probe succeeded: endpoint back in rotation");
            }
            Change::Ejected(duration) => {
                self.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %endpoint.addr, ?duration, times = endpoint.health.times_ejected(), "endpoint ejected after consecutive failures");
            }
        }
        self.changed();
    }

    /// Endpoint health changed (ejection, return, active check): the owner rebuilds.
    pub fn changed(&self) {
        let _ = self.wake.try_send(());
    }

    /// Endpoint view for the admin `/upstreams` page.
    pub fn describe(&self) -> Vec<EndpointView> {
        self.snapshot
            .load()
            .endpoints
            .iter()
            .map(|e| EndpointView {
                addr: e.addr,
                weight: e.weight,
                tags: (*e.tags).clone(),
                in_flight: e.state.in_flight(),
                state: if e.weight == 0 { "draining" } else { e.state.state_name() },
                consecutive_failures: e.state.health.consecutive_failures(),
                times_ejected: e.state.health.times_ejected(),
            })
            .collect()
    }
}

/// At most `max_ejection_percent` of endpoints ejected at once, but always at least one.
fn may_eject(snap: &Snapshot) -> bool {
    let total = snap.endpoints.len();
    let ejected = snap.endpoints.iter().filter(|e| e.state.health.ejection() != Ejection::Active).count();
    ejected == 0 || (ejected + 1) * 100 <= snap.outlier.max_ejection_percent as usize * total
}

// === impl Owner ===

impl Owner {
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Replaces the endpoint set ("reset to this set"): endpoints whose address is already
    /// known keep their state; weights and tags take the new values (or the overrides').
    pub fn update(&mut self, specs: &[EndpointSpec]) {
        self.specs = specs.to_vec();
        self.rebuild(true);
    }

    fn rebuild(&mut self, synced: bool) {
        let old = self.balancer.snapshot.load();
        let known: HashMap<SocketAddr, &Arc<EndpointState>> =
            old.endpoints.iter().map(|e| (e.addr, &e.state)).collect();
        let endpoints: Vec<Endpoint> = self
            .specs
            .iter()
            .map(|s| {
                let state = known
                    .get(&s.addr)
                    .map_or_else(|| Arc::new(EndpointState::new(s.addr)), |st| Arc::clone(st));
                state.pool.set_server_name(s.tags.get("server_name"));
                let weight = self.weights.get(&s.addr).copied().unwrap_or(s.weight.get());
                Endpoint { addr: s.addr, weight, tags: Arc::new(s.tags.clone()), state }
            })
            .collect();
        self.store(endpoints, synced);
    }

    /// Changes the policy, ejection rules and weight overrides, keeping the endpoints and
    /// their state.
    pub fn configure(&mut self, policy: Policy, outlier: &Outlier, weights: &BTreeMap<SocketAddr, u32>) {
        if self.policy == policy && *self.outlier == *outlier && self.weights == *weights {
            return;
        }
        (self.policy, self.outlier) = (policy, Arc::new(outlier.clone()));
        self.weights.clone_from(weights);
        let synced = self.balancer.snapshot.load().synced;
        self.rebuild(synced);
    }

    /// Rebuilds the routable set: ends ejections whose time is over, and applies health
    /// changes that requests and checkers reported.
    pub fn refresh(&mut self) {
        while self.woken.try_recv().is_ok() {}
        let old = self.balancer.snapshot.load();
        for e in &old.endpoints {
            e.state.health.ejection_over();
        }
        self.store(old.endpoints.clone(), old.synced);
    }

    /// When the next ejection ends, if one is in force.
    fn next_return(&self) -> Option<tokio::time::Instant> {
        let snap = self.balancer.snapshot.load();
        snap.endpoints.iter().filter_map(|e| e.state.health.ejected_until()).min()
    }

    fn store(&self, endpoints: Vec<Endpoint>, synced: bool) {
        let snap = build(self.policy, &self.outlier, endpoints, synced);
        let old = self.balancer.snapshot.load();
        if snap.panic && !old.panic {
            tracing::warn!(
                routable = snap.routable.len(),
                total = snap.endpoints.len(),
                "panic mode: too few healthy endpoints, routing over all of them"
            );
        }
        self.balancer.snapshot.store(Arc::new(snap));
    }
}

/// Builds a snapshot: the routable subset, or in panic mode every endpoint not drained
/// (weight 0 from an overlay: never picked, and not counted for panic).
fn build(policy: Policy, outlier: &Arc<Outlier>, endpoints: Vec<Endpoint>, synced: bool) -> Snapshot {
    let live: Vec<Endpoint> = endpoints.iter().filter(|e| e.weight > 0).cloned().collect();
    let ok: Vec<Endpoint> = live.iter().filter(|e| e.state.routable()).cloned().collect();
    let threshold = outlier.panic_threshold_percent as usize;
    let panic = !live.is_empty() && ok.len() * 100 < threshold * live.len();
    let routable = if panic { live } else { ok };
    let picker = Picker::build(policy, &routable);
    Snapshot { endpoints, routable, picker, outlier: outlier.clone(), panic, synced }
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub weight: u32,
    pub tags: BTreeMap<String, String>,
    pub in_flight: usize,
    /// active, ejected, probing or unhealthy.
    pub state: &'static str,
    pub consecutive_failures: u32,
    pub times_ejected: u32,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::num::NonZeroU32;

    use super::*;

    pub(crate) fn specs(weights: &[u32]) -> Vec<EndpointSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| EndpointSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                weight: NonZeroU32::new(*w).unwrap(),
                tags: BTreeMap::new(),
            })
            .collect()
    }

    pub(crate) fn outlier() -> Outlier {
        Outlier {
            consecutive_failures: 5,
            count_5xx: true,
            base_ejection: std::time::Duration::from_secs(30),
            max_ejection: std::time::Duration::from_secs(300),
            max_ejection_percent: 10,
            panic_threshold_percent: 50,
        }
    }

    pub(crate) fn balancer(policy: Policy, outlier: &Outlier, weights: &[u32]) -> (Arc<Balancer>, Owner) {
        let (b, mut owner) = Balancer::new(policy, outlier);
        owner.update(&specs(weights));
        (b, owner)
    }

    pub(crate) fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        balancer(Policy::WeightedRoundRobin, &outlier(), weights).0.snapshot().endpoints.clone()
    }

    #[test]
    fn update_keeps_state_of_unchanged_endpoints() {
        let (b, mut owner) = balancer(Policy::LeastRequest, &outlier(), &[1, 1]);
        let held = b.snapshot().endpoints[0].state.begin();
        let mut next = specs(&[7, 1, 1]);
        next.remove(1);
        owner.update(&next);
        let snap = b.snapshot();
        assert_eq!(snap.endpoints[0].weight, 7);
        assert_eq!(snap.endpoints[0].state.in_flight(), 1);
        assert_eq!(snap.endpoints[1].state.in_flight(), 0);
        drop(held);
        assert_eq!(snap.endpoints[0].state.in_flight(), 0);
    }

    #[test]
    fn empty_and_unsynced_until_first_update() {
        let (b, mut owner) = Balancer::new(Policy::WeightedRoundRobin, &outlier());
        assert!(!b.snapshot().synced);
        assert!(b.pick().is_none());
        owner.update(&[]);
        assert!(b.snapshot().synced);
        assert!(b.pick().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_removes_an_endpoint_and_panic_mode_brings_all_back() {
        let mut cfg = outlier();
        cfg.max_ejection_percent = 100;
        let (b, mut owner) = balancer(Policy::WeightedRoundRobin, &cfg, &[1, 1, 1, 1]);
        let first = b.snapshot().endpoints[0].state.clone();
        for _ in 0..5 {
            b.report(&first, true);
        }
        assert!((0..30).all(|_| b.pick().unwrap().addr() != first.addr), "skipped before the rebuild");
        owner.refresh();
        let snap = b.snapshot();
        assert_eq!((snap.routable.len(), snap.panic), (3, false));
        for e in &snap.endpoints[1..3] {
            for _ in 0..5 {
                b.report(&e.state, true);
            }
        }
        owner.refresh();
        // 1 of 4 routable is below the 50% panic threshold: all four are used again.
        let snap = b.snapshot();
        assert_eq!((snap.routable.len(), snap.panic), (4, true));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_allows_at_least_one() {
        let (b, mut owner) = balancer(Policy::WeightedRoundRobin, &outlier(), &[1, 1, 1]);
        let snap = b.snapshot();
        for e in &snap.endpoints {
            for _ in 0..5 {
                b.report(&e.state, true);
            }
        }
        owner.refresh();
        let ejected = b.describe().iter().filter(|e| e.state == "ejected").count();
        assert_eq!(ejected, 1, "10% of 3 endpoints rounds to the minimum of one");
    }

    #[test]
    fn weight_change_takes_effect_on_next_pick() {
        let (b, mut owner) = balancer(Policy::WeightedRoundRobin, &outlier(), &[1, 1]);
        owner.update(&specs(&[3, 1]));
        let picks: Vec<_> = (0..8).map(|_| b.pick().unwrap().addr().port() - 10_000).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 6);
    }
}
