//! The JetStream follower: one loop that reads every new stream message in order and
//! hands it to the hub.
//!
//! It owns its position (the last stream sequence handled) instead of trusting a
//! long-lived consumer, because naive followers stall silently when NATS restarts,
//! when their consumer is deleted or when the stream is recreated. Here each attempt
//! creates an ephemeral pull consumer starting at `last + 1` with idle heartbeats and
//! follows it until anything looks wrong: a stream error, two missed heartbeats, a
//! delivery-sequence gap, the NATS connection dropping, or the stream no longer being
//! the one we followed (its creation time changed or its last sequence went below
//! ours). Then it marks itself not ready, backs off briefly and starts a new attempt.
//! A recreated stream resets the hub, which closes every connection with 4001.
//!
//! On its first start it begins with the newest `FANOUT_REPLAY_WINDOW` messages already
//! in the stream, filling the hub's window, and only opens the hub (and turns ready)
//! once it has caught up: a replica that just started then serves the resumes of
//! clients coming from a stopped one from memory. New clients still start at new
//! messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use shared::subjects::Subjects;

use crate::event::Event;
use crate::hub::Hub;
use crate::metrics;

/// How long one of the follower's JetStream requests may take. They answer in
/// milliseconds; in a cluster whose stream (or meta) leader was just lost they wait for
/// a new one, and async-nats's default (5 s, sometimes more with its retries) made the
/// follower lag the recovered cluster by up to 20 s (the e2e `cluster` test).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the follower is currently following; read by `/readyz`.
#[derive(Debug, Default)]
pub struct FollowerStatus {
    ready: AtomicBool,
}

impl FollowerStatus {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::AcqRel) != ready {
            metrics::follower_ready(ready);
        }
    }
}

/// The stream to follow. fanout never creates it: ingest owns it and its settings
/// ([`shared::stream`]); until ingest has created it, fanout is not ready and retries.
pub async fn find_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<stream::Stream> {
    js.get_stream(name).await.with_context(|| format!("stream {name} not found: ingest creates it"))
}

/// Where the follower stands in which stream.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// Creation time of the stream followed, to notice it being recreated.
    created: i128,
    /// Last stream sequence handed to the hub (or skipped).
    last: u64,
}

/// See the module docs.
pub struct Follower {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub stream_name: String,
    pub subjects: Subjects,
    pub hub: Arc<Hub>,
    pub status: Arc<FollowerStatus>,
    /// Idle heartbeat asked of the server; also how often the stream is re-checked.
    pub heartbeat: Duration,
}

/// Why one follow attempt ended.
enum Ended {
    /// The stream is not the one we followed any more.
    StreamChanged,
}

impl Follower {
    /// Follows forever; returns only if the task is cancelled from outside.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut position: Option<Position> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow_once(&mut position).await {
                Ok(Ended::StreamChanged) => {
                    metrics::follower_restart("stream_changed");
                    backoff = Duration::from_millis(100);
                }
                Err(error) => {
                    self.status.set(false);
                    metrics::follower_restart("error");
                    tracing::warn!(
                        error = format!("{error:#}"),
                        backoff_ms = backoff.as_millis() as u64,
                        "follower restarting"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The follower has caught up with the stream: connections may come in.
    fn open_hub(&self) {
        if !self.hub.is_started() {
            self.hub.start();
            tracing::info!(seq = self.hub.head(), "window filled; accepting connections");
        }
        self.status.set(true);
    }

    #[tracing::instrument(skip_all, fields(stream = %self.stream_name))]
    async fn follow_once(&self, position: &mut Option<Position>) -> anyhow::Result<Ended> {
        let mut stream = find_stream(&self.js, &self.stream_name).await?;
        let info = stream.info().await.context("reading stream info")?.clone();
        let created = info.created.unix_timestamp_nanos();
        let pos = match *position {
            None => {
                // New clients start at new messages, but the window is first filled with
                // the newest events the stream holds: clients of a replica that just
                // stopped reconnect here, and a window that reaches back serves them from
                // memory instead of each reading JetStream.
                let (first, last) = (info.state.first_sequence, info.state.last_sequence);
                let base = prefill_base(first, last, self.hub.window_capacity());
                self.hub.prefill_from(base);
                tracing::info!(from = base + 1, to = last, "filling the window before opening");
                Position { created, last: base }
            }
            Some(pos) if pos.created != created || info.state.last_sequence < pos.last => {
                // A new stream: its messages are all newer than anything clients have,
                // but their sequences start over, so clients must start over too.
                let last = info.state.first_sequence.saturating_sub(1);
                tracing::warn!(
                    old_last = pos.last,
                    new_first = info.state.first_sequence,
                    "stream recreated; resetting"
                );
                self.hub.reset(last);
                Position { created, last }
            }
            Some(pos) => pos,
        };
        *position = Some(pos);

        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: pos.last + 1 },
                ack_policy: consumer::AckPolicy::None,
                filter_subject: self.subjects.all(),
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .context("creating consumer")?;
        let consumer_name = consumer.cached_info().name.clone();
        if consumer.cached_info().num_pending == 0 {
            self.open_hub();
        }
        let result = self.follow_consumer(&mut stream, consumer, position).await;
        if result.is_err() {
            // Best effort; the server drops it after `inactive_threshold` anyway.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stream.delete_consumer(&consumer_name)).await;
        }
        result
    }

    async fn follow_consumer(
        &self,
        stream: &mut stream::Stream,
        consumer: consumer::PullConsumer,
        position: &mut Option<Position>,
    ) -> anyhow::Result<Ended> {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .expires(Duration::from_secs(30))
            .heartbeat(self.heartbeat)
            .messages()
            .await
            .context("starting to pull")?;
        if self.hub.is_started() {
            self.status.set(true);
        }
        tracing::info!(from = position.map(|p| p.last + 1), "following");
        let mut expected_delivery = 1;
        let mut check = tokio::time::interval(self.heartbeat);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let message = match message {
                        None => bail!("message stream ended"),
                        Some(Err(error)) => bail!("pulling messages: {error}"),
                        Some(Ok(message)) => message,
                    };
                    let info = message.info().map_err(|e| anyhow::anyhow!("reading message info: {e}"))?;
                    if info.consumer_sequence != expected_delivery {
                        bail!("delivery sequence gap: expected {expected_delivery}, got {}", info.consumer_sequence);
                    }
                    expected_delivery += 1;
                    let (seq, caught_up) = (info.stream_sequence, info.pending == 0);
                    let pos = position.as_mut().expect("position is set before following");
                    if seq <= pos.last {
                        continue;
                    }
                    pos.last = seq;
                    if self.hub.is_started() {
                        // Live events only, not those read to fill the window.
                        let stored_ns = info.published.unix_timestamp_nanos();
                        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as i128;
                        metrics::stream_lag((now_ns - stored_ns).max(0) as f64 / 1e9);
                    }
                    match Event::from_stream(&self.subjects, &message.subject, &message.payload, seq) {
                        Ok(event) => self.hub.publish(Arc::new(event)),
                        Err(skip) => {
                            tracing::warn!(seq, subject = %message.subject, reason = %skip, "skipping stream message");
                            metrics::event_skipped(skip.as_str());
                            self.hub.skip(seq);
                        }
                    }
                    if caught_up {
                        self.open_hub();
                    }
                }
                _ = check.tick() => {
                    if self.client.connection_state() != State::Connected {
                        bail!("NATS connection lost");
                    }
                    let info = stream.info().await.context("re-checking stream")?;
                    let pos = position.expect("position is set before following");
                    if info.created.unix_timestamp_nanos() != pos.created || info.state.last_sequence < pos.last {
                        self.status.set(false);
                        return Ok(Ended::StreamChanged);
                    }
                    if info.state.last_sequence == pos.last {
                        // Still prefilling only if the stream's last messages vanished
                        // before they were delivered.
                        self.open_hub();
                    }
                }
            }
        }
    }
}

/// The sequence just before the newest `window` messages of a stream holding
/// `first..=last` (`last` when it is empty or there is no window).
fn prefill_base(first: u64, last: u64, window: usize) -> u64 {
    let reach = u64::try_from(window).unwrap_or(u64::MAX).min(last);
    (last - reach).max(first.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::prefill_base;

    #[test]
    fn the_prefill_covers_the_newest_window_of_the_stream() {
        assert_eq!(prefill_base(1, 100, 10), 90);
        assert_eq!(prefill_base(1, 5, 10), 0, "the whole stream when it is shorter");
        assert_eq!(prefill_base(95, 100, 10), 94, "not before what the stream holds");
        assert_eq!(prefill_base(1, 100, 0), 100, "no window, no prefill");
        assert_eq!(prefill_base(0, 0, 10), 0, "an empty stream");
    }
}
