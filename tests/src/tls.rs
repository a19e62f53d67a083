//! TLS for tests: a throwaway CA that issues serving certificates as PEM files, and a client
//! that trusts only a given CA, as ESO's does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::HarnessError;

fn failed(what: &str, error: &dyn std::fmt::Display) -> HarnessError {
    HarnessError::Startup(format!("{what}: {error}"))
}

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        let key = KeyPair::generate().map_err(|e| failed("CA key", &e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", &e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params
            .self_signed(&key)
            .map_err(|e| failed("CA", &e))?
            .pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) and writes it and its key
    /// as `<stem>.crt` and `<stem>.key` in `dir`.
    pub fn issue_files(
        &self,
        names: &[&str],
        dir: &Path,
        stem: &str,
    ) -> Result<(PathBuf, PathBuf), HarnessError> {
        self.issue_files_until(names, dir, stem, None)
    }

    /// As `issue_files`, valid until `not_after` (year, month, day) when given.
    pub fn issue_files_until(
        &self,
        names: &[&str],
        dir: &Path,
        stem: &str,
        not_after: Option<(i32, u8, u8)>,
    ) -> Result<(PathBuf, PathBuf), HarnessError> {
        let key = KeyPair::generate().map_err(|e| failed("key", &e))?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .and_then(|mut params| {
                if let Some((year, month, day)) = not_after {
                    params.not_after = rcgen::date_time_ymd(year, month, day);
                }
                params.signed_by(&key, &self.issuer)
            })
            .map_err(|e| failed("certificate", &e))?;
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

/// A TLS client as ESO builds one: it trusts only the CAs in `ca_pem` (never the system's),
/// checks the host name, speaks TLS 1.2 or 1.3 and HTTP/1.1.
pub fn client_trusting(ca_pem: &str) -> Result<tokio_rustls::TlsConnector, HarnessError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| failed("CA bundle", &e))?;
        roots.add(cert).map_err(|e| failed("CA bundle", &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| failed("TLS", &e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
