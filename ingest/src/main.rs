//! The `ingest` binary: parse configuration, set up telemetry, run the chosen command.

use ingest::cli::{Cli, Command};
use ingest::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse_with_default().command.expect("parse_with_default always sets a command") {
        Command::Serve(config) => {
            runtime::telemetry::init_tracing(config.telemetry.log_format);
            let app = Application::build(*config).await?;
            tracing::info!(port = app.port(), "ingest listening");
            app.run_until_stopped(runtime::telemetry::shutdown_signal()).await
        }
        Command::Webhooks(command) => {
            runtime::telemetry::init_tracing(runtime::config::LogFormat::Text);
            ingest::unipile::cli::run_webhooks(command).await
        }
        Command::DeadLetters(command) => {
            runtime::telemetry::init_tracing(runtime::config::LogFormat::Text);
            ingest::dead_letters::run(command).await
        }
        Command::Sync(command) => {
            runtime::telemetry::init_tracing(runtime::config::LogFormat::Text);
            ingest::unipile::cli::run_sync(*command).await
        }
    }
}
