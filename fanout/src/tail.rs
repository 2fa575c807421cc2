//! `fanout tail`: prints the relay's events from JetStream as readable lines, for
//! machines without the NATS CLI.
//!
//! ```text
//! fanout tail                          # new events under the prefix (relay.events.>)
//! fanout tail 'relay.events.ACC.>'     # one account
//! fanout tail --since 0                # everything the stream still holds, then live
//! fanout tail --json                   # one envelope (with seq) per line
//! fanout tail --subjects               # seq and subject per line, as `nats sub` shows
//! ```
//!
//! It reads with an ordered, ephemeral consumer: nothing is acknowledged and nothing is
//! left behind on the server, so tailing never disturbs the relay.

use std::io::Write;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Local, Utc};
use clap::Args;
use futures::StreamExt;
use runtime::config::NatsArgs;
use serde_json::Value;

/// Options of `fanout tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Subject filter, e.g. `relay.events.ACCOUNT.>` or `relay.events.*.*.message_new`.
    /// Default: every event under the subject prefix.
    pub filter: Option<String>,
    /// Start after this stream sequence (0: everything the stream holds). Default: only
    /// events published from now on.
    #[arg(long)]
    pub since: Option<u64>,
    /// Print each event as one JSON line (the envelope with `seq`) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Print each event's sequence and NATS subject only (what `nats sub` shows).
    #[arg(long, conflicts_with = "json")]
    pub subjects: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// Follows the stream until the process is stopped.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let client = args.nats.connect_now("fanout-tail").await?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&args.nats.stream_name)
        .await
        .with_context(|| format!("stream {} not found (has ingest run yet?)", args.nats.stream_name))?;
    let filter = args.filter.clone().unwrap_or_else(|| args.nats.subject_prefix.all());
    let deliver_policy = match args.since {
        Some(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
        None => consumer::DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer")?;
    let mut messages = consumer.messages().await.context("reading the stream")?;
    if !args.json {
        eprintln!("tailing {filter} in stream {} (Ctrl-C stops)", args.nats.stream_name);
    }
    let mut out = std::io::stdout().lock();
    while let Some(message) = messages.next().await {
        let message = message.context("reading the stream")?;
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let line = if args.subjects {
            format!("{seq:>7}  {}", message.subject)
        } else if args.json {
            let stamped = shared::envelope::stamp_seq(&message.payload, seq)
                .unwrap_or_else(|| message.payload.to_vec());
            String::from_utf8_lossy(&stamped).into_owned()
        } else {
            match serde_json::from_slice::<Value>(&message.payload) {
                Ok(envelope) => summary(seq, &envelope),
                Err(_) => format!("{seq:>7}  (not an envelope) {}", message.subject),
            }
        };
        if writeln!(out, "{line}").is_err() {
            break; // stdout closed (e.g. piped into `head`)
        }
        let _ = out.flush();
    }
    Ok(())
}

/// One readable line: `seq  time  type  account  chat  text`.
pub fn summary(seq: u64, envelope: &Value) -> String {
    let str_of = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let time = envelope["occurred_at"]
        .as_str()
        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
        .map(|t| t.with_timezone(&Local).format("%H:%M:%S").to_string())
        .unwrap_or_else(|| "--:--:--".into());
    let data = &envelope["data"];
    let text = match envelope["type"].as_str() {
        Some("message:new") => {
            let message = &data["message"];
            let who = if message["is_sender"].as_bool() == Some(true) {
                "me".to_owned()
            } else {
                message["sender"]["name"].as_str().unwrap_or("?").to_owned()
            };
            format!("{who}: {}", message["text"].as_str().unwrap_or("[attachment]"))
        }
        Some("message:edited") => format!("edited: {}", data["message"]["text"].as_str().unwrap_or("")),
        Some("message:reaction") => match data["reaction"]["value"].as_str() {
            Some(value) => format!("reaction {value}"),
            None => "reaction removed".into(),
        },
        Some("message:deleted") => "deleted".into(),
        Some("message:read") => "seen".into(),
        Some("chat:read") => "marked read".into(),
        Some("account:status") => str_of(&data["account"]["status"]),
        _ => String::new(),
    };
    format!(
        "{seq:>7}  {time}  {:<16}  {:<24}  {:<24}  {}",
        str_of(&envelope["type"]),
        str_of(&envelope["account_id"]),
        envelope["chat_id"].as_str().unwrap_or("~"),
        shorten(&text, 80)
    )
}

fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_new_message_reads_as_sender_and_text() {
        let line = summary(
            42,
            &json!({"type": "message:new", "account_id": "acc", "chat_id": "chat",
                    "occurred_at": "2026-11-29T10:00:00.000Z",
                    "data": {"message": {"text": "hi there", "is_sender": false, "sender": {"name": "Dana"}}}}),
        );
        assert!(line.trim_start().starts_with("42"), "{line}");
        assert!(
            line.contains("message:new") && line.contains("acc") && line.contains("Dana: hi there"),
            "{line}"
        );
    }

    #[test]
    fn long_text_is_cut_to_one_short_line() {
        let cut = shorten(&"word\n".repeat(50), 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(!cut.contains('\n'));
    }
}
