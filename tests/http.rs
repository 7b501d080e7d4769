//! L7 proxying through an in-process Outrider against real backends on loopback.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn weighted_round_robin_5_1_1_is_exact_and_interleaved() {
    let (a, b, c) = (Backend::named("a").await, Backend::named("b").await, Backend::named("c").await);
    let app = start_app(&one_service("http", "", &[(a.addr, 5), (b.addr, 1), (c.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let client = client();
    let mut order = Vec::new();
    for _ in 0..700 {
        let (status, _, body) = get(&client, &format!("http://{front}/")).await;
        assert_eq!(status, 200);
        order.push(body);
    }
    let mut counts = HashMap::new();
    for name in &order {
        *counts.entry(name.as_str()).or_insert(0) += 1;
    }
    assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 100, 100));
    let longest_a_run = order[..7]
        .iter()
        .fold((0, 0), |(best, run), n| if n == "a" { (best.max(run + 1), run + 1) } else { (best, 0) })
        .0;
    assert!(longest_a_run <= 2, "first 7 picks {:?} have a run of {longest_a_run}", &order[..7]);
}

#[tokio::test]
async fn least_request_sends_new_requests_away_from_a_busy_endpoint() {
    let Held { backend: slow, gate, mut arrived } = Held::start("slow", None).await;
    let (fast1, fast2) = (Backend::named("fast1").await, Backend::named("fast2").await);
    let extra = "    load_balancing: least_request\n";
    let app =
        start_app(&one_service("http", extra, &[(slow.addr, 1), (fast1.addr, 1), (fast2.addr, 1)])).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    // Send requests one at a time until one is parked on the slow endpoint.
    let mut parked = Vec::new();
    while parked.is_empty() {
        let (c, u) = (client.clone(), url.clone());
        let mut task = tokio::spawn(async move { get(&c, &u).await });
        tokio::select! {
            done = &mut task => assert_ne!(done.unwrap().2, "slow"),
            _ = arrived.recv() => parked.push(task),
        }
    }
    for _ in 0..60 {
        let (status, _, body) = get(&client, &url).await;

        assert_eq!(status, 200);
        assert_ne!(body, "slow", "a request went to the endpoint holding requests open");
    }
    assert_eq!(slow.hits(), 1);
    gate.add_permits(1);
    for p in parked {
        let (status, _, body) = within(p).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "slow"));
    }
}

/// Echoes the request body back, streaming.
async fn echo_backend() -> Backend {
    Backend::start(|req: Request<hyper::body::Incoming>| async move {
        Response::new(req.into_body().map_err(Into::into).boxed())
    })
    .await
}

async fn stream_64mib(
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>,
    front: std::net::SocketAddr,
) {
    const TOTAL: usize = 64 * 1024 * 1024;
    let body = Pattern { remaining: TOTAL, offset: 0 }.boxed();
    let req = Request::post(format!("http://{front}/upload")).body(body).unwrap();
    let resp = within(client.request(req)).await.expect("response");
    assert_eq!(resp.status(), 200);
    let (digest, _) = hash_body(resp.into_body()).await;
    assert_eq!(digest, Pattern::digest(TOTAL), "echoed body differs");
}

#[tokio::test]
async fn http1_streams_64_mib_both_ways() {
    let echo = echo_backend().await;
    let app = start_app(&one_service("http", "", &[(echo.addr, 1)])).await;
    stream_64mib(client(), app.listener_addr("front").await.unwrap()).await;
}

#[tokio::test]
async fn h2c_streams_64_mib_both_ways_to_an_http2_upstream() {
    let echo = echo_backend().await;
    let app = start_app(&one_service("http", "    protocol: http2\n", &[(echo.addr, 1)])).await;
    stream_64mib(h2c_client(), app.listener_addr("front").await.unwrap()).await;
}

/// Answers like a gRPC server: a data frame, then `grpc-status` in trailers.
async fn trailers_backend() -> Backend {
    Backend::start(|req: Request<hyper::body::Incoming>| async move {
        assert_eq!(req.headers().get("te").map(|v| v.to_str().unwrap()), Some("trailers"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(StreamBody::new(stream_of(frames)).boxed());
        resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
        // HTTP/1.1 sends only the trailer fields a response announces.
        resp.headers_mut().insert("trailer", "grpc-status, grpc-message".parse().unwrap());
        resp
    })
    .await
}

#[tokio::test]
async fn grpc_style_trailers_pass_through_h2c_and_http2_upstream() {
    let backend = trailers_backend().await;
    let app = start_app(&one_service("http", "    protocol: http2\n", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let req = Request::post(format!("http://{front}/pkg.Svc/Call"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(full(Bytes::from_static(b"\0\0\0\0\x00")))
        .unwrap();
    let resp = within(h2c_client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (_, trailers) = hash_body(resp.into_body()).await;
    let trailers = trailers.expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
}

#[tokio::test]
async fn trailers_pass_through_http1_with_te_trailers() {
    let backend = trailers_backend().await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let req = Request::post(format!("http://{front}/x")).header("te", "trailers").body(empty()).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    let (_, trailers) = hash_body(resp.into_body()).await;
    assert_eq!(trailers.expect("trailers arrive over HTTP/1.1 chunked")["grpc-status"], "0");
}

/// A minimal WebSocket server: checks the handshake, then echoes one text frame unmasked.
async fn websocket_backend() -> Backend {
    Backend::start(|mut req: Request<hyper::body::Incoming>| async move {
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = hyper_util::rt::TokioIo::new(upgrade.await.expect("upgrade"));
            let mut head = [0u8; 6];
            io.read_exact(&mut head).await.unwrap();
            let len = (head[1] & 0x7f) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= head[2 + i % 4];
            }
            let mut frame = vec![0x81, len as u8];
            frame.extend_from_slice(&payload);
            io.write_all(&frame).await.unwrap();
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(empty())
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn websocket_upgrade_echoes_end_to_end() {
    let backend = websocket_backend().await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut conn = within(TcpStream::connect(front)).await.unwrap();
    let handshake = "GET /chat HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    conn.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within(conn.read_u8()).await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 5];
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    conn.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 7];
    within(conn.read_exact(&mut reply)).await.unwrap();
    assert_eq!(&reply, b"\x81\x05hello");
}

#[tokio::test]
async fn no_endpoints_is_503_with_reason() {
    let app = start_app(&one_service("http", "", &[])).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, headers, body) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-outrider-error"], "no_endpoints");
    assert!(body.contains("svc has no endpoints"), "{body}");
}

#[tokio::test]
async fn connect_failure_is_502_with_reason() {
    let dead = refused_addr();
    let app = start_app(&one_service("http", "", &[(dead, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, headers, body) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-error"], "connect_failed");
    assert!(body.contains(&dead.to_string()), "body names the endpoint: {body}");
}

#[tokio::test]
async fn slow_upstream_is_504_with_reason() {
    let stuck = Backend::start(|_req| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        text(200, "too late")
    })
    .await;
    let extra = "    timeouts:\n      request: 200ms\n";
    let app = start_app(&one_service("http", extra, &[(stuck.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, headers, _) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!(status, 504);
    assert_eq!(headers["x-outrider-error"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_reset_before_response_is_502_with_reason() {
    // Accepts, reads the request, then closes without answering.
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let app = start_app(&one_service("http", "", &[(addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, headers, _) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-error"], "upstream_reset");
}

#[tokio::test]
async fn malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let backend = Backend::named("ok").await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut conn = TcpStream::connect(front).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    within(conn.read_to_end(&mut reply)).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(backend.hits(), 0);
    let (status, _, body) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let backend = Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let leaked: Vec<_> = ["keep-alive", "x-conn-scoped", "proxy-connection"]
            .into_iter()
            .filter(|h| req.headers().contains_key(*h))
            .collect();
        assert!(req.headers().contains_key("x-end-to-end"));
        if leaked.is_empty() { text(200, "clean") } else { text(500, "leaked") }
    })
    .await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let req = Request::get(format!("http://{front}/"))
        .header("connection", "x-conn-scoped")
        .header("x-conn-scoped", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "1")
        .body(empty())
        .unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// An HTTP/2 server (the `h2` crate) that answers RST_STREAM(REFUSED_STREAM) to the first
/// `refuse` streams it sees, then 200 "processed"; counts the requests it processed.
async fn refusing_h2_server(
    refuse: usize,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (seen, processed) =
        (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
    let counter = processed.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let (seen, processed) = (seen.clone(), counter.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(stream).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let mut body = req.into_body();
                    while let Some(chunk) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
                    }
                    processed.fetch_add(1, Ordering::SeqCst);
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    send.send_data(Bytes::from_static(b"processed"), true).unwrap();
                }
            });
        }
    });
    (addr, processed)
}

#[tokio::test]
async fn refused_stream_is_retried_even_for_a_post() {
    let (server, processed) = refusing_h2_server(1).await;
    let extra = "    protocol: http2\n    outlier_detection: { consecutive_failures: 0 }\n";
    let app = start_app(&one_service("http", extra, &[(server, 1)])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let req = Request::post(&url).body(full(Bytes::from_static(b"{\"amount\":1}"))).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    assert_eq!(resp.headers()["x-outrider-attempts"], "2");
    assert_eq!(within(resp.into_body().collect()).await.unwrap().to_bytes(), "processed");
    assert_eq!(processed.load(std::sync::atomic::Ordering::SeqCst), 1, "processed exactly once");

    // Without the condition in retry_on, the refusal is the answer: 502 refused_stream.
    let (server, _) = refusing_h2_server(usize::MAX).await;
    let extra = format!("{extra}    retries: {{ retry_on: [connect_failure] }}\n");
    let app = start_app(&one_service("http", &extra, &[(server, 1)])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let (status, headers, _) = get(&client(), &url).await;
    assert_eq!((status, headers["x-outrider-error"].to_str().unwrap()), (502, "refused_stream"));
}

/// A minimal HTTP/2 peer written frame by frame: it completes the handshake, waits for the
/// client's first HEADERS frame, then sends GOAWAY with last-stream-id 0 (nothing processed)
/// and closes. Counts the HEADERS frames it saw.
async fn goaway_h2_server() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let headers_seen = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = headers_seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                s.read_exact(&mut preface).await.unwrap();
                s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    s.read_exact(&mut payload).await.unwrap();
                    match head[3] {
                        0x4 if head[4] & 1 == 0 => s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(), // ACK
                        0x1 => {
                            seen.fetch_add(1, Ordering::SeqCst);
                            // GOAWAY: last-stream-id 0, NO_ERROR; then close our side and
                            // drain theirs (closing with unread data would reset the socket).
                            s.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).await.unwrap();
                            let _ = s.shutdown().await;
                            let mut sink = Vec::new();
                            let _ = s.read_to_end(&mut sink).await;
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, headers_seen)
}

#[tokio::test]
async fn a_stream_above_a_goaway_last_stream_id_is_retried_even_for_a_post() {
    let (goaway, headers_seen) = goaway_h2_server().await;
    let good = Backend::named("good").await;
    let extra = "    protocol: http2\n    outlier_detection: { consecutive_failures: 0 }\n";
    // The GOAWAY server comes first in round-robin order.
    let app = start_app(&one_service("http", extra, &[(goaway, 1), (good.addr, 1)])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let req = Request::post(&url).body(full(Bytes::from_static(b"{}"))).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-outrider-attempts"], "2");
    assert_eq!(headers_seen.load(std::sync::atomic::Ordering::SeqCst), 1, "the first attempt reached it");
    assert_eq!(good.hits(), 1);
}
