//! Runs a service binary as its own process and talks to its admin server over HTTP.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tempfile::NamedTempFile;

use crate::{HarnessError, free_port, on_path};

#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// One HTTP/1.1 GET over a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpReply, HarnessError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    http_request(stream, &addr.to_string(), "GET", path, &[], Vec::new()).await
}

/// One HTTP/1.1 request over `stream` (plain TCP or TLS), with exactly the headers given plus
/// `Host` — no Content-Type unless asked for, as ESO sends its bodies.
pub async fn http_request<S>(
    stream: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<HttpReply, HarnessError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: &dyn std::fmt::Display| HarnessError::Startup(format!("{method} {path}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| failed(&e))?;
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    Ok(HttpReply {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A service binary running as a child process, its admin server on a free loopback port and
/// its log captured.
pub struct ServiceProcess {
    child: std::process::Child,
    pub admin: SocketAddr,
    log: NamedTempFile,
}

impl ServiceProcess {
    /// Starts `binary` with `env` added and its admin server on a free port, and waits until
    /// `/livez` answers.
    pub async fn start(binary: &Path, env: &[(&str, &str)]) -> Result<Self, HarnessError> {
        Self::start_at(binary, ([127, 0, 0, 1], free_port()?).into(), env).await
    }

    /// As `start`, with the admin server on `admin`.
    pub async fn start_at(
        binary: &Path,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let log = tempfile::Builder::new()
            .prefix(&format!(
                "hearth-{}-",
                binary.file_name().unwrap_or_default().to_string_lossy()
            ))
            .suffix(".log")
            .tempfile()?;
        let child = Command::new(binary)
            .env("ADMIN_ADDR", admin.to_string())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()?;
        let mut process = Self { child, admin, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(admin, "/livez").await.is_ok() {
                return Ok(process);
            }
            if process.child.try_wait()?.is_some() || Instant::now() > deadline {
                return Err(HarnessError::Startup(format!(
                    "{} did not answer on {admin}: {}",
                    binary.display(),
                    process.logs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Result<HttpReply, HarnessError> {
        http_get(self.admin, path).await
    }

    /// Sends SIGTERM, as the kubelet does, and waits for the process to exit.
    pub async fn terminate(&mut self, within: Duration) -> Result<ExitStatus, HarnessError> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                let lines: Vec<&str> = logs.lines().collect();
                return Err(HarnessError::Startup(format!(
                    "still running {within:?} after SIGTERM; its last log lines:\n{}",
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The process id, e.g. to read its memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its log goes (removed with the process).
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl ServiceProcess {
    /// Kills the process at once (SIGKILL), as an OOM kill or a node failure would.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the service said, the last lines being the likeliest cause.
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!(
                "--- last log lines of the service on {} ---\n{}",
                self.admin,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// A process's resident memory in KiB (`VmRSS`), or its peak (`VmHWM`) when `peak`.
pub fn resident_kib(pid: u32, peak: bool) -> Option<u64> {
    let field = if peak { "VmHWM:" } else { "VmRSS:" };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `promtool check metrics` (Debian package `prometheus`) over an exposition.
pub fn promtool_check_metrics(exposition: &str) -> Result<(), HarnessError> {
    let promtool = on_path("promtool").ok_or(HarnessError::MissingBinary {
        binary: "promtool",
        package: "prometheus",
        looked: "on PATH".into(),
    })?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(exposition.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Startup(format!(
            "promtool check metrics failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// What every service that talks to Kubernetes must do, checked twice: as
/// `check_service_binary` says, against the fake API server; then against an API server that
/// accepts connections and never answers (one restarting, or a node losing its network), where
/// `/readyz` must stay 503 and SIGTERM must still end the process cleanly within five seconds.
/// `extra` is added to the environment of both runs.
pub async fn check_kube_service_binary(
    binary: &str,
    service: &str,
    extra: &[(&str, &str)],
) -> Result<(), HarnessError> {
    let api = crate::FakeApiServer::start().await?;
    let namespace = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some("hearth-system".to_owned()),
            ..kube::api::ObjectMeta::default()
        },
        ..Default::default()
    };
    kube::Api::all(api.client()?)
        .create(&kube::api::PostParams::default(), &namespace)
        .await?;
    // The same API behind a proxy that passes nothing: connections are taken, never answered.
    let stalled = crate::stall::StallingProxy::start(api.addr()).await?;
    stalled.stall();
    let dir = tempfile::tempdir()?;
    let kubeconfig_to = |name: &str, server: &str| -> Result<String, HarnessError> {
        let path = dir.path().join(name);
        crate::fake_api::write_kubeconfig(&path, server)?;
        Ok(path.display().to_string())
    };
    let answering = kubeconfig_to("kubeconfig", &api.url())?;
    let silent = kubeconfig_to("stalled-kubeconfig", &stalled.url())?;
    let env_with = |kubeconfig| {
        let mut env = vec![
            ("KUBECONFIG", kubeconfig),
            ("POD_NAMESPACE", "hearth-system"),
        ];
        env.extend_from_slice(extra);
        env
    };
    check_service_binary(binary, service, &env_with(answering.as_str())).await?;

    let env = env_with(silent.as_str());
    let mut process = ServiceProcess::start(Path::new(binary), &env).await?;
    // Long enough for the service to have sent its first requests into the stall.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let readyz = process.get("/readyz").await?;
    assert_eq!(
        readyz.status, 503,
        "ready without Kubernetes: {}",
        readyz.body
    );
    let status = process.terminate(Duration::from_secs(5)).await?;
    assert!(status.success(), "exit status {status}: {}", process.logs());
    Ok(())
}

/// What every service binary must do on its admin port, checked against a running process
/// started with `env` added: `/livez` answers 200 at once and `/readyz` soon after, `/metrics`
/// is text format 0.0.4 with `hearth_build_info{service,version}` and passes promtool, and
/// SIGTERM ends it cleanly with JSON log lines.
pub async fn check_service_binary(
    binary: &str,
    service: &str,
    env: &[(&str, &str)],
) -> Result<(), HarnessError> {
    let mut process = ServiceProcess::start(Path::new(binary), env).await?;
    let livez = process.get("/livez").await?;
    assert_eq!(livez.status, 200, "/livez: {}", livez.body);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let readyz = process.get("/readyz").await?;
        if readyz.status == 200 {
            break;
        }
        assert_eq!(readyz.status, 503, "/readyz: {}", readyz.body);
        assert!(
            readyz.body.starts_with("not ready; waiting for: "),
            "{}",
            readyz.body
        );
        assert!(Instant::now() < deadline, "never ready: {}", readyz.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = process.get("/metrics").await?;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .content_type
            .starts_with("text/plain; version=0.0.4"),
        "content type {:?}",
        metrics.content_type
    );
    let build_info = format!(
        "hearth_build_info{{service=\"{service}\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics.body.contains(&build_info), "{}", metrics.body);
    promtool_check_metrics(&metrics.body)?;
    let missing = process.get("/nothing-here").await?;
    assert_eq!(missing.status, 404);
    let status = process.terminate(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}: {}", process.logs());
    let logs = process.logs();
    for line in logs.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON log line: {line}");
    }
    assert!(logs.contains("\"started\""), "{logs}");
    assert!(logs.contains("\"stopped\""), "{logs}");
    Ok(())
}
