//! The chaos suite: failures a sidecar meets in production, each under closed-loop load on
//! loopback, bounded in time, asserting how many requests failed (0 where nothing should) and
//! printing its figures (`cargo test --test chaos -- --nocapture` shows them).
//! Covers HTTP/1.1, h2c, gRPC-style calls and TCP listeners.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use support::etcd::Etcd;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn report(scenario: &str, figures: &str) {
    eprintln!("chaos: {scenario}: {figures}");
}

fn names(backends: &[Backend]) -> Vec<(SocketAddr, u32)> {
    backends.iter().map(|b| (b.addr, 1)).collect()
}

/// A gRPC-style unary call: POST, application/grpc, a framed message, grpc-status trailer.
fn grpc_backend() -> impl Fn(
    Request<hyper::body::Incoming>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = http::Response<TestBody>> + Send>,
> + Send
+ Sync
+ 'static {
    |req| {
        Box::pin(async move {
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream_of(frames)));
            let mut resp = http::Response::new(body);
            resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
            resp
        })
    }
}

fn grpc_call(url: &str) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1])))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sigkill_under_load_loses_no_idempotent_request() {
    let backends = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let grpc = [
        Backend::start(grpc_backend()).await,
        Backend::start(grpc_backend()).await,
        Backend::start(grpc_backend()).await,
    ];
    let app = start_app(&one_service("http", "", &names(&backends))).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let grpc_app = start_app(&one_service("http", "    protocol: http2\n", &names(&grpc))).await;
    let grpc_url = format!("http://{}/pkg.Svc/Call", grpc_app.listener_addr("front").await.unwrap());

    let h1 = Load::start(&url, 4);
    let h2 = Load::with(h2c_client(), 4, {
        let url = url.clone();
        move || Request::get(&url).body(empty()).unwrap()
    });
    let calls = Load::with(h2c_client(), 4, move || grpc_call(&grpc_url));
    for load in [&h1, &h2, &calls] {
        load.progress(200).await;
    }
    backends[0].kill();
    grpc[0].kill();
    for load in [&h1, &h2, &calls] {
        load.progress(1000).await;
    }
    let ((h1_ok, h1_failed), (h2_ok, h2_failed)) = (h1.stop().await, h2.stop().await);
    let (calls_ok, calls_failed) = calls.stop().await;
    report(
        "upstream SIGKILL",
        &format!(
            "HTTP/1.1 {h1_ok} ok / {h1_failed} failed; h2c {h2_ok} / {h2_failed}; gRPC calls {calls_ok} / {calls_failed}"
        ),
    );
    assert_eq!((h1_failed, h2_failed), (0, 0), "idempotent requests failed");
    // A gRPC call is a POST: one that was on the killed upstream's connection may have been
    // processed and is not replayed. At most the calls in flight at that moment fail.
    assert!(calls_failed <= 4, "{calls_failed} gRPC calls failed; at most the 4 in flight may");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_survives_an_upstream_sigkill() {
    // Echo upstreams, one of which dies; each TCP connection does one request/response.
    let mut echoes = Vec::new();
    let mut kills = Vec::new();
    for _ in 0..3 {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        echoes.push((socket.local_addr().unwrap(), 1));
        let dead = tokio_util::sync::CancellationToken::new();
        kills.push(dead.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    () = dead.cancelled() => return,
                    r = socket.accept() => r.unwrap(),
                };
                let dead = dead.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    tokio::select! {
                        () = dead.cancelled() => {}
                        r = s.read_exact(&mut buf) => if r.is_ok() { let _ = s.write_all(&buf).await; },
                    }
                });
            }
        });
    }
    let app = start_app(&one_service("tcp", "", &echoes)).await;
    let front = app.listener_addr("front").await.unwrap();
    let (ok, failed, after_kill_failed) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (ok, failed, after, killed) =
                (ok.clone(), failed.clone(), after_kill_failed.clone(), killed.clone());
            tokio::spawn(async move {
                for _ in 0..300 {
                    let started_after_kill = killed.load(Ordering::SeqCst);
                    let good = async {
                        let mut c = TcpStream::connect(front).await.ok()?;
                        c.write_all(b"hello").await.ok()?;
                        let mut buf = [0u8; 5];
                        within(c.read_exact(&mut buf)).await.ok()?;
                        (&buf == b"hello").then_some(())
                    };
                    if good.await.is_some() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if started_after_kill {
                            after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    while ok.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kills[0].cancel();
    // Connections opened from now on may find the dead upstream: connect failures move on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    killed.store(true, Ordering::SeqCst);
    for w in workers {
        within(w).await.unwrap();
    }
    let (ok, failed, after) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        after_kill_failed.load(Ordering::Relaxed),
    );
    report(
        "TCP listener, upstream SIGKILL",
        &format!("{ok} connections ok / {failed} failed ({after} opened after the kill)"),
    );
    assert_eq!(after, 0, "a connection opened after the kill failed");
    assert!(failed <= 4, "at most the connections open on the killed upstream may fail");
}

async fn etcd_app(etcd: &Etcd) -> outrider::app::App {
    start_app(&format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n    discovery: etcd\n",
        etcd.url
    ))
    .await
}

fn naming(addr: SocketAddr) -> String {
    format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{}}}}"#)
}

async fn until_endpoints(app: &outrider::app::App, n: usize) {
    within(async {
        while app.balancer("pay").unwrap().describe().len() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_through_etcd_loses_nothing() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let mut live = Vec::new();
    for i in 0..3 {
        let b = Backend::named("old").await;
        kv.put(format!("svc/pay/old{i}"), naming(b.addr), None).await.unwrap();
        live.push(b);
    }
    let app = etcd_app(&etcd).await;
    until_endpoints(&app, 3).await;
    let load = Load::start(&format!("http://{}/", app.listener_addr("front").await.unwrap()), 6);
    let started = Instant::now();
    for i in 0..3 {
        load.progress(100).await;
        let new = Backend::named("new").await;
        kv.put(format!("svc/pay/new{i}"), naming(new.addr), None).await.unwrap();
        kv.delete(format!("svc/pay/old{i}"), None).await.unwrap();
        // The old instance exits right away, before every watcher may have seen the delete.
        live[i].kill();
        live.push(new);
    }
    load.progress(300).await;
    let (ok, failed) = load.stop().await;
    report(
        "rolling replacement through etcd",
        &format!("{ok} ok / {failed} failed in {:?}", started.elapsed()),
    );
    assert_eq!(failed, 0);
    until_endpoints(&app, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sigkill_restart_and_compaction_under_load() {
    let mut etcd = Etcd::start().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    etcd.client().await.put("svc/pay/a", naming(a.addr), None).await.unwrap();
    let app = etcd_app(&etcd).await;
    until_endpoints(&app, 1).await;
    let load = Load::start(&format!("http://{}/", app.listener_addr("front").await.unwrap()), 4);
    load.progress(100).await;
    etcd.kill();
    load.progress(500).await; // served from the last known set
    etcd.restart().await;
    let mut kv = etcd.client().await;
    kv.put("svc/pay/b", naming(b.addr), None).await.unwrap();
    let revision = kv.delete("svc/pay/a", None).await.unwrap().header().unwrap().revision();
    kv.compact(revision, None).await.unwrap();
    within(async {
        while app.balancer("pay").unwrap().describe().iter().map(|e| e.addr).collect::<Vec<_>>() != [b.addr] {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    load.progress(200).await;
    let (ok, failed) = load.stop().await;
    report("etcd SIGKILL + restart + compaction", &format!("{ok} ok / {failed} failed"));
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_under_load() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    kv.put("svc/pay/a", naming(a.addr), None).await.unwrap();
    let lease = kv.lease_grant(2, None).await.unwrap().id();
    kv.put("svc/pay/b", naming(b.addr), Some(etcd_client::PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let app = etcd_app(&etcd).await;
    until_endpoints(&app, 2).await;
    let load = Load::start(&format!("http://{}/", app.listener_addr("front").await.unwrap()), 4);
    let expiry = Instant::now();
    until_endpoints(&app, 1).await; // nobody keeps b's lease alive
    let gone = expiry.elapsed();
    load.progress(50).await; // requests that picked b just before it left have finished
    let hits = b.hits();
    load.progress(300).await;
    let (ok, failed) = load.stop().await;
    report("lease expiry", &format!("{ok} ok / {failed} failed; instance gone {gone:?} after its 2 s lease"));
    assert_eq!(failed, 0);
    assert_eq!(b.hits(), hits, "traffic after its lease expired");
    assert!(gone < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_that_may_have_been_processed_are_never_replayed() {
    // Two upstreams that record each POST's id and then reset the connection without an
    // answer (the request was processed, the response lost), and one that answers.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let swallowing = || {
        let seen = seen.clone();
        Backend::start(move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let id = req.headers()["x-id"].to_str().unwrap().to_string();
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                seen.lock().unwrap().push(id);
                futures_pending().await
            }
        })
    };
    let (s1, s2) = (swallowing().await, swallowing().await);
    let good = {
        let seen = seen.clone();
        Backend::start(move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(req.headers()["x-id"].to_str().unwrap().to_string());
                text(200, "paid")
            }
        })
        .await
    };
    let extra = "    retries: { max_attempts: 3, per_try_timeout: 200ms }\n    outlier_detection: { consecutive_failures: 0 }\n";
    let app = start_app(&one_service("http", extra, &[(s1.addr, 1), (s2.addr, 1), (good.addr, 1)])).await;
    let url = format!("http://{}/pay", app.listener_addr("front").await.unwrap());
    let next = Arc::new(AtomicUsize::new(0));
    let load = Load::with(client(), 6, move || {
        let id = next.fetch_add(1, Ordering::Relaxed);
        Request::post(&url)
            .header("x-id", id.to_string())
            .body(full(Bytes::from_static(b"{\"amount\":1}")))
            .unwrap()
    });
    load.progress(120).await;
    let (ok, failed) = load.stop().await;
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<_> = seen.iter().collect();
    report(
        "POST never replayed",
        &format!(
            "{ok} ok / {failed} timed out on a swallowing upstream; {} arrivals, {} unique",
            seen.len(),
            unique.len()
        ),
    );
    assert_eq!(seen.len(), unique.len(), "a POST reached upstreams twice");
    assert!(ok > 0 && failed > 0);
}

async fn futures_pending() -> http::Response<TestBody> {
    std::future::pending().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_bodies_do_not_hurt_healthy_traffic() {
    let backends = [Backend::named("a").await, Backend::named("b").await];
    let app = start_app(&one_service("http", "", &names(&backends))).await;
    let front = app.listener_addr("front").await.unwrap();
    let load = Load::start(&format!("http://{front}/"), 4);
    let bad = tokio::spawn(async move {
        for _ in 0..100 {
            let mut c = TcpStream::connect(front).await.unwrap();
            c.write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nnot-hex\r\n",
            )
            .await
            .unwrap();
            let mut reply = Vec::new();
            let _ = within(c.read_to_end(&mut reply)).await;
        }
    });
    within(bad).await.unwrap();
    load.progress(200).await;
    let (ok, failed) = load.stop().await;
    report(
        "malformed client bodies",
        &format!("{ok} healthy ok / {failed} failed alongside 100 broken bodies"),
    );
    assert_eq!(failed, 0);
    assert!(app.balancer("svc").unwrap().describe().iter().all(|e| e.state == "active"));
    assert!(app.metrics_text().contains("outrider_circuit_breaker_state{service=\"svc\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_starve_normal_clients() {
    let a = Backend::named("a").await;
    let yaml = one_service("http", "", &[(a.addr, 1)]).replace(
        "    service: svc\n",
        "    service: svc\n    limits: { header_read_timeout: 500ms, max_connections: 400 }\n",
    );
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let started = Instant::now();
    let slow: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = TcpStream::connect(front).await.unwrap();
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa".iter() {
                    if c.write_all(&[*byte]).await.is_err() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut buf = [0u8; 1];
                matches!(within(c.read(&mut buf)).await, Ok(0) | Err(_))
            })
        })
        .collect();
    let load = Load::start(&format!("http://{front}/"), 4);
    load.progress(500).await;
    let mut closed = 0;
    for s in slow {
        closed += usize::from(within(s).await.unwrap());
    }
    let took = started.elapsed();
    let (ok, failed) = load.stop().await;
    report(
        "slowloris",
        &format!(
            "{ok} ok / {failed} failed beside 200 trickling connections; {closed} of them closed within {took:?}"
        ),
    );
    assert_eq!(failed, 0);
    assert_eq!(closed, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_of_every_kind_of_write_loses_nothing() {
    let backends = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let text = |w: u32| {
        let eps: Vec<_> = backends.iter().map(|b| (b.addr, w)).collect();
        one_service("http", "", &eps)
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, text(1)).unwrap();
    let app = start_app_with_file(&path).await;
    outrider::watch::spawn(app.clone(), path.clone()).unwrap();
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let load = Load::start(&url, 4);
    let write_atomically = |p: &Path, t: &str| {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, p).unwrap();
    };
    let started = Instant::now();
    for round in 0..40u32 {
        let valid = text(round % 5 + 1);
        match round % 5 {
            0 => write_atomically(&path, &valid),
            1 => std::fs::write(&path, &valid).unwrap(), // in place
            2 => std::fs::write(&path, "").unwrap(),     // emptied
            3 => std::fs::write(&path, &valid[..valid.len() / 2]).unwrap(), // truncated
            _ => std::fs::write(&path, valid.replace("weight: ", "weight: -")).unwrap(), // invalid
        }
        tokio::time::sleep(Duration::from_millis(fastrand_ms(round))).await; // the writer's pace
    }
    let mut status = app.status();
    let before = status.borrow_and_update().generation;
    write_atomically(&path, &text(7));
    within(status.wait_for(|s| s.generation > before)).await.unwrap();
    load.progress(200).await;
    let (ok, failed) = load.stop().await;
    let s = status.borrow().clone();
    report(
        "reload storm",
        &format!(
            "{ok} ok / {failed} failed over 41 writes in {:?}; {} generations applied, {} refused",
            started.elapsed(),
            s.generation - 1,
            s.reload_failures
        ),
    );
    assert_eq!(failed, 0);
    assert_eq!(
        app.balancer("svc").unwrap().describe().iter().map(|e| e.weight).collect::<Vec<_>>(),
        [7, 7, 7]
    );
}

/// 20–60 ms, varied but repeatable.
fn fastrand_ms(round: u32) -> u64 {
    20 + u64::from(round * 37 % 41)
}
