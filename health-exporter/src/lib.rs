//! health-exporter: One Prometheus endpoint and status page for the health of every app, database, secret and ingress.
//!
//! Today the process runs the shared admin server and waits for shutdown; its reconcile work
//! arrives with its own issue.

use clap::Parser;
use hearth_runtime::{CommonOptions, Process};

pub const SERVICE: &str = "health-exporter";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "One Prometheus endpoint and status page for the health of every app, database, secret and ingress")]
pub struct Options {
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] hearth_runtime::Error),
}

pub async fn run(options: Options) -> Result<(), Error> {
    let process = Process::start(SERVICE, env!("CARGO_PKG_VERSION"), &options.common).await?;
    process.run_until_shutdown().await?;
    Ok(())
}
