//! Routing against real backends on loopback: header routes to subsets by tags, weighted and
//! sticky splits, fallbacks, retries kept inside a subset, zone preference with spill-over,
//! consistent hashing's key movement, and `/explain` agreeing with where requests go.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use support::*;

/// An endpoint line: address and tags.
fn ep(addr: SocketAddr, tags: &str) -> String {
    format!("      - {{ addr: \"{addr}\", tags: {{ {tags} }} }}\n")
}

/// One listener `front` in front of service `svc` with `extra` service settings.
fn config(top: &str, extra: &str, endpoints: &[String]) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n{top}\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: svc\n\
         services:\n  svc:\n{extra}    endpoints:\n{}",
        endpoints.concat()
    )
}

/// Status, body and `x-outrider-error` of one GET.
async fn call(url: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let (status, body, reason, _) = call_counted(url, headers).await;
    (status, body, reason)
}

/// Also the attempts Outrider made (`x-outrider-attempts`).
async fn call_counted(url: &str, headers: &[(&str, &str)]) -> (u16, String, String, u32) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = within(client().request(req.body(empty()).unwrap())).await.unwrap();
    let status = resp.status().as_u16();
    let header = |name| resp.headers().get(name).map(|v: &http::HeaderValue| v.to_str().unwrap().to_string());
    let reason = header("x-outrider-error").unwrap_or_default();
    let attempts = header("x-outrider-attempts").map_or(0, |a| a.parse().unwrap());
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), reason, attempts)
}

async fn explain(app: &outrider::app::App, query: &str) -> Value {
    let url = format!("http://{}/explain?service=svc&{query}", app.admin_addr());
    let (status, _, body) = get(&client(), &url).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `/explain` until its answer satisfies `done` (health checks run on their own clock).
async fn until_explained(app: &outrider::app::App, query: &str, done: impl Fn(&Value) -> bool) {
    within(async {
        while !done(&explain(app, query).await) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_route_sends_to_its_subset_and_explain_agrees() {
    let (v1a, v1b, v2) = (Backend::named("v1").await, Backend::named("v1").await, Backend::named("v2").await);
    let routes = "    routes:\n      - name: beta\n        match: { headers: [{ name: x-beta, equals: \"yes\" }] }\n\
                  \x20       to: { version: v2 }\n";
    let eps = [ep(v1a.addr, "version: v1"), ep(v1b.addr, "version: v1"), ep(v2.addr, "version: v2")];
    let app = start_app(&config("", routes, &eps)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    for _ in 0..30 {
        assert_eq!(call(&url, &[("x-beta", "yes")]).await.1, "v2");
    }
    let others = spread_ok(&url, 60, &[("x-beta", "no")]).await;
    assert!(others["v1"] > 0 && others["v2"] > 0, "no match: the whole service {others:?}");

    let e = explain(&app, "header=x-beta:yes&path=/checkout").await;
    assert_eq!(e["route"]["name"], "beta");
    assert_eq!(e["subsets"][0]["tags"]["version"], "v2");
    assert_eq!(e["endpoint"], v2.addr.to_string());
    assert_eq!(e["rules"][0]["matches"], true);
    let e = explain(&app, "header=x-beta:no").await;
    assert!(e["route"].is_null());
    assert_eq!(e["subsets"][0]["candidates"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_95_5_split_holds_within_one_and_a_half_percent_over_20000_requests() {
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let routes = "    routes:\n      - name: canary\n        split:\n\
                  \x20         - { to: { version: v1 }, weight: 95 }\n\
                  \x20         - { to: { version: v2 }, weight: 5 }\n";
    let app = start_app(&config("", routes, &[ep(v1.addr, "version: v1"), ep(v2.addr, "version: v2")])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let seen = spread_ok(&url, 20_000, &[]).await;
    let canary = seen["v2"] as f64 / 20_000.0 * 100.0;
    println!("canary share over 20000 requests: {canary:.2}% (configured 5%)");
    assert!((3.5..=6.5).contains(&canary), "canary got {canary:.2}%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_split_keeps_each_user_on_one_side() {
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let routes = "    routes:\n      - name: canary\n        sticky: { header: x-user }\n        split:\n\
                  \x20         - { to: { version: v1 }, weight: 50 }\n\
                  \x20         - { to: { version: v2 }, weight: 50 }\n";
    let app = start_app(&config("", routes, &[ep(v1.addr, "version: v1"), ep(v2.addr, "version: v2")])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let mut sides = HashMap::new();
    for user in 0..100 {
        let user = format!("user-{user}");
        let first = call(&url, &[("x-user", &user)]).await.1;
        for _ in 0..4 {
            assert_eq!(call(&url, &[("x-user", &user)]).await.1, first, "{user} switched sides");
        }
        *sides.entry(first).or_insert(0) += 1;
    }
    assert!(sides["v1"] >= 30 && sides["v2"] >= 30, "users spread over both sides: {sides:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_service_subset_and_fail() {
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let routes = "    routes:\n\
                  \x20     - { name: to-service, match: { path_prefix: /a }, to: { version: v9 } }\n\
                  \x20     - { name: to-v2, match: { path_prefix: /b }, to: { version: v9 }, fallback_to: { version: v2 } }\n\
                  \x20     - { name: to-nothing, match: { path_prefix: /c }, to: { version: v9 }, fallback: fail }\n";
    let app = start_app(&config("", routes, &[ep(v1.addr, "version: v1"), ep(v2.addr, "version: v2")])).await;
    let front = app.listener_addr("front").await.unwrap();
    let seen = spread_ok(&format!("http://{front}/a"), 20, &[]).await;
    assert_eq!(seen.values().sum::<usize>(), 20);
    assert!(seen.contains_key("v1") && seen.contains_key("v2"), "fallback service: {seen:?}");
    for _ in 0..10 {
        assert_eq!(call(&format!("http://{front}/b"), &[]).await.1, "v2");
    }
    let (status, _, reason) = call(&format!("http://{front}/c"), &[]).await;
    assert_eq!((status, reason.as_str()), (503, "no_subset_endpoints"));
    let e = explain(&app, "path=/b").await;
    assert_eq!(
        (e["fell_back"].as_bool(), e["endpoint"].as_str()),
        (Some(true), Some(v2.addr.to_string().as_str()))
    );
    let e = explain(&app, "path=/c").await;
    assert!(e["outcome"].as_str().unwrap().starts_with("503 no_subset_endpoints"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_in_the_subset() {
    let (v1, v2, dead) = (Backend::named("v1").await, Backend::named("v2").await, refused_addr());
    // Subset v2 has a dead member: a first attempt there is retried inside v2, never on v1.
    let extra = "    outlier_detection: { consecutive_failures: 0 }\n    circuit_breaker: { failure_ratio: 0 }\n\
                 \x20   retries: { max_attempts: 3, backoff_base: 1ms, backoff_max: 1ms }\n\
                 \x20   routes:\n      - { name: beta, match: { headers: [{ name: x-beta, present: true }] }, to: { version: v2 } }\n\
                 \x20     - { name: lone, match: { path_prefix: /lone }, to: { track: dead } }\n\
                 \x20     - { name: anywhere, match: { path_prefix: /anywhere }, to: { track: dead }, retries: service }\n";
    let eps = [ep(v1.addr, "version: v1"), ep(v2.addr, "version: v2"), ep(dead, "version: v2, track: dead")];
    let app = start_app(&config("", extra, &eps)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let mut retried = 0;
    for _ in 0..20 {
        let (status, body, _, attempts) = call_counted(&url, &[("x-beta", "1")]).await;
        assert_eq!((status, body.as_str()), (200, "v2"));
        retried += usize::from(attempts == 2);
    }
    assert!(retried >= 5, "round-robin over v2 reaches the dead member half the time: {retried}");
    assert_eq!(v1.hits(), 0);
    // A subset of one dead endpoint: its retries have nowhere else to go...
    let (status, _, reason, attempts) = call_counted(&format!("{url}lone"), &[]).await;
    assert_eq!((status, reason.as_str(), attempts), (502, "connect_failed", 3));
    // ...unless the route lets them go to the whole service.
    let (status, _, _, attempts) = call_counted(&format!("{url}anywhere"), &[]).await;
    assert_eq!((status, attempts), (200, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_with_no_routable_endpoint_falls_back() {
    let v1 = Backend::named("v1").await;
    let (v2, v2_status) = status_backend(200, "v2").await;
    let extra = "    health_check: { kind: http, path: /, interval: 50ms, jitter: 0s, timeout: 500ms, \
                 healthy_threshold: 1, unhealthy_threshold: 1 }\n\
                 \x20   routes:\n      - { name: beta, match: { headers: [{ name: x-beta, present: true }] }, to: { version: v2 } }\n";
    let app = start_app(&config("", extra, &[ep(v1.addr, "version: v1"), ep(v2.addr, "version: v2")])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    assert_eq!(call(&url, &[("x-beta", "1")]).await.1, "v2");
    // v2's only endpoint fails its checks: the subset is empty, fallback `service` applies.
    v2_status.store(500, Ordering::SeqCst);
    until_explained(&app, "header=x-beta:1", |e| e["fell_back"] == true).await;
    assert_eq!(call(&url, &[("x-beta", "1")]).await.1, "v1");
    let e = explain(&app, "header=x-beta:1").await;
    assert_eq!(e["subsets"][0]["candidates"][0]["why"], "failing active health checks");
    assert_eq!(e["subsets"][0]["routable"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_preference_stays_local_then_spills_in_proportion() {
    let mut backends = Vec::new();
    let mut eps = Vec::new();
    for (name, zone) in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("b3", "b")] {
        let (b, status) = status_backend(200, name).await;
        eps.push(ep(b.addr, &format!("zone: {zone}")));
        backends.push((b, status));
    }
    let top = "zone:\n  name: a\n";
    let extra = "    locality: prefer_local\n    outlier_detection: { consecutive_failures: 0 }\n\
                 \x20   health_check: { kind: http, path: /, interval: 50ms, jitter: 0s, timeout: 500ms, \
                 healthy_threshold: 1, unhealthy_threshold: 1 }\n";
    let app = start_app(&config(top, extra, &eps)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let seen = spread_ok(&url, 300, &[]).await;
    let local: usize = ["a1", "a2", "a3"].iter().filter_map(|n| seen.get(*n)).sum();
    assert_eq!(local, 300, "a healthy local zone keeps everything: {seen:?}");

    // a1 fails its checks: zone a can carry 2/5 of the traffic against an expected 3/6, so it
    // keeps (2/5)/(3/6) = 80% and the rest spills to zone b.
    backends[0].1.store(500, Ordering::SeqCst);
    until_explained(&app, "", |e| e["subsets"][0]["locality"]["local_percent"] == 80.0).await;
    let seen = spread_ok(&url, 4000, &[]).await;
    let local: usize = ["a2", "a3"].iter().filter_map(|n| seen.get(*n)).sum();
    let share = local as f64 / 4000.0;
    println!("local share with 1 of 3 local endpoints down: {:.1}% (rule: 80%)", share * 100.0);
    assert!((0.76..=0.84).contains(&share), "local share {share}: {seen:?}");
    assert!(!seen.contains_key("a1"));

    // The whole local zone down: everything spills.
    backends[1].1.store(500, Ordering::SeqCst);
    backends[2].1.store(500, Ordering::SeqCst);
    until_explained(&app, "", |e| e["subsets"][0]["locality"]["local_percent"] == 0.0).await;
    let seen = spread_ok(&url, 60, &[]).await;
    assert!(seen.keys().all(|k| k.starts_with('b')), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_moves_only_the_removed_endpoints_keys_and_explain_predicts_the_endpoint() {
    const NAMES: [&str; 10] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"];
    let mut backends = Vec::new();
    for name in NAMES {
        backends.push(Backend::named(name).await);
    }
    let extra = "    load_balancing: ring_hash\n    hash_key: { header: x-user }\n";
    let eps: Vec<String> = backends.iter().map(|b| ep(b.addr, "")).collect();
    let app = start_app(&config("", extra, &eps)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let users: Vec<String> = (0..2000).map(|u| format!("user-{u}")).collect();
    let mut before = HashMap::new();
    for u in &users {
        before.insert(u.clone(), call(&url, &[("x-user", u)]).await.1);
    }
    for u in users.iter().take(20) {
        let e = explain(&app, &format!("header=x-user:{u}")).await;
        let addr = e["endpoint"].as_str().unwrap();
        let named = NAMES[backends.iter().position(|b| b.addr.to_string() == addr).unwrap()];
        assert_eq!(named, before[u], "explain names where {u} goes");
    }
    let next = outrider::config::Config::parse(&config("", extra, &eps[1..])).unwrap();
    assert!(app.reload(next).await.unwrap());
    let mut moved = 0;
    for u in &users {
        let now = call(&url, &[("x-user", u)]).await.1;
        if now != before[u] {
            moved += 1;
            assert_eq!(before[u], "e0", "{u} moved though its endpoint stayed");
        }
    }
    let owned = before.values().filter(|v| *v == "e0").count();
    println!(
        "ring_hash: removing 1 of 10 endpoints moved {moved} of 2000 keys ({:.1}%)",
        moved as f64 / 20.0
    );
    assert_eq!(moved, owned, "exactly the removed endpoint's keys move");
    assert!((100..=300).contains(&moved), "about 1/10 of 2000 keys: {moved}");
}

#[tokio::test]
async fn explain_refuses_bad_queries() {
    let b = Backend::named("b").await;
    let app = start_app(&config("", "", &[ep(b.addr, "")])).await;
    let base = format!("http://{}/explain", app.admin_addr());
    for (query, status) in [
        ("", 400),
        ("?service=nope", 404),
        ("?service=svc&header=novalue", 400),
        ("?service=svc&bogus=1", 400),
    ] {
        assert_eq!(get(&client(), &format!("{base}{query}")).await.0, status, "{query}");
    }
}
