//! An ephemeral Redis: `redis-server` on a free loopback port with no persistence, from the
//! machine's own binary. Stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{HarnessError, free_port, on_path, wait_for_server};

const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RedisServer {
    dir: TempDir,
    binary: PathBuf,
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` options, e.g. `["--databases", "2"]`.
    pub async fn start_with(extra: &[&str]) -> Result<Self, HarnessError> {
        let binary = on_path("redis-server")
            .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| p.is_file()))
            .ok_or(HarnessError::MissingBinary {
                binary: "redis-server",
                package: "redis-server",
                looked: "on PATH and in /usr/bin".into(),
            })?;
        let server = Self {
            dir: tempfile::Builder::new().prefix("hearth-redis-").tempdir()?,
            binary,
            port: free_port()?,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            child: None,
        };
        crate::start_on_a_free_port(server).await
    }

    /// Starts (or starts again, on the same port, empty, as after a real restart without
    /// persistence) the server and waits for PING.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self.dir.path().join("redis.log");
        let mut child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Ours answering, not another test's server that took the port first: Redis asks for
        // no password, so its process id tells.
        let pid = format!("process_id:{}\r", child.id());
        let ours_answers = || async {
            match self.connect().await {
                Ok(mut connection) => redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok_and(|info| info.contains(&pid)),
                Err(_) => false,
            }
        };
        if wait_for_server(&mut child, READY_TIMEOUT, ours_answers).await? {
            self.child = Some(child);
            Ok(())
        } else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            Err(HarnessError::Startup(format!(
                "redis-server did not start: {log}"
            )))
        }
    }

    /// Kills the server; its data is gone, as for a Redis without persistence.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// Redis that hangs.
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal("-STOP")
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), HarnessError> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| HarnessError::Startup("redis-server is not running".into()))?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Startup(format!("kill {signal} failed")))
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection as the default user.
    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection, HarnessError> {
        let client = redis::Client::open(self.url())
            .map_err(|e| HarnessError::Startup(format!("redis URL: {e}")))?;
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| HarnessError::Startup(format!("connecting to redis: {e}")))
    }
}

impl crate::LocalServer for RedisServer {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    async fn restart(&mut self) -> Result<(), HarnessError> {
        RedisServer::restart(self).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("stopping the test redis failed: {error}");
        }
    }
}
