//! Limits on inbound connections — proxy listeners and the admin port — and their validation.
//! Every input a peer controls is bounded: connections, time to send a request head, idle
//! time, head size and header count.

use std::time::Duration;

use serde::Serialize;

use super::file::LimitsFile;
use super::human;
use super::locate::join_key;
use super::validate::Validator;

/// What an inbound connection may cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundLimits {
    /// Open connections on this socket at most; more are closed at once (logged and counted).
    pub max_connections: u32,
    /// From accept (or the end of the previous response) to a complete request head.
    #[serde(with = "human")]
    pub header_read_timeout: Duration,
    /// No byte in either direction for this long closes the connection.
    #[serde(with = "human")]
    pub idle_timeout: Duration,
    /// A request head larger than this is answered 431 (HTTP/1.1: request line and header
    /// fields as sent; HTTP/2: the decoded header list, as SETTINGS_MAX_HEADER_LIST_SIZE counts).
    pub max_header_bytes: usize,
    /// Header fields in one request at most; more are answered 431.
    pub max_headers: usize,
}

/// Defaults for proxy listeners: Envoy's head limits (60 KiB, 100 headers), nginx's style of
/// header timeout (from accept), Envoy's stream idle timeout (5 minutes).
pub const LISTENER_LIMITS: InboundLimits = InboundLimits {
    max_connections: 10_000,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(300),
    max_header_bytes: 60 * 1024,
    max_headers: 100,
};

/// Defaults for the admin port: probes and scrapes need few connections and small heads.
pub const ADMIN_LIMITS: InboundLimits = InboundLimits {
    max_connections: 128,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(300),
    max_header_bytes: 16 * 1024,
    max_headers: 100,
};

// === impl Validator ===

impl Validator {
    pub(super) fn limits(&mut self, path: &str, f: Option<LimitsFile>, d: &InboundLimits) -> InboundLimits {
        let f = f.unwrap_or_default();
        let p = |k| join_key(path, k);
        let (ms, secs) = (Duration::from_millis, Duration::from_secs);
        let max_connections = f.max_connections.unwrap_or(d.max_connections);
        if !(1..=1_000_000).contains(&max_connections) {
            self.problem(
                &p("max_connections"),
                format!("must be between 1 and 1000000, got {max_connections}"),
            );
        }
        let max_header_bytes = f.max_header_bytes.unwrap_or(d.max_header_bytes);
        if !(1024..=1 << 20).contains(&max_header_bytes) {
            self.problem(
                &p("max_header_bytes"),
                format!("must be between 1024 and 1048576, got {max_header_bytes}"),
            );
        }
        let max_headers = f.max_headers.unwrap_or(d.max_headers);
        if !(1..=1000).contains(&max_headers) {
            self.problem(&p("max_headers"), format!("must be between 1 and 1000, got {max_headers}"));
        }
        InboundLimits {
            max_connections: max_connections.clamp(1, 1_000_000),
            header_read_timeout: self.duration(
                &p("header_read_timeout"),
                f.header_read_timeout,
                d.header_read_timeout,
                ms(100)..=secs(300),
            ),
            idle_timeout: self.duration(
                &p("idle_timeout"),
                f.idle_timeout,
                d.idle_timeout,
                secs(1)..=secs(86_400),
            ),
            max_header_bytes: max_header_bytes.clamp(1024, 1 << 20),
            max_headers: max_headers.clamp(1, 1000),
        }
    }
}
