//! `relay-edge certs …`: a dev CA, the edge's server certificate and agent
//! client certificates (rcgen). Private keys are written with mode 0600.
//! For production, any CA works: the edge only needs `tunnel.client_ca`.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no CA in {} — run `relay-edge certs init` first", .0.display())]
    NoCa(PathBuf),
    #[error("`{0}` is not a usable name (letters, digits, `.`, `-`, `_`)")]
    BadName(String),
}

/// Files written by [`init`].
pub struct Written {
    pub files: Vec<PathBuf>,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

fn write(path: &Path, content: &str, secret: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(content.as_bytes()).map_err(err)
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })
}

/// The same rule as route, channel and agent names in the config.
fn check_name(name: &str) -> Result<(), CertError> {
    crate::config::check_name(name).map_err(|_| CertError::BadName(name.into()))
}

/// Creates (or reuses) the CA in `dir`, then the edge certificate for `sans`.
pub fn init(dir: &Path, sans: &[String], force: bool) -> Result<Written, CertError> {
    let mut files = Vec::new();
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    if force || !ca_cert.is_file() || !ca_key.is_file() {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "relay dev CA");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write(&ca_cert, &cert.pem(), false)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        files.extend([ca_cert, ca_key]);
    }
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "relay-edge");
    for san in sans {
        params.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.clone().try_into()?),
        });
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 825);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cp, kp) = (dir.join("edge.pem"), dir.join("edge-key.pem"));
    write(&cp, &cert.pem(), false)?;
    write(&kp, &key.serialize_pem(), true)?;
    files.extend([cp, kp]);
    Ok(Written { files })
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let ca_cert = dir.join("ca.pem");
    if !ca_cert.is_file() {
        return Err(CertError::NoCa(dir.to_path_buf()));
    }
    let key = KeyPair::from_pem(&read(&dir.join("ca-key.pem"))?)?;
    Ok(Issuer::from_ca_cert_pem(&read(&ca_cert)?, key)?)
}

/// Issues a client certificate with CN = `name` and `ClientAuth` usage.
pub fn agent(dir: &Path, name: &str) -> Result<Written, CertError> {
    check_name(name)?;
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 825);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cp, kp) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    write(&cp, &cert.pem(), false)?;
    write(&kp, &key.serialize_pem(), true)?;
    Ok(Written { files: vec![cp, kp] })
}

/// Appends a certificate's fingerprint to a revocation list file (created
/// if missing) unless the list already holds it; returns the entry.
pub fn revoke(cert: &Path, list: &Path) -> Result<String, CertError> {
    use crate::tunnel::revocation::{Revocation, list_entries};
    let ids = fingerprint(cert)?;
    let existing = fs::read_to_string(list).unwrap_or_default();
    let listed = |entry: &str| entry.parse::<Revocation>().is_ok_and(|r| r.to_string() == ids.fingerprint);
    if list_entries(&existing).any(|(_, entry)| listed(entry)) {
        return Ok(ids.fingerprint);
    }
    let line = format!("{} # {} revoked {}\n", ids.fingerprint, cert.display(), chrono::Utc::now().to_rfc3339());
    let err = |source| CertError::Write { path: list.to_path_buf(), source };
    let mut f = fs::OpenOptions::new().create(true).append(true).open(list).map_err(err)?;
    f.write_all(line.as_bytes()).map_err(err)?;
    Ok(ids.fingerprint)
}

/// The ids `tunnel.revoked` accepts for a certificate file.
pub fn fingerprint(path: &Path) -> Result<crate::tunnel::tls::CertIds, CertError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path).map_err(|e| CertError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    Ok(crate::tunnel::tls::CertIds::of(&der))
}

#[cfg(test)]
mod tests {
    #[test]
    fn revoke_appends_the_fingerprint_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        super::init(dir.path(), &["localhost".into()], false).expect("init");
        super::agent(dir.path(), "lan-2").expect("agent");
        let (cert, list) = (dir.path().join("lan-2.pem"), dir.path().join("revoked.txt"));
        let id = super::revoke(&cert, &list).expect("revoke");
        assert_eq!(id, super::fingerprint(&cert).expect("ids").fingerprint);
        // Listed already, even in capitals and indented: not appended again.
        let hex = id.strip_prefix("sha256:").expect("a fingerprint").to_ascii_uppercase();
        std::fs::write(&list, format!("# list\n  sha256:{hex} # lan-2\n")).expect("write list");
        super::revoke(&cert, &list).expect("revoke again");
        let text = std::fs::read_to_string(&list).expect("read list");
        assert_eq!(crate::tunnel::revocation::list_entries(&text).count(), 1, "{text}");
    }

    #[test]
    fn init_then_agent_writes_a_verifiable_chain() {
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().expect("tempdir");
        let w = super::init(dir.path(), &["localhost".into(), "127.0.0.1".into()], false).expect("init");
        assert_eq!(w.files.len(), 4);
        super::agent(dir.path(), "lan-1").expect("agent");
        let pem = std::fs::read(dir.path().join("lan-1.pem")).expect("read");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
        assert_eq!(crate::tunnel::tls::identity_of(&der).as_deref(), Some("lan-1"));
        // A second init keeps the CA, so existing agent certificates stay valid.
        let w2 = super::init(dir.path(), &["localhost".into()], false).expect("init again");
        assert_eq!(w2.files.len(), 2);
        assert!(super::agent(dir.path(), "bad name").is_err());
    }
}
