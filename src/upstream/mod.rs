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
mod ewma;
pub(crate) mod health;
mod locality;
pub(crate) mod orca;
pub(crate) mod outlier;
mod pick;
mod ramp;
mod service;
mod window;

use std::borrow::Cow;
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
use crate::config::{
    ClientWeighted, EndpointSpec, LocalityRule, Outlier, Policy, Selector, ServiceConfig, SlowStart,
};
use crate::telemetry::metrics::Matrix;
pub use locality::{LocalityView, ZoneView};
use outlier::{Change, Ejection, Health};
use pick::Picker;
pub use pick::key_hash;

/// What a service's balancer is built from: its config's picking and ejection settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub policy: Policy,
    pub outlier: Outlier,
    /// Weight overrides by endpoint address (0: drained), from the etcd overlay.
    pub weights: BTreeMap<SocketAddr, u32>,
    /// Subsets routes send to, by tags; subset 0 is the whole service.
    pub subsets: Vec<Selector>,
    pub locality: Option<LocalityRule>,
    pub slow_start: Option<SlowStart>,
    pub client_weighted: Option<ClientWeighted>,
}

/// Which endpoints one request may go to: a subset (0: the whole service) and, for
/// `ring_hash`, the hash of its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target {
    pub subset: usize,
    pub hash: Option<u64>,
}

/// Where a pick landed, for spans and `/explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Any routable endpoint (no zone preference in force).
    Any,
    /// Zone preference kept the request in this Outrider's zone.
    Local,
    /// Zone preference sent the request to another zone.
    Spill,
    /// Panic mode: too few routable endpoints, so every endpoint was a candidate.
    Panic,
}

/// Runtime state of one endpoint, shared by every snapshot that contains its address.
/// `repr(C)`, hot fields first: what a pick reads and writes (in-flight count, health) shares
/// one cache line with the `Arc`'s counts, which matters at thousands of endpoints.
#[derive(Debug)]
#[repr(C)]
pub struct EndpointState {
    in_flight: AtomicUsize,
    pub(crate) health: Health,
    /// Peak-EWMA latency estimate (fed only under `load_balancing: peak_ewma`).
    pub(crate) latency: ewma::Ewma,
    /// The last ORCA load report (read only under `load_balancing: client_weighted`).
    pub(crate) load: orca::Load,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once so requests do not format it.
    pub(crate) authority: Authority,
    /// Attempts sent here, by method and status class (for `/metrics`).
    pub(crate) requests: Matrix,
    /// Time spent in those attempts, until response headers or failure (the dashboard's
    /// mean latency per endpoint).
    pub(crate) attempt_micros: AtomicU64,
    /// Connections to this endpoint (and the TLS name from its `server_name` tag).
    pub(crate) pool: Pool,
    /// When this Outrider first saw it (`clock::now_ms`); `None`: in the first set the
    /// service received, so not new (slow start).
    pub(crate) seen_ms: Option<u64>,
}

/// What an endpoint can be, as `/upstreams`, `/metrics` and the dashboard name it.
pub const STATES: [&str; 5] = ["active", "probing", "ejected", "unhealthy", "draining"];

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
    /// Per subset (index 0: the whole service), what requests routed there may pick from.
    groups: Box<[Group]>,
    /// The ejection rules reports are judged by.
    outlier: Arc<Outlier>,
    /// Whether discovery has delivered a set yet (an empty set counts once delivered).
    pub synced: bool,
    /// A new endpoint's weight is still ramping up (slow start).
    ramping: bool,
}

/// The candidates of one subset: all its routable endpoints, and with zone preference the
/// same split into this zone's and the others'.
#[derive(Debug)]
struct Group {
    all: Lane,
    /// Too few of the subset's endpoints were routable, so all of them are used.
    panic: bool,
    zones: Option<Zones>,
    locality: Option<LocalityView>,
}

#[derive(Debug)]
struct Zones {
    local: Lane,
    remote: Lane,
    /// Of `locality::SCALE`: requests kept local.
    local_share: u32,
}

/// Endpoints with the picker built over them and its round-robin position.
#[derive(Debug)]
struct Lane {
    endpoints: Vec<Endpoint>,
    picker: Picker,
    counter: AtomicUsize,
}

/// The endpoint set of one service as requests see it: swapped whole by its [`Owner`].
#[derive(Debug)]
pub struct Balancer {
    snapshot: ArcSwap<Snapshot>,
    /// Wakes the owner to rebuild. Capacity one: a full channel means a rebuild is already
    /// due, and the owner reads the endpoints' current state when it runs.
    wake: mpsc::Sender<()>,
    pub(crate) ejections: AtomicU64,
}

/// The one writer of a [`Balancer`]: applies sets and settings, rebuilds snapshots.
#[derive(Debug)]
pub struct Owner {
    balancer: Arc<Balancer>,
    settings: Settings,
    outlier: Arc<Outlier>,
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
    #[cfg(test)]
    pub(crate) fn seen_now(addr: SocketAddr) -> Self {
        EndpointState::new(addr, Some(crate::clock::now_ms()))
    }

    fn new(addr: SocketAddr, seen_ms: Option<u64>) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        EndpointState {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            health: Health::default(),
            latency: ewma::Ewma::default(),
            load: orca::Load::default(),
            requests: Matrix::default(),
            attempt_micros: AtomicU64::new(0),
            pool: Pool::default(),
            seen_ms,
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

    /// One of [`STATES`] but `draining` (that is the weight's, not the endpoint's).
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
    pub fn new(settings: &Settings) -> (Arc<Balancer>, Owner) {
        let outlier = Arc::new(settings.outlier.clone());
        let (wake, woken) = mpsc::channel(1);
        let empty = build(settings, &outlier, Vec::new(), false, None);
        let balancer =
            Arc::new(Balancer { snapshot: ArcSwap::from_pointee(empty), wake, ejections: AtomicU64::new(0) });
        let owner = Owner {
            balancer: balancer.clone(),
            settings: settings.clone(),
            outlier,
            specs: Vec::new(),
            woken,
        };
        (balancer, owner)
    }

    /// Chooses an endpoint of the whole service and counts the request against it; `None`
    /// when none is routable.
    pub fn pick(&self) -> Option<InFlight> {
        self.pick_avoiding(Target::default(), &[]).map(|(e, _)| e)
    }

    /// Chooses an endpoint of `target`'s subset, preferring endpoints not in `avoid` (those
    /// a retry already tried). Skips endpoints ejected since the snapshot was built, and
    /// claims the probe slot of one returning from ejection. `None`: the subset has no
    /// routable endpoint (or no such subset).
    pub fn pick_avoiding(&self, target: Target, avoid: &[SocketAddr]) -> Option<(InFlight, Placement)> {
        let snap = self.snapshot.load();
        let group = snap.groups.get(target.subset)?;
        let (lane, placement) = group.lane(avoid);
        let candidates = &lane.endpoints;
        let mut fallback = None;
        for k in 0..candidates.len().clamp(1, 4) {
            // A retry on a ring moves to another point: the same key would land on the same one.
            let hash = target
                .hash
                .map(|h| if k == 0 { h } else { h ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) });
            let ep = &candidates[lane.picker.pick(candidates, &lane.counter, hash)?];
            if avoid.contains(&ep.addr) && candidates.len() > avoid.len() {
                fallback.get_or_insert(ep);
                continue;
            }
            if group.panic || ep.state.health.admit() {
                return Some((ep.state.begin(), placement));
            }
        }
        fallback.map(|ep| (ep.state.begin(), placement))
    }

    /// What a pick for `target` would consider and choose now, taking no turn and counting
    /// nothing (`/explain`).
    pub fn explain(&self, target: Target) -> Option<GroupView> {
        let snap = self.snapshot.load();
        let group = snap.groups.get(target.subset)?;
        let routable: Vec<SocketAddr> = group.all.endpoints.iter().map(|e| e.addr).collect();
        let (lane, placement) = group.lane(&[]);
        let next =
            lane.picker.peek(&lane.endpoints, &lane.counter, target.hash).map(|i| lane.endpoints[i].addr);
        Some(GroupView {
            routable,
            panic: group.panic,
            locality: group.locality.clone(),
            placement: placement.as_str(),
            next,
        })
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

    /// Endpoint view for the admin `/upstreams` page; `learning` gives the weights
    /// learned from load reports under `client_weighted`.
    pub fn describe(&self) -> Vec<EndpointView> {
        self.describe_learning(None)
    }

    pub fn describe_learning(&self, learning: Option<&ClientWeighted>) -> Vec<EndpointView> {
        let snap = self.snapshot.load();
        // The weights the whole service's picker uses now (ramped, learned; 0: not routable).
        let routable: HashMap<SocketAddr, u64> = snap
            .groups
            .first()
            .map(|g| g.all.endpoints.iter().map(|e| (e.addr, u64::from(e.weight))).collect())
            .unwrap_or_default();
        let total: u64 = routable.values().sum();
        let share = |addr: SocketAddr| match routable.get(&addr) {
            Some(w) if total > 0 => *w as f64 / total as f64,
            _ => 0.0,
        };
        snap.endpoints
            .iter()
            .map(|e| EndpointView {
                share: share(e.addr),
                learned_weight: learning.and_then(|c| e.state.load.weight(c)),
                addr: e.addr,
                weight: e.weight,
                tags: (*e.tags).clone(),
                in_flight: e.state.in_flight(),
                state: e.state_name(),
                consecutive_failures: e.state.health.consecutive_failures(),
                times_ejected: e.state.health.times_ejected(),
            })
            .collect()
    }

    /// How many endpoints are in each of [`STATES`] (for `/metrics`), without describing them.
    pub fn state_counts(&self) -> [usize; STATES.len()] {
        let mut counts = [0; STATES.len()];
        for e in &self.snapshot.load().endpoints {
            if let Some(i) = STATES.iter().position(|s| *s == e.state_name()) {
                counts[i] += 1;
            }
        }
        counts
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// One of [`STATES`]: its own state, or `draining` while its weight is 0.
    pub fn state_name(&self) -> &'static str {
        if self.weight == 0 { "draining" } else { self.state.state_name() }
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
        // The first set a service receives is not "new" (slow start); later arrivals are.
        let seen = old.synced.then(crate::clock::now_ms);
        let endpoints: Vec<Endpoint> = self
            .specs
            .iter()
            .map(|s| {
                let state = known
                    .get(&s.addr)
                    .map_or_else(|| Arc::new(EndpointState::new(s.addr, seen)), |st| Arc::clone(st));
                state.pool.set_server_name(s.tags.get("server_name"));
                let weight = self.settings.weights.get(&s.addr).copied().unwrap_or(s.weight.get());
                Endpoint { addr: s.addr, weight, tags: Arc::new(s.tags.clone()), state }
            })
            .collect();
        self.store(endpoints, synced);
    }

    /// Changes the policy, ejection rules, weight overrides, subsets and zone preference,
    /// keeping the endpoints and their state.
    pub fn configure(&mut self, settings: &Settings) {
        if self.settings == *settings {
            return;
        }
        self.settings = settings.clone();
        self.outlier = Arc::new(settings.outlier.clone());
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

    /// When the snapshot must be rebuilt next: the earliest end of an ejection, or the next
    /// step of a slow-start ramp.
    fn next_return(&self) -> Option<tokio::time::Instant> {
        let snap = self.balancer.snapshot.load();
        let ejection = snap.endpoints.iter().filter_map(|e| e.state.health.ejected_until()).min();
        let ramp = match (&self.settings.slow_start, snap.ramping) {
            (Some(cfg), true) => Some(tokio::time::Instant::now() + ramp::step(cfg)),
            _ => None,
        };
        // Learned weights are recomputed every update period.
        let learn =
            self.settings.client_weighted.as_ref().map(|c| tokio::time::Instant::now() + c.update_period);
        ejection.into_iter().chain(ramp).chain(learn).min()
    }

    fn store(&self, endpoints: Vec<Endpoint>, synced: bool) {
        let old = self.balancer.snapshot.load();
        let snap = build(&self.settings, &self.outlier, endpoints, synced, Some(&old));
        if snap.groups[0].panic && !old.groups[0].panic {
            tracing::warn!(
                routable = snap.groups[0].all.endpoints.len(),
                total = snap.endpoints.len(),
                "panic mode: too few healthy endpoints, routing over all of them"
            );
        }
        self.balancer.snapshot.store(Arc::new(snap));
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// The whole service is in panic mode.
    pub fn panic(&self) -> bool {
        self.groups[0].panic
    }
}

// === impl Group ===

impl Group {
    /// The lane a pick draws from: with zone preference, this zone's or the others' by the
    /// local share; a retry whose lane holds nothing untried draws from the whole subset.
    fn lane(&self, avoid: &[SocketAddr]) -> (&Lane, Placement) {
        let Some(z) = &self.zones else {
            return (&self.all, if self.panic { Placement::Panic } else { Placement::Any });
        };
        let local = z.local_share >= locality::SCALE
            || (z.local_share > 0 && fastrand::u32(..locality::SCALE) < z.local_share);
        let (lane, placement) =
            if local { (&z.local, Placement::Local) } else { (&z.remote, Placement::Spill) };
        if lane.endpoints.is_empty()
            || (!avoid.is_empty() && lane.endpoints.iter().all(|e| avoid.contains(&e.addr)))
        {
            return (&self.all, Placement::Any);
        }
        (lane, placement)
    }
}

impl Lane {
    fn new(policy: Policy, endpoints: Vec<Endpoint>, position: usize) -> Lane {
        let picker = Picker::build(policy, &endpoints);
        Lane { endpoints, picker, counter: AtomicUsize::new(position) }
    }
}

/// Builds a snapshot: per subset, the routable endpoints, or in panic mode every endpoint
/// not drained (weight 0 from an overlay: never picked, and not counted for panic). The
/// whole service panics when no endpoint is routable; a subset with none is empty instead,
/// so its route's fallback applies. Round-robin positions carry over from `old`.
fn build(
    settings: &Settings,
    outlier: &Arc<Outlier>,
    endpoints: Vec<Endpoint>,
    synced: bool,
    old: Option<&Snapshot>,
) -> Snapshot {
    let whole = Selector::new();
    let subsets = if settings.subsets.is_empty() { std::slice::from_ref(&whole) } else { &settings.subsets };
    // The weights picks use: learned (client_weighted), then ramped (slow start); borrowed
    // as they are when neither applies.
    let learned: Cow<'_, [Endpoint]> = match &settings.client_weighted {
        Some(cfg) if settings.policy == Policy::ClientWeighted => {
            orca::apply(cfg, &endpoints).map_or(Cow::Borrowed(&endpoints[..]), Cow::Owned)
        }
        _ => Cow::Borrowed(&endpoints[..]),
    };
    let (weighted, ramping) = match &settings.slow_start {
        Some(cfg) if settings.policy != Policy::RingHash => {
            let (ramped, ramping) = ramp::apply(cfg, &learned);
            (Cow::Owned(ramped), ramping)
        }
        _ => (learned, false),
    };
    let groups = subsets
        .iter()
        .enumerate()
        .map(|(i, selector)| {
            let position =
                old.and_then(|o| o.groups.get(i)).map_or(0, |g| g.all.counter.load(Ordering::Relaxed));
            let members = weighted.iter().filter(|e| selector.iter().all(|(k, v)| e.tags.get(k) == Some(v)));
            group(settings, outlier, members, i == 0, position)
        })
        .collect();
    Snapshot { endpoints, groups, outlier: outlier.clone(), synced, ramping }
}

fn group<'a>(
    settings: &Settings,
    outlier: &Outlier,
    members: impl Iterator<Item = &'a Endpoint>,
    whole: bool,
    position: usize,
) -> Group {
    let live: Vec<Endpoint> = members.filter(|e| e.weight > 0).cloned().collect();
    let ok: Vec<Endpoint> = live.iter().filter(|e| e.state.routable()).cloned().collect();
    let threshold = outlier.panic_threshold_percent as usize;
    let below = !live.is_empty() && ok.len() * 100 < threshold * live.len();
    let panic = below && (whole || !ok.is_empty());
    let (zones, locality) = match &settings.locality {
        Some(rule) => {
            let (split, view) = locality::split(rule, &live, &ok, panic);
            let zones = split.map(|s| Zones {
                local: Lane::new(settings.policy, s.local, 0),
                remote: Lane::new(settings.policy, s.remote, 0),
                local_share: s.local_share,
            });
            (zones, Some(view))
        }
        None => (None, None),
    };
    let routable = if panic { live } else { ok };
    Group { all: Lane::new(settings.policy, routable, position), panic, zones, locality }
}

/// What `/explain` shows of one subset's candidates.
#[derive(Debug, Serialize)]
pub struct GroupView {
    /// The endpoints a pick may choose now (all of the subset's in panic mode).
    pub routable: Vec<SocketAddr>,
    pub panic: bool,
    pub locality: Option<LocalityView>,
    /// Where this draw landed: any, local, spill or panic.
    pub placement: &'static str,
    /// The endpoint the next pick would choose (least-request and the zone draw are random).
    pub next: Option<SocketAddr>,
}

// === impl Placement ===

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Any => "any",
            Placement::Local => "local",
            Placement::Spill => "spill",
            Placement::Panic => "panic",
        }
    }
}

// === impl Settings ===

impl Settings {
    pub fn of(service: &ServiceConfig) -> Settings {
        Settings {
            policy: service.load_balancing,
            outlier: service.resilience.outlier.clone(),
            weights: service.weights.clone(),
            subsets: service.routing.subsets.clone(),
            locality: service.routing.locality.clone(),
            slow_start: service.slow_start.clone(),
            client_weighted: service.client_weighted,
        }
    }
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
    /// Of the service's picks (no routes, no zone preference): this endpoint's effective
    /// weight — after ejection, health, draining, slow start and learned weights — over all.
    pub share: f64,
    /// Under `client_weighted`: the weight learned from the endpoint's load reports (`None`:
    /// no usable report, so it gets the mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_weight: Option<f64>,
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

    pub(crate) fn settings(policy: Policy, outlier: &Outlier) -> Settings {
        Settings { policy, outlier: outlier.clone(), ..Settings::default() }
    }

    pub(crate) fn balancer(policy: Policy, outlier: &Outlier, weights: &[u32]) -> (Arc<Balancer>, Owner) {
        let (b, mut owner) = Balancer::new(&settings(policy, outlier));
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
        let (b, mut owner) = Balancer::new(&settings(Policy::WeightedRoundRobin, &outlier()));
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
        assert_eq!((snap.groups[0].all.endpoints.len(), snap.panic()), (3, false));
        for e in &snap.endpoints[1..3] {
            for _ in 0..5 {
                b.report(&e.state, true);
            }
        }
        owner.refresh();
        // 1 of 4 routable is below the 50% panic threshold: all four are used again.
        let snap = b.snapshot();
        assert_eq!((snap.groups[0].all.endpoints.len(), snap.panic()), (4, true));
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
