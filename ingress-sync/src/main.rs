use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ingress_sync::run(ingress_sync::Options::parse()).await?;
    Ok(())
}
