//! db-provisioner: Creates each opted-in app's PostgreSQL role and database and Redis index, and delivers the credentials as a Secret.
//!
//! Today the process runs the shared admin server and waits for shutdown; its reconcile work
//! arrives with its own issue.

use clap::Parser;
use hearth_runtime::{CommonOptions, Process};

pub const SERVICE: &str = "db-provisioner";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "Creates each opted-in app's PostgreSQL role and database and Redis index, and delivers the credentials as a Secret")]
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
