//! Validation of the `dns` resolver block, of `discovery: dns`, and of `host:port`
//! endpoints in a static list (which make that list DNS-resolved).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::file::{DnsFile, EndpointFile, ServiceDnsFile};
use super::locate::join_key;
use super::validate::{Validator, defaults};
use super::*;

/// An endpoint's `addr` as written: an address, or a name to resolve.
pub(super) enum Addr {
    Ip(SocketAddr),
    Host(String, u16),
}

impl Validator {
    /// The resolver settings. `used`: some service resolves names, so the resolver must be
    /// able to start (resolv.conf readable unless `servers` replaces its name servers).
    pub(super) fn dns(&mut self, f: DnsFile, used: bool) -> DnsConfig {
        let resolv_conf = f.resolv_conf.unwrap_or_else(|| defaults::RESOLV_CONF.to_string());
        let servers: Vec<SocketAddr> = f
            .servers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let t = text.trim();
                let parsed = t
                    .parse::<SocketAddr>()
                    .ok()
                    .or_else(|| t.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
                if parsed.is_none() {
                    self.problem(
                        &format!("dns.servers[{i}]"),
                        format!("{text:?} is not a name server address (IP or IP:port, e.g. 10.96.0.10:53)"),
                    );
                }
                parsed
            })
            .collect();
        if used && servers.is_empty() {
            match std::fs::read_to_string(&resolv_conf) {
                Ok(text) if text.lines().any(|l| l.trim_start().starts_with("nameserver")) => {}
                Ok(_) => self.problem(
                    "dns.resolv_conf",
                    format!("{resolv_conf} lists no name server; add one or set dns.servers"),
                ),
                Err(e) => self.problem(
                    "dns.resolv_conf",
                    format!("cannot read {resolv_conf}: {e} (set dns.servers to name the servers)"),
                ),
            }
        }
        let ms = Duration::from_millis(1);
        let timeout =
            self.duration("dns.timeout", f.timeout, defaults::DNS_TIMEOUT, 10 * ms..=Duration::from_secs(30));
        let hour = Duration::from_secs(3600);
        let min_refresh =
            self.duration("dns.min_refresh", f.min_refresh, defaults::DNS_MIN_REFRESH, 100 * ms..=hour);
        let max_refresh =
            self.duration("dns.max_refresh", f.max_refresh, defaults::DNS_MAX_REFRESH, 100 * ms..=hour);
        if max_refresh < min_refresh {
            self.problem("dns.max_refresh", "must not be below min_refresh");
        }
        DnsConfig { resolv_conf: resolv_conf.into(), servers, timeout, min_refresh, max_refresh }
    }

    /// `discovery: dns`: exactly one of `name` + `port`, or `srv`.
    pub(super) fn dns_target(&mut self, path: &str, d: Option<ServiceDnsFile>) -> Vec<DnsTarget> {
        let Some(d) = d else {
            self.problem(path, "`discovery: dns` needs a `dns` block: `name` and `port`, or `srv`");
            return Vec::new();
        };
        let p = |k| join_key(path, k);
        let weight = self.weight(&p("weight"), d.weight);
        let query = match (d.name, d.port, d.srv) {
            (Some(name), Some(port), None) => {
                self.host_name(&p("name"), &name);
                if port == 0 {
                    self.problem(&p("port"), "port must be between 1 and 65535");
                }
                DnsQuery::Host { name, port }
            }
            (None, None, Some(name)) => {
                self.host_name(&p("srv"), &name);
                if d.weight.is_some() {
                    self.problem(&p("weight"), "SRV records carry their own weights");
                }
                DnsQuery::Srv { name }
            }
            (Some(_), None, None) => {
                self.problem(&p("port"), "a `name` needs a `port` (or use `srv`, whose records carry ports)");
                return Vec::new();
            }
            (None, Some(_), None) => {
                self.problem(path, "`port` needs a `name` to resolve");
                return Vec::new();
            }
            (None, None, None) => {
                self.problem(path, "set `name` and `port`, or `srv`");
                return Vec::new();
            }
            (_, _, Some(_)) => {
                self.problem(&p("srv"), "`srv` gives ports itself: use either `srv` or `name` + `port`");
                return Vec::new();
            }
        };
        vec![DnsTarget { query, weight, tags: d.tags }]
    }

    /// A static list: IP endpoints as they are, `host:port` ones as names to resolve.
    pub(super) fn static_endpoints(
        &mut self,
        path: &str,
        list: Vec<EndpointFile>,
    ) -> (Vec<EndpointSpec>, Vec<DnsTarget>) {
        let mut seen = std::collections::HashSet::new();
        let (mut fixed, mut names) = (Vec::new(), Vec::new());
        for (i, e) in list.into_iter().enumerate() {
            let ep = format!("{path}[{i}]");
            let addr_path = join_key(&ep, "addr");
            let addr = self.endpoint_addr(&addr_path, &e.addr);
            let weight = self.weight(&join_key(&ep, "weight"), e.weight);
            match addr {
                Addr::Ip(addr) => {
                    if !seen.insert(addr.to_string()) {
                        self.problem(&addr_path, format!("duplicate endpoint {addr}"));
                    }
                    fixed.push(EndpointSpec { addr, weight, tags: e.tags });
                }
                Addr::Host(name, port) => {
                    if !seen.insert(format!("{}:{port}", name.to_ascii_lowercase())) {
                        self.problem(&addr_path, format!("duplicate endpoint {name}:{port}"));
                    }
                    names.push(DnsTarget { query: DnsQuery::Host { name, port }, weight, tags: e.tags });
                }
            }
        }
        (fixed, names)
    }

    fn endpoint_addr(&mut self, path: &str, text: &str) -> Addr {
        let t = text.trim();
        if let Ok(addr) = t.parse::<SocketAddr>() {
            return Addr::Ip(addr);
        }
        let bad = |v: &mut Self| {
            v.problem(
                path,
                format!("{text:?} is not an address: IP:port or host:port (e.g. 10.0.0.5:8080, payments.prod.svc.cluster.local:8080)"),
            );
            Addr::Ip(SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        let Some((host, port)) = t.rsplit_once(':') else { return bad(self) };
        match port.parse::<u16>() {
            Ok(port) if port > 0 && valid_host(host) => Addr::Host(host.to_string(), port),
            _ => bad(self),
        }
    }

    fn host_name(&mut self, path: &str, name: &str) {
        if !valid_host(name) {
            self.problem(path, format!("{name:?} is not a DNS name"));
        }
    }
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63 bytes, 253 in all; a
/// final dot (fully qualified) is allowed. Not an IP literal.
fn valid_host(name: &str) -> bool {
    let bare = name.strip_suffix('.').unwrap_or(name);
    !bare.is_empty()
        && bare.len() <= 253
        && bare.parse::<IpAddr>().is_err()
        && bare.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn host_names() {
        for ok in ["payments", "payments.prod.svc.cluster.local", "_grpc._tcp.x.local.", "a-b.c"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", "a b", "10.0.0.1", "x/y", &"a".repeat(64)] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}
