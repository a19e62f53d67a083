//! ingress-sync: Keeps each app's Tailscale Ingress in sync and publishes its URL back to the app.
//!
//! Today the process runs the shared admin server and waits for shutdown; its reconcile work
//! arrives with its own issue.

use clap::Parser;
use hearth_runtime::{CommonOptions, Process};

pub const SERVICE: &str = "ingress-sync";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "Keeps each app's Tailscale Ingress in sync and publishes its URL back to the app")]
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
