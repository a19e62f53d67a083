//! The HTTPS client every hearth service uses for what it calls (Bitwarden, the Tailscale API,
//! the apps it checks): the system's CA certificates, plus those of a PEM file when one is
//! given, TLS 1.2 or 1.3 by rustls with ring, HTTP/1.1 over http or https.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::Error;

/// The client configuration: system CAs, plus those in `extra_ca` (PEM), which `variable`
/// names in errors.
pub fn config(extra_ca: Option<&Path>, variable: &str) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let bad = |e: &dyn std::fmt::Display| {
            Error::TlsClient(format!("{variable} {}: {e}", path.display()))
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsClient(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An http and https connector with that configuration; a connection attempt is given up after
/// `connect_timeout` when set.
pub fn connector(
    config: rustls::ClientConfig,
    connect_timeout: Option<Duration>,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(connect_timeout);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}
