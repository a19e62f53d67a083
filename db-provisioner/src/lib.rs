//! db-provisioner: creates each opted-in app's PostgreSQL role and database and its Redis
//! database index and ACL user, and delivers the credentials as Secret `hearth-db` in the app's
//! namespace.
//!
//! The reconcile pipeline: fetch (the Namespace and what is already there) → validate
//! ([`desired`], pure) → build ([`secret`], pure) → apply ([`provision`] with [`postgres`],
//! [`allocation`] and [`redis`]; [`finalize`] for opt-out and deletion) → report ([`report`],
//! annotations, metrics), orchestrated by [`controller`].

pub mod allocation;
pub mod controller;
pub mod credentials;
pub mod desired;
pub mod finalize;
pub mod metrics;
pub mod postgres;
pub mod provision;
pub mod redis;
pub mod report;
pub mod secret;
pub mod store;

use std::time::Duration;

use clap::Parser;
use hearth_runtime::{CommonOptions, Process, Sensitive};

pub const SERVICE: &str = "db-provisioner";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "Creates each opted-in app's PostgreSQL role and database and Redis index, and delivers the credentials as a Secret")]
pub struct Options {
    #[command(flatten)]
    pub common: CommonOptions,

    /// Admin connection URL: a role with CREATEDB and CREATEROLE (need not be superuser).
    #[arg(long, env = "POSTGRES_ADMIN_URL", hide_env_values = true)]
    pub postgres_admin_url: Option<Sensitive<String>>,

    /// The PostgreSQL host apps are told to use (default: the admin URL's host).
    #[arg(long, env = "POSTGRES_APP_HOST")]
    pub postgres_app_host: Option<String>,

    /// The PostgreSQL port apps are told to use (default: the admin URL's port).
    #[arg(long, env = "POSTGRES_APP_PORT")]
    pub postgres_app_port: Option<u16>,

    /// The sslmode written into URIs that need one spelled out (miniflux's DATABASE_URL).
    #[arg(long, env = "POSTGRES_APP_SSLMODE", default_value = "disable")]
    pub postgres_app_sslmode: String,

    /// Extensions apps may ask for, comma-separated.
    #[arg(
        long,
        env = "POSTGRES_EXTENSIONS_ALLOWED",
        value_delimiter = ',',
        default_value = ""
    )]
    pub postgres_extensions_allowed: Vec<String>,

    /// Admin connection URL for Redis.
    #[arg(long, env = "REDIS_ADMIN_URL", hide_env_values = true)]
    pub redis_admin_url: Option<Sensitive<String>>,

    /// The Redis host apps are told to use (default: the admin URL's host).
    #[arg(long, env = "REDIS_APP_HOST")]
    pub redis_app_host: Option<String>,

    /// The Redis port apps are told to use (default: the admin URL's port).
    #[arg(long, env = "REDIS_APP_PORT")]
    pub redis_app_port: Option<u16>,

    /// How often every opted-in namespace is checked again, to repair drift (e.g. 5m, 30s).
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "5m", value_parser = parse_resync)]
    pub resync_interval: Duration,
}

/// The resync interval: a duration, and not zero (that would re-check without pause).
fn parse_resync(text: &str) -> Result<Duration, String> {
    match hearth_runtime::options::parse_duration(text)? {
        Duration::ZERO => Err("RESYNC_INTERVAL must be longer than zero".to_owned()),
        interval => Ok(interval),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] hearth_runtime::Error),
    #[error("{0}")]
    Config(String),
    #[error("invalid annotations: {0}")]
    InvalidAnnotations(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} is not set, so this namespace's {1} cannot be provisioned")]
    NotConfigured(&'static str, &'static str),
    #[error("no free Redis database index is left for this namespace")]
    RedisIndexExhausted,
    #[error("Kubernetes API, {action}: {source}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("PostgreSQL is unavailable: {0}")]
    PostgresUnavailable(String),
    #[error(
        "hearth's admin {admin} lacks the ADMIN option on PostgreSQL role {role}, which \
         PostgreSQL 16 and later need before the role can be changed (its password, its LOGIN, \
         or adoption); as a superuser run: GRANT \"{role}\" TO \"{admin}\" WITH ADMIN TRUE, INHERIT FALSE, SET TRUE \
         (the ADMIN option, without inheriting the app's privileges)"
    )]
    AdminOptionMissing { role: String, admin: String },
    #[error(
        "PostgreSQL database {database} is owned by role {owner}, which hearth's admin cannot act \
         for, so it cannot be given back to role {database}; as a superuser run: ALTER DATABASE \
         \"{database}\" OWNER TO \"{database}\""
    )]
    OwnerUnmanageable { database: String, owner: String },
    #[error("the namespace's PostgreSQL data cannot be dropped yet: {0}")]
    DropBlocked(String),
    #[error("{0}")]
    RenameRefused(String),
    #[error("PostgreSQL refused to {action}: {detail}")]
    Postgres {
        action: &'static str,
        duplicate: bool,
        detail: String,
    },
    #[error("Redis is unavailable: {0}")]
    RedisUnavailable(String),
    #[error("Redis refused {action}: {detail}")]
    Redis {
        action: &'static str,
        detail: String,
    },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// The metric label and Event reason: a small, fixed set, never error text.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Runtime(_) | Self::Metrics(_) | Self::Random(_) => "Internal",
            Self::Config(_) | Self::NotConfigured(..) => "NotConfigured",
            Self::InvalidAnnotations(_) | Self::Invalid(_) => "InvalidAnnotation",
            Self::Conflict(_) => "Conflict",
            Self::RedisIndexExhausted => "RedisIndexExhausted",
            Self::Kube { .. } => "KubernetesError",
            Self::PostgresUnavailable(_) => "PostgresUnavailable",
            Self::AdminOptionMissing { .. } => "AdminOptionMissing",
            Self::OwnerUnmanageable { .. } => "DatabaseOwnerUnmanageable",
            Self::DropBlocked(_) => "DropBlocked",
            Self::RenameRefused(_) => "RenameRefused",
            Self::Postgres { .. } => "PostgresError",
            Self::RedisUnavailable(_) => "RedisUnavailable",
            Self::Redis { .. } => "RedisError",
        }
    }

    /// Errors that only a change to the namespace can fix; the rest are retried with backoff
    /// (and every namespace is checked again each resync anyway).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::InvalidAnnotations(_) | Self::Invalid(_) | Self::RenameRefused(_)
        )
    }
}

pub async fn run(options: Options) -> Result<(), Error> {
    let process = Process::start(SERVICE, env!("CARGO_PKG_VERSION"), &options.common).await?;
    controller::start(&process, options).await?;
    process.run_until_shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Options::command().debug_assert();
    }

    #[test]
    fn the_resync_interval_is_never_zero() {
        assert_eq!(parse_resync("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_resync("0").is_err());
        assert!(parse_resync("soon").is_err());
    }

    #[test]
    fn the_admin_url_never_shows_in_debug_output() {
        let options = Options::try_parse_from([
            "db-provisioner",
            "--postgres-admin-url",
            "postgres://admin:TopSecret@pg/postgres",
        ])
        .unwrap();
        assert!(!format!("{options:?}").contains("TopSecret"));
    }
}
