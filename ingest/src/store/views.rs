//! Messages and chats as they are stored, and as the REST API and the update events show
//! them.
//!
//! `message:new` carries the lean [`shared::envelope::MessageView`] of a message that has
//! just arrived. Everything after that (read receipts, reactions, edits, deletions, and
//! every REST answer) shows the whole stored state: [`MessageRecord`] and [`ChatRecord`].
//! Both are read with the `select` lists below so that every query returns the same shape.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::envelope::{SenderView, millis};
use utoipa::ToSchema;

/// Who sent a message or reacted to it. The same fields as the `sender` of `message:new`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Person {
    /// Unipile's attendee id.
    pub id: Option<String>,
    pub name: Option<String>,
    /// The id on the provider (phone JID, LinkedIn URN, ...).
    pub provider_id: Option<String>,
    pub profile_url: Option<String>,
}

impl From<SenderView> for Person {
    fn from(s: SenderView) -> Self {
        Self { id: s.id, name: s.name, provider_id: s.provider_id, profile_url: s.profile_url }
    }
}

impl Person {
    /// What tells one reactor from another: the provider id, else the attendee id.
    pub fn key(&self) -> Option<&str> {
        self.provider_id.as_deref().or(self.id.as_deref())
    }
}

/// One person's reaction to a message. A person has at most one reaction per message:
/// a new one replaces theirs, an empty one removes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reaction {
    /// The emoji.
    pub value: String,
    /// The reactor's provider id (or attendee id), as in Unipile's message list.
    pub sender_id: Option<String>,
    pub sender: Person,
    /// When Unipile says the reaction happened; an older reaction never replaces a newer one.
    #[serde(with = "millis")]
    pub reacted_at: DateTime<Utc>,
}

/// A stored message with everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MessageRecord {
    pub id: String,
    pub chat_id: String,
    pub account_id: String,
    /// The provider: `WHATSAPP`, `LINKEDIN`, ...
    pub account_type: Option<String>,
    /// The current text: the last edit's if edited; `null` once deleted.
    pub text: Option<String>,
    pub sender: Person,
    /// Whether the account's owner sent it.
    pub is_sender: bool,
    /// When it was sent.
    #[serde(with = "millis")]
    pub timestamp: DateTime<Utc>,
    /// Unipile's attachment objects as sent; empty once deleted. In REST answers each
    /// one with an `id` also has a `signed_url` (path and query, valid a few minutes)
    /// that fetches the file without a token.
    #[schema(value_type = Vec<Object>)]
    pub attachments: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub quoted: Option<Value>,
    /// Whether a read receipt arrived for it.
    pub seen: bool,
    #[serde(with = "millis::option")]
    pub seen_at: Option<DateTime<Utc>>,
    #[serde(with = "millis::option")]
    pub delivered_at: Option<DateTime<Utc>>,
    pub reactions: Vec<Reaction>,
    pub edited: bool,
    #[serde(with = "millis::option")]
    pub edited_at: Option<DateTime<Utc>>,
    /// A deleted message stays as a tombstone: same id and place, no text.
    pub deleted: bool,
    #[serde(with = "millis::option")]
    pub deleted_at: Option<DateTime<Utc>>,
    /// `true` while the relay knows the message only from an update that overtook it
    /// (then `timestamp` is the update's and `sender` may be partial). Never listed by
    /// the REST API; only update events can carry one.
    pub placeholder: bool,
    /// Only on replies sent through the relay (`POST /api/chats/{chat_id}/messages`):
    /// `pending` while Unipile is asked, then `sent` or `failed`. Absent on other messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ReplyState>,
    /// A reply's idempotency key, as its sender gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The id the relay gave a reply before Unipile gave it its own (`rl_...`): the id of
    /// its first `message:new`. Equal to `id` until Unipile's id is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<String>,
    /// Why a `failed` reply failed (`rate_limited`, `timeout`, `unipile_error: ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

/// Where a reply sent through the relay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplyState {
    /// Stored; Unipile has not answered yet.
    Pending,
    /// Unipile took it (201).
    Sent,
    /// Unipile refused it, failed or did not answer in time; see `failure_reason`.
    Failed,
}

impl ReplyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Sent, Self::Failed].into_iter().find(|s| s.as_str() == text)
    }
}

/// The columns [`MessageRow`] reads; use as `select {MESSAGE_COLUMNS} from messages m join chats c ..`.
pub const MESSAGE_COLUMNS: &str = "m.id, m.chat_id, m.account_id, c.account_type, m.text, m.sender, m.is_sender, \
     m.sent_at, m.attachments, m.quoted, m.seen, m.seen_at, m.delivered_at, m.reactions, m.edited_at, \
     m.deleted_at, m.placeholder, m.state, m.client_id, m.relay_id, m.failure_reason";

/// A `messages` row (with its chat's `account_type`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: String,
    pub chat_id: String,
    pub account_id: String,
    pub account_type: Option<String>,
    pub text: Option<String>,
    pub sender: sqlx::types::Json<Value>,
    pub is_sender: bool,
    pub sent_at: DateTime<Utc>,
    pub attachments: sqlx::types::Json<Value>,
    pub quoted: Option<sqlx::types::Json<Value>>,
    pub seen: bool,
    pub seen_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub reactions: sqlx::types::Json<Value>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub placeholder: bool,
    pub state: Option<String>,
    pub client_id: Option<String>,
    pub relay_id: Option<String>,
    pub failure_reason: Option<String>,
}

impl MessageRow {
    /// The stored reactions; entries of another shape (none are written) are skipped.
    pub fn reactions(&self) -> Vec<Reaction> {
        match &self.reactions.0 {
            Value::Array(items) => {
                items.iter().filter_map(|r| serde_json::from_value(r.clone()).ok()).collect()
            }
            _ => Vec::new(),
        }
    }

    pub fn record(&self) -> MessageRecord {
        let deleted = self.deleted_at.is_some();
        let attachments = match &self.attachments.0 {
            _ if deleted => Vec::new(),
            Value::Array(items) => items.clone(),
            Value::Null => Vec::new(),
            other => vec![other.clone()],
        };
        MessageRecord {
            id: self.id.clone(),
            chat_id: self.chat_id.clone(),
            account_id: self.account_id.clone(),
            account_type: self.account_type.clone(),
            text: if deleted { None } else { self.text.clone() },
            sender: serde_json::from_value(self.sender.0.clone()).unwrap_or_default(),
            is_sender: self.is_sender,
            timestamp: self.sent_at,
            attachments,
            quoted: if deleted {
                None
            } else {
                self.quoted.as_ref().map(|q| q.0.clone()).filter(|q| !q.is_null())
            },
            seen: self.seen,
            seen_at: self.seen_at,
            delivered_at: self.delivered_at,
            reactions: self.reactions(),
            edited: self.edited_at.is_some(),
            edited_at: self.edited_at,
            deleted,
            deleted_at: self.deleted_at,
            placeholder: self.placeholder,
            state: self.state.as_deref().and_then(ReplyState::parse),
            client_id: self.client_id.clone(),
            relay_id: self.relay_id.clone(),
            failure_reason: self.failure_reason.clone(),
        }
    }
}

/// A chat as the chat list and `chat:read` show it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, ToSchema)]
pub struct ChatRecord {
    pub id: String,
    pub account_id: String,
    /// The provider: `WHATSAPP`, `LINKEDIN`, ...
    pub account_type: Option<String>,
    pub provider_chat_id: Option<String>,
    /// Group subject or the other person's name, when known.
    pub name: Option<String>,
    pub is_group: bool,
    /// Incoming messages since the chat was last marked read.
    pub unread_count: i64,
    /// When the newest message was sent; `null` for a chat with no message yet.
    #[serde(with = "millis::option")]
    pub last_message_at: Option<DateTime<Utc>>,
    pub last_message_id: Option<String>,
    /// The newest message's text, cut to 160 characters (`[attachment]`, `[deleted]`).
    pub last_message_preview: Option<String>,
}

/// The columns [`ChatRecord`] reads; use as `select {CHAT_COLUMNS} from chats c ..`.
pub const CHAT_COLUMNS: &str = "c.id, c.account_id, c.account_type, c.provider_chat_id, c.name, c.is_group, \
     c.unread_count, c.last_message_at, c.last_message_id, c.last_message_preview";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> MessageRow {
        MessageRow {
            id: "m1".into(),
            chat_id: "c1".into(),
            account_id: "a1".into(),
            account_type: Some("WHATSAPP".into()),
            text: Some("hello".into()),
            sender: sqlx::types::Json(
                json!({"id": "s", "name": "Dana", "provider_id": "p", "profile_url": null}),
            ),
            is_sender: false,
            sent_at: Utc::now(),
            attachments: sqlx::types::Json(json!([{"id": "att"}])),
            quoted: None,
            seen: false,
            seen_at: None,
            delivered_at: None,
            reactions: sqlx::types::Json(json!([])),
            edited_at: None,
            deleted_at: None,
            placeholder: false,
            state: None,
            client_id: None,
            relay_id: None,
            failure_reason: None,
        }
    }

    #[test]
    fn a_deleted_message_shows_no_text_and_no_attachments_but_keeps_its_id() {
        let mut r = row();
        r.deleted_at = Some(Utc::now());
        let record = r.record();
        assert_eq!(record.id, "m1");
        assert!(record.deleted);
        assert_eq!(record.text, None);
        assert!(record.attachments.is_empty());
    }

    #[test]
    fn stored_reactions_read_back_with_their_reactor() {
        let mut r = row();
        r.reactions = sqlx::types::Json(json!([{
            "value": "👍", "sender_id": "p2",
            "sender": {"id": null, "name": "Sam", "provider_id": "p2", "profile_url": null},
            "reacted_at": "2026-11-28T16:03:00.000Z"
        }]));
        let reactions = r.record().reactions;
        assert_eq!(reactions.len(), 1);
        assert_eq!(reactions[0].sender.name.as_deref(), Some("Sam"));
    }
}
