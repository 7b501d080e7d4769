//! Traces (a real OTLP/gRPC collector in the test), Prometheus metrics with exact counts,
//! and JSON access logs.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::*;
use tokio::sync::{Mutex, mpsc};

/// An OTLP trace collector: every exported span goes to the channel.
struct Collector(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Span>) {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(socket);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(incoming),
    );
    (addr, rx)
}

/// Records the `traceparent` each request brought, answering with `status`.
async fn traceparent_backend(status: u16, seen: Arc<Mutex<Vec<String>>>) -> Backend {
    Backend::start(move |req: http::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        let tp =
            req.headers().get("traceparent").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        async move {
            seen.lock().await.push(tp);
            text(status, "ok")
        }
    })
    .await
}

fn attr(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let v = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn tracing_yaml(collector: std::net::SocketAddr, extra: &str) -> String {
    format!("tracing:\n  endpoint: http://{collector}\n  sampling_ratio: 1.0\n{extra}")
}

async fn next_span(rx: &mut mpsc::UnboundedReceiver<Span>) -> Span {
    within(rx.recv()).await.expect("collector open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_apps_trace_and_the_upstream_joins_it() {
    let (collector, mut spans) = start_collector().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = traceparent_backend(200, seen.clone()).await;
    let yaml = one_service("http", "", &[(backend.addr, 1)]) + &tracing_yaml(collector, "");
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let req = http::Request::get(format!("http://{front}/orders?id=7"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(empty())
        .unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);

    let span = next_span(&mut spans).await;
    assert_eq!(hex(&span.trace_id), TRACE, "continues the app's trace");
    assert_eq!(hex(&span.parent_span_id), PARENT, "child of the app's span");
    assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(span.name, "GET");
    assert_eq!(attr(&span, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr(&span, "url.path").as_deref(), Some("/orders"));
    assert_eq!(attr(&span, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(&span, "server.port").as_deref(), Some(backend.addr.port().to_string().as_str()));
    assert_eq!(attr(&span, "outrider.service").as_deref(), Some("svc"));
    assert_eq!(attr(&span, "outrider.config_generation").as_deref(), Some("1"));
    let upstream_tp = seen.lock().await[0].clone();
    assert_eq!(
        upstream_tp,
        format!("00-{TRACE}-{}-01", hex(&span.span_id)),
        "upstream's parent is the proxy span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_show_as_attempt_spans() {
    let (collector, mut spans) = start_collector().await;
    let (first, second) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let failing = traceparent_backend(503, first.clone()).await;
    let good = traceparent_backend(200, second.clone()).await;
    let extra = "    circuit_breaker: { failure_ratio: 0 }\n";
    let yaml =
        one_service("http", extra, &[(failing.addr, 1), (good.addr, 1)]) + &tracing_yaml(collector, "");
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let (status, headers, _) = get(&client(), &format!("http://{front}/")).await;
    assert_eq!((status, headers["x-outrider-attempts"].to_str().unwrap()), (200, "2"));

    let (a, b) = (next_span(&mut spans).await, next_span(&mut spans).await);
    let (attempt, request) = if a.parent_span_id == b.span_id { (a, b) } else { (b, a) };
    assert_eq!(attempt.parent_span_id, request.span_id, "the retry is a child of the request span");
    assert_eq!(attr(&attempt, "outrider.attempt").as_deref(), Some("2"));
    assert_eq!(attr(&request, "outrider.attempts").as_deref(), Some("2"));
    let trace = hex(&request.trace_id);
    assert_eq!(first.lock().await[0], format!("00-{trace}-{}-01", hex(&request.span_id)));
    assert_eq!(second.lock().await[0], format!("00-{trace}-{}-01", hex(&attempt.span_id)));
}

async fn scrape(app: &outrider::app::App) -> HashMap<String, f64> {
    let (status, _, body) = get(&client(), &format!("http://{}/metrics", app.admin_addr())).await;
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            Some((format!("{}{{{}}}", s.metric, labels.join(",")), v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_costs_only_the_drop_counter() {
    let backend = Backend::named("ok").await;
    let dead = refused_addr();
    let extra = "  queue_size: 2\n  batch_size: 1\n  export_timeout: 200ms\n";
    let yaml = one_service("http", "", &[(backend.addr, 1)]) + &tracing_yaml(dead, extra);
    let app = start_app(&yaml).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    for _ in 0..50 {
        assert_eq!(get(&client, &url).await.0, 200);
    }
    let dropped = within(async {
        loop {
            let v = scrape(&app).await.get("outrider_trace_spans_dropped_total{}").copied().unwrap_or(0.0);
            if v > 0.0 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(dropped <= 50.0);
}

#[tokio::test]
async fn metrics_move_by_exact_amounts() {
    let ok = Backend::named("ok").await;
    let bad = Backend::start(|_| async { text(500, "bad") }).await;
    let flaky = Backend::start(|_| async { text(503, "busy") }).await;
    let good = Backend::named("good").await;
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n\
         \x20 - {{ name: ok, bind: 127.0.0.1:0, service: ok }}\n\
         \x20 - {{ name: bad, bind: 127.0.0.1:0, service: bad }}\n\
         \x20 - {{ name: retry, bind: 127.0.0.1:0, service: retry }}\n\
         \x20 - {{ name: limited, bind: 127.0.0.1:0, service: limited }}\n\
         services:\n\
         \x20 ok: {{ endpoints: [{{ addr: {} }}] }}\n\
         \x20 bad: {{ endpoints: [{{ addr: {} }}], circuit_breaker: {{ failure_ratio: 0 }} }}\n\
         \x20 retry: {{ endpoints: [{{ addr: {} }}, {{ addr: {} }}] }}\n\
         \x20 limited: {{ endpoints: [{{ addr: {} }}], rate_limit: {{ per_second: 1, burst: 1 }} }}\n",
        ok.addr, bad.addr, flaky.addr, good.addr, ok.addr
    );
    let app = start_app(&yaml).await;
    let before = scrape(&app).await;
    let client = client();
    let addrs = app.listener_addrs().await;
    let url = |name: &str| format!("http://{}/", addrs[name]);
    for _ in 0..3 {
        assert_eq!(get(&client, &url("ok")).await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&client, &url("bad")).await.0, 500);
    }
    assert_eq!(get(&client, &url("retry")).await.0, 200);
    let limited: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(&client, &url("limited")).await.0);
        }
        v
    };
    assert_eq!(limited, vec![200, 429, 429]);

    let after = scrape(&app).await;
    let delta = |key: &str| after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0);
    let requests = |svc: &str, class: &str| {
        delta(&format!("outrider_requests_total{{method=GET,service={svc},status_class={class}}}"))
    };
    assert_eq!(requests("ok", "2xx"), 3.0);
    assert_eq!(requests("bad", "5xx"), 2.0);
    assert_eq!(requests("retry", "2xx"), 1.0);
    assert_eq!(requests("limited", "2xx"), 1.0);
    assert_eq!(requests("limited", "4xx"), 2.0);
    assert_eq!(delta("outrider_retries_total{service=retry}"), 1.0);
    assert_eq!(delta("outrider_rate_limited_total{service=limited}"), 2.0);
    let flaky_ep = format!(
        "outrider_upstream_requests_total{{endpoint={},method=GET,service=retry,status_class=5xx}}",
        flaky.addr
    );
    assert_eq!(delta(&flaky_ep), 1.0);
    assert_eq!(delta("outrider_request_duration_seconds_count{service=ok}"), 3.0);
    assert_eq!(after.get("outrider_config_generation{}"), Some(&1.0));
    assert_eq!(after.get("outrider_requests_in_flight{service=ok}"), Some(&0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_the_trace_id() {
    let (collector, _spans) = start_collector().await;
    let backend = Backend::named("ok").await;
    let (admin, front) = (free_addr(), free_addr());
    let yaml = format!(
        "admin:\n  bind: {admin}\naccess_log:\n  enabled: true\n\
         listeners:\n  - {{ name: front, bind: {front}, service: svc }}\n\
         services:\n  svc: {{ endpoints: [{{ addr: {} }}] }}\n{}",
        backend.addr,
        tracing_yaml(collector, "")
    );
    let mut outrider = Binary::spawn(&yaml);
    outrider.logged("outrider started").await;
    let req = http::Request::get(format!("http://{front}/x"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(empty())
        .unwrap();
    assert_eq!(within(client().request(req)).await.unwrap().status(), 200);
    let line = within(outrider.out.recv()).await.expect("an access log line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("access log line is JSON");
    assert_eq!(json["trace_id"], TRACE);
    assert_eq!(json["status"], 200);
    assert_eq!(json["path"], "/x");
    assert_eq!(json["service"], "svc");
    assert_eq!(json["endpoint"], backend.addr.to_string());
    assert_eq!(json["attempts"], 1);
}

/// On a TLS listener the span names the client's verified identity; a TLS failure toward the
/// upstream says why on the span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_peer_identity_and_the_tls_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (collector, mut spans) = start_collector().await;
    let ca = support::tls::Ca::new("spans");
    let stranger = support::tls::Ca::new("stranger");
    let listener = ca.leaf("app", &["app.internal"]);
    let caller = ca.leaf("caller", &["spiffe://cluster.local/ns/shop/sa/cart"]);
    let upstream =
        support::tls::TlsBackend::named(stranger.leaf("up", &["127.0.0.1"]).server_config(None), "no").await;
    let extra = format!("    tls:\n      ca: {}\n", ca.cert.display());
    let yaml = one_service("http", &extra, &[(upstream.addr(), 1)]).replace(
        "    service: svc\n",
        &format!(
            "    service: svc\n    tls:\n      cert: {}\n      key: {}\n      client_ca: {}\n",
            listener.cert.display(),
            listener.key.display(),
            ca.cert.display()
        ),
    ) + &tracing_yaml(collector, "");
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();

    let config = Arc::new(caller.client_config(&ca.cert));
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.internal").unwrap();
    let mut tls = within(tokio_rustls::TlsConnector::from(config).connect(name, tcp)).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: app.internal\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    within(tls.read_to_string(&mut response)).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");

    // The retried attempt's span and the request's span (the first attempt's outcome is on it).
    let all = [next_span(&mut spans).await, next_span(&mut spans).await];
    for span in &all {
        assert_eq!(attr(span, "error.type").as_deref(), Some("tls_handshake_failed"));
        assert_eq!(attr(span, "outrider.tls_error").as_deref(), Some("unknown_ca"));
    }
    let request = all.iter().find(|s| s.parent_span_id.is_empty()).expect("the request's span");
    let identity = attr(request, "outrider.peer_identity");
    assert_eq!(identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/cart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_routing_decision() {
    let (collector, mut spans) = start_collector().await;
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - {{ name: front, bind: 127.0.0.1:0, service: svc }}\n\
         services:\n  svc:\n    routes:\n\
         \x20     - {{ name: beta, match: {{ headers: [{{ name: x-beta, present: true }}] }}, to: {{ version: v2 }} }}\n\
         \x20     - {{ name: gone, match: {{ path_prefix: /gone }}, to: {{ version: v9 }} }}\n\
         \x20   endpoints:\n      - {{ addr: \"{}\", tags: {{ version: v1 }} }}\n      - {{ addr: \"{}\", tags: {{ version: v2 }} }}\n{}",
        v1.addr,
        v2.addr,
        tracing_yaml(collector, "")
    );
    let app = start_app(&yaml).await;
    let front = app.listener_addr("front").await.unwrap();
    let req = http::Request::get(format!("http://{front}/")).header("x-beta", "1").body(empty()).unwrap();
    assert_eq!(within(client().request(req)).await.unwrap().status(), 200);
    let span = next_span(&mut spans).await;
    assert_eq!(attr(&span, "outrider.route").as_deref(), Some("beta"));
    assert_eq!(attr(&span, "outrider.subset").as_deref(), Some("version=v2"));
    assert_eq!(attr(&span, "outrider.fallback").as_deref(), Some("BoolValue(false)"));
    assert_eq!(attr(&span, "outrider.locality").as_deref(), Some("any"));
    assert_eq!(attr(&span, "outrider.endpoint"), Some(v2.addr.to_string()));

    assert_eq!(get(&client(), &format!("http://{front}/gone")).await.0, 200);
    let span = next_span(&mut spans).await;
    assert_eq!(attr(&span, "outrider.route").as_deref(), Some("gone"));
    assert_eq!(attr(&span, "outrider.fallback").as_deref(), Some("BoolValue(true)"));
    assert_eq!(attr(&span, "outrider.subset"), None, "fell back to the whole service");
}
