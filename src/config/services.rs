//! Validation of one service: discovery, timeouts, and the resilience settings.

use std::num::NonZeroU32;
use std::time::Duration;

use http::StatusCode;

use super::file::{
    BreakerFile, ClientWeightedFile, DiscoveryKind, HealthCheckFile, OutlierFile, RateLimitFile, RetriesFile,
    RetryToken, ServiceFile, SlowStartFile,
};
use super::locate::join_key;
use super::validate::{Validator, defaults};
use super::*;

impl Validator {
    pub(super) fn service(
        &mut self,
        path: &str,
        mut s: ServiceFile,
        allowed: &[ipnet::IpNet],
        zone: &super::routing::Zone,
    ) -> ServiceConfig {
        let name = path.strip_prefix("services.").unwrap_or(path);
        let discovery = match s.discovery {
            DiscoveryKind::Etcd => {
                if s.endpoints.is_some() {
                    let msg = "`endpoints` is for `discovery: static`; etcd finds them";
                    self.problem(&join_key(path, "endpoints"), msg);
                }
                let e = s.etcd.take().unwrap_or_default();
                let prefix = e.prefix.unwrap_or_else(|| format!("svc/{name}/"));
                if prefix.is_empty() {
                    let msg = "an empty prefix would watch the whole keyspace";
                    self.problem(&join_key(path, "etcd.prefix"), msg);
                }
                let allowed_networks = match s.allowed_networks.take() {
                    Some(list) => self.networks(&join_key(path, "allowed_networks"), list),
                    None => allowed.to_vec(),
                };
                DiscoveryConfig::Etcd { prefix, selector: e.selector, allowed_networks }
            }
            DiscoveryKind::Dns => {
                if s.endpoints.is_some() {
                    let msg = "`endpoints` is for `discovery: static`; the `dns` block names them";
                    self.problem(&join_key(path, "endpoints"), msg);
                }
                if s.etcd.is_some() {
                    self.problem(&join_key(path, "etcd"), "`etcd` settings need `discovery: etcd`");
                }
                let names = self.dns_target(&join_key(path, "dns"), s.dns.take());
                let allowed_networks = match s.allowed_networks.take() {
                    Some(list) => self.networks(&join_key(path, "allowed_networks"), list),
                    None => allowed.to_vec(),
                };
                DiscoveryConfig::Dns { names, fixed: Vec::new(), allowed_networks }
            }
            DiscoveryKind::Static => {
                if s.etcd.is_some() {
                    self.problem(&join_key(path, "etcd"), "`etcd` settings need `discovery: etcd`");
                }
                if s.dns.is_some() {
                    self.problem(&join_key(path, "dns"), "a `dns` block needs `discovery: dns`");
                }
                let (fixed, names) = match s.endpoints.take() {
                    Some(list) => self.static_endpoints(&join_key(path, "endpoints"), list),
                    None => {
                        self.problem(path, "static discovery needs an `endpoints` list (it may be empty)");
                        (Vec::new(), Vec::new())
                    }
                };
                let networks = s.allowed_networks.take();
                if names.is_empty() {
                    if networks.is_some() {
                        let msg =
                            "`allowed_networks` filters discovered endpoints; static ones are listed here";
                        self.problem(&join_key(path, "allowed_networks"), msg);
                    }
                    DiscoveryConfig::Static { endpoints: fixed }
                } else {
                    let allowed_networks = match networks {
                        Some(list) => self.networks(&join_key(path, "allowed_networks"), list),
                        None => allowed.to_vec(),
                    };
                    DiscoveryConfig::Dns { names, fixed, allowed_networks }
                }
            }
        };
        let timeouts = self.timeouts(&join_key(path, "timeouts"), &s);
        let resilience = Resilience {
            retries: self.retries(&join_key(path, "retries"), s.retries, timeouts.request),
            outlier: self.outlier(&join_key(path, "outlier_detection"), s.outlier_detection),
            breaker: self.breaker(&join_key(path, "circuit_breaker"), s.circuit_breaker),
            health_check: s.health_check.map(|h| self.health_check(&join_key(path, "health_check"), h)),
            rate_limit: s.rate_limit.map(|r| self.rate_limit(&join_key(path, "rate_limit"), r)),
        };
        let tls = s.tls.take().map(|t| self.upstream_tls(&join_key(path, "tls"), t, s.protocol));
        if s.protocol == UpstreamProtocol::Auto && tls.is_none() {
            self.problem(
                &join_key(path, "protocol"),
                "protocol auto negotiates with ALPN: it needs a `tls` block",
            );
        }
        let weights = s.weights.take().map(|w| self.weight_overrides(&join_key(path, "weights"), w));
        let routing =
            self.routing(path, s.routes.take(), s.hash_key.take(), s.locality, s.load_balancing, zone);
        let slow_start =
            s.slow_start.take().map(|f| self.slow_start(&join_key(path, "slow_start"), f, s.load_balancing));
        let client_weighted = match (s.load_balancing, s.client_weighted.take()) {
            (Policy::ClientWeighted, f) => {
                Some(self.client_weighted(&join_key(path, "client_weighted"), f.unwrap_or_default()))
            }
            (_, Some(_)) => {
                self.problem(&join_key(path, "client_weighted"), "is for `load_balancing: client_weighted`");
                None
            }
            (_, None) => None,
        };
        ServiceConfig {
            routing,
            slow_start,
            client_weighted,
            weights: weights.unwrap_or_default(),
            discovery,
            load_balancing: s.load_balancing,
            protocol: s.protocol,
            timeouts,
            resilience,
            tls,
        }
    }

    fn slow_start(&mut self, path: &str, f: SlowStartFile, policy: Policy) -> SlowStart {
        if policy == Policy::RingHash {
            self.problem(path, "not with ring_hash: changing weights would move keys between endpoints");
        }
        let window = self.duration(
            &join_key(path, "window"),
            f.window,
            defaults::SLOW_START_WINDOW,
            Duration::from_secs(1)..=Duration::from_secs(3600),
        );
        let floor = f.floor_percent.unwrap_or(defaults::SLOW_START_FLOOR_PERCENT);
        if !(1..=100).contains(&floor) {
            self.problem(&join_key(path, "floor_percent"), format!("must be between 1 and 100, got {floor}"));
        }
        let aggression = f.aggression.unwrap_or(defaults::SLOW_START_AGGRESSION);
        if !(0.1..=10.0).contains(&aggression) {
            self.problem(
                &join_key(path, "aggression"),
                format!("must be between 0.1 and 10, got {aggression}"),
            );
        }
        SlowStart {
            window,
            floor: f64::from(floor.clamp(1, 100)) / 100.0,
            aggression: aggression.clamp(0.1, 10.0),
        }
    }

    fn client_weighted(&mut self, path: &str, f: ClientWeightedFile) -> ClientWeighted {
        let p = |k| join_key(path, k);
        let hour = Duration::from_secs(3600);
        let ms = Duration::from_millis(1);
        let penalty = f.error_penalty.unwrap_or(defaults::ORCA_ERROR_PENALTY);
        if !(0.0..=100.0).contains(&penalty) {
            self.problem(&p("error_penalty"), format!("must be between 0 and 100, got {penalty}"));
        }
        ClientWeighted {
            blackout: self.duration(
                &p("blackout"),
                f.blackout,
                defaults::ORCA_BLACKOUT,
                Duration::ZERO..=hour,
            ),
            expiration: self.duration(
                &p("expiration"),
                f.expiration,
                defaults::ORCA_EXPIRATION,
                Duration::from_secs(1)..=hour,
            ),
            update_period: self.duration(
                &p("update_period"),
                f.update_period,
                defaults::ORCA_UPDATE_PERIOD,
                ms * 100..=Duration::from_secs(60),
            ),
            error_penalty: penalty.clamp(0.0, 100.0),
        }
    }

    fn timeouts(&mut self, tp: &str, s: &ServiceFile) -> Timeouts {
        let t = &s.timeouts;
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        let p = |k| join_key(tp, k);
        Timeouts {
            connect: self.duration(
                &p("connect"),
                t.connect.clone(),
                defaults::CONNECT,
                ms..=Duration::from_secs(60),
            ),
            request: self.duration(&p("request"), t.request.clone(), defaults::REQUEST, ms..=hour),
            idle: self.duration(&p("idle"), t.idle.clone(), defaults::IDLE, ms..=hour),
            tcp_idle: self.duration(
                &p("tcp_idle"),
                t.tcp_idle.clone(),
                defaults::TCP_IDLE,
                Duration::from_secs(1)..=Duration::from_secs(86_400),
            ),
        }
    }

    fn retries(&mut self, path: &str, r: RetriesFile, request_timeout: Duration) -> Retries {
        let p = |k| join_key(path, k);
        let max_attempts = r.max_attempts.unwrap_or(defaults::MAX_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            self.problem(&p("max_attempts"), format!("must be between 1 and 10, got {max_attempts}"));
        }
        let (mut retry_on, mut retry_statuses) = (Vec::new(), Vec::new());
        let tokens = r.retry_on.unwrap_or_else(defaults::retry_on);
        for (i, t) in tokens.into_iter().enumerate() {
            match t {
                RetryToken::Status(code) => match StatusCode::from_u16(code) {
                    Ok(s) if s.is_server_error() || code == 429 => retry_statuses.push(s),
                    _ => self.problem(&format!("{path}.retry_on[{i}]"), format!("{code}: only 5xx and 429 are retried")),
                },
                RetryToken::Name(name) => match retry_condition(&name) {
                    Some(c) => retry_on.push(c),
                    None => self.problem(
                        &format!("{path}.retry_on[{i}]"),
                        format!("unknown condition {name:?} (connect_failure, refused_stream, reset, timeout, grpc_unavailable, or a status code)"),
                    ),
                },
            }
        }
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        let per_try = self.duration(&p("per_try_timeout"), r.per_try_timeout, request_timeout, ms..=hour);
        let backoff_base =
            self.duration(&p("backoff_base"), r.backoff_base, defaults::BACKOFF_BASE, ms..=hour);
        let backoff_max = self.duration(&p("backoff_max"), r.backoff_max, defaults::BACKOFF_MAX, ms..=hour);
        if backoff_max < backoff_base {
            self.problem(&p("backoff_max"), "must not be below backoff_base");
        }
        let buffer_bytes = r.buffer_bytes.unwrap_or(defaults::RETRY_BUFFER);
        if buffer_bytes > 16 << 20 {
            self.problem(&p("buffer_bytes"), format!("{buffer_bytes} is over the 16 MiB limit"));
        }
        let b = r.budget;
        let ratio = b.ratio.unwrap_or(defaults::BUDGET_RATIO);
        if !(0.0..=1.0).contains(&ratio) {
            self.problem(&format!("{path}.budget.ratio"), format!("must be between 0 and 1, got {ratio}"));
        }
        let window = self.duration(
            &format!("{path}.budget.window"),
            b.window,
            defaults::BUDGET_WINDOW,
            Duration::from_secs(1)..=Duration::from_secs(600),
        );
        Retries {
            max_attempts: max_attempts.clamp(1, 10),
            retry_on,
            retry_statuses,
            non_idempotent: r.non_idempotent.unwrap_or(false),
            per_try_timeout: per_try,
            backoff_base,
            backoff_max,
            buffer_bytes,
            budget: RetryBudget {
                ratio,
                min_per_second: b.min_per_second.unwrap_or(defaults::BUDGET_MIN_PER_SECOND),
                window,
            },
        }
    }

    fn outlier(&mut self, path: &str, o: OutlierFile) -> Outlier {
        let p = |k| join_key(path, k);
        let secs = Duration::from_secs;
        let base = self.duration(
            &p("base_ejection"),
            o.base_ejection,
            defaults::BASE_EJECTION,
            secs(1)..=secs(3600),
        );
        let max =
            self.duration(&p("max_ejection"), o.max_ejection, defaults::MAX_EJECTION, secs(1)..=secs(86_400));
        if max < base {
            self.problem(&p("max_ejection"), "must not be below base_ejection");
        }
        Outlier {
            consecutive_failures: o.consecutive_failures.unwrap_or(defaults::CONSECUTIVE_FAILURES),
            count_5xx: o.count_5xx.unwrap_or(true),
            base_ejection: base,
            max_ejection: max,
            max_ejection_percent: self.percent(
                &p("max_ejection_percent"),
                o.max_ejection_percent,
                defaults::MAX_EJECTION_PERCENT,
            ),
            panic_threshold_percent: self.percent(
                &p("panic_threshold_percent"),
                o.panic_threshold_percent,
                defaults::PANIC_THRESHOLD,
            ),
        }
    }

    fn breaker(&mut self, path: &str, b: BreakerFile) -> Breaker {
        let p = |k| join_key(path, k);
        let secs = Duration::from_secs;
        let failure_ratio = b.failure_ratio.unwrap_or(defaults::BREAKER_RATIO);
        if !(0.0..=1.0).contains(&failure_ratio) {
            self.problem(
                &p("failure_ratio"),
                format!("must be between 0 and 1 (0 turns it off), got {failure_ratio}"),
            );
        }
        Breaker {
            failure_ratio,
            min_requests: b.min_requests.unwrap_or(defaults::BREAKER_MIN_REQUESTS),
            window: self.duration(&p("window"), b.window, defaults::BREAKER_WINDOW, secs(1)..=secs(600)),
            open_for: self.duration(
                &p("open_for"),
                b.open_for,
                defaults::BREAKER_OPEN_FOR,
                Duration::from_millis(10)..=secs(600),
            ),
            half_open_requests: self.count(&p("half_open_requests"), b.half_open_requests, 1),
            max_in_flight: b.max_in_flight.unwrap_or(defaults::MAX_IN_FLIGHT).max(1),
        }
    }

    fn health_check(&mut self, path: &str, h: HealthCheckFile) -> ActiveHealth {
        let p = |k| join_key(path, k);
        let probe = match h.kind.as_deref().unwrap_or("http") {
            "http" => ProbeKind::Http {
                path: h.path.unwrap_or_else(|| "/".into()),
                host: h.host,
                statuses: self.status_ranges(&p("statuses"), h.statuses),
            },
            "tcp" => ProbeKind::Tcp,
            "grpc" => ProbeKind::Grpc { service: h.service.unwrap_or_default() },
            other => {
                self.problem(&p("kind"), format!("unknown health check kind {other:?} (http, tcp or grpc)"));
                ProbeKind::Tcp
            }
        };
        let (ms, secs) = (Duration::from_millis, Duration::from_secs);
        ActiveHealth {
            probe,
            interval: self.duration(&p("interval"), h.interval, secs(5), ms(50)..=secs(3600)),
            jitter: self.duration(&p("jitter"), h.jitter, ms(500), Duration::ZERO..=secs(600)),
            timeout: self.duration(&p("timeout"), h.timeout, secs(1), ms(10)..=secs(60)),
            healthy_threshold: self.count(&p("healthy_threshold"), h.healthy_threshold, 2),
            unhealthy_threshold: self.count(&p("unhealthy_threshold"), h.unhealthy_threshold, 3),
        }
    }

    fn status_ranges(&mut self, path: &str, list: Option<Vec<String>>) -> Vec<(u16, u16)> {
        let Some(list) = list else { return vec![(200, 399)] };
        list.iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let (lo, hi) = text.split_once('-').unwrap_or((text, text));
                match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && lo <= hi && hi <= 599 => Some((lo, hi)),
                    _ => {
                        self.problem(
                            &format!("{path}[{i}]"),
                            format!("{text:?} is not a status or range like 200-299"),
                        );
                        None
                    }
                }
            })
            .collect()
    }

    fn rate_limit(&mut self, path: &str, r: RateLimitFile) -> RateLimit {
        let p = |k| join_key(path, k);
        let per_second = NonZeroU32::new(r.per_second).unwrap_or_else(|| {
            self.problem(&p("per_second"), "must be at least 1");
            NonZeroU32::MIN
        });
        let burst = match r.burst.map(NonZeroU32::new) {
            None => per_second,
            Some(Some(b)) => b,
            Some(None) => {
                self.problem(&p("burst"), "must be at least 1");
                NonZeroU32::MIN
            }
        };
        if let Some(h) = &r.key_header
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            self.problem(&p("key_header"), format!("{h:?} is not a header name"));
        }
        RateLimit {
            per_second,
            burst,
            key_header: r.key_header,
            max_keys: r.max_keys.unwrap_or(10_000).max(1),
        }
    }

    fn percent(&mut self, path: &str, v: Option<u32>, default: u32) -> u32 {
        let v = v.unwrap_or(default);
        if v > 100 {
            self.problem(path, format!("a percentage from 0 to 100, got {v}"));
        }
        v.min(100)
    }
}

impl Validator {
    /// An overlay's `weights`: endpoint address → weight, 0 to drain.
    fn weight_overrides(&mut self, path: &str, w: BTreeMap<String, i64>) -> BTreeMap<SocketAddr, u32> {
        let mut out = BTreeMap::new();
        for (addr, weight) in w {
            let p = join_key(path, &addr);
            let Ok(a) = addr.trim().parse::<SocketAddr>() else {
                self.problem(&p, format!("{addr:?} is not an endpoint address (IP:port)"));
                continue;
            };
            match u32::try_from(weight) {
                Ok(w) if w <= defaults::MAX_WEIGHT => {
                    out.insert(a, w);
                }
                _ => self.problem(
                    &p,
                    format!("weight must be between 0 (drain) and {}, got {weight}", defaults::MAX_WEIGHT),
                ),
            }
        }
        out
    }
}

fn retry_condition(name: &str) -> Option<RetryOn> {
    Some(match name {
        "connect_failure" => RetryOn::ConnectFailure,
        "refused_stream" => RetryOn::RefusedStream,
        "reset" => RetryOn::Reset,
        "timeout" => RetryOn::Timeout,
        "grpc_unavailable" => RetryOn::GrpcUnavailable,
        _ => return None,
    })
}
