//! The statements [`super::apply`] runs inside the batch's transaction: placeholder
//! rows (with their account and chat) for messages the relay never saw, locking the
//! updated messages in id order, writing the changed rows back in one statement, keeping
//! chat previews in step with edits and deletions, and lowering unread counts after read
//! receipts.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Postgres, Transaction};

use super::MessageUpdate;
use crate::store::messages::NewMessage;
use crate::store::views::{CHAT_COLUMNS, ChatRecord, MESSAGE_COLUMNS, MessageRow};

/// The user read incoming messages elsewhere (on their phone, say): per chat, what is
/// still unread is at most the incoming messages after the newest one read that are
/// neither read nor deleted. Never raises a count (Unipile's own, adopted by a backfill,
/// may hold messages the relay does not). One statement for every chat of the batch
/// (already locked, by the batch's chat locks); returns the chats whose count went down.
pub(super) async fn lower_unread(
    tx: &mut Transaction<'_, Postgres>,
    reads: &BTreeMap<String, (DateTime<Utc>, usize)>,
) -> Result<Vec<ChatRecord>, sqlx::Error> {
    if reads.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(&format!(
        "update chats c set unread_count = later.unread, updated_at = now()
         from (select r.chat_id,
                      (select count(*) from messages m
                       where m.chat_id = r.chat_id and not m.is_sender and not m.seen
                         and m.deleted_at is null and m.sent_at > r.read_at) as unread
               from unnest($1::text[], $2::timestamptz[]) as r(chat_id, read_at)) later
         where c.id = later.chat_id and c.unread_count > later.unread
         returning {CHAT_COLUMNS}"
    ))
    .bind(reads.keys().map(String::as_str).collect::<Vec<_>>())
    .bind(reads.values().map(|(read_at, _)| *read_at).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await
}

/// Makes sure every updated message has a row: the unknown ones get a placeholder (and
/// their account and chat, when those are unknown too).
pub(super) async fn insert_placeholders(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[&MessageUpdate],
) -> Result<(), sqlx::Error> {
    let mut by_id: BTreeMap<&str, &NewMessage> = BTreeMap::new();
    for u in updates {
        by_id.entry(u.message.message_id.as_str()).or_insert(&u.message);
    }
    let ids: Vec<&str> = by_id.keys().copied().collect();
    let known: HashSet<String> = sqlx::query_scalar("select id from messages where id = any($1)")
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
    let unknown: Vec<&str> = ids.into_iter().filter(|id| !known.contains(*id)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let messages: Vec<&NewMessage> = unknown.iter().map(|id| by_id[id]).collect();

    let accounts: BTreeMap<&str, Option<&str>> =
        messages.iter().map(|m| (m.account_id.as_str(), m.account_type.as_deref())).collect();
    let (account_ids, account_types): (Vec<&str>, Vec<Option<&str>>) = accounts.into_iter().unzip();
    sqlx::query(
        "insert into accounts (id, account_type)
         select * from unnest($1::text[], $2::text[])
         on conflict (id) do nothing",
    )
    .bind(account_ids)
    .bind(account_types)
    .execute(&mut **tx)
    .await?;

    let mut chats: BTreeMap<&str, &NewMessage> = BTreeMap::new();
    for m in &messages {
        chats.entry(m.chat_id.as_str()).or_insert(m);
    }
    let chat_values = chats.values();
    sqlx::query(
        "insert into chats (id, account_id, account_type, provider_chat_id, name, is_group)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
         on conflict (id) do nothing",
    )
    .bind(chats.keys().copied().collect::<Vec<&str>>())
    .bind(chat_values.clone().map(|m| m.account_id.as_str()).collect::<Vec<_>>())
    .bind(chat_values.clone().map(|m| m.account_type.as_deref()).collect::<Vec<_>>())
    .bind(chat_values.clone().map(|m| m.provider_chat_id.as_deref()).collect::<Vec<_>>())
    .bind(chat_values.clone().map(|m| m.chat_name.as_deref()).collect::<Vec<_>>())
    .bind(chat_values.map(|m| m.is_group).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;

    // `do nothing`: a message_received committed meanwhile by another batch wins.
    sqlx::query(
        "insert into messages
             (id, chat_id, account_id, provider_message_id, text, sender, is_sender, sent_at, placeholder)
         select id, chat_id, account_id, provider_message_id, text, sender::jsonb, is_sender, sent_at, true
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[],
                     $8::timestamptz[])
              as t(id, chat_id, account_id, provider_message_id, text, sender, is_sender, sent_at)
         on conflict (id) do nothing",
    )
    .bind(&unknown)
    .bind(messages.iter().map(|m| m.chat_id.as_str()).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| m.account_id.as_str()).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| m.provider_message_id.as_deref()).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| m.text.as_deref()).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| json!(m.sender).to_string()).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| m.is_sender).collect::<Vec<_>>())
    .bind(messages.iter().map(|m| m.sent_at).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Locks the updated messages in id order and reads them.
pub(super) async fn lock_messages(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[&MessageUpdate],
) -> Result<HashMap<String, MessageRow>, sqlx::Error> {
    let ids: Vec<&str> = updates.iter().map(|u| u.message.message_id.as_str()).collect();
    let rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "select {MESSAGE_COLUMNS} from messages m join chats c on c.id = m.chat_id
         where m.id = any($1) order by m.id for update of m"
    ))
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// Writes the changed rows back (already locked, so one statement in any order).
pub(super) async fn write_back(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&MessageRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "update messages m set
             seen = u.seen, seen_at = u.seen_at, delivered_at = u.delivered_at,
             reactions = u.reactions::jsonb, text = u.text, edited_at = u.edited_at,
             deleted_at = u.deleted_at, updated_at = now()
         from unnest($1::text[], $2::bool[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[])
              as u(id, seen, seen_at, delivered_at, reactions, text, edited_at, deleted_at)
         where m.id = u.id",
    )
    .bind(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.seen).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.seen_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.delivered_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.reactions.0.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.text.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.edited_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.deleted_at).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Keeps a chat's preview in step when its newest message was edited or deleted.
pub(super) async fn update_previews(
    tx: &mut Transaction<'_, Postgres>,
    previews: &BTreeMap<(String, String), Option<String>>,
) -> Result<(), sqlx::Error> {
    if previews.is_empty() {
        return Ok(());
    }
    let chat_ids: Vec<&str> = previews.keys().map(|(c, _)| c.as_str()).collect();
    let message_ids: Vec<&str> = previews.keys().map(|(_, m)| m.as_str()).collect();
    // Chats in id order first, as the message insert locks them.
    sqlx::query(
        "select 1 from chats where id = any($1) and last_message_id = any($2) order by id for update",
    )
    .bind(&chat_ids)
    .bind(&message_ids)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "update chats c set last_message_preview = u.preview, updated_at = now()
         from unnest($1::text[], $2::text[], $3::text[]) as u(chat_id, message_id, preview)
         where c.id = u.chat_id and c.last_message_id = u.message_id",
    )
    .bind(&chat_ids)
    .bind(&message_ids)
    .bind(previews.values().map(|p| p.as_deref()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
