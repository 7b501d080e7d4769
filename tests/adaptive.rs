//! Adaptive load balancing against real backends on loopback: peak-EWMA moves traffic off a
//! slow backend and off one that fails fast.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;

/// Peak-EWMA, with retries, ejection and the breaker out of the way.
const PEAK_EWMA: &str = "    load_balancing: peak_ewma\n    retries: { max_attempts: 1 }\n\
                         \x20   outlier_detection: { consecutive_failures: 0 }\n    circuit_breaker: { failure_ratio: 0 }\n";

/// 600 requests under peak_ewma to two healthy backends and `odd` (whose body is `name`):
/// the share `odd` got, and every backend's count.
async fn peak_ewma_share(odd: &Backend, name: &str) -> (f64, std::collections::HashMap<String, usize>) {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let app = start_app(&one_service("http", PEAK_EWMA, &[(a.addr, 1), (b.addr, 1), (odd.addr, 1)])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let seen = spread(&url, 600, &[]).await;
    (seen.get(name).copied().unwrap_or(0) as f64 / 600.0, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_moves_traffic_off_a_slow_backend() {
    let slow = Backend::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text(200, "slow")
    })
    .await;
    let (share, seen) = peak_ewma_share(&slow, "slow").await;
    println!("peak_ewma: the +50 ms backend got {:.1}% of 600 requests (round-robin: 33%)", share * 100.0);
    // Measured 0.8 %; the bound leaves room for a loaded CI machine, whose hiccups on the
    // fast backends decay over seconds.
    assert!(share < 0.20, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_does_not_reward_a_backend_that_fails_fast() {
    let failing = Backend::start(|_req| async { text(503, "failing") }).await;
    let (share, seen) = peak_ewma_share(&failing, "failing").await;
    println!("peak_ewma: the backend answering 503 at once got {:.1}% of 600 requests", share * 100.0);
    assert!(share < 0.10, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_endpoints_share() {
    let (a, b, c) = (Backend::named("a").await, Backend::named("b").await, Backend::named("new").await);
    let extra = "    slow_start: { window: 6s, floor_percent: 10 }\n";
    let app = start_app(&one_service("http", extra, &[(a.addr, 1), (b.addr, 1)])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let seen = spread(&url, 100, &[]).await;
    assert_eq!(seen.len(), 2, "the first set is not new: no ramp, {seen:?}");

    let next = one_service("http", extra, &[(a.addr, 1), (b.addr, 1), (c.addr, 1)]);
    assert!(app.reload(outrider::config::Config::parse(&next).unwrap()).await.unwrap());
    let early = spread(&url, 100, &[]).await;
    let early = early.get("new").copied().unwrap_or(0) as f64 / 100.0;
    // The ramp's own clock: wait out the window, then the share is full.
    tokio::time::sleep(Duration::from_millis(6200)).await;
    let late = spread(&url, 300, &[]).await;
    let late = late.get("new").copied().unwrap_or(0) as f64 / 300.0;
    println!(
        "slow start: new endpoint's share {:.1}% just after it appeared, {:.1}% after the window",
        early * 100.0,
        late * 100.0
    );
    assert!(early < 0.15, "starts near the 10 % floor (10/210 ≈ 5 %): {early}");
    assert!((0.30..=0.37).contains(&late), "full share after the window: {late}");
}

/// Answers 200 with its name and an ORCA load report.
async fn reporting(name: &'static str, report: &'static str) -> Backend {
    Backend::start(move |_req| async move {
        let mut resp = text(200, name);
        resp.headers_mut().insert("endpoint-load-metrics", http::HeaderValue::from_static(report));
        resp
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_weighted_sends_less_to_the_backend_reporting_high_utilization() {
    let busy = reporting("busy", "TEXT cpu_utilization=0.9, rps_fractional=100").await;
    let idle = reporting("idle", "TEXT cpu_utilization=0.1, rps_fractional=100").await;
    let extra =
        "    load_balancing: client_weighted\n    client_weighted: { blackout: 0s, update_period: 100ms }\n";
    let app = start_app(&one_service("http", extra, &[(busy.addr, 1), (idle.addr, 1)])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    spread(&url, 20, &[]).await; // both report once
    let admin = format!("http://{}/upstreams", app.admin_addr());
    within(async {
        loop {
            let (_, _, body) = get(&client(), &admin).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let learned = v["services"]["svc"]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["learned_weight"].is_number())
                .count();
            if learned == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The learned weights apply at the next update period: until then picks stay 1:1.
    within(async { while spread(&url, 30, &[]).await.get("busy").copied().unwrap_or(0) > 6 {} }).await;
    let seen = spread(&url, 1000, &[]).await;
    let busy_share = seen.get("busy").copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "client_weighted: cpu 0.9 vs 0.1 at equal qps -> busy share {:.1}% (formula: 10%)",
        busy_share * 100.0
    );
    assert!((0.05..=0.15).contains(&busy_share), "{seen:?}");
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", app.admin_addr())).await;
    assert!(metrics.contains("outrider_endpoint_learned_weight{"), "learned weights are exported");
}

/// A gRPC-style backend over h2c: its name as data, then the load report in trailers.
async fn reporting_in_trailers(name: &'static str, report: &'static str) -> Backend {
    Backend::start(move |_req| async move {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        trailers.insert("endpoint-load-metrics", http::HeaderValue::from_static(report));
        let frames = vec![
            Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from_static(name.as_bytes()))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut resp = http::Response::new(http_body_util::StreamBody::new(stream_of(frames)).boxed());
        resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        resp
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_weighted_reads_reports_from_grpc_trailers() {
    let busy = reporting_in_trailers("busy", "TEXT application_utilization=0.8, rps_fractional=50").await;
    let idle = reporting_in_trailers("idle", "TEXT application_utilization=0.2, rps_fractional=50").await;
    let extra = "    protocol: http2\n    load_balancing: client_weighted\n    client_weighted: { blackout: 0s, update_period: 100ms }\n";
    let app = start_app(&one_service("http", extra, &[(busy.addr, 1), (idle.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let h2 = h2c_client();
    let call = || async {
        let resp =
            within(h2.request(Request::post(format!("http://{front}/shop.Cart/Add")).body(empty()).unwrap()))
                .await
                .unwrap();
        resp.into_body().collect().await.unwrap(); // to the trailers
    };
    for _ in 0..4 {
        call().await;
    }
    let balancer = app.balancer("svc").unwrap();
    within(async {
        while balancer
            .describe_learning(app.config().services["svc"].client_weighted.as_ref())
            .iter()
            .any(|e| e.learned_weight.is_none())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let learned: Vec<f64> = balancer
        .describe_learning(app.config().services["svc"].client_weighted.as_ref())
        .iter()
        .map(|e| e.learned_weight.unwrap())
        .collect();
    assert_eq!(learned, vec![50.0 / 0.8, 50.0 / 0.2], "weights from the trailers' reports");
}
