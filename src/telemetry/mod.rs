//! Telemetry: logs, access logs, traces, and the counters behind `/metrics`.
//!
//! Owns: process-wide logging setup, the [`Telemetry`] an `App` hands to every upstream,
//! and metric types (their exposition is the admin server's). Depends on `config` and
//! `tls` only. Must not: cost the request path more than atomic adds when a signal is off
//! (no tracer → no span work; access log off → nothing built).

pub(crate) mod access;
pub mod metrics;
pub(crate) mod trace;

use std::time::Duration;

use crate::config::{Config, LogFormat, LoggingConfig};

/// The signals configured at start. Not reloaded: changing them needs a restart.
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    pub(crate) tracing: Option<trace::Tracing>,
    pub(crate) access: Option<access::AccessLog>,
}

impl Telemetry {
    pub(crate) fn new(config: &Config) -> Result<Telemetry, opentelemetry_otlp::ExporterBuildError> {
        let tracing = config.tracing.as_ref().map(trace::Tracing::new).transpose()?;
        Ok(Telemetry { tracing, access: access::AccessLog::new(&config.access_log) })
    }

    /// Exports the spans still queued (graceful shutdown).
    pub(crate) async fn flush(&self) {
        if let Some(t) = &self.tracing {
            t.flush(Duration::from_secs(5)).await;
        }
    }
}

/// Installs the process's log subscriber: text (coloured on a terminal) or JSON lines, with
/// the level from the config unless `RUST_LOG` is set.
pub fn init_logging(cfg: &LoggingConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
    };
    if let Err(e) = result {
        eprintln!("outrider: logging already initialised: {e}");
    }
}
