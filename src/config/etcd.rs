//! Validation of the `etcd` cluster block and the `register` block.

use std::time::Duration;

use super::file::{EtcdFile, RegisterFile};
use super::validate::{Validator, defaults, valid_name};
use super::*;

impl Validator {
    pub(super) fn etcd(&mut self, e: EtcdFile) -> EtcdConfig {
        if e.endpoints.is_empty() {
            self.problem("etcd.endpoints", "list at least one etcd endpoint, e.g. http://127.0.0.1:2379");
        }
        let scheme = if e.tls.is_some() { "https" } else { "http" };
        let endpoints = e
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url = if url.contains("://") { url.clone() } else { format!("{scheme}://{url}") };
                let hostport = url.split_once("://").map_or("", |(_, r)| r.trim_end_matches('/'));
                if !hostport.contains(':') || hostport.contains('/') {
                    self.problem(
                        &format!("etcd.endpoints[{i}]"),
                        format!("{url:?} is not an etcd URL (scheme://host:port)"),
                    );
                }
                url
            })
            .collect();
        if e.password.is_some() != e.username.is_some() {
            self.problem("etcd.username", "username and password go together");
        }
        let tls = e.tls.map(|t| {
            if t.cert.is_some() != t.key.is_some() {
                self.problem("etcd.tls", "a client certificate needs both `cert` and `key`");
            }
            EtcdTls { ca: t.ca.map(Into::into), cert: t.cert.map(Into::into), key: t.key.map(Into::into) }
        });
        let ms = Duration::from_millis(10);
        EtcdConfig {
            endpoints,
            username: e.username,
            password: e.password,
            tls,
            dial_timeout: self.duration(
                "etcd.dial_timeout",
                e.dial_timeout,
                defaults::ETCD_DIAL,
                ms..=Duration::from_secs(60),
            ),
            request_timeout: self.duration(
                "etcd.request_timeout",
                e.request_timeout,
                defaults::ETCD_REQUEST,
                ms..=Duration::from_secs(300),
            ),
            snapshot_dir: e.snapshot_dir.map(Into::into),
            overlay_prefix: e.overlay_prefix.inspect(|p| {
                if p.is_empty() {
                    self.problem("etcd.overlay_prefix", "an empty prefix would read the whole keyspace");
                }
            }),
        }
    }

    pub(super) fn register(&mut self, r: RegisterFile) -> RegisterConfig {
        if !valid_name(&r.service) {
            let msg = format!(
                "service name {:?} must be non-empty ASCII letters, digits, '.', '_' or '-'",
                r.service
            );
            self.problem("register.service", msg);
        }
        let address = self.addr("register.address", &r.address);
        let prefix = r.prefix.unwrap_or_else(|| format!("svc/{}/", r.service));
        let secs = Duration::from_secs;
        let lease_ttl = self.duration("register.lease_ttl", r.lease_ttl, secs(10), secs(2)..=secs(3600));
        let deregistration_delay = self.duration(
            "register.deregistration_delay",
            r.deregistration_delay,
            secs(2),
            Duration::ZERO..=secs(120),
        );
        let h = r.health.unwrap_or_default();
        let kind = match h.kind.as_deref().unwrap_or("http") {
            "http" => {
                let path = h.path.unwrap_or_else(|| "/".into());
                ProbeKind::Http { path, host: None, statuses: vec![(200, 299)] }
            }
            "tcp" => ProbeKind::Tcp,
            other => {
                self.problem(
                    "register.health.kind",
                    format!("unknown health check kind {other:?} (http or tcp)"),
                );
                ProbeKind::Tcp
            }
        };
        let ms = Duration::from_millis;
        let health = HealthCheck {
            kind,
            addr: h.addr.map_or(address, |a| self.addr("register.health.addr", &a)),
            interval: self.duration("register.health.interval", h.interval, secs(2), ms(50)..=secs(300)),
            timeout: self.duration("register.health.timeout", h.timeout, secs(1), ms(10)..=secs(60)),
            healthy_threshold: self.count("register.health.healthy_threshold", h.healthy_threshold, 1),
            unhealthy_threshold: self.count("register.health.unhealthy_threshold", h.unhealthy_threshold, 3),
        };
        if let Some(name) = &r.tls_server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            self.problem("register.tls_server_name", format!("{name:?} is not a DNS name"));
        }
        RegisterConfig {
            tls_server_name: r.tls_server_name,
            key: format!("{prefix}{address}"),
            service: r.service,
            address,
            weight: self.weight("register.weight", r.weight),
            metadata: r.metadata,
            lease_ttl,
            deregistration_delay,
            health,
        }
    }
}
