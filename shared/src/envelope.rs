//! The event envelope: one JSON object, the same on NATS and on the WebSocket.
//!
//! `ingest` serializes an [`Envelope`] once, stores the bytes in its outbox and publishes
//! them verbatim. `fanout` never re-serializes: it adds the stream sequence with
//! [`stamp_seq`] and sends the same bytes to every connection.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The `type` of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "message:new")]
    MessageNew,
    #[serde(rename = "message:read")]
    MessageRead,
    #[serde(rename = "message:reaction")]
    MessageReaction,
    #[serde(rename = "message:edited")]
    MessageEdited,
    #[serde(rename = "message:deleted")]
    MessageDeleted,
    /// A reply sent through the relay changed state: pending → sent | failed.
    #[serde(rename = "message:status")]
    MessageStatus,
    #[serde(rename = "chat:read")]
    ChatRead,
    #[serde(rename = "account:status")]
    AccountStatus,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        Self::MessageNew,
        Self::MessageRead,
        Self::MessageReaction,
        Self::MessageEdited,
        Self::MessageDeleted,
        Self::MessageStatus,
        Self::ChatRead,
        Self::AccountStatus,
    ];

    /// The name on the wire, e.g. `message:new`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageNew => "message:new",
            Self::MessageRead => "message:read",
            Self::MessageReaction => "message:reaction",
            Self::MessageEdited => "message:edited",
            Self::MessageDeleted => "message:deleted",
            Self::MessageStatus => "message:status",
            Self::ChatRead => "chat:read",
            Self::AccountStatus => "account:status",
        }
    }

    /// The last token of the event's NATS subject, e.g. `message_new`.
    pub fn subject_token(self) -> &'static str {
        match self {
            Self::MessageNew => "message_new",
            Self::MessageRead => "message_read",
            Self::MessageReaction => "message_reaction",
            Self::MessageEdited => "message_edited",
            Self::MessageDeleted => "message_deleted",
            Self::MessageStatus => "message_status",
            Self::ChatRead => "chat_read",
            Self::AccountStatus => "account_status",
        }
    }

    pub fn from_subject_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.subject_token() == token)
    }
}

/// One event. `seq` is absent on NATS and set by fanout from the stream sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub account_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<String>,
    #[serde(with = "millis")]
    pub occurred_at: DateTime<Utc>,
    /// `true` when `data` was cut to fit on NATS (a text over the event text cap, say):
    /// the full record is whole in PostgreSQL; clients fetch it by REST. Absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    pub data: Value,
}

impl Envelope {
    /// A new event with a fresh time-ordered id; `data` is the event type's payload.
    pub fn new(
        event_type: EventType,
        account_id: impl Into<String>,
        chat_id: Option<String>,
        occurred_at: DateTime<Utc>,
        data: impl Serialize,
    ) -> Self {
        let data = serde_json::to_value(data).expect("event data serializes to JSON");
        Self {
            event_type,
            id: Uuid::now_v7(),
            seq: None,
            account_id: account_id.into(),
            chat_id,
            occurred_at,
            truncated: false,
            data,
        }
    }

    /// The bytes stored in the outbox and published on NATS.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }
}

/// A message as events and the REST API show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    pub chat_id: String,
    pub account_id: String,
    pub account_type: Option<String>,
    pub text: Option<String>,
    pub sender: SenderView,
    pub is_sender: bool,
    #[serde(with = "millis")]
    pub timestamp: DateTime<Utc>,
    pub attachments: Vec<Value>,
    pub quoted: Option<Value>,
}

/// Who sent a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SenderView {
    pub id: Option<String>,
    pub name: Option<String>,
    pub provider_id: Option<String>,
    pub profile_url: Option<String>,
}

/// The state of a chat after an event, so clients update badges without a REST call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatView {
    pub id: String,
    pub unread_count: i64,
    #[serde(with = "millis::option")]
    pub last_message_at: Option<DateTime<Utc>>,
}

/// Formats an instant the way the contract shows it: `2026-11-29T10:00:00.000Z`.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serde for instants as RFC 3339 with milliseconds and `Z`.
pub mod millis {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_time(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&format_time(t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| {
                    DateTime::parse_from_rfc3339(&text)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

/// Adds `"seq":<seq>` to a serialized envelope without parsing it again.
///
/// Returns `None` when the bytes do not start as a JSON object. A payload that already
/// had a `seq` comes out with the key twice; readers that must refuse it (fanout) name
/// `seq` in their serde struct, which rejects duplicate fields.
pub fn stamp_seq(payload: &[u8], seq: u64) -> Option<Vec<u8>> {
    let rest = payload.strip_prefix(b"{")?;
    let rest_trimmed = rest.trim_ascii_start();
    let mut out = Vec::with_capacity(payload.len() + 24);
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    if rest_trimmed.first() != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Envelope {
        let at = DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z").unwrap().with_timezone(&Utc);
        Envelope::new(EventType::MessageNew, "acc_1", Some("chat_1".into()), at, json!({"k": 1}))
    }

    #[test]
    fn envelope_serializes_to_the_contract_shape() {
        let v: Value = serde_json::from_slice(&sample().to_bytes()).unwrap();
        assert_eq!(v["type"], "message:new");
        assert_eq!(v["account_id"], "acc_1");
        assert_eq!(v["chat_id"], "chat_1");
        assert_eq!(v["occurred_at"], "2026-11-29T10:00:00.000Z");
        assert!(v.get("seq").is_none(), "seq is fanout's to set");
        assert!(v["id"].as_str().unwrap().len() == 36);
    }

    #[test]
    fn stamped_bytes_parse_back_with_the_sequence() {
        let bytes = stamp_seq(&sample().to_bytes(), 1842).unwrap();
        let back: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.seq, Some(1842));
        assert_eq!(back.data, json!({"k": 1}));
    }

    #[test]
    fn stamping_something_that_is_not_an_object_is_refused() {
        assert_eq!(stamp_seq(b"[1,2]", 1), None);
        assert_eq!(stamp_seq(b"{}", 7).unwrap(), b"{\"seq\":7}");
    }

    #[test]
    fn every_type_round_trips_through_its_subject_token() {
        for t in EventType::ALL {
            assert_eq!(EventType::from_subject_token(t.subject_token()), Some(t));
            let wire = serde_json::to_value(t).unwrap();
            assert_eq!(wire, t.as_str());
        }
    }
}
