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
//! ([`crate::history::CHUNK_MAX_BYTES`]), in batches. Then the queue is drained, skipping anything at
//! or below what was already sent. If the queue overflowed during catch-up the
//! connection is only marked `lagged`; it empties its queue and catches up again from
//! where it got to, a few rounds at most before counting as a slow consumer.
//!
//! `hello.recovered` is `false` when the stream no longer holds `since + 1` (or never
//! held `since`), or when `since` lies more than `FANOUT_MAX_RESUME_GAP` sequences
//! behind and the window cannot serve it: the client reloads by REST and gets live
//! events from `head` on. That bounds what one resume may cost the replica: a token for
//! every account resuming from days ago would otherwise replay days of the stream while
//! holding one of the [`crate::history::MAX_HISTORY_READS`] turns, where one REST page does the job.

use async_nats::jetstream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::frames::ServerFrame;
use crate::history::{CHUNK, Failure, HISTORY_BATCH, Reader};
use crate::hub::{ConnShared, SharedEvent};
use crate::metrics;
use crate::state::ConnectionContext;
use crate::ws::{Close, Connection, End};

/// Catch-up rounds after lagging before the client counts as too slow.
const MAX_CATCH_UP_ROUNDS: u32 = 5;
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
            self.send_frame(&ServerFrame::hello(head, heartbeat, Some(true))).await?;
            self.covered = since;
            self.send_events(&events).await?;
            self.covered = head;
        } else if head.saturating_sub(since) > self.ctx.history.max_gap {
            // Decided before asking NATS anything: a reconnect storm of such clients
            // costs the replica a `hello` each.
            metrics::resume("too_far");
            self.send_frame(&ServerFrame::hello(head, heartbeat, Some(false))).await?;
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
                self.send_frame(&ServerFrame::hello(head, heartbeat, Some(false))).await?;
                self.covered = head;
            } else {
                metrics::resume("stream");
                self.send_frame(&ServerFrame::hello(head, heartbeat, Some(true))).await?;
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
                let turn = history_permit(&self.ctx, &self.shared);
                match self.ctx.history.chunk(stream, index, turn).await {
                    Ok(chunk) => chunk,
                    Err(Failure::Gave(end)) => return Err(end),
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

/// Waits for a turn to read JetStream (see [`crate::history::MAX_HISTORY_READS`]), giving up when the
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
