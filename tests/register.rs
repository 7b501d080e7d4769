//! Registration of the local app against a real etcd: health gate, keepalive, withdrawal,
//! re-registration, and the order of shutdown on the real binary.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchStream};
use support::etcd::Etcd;
use support::*;

/// The local app: `/healthz` answers 200 or 503 as `healthy` says.
async fn app_with_health(healthy: Arc<AtomicBool>) -> Backend {
    Backend::start(move |_req| {
        let ok = healthy.load(Ordering::SeqCst);
        async move { if ok { text(200, "ok") } else { text(503, "not yet") } }
    })
    .await
}

fn register_yaml(etcd: &Etcd, app: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         allow_no_listeners: true\n\
         register:\n  service: checkout\n  address: {app}\n  lease_ttl: 2s\n  deregistration_delay: 0s\n\
         \x20 metadata: {{ version: v7 }}\n\
         \x20 health: {{ kind: http, path: /healthz, interval: 100ms, unhealthy_threshold: 2 }}\n{extra}",
        etcd.url
    )
}

async fn next_event(watch: &mut WatchStream) -> EventType {
    within(async {
        loop {
            let resp = watch.message().await.unwrap().expect("watch open");
            if let Some(e) = resp.events().first() {
                return e.event_type();
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gated_registration_keepalive_withdrawal_and_reregistration() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let local = app_with_health(healthy.clone()).await;
    let key = format!("svc/checkout/{}", local.addr);
    let mut watch = kv.watch(key.as_str(), None).await.unwrap();
    let app = start_app(&register_yaml(&etcd, local.addr, "")).await;

    // Failing the gate: probes happen, the key does not appear.
    within(async {
        while local.hits() < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(kv.get(key.as_str(), None).await.unwrap().kvs().is_empty(), "registered an unhealthy app");
    assert_eq!(app.registration_state().await, Some("waiting_for_health"));

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(next_event(&mut watch).await, EventType::Put);
    let value = kv.get(key.as_str(), None).await.unwrap().kvs()[0].value_str().unwrap().to_string();
    let decoded = outrider::discovery::decode::decode(value.as_bytes(), Default::default()).unwrap();
    assert_eq!(decoded[0].addr, local.addr);
    assert_eq!(decoded[0].tags["version"], "v7");
    // When it registered, for callers' slow start: now, in Unix seconds.
    let at: u64 = decoded[0].tags["registered_at"].parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now - at < 60, "registered_at {at} vs now {now}");

    // Keepalive: the key outlives its 2 s TTL. (Waiting out the TTL is what is under test.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kv.get(key.as_str(), None).await.unwrap().kvs().len(), 1, "lease not kept alive");

    // Someone deletes the key: it comes back.
    kv.delete(key.as_str(), None).await.unwrap();
    assert_eq!(next_event(&mut watch).await, EventType::Delete);
    assert_eq!(next_event(&mut watch).await, EventType::Put);

    // Failing the gate withdraws the key.
    healthy.store(false, Ordering::SeqCst);
    assert_eq!(next_event(&mut watch).await, EventType::Delete);
    assert_eq!(app.registration_state().await, Some("withdrawn"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deletes_the_key_before_the_listener_stops() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let local = app_with_health(Arc::new(AtomicBool::new(true))).await;
    let key = format!("svc/checkout/{}", local.addr);
    let mut watch = kv.watch(key.as_str(), None).await.unwrap();
    let front = format!("127.0.0.1:{}", free_addr().port());
    let yaml = register_yaml(&etcd, local.addr, "")
        .replace("bind: 127.0.0.1:0", &format!("bind: 127.0.0.1:{}", free_addr().port()))
        .replace("drain_window: 0s", "drain_window: 1s")
        + &format!(
            "listeners:\n  - name: front\n    bind: {front}\n    service: up\n\
             services:\n  up:\n    endpoints:\n      - addr: {}\n",
            local.addr
        );
    let outrider = Binary::spawn(&yaml);
    assert_eq!(next_event(&mut watch).await, EventType::Put);

    outrider.sigterm();
    assert_eq!(next_event(&mut watch).await, EventType::Delete);
    // The key is gone and the proxy still serves: the drain comes after deregistration.
    assert_eq!(get(&client(), &format!("http://{front}/healthz")).await.0, 200);
    assert_eq!(outrider.exit_code().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_outrider_leaves_no_ghost_key() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let local = app_with_health(Arc::new(AtomicBool::new(true))).await;
    let key = format!("svc/checkout/{}", local.addr);
    let mut watch = kv.watch(key.as_str(), None).await.unwrap();
    let mut outrider = Binary::spawn(&register_yaml(&etcd, local.addr, ""));
    assert_eq!(next_event(&mut watch).await, EventType::Put);
    let lease = kv.get(key.as_str(), None).await.unwrap().kvs()[0].lease();
    let granted = kv.lease_time_to_live(lease, None).await.unwrap().granted_ttl();

    outrider.crash(); // SIGKILL: no chance to deregister
    let killed = Instant::now();
    assert_eq!(next_event(&mut watch).await, EventType::Delete);
    let limit = Duration::from_secs(granted as u64 + 1);
    assert!(killed.elapsed() < limit, "ghost key lived {:?} (TTL {granted}s)", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pages_answer_during_the_deregistration_delay() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let local = app_with_health(Arc::new(AtomicBool::new(true))).await;
    let key = format!("svc/checkout/{}", local.addr);
    let mut watch = kv.watch(key.as_str(), None).await.unwrap();
    let yaml =
        register_yaml(&etcd, local.addr, "").replace("deregistration_delay: 0s", "deregistration_delay: 5s");
    let app = start_app(&yaml).await;
    assert_eq!(next_event(&mut watch).await, EventType::Put);
    app.shutdown(true);
    assert_eq!(next_event(&mut watch).await, EventType::Delete);
    // Inside the 5 s delay now: the page must not wait for it.
    let url = format!("http://{}/upstreams", app.admin_addr());
    let page = tokio::time::timeout(Duration::from_secs(2), get(&client(), &url)).await;
    assert_eq!(page.expect("/upstreams blocked during the deregistration delay").0, 200);
    assert!(app.readiness().is_err(), "draining: not ready");
}
