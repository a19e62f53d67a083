//! A TCP proxy that can stop passing bytes, as a network that drops packets without resetting
//! connections does: requests through it then hang instead of failing.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::HarnessError;

pub struct StallingProxy {
    addr: SocketAddr,
    stalled: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    /// Starts passing connections through to `upstream`; it stops when dropped.
    pub async fn start(upstream: SocketAddr) -> Result<Self, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, watching) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            // Owned here, so dropping the proxy ends every connection with it.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let watching = watching.clone();
                connections.spawn(async move {
                    if wait_while_stalled(&watching).await.is_none() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pass(client_read, server_write, watching.clone()),
                        pass(server_read, client_write, watching),
                    );
                });
            }
        });
        Ok(Self {
            addr,
            stalled,
            accepting,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on no byte passes either way, on open connections or new ones.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Bytes pass again, those held back first.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// `None` once the proxy is gone.
async fn wait_while_stalled(stalled: &watch::Receiver<bool>) -> Option<()> {
    stalled
        .clone()
        .wait_for(|stalled| !*stalled)
        .await
        .ok()
        .map(|_| ())
}

async fn pass(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if wait_while_stalled(&stalled).await.is_none() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
