//! Replies sent through the relay, and their echo.
//!
//! A reply lives as a message row (`is_sender`) with a `state`. Its life, each step one
//! write of a batch (so it takes the chat's lock like every webhook of that chat):
//!
//! 1. [`create`]: the idempotency key is claimed (`replies`, `on conflict do nothing`);
//!    only the first claim stores the row, under a relay-made id (`rl_...`), `pending`,
//!    and emits `message:new` with `state` and `client_id`. A repeated key stores nothing
//!    (`duplicate`).
//! 2. [`finish`]: Unipile's answer. `sent` with Unipile's message id: the row takes that
//!    id, so the echo webhook later finds it and adds nothing. If the echo came first
//!    (a row with that id exists), the two are merged into the echo's row. `sent` with no
//!    id (Unipile may answer `message_id: null`): the row keeps the relay id and waits for
//!    its echo, matched by chat and text ([`claim_echoes`]). `failed`: with the reason.
//!    Every change emits `message:status`, which carries the relay id, the `client_id`
//!    and the final id, so clients replace the pending bubble.
//! 3. [`claim_echoes`], in the webhook path before the insert: an echo (`is_sender`,
//!    live) of a reply that was sent without an id takes the oldest such reply of its
//!    chat with the same text, sent within [`ECHO_WINDOW_MINUTES`]: that row takes the
//!    echo's id and the insert finds it (no second row, no `message:new`).
//!
//! Whatever the order, one row per reply and one bubble on every page.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use shared::envelope::{Envelope, EventType, SenderView};
use sqlx::{Postgres, Transaction};

use super::events::MessageStatus;
use super::messages::{self, NewMessage};
use super::views::{MESSAGE_COLUMNS, MessageRecord, MessageRow};
use super::{Outcome, Written};

/// How long after a reply was sent without an id its echo may still be matched by text.
pub const ECHO_WINDOW_MINUTES: i32 = 10;

/// A reply to store before it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReply {
    /// The row's id until Unipile gives its own: `rl_` and a UUID.
    pub relay_id: String,
    /// The idempotency key, unique per account.
    pub client_id: String,
    pub account_id: String,
    pub account_type: Option<String>,
    pub chat_id: String,
    pub text: String,
    /// What the page shows of files sent with it (`{"name", "size", "mimetype"}`).
    pub attachments: Vec<Value>,
    pub at: DateTime<Utc>,
}

impl NewReply {
    /// A fresh relay id.
    pub fn relay_id() -> String {
        format!("rl_{}", uuid::Uuid::now_v7().simple())
    }
}

/// What Unipile made of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// 201; Unipile's `message_id` when it gave one.
    Sent { message_id: Option<String> },
    /// Refused, failed or timed out; nothing is retried upstream.
    Failed { reason: String },
}

/// Unipile's answer for the reply stored under `relay_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyDone {
    pub relay_id: String,
    pub chat_id: String,
    pub result: Sent,
}

/// Stores each reply whose key is new, `pending`, with its `message:new`.
pub async fn create(
    tx: &mut Transaction<'_, Postgres>,
    replies: &[&NewReply],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut results = Vec::with_capacity(replies.len());
    for reply in replies {
        let claimed: Option<String> = sqlx::query_scalar(
            "insert into replies (account_id, client_id, relay_id, chat_id, text)
             values ($1, $2, $3, $4, $5)
             on conflict (account_id, client_id) do nothing
             returning relay_id",
        )
        .bind(&reply.account_id)
        .bind(&reply.client_id)
        .bind(&reply.relay_id)
        .bind(&reply.chat_id)
        .bind(&reply.text)
        .fetch_optional(&mut **tx)
        .await?;
        if claimed.is_none() {
            results.push(Written { outcome: Outcome::Duplicate, events: Vec::new() });
            continue;
        }
        let message = NewMessage {
            account_id: reply.account_id.clone(),
            account_type: reply.account_type.clone(),
            chat_id: reply.chat_id.clone(),
            provider_chat_id: None,
            chat_name: None,
            is_group: false,
            message_id: reply.relay_id.clone(),
            provider_message_id: None,
            text: Some(reply.text.clone()),
            sender: SenderView::default(),
            is_sender: true,
            sent_at: reply.at,
            attachments: reply.attachments.clone(),
            quoted: None,
            raw: None,
            live: true,
        };
        let mut written = messages::insert(tx, &[&message]).await?.pop().expect("one result per message");
        sqlx::query("update messages set state = 'pending', client_id = $2, relay_id = $1 where id = $1")
            .bind(&reply.relay_id)
            .bind(&reply.client_id)
            .execute(&mut **tx)
            .await?;
        for event in &mut written.events {
            if let Some(message) = event.data.get_mut("message").and_then(Value::as_object_mut) {
                message.insert("state".into(), "pending".into());
                message.insert("client_id".into(), reply.client_id.clone().into());
                message.insert("relay_id".into(), reply.relay_id.clone().into());
            }
        }
        results.push(written);
    }
    Ok(results)
}

/// The reply row as `finish` needs it.
#[derive(Debug, sqlx::FromRow)]
struct Pending {
    id: String,
    state: Option<String>,
    text: Option<String>,
    created_at: DateTime<Utc>,
}

/// A row the reply may merge into: the echo, or a placeholder an update made.
#[derive(Debug, sqlx::FromRow)]
struct Other {
    id: String,
    placeholder: bool,
    relay_id: Option<String>,
}

/// Records Unipile's answer for each reply still `pending`; a reply already finished
/// changes nothing (`duplicate`).
pub async fn finish(
    tx: &mut Transaction<'_, Postgres>,
    done: &[&ReplyDone],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut results = Vec::with_capacity(done.len());
    for reply in done {
        let row: Option<Pending> =
            sqlx::query_as("select id, state, text, created_at from messages where relay_id = $1 for update")
                .bind(&reply.relay_id)
                .fetch_optional(&mut **tx)
                .await?;
        let Some(row) = row.filter(|r| r.state.as_deref() == Some("pending")) else {
            results.push(Written { outcome: Outcome::Duplicate, events: Vec::new() });
            continue;
        };
        match &reply.result {
            Sent::Failed { reason } => {
                sqlx::query(
                    "update messages set state = 'failed', failure_reason = $2, updated_at = now()
                     where relay_id = $1",
                )
                .bind(&reply.relay_id)
                .bind(reason)
                .execute(&mut **tx)
                .await?;
            }
            Sent::Sent { message_id } => {
                let other: Option<Other> = match message_id {
                    Some(id) if *id != row.id => {
                        sqlx::query_as(
                            "select id, placeholder, relay_id from messages where id = $1 for update",
                        )
                        .bind(id)
                        .fetch_optional(&mut **tx)
                        .await?
                    }
                    Some(_) => None,
                    // No id: the echo, if it came already, is matched by chat and text.
                    None => {
                        sqlx::query_as(
                            "select id, placeholder, relay_id from messages
                             where chat_id = $1 and is_sender and relay_id is null and not placeholder
                               and text is not distinct from $2 and created_at >= $3
                               and created_at < $3 + make_interval(mins => $4)
                             order by created_at, id limit 1 for update",
                        )
                        .bind(&reply.chat_id)
                        .bind(&row.text)
                        .bind(row.created_at)
                        .bind(ECHO_WINDOW_MINUTES)
                        .fetch_optional(&mut **tx)
                        .await?
                    }
                };
                match (other, message_id) {
                    // The echo came first: keep its row (clients have it), drop ours.
                    (Some(echo), _) if !echo.placeholder && echo.relay_id.is_none() => {
                        merge_into_echo(tx, &reply.relay_id, &row.id, &echo.id, &reply.chat_id).await?;
                    }
                    // An update (read receipt, reaction) overtook the answer and made a
                    // placeholder: our row takes the id and what the placeholder holds.
                    (Some(placeholder), Some(id)) if placeholder.placeholder => {
                        sqlx::query(
                            "with gone as (delete from messages where id = $2 and placeholder
                                           returning seen, seen_at, delivered_at, reactions, edited_at, deleted_at)
                             update messages m set id = $2, state = 'sent', updated_at = now(),
                                 seen = g.seen, seen_at = g.seen_at, delivered_at = g.delivered_at,
                                 reactions = g.reactions,
                                 edited_at = g.edited_at, deleted_at = g.deleted_at
                             from gone g where m.relay_id = $1",
                        )
                        .bind(&reply.relay_id)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                        rename_in_chat(tx, &reply.chat_id, &row.id, id).await?;
                    }
                    // Another reply holds that id already (cannot happen with Unipile's
                    // unique ids): ours is sent and keeps its relay id.
                    (Some(_), _) | (None, None) => {
                        mark_sent(tx, &reply.relay_id).await?;
                    }
                    (None, Some(id)) => {
                        sqlx::query(
                            "update messages set id = $2, state = 'sent', updated_at = now()
                             where relay_id = $1",
                        )
                        .bind(&reply.relay_id)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                        rename_in_chat(tx, &reply.chat_id, &row.id, id).await?;
                    }
                }
            }
        }
        let record = read(&mut **tx, &reply.relay_id).await?.expect("the reply's row is still there");
        results.push(Written { outcome: Outcome::Accepted, events: vec![status_event(record)] });
    }
    Ok(results)
}

/// The reply as it is stored now, by its relay id.
pub async fn read<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    relay_id: &str,
) -> Result<Option<MessageRecord>, sqlx::Error> {
    let row: Option<MessageRow> = sqlx::query_as(&format!(
        "select {MESSAGE_COLUMNS} from messages m join chats c on c.id = m.chat_id where m.relay_id = $1"
    ))
    .bind(relay_id)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|r| r.record()))
}

async fn mark_sent(tx: &mut Transaction<'_, Postgres>, relay_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("update messages set state = 'sent', updated_at = now() where relay_id = $1")
        .bind(relay_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Drops the reply's own row and makes the echo's row the reply.
async fn merge_into_echo(
    tx: &mut Transaction<'_, Postgres>,
    relay_id: &str,
    own_id: &str,
    echo_id: &str,
    chat_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "with gone as (delete from messages where relay_id = $1 returning client_id)
         update messages m set state = 'sent', relay_id = $1, client_id = g.client_id, updated_at = now()
         from gone g where m.id = $2",
    )
    .bind(relay_id)
    .bind(echo_id)
    .execute(&mut **tx)
    .await?;
    rename_in_chat(tx, chat_id, own_id, echo_id).await
}

/// The chat's last message id follows a reply that changed id.
async fn rename_in_chat(
    tx: &mut Transaction<'_, Postgres>,
    chat_id: &str,
    from: &str,
    to: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("update chats set last_message_id = $3 where id = $1 and last_message_id = $2")
        .bind(chat_id)
        .bind(from)
        .bind(to)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `message:status` for a reply as it now stands.
pub fn status_event(record: MessageRecord) -> Envelope {
    Envelope::new(
        EventType::MessageStatus,
        record.account_id.clone(),
        Some(record.chat_id.clone()),
        Utc::now(),
        MessageStatus {
            message_id: record.id.clone(),
            relay_id: record.relay_id.clone().unwrap_or_else(|| record.id.clone()),
            client_id: record.client_id.clone(),
            state: record.state,
            failure_reason: record.failure_reason.clone(),
            message: record,
        },
    )
}

/// A candidate reply for an echo: sent without an id, still under its relay id.
#[derive(Debug, sqlx::FromRow)]
struct Awaiting {
    relay_id: String,
    chat_id: String,
    text: Option<String>,
}

/// Gives the echoes among `new` (live `is_sender` messages not stored yet) to the replies
/// that were sent without an id and wait for them (same chat, same text, oldest first):
/// such a reply's row takes the echo's id, so the insert that follows finds it. Returns,
/// by index into `new`, the `message:status` of each claimed reply.
pub async fn claim_echoes(
    tx: &mut Transaction<'_, Postgres>,
    new: &[&NewMessage],
) -> Result<HashMap<usize, Envelope>, sqlx::Error> {
    let echoes: Vec<usize> = (0..new.len()).filter(|&i| new[i].live && new[i].is_sender).collect();
    if echoes.is_empty() {
        return Ok(HashMap::new());
    }
    let chats: Vec<&str> = echoes.iter().map(|&i| new[i].chat_id.as_str()).collect();
    let mut waiting: Vec<Awaiting> = sqlx::query_as(
        "select relay_id, chat_id, text from messages
         where chat_id = any($1) and relay_id is not null and id = relay_id and state = 'sent'
           and created_at > now() - make_interval(mins => $2)
         order by created_at, relay_id",
    )
    .bind(&chats)
    .bind(ECHO_WINDOW_MINUTES)
    .fetch_all(&mut **tx)
    .await?;
    if waiting.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = echoes.iter().map(|&i| new[i].message_id.as_str()).collect();
    let known: HashSet<String> = sqlx::query_scalar("select id from messages where id = any($1)")
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
    let mut claimed = HashMap::new();
    let mut seen = HashSet::new();
    for i in echoes {
        let echo = new[i];
        if known.contains(&echo.message_id) || !seen.insert(echo.message_id.as_str()) {
            continue;
        }
        let Some(at) = waiting.iter().position(|w| w.chat_id == echo.chat_id && w.text == echo.text) else {
            continue;
        };
        let reply = waiting.remove(at);
        sqlx::query(
            "update messages set id = $2, provider_message_id = $3, raw = $4::jsonb, updated_at = now()
             where relay_id = $1",
        )
        .bind(&reply.relay_id)
        .bind(&echo.message_id)
        .bind(&echo.provider_message_id)
        .bind(echo.raw.as_ref().map(|r| r.to_string()))
        .execute(&mut **tx)
        .await?;
        rename_in_chat(tx, &echo.chat_id, &reply.relay_id, &echo.message_id).await?;
        if let Some(record) = read(&mut **tx, &reply.relay_id).await? {
            claimed.insert(i, status_event(record));
        }
    }
    Ok(claimed)
}

/// Replies `pending` for longer than `older_than`: their sender died before Unipile
/// answered. Each is finished as failed (`interrupted`) through `batcher`, so it takes
/// the chat's lock and its `message:status` goes out; one a live request finishes first
/// stays as that request left it. Returns how many were marked.
pub async fn fail_interrupted(
    db: &sqlx::PgPool,
    batcher: &super::Batcher,
    older_than: std::time::Duration,
) -> Result<usize, super::StoreError> {
    let stale: Vec<(String, String)> = sqlx::query_as(
        "select relay_id, chat_id from messages
         where state = 'pending' and created_at < now() - make_interval(secs => $1)
         order by created_at limit 100",
    )
    .bind(older_than.as_secs_f64())
    .fetch_all(db)
    .await?;
    let mut marked = 0;
    for (relay_id, chat_id) in stale {
        let reason =
            "interrupted: the relay stopped before Unipile answered; it may or may not have been sent";
        let done = ReplyDone { relay_id, chat_id, result: Sent::Failed { reason: reason.to_owned() } };
        if batcher.submit(super::Write::ReplyDone(done)).await? == Outcome::Accepted {
            marked += 1;
        }
    }
    Ok(marked)
}
