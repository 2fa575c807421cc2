//! One event as fanout holds it: the stamped bytes every client receives, plus what
//! routing needs (account, chat) and what lag measurement needs (`occurred_at`).
//!
//! Built once per stream message, then shared by `Arc` with every connection: the
//! bytes are never serialized again.

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde::Deserialize;
use shared::envelope::stamp_seq;
use shared::subjects::Subjects;

/// An event ready to send, with its stream sequence stamped in.
#[derive(Debug)]
pub struct Event {
    /// JetStream stream sequence, also written into the JSON as `seq`.
    pub seq: u64,
    pub account_id: String,
    pub chat_id: Option<String>,
    /// `occurred_at` in milliseconds since the epoch, for the delivery lag histogram.
    pub occurred_at_ms: Option<i64>,
    /// The JSON text frame, validated as UTF-8 once.
    pub text: Utf8Bytes,
    /// When this replica took it from the stream (or its window was filled with it).
    pub received: std::time::Instant,
}

/// Why a stream message was not turned into an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("subject outside the event scheme")]
    Subject,
    #[error("payload is not a JSON object without `seq`")]
    Payload,
    #[error("payload is not UTF-8")]
    Utf8,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Subject => "subject",
            Skip::Payload => "payload",
            Skip::Utf8 => "utf8",
        }
    }
}

/// The only fields fanout reads of an event. Naming `seq` makes serde refuse a payload
/// that already carried one (a foreign publisher): it would hold the key twice.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    occurred_at: Option<&'a str>,
    #[allow(dead_code)]
    seq: u64,
}

impl Event {
    /// Builds the event for the message at `seq` on `subject`.
    pub fn from_stream(subjects: &Subjects, subject: &str, payload: &[u8], seq: u64) -> Result<Self, Skip> {
        let parts = subjects.parse(subject).ok_or(Skip::Subject)?;
        let stamped = stamp_seq(payload, seq).ok_or(Skip::Payload)?;
        let occurred_at_ms = serde_json::from_slice::<Peek<'_>>(&stamped)
            .map_err(|_| Skip::Payload)?
            .occurred_at
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        let text = Utf8Bytes::try_from(Bytes::from(stamped)).map_err(|_| Skip::Utf8)?;
        Ok(Self {
            seq,
            account_id: parts.account_id,
            chat_id: parts.chat_id,
            occurred_at_ms,
            text,
            received: std::time::Instant::now(),
        })
    }

    /// Seconds from `occurred_at` to now, when the event carries one.
    pub fn lag_seconds(&self, now_ms: i64) -> Option<f64> {
        self.occurred_at_ms.map(|at| (now_ms - at).max(0) as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::envelope::{Envelope, EventType};

    #[test]
    fn a_stream_message_becomes_stamped_text_with_its_routing() {
        let subjects = Subjects::new("t.events").unwrap();
        let env = Envelope::new(
            EventType::MessageNew,
            "acc",
            Some("chat".into()),
            chrono::Utc::now(),
            serde_json::json!({}),
        );
        let subject = subjects.event("acc", Some("chat"), EventType::MessageNew);
        let event = Event::from_stream(&subjects, &subject, &env.to_bytes(), 42).unwrap();
        assert_eq!(event.account_id, "acc");
        assert_eq!(event.chat_id.as_deref(), Some("chat"));
        let back: Envelope = serde_json::from_str(event.text.as_str()).unwrap();
        assert_eq!(back.seq, Some(42));
        assert!(event.lag_seconds(chrono::Utc::now().timestamp_millis()).unwrap() < 5.0);
    }

    #[test]
    fn foreign_subjects_and_payloads_are_skipped() {
        let subjects = Subjects::new("t.events").unwrap();
        assert_eq!(
            Event::from_stream(&subjects, "other.a.b.message_new", b"{}", 1).unwrap_err(),
            Skip::Subject
        );
        let subject = subjects.event("a", None, EventType::AccountStatus);
        assert_eq!(Event::from_stream(&subjects, &subject, b"[1]", 1).unwrap_err(), Skip::Payload);
    }

    #[test]
    fn a_payload_that_already_carries_a_seq_is_skipped() {
        let subjects = Subjects::new("t.events").unwrap();
        let subject = subjects.event("a", None, EventType::AccountStatus);
        let foreign = br#"{"seq":7,"type":"account:status","occurred_at":"2026-11-29T10:00:00.000Z"}"#;
        assert_eq!(Event::from_stream(&subjects, &subject, foreign, 9).unwrap_err(), Skip::Payload);
    }
}
