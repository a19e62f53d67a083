//! HTTP and TLS probes: an app's page (2xx or 3xx is up: an app's front page often sends one to
//! its login), and the certificate of its published URL.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::ServerName;

use super::{Detail, Reason, Report};
use crate::Error;

/// The most of an answer's body a probe reads; the rest is never fetched.
const MAX_BODY: usize = 64 * 1024;

pub struct WebProbe {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    tls: tokio_rustls::TlsConnector,
}

impl WebProbe {
    /// Trusts the system's CAs, plus those in `extra_ca` (PEM) when given.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, Error> {
        let config = hearth_runtime::tls_client::config(extra_ca, "PROBE_CA_FILE")
            .map_err(|e| Error::Config(e.to_string()))?;
        let connector = hearth_runtime::tls_client::connector(config.clone(), None);
        Ok(Self {
            // One connection per probe, closed after: a probe checks that the app takes one.
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// GETs `uri`, sending `host` as the Host header when given (a Service reached by its
    /// cluster IP). Up on 2xx and 3xx.
    pub async fn http(&self, uri: Uri, host: Option<&str>) -> Report {
        let mut request = Request::get(uri).header(USER_AGENT, "hearth-health-exporter");
        if let Some(host) = host {
            request = request.header(HOST, host);
        }
        let request = match request.body(Empty::new()) {
            Ok(request) => request,
            Err(error) => return Report::failure(Reason::Protocol, error.to_string()),
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                let reason = if caused_by_tls(&error) {
                    Reason::Tls
                } else if error.is_connect() {
                    Reason::Connect
                } else {
                    // Connected, but what came back was not HTTP (or nothing, then a close).
                    Reason::Protocol
                };
                return Report::failure(reason, describe(&error));
            }
        };
        let status = response.status();
        // Read a little of the body (a half-open answer is no answer), never all of it.
        if let Err(error) = Limited::new(response.into_body(), MAX_BODY).collect().await
            && !error.is::<LengthLimitError>()
        {
            return Report::failure(Reason::Protocol, format!("reading the answer: {error}"));
        }
        let detail = Detail::Http {
            status: status.as_u16(),
        };
        if status.is_success() || status.is_redirection() {
            return Report::success(detail);
        }
        let mut message = format!("answered {status}");
        if status == hyper::StatusCode::BAD_REQUEST
            && let Some(host) = host
        {
            // Django's ALLOWED_HOSTS and the like answer 400 to a host they do not know.
            message.push_str(&format!(
                " (an app that only accepts its own host names answers this to {host}; allow \
                 that name or point hearth.dev/probe at a health path that accepts it)"
            ));
        }
        Report::failure_with(Reason::HttpStatus, message, detail)
    }

    /// Connects to `host:port`, verifies the certificate chain for `host`, and reads when the
    /// certificate of the chain that expires first expires.
    pub async fn certificate(&self, host: &str, port: u16) -> Report {
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            return Report::failure(Reason::Tls, format!("{host} is not a TLS server name"));
        };
        let tcp = match tokio::net::TcpStream::connect((host, port)).await {
            Ok(tcp) => tcp,
            Err(error) => return Report::failure(Reason::Connect, error.to_string()),
        };
        let stream = match self.tls.connect(name, tcp).await {
            Ok(stream) => stream,
            Err(error) => return Report::failure(Reason::Tls, error.to_string()),
        };
        let (_, session) = stream.get_ref();
        let earliest = session
            .peer_certificates()
            .into_iter()
            .flatten()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, cert)| cert.validity().not_after.timestamp())
            .min();
        match earliest {
            Some(earliest_expiry) => Report::success(Detail::Tls { earliest_expiry }),
            None => Report::failure(Reason::Tls, "no certificate could be read"),
        }
    }
}

/// An error and its causes, for people.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Whether TLS (a certificate, a handshake) is somewhere in an error's causes.
fn caused_by_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(inner) = cause {
        let wrapped = inner
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|io| io.is::<rustls::Error>());
        if inner.is::<rustls::Error>() || wrapped {
            return true;
        }
        cause = inner.source();
    }
    false
}
