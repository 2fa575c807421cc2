//! Group commit: deliveries that arrive together are committed together.
//!
//! PostgreSQL on a small machine commits a few thousand transactions per second, so one
//! transaction per webhook would cap ingest there. Handlers [`Batcher::submit`] a
//! [`Write`] and wait; a few writer tasks each take every queued write (up to a limit),
//! save them in one transaction with the outbox rows of their events, and answer each
//! handler after the commit. Under light load a batch is one delivery and nothing
//! waits; under heavy load batches grow while the previous commit runs.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::envelope::Envelope;
use shared::subjects::Subjects;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{
    Outcome, StoreError, Write, accounts, chats, is_data_error, is_retryable, messages, replies, updates,
};
use crate::config::BatchArgs;
use crate::outbox::handoff::Handoff;
use crate::outbox::{self, EventLimits, Sizer};

/// How many times a batch is retried after a deadlock or serialization failure.
const RETRIES: usize = 3;

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The handle webhook handlers submit writes through. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

/// Where a writer's committed events go next.
#[derive(Clone)]
pub enum AfterCommit {
    /// Handed to the publisher in process (see [`crate::outbox::handoff`]).
    Handoff(Handoff),
    /// The relay is woken to read them from the outbox.
    WakeRelay(Arc<Notify>),
}

impl Batcher {
    /// Starts `args.batch_workers` writers in `tasks`; `after_commit` says how the
    /// events of each commit reach JetStream.
    pub fn spawn(
        pool: PgPool,
        subjects: Subjects,
        sizer: Sizer,
        args: &BatchArgs,
        after_commit: AfterCommit,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(args.batch_queue.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        for worker in 0..args.batch_workers.max(1) {
            let writer = Writer {
                pool: pool.clone(),
                subjects: subjects.clone(),
                sizer: sizer.clone(),
                receiver: receiver.clone(),
                max: args.batch_max_size.max(1),
                window: args.window(),
                after_commit: after_commit.clone(),
            };
            tasks.spawn(async move {
                writer.run().await;
                tracing::debug!(worker, "batch writer stopped");
                Ok(())
            });
        }
        Self { queue }
    }

    /// Queues one delivery's writes and waits for the commit that holds them.
    pub async fn submit(&self, write: Write) -> Result<Outcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(Job { write, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Saturated,
            mpsc::error::TrySendError::Closed(_) => StoreError::Stopped,
        })?;
        answer.await.map_err(|_| StoreError::Stopped)?
    }
}

struct Writer {
    pool: PgPool,
    subjects: Subjects,
    sizer: Sizer,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    max: usize,
    window: Duration,
    after_commit: AfterCommit,
}

impl Writer {
    async fn run(self) {
        while let Some(batch) = self.next_batch().await {
            let started = Instant::now();
            let size = batch.len();
            self.save(batch).await;
            crate::metrics::batch_committed(size, started.elapsed());
        }
    }

    /// Commits a batch and answers its jobs. When the database refuses the batch for
    /// the data of one of its writes, the batch is split in halves, committed left then
    /// right (so events keep their order), until the refused write is alone: it alone
    /// gets [`StoreError::Rejected`], and every other write its normal answer.
    async fn save(&self, batch: Vec<Job>) {
        let mut parts = VecDeque::from([batch]);
        while let Some(mut part) = parts.pop_front() {
            let writes: Vec<&Write> = part.iter().map(|j| &j.write).collect();
            match self.commit_with_retries(&writes).await {
                Ok((outcomes, events)) => {
                    if let (AfterCommit::WakeRelay(relay), true) = (&self.after_commit, events > 0) {
                        relay.notify_one();
                    }
                    for (job, outcome) in part.into_iter().zip(outcomes) {
                        let _ = job.reply.send(Ok(outcome));
                    }
                }
                Err(e) if is_data_error(&e) && part.len() > 1 => {
                    tracing::debug!(error = %e, size = part.len(), "batch refused for its data; splitting it");
                    crate::metrics::batch_split();
                    let right = part.split_off(part.len() / 2);
                    parts.push_front(right);
                    parts.push_front(part);
                }
                Err(e) if is_data_error(&e) => {
                    let reason = crate::sanitize::scrubbed(&e.to_string()).into_owned();
                    tracing::warn!(reason = %reason, "the database refused a write for its data");
                    crate::metrics::write_rejected();
                    for job in part {
                        let _ = job.reply.send(Err(StoreError::Rejected { reason: reason.clone() }));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, size = part.len(), "batch commit failed");
                    for job in part {
                        let _ = job.reply.send(Err(StoreError::Database(clone_error(&e))));
                    }
                }
            }
        }
    }

    /// [`commit`], retried after a deadlock or serialization failure.
    async fn commit_with_retries(&self, writes: &[&Write]) -> Result<(Vec<Outcome>, usize), sqlx::Error> {
        let limits = self.sizer.limits();
        let handoff = match &self.after_commit {
            AfterCommit::Handoff(handoff) => Some(handoff),
            AfterCommit::WakeRelay(_) => None,
        };
        let mut result = commit(&self.pool, &self.subjects, &limits, handoff, writes).await;
        for _ in 0..RETRIES {
            match &result {
                Err(e) if is_retryable(e) => {
                    tracing::debug!(error = %e, "retrying batch after a lock conflict");
                    result = commit(&self.pool, &self.subjects, &limits, handoff, writes).await;
                }
                _ => break,
            }
        }
        result
    }

    /// Waits for one job, then takes what else is queued (within the window).
    async fn next_batch(&self) -> Option<Vec<Job>> {
        let mut receiver = self.receiver.lock().await;
        let first = receiver.recv().await?;
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.window;
        while batch.len() < self.max {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) if self.window.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(job)) => batch.push(job),
                    _ => break,
                },
            }
        }
        Some(batch)
    }
}

/// Saves a batch in one transaction; returns each write's outcome and the number of
/// events written to the outbox. With a `handoff`, the outbox rows are offered to it
/// before the commit (the chats' locks still held) and confirmed after it.
pub async fn commit(
    pool: &PgPool,
    subjects: &Subjects,
    limits: &EventLimits,
    handoff: Option<&Handoff>,
    writes: &[&Write],
) -> Result<(Vec<Outcome>, usize), sqlx::Error> {
    let began = tokio::time::Instant::now();
    let mut tx = pool.begin().await?;
    lock_chats(&mut tx, writes).await?;
    let mut outcomes = vec![Outcome::Ignored; writes.len()];
    let mut events: Vec<(usize, Envelope)> = Vec::new();

    let (indexes, new_messages): (Vec<usize>, Vec<&messages::NewMessage>) = writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            Write::Message(m) => Some((i, m)),
            _ => None,
        })
        .unzip();
    // The echo of a reply sent without Unipile's id takes that reply's row first.
    let mut echoes = replies::claim_echoes(&mut tx, &new_messages).await?;
    for (n, (i, inserted)) in
        indexes.into_iter().zip(messages::insert(&mut tx, &new_messages).await?).enumerate()
    {
        outcomes[i] = inserted.outcome;
        events.extend(inserted.events.into_iter().map(|e| (i, e)));
        if let Some(status) = echoes.remove(&n) {
            outcomes[i] = Outcome::Accepted;
            events.push((i, status));
        }
    }

    // After the inserts, so an update finds a message of the same batch. Messages are
    // locked before chats and accounts, as the inserts do.
    let (update_indexes, message_updates) = of_kind(writes, |w| match w {
        Write::Update(u) => Some(u),
        _ => None,
    });
    let applied = updates::apply(&mut tx, &message_updates).await?;
    let (status_indexes, status_changes) = of_kind(writes, |w| match w {
        Write::AccountStatus(s) => Some(s),
        _ => None,
    });
    let status_applied = accounts::apply(&mut tx, &status_changes).await?;
    let (read_indexes, reads) = of_kind(writes, |w| match w {
        Write::MarkRead(r) => Some(r),
        _ => None,
    });
    let read_applied = chats::mark_read(&mut tx, &reads).await?;
    let (reply_indexes, new_replies) = of_kind(writes, |w| match w {
        Write::Reply(r) => Some(r),
        _ => None,
    });
    let created = replies::create(&mut tx, &new_replies).await?;
    let (done_indexes, answers) = of_kind(writes, |w| match w {
        Write::ReplyDone(d) => Some(d),
        _ => None,
    });
    let finished = replies::finish(&mut tx, &answers).await?;
    let done = update_indexes.into_iter().zip(applied);
    let done = done.chain(status_indexes.into_iter().zip(status_applied));
    let done = done.chain(reply_indexes.into_iter().zip(created));
    let done = done.chain(done_indexes.into_iter().zip(finished));
    for (i, applied) in done.chain(read_indexes.into_iter().zip(read_applied)) {
        outcomes[i] = applied.outcome;
        events.extend(applied.events.into_iter().map(|e| (i, e)));
    }

    // Events leave in the order their deliveries were queued.
    events.sort_by_key(|(i, _)| *i);
    let mut envelopes: Vec<Envelope> = events.into_iter().map(|(_, e)| e).collect();
    let rows = outbox::enqueue(&mut tx, subjects, limits, &mut envelopes).await?;
    let offered = handoff.and_then(|handoff| handoff.offer(rows, began));
    tx.commit().await?;
    if let Some(offered) = offered {
        offered.committed();
    }
    Ok((outcomes, envelopes.len()))
}

/// Takes a transaction-scoped advisory lock on every chat the batch touches, in one
/// global order, before any row is written.
///
/// Batches lock rows of several tables (new chats, messages, existing chats, accounts);
/// two batches that share chats could otherwise take those locks in different orders
/// and deadlock. With the chat locks first, batches sharing a chat run one after the
/// other, and batches with no chat in common never wait for each other's rows.
async fn lock_chats(tx: &mut Transaction<'_, Postgres>, writes: &[&Write]) -> Result<(), sqlx::Error> {
    lock_chat_ids(
        tx,
        writes.iter().filter_map(|w| match w {
            Write::Message(m) => Some(m.chat_id.as_str()),
            Write::Update(u) => Some(u.message.chat_id.as_str()),
            Write::MarkRead(r) => Some(r.chat_id.as_str()),
            Write::Reply(r) => Some(r.chat_id.as_str()),
            Write::ReplyDone(d) => Some(d.chat_id.as_str()),
            Write::AccountStatus(_) => None,
        }),
    )
    .await
}

/// The lock of [`lock_chats`], for writers outside the batcher (the history backfill).
pub(crate) async fn lock_chat_ids<'a>(
    tx: &mut Transaction<'_, Postgres>,
    chat_ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), sqlx::Error> {
    let chats: BTreeSet<&str> = chat_ids.into_iter().collect();
    if chats.is_empty() {
        return Ok(());
    }
    // The materialized CTE hands its rows to the aggregate in key order, so the locks
    // are taken in that order. Key space 1 of the two-key form is ours alone.
    sqlx::query(
        "with keys as materialized (
             select distinct hashtext(id) as k from unnest($1::text[]) as id order by 1)
         select count(pg_advisory_xact_lock(1, k)) from keys",
    )
    .bind(chats.into_iter().collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The writes `pick` selects, with their places in the batch.
fn of_kind<'a, T>(
    writes: &[&'a Write],
    pick: impl Fn(&'a Write) -> Option<&'a T>,
) -> (Vec<usize>, Vec<&'a T>) {
    writes.iter().enumerate().filter_map(|(i, w)| pick(w).map(|t| (i, t))).unzip()
}

/// `sqlx::Error` is not `Clone`; every job of a failed batch gets an equivalent error.
fn clone_error(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(format!("batch commit failed: {e}"))
}
