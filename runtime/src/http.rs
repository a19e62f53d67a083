//! Serving HTTP/1.1 so that no client can hold what it likes: every listener caps its open
//! connections, in all and per client address, gives each a bounded time to finish its
//! handshake and to send a request's headers (counted from when the connection starts waiting
//! for a request, so an idle keep-alive connection is closed after the same time, as Go's
//! `ReadTimeout` does when no `IdleTimeout` is set), closes any connection at a fixed age (a
//! client that stops reading an answer cannot keep its place), and reads headers into a small
//! buffer.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// The most of those one client address may hold.
    pub max_connections_per_peer: usize,
    /// The age at which a connection is closed, whatever it is doing.
    pub max_connection_age: Duration,
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
        let connecting = handshake(stream);
        let http = http.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let open = open.clone();
        tokio::spawn(async move {
            let served = tokio::time::timeout(limits.max_connection_age, async {
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
            })
            .await;
            if served.is_err() {
                tracing::debug!(listener, "connection closed at its age limit");
            }
            open.dec();
            drop((permit, peer_slot));
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
        let router = Router::new().route("/", get(|| async { "x".repeat(4 << 20) }));
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

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection_at_the_age_limit() {
        let limits = Limits {
            max_connection_age: Duration::from_secs(1),
            ..Limits::ADMIN
        };
        let (addr, open) = big_answers(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // It never reads the 4 MiB: the server's writes stall, and the age limit ends them.
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
