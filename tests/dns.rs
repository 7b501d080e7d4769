//! DNS discovery against a real DNS server (dnsmasq) and real backends on 127.0.0.1-3.

mod support;

use std::time::{Duration, Instant};

use outrider::app::App;
use support::dns::Dnsmasq;
use support::*;
use tokio::net::TcpListener;

/// Backends on 127.0.0.1, .2, .3 … sharing one port, as pods behind a headless Service.
async fn same_port(names: &[&'static str]) -> (u16, Vec<Backend>) {
    'again: loop {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut sockets = vec![first];
        for i in 2..=names.len() {
            match TcpListener::bind(format!("127.0.0.{i}:{port}")).await {
                Ok(s) => sockets.push(s),
                Err(_) => continue 'again,
            }
        }
        let backends = sockets
            .into_iter()
            .zip(names.iter().copied())
            .map(|(s, name)| Backend::serve(s, move |_req| async move { text(200, name) }))
            .collect();
        return (port, backends);
    }
}

/// Resolver settings for tests: the test's server, TTLs followed between 100 ms and 1 s.
/// `top`: more top-level YAML (lines of the `dns` block when indented).
fn config(dns: &Dnsmasq, top: &str, service: &str) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         dns:\n  servers: [\"{}\"]\n  timeout: 300ms\n  min_refresh: 100ms\n  max_refresh: 1s\n{top}\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n{service}",
        dns.addr
    )
}

fn hosts(ips: &[u8], name: &str) -> String {
    ips.iter().map(|i| format!("127.0.0.{i} {name}\n")).collect()
}

async fn endpoints(app: &App) -> Vec<String> {
    let mut addrs: Vec<_> =
        app.balancer("pay").unwrap().describe().iter().map(|e| e.addr.ip().to_string()).collect();
    addrs.sort();
    addrs
}

/// Waits until the service's endpoint IPs are `want`; how long that took.
async fn until_endpoints(app: &App, want: &[&str]) -> Duration {
    let started = Instant::now();
    within(async {
        while endpoints(app).await != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    started.elapsed()
}

/// Sends `n` requests; how many each backend answered, by name.
async fn spread(url: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let client = client();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (status, _, body) = get(&client, url).await;
        assert_eq!(status, 200, "{body}");
        *seen.entry(body).or_default() += 1;
    }
    seen
}

async fn front(app: &App) -> String {
    format!("http://{}/", app.listener_addr("front").await.unwrap())
}

async fn admin_json(app: &App, path: &str) -> serde_json::Value {
    let (status, _, body) = get(&client(), &format!("http://{}{path}", app.admin_addr())).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_name_gets_traffic_and_is_shown() {
    let (port, _backends) = same_port(&["a", "b", "c"]).await;
    let dns = Dnsmasq::start(&hosts(&[1, 2, 3], "pay.test"), 1, &[]).await;
    let app = start_app(&config(&dns, "", &format!("    endpoints:\n      - addr: pay.test:{port}\n"))).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2", "127.0.0.3"]).await;
    assert!(app.readiness().is_ok());

    let seen = spread(&front(&app).await, 30).await;
    assert_eq!(seen.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{seen:?}");

    let page = admin_json(&app, "/upstreams").await;
    let pay = &page["services"]["pay"];
    assert_eq!(pay["discovery"], "dns");
    assert_eq!(pay["watch"]["answers"], 3, "{pay}");
    assert_eq!(pay["watch"]["ttl_seconds"], 1.0, "{pay}");
    assert_eq!(pay["watch"]["state"], "resolved");
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", app.admin_addr())).await;
    assert!(metrics.contains("outrider_dns_answers{service=\"pay\"} 3"), "{metrics}");
    assert!(metrics.contains("outrider_dns_ttl_seconds{service=\"pay\"} 1.0"), "{metrics}");
    assert!(metrics.contains("outrider_dns_failures_total{service=\"pay\"} 0"), "{metrics}");
    let stamp = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outrider_dns_last_resolution_timestamp_seconds{service=\"pay\"} "))
        .expect("resolution timestamp");
    assert!(stamp.parse::<f64>().unwrap() > 1.7e9, "{stamp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_records_move_traffic_within_the_ttl() {
    let (port, _backends) = same_port(&["a", "b", "c"]).await;
    let mut dns = Dnsmasq::start(&hosts(&[1, 2], "pay.test"), 1, &[]).await;
    let service = format!(
        "    discovery: dns\n    dns:\n      name: pay.test\n      port: {port}\n      weight: 5\n      tags: {{ zone: a }}\n"
    );
    let app = start_app(&config(&dns, "", &service)).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2"]).await;
    for e in app.balancer("pay").unwrap().describe() {
        assert_eq!(
            (e.weight, e.tags["zone"].as_str()),
            (5, "a"),
            "every address carries the name's weight and tags"
        );
    }

    dns.set_hosts(&hosts(&[3], "pay.test")).await;
    let took = until_endpoints(&app, &["127.0.0.3"]).await;
    println!("DNS change -> new set in {took:?} (TTL 1 s)");
    assert!(took < Duration::from_secs(2), "TTL is 1 s (plus a lookup), took {took:?}");
    let seen = spread(&front(&app).await, 5).await;
    assert_eq!(seen.get("c"), Some(&5), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dns_server_keeps_the_last_set() {
    let (port, _backends) = same_port(&["a", "b", "c"]).await;
    let mut dns = Dnsmasq::start(&hosts(&[1, 2, 3], "pay.test"), 1, &[]).await;
    let app = start_app(&config(&dns, "", &format!("    endpoints:\n      - addr: pay.test:{port}\n"))).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2", "127.0.0.3"]).await;

    dns.kill();
    within(async {
        while admin_json(&app, "/upstreams").await["services"]["pay"]["watch"]["failures"].as_u64() < Some(2)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let seen = spread(&front(&app).await, 30).await;
    assert_eq!(seen.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{seen:?}");
    assert!(app.readiness().is_ok(), "a DNS outage is not a reason to stop serving");
    let watch = &admin_json(&app, "/upstreams").await["services"]["pay"]["watch"];
    assert!(watch["last_error"].as_str().is_some_and(|e| e.contains("pay.test")), "{watch}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_weights_are_honoured_and_a_lower_priority_is_a_fallback() {
    let (port, _backends) = same_port(&["a", "b", "c"]).await;
    let srv = |target: &str, priority: u16, weight: u16| {
        format!("--srv-host=_http._tcp.pay.test,{target},{port},{priority},{weight}")
    };
    let records = [srv("a.test", 0, 1), srv("b.test", 0, 3), srv("c.test", 1, 100)];
    let all = "127.0.0.1 a.test\n127.0.0.2 b.test\n127.0.0.3 c.test\n";
    let mut dns = Dnsmasq::start(all, 1, &records).await;
    let service = "    discovery: dns\n    dns:\n      srv: _http._tcp.pay.test\n";
    let app = start_app(&config(&dns, "", service)).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2"]).await;
    let seen = spread(&front(&app).await, 40).await;
    assert_eq!((seen.get("a"), seen.get("b"), seen.get("c")), (Some(&10), Some(&30), None), "{seen:?}");

    // Neither priority-0 target resolves any more: the priority-1 one takes over.
    dns.set_hosts("127.0.0.3 c.test\n").await;
    until_endpoints(&app, &["127.0.0.3"]).await;
    assert_eq!(spread(&front(&app).await, 3).await.get("c"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_gone_empties_the_service_once_confirmed() {
    let (port, _backends) = same_port(&["a"]).await;
    let mut dns = Dnsmasq::start(&hosts(&[1], "pay.test"), 1, &[]).await;
    let app = start_app(&config(&dns, "", &format!("    endpoints:\n      - addr: pay.test:{port}\n"))).await;
    until_endpoints(&app, &["127.0.0.1"]).await;

    dns.set_hosts("127.0.0.9 other.test\n").await; // pay.test: NXDOMAIN
    until_endpoints(&app, &[]).await;
    let (status, headers, _) = get(&client(), &front(&app).await).await;
    assert_eq!((status, headers["x-outrider-error"].to_str().unwrap()), (503, "no_endpoints"));

    dns.set_hosts(&hosts(&[1], "pay.test")).await;
    until_endpoints(&app, &["127.0.0.1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_resolution() {
    let (port, _backends) = same_port(&["a"]).await;
    let server = free_addr();
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\ndns:\n  servers: [\"{server}\"]\n  timeout: 200ms\n  min_refresh: 100ms\n  max_refresh: 1s\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n    endpoints:\n      - addr: pay.test:{port}\n"
    );
    let app = start_app(&yaml).await;
    let reasons = app.readiness().unwrap_err();
    assert!(reasons.iter().any(|r| r.contains("service pay")), "{reasons:?}");

    let _dns = Dnsmasq::start_on(server, &hosts(&[1], "pay.test"), 1, &[]).await;
    within(async {
        while app.readiness().is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(endpoints(&app).await, ["127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_domains_and_ndots_come_from_resolv_conf_beside_fixed_endpoints() {
    let (port, _backends) = same_port(&["a", "b"]).await;
    let dns = Dnsmasq::start("127.0.0.2 pay.prod.test\n", 1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    // As Kubernetes writes it: search domains and ndots:5, so "pay" is tried as pay.prod.test.
    std::fs::write(&resolv, "nameserver 127.0.0.1\nsearch prod.test svc.test\noptions ndots:5\n").unwrap();
    let top = format!("  resolv_conf: {}\n", resolv.display());
    let service = format!("    endpoints:\n      - addr: 127.0.0.1:{port}\n      - addr: pay:{port}\n");
    let app = start_app(&config(&dns, &top, &service)).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2"]).await;
    let seen = spread(&front(&app).await, 4).await;
    assert_eq!((seen.get("a"), seen.get("b")), (Some(&2), Some(&2)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_outside_allowed_networks_are_refused_and_counted() {
    let (port, _backends) = same_port(&["a", "b", "c"]).await;
    let dns = Dnsmasq::start(&hosts(&[1, 2, 3], "pay.test"), 1, &[]).await;
    let top = "allowed_networks: [127.0.0.1/32, 127.0.0.2]\n";
    let app =
        start_app(&config(&dns, top, &format!("    endpoints:\n      - addr: pay.test:{port}\n"))).await;
    until_endpoints(&app, &["127.0.0.1", "127.0.0.2"]).await;
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", app.admin_addr())).await;
    assert!(metrics.contains("outrider_dns_refused_endpoints_total{service=\"pay\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_srv_answer_with_a_target_that_fails_to_resolve_is_not_taken_as_the_whole_set() {
    let (port, _backends) = same_port(&["a"]).await;
    // b.elsewhere is outside dnsmasq's local domain and it has no upstream: REFUSED, a
    // failure — unlike a name it knows not to exist.
    let srv = |target: &str| format!("--srv-host=_http._tcp.pay.test,{target},{port},0,1");
    let dns = Dnsmasq::start("127.0.0.1 a.test\n", 1, &[srv("a.test"), srv("b.elsewhere")]).await;
    let app =
        start_app(&config(&dns, "", "    discovery: dns\n    dns:\n      srv: _http._tcp.pay.test\n")).await;
    within(async {
        while admin_json(&app, "/upstreams").await["services"]["pay"]["watch"]["failures"].as_u64() < Some(2)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(endpoints(&app).await.is_empty(), "a.test alone is not the set: b.elsewhere may have addresses");
    let watch = &admin_json(&app, "/upstreams").await["services"]["pay"]["watch"];
    assert!(watch["last_error"].as_str().is_some_and(|e| e.contains("_http._tcp.pay.test")), "{watch}");
    assert!(app.readiness().is_err(), "no complete answer yet");
}
