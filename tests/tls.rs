//! TLS and mTLS on both sides, for real: certificates generated at test time, tokio-rustls
//! upstreams, and curl / openssl as the clients of TLS listeners.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use http::{Request, Version};
use http_body_util::BodyExt;
use support::tls::*;
use support::*;

/// The service block for TLS to `svc`'s endpoints (`tls` lines go under `tls:`).
fn tls_service(protocol: &str, tls: &[String]) -> String {
    let mut extra = format!("    protocol: {protocol}\n    tls:\n");
    for line in tls {
        extra.push_str(&format!("      {line}\n"));
    }
    extra
}

fn ca_line(ca: &Ca) -> String {
    format!("ca: {}", ca.cert.display())
}

fn client_cert_lines(leaf: &Leaf) -> [String; 2] {
    [format!("cert: {}", leaf.cert.display()), format!("key: {}", leaf.key.display())]
}

/// The value of the sample `name{labels}` in the app's `/metrics` text, 0 when absent.
fn metric(app: &outrider::app::App, sample: &str) -> f64 {
    let text = app.metrics_text();
    text.lines().find_map(|l| l.strip_prefix(sample)?.trim().parse().ok()).unwrap_or(0.0)
}

/// GET through `front`: status, `x-outrider-error`, `x-outrider-tls-error`, body.
async fn call(front: SocketAddr, method: &str) -> (u16, String, String, String) {
    let req = Request::builder().method(method).uri(format!("http://{front}/")).body(empty()).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    let header = |n: &str| resp.headers().get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (status, error, tls) =
        (resp.status().as_u16(), header("x-outrider-error"), header("x-outrider-tls-error"));
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    (status, error, tls, String::from_utf8_lossy(&body).into_owned())
}

// === Outbound: TLS origination ===

#[tokio::test]
async fn http1_over_tls_to_a_verified_upstream_and_sessions_resume() {
    let ca = Ca::new("upstream");
    let server = ca.leaf("server", &["payments.internal"]);
    // Every response closes its connection, so each request needs a new handshake.
    let up = TlsBackend::start(server.server_config(None), |req| async move {
        assert_eq!(req.version(), Version::HTTP_11);
        let mut resp = text(200, "secure");
        resp.headers_mut().insert("connection", "close".parse().unwrap());
        resp
    })
    .await;
    let extra = tls_service("http1", &[ca_line(&ca), "server_name: payments.internal".into()]);
    let app = start_app(&one_service("http", &extra, &[(up.addr(), 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    for _ in 0..5 {
        let (status, error, _, body) = call(front, "GET").await;
        assert_eq!((status, error.as_str(), body.as_str()), (200, "", "secure"));
    }
    assert_eq!(up.handshakes.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(up.resumed.load(std::sync::atomic::Ordering::SeqCst), 4, "reconnects resume the TLS session");
}

/// A real gRPC server (tonic's generated OTLP trace service) behind tokio-rustls, reached by
/// a real gRPC client through Outrider: h2 negotiated by ALPN (`protocol: auto`).
#[tokio::test]
async fn grpc_over_tls_with_alpn_negotiated_h2() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    struct Count;
    #[tonic::async_trait]
    impl TraceService for Count {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans = req.into_inner().resource_spans.len() as i64;
            let partial_success =
                Some(ExportTracePartialSuccess { rejected_spans: spans, error_message: "counted".into() });
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success }))
        }
    }

    let ca = Ca::new("grpc");
    let server = ca.leaf("server", &["127.0.0.1"]); // IP-only endpoint: the IP is the name
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config(None)));
    let protocols = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = protocols.clone();
    tokio::spawn(async move {
        let service = TraceServiceServer::new(Count);
        loop {
            let (stream, _) = socket.accept().await.unwrap();
            let (acceptor, service, seen) = (acceptor.clone(), service.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                seen.lock().unwrap().push(tls.get_ref().1.alpn_protocol().map(|p| p.to_vec()));
                let service = hyper_util::service::TowerToHyperService::new(service);
                let builder =
                    hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
            });
        }
    });
    let app = start_app(&one_service("http", &tls_service("auto", &[ca_line(&ca)]), &[(addr, 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let mut grpc = within(TraceServiceClient::connect(format!("http://{front}"))).await.unwrap();
    for n in 1..=3 {
        let req = ExportTraceServiceRequest { resource_spans: vec![Default::default(); n] };
        let resp = within(grpc.export(req)).await.expect("gRPC call succeeds over TLS").into_inner();
        let partial = resp.partial_success.unwrap();
        assert_eq!((partial.rejected_spans, partial.error_message.as_str()), (n as i64, "counted"));
    }
    assert_eq!(*protocols.lock().unwrap(), vec![Some(b"h2".to_vec())], "one h2 connection, multiplexed");
}

#[tokio::test]
async fn protocol_auto_speaks_http1_to_an_upstream_without_h2() {
    let ca = Ca::new("h1only");
    let server = ca.leaf("server", &["127.0.0.1"]);
    let mut config = server.server_config(None);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let up = TlsBackend::start(config, |req| async move {
        text(200, if req.version() == Version::HTTP_11 { "h1" } else { "not h1" })
    })
    .await;
    let app = start_app(&one_service("http", &tls_service("auto", &[ca_line(&ca)]), &[(up.addr(), 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    // From an h2c client too: the request is rewritten for the HTTP/1.1 connection.
    let (status, _, body) = get(&h2c_client(), &format!("http://{front}/x?y=1")).await;
    assert_eq!((status, body.as_str()), (200, "h1"));
    let (status, _, _, body) = call(front, "GET").await;
    assert_eq!((status, body.as_str()), (200, "h1"));
}

#[tokio::test]
async fn mtls_to_upstream_presents_the_client_certificate() {
    let ca = Ca::new("mesh");
    let server = ca.leaf("server", &["127.0.0.1"]);
    let me = ca.leaf("client", &["spiffe://cluster.local/ns/shop/sa/checkout"]);
    let up = TlsBackend::named(server.server_config(Some(&ca.cert)), "ok").await;
    let mut lines = vec![ca_line(&ca)];
    lines.extend(client_cert_lines(&me));
    let app = start_app(&one_service("http", &tls_service("http1", &lines), &[(up.addr(), 1)])).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, _, _, body) = call(front, "GET").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(*up.clients.lock().unwrap(), vec![Some(me.serial.clone())]);
}

/// Each way a handshake can fail gets 502 `tls_handshake_failed` with its reason, a counter
/// by reason, and never reaches the upstream's app.
#[tokio::test]
async fn handshake_failures_are_502_with_their_reason() {
    let ca = Ca::new("good");
    let stranger = Ca::new("stranger");
    let impostor = stranger.leaf("client", &["spiffe://cluster.local/ns/shop/sa/checkout"]);
    let plain_server = ca.leaf("server", &["payments.internal"]);
    let cases: Vec<(&str, rustls::ServerConfig, Vec<String>)> = vec![
        // Signed by a CA we do not trust.
        ("unknown_ca", stranger.leaf("s1", &["127.0.0.1"]).server_config(None), vec![ca_line(&ca)]),
        (
            "expired",
            ca.leaf_with("s2", &["127.0.0.1"], Validity::Expired).server_config(None),
            vec![ca_line(&ca)],
        ),
        // Valid for payments.internal, asked for as billing.internal.
        (
            "name_mismatch",
            plain_server.server_config(None),
            vec![ca_line(&ca), "server_name: billing.internal".into()],
        ),
        // Valid for the name, but its SANs are not the pinned identity.
        (
            "identity_mismatch",
            plain_server.server_config(None),
            vec![
                ca_line(&ca),
                "server_name: payments.internal".into(),
                "allowed_sans: [\"spiffe://cluster.local/ns/prod/sa/payments\"]".into(),
            ],
        ),
        // The upstream requires a client certificate and we have none.
        ("no_client_cert", ca.leaf("s3", &["127.0.0.1"]).server_config(Some(&ca.cert)), vec![ca_line(&ca)]),
        // Ours is from a CA the upstream does not trust.
        (
            "client_cert_rejected",
            ca.leaf("s4", &["127.0.0.1"]).server_config(Some(&ca.cert)),
            [ca_line(&ca)].into_iter().chain(client_cert_lines(&impostor)).collect(),
        ),
    ];
    let mut h2_only = ca.leaf("s5", &["127.0.0.1"]).server_config(None);
    h2_only.alpn_protocols = vec![b"h2".to_vec()];
    let cases = cases.into_iter().chain([
        (
            "not_yet_valid",
            ca.leaf_with("s6", &["127.0.0.1"], Validity::NotYetValid).server_config(None),
            vec![ca_line(&ca)],
        ),
        // We offer http/1.1 only; the server speaks h2 only.
        ("alpn", h2_only, vec![ca_line(&ca)]),
    ]);
    for (reason, config, lines) in cases {
        let up = TlsBackend::named(config, "reached").await;
        let app = start_app(&one_service("http", &tls_service("http1", &lines), &[(up.addr(), 1)])).await;
        let front = app.listener_addr("front").await.unwrap();
        let (status, error, tls_error, body) = call(front, "POST").await;
        assert_eq!(
            (status, error.as_str(), tls_error.as_str()),
            (502, "tls_handshake_failed", reason),
            "{body}"
        );
        assert_eq!(up.backend.hits(), 0, "{reason}: the app must not see the request");
        let counted = metric(
            &app,
            &format!("outrider_tls_handshake_failures_total{{service=\"svc\",reason=\"{reason}\"}}"),
        );
        assert!(counted >= 1.0, "{reason} not counted:\n{}", app.metrics_text());
        app.shutdown(false);
    }

    // Something that does not speak TLS at all.
    let plain = Backend::named("plain").await;
    let app =
        start_app(&one_service("http", &tls_service("http1", &[ca_line(&ca)]), &[(plain.addr, 1)])).await;
    let (status, error, tls_error, _) = call(app.listener_addr("front").await.unwrap(), "GET").await;
    assert_eq!((status, error.as_str(), tls_error.as_str()), (502, "tls_handshake_failed", "other"));
}

#[tokio::test]
async fn identity_pinning_accepts_listed_sans_including_a_prefix_pattern() {
    let ca = Ca::new("pin");
    let payments = ca.leaf("payments", &["127.0.0.1", "spiffe://cluster.local/ns/prod/sa/payments"]);
    let up = TlsBackend::named(payments.server_config(None), "pinned").await;
    for pins in [
        "[\"spiffe://cluster.local/ns/prod/sa/payments\"]",
        "[\"spiffe://other\", \"spiffe://cluster.local/ns/prod/*\"]",
    ] {
        let lines = [ca_line(&ca), format!("allowed_sans: {pins}")];
        let app = start_app(&one_service("http", &tls_service("http1", &lines), &[(up.addr(), 1)])).await;
        let front = app.listener_addr("front").await.unwrap();
        let (status, _, _, body) = call(front, "GET").await;
        assert_eq!((status, body.as_str()), (200, "pinned"), "{pins}");
        app.shutdown(false);
    }
}

/// A handshake failure never reached the app, so even a POST moves to the next endpoint,
/// and the endpoint that failed it is the one passive health hears about.
#[tokio::test]
async fn a_handshake_failure_is_a_connect_failure_retried_elsewhere() {
    let ca = Ca::new("retry");
    let stranger = Ca::new("stranger");
    let bad = TlsBackend::named(stranger.leaf("bad", &["127.0.0.1"]).server_config(None), "bad").await;
    let bad_mtls =
        TlsBackend::named(ca.leaf("bad2", &["127.0.0.1"]).server_config(Some(&stranger.cert)), "bad2").await;
    let good = TlsBackend::named(ca.leaf("good", &["127.0.0.1"]).server_config(None), "good").await;
    let me = ca.leaf("client", &["spiffe://x/checkout"]);
    let mut lines = vec![ca_line(&ca)];
    lines.extend(client_cert_lines(&me));
    let endpoints = [(bad.addr(), 1), (bad_mtls.addr(), 1), (good.addr(), 1)];
    let extra = tls_service("http1", &lines)
        + "    retries:\n      max_attempts: 3\n    outlier_detection:\n      consecutive_failures: 2\n      max_ejection_percent: 100\n";
    let app = start_app(&one_service("http", &extra, &endpoints)).await;
    let front = app.listener_addr("front").await.unwrap();
    for _ in 0..9 {
        let (status, _, _, body) = call(front, "POST").await;
        assert_eq!((status, body.as_str()), (200, "good"));
    }
    assert_eq!(bad.backend.hits() + bad_mtls.backend.hits(), 0);
    let unknown =
        metric(&app, "outrider_tls_handshake_failures_total{service=\"svc\",reason=\"unknown_ca\"}");
    let rejected = metric(
        &app,
        "outrider_tls_handshake_failures_total{service=\"svc\",reason=\"client_cert_rejected\"}",
    );
    assert!(unknown >= 1.0 && rejected >= 1.0, "{}", app.metrics_text());
    // Handshake failures count toward ejection like connect failures do.
    let ejected = metric(&app, "outrider_ejections_total{service=\"svc\"}");
    assert!(ejected >= 1.0, "{}", app.metrics_text());
}

// === Rotation ===

/// Kubernetes updates a Secret volume by writing a new timestamped dir and swapping the
/// `..data` symlink; the files the config names are symlinks through `..data`.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: usize,
}

impl SecretVolume {
    fn new(files: &[(&str, &Path)]) -> SecretVolume {
        let mut volume = SecretVolume { dir: tempfile::tempdir().unwrap(), version: 0 };
        volume.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.dir.path().join(name)).unwrap();
        }
        volume
    }

    /// A new `..<version>` dir with copies of `files`, then `..data` swapped to it atomically.
    fn publish(&mut self, files: &[(&str, &Path)]) {
        self.version += 1;
        let target = format!("..2026_11_22_{}", self.version);
        let dir = self.dir.path().join(&target);
        std::fs::create_dir(&dir).unwrap();
        for (name, from) in files {
            std::fs::copy(from, dir.join(name)).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// Awaits the app's count of TLS rotations reaching `n`.
async fn rotations(app: &outrider::app::App, n: u64) {
    let mut status = app.status();
    within(status.wait_for(|s| s.tls_rotations >= n)).await.unwrap();
}

/// The client certificate Outrider presents upstream is rotated through a Secret volume: the
/// pooled connection carries on, a new connection presents the new serial. A broken file
/// then keeps the current certificate (logged and counted).
#[tokio::test]
async fn outbound_client_certificate_rotation_keeps_connections() {
    let ca = Ca::new("rot-out");
    let server = ca.leaf("server", &["127.0.0.1"]);
    let first = ca.leaf("client-1", &["spiffe://x/checkout"]);
    let second = ca.leaf("client-2", &["spiffe://x/checkout"]);
    // `/close` answers with `connection: close`: the next request needs a new connection.
    let up = TlsBackend::start(server.server_config(Some(&ca.cert)), |req| async move {
        let mut resp = text(200, "ok");
        if req.uri().path() == "/close" {
            resp.headers_mut().insert("connection", "close".parse().unwrap());
        }
        resp
    })
    .await;
    let mut volume = SecretVolume::new(&[("tls.crt", &first.cert), ("tls.key", &first.key)]);
    let lines = [
        ca_line(&ca),
        format!("cert: {}", volume.path("tls.crt").display()),
        format!("key: {}", volume.path("tls.key").display()),
    ];
    let yaml = one_service("http", &tls_service("http1", &lines), &[(up.addr(), 1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let app = start_app_with_file(&path).await;
    outrider::watch::spawn(app.clone(), path.clone()).unwrap();
    let front = app.listener_addr("front").await.unwrap();
    let client = client();
    assert_eq!(get(&client, &format!("http://{front}/")).await.0, 200);

    volume.publish(&[("tls.crt", &second.cert), ("tls.key", &second.key)]);
    rotations(&app, 1).await;
    assert_eq!(
        get(&client, &format!("http://{front}/close")).await.0,
        200,
        "the pooled connection still works"
    );
    assert_eq!(get(&client, &format!("http://{front}/")).await.0, 200);
    let seen = up.clients.lock().unwrap().clone();
    assert_eq!(seen, vec![Some(first.serial.clone()), Some(second.serial.clone())]);

    // A half-written certificate: refused, counted, the loaded one stays in use.
    let dir_before = metric(&app, "outrider_tls_reload_failures_total");
    std::fs::write(ca.path("garbage.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    volume.publish(&[("tls.crt", &ca.path("garbage.pem")), ("tls.key", &second.key)]);
    within(app.status().wait_for(|s| s.tls_reload_failures >= 1)).await.unwrap();
    assert_eq!(metric(&app, "outrider_tls_reload_failures_total"), dir_before + 1.0);
    assert_eq!(get(&client, &format!("http://{front}/close")).await.0, 200);
    assert_eq!(get(&client, &format!("http://{front}/")).await.0, 200);
    assert_eq!(up.clients.lock().unwrap().last().cloned().flatten(), Some(second.serial.clone()));
}

// === Inbound: TLS termination ===

/// `front` terminating TLS with `leaf` (and these extra `tls:` lines) in front of `app`.
fn terminating(protocol: &str, leaf: &Leaf, extra: &[String], app: SocketAddr) -> String {
    let mut tls =
        format!("    tls:\n      cert: {}\n      key: {}\n", leaf.cert.display(), leaf.key.display());
    for line in extra {
        tls.push_str(&format!("      {line}\n"));
    }
    one_service(protocol, "", &[(app, 1)]).replace("    service: svc\n", &format!("    service: svc\n{tls}"))
}

/// The local app: answers with the `x-forwarded-client-cert` it received (or `none`).
async fn local_app() -> Backend {
    Backend::start(|req| async move {
        let xfcc = req.headers().get("x-forwarded-client-cert").map(|v| v.to_str().unwrap().to_string());
        let body = format!("xfcc={}\n", xfcc.unwrap_or_else(|| "none".into()));
        let mut resp = text(200, "");
        *resp.body_mut() = full(body.into());
        resp
    })
    .await
}

/// Runs a real client (curl, openssl) to completion: exit code, stdout, stderr.
async fn run(program: &str, args: Vec<String>) -> (i32, String, String) {
    let program = program.to_string();
    let out = within(tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program} must be installed (.ci/deps): {e}"))
    }))
    .await
    .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// curl to `https://app.internal:<port>/` pinned to 127.0.0.1, trusting `ca`; prints the
/// body, then the HTTP version on its own line.
fn curl_args(front: SocketAddr, ca: &Ca, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        &ca.cert.display().to_string(),
        "--resolve",
        &format!("app.internal:{}:127.0.0.1", front.port()),
        "-w",
        "%{http_version}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("https://app.internal:{}/", front.port()));
    args
}

fn with_cert(leaf: &Leaf) -> [String; 4] {
    ["--cert".into(), leaf.cert.display().to_string(), "--key".into(), leaf.key.display().to_string()]
}

#[tokio::test]
async fn curl_reaches_the_app_through_a_tls_listener_over_http1_and_h2() {
    let ca = Ca::new("inbound");
    let leaf = ca.leaf("app", &["app.internal"]);
    let local = local_app().await;
    let app = start_app(&terminating("http", &leaf, &[], local.addr)).await;
    let front = app.listener_addr("front").await.unwrap();
    // A client's own x-forwarded-client-cert is never passed on.
    let spoof = ["-H", "x-forwarded-client-cert: By=spoofed;URI=spiffe://admin"];
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let args: Vec<&str> = [flag].into_iter().chain(spoof).collect();
        let (code, out, err) = run("curl", curl_args(front, &ca, &args)).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("xfcc=none\n{version}"), "{err}");
    }
    // A client that does not trust our CA refuses us; nothing reaches the app.
    let stranger = Ca::new("stranger");
    let hits = local.hits();
    let (code, _, err) = run("curl", curl_args(front, &stranger, &[])).await;
    assert_eq!(code, 60, "curl: peer certificate cannot be authenticated: {err}");
    assert_eq!(local.hits(), hits);
}

#[tokio::test]
async fn mtls_listener_forwards_the_verified_identity_and_refuses_others() {
    let ca = Ca::new("mesh");
    let stranger = Ca::new("stranger");
    let leaf = ca.leaf("app", &["app.internal", "spiffe://cluster.local/ns/shop/sa/app"]);
    let checkout = ca.leaf("checkout", &["spiffe://cluster.local/ns/shop/sa/checkout"]);
    let intruder = ca.leaf("intruder", &["spiffe://cluster.local/ns/other/sa/intruder"]);
    let forged = stranger.leaf("forged", &["spiffe://cluster.local/ns/shop/sa/checkout"]);
    let local = local_app().await;
    let extra = [
        format!("client_ca: {}", ca.cert.display()),
        "allowed_identities: [\"spiffe://cluster.local/ns/shop/*\"]".to_string(),
    ];
    let app = start_app(&terminating("http", &leaf, &extra, local.addr)).await;
    let front = app.listener_addr("front").await.unwrap();
    let refused = |reason: &str| {
        metric(&app, &format!("outrider_tls_inbound_refused_total{{listener=\"front\",reason=\"{reason}\"}}"))
    };

    for http in ["--http1.1", "--http2"] {
        let mut args = vec![http, "-H", "x-forwarded-client-cert: By=spoofed;URI=spiffe://admin"];
        let cert = with_cert(&checkout);
        args.extend(cert.iter().map(String::as_str));
        let (code, out, err) = run("curl", curl_args(front, &ca, &args)).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.starts_with("xfcc=By=spiffe://cluster.local/ns/shop/sa/app;Hash=")
                && out.contains(";URI=spiffe://cluster.local/ns/shop/sa/checkout\n")
                && !out.contains("spoofed"),
            "{out}"
        );
    }
    let hits = local.hits();

    let (code, _, err) = run("curl", curl_args(front, &ca, &[])).await;
    assert_ne!(code, 0, "no client certificate must be refused: {err}");
    assert_eq!(refused("no_client_cert"), 1.0);

    let cert = with_cert(&forged);
    let (code, _, err) =
        run("curl", curl_args(front, &ca, &cert.iter().map(String::as_str).collect::<Vec<_>>())).await;
    assert_ne!(code, 0, "a certificate from another CA must be refused: {err}");
    assert_eq!(refused("unknown_ca"), 1.0);

    // A valid certificate of an identity that is not allowed: a clean `access denied` alert.
    let (_, out, err) = run(
        "openssl",
        [
            "s_client",
            "-connect",
            &front.to_string(),
            "-servername",
            "app.internal",
            "-CAfile",
            &ca.cert.display().to_string(),
            "-cert",
            &intruder.cert.display().to_string(),
            "-key",
            &intruder.key.display().to_string(),
            "-verify_return_error",
            "-ign_eof",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await;
    assert!(err.contains("access denied") || out.contains("access denied"), "{out}\n{err}");
    assert_eq!(refused("identity_not_allowed"), 1.0);
    assert_eq!(local.hits(), hits, "refused clients never reach the app");
}

#[tokio::test]
async fn a_tcp_listener_terminates_tls_for_openssl() {
    let ca = Ca::new("tcp");
    let leaf = ca.leaf("db", &["db.internal"]);
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                // One line back, then close: openssl exits when the server does.
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(&mut s);
                tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line).await.unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut s, line.as_bytes()).await.unwrap();
            });
        }
    });
    let app = start_app(&terminating("tcp", &leaf, &[], echo_addr)).await;
    let front = app.listener_addr("front").await.unwrap();
    let (code, out, err) = run(
        "sh",
        vec![
            "-c".into(),
            format!(
                "printf 'ping over tls\\n' | openssl s_client -quiet -connect {front} -servername db.internal \
                 -CAfile {} -verify_return_error",
                ca.cert.display()
            ),
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "ping over tls\n"), "{err}");
}

/// The serial of the certificate a TLS listener presents to a new client now.
async fn presented_serial(front: SocketAddr, ca: &Ca) -> String {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca.cert, None)));
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.internal").unwrap();
    let tls = within(connector.connect(name, tcp)).await.unwrap();
    serial_of(&tls.get_ref().1.peer_certificates().unwrap()[0])
}

/// The listener's certificate rotates through a Secret volume while openssl holds a
/// connection: that connection keeps working, the next handshake presents the new serial.
#[tokio::test]
async fn inbound_certificate_rotation_keeps_connections() {
    let ca = Ca::new("rot-in");
    let first = ca.leaf("app-1", &["app.internal"]);
    let second = ca.leaf("app-2", &["app.internal"]);
    let local = local_app().await;
    let volume = SecretVolume::new(&[("tls.crt", &first.cert), ("tls.key", &first.key)]);
    let mut volume = volume;
    let mounted = Leaf { cert: volume.path("tls.crt"), key: volume.path("tls.key"), ..first.clone() };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, terminating("http", &mounted, &[], local.addr)).unwrap();
    let app = start_app_with_file(&path).await;
    outrider::watch::spawn(app.clone(), path.clone()).unwrap();
    let front = app.listener_addr("front").await.unwrap();
    assert_eq!(presented_serial(front, &ca).await, first.serial);

    let mut held = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &front.to_string(), "-servername", "app.internal"])
        .args(["-CAfile", &ca.cert.display().to_string(), "-verify_return_error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl must be installed (.ci/deps)");
    let mut stdin = held.stdin.take().unwrap();
    let mut lines = lines_of(held.stdout.take().unwrap());
    let mut ask = async |lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
        use std::io::Write;
        stdin.write_all(b"GET / HTTP/1.1\r\nHost: app.internal\r\n\r\n").unwrap();
        stdin.flush().unwrap();
        within(async {
            while let Some(line) = lines.recv().await {
                if line.starts_with("xfcc=") {
                    return;
                }
            }
            panic!("the held connection closed");
        })
        .await;
    };
    ask(&mut lines).await;

    volume.publish(&[("tls.crt", &second.cert), ("tls.key", &second.key)]);
    rotations(&app, 1).await;
    ask(&mut lines).await; // the held connection carries on
    assert_eq!(presented_serial(front, &ca).await, second.serial);
    let _ = held.kill();
    let _ = held.wait();
    let expiry = app.metrics_text();
    assert!(expiry.contains("outrider_tls_certificate_expiry_timestamp_seconds{file="), "{expiry}");
}

// === Registration and discovery meet over mTLS ===

/// One Outrider process terminates mTLS for its app and registers the TLS port with a
/// `server_name` tag; another discovers it through etcd and connects with that name (the
/// certificate has no IP SAN, so without the tag it would be a name mismatch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_advertises_tls_and_discovery_uses_its_server_name() {
    let etcd = support::etcd::Etcd::start().await;
    let ca = Ca::new("mesh");
    let callee = ca.leaf("checkout", &["checkout.shop.svc", "spiffe://cluster.local/ns/shop/sa/checkout"]);
    let caller = ca.leaf("cart", &["spiffe://cluster.local/ns/shop/sa/cart"]);
    let local = local_app().await;
    let port = free_addr();
    let callee_yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{url}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         listeners:\n  - name: inbound\n    bind: {port}\n    service: local\n\
         \x20   tls:\n      cert: {cert}\n      key: {key}\n      client_ca: {ca}\n\
         services:\n  local:\n    endpoints:\n      - addr: {app}\n\
         register:\n  service: checkout\n  address: {port}\n  tls_server_name: checkout.shop.svc\n\
         \x20 lease_ttl: 2s\n  deregistration_delay: 0s\n\
         \x20 health: {{ kind: http, addr: {app}, path: /, interval: 100ms }}\n",
        url = etcd.url,
        cert = callee.cert.display(),
        key = callee.key.display(),
        ca = ca.cert.display(),
        app = local.addr,
    );
    let _callee = Binary::spawn(&callee_yaml);
    let mut kv = etcd.client().await;
    let key = format!("svc/checkout/{port}");
    let value = within(async {
        loop {
            let got = kv.get(key.as_str(), None).await.unwrap();
            if let Some(kv) = got.kvs().first() {
                return kv.value_str().unwrap().to_string();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let registered: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(registered["Metadata"]["tls"], "true", "{value}");
    assert_eq!(registered["Metadata"]["server_name"], "checkout.shop.svc", "{value}");

    let caller_yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{url}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: checkout\n\
         services:\n  checkout:\n    discovery: etcd\n    tls:\n      ca: {ca}\n      cert: {cert}\n      key: {key}\n",
        url = etcd.url,
        ca = ca.cert.display(),
        cert = caller.cert.display(),
        key = caller.key.display(),
    );
    let app = start_app(&caller_yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let body = within(async {
        loop {
            let (status, _, _, body) = call(front, "GET").await;
            if status == 200 {
                return body;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(body.contains(";URI=spiffe://cluster.local/ns/shop/sa/cart"), "the app sees the caller: {body}");
    let mismatches =
        metric(&app, "outrider_tls_handshake_failures_total{service=\"checkout\",reason=\"name_mismatch\"}");
    assert_eq!(mismatches, 0.0);
}

// === Validation: `outrider check` reads every TLS file ===

/// `outrider check` on `yaml`: exit code and stderr.
fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_outrider")).arg("check").arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_names_each_bad_tls_file_with_its_yaml_path_and_line() {
    let ca = Ca::new("check");
    let good = ca.leaf("good", &["app.internal"]);
    let expired = ca.leaf_with("expired", &["app.internal"], Validity::Expired);
    let other = ca.leaf("other", &["app.internal"]);
    std::fs::write(ca.path("not-pem.pem"), "just some text\n").unwrap();
    let template = |listener_cert: &Path, listener_key: &Path, upstream_ca: &Path| {
        format!(
            "admin:\n  bind: 127.0.0.1:0\n\
             listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: svc\n\
             \x20   tls:\n      cert: {}\n      key: {}\n\
             services:\n  svc:\n    tls:\n      ca: {}\n    endpoints:\n      - addr: 127.0.0.1:9\n",
            listener_cert.display(),
            listener_key.display(),
            upstream_ca.display()
        )
    };
    let (code, err) = check(&template(&good.cert, &good.key, &ca.cert));
    assert_eq!(code, 0, "{err}");

    let missing = ca.path("missing.pem");
    let not_pem = ca.path("not-pem.pem");
    let cases = [
        (template(&expired.cert, &expired.key, &ca.cert), "listeners[0].tls.cert (line 8", "expired at"),
        (
            template(&good.cert, &other.key, &ca.cert),
            "listeners[0].tls.cert (line 8",
            "does not match the certificate",
        ),
        (
            template(&not_pem, &good.key, &ca.cert),
            "listeners[0].tls.cert (line 8",
            "holds no PEM certificate",
        ),
        (
            template(&good.cert, &not_pem, &ca.cert),
            "listeners[0].tls.cert (line 8",
            "holds no PEM private key",
        ),
        (template(&good.cert, &good.key, &missing), "services.svc.tls.ca (line 13", "cannot read"),
        (
            template(&good.cert, &good.key, &not_pem),
            "services.svc.tls.ca (line 13",
            "holds no PEM certificate",
        ),
    ];
    for (yaml, path, message) in cases {
        let (code, err) = check(&yaml);
        assert_eq!(code, 1, "{yaml}");
        assert!(err.contains(path) && err.contains(message), "want {path:?} and {message:?} in:\n{err}");
    }
}

#[test]
fn tls_settings_that_cannot_work_are_refused() {
    let ca = Ca::new("rules");
    let leaf = ca.leaf("leaf", &["app.internal"]);
    let service = |protocol: &str, tls: &str| {
        format!(
            "listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: svc\n\
             services:\n  svc:\n    protocol: {protocol}\n{tls}    endpoints:\n      - addr: 127.0.0.1:9\n"
        )
    };
    let ca_line = format!("      ca: {}\n", ca.cert.display());
    let cases = [
        (service("auto", ""), "services.svc.protocol", "needs a `tls` block"),
        (service("http1", "    tls:\n      server_name: x\n"), "services.svc.tls", "no trust anchors"),
        (service("http1", &format!("    tls:\n{ca_line}      cert: {}\n", leaf.cert.display())), "services.svc.tls", "both `cert` and `key`"),
        (service("http2", &format!("    tls:\n{ca_line}      alpn: [http/1.1]\n")), "services.svc.tls.alpn", "needs \"h2\""),
        (service("http1", &format!("    tls:\n{ca_line}      min_version: \"1.1\"\n")), "services.svc.tls.min_version", "unknown TLS version"),
        (service("http1", &format!("    tls:\n{ca_line}      server_name: \"not a name\"\n")), "services.svc.tls.server_name", "not a DNS name"),
        (
            service("http1", "").replace(
                "    service: svc\n",
                &format!(
                    "    service: svc\n    tls:\n      cert: {}\n      key: {}\n      allowed_identities: [spiffe://x/*]\n",
                    leaf.cert.display(),
                    leaf.key.display()
                ),
            ),
            "listeners[0].tls.allowed_identities",
            "set `client_ca`",
        ),
    ];
    let register = service("http1", "")
        + "etcd:\n  endpoints: [http://127.0.0.1:2379]\n\
           register:\n  service: checkout\n  address: 127.0.0.1:8443\n  tls_server_name: \"not a name\"\n";
    let cases = cases.into_iter().chain([(register, "register.tls_server_name", "not a DNS name")]);
    for (yaml, path, message) in cases {
        let err = outrider::config::Config::parse(&yaml).expect_err(&yaml).to_string();
        assert!(err.contains(path) && err.contains(message), "want {path:?} and {message:?} in:\n{err}");
    }
}

// === Options ===

/// `system_roots: true` trusts the system's CA store, which honours `SSL_CERT_FILE` as
/// OpenSSL does: the test points it at its own CA instead of touching the machine's store.
#[tokio::test]
async fn system_roots_trust_the_system_store() {
    let ca = Ca::new("system");
    let up = TlsBackend::named(ca.leaf("server", &["127.0.0.1"]).server_config(None), "system").await;
    let front = free_addr();
    let yaml = one_service("http", &tls_service("http1", &["system_roots: true".into()]), &[(up.addr(), 1)])
        .replace("bind: 127.0.0.1:0\n    protocol", &format!("bind: {front}\n    protocol"));
    let mut outrider = Binary::spawn_env(&yaml, None, &[("SSL_CERT_FILE", &ca.cert.display().to_string())]);
    outrider.logged("outrider started").await;
    let (status, _, _, body) = call(front, "GET").await;
    assert_eq!((status, body.as_str()), (200, "system"));
}

/// `min_version: "1.3"` on either side refuses a peer that only speaks TLS 1.2.
#[tokio::test]
async fn min_version_refuses_older_peers_on_both_sides() {
    let ca = Ca::new("versions");
    let leaf = ca.leaf("server", &["127.0.0.1", "app.internal"]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls12_only = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain(), rustls::pki_types::PrivateKeyDer::from_pem_file(&leaf.key).unwrap())
        .unwrap();
    use rustls::pki_types::pem::PemObject;
    let up = TlsBackend::named(tls12_only, "old").await;
    for (min, want) in [("\"1.2\"", 200), ("\"1.3\"", 502)] {
        let lines = [ca_line(&ca), format!("min_version: {min}")];
        let app = start_app(&one_service("http", &tls_service("http1", &lines), &[(up.addr(), 1)])).await;
        let (status, _, _, _) = call(app.listener_addr("front").await.unwrap(), "GET").await;
        assert_eq!(status, want, "min_version {min}");
        app.shutdown(false);
    }

    let local = local_app().await;
    let app = start_app(&terminating("http", &leaf, &["min_version: \"1.3\"".into()], local.addr)).await;
    let front = app.listener_addr("front").await.unwrap();
    let (code, _, err) = run("curl", curl_args(front, &ca, &["--tls-max", "1.2"])).await;
    assert_ne!(code, 0, "a TLS 1.2 client must be refused: {err}");
    let (code, _, err) = run("curl", curl_args(front, &ca, &["--tlsv1.3"])).await;
    assert_eq!(code, 0, "{err}");
}

/// `alpn` overrides what is offered: `auto` with only http/1.1 offered speaks HTTP/1.1 to
/// a server that would take h2.
#[tokio::test]
async fn alpn_limits_what_auto_negotiates() {
    let ca = Ca::new("alpn");
    let up = TlsBackend::start(ca.leaf("server", &["127.0.0.1"]).server_config(None), |req| async move {
        text(200, if req.version() == Version::HTTP_2 { "h2" } else { "h1" })
    })
    .await;
    for (alpn, want) in [(None, "h2"), (Some("[http/1.1]"), "h1")] {
        let mut lines = vec![ca_line(&ca)];
        lines.extend(alpn.map(|a| format!("alpn: {a}")));
        let app = start_app(&one_service("http", &tls_service("auto", &lines), &[(up.addr(), 1)])).await;
        let (status, _, _, body) = call(app.listener_addr("front").await.unwrap(), "GET").await;
        assert_eq!((status, body.as_str()), (200, want), "alpn {alpn:?}");
        app.shutdown(false);
    }
}

#[tokio::test]
async fn forward_client_cert_false_keeps_the_identity_from_the_app() {
    let ca = Ca::new("private");
    let leaf = ca.leaf("app", &["app.internal"]);
    let me = ca.leaf("me", &["spiffe://x/me"]);
    let local = local_app().await;
    let extra = [format!("client_ca: {}", ca.cert.display()), "forward_client_cert: false".into()];
    let app = start_app(&terminating("http", &leaf, &extra, local.addr)).await;
    let front = app.listener_addr("front").await.unwrap();
    let cert = with_cert(&me);
    let mut args = vec!["-H", "x-forwarded-client-cert: spoofed"];
    args.extend(cert.iter().map(String::as_str));
    let (code, out, err) = run("curl", curl_args(front, &ca, &args)).await;
    assert_eq!((code, out.as_str()), (0, "xfcc=none\n2"), "{err}");
}

/// Every loaded certificate's expiry is a metric and in `/config`; one with less than 7
/// days left is logged as a warning when loaded.
#[tokio::test]
async fn certificate_expiry_is_exported_and_warned_about() {
    let ca = Ca::new("expiry");
    let short = ca.leaf_with("short", &["app.internal"], Validity::DaysLeft(3));
    let local = local_app().await;
    let admin = free_addr();
    let yaml = terminating("http", &short, &[], local.addr)
        .replace("bind: 127.0.0.1:0\nshutdown", &format!("bind: {admin}\nshutdown"));
    let mut outrider = Binary::spawn(&yaml);
    outrider.logged("certificate expires within 7 days").await;
    outrider.logged("outrider started").await;

    let (status, _, body) = get(&client(), &format!("http://{admin}/config")).await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let certs = config["tls"]["certificates"].as_array().unwrap();
    let listed =
        certs.iter().find(|c| c["serial"] == short.serial.as_str()).unwrap_or_else(|| panic!("{body}"));
    let left = listed["seconds_left"].as_u64().unwrap();
    assert!(left > 2 * 86_400 && left < 3 * 86_400, "{listed}");

    let (_, _, metrics) = get(&client(), &format!("http://{admin}/metrics")).await;
    let expiry = metrics
        .lines()
        .find(|l| {
            l.starts_with("outrider_tls_certificate_expiry_timestamp_seconds{") && l.contains("short.pem")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let at: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((at - now - left as f64).abs() < 60.0, "{expiry}");
}

/// SIGHUP re-reads TLS files too. The certificate here is a symlink into a directory the
/// file watcher does not watch, so only the signal can bring the new one in.
#[tokio::test]
async fn sighup_rereads_tls_files() {
    let ca = Ca::new("hup");
    let first = ca.leaf("first", &["app.internal"]);
    let second = ca.leaf("second", &["app.internal"]);
    let mounted = tempfile::tempdir().unwrap();
    let (cert, key) = (mounted.path().join("tls.crt"), mounted.path().join("tls.key"));
    std::os::unix::fs::symlink(&first.cert, &cert).unwrap();
    std::os::unix::fs::symlink(&first.key, &key).unwrap();
    let local = local_app().await;
    let front = free_addr();
    let linked = Leaf { cert, key, ..first.clone() };
    let yaml = terminating("http", &linked, &[], local.addr)
        .replace("bind: 127.0.0.1:0\n    protocol", &format!("bind: {front}\n    protocol"));
    let mut outrider = Binary::spawn(&yaml);
    outrider.logged("outrider started").await;
    assert_eq!(presented_serial(front, &ca).await, first.serial);

    replace(&first.cert, &std::fs::read_to_string(&second.cert).unwrap());
    replace(&first.key, &std::fs::read_to_string(&second.key).unwrap());
    outrider.signal("HUP");
    outrider.logged("certificate rotated").await;
    assert_eq!(presented_serial(front, &ca).await, second.serial);
}

/// A tcp listener with a TLS service: the app's plaintext bytes leave encrypted, and a
/// handshake failure closes the app's connection without a byte reaching the endpoint.
#[tokio::test]
async fn a_tcp_listener_originates_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new("tcp-out");
    let server = ca.leaf("db", &["db.internal"]);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config(None)));
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    for (name, echoed) in [("db.internal", true), ("other.internal", false)] {
        let lines = [ca_line(&ca), format!("server_name: {name}")];
        let app = start_app(&one_service("tcp", &tls_service("http1", &lines), &[(addr, 1)])).await;
        let mut conn =
            tokio::net::TcpStream::connect(app.listener_addr("front").await.unwrap()).await.unwrap();
        conn.write_all(b"ping").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        if echoed {
            within(conn.read_exact(&mut buf)).await.unwrap();
            got.extend_from_slice(&buf);
            assert_eq!(&got, b"ping");
        } else {
            let n = within(conn.read(&mut buf)).await.unwrap_or(0);
            assert_eq!(n, 0, "a failed handshake closes the app's connection");
            let counted = metric(
                &app,
                "outrider_tls_handshake_failures_total{service=\"svc\",reason=\"name_mismatch\"}",
            );
            assert!(counted >= 1.0, "{}", app.metrics_text());
        }
        app.shutdown(false);
    }
}
