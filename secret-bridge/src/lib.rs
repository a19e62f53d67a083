//! secret-bridge: Drop-in HTTPS replacement for the Bitwarden SDK server that External Secrets Operator talks to.
//!
//! Today the process runs the shared admin server and waits for shutdown; its reconcile work
//! arrives with its own issue.

use clap::Parser;
use hearth_runtime::{CommonOptions, Process};

pub const SERVICE: &str = "secret-bridge";

#[derive(Debug, Parser)]
#[command(name = SERVICE, version, about = "Drop-in HTTPS replacement for the Bitwarden SDK server that External Secrets Operator talks to")]
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
