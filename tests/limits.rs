//! What a hostile or broken client can and cannot do: malformed and aborted bodies are the
//! client's fault, slow and idle connections are closed, connections are capped, heads are
//! bounded (431), unknown transfer codings are refused (501) and double framing never
//! forwarded (400) — on proxy listeners and the admin port alike.

mod support;

use std::time::{Duration, Instant};

use http::Request;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes on a new connection and reads until the server closes it.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    let _ = within(conn.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

fn metric(app: &outrider::app::App, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = app.metrics_text();
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.starts_with(name) && wanted.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const STRICT_BREAKER: &str = "    retries: { max_attempts: 3 }\n\
    \x20   outlier_detection: { consecutive_failures: 3 }\n\
    \x20   circuit_breaker: { failure_ratio: 0.5, min_requests: 5 }\n";

/// An app that goes away mid-upload is answered (to nobody) `client_aborted`; the access log
/// is where that answer can be seen, beside a malformed body's `bad_request_body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_app_abandons_is_logged_as_client_aborted() {
    let echo = Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let body = http_body_util::BodyExt::collect(req.into_body()).await;
        if body.is_ok() { text(200, "ok") } else { text(500, "body broke") }
    })
    .await;
    let front = free_addr();
    let yaml = one_service("http", "", &[(echo.addr, 1)])
        .replace(
            "  bind: 127.0.0.1:0\nshutdown",
            "  bind: 127.0.0.1:0\naccess_log:\n  enabled: true\nshutdown",
        )
        .replace("    bind: 127.0.0.1:0\n", &format!("    bind: {front}\n"));
    let mut outrider = Binary::spawn(&yaml);
    outrider.logged("outrider started").await;
    let mut conn = TcpStream::connect(front).await.unwrap();
    conn.write_all(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2147483648\r\n\r\npartial")
        .await
        .unwrap();
    drop(conn);
    let line = within(outrider.out.recv()).await.expect("an access log line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("access log line is JSON");
    assert_eq!(
        (json["status"].as_u64(), json["reason"].as_str()),
        (Some(400), Some("client_aborted")),
        "{line}"
    );
    assert_eq!(json["path"], "/big");

    let reply = raw(
        front,
        b"POST /pay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n",
    )
    .await;
    assert!(reply.contains("x-outrider-error: bad_request_body"), "{reply}");
    let line = within(outrider.out.recv()).await.expect("an access log line");
    assert!(line.contains("\"reason\":\"bad_request_body\""), "{line}");
}

#[tokio::test]
async fn malformed_and_aborted_bodies_are_the_clients_fault() {
    let echo = Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let body = http_body_util::BodyExt::collect(req.into_body()).await;
        if body.is_ok() { text(200, "ok") } else { text(500, "body broke") }
    })
    .await;
    let app = start_app(&one_service("http", STRICT_BREAKER, &[(echo.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    // 25 of each: enough to open the breaker and eject the endpoint if they counted.
    for _ in 0..25 {
        let reply = raw(
            front,
            b"POST /pay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(reply.contains("x-outrider-error: bad_request_body"), "{reply}");
        // The app announces 2 GiB, sends a little, and goes away.
        let mut conn = TcpStream::connect(front).await.unwrap();
        conn.write_all(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2147483648\r\n\r\npartial")
            .await
            .unwrap();
        drop(conn);
    }
    let client = client();
    let url = format!("http://{front}/");
    within(async {
        // The aborted uploads finish on their own tasks: wait until each was answered.
        while metric(&app, "outrider_requests_total", &[("status_class", "4xx")]) < 50.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (status, headers, _) = get(&client, &url).await;
    assert_eq!(status, 200, "healthy requests still pass: {headers:?}");
    assert_eq!(app.balancer("svc").unwrap().describe()[0].state, "active", "the endpoint was not ejected");
    let breaker = metric(&app, "outrider_circuit_breaker_state", &[("service", "svc")]);
    assert_eq!(breaker, 0.0, "the breaker stayed closed");
    assert_eq!(echo.hits(), 1 + 50, "never retried: one attempt per request");
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_and_counted() {
    let a = Backend::named("a").await;
    let limits = "    limits: { header_read_timeout: 300ms }\n";
    let yaml = one_service("http", "", &[(a.addr, 1)])
        .replace("    service: svc\n", &format!("    service: svc\n{limits}"));
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    // Slowloris: a head at one byte every 100 ms never completes within 300 ms.
    let started = Instant::now();
    let mut conn = TcpStream::connect(front).await.unwrap();
    let mut closed = false;
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().cycle().take(100) {
        if conn.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(100), conn.read(&mut probe)).await {
            closed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(closed, "the trickling connection was never closed");
    assert!(took < Duration::from_secs(2), "closed after {took:?}, limit 300 ms");
    assert_eq!(
        metric(
            &app,
            "outrider_inbound_refused_total",
            &[("listener", "front"), ("reason", "header_timeout")]
        ),
        1.0
    );
    // A connection that sends nothing at all is timed from accept too.
    let mut silent = TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(within(silent.read(&mut buf)).await.unwrap_or(0), 0);
    // Well-behaved clients are unaffected: keep-alive requests spaced by more than 300 ms.
    let client = client();
    for _ in 0..2 {
        assert_eq!(get(&client, &format!("http://{front}/")).await.0, 200);
        tokio::time::sleep(Duration::from_millis(400)).await; // idle keep-alive, no head pending
    }
}

#[tokio::test]
async fn idle_connections_are_closed_and_connections_are_capped() {
    let a = Backend::named("a").await;
    let limits = "    limits: { idle_timeout: 1s, max_connections: 3 }\n";
    let yaml = one_service("http", "", &[(a.addr, 1)])
        .replace("    service: svc\n", &format!("    service: svc\n{limits}"));
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = within(c.read(&mut buf)).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    // A fourth connection is closed at once, without a byte.
    let mut fourth = TcpStream::connect(front).await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(within(fourth.read(&mut buf)).await.unwrap_or(0), 0);
    assert_eq!(
        metric(
            &app,
            "outrider_inbound_refused_total",
            &[("listener", "front"), ("reason", "max_connections")]
        ),
        1.0
    );
    // The idle ones close after the idle timeout, which frees their places.
    let started = Instant::now();
    for c in &mut held {
        let mut rest = Vec::new();
        let _ = within(c.read_to_end(&mut rest)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "idle close after {took:?}");
    assert_eq!(
        metric(&app, "outrider_inbound_refused_total", &[("listener", "front"), ("reason", "idle_timeout")]),
        3.0
    );
    assert_eq!(get(&client(), &format!("http://{front}/")).await.0, 200, "places freed");
}

#[tokio::test]
async fn request_heads_are_bounded_on_http1_and_http2() {
    let a = Backend::named("a").await;
    let limits = "    limits: { max_header_bytes: 4096, max_headers: 20 }\n";
    let yaml = one_service("http", "", &[(a.addr, 1)])
        .replace("    service: svc\n", &format!("    service: svc\n{limits}"));
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let big = "x".repeat(5000);
    let reply = raw(front, format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let many: String = (0..30).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let reply = raw(front, format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // HTTP/2: the same limits, answered by Outrider with its reason.
    let h2 = h2c_client();
    let req = Request::get(format!("http://{front}/")).header("x-big", big.as_str()).body(empty()).unwrap();
    let resp = within(h2.request(req)).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(resp.headers()["x-outrider-error"], "headers_too_large");
    let mut req = Request::get(format!("http://{front}/"));
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "1");
    }
    let resp = within(h2.request(req.body(empty()).unwrap())).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(a.hits(), 0, "nothing oversized reached the upstream");
    assert_eq!(
        metric(
            &app,
            "outrider_inbound_refused_total",
            &[("listener", "front"), ("reason", "headers_too_large")]
        ),
        4.0
    );
    let (status, _, _) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unknown_transfer_codings_get_501_and_double_framing_is_never_forwarded() {
    // The backend reports the framing it received: Content-Length (if any) and body length.
    let a = Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let cl = req.headers().get("content-length").map(|v| v.to_str().unwrap().to_string());
        let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
        let reply = format!("cl={} len={}", cl.as_deref().unwrap_or("none"), body.len());
        http::Response::new(full(bytes::Bytes::from(reply)))
    })
    .await;
    let app = start_app(&one_service("http", "", &[(a.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let reply = raw(
        front,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert!(reply.contains("unsupported_transfer_coding"), "{reply}");
    assert_eq!(a.hits(), 0, "not forwarded");
    // Both framings: the body is read as chunked (Transfer-Encoding wins) and the upstream
    // gets one framing only — never the stale Content-Length (RFC 9112 §6.3).
    let reply = raw(
        front,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("cl=none len=5") || reply.ends_with("cl=5 len=5"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "such a connection is not reused: {reply}"
    );
    let refused = metric(
        &app,
        "outrider_inbound_refused_total",
        &[("listener", "front"), ("reason", "unsupported_transfer_coding")],
    );
    assert_eq!(refused, 1.0);
}

#[tokio::test]
async fn the_admin_port_has_limits_too() {
    let a = Backend::named("a").await;
    let yaml = one_service("http", "", &[(a.addr, 1)]).replace(
        "admin:\n  bind: 127.0.0.1:0\n",
        "admin:\n  bind: 127.0.0.1:0\n  limits: { header_read_timeout: 300ms, max_connections: 2 }\n",
    );
    let app = start_app(&yaml).await;
    let admin = app.admin_addr();
    let started = Instant::now();
    let mut silent = TcpStream::connect(admin).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(within(silent.read(&mut buf)).await.unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(2));
    let refused =
        |reason| metric(&app, "outrider_inbound_refused_total", &[("listener", "admin"), ("reason", reason)]);
    assert_eq!(refused("header_timeout"), 1.0);
    let _held = (TcpStream::connect(admin).await.unwrap(), TcpStream::connect(admin).await.unwrap());
    let mut third = TcpStream::connect(admin).await.unwrap();
    assert_eq!(within(third.read(&mut buf)).await.unwrap_or(0), 0, "over max_connections: closed");
    assert_eq!(refused("max_connections"), 1.0);
}
