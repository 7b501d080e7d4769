//! `/explain`: what would happen to a described request now — the rule that matches, the
//! split, the subset and its fallback, zone preference, every candidate with its state, the
//! panic decision and the endpoint the next pick would choose.
//!
//! Owns: composing routing and the balancer's read-only view. Must not: count, take a
//! round-robin turn, or change any state — explaining is not routing.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Upstream;
use crate::config::{Fallback, HashKey, Selector};
use crate::routing::{self as route, Request};
use crate::upstream::{EndpointView, Target};

/// The decision for `req` at `up`, as JSON.
pub(crate) fn explain(up: &Upstream, req: &Request<'_>) -> Value {
    let routing = &up.config.routing;
    let routed = route::route(routing, req);
    let rules: Vec<Value> = routing
        .routes
        .iter()
        .map(|r| json!({ "name": r.name, "matches": routed.route.is_some_and(|m| std::ptr::eq(m, r)) }))
        .collect();
    let route = routed.route.map(|r| {
        let split: Vec<Value> = r
            .split
            .iter()
            .map(|s| json!({ "subset": routing.subsets[s.subset], "weight": s.weight, "chosen": s.subset == routed.target.subset }))
            .collect();
        json!({
            "name": r.name,
            "split": split,
            "sticky": r.sticky.as_ref().map(|k| json!({ "key": key_name(k), "present": sticky_present(k, req) })),
            "fallback": fallback_name(r.fallback, &routing.subsets),
            "retries": r.retries,
        })
    });
    let endpoints = up.balancer.describe();
    let mut target = routed.target;
    let mut steps = vec![subset_view(up, target, &routing.subsets, &endpoints)];
    let mut fell_back = false;
    if steps[0].1.is_none() && target.subset != 0 {
        let to = match routed.fallback() {
            Fallback::Service => Some(0),
            Fallback::Subset(s) => Some(s),
            Fallback::Fail => None,
        };
        if let Some(to) = to {
            target.subset = to;
            fell_back = true;
            steps.push(subset_view(up, target, &routing.subsets, &endpoints));
        }
    }
    let picked = steps.last().and_then(|(_, next)| *next);
    let outcome = match (picked, routed.route) {
        (Some(addr), _) => format!("sent to {addr}"),
        (None, Some(r)) if target.subset != 0 => {
            format!("503 no_subset_endpoints: route {} has no routable endpoint in its subset", r.name)
        }
        (None, _) => "503 no_endpoints: the service has no routable endpoint".to_string(),
    };
    json!({
        "service": up.name.as_ref(),
        "request": { "method": req.method.as_str(), "path": req.path, "headers": headers(req) },
        "rules": rules,
        "route": route,
        "load_balancing": up.config.load_balancing,
        "hash": routing.hash_key.as_ref().map(|k| json!({ "key": key_name(k), "value": target.hash.map(|h| format!("{h:016x}")) })),
        "subsets": steps.into_iter().map(|(view, _)| view).collect::<Vec<_>>(),
        "fell_back": fell_back,
        "endpoint": picked,
        "outcome": outcome,
    })
}

/// One subset's candidates and decision; also the endpoint a pick would choose.
fn subset_view(
    up: &Upstream,
    target: Target,
    subsets: &[Selector],
    endpoints: &[EndpointView],
) -> (Value, Option<std::net::SocketAddr>) {
    let selector = subsets.get(target.subset).cloned().unwrap_or_default();
    let group = up.balancer.explain(target);
    let routable = group.as_ref().map(|g| g.routable.clone()).unwrap_or_default();
    let candidates: Vec<Value> = endpoints
        .iter()
        .filter(|e| selector.iter().all(|(k, v)| e.tags.get(k) == Some(v)))
        .map(|e| {
            json!({
                "addr": e.addr,
                "weight": e.weight,
                "tags": e.tags,
                "state": e.state,
                "in_flight": e.in_flight,
                "routable": routable.contains(&e.addr),
                "why": why(e),
            })
        })
        .collect();
    let next = group.as_ref().and_then(|g| g.next);
    let view = json!({
        "tags": selector,
        "candidates": candidates,
        "routable": routable.len(),
        "panic": group.as_ref().is_some_and(|g| g.panic),
        "panic_threshold_percent": up.config.resilience.outlier.panic_threshold_percent,
        "locality": group.as_ref().and_then(|g| g.locality.clone()),
        "placement": group.as_ref().map(|g| g.placement),
        "next": next,
    });
    (view, next)
}

/// Why an endpoint is (not) a candidate, in an operator's words.
fn why(e: &EndpointView) -> String {
    match e.state {
        "active" => "healthy".into(),
        "draining" => "drained: weight 0 from the etcd overlay".into(),
        "unhealthy" => "failing active health checks".into(),
        "ejected" => format!(
            "ejected by outlier detection ({} consecutive failures; ejected {} times)",
            e.consecutive_failures, e.times_ejected
        ),
        "probing" => "back from ejection: one probe request at a time until it succeeds".into(),
        other => other.into(),
    }
}

fn key_name(k: &HashKey) -> String {
    match k {
        HashKey::Header(h) => format!("header {h}"),
        HashKey::Cookie(c) => format!("cookie {c}"),
        HashKey::Path => "path".into(),
        HashKey::Source => "source".into(),
    }
}

fn sticky_present(k: &HashKey, req: &Request<'_>) -> bool {
    match k {
        HashKey::Header(h) => req.headers.contains_key(h),
        HashKey::Cookie(c) => route::cookie(req.headers, c).is_some(),
        HashKey::Path => true,
        HashKey::Source => req.source.is_some(),
    }
}

fn fallback_name(f: Fallback, subsets: &[Selector]) -> Value {
    match f {
        Fallback::Service => json!("service"),
        Fallback::Fail => json!("fail"),
        Fallback::Subset(s) => json!({ "subset": subsets[s] }),
    }
}

fn headers(req: &Request<'_>) -> BTreeMap<String, String> {
    req.headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}
