//! The frames of the WebSocket protocol other than events: what the server sends
//! ([`ServerFrame`]) and what it understands from clients ([`ClientFrame`]).
//!
//! Events are not among them: they go out as the bytes ingest published, with `seq`
//! stamped in, never re-serialized (see [`crate::event`]); nor are presence frames
//! (`presence:*`, without `seq`: see [`crate::presence::wire`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A frame the server sends, by its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The first frame of every connection.
    Hello {
        connection_id: String,
        /// The newest stream sequence the replica had when the client connected.
        seq: u64,
        /// Server ping interval.
        heartbeat_s: u64,
        /// Present on a resume only: `true` = no gap, `false` = reload by REST.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// The answer to `{"type":"ping"}`.
    Pong,
    /// The answer to `subscribe`: the chats the connection is narrowed to (none: all).
    Subscribed { chat_ids: Vec<String> },
    /// A client frame the server did not take; the connection stays open.
    Error { code: String, message: String },
}

impl ServerFrame {
    /// A `hello` with a fresh connection id.
    pub fn hello(head: u64, heartbeat: Duration, recovered: Option<bool>) -> Self {
        Self::Hello {
            connection_id: uuid::Uuid::new_v4().to_string(),
            seq: head,
            heartbeat_s: heartbeat.as_secs(),
            recovered,
        }
    }

    pub fn error(code: &str, message: &str) -> Self {
        Self::Error { code: code.to_owned(), message: message.to_owned() }
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a server frame always serializes")
    }
}

/// Client messages the server understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Ping,
    Subscribe {
        chat_ids: Vec<String>,
    },
    /// The agent is typing in a chat of one of the token's accounts (repeat while typing).
    Typing {
        account_id: String,
        chat_id: String,
    },
    /// The agent opened a chat; without `chat_id` (or with `null`), it closed it.
    Viewing {
        #[serde(default)]
        account_id: Option<String>,
        #[serde(default)]
        chat_id: Option<String>,
    },
}

impl ClientFrame {
    /// The types clients may send, for telling malformed fields from unknown types.
    pub const TYPES: &[&str] = &["ping", "subscribe", "typing", "viewing"];
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presence_client_frames_parse_and_viewing_without_a_chat_closes() {
        let typing: ClientFrame =
            serde_json::from_value(json!({"type": "typing", "account_id": "a", "chat_id": "c"})).unwrap();
        assert_eq!(typing, ClientFrame::Typing { account_id: "a".into(), chat_id: "c".into() });
        let closed: ClientFrame =
            serde_json::from_value(json!({"type": "viewing", "chat_id": null})).unwrap();
        assert_eq!(closed, ClientFrame::Viewing { account_id: None, chat_id: None });
        assert!(serde_json::from_value::<ClientFrame>(json!({"type": "typing", "chat_id": "c"})).is_err());
    }

    #[test]
    fn frames_have_the_contract_shapes() {
        let hello = serde_json::to_value(ServerFrame::hello(7, Duration::from_secs(30), None)).unwrap();
        assert_eq!(hello["type"], "hello");
        assert_eq!(hello["seq"], 7);
        assert_eq!(hello["heartbeat_s"], 30);
        assert!(hello.get("recovered").is_none(), "absent unless resuming");
        let resumed =
            serde_json::to_value(ServerFrame::hello(7, Duration::from_secs(30), Some(false))).unwrap();
        assert_eq!(resumed["recovered"], false);
        assert_eq!(ServerFrame::Pong.to_text(), r#"{"type":"pong"}"#);
        assert_eq!(
            serde_json::to_value(ServerFrame::Subscribed { chat_ids: vec!["c".into()] }).unwrap(),
            json!({"type": "subscribed", "chat_ids": ["c"]})
        );
        assert_eq!(
            serde_json::to_value(ServerFrame::error("unknown_type", "unknown message type")).unwrap(),
            json!({"type": "error", "code": "unknown_type", "message": "unknown message type"})
        );
    }
}
