//! health-exporter: one Prometheus endpoint and one status page for the health of every app,
//! database, secret and URL hearth looks after.
//!
//! [`discovery`] watches the cluster and makes the set of targets ([`targets`], pure);
//! [`prober`] checks each in the background ([`probe`]) into the [`registry`]; `/metrics`
//! ([`exposition`]) and the status page ([`status`]) only read the registry, so a scrape never
//! waits on a target.

pub mod discovery;
pub mod exposition;
pub mod probe;
pub mod prober;
pub mod registry;
pub mod status;
pub mod targets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hearth_runtime::options::parse_duration;
use hearth_runtime::{CommonOptions, Process, Sensitive};

pub const SERVICE: &str = "health-exporter";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "One Prometheus endpoint and status page for the health of every app, database, secret and ingress")]
pub struct Options {
    #[command(flatten)]
    pub common: CommonOptions,

    /// A PostgreSQL URL for monitoring (a role with pg_monitor is enough).
    #[arg(long, env = "POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<Sensitive<String>>,

    /// A Redis URL for monitoring (a user allowed PING and INFO is enough).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Sensitive<String>>,

    /// How often each target is checked (jittered by ±10 %).
    #[arg(long, env = "PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub probe_interval: Duration,

    /// The most one check may take; shorter than the interval.
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub probe_timeout: Duration,

    /// The most checks running at once. A check that waits out its deadline holds its place, so
    /// this is sized for many silent targets at once: one round of 100 targets with 20 silent
    /// still ends within one deadline.
    #[arg(long, env = "PROBE_CONCURRENCY", default_value_t = 32)]
    pub probe_concurrency: usize,

    /// PEM CA certificates to trust for HTTPS probes, besides the system's.
    #[arg(long, env = "PROBE_CA_FILE")]
    pub probe_ca_file: Option<PathBuf>,

    /// Check the certificates of the apps' published URLs (`hearth.dev/url`). Their `*.ts.net`
    /// names resolve and answer only on the tailnet: turn this on once this pod can reach it.
    #[arg(long, env = "PROBE_PUBLISHED_URLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub probe_published_urls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] hearth_runtime::Error),
    #[error("{0}")]
    Config(String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("Kubernetes API, connect: {0}")]
    Kube(#[from] kube::Error),
}

/// How long after discovery a new target is first checked: within a second or so (a round of
/// checks should not wait), a little apart; `PROBE_CONCURRENCY` bounds the burst.
fn first_check(interval: Duration) -> impl Fn() -> Duration {
    let spread = interval.min(Duration::from_secs(2));
    move || prober::jittered(spread / 2)
}

pub async fn run(options: Options) -> Result<(), Error> {
    if options.probe_timeout.is_zero() || options.probe_timeout >= options.probe_interval {
        return Err(Error::Config(format!(
            "PROBE_TIMEOUT ({:?}) must be longer than zero and shorter than PROBE_INTERVAL ({:?})",
            options.probe_timeout, options.probe_interval
        )));
    }
    if options.probe_concurrency == 0 {
        return Err(Error::Config("PROBE_CONCURRENCY must be at least 1".into()));
    }
    let postgres = options
        .postgres_url
        .as_ref()
        .map(|url| probe::PostgresProbe::new(url, options.probe_timeout))
        .transpose()?;
    let redis = options
        .redis_url
        .as_ref()
        .map(|url| probe::RedisProbe::new(url, options.probe_timeout))
        .transpose()?;
    let web = probe::WebProbe::new(options.probe_ca_file.as_deref())?;
    let registry = Arc::new(registry::Registry::default());
    let process = Process::start_with_pages(
        SERVICE,
        env!("CARGO_PKG_VERSION"),
        &options.common,
        status::router(Arc::clone(&registry)),
    )
    .await?;
    process
        .registry
        .register(Box::new(exposition::Exporter::new(
            Arc::clone(&registry),
            options.probe_interval,
        )?))?;
    let client = hearth_runtime::kube_client(SERVICE, env!("CARGO_PKG_VERSION")).await?;
    let (cluster, watches) =
        discovery::Cluster::watch(&client, options.common.watch_namespace.as_deref());
    for watch in watches {
        let token = process.shutdown.token();
        process.shutdown.spawn("watch", async move {
            tokio::select! {
                () = watch => {}
                () = token.cancelled() => {}
            }
            Ok(())
        });
    }
    hearth_runtime::controller::open_when_synced(
        cluster.namespaces.clone(),
        process.readiness.gate("kubernetes"),
    );
    let (watch_postgres, watch_redis) = (postgres.is_some(), redis.is_some());
    let prober = Arc::new(prober::Prober {
        registry: Arc::clone(&registry),
        cluster: cluster.clone(),
        client,
        web,
        postgres,
        redis,
        interval: options.probe_interval,
        timeout: options.probe_timeout,
        permits: Arc::new(tokio::sync::Semaphore::new(options.probe_concurrency)),
    });
    let token = process.shutdown.token();
    process.shutdown.spawn("prober", async move {
        prober.run(token).await;
        Ok(())
    });
    let token = process.shutdown.token();
    let first = first_check(options.probe_interval);
    let published_urls = options.probe_published_urls;
    process.shutdown.spawn("discovery", async move {
        loop {
            let changed = tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = cluster.changed.notified() => true,
                () = tokio::time::sleep(Duration::from_secs(10)) => false,
            };
            if changed {
                // Let a burst of watch events settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (wanted, apps) = cluster.targets(watch_postgres, watch_redis, published_urls);
            registry.set_targets(wanted, &first);
            registry.set_apps(apps);
            if changed {
                registry.cluster_checks_due();
            }
        }
    });
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
    fn database_urls_never_show_in_debug_output() {
        let options = Options::try_parse_from([
            "health-exporter",
            "--postgres-url",
            "postgres://monitor:TopSecret@pg/postgres",
            "--redis-url",
            "redis://monitor:AlsoSecret@redis:6379",
        ])
        .unwrap();
        let debug = format!("{options:?}");
        assert!(!debug.contains("TopSecret") && !debug.contains("AlsoSecret"));
    }
}
