//! Webhook payloads as Unipile delivers them.
//!
//! Two shapes arrive: messaging events (`message_received`, `message_read`, ...) as a
//! flat object, and account status changes wrapped in `{"AccountStatus": {..}}`. Both are
//! read leniently (see [`lenient`]): odd field types are coerced, unknown fields
//! are kept in `extra`, and only a missing id makes a payload unusable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub mod lenient;

/// The `event` field of a messaging delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessagingEventKind {
    MessageReceived,
    MessageRead,
    MessageReaction,
    MessageEdited,
    MessageDeleted,
    MessageDelivered,
    /// An event name this relay does not know; kept so it can be dead-lettered by name.
    Other(String),
}

impl MessagingEventKind {
    pub fn as_str(&self) -> &str {
        match self {
            Self::MessageReceived => "message_received",
            Self::MessageRead => "message_read",
            Self::MessageReaction => "message_reaction",
            Self::MessageEdited => "message_edited",
            Self::MessageDeleted => "message_deleted",
            Self::MessageDelivered => "message_delivered",
            Self::Other(name) => name,
        }
    }

    /// The events the relay subscribes its messaging webhook to.
    pub const SUBSCRIBED: [&'static str; 5] =
        ["message_received", "message_read", "message_reaction", "message_edited", "message_deleted"];
}

impl From<&str> for MessagingEventKind {
    fn from(name: &str) -> Self {
        match name {
            "message_received" => Self::MessageReceived,
            "message_read" => Self::MessageRead,
            "message_reaction" => Self::MessageReaction,
            "message_edited" => Self::MessageEdited,
            "message_deleted" => Self::MessageDeleted,
            "message_delivered" => Self::MessageDelivered,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for MessagingEventKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Self::from(name.as_str()))
    }
}

impl Serialize for MessagingEventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A person in a chat, as Unipile describes senders and attendees.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Attendee {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub attendee_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub attendee_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub attendee_provider_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub attendee_profile_url: Option<String>,
    /// Provider-specific extras (`attendee_specifics`, `attendee_public_identifier`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One messaging webhook delivery (`message_received`, `message_read`, ...).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct MessagingEvent {
    pub event: MessagingEventKind,
    #[serde(deserialize_with = "lenient::id")]
    pub account_id: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub account_type: Option<String>,
    /// Differs per provider (phone number for WhatsApp, user id for LinkedIn, ...).
    #[serde(default)]
    pub account_info: Option<Value>,
    #[serde(deserialize_with = "lenient::id")]
    pub chat_id: String,
    #[serde(deserialize_with = "lenient::id")]
    pub message_id: String,
    /// The message text; `null` for attachments-only messages and deletions.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub message: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_timestamp")]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "lenient_opt")]
    pub sender: Option<Attendee>,
    #[serde(default, deserialize_with = "lenient::lenient_list")]
    pub attendees: Vec<Attendee>,
    /// Sometimes a list, sometimes one bare object; always a list here.
    #[serde(default, deserialize_with = "lenient::one_or_many")]
    pub attachments: Vec<Value>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub is_sender: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub is_group: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub subject: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub provider_chat_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub provider_message_id: Option<String>,
    #[serde(default)]
    pub quoted: Option<Value>,
    /// For `message_reaction`: the emoji.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub reaction: Option<String>,
    /// For `message_reaction`: who reacted.
    #[serde(default, deserialize_with = "lenient_opt")]
    pub reaction_sender: Option<Attendee>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub webhook_name: Option<String>,
    /// Every field not named above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The status word of an account status delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountStatusKind {
    Ok,
    Error,
    Stopped,
    Credentials,
    Connecting,
    Deleted,
    CreationSuccess,
    Reconnected,
    SyncSuccess,
    /// A status word this relay does not know yet; stored as sent.
    Other(String),
}

impl AccountStatusKind {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Ok => "OK",
            Self::Error => "ERROR",
            Self::Stopped => "STOPPED",
            Self::Credentials => "CREDENTIALS",
            Self::Connecting => "CONNECTING",
            Self::Deleted => "DELETED",
            Self::CreationSuccess => "CREATION_SUCCESS",
            Self::Reconnected => "RECONNECTED",
            Self::SyncSuccess => "SYNC_SUCCESS",
            Self::Other(word) => word,
        }
    }
}

impl From<&str> for AccountStatusKind {
    fn from(word: &str) -> Self {
        match word.trim().to_ascii_uppercase().as_str() {
            "OK" => Self::Ok,
            "ERROR" => Self::Error,
            "STOPPED" => Self::Stopped,
            "CREDENTIALS" => Self::Credentials,
            "CONNECTING" => Self::Connecting,
            "DELETED" => Self::Deleted,
            "CREATION_SUCCESS" => Self::CreationSuccess,
            "RECONNECTED" => Self::Reconnected,
            "SYNC_SUCCESS" => Self::SyncSuccess,
            _ => Self::Other(word.to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for AccountStatusKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let word = String::deserialize(deserializer)?;
        Ok(Self::from(word.as_str()))
    }
}

impl Serialize for AccountStatusKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The body of an account status delivery: `{"AccountStatus": {..}}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AccountStatusDelivery {
    #[serde(rename = "AccountStatus")]
    pub account_status: AccountStatus,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AccountStatus {
    #[serde(deserialize_with = "lenient::id")]
    pub account_id: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub account_type: Option<String>,
    pub message: AccountStatusKind,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An optional nested object that reads as absent when it is not the expected shape.
fn lenient_opt<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Ok(serde_json::from_value(Value::deserialize(deserializer)?).ok())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A payload from `fixtures/unipile/` (shared with the API types' tests).
    pub(crate) fn fixture(name: &str) -> Value {
        let path = format!("{}/../fixtures/unipile/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    fn event(name: &str) -> MessagingEvent {
        serde_json::from_value(fixture(name)).expect("fixture deserializes")
    }

    #[test]
    fn whatsapp_message_received_reads_with_empty_attachment_list() {
        let e = event("message_received_whatsapp.json");
        assert_eq!(e.event, MessagingEventKind::MessageReceived);
        assert_eq!(e.account_id, "Wq7hT2mXRbK9vLpA3sDfGh");
        assert_eq!(e.chat_id, "c4Rt8YuIoP1aSdFgHjKlZx");
        assert_eq!(e.message.as_deref(), Some("Are we still on for Thursday?"));
        assert!(e.attachments.is_empty());
        assert!(!e.is_sender);
        let sender = e.sender.expect("sender");
        assert_eq!(sender.attendee_name.as_deref(), Some("Dana Reyes"));
        assert!(sender.extra.contains_key("attendee_specifics"), "unknown attendee fields kept");
        assert_eq!(e.timestamp.unwrap().to_rfc3339(), "2026-11-28T16:02:11+00:00");
        assert!(e.extra.contains_key("chat_pinned"), "unknown top-level fields are kept");
    }

    #[test]
    fn linkedin_attachment_object_becomes_a_list_and_keeps_string_numbers() {
        let e = event("message_received_linkedin.json");
        assert_eq!(e.attachments.len(), 1);
        assert_eq!(e.attachments[0]["size"]["width"], "1280");
        assert_eq!(e.account_info.unwrap()["feature"], "classic");
    }

    #[test]
    fn deleted_message_has_null_text() {
        let e = event("message_deleted.json");
        assert_eq!(e.event, MessagingEventKind::MessageDeleted);
        assert_eq!(e.message, None);
    }

    #[test]
    fn reaction_carries_emoji_and_who_reacted() {
        let e = event("message_reaction.json");
        assert_eq!(e.reaction.as_deref(), Some("👍"));
        assert_eq!(e.reaction_sender.unwrap().attendee_name.as_deref(), Some("Sam Okafor"));
    }

    #[test]
    fn read_and_edited_fixtures_deserialize() {
        assert_eq!(event("message_read.json").event, MessagingEventKind::MessageRead);
        assert!(event("message_read.json").is_sender);
        assert_eq!(event("message_edited.json").event, MessagingEventKind::MessageEdited);
    }

    #[test]
    fn is_sender_as_string_or_number_is_understood() {
        let mut raw = fixture("message_received_whatsapp.json");
        for (value, expected) in [(json!("true"), true), (json!(1), true), (json!("0"), false)] {
            raw["is_sender"] = value;
            let e: MessagingEvent = serde_json::from_value(raw.clone()).unwrap();
            assert_eq!(e.is_sender, expected);
        }
    }

    #[test]
    fn odd_nested_shapes_do_not_fail_the_payload() {
        let mut raw = fixture("message_received_whatsapp.json");
        raw["sender"] = json!("not an object");
        raw["attendees"] = json!({"attendee_id": "solo"});
        raw["timestamp"] = json!(1764345731000_i64);
        let e: MessagingEvent = serde_json::from_value(raw).unwrap();
        assert_eq!(e.sender, None);
        assert_eq!(e.attendees.len(), 1);
        assert!(e.timestamp.is_some());
    }

    #[test]
    fn missing_or_empty_ids_are_rejected() {
        for field in ["account_id", "chat_id", "message_id"] {
            let mut raw = fixture("message_received_whatsapp.json");
            raw.as_object_mut().unwrap().remove(field);
            assert!(serde_json::from_value::<MessagingEvent>(raw.clone()).is_err(), "{field}");
            raw[field] = json!("  ");
            assert!(serde_json::from_value::<MessagingEvent>(raw).is_err(), "{field} empty");
        }
    }

    #[test]
    fn unknown_event_names_are_kept() {
        let mut raw = fixture("message_received_whatsapp.json");
        raw["event"] = json!("message_teleported");
        let e: MessagingEvent = serde_json::from_value(raw).unwrap();
        assert_eq!(e.event, MessagingEventKind::Other("message_teleported".into()));
    }

    #[test]
    fn account_status_reads_its_wrapper() {
        let d: AccountStatusDelivery = serde_json::from_value(fixture("account_status.json")).unwrap();
        assert_eq!(d.account_status.account_id, "Lk2jH4gF6dS8aQ1wE3rT5y");
        assert_eq!(d.account_status.message, AccountStatusKind::Credentials);
        let other: AccountStatusKind = serde_json::from_value(json!("PAUSED")).unwrap();
        assert_eq!(other.as_str(), "PAUSED");
    }
}
