//! The history a resume reads: the stream beyond the hub's window, in shared chunks.
//!
//! Events older than the hub's in-memory window come from JetStream in chunks of
//! [`CHUNK`] sequences, each read once per replica and kept in a bounded cache
//! ([`CHUNK_CACHE_BYTES`]): a reconnect storm of clients that all missed the same
//! stretch reads it from NATS once, not once per client. A chunk too big to keep
//! ([`CHUNK_MAX_BYTES`]), and a stretch the replica has not seen a whole chunk of yet,
//! are read by each client alone through a [`Reader`]. At most [`MAX_HISTORY_READS`]
//! reads run at once per replica. The resume protocol that uses all this is in
//! [`crate::resume`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use quick_cache::Weighter;
use shared::subjects::Subjects;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::event::Event;
use crate::hub::SharedEvent;
use crate::metrics;

/// Longest wait for the next history message.
pub const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);
/// History events written per flush.
pub const HISTORY_BATCH: usize = 64;

/// Resumes reading JetStream at once, per replica. A reconnect storm that reaches past
/// the window waits its turn here instead of asking NATS for thousands of consumers at
/// the same moment; meanwhile its live events queue up as in any catch-up.
pub const MAX_HISTORY_READS: usize = 64;

/// Stream sequences per shared chunk of history.
pub const CHUNK: u64 = 1024;
/// Memory the cached chunks may take (event bytes plus a per-event overhead).
pub const CHUNK_CACHE_BYTES: u64 = 64 << 20;
/// Largest chunk read into memory (1,024 events of 8 KiB); events are rarely over 1 KiB,
/// but a webhook body may be up to 1 MiB.
pub const CHUNK_MAX_BYTES: usize = 8 << 20;

/// Every event of the stream with a sequence in `(index * CHUNK, (index + 1) * CHUNK]`,
/// whatever its account: the scope is applied when a connection sends them.
pub struct Chunk {
    pub events: Vec<SharedEvent>,
    /// Sequences up to this one had already left the stream when the chunk was read
    /// (it is complete above it only).
    pub complete_after: u64,
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
pub struct Bounds {
    pub stream: jetstream::stream::Stream,
    pub first: u64,
    pub last: u64,
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
    pub async fn bounds(&self) -> anyhow::Result<Bounds> {
        let stream = self.js.get_stream(&self.stream_name).await?;
        let state = &stream.cached_info().state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        Ok(Bounds { stream, first, last })
    }
}

/// The events of a stretch of the stream, `[from, to]`, read in batches through an
/// ephemeral consumer; [`Reader::close`] deletes the consumer.
pub struct Reader<'a, I> {
    stream: &'a jetstream::stream::Stream<I>,
    subjects: &'a Subjects,
    name: String,
    /// `None` once the stretch is read.
    messages: Option<consumer::pull::Stream>,
    to: u64,
}

impl<'a, I> Reader<'a, I> {
    pub async fn open(
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
    pub async fn next_batch(&mut self) -> anyhow::Result<Option<Vec<SharedEvent>>> {
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

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.delete_consumer(&self.name)).await;
    }
}

/// Why a chunk could not be had.
pub enum Failure<E> {
    /// The caller gave up waiting for a turn (its connection ended, say).
    Gave(E),
    Read(anyhow::Error),
}

impl History {
    /// The chunk at `index` of `stream`, read from JetStream by the first caller that
    /// needs it, under a turn `turn` waits for, while the others wait for that read.
    pub async fn chunk<E>(
        &self,
        stream: &jetstream::stream::Stream,
        index: u64,
        turn: impl Future<Output = Result<OwnedSemaphorePermit, E>>,
    ) -> Result<Option<Arc<Chunk>>, Failure<E>> {
        let key = (stream.cached_info().created.unix_timestamp_nanos(), index);
        let read = async {
            // Every caller waiting for this chunk takes over the read in turn when it
            // fails: with NATS hanging, the last of a storm's clients would wait one
            // HISTORY_TIMEOUT per client before it. After a failure they give up at
            // once instead (1011: they retry later, with backoff).
            if self.last_failure.within(FAILURE_HOLD) {
                return Err(Failure::Read(anyhow::anyhow!("reading history failed moments ago")));
            }
            let _permit = turn.await.map_err(Failure::Gave)?;
            let read = self.read_chunk(stream, index).await;
            self.last_failure.record(read.is_err());
            let chunk = read.map_err(Failure::Read)?;
            metrics::history_chunk_read(if chunk.is_some() { "shared" } else { "too_big" });
            Ok(chunk)
        };
        self.chunks.get_or_insert_async(&key, read).await
    }
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
