//! Typed settings for logs, access logs and traces, and their validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::file::{AccessLogFile, LoggingFile, TracingFile};
use super::human;
use super::validate::Validator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human text (coloured on a terminal).
    Text,
    /// One JSON object per line, for Fluentd/ELK.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outrider=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

/// Fields an access log line may carry.
pub const ACCESS_FIELDS: &[&str] = &[
    "time",
    "trace_id",
    "service",
    "endpoint",
    "method",
    "path",
    "status",
    "duration_ms",
    "attempts",
    "bytes",
    "reason",
    "listener",
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub sample_ratio: f64,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// For traces the app did not start: the share that is sampled. Traces that arrive with a
    /// `traceparent` follow the app's decision (parent-based).
    pub sampling_ratio: f64,
    pub service_name: String,
    pub resource: BTreeMap<String, String>,
    /// Spans waiting for export at most; beyond it they are dropped and counted.
    pub queue_size: usize,
    pub batch_size: usize,
    #[serde(with = "human")]
    pub export_timeout: Duration,
}

// === impl Validator ===

impl Validator {
    pub(super) fn logging(&mut self, l: LoggingFile) -> LoggingConfig {
        let format = match l.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                self.problem("logging.format", format!("unknown log format {other:?} (text or json)"));
                LogFormat::Text
            }
        };
        let level = l.level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.problem(
                "logging.level",
                format!("{level:?} is not a log filter (e.g. info, outrider=debug)"),
            );
        }
        LoggingConfig { format, level }
    }

    pub(super) fn access_log(&mut self, a: AccessLogFile) -> AccessLogConfig {
        let sample_ratio = self.ratio("access_log.sample_ratio", a.sample_ratio, 1.0);
        let fields = a.fields.unwrap_or_else(|| ACCESS_FIELDS.iter().map(|f| f.to_string()).collect());
        for (i, f) in fields.iter().enumerate() {
            if !ACCESS_FIELDS.contains(&f.as_str()) {
                let msg = format!("unknown field {f:?} (one of {})", ACCESS_FIELDS.join(", "));
                self.problem(&format!("access_log.fields[{i}]"), msg);
            }
        }
        AccessLogConfig { enabled: a.enabled.unwrap_or(false), sample_ratio, fields }
    }

    pub(super) fn tracing(&mut self, t: TracingFile) -> TracingConfig {
        let protocol = match t.protocol.as_deref().unwrap_or("grpc") {
            "grpc" => OtlpProtocol::Grpc,
            "http_protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                self.problem(
                    "tracing.protocol",
                    format!("unknown OTLP protocol {other:?} (grpc or http_protobuf)"),
                );
                OtlpProtocol::Grpc
            }
        };
        if !(t.endpoint.starts_with("http://") || t.endpoint.starts_with("https://")) {
            self.problem(
                "tracing.endpoint",
                format!("{:?} must be a URL like http://127.0.0.1:4317", t.endpoint),
            );
        }
        let queue_size = t.queue_size.unwrap_or(2048).max(1);
        TracingConfig {
            endpoint: t.endpoint,
            protocol,
            sampling_ratio: self.ratio("tracing.sampling_ratio", t.sampling_ratio, 0.1),
            service_name: t.service_name.unwrap_or_else(|| "outrider".into()),
            resource: t.resource,
            queue_size,
            batch_size: t.batch_size.unwrap_or(512).clamp(1, queue_size),
            export_timeout: self.duration(
                "tracing.export_timeout",
                t.export_timeout,
                Duration::from_secs(5),
                Duration::from_millis(10)..=Duration::from_secs(60),
            ),
        }
    }

    fn ratio(&mut self, path: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(0.0..=1.0).contains(&v) {
            self.problem(path, format!("a ratio from 0 to 1, got {v}"));
        }
        v.clamp(0.0, 1.0)
    }
}
