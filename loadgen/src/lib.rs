//! `loadgen`: drives load at a running relay and reports what it measured.
//!
//! Modes (each is a subcommand; `loadgen <mode> --help` lists its options):
//! - `webhooks`: realistic Unipile webhooks at a target rate against ingest, open loop
//!   (the schedule never waits for slow answers); reports achieved rate, status counts
//!   and ack latency percentiles.
//! - `poison`: clean webhooks at a target rate with a share of poisoned ones (U+0000 in
//!   text and names, a 3,000-byte message id, ~900 KB message and edit) while WebSocket
//!   clients on fanout record every event; reports answers by kind, clean messages lost
//!   or duplicated, end-to-end latency and ingest's outbox publish lag, and fails if a
//!   clean delivery was refused, lost or duplicated.
//! - `simulate`: believable demo traffic for the live inbox page, about one delivery a
//!   second, until `--duration` or Ctrl-C.
//! - `idle`: many idle WebSocket connections to one fanout replica, spread over several
//!   loopback source addresses; reports fanout's resident memory per connection.
//! - `broadcast`: events published straight to NATS at a fixed rate, fanned out to many
//!   WebSocket clients; reports events/s in, frames/s out and delivery latency.
//! - `resume`: a reconnect storm: many clients that missed the same events reconnect
//!   at once with `?since=`; reports catch-up time, outcomes and exactness.
//! - `presence`: agents in teams typing and viewing while events flow; reports presence
//!   traffic on core NATS per 1,000 agents and event delivery latency with presence
//!   off, then on.
//! - `nats-ws`: the peer, nats-server's own WebSocket listener, measured like `idle`
//!   and `broadcast` (memory per connection, delivery latency); `scripts/bench-peers.sh`
//!   runs it beside fanout.
//! - `floor`: the same fan-out done by the bare kernel (blocking writes to loopback TCP
//!   sockets, read by one epoll loop): the floor `broadcast` is measured against.
//!
//! Every run is bounded in count and time and targets only the address it is given.

pub mod broadcast;
pub mod floor;
pub mod idle;
pub mod nats_ws;
pub mod poison;
pub mod presence;
pub mod publish;
pub mod report;
pub mod resume;
pub mod simulate;
pub mod webhooks;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = "Load generator for the Unipile realtime relay")]
pub struct Cli {
    /// Runtime worker threads (default: one per core). With the relay on the same
    /// machine, `--threads 1` leaves it a core and measures it more fairly.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hold many idle WebSocket connections to fanout; report its memory per connection.
    Idle(idle::Args),
    /// Publish events to NATS and measure their fan-out to many WebSocket clients.
    Broadcast(broadcast::Args),
    /// A reconnect storm: many clients that missed the same events reconnect at once
    /// with `?since=`; report how long they take to catch up and how.
    Resume(resume::Args),
    /// Write one small message at a time to many loopback TCP sockets, with no
    /// WebSocket or runtime in the way: the floor under `broadcast`'s latency.
    Floor(floor::Args),
    /// Agents typing and viewing while events flow: presence traffic per 1,000 agents
    /// and the message path's latency with presence off, then on.
    Presence(presence::Args),
    /// nats-server's own WebSocket listener, measured as `idle` and `broadcast` measure
    /// fanout: the peer to compare with.
    NatsWs(nats_ws::Args),
    /// Post realistic message_received webhooks to ingest at a fixed rate.
    Webhooks(webhooks::Args),
    /// Clean webhooks with a share of poisoned ones, checked end to end through fanout:
    /// fails if a clean one is refused, lost or duplicated.
    Poison(poison::Args),
    /// Believable inbox traffic (several accounts and providers, replies, reactions,
    /// edits, deletions) at a gentle rate, until --duration or Ctrl-C.
    Simulate(simulate::Args),
    /// Create the relay's stream as ingest would, if it is missing: for benchmarks of
    /// fanout alone (fanout never creates the stream; it waits for it).
    Stream(publish::StreamArgs),
}

/// Runs the chosen mode to its end.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Idle(args) => idle::run(args).await,
        Command::Broadcast(args) => broadcast::run(args).await,
        Command::Resume(args) => resume::run(args).await,
        Command::Floor(args) => tokio::task::spawn_blocking(move || floor::run(args)).await?,
        Command::NatsWs(args) => nats_ws::run(args).await,
        Command::Webhooks(args) => webhooks::run(args).await,
        Command::Presence(args) => presence::run(args).await,
        Command::Poison(args) => poison::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Stream(args) => publish::create_stream(args).await,
    }
}
