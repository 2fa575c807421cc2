//! One connection's presence: the `typing` and `viewing` frames it sends, checked
//! against its token, rate-limited, turned into announcements; and, when it goes, the
//! `left` that clears what it viewed.
//!
//! Which chat belongs to which account: fanout has no database, so the frame names
//! the account (`account_id` beside `chat_id`) and the token must list it. Presence is
//! kept and delivered per (account, chat): a frame that pairs a chat with the wrong
//! account of the token's own only ever reaches agents of that account, who see nothing
//! of another account's chat, and nothing is learnt about any account the token lacks.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Presence;
use super::wire::{Announcement, MAX_ID_BYTES, Op, PresenceFrame};
use crate::hub::Scope;
use crate::metrics;

/// Chats one connection may be typing in at once (older ones are forgotten).
const MAX_TYPING_CHATS: usize = 8;
/// At most one `rate_limited` error frame per this long: a flood gets no flood back.
const LIMIT_NOTICE_EVERY: Duration = Duration::from_secs(1);

/// What the connection answers a presence frame with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to say.
    Nothing,
    /// An `error` frame; `counts` when it counts towards the invalid-message limit.
    Error { code: &'static str, message: &'static str, counts: bool },
    /// A presence frame (the current viewers, after `viewing`).
    Frame(String),
}

/// A token bucket: `rate` frames a second, bursts of twice that.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    capacity: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { tokens: rate * 2.0, rate, capacity: rate * 2.0, at: Instant::now() }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// See the module docs; dropping it clears what the connection viewed.
pub struct Member {
    presence: Arc<Presence>,
    id: u64,
    /// Unique across replicas: `{replica}/{id}`.
    conn: String,
    scope: Scope,
    sub: Arc<str>,
    name: Option<String>,
    bucket: Bucket,
    last_notice: Option<Instant>,
    /// When typing was last published, per (account, chat).
    typing: Vec<(String, String, Instant)>,
    /// The chat this connection has open.
    viewing: Option<(String, String)>,
}

impl Member {
    pub(super) fn new(
        presence: Arc<Presence>,
        id: u64,
        conn: String,
        scope: Scope,
        sub: Arc<str>,
        name: Option<String>,
    ) -> Self {
        let bucket = Bucket::new(presence.settings.frames_per_sec);
        Self {
            presence,
            id,
            conn,
            scope,
            sub,
            name,
            bucket,
            last_notice: None,
            typing: Vec::new(),
            viewing: None,
        }
    }

    fn announcement(&self, op: Op, account_id: &str, chat_id: &str, ttl: Duration) -> Announcement {
        Announcement {
            op,
            conn: self.conn.clone(),
            sub: self.sub.to_string(),
            name: self.name.clone(),
            account_id: account_id.to_owned(),
            chat_id: chat_id.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
        }
    }

    /// Takes one frame from the allowance; the reply when it is used up.
    fn limited(&mut self) -> Option<Reply> {
        let now = Instant::now();
        if self.bucket.take(now) {
            return None;
        }
        metrics::presence_frame("rate_limited");
        if self.last_notice.is_some_and(|at| now.duration_since(at) < LIMIT_NOTICE_EVERY) {
            return Some(Reply::Nothing);
        }
        self.last_notice = Some(now);
        Some(Reply::Error {
            code: "rate_limited",
            message: "too many presence frames; slow down",
            counts: false,
        })
    }

    /// Checks the ids against the token; the error to answer otherwise.
    fn check(&self, account_id: &str, chat_id: &str) -> Option<Reply> {
        if account_id.is_empty()
            || chat_id.is_empty()
            || account_id.len() > MAX_ID_BYTES
            || chat_id.len() > MAX_ID_BYTES
        {
            metrics::presence_frame("invalid");
            return Some(Reply::Error {
                code: "invalid_message",
                message: "account_id and chat_id: 1 to 255 bytes",
                counts: true,
            });
        }
        if !self.scope.allows(account_id) {
            metrics::presence_frame("not_allowed");
            return Some(Reply::Error {
                code: "not_allowed",
                message: "the chat's account is not one of the token's accounts",
                counts: true,
            });
        }
        None
    }

    /// `{"type":"typing","account_id":..,"chat_id":..}`: published at once, then at most
    /// once a third of the typing expiry per chat however often the client repeats it.
    pub fn typing(&mut self, account_id: &str, chat_id: &str) -> Reply {
        if let Some(reply) = self.limited().or_else(|| self.check(account_id, chat_id)) {
            return reply;
        }
        metrics::presence_frame("accepted");
        let now = Instant::now();
        let expiry = self.presence.settings.typing_expiry;
        let refresh = expiry / 3;
        match self.typing.iter_mut().find(|(a, c, _)| a == account_id && c == chat_id) {
            Some((_, _, at)) if now.duration_since(*at) < refresh => return Reply::Nothing,
            Some((_, _, at)) => *at = now,
            None => {
                if self.typing.len() >= MAX_TYPING_CHATS {
                    self.typing.remove(0);
                }
                self.typing.push((account_id.to_owned(), chat_id.to_owned(), now));
            }
        }
        self.presence.announce(self.announcement(Op::Typing, account_id, chat_id, expiry));
        Reply::Nothing
    }

    /// `{"type":"viewing","account_id":..,"chat_id":..}` opens a chat (closing the one
    /// open before) and is answered with `presence:viewers`; without `chat_id` it closes
    /// the open one.
    pub fn viewing(&mut self, account_id: Option<&str>, chat_id: Option<&str>) -> Reply {
        if let Some(reply) = self.limited() {
            return reply;
        }
        let Some(chat_id) = chat_id else {
            metrics::presence_frame("accepted");
            self.clear();
            return Reply::Nothing;
        };
        let account_id = account_id.unwrap_or_default();
        if let Some(reply) = self.check(account_id, chat_id) {
            return reply;
        }
        metrics::presence_frame("accepted");
        let same = self.viewing.as_ref().is_some_and(|(a, c)| a == account_id && c == chat_id);
        if !same {
            self.clear();
            let announcement =
                self.announcement(Op::Viewing, account_id, chat_id, self.presence.settings.expiry);
            self.presence.set_local(&self.conn, Some(announcement.clone()));
            self.presence.announce(announcement);
            self.viewing = Some((account_id.to_owned(), chat_id.to_owned()));
        }
        let viewers = self.presence.viewers(account_id, chat_id, &self.sub);
        let frame = PresenceFrame::Viewers {
            account_id: account_id.to_owned(),
            chat_id: chat_id.to_owned(),
            viewers,
        };
        Reply::Frame(frame.to_text())
    }

    /// Closes the open chat, if any, and tells the others.
    fn clear(&mut self) {
        if let Some((account_id, chat_id)) = self.viewing.take() {
            self.presence.set_local(&self.conn, None);
            self.presence.announce(self.announcement(Op::Left, &account_id, &chat_id, Duration::ZERO));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.clear();
        self.presence.leave(self.id, &self.scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket { tokens: 20.0, rate: 10.0, capacity: 20.0, at: start };
        assert_eq!((0..100).filter(|_| bucket.take(start)).count(), 20, "a burst of twice the rate");
        let later = start + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| bucket.take(later)).count(), 10, "then the rate");
    }
}
