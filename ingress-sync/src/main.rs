use clap::Parser;

// One thread: the work is waiting on the API server, and a second worker thread (with its own
// allocator arena) costs about 1 MiB of the 12 MiB it is held to.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    ingress_sync::run(ingress_sync::Options::parse()).await?;
    Ok(())
}
