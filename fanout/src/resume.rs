//! Resume: `?since=<seq>` gets every later event the token may see, then live, with
//! no gap and no duplicate, on any replica.
//!
//! The connection is registered in the hub first, in catch-up mode, and the hub's
//! newest sequence at that moment (`head`) is noted under the dispatch lock: every
//! later event lands in the connection's queue. Events in `(since, head]` come from
//! the hub's in-memory window when it reaches back that far, otherwise from JetStream
//! through an ephemeral consumer starting at `since + 1` (filtered by account when the
//! token has exactly one). Then the queue is drained, skipping anything at or below
//! what was already sent. If the queue overflowed during catch-up the connection is
//! only marked `lagged`; it empties its queue and catches up again from where it got
//! to, a few rounds at most before counting as a slow consumer.
//!
//! `hello.recovered` is `false` when the stream no longer holds `since + 1` (or never
//! held `since`), or when `since` lies more than `FANOUT_MAX_RESUME_GAP` sequences
//! behind and the window cannot serve it: the client reloads by REST and gets live
//! events from `head` on. That bounds what one resume may cost the replica: a token for
//! every account resuming from days ago would otherwise replay days of the stream while
//! holding one of the [`MAX_HISTORY_READS`] turns, where one REST page does the job.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use shared::subjects::Subjects;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::event::Event;
use crate::hub::{ConnShared, SharedEvent};
use crate::metrics;
use crate::state::ConnectionContext;
use crate::ws::{Close, Connection, End, hello};

/// Catch-up rounds after lagging before the client counts as too slow.
const MAX_CATCH_UP_ROUNDS: u32 = 5;
/// Longest wait for the next history message.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);
/// History events written per flush.
const HISTORY_BATCH: usize = 64;

/// Resumes reading JetStream at once, per replica. A reconnect storm that reaches past
/// the window waits its turn here instead of asking NATS for thousands of consumers at
/// the same moment; meanwhile its live events queue up as in any catch-up.
pub const MAX_HISTORY_READS: usize = 64;

/// Where history is read from.
#[derive(Clone)]
pub struct History {
    pub js: jetstream::Context,
    pub stream_name: String,
    pub subjects: Subjects,
    /// [`MAX_HISTORY_READS`] permits.
    pub reads: Arc<Semaphore>,
    /// Most stream sequences a resume may read back through JetStream.
    pub max_gap: u64,
}

/// The stream, with the first and last sequence it held when asked.
struct Bounds {
    stream: jetstream::stream::Stream,
    first: u64,
    last: u64,
}

impl History {
    pub fn new(js: jetstream::Context, stream_name: String, subjects: Subjects, max_gap: u64) -> Self {
        Self { js, stream_name, subjects, reads: Arc::new(Semaphore::new(MAX_HISTORY_READS)), max_gap }
    }

    /// One stream-info request; the handle it returns is reused for the consumer.
    async fn bounds(&self) -> anyhow::Result<Bounds> {
        let stream = self.js.get_stream(&self.stream_name).await?;
        let state = &stream.cached_info().state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        Ok(Bounds { stream, first, last })
    }
}

impl Connection {
    /// Sends `hello` and everything after `since` up to the live stream.
    pub(crate) async fn resume(
        &mut self,
        since: u64,
        head: u64,
        backlog: Option<Vec<SharedEvent>>,
        rx: &mut mpsc::Receiver<SharedEvent>,
    ) -> Result<(), End> {
        let heartbeat = self.ctx.limits.heartbeat;
        if let Some(events) = backlog {
            metrics::resume("memory");
            self.send_json(hello(head, heartbeat, Some(true))).await?;
            self.covered = since;
            self.send_events(&events).await?;
            self.covered = head;
        } else if head.saturating_sub(since) > self.ctx.history.max_gap {
            // Decided before asking NATS anything: a reconnect storm of such clients
            // costs the replica a `hello` each.
            metrics::resume("too_far");
            self.send_json(hello(head, heartbeat, Some(false))).await?;
            self.covered = head;
        } else {
            let _permit = history_permit(&self.ctx, &self.shared).await?;
            let bounds = match self.ctx.history.bounds().await {
                Ok(bounds) => bounds,
                Err(error) => {
                    tracing::warn!(error = %error, since, "resume: cannot read stream bounds");
                    metrics::resume("failed");
                    return Err(End::Close(Close::RESUME_FAILED));
                }
            };
            let gone = since > head.max(bounds.last) || since + 1 < bounds.first;
            if gone {
                metrics::resume("gone");
                self.send_json(hello(head, heartbeat, Some(false))).await?;
                self.covered = head;
            } else {
                metrics::resume("stream");
                self.send_json(hello(head, heartbeat, Some(true))).await?;
                // A client ahead of this replica (it saw `since` elsewhere) skips
                // whatever this replica still has to deliver up to `since`.
                self.covered = since;
                self.replay_stream(&bounds.stream, head).await?;
                self.covered = self.covered.max(head);
            }
        }
        let mut rounds = 0;
        while !self.ctx.hub.finish_catch_up(&self.shared) {
            rounds += 1;
            if rounds > MAX_CATCH_UP_ROUNDS {
                return Err(End::Close(Close::SLOW_CONSUMER));
            }
            let (head, backlog) = self.ctx.hub.rearm(rx, &self.shared, &self.scope, self.covered);
            tracing::debug!(
                rounds,
                covered = self.covered,
                head,
                from_memory = backlog.is_some(),
                "lagged while catching up; again"
            );
            match backlog {
                Some(events) => self.send_events(&events).await?,
                None => {
                    let _permit = history_permit(&self.ctx, &self.shared).await?;
                    let history = &self.ctx.history;
                    let stream = history.js.get_stream_no_info(&history.stream_name).await;
                    let stream = stream.map_err(|error| self.history_failed(&error.to_string()))?;
                    self.replay_stream(&stream, head).await?
                }
            }
            self.covered = self.covered.max(head);
        }
        Ok(())
    }

    /// Sends the events in `(covered, to]` from JetStream, holding a history permit.
    async fn replay_stream<I>(&mut self, stream: &jetstream::stream::Stream<I>, to: u64) -> Result<(), End> {
        if to <= self.covered {
            return Ok(());
        }
        let subjects = &self.ctx.history.subjects;
        let from = self.covered + 1;
        let filter = match self.scope.single_account() {
            Some(account) => subjects.account(account),
            None => subjects.all(),
        };
        let created = async {
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                    ack_policy: consumer::AckPolicy::None,
                    filter_subject: filter,
                    inactive_threshold: Duration::from_secs(30),
                    memory_storage: true,
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(consumer)
        };
        let mut consumer = match tokio::time::timeout(HISTORY_TIMEOUT, created).await {
            Ok(Ok(created)) => created,
            Ok(Err(error)) => return Err(self.history_failed(&error.to_string())),
            Err(_) => return Err(self.history_failed("timed out creating a consumer")),
        };
        let name = consumer.cached_info().name.clone();
        let result = if consumer.cached_info().num_pending == 0 {
            Ok(())
        } else {
            self.read_history(&mut consumer, to).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.delete_consumer(&name)).await;
        result
    }

    async fn read_history(&mut self, consumer: &mut consumer::PullConsumer, to: u64) -> Result<(), End> {
        let mut messages = match consumer.stream().max_messages_per_batch(256).messages().await {
            Ok(messages) => messages,
            Err(error) => return Err(self.history_failed(&error.to_string())),
        };
        let subjects = self.ctx.history.subjects.clone();
        let mut batch: Vec<SharedEvent> = Vec::with_capacity(HISTORY_BATCH);
        loop {
            let message = match tokio::time::timeout(HISTORY_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(self.history_failed(&error.to_string())),
                Ok(None) => return Err(self.history_failed("history ended early")),
                Err(_) => return Err(self.history_failed("timed out reading history")),
            };
            let Ok(info) = message.info() else {
                return Err(self.history_failed("message without info"));
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > to {
                break;
            }
            if let Ok(event) = Event::from_stream(&subjects, &message.subject, &message.payload, seq)
                && self.scope.allows(&event.account_id)
            {
                batch.push(Arc::new(event));
            }
            let done = seq >= to || pending == 0;
            if batch.len() >= HISTORY_BATCH || done {
                self.send_events(&batch).await?;
                batch.clear();
            }
            if done {
                break;
            }
        }
        self.send_events(&batch).await?;
        // Whatever matched nothing up to `to` is covered too.
        self.covered = self.covered.max(to);
        Ok(())
    }

    fn history_failed(&self, error: &str) -> End {
        tracing::warn!(error, covered = self.covered, "resume: reading history failed");
        metrics::resume("failed");
        End::Close(Close::RESUME_FAILED)
    }
}

/// Waits for a turn to read JetStream (see [`MAX_HISTORY_READS`]), giving up when the
/// hub drops the connection or the server shuts down.
async fn history_permit(ctx: &ConnectionContext, shared: &ConnShared) -> Result<OwnedSemaphorePermit, End> {
    let reads = ctx.history.reads.clone();
    if let Ok(permit) = reads.clone().try_acquire_owned() {
        return Ok(permit);
    }
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            metrics::history_waiting(-1.0);
        }
    }
    metrics::history_waiting(1.0);
    let _waiting = Waiting;
    tokio::select! {
        permit = reads.acquire_owned() => permit.map_err(|_| End::Close(Close::SHUTDOWN)),
        kick = shared.kicked() => Err(End::Close(kick.into())),
        _ = ctx.shutdown.cancelled() => Err(End::Close(Close::SHUTDOWN)),
    }
}
