//! `loadgen`: drives load at a running relay and reports what it measured.
//!
//! Modes (each is a subcommand; `loadgen <mode> --help` lists its options):
//! - `webhooks`: realistic Unipile webhooks at a target rate against ingest, open loop
//!   (the schedule never waits for slow answers); reports achieved rate, status counts
//!   and ack latency percentiles.
//!
//! Every run is bounded in count and time and targets only the address it is given.

mod report;
mod webhooks;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = "Load generator for the Unipile realtime relay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Post realistic message_received webhooks to ingest at a fixed rate.
    Webhooks(webhooks::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init_tracing(shared::config::LogFormat::Text);
    match Cli::parse().command {
        Command::Webhooks(args) => webhooks::run(args).await,
    }
}
