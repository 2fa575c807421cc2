//! The WebSocket clients: each records every event it gets, and reconnects with
//! `?since=` when fanout closes it, as a real client would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::idle::{Ws, open_with_hello};
use crate::report::now_us;

/// What one client saw of an event.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    pub(super) at_us: u64,
    pub(super) truncated: bool,
}

/// Everything one client received.
#[derive(Debug, Default)]
pub(super) struct ClientLog {
    event_ids: HashSet<String>,
    /// Events whose id this client had already received.
    pub(super) duplicates: u64,
    /// `message:new` by message id (first arrival).
    pub(super) new: HashMap<String, Seen>,
    /// `message:edited` by message id (first arrival).
    pub(super) edited: HashMap<String, Seen>,
    pub(super) other_events: u64,
    pub(super) unreadable: u64,
    /// The last event's `seq` (or the first `hello`'s): where a reconnection resumes.
    last_seq: Option<u64>,
    /// Why its connections ended, for the ones that did before the end of the run.
    pub(super) ends: BTreeMap<String, u64>,
}

/// The fields of an event frame the check needs; the rest is skipped unread.
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    seq: Option<u64>,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    data: FrameData,
}

#[derive(Debug, Default, Deserialize)]
struct FrameData {
    /// `message:new`: the message, whose `id` is the message id.
    message: Option<MessageRef>,
    /// `message:edited` (and other updates): the message id.
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageRef {
    id: Option<String>,
}

impl ClientLog {
    pub(super) fn hello(&mut self, hello: &str) {
        if self.last_seq.is_none() {
            self.last_seq = serde_json::from_str::<Frame>(hello).ok().and_then(|f| f.seq);
        }
    }

    fn record(&mut self, frame: Option<Frame>, at_us: u64) {
        let Some(frame) = frame else {
            self.unreadable += 1;
            return;
        };
        let Some(id) = frame.id else { return };
        if let Some(seq) = frame.seq {
            self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        }
        if !self.event_ids.insert(id) {
            self.duplicates += 1;
            return;
        }
        let seen = Seen { at_us, truncated: frame.truncated };
        let entry = match (frame.kind.as_str(), frame.data) {
            ("message:new", FrameData { message: Some(MessageRef { id: Some(id) }), .. }) => {
                self.new.entry(id)
            }
            ("message:edited", FrameData { message_id: Some(id), .. }) => self.edited.entry(id),
            _ => {
                self.other_events += 1;
                return;
            }
        };
        entry.or_insert(seen);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one connection's events into `log` until it ends; returns why it ended.
async fn read_events(ws: &mut Ws, log: &Mutex<ClientLog>) -> String {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let at_us = now_us();
                let frame = serde_json::from_str::<Frame>(text.as_str()).ok();
                lock(log).record(frame, at_us);
            }
            Ok(Message::Close(frame)) => {
                return format!("closed {}", frame.map(|f| u16::from(f.code)).unwrap_or(0));
            }
            Err(e) => return format!("read error: {e}"),
            Ok(_) => {}
        }
    }
    "ended".into()
}

/// A client for the whole run: reads events, and when its connection ends reconnects
/// with `?since=` its last sequence, as a browser would. Runs until aborted.
pub(super) async fn follow(
    mut ws: Ws,
    url: String,
    source: SocketAddr,
    addr: SocketAddr,
    log: Arc<Mutex<ClientLog>>,
) {
    loop {
        let why = read_events(&mut ws, &log).await;
        *lock(&log).ends.entry(why).or_default() += 1;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let since = lock(&log).last_seq.unwrap_or(0);
            match open_with_hello(&format!("{url}&since={since}"), source, addr).await {
                Ok((opened, _)) => {
                    ws = opened;
                    break;
                }
                Err(e) => *lock(&log).ends.entry(format!("reconnect failed: {e:#}")).or_default() += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Option<Frame> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn a_client_log_matches_events_to_messages_and_counts_duplicates() {
        let mut log = ClientLog::default();
        log.hello(r#"{"type":"hello","connection_id":"c","seq":40,"heartbeat_s":30}"#);
        assert_eq!(log.last_seq, Some(40));
        let new = r#"{"type":"message:new","id":"e1","seq":41,"account_id":"a","chat_id":"c",
                      "occurred_at":"t","data":{"message":{"id":"m1","text":"hi"},"chat":{"id":"c"}}}"#;
        let edited = r#"{"type":"message:edited","id":"e2","seq":42,"truncated":true,
                         "data":{"message_id":"m1","text":"x"}}"#;
        log.record(frame(new), 100);
        log.record(frame(edited), 200);
        log.record(frame(new), 300);
        log.record(frame(r#"{"type":"pong"}"#), 400);
        log.record(frame("not json"), 500);
        assert_eq!(log.duplicates, 1);
        assert_eq!(log.new["m1"].at_us, 100);
        assert!(!log.new["m1"].truncated);
        assert!(log.edited["m1"].truncated);
        assert_eq!(log.last_seq, Some(42));
        assert_eq!(log.unreadable, 1);
        // A later hello (a resumed connection) does not move the resume point.
        log.hello(r#"{"type":"hello","seq":99}"#);
        assert_eq!(log.last_seq, Some(42));
    }
}
