//! Publishing loadgen's events straight to the relay's stream, as ingest would: the
//! part `broadcast` and `resume` share.

use anyhow::Context;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use serde_json::Value;
use shared::envelope::{Envelope, EventType};
use shared::stream::{StreamSpec, create_if_missing};
use shared::subjects::Subjects;

/// The chat of every event loadgen publishes; clients recognise them by it.
pub const CHAT: &str = "chat_loadgen";

/// Where the relay's stream is: `loadgen stream` creates it, the publishers use it.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// NATS server the relay's stream lives on.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix of the relay (events go to `{prefix}.{account}.{chat}.{type}`).
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "relay.events")]
    pub subject_prefix: String,
    /// The relay's stream. Created as ingest would if it is missing (fanout never
    /// creates it); an existing one is used as it is.
    #[arg(long, env = "STREAM_NAME", default_value = "RELAY_EVENTS")]
    pub stream_name: String,
}

/// Where and what to publish.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Account the published events belong to.
    #[arg(long, default_value = "acc_loadgen")]
    pub account: String,
    /// Padding added to each event's data, in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
}

/// Connects to the NATS server of `args` (refusing one not on this machine) and makes
/// sure the stream exists, as ingest would create it.
async fn open_stream(
    args: &StreamArgs,
) -> anyhow::Result<(async_nats::Client, jetstream::Context, Subjects)> {
    let subjects = Subjects::new(args.subject_prefix.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    nats_is_loopback(&args.nats_url).await?;
    let client = async_nats::connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats_url))?;
    let js = jetstream::new(client.clone());
    let spec = StreamSpec::with_defaults(args.stream_name.clone(), subjects.clone());
    create_if_missing(&js, &spec).await.context("creating the relay's stream")?;
    Ok((client, js, subjects))
}

/// Creates the relay's stream as ingest would, if it is missing.
pub async fn create_stream(args: StreamArgs) -> anyhow::Result<()> {
    let (_, _, subjects) = open_stream(&args).await?;
    println!("stream {} captures {}", args.stream_name, subjects.all());
    Ok(())
}

/// A connection to NATS that publishes `message:new` events of [`CHAT`].
pub struct Publisher {
    pub client: async_nats::Client,
    pub subject: String,
    js: jetstream::Context,
    account: String,
    padding: String,
}

impl Publisher {
    /// Connects, refusing any NATS server that is not on this machine.
    pub async fn connect(args: &PublishArgs) -> anyhow::Result<Self> {
        let (client, js, subjects) = open_stream(&args.stream).await?;
        Ok(Self {
            js,
            client,
            subject: subjects.event(&args.account, Some(CHAT), EventType::MessageNew),
            account: args.account.clone(),
            padding: "x".repeat(args.payload_bytes),
        })
    }

    /// Publishes one event whose data is `data` (an object) plus the padding; the
    /// returned future resolves with JetStream's ack.
    pub async fn publish(&self, mut data: Value) -> anyhow::Result<PublishAckFuture> {
        data["pad"] = self.padding.clone().into();
        let envelope =
            Envelope::new(EventType::MessageNew, &self.account, Some(CHAT.into()), chrono::Utc::now(), data);
        self.js.publish(self.subject.clone(), envelope.to_bytes().into()).await.context("publishing")
    }
}

/// Refuses a NATS URL whose host is not this machine.
pub(crate) async fn nats_is_loopback(url: &str) -> anyhow::Result<()> {
    for server in url.split(',') {
        let authority = server.trim().split("://").last().unwrap_or_default();
        let authority = authority.rsplit('@').next().unwrap_or_default().trim_end_matches('/');
        let authority =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:4222") };
        let loopback = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .all(|addr| addr.ip().is_loopback());
        anyhow::ensure!(loopback, "{server} is not a loopback address; loadgen only targets this machine");
    }
    Ok(())
}
