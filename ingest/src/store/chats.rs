//! Marking chats read from the REST API.
//!
//! The unread count goes to 0 and a `chat:read` event carries the chat to the user's
//! other tabs. A chat that has nothing unread changes nothing (`duplicate`, no event).

use chrono::Utc;
use shared::envelope::{Envelope, EventType};
use sqlx::{Postgres, Transaction};

use super::views::{CHAT_COLUMNS, ChatRecord};
use super::{Outcome, Written, events};

/// A chat to mark read (its scope is checked by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct MarkRead {
    pub chat_id: String,
}

/// Marks `reads` in the caller's transaction, chats in id order; one result per read.
pub async fn mark_read(
    tx: &mut Transaction<'_, Postgres>,
    reads: &[&MarkRead],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut order: Vec<usize> = (0..reads.len()).collect();
    order.sort_by(|&a, &b| reads[a].chat_id.cmp(&reads[b].chat_id));
    let mut results: Vec<Option<Written>> = (0..reads.len()).map(|_| None).collect();
    for i in order {
        let chat: Option<ChatRecord> = sqlx::query_as(&format!(
            "update chats c set unread_count = 0, updated_at = now()
             where c.id = $1 and c.unread_count > 0
             returning {CHAT_COLUMNS}"
        ))
        .bind(&reads[i].chat_id)
        .fetch_optional(&mut **tx)
        .await?;
        results[i] = Some(match chat {
            Some(chat) => Written { outcome: Outcome::Accepted, events: vec![chat_read(chat)] },
            None => Written { outcome: Outcome::Duplicate, events: Vec::new() },
        });
    }
    Ok(results.into_iter().map(|r| r.expect("every read was applied")).collect())
}

/// The `chat:read` event: the chat with its new unread count, for the user's tabs.
pub fn chat_read(chat: ChatRecord) -> Envelope {
    Envelope::new(
        EventType::ChatRead,
        chat.account_id.clone(),
        Some(chat.id.clone()),
        Utc::now(),
        events::ChatRead { chat },
    )
}
