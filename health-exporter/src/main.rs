use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    health_exporter::run(health_exporter::Options::parse()).await?;
    Ok(())
}
