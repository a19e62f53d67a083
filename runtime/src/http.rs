//! Serving HTTP/1.1 so that no client can hold what it likes: every listener caps its open
//! connections, in all and per client address, gives each a bounded time to finish its
//! handshake and to send a request's headers (counted from when the connection starts waiting
//! for a request, so an idle keep-alive connection is closed after the same time, as Go's
//! `ReadTimeout` does when no `IdleTimeout` is set), closes any connection at a fixed age (the
//! request in progress is finished first, within a grace; a client that stops reading an answer
//! cannot keep its place beyond it), and reads headers into a small buffer.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// The most of those one client address may hold.
    pub max_connections_per_peer: usize,
    /// The age at which a connection is asked to close: it finishes the request in progress and
    /// takes no more.
    pub max_connection_age: Duration,
    /// How long a connection asked to close (at its age, or at shutdown) may take to finish
    /// before it is cut.
    pub close_grace: Duration,
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
        max_connections_per_peer: 16,
        max_connection_age: Duration::from_secs(60),
        close_grace: Duration::from_secs(10),
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
    let connections = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(PeerCounts::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let open = metrics.open.with_label_values(&[listener]);
    let refused = metrics.refused.with_label_values(&[listener]);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer.ip()),
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
        let Some(peer_slot) = PeerCounts::take(&peers, peer, limits.max_connections_per_peer)
        else {
            refused.inc();
            tracing::debug!(listener, %peer, "connection refused: too many open from one address");
            drop(stream);
            continue;
        };
        open.inc();
        let connection = serve_connection(
            listener,
            handshake(stream),
            router.clone(),
            http.clone(),
            limits,
            shutdown.clone(),
        );
        let open = open.clone();
        connections.spawn(async move {
            connection.await;
            open.dec();
            drop((permit, peer_slot));
        });
    }
    // Every connection has been asked to close and is cut after its grace, so this is bounded.
    connections.close();
    connections.wait().await;
}

/// One connection from accept to close: the handshake within its timeout, then requests until
/// the client leaves, the connection reaches its age or the server shuts down; in the last two
/// cases the request in progress may finish within the grace.
async fn serve_connection<F, S>(
    listener: &'static str,
    connecting: F,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    limits: Limits,
    shutdown: CancellationToken,
) where
    F: Future<Output = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let aged = tokio::time::sleep(limits.max_connection_age);
    let stream = match tokio::time::timeout(limits.handshake_timeout, connecting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return tracing::debug!(%error, listener, "handshake failed"),
        Err(_) => return tracing::debug!(listener, "handshake timed out"),
    };
    let service = TowerToHyperService::new(router);
    let mut connection = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
    let why = tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, listener, "connection ended with an error");
            }
            return;
        }
        () = aged => "its age limit",
        () = shutdown.cancelled() => "shutdown",
    };
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.close_grace, connection).await {
        Ok(_) => tracing::debug!(listener, why, "connection closed"),
        Err(_) => tracing::debug!(listener, why, "connection cut: it did not finish in time"),
    }
}

/// Open connections per client address; an entry goes when its last connection does, so the
/// map never holds more addresses than there are open connections.
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in its address's count, given back when dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    peer: IpAddr,
}

impl PeerCounts {
    fn take(counts: &Arc<Self>, peer: IpAddr, most: usize) -> Option<PeerSlot> {
        let mut map = counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(peer).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: Arc::clone(counts),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// The handshake of plain HTTP: none.
pub async fn plain(stream: TcpStream) -> io::Result<TcpStream> {
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves a 4 MiB answer under `limits`; the address and the open-connection gauge.
    async fn big_answers(limits: Limits) -> (std::net::SocketAddr, prometheus::IntGauge) {
        let registry = Registry::new();
        let metrics = ConnectionMetrics::register(&registry).unwrap();
        let open = metrics.open.with_label_values(&["test"]);
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let router = Router::new()
            .route("/", get(|| async { "x".repeat(4 << 20) }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    "done"
                }),
            );
        tokio::spawn(serve(
            "test",
            socket,
            router,
            limits,
            plain,
            metrics,
            CancellationToken::new(),
        ));
        (addr, open)
    }

    /// Sends `GET path` to a `big_answers` server under `limits`; the connection and the gauge.
    async fn requested(limits: Limits, path: &str) -> (TcpStream, prometheus::IntGauge) {
        let (addr, open) = big_answers(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        (stream, open)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection_at_the_age_limit() {
        let limits = Limits {
            max_connection_age: Duration::from_secs(1),
            close_grace: Duration::from_millis(300),
            ..Limits::ADMIN
        };
        let (mut stream, open) = requested(limits, "/").await;
        // It never reads the 4 MiB: the server's writes stall, and the age limit and its grace
        // end them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(open.get(), 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            open.get(),
            0,
            "the stalled connection still holds its place"
        );
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        assert!(rest.len() < 4 << 20, "the answer was cut off");
    }

    #[tokio::test]
    async fn a_request_in_progress_at_the_age_limit_is_answered_then_the_connection_closes() {
        let limits = Limits {
            max_connection_age: Duration::from_millis(500),
            close_grace: Duration::from_secs(5),
            ..Limits::ADMIN
        };
        let started = std::time::Instant::now();
        let (mut stream, open) = requested(limits, "/slow").await;
        // The answer comes 800 ms in, past the 500 ms age: whole, and then the server closes.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closed right after the answer, not at the end of the grace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(open.get(), 0);
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        let limits = Limits {
            max_connections: 4,
            max_connections_per_peer: 2,
            ..Limits::ADMIN
        };
        let (addr, open) = big_answers(limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(open.get(), 2, "the third from the same address was refused");
        let mut third = held.pop().unwrap();
        let mut byte = [0_u8; 1];
        assert_eq!(third.read(&mut byte).await.unwrap(), 0, "closed at once");
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(open.get(), 0);
        // Its places are free again.
        let _again = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(open.get(), 1);
    }
}
