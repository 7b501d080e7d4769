//! TLS settings — origination to a service's endpoints and termination on a listener — and
//! their validation, which reads every file: unreadable, not PEM, a key that does not match
//! its certificate, or a certificate already expired is a problem with its YAML path.

use std::path::PathBuf;

use serde::Serialize;

use super::UpstreamProtocol;
use super::file::{ListenerTlsFile, UpstreamTlsFile};
use super::locate::join_key;
use super::validate::Validator;
use crate::pki;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// TLS to a service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// CA bundle that upstream certificates must chain to.
    pub ca: Option<PathBuf>,
    /// Also trust the system's roots (opt-in).
    pub system_roots: bool,
    /// Client certificate chain and key (mTLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// SNI and verification name when an endpoint has no `server_name` tag; `None`: the
    /// endpoint's IP address, which must then be an IP SAN of its certificate.
    pub server_name: Option<String>,
    pub min_version: TlsVersion,
    /// Offered in order; the default follows the protocol (`h2`, `http/1.1`, or both).
    pub alpn: Vec<String>,
    /// When set, the certificate must also carry one of these SANs (DNS or URI; a trailing
    /// `*` matches any suffix).
    pub allowed_sans: Vec<String>,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates chaining to this CA (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Only clients whose certificate carries one of these SANs may connect.
    pub allowed_identities: Vec<String>,
    pub min_version: TlsVersion,
    /// Pass the client's identity to the app in `x-forwarded-client-cert`.
    pub forward_client_cert: bool,
}

// === impl Validator ===

impl Validator {
    pub(super) fn upstream_tls(
        &mut self,
        path: &str,
        f: UpstreamTlsFile,
        protocol: UpstreamProtocol,
    ) -> UpstreamTls {
        let p = |k| join_key(path, k);
        let system_roots = f.system_roots.unwrap_or(false);
        if f.ca.is_none() && !system_roots {
            self.problem(path, "no trust anchors: set `ca` (a CA bundle) or `system_roots: true`");
        }
        if let Some(ca) = &f.ca {
            self.pki_check(&p("ca"), pki::roots(ca.as_ref()).map(drop));
        }
        match (&f.cert, &f.key) {
            (Some(cert), Some(key)) => {
                self.pki_check(&p("cert"), pki::certified_key(cert.as_ref(), key.as_ref()).map(drop))
            }
            (None, None) => {}
            _ => self.problem(path, "a client certificate needs both `cert` and `key`"),
        }
        if let Some(name) = &f.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            self.problem(&p("server_name"), format!("{name:?} is not a DNS name or IP address"));
        }
        let alpn = f.alpn.unwrap_or_else(|| default_alpn(protocol));
        if protocol == UpstreamProtocol::Http2 && !alpn.iter().any(|a| a == "h2") {
            self.problem(&p("alpn"), "protocol http2 over TLS needs \"h2\" in alpn");
        }
        UpstreamTls {
            ca: f.ca.map(Into::into),
            system_roots,
            cert: f.cert.map(Into::into),
            key: f.key.map(Into::into),
            server_name: f.server_name,
            min_version: self.tls_version(&p("min_version"), f.min_version),
            alpn,
            allowed_sans: f.allowed_sans.unwrap_or_default(),
        }
    }

    pub(super) fn listener_tls(&mut self, path: &str, f: ListenerTlsFile) -> ListenerTls {
        let p = |k| join_key(path, k);
        self.pki_check(&p("cert"), pki::certified_key(f.cert.as_ref(), f.key.as_ref()).map(drop));
        if let Some(ca) = &f.client_ca {
            self.pki_check(&p("client_ca"), pki::roots(ca.as_ref()).map(drop));
        }
        let allowed_identities = f.allowed_identities.unwrap_or_default();
        if !allowed_identities.is_empty() && f.client_ca.is_none() {
            self.problem(
                &p("allowed_identities"),
                "identities come from client certificates: set `client_ca`",
            );
        }
        ListenerTls {
            cert: f.cert.into(),
            key: f.key.into(),
            client_ca: f.client_ca.map(Into::into),
            allowed_identities,
            min_version: self.tls_version(&p("min_version"), f.min_version),
            forward_client_cert: f.forward_client_cert.unwrap_or(true),
        }
    }

    fn pki_check(&mut self, path: &str, result: Result<(), pki::PkiError>) {
        if let Err(e) = result {
            self.problem(path, e.to_string());
        }
    }

    fn tls_version(&mut self, path: &str, v: Option<String>) -> TlsVersion {
        match v.as_deref().unwrap_or("1.2") {
            "1.2" => TlsVersion::V1_2,
            "1.3" => TlsVersion::V1_3,
            other => {
                self.problem(path, format!("unknown TLS version {other:?} (\"1.2\" or \"1.3\")"));
                TlsVersion::V1_2
            }
        }
    }
}

/// What a protocol offers in ALPN by default.
pub fn default_alpn(protocol: UpstreamProtocol) -> Vec<String> {
    let names: &[&str] = match protocol {
        UpstreamProtocol::Http1 => &["http/1.1"],
        UpstreamProtocol::Http2 => &["h2"],
        UpstreamProtocol::Auto => &["h2", "http/1.1"],
    };
    names.iter().map(|n| n.to_string()).collect()
}
