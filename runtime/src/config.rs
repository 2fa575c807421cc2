//! Configuration pieces both binaries share, read by clap from flags or environment.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use secrecy::SecretString;

use shared::subjects::Subjects;

/// Parses a secret that must not be empty; used as a clap `value_parser`.
pub fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(SecretString::from(value.to_owned()))
    }
}

/// Where NATS is and which stream and subjects the relay uses.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream that holds the events.
    #[arg(long, env = "STREAM_NAME", default_value = "RELAY_EVENTS")]
    pub stream_name: String,
    /// Subject prefix; events go to `{prefix}.{account}.{chat}.{type}`.
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "relay.events", value_parser = parse_prefix)]
    pub subject_prefix: Subjects,
}

fn parse_prefix(value: &str) -> Result<Subjects, String> {
    Subjects::new(value).map_err(|e| e.to_string())
}

impl NatsArgs {
    /// Connects, retrying in the background if the server is not up yet, so a process
    /// can start (and serve what does not need NATS) while NATS is away.
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            })
            .connect(self.nats_url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging options.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format: `text` for people, `json` for log collectors. Filter with RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
