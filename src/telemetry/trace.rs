//! OTLP traces: one CLIENT span per proxied request (children for retried attempts), W3C
//! trace context in and out, parent-based ratio sampling, and an exporter that can never
//! slow the request path.
//!
//! Owns: the tracer, the bounded export queue and its task. Spans go into a bounded channel
//! with `try_send`; when it is full they are dropped and counted, and a collector that is down
//! costs only failed exports (also counted). Must not: await anything on the request path.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::{OtlpProtocol, TracingConfig};

/// The tracer and what it reports about its own health.
#[derive(Debug)]
pub struct Tracing {
    /// 0: traces are only continued, never started (no span work without a `traceparent`).
    ratio: f64,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    queue: mpsc::Sender<Msg>,
    pub stats: Arc<ExportStats>,
}

#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans dropped because the queue was full or their export failed.
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
}

#[derive(Debug)]
enum Msg {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<Msg>,
    stats: Arc<ExportStats>,
}

// === impl Tracing ===

impl Tracing {
    pub fn new(cfg: &TracingConfig) -> Result<Tracing, opentelemetry_otlp::ExporterBuildError> {
        let resource = resource(cfg);
        let mut exporter = match cfg.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&cfg.endpoint)
                .with_timeout(cfg.export_timeout)
                .build()?,
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(opentelemetry_http::hyper::HyperClient::with_default_connector(
                    cfg.export_timeout,
                    None,
                ))
                .with_endpoint(format!("{}/v1/traces", cfg.endpoint.trim_end_matches('/')))
                .with_timeout(cfg.export_timeout)
                .build()?,
        };
        exporter.set_resource(&resource);
        let stats = Arc::new(ExportStats::default());
        let (queue, rx) = mpsc::channel(cfg.queue_size);
        tokio::spawn(export_loop(rx, exporter, cfg.batch_size, cfg.export_timeout, stats.clone()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor { queue: queue.clone(), stats: stats.clone() })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("outrider");
        Ok(Tracing {
            ratio: cfg.sampling_ratio,
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            queue,
            stats,
        })
    }

    /// Starts a CLIENT span continuing the trace in `headers` (or a new trace). Attributes
    /// are built only for sampled spans: an unsampled request pays for ids, not strings.
    /// With a sampling ratio of 0 and no incoming `traceparent` there is nothing to continue
    /// or record, so no span is made at all (`None`).
    pub fn start(
        &self,
        headers: &HeaderMap,
        name: &'static str,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        if self.ratio == 0.0 && !headers.contains_key("traceparent") {
            return None;
        }
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        Some(self.child(&parent, name, attributes))
    }

    pub fn child(
        &self,
        parent: &Context,
        name: &'static str,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(Cow::Borrowed(name))
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, parent);
        let cx = parent.with_span(span);
        if cx.span().is_recording() {
            for kv in attributes() {
                cx.span().set_attribute(kv);
            }
        }
        cx
    }

    /// Writes `traceparent`/`tracestate` for `cx` into an upstream request.
    pub fn inject(&self, cx: &Context, headers: &mut HeaderMap) {
        self.propagator.inject_context(cx, &mut HeaderInjector(headers));
    }

    /// Exports what is queued, waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Msg::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
        let _ = self.provider.shutdown_with_timeout(limit);
    }
}

/// Ends the span in `cx` with the outcome attributes (built only if it is sampled).
pub fn finish(
    cx: &Context,
    status: Option<u16>,
    error: Option<&'static str>,
    extra: impl FnOnce() -> Vec<KeyValue>,
) {
    let span = cx.span();
    if !span.is_recording() {
        span.end();
        return;
    }
    if let Some(s) = status {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if let Some(e) = error {
        span.set_attribute(KeyValue::new("error.type", e));
        span.set_status(opentelemetry::trace::Status::error(e));
    }
    for kv in extra() {
        span.set_attribute(kv);
    }
    span.end();
}

/// The span name for a method: the method itself, or `HTTP` for non-standard ones
/// (OpenTelemetry HTTP conventions), without allocating.
pub fn span_name(m: &http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "HTTP",
    }
}

pub fn trace_id(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Service name and attributes from the config, plus the Kubernetes downward-API variables
/// when present (POD_NAME, POD_NAMESPACE, NODE_NAME).
fn resource(cfg: &TracingConfig) -> Resource {
    let mut attrs: Vec<KeyValue> =
        cfg.resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
        ("NODE_NAME", "k8s.node.name"),
    ] {
        if let Ok(v) = std::env::var(var) {
            attrs.push(KeyValue::new(key, v));
        }
    }
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    Resource::builder().with_service_name(cfg.service_name.clone()).with_attributes(attrs).build()
}

// === impl QueueProcessor ===

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(Msg::Span(Box::new(span))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<Msg>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch_size: usize,
    timeout: Duration,
    stats: Arc<ExportStats>,
) {
    /// How long a partial batch waits for more spans before it is sent.
    const LINGER: Duration = Duration::from_millis(200);
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(msg) = rx.recv().await {
        let mut flush = None;
        match msg {
            Msg::Span(s) => batch.push(*s),
            Msg::Flush(ack) => flush = Some(ack),
        }
        while flush.is_none() && batch.len() < batch_size {
            match tokio::time::timeout(LINGER, rx.recv()).await {
                Ok(Some(Msg::Span(s))) => batch.push(*s),
                Ok(Some(Msg::Flush(ack))) => flush = Some(ack),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match tokio::time::timeout(timeout, exporter.export(std::mem::take(&mut batch))).await {
                Ok(Ok(())) => stats.exported.fetch_add(n, Ordering::Relaxed),
                Ok(Err(e)) => {
                    tracing::debug!("span export failed: {e}");
                    stats.dropped.fetch_add(n, Ordering::Relaxed)
                }
                Err(_) => stats.dropped.fetch_add(n, Ordering::Relaxed),
            };
        }
        if let Some(ack) = flush {
            let _ = ack.send(());
        }
    }
}
