//! The `fanout` binary: read the configuration, start logging, build, run until
//! SIGTERM or Ctrl-C. `fanout token` prints a client token for trying it out.

use std::time::Duration;

use fanout::config::{Cli, Command};
use fanout::{Application, Config};
use shared::claims::JwtKeys;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = match Cli::parse_with_default(std::env::args_os()).command {
        Command::Serve(config) => *config,
        Command::Token(args) => {
            let keys = JwtKeys::new(&args.jwt_secret).with_issuer_and_audience(
                args.jwt_claims.jwt_issuer.clone(),
                args.jwt_claims.jwt_audience.clone(),
            );
            println!(
                "{}",
                keys.issue_named(
                    &args.sub,
                    args.name.as_deref(),
                    args.accounts,
                    Duration::from_secs(args.ttl_secs),
                )
            );
            return Ok(());
        }
        Command::Tail(args) => return fanout::tail::run(args).await,
    };
    runtime::telemetry::init_tracing(config.telemetry.log_format);
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "fanout listening");
    app.run_until_stopped(runtime::telemetry::shutdown_signal()).await
}
