//! DNS discovery: resolve a service's names on their TTL and hand every address to the
//! service's owner as an endpoint — so a Kubernetes headless Service spreads traffic over
//! its pods with the same pickers, outlier detection and health checks as any endpoint.
//!
//! Rules, documented in the README:
//! - Each name is resolved again when its answer's TTL runs out, bounded by `min_refresh`
//!   and `max_refresh`. A/AAAA answers give one endpoint per address with the configured
//!   port; SRV answers give targets (resolved in turn), ports and weights — only the lowest
//!   priority that resolves to any address is used, and weight 0 counts as 1.
//! - A failed lookup (timeout, SERVFAIL, refused, unreachable server — for SRV, of the
//!   records or of any target looked up) keeps the name's last good addresses and retries sooner, doubling from `min_refresh` up to `max_refresh`.
//! - An empty answer (NXDOMAIN, or no records) is believed only when the lookup after it,
//!   `min_refresh` later, says the same; the name then contributes no endpoints.
//! - Nothing is handed over until every name has had its first answer, so `/ready` waits
//!   for the first resolution as it waits for etcd's first sync.
//!
//! Must not: block the request path — requests read the balancer's snapshot only.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use tokio_util::sync::CancellationToken;

use crate::config::{DnsConfig, DnsQuery, DnsTarget, EndpointSpec};
use crate::upstream::ServiceHandle;

/// The process's resolver, shared by every DNS-discovered service.
pub(crate) struct Resolver {
    inner: TokioResolver,
    config: DnsConfig,
}

/// What `/upstreams` and `/metrics` show of a service's DNS discovery.
#[derive(Debug, Default)]
pub struct DnsStatus {
    /// Addresses in the set last handed over (names' answers plus fixed endpoints).
    pub answers: AtomicU64,
    /// The shortest TTL among the last answers, in milliseconds (before the refresh bounds).
    pub ttl_ms: AtomicU64,
    /// Lookups that failed (the last good answer was kept).
    pub failures: AtomicU64,
    /// Answers refused because their address is outside `allowed_networks`.
    pub refused: AtomicU64,
    last: Mutex<Last>,
}

#[derive(Debug, Default)]
struct Last {
    resolved: Option<SystemTime>,
    error: Option<String>,
}

/// One service's names, as configured.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    pub(crate) service: String,
    pub(crate) names: Vec<DnsTarget>,
    pub(crate) fixed: Vec<EndpointSpec>,
    pub(crate) allowed: Vec<ipnet::IpNet>,
}

/// One lookup's outcome.
enum Answer {
    /// Addresses, and the TTL they may be used for.
    Found(Vec<EndpointSpec>, Duration),
    /// The name does not exist or has no records.
    Empty(String),
    /// The lookup failed: nothing is known.
    Failed(String),
}

/// A name's state between lookups.
#[derive(Debug, Default, Clone)]
struct Known {
    /// Its last believed set (`None`: never answered yet).
    set: Option<Vec<EndpointSpec>>,
    /// Consecutive empty answers not yet believed.
    empty: u32,
    /// Consecutive failed lookups.
    failed: u32,
}

// === impl Resolver ===

impl Resolver {
    /// Search domains and `ndots` from resolv.conf; its name servers unless `servers`
    /// replaces them. No cache: every refresh asks the servers, so TTLs are followed exactly.
    pub(crate) fn new(config: &DnsConfig) -> Result<Resolver, String> {
        let path = &config.resolv_conf;
        let mut text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(_) if !config.servers.is_empty() => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        if !config.servers.is_empty() {
            // resolv.conf without a name server does not parse; this one is replaced below.
            text.push_str("\nnameserver 127.0.0.1\n");
        }
        let (parsed, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(text)
            .map_err(|e| format!("cannot use {}: {e}", path.display()))?;
        let resolver_config = if config.servers.is_empty() {
            parsed
        } else {
            let servers = config.servers.iter().map(|a| name_server(*a)).collect();
            ResolverConfig::from_parts(parsed.domain().cloned(), parsed.search().to_vec(), servers)
        };
        opts.timeout = config.timeout;
        opts.attempts = opts.attempts.clamp(1, 3);
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot start the resolver: {e}"))?;
        Ok(Resolver { inner, config: config.clone() })
    }

    pub(crate) fn config(&self) -> &DnsConfig {
        &self.config
    }

    async fn resolve(&self, target: &DnsTarget) -> Answer {
        match &target.query {
            DnsQuery::Host { name, port } => self.addresses(name, *port, target.weight, &target.tags).await,
            DnsQuery::Srv { name } => self.srv(name, target).await,
        }
    }

    async fn addresses(
        &self,
        name: &str,
        port: u16,
        weight: NonZeroU32,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Answer {
        match self.inner.lookup_ip(name).await {
            Ok(lookup) => {
                let ttl = min_ttl(lookup.as_lookup().answers().iter().map(|r| r.ttl));
                let set: Vec<_> = lookup
                    .iter()
                    .map(|ip| EndpointSpec { addr: SocketAddr::new(ip, port), weight, tags: tags.clone() })
                    .collect();
                if set.is_empty() { Answer::Empty("no addresses".into()) } else { Answer::Found(set, ttl) }
            }
            Err(e) => classify(&e),
        }
    }

    /// SRV records, then each target's addresses; the lowest priority with any address.
    async fn srv(&self, name: &str, target: &DnsTarget) -> Answer {
        let lookup = match self.inner.srv_lookup(name).await {
            Ok(l) => l,
            Err(e) => return classify(&e),
        };
        let mut ttl = min_ttl(lookup.answers().iter().map(|r| r.ttl));
        let mut records: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Answer::Empty("no SRV records".into());
        }
        records.sort_by_key(|r| r.priority);
        let mut failure = None;
        let mut set = Vec::new();
        let mut priority = None;
        for r in records {
            if priority.is_some_and(|p| p != r.priority) && !set.is_empty() {
                break;
            }
            priority = Some(r.priority);
            let weight = NonZeroU32::new(u32::from(r.weight)).unwrap_or(NonZeroU32::MIN);
            match self.addresses(&r.target.to_ascii(), r.port, weight, &target.tags).await {
                Answer::Found(found, t) => {
                    ttl = ttl.min(t);
                    set.extend(found);
                }
                Answer::Empty(_) => {}
                Answer::Failed(e) => failure = Some(e),
            }
        }
        match (failure, set.is_empty()) {
            // A target we could not resolve may still have its addresses: the answer is
            // incomplete, so the name keeps its last set rather than losing that target's.
            (Some(e), _) => Answer::Failed(e),
            (None, false) => Answer::Found(set, ttl),
            (None, true) => Answer::Empty("no SRV target has an address".into()),
        }
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("config", &self.config).finish_non_exhaustive()
    }
}

fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut server.connections {
        c.port = addr.port();
    }
    server
}

fn min_ttl(ttls: impl Iterator<Item = u32>) -> Duration {
    Duration::from_secs(u64::from(ttls.min().unwrap_or(0)))
}

fn classify(e: &NetError) -> Answer {
    if e.is_nx_domain() || e.is_no_records_found() {
        Answer::Empty(if e.is_nx_domain() { "NXDOMAIN".into() } else { "no records".into() })
    } else {
        Answer::Failed(e.to_string())
    }
}

// === impl DnsStatus ===

impl DnsStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Last> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds since the Unix epoch of the last successful resolution of every name.
    pub fn last_resolution(&self) -> Option<f64> {
        let t = self.lock().resolved?;
        t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let last = self.lock();
        let since = last.resolved.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64());
        serde_json::json!({
            "state": if last.resolved.is_some() { "resolved" } else { "resolving" },
            "seconds_since_resolution": since,
            "ttl_seconds": self.ttl_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            "answers": self.answers.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "refused_endpoints": self.refused.load(Ordering::Relaxed),
            "last_error": last.error,
        })
    }
}

// === impl Watch ===

impl Watch {
    pub(crate) async fn run(
        self,
        resolver: Arc<Resolver>,
        service: ServiceHandle,
        status: Arc<DnsStatus>,
        stop: CancellationToken,
    ) {
        let c = resolver.config().clone();
        let mut known = vec![Known::default(); self.names.len()];
        let mut published: Option<Vec<EndpointSpec>> = None;
        loop {
            let answers = tokio::select! {
                () = stop.cancelled() => return,
                a = self.resolve_all(&resolver) => a,
            };
            let mut next = c.max_refresh;
            let mut ttl = Duration::MAX;
            let mut errors = Vec::new();
            for ((target, k), answer) in self.names.iter().zip(&mut known).zip(answers) {
                match answer {
                    Answer::Found(set, t) => {
                        *k = Known { set: Some(set), empty: 0, failed: 0 };
                        ttl = ttl.min(t);
                        next = next.min(t.clamp(c.min_refresh, c.max_refresh));
                    }
                    Answer::Empty(why) => {
                        k.failed = 0;
                        k.empty += 1;
                        if k.empty >= 2 {
                            if k.set.as_ref().is_none_or(|s| !s.is_empty()) {
                                tracing::warn!(service = %self.service, name = %target.query, "DNS says the name has no addresses ({why}): it contributes no endpoints");
                            }
                            k.set = Some(Vec::new());
                        } else {
                            next = c.min_refresh;
                        }
                    }
                    Answer::Failed(e) => {
                        status.failures.fetch_add(1, Ordering::Relaxed);
                        k.empty = 0;
                        let retry = c.min_refresh.saturating_mul(1 << k.failed.min(16)).min(c.max_refresh);
                        k.failed += 1;
                        next = next.min(retry);
                        tracing::warn!(service = %self.service, name = %target.query, retry_in = ?retry, "DNS lookup failed, keeping the last addresses: {e}");
                        errors.push(format!("{}: {e}", target.query));
                    }
                }
            }
            if ttl != Duration::MAX {
                status.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
            }
            {
                let mut last = status.lock();
                if errors.is_empty() {
                    last.resolved = Some(SystemTime::now());
                    last.error = None;
                } else {
                    last.error = Some(errors.join("; "));
                }
            }
            if known.iter().all(|k| k.set.is_some()) {
                let (set, refused) = self.merge(&known);
                if published.as_ref() != Some(&set) {
                    for addr in refused {
                        status.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(service = %self.service, endpoint = %addr, "refusing a DNS answer outside allowed_networks");
                    }
                    tracing::info!(service = %self.service, endpoints = set.len(), "DNS endpoint set");
                    status.answers.store(set.len() as u64, Ordering::Relaxed);
                    service.update(set.clone());
                    published = Some(set);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(next) => {}
            }
        }
    }

    /// Every name at once, each bounded by the resolver's own timeout and attempts.
    async fn resolve_all(&self, resolver: &Arc<Resolver>) -> Vec<Answer> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, target) in self.names.iter().enumerate() {
            let (resolver, target) = (resolver.clone(), target.clone());
            tasks.spawn(async move { (i, resolver.resolve(&target).await) });
        }
        let mut answers: Vec<Option<Answer>> = (0..self.names.len()).map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, a)) = done {
                answers[i] = Some(a);
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Answer::Failed("lookup task failed".into())))
            .collect()
    }

    /// Fixed endpoints, then every name's addresses in allowed networks, each address once;
    /// and the answers refused for being outside them.
    fn merge(&self, known: &[Known]) -> (Vec<EndpointSpec>, Vec<SocketAddr>) {
        let mut seen: HashSet<SocketAddr> = self.fixed.iter().map(|e| e.addr).collect();
        let mut set = self.fixed.clone();
        let mut refused = Vec::new();
        for e in known.iter().flat_map(|k| k.set.iter().flatten()) {
            if !super::in_networks(&self.allowed, e.addr.ip()) {
                refused.push(e.addr);
            } else if seen.insert(e.addr) {
                set.push(e.clone());
            }
        }
        (set, refused)
    }
}
