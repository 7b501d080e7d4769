//! The live endpoint set of one service, and the choice of an endpoint per request.
//!
//! Owns: [`Balancer`] (an atomically swapped [`Snapshot`] of endpoints plus the picker's
//! precomputed state) and per-endpoint runtime state ([`EndpointState`]: in-flight count)
//! that survives updates for endpoints that did not change. Must not: await, or take a lock
//! on the pick path; know where endpoints come from (that is `discovery`).

mod pick;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::uri::Authority;
use serde::Serialize;

use crate::config::{EndpointSpec, Policy};
use pick::Picker;

/// Runtime state of one endpoint, shared by every snapshot that contains its address.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once so requests do not format it.
    pub authority: Authority,
    in_flight: AtomicUsize,
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
    pub endpoints: Vec<Endpoint>,
    picker: Picker,
    /// Whether discovery has delivered a set yet (an empty set counts once delivered).
    pub synced: bool,
}

/// The endpoint set of one service: swapped whole by discovery, read by every request.
#[derive(Debug)]
pub struct Balancer {
    snapshot: ArcSwap<Snapshot>,
    /// Round-robin position; kept across updates so a swap does not restart the cycle.
    counter: AtomicUsize,
    /// Serialises writers (discovery, reload); the pick path never takes it.
    writer: Mutex<Policy>,
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
        EndpointState { addr, authority, in_flight: AtomicUsize::new(0) }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request (or TCP connection) until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { state: self.clone() }
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
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Balancer ===

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        let snapshot = Snapshot { endpoints: Vec::new(), picker: Picker::build(policy, &[]), synced: false };
        Balancer {
            snapshot: ArcSwap::from_pointee(snapshot),
            counter: AtomicUsize::new(0),
            writer: Mutex::new(policy),
        }
    }

    /// Chooses an endpoint and counts the request against it; `None` when the set is empty.
    pub fn pick(&self) -> Option<InFlight> {
        let snap = self.snapshot.load();
        let i = snap.picker.pick(&snap.endpoints, &self.counter)?;
        Some(snap.endpoints[i].state.begin())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the endpoint set ("reset to this set"): endpoints whose address is already
    /// known keep their state (in-flight counts); weights and tags take the new values.
    pub fn update(&self, specs: &[EndpointSpec]) {
        let policy = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot.load();
        let known: HashMap<SocketAddr, &Arc<EndpointState>> =
            old.endpoints.iter().map(|e| (e.addr, &e.state)).collect();
        let endpoints: Vec<Endpoint> = specs
            .iter()
            .map(|s| Endpoint {
                addr: s.addr,
                weight: s.weight.get(),
                tags: Arc::new(s.tags.clone()),
                state: known
                    .get(&s.addr)
                    .map_or_else(|| Arc::new(EndpointState::new(s.addr)), |st| Arc::clone(st)),
            })
            .collect();
        self.store(*policy, endpoints, true);
    }

    /// Changes the picking policy, keeping the endpoints and their state.
    pub fn set_policy(&self, policy: Policy) {
        let mut current = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if *current == policy {
            return;
        }
        *current = policy;
        let old = self.snapshot.load();
        self.store(policy, old.endpoints.clone(), old.synced);
    }

    fn store(&self, policy: Policy, endpoints: Vec<Endpoint>, synced: bool) {
        let picker = Picker::build(policy, &endpoints);
        self.snapshot.store(Arc::new(Snapshot { endpoints, picker, synced }));
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
                state: "active",
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub weight: u32,
    pub tags: BTreeMap<String, String>,
    pub in_flight: usize,
    pub state: &'static str,
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

    pub(crate) fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        let b = Balancer::new(Policy::WeightedRoundRobin);
        b.update(&specs(weights));
        b.snapshot().endpoints.clone()
    }

    #[test]
    fn update_keeps_state_of_unchanged_endpoints() {
        let b = Balancer::new(Policy::LeastRequest);
        b.update(&specs(&[1, 1]));
        let held = b.snapshot().endpoints[0].state.begin();
        let mut next = specs(&[7, 1, 1]);
        next.remove(1);
        b.update(&next);
        let snap = b.snapshot();
        assert_eq!(snap.endpoints[0].weight, 7);
        assert_eq!(snap.endpoints[0].state.in_flight(), 1);
        assert_eq!(snap.endpoints[1].state.in_flight(), 0);
        drop(held);
        assert_eq!(snap.endpoints[0].state.in_flight(), 0);
    }

    #[test]
    fn empty_and_unsynced_until_first_update() {
        let b = Balancer::new(Policy::WeightedRoundRobin);
        assert!(!b.snapshot().synced);
        assert!(b.pick().is_none());
        b.update(&[]);
        assert!(b.snapshot().synced);
        assert!(b.pick().is_none());
    }

    #[test]
    fn weight_change_takes_effect_on_next_pick() {
        let b = Balancer::new(Policy::WeightedRoundRobin);
        b.update(&specs(&[1, 1]));
        b.update(&specs(&[3, 1]));
        let picks: Vec<_> = (0..8).map(|_| b.pick().unwrap().addr().port() - 10_000).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 6);
    }
}
