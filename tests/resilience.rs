//! Retries, budgets, ejection, breaking, health checks and rate limits against real
//! misbehaving backends on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;

fn yaml(extra: &str, endpoints: &[SocketAddr]) -> String {
    let weighted: Vec<_> = endpoints.iter().map(|a| (*a, 1)).collect();
    one_service("http", extra, &weighted)
}

/// Reads one HTTP/1.1 request (headers and Content-Length body), counts it, then closes the
/// connection without answering: the request reached the upstream and then "reset".
async fn resetting_backend(seen: Arc<AtomicUsize>) -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).await.is_ok() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                drop(reader); // close without answering
            });
        }
    });
    addr
}

fn reason(headers: &http::HeaderMap) -> &str {
    headers.get("x-outrider-error").map_or("", |v| v.to_str().unwrap())
}

const NO_EJECTION: &str =
    "    outlier_detection: { consecutive_failures: 0 }\n    circuit_breaker: { failure_ratio: 0 }\n";

#[tokio::test]
async fn a_retry_moves_to_a_healthy_endpoint() {
    let (bad, _) = status_backend(503, "bad").await;
    let (good, _) = status_backend(200, "good").await;
    let app = start_app(&yaml(NO_EJECTION, &[bad.addr, good.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    for _ in 0..20 {
        let (status, headers, body) = get(&client, &url).await;
        assert_eq!((status, body.as_str()), (200, "good"));
        let attempts: u32 = headers["x-outrider-attempts"].to_str().unwrap().parse().unwrap();
        assert!(attempts <= 2);
    }
    assert!(bad.hits() >= 5, "round-robin sent some first attempts to the bad endpoint");
}

#[tokio::test]
async fn the_budget_caps_retries_when_everything_fails() {
    let (a, _) = status_backend(503, "a").await;
    let (b, _) = status_backend(503, "b").await;
    let extra = format!(
        "{NO_EJECTION}    retries:\n      max_attempts: 5\n      backoff_base: 1ms\n      backoff_max: 1ms\n      budget: {{ ratio: 0.2, min_per_second: 0 }}\n"
    );
    let app = start_app(&yaml(&extra, &[a.addr, b.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    for _ in 0..100 {
        assert_eq!(get(&client, &url).await.0, 503);
    }
    let seen = a.hits() + b.hits();
    assert!((100..=120).contains(&seen), "upstreams saw {seen}: 100 requests + at most 20% retries");
}

async fn post(url: &str, body: Bytes, key: Option<&str>) -> (u16, http::HeaderMap) {
    let mut req = Request::post(url);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let resp = within(client().request(req.body(full(body)).unwrap())).await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test]
async fn a_post_that_reached_the_upstream_is_never_replayed_without_a_key() {
    let seen = Arc::new(AtomicUsize::new(0));
    let (one, two) = (resetting_backend(seen.clone()).await, resetting_backend(seen.clone()).await);
    let extra = format!("{NO_EJECTION}    retries:\n      max_attempts: 3\n      buffer_bytes: 2097152\n");
    let app = start_app(&yaml(&extra, &[one, two])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let mib = Bytes::from(vec![7u8; 1 << 20]);

    let (status, headers) = post(&url, mib.clone(), None).await;
    assert_eq!((status, reason(&headers)), (502, "upstream_reset"));
    assert_eq!(seen.swap(0, Ordering::SeqCst), 1, "a POST without Idempotency-Key was replayed");

    let (status, headers) = post(&url, mib, Some("order-42")).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-attempts"], "3");
    assert_eq!(seen.swap(0, Ordering::SeqCst), 3, "a keyed POST is retried");

    let (status, _, _) = get(&client(), &url).await;
    assert_eq!(status, 502);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "a GET is retried");
}

#[tokio::test]
async fn a_body_over_the_replay_buffer_streams_once_and_is_not_retried() {
    let seen = Arc::new(AtomicUsize::new(0));
    let (one, two) = (resetting_backend(seen.clone()).await, resetting_backend(seen.clone()).await);
    let extra = format!("{NO_EJECTION}    retries:\n      max_attempts: 3\n      buffer_bytes: 1024\n");
    let app = start_app(&yaml(&extra, &[one, two])).await;
    let url = format!("http://{}/put", app.listener_addr("front").await.unwrap());
    let req = Request::put(&url).body(full(Bytes::from(vec![1u8; 64 * 1024]))).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_post_is_retried_when_it_never_left() {
    let (good, _) = status_backend(200, "good").await;
    let extra = format!("{NO_EJECTION}    load_balancing: weighted_round_robin\n");
    // The dead endpoint comes first: the first attempt always fails to connect.
    let app = start_app(&yaml(&extra, &[refused_addr(), good.addr])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let (status, headers) = post(&url, Bytes::from_static(b"{}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-outrider-attempts"], "2");
    assert_eq!(good.hits(), 1);
}

fn endpoint_state(app: &outrider::app::App, addr: SocketAddr) -> &'static str {
    let views = app.balancer("svc").unwrap().describe();
    views.iter().find(|e| e.addr == addr).map(|e| e.state).unwrap()
}

async fn until_state(app: &outrider::app::App, addr: SocketAddr, state: &str) {
    within(async {
        while endpoint_state(app, addr) != state {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn ejection_after_n_failures_and_return_through_a_probe() {
    let (flaky, status) = status_backend(500, "flaky").await;
    let (good, _) = status_backend(200, "good").await;
    let extra = "    retries: { max_attempts: 1 }\n    circuit_breaker: { failure_ratio: 0 }\n\
                 \x20   outlier_detection: { consecutive_failures: 3, base_ejection: 1s, max_ejection_percent: 50 }\n";
    let app = start_app(&yaml(extra, &[flaky.addr, good.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    while endpoint_state(&app, flaky.addr) != "ejected" {
        get(&client, &url).await;
    }
    assert_eq!(flaky.hits(), 3, "ejected after exactly 3 consecutive failures");
    for _ in 0..20 {
        assert_eq!(get(&client, &url).await.2, "good");
    }
    status.store(200, Ordering::SeqCst);
    until_state(&app, flaky.addr, "probing").await; // after base_ejection (1 s)
    while flaky.hits() == 3 {
        get(&client, &url).await;
    }
    assert_eq!(endpoint_state(&app, flaky.addr), "active", "a successful probe returns it");
}

#[tokio::test]
async fn least_request_does_not_black_hole_into_a_fast_failing_endpoint() {
    let broken = Backend::start(|_req| async { text(500, "broken") }).await;
    let slow = |name| {
        Backend::start(move |_req| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            text(200, name)
        })
    };
    let (b, c) = (slow("b").await, slow("c").await);
    let extra = "    load_balancing: least_request\n    retries: { max_attempts: 1 }\n    circuit_breaker: { failure_ratio: 0 }\n";
    let app = start_app(&yaml(extra, &[broken.addr, b.addr, c.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..30 {
                get(&client, &url).await;
            }
        }));
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    let share = broken.hits();
    assert!(share <= 30, "the failing endpoint got {share} of 300 requests");
}

#[tokio::test]
async fn the_breaker_fails_fast_and_the_concurrency_limit_refuses_without_hanging() {
    let (bad, _) = status_backend(500, "bad").await;
    let extra = "    retries: { max_attempts: 1 }\n    outlier_detection: { consecutive_failures: 0 }\n\
                 \x20   circuit_breaker: { failure_ratio: 0.5, min_requests: 4, open_for: 60s }\n";
    let app = start_app(&yaml(extra, &[bad.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    for _ in 0..4 {
        assert_eq!(get(&client, &url).await.0, 500);
    }
    let (status, headers, _) = get(&client, &url).await;
    assert_eq!((status, reason(&headers)), (503, "circuit_open"));
    assert_eq!(bad.hits(), 4, "an open breaker does not call the upstream");

    let Held { backend: slow, gate, mut arrived } = Held::start("slow", None).await;
    let app = start_app(&yaml("    circuit_breaker: { max_in_flight: 2 }\n", &[slow.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let parked: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await.0 })
        })
        .collect();
    for _ in 0..2 {
        within(arrived.recv()).await;
    }
    let (status, headers, _) = get(&client, &url).await;
    assert_eq!((status, reason(&headers)), (503, "overloaded"));
    gate.add_permits(2);
    for p in parked {
        assert_eq!(within(p).await.unwrap(), 200);
    }
}

const FAST_CHECKS: &str =
    "interval: 50ms, jitter: 0s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2";

#[tokio::test]
async fn http_health_checks_mark_down_and_up() {
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let a = Backend::start(move |req: Request<hyper::body::Incoming>| {
        let ok = h.load(Ordering::SeqCst) || req.uri().path() != "/healthz";
        async move { if ok { text(200, "a") } else { text(503, "down") } }
    })
    .await;
    let b = Backend::named("b").await;
    let extra = format!(
        "    health_check: {{ kind: http, path: /healthz, statuses: [\"200-299\"], {FAST_CHECKS} }}\n"
    );
    let app = start_app(&yaml(&extra, &[a.addr, b.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    healthy.store(false, Ordering::SeqCst);
    until_state(&app, a.addr, "unhealthy").await;
    for _ in 0..10 {
        assert_eq!(get(&client(), &url).await.2, "b", "an unhealthy endpoint got traffic");
    }
    healthy.store(true, Ordering::SeqCst);
    until_state(&app, a.addr, "active").await;
}

#[tokio::test]
async fn tcp_health_checks_mark_a_dead_endpoint_down() {
    let b = Backend::named("b").await;
    let dead = refused_addr();
    let extra = format!("    health_check: {{ kind: tcp, {FAST_CHECKS} }}\n");
    let app = start_app(&yaml(&extra, &[dead, b.addr])).await;
    until_state(&app, dead, "unhealthy").await;
    assert_eq!(endpoint_state(&app, b.addr), "active");
}

/// A gRPC health v1 server: SERVING or NOT_SERVING as `serving` says, for the service name
/// `expected` only (anything else is SERVICE_UNKNOWN).
async fn grpc_health_backend(serving: Arc<AtomicBool>, expected: String) -> Backend {
    Backend::start(move |req: Request<hyper::body::Incoming>| {
        let serving = serving.load(Ordering::SeqCst);
        let expected = expected.clone();
        async move {
            assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
            assert_eq!(req.version(), http::Version::HTTP_2);
            let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
            let mut msg = &body[5..];
            let name = if msg.is_empty() {
                String::new()
            } else {
                assert_eq!(msg[0], 0x0a, "field 1, length-delimited");
                msg = &msg[1..];
                let len = prost::encoding::decode_varint(&mut msg).unwrap() as usize;
                String::from_utf8(msg[..len].to_vec()).unwrap()
            };
            let status = match (name == expected, serving) {
                (false, _) => 3u8,
                (true, true) => 1,
                (true, false) => 2,
            };
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(stream_of(frames));
            let mut resp = http::Response::new(http_body_util::BodyExt::boxed(body));
            resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
            resp
        }
    })
    .await
}

#[tokio::test]
async fn grpc_health_checks_follow_serving_status() {
    let serving = Arc::new(AtomicBool::new(true));
    // Longer than 127 bytes: its length takes two varint bytes (a hand-made encoding cut it).
    let name = format!("payments.v1.{}", "Ledger".repeat(30));
    let a = grpc_health_backend(serving.clone(), name.clone()).await;
    let b = Backend::named("b").await;
    let extra =
        format!("    protocol: http2\n    health_check: {{ kind: grpc, service: {name}, {FAST_CHECKS} }}\n");
    let app = start_app(&yaml(&extra, &[a.addr, b.addr])).await;
    // Three passed checks: only `a` can pass (b speaks no gRPC), and only with the whole name.
    let metrics = app.service_metrics("svc").unwrap();
    within(async {
        while metrics.health_checks_ok.load(Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(endpoint_state(&app, a.addr), "active", "the whole service name must reach the server");
    serving.store(false, Ordering::SeqCst);
    until_state(&app, a.addr, "unhealthy").await;
    serving.store(true, Ordering::SeqCst);
    until_state(&app, a.addr, "active").await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_keys_are_independent() {
    let a = Backend::named("a").await;
    let extra = "    rate_limit: { per_second: 1, burst: 3, key_header: x-tenant }\n";
    let app = start_app(&yaml(extra, &[a.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let send = |tenant: &'static str| {
        let url = url.clone();
        async move {
            let req = Request::get(&url).header("x-tenant", tenant).body(empty()).unwrap();
            within(client().request(req)).await.unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(send("acme").await.status(), 200);
    }
    let limited = send("acme").await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["x-outrider-error"], "rate_limited");
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(send("globex").await.status(), 200, "another tenant has its own quota");
    assert_eq!(a.hits(), 4);
}

#[tokio::test]
async fn sustained_over_rate_traffic_is_held_to_the_rate() {
    let a = Backend::named("a").await;
    let extra = "    rate_limit: { per_second: 50, burst: 1 }\n";
    let app = start_app(&yaml(extra, &[a.addr])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    let started = tokio::time::Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(1) {
        match get(&client, &url).await.0 {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 1.0 + 50.0 * elapsed;
    assert!(limited > 0);
    assert!(
        (ok as f64 - expected).abs() <= expected * 0.2,
        "{ok} allowed in {elapsed:.2}s, expected ~{expected:.0}"
    );
}

#[tokio::test]
async fn tcp_rate_limit_closes_connections_over_the_quota() {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = socket.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = socket.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _keep = s;
                std::future::pending::<()>().await;
            });
        }
    });
    let app =
        start_app(&one_service("tcp", "    rate_limit: { per_second: 1, burst: 1 }\n", &[(upstream, 1)]))
            .await;
    let front = app.listener_addr("front").await.unwrap();
    let _first = tokio::net::TcpStream::connect(front).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(within(second.read(&mut buf)).await.unwrap_or(0), 0, "over-quota connection closed");
    within(async {
        while accepted.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
