//! secret-bridge: a drop-in HTTPS replacement for the Bitwarden SDK server that External Secrets
//! Operator's `bitwardensecretsmanager` provider talks to.
//!
//! [`api`] speaks the SDK server's REST contract to ESO; [`bridge`] holds one session per access
//! token and a short-lived data cache; [`upstream`] speaks Bitwarden's own protocol with the
//! crypto in [`crypto`]; [`tls`] serves it.

pub mod api;
pub mod bridge;
pub mod certs;
pub mod crypto;
pub mod metrics;
pub mod tls;
pub mod upstream;
pub mod upstreams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hearth_runtime::events::EventPublisher;
use hearth_runtime::options::parse_duration;
use hearth_runtime::{CommonOptions, Process, http};

pub const SERVICE: &str = "secret-bridge";

/// The API listener's limits: room for ESO's few connections and for a burst of strangers
/// beside them (no one address may hold more than half), each held at most five seconds before
/// its request (as the SDK server's Go `ReadTimeout`) and a minute in all (ESO opens a new one
/// for each reconcile; one older than that finishes its request, within the 8 s every answer
/// takes at most, and is closed), headers in 16 KiB.
const API_LIMITS: http::Limits = http::Limits {
    max_connections: 512,
    max_connections_per_peer: 256,
    max_connection_age: Duration::from_secs(60),
    close_grace: Duration::from_secs(10),
    handshake_timeout: Duration::from_secs(5),
    request_head_timeout: Duration::from_secs(5),
    max_header_bytes: 16 * 1024,
};
/// How often idle sessions and expired data are swept (sooner when `CACHE_TTL` is shorter).
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "Drop-in HTTPS replacement for the Bitwarden SDK server that External Secrets Operator talks to")]
pub struct Options {
    #[command(flatten)]
    pub common: CommonOptions,

    /// Where ESO reaches the bridge.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9998")]
    pub listen_addr: SocketAddr,

    /// PEM certificate chain to serve (reloaded when the file changes).
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of that certificate.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// More DNS names or IPs for a self-managed certificate, comma-separated.
    #[arg(long, env = "TLS_EXTRA_SANS", value_delimiter = ',')]
    pub tls_extra_sans: Vec<String>,

    /// Serve plain HTTP (development only), as the SDK server's --insecure does.
    #[arg(long, env = "INSECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure: bool,

    /// URL prefixes a request may name as its Bitwarden API or identity server.
    #[arg(
        long,
        env = "ALLOWED_UPSTREAMS",
        value_delimiter = ',',
        default_value = "https://api.bitwarden.com,https://identity.bitwarden.com,https://api.bitwarden.eu,https://identity.bitwarden.eu"
    )]
    pub allowed_upstreams: Vec<String>,

    /// PEM CA certificates to trust for a self-hosted Bitwarden, besides the system's.
    #[arg(long, env = "UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// How long read data is served from memory (e.g. 30s); 0 turns the cache off.
    #[arg(long, env = "CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub cache_ttl: Duration,

    /// The most one call to Bitwarden may take; keeps every answer inside ESO's 10 s.
    #[arg(long, env = "UPSTREAM_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] hearth_runtime::Error),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(
        "{kind} {name} in namespace {namespace} exists and was not made by secret-bridge (it \
         lacks the label app.kubernetes.io/managed-by=hearth-secret-bridge), so it is never \
         replaced; delete or rename it to let secret-bridge keep its own certificate there, or \
         give TLS_CERT_FILE and TLS_KEY_FILE"
    )]
    Foreign {
        kind: &'static str,
        name: &'static str,
        namespace: String,
    },
}

pub async fn run(options: Options) -> Result<(), Error> {
    let process = Process::start(SERVICE, env!("CARGO_PKG_VERSION"), &options.common).await?;
    let metrics = metrics::Metrics::register(&process.registry)?;
    let upstream = upstream::Upstream::new(
        options.upstream_ca_file.as_deref(),
        options.upstream_timeout,
    )?;
    let allowed_upstreams =
        upstreams::AllowList::parse(&options.allowed_upstreams).map_err(Error::Config)?;
    let bridge = Arc::new(bridge::Bridge::new(
        upstream,
        options.cache_ttl,
        metrics.clone(),
    ));
    let sweeping = Arc::clone(&bridge);
    let every = options
        .cache_ttl
        .clamp(Duration::from_secs(1), SWEEP_INTERVAL);
    let token = process.shutdown.token();
    process.shutdown.spawn("sweeper", async move {
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => sweeping.sweep(),
            }
        }
    });
    let state = Arc::new(api::ApiState {
        bridge,
        allowed_upstreams,
        metrics,
    });
    let tls = match (
        &options.tls_cert_file,
        &options.tls_key_file,
        options.insecure,
    ) {
        (_, _, true) => {
            tracing::warn!(
                "INSECURE=true: serving plain HTTP; access tokens cross the network in clear"
            );
            None
        }
        (Some(cert), Some(key), false) => {
            let certificate = tls::CurrentCertificate::new(tls::load_certified_key(cert, key)?);
            let reload = tls::reload_on_change(
                Arc::clone(&certificate),
                cert.clone(),
                key.clone(),
                process.shutdown.token(),
            );
            process.shutdown.spawn("certificate-reload", async move {
                reload.await;
                Ok(())
            });
            Some(tls::acceptor(certificate)?)
        }
        _ => {
            // No files: a CA and certificate of our own, kept in a Secret in our namespace.
            let client = hearth_runtime::kube_client(SERVICE, env!("CARGO_PKG_VERSION"))
                .await
                .map_err(|e| Error::Config(format!("Kubernetes API, connect: {e}")))?;
            let namespace = &options.common.pod_namespace;
            let names = certs::subject_alt_names(namespace, &options.tls_extra_sans);
            let events = EventPublisher::new(
                client.clone(),
                "hearth-secret-bridge",
                &options.common.pod_name,
            );
            let managed = certs::SelfManaged::new(client, namespace, names);
            let ready = process.readiness.gate("tls-certificate");
            let Some((certificate, serving)) = managed
                .start_when_possible(&events, &process.shutdown.token())
                .await
            else {
                process.run_until_shutdown().await?;
                return Ok(());
            };
            ready.open();
            let renewals =
                managed.keep_fresh(Arc::clone(&certificate), serving, process.shutdown.token());
            process.shutdown.spawn("certificate-renewal", async move {
                renewals.await;
                Ok(())
            });
            Some(tls::acceptor(certificate)?)
        }
    };
    let listener = tokio::net::TcpListener::bind(options.listen_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: options.listen_addr,
            source,
        })?;
    tracing::info!(listen = %options.listen_addr, tls = tls.is_some(), "serving the Bitwarden SDK API");
    let router = api::router(state);
    let token = process.shutdown.token();
    let connections = process.connections.clone();
    process.shutdown.spawn("api-server", async move {
        match tls {
            Some(acceptor) => {
                let handshake = move |tcp| acceptor.clone().accept(tcp);
                http::serve(
                    "api",
                    listener,
                    router,
                    API_LIMITS,
                    handshake,
                    connections,
                    token,
                )
                .await;
            }
            None => {
                http::serve(
                    "api",
                    listener,
                    router,
                    API_LIMITS,
                    http::plain,
                    connections,
                    token,
                )
                .await;
            }
        }
        Ok(())
    });
    process.run_until_shutdown().await?;
    Ok(())
}
