//! TLS origination: one rustls client config per service (so sessions resume across its
//! connections), verifying the upstream against the service's CA bundle (rotating), checking
//! its identity against `allowed_sans` when set, and presenting the client certificate
//! (rotating) when the server asks. Handshake failures are classified for the 502 reason,
//! the log line, the span and the counter.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{Bundle, KeyPair, Registry, Version, provider, versions};
use crate::config::UpstreamTls;
use crate::pki::PkiError;

/// TLS to one service's endpoints.
#[derive(Debug)]
pub(crate) struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// The configured name; an endpoint's `server_name` tag wins over it.
    server_name: Option<ServerName<'static>>,
}

/// Why a handshake failed, as `x-outrider-error` details and counter labels say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The certificate does not chain to the configured CA.
    UnknownCa,
    Expired,
    NotYetValid,
    /// The certificate is not valid for the name (or IP) we connected with.
    NameMismatch,
    /// None of `allowed_sans` is in the certificate.
    IdentityMismatch,
    /// The server wanted a client certificate and we had none.
    NoClientCert,
    /// The server refused our client certificate.
    ClientCertRejected,
    /// No ALPN protocol in common.
    Alpn,
    Other,
}

/// Every [`Failure`], for counters.
pub(crate) const FAILURES: [Failure; 9] = [
    Failure::UnknownCa,
    Failure::Expired,
    Failure::NotYetValid,
    Failure::NameMismatch,
    Failure::IdentityMismatch,
    Failure::NoClientCert,
    Failure::ClientCertRejected,
    Failure::Alpn,
    Failure::Other,
];

// === impl ClientTls ===

impl ClientTls {
    pub(crate) fn new(cfg: &UpstreamTls, registry: &Registry) -> Result<ClientTls, PkiError> {
        let roots = match &cfg.ca {
            Some(ca) => Some(Bundle::load(ca.clone(), cfg.system_roots, registry)?),
            None => None,
        };
        let verifier = Arc::new(Verifier { roots, allowed: cfg.allowed_sans.clone() });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(cfg.min_version))
            .map_err(|e| PkiError::Invalid("tls.min_version".into(), e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let pair = KeyPair::load(cert.clone(), key.clone(), registry)?;
                builder.with_client_cert_resolver(Arc::new(ClientCert(pair)))
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = cfg.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        config.resumption = rustls::client::Resumption::store(registry.client_sessions());
        let server_name = cfg.server_name.as_ref().and_then(|n| ServerName::try_from(n.clone()).ok());
        Ok(ClientTls { config: Arc::new(config), server_name })
    }

    /// Handshakes over a connected socket. `tag`: the endpoint's `server_name` tag; without
    /// one (and no configured name) the endpoint's IP is the name, checked against IP SANs.
    pub(crate) async fn connect(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        tag: Option<&str>,
    ) -> Result<TlsStream<TcpStream>, (Failure, String)> {
        let name = tag
            .and_then(|t| ServerName::try_from(t.to_string()).ok())
            .or_else(|| self.server_name.clone())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        TlsConnector::from(self.config.clone()).connect(name, stream).await.map_err(|e| classify(&e))
    }
}

/// Reads a rustls error out of the I/O error the handshake returned.
fn classify(e: &std::io::Error) -> (Failure, String) {
    let detail = e.to_string();
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return (Failure::Other, detail);
    };
    let failure = match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Failure::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Failure::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Failure::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Failure::NameMismatch
            }
            CertificateError::ApplicationVerificationFailure => Failure::IdentityMismatch,
            _ => Failure::Other,
        },
        Error::AlertReceived(alert) => alert_failure(*alert).unwrap_or(Failure::Other),
        Error::NoApplicationProtocol => Failure::Alpn,
        _ => Failure::Other,
    };
    (failure, detail)
}

/// The failure an alert from the server announces, when it is about the handshake.
fn alert_failure(alert: AlertDescription) -> Option<Failure> {
    Some(match alert {
        AlertDescription::CertificateRequired => Failure::NoClientCert,
        AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked
        | AlertDescription::UnsupportedCertificate => Failure::ClientCertRejected,
        AlertDescription::NoApplicationProtocol => Failure::Alpn,
        _ => return None,
    })
}

/// A handshake refusal that arrived after our side of the handshake had finished, found in
/// the error a request then failed with. In TLS 1.3 the server judges our client certificate
/// after we consider the handshake done, so its alert comes with the first records we read.
/// Like any failed handshake, the server's app never saw the request.
pub(crate) fn rejected(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut source = Some(e);
    while let Some(err) = source {
        let tls = err.downcast_ref::<Error>().or_else(|| {
            let io = err.downcast_ref::<std::io::Error>()?;
            io.get_ref()?.downcast_ref::<Error>()
        });
        if let Some(Error::AlertReceived(alert)) = tls {
            return alert_failure(*alert);
        }
        source = err.source();
    }
    None
}

// === impl Failure ===

impl Failure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::UnknownCa => "unknown_ca",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::NameMismatch => "name_mismatch",
            Failure::IdentityMismatch => "identity_mismatch",
            Failure::NoClientCert => "no_client_cert",
            Failure::ClientCertRejected => "client_cert_rejected",
            Failure::Alpn => "alpn",
            Failure::Other => "other",
        }
    }
}

/// Checks the upstream's chain against the (rotating) CA bundle, then its SANs against
/// `allowed`. Without a bundle (system roots only), the system's roots.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<Bundle>>,
    allowed: Vec<String>,
}

impl Verifier {
    fn webpki(&self) -> Result<Arc<WebPkiServerVerifier>, Error> {
        let roots = self.roots.as_ref().map_or_else(super::system, |b| b.roots());
        WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| Error::General(e.to_string()))
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified =
            self.webpki()?.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        super::check_identity(
            end_entity,
            &self.allowed,
            "upstream certificate carries none of the allowed SANs",
        )?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        super::verify_signature(Version::Tls12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        super::verify_signature(Version::Tls13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Presents the current (rotating) client certificate.
#[derive(Debug)]
struct ClientCert(Arc<KeyPair>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
