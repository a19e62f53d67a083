//! secret-bridge: Drop-in HTTPS replacement for the Bitwarden SDK server that External Secrets Operator talks to.
//!
//! So far: the Bitwarden crypto it will speak ([`crypto`]); the process itself still only runs
//! the shared admin server. The bridge's API and upstream client arrive with its own issue.

pub mod crypto;

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
