//! The transactional outbox and the relay that empties it into JetStream.
//!
//! Every event is written to the `outbox` table in the same transaction as the change
//! it reports ([`enqueue`]). The [`Relay`] then publishes unpublished rows in id order
//! with `Nats-Msg-Id` = the event id, waits for JetStream's acks and marks them
//! published. It runs right after each commit (woken through a `Notify`) and on a
//! timer (the sweeper), which picks up whatever a crash or an outage left behind.
//!
//! With several ingest replicas, a round takes `pg_try_advisory_xact_lock` so one
//! replica publishes at a time (keeping per-chat order in the stream) and reads its
//! rows `for update skip locked`. A row published twice (a crash between the ack and
//! the mark) is dropped by JetStream's duplicate window.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use shared::envelope::Envelope;
use shared::subjects::Subjects;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::OutboxArgs;
use crate::jetstream::{StreamSpec, ensure_stream};

/// Advisory lock key that makes one replica at a time publish ("outbox" in ASCII).
const PUBLISH_LOCK: i64 = 0x6f7574626f78;
/// How often published rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Writes events to the outbox inside the caller's transaction, in the given order.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    subjects: &Subjects,
    events: &[Envelope],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let subject_names: Vec<String> =
        events.iter().map(|e| subjects.event(&e.account_id, e.chat_id.as_deref(), e.event_type)).collect();
    let payloads: Vec<Vec<u8>> = events.iter().map(Envelope::to_bytes).collect();
    sqlx::query(
        "insert into outbox (event_id, subject, payload)
         select * from unnest($1::uuid[], $2::text[], $3::bytea[])",
    )
    .bind(ids)
    .bind(subject_names)
    .bind(payloads)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Pending {
    id: i64,
    event_id: Uuid,
    subject: String,
    payload: Vec<u8>,
    created_at: DateTime<Utc>,
}

/// What one publishing round did.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Published(usize),
    /// Another replica holds the publishing lock.
    Busy,
}

/// Publishes outbox rows to JetStream.
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    stream: StreamSpec,
    args: OutboxArgs,
    /// Notified after every commit that wrote outbox rows.
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        stream: StreamSpec,
        args: OutboxArgs,
        wake: Arc<Notify>,
    ) -> Self {
        Self { pool, js, stream, args, wake }
    }

    /// Runs until `stop` is cancelled, then makes one last round.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut sweep = tokio::time::interval(Duration::from_millis(self.args.outbox_sweep_ms.max(10)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream_ready = false;
        let mut failures = 0u32;
        let mut last_prune = tokio::time::Instant::now();
        loop {
            let (stopping, swept) = tokio::select! {
                _ = self.wake.notified() => (false, false),
                _ = sweep.tick() => (false, true),
                _ = stop.cancelled() => (true, false),
            };
            if !stream_ready {
                match ensure_stream(&self.js, &self.stream).await {
                    Ok(()) => stream_ready = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream not ready; events stay in the outbox")
                    }
                }
            }
            if stream_ready {
                match self.drain().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        metrics::counter!("outbox_publish_errors_total").increment(1);
                        tracing::warn!(error = format!("{e:#}"), failures, "publishing failed; will retry");
                        // The stream may have been deleted: make sure of it next time.
                        stream_ready = false;
                        let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(5)));
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {},
                            _ = stop.cancelled() => {},
                        }
                    }
                }
            }
            if swept || stopping {
                let prune = last_prune.elapsed() >= PRUNE_EVERY;
                if prune {
                    last_prune = tokio::time::Instant::now();
                }
                if let Err(e) = self.upkeep(prune).await {
                    tracing::warn!(error = %e, "outbox upkeep failed");
                }
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Publishes rounds until the outbox is empty or another replica is at it.
    async fn drain(&self) -> anyhow::Result<()> {
        let mut busy_rounds = 0;
        loop {
            match self.round().await? {
                Round::Published(n) if n as i64 >= self.args.outbox_batch => continue,
                Round::Published(_) => return Ok(()),
                Round::Busy if busy_rounds < 20 => {
                    busy_rounds += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Round::Busy => return Ok(()),
            }
        }
    }

    /// One round: lock, read a page of unpublished rows, publish, await acks, mark.
    async fn round(&self) -> anyhow::Result<Round> {
        let mut tx = self.pool.begin().await.context("starting outbox round")?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
            .bind(PUBLISH_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(Round::Busy);
        }
        let rows: Vec<Pending> = sqlx::query_as(
            "select id, event_id, subject, payload, created_at from outbox
             where published_at is null order by id limit $1 for update skip locked",
        )
        .bind(self.args.outbox_batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Round::Published(0));
        }

        let ack_timeout = Duration::from_millis(self.args.outbox_ack_timeout_ms);
        let acks = tokio::time::timeout(ack_timeout, self.publish_all(&rows))
            .await
            .context("JetStream did not ack in time")??;
        let acked: Vec<i64> = rows.iter().zip(&acks).filter(|(_, ok)| **ok).map(|(r, _)| r.id).collect();
        sqlx::query(
            "update outbox set published_at = now(), attempts = attempts + 1, updated_at = now()
             where id = any($1)",
        )
        .bind(&acked)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.context("marking events published")?;

        let now = Utc::now();
        for row in rows.iter().zip(&acks).filter(|(_, ok)| **ok).map(|(r, _)| r) {
            let lag = (now - row.created_at).to_std().unwrap_or_default();
            metrics::histogram!("outbox_publish_lag_seconds").record(lag.as_secs_f64());
        }
        metrics::counter!("outbox_published_total").increment(acked.len() as u64);
        anyhow::ensure!(
            acked.len() == rows.len(),
            "{} of {} events were not acked",
            rows.len() - acked.len(),
            rows.len()
        );
        Ok(Round::Published(rows.len()))
    }

    /// Publishes every row (pipelined), then awaits the acks; `true` per acked row.
    async fn publish_all(&self, rows: &[Pending]) -> anyhow::Result<Vec<bool>> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, row.event_id.to_string().as_str());
            let ack = self
                .js
                .publish_with_headers(row.subject.clone(), headers, row.payload.clone().into())
                .await
                .context("publishing to JetStream")?;
            pending.push(ack);
        }
        let mut acked = Vec::with_capacity(pending.len());
        for ack in pending {
            match ack.await {
                Ok(_) => acked.push(true),
                Err(e) => {
                    tracing::warn!(error = %e, "publish not acked");
                    acked.push(false);
                }
            }
        }
        Ok(acked)
    }

    /// Records the outbox depth and, when `prune`, deletes published rows past retention.
    async fn upkeep(&self, prune: bool) -> Result<(), sqlx::Error> {
        if prune {
            sqlx::query(
                "delete from outbox where id in (
                     select id from outbox
                     where published_at < now() - make_interval(secs => $1) limit 10000)",
            )
            .bind(self.args.outbox_retention_secs as f64)
            .execute(&self.pool)
            .await?;
        }
        let depth: i64 = sqlx::query_scalar("select count(*) from outbox where published_at is null")
            .fetch_one(&self.pool)
            .await?;
        metrics::gauge!("outbox_depth").set(depth as f64);
        Ok(())
    }
}
