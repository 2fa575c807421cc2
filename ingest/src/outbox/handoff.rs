//! Publishing right after commit: the writer that commits outbox rows hands them to
//! this publisher in process, so an event reaches JetStream without waiting for a relay
//! round (a transaction, a lock, a read and an update before the first byte is sent).
//!
//! The outbox stays the record and the recovery path. Every row is written in the same
//! transaction as before; the publisher only saves the relay the trouble of reading it
//! back. What it cannot publish (NATS away, an ack that never came, a full queue, a
//! commit whose fate is unknown) it leaves in the table for the [`Relay`], and marks a
//! *gap*. Before it publishes anything after a gap it drains the outbox itself through
//! the relay, in id order, so the stream keeps every chat's order:
//!
//! - A writer offers its rows while its transaction, and so its chats' advisory locks,
//!   is still open ([`Handoff::offer`]), and says after the commit whether it committed.
//!   Two batches that share a chat are committed one after the other under that lock,
//!   so the earlier one is always offered first; the publisher takes offers in order and
//!   waits for each one's commit before it publishes it.
//! - An offer that does not fit in the queue is not made: the writer marks the gap
//!   before it commits, hence before any later batch of its chats is offered. The
//!   publisher reads the gap after taking a later offer, so it sees it, and drains first.
//!
//! Rows are published with `Nats-Msg-Id` = the event id, like the relay's: when both
//! send one (a relay round can read a row the publisher has sent but not yet marked),
//! JetStream's duplicate window drops the second. Acked rows are marked published by a
//! separate task, off the path of the next publish; a mark that is lost only means the
//! relay sends the row again, and JetStream drops it.
//!
//! With several ingest replicas each publishes its own commits: events of one chat
//! committed by two replicas within the same milliseconds may reach the stream in
//! either order. `OUTBOX_PUBLISH_AFTER_COMMIT=false` leaves all publishing to the
//! relay, one replica at a time in id order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream;
use bytes::Bytes;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{HEADER_BYTES, Relay, max_payload};

/// Offers waiting for the publisher; beyond it, writers mark a gap instead of waiting.
const QUEUE: usize = 1024;
/// Most offers published in one go.
const TAKE: usize = 256;
/// After a failed drain, offers are left to the relay for this long before the next try.
const RETRY_DRAIN_AFTER: Duration = Duration::from_millis(200);

/// One outbox row, as written in the transaction.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub event_id: Uuid,
    pub subject: String,
    pub payload: Bytes,
}

/// A batch's rows, offered before its commit.
struct Offer {
    rows: Vec<Row>,
    /// `true` once the batch committed; `false` or dropped when it did not, or when
    /// its writer cannot tell.
    committed: oneshot::Receiver<bool>,
    /// When the batch's transaction began (what the relay's lag counts from too).
    began: Instant,
}

/// What a writer holds between its offer and its commit.
pub struct Offered(oneshot::Sender<bool>);

impl Offered {
    /// The transaction committed.
    pub fn committed(self) {
        let _ = self.0.send(true);
    }
}

/// The writers' end. Cheap to clone.
#[derive(Clone)]
pub struct Handoff {
    queue: mpsc::Sender<Offer>,
    gap: Arc<AtomicBool>,
}

impl Handoff {
    /// Offers a batch's rows; call it with the batch's transaction still open, and
    /// say [`Offered::committed`] after the commit (dropping it says it did not). With
    /// the queue full, nothing is offered and the gap is marked: the relay publishes
    /// these rows, and the publisher drains before its next publish.
    pub fn offer(&self, rows: Vec<Row>, began: Instant) -> Option<Offered> {
        if rows.is_empty() {
            return None;
        }
        let (done, committed) = oneshot::channel();
        match self.queue.try_send(Offer { rows, committed, began }) {
            Ok(()) => Some(Offered(done)),
            Err(_) => {
                self.gap.store(true, Ordering::SeqCst);
                crate::metrics::handoff("queue_full", 1);
                None
            }
        }
    }
}

/// Publishes offered rows as soon as their commit is known.
pub struct Publisher {
    nats: async_nats::Client,
    js: jetstream::Context,
    relay: Arc<Relay>,
    offers: mpsc::Receiver<Offer>,
    gap: Arc<AtomicBool>,
    ack_timeout: Duration,
    marks: mpsc::Sender<Vec<i64>>,
    /// When a drain last failed: offers are left to the relay for a while after it.
    failed_drain: Option<Instant>,
}

impl Publisher {
    /// The writers' [`Handoff`], its publisher, and the task that marks acked rows
    /// published (run both until `stop`).
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        relay: Arc<Relay>,
        ack_timeout: Duration,
    ) -> (Handoff, Self, Marker) {
        let (queue, offers) = mpsc::channel(QUEUE);
        let (marks, marked) = mpsc::channel(QUEUE);
        let gap = Arc::new(AtomicBool::new(false));
        let js = jetstream::new(nats.clone());
        let publisher =
            Self { nats, js, relay, offers, gap: gap.clone(), ack_timeout, marks, failed_drain: None };
        (Handoff { queue, gap }, publisher, Marker { pool, marked })
    }

    /// Runs until `stop`; what is still queued then is left to the relay's last round.
    pub async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut taken = Vec::with_capacity(TAKE);
        loop {
            tokio::select! {
                n = self.offers.recv_many(&mut taken, TAKE) => if n == 0 { return Ok(()) },
                _ = stop.cancelled() => return Ok(()),
            }
            let mut ready = Vec::with_capacity(taken.len());
            for offer in taken.drain(..) {
                match offer.committed.await {
                    Ok(true) => ready.push((offer.began, offer.rows)),
                    // Rolled back, or unknown (the connection died during the commit):
                    // the relay decides from the table.
                    _ => self.gap.store(true, Ordering::SeqCst),
                }
            }
            let rows: usize = ready.iter().map(|(_, rows)| rows.len()).sum();
            if self.gap.swap(false, Ordering::SeqCst) && !self.drain().await {
                self.gap.store(true, Ordering::SeqCst);
                crate::metrics::handoff("left_to_relay", rows);
                continue;
            }
            self.publish(ready).await;
        }
    }

    /// Publishes what the outbox holds through the relay; `true` if it emptied it.
    async fn drain(&mut self) -> bool {
        if self.failed_drain.is_some_and(|at| at.elapsed() < RETRY_DRAIN_AFTER)
            || self.nats.connection_state() != State::Connected
        {
            return false;
        }
        let drained = match self.relay.drain(Duration::ZERO).await {
            Ok(emptied) => emptied,
            Err(e) => {
                tracing::debug!(error = format!("{e:#}"), "draining before publishing failed");
                false
            }
        };
        self.failed_drain = (!drained).then(Instant::now);
        drained
    }

    /// Publishes the rows (pipelined), awaits their acks and hands the acked ones to
    /// the marker. Anything not acked marks the gap; after a failed send nothing more
    /// is sent.
    async fn publish(&mut self, ready: Vec<(Instant, Vec<Row>)>) {
        if self.nats.connection_state() != State::Connected {
            let rows = ready.iter().map(|(_, rows)| rows.len()).sum();
            self.gap.store(true, Ordering::SeqCst);
            crate::metrics::handoff("left_to_relay", rows);
            return;
        }
        let deadline = Instant::now() + self.ack_timeout;
        let max_payload = max_payload(&self.nats);
        let rows: Vec<(Instant, &Row)> =
            ready.iter().flat_map(|(offered, rows)| rows.iter().map(move |row| (*offered, row))).collect();
        let mut pending = Vec::with_capacity(rows.len());
        let mut unsent = 0;
        for (i, (offered, row)) in rows.iter().enumerate() {
            if row.payload.len() + row.subject.len() + HEADER_BYTES > max_payload {
                // The relay parks it; the rows after it need not wait.
                self.gap.store(true, Ordering::SeqCst);
                unsent += 1;
                continue;
            }
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, row.event_id.to_string().as_str());
            let publish = self.js.publish_with_headers(row.subject.clone(), headers, row.payload.clone());
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => pending.push((row.id, *offered, ack)),
                _ => {
                    self.gap.store(true, Ordering::SeqCst);
                    unsent += rows.len() - i;
                    break;
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        let mut lags = Vec::with_capacity(pending.len());
        for (id, offered, ack) in pending {
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(_)) => {
                    acked.push(id);
                    lags.push(offered.elapsed());
                }
                _ => {
                    self.gap.store(true, Ordering::SeqCst);
                    unsent += 1;
                }
            }
        }
        crate::metrics::published(lags.into_iter());
        crate::metrics::handoff("published", acked.len());
        if unsent > 0 {
            crate::metrics::handoff("left_to_relay", unsent);
        }
        if !acked.is_empty() && self.marks.try_send(acked).is_err() {
            // The relay will send these again; JetStream drops the repeats.
            tracing::debug!("marker queue full; acked rows stay unmarked for the relay");
        }
    }
}

/// Marks acked rows published, in batches, apart from the publisher.
pub struct Marker {
    pool: PgPool,
    marked: mpsc::Receiver<Vec<i64>>,
}

impl Marker {
    pub async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut taken = Vec::new();
        loop {
            let stopping = tokio::select! {
                n = self.marked.recv_many(&mut taken, TAKE) => {
                    if n == 0 {
                        return Ok(());
                    }
                    false
                }
                _ = stop.cancelled() => {
                    while let Ok(ids) = self.marked.try_recv() {
                        taken.push(ids);
                    }
                    true
                }
            };
            let ids: Vec<i64> = taken.drain(..).flatten().collect();
            if !ids.is_empty() {
                let marked = sqlx::query(
                    "update outbox set published_at = now(), attempts = attempts + 1, updated_at = now()
                     where id = any($1) and published_at is null",
                )
                .bind(&ids)
                .execute(&self.pool)
                .await;
                if let Err(e) = marked {
                    tracing::warn!(error = %e, rows = ids.len(),
                        "marking published rows failed; the relay sends them again");
                }
            }
            if stopping {
                return Ok(());
            }
        }
    }
}
