//! Resume: `?since=<seq>` gets every later event the token may see, then live, with
//! no gap and no duplicate, on any replica.
//!
//! The connection is registered in the hub first, in catch-up mode, and the hub's
//! newest sequence at that moment (`head`) is noted under the dispatch lock: every
//! later event lands in the connection's queue. Events in `(since, head]` come from
//! the hub's in-memory window when it reaches back that far. Older ones come from
//! JetStream in chunks of [`CHUNK`] sequences, each read once per replica and kept in a
//! bounded cache: a reconnect storm of clients that all missed the same stretch reads
//! it from NATS once, not once per client. Only a stretch the replica has not seen to
//! its end yet (newer than the last whole chunk, older than the window: a window
//! smaller than a chunk) is read by the client alone, through an ephemeral consumer
//! filtered by account when the token has exactly one; so is a chunk too big to keep
//! ([`CHUNK_MAX_BYTES`]), in batches. Then the queue is drained, skipping anything at
//! or below what was already sent. If the queue overflowed during catch-up the
//! connection is only marked `lagged`; it empties its queue and catches up again from
//! where it got to, a few rounds at most before counting as a slow consumer.
//!
//! `hello.recovered` is `false` when the stream no longer holds `since + 1` (or never
//! held `since`), or when `since` lies more than `FANOUT_MAX_RESUME_GAP` sequences
//! behind and the window cannot serve it: the client reloads by REST and gets live
//! events from `head` on. That bounds what one resume may cost the replica: a token for
//! every account resuming from days ago would otherwise replay days of the stream while
//! holding one of the [`MAX_HISTORY_READS`] turns, where one REST page does the job.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use quick_cache::Weighter;
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

/// Stream sequences per shared chunk of history.
pub const CHUNK: u64 = 1024;
/// Memory the cached chunks may take (event bytes plus a per-event overhead).
const CHUNK_CACHE_BYTES: u64 = 64 << 20;
/// Largest chunk read into memory (1,024 events of 8 KiB); events are rarely over 1 KiB,
/// but a webhook body may be up to 1 MiB.
const CHUNK_MAX_BYTES: usize = 8 << 20;

/// Every event of the stream with a sequence in `(index * CHUNK, (index + 1) * CHUNK]`,
/// whatever its account: the scope is applied when a connection sends them.
pub struct Chunk {
    events: Vec<SharedEvent>,
    /// Sequences up to this one had already left the stream when the chunk was read
    /// (it is complete above it only).
    complete_after: u64,
}

/// Stream creation time (a recreated stream starts its sequences over) and chunk index.
type ChunkKey = (i128, u64);

#[derive(Clone)]
struct ChunkWeight;

impl Weighter<ChunkKey, Option<Arc<Chunk>>> for ChunkWeight {
    fn weight(&self, _key: &ChunkKey, chunk: &Option<Arc<Chunk>>) -> u64 {
        let events = chunk.iter().flat_map(|chunk| &chunk.events);
        events.map(|event| event.text.len() as u64 + 128).sum::<u64>().max(1)
    }
}

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
    /// The last chunk read, if it failed (see [`FAILURE_HOLD`]).
    last_failure: Arc<LastFailure>,
    /// `None` for a chunk too big to share ([`CHUNK_MAX_BYTES`]).
    chunks: Arc<quick_cache::sync::Cache<ChunkKey, Option<Arc<Chunk>>, ChunkWeight>>,
}

/// The stream, with the first and last sequence it held when asked.
struct Bounds {
    stream: jetstream::stream::Stream,
    first: u64,
    last: u64,
}

impl History {
    pub fn new(js: jetstream::Context, stream_name: String, subjects: Subjects, max_gap: u64) -> Self {
        let chunks = quick_cache::sync::Cache::with_weighter(64, CHUNK_CACHE_BYTES, ChunkWeight);
        Self {
            js,
            stream_name,
            subjects,
            reads: Arc::new(Semaphore::new(MAX_HISTORY_READS)),
            max_gap,
            last_failure: Arc::default(),
            chunks: Arc::new(chunks),
        }
    }

    /// Reads the chunk at `index`: every event in `(index * CHUNK, (index + 1) * CHUNK]`;
    /// `None` when they take more than [`CHUNK_MAX_BYTES`] (huge events): each client
    /// then streams that stretch itself, in batches.
    async fn read_chunk(
        &self,
        stream: &jetstream::stream::Stream,
        index: u64,
    ) -> anyhow::Result<Option<Arc<Chunk>>> {
        let (from, to) = (index * CHUNK, (index + 1) * CHUNK);
        let mut reader = Reader::open(self, stream, from + 1, to, self.subjects.all()).await?;
        let read = async {
            let (mut events, mut bytes) = (Vec::new(), 0);
            while let Some(batch) = reader.next_batch().await? {
                bytes += batch.iter().map(|event| event.text.len()).sum::<usize>();
                if bytes > CHUNK_MAX_BYTES {
                    return Ok(None);
                }
                events.extend(batch);
            }
            anyhow::Ok(Some(events))
        }
        .await;
        reader.close().await;
        let Some(events) = read? else { return Ok(None) };
        // Asked after reading: whatever the stream dropped from its start by then, the
        // chunk may lack, so it does not claim to be complete there.
        let info = tokio::time::timeout(HISTORY_TIMEOUT, stream.get_info())
            .await
            .context("reading stream info")??;
        let complete_after = from.max(info.state.first_sequence.saturating_sub(1));
        Ok(Some(Arc::new(Chunk { events, complete_after })))
    }

    /// One stream-info request; the handle it returns is reused for the consumer.
    async fn bounds(&self) -> anyhow::Result<Bounds> {
        let stream = self.js.get_stream(&self.stream_name).await?;
        let state = &stream.cached_info().state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        Ok(Bounds { stream, first, last })
    }
}

/// The events of a stretch of the stream, `[from, to]`, read in batches through an
/// ephemeral consumer; [`Reader::close`] deletes the consumer.
struct Reader<'a, I> {
    stream: &'a jetstream::stream::Stream<I>,
    subjects: &'a Subjects,
    name: String,
    /// `None` once the stretch is read.
    messages: Option<consumer::pull::Stream>,
    to: u64,
}

impl<'a, I> Reader<'a, I> {
    async fn open(
        history: &'a History,
        stream: &'a jetstream::stream::Stream<I>,
        from: u64,
        to: u64,
        filter: String,
    ) -> anyhow::Result<Self> {
        let created = stream.create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ack_policy: consumer::AckPolicy::None,
            filter_subject: filter,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        });
        let consumer: consumer::PullConsumer = tokio::time::timeout(HISTORY_TIMEOUT, created)
            .await
            .context("timed out creating a consumer")??;
        let mut reader = Reader {
            stream,
            subjects: &history.subjects,
            name: consumer.cached_info().name.clone(),
            messages: None,
            to,
        };
        if consumer.cached_info().num_pending > 0 {
            match consumer.stream().max_messages_per_batch(256).messages().await {
                Ok(messages) => reader.messages = Some(messages),
                Err(error) => {
                    reader.close().await;
                    return Err(error.into());
                }
            }
        }
        Ok(reader)
    }

    /// The next events, at most [`HISTORY_BATCH`]; `None` once the stretch is read.
    async fn next_batch(&mut self) -> anyhow::Result<Option<Vec<SharedEvent>>> {
        let Some(messages) = &mut self.messages else { return Ok(None) };
        let mut batch = Vec::with_capacity(HISTORY_BATCH);
        while batch.len() < HISTORY_BATCH {
            let message = tokio::time::timeout(HISTORY_TIMEOUT, messages.next())
                .await
                .context("timed out reading history")?
                .context("history ended early")??;
            let info = message.info().map_err(|error| anyhow::anyhow!("message without info: {error}"))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > self.to {
                self.messages = None;
                break;
            }
            if let Ok(event) = Event::from_stream(self.subjects, &message.subject, &message.payload, seq) {
                batch.push(Arc::new(event));
            }
            if seq >= self.to || pending == 0 {
                self.messages = None;
                break;
            }
        }
        Ok(Some(batch))
    }

    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.delete_consumer(&self.name)).await;
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
            // The turn is kept for reading the stream alone, if that comes first; it is
            // let go before waiting for a chunk (see `send_history`).
            let permit = history_permit(&self.ctx, &self.shared).await?;
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
                self.send_history(&bounds.stream, head, Some(permit)).await?;
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
                    let permit = history_permit(&self.ctx, &self.shared).await?;
                    let history = &self.ctx.history;
                    let stream = history.js.get_stream(&history.stream_name).await;
                    let stream = stream.map_err(|error| self.history_failed(&error.to_string()))?;
                    self.send_history(&stream, head, Some(permit)).await?
                }
            }
            self.covered = self.covered.max(head);
        }
        Ok(())
    }

    /// Sends the events in `(covered, to]` that are older than the window reaches:
    /// whole chunks from the shared cache (read from JetStream by whoever needs them
    /// first), then the window as soon as it reaches back, and a last stretch the
    /// replica has not seen a whole chunk of yet from this client's own read.
    ///
    /// `permit`, a history turn the caller already holds, serves that read, so that a
    /// client does not queue twice in a storm. It is let go before waiting for a chunk:
    /// the client reading it may need a turn, and 64 waiters holding them all would
    /// leave it none.
    async fn send_history(
        &mut self,
        stream: &jetstream::stream::Stream,
        to: u64,
        mut permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), End> {
        while self.covered < to {
            if let Some(events) = self.ctx.hub.backlog(self.covered, &self.scope) {
                self.send_events(&events).await?;
                break;
            }
            let index = self.covered / CHUNK;
            let end = (index + 1) * CHUNK;
            // `to` is a sequence the hub has seen, so the stream holds everything up to
            // it; a chunk that ends past it is not whole yet, and is not shared.
            let shared = if end <= to {
                drop(permit.take());
                match chunk(&self.ctx, &self.shared, stream, index).await {
                    Ok(chunk) => chunk,
                    Err(Failure::End(end)) => return Err(end),
                    Err(Failure::Read(error)) => return Err(self.history_failed(&format!("{error:#}"))),
                }
            } else {
                None
            };
            let Some(chunk) = shared else {
                let _permit = match permit.take() {
                    Some(permit) => permit,
                    None => history_permit(&self.ctx, &self.shared).await?,
                };
                self.replay_stream(stream, end.min(to)).await?;
                continue;
            };
            if self.covered < chunk.complete_after {
                return Err(self.history_failed("the stream dropped events this client needs"));
            }
            let covered = self.covered;
            let scope = &self.scope;
            let wanted: Vec<SharedEvent> = chunk
                .events
                .iter()
                .filter(|e| e.seq > covered && scope.allows(&e.account_id))
                .cloned()
                .collect();
            for batch in wanted.chunks(HISTORY_BATCH) {
                self.send_events(batch).await?;
            }
            self.covered = self.covered.max(end);
        }
        self.covered = self.covered.max(to);
        Ok(())
    }

    /// Sends the events in `(covered, to]` from JetStream as this client's own read,
    /// holding a history permit.
    async fn replay_stream<I>(&mut self, stream: &jetstream::stream::Stream<I>, to: u64) -> Result<(), End> {
        if to <= self.covered {
            return Ok(());
        }
        // Its own handle on the context: the reader borrows from it while `self` writes.
        let ctx = self.ctx.clone();
        let history = &ctx.history;
        let filter = match self.scope.single_account() {
            Some(account) => history.subjects.account(account),
            None => history.subjects.all(),
        };
        let mut reader = match Reader::open(history, stream, self.covered + 1, to, filter).await {
            Ok(reader) => reader,
            Err(error) => return Err(self.history_failed(&format!("{error:#}"))),
        };
        let sent = self.send_from(&mut reader).await;
        reader.close().await;
        sent?;
        // Whatever matched nothing up to `to` is covered too.
        self.covered = self.covered.max(to);
        Ok(())
    }

    async fn send_from<I>(&mut self, reader: &mut Reader<'_, I>) -> Result<(), End> {
        loop {
            match reader.next_batch().await {
                Ok(Some(mut batch)) => {
                    batch.retain(|event| self.scope.allows(&event.account_id));
                    self.send_events(&batch).await?;
                }
                Ok(None) => return Ok(()),
                Err(error) => return Err(self.history_failed(&format!("{error:#}"))),
            }
        }
    }

    fn history_failed(&self, error: &str) -> End {
        tracing::warn!(error, covered = self.covered, "resume: reading history failed");
        metrics::resume("failed");
        End::Close(Close::RESUME_FAILED)
    }
}

/// Why a chunk could not be had.
enum Failure {
    /// The connection is over (kicked, shutting down) while it waited for a turn.
    End(End),
    Read(anyhow::Error),
}

/// The chunk at `index` of `stream`, read from JetStream (under a history turn) by the
/// first connection that needs it while the others wait for it. Takes the parts of the
/// connection it needs, not the connection: its socket may not be shared across threads.
async fn chunk(
    ctx: &ConnectionContext,
    shared: &ConnShared,
    stream: &jetstream::stream::Stream,
    index: u64,
) -> Result<Option<Arc<Chunk>>, Failure> {
    let history = &ctx.history;
    let key = (stream.cached_info().created.unix_timestamp_nanos(), index);
    let read = async {
        // Every client waiting for this chunk takes over the read in turn when it
        // fails: with NATS hanging, the last of a storm's clients would wait one
        // HISTORY_TIMEOUT per client before it. After a failure they give up at once
        // instead (1011: they retry later, with backoff).
        if history.last_failure.within(FAILURE_HOLD) {
            return Err(Failure::Read(anyhow::anyhow!("reading history failed moments ago")));
        }
        let _permit = history_permit(ctx, shared).await.map_err(Failure::End)?;
        let read = history.read_chunk(stream, index).await;
        history.last_failure.record(read.is_err());
        let chunk = read.map_err(Failure::Read)?;
        metrics::history_chunk_read(if chunk.is_some() { "shared" } else { "too_big" });
        Ok(chunk)
    };
    history.chunks.get_or_insert_async(&key, read).await
}

/// How long after a failed chunk read the others fail without trying.
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// When something last failed, if it has not succeeded since.
#[derive(Debug, Default)]
struct LastFailure(std::sync::Mutex<Option<tokio::time::Instant>>);

impl LastFailure {
    fn record(&self, failed: bool) {
        let mut last = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *last = failed.then(tokio::time::Instant::now);
    }

    fn within(&self, hold: Duration) -> bool {
        let last = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        last.is_some_and(|at| at.elapsed() < hold)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failure_holds_for_a_moment_and_a_success_clears_it() {
        let last = LastFailure::default();
        assert!(!last.within(FAILURE_HOLD), "nothing failed yet");
        last.record(true);
        assert!(last.within(FAILURE_HOLD));
        tokio::time::advance(FAILURE_HOLD).await;
        assert!(!last.within(FAILURE_HOLD), "held for FAILURE_HOLD only");
        last.record(true);
        last.record(false);
        assert!(!last.within(FAILURE_HOLD), "a success clears it");
    }
}
