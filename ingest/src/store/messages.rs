//! Saving new messages in bulk: accounts, chats, messages, unread counts and events.
//!
//! [`insert`] runs inside the caller's transaction and writes any number of messages
//! with a fixed number of statements (arrays bound through `unnest`). Rows are touched
//! in id order so that concurrent writers (other batches, other replicas) lock them in
//! the same order and do not deadlock each other.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::payload::{Attendee, MessagingEvent};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use shared::envelope::{ChatView, Envelope, EventType, MessageView, SenderView};
use sqlx::{Postgres, Transaction};

use super::{Outcome, Written, events};

/// How long a chat's last-message preview may be, in characters.
pub(crate) const PREVIEW_CHARS: usize = 160;

/// A message to store, normalised from a webhook or from the history API.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub account_id: String,
    pub account_type: Option<String>,
    pub chat_id: String,
    pub provider_chat_id: Option<String>,
    /// The chat's display name when the chat is new (group subject or the other person).
    pub chat_name: Option<String>,
    pub is_group: bool,
    pub message_id: String,
    pub provider_message_id: Option<String>,
    pub text: Option<String>,
    pub sender: SenderView,
    pub is_sender: bool,
    pub sent_at: DateTime<Utc>,
    pub attachments: Vec<Value>,
    pub quoted: Option<Value>,
    /// The payload as received, kept for audits and re-processing.
    pub raw: Option<Value>,
    /// `true` for a webhook: counts as unread and emits `message:new`. `false` for
    /// history from a backfill: stored quietly, unread counts left to the backfill.
    pub live: bool,
}

impl NewMessage {
    /// Normalises a `message_received` delivery.
    pub fn from_webhook(event: &MessagingEvent, raw: Value, received_at: DateTime<Utc>) -> Self {
        let chat_name = if event.is_group { event.subject.clone() } else { None }
            .or_else(|| event.attendees.iter().find_map(|a| a.attendee_name.clone()))
            .or_else(|| {
                (!event.is_sender)
                    .then(|| event.sender.as_ref().and_then(|s| s.attendee_name.clone()))
                    .flatten()
            });
        Self {
            account_id: event.account_id.clone(),
            account_type: event.account_type.clone(),
            chat_id: event.chat_id.clone(),
            provider_chat_id: event.provider_chat_id.clone(),
            chat_name,
            is_group: event.is_group,
            message_id: event.message_id.clone(),
            provider_message_id: event.provider_message_id.clone(),
            text: event.message.clone(),
            sender: event.sender.as_ref().map(sender_view).unwrap_or_default(),
            is_sender: event.is_sender,
            sent_at: event.timestamp.unwrap_or(received_at),
            attachments: event.attachments.clone(),
            quoted: event.quoted.clone().filter(|q| !q.is_null()),
            raw: Some(raw),
            live: true,
        }
    }

    /// The message as events and the REST API show it.
    pub fn view(&self) -> MessageView {
        MessageView {
            id: self.message_id.clone(),
            chat_id: self.chat_id.clone(),
            account_id: self.account_id.clone(),
            account_type: self.account_type.clone(),
            text: self.text.clone(),
            sender: self.sender.clone(),
            is_sender: self.is_sender,
            timestamp: self.sent_at,
            attachments: self.attachments.clone(),
            quoted: self.quoted.clone(),
        }
    }

    fn preview(&self) -> Option<String> {
        match &self.text {
            Some(text) if !text.trim().is_empty() => Some(text.chars().take(PREVIEW_CHARS).collect()),
            _ if !self.attachments.is_empty() => Some("[attachment]".to_owned()),
            _ => None,
        }
    }
}

/// How a sender or attendee is shown.
pub fn sender_view(a: &Attendee) -> SenderView {
    SenderView {
        id: a.attendee_id.clone(),
        name: a.attendee_name.clone(),
        provider_id: a.attendee_provider_id.clone(),
        profile_url: a.attendee_profile_url.clone(),
    }
}

/// Stores `messages` in the caller's transaction; returns one result per message, in order.
///
/// A message id seen before (in the database or earlier in the same slice) is a
/// duplicate and changes nothing, unless it is a placeholder an update created before
/// the message came (see [`super::updates`]): that one is filled in and counts as new.
pub async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[&NewMessage],
) -> Result<Vec<Written>, sqlx::Error> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    upsert_accounts(tx, messages).await?;
    upsert_chats(tx, messages).await?;
    let new_rows = insert_rows(tx, messages).await?;

    // The first occurrence of a new id is the one that was stored.
    let mut claimed = HashSet::new();
    let stored: Vec<bool> = messages
        .iter()
        .map(|m| new_rows.contains_key(&m.message_id) && claimed.insert(m.message_id.as_str()))
        .collect();
    // Unread: a live incoming message, unless a receipt that came before it says the
    // user already read it elsewhere.
    let unread: Vec<bool> = messages
        .iter()
        .zip(&stored)
        .map(|(m, &is_new)| is_new && m.live && !m.is_sender && !new_rows[&m.message_id].seen)
        .collect();
    let chats = bump_chats(tx, messages, &stored, &unread).await?;

    // Unread count after each message: the chat's final count minus the unread
    // messages of this batch that come after it.
    let mut unread_after: HashMap<&str, i64> =
        chats.iter().map(|(id, c)| (id.as_str(), c.unread_count)).collect();
    let mut results: Vec<Written> = Vec::with_capacity(messages.len());
    for ((m, &is_new), &is_unread) in messages.iter().zip(&stored).zip(&unread).rev() {
        let outcome = if is_new { Outcome::Accepted } else { Outcome::Duplicate };
        let event = (is_new && m.live).then(|| {
            let chat = &chats[&m.chat_id];
            let unread = unread_after.get_mut(m.chat_id.as_str()).expect("every stored chat was bumped");
            let view = ChatView {
                id: m.chat_id.clone(),
                unread_count: *unread,
                last_message_at: chat.last_message_at,
            };
            if is_unread {
                *unread -= 1;
            }
            Envelope::new(
                EventType::MessageNew,
                m.account_id.clone(),
                Some(m.chat_id.clone()),
                m.sent_at,
                events::MessageNew {
                    message: MessageView { text: new_rows[&m.message_id].text.clone(), ..m.view() },
                    chat: view,
                },
            )
        });
        results.push(Written { outcome, events: event.into_iter().collect() });
    }
    results.reverse();
    Ok(results)
}

async fn upsert_accounts(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[&NewMessage],
) -> Result<(), sqlx::Error> {
    let accounts: BTreeMap<&str, Option<&str>> =
        messages.iter().map(|m| (m.account_id.as_str(), m.account_type.as_deref())).collect();
    let (ids, types): (Vec<&str>, Vec<Option<&str>>) = accounts.into_iter().unzip();
    // `do nothing` takes no row lock, so concurrent batches of one account never queue here.
    sqlx::query(
        "insert into accounts (id, account_type)
         select * from unnest($1::text[], $2::text[])
         on conflict (id) do nothing",
    )
    .bind(ids)
    .bind(types)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_chats(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[&NewMessage],
) -> Result<(), sqlx::Error> {
    let mut chats: BTreeMap<&str, &NewMessage> = BTreeMap::new();
    for m in messages {
        chats.entry(m.chat_id.as_str()).or_insert(m);
    }
    let ids: Vec<&str> = chats.keys().copied().collect();
    let accounts: Vec<&str> = chats.values().map(|m| m.account_id.as_str()).collect();
    let types: Vec<Option<&str>> = chats.values().map(|m| m.account_type.as_deref()).collect();
    let provider_ids: Vec<Option<&str>> = chats.values().map(|m| m.provider_chat_id.as_deref()).collect();
    let names: Vec<Option<&str>> = chats.values().map(|m| m.chat_name.as_deref()).collect();
    let groups: Vec<bool> = chats.values().map(|m| m.is_group).collect();
    sqlx::query(
        "insert into chats (id, account_id, account_type, provider_chat_id, name, is_group)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
         on conflict (id) do nothing",
    )
    .bind(ids)
    .bind(accounts)
    .bind(types)
    .bind(provider_ids)
    .bind(names)
    .bind(groups)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A message row as the insert left it.
#[derive(Debug, sqlx::FromRow)]
struct StoredRow {
    id: String,
    /// A placeholder keeps the text of an edit that came first.
    text: Option<String>,
    /// A placeholder keeps a read receipt that came first.
    seen: bool,
}

/// Inserts the rows in id order, filling in placeholders; returns the rows that were
/// new, by id.
async fn insert_rows(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[&NewMessage],
) -> Result<HashMap<String, StoredRow>, sqlx::Error> {
    let mut sorted: Vec<&NewMessage> = messages.to_vec();
    sorted.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    // `do update` may not touch a row twice in one statement: the first of an id only.
    sorted.dedup_by(|later, first| later.message_id == first.message_id);
    let json_text = |v: &Value| v.to_string();
    let ids: Vec<&str> = sorted.iter().map(|m| m.message_id.as_str()).collect();
    let chats: Vec<&str> = sorted.iter().map(|m| m.chat_id.as_str()).collect();
    let accounts: Vec<&str> = sorted.iter().map(|m| m.account_id.as_str()).collect();
    let provider_ids: Vec<Option<&str>> = sorted.iter().map(|m| m.provider_message_id.as_deref()).collect();
    let texts: Vec<Option<&str>> = sorted.iter().map(|m| m.text.as_deref()).collect();
    let senders: Vec<String> = sorted.iter().map(|m| json_text(&json!(m.sender))).collect();
    let is_sender: Vec<bool> = sorted.iter().map(|m| m.is_sender).collect();
    let sent_at: Vec<DateTime<Utc>> = sorted.iter().map(|m| m.sent_at).collect();
    let attachments: Vec<String> =
        sorted.iter().map(|m| json_text(&Value::from(m.attachments.clone()))).collect();
    let quoted: Vec<Option<String>> = sorted.iter().map(|m| m.quoted.as_ref().map(json_text)).collect();
    let raw: Vec<Option<String>> = sorted.iter().map(|m| m.raw.as_ref().map(json_text)).collect();
    let new_rows: Vec<StoredRow> = sqlx::query_as(
        "insert into messages
             (id, chat_id, account_id, provider_message_id, text, sender, is_sender, sent_at,
              attachments, quoted, raw)
         select id, chat_id, account_id, provider_message_id, text, sender::jsonb, is_sender,
                sent_at, attachments::jsonb, quoted::jsonb, raw::jsonb
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::bool[], $8::timestamptz[], $9::text[], $10::text[], $11::text[])
              as t(id, chat_id, account_id, provider_message_id, text, sender, is_sender,
                   sent_at, attachments, quoted, raw)
         on conflict (id) do update set
             provider_message_id = excluded.provider_message_id,
             text = case when messages.edited_at is null then excluded.text else messages.text end,
             sender = excluded.sender, is_sender = excluded.is_sender, sent_at = excluded.sent_at,
             attachments = excluded.attachments, quoted = excluded.quoted, raw = excluded.raw,
             placeholder = false, updated_at = now()
         -- Only a placeholder (an update that came first) is filled in; a message deleted
         -- before it arrived stays a hidden tombstone.
         where messages.placeholder and messages.deleted_at is null
         returning id, text, seen",
    )
    .bind(ids)
    .bind(chats)
    .bind(accounts)
    .bind(provider_ids)
    .bind(texts)
    .bind(senders)
    .bind(is_sender)
    .bind(sent_at)
    .bind(attachments)
    .bind(quoted)
    .bind(raw)
    .fetch_all(&mut **tx)
    .await?;
    Ok(new_rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// A chat's state after the batch.
#[derive(Debug, sqlx::FromRow)]
struct ChatState {
    id: String,
    unread_count: i64,
    last_message_at: Option<DateTime<Utc>>,
}

/// Moves last activity forward and adds the `unread` messages to the unread count.
async fn bump_chats(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[&NewMessage],
    stored: &[bool],
    unread: &[bool],
) -> Result<HashMap<String, ChatState>, sqlx::Error> {
    struct Bump<'a> {
        delta: i64,
        latest: &'a NewMessage,
    }
    let mut bumps: BTreeMap<&str, Bump> = BTreeMap::new();
    for ((m, _), &is_unread) in messages.iter().zip(stored).zip(unread).filter(|((_, s), _)| **s) {
        let bump = bumps.entry(m.chat_id.as_str()).or_insert(Bump { delta: 0, latest: m });
        if is_unread {
            bump.delta += 1;
        }
        if (m.sent_at, &m.message_id) > (bump.latest.sent_at, &bump.latest.message_id) {
            bump.latest = m;
        }
    }
    if bumps.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = bumps.keys().copied().collect();
    // Lock in id order first: an `update .. from unnest` locks in whatever order its
    // plan visits rows, which two concurrent batches may not share.
    sqlx::query("select 1 from chats where id = any($1) order by id for update")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    let deltas: Vec<i64> = bumps.values().map(|b| b.delta).collect();
    let last_at: Vec<DateTime<Utc>> = bumps.values().map(|b| b.latest.sent_at).collect();
    let last_ids: Vec<&str> = bumps.values().map(|b| b.latest.message_id.as_str()).collect();
    let previews: Vec<Option<String>> = bumps.values().map(|b| b.latest.preview()).collect();
    let rows: Vec<ChatState> = sqlx::query_as(
        "update chats c set
             unread_count = c.unread_count + u.delta,
             last_message_at = greatest(c.last_message_at, u.last_at),
             last_message_id = case when c.last_message_at is null or u.last_at >= c.last_message_at
                                    then u.last_id else c.last_message_id end,
             last_message_preview = case when c.last_message_at is null or u.last_at >= c.last_message_at
                                         then u.preview else c.last_message_preview end,
             updated_at = now()
         from unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[])
              as u(id, delta, last_at, last_id, preview)
         where c.id = u.id
         returning c.id, c.unread_count, c.last_message_at",
    )
    .bind(&ids)
    .bind(deltas)
    .bind(last_at)
    .bind(last_ids)
    .bind(previews)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|c| (c.id.clone(), c)).collect())
}
