//! The admin server every service runs: `/livez`, `/readyz` and `/metrics` on `ADMIN_ADDR`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::http::{self, ConnectionMetrics, Limits};

/// Readiness as a set of named gates: `/readyz` answers 200 only once every registered gate has
/// opened (first watch sync, first database connection, …). With no gates it is ready at once.
#[derive(Clone, Default)]
pub struct Readiness {
    gates: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

/// One condition of readiness, closed until `open` is called.
pub struct ReadinessGate {
    name: &'static str,
    gates: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    pub fn gate(&self, name: &'static str) -> ReadinessGate {
        self.lock().insert(name, false);
        ReadinessGate {
            name,
            gates: Arc::clone(&self.gates),
        }
    }

    /// The names of the gates still closed; empty means ready.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, open)| !**open)
            .map(|(name, _)| *name)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        self.gates.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ReadinessGate {
    pub fn open(&self) {
        self.set(true);
    }

    /// Closes the gate again, e.g. when the database connection is lost.
    pub fn close(&self) {
        self.set(false);
    }

    fn set(&self, open: bool) {
        self.gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.name, open);
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Registry,
}

/// A bound admin listener; binding first lets a taken port fail start-up with a clear error.
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
}

impl AdminServer {
    /// Binds the admin server; `pages` adds a service's own routes (a status page) beside
    /// `/livez`, `/readyz` and `/metrics`.
    pub async fn bind(
        addr: SocketAddr,
        readiness: Readiness,
        registry: Registry,
        pages: Router,
    ) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::AdminBind { addr, source })?;
        let router = Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(AdminState {
                readiness,
                registry,
            })
            .merge(pages);
        Ok(Self { listener, router })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(Error::AdminServe)
    }

    /// Serves until `shutdown`, within the admin limits (a slow or idle client cannot hold it).
    pub async fn serve(
        self,
        connections: ConnectionMetrics,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        http::serve(
            "admin",
            self.listener,
            self.router,
            Limits::ADMIN,
            http::plain,
            connections,
            shutdown,
        )
        .await;
        Ok(())
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let waiting = state.readiness.waiting_for();
    if waiting.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let body = format!("not ready; waiting for: {}\n", waiting.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, encoder.format_type())], body).into_response(),
        Err(error) => {
            tracing::error!(error = %error, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_gate_is_open() {
        let readiness = Readiness::default();
        assert!(readiness.waiting_for().is_empty());
        let watch = readiness.gate("watch");
        let database = readiness.gate("database");
        assert_eq!(readiness.waiting_for(), ["database", "watch"]);
        watch.open();
        assert_eq!(readiness.waiting_for(), ["database"]);
        database.open();
        assert!(readiness.waiting_for().is_empty());
        database.close();
        assert_eq!(readiness.waiting_for(), ["database"]);
    }
}
