//! A real Prometheus (Debian `prometheus`) on a free loopback port, scraping the targets it is
//! given on a short interval, with rule files loaded; queried over its HTTP API. Stopped when
//! dropped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::admin::http_get;
use crate::{HarnessError, free_port, on_path, wait_for_server};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How Prometheus scrapes: `scrape_timeout` must not exceed `scrape_interval`.
#[derive(Clone, Copy, Debug)]
pub struct Scrape {
    pub interval: Duration,
    pub timeout: Duration,
}

pub struct PrometheusServer {
    dir: TempDir,
    addr: SocketAddr,
    child: Child,
}

fn find_binary(binary: &'static str) -> Result<PathBuf, HarnessError> {
    on_path(binary)
        .or_else(|| Some(PathBuf::from("/usr/bin").join(binary)).filter(|p| p.is_file()))
        .ok_or(HarnessError::MissingBinary {
            binary,
            package: "prometheus",
            looked: "on PATH and in /usr/bin".into(),
        })
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

impl PrometheusServer {
    /// Starts Prometheus scraping `/metrics` of each target as job `hearth`, evaluating the
    /// rule files given (each a plain Prometheus rules file) every scrape interval.
    pub async fn start(
        targets: &[SocketAddr],
        scrape: Scrape,
        rule_files: &[&Path],
    ) -> Result<Self, HarnessError> {
        let binary = find_binary("prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("hearth-prometheus-")
            .tempdir()?;
        let mut config = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {timeout}\n  \
             evaluation_interval: {interval}\nrule_files:\n",
            interval = millis(scrape.interval),
            timeout = millis(scrape.timeout),
        );
        for file in rule_files {
            let _ = writeln!(config, "  - {:?}", file.display().to_string());
        }
        config.push_str(
            "scrape_configs:\n  - job_name: hearth\n    static_configs:\n      - targets: [",
        );
        let listed: Vec<String> = targets
            .iter()
            .map(|t| format!("{:?}", t.to_string()))
            .collect();
        config.push_str(&listed.join(", "));
        config.push_str("]\n");
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let mut child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let ready = || async {
            http_get(addr, "/-/ready")
                .await
                .is_ok_and(|reply| reply.status == 200)
        };
        if !wait_for_server(&mut child, READY_TIMEOUT, ready).await? {
            let _ = child.kill();
            let _ = child.wait();
            let log =
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
            return Err(HarnessError::Startup(format!(
                "prometheus did not become ready: {log}"
            )));
        }
        Ok(Self { dir, addr, child })
    }

    /// An instant query's result vector (`data.result`); a query Prometheus refuses is an error
    /// carrying its message.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, HarnessError> {
        let path = format!(
            "/api/v1/query?query={}",
            url::form_urlencoded::byte_serialize(expr.as_bytes()).collect::<String>()
        );
        let reply = http_get(self.addr, &path).await?;
        let body: Value = serde_json::from_str(&reply.body)
            .map_err(|e| HarnessError::Startup(format!("query {expr}: {e}: {}", reply.body)))?;
        if body["status"] != "success" {
            return Err(HarnessError::Startup(format!(
                "query {expr}: {}",
                body["error"]
            )));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of a query answering one series, if it answers one.
    pub async fn value(&self, expr: &str) -> Result<Option<f64>, HarnessError> {
        let result = self.query(expr).await?;
        Ok(match result.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
            _ => None,
        })
    }

    /// The alerts firing or pending now, as the API lists them.
    pub async fn alerts(&self) -> Result<Vec<Value>, HarnessError> {
        self.listed("alerts", "alerts").await
    }

    /// The scrape targets' health as Prometheus sees it (`lastError` says why one is down).
    pub async fn targets(&self) -> Result<Vec<Value>, HarnessError> {
        self.listed("targets", "activeTargets").await
    }

    /// The list `data.<key>` of the API's `/api/v1/<endpoint>` answer.
    async fn listed(&self, endpoint: &str, key: &str) -> Result<Vec<Value>, HarnessError> {
        let reply = http_get(self.addr, &format!("/api/v1/{endpoint}")).await?;
        let body: Value = serde_json::from_str(&reply.body)
            .map_err(|e| HarnessError::Startup(format!("{endpoint}: {e}")))?;
        Ok(body["data"][key].as_array().cloned().unwrap_or_default())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a `promtool` subcommand; its output on failure.
pub fn promtool(args: &[&str]) -> Result<String, HarnessError> {
    let output = Command::new(find_binary("promtool")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(HarnessError::Startup(format!(
            "promtool {}: {text}",
            args.join(" ")
        )))
    }
}

/// Writes the rule groups of a PrometheusRule manifest as a plain Prometheus rules file in
/// `dir` (JSON is YAML), named `hearth.rules.yaml`; its path.
pub fn rules_file_from(prometheus_rule: &Path, dir: &Path) -> Result<PathBuf, HarnessError> {
    let manifest = crate::manifests::yaml_file(prometheus_rule)?;
    if manifest["kind"] != "PrometheusRule" {
        return Err(HarnessError::Startup(format!(
            "{} is not a PrometheusRule",
            prometheus_rule.display()
        )));
    }
    let path = dir.join("hearth.rules.yaml");
    std::fs::write(&path, manifest["spec"].to_string())?;
    Ok(path)
}
