//! TLS for the tunnel: TLS 1.3 only, client certificates required and
//! verified against the configured CA (PEM loading and the provider are
//! [`crate::tls`]'s).
//! The agent's identity is its certificate's CN, else its first DNS SAN.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::revocation::{Revocation, canonical_serial};
use crate::config::TunnelConfig;
use crate::error::StartError;
use crate::tls::{load_certs, load_key, provider};

/// Builds the tunnel's server config from `[tunnel]`.
pub fn server_config(cfg: &TunnelConfig) -> Result<Arc<rustls::ServerConfig>, StartError> {
    Ok(tls_and_verifier(cfg)?.0)
}

/// The server config and the client-certificate verifier inside it (kept
/// to check sessions again when a reload changes the CA).
pub fn tls_and_verifier(cfg: &TunnelConfig) -> Result<(Arc<rustls::ServerConfig>, Verifier), StartError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&cfg.client_ca, "tunnel.client_ca")? {
        roots.add(ca).map_err(|e| StartError::Tls(format!("`tunnel.client_ca`: {}: {e}", cfg.client_ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| StartError::Tls(format!("client certificate verifier: {e}")))?;
    let chain = load_certs(&cfg.cert, "tunnel.cert")?;
    let key = load_key(&cfg.key, "tunnel.key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::Tls(format!("TLS 1.3: {e}")))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| StartError::Tls(format!("`tunnel.cert`/`tunnel.key` do not form a usable pair: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), Verifier(verifier)))
}

/// Checks a client certificate chain as the TLS handshake did.
#[derive(Clone, Debug)]
pub struct Verifier(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl Verifier {
    /// Whether `chain` (end-entity first) is valid now under this CA.
    pub fn admits(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((end, intermediates)) = chain.split_first() else { return false };
        self.0.verify_client_cert(end, intermediates, rustls_pki_types::UnixTime::now()).is_ok()
    }
}

/// The identity of a verified peer certificate: CN, else first DNS SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = x509.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(cn.to_string());
    }
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}

/// Ids of a certificate that `tunnel.revoked` can name, as printed for it
/// (the grammar and the match are [`super::revocation`]'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIds {
    /// `sha256:<hex>` of the DER encoding.
    pub fingerprint: String,
    /// `serial:<hex>` of the serial number (lowercase, no leading zeros).
    pub serial: String,
}

impl CertIds {
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        use sha2::Digest;
        let fingerprint = Revocation::Fingerprint(hex::encode(sha2::Sha256::digest(cert.as_ref())));
        // A certificate that does not parse (a verified one does) gets
        // `serial:`, which no entry names.
        let serial = X509Certificate::from_der(cert.as_ref())
            .map(|(_, x)| canonical_serial(&hex::encode(x.raw_serial())))
            .unwrap_or_default();
        Self { fingerprint: fingerprint.to_string(), serial: format!("serial:{serial}") }
    }
}
