//! An in-process fake Kubernetes API server over real HTTP on 127.0.0.1, for the real
//! `kube::Client` and kube-runtime to talk to.
//!
//! It emulates: get; list with label and field selectors and `limit`/`continue`; watch as an
//! ordered JSON event stream from a resourceVersion, with bookmarks, `sendInitialEvents`, and a
//! 410 ERROR event for a compacted version; create (409 AlreadyExists); replace (409 Conflict on
//! a stale resourceVersion); patch (server-side apply with per-manager field ownership,
//! conflicts and `force`; merge, JSON and strategic-merge patches, the last treated as merge);
//! delete with finalizers and deletionTimestamp, namespace deletion that empties the namespace,
//! garbage collection through ownerReferences (Background and Orphan); the status subresource;
//! and `Status` error bodies.
//!
//! It does not emulate: authentication, RBAC and admission (every request is allowed);
//! validation beyond names, types and Secret data; server-side apply's merging of keyed lists
//! (every list is atomic) and YAML apply bodies (JSON only); Foreground deletion (served as
//! Background); consistent snapshots across list pages; `deletecollection`; discovery
//! (`/api`, `/apis`); and the shared storage of core/v1 and events.k8s.io/v1 Events, which are
//! two separate stores here.

mod fields;
mod kinds;
mod selectors;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::HarnessError;
use server::Shared;
pub use server::{ApiRequest, HARNESS_HEADER};

pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeApiServer {
    /// Starts a server on a free loopback port; it stops when dropped.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with_bookmarks_every(Duration::from_secs(1)).await
    }

    pub async fn start_with_bookmarks_every(interval: Duration) -> Result<Self, HarnessError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::new()),
            bookmark_interval: interval,
            shutdown: CancellationToken::new(),
            requests: Mutex::default(),
        });
        let router = axum::Router::new()
            .fallback(server::handle)
            .with_state(Arc::clone(&shared));
        let stop = shared.shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "fake API server stopped");
            }
        });
        Ok(Self { addr, shared })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A real `kube::Client` pointed at this server, with `default` as its namespace.
    pub fn client(&self) -> Result<kube::Client, HarnessError> {
        self.client_at(&self.url())
    }

    /// As `client`, but sent to `url`: a proxy in front of this server.
    pub fn client_at(&self, url: &str) -> Result<kube::Client, HarnessError> {
        let uri = url
            .parse()
            .map_err(|e| HarnessError::Startup(format!("fake API server URL: {e}")))?;
        let mut config = kube::Config::new(uri);
        config.headers.push((
            axum::http::HeaderName::from_static(HARNESS_HEADER),
            axum::http::HeaderValue::from_static("true"),
        ));
        Ok(kube::Client::try_from(config)?)
    }

    /// Every request served so far, as RBAC would see it.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Writes a kubeconfig for this server, for a service binary started as its own process
    /// (`KUBECONFIG=<path>`).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), HarnessError> {
        write_kubeconfig(path, &self.url())
    }

    /// Forgets the watch history, as etcd compaction does: watches and list continuations from
    /// older resourceVersions then get 410 Gone.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// The newest resourceVersion.
    pub fn revision(&self) -> u64 {
        self.shared.store().revision()
    }
}

impl Drop for FakeApiServer {
    /// Stops the server, and fails the test when a hearth service asked for something the RBAC
    /// in `deploy/` would refuse it (unless the test failed already).
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        if !std::thread::panicking()
            && let Err(error) = crate::rbac::check_requests(&self.requests())
        {
            panic!("{error}");
        }
    }
}

/// Writes a kubeconfig that sends a client to `server`, with no credentials.
pub fn write_kubeconfig(path: &Path, server: &str) -> Result<(), HarnessError> {
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
         cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n"
    );
    std::fs::write(path, kubeconfig)?;
    Ok(())
}
