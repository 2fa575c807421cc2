//! The `loadgen` binary: see the library's docs for the modes.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = loadgen::Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.clamp(1, 64));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        runtime::telemetry::init_tracing(runtime::config::LogFormat::Text);
        loadgen::run(cli).await
    })
}
