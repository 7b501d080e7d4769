//! TLS termination: one rustls server config per listener, presenting the (rotating)
//! certificate, requiring client certificates that chain to `client_ca` (rotating) when set,
//! and admitting only `allowed_identities` — others get a clean TLS alert (access denied),
//! logged and counted. The peer's identity goes to the app in `x-forwarded-client-cert`.

use std::sync::Arc;

use http::HeaderValue;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{Bundle, KeyPair, Registry, provider, versions};
use crate::config::ListenerTls;
use crate::pki::{self, CertInfo, PkiError};

/// TLS termination for one listener.
#[derive(Debug)]
pub(crate) struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    forward_client_cert: bool,
    /// Our own certificate's identity, for the `By=` of `x-forwarded-client-cert`.
    own: Arc<KeyPair>,
}

/// Who is on the other end of a terminated connection.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) info: CertInfo,
    /// `x-forwarded-client-cert`, ready to insert.
    pub(crate) forwarded: Option<HeaderValue>,
}

/// Why an inbound handshake failed, for the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NoClientCert,
    UnknownCa,
    Expired,
    IdentityNotAllowed,
    Other,
}

pub(crate) const REFUSALS: [Refusal; 5] = [
    Refusal::NoClientCert,
    Refusal::UnknownCa,
    Refusal::Expired,
    Refusal::IdentityNotAllowed,
    Refusal::Other,
];

// === impl ServerTls ===

impl ServerTls {
    /// `alpn`: offered protocols (`h2`, `http/1.1` for HTTP listeners; none for TCP).
    pub(crate) fn new(cfg: &ListenerTls, alpn: &[&str], registry: &Registry) -> Result<ServerTls, PkiError> {
        let own = KeyPair::load(cfg.cert.clone(), cfg.key.clone(), registry)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(cfg.min_version))
            .map_err(|e| PkiError::Invalid("tls.min_version".into(), e.to_string()))?;
        let builder = match &cfg.client_ca {
            Some(ca) => {
                let roots = Bundle::load(ca.clone(), false, registry)?;
                let allowed = cfg.allowed_identities.clone();
                builder.with_client_cert_verifier(Arc::new(ClientVerifier { roots, allowed }))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(ServerCert(own.clone())));
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        config.session_storage = registry.server_sessions();
        Ok(ServerTls { config: Arc::new(config), forward_client_cert: cfg.forward_client_cert, own })
    }

    /// The handshake; on success the stream, whether ALPN chose h2, and the peer (with a
    /// client certificate).
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(TlsStream<S>, bool, Option<Arc<Peer>>), (Refusal, String)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = TlsAcceptor::from(self.config.clone()).accept(stream).await.map_err(|e| refusal(&e))?;
        let conn = tls.get_ref().1;
        let h2 = conn.alpn_protocol() == Some(b"h2");
        let peer = conn.peer_certificates().and_then(|c| c.first()).and_then(|cert| {
            let info = pki::info(cert).ok()?;
            let forwarded = self.forward_client_cert.then(|| self.forwarded(cert, &info)).flatten();
            Some(Arc::new(Peer { info, forwarded }))
        });
        Ok((tls, h2, peer))
    }

    /// Envoy's `x-forwarded-client-cert` form: `By=<our identity>;Hash=<sha256 of the
    /// client certificate>;Subject="…";URI=…;DNS=…`.
    fn forwarded(&self, cert: &CertificateDer<'_>, info: &CertInfo) -> Option<HeaderValue> {
        let own = pki::info(&self.own.current().cert[0]).ok();
        let mut value = String::new();
        if let Some(own) = own {
            value.push_str(&format!("By={};", own.identity()));
        }
        let hash: String = Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
        value.push_str(&format!("Hash={hash};Subject=\"{}\"", info.subject.replace('"', "'")));
        for uri in &info.uris {
            value.push_str(&format!(";URI={uri}"));
        }
        for dns in &info.dns {
            value.push_str(&format!(";DNS={dns}"));
        }
        HeaderValue::from_str(&value).ok()
    }
}

fn refusal(e: &std::io::Error) -> (Refusal, String) {
    let detail = e.to_string();
    let kind = match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => Refusal::NoClientCert,
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            Refusal::UnknownCa
        }
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => Refusal::Expired,
        Some(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => {
            Refusal::IdentityNotAllowed
        }
        _ => Refusal::Other,
    };
    (kind, detail)
}

// === impl Refusal ===

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::NoClientCert => "no_client_cert",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::IdentityNotAllowed => "identity_not_allowed",
            Refusal::Other => "other",
        }
    }
}

/// Presents the current (rotating) certificate.
#[derive(Debug)]
struct ServerCert(Arc<KeyPair>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Requires a client certificate chaining to the (rotating) CA, and with `allowed`, one of
/// those identities.
#[derive(Debug)]
struct ClientVerifier {
    roots: Arc<Bundle>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[] // clients send the certificate they have; the CA may rotate under us
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let webpki = WebPkiClientVerifier::builder_with_provider(self.roots.roots(), provider())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        let verified = webpki.verify_client_cert(end_entity, intermediates, now)?;
        super::check_identity(end_entity, &self.allowed, "client identity not allowed: refused")?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        super::verify_signature(super::Version::Tls12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        super::verify_signature(super::Version::Tls13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
