//! Real TLS for tests: a CA and leaf certificates generated at test time (rcgen), written as
//! PEM files to a temp dir, and TLS backends (tokio-rustls) serving HTTP/1.1 and h2.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

/// A certificate authority whose files live in a temp dir.
pub struct Ca {
    pub dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate (PEM file).
    pub cert: PathBuf,
    name: String,
}

/// A leaf certificate and its key as PEM files, with its serial for comparisons.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
    pub der: CertificateDer<'static>,
}

/// What a leaf looks like beyond its names.
#[derive(Clone, Copy, Default)]
pub enum Validity {
    #[default]
    Current,
    Expired,
    /// Valid from tomorrow.
    NotYetValid,
    /// Valid, but for fewer days than this.
    DaysLeft(u64),
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca { dir, params, key, cert: path, name: name.to_string() }
    }

    /// A leaf for `sans` (DNS names, IPs, or `spiffe://…`/`https://…` URIs), valid now.
    pub fn leaf(&self, file: &str, sans: &[&str]) -> Leaf {
        self.leaf_with(file, sans, Validity::Current)
    }

    /// A leaf written to `<file>.pem` and `<file>-key.pem` in this CA's dir (overwriting, as
    /// a rotation does).
    pub fn leaf_with(&self, file: &str, sans: &[&str], validity: Validity) -> Leaf {
        let (cert_pem, key_pem, serial, der) = self.issue(sans, validity);
        let cert = self.dir.path().join(format!("{file}.pem"));
        let key = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        Leaf { cert, key, serial, der }
    }

    /// Issues a certificate without writing it: (cert PEM, key PEM, serial, DER).
    pub fn issue(
        &self,
        sans: &[&str],
        validity: Validity,
    ) -> (String, String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for san in sans {
            params.subject_alt_names.push(if san.contains("://") {
                SanType::URI((*san).try_into().unwrap())
            } else if let Ok(ip) = san.parse() {
                SanType::IpAddress(ip)
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            });
        }
        params.distinguished_name.push(DnType::CommonName, sans.first().copied().unwrap_or("leaf"));
        params.serial_number = Some(fastrand::u64(1 << 56..1 << 63).to_be_bytes().to_vec().into());
        let now = SystemTime::now();
        match validity {
            Validity::Current => {
                params.not_before = (now - Duration::from_secs(3600)).into();
                params.not_after = (now + Duration::from_secs(365 * 86_400)).into();
            }
            Validity::Expired => {
                params.not_before = (now - Duration::from_secs(60 * 86_400)).into();
                params.not_after = (now - Duration::from_secs(86_400)).into();
            }
            Validity::NotYetValid => {
                params.not_before = (now + Duration::from_secs(86_400)).into();
                params.not_after = (now + Duration::from_secs(365 * 86_400)).into();
            }
            Validity::DaysLeft(days) => {
                params.not_before = (now - Duration::from_secs(3600)).into();
                params.not_after = (now + Duration::from_secs(days * 86_400 - 3600)).into();
            }
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem(), serial_of(cert.der()), cert.der().clone())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

impl Leaf {
    /// Replaces this leaf's files with a new certificate from `ca` (same names, new serial),
    /// each written whole to a temp file and renamed over the old, as cert-manager's
    /// writers do; returns the new leaf.
    pub fn rotate(&self, ca: &Ca, sans: &[&str]) -> Leaf {
        let (cert_pem, key_pem, serial, der) = ca.issue(sans, Validity::Current);
        replace(&self.key, &key_pem);
        replace(&self.cert, &cert_pem);
        Leaf { cert: self.cert.clone(), key: self.key.clone(), serial, der }
    }

    /// The rustls server config presenting this leaf; requiring client certificates from
    /// `client_ca` when given. ALPN offers h2 and http/1.1.
    pub fn server_config(&self, client_ca: Option<&Path>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let roots = Arc::new(roots(ca));
                builder.with_client_cert_verifier(
                    WebPkiClientVerifier::builder_with_provider(roots, provider).build().unwrap(),
                )
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(self.chain(), self.private_key()).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// A rustls client config that trusts `ca` and presents this leaf.
    pub fn client_config(&self, ca: &Path) -> rustls::ClientConfig {
        client_config(ca, Some(self))
    }

    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(&self.key).unwrap()
    }
}

/// A rustls client config trusting `ca`, presenting `leaf` when given.
pub fn client_config(ca: &Path, leaf: Option<&Leaf>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca));
    match leaf {
        Some(leaf) => builder.with_client_auth_cert(leaf.chain(), leaf.private_key()).unwrap(),
        None => builder.with_no_client_auth(),
    }
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        store.add(cert.unwrap()).unwrap();
    }
    store
}

/// The serial of a DER certificate, as `aa:bb:…` (what Outrider logs and shows).
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

/// Writes `content` to a temp file beside `path` and renames it over `path`.
pub fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Who connected to a [`TlsBackend`]: the serial of each client certificate seen, in order.
pub type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// A real TLS server (tokio-rustls) in front of an HTTP/1.1 + h2 handler, recording the
/// client certificate of each connection.
pub struct TlsBackend {
    pub backend: Backend,
    pub clients: Seen,
    pub handshakes: Arc<std::sync::atomic::AtomicUsize>,
    /// Handshakes that resumed an earlier session.
    pub resumed: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsBackend {
    pub async fn start<F, Fut>(config: rustls::ServerConfig, handler: F) -> TlsBackend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let clients: Seen = Arc::default();
        let (handshakes, resumed) = (Arc::default(), Arc::default());
        let acceptor = Acceptor {
            tls: TlsAcceptor::from(Arc::new(config)),
            clients: clients.clone(),
            handshakes: Arc::clone(&handshakes),
            resumed: Arc::clone(&resumed),
        };
        let backend = Backend::serve_with(socket, Some(acceptor), handler);
        TlsBackend { backend, clients, handshakes, resumed }
    }

    /// Answers every request with `name`.
    pub async fn named(config: rustls::ServerConfig, name: &'static str) -> TlsBackend {
        TlsBackend::start(config, move |_req| async move { text(200, name) }).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.backend.addr
    }
}

/// Accepts TLS for a test backend and records each client's certificate serial.
#[derive(Clone)]
pub struct Acceptor {
    tls: TlsAcceptor,
    clients: Seen,
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    resumed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Acceptor {
    /// The handshake; `None` when it failed (the client sees the alert).
    pub async fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let tls = self.tls.accept(stream).await.ok()?;
        let serial = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| serial_of(c));
        self.clients.lock().unwrap().push(serial);
        self.handshakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Some(tls)
    }
}
