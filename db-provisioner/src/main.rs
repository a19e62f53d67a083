use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    db_provisioner::run(db_provisioner::Options::parse()).await?;
    Ok(())
}
