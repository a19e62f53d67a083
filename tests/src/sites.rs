//! Stand-in web apps for probes: a loopback server that answers well, badly, with garbage, with
//! an endless body, over TLS, or never at all. Stopped when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::HarnessError;

/// How a site answers each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// An HTTP/1.1 answer with this status and a short body.
    Status(u16),
    /// Reads the request, sends bytes that are not HTTP, closes.
    Garbage,
    /// Accepts the connection and never answers (what is sent is read and ignored).
    Silent,
    /// 200 with a body that never ends.
    Endless,
    /// 200, except a request for this path, which is never answered.
    SilentAt(&'static str),
}

struct Seen {
    connections: AtomicUsize,
    last_host: Mutex<Option<String>>,
}

pub struct TestSite {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
}

impl TestSite {
    /// A plain-HTTP site on a free loopback port.
    pub async fn start(behaviour: Behaviour) -> Result<Self, HarnessError> {
        Self::serve(behaviour, None, ([127, 0, 0, 1], 0).into()).await
    }

    /// A plain-HTTP site on `addr` (any 127.x.y.z address is loopback on Linux).
    pub async fn start_at(addr: SocketAddr, behaviour: Behaviour) -> Result<Self, HarnessError> {
        Self::serve(behaviour, None, addr).await
    }

    /// An HTTPS site serving the certificate and key in these PEM files.
    pub async fn start_tls(
        behaviour: Behaviour,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, HarnessError> {
        let bad = |e: &dyn std::fmt::Display| HarnessError::Startup(format!("site TLS: {e}"));
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad(&e))?;
        Self::serve(
            behaviour,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            ([127, 0, 0, 1], 0).into(),
        )
        .await
    }

    async fn serve(
        behaviour: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
        addr: SocketAddr,
    ) -> Result<Self, HarnessError> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen {
            connections: AtomicUsize::new(0),
            last_host: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let (task_seen, task_stop) = (Arc::clone(&seen), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = task_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                task_seen.connections.fetch_add(1, Ordering::Relaxed);
                let (seen, stop, tls) = (Arc::clone(&task_seen), task_stop.clone(), tls.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = async {
                            match tls {
                                Some(tls) => {
                                    if let Ok(stream) = tls.accept(stream).await {
                                        answer(stream, behaviour, &seen).await;
                                    }
                                }
                                None => answer(stream, behaviour, &seen).await,
                            }
                        } => {}
                    }
                });
            }
        });
        Ok(Self { addr, seen, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::Relaxed)
    }

    /// The Host header of the last request read.
    pub fn last_host(&self) -> Option<String> {
        self.seen
            .last_host
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads one request head (up to 16 KiB), noting its Host header; the path it asks for.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, seen: &Seen) -> Option<String> {
    let mut head = Vec::new();
    let mut buffer = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > 16 * 1024 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or_default().to_owned();
    let host = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("host")
            .then(|| value.trim().to_owned())
    });
    *seen
        .last_host
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = host;
    Some(path)
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    behaviour: Behaviour,
    seen: &Seen,
) {
    if behaviour == Behaviour::Silent {
        let mut sink = [0_u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let Some(asked) = read_head(&mut stream, seen).await else {
        return;
    };
    let behaviour = match behaviour {
        Behaviour::SilentAt(path) if asked == path => {
            let mut sink = [0_u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        Behaviour::SilentAt(_) => Behaviour::Status(200),
        other => other,
    };
    match behaviour {
        Behaviour::Status(status) => {
            let body = format!("status {status}\n");
            let head = format!(
                "HTTP/1.1 {status} Stand-in\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
        }
        Behaviour::Garbage => {
            let _ = stream
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe garbage\r\n\r\n")
                .await;
        }
        Behaviour::Endless => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
            while stream.write_all(chunk.as_bytes()).await.is_ok() {}
        }
        Behaviour::Silent | Behaviour::SilentAt(_) => {}
    }
    let _ = stream.shutdown().await;
}
