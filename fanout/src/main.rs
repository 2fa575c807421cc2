//! The `fanout` binary: read the configuration, start logging, build, run until
//! SIGTERM or Ctrl-C. `fanout token` prints a client token for trying it out.

use std::time::Duration;

use clap::Parser;
use fanout::config::{Cli, Command};
use fanout::{Application, Config};
use shared::claims::JwtKeys;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = match (cli.command, cli.serve) {
        (Some(Command::Serve(config)), _) | (None, Some(config)) => config,
        (Some(Command::Token(args)), _) => {
            let keys = JwtKeys::new(&args.jwt_secret);
            println!(
                "{}",
                keys.issue(&args.sub, args.accounts, Duration::from_secs(args.ttl_secs))
            );
            return Ok(());
        }
        (Some(Command::Tail(args)), _) => return fanout::tail::run(args).await,
        // Nothing given at all: parse as `fanout serve` so clap names what is missing.
        (None, None) => match Cli::parse_from(["fanout", "serve"]).command {
            Some(Command::Serve(config)) => config,
            _ => unreachable!("`serve` parses as the serve command"),
        },
    };
    shared::telemetry::init_tracing(config.telemetry.log_format);
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "fanout listening");
    app.run_until_stopped(shared::telemetry::shutdown_signal())
        .await
}
