//! What presence looks like on the wire: the [`Announcement`] replicas publish to each
//! other on core NATS, and the [`PresenceFrame`]s clients receive.
//!
//! Presence frames are not events: they carry no `id` and no `seq`, so they never
//! touch a connection's sequence (which counts stream events only) or its resume.

use serde::{Deserialize, Serialize};

/// Longest id (account, chat, `sub`) presence takes, as ingest's ids.
pub const MAX_ID_BYTES: usize = 255;
/// Display names are cut to this many characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest life an announcement may ask for, whatever the sender's configuration.
pub const MAX_TTL_MS: u64 = 300_000;

/// What an announcement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The agent is typing in the chat; shown for `ttl_ms` unless repeated.
    Typing,
    /// The agent has the chat open; gone after `ttl_ms` unless re-announced.
    Viewing,
    /// The agent closed the chat (or its socket).
    Left,
}

/// One replica telling the others (and itself) about one connection, published on
/// `{presence_prefix}.{account}.{chat}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub op: Op,
    /// The connection: unique across replicas (`{replica id}/{connection number}`).
    pub conn: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub account_id: String,
    pub chat_id: String,
    pub ttl_ms: u64,
}

impl Announcement {
    /// Whether a received announcement is inside the bounds every replica keeps.
    pub fn is_sound(&self) -> bool {
        [&self.conn, &self.sub, &self.account_id, &self.chat_id]
            .iter()
            .all(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
    }
}

/// A replica starting asks the others to announce what their clients view, on
/// `{presence_prefix}.sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    pub replica: String,
}

/// Who views a chat, as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A presence frame the server sends to clients, by its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PresenceFrame {
    /// Another agent of the account is typing in the chat; show it for `expires_in_ms`
    /// unless another one arrives.
    #[serde(rename = "presence:typing")]
    Typing {
        account_id: String,
        chat_id: String,
        sub: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        expires_in_ms: u64,
    },
    /// Another agent opened (`viewing: true`) or closed (`false`) the chat.
    #[serde(rename = "presence:viewing")]
    Viewing {
        account_id: String,
        chat_id: String,
        sub: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        viewing: bool,
    },
    /// The answer to a `viewing` frame: who else has that chat open now.
    #[serde(rename = "presence:viewers")]
    Viewers { account_id: String, chat_id: String, viewers: Vec<Viewer> },
}

impl PresenceFrame {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a presence frame always serializes")
    }
}

/// A display name as presence shows it: trimmed, cut, `None` when empty.
pub fn display_name(name: Option<&str>) -> Option<String> {
    let name = name?.trim();
    (!name.is_empty()).then(|| name.chars().take(MAX_NAME_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presence_frames_have_the_contract_shapes_and_no_seq() {
        let typing = PresenceFrame::Typing {
            account_id: "a".into(),
            chat_id: "c".into(),
            sub: "ana".into(),
            name: Some("Ana".into()),
            expires_in_ms: 5000,
        };
        assert_eq!(
            serde_json::to_value(&typing).unwrap(),
            json!({"type": "presence:typing", "account_id": "a", "chat_id": "c", "sub": "ana",
                   "name": "Ana", "expires_in_ms": 5000})
        );
        let viewing = PresenceFrame::Viewing {
            account_id: "a".into(),
            chat_id: "c".into(),
            sub: "ben".into(),
            name: None,
            viewing: false,
        };
        assert_eq!(
            serde_json::to_value(&viewing).unwrap(),
            json!({"type": "presence:viewing", "account_id": "a", "chat_id": "c", "sub": "ben", "viewing": false})
        );
    }

    #[test]
    fn display_names_are_trimmed_cut_and_never_empty() {
        assert_eq!(display_name(Some("  Ana ")), Some("Ana".into()));
        assert_eq!(display_name(Some("   ")), None);
        assert_eq!(display_name(Some(&"é".repeat(100))).unwrap().chars().count(), MAX_NAME_CHARS);
    }

    #[test]
    fn announcements_outside_the_bounds_are_not_sound() {
        let ok = Announcement {
            op: Op::Viewing,
            conn: "r/1".into(),
            sub: "u".into(),
            name: None,
            account_id: "a".into(),
            chat_id: "c".into(),
            ttl_ms: 1000,
        };
        assert!(ok.is_sound());
        assert!(!Announcement { chat_id: String::new(), ..ok.clone() }.is_sound());
        assert!(!Announcement { sub: "x".repeat(256), ..ok }.is_sound());
    }
}
