//! Access log: one JSON line per request on stdout (off by default; sampled; chosen fields).
//! Must not: block the request path — lines go through a bounded queue to a writer thread
//! (the span exporter's pattern); when stdout cannot keep up they are dropped and counted.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::AccessLogConfig;

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

#[derive(Debug)]
pub struct AccessLog {
    cfg: AccessLogConfig,
    lines: SyncSender<Vec<u8>>,
    /// Lines dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
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
        if !cfg.enabled {
            return None;
        }
        let (lines, queue) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new().name("access-log".into()).spawn(move || write(queue));
        if let Err(e) = spawned {
            tracing::error!("cannot start the access log writer: {e}");
            return None;
        }
        Some(AccessLog { cfg: cfg.clone(), lines, dropped: Arc::default() })
    }

    pub fn record(&self, e: &Entry<'_>) {
        if self.cfg.sample_ratio < 1.0 && fastrand::f64() >= self.cfg.sample_ratio {
            return;
        }
        let mut line = serde_json::to_vec(&self.line(e)).unwrap_or_default();
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = self.lines.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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

/// Writes queued lines to stdout, as many as are waiting in one write.
fn write(queue: Receiver<Vec<u8>>) {
    let out = std::io::stdout();
    while let Ok(mut batch) = queue.recv() {
        while let Ok(more) = queue.try_recv() {
            batch.extend_from_slice(&more);
            if batch.len() > 64 * 1024 {
                break;
            }
        }
        let mut out = out.lock();
        if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}
