//! An ephemeral PostgreSQL: `initdb` into a temporary directory and `postgres` on a free
//! loopback port, from the machine's own PostgreSQL binaries. Removed when dropped.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{HarnessError, free_port, on_path, wait_for_server};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PostgresServer {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// TCP logins need a password (SCRAM), as in a real deployment, so a test that logs in as
    /// an app role proves its password; the superuser's is this one.
    superuser_password: String,
    /// PostgreSQL refuses to run as root; as root the harness runs it as this user and group.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PostgresServer {
    pub async fn start() -> Result<Self, HarnessError> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("hearth-pg-").tempdir()?;
        let run_as = if std::fs::metadata("/proc/self")?.uid() == 0 {
            let ids = unprivileged_user()?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))?;
            Some(ids)
        } else {
            None
        };
        let server = Self {
            dir,
            bin,
            port: free_port()?,
            superuser_password: format!("superuser-{}", free_port()?),
            run_as,
            child: None,
        };
        server.initdb()?;
        crate::start_on_a_free_port(server).await
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let password_file = self.dir.path().join("superuser-password");
        std::fs::write(&password_file, &self.superuser_password)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&password_file, Some(uid), Some(gid))?;
        }
        let output = self
            .command("initdb")
            .arg("--pgdata")
            .arg(self.data_dir())
            .arg("--pwfile")
            .arg(&password_file)
            .args([
                "--username=postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["--encoding=UTF8", "--no-locale", "--no-sync"])
            .output()?;
        if !output.status.success() {
            return Err(HarnessError::Startup(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    /// Starts (or starts again, on the same port and data) the server and waits until it
    /// accepts connections.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid))?;
        }
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.path())
            // Durability is not what these tests check; speed is what they need.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let url = self.url();
        let accepting = || async {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
        };
        if wait_for_server(&mut child, READY_TIMEOUT, accepting).await? {
            self.child = Some(child);
            Ok(())
        } else {
            let _ = child.kill();
            let _ = child.wait();
            Err(HarnessError::Startup(format!(
                "postgres did not start: {}",
                self.log_tail()
            )))
        }
    }

    /// Stops the server (fast shutdown: sessions are cut), keeping its data for `restart`.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let stopped = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !stopped.success() {
            child.kill()?;
        }
        child.wait()?;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's major version, e.g. 15 or 16.
    pub async fn major_version(&self) -> Result<u32, HarnessError> {
        let row = self
            .connect()
            .await?
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| HarnessError::Startup(format!("reading the version: {e}")))?;
        let number: i32 = row.get(0);
        Ok(u32::try_from(number / 10_000).unwrap_or(0))
    }

    /// The superuser's connection URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            self.superuser_password, self.port
        )
    }

    /// A connection as the superuser; its driver task runs in the background.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, HarnessError> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .map_err(|e| HarnessError::Startup(format!("connecting to postgres: {e}")))?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl crate::LocalServer for PostgresServer {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    async fn restart(&mut self) -> Result<(), HarnessError> {
        PostgresServer::restart(self).await
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("stopping the test postgres failed: {error}");
        }
    }
}

/// Names the directory of the PostgreSQL server binaries the tests use, instead of the
/// machine's own: `scripts/test` runs the PostgreSQL tests a second time with it pointing at
/// PostgreSQL 16.
pub const BINDIR_VARIABLE: &str = "HEARTH_POSTGRES_BINDIR";

/// The directory holding `initdb`, `postgres` and `pg_ctl`: `HEARTH_POSTGRES_BINDIR` when set,
/// else from PATH, `pg_config --bindir`, or the newest of Debian's
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Result<PathBuf, HarnessError> {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "pg_ctl"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os(BINDIR_VARIABLE)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
    {
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(HarnessError::Startup(format!(
                "{BINDIR_VARIABLE}={} holds no initdb, postgres and pg_ctl",
                dir.display()
            )))
        };
    }
    let from_path = on_path("initdb")
        .and_then(|initdb| std::fs::canonicalize(initdb).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    debian.sort_by_key(|dir| {
        dir.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    from_path
        .into_iter()
        .chain(from_pg_config)
        .chain(debian.into_iter().rev())
        .find(|dir| complete(dir))
        .ok_or(HarnessError::MissingBinary {
            binary: "PostgreSQL's initdb, postgres and pg_ctl",
            package: "postgresql",
            looked: "on PATH, in pg_config --bindir and under /usr/lib/postgresql/*/bin".into(),
        })
}

/// The uid and gid of the `postgres` user, else of `nobody`, from /etc/passwd.
fn unprivileged_user() -> Result<(u32, u32), HarnessError> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let find = |wanted: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                [name, _, uid, gid, ..] if *name == wanted => {
                    Some((uid.parse().ok()?, gid.parse().ok()?))
                }
                _ => None,
            }
        })
    };
    find("postgres").or_else(|| find("nobody")).ok_or_else(|| {
        HarnessError::Startup(
            "running as root, and neither a postgres nor a nobody user exists to run PostgreSQL"
                .into(),
        )
    })
}
