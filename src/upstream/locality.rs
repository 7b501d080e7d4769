//! Zone-aware routing: how much of this Outrider's traffic stays in its own zone, and how
//! the rest spills over to the other zones.
//!
//! The rule (Envoy's, with the callers' spread taken from the upstream's own configured
//! capacity, since a sidecar does not see the other callers):
//! - Off (every routable endpoint, by weight) when the set has fewer than `min_endpoints`
//!   endpoints, is in panic mode, or this Outrider has no zone.
//! - A zone's expected share of the callers' traffic is its share of the set's weight
//!   (drained endpoints excluded); its capacity is its share of the *routable* weight.
//! - The local zone keeps everything while its capacity covers its expected share;
//!   otherwise it keeps `capacity / expected` of it, and the rest goes to the other zones in
//!   proportion to their spare capacity (capacity − expected, when positive). With no
//!   routable endpoint in the local zone, everything spills.
//!
//! Owns: that arithmetic, done when a snapshot is built. Must not: run per request.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Endpoint;
use crate::config::LocalityRule;

/// Parts per this many: a probability with four digits.
pub(crate) const SCALE: u32 = 10_000;

/// What zone preference does for one (sub)set, as `/explain` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LocalityView {
    pub zone: String,
    /// Whether zone preference applies now, and why not when it does not.
    pub active: bool,
    pub reason: &'static str,
    /// Percent of requests kept in the local zone.
    pub local_percent: f64,
    pub zones: Vec<ZoneView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZoneView {
    pub zone: String,
    pub endpoints: usize,
    pub routable: usize,
    /// Expected share of callers' traffic (its share of the set's weight).
    pub expected: f64,
    /// Share of the routable weight.
    pub capacity: f64,
    /// Percent of this Outrider's requests sent here.
    pub percent: f64,
}

/// The endpoints split by zone, with the weights spill-over uses.
#[derive(Debug)]
pub(crate) struct Split {
    pub(crate) local: Vec<Endpoint>,
    /// Other zones' routable endpoints, weighted so zones get their share of the spill.
    pub(crate) remote: Vec<Endpoint>,
    /// Of [`SCALE`]: requests kept local.
    pub(crate) local_share: u32,
}

#[derive(Default)]
struct Tally {
    endpoints: usize,
    routable: usize,
    weight: u64,
    routable_weight: u64,
}

/// Splits `routable` (a subset's routable endpoints; `live` are all its undrained ones) by
/// zone, or says why zones do not apply.
pub(crate) fn split(
    rule: &LocalityRule,
    live: &[Endpoint],
    routable: &[Endpoint],
    panic: bool,
) -> (Option<Split>, LocalityView) {
    let zone_of = |e: &Endpoint| e.tags.get(&rule.tag).cloned().unwrap_or_default();
    let mut zones: BTreeMap<String, Tally> = BTreeMap::new();
    zones.entry(rule.zone.clone()).or_default();
    for e in live {
        let t = zones.entry(zone_of(e)).or_default();
        t.endpoints += 1;
        t.weight += u64::from(e.weight);
    }
    for e in routable {
        let t = zones.entry(zone_of(e)).or_default();
        t.routable += 1;
        t.routable_weight += u64::from(e.weight);
    }
    let (w, h) = zones.values().fold((0, 0), |(w, h), t| (w + t.weight, h + t.routable_weight));
    let share = |part: u64, whole: u64| if whole == 0 { 0.0 } else { part as f64 / whole as f64 };
    let mut view = LocalityView {
        zone: rule.zone.clone(),
        active: false,
        reason: "",
        local_percent: 0.0,
        zones: Vec::new(),
    };
    let off = if live.len() < rule.min_endpoints {
        Some("fewer endpoints than zone.min_endpoints: zones ignored")
    } else if panic {
        Some("panic mode: every endpoint is used, zones ignored")
    } else if h == 0 {
        Some("no routable endpoint")
    } else {
        None
    };
    let local = &zones[&rule.zone];
    let (expected_local, capacity_local) = (share(local.weight, w), share(local.routable_weight, h));
    let local_share = if local.routable_weight == 0 {
        0
    } else if capacity_local >= expected_local {
        SCALE
    } else {
        ((capacity_local / expected_local) * f64::from(SCALE)).round() as u32
    };
    // Spare capacity of each other zone, which the spill is divided by.
    let spare: BTreeMap<&str, f64> = zones
        .iter()
        .filter(|(z, _)| **z != rule.zone)
        .map(|(z, t)| (z.as_str(), (share(t.routable_weight, h) - share(t.weight, w)).max(0.0)))
        .collect();
    let spare_total: f64 = spare.values().sum();
    let spill = f64::from(SCALE - local_share) / f64::from(SCALE);
    view.zones = zones
        .iter()
        .map(|(z, t)| {
            let percent = if *z == rule.zone {
                100.0 * f64::from(local_share) / f64::from(SCALE)
            } else if spare_total > 0.0 {
                100.0 * spill * spare[z.as_str()] / spare_total
            } else {
                100.0 * spill * share(t.routable_weight, h - local.routable_weight)
            };
            ZoneView {
                zone: z.clone(),
                endpoints: t.endpoints,
                routable: t.routable,
                expected: share(t.weight, w),
                capacity: share(t.routable_weight, h),
                percent,
            }
        })
        .collect();
    if let Some(reason) = off {
        view.reason = reason;
        return (None, view);
    }
    view.active = true;
    view.local_percent = 100.0 * f64::from(local_share) / f64::from(SCALE);
    view.reason = match local_share {
        SCALE => "the local zone has capacity for its share: all requests stay local",
        0 => "no routable endpoint in the local zone: all requests spill over",
        _ => "the local zone is short of capacity: the rest spills to zones with spare capacity",
    };
    let remote = routable
        .iter()
        .filter(|e| zone_of(e) != rule.zone)
        .map(|e| {
            let z = zone_of(e);
            let zone_weight = zones[&z].routable_weight.max(1) as f64;
            let weight = if spare_total > 0.0 {
                let of_spill = spare[z.as_str()] / spare_total * f64::from(e.weight) / zone_weight;
                ((of_spill * f64::from(SCALE)).round() as u32).max(1)
            } else {
                e.weight
            };
            Endpoint { weight, ..e.clone() }
        })
        .filter(|e| spare_total == 0.0 || spare[zone_of(e).as_str()] > 0.0)
        .collect();
    let local = routable.iter().filter(|e| zone_of(e) == rule.zone).cloned().collect();
    (Some(Split { local, remote, local_share }), view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::tests::endpoints;

    fn zoned(zones: &[&str]) -> Vec<Endpoint> {
        let mut eps = endpoints(&vec![1; zones.len()]);
        for (e, z) in eps.iter_mut().zip(zones) {
            e.tags = std::sync::Arc::new([("zone".to_string(), z.to_string())].into());
        }
        eps
    }

    fn rule() -> LocalityRule {
        LocalityRule { zone: "a".into(), tag: "zone".into(), min_endpoints: 6 }
    }

    #[test]
    fn a_healthy_local_zone_keeps_everything() {
        let eps = zoned(&["a", "a", "a", "b", "b", "b", "c", "c", "c"]);
        let (split, view) = split(&rule(), &eps, &eps, false);
        let split = split.unwrap();
        assert_eq!((split.local.len(), split.local_share), (3, SCALE));
        assert!(view.active);
    }

    #[test]
    fn a_short_local_zone_spills_to_zones_with_spare_capacity() {
        let eps = zoned(&["a", "a", "a", "b", "b", "b", "c", "c", "c"]);
        // One of a's three is down: a can carry 2/8 of the traffic against an expected 1/3.
        let routable: Vec<Endpoint> = eps[1..].to_vec();
        let (split, view) = split(&rule(), &eps, &routable, false);
        let split = split.unwrap();
        assert_eq!(split.local_share, 7_500);
        // b and c have equal spare capacity: the spill is shared evenly.
        let weights: Vec<u32> = split.remote.iter().map(|e| e.weight).collect();
        assert!(weights.windows(2).all(|w| w[0] == w[1]), "{weights:?}");
        let percents: Vec<f64> = view.zones.iter().map(|z| z.percent).collect();
        assert_eq!(percents, vec![75.0, 12.5, 12.5]);
    }

    #[test]
    fn small_sets_and_panic_ignore_zones() {
        let eps = zoned(&["a", "b", "c"]);
        assert!(split(&rule(), &eps, &eps, false).0.is_none());
        let eps = zoned(&["a", "a", "a", "b", "b", "b"]);
        let (split, view) = split(&rule(), &eps, &eps, true);
        assert!(split.is_none() && !view.active);
    }

    #[test]
    fn the_zone_tag_is_configurable() {
        let mut eps = zoned(&["a", "a", "a", "b", "b", "b"]);
        for e in &mut eps {
            let z = e.tags["zone"].clone();
            e.tags = std::sync::Arc::new([("topology.kubernetes.io/zone".to_string(), z)].into());
        }
        let rule = LocalityRule { tag: "topology.kubernetes.io/zone".into(), ..rule() };
        let (split, _) = split(&rule, &eps, &eps, false);
        assert_eq!(split.unwrap().local.len(), 3);
    }

    #[test]
    fn no_local_endpoint_spills_everything() {
        let eps = zoned(&["a", "a", "b", "b", "c", "c"]);
        let (split, _) = split(&rule(), &eps, &eps[2..], false);
        let split = split.unwrap();
        assert_eq!((split.local_share, split.local.len(), split.remote.len()), (0, 0, 4));
    }
}
