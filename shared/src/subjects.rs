//! The NATS subject scheme.
//!
//! Every event is published on `{prefix}.{account}.{chat}.{type}`, for example
//! `relay.events.Wq7hT2mXRbK9vLpA3sDfGh.c4Rt8YuIoP1aSdFgHjKlZx.message_new`. The stream
//! captures `{prefix}.>`; one account's events are `{prefix}.{account}.>`.
//!
//! Ids are Unipile's: usually `[A-Za-z0-9_-]`, but nothing guarantees it. An id made
//! only of those characters is its own token, so subjects stay readable when tailing.
//! Any other id (with `.`, `*`, `>`, spaces, `~`, non-ASCII, or empty) is written as `~`
//! followed by its URL-safe base64. The base64 alphabet has no `~`, so the two forms
//! cannot collide, and no encoded id can add a token or act as a wildcard.
//!
//! Presence (typing, viewing) is not an event and never enters the stream: fanout
//! replicas tell each other on core NATS under a prefix of its own,
//! `{presence_prefix}.{account}.{chat}` (default `relay.presence`), with the same
//! token encoding, and `{presence_prefix}.sync` when a replica starts and asks the
//! others to announce what they hold. The two prefixes must not overlap
//! ([`Subjects::overlaps`]), or the stream would store presence.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::borrow::Cow;

use crate::envelope::EventType;

/// The token standing for "no chat" (account events).
pub const NO_CHAT: &str = "~";

/// Subjects under one configurable prefix, so tests and deployments can isolate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("subject prefix {0:?} must be dot-separated tokens without spaces, `*` or `>`")]
pub struct InvalidPrefix(pub String);

/// What a subject says about its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectParts {
    pub account_id: String,
    pub chat_id: Option<String>,
    pub event_type: EventType,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidPrefix> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && !token.contains(['*', '>'])
                    && !token.chars().any(|c| c.is_whitespace() || c.is_control())
            });
        if valid { Ok(Self { prefix }) } else { Err(InvalidPrefix(prefix)) }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject of one event.
    pub fn event(&self, account_id: &str, chat_id: Option<&str>, event_type: EventType) -> String {
        let chat = chat_id.map(encode_token).unwrap_or(Cow::Borrowed(NO_CHAT));
        format!("{}.{}.{}.{}", self.prefix, encode_token(account_id), chat, event_type.subject_token())
    }

    /// Everything: what the stream captures and what fanout follows.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// Every event of one account.
    pub fn account(&self, account_id: &str) -> String {
        format!("{}.{}.>", self.prefix, encode_token(account_id))
    }

    /// Whether one prefix is the other or lies under it, so that subjects of one would
    /// be captured by `{other}.>`.
    pub fn overlaps(&self, other: &Subjects) -> bool {
        let under = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|rest| rest.starts_with('.'));
        under(&self.prefix, &other.prefix) || under(&other.prefix, &self.prefix)
    }

    /// The presence subject of one chat (with `self` the presence prefix).
    pub fn presence(&self, account_id: &str, chat_id: &str) -> String {
        format!("{}.{}.{}", self.prefix, encode_token(account_id), encode_token(chat_id))
    }

    /// The subject a starting replica asks the others to announce their presence on.
    pub fn presence_sync(&self) -> String {
        format!("{}.sync", self.prefix)
    }

    /// Reads a presence subject back into (account, chat); `None` for anything else.
    pub fn parse_presence(&self, subject: &str) -> Option<(String, String)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (account, chat) = rest.split_once('.')?;
        if chat.contains('.') {
            return None;
        }
        Some((decode_token(account)?, decode_token(chat)?))
    }

    /// Reads an event subject back; `None` for a subject outside this scheme.
    pub fn parse(&self, subject: &str) -> Option<SubjectParts> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let mut tokens = rest.split('.');
        let (account, chat, kind) = (tokens.next()?, tokens.next()?, tokens.next()?);
        if tokens.next().is_some() {
            return None;
        }
        Some(SubjectParts {
            account_id: decode_token(account)?,
            chat_id: if chat == NO_CHAT { None } else { Some(decode_token(chat)?) },
            event_type: EventType::from_subject_token(kind)?,
        })
    }
}

fn is_plain(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One id as one subject token (see the module docs).
pub fn encode_token(id: &str) -> Cow<'_, str> {
    if is_plain(id) {
        Cow::Borrowed(id)
    } else {
        Cow::Owned(format!("~{}", URL_SAFE_NO_PAD.encode(id.as_bytes())))
    }
}

/// The id a token stands for; `None` for a token no id encodes to.
pub fn decode_token(token: &str) -> Option<String> {
    match token.strip_prefix('~') {
        Some(encoded) => {
            let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
            let id = String::from_utf8(bytes).ok()?;
            // Only ids that are not plain are encoded; anything else is not ours.
            (!is_plain(&id)).then_some(id)
        }
        None => is_plain(token).then(|| token.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Subjects {
        Subjects::new("relay.events").unwrap()
    }

    #[test]
    fn presence_subjects_round_trip_and_stay_apart_from_the_stream() {
        let presence = Subjects::new("relay.presence").unwrap();
        let subject = presence.presence("acc", "a.b");
        assert_eq!(presence.parse_presence(&subject), Some(("acc".into(), "a.b".into())));
        assert_eq!(presence.parse_presence(&presence.presence_sync()), None);
        assert!(!presence.overlaps(&subjects()));
        assert!(Subjects::new("relay.events.p").unwrap().overlaps(&subjects()));
        assert!(subjects().overlaps(&Subjects::new("relay.events").unwrap()));
        assert!(!Subjects::new("relay.eventsx").unwrap().overlaps(&subjects()));
    }

    #[test]
    fn plain_ids_are_their_own_tokens() {
        let s = subjects().event("Wq7hT2mXRbK9vLpA3sDfGh", Some("c4Rt-8_x"), EventType::MessageNew);
        assert_eq!(s, "relay.events.Wq7hT2mXRbK9vLpA3sDfGh.c4Rt-8_x.message_new");
    }

    #[test]
    fn special_ids_stay_inside_one_token_and_round_trip() {
        for id in ["a.b", "*", ">", "acc >", "a b\tc", "~x", "é", "a.*.>", "acc\r\n"] {
            let token = encode_token(id);
            assert!(!token.contains(['.', '*', '>', ' ', '\t', '\r', '\n']), "{id:?} leaked into {token:?}");
            assert_eq!(decode_token(&token).as_deref(), Some(id));
            let subject = subjects().event(id, Some(id), EventType::ChatRead);
            let parts = subjects().parse(&subject).expect("parses back");
            assert_eq!(parts.account_id, id);
            assert_eq!(parts.chat_id.as_deref(), Some(id));
        }
    }

    #[test]
    fn an_encoded_id_cannot_match_another_accounts_filter() {
        // `acc.>` as an account id must not land under account `acc`.
        let subject = subjects().event("acc.>", None, EventType::AccountStatus);
        let filter_prefix = subjects().account("acc");
        assert!(!subject.starts_with(filter_prefix.trim_end_matches('>')));
        assert_eq!(subject.split('.').count(), 5);
    }

    #[test]
    fn encoded_and_plain_forms_never_collide() {
        assert_ne!(encode_token("~YQ"), encode_token("a"));
        assert_eq!(decode_token("~YQ"), None, "`a` is plain and never written encoded");
    }

    #[test]
    fn an_empty_id_is_encoded_not_dropped() {
        assert_eq!(encode_token(""), "~");
        assert_eq!(decode_token("~").as_deref(), Some(""));
    }

    #[test]
    fn account_events_have_no_chat() {
        let subject = subjects().event("acc", None, EventType::AccountStatus);
        assert_eq!(subject, "relay.events.acc.~.account_status");
        assert_eq!(subjects().parse(&subject).unwrap().chat_id, None);
    }

    #[test]
    fn subjects_outside_the_scheme_are_not_parsed() {
        assert_eq!(subjects().parse("other.acc.chat.message_new"), None);
        assert_eq!(subjects().parse("relay.events.acc.chat.nope"), None);
        assert_eq!(subjects().parse("relay.events.acc.chat.message_new.extra"), None);
    }

    #[test]
    fn wildcard_or_empty_prefixes_are_rejected() {
        for bad in ["", "a.*", "a.>", "a..b", "a b"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
    }
}
