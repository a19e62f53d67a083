//! The test harness every hearth integration test uses: an ephemeral PostgreSQL and Redis
//! started from the machine's own binaries, an in-process fake Kubernetes API server, and
//! helpers to run a service binary as a process and talk to its admin server.

pub mod admin;
pub mod bench;
pub mod browser;
pub mod eso;
pub mod events;
pub mod fake_api;
pub mod fake_bitwarden;
pub mod local;
pub mod manifests;
pub mod postgres;
pub mod prometheus;
pub mod rbac;
pub mod redis;
pub mod sites;
pub mod stall;
pub mod tailscale;
pub mod tls;

use std::net::TcpListener;

pub use fake_api::FakeApiServer;
pub use fake_bitwarden::FakeBitwarden;
pub use postgres::PostgresServer;
pub use redis::RedisServer;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "{binary} was not found ({looked}); install the Debian package `{package}` \
         (apt-get install {package})"
    )]
    MissingBinary {
        binary: &'static str,
        package: &'static str,
        looked: String,
    },
    #[error("{0}")]
    Startup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Polls until `check` gives `Some`, or fails the test saying what never happened.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A sample's value from a Prometheus exposition, e.g. `sample(text, "x_total{a=\"b\"}")`;
/// `None` when the series is not there.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// As [`sample`], with an absent series read as 0 (counters not yet incremented).
pub fn metric(exposition: &str, series: &str) -> f64 {
    sample(exposition, series).unwrap_or(0.0)
}

/// A namespace's annotations from `(key, value)` pairs, as the annotation readers take them.
pub fn annotations(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A port free on 127.0.0.1 at the time of asking.
pub fn free_port() -> Result<u16, HarnessError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server the harness starts from the machine's binaries on a loopback port.
trait LocalServer {
    fn set_port(&mut self, port: u16);
    async fn restart(&mut self) -> Result<(), HarnessError>;
}

/// Starts `server`, on a new port when its port, free when chosen, was taken before the server
/// could bind it (another test's server or client got there first); five tries.
async fn start_on_a_free_port<S: LocalServer>(mut server: S) -> Result<S, HarnessError> {
    for _ in 1..5 {
        match server.restart().await {
            Err(HarnessError::Startup(log)) if log.contains("Address already in use") => {
                server.set_port(free_port()?);
            }
            started => return started.map(|()| server),
        }
    }
    server.restart().await.map(|()| server)
}

/// Waits until `ready` answers yes for a freshly started server process. `Ok(false)` when the
/// process exited or `timeout` passed first.
async fn wait_for_server<F, Fut>(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    mut ready: F,
) -> Result<bool, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(true);
        }
        if child.try_wait()?.is_some() || std::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Finds an executable on PATH.
fn on_path(binary: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    })
}
