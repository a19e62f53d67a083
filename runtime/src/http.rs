//! Serving HTTP/1.1 so that no client can hold what it likes: every listener caps its open
//! connections, gives each a bounded time to finish its handshake and to send a request's
//! headers (counted from when the connection starts waiting for a request, so an idle
//! keep-alive connection is closed after the same time, as Go's `ReadTimeout` does when no
//! `IdleTimeout` is set), and reads headers into a small buffer.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long open connections get to finish after shutdown.
const CONNECTION_DRAIN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Time to complete a handshake (TLS), from accept.
    pub handshake_timeout: Duration,
    /// Time to send a request's headers, from when the connection waits for one.
    pub request_head_timeout: Duration,
    /// The read buffer, and so the largest request head (hyper's floor is 8 KiB).
    pub max_header_bytes: usize,
}

impl Limits {
    /// For an admin server (probes, metrics, a status page): few clients, small requests.
    pub const ADMIN: Self = Self {
        max_connections: 32,
        handshake_timeout: Duration::from_secs(5),
        request_head_timeout: Duration::from_secs(5),
        max_header_bytes: 16 * 1024,
    };
}

/// Connection counts per listener: open now, and refused at the cap.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
}

impl ConnectionMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            open: IntGaugeVec::new(
                Opts::new(
                    "hearth_http_connections",
                    "Connections open now, by listener.",
                ),
                &["listener"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "hearth_http_connections_refused_total",
                    "Connections closed at once because the listener had as many open as it \
                     allows, by listener.",
                ),
                &["listener"],
            )?,
        };
        registry.register(Box::new(metrics.open.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
        Ok(metrics)
    }
}

/// Accepts connections until `shutdown`, completes `handshake` on each (the identity for plain
/// HTTP, TLS otherwise) and serves `router` over HTTP/1.1 within `limits`; then lets open
/// connections finish, for a bounded time. `listener` names the listener in metrics and logs.
pub async fn serve<H, F, S>(
    listener: &'static str,
    socket: TcpListener,
    router: Router,
    limits: Limits,
    handshake: H,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) where
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let open = metrics.open.with_label_values(&[listener]);
    let refused = metrics.refused.with_label_values(&[listener]);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, listener, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refused.inc();
            tracing::debug!(listener, "connection refused: too many open");
            drop(stream);
            continue;
        };
        open.inc();
        let connecting = handshake(stream);
        let http = http.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let open = open.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(limits.handshake_timeout, connecting).await {
                Ok(Ok(stream)) => {
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(%error, listener, "connection ended with an error");
                    }
                }
                Ok(Err(error)) => tracing::debug!(%error, listener, "handshake failed"),
                Err(_) => tracing::debug!(listener, "handshake timed out"),
            }
            open.dec();
            drop(permit);
        });
    }
    if tokio::time::timeout(CONNECTION_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener,
            "connections still open after the drain; closing them"
        );
    }
}

/// The handshake of plain HTTP: none.
pub async fn plain(stream: TcpStream) -> io::Result<TcpStream> {
    Ok(stream)
}
