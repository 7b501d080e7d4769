//! File structs → typed [`Config`], collecting every problem with its YAML path and line.
//!
//! Owns: defaults, ranges, and cross-field checks (unique names and ports, listeners that
//! name a known service). Must not: stop at the first problem once the YAML has parsed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::RangeInclusive;
use std::time::Duration;

use std::sync::Arc;

use super::file::{File, ListenerFile, OverlayFile};
use super::locate::{Index, Pos, join_key};
use super::*;

/// Defaults for every optional field; `config/reference.yaml` documents the same values.
pub mod defaults {
    use std::time::Duration;

    pub const ADMIN_BIND: &str = "127.0.0.1:9901";
    pub const DRAIN_WINDOW: Duration = Duration::from_secs(5);
    pub const GRACE_PERIOD: Duration = Duration::from_secs(20);
    pub const CONNECT: Duration = Duration::from_secs(1);
    pub const REQUEST: Duration = Duration::from_secs(15);
    pub const IDLE: Duration = Duration::from_secs(30);
    pub const TCP_IDLE: Duration = Duration::from_secs(3600);
    pub const WEIGHT: u32 = 1;
    pub const MAX_ATTEMPTS: u32 = 2;
    pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
    pub const BACKOFF_MAX: Duration = Duration::from_millis(250);
    pub const RETRY_BUFFER: usize = 64 * 1024;
    pub const BUDGET_RATIO: f64 = 0.2;
    pub const BUDGET_MIN_PER_SECOND: u32 = 10;
    pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
    pub const CONSECUTIVE_FAILURES: u32 = 5;
    pub const BASE_EJECTION: Duration = Duration::from_secs(30);
    pub const MAX_EJECTION: Duration = Duration::from_secs(300);
    pub const MAX_EJECTION_PERCENT: u32 = 10;
    pub const PANIC_THRESHOLD: u32 = 50;
    pub const BREAKER_RATIO: f64 = 0.5;
    pub const BREAKER_MIN_REQUESTS: u32 = 20;
    pub const BREAKER_WINDOW: Duration = Duration::from_secs(10);
    pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(5);
    pub const MAX_IN_FLIGHT: u32 = 1024;

    /// Retried by default: failures where the request provably did not run (connect, refused
    /// stream), broken connections, gRPC UNAVAILABLE, and 502/503. Not timeouts (a slow
    /// upstream would get twice the load) and not 504. Non-idempotent requests that may have
    /// reached the upstream are never retried unless `non_idempotent: true`.
    pub fn retry_on() -> Vec<super::super::file::RetryToken> {
        use super::super::file::RetryToken::{Name, Status};
        let names = ["connect_failure", "refused_stream", "reset", "grpc_unavailable"];
        names.into_iter().map(|n| Name(n.into())).chain([Status(502), Status(503)]).collect()
    }

    pub const ETCD_DIAL: Duration = Duration::from_secs(2);
    pub const ETCD_REQUEST: Duration = Duration::from_secs(5);
    pub const MAX_WEIGHT: u32 = 65_535;
    pub const RESOLV_CONF: &str = "/etc/resolv.conf";
    pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DNS_MIN_REFRESH: Duration = Duration::from_secs(1);
    pub const DNS_MAX_REFRESH: Duration = Duration::from_secs(30);
    pub const ZONE_TAG: &str = "zone";
    pub const LEADER_TTL: Duration = Duration::from_secs(10);
    pub const SLOW_START_WINDOW: Duration = Duration::from_secs(30);
    pub const SLOW_START_FLOOR_PERCENT: u32 = 10;
    pub const SLOW_START_AGGRESSION: f64 = 1.0;
    /// gRPC's weighted round-robin defaults.
    pub const ORCA_BLACKOUT: Duration = Duration::from_secs(10);
    pub const ORCA_EXPIRATION: Duration = Duration::from_secs(180);
    pub const ORCA_UPDATE_PERIOD: Duration = Duration::from_secs(1);
    pub const ORCA_ERROR_PENALTY: f64 = 1.0;
    /// Envoy's `min_cluster_size`: fewer endpoints than this, and zones are ignored.
    pub const ZONE_MIN_ENDPOINTS: u32 = 6;
}

/// One thing wrong with a config, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the text came from when it is not the config file: an overlay's etcd key.
    pub origin: Option<String>,
    /// YAML path, e.g. `services.payments.endpoints[1].weight`; empty for the whole file.
    pub path: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "<file>" } else { &self.path };
        if let Some(origin) = &self.origin {
            write!(f, "etcd key {origin}: ")?;
        }
        match self.pos {
            Some(p) => write!(f, "{path} (line {}, column {}): {}", p.line, p.column, self.message),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

pub fn parse(text: &str, env: HashMap<String, String>) -> Result<Config, Vec<Problem>> {
    let source = Arc::new(Source { text: text.to_string(), env });
    layered(&source, &[])
}

/// The file's text with each service's overlay laid over it, validated as one config: a
/// problem inside an overlay names its etcd key and its path and line there.
pub fn layered(source: &Arc<Source>, overlays: &[Overlay]) -> Result<Config, Vec<Problem>> {
    let index = Index::build(&source.text);
    if index.is_empty() {
        let message = "the file has no settings (empty, or only comments): refusing it, since applying \
                       it would close every listener — a file caught mid-write looks like this";
        return Err(vec![Problem { origin: None, path: String::new(), pos: None, message: message.into() }]);
    }
    let options = serde_saphyr::Options::default().with_properties(source.env.clone());
    let mut file: File = serde_saphyr::from_str_with_options(&source.text, options)
        .map_err(|e| vec![from_serde(&index, &e)])?;
    let mut layers = Vec::new();
    let mut problems = Vec::new();
    for o in overlays {
        let oindex = Index::build(&o.text);
        let located = |mut p: Problem| {
            p.origin = Some(o.key.clone());
            p
        };
        let parsed: Result<OverlayFile, _> = serde_saphyr::from_str(&o.text);
        match (parsed, file.services.get_mut(&o.service)) {
            (Err(e), _) => problems.push(located(from_serde(&oindex, &e))),
            (Ok(_), None) => problems.push(located(Problem {
                origin: None,
                path: String::new(),
                pos: None,
                message: format!("the config file has no service {:?}", o.service),
            })),
            (Ok(overlay), Some(service)) => {
                service.overlay(overlay);
                layers.push((join_key("services", &o.service), o.key.clone(), oindex));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut v = Validator { index, layers, problems: Vec::new() };
    let mut config = v.config(file);
    config.source = Some(source.clone());
    if v.problems.is_empty() { Ok(config) } else { Err(v.problems) }
}

/// A YAML or schema error: serde stops at the first one, so this is the only problem reported.
fn from_serde(index: &Index, e: &serde_saphyr::Error) -> Problem {
    let pos = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| Pos { line: l.line() as usize, column: l.column() as usize });
    let path = pos.and_then(|p| index.path_at(p)).unwrap_or_default();
    let text = e.without_snippet().to_string();
    let mut message = text.lines().next().unwrap_or_default();
    if let Some(cut) = message.rfind(" at line ") {
        message = &message[..cut]; // the position is printed once, beside the path
    }
    // With `${VAR}` expansion on, the YAML crate hides unknown key names in case they came
    // from a secret; ours come from the file's own keys, which the index knows.
    let key = path.rsplit(['.', '[']).next().unwrap_or_default();
    let mut message = message.replace("an interpolated field", key);
    if let Some(var) = message.strip_prefix("missing property ") {
        let var = var.trim_matches('`').to_string();
        message = format!("environment variable {var} is not set (give a default: ${{{var}:-value}})");
    }
    Problem { origin: None, path, pos, message }
}

pub(super) struct Validator {
    index: Index,
    /// Overlays laid over the file: the service path they cover, their etcd key, their index.
    layers: Vec<(String, String, Index)>,
    problems: Vec<Problem>,
}

// === impl Validator ===

impl Validator {
    /// Records a problem at `path`, located in the overlay that set the value there (or an
    /// enclosing block) if one did, else in the file.
    pub(super) fn problem(&mut self, path: &str, message: impl Into<String>) {
        for (service, key, index) in &self.layers {
            let inner = path.strip_prefix(service.as_str()).and_then(|r| r.strip_prefix('.'));
            if let Some(pos) = inner.and_then(|inner| index.find_set(inner)) {
                self.problems.push(Problem {
                    origin: Some(key.clone()),
                    path: inner.unwrap_or_default().to_string(),
                    pos: Some(pos),
                    message: message.into(),
                });
                return;
            }
        }
        self.problems.push(Problem {
            origin: None,
            path: path.to_string(),
            pos: self.index.find(path),
            message: message.into(),
        });
    }

    fn config(&mut self, f: File) -> Config {
        let admin = AdminConfig {
            bind: self.addr("admin.bind", f.admin.bind.as_deref().unwrap_or(defaults::ADMIN_BIND)),
            limits: self.limits("admin.limits", f.admin.limits, &ADMIN_LIMITS),
        };
        let shutdown = ShutdownConfig {
            drain_window: self.duration(
                "shutdown.drain_window",
                f.shutdown.drain_window,
                defaults::DRAIN_WINDOW,
                Duration::ZERO..=Duration::from_secs(600),
            ),
            grace_period: self.duration(
                "shutdown.grace_period",
                f.shutdown.grace_period,
                defaults::GRACE_PERIOD,
                Duration::ZERO..=Duration::from_secs(3600),
            ),
        };
        let allowed = f.allowed_networks.map(|l| self.networks("allowed_networks", l)).unwrap_or_default();
        let zone = self.zone(f.zone);
        let services: BTreeMap<_, _> = f
            .services
            .into_iter()
            .map(|(name, s)| {
                let path = join_key("services", &name);
                if !valid_name(&name) {
                    self.problem(
                        &path,
                        format!(
                            "service name {name:?} must be non-empty ASCII letters, digits, '.', '_' or '-'"
                        ),
                    );
                }
                let service = self.service(&path, s, &allowed, &zone);
                (name, service)
            })
            .collect();
        let allow_no_listeners = f.allow_no_listeners.unwrap_or(false);
        let listeners: Vec<_> = f
            .listeners
            .inspect(|l| self.some_listeners(l.is_empty(), allow_no_listeners))
            .unwrap_or_else(|| {
                self.some_listeners(true, allow_no_listeners);
                Vec::new()
            })
            .into_iter()
            .enumerate()
            .map(|(i, l)| self.listener(&format!("listeners[{i}]"), l, &services))
            .collect();
        self.unique_listeners(&admin, &listeners);
        let etcd = f.etcd.map(|e| self.etcd(e));
        let uses_etcd = services.values().any(|s| matches!(s.discovery, DiscoveryConfig::Etcd { .. }));
        if uses_etcd && etcd.is_none() {
            self.problem("", "services use `discovery: etcd` but there is no top-level `etcd` block");
        }
        let register = f.register.map(|r| self.register(r));
        if register.is_some() && etcd.is_none() {
            self.problem("register", "registration needs the top-level `etcd` block");
        }
        let logging = self.logging(f.logging);
        let access_log = self.access_log(f.access_log);
        let tracing = f.tracing.map(|t| self.tracing(t));
        let uses_dns = services.values().any(|s| matches!(s.discovery, DiscoveryConfig::Dns { .. }));
        let dns = self.dns(f.dns, uses_dns);
        let leader = f.leader.map(|l| self.leader(l, register.as_ref()));
        let jobs = self.jobs(f.jobs.unwrap_or_default());
        if !jobs.is_empty() && leader.is_none() {
            self.problem("jobs", "jobs run on the leader only: they need the `leader` block");
        }
        if leader.is_some() && etcd.is_none() {
            self.problem("leader", "leader election needs the top-level `etcd` block");
        }
        Config {
            admin,
            shutdown,
            listeners,
            allow_no_listeners,
            services,
            etcd,
            register,
            logging,
            access_log,
            tracing,
            dns,
            leader,
            jobs,
            source: None,
        }
    }

    fn leader(&mut self, l: super::file::LeaderFile, register: Option<&RegisterConfig>) -> LeaderConfig {
        let election = match (l.election, register) {
            (Some(e), _) => e,
            (None, Some(r)) => r.service.clone(),
            (None, None) => {
                self.problem(
                    "leader.election",
                    "name the election (or register the app: its service is the default)",
                );
                String::new()
            }
        };
        if !election.is_empty() && !valid_name(&election) {
            self.problem(
                "leader.election",
                format!("{election:?}: use ASCII letters, digits, '.', '_' or '-'"),
            );
        }
        let secs = Duration::from_secs;
        let ttl = self.duration("leader.ttl", l.ttl, defaults::LEADER_TTL, secs(2)..=secs(600));
        let identity = l.identity.unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("pid-{}", std::process::id()))
        });
        LeaderConfig { election: format!("outrider/election/{election}"), ttl, identity }
    }

    fn jobs(&mut self, jobs: Vec<super::file::JobFile>) -> Vec<JobConfig> {
        let mut names = HashSet::new();
        jobs.into_iter()
            .enumerate()
            .map(|(i, j)| {
                let p = |k: &str| format!("jobs[{i}].{k}");
                if !valid_name(&j.name) || !names.insert(j.name.clone()) {
                    self.problem(&p("name"), format!("{:?}: a unique name of letters, digits, '.', '_' or '-'", j.name));
                }
                let schedule = match j.schedule.split_whitespace().count() {
                    5 => format!("0 {}", j.schedule.trim()),
                    _ => j.schedule.trim().to_string(),
                };
                if let Err(e) = super::parse_schedule(&schedule) {
                    self.problem(&p("schedule"), format!("{:?} is not a cron schedule (sec min hour day month weekday; seconds optional): {e}", j.schedule));
                }
                let timezone = j.timezone.unwrap_or_else(|| "UTC".into());
                if super::parse_offset(&timezone).is_none() {
                    self.problem(&p("timezone"), format!("{timezone:?}: UTC or a fixed offset like +02:00"));
                }
                match j.url.parse::<http::Uri>() {
                    Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {}
                    _ => self.problem(&p("url"), format!("{:?}: an http:// URL of the local app", j.url)),
                }
                let method = j.method.unwrap_or_else(|| "POST".into());
                if http::Method::from_bytes(method.as_bytes()).is_err() {
                    self.problem(&p("method"), format!("{method:?} is not a method"));
                }
                for (k, v) in &j.headers {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
                        self.problem(&format!("jobs[{i}].headers.{k}"), "not a valid header");
                    }
                }
                let timeout = self.duration(&p("timeout"), j.timeout, Duration::from_secs(30), Duration::from_millis(10)..=Duration::from_secs(86_400));
                let forbid_overlap = match j.concurrency.as_deref() {
                    None | Some("forbid") => true,
                    Some("allow") => false,
                    Some(other) => {
                        self.problem(&p("concurrency"), format!("{other:?}: forbid or allow"));
                        true
                    }
                };
                JobConfig {
                    name: j.name,
                    schedule,
                    timezone,
                    url: j.url,
                    method,
                    headers: j.headers,
                    body: j.body.unwrap_or_default(),
                    timeout,
                    forbid_overlap,
                }
            })
            .collect()
    }

    /// A config that proxies nothing is almost always a truncated or half-written file.
    fn some_listeners(&mut self, none: bool, allowed: bool) {
        if none && !allowed {
            self.problem(
                "listeners",
                "no listeners: Outrider would proxy nothing (is the file truncated?); list at least \
                 one, or set `allow_no_listeners: true` for a sidecar that only registers its app",
            );
        }
    }

    pub(super) fn count(&mut self, path: &str, n: Option<u32>, default: u32) -> NonZeroU32 {
        let n = n.unwrap_or(default);
        NonZeroU32::new(n).filter(|n| n.get() <= 100).unwrap_or_else(|| {
            self.problem(path, format!("must be between 1 and 100, got {n}"));
            NonZeroU32::MIN
        })
    }

    fn listener(
        &mut self,
        path: &str,
        l: ListenerFile,
        services: &BTreeMap<String, ServiceConfig>,
    ) -> ListenerConfig {
        if !valid_name(&l.name) {
            self.problem(
                &join_key(path, "name"),
                format!(
                    "listener name {:?} must be non-empty ASCII letters, digits, '.', '_' or '-'",
                    l.name
                ),
            );
        }
        if !services.contains_key(&l.service) {
            let known: Vec<_> = services.keys().map(String::as_str).collect();
            self.problem(
                &join_key(path, "service"),
                format!("unknown service {:?} (known: {})", l.service, known.join(", ")),
            );
        }
        ListenerConfig {
            bind: self.addr(&join_key(path, "bind"), &l.bind),
            limits: self.limits(&join_key(path, "limits"), l.limits, &LISTENER_LIMITS),
            tls: l.tls.map(|t| self.listener_tls(&join_key(path, "tls"), t)),
            name: l.name,
            protocol: l.protocol,
            service: l.service,
        }
    }

    /// Listener names must be unique, and no two sockets (admin included) may share a port.
    fn unique_listeners(&mut self, admin: &AdminConfig, listeners: &[ListenerConfig]) {
        let mut names = HashSet::new();
        let mut binds: Vec<(String, SocketAddr)> = vec![("admin.bind".into(), admin.bind)];
        for (i, l) in listeners.iter().enumerate() {
            if !names.insert(l.name.as_str()) {
                self.problem(
                    &format!("listeners[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            let path = format!("listeners[{i}].bind");
            if let Some((other, _)) = binds.iter().find(|(_, b)| clash(*b, l.bind)) {
                let msg = format!("port {} is already used by {other}", l.bind.port());
                self.problem(&path, msg);
            }
            binds.push((path, l.bind));
        }
    }

    pub(super) fn weight(&mut self, path: &str, w: Option<i64>) -> NonZeroU32 {
        let w = w.unwrap_or(i64::from(defaults::WEIGHT));
        match u32::try_from(w).ok().and_then(NonZeroU32::new) {
            Some(n) if n.get() <= defaults::MAX_WEIGHT => n,
            _ => {
                let max = defaults::MAX_WEIGHT;
                self.problem(path, format!("weight must be between 1 and {max}, got {w}"));
                NonZeroU32::MIN
            }
        }
    }

    /// CIDRs such as 10.0.0.0/8 or fd00::/8 (a bare address is a /32 or /128).
    pub(super) fn networks(&mut self, path: &str, list: Vec<String>) -> Vec<ipnet::IpNet> {
        let mut nets = Vec::new();
        for (i, text) in list.iter().enumerate() {
            let t = text.trim();
            match t.parse::<ipnet::IpNet>().or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) => nets.push(net),
                Err(_) => {
                    self.problem(&format!("{path}[{i}]"), format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8)"))
                }
            }
        }
        nets
    }

    pub(super) fn addr(&mut self, path: &str, text: &str) -> SocketAddr {
        text.trim().parse().unwrap_or_else(|_| {
            self.problem(
                path,
                format!(
                    "{text:?} is not an IP:port address (e.g. 127.0.0.1:8080; host names are not resolved)"
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        text: Option<String>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let Some(text) = text else { return default };
        let d = match humantime::parse_duration(text.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.problem(path, format!("{text:?} is not a duration ({e}); use e.g. 250ms, 5s, 1m"));
                return default;
            }
        };
        if !range.contains(&d) {
            let (lo, hi) =
                (humantime::format_duration(*range.start()), humantime::format_duration(*range.end()));
            self.problem(path, format!("{text} is out of range ({lo} to {hi})"));
        }
        d
    }
}

/// Two sockets clash when they share a non-zero port and their IPs overlap.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
