//! The YAML file as serde sees it: plain data, every field optional where a default exists.
//!
//! Owns: the exact shape of the file (`deny_unknown_fields` everywhere). Must not: hold
//! parsed addresses or durations — those are strings here so that `validate` can report
//! every bad value at once, with its path, instead of stopping at the first one.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ListenerProtocol, Locality, Policy, UpstreamProtocol};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub shutdown: ShutdownFile,
    /// `None` when the key is absent (a truncated file), so validation can say so.
    pub listeners: Option<Vec<ListenerFile>>,
    /// A config without listeners is refused unless this says it is meant (registration only).
    pub allow_no_listeners: Option<bool>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceFile>,
    pub etcd: Option<EtcdFile>,
    pub register: Option<RegisterFile>,
    #[serde(default)]
    pub logging: LoggingFile,
    #[serde(default)]
    pub access_log: AccessLogFile,
    pub tracing: Option<TracingFile>,
    /// CIDRs discovered endpoints must fall in (every service's default).
    pub allowed_networks: Option<Vec<String>>,
    /// How host names are resolved (services with `discovery: dns` or `host:port` endpoints).
    #[serde(default)]
    pub dns: DnsFile,
    /// This Outrider's zone, for services with `locality: prefer_local`.
    pub zone: Option<ZoneFile>,
    /// Leader election among the app's instances.
    pub leader: Option<LeaderFile>,
    /// Scheduled calls to the local app, made only by the leader.
    pub jobs: Option<Vec<JobFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    pub schedule: String,
    pub timezone: Option<String>,
    pub url: String,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub timeout: Option<String>,
    pub concurrency: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderFile {
    pub election: Option<String>,
    pub ttl: Option<String>,
    pub identity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneFile {
    pub name: Option<String>,
    pub tag: Option<String>,
    pub min_endpoints: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    pub resolv_conf: Option<String>,
    pub servers: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub min_refresh: Option<String>,
    pub max_refresh: Option<String>,
}

/// A service's `dns` block (`discovery: dns`): a name and port, or an SRV name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDnsFile {
    pub name: Option<String>,
    pub port: Option<u16>,
    pub srv: Option<String>,
    /// Weight of each address a `name` resolves to (SRV records carry their own).
    pub weight: Option<i64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingFile {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    pub enabled: Option<bool>,
    pub sample_ratio: Option<f64>,
    pub fields: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    pub endpoint: String,
    pub protocol: Option<String>,
    pub sampling_ratio: Option<f64>,
    pub service_name: Option<String>,
    #[serde(default)]
    pub resource: BTreeMap<String, String>,
    pub queue_size: Option<usize>,
    pub batch_size: Option<usize>,
    pub export_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterFile {
    pub service: String,
    pub address: String,
    pub prefix: Option<String>,
    pub weight: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub lease_ttl: Option<String>,
    pub deregistration_delay: Option<String>,
    pub health: Option<HealthFile>,
    /// The app is reached through a TLS listener with a certificate for this name.
    pub tls_server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// `http` (GET `path`, 2xx is healthy) or `tcp` (connect).
    pub kind: Option<String>,
    pub addr: Option<String>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<EtcdTlsFile>,
    pub dial_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub snapshot_dir: Option<String>,
    pub overlay_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsFile {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEtcdFile {
    pub prefix: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub bind: Option<String>,
    pub limits: Option<LimitsFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    pub drain_window: Option<String>,
    pub grace_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: String,
    pub bind: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    pub service: String,
    pub limits: Option<LimitsFile>,
    pub tls: Option<ListenerTlsFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    #[serde(default)]
    pub discovery: DiscoveryKind,
    #[serde(default)]
    pub endpoints: Option<Vec<EndpointFile>>,
    pub etcd: Option<ServiceEtcdFile>,
    pub dns: Option<ServiceDnsFile>,
    #[serde(default)]
    pub load_balancing: Policy,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub retries: RetriesFile,
    #[serde(default)]
    pub outlier_detection: OutlierFile,
    #[serde(default)]
    pub circuit_breaker: BreakerFile,
    pub health_check: Option<HealthCheckFile>,
    pub rate_limit: Option<RateLimitFile>,
    pub allowed_networks: Option<Vec<String>>,
    pub tls: Option<UpstreamTlsFile>,
    /// The key `load_balancing: ring_hash` hashes.
    pub hash_key: Option<HashKeyFile>,
    pub slow_start: Option<SlowStartFile>,
    pub client_weighted: Option<ClientWeightedFile>,
    #[serde(default)]
    pub locality: Locality,
    pub routes: Option<Vec<RouteFile>>,
    /// Weight overrides by endpoint address (0: drained); only an etcd overlay sets them.
    #[serde(skip)]
    pub weights: Option<BTreeMap<String, i64>>,
}

/// A service's live overlay, read from its etcd key: the settings that may change live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayFile {
    pub weights: Option<BTreeMap<String, i64>>,
    pub load_balancing: Option<Policy>,
    pub timeouts: Option<TimeoutsFile>,
    pub retries: Option<RetriesFile>,
    pub outlier_detection: Option<OutlierFile>,
    pub circuit_breaker: Option<BreakerFile>,
    pub rate_limit: Option<RateLimitFile>,
    pub routes: Option<Vec<RouteFile>>,
}

/// Copies every field the overlay sets over the file's value.
macro_rules! overlay_fields {
    ($base:expr, $over:expr; $($field:ident),+) => {
        $( if $over.$field.is_some() { $base.$field = $over.$field; } )+
    };
}

impl ServiceFile {
    /// File < overlay: each setting the overlay names replaces the file's, field by field
    /// inside `timeouts`, `retries` (and its `budget`), `outlier_detection` and
    /// `circuit_breaker`; `rate_limit`, `weights` and `routes` replace the file's whole.
    pub fn overlay(&mut self, o: OverlayFile) {
        if let Some(p) = o.load_balancing {
            self.load_balancing = p;
        }
        if let Some(t) = o.timeouts {
            overlay_fields!(self.timeouts, t; connect, request, idle, tcp_idle);
        }
        if let Some(r) = o.retries {
            let b = r.budget;
            overlay_fields!(self.retries.budget, b; ratio, min_per_second, window);
            overlay_fields!(self.retries, r; max_attempts, retry_on, non_idempotent, per_try_timeout,
                backoff_base, backoff_max, buffer_bytes);
        }
        if let Some(x) = o.outlier_detection {
            overlay_fields!(self.outlier_detection, x; consecutive_failures, count_5xx, base_ejection,
                max_ejection, max_ejection_percent, panic_threshold_percent);
        }
        if let Some(c) = o.circuit_breaker {
            overlay_fields!(self.circuit_breaker, c; failure_ratio, min_requests, window, open_for,
                half_open_requests, max_in_flight);
        }
        if o.rate_limit.is_some() {
            self.rate_limit = o.rate_limit;
        }
        if o.weights.is_some() {
            self.weights = o.weights;
        }
        if o.routes.is_some() {
            self.routes = o.routes;
        }
    }
}

/// A `retry_on` entry: a condition name or a status code.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RetryToken {
    Status(u16),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    pub max_attempts: Option<u32>,
    pub retry_on: Option<Vec<RetryToken>>,
    pub non_idempotent: Option<bool>,
    pub per_try_timeout: Option<String>,
    pub backoff_base: Option<String>,
    pub backoff_max: Option<String>,
    pub buffer_bytes: Option<usize>,
    #[serde(default)]
    pub budget: BudgetFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    pub ratio: Option<f64>,
    pub min_per_second: Option<u32>,
    pub window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub consecutive_failures: Option<u32>,
    pub count_5xx: Option<bool>,
    pub base_ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub panic_threshold_percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    pub failure_ratio: Option<f64>,
    pub min_requests: Option<u32>,
    pub window: Option<String>,
    pub open_for: Option<String>,
    pub half_open_requests: Option<u32>,
    pub max_in_flight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// Healthy statuses, e.g. ["200-299", "304"]; default 200-399.
    pub statuses: Option<Vec<String>>,
    /// gRPC service name for `kind: grpc`; default "" (the whole server).
    pub service: Option<String>,
    pub interval: Option<String>,
    pub jitter: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub per_second: u32,
    pub burst: Option<u32>,
    pub key_header: Option<String>,
    pub max_keys: Option<usize>,
}

/// Which discovery source feeds a service.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryKind {
    #[default]
    Static,
    Etcd,
    Dns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub addr: String,
    /// Signed so that `weight: -1` reaches validation and gets a message with its path.
    pub weight: Option<i64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub connect: Option<String>,
    pub request: Option<String>,
    pub idle: Option<String>,
    pub tcp_idle: Option<String>,
}

/// A listener's (or the admin port's) inbound limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_connections: Option<u32>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
}

/// A service's `tls` block: TLS to its endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub ca: Option<String>,
    pub system_roots: Option<bool>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
    pub min_version: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub allowed_sans: Option<Vec<String>>,
}

/// A listener's `tls` block: TLS termination in front of its service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
    pub allowed_identities: Option<Vec<String>>,
    pub min_version: Option<String>,
    pub forward_client_cert: Option<bool>,
}

/// What a request is hashed on: exactly one of the four.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashKeyFile {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub path: Option<bool>,
    pub source: Option<bool>,
}

/// One routing rule: what it matches, and the subset (or split of subsets) it sends to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: MatchFile,
    pub to: Option<BTreeMap<String, String>>,
    pub split: Option<Vec<SplitFile>>,
    pub sticky: Option<HashKeyFile>,
    pub fallback: Option<String>,
    pub fallback_to: Option<BTreeMap<String, String>>,
    pub retries: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub headers: Option<Vec<HeaderMatchFile>>,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchFile {
    pub name: String,
    pub equals: Option<String>,
    pub present: Option<bool>,
    pub regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitFile {
    pub to: BTreeMap<String, String>,
    /// Signed so that a negative weight reaches validation and gets a message with its path.
    pub weight: i64,
}

/// A new endpoint's weight ramps up over `window`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStartFile {
    pub window: Option<String>,
    pub floor_percent: Option<u32>,
    pub aggression: Option<f64>,
}

/// How `load_balancing: client_weighted` learns weights from ORCA reports.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientWeightedFile {
    pub blackout: Option<String>,
    pub expiration: Option<String>,
    pub update_period: Option<String>,
    pub error_penalty: Option<f64>,
}
