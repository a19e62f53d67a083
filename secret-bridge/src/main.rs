use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    secret_bridge::run(secret_bridge::Options::parse()).await?;
    Ok(())
}
