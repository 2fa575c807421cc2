//! The `loadgen` binary: see the library's docs for the modes.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init_tracing(shared::config::LogFormat::Text);
    loadgen::run(loadgen::Cli::parse()).await
}
