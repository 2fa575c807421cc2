//! The `data` of every event ingest emits, as types serde serializes into the envelope.
//!
//! `message:new` carries the lean [`MessageView`] of a message that has just arrived and
//! its chat's counters; the update events carry the message id, the whole stored
//! [`MessageRecord`] and what changed; `chat:read` the chat, `account:status` the
//! account. These are the shapes `docs/DESIGN.md` and the README show.

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::envelope::{ChatView, EventType, MessageView, millis};

use super::accounts::AccountRecord;
use super::views::{ChatRecord, MessageRecord, Person, Reaction, ReplyState};

/// `message:new`.
#[derive(Debug, Serialize)]
pub struct MessageNew {
    pub message: MessageView,
    pub chat: ChatView,
}

/// `message:read`, `message:reaction`, `message:edited` and `message:deleted`.
#[derive(Debug, Serialize)]
pub struct MessageUpdated {
    pub message_id: String,
    /// The whole stored message after the change.
    pub message: MessageRecord,
    #[serde(flatten)]
    pub change: Changed,
}

/// What changed, by event type.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Changed {
    Read {
        #[serde(with = "millis")]
        seen_at: DateTime<Utc>,
    },
    Reaction {
        /// The reaction that changed; `value` is `null` when it was removed.
        reaction: ShownReaction,
        removed: bool,
        /// Every reaction the message has now.
        reactions: Vec<Reaction>,
    },
    /// The new text is `message.text`: carried once.
    Edited {
        #[serde(with = "millis")]
        edited_at: DateTime<Utc>,
    },
    Deleted {
        #[serde(with = "millis")]
        deleted_at: DateTime<Utc>,
    },
}

impl Changed {
    pub fn event_type(&self) -> EventType {
        match self {
            Self::Read { .. } => EventType::MessageRead,
            Self::Reaction { .. } => EventType::MessageReaction,
            Self::Edited { .. } => EventType::MessageEdited,
            Self::Deleted { .. } => EventType::MessageDeleted,
        }
    }
}

/// A [`Reaction`] as `message:reaction` shows the one that changed.
#[derive(Debug, Serialize)]
pub struct ShownReaction {
    pub value: Option<String>,
    pub sender_id: Option<String>,
    pub sender: Person,
    #[serde(with = "millis")]
    pub reacted_at: DateTime<Utc>,
}

/// `message:status`: a reply sent through the relay changed state. Clients find the
/// bubble by `relay_id` (the id of the reply's `message:new`) or `client_id`, and from
/// now on know it as `message_id` (Unipile's id once known; it may differ from the
/// `relay_id`, and when the echo webhook came first, a bubble with that id exists
/// already: the one with the `relay_id` goes).
#[derive(Debug, Serialize)]
pub struct MessageStatus {
    pub message_id: String,
    pub relay_id: String,
    pub client_id: Option<String>,
    pub state: Option<ReplyState>,
    pub failure_reason: Option<String>,
    /// The whole stored reply.
    pub message: MessageRecord,
}

/// `chat:read`.
#[derive(Debug, Serialize)]
pub struct ChatRead {
    pub chat: ChatRecord,
}

/// `account:status`.
#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub account: AccountRecord,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_change_sits_beside_the_message_as_the_contract_shows() {
        let at = DateTime::parse_from_rfc3339("2026-11-28T16:06:00Z").unwrap().with_timezone(&Utc);
        let shown = ShownReaction {
            value: None,
            sender_id: Some("p".into()),
            sender: Person::default(),
            reacted_at: at,
        };
        let data =
            serde_json::to_value(Changed::Reaction { reaction: shown, removed: true, reactions: vec![] })
                .unwrap();
        assert_eq!(data["reaction"]["value"], json!(null));
        assert_eq!(data["removed"], true);
        assert_eq!(
            serde_json::to_value(Changed::Edited { edited_at: at }).unwrap(),
            json!({"edited_at": "2026-11-28T16:06:00.000Z"})
        );
    }
}
