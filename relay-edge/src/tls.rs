//! What both TLS listeners (tunnel, HTTPS ingest) share: ring as the one
//! crypto provider, and PEM loading whose errors name the file and the
//! config key, never the file's content.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::StartError;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StartError::Tls(format!("`{key}`: cannot read certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!("`{key}`: {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

pub fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, StartError> {
    // The error names the file, never its content.
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| StartError::Tls(format!("`{key}`: cannot read a private key from {}: {e}", path.display())))
}
