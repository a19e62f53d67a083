//! What every hearth service shares: options, telemetry, the admin server, the shutdown signal,
//! leader election, and the annotation contract.

pub mod admin;
pub mod annotations;
pub mod controller;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod options;
mod sensitive;
pub mod shutdown;
pub mod telemetry;
pub mod tls_client;

use std::net::SocketAddr;
use std::time::Duration;

pub use options::{CommonOptions, LogFormat};
pub use sensitive::Sensitive;

use admin::{AdminServer, Readiness};
use shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {reason}")]
    LogFilter { filter: String, reason: String },
    #[error("a log subscriber was already installed")]
    TelemetryAlreadySet,
    #[error("cannot listen for the admin server on {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin server failed: {0}")]
    AdminServe(std::io::Error),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(std::io::Error),
    #[error("tasks were still running {0:?} after the shutdown signal")]
    DrainTimedOut(Duration),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Kubernetes API: no answer about the lease within {0:?}")]
    LeaseRoundTimedOut(Duration),
    #[error("{0}")]
    TlsClient(String),
}

/// A Kubernetes client for the cluster the kubeconfig or the pod's service account names, that
/// introduces itself as `hearth-<service>/<version>` (the API server's audit log shows which
/// service made each request).
pub async fn kube_client(service: &str, version: &str) -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    if let Ok(agent) = axum::http::HeaderValue::try_from(format!("hearth-{service}/{version}")) {
        config.headers.push((axum::http::header::USER_AGENT, agent));
    }
    kube::Client::try_from(config)
}

/// A running service process: logging set up, the admin server listening, signals handled.
/// A service adds its own tasks through `shutdown` and its readiness gates through `readiness`.
pub struct Process {
    pub registry: prometheus::Registry,
    pub readiness: Readiness,
    pub shutdown: Shutdown,
    pub admin_addr: SocketAddr,
    /// Connection counts of every listener the process serves.
    pub connections: http::ConnectionMetrics,
    /// Closed until the service has added all its gates: the admin server listens before they
    /// exist, and /readyz must not say ready in between.
    setup: admin::ReadinessGate,
}

impl Process {
    pub async fn start(
        service: &'static str,
        version: &'static str,
        options: &CommonOptions,
    ) -> Result<Self, Error> {
        Self::start_with_pages(service, version, options, axum::Router::new()).await
    }

    /// As `start`, with the service's own pages on the admin server.
    pub async fn start_with_pages(
        service: &'static str,
        version: &'static str,
        options: &CommonOptions,
        pages: axum::Router,
    ) -> Result<Self, Error> {
        telemetry::init(options.log_format, &options.rust_log)?;
        let registry = metrics::registry(service, version)?;
        let connections = http::ConnectionMetrics::register(&registry)?;
        let readiness = Readiness::default();
        let setup = readiness.gate("setup");
        let shutdown = Shutdown::new(shutdown::DEFAULT_DRAIN);
        shutdown.listen_for_signals()?;
        let admin = AdminServer::bind(
            options.admin_addr,
            readiness.clone(),
            registry.clone(),
            pages,
        )
        .await?;
        let admin_addr = admin.local_addr()?;
        shutdown.spawn(
            "admin-server",
            admin.serve(connections.clone(), shutdown.token()),
        );
        tracing::info!(service, version, admin = %admin_addr, pod = %options.pod_name, "started");
        Ok(Self {
            registry,
            readiness,
            shutdown,
            admin_addr,
            connections,
            setup,
        })
    }

    /// Waits for the shutdown signal and the drain of every task. The service has set itself up
    /// by now, so its own gates alone decide readiness from here.
    pub async fn run_until_shutdown(self) -> Result<(), Error> {
        self.setup.open();
        let result = self.shutdown.wait().await;
        tracing::info!("stopped");
        result
    }
}
