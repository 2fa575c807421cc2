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
//!
//! With `OUTBOX_PUBLISH_AFTER_COMMIT` (the default) the rows do not wait for a round:
//! the writer that commits them hands them to the [`handoff`] publisher in process,
//! which publishes them as soon as the commit is known, and the relay above stays the
//! recovery path (crashes, outages, anything the publisher could not send).

pub mod handoff;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, ErrorCode};
use chrono::{DateTime, Utc};
use shared::envelope::Envelope;
use shared::subjects::Subjects;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::OutboxArgs;
use shared::stream::{StreamSpec, ensure_stream};

/// Advisory lock key that makes one replica at a time publish ("outbox" in ASCII).
const PUBLISH_LOCK: i64 = 0x6f7574626f78;
/// How often published rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// With the handoff on, the sweeper leaves rows younger than this to it: the handoff
/// marks its rows within milliseconds, and a sweep that read them too would publish
/// each one twice (JetStream drops the repeat, but both sides do the work).
const HANDOFF_SETTLE: Duration = Duration::from_secs(1);

/// Room left in a NATS message for the subject, headers and protocol line.
const HEADROOM: usize = 1024;
/// The smallest a string or a list is cut to while making an event fit.
const MIN_CUT: usize = 64;

/// How large an event may be on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Longer strings in an event's data are cut to this many bytes (`EVENT_TEXT_MAX_BYTES`).
    pub text_max_bytes: usize,
    /// The most bytes one serialized envelope may take: the server's max_payload less
    /// room for the subject and headers.
    pub max_event_bytes: usize,
}

impl EventLimits {
    /// Limits for a server with this `max_payload` (learned from its INFO at connect).
    pub fn new(text_max_bytes: usize, max_payload: usize) -> Self {
        Self {
            text_max_bytes: text_max_bytes.max(MIN_CUT),
            max_event_bytes: max_payload.saturating_sub(HEADROOM).max(4096),
        }
    }
}

/// NATS's default max_payload, assumed until the server has told its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

impl Default for EventLimits {
    /// NATS's default max_payload (1 MiB) and a 64 KiB text cap.
    fn default() -> Self {
        Self::new(64 * 1024, DEFAULT_MAX_PAYLOAD)
    }
}

/// The current [`EventLimits`]: the text cap and the max_payload of the NATS server the
/// client is connected to (it may change when the client reconnects to another server).
#[derive(Clone)]
pub struct Sizer {
    pub text_max_bytes: usize,
    pub nats: async_nats::Client,
}

impl Sizer {
    pub fn limits(&self) -> EventLimits {
        EventLimits::new(self.text_max_bytes, max_payload(&self.nats))
    }
}

/// The server's max_payload, or NATS's default before the first connection.
fn max_payload(nats: &async_nats::Client) -> usize {
    match nats.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        known => known,
    }
}

/// Makes an event fit `limits` and serializes it.
///
/// Strings in `data` longer than the text cap are cut (at a character boundary); if the
/// event is still too large (a long reaction list, a huge attachment list), strings and
/// lists are cut shorter and shorter; as a last resort `data` keeps only the message id.
/// Whenever anything was cut the envelope says `"truncated": true`, and clients read the
/// whole record by REST: PostgreSQL always keeps it whole.
pub fn fit(envelope: &mut Envelope, limits: &EventLimits) -> Vec<u8> {
    if abridge(&mut envelope.data, limits.text_max_bytes, usize::MAX) {
        envelope.truncated = true;
    }
    let mut bytes = envelope.to_bytes();
    let (mut text, mut items) = (limits.text_max_bytes, 4096usize);
    while bytes.len() > limits.max_event_bytes && text > MIN_CUT {
        (text, items) = ((text / 4).max(MIN_CUT), (items / 4).max(MIN_CUT / 4));
        abridge(&mut envelope.data, text, items);
        envelope.truncated = true;
        bytes = envelope.to_bytes();
    }
    if bytes.len() > limits.max_event_bytes {
        let message_id =
            envelope.data.get("message_id").or_else(|| envelope.data.pointer("/message/id")).cloned();
        envelope.data = serde_json::json!({ "message_id": message_id });
        bytes = envelope.to_bytes();
    }
    bytes
}

/// Cuts every string of `value` to at most `max_bytes` and every list and object to at
/// most `max_items` entries; `true` if anything was cut.
fn abridge(value: &mut serde_json::Value, max_bytes: usize, max_items: usize) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) if s.len() > max_bytes => {
            let mut end = max_bytes;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            true
        }
        Value::Array(items) => {
            let cut = items.len() > max_items;
            items.truncate(max_items);
            items.iter_mut().fold(cut, |any, v| abridge(v, max_bytes, max_items) | any)
        }
        Value::Object(map) => {
            let cut = map.len() > max_items;
            if cut {
                let keep: serde_json::Map<String, Value> =
                    std::mem::take(map).into_iter().take(max_items).collect();
                *map = keep;
            }
            map.values_mut().fold(cut, |any, v| abridge(v, max_bytes, max_items) | any)
        }
        _ => false,
    }
}

/// Writes events to the outbox inside the caller's transaction, in the given order,
/// each made to fit `limits` (see [`fit`]); returns the rows written, in that order.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    subjects: &Subjects,
    limits: &EventLimits,
    events: &mut [Envelope],
) -> Result<Vec<handoff::Row>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let subject_names: Vec<String> =
        events.iter().map(|e| subjects.event(&e.account_id, e.chat_id.as_deref(), e.event_type)).collect();
    let payloads: Vec<Vec<u8>> = events.iter_mut().map(|e| fit(e, limits)).collect();
    let cut = events.iter().filter(|e| e.truncated).count();
    if cut > 0 {
        crate::metrics::events_truncated(cut);
    }
    let written: Vec<(i64, Uuid)> = sqlx::query_as(
        "insert into outbox (event_id, subject, payload)
         select * from unnest($1::uuid[], $2::text[], $3::bytea[])
         returning id, event_id",
    )
    .bind(&ids[..])
    .bind(&subject_names[..])
    .bind(&payloads[..])
    .fetch_all(&mut **tx)
    .await?;
    let row_ids: std::collections::HashMap<Uuid, i64> = written.into_iter().map(|(id, e)| (e, id)).collect();
    Ok(ids
        .into_iter()
        .zip(subject_names)
        .zip(payloads)
        .filter_map(|((event_id, subject), payload)| {
            let id = *row_ids.get(&event_id)?;
            Some(handoff::Row { id, event_id, subject, payload: payload.into() })
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct Pending {
    id: i64,
    event_id: Uuid,
    subject: String,
    payload: Vec<u8>,
    attempts: i32,
    created_at: DateTime<Utc>,
}

/// What one publishing round did.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Published(usize),
    /// Another replica holds the publishing lock.
    Busy,
}

/// What became of one row in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    /// JetStream stored it (or had it already): marked published, never sent again.
    Acked,
    /// It can never be published (larger than the server accepts): set aside with the
    /// reason, so the rows after it go on.
    Parked(String),
    /// Not published this time (connection lost, no ack in time): tried again later.
    Failed(String),
}

/// Room for the `Nats-Msg-Id` header and the protocol line around a payload.
const HEADER_BYTES: usize = 128;
/// After this many refusals by JetStream itself (not outages), a row is parked.
const MAX_REFUSALS: i32 = 10;

/// Publishes outbox rows to JetStream.
pub struct Relay {
    pool: PgPool,
    nats: async_nats::Client,
    js: jetstream::Context,
    stream: StreamSpec,
    args: OutboxArgs,
    /// Notified after every commit that wrote outbox rows.
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        stream: StreamSpec,
        args: OutboxArgs,
        wake: Arc<Notify>,
    ) -> Self {
        let js = jetstream::new(nats.clone());
        Self { pool, nats, js, stream, args, wake }
    }

    /// Runs until `stop` is cancelled, then makes one last round.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> anyhow::Result<()> {
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
                // The timer's sweeps leave the handoff its newest rows; a wake-up (no
                // handoff) or the last round takes everything.
                let settle = match (swept && !stopping, self.args.outbox_publish_after_commit) {
                    (true, true) => HANDOFF_SETTLE,
                    _ => Duration::ZERO,
                };
                match self.drain(settle).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        crate::metrics::publish_round_failed();
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

    /// Publishes rounds until the outbox is empty (`true`: every row committed before
    /// the last round began is published or parked) or another replica is at it
    /// (`false`). With a `settle` time, only the rows up to the newest one older than
    /// it (by id, so a chat's older rows always come with its newer ones).
    pub(crate) async fn drain(&self, settle: Duration) -> anyhow::Result<bool> {
        let mut busy_rounds = 0;
        loop {
            match self.round(settle).await? {
                Round::Published(n) if n as i64 >= self.args.outbox_batch => continue,
                Round::Published(_) => return Ok(true),
                Round::Busy if busy_rounds < 20 => {
                    busy_rounds += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Round::Busy => return Ok(false),
            }
        }
    }

    /// One round: lock, read a page of unpublished rows, publish, await acks, then
    /// record each row's fate, whatever became of the others: acked rows are marked
    /// published even when later ones failed, so they are never sent again.
    async fn round(&self, settle: Duration) -> anyhow::Result<Round> {
        let mut tx = self.pool.begin().await.context("starting outbox round")?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
            .bind(PUBLISH_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(Round::Busy);
        }
        let rows: Vec<Pending> = if settle.is_zero() {
            sqlx::query_as(
                "select id, event_id, subject, payload, attempts, created_at from outbox
                 where published_at is null and parked_at is null
                 order by id limit $1 for update skip locked",
            )
            .bind(self.args.outbox_batch)
            .fetch_all(&mut *tx)
            .await?
        } else {
            sqlx::query_as(
                "select id, event_id, subject, payload, attempts, created_at from outbox
                 where published_at is null and parked_at is null
                   and id <= coalesce((select max(id) from outbox
                                       where created_at < now() - make_interval(secs => $2)), 0)
                 order by id limit $1 for update skip locked",
            )
            .bind(self.args.outbox_batch)
            .bind(settle.as_secs_f64())
            .fetch_all(&mut *tx)
            .await?
        };
        if rows.is_empty() {
            return Ok(Round::Published(0));
        }

        let sent = self.publish_all(&rows).await;
        let of = |wanted: fn(&Sent) -> bool| -> Vec<i64> {
            rows.iter().zip(&sent).filter(|(_, s)| wanted(s)).map(|(r, _)| r.id).collect()
        };
        let acked = of(|s| matches!(s, Sent::Acked));
        let failed = of(|s| matches!(s, Sent::Failed(_)));
        let (parked, reasons): (Vec<i64>, Vec<&str>) = rows
            .iter()
            .zip(&sent)
            .filter_map(|(r, s)| match s {
                Sent::Parked(reason) => Some((r.id, reason.as_str())),
                _ => None,
            })
            .unzip();
        sqlx::query(
            "update outbox set published_at = now(), attempts = attempts + 1, updated_at = now()
             where id = any($1)",
        )
        .bind(&acked)
        .execute(&mut *tx)
        .await?;
        if !failed.is_empty() {
            sqlx::query("update outbox set attempts = attempts + 1, updated_at = now() where id = any($1)")
                .bind(&failed)
                .execute(&mut *tx)
                .await?;
        }
        if !parked.is_empty() {
            sqlx::query(
                "update outbox o set parked_at = now(), park_reason = p.reason,
                     attempts = o.attempts + 1, updated_at = now()
                 from unnest($1::bigint[], $2::text[]) as p(id, reason) where o.id = p.id",
            )
            .bind(&parked)
            .bind(&reasons)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await.context("recording what was published")?;

        let now = Utc::now();
        let acked_rows = rows.iter().zip(&sent).filter(|(_, s)| **s == Sent::Acked);
        crate::metrics::published(
            acked_rows.map(|(row, _)| (now - row.created_at).to_std().unwrap_or_default()),
        );
        for (row, s) in rows.iter().zip(&sent) {
            if let Sent::Parked(reason) = s {
                let kind = reason.split(':').next().unwrap_or("other").to_owned();
                crate::metrics::parked(kind);
                tracing::error!(outbox_id = row.id, event_id = %row.event_id, subject = %row.subject,
                    reason = %reason, "event parked: it cannot be published");
            }
        }
        if let Some((_, Sent::Failed(first))) =
            rows.iter().zip(&sent).find(|(_, s)| matches!(s, Sent::Failed(_)))
        {
            anyhow::bail!("{} of {} events were not acked: {first}", failed.len(), rows.len());
        }
        Ok(Round::Published(rows.len()))
    }

    /// Publishes the rows (pipelined) and awaits their acks, all within the ack
    /// timeout; says what became of each. A row too large for the server is parked
    /// without being sent (nats-server would close the connection). After a failed
    /// send the remaining rows are not sent this round, but the acks of those already
    /// sent are still collected.
    async fn publish_all(&self, rows: &[Pending]) -> Vec<Sent> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.args.outbox_ack_timeout_ms);
        let max_payload = max_payload(&self.nats);
        let mut sent: Vec<Sent> = Vec::with_capacity(rows.len());
        let mut pending = Vec::with_capacity(rows.len());
        let mut broken: Option<String> = None;
        for (i, row) in rows.iter().enumerate() {
            if let Some(error) = &broken {
                sent.push(Sent::Failed(format!("not sent after an earlier failure: {error}")));
                continue;
            }
            let size = row.payload.len() + row.subject.len() + HEADER_BYTES;
            if size > max_payload {
                sent.push(Sent::Parked(format!(
                    "too_large: {size} bytes with its headers, the server's max_payload is {max_payload}"
                )));
                continue;
            }
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, row.event_id.to_string().as_str());
            let publish =
                self.js.publish_with_headers(row.subject.clone(), headers, row.payload.clone().into());
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => {
                    pending.push((i, ack));
                    sent.push(Sent::Failed("no ack".to_owned()));
                }
                Ok(Err(e)) => {
                    broken = Some(e.to_string());
                    sent.push(Sent::Failed(e.to_string()));
                }
                Err(_) => {
                    broken = Some("publishing timed out".to_owned());
                    sent.push(Sent::Failed("publishing timed out".to_owned()));
                }
            }
        }
        for (i, ack) in pending {
            sent[i] = match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(_)) => Sent::Acked,
                Ok(Err(e)) => match refusal(&e) {
                    Some(code) if code == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => {
                        Sent::Parked(format!("too_large: the stream refused it: {e}"))
                    }
                    Some(_) if rows[i].attempts + 1 >= MAX_REFUSALS => {
                        Sent::Parked(format!("refused: JetStream refused it {MAX_REFUSALS} times: {e}"))
                    }
                    _ => Sent::Failed(e.to_string()),
                },
                Err(_) => Sent::Failed("JetStream did not ack in time".to_owned()),
            };
        }
        sent
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
        let (depth, parked): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where parked_at is null), count(*) filter (where parked_at is not null)
             from outbox where published_at is null",
        )
        .fetch_one(&self.pool)
        .await?;
        crate::metrics::outbox_rows(depth, parked);
        Ok(())
    }
}

/// The code of a JetStream API error (the server answered, and refused), if it was one;
/// `None` for timeouts, lost connections and the like.
fn refusal(error: &jetstream::context::PublishError) -> Option<ErrorCode> {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code)
}
