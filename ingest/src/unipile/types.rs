//! Request and response bodies of Unipile's REST API, as far as the relay uses them.
//!
//! Responses are read as leniently as webhook deliveries (see [`crate::payload::lenient`]):
//! flags come as `0`/`1` or strings, lists may be a single object, unknown fields
//! appear. Only a missing id makes an item unusable.

use crate::payload::lenient;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// One page of a list endpoint: `{"object": "...List", "items": [..], "cursor": ..}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(bound(deserialize = "T: serde::de::DeserializeOwned"))]
pub struct Page<T> {
    #[serde(default, deserialize_with = "lenient::lenient_list")]
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub cursor: Option<String>,
}

/// An item together with the JSON it was read from, for the `raw` column.
#[derive(Debug, Clone, PartialEq)]
pub struct WithRaw<T> {
    pub item: T,
    pub raw: Value,
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for WithRaw<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        let item = serde_json::from_value(raw.clone()).map_err(serde::de::Error::custom)?;
        Ok(Self { item, raw })
    }
}

/// A header Unipile adds to every delivery of a webhook.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct WebhookHeader {
    pub key: String,
    pub value: String,
}

/// A webhook as `GET /webhooks` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Webhook {
    #[serde(deserialize_with = "lenient::id")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    /// `messaging`, `account_status`, `email`, ...
    #[serde(default, deserialize_with = "string_or_empty")]
    pub source: String,
    #[serde(default, deserialize_with = "string_or_empty")]
    pub request_url: String,
    #[serde(default = "yes", deserialize_with = "lenient_bool_default_true")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub format: Option<String>,
    #[serde(default, deserialize_with = "lenient::lenient_list")]
    pub headers: Vec<WebhookHeader>,
    #[serde(default, deserialize_with = "lenient::lenient_list")]
    pub events: Vec<String>,
}

impl Webhook {
    /// The value of a header, compared case-insensitively by key as HTTP does.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.key.eq_ignore_ascii_case(key)).map(|h| h.value.as_str())
    }
}

/// The body of `POST /webhooks`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewWebhook {
    pub source: String,
    pub request_url: String,
    pub name: String,
    pub format: String,
    /// Left out when empty: `account_status` webhooks take no events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    pub headers: Vec<WebhookHeader>,
}

/// The answer to `POST /webhooks`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WebhookCreated {
    #[serde(deserialize_with = "lenient::id")]
    pub webhook_id: String,
}

/// A connected messaging account, as `GET /accounts` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Account {
    #[serde(deserialize_with = "lenient::id")]
    pub id: String,
    /// `WHATSAPP`, `LINKEDIN`, ...
    #[serde(default, rename = "type", deserialize_with = "lenient::opt_string")]
    pub account_type: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    /// The account's sources (messaging, ...), each with its own status.
    #[serde(default, deserialize_with = "lenient::lenient_list")]
    pub sources: Vec<AccountSource>,
}

/// One source of an account and its status (`OK`, `CREDENTIALS`, `STOPPED`, ...).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AccountSource {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub status: Option<String>,
}

impl Account {
    /// The account's status as one word: the first source's that is not `OK`, else
    /// `OK`; `None` when no source says.
    pub fn status(&self) -> Option<&str> {
        let mut statuses = self.sources.iter().filter_map(|s| s.status.as_deref()).map(str::trim);
        let first = statuses.next()?;
        let mut all = std::iter::once(first).chain(statuses);
        Some(all.find(|s| !s.eq_ignore_ascii_case("OK")).unwrap_or(first))
    }
}

/// A chat, as `GET /chats` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Chat {
    #[serde(deserialize_with = "lenient::id")]
    pub id: String,
    #[serde(deserialize_with = "lenient::id")]
    pub account_id: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub account_type: Option<String>,
    /// The chat's id at the provider (WhatsApp JID, LinkedIn thread id, ...).
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub provider_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    /// `0` one-to-one, `1` group, `2` channel.
    #[serde(default, rename = "type", deserialize_with = "lenient::opt_i64")]
    pub chat_type: Option<i64>,
    /// Time of the chat's latest activity.
    #[serde(default, deserialize_with = "lenient::opt_timestamp")]
    pub timestamp: Option<DateTime<Utc>>,
    /// What Unipile counts as unread; the relay adopts it as is.
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    pub unread_count: Option<i64>,
}

impl Chat {
    pub fn is_group(&self) -> bool {
        self.chat_type.is_some_and(|t| t != 0)
    }
}

/// A message, as `GET /chats/{chat_id}/messages` lists it (newest first).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Message {
    #[serde(deserialize_with = "lenient::id")]
    pub id: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub account_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub chat_id: Option<String>,
    /// The message's id at the provider.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub provider_id: Option<String>,
    /// The sender's provider id (a phone JID, a LinkedIn member id, ...).
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub sender_id: Option<String>,
    /// The sender's Unipile attendee id.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub sender_attendee_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub text: Option<String>,
    #[serde(default, deserialize_with = "lenient::one_or_many")]
    pub attachments: Vec<Value>,
    #[serde(default, deserialize_with = "lenient::opt_timestamp")]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub is_sender: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub seen: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub deleted: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub edited: bool,
    /// Group joins, calls and other system lines rather than something a person wrote.
    #[serde(default, deserialize_with = "lenient::bool")]
    pub is_event: bool,
    #[serde(default, deserialize_with = "lenient::one_or_many")]
    pub reactions: Vec<Value>,
    #[serde(default)]
    pub quoted: Option<Value>,
    /// Every field not named above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}

fn lenient_bool_default_true<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(lenient::opt_bool(deserializer)?.unwrap_or(true))
}

fn string_or_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(lenient::opt_string(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::tests::fixture;
    use serde_json::json;

    #[test]
    fn account_list_fixture_reads_with_name_and_status() {
        let page: Page<Account> = serde_json::from_value(fixture("api_account_list.json")).unwrap();
        let account = &page.items[0];
        assert_eq!(account.name.as_deref(), Some("+14155550123"));
        assert_eq!(account.account_type.as_deref(), Some("WHATSAPP"));
        assert_eq!(account.status(), Some("OK"));
    }

    #[test]
    fn an_account_is_as_well_as_its_worst_source() {
        let account = |sources: Value| -> Account {
            serde_json::from_value(json!({"id": "a", "sources": sources})).unwrap()
        };
        let two = json!([{"id": "m", "status": "OK"}, {"id": "c", "status": "CREDENTIALS"}]);
        assert_eq!(account(two).status(), Some("CREDENTIALS"));
        assert_eq!(account(json!({"status": "STOPPED"})).status(), Some("STOPPED"));
        assert_eq!(account(json!([{"id": "m"}])).status(), None);
        assert_eq!(account(json!("odd")).status(), None);
        assert_eq!(account(Value::Null).status(), None);
    }

    #[test]
    fn webhook_list_fixture_reads_with_headers_and_events() {
        let page: Page<Webhook> = serde_json::from_value(fixture("api_webhook_list.json")).unwrap();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.cursor, None);
        let ours = &page.items[0];
        assert_eq!(ours.source, "messaging");
        assert_eq!(ours.header("unipile-auth"), Some("s3cr3t-value"));
        assert_eq!(ours.events.len(), 5);
        assert!(!page.items[1].enabled);
    }

    #[test]
    fn message_list_fixture_reads_flags_given_as_numbers() {
        let page: Page<Message> = serde_json::from_value(fixture("api_message_list.json")).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(page.items[0].is_sender);
        assert!(!page.items[1].is_sender);
        assert!(page.items[1].seen);
        assert_eq!(page.items[1].reactions.len(), 1);
        assert_eq!(page.items[1].timestamp.unwrap().to_rfc3339(), "2026-11-28T16:02:11+00:00");
        assert!(page.items[0].extra.contains_key("delivered"), "unknown fields are kept");
    }

    #[test]
    fn chat_list_fixture_reads_unread_count_and_cursor() {
        let page: Page<Chat> = serde_json::from_value(fixture("api_chat_list.json")).unwrap();
        assert_eq!(page.cursor.as_deref(), Some("eyJvZmZzZXQiOjF9"));
        assert_eq!(page.items[0].unread_count, Some(1));
        assert!(!page.items[0].is_group());
    }

    #[test]
    fn an_item_without_id_is_dropped_not_the_page() {
        let page: Page<Chat> = serde_json::from_value(json!({
            "items": [{"account_id": "a"}, {"id": "c1", "account_id": "a", "unread_count": "3"}],
            "cursor": null
        }))
        .unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].unread_count, Some(3));
    }

    #[test]
    fn account_status_webhook_body_leaves_out_events() {
        let body = serde_json::to_value(NewWebhook {
            source: "account_status".into(),
            request_url: "https://x/y".into(),
            name: "n".into(),
            format: "json".into(),
            events: vec![],
            headers: vec![],
        })
        .unwrap();
        assert!(body.get("events").is_none());
    }
}

/// `POST /chats/{chat_id}/messages` answers `201 {"object": "MessageSent", "message_id": ..}`;
/// `message_id` may be null.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageSent {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub message_id: Option<String>,
}

/// `POST /chats` answers `201 {"object": "ChatStarted", "chat_id": .., "message_id": ..}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatStarted {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub chat_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub message_id: Option<String>,
}
