//! Certificates and keys from PEM files: loading, checking (readable, PEM, key matching the
//! certificate, not expired), and reading what a certificate says (subject, serial, SANs,
//! expiry). Used by config validation and by the TLS runtime alike.
//! Must not: know about configs, sockets or connections.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PkiError {
    #[error("cannot read {0}: {1}")]
    Unreadable(String, String),
    #[error("{0} holds no PEM {1}")]
    NotPem(String, &'static str),
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error("the key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("the certificate in {0} expired at {1}")]
    Expired(String, String),
}

/// What one certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub(crate) subject: String,
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
    pub(crate) dns: Vec<String>,
    pub(crate) uris: Vec<String>,
    pub(crate) ips: Vec<IpAddr>,
}

/// Within this of expiry a certificate is logged as expiring soon.
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The certificates of a PEM file (a chain or a CA bundle), in order.
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| PkiError::Unreadable(name.clone(), e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Invalid(name.clone(), format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::NotPem(name, "certificate"));
    }
    Ok(certs)
}

/// Refuses a certificate whose validity has ended.
fn unexpired(path: &Path, cert: &CertificateDer<'_>) -> Result<CertInfo, PkiError> {
    let name = || path.display().to_string();
    let info = info(cert).map_err(|e| PkiError::Invalid(name(), e))?;
    if info.not_after < SystemTime::now() {
        return Err(PkiError::Expired(name(), humantime::format_rfc3339_seconds(info.not_after).to_string()));
    }
    Ok(info)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| PkiError::Unreadable(name.clone(), e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| PkiError::NotPem(name, "private key"))
}

/// A certificate chain with its key, checked to belong together.
pub(crate) fn certified_key(cert: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, PkiError> {
    let chain = certs(cert)?;
    unexpired(cert, &chain[0])?;
    let key = self::key(key_path)?;
    let provider = rustls::crypto::ring::default_provider();
    let names = || (cert.display().to_string(), key_path.display().to_string());
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| PkiError::Invalid(names().1, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        let (cert, key) = names();
        PkiError::KeyMismatch { cert, key }
    })?;
    Ok(Arc::new(certified))
}

/// Trust anchors from a CA bundle. Expired ones are left out; a bundle with none left is an
/// error.
pub(crate) fn roots(path: &Path) -> Result<RootCertStore, PkiError> {
    let mut store = RootCertStore::empty();
    let mut last_error = None;
    for cert in certs(path)? {
        if let Err(e) = unexpired(path, &cert) {
            last_error = Some(e);
            continue;
        }
        store.add(cert).map_err(|e| PkiError::Invalid(path.display().to_string(), e.to_string()))?;
    }
    match last_error {
        Some(e) if store.is_empty() => Err(e),
        _ => Ok(store),
    }
}

/// Reads subject, serial, expiry and subject alternative names.
pub(crate) fn info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    let mut info = CertInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        not_after: UNIX_EPOCH + Duration::from_secs(secs),
        dns: Vec::new(),
        uris: Vec::new(),
        ips: Vec::new(),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => info.dns.push(d.to_string()),
                x509_parser::extensions::GeneralName::URI(u) => info.uris.push(u.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => info.ips.extend(ip(b)),
                _ => {}
            }
        }
    }
    Ok(info)
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

// === impl CertInfo ===

impl CertInfo {
    /// Whether one of its DNS or URI SANs matches one of `patterns` (exact, or a `*` at the
    /// end matching any suffix: `spiffe://cluster.local/ns/prod/*`).
    pub(crate) fn matches_any(&self, patterns: &[String]) -> bool {
        self.dns.iter().chain(&self.uris).any(|san| patterns.iter().any(|p| matches(p, san)))
    }

    /// The identity to show and log: the first URI SAN (SPIFFE), else DNS SAN, else subject.
    pub(crate) fn identity(&self) -> &str {
        self.uris.first().or(self.dns.first()).map_or(&self.subject, String::as_str)
    }

    pub(crate) fn expiry_unix(&self) -> i64 {
        self.not_after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }
}

fn matches(pattern: &str, san: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => san.starts_with(prefix),
        None => pattern.eq_ignore_ascii_case(san),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_patterns_match_exactly_or_by_prefix() {
        let info = CertInfo {
            subject: "CN=x".into(),
            serial: "01".into(),
            not_after: SystemTime::now(),
            dns: vec!["payments.prod.svc".into()],
            uris: vec!["spiffe://cluster.local/ns/prod/sa/payments".into()],
            ips: vec![],
        };
        assert!(info.matches_any(&["spiffe://cluster.local/ns/prod/*".into()]));
        assert!(info.matches_any(&["PAYMENTS.prod.svc".into()]));
        assert!(!info.matches_any(&["spiffe://cluster.local/ns/dev/*".into(), "payments".into()]));
        assert_eq!(info.identity(), "spiffe://cluster.local/ns/prod/sa/payments");
    }
}
