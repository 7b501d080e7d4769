//! Access log: one JSON line per request on stdout (off by default; sampled; chosen fields).
//! Must not: block for long — lines are small and written with one `write_all`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::AccessLogConfig;

#[derive(Debug)]
pub struct AccessLog {
    cfg: AccessLogConfig,
}

/// What one request came to.
#[derive(Debug)]
pub struct Entry<'a> {
    pub service: &'a str,
    pub endpoint: Option<SocketAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub attempts: u32,
    /// Response body size when known up front (Content-Length).
    pub bytes: Option<u64>,
    /// The `x-outrider-error` reason when Outrider answered itself.
    pub reason: Option<&'a str>,
    pub trace_id: Option<String>,
}

impl AccessLog {
    pub fn new(cfg: &AccessLogConfig) -> Option<AccessLog> {
        cfg.enabled.then(|| AccessLog { cfg: cfg.clone() })
    }

    pub fn record(&self, e: &Entry<'_>) {
        if self.cfg.sample_ratio < 1.0 && fastrand::f64() >= self.cfg.sample_ratio {
            return;
        }
        let mut line = serde_json::to_vec(&self.line(e)).unwrap_or_default();
        line.push(b'\n');
        let _ = std::io::stdout().lock().write_all(&line);
    }

    fn line(&self, e: &Entry<'_>) -> Map<String, Value> {
        let mut m = Map::new();
        for f in &self.cfg.fields {
            let v = match f.as_str() {
                "time" => humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().into(),
                "trace_id" => e.trace_id.clone().map_or(Value::Null, Value::from),
                "service" => e.service.into(),
                "endpoint" => e.endpoint.map_or(Value::Null, |a| a.to_string().into()),
                "method" => e.method.into(),
                "path" => e.path.into(),
                "status" => e.status.into(),
                "duration_ms" => (e.duration.as_secs_f64() * 1000.0).into(),
                "attempts" => e.attempts.into(),
                "bytes" => e.bytes.map_or(Value::Null, Value::from),
                "reason" => e.reason.map_or(Value::Null, Value::from),
                _ => continue,
            };
            m.insert(f.clone(), v);
        }
        m
    }
}
