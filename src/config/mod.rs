//! Configuration: one YAML file in, one validated, typed [`Config`] out.
//!
//! Owns: parsing (`file`), `${VAR}` expansion, validation that reports *every* problem with
//! its YAML path and line (`validate`, `locate`), and the config hash. Must not: start
//! anything, or let raw YAML types leak past this module — runtime code sees only the types
//! below (`SocketAddr`, `Duration`, `NonZeroU32`, enums).

mod dns;
mod etcd;
mod file;
mod inbound;
mod locate;
mod resilience;
mod routing;
mod schedule;
mod services;
mod telemetry;
mod tls;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use inbound::{ADMIN_LIMITS, InboundLimits, LISTENER_LIMITS};
pub use resilience::*;
pub use routing::{
    Fallback, HashKey, HeaderMatch, HeaderTest, LocalityRule, Match, Pattern, RetryScope, Route, Routing,
    Selector, Share,
};
pub(crate) use schedule::{parse_offset, parse_schedule};
pub use telemetry::*;
pub use tls::{ListenerTls, TlsVersion, UpstreamTls, default_alpn};
pub use validate::{Problem, defaults};

/// The validated configuration. Cheap to compare, so reload can tell what changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub listeners: Vec<ListenerConfig>,
    /// A sidecar that only registers its app may have no listeners; otherwise that is an error.
    pub allow_no_listeners: bool,
    pub services: BTreeMap<String, ServiceConfig>,
    /// The etcd cluster that `discovery: etcd` services read; required when any does.
    pub etcd: Option<EtcdConfig>,
    /// Registration of the local app in etcd; needs the `etcd` block.
    pub register: Option<RegisterConfig>,
    pub logging: LoggingConfig,
    pub access_log: AccessLogConfig,
    /// OTLP trace export; `None`: no tracing.
    pub tracing: Option<TracingConfig>,
    /// How host names are resolved; used by services that name hosts.
    pub dns: DnsConfig,
    /// Leader election among the app's instances; needs the `etcd` block.
    pub leader: Option<LeaderConfig>,
    /// Scheduled calls to the local app that only the leader makes; need `leader`.
    pub jobs: Vec<JobConfig>,
    /// The text this was validated from, so etcd overlays can be laid over it again.
    #[serde(skip)]
    pub source: Option<Arc<Source>>,
}

/// Leader election through etcd's election API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderConfig {
    /// The election's name (its key prefix in etcd); instances with the same name compete.
    pub election: String,
    /// The lease the leadership hangs on: a leader that cannot renew it steps down before
    /// it expires, and a crashed leader's term ends when it does.
    #[serde(with = "human")]
    pub ttl: Duration,
    /// What this instance announces as the leader's value (default: the host name).
    pub identity: String,
}

/// A scheduled call to the local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobConfig {
    pub name: String,
    /// Six cron fields (seconds first); five given are taken with seconds 0.
    pub schedule: String,
    /// UTC, or a fixed offset such as +02:00.
    pub timezone: String,
    pub url: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    #[serde(with = "human")]
    pub timeout: Duration,
    /// A tick while the previous run still goes: skipped (`forbid`) or run too (`allow`).
    pub forbid_overlap: bool,
}

/// A config file's text and the environment its `${VAR}`s were expanded from.
#[derive(PartialEq, Eq)]
pub struct Source {
    pub text: String,
    pub env: std::collections::HashMap<String, String>,
}

/// The environment may hold secrets: only its variable names are printed.
impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source").field("text", &self.text).field("env", &self.env.keys()).finish()
    }
}

/// A service's live overlay as read from etcd: YAML or JSON text (see `file::OverlayFile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub service: String,
    pub key: String,
    pub text: String,
}

/// The resolver settings every DNS-discovered service shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsConfig {
    /// Search domains, `ndots`, and the name servers unless `servers` is set.
    pub resolv_conf: std::path::PathBuf,
    /// Name servers to ask instead of resolv.conf's (empty: resolv.conf's).
    pub servers: Vec<SocketAddr>,
    /// One query's time limit.
    #[serde(with = "human")]
    pub timeout: Duration,
    /// Bounds on the re-resolution interval, which otherwise follows the answer's TTL.
    #[serde(with = "human")]
    pub min_refresh: Duration,
    #[serde(with = "human")]
    pub max_refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisterConfig {
    pub service: String,
    /// The key is `<prefix><address>`; the value is etcd's naming format.
    pub key: String,
    pub address: SocketAddr,
    pub weight: NonZeroU32,
    pub metadata: BTreeMap<String, String>,
    #[serde(with = "human")]
    pub lease_ttl: Duration,
    /// After withdrawing the key on shutdown, how long to wait (peers' watches see the
    /// delete) before the drain starts.
    #[serde(with = "human")]
    pub deregistration_delay: Duration,
    pub health: HealthCheck,
    /// Advertised as the tags `tls: "true"` and `server_name`, so that callers with a `tls`
    /// block verify the app's listener certificate under this name.
    pub tls_server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub kind: ProbeKind,
    pub addr: SocketAddr,
    #[serde(with = "human")]
    pub interval: Duration,
    #[serde(with = "human")]
    pub timeout: Duration,
    pub healthy_threshold: NonZeroU32,
    pub unhealthy_threshold: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdConfig {
    /// URLs such as `http://10.0.0.5:2379` (https when `tls` is set).
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    #[serde(serialize_with = "redacted")]
    pub password: Option<String>,
    pub tls: Option<EtcdTls>,
    #[serde(with = "human")]
    pub dial_timeout: Duration,
    #[serde(with = "human")]
    pub request_timeout: Duration,
    /// Where the last-known-good endpoint set of each service is kept, so Outrider can start
    /// and serve while etcd is down. `None`: no snapshots.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// Where services' live overlays are kept (`<prefix><service>`); `None`: no overlays.
    pub overlay_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

fn redacted<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub limits: InboundLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long listeners keep proxying while `/ready` is false.
    #[serde(with = "human")]
    pub drain_window: Duration,
    /// After listeners stop accepting, how long in-flight requests may take to finish.
    #[serde(with = "human")]
    pub grace_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: ListenerProtocol,
    pub service: String,
    /// TCP listeners use `max_connections` only.
    pub limits: InboundLimits,
    /// Terminate TLS (HTTP/1.1 and h2 by ALPN, or TCP) in front of the service.
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    pub discovery: DiscoveryConfig,
    pub load_balancing: Policy,
    pub protocol: UpstreamProtocol,
    pub timeouts: Timeouts,
    #[serde(flatten)]
    pub resilience: Resilience,
    /// Originate TLS to the endpoints.
    pub tls: Option<UpstreamTls>,
    /// Weights that replace discovery's, by endpoint address, from the etcd overlay; 0 drains
    /// the endpoint (kept and shown, never picked).
    pub weights: BTreeMap<SocketAddr, u32>,
    /// Routes to subsets by endpoint tags, the ring-hash key, and zone preference.
    pub routing: Routing,
    /// Ramp a new endpoint's weight up instead of giving it its full share at once.
    pub slow_start: Option<SlowStart>,
    /// How `load_balancing: client_weighted` learns weights (`None` for other policies).
    pub client_weighted: Option<ClientWeighted>,
}

/// gRPC's weighted round-robin settings, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClientWeighted {
    /// A new run of reports counts only after this long.
    #[serde(with = "human")]
    pub blackout: Duration,
    /// Reports older than this are forgotten.
    #[serde(with = "human")]
    pub expiration: Duration,
    /// How often the weights are recomputed.
    #[serde(with = "human")]
    pub update_period: Duration,
    /// How much errors per second weigh against an endpoint, per unit of qps.
    pub error_penalty: f64,
}

/// Envoy's slow start: a new endpoint's weight is multiplied by
/// `max(floor, (age / window)^(1 / aggression))` until it is `window` old.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowStart {
    #[serde(with = "human")]
    pub window: Duration,
    /// The least share of its weight a new endpoint gets (0.1: 10 %).
    pub floor: f64,
    /// 1.0: linear; higher: the weight grows faster early.
    pub aggression: f64,
}

/// Where a service's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "source")]
pub enum DiscoveryConfig {
    Static {
        endpoints: Vec<EndpointSpec>,
    },
    /// Watch `prefix` in etcd; keep only instances whose tags match every `selector` entry
    /// and whose address falls in `allowed_networks` (empty: any).
    Etcd {
        prefix: String,
        selector: BTreeMap<String, String>,
        allowed_networks: Vec<ipnet::IpNet>,
    },
    /// Resolve `names` on their TTL; every address is an endpoint, next to the `fixed` ones
    /// (IP endpoints listed beside host names). Answers outside `allowed_networks` (empty:
    /// any) are refused.
    Dns {
        names: Vec<DnsTarget>,
        fixed: Vec<EndpointSpec>,
        allowed_networks: Vec<ipnet::IpNet>,
    },
}

/// One name a service's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsTarget {
    pub query: DnsQuery,
    /// Weight of each address an A/AAAA name gives (SRV records carry their own).
    pub weight: NonZeroU32,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsQuery {
    /// A and AAAA records of `name`, each with `port`.
    Host { name: String, port: u16 },
    /// SRV records of `name`: targets, ports and weights; the lowest priority that resolves.
    Srv { name: String },
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsQuery::Host { name, port } => write!(f, "{name}:{port}"),
            DnsQuery::Srv { name } => write!(f, "SRV {name}"),
        }
    }
}

/// One instance of a service as discovery reports it: plain data, no runtime state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    WeightedRoundRobin,
    LeastRequest,
    /// Lowest peak-EWMA latency × (in-flight + 1) per unit of weight (Linkerd's).
    PeakEwma,
    /// Smooth weighted round-robin over weights learned from the endpoints' ORCA reports.
    ClientWeighted,
    /// A consistent-hash ring over the endpoints, keyed by the service's `hash_key`.
    RingHash,
}

/// Whether a service prefers endpoints in this Outrider's zone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    #[default]
    Any,
    PreferLocal,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
    /// Whatever ALPN negotiates per connection (h2 or http/1.1); needs `tls`.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// TCP connect to an endpoint.
    #[serde(with = "human")]
    pub connect: Duration,
    /// From sending the request until the response headers arrive (bodies may stream longer).
    #[serde(with = "human")]
    pub request: Duration,
    /// A pooled HTTP upstream connection idle this long is closed. Keep it below the
    /// upstream's own keep-alive timeout to avoid reusing a connection it is closing.
    #[serde(with = "human")]
    pub idle: Duration,
    /// A TCP proxy connection with no bytes in either direction for this long is closed.
    #[serde(with = "human")]
    pub tcp_idle: Duration,
}

/// Why a config could not be loaded. `Invalid` carries every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{} in config", if n == 1 { "" } else { "s" })?;
        for p in self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

// === impl Config ===

impl Config {
    /// Reads, expands `${VAR}` from the process environment, and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses YAML text, expanding `${VAR}` and `${VAR:-default}` from the environment.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_with_env(text, std::env::vars().collect())
    }

    pub fn parse_with_env(
        text: &str,
        env: std::collections::HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        validate::parse(text, env).map_err(ConfigError::Invalid)
    }

    /// This config's file with `overlays` laid over it, validated again as a whole.
    pub fn with_overlays(&self, overlays: &[Overlay]) -> Result<Config, Vec<Problem>> {
        let Some(source) = &self.source else {
            let message = "this config was not read from text, so no overlay can be laid over it";
            return Err(vec![Problem {
                origin: None,
                path: String::new(),
                pos: None,
                message: message.into(),
            }]);
        };
        validate::layered(source, overlays)
    }

    /// A stable hash of the effective config: comment-only or formatting edits do not change it.
    /// Secrets are redacted in the JSON form, so they are hashed separately: rotating the etcd
    /// password in the file must count as a change.
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(serde_json::to_vec(self).unwrap_or_default());
        if let Some(password) = self.etcd.as_ref().and_then(|e| e.password.as_deref()) {
            hasher.update(b"\0etcd.password\0");
            hasher.update(password.as_bytes());
        }
        let digest = hasher.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Durations as humantime strings ("1s", "250ms") in the effective config output.
mod human {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}
