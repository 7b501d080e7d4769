//! etcd discovery against a real etcd and real backends.

mod support;

use std::time::{Duration, Instant};

use support::etcd::Etcd;
use support::*;

fn etcd_config(etcd: &Etcd, extra_service: &str, extra_etcd: &str) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n{extra_etcd}\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n    discovery: etcd\n{extra_service}",
        etcd.url
    )
}

fn naming(addr: std::net::SocketAddr, meta: &str) -> String {
    format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{{meta}}}}}"#)
}

/// Sends requests until one is answered by `name`; returns how long that took.
async fn until_routed_to(url: &str, name: &str) -> Duration {
    let started = Instant::now();
    let client = client();
    within(async {
        loop {
            let (status, _, body) = get(&client, url).await;
            if status == 200 && body == name {
                return started.elapsed();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

async fn endpoint_addrs(app: &outrider::app::App) -> Vec<String> {
    let mut addrs: Vec<_> =
        app.balancer("pay").unwrap().describe().iter().map(|e| e.addr.to_string()).collect();
    addrs.sort();
    addrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_delete_change_routing_within_a_second() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    kv.put(format!("svc/pay/{}", a.addr), naming(a.addr, ""), None).await.unwrap();
    let app = start_app(&etcd_config(&etcd, "", "")).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "a").await;

    let mut latencies = Vec::new();
    for round in 0..5 {
        kv.put(format!("svc/pay/{}", b.addr), naming(b.addr, ""), None).await.unwrap();
        kv.delete(format!("svc/pay/{}", a.addr), None).await.unwrap();
        latencies.push(until_routed_to(&url, "b").await);
        // Once the delete has arrived too, nothing may reach a any more.
        within(async {
            while endpoint_addrs(&app).await != vec![b.addr.to_string()] {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let hits = a.hits();
        for _ in 0..20 {
            assert_eq!(get(&client(), &url).await.2, "b", "round {round}");
        }
        assert_eq!(a.hits(), hits);
        kv.put(format!("svc/pay/{}", a.addr), naming(a.addr, ""), None).await.unwrap();
        kv.delete(format!("svc/pay/{}", b.addr), None).await.unwrap();
        latencies.push(until_routed_to(&url, "a").await);
    }
    latencies.sort();
    eprintln!("put -> routed latencies: {latencies:?}");
    assert!(latencies.iter().all(|l| *l < Duration::from_secs(1)), "{latencies:?}");
}

#[tokio::test]
async fn every_value_format_decodes_and_garbage_is_skipped_and_counted() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let values = [
        ("svc/pay/naming", naming("127.0.0.1:10001".parse().unwrap(), r#""weight":3"#)),
        ("svc/pay/gozero", "127.0.0.1:10002".to_string()),
        ("svc/pay/gokit", "http://127.0.0.1:10003/".to_string()),
        ("svc/pay/kratos", r#"{"id":"k","endpoints":["http://127.0.0.1:10004"]}"#.to_string()),
        ("svc/pay/micro", r#"{"name":"pay","nodes":[{"id":"m","address":"127.0.0.1:10005"}]}"#.to_string()),
        ("svc/pay/garbage", "{not json".to_string()),
    ];
    for (k, v) in values {
        kv.put(k, v, None).await.unwrap();
    }
    let app = start_app(&etcd_config(&etcd, "", "")).await;
    within(async {
        while endpoint_addrs(&app).await.len() < 5 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let addrs = endpoint_addrs(&app).await;
    let expected: Vec<String> = (10001..=10005).map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(addrs, expected);
    let status = app.discovery_status().await;
    assert_eq!(status["pay"]["undecodable_values"], 1);
    assert!(status["pay"]["revision"].as_i64().unwrap() >= 6, "{status:?}");
}

#[tokio::test]
async fn tag_selector_routes_to_a_subset() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    kv.put("svc/pay/1", naming(v1.addr, r#""version":"v1""#), None).await.unwrap();
    kv.put("svc/pay/2", naming(v2.addr, r#""version":"v2""#), None).await.unwrap();
    let app = start_app(&etcd_config(&etcd, "    etcd:\n      selector: { version: v2 }\n", "")).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "v2").await;
    for _ in 0..20 {
        assert_eq!(get(&client(), &url).await.2, "v2");
    }
    assert_eq!(v1.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_crash_keeps_the_last_set_and_changes_after_restart_arrive_despite_compaction() {
    let mut etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    kv.put("svc/pay/a", naming(a.addr, ""), None).await.unwrap();
    let app = start_app(&etcd_config(&etcd, "", "")).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "a").await;

    etcd.kill();
    eprintln!("step: etcd killed");
    let client = client();
    for _ in 0..50 {
        assert_eq!(get(&client, &url).await.0, 200, "requests fail while etcd is down");
    }
    etcd.restart().await;
    eprintln!("step: etcd restarted");
    let mut kv = etcd.client().await;
    kv.put("svc/pay/b", naming(b.addr, ""), None).await.unwrap();
    let resp = kv.delete("svc/pay/a", None).await.unwrap();
    let revision = resp.header().unwrap().revision();
    kv.compact(revision, None).await.unwrap();
    eprintln!("step: changed and compacted at {revision}");
    // Both changes arrive (put and delete may come in separate watch responses).
    within(async {
        while endpoint_addrs(&app).await != vec![b.addr.to_string()] {
            tokio::task::yield_now().await;
        }
    })
    .await;
    until_routed_to(&url, "b").await;
}

#[tokio::test]
async fn lease_expiry_removes_an_instance_within_ttl_plus_one_second() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    kv.put("svc/pay/a", naming(a.addr, ""), None).await.unwrap();
    let granted = Instant::now();
    let lease = kv.lease_grant(1, None).await.unwrap();
    // etcd may round a TTL up to its minimum; the bound is on the TTL it granted.
    let ttl = Duration::from_secs(lease.ttl() as u64);
    let lease = lease.id();
    let opts = etcd_client::PutOptions::new().with_lease(lease);
    kv.put("svc/pay/b", naming(b.addr, ""), Some(opts)).await.unwrap();
    let app = start_app(&etcd_config(&etcd, "", "")).await;
    within(async {
        while endpoint_addrs(&app).await.len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // No keepalive: the lease lapses after its TTL and etcd deletes the key.
    within(async {
        while endpoint_addrs(&app).await.len() > 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let elapsed = granted.elapsed();
    assert!(elapsed < ttl + Duration::from_secs(1), "took {elapsed:?} with a TTL of {ttl:?}");
    assert_eq!(endpoint_addrs(&app).await, vec![a.addr.to_string()]);
}

#[tokio::test]
async fn cold_start_with_etcd_down_serves_a_snapshot_and_is_not_ready_without_one() {
    let mut etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let a = Backend::named("a").await;
    kv.put("svc/pay/a", naming(a.addr, ""), None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with_snapshot = format!("  snapshot_dir: {}\n", dir.path().display());
    {
        let app = start_app(&etcd_config(&etcd, "", &with_snapshot)).await;
        let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
        until_routed_to(&url, "a").await;
        app.shutdown(false);
        within(app.finished()).await;
    }
    // Written off the runtime, shortly after the set was applied.
    within(async {
        while !dir.path().join("pay.json").exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    etcd.kill();

    let app = start_app(&etcd_config(&etcd, "", &with_snapshot)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "a").await;
    assert!(app.readiness().is_ok(), "a loaded snapshot counts as synced");

    let empty_dir = tempfile::tempdir().unwrap();
    let without = format!("  snapshot_dir: {}\n", empty_dir.path().display());
    let cold = start_app(&etcd_config(&etcd, "", &without)).await;
    let reasons = cold.readiness().unwrap_err();
    assert!(reasons.iter().any(|r| r.contains("service pay")), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_outage_the_watch_is_back_within_two_seconds() {
    let mut etcd = Etcd::start().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    etcd.client().await.put(format!("svc/pay/{}", a.addr), naming(a.addr, ""), None).await.unwrap();
    let app = start_app(&etcd_config(&etcd, "", "")).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "a").await;

    etcd.kill();
    // Out long enough for the reconnect backoff to grow to seconds (full jitter up to 6.4 s);
    // etcd comes back just as a fresh backoff starts, the worst moment for a plain sleep.
    let reconnects = || async { app.discovery_status().await["pay"]["reconnects"].as_u64().unwrap_or(0) };
    within(async {
        while reconnects().await < 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = reconnects().await;
        while reconnects().await == seen {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(get(&client(), &url).await.2, "a", "the last set keeps serving while etcd is down");
    etcd.restart().await;
    let back = Instant::now();
    etcd.client().await.put(format!("svc/pay/{}", b.addr), naming(b.addr, ""), None).await.unwrap();
    let mut routed = Duration::ZERO;
    while back.elapsed() < Duration::from_secs(5) {
        let (_, _, body) = get(&client(), &url).await;
        if body == "b" {
            routed = back.elapsed();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("etcd back -> new endpoint routed: {routed:?}");
    assert!(!routed.is_zero() && routed < Duration::from_secs(2), "took {routed:?} (or never, within 5 s)");
}

#[tokio::test]
async fn endpoints_outside_allowed_networks_are_refused_and_counted() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let a = Backend::named("a").await;
    kv.put("svc/pay/a", naming(a.addr, ""), None).await.unwrap();
    // A poisoned entry: the cloud metadata address.
    kv.put("svc/pay/evil", naming("169.254.169.254:80".parse().unwrap(), ""), None).await.unwrap();
    let yaml = etcd_config(&etcd, "", "")
        .replace("listeners:", "allowed_networks: [127.0.0.0/8, 10.0.0.0/8]\nlisteners:");
    let app = start_app(&yaml).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    until_routed_to(&url, "a").await;
    assert_eq!(endpoint_addrs(&app).await, vec![a.addr.to_string()], "the metadata address never joins");
    let status = app.discovery_status().await;
    assert_eq!(status["pay"]["refused_endpoints"], 1);
    let metrics = app.metrics_text();
    assert!(metrics.contains("outrider_discovery_refused_endpoints_total{service=\"pay\"} 1"), "{metrics}");
}
