//! TLS at runtime: rustls configs for origination (`client.rs`, per service) and
//! termination (`server.rs`, per listener) whose certificates, keys and CA bundles live in
//! [`KeyPair`]s and [`Bundle`]s that are re-read when their files change — new handshakes
//! use the new material, established connections keep theirs. A file that fails to load keeps
//! the old material, is logged and counted.
//!
//! Owns: the loaded material and the [`Registry`] of everything that may need re-reading.
//! Must not: read files on the request path (only on start, reload and file events).

pub(crate) mod client;
pub(crate) mod server;
mod sessions;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::pki::{self, CertInfo, PkiError};

/// A certificate chain and its key, from two files, swapped whole on rotation.
#[derive(Debug)]
pub(crate) struct KeyPair {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<(Arc<CertifiedKey>, CertInfo)>,
}

/// A CA bundle from a file, swapped whole on rotation.
#[derive(Debug)]
pub(crate) struct Bundle {
    path: PathBuf,
    /// With the system's roots added when asked for.
    system_roots: bool,
    current: ArcSwap<(Arc<RootCertStore>, Vec<CertInfo>)>,
}

/// Something loaded from files that can be re-read.
trait Material: Send + Sync + std::fmt::Debug {
    fn files(&self) -> Vec<PathBuf>;
    /// Re-reads the files; `Ok(true)` when the content changed.
    fn reload(&self) -> Result<bool, PkiError>;
    /// Path, subject and expiry of each certificate, for `/config` and `/metrics`.
    fn certificates(&self) -> Vec<(String, CertInfo)>;
}

/// Every piece of material the running generations use, to re-read on file events and
/// SIGHUP. Holds them weakly: material of an old generation goes when its users do.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Mutex<Vec<Weak<dyn Material>>>,
    /// Re-reads that failed (the old material stayed).
    pub(crate) failures: AtomicU64,
    /// Re-reads that changed something; session caches start over when it moves.
    rotations: Arc<AtomicU64>,
}

// === impl KeyPair ===

impl KeyPair {
    pub(crate) fn load(cert: PathBuf, key: PathBuf, registry: &Registry) -> Result<Arc<KeyPair>, PkiError> {
        let loaded = load_pair(&cert, &key)?;
        let pair = Arc::new(KeyPair { cert, key, current: ArcSwap::from_pointee(loaded) });
        registry.add(pair.clone());
        Ok(pair)
    }

    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        self.current.load().0.clone()
    }
}

fn load_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Arc<CertifiedKey>, CertInfo), PkiError> {
    let certified = pki::certified_key(cert, key)?;
    let info = pki::info(&certified.cert[0]).map_err(|e| PkiError::Invalid(cert.display().to_string(), e))?;
    warn_if_expiring(&cert.display().to_string(), &info);
    Ok((certified, info))
}

impl Material for KeyPair {
    fn files(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone()]
    }

    fn reload(&self) -> Result<bool, PkiError> {
        let loaded = load_pair(&self.cert, &self.key)?;
        let changed = loaded.0.cert != self.current.load().0.cert;
        if changed {
            tracing::info!(cert = %self.cert.display(), serial = %loaded.1.serial, "certificate rotated");
            self.current.store(Arc::new(loaded));
        }
        Ok(changed)
    }

    fn certificates(&self) -> Vec<(String, CertInfo)> {
        vec![(self.cert.display().to_string(), self.current.load().1.clone())]
    }
}

// === impl Bundle ===

impl Bundle {
    pub(crate) fn load(
        path: PathBuf,
        system_roots: bool,
        registry: &Registry,
    ) -> Result<Arc<Bundle>, PkiError> {
        let loaded = load_bundle(&path, system_roots)?;
        let bundle = Arc::new(Bundle { path, system_roots, current: ArcSwap::from_pointee(loaded) });
        registry.add(bundle.clone());
        Ok(bundle)
    }

    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.current.load().0.clone()
    }
}

fn load_bundle(
    path: &std::path::Path,
    system_roots: bool,
) -> Result<(Arc<RootCertStore>, Vec<CertInfo>), PkiError> {
    let mut store = pki::roots(path)?;
    let infos: Vec<CertInfo> = pki::certs(path)?.iter().filter_map(|c| pki::info(c).ok()).collect();
    for info in &infos {
        warn_if_expiring(&path.display().to_string(), info);
    }
    if system_roots {
        store.extend(system().roots.iter().cloned());
    }
    Ok((Arc::new(store), infos))
}

/// The system's trust anchors (read once: the store rarely changes within a process).
pub(crate) fn system() -> Arc<RootCertStore> {
    static SYSTEM: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("reading the system's CA certificates: {e}");
            }
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates");
            Arc::new(store)
        })
        .clone()
}

impl Material for Bundle {
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn reload(&self) -> Result<bool, PkiError> {
        let loaded = load_bundle(&self.path, self.system_roots)?;
        let changed = loaded.1 != self.current.load().1;
        if changed {
            tracing::info!(ca = %self.path.display(), "CA bundle rotated");
            self.current.store(Arc::new(loaded));
        }
        Ok(changed)
    }

    fn certificates(&self) -> Vec<(String, CertInfo)> {
        let path = self.path.display().to_string();
        self.current.load().1.iter().map(|i| (path.clone(), i.clone())).collect()
    }
}

fn warn_if_expiring(path: &str, info: &CertInfo) {
    let left = info.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    if left < pki::EXPIRY_WARNING {
        tracing::warn!(%path, subject = %info.subject, days_left = left.as_secs() / 86_400, "certificate expires within 7 days");
    }
}

// === impl Registry ===

impl Registry {
    fn add(&self, material: Arc<dyn Material>) {
        let mut entries = self.lock();
        entries.retain(|w| w.strong_count() > 0);
        entries.push(Arc::downgrade(&material));
    }

    fn live(&self) -> Vec<Arc<dyn Material>> {
        self.lock().iter().filter_map(Weak::upgrade).collect()
    }

    /// The files to watch.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        self.live().iter().flat_map(|m| m.files()).collect()
    }

    /// Re-reads everything; a failure keeps that material and is logged and counted.
    /// Returns how many pieces changed and how many failed to load.
    pub(crate) fn reload(&self) -> (usize, usize) {
        let (mut changed, mut failed) = (0, 0);
        for m in self.live() {
            match m.reload() {
                Ok(c) => changed += usize::from(c),
                Err(e) => {
                    failed += 1;
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("TLS material not reloaded, keeping the loaded one: {e}");
                }
            }
        }
        if changed > 0 {
            self.rotations.fetch_add(1, Ordering::AcqRel);
        }
        (changed, failed)
    }

    /// A session cache for a new client config, emptied on each rotation.
    fn client_sessions(&self) -> Arc<sessions::ClientSessions> {
        Arc::new(sessions::ClientSessions::new(self.rotations.clone()))
    }

    /// A session cache for a new server config, emptied on each rotation.
    fn server_sessions(&self) -> Arc<sessions::ServerSessions> {
        Arc::new(sessions::ServerSessions::new(self.rotations.clone()))
    }

    /// Every loaded certificate: file, subject, serial, expiry.
    pub(crate) fn certificates(&self) -> Vec<(String, CertInfo)> {
        let mut all: Vec<_> = self.live().iter().flat_map(|m| m.certificates()).collect();
        all.sort_by(|a, b| (&a.0, &a.1.serial).cmp(&(&b.0, &b.1.serial)));
        all.dedup_by(|a, b| a.0 == b.0 && a.1.serial == b.1.serial);
        all
    }

    /// Logs a warning for each certificate with less than 7 days left.
    pub(crate) fn warn_expiring(&self) {
        for (path, info) in self.certificates() {
            warn_if_expiring(&path, &info);
        }
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let certs: Vec<_> = self
            .certificates()
            .into_iter()
            .map(|(path, i)| {
                let left = i.not_after.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs());
                json!({ "file": path, "subject": i.subject, "serial": i.serial,
                        "not_after": humantime::format_rfc3339_seconds(i.not_after).to_string(),
                        "seconds_left": left })
            })
            .collect();
        json!({ "certificates": certs, "reload_failures": self.failures.load(Ordering::Relaxed) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<dyn Material>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Refuses a certificate that chains correctly but carries none of `allowed` (when any are
/// listed): what `allowed_sans` and `allowed_identities` add to WebPKI's checks. rustls
/// turns the error into an alert (access denied on our side of a termination).
fn check_identity(
    end_entity: &rustls::pki_types::CertificateDer<'_>,
    allowed: &[String],
    refused: &str,
) -> Result<(), rustls::Error> {
    use rustls::{CertificateError, Error};
    if allowed.is_empty() {
        return Ok(());
    }
    let info = pki::info(end_entity).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if info.matches_any(allowed) {
        return Ok(());
    }
    tracing::warn!(identity = %info.identity(), "{refused}");
    Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
}

/// Which handshake signature to check.
#[derive(Debug, Clone, Copy)]
enum Version {
    Tls12,
    Tls13,
}

/// Handshake signature checks, with the provider's algorithms (both verifiers delegate).
fn verify_signature(
    version: Version,
    message: &[u8],
    cert: &rustls::pki_types::CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
    let algorithms = &provider().signature_verification_algorithms;
    match version {
        Version::Tls12 => rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms),
        Version::Tls13 => rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms),
    }
}

/// rustls protocol versions from the configured minimum.
pub(crate) fn versions(
    min: crate::config::TlsVersion,
) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        crate::config::TlsVersion::V1_2 => rustls::ALL_VERSIONS,
        crate::config::TlsVersion::V1_3 => &TLS13_ONLY,
    }
}

/// The crypto provider. ring: already in the build (the etcd client's TLS), no C toolchain
/// step; aws-lc-rs measured within a few percent of it (benches/RESULTS.md, "TLS provider").
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}
