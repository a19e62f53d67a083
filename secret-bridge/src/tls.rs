//! TLS ≥ 1.2 over HTTP/1.1 (or plain HTTP for development, `INSECURE=true`), with a
//! certificate from files that is reloaded when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// How often the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Loads a certificate chain and its key from PEM files.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let bad = |path: &Path, why: &dyn std::fmt::Display| {
        Error::Config(format!("{}: {why}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    // The key's contents never go into an error.
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|_| bad(key, &"no readable private key"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|_| bad(key, &"unsupported private key type"))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
pub struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl CurrentCertificate {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(key))))
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

pub fn acceptor(certificate: Arc<CurrentCertificate>) -> Result<TlsAcceptor, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reloads the certificate when either file changes (a mounted Secret being updated); a
/// broken new pair is logged and the old certificate kept.
pub async fn reload_on_change(
    certificate: Arc<CurrentCertificate>,
    cert: PathBuf,
    key: PathBuf,
    shutdown: CancellationToken,
) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RELOAD_CHECK) => {}
        }
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match load_certified_key(&cert, &key) {
            Ok(loaded) => {
                certificate.replace(loaded);
                seen = now;
                tracing::info!(cert = %cert.display(), "reloaded the TLS certificate");
            }
            Err(error) => {
                tracing::warn!(%error, "the new TLS certificate could not be loaded; keeping the old one")
            }
        }
    }
}
