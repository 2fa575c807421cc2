//! Read receipts, reactions, edits, deletions and delivery receipts of stored messages.
//!
//! [`apply`] runs inside the batch's transaction, after new messages are inserted, so an
//! update that arrives in the same batch as its message finds it. For every update it
//! locks the message row (all rows of the batch in id order, like the message insert),
//! works out the new state, writes the changed rows back in one statement and returns an
//! event per real change.
//!
//! Rules, all idempotent (a repeated delivery changes nothing, answers `duplicate` and
//! emits nothing):
//! - read: `seen` becomes true with `seen_at` = the event's time. A receipt for an
//!   incoming message means the user read it elsewhere: the chat's unread count goes
//!   down to the incoming messages after it that are unread (never up), and a
//!   `chat:read` follows the `message:read` when it changed.
//! - delivered: `delivered_at` is set; no event (the contract has no such type).
//! - reaction: one reaction per person; a new emoji replaces theirs, an empty one removes
//!   it. One older than the person's stored reaction is stale and `ignored`.
//! - edit: the text is replaced and `edited_at` = the event's time, unless the message is
//!   deleted or the stored edit is newer (`ignored`). Edits with the same time apply in
//!   arrival order (Unipile stamps edits with the message's own time).
//! - delete: a tombstone (`deleted_at`); the row, its id and its place stay.
//!
//! An update for a message the relay never saw creates a placeholder row (see the
//! migration `20261129000005_inbox_updates.sql`), with the chat and account if those are
//! unknown too. The update applies to the placeholder and its event goes out with
//! `"placeholder": true`; the `message_received` or backfill that brings the message later
//! fills the row in, keeping the update.
//!
//! The SQL those steps run (placeholders, locking, write-back, previews, unread counts) is
//! in the private `sql` submodule; this module holds the updates themselves and the rules.

mod sql;

use std::collections::{BTreeMap, BTreeSet};

use crate::payload::{MessagingEvent, MessagingEventKind};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use shared::envelope::Envelope;
use sqlx::{Postgres, Transaction};

use super::chats;
use super::events::{Changed, MessageUpdated, ShownReaction};
use super::messages::{NewMessage, PREVIEW_CHARS, sender_view};
use super::views::{MessageRow, Person, Reaction};
use super::{Outcome, Written};
use sql::{insert_placeholders, lock_messages, lower_unread, update_previews, write_back};

/// What happened to a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Read,
    Delivered,
    /// `value` `None` (or empty) removes `by`'s reaction.
    Reaction {
        value: Option<String>,
        by: Person,
    },
    Edited {
        text: Option<String>,
    },
    Deleted,
}

/// One update of one message, normalised from a webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageUpdate {
    /// The message as far as the update tells it: what a placeholder is made of.
    pub message: NewMessage,
    pub change: Change,
    /// When Unipile says it happened (the delivery's `timestamp`, else when it arrived).
    pub at: DateTime<Utc>,
}

impl MessageUpdate {
    /// Normalises a read, reaction, edit, deletion or delivery webhook; `None` for any
    /// other event.
    pub fn from_webhook(event: &MessagingEvent, received_at: DateTime<Utc>) -> Option<Self> {
        let change = match &event.event {
            MessagingEventKind::MessageRead => Change::Read,
            MessagingEventKind::MessageDelivered => Change::Delivered,
            MessagingEventKind::MessageReaction => Change::Reaction {
                value: event.reaction.clone().filter(|r| !r.trim().is_empty()),
                by: event.reaction_sender.as_ref().map(|a| Person::from(sender_view(a))).unwrap_or_default(),
            },
            MessagingEventKind::MessageEdited => Change::Edited { text: event.message.clone() },
            MessagingEventKind::MessageDeleted => Change::Deleted,
            MessagingEventKind::MessageReceived | MessagingEventKind::Other(_) => return None,
        };
        let mut message = NewMessage::from_webhook(event, Value::Null, received_at);
        message.raw = None;
        message.live = false;
        if matches!(change, Change::Edited { .. } | Change::Deleted) {
            // The event's text is the new one (or none): the placeholder starts without,
            // so that the edit itself applies to it.
            message.text = None;
        }
        Some(Self { at: event.timestamp.unwrap_or(received_at), message, change })
    }
}

/// Applies `updates` in order inside the caller's transaction; one result per update.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[&MessageUpdate],
) -> Result<Vec<Written>, sqlx::Error> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    insert_placeholders(tx, updates).await?;
    let mut rows = lock_messages(tx, updates).await?;

    let mut results = Vec::with_capacity(updates.len());
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut previews: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
    // Per chat, the newest incoming message read by these receipts, and which result
    // announces the chat's lower unread count.
    let mut reads_in: BTreeMap<String, (DateTime<Utc>, usize)> = BTreeMap::new();
    for update in updates {
        let Some(row) = rows.get_mut(&update.message.message_id) else {
            // Inserted or found above, under lock: cannot be missing.
            results.push(Written { outcome: Outcome::Ignored, events: Vec::new() });
            continue;
        };
        let (outcome, event) = change(row, update);
        if outcome == Outcome::Accepted {
            dirty.insert(row.id.clone());
            if matches!(update.change, Change::Edited { .. } | Change::Deleted) {
                previews.insert((row.chat_id.clone(), row.id.clone()), preview(row));
            }
            if update.change == Change::Read && !row.is_sender && !row.placeholder {
                let read = reads_in.entry(row.chat_id.clone()).or_insert((row.sent_at, results.len()));
                if row.sent_at >= read.0 {
                    *read = (row.sent_at, results.len());
                }
            }
        }
        let event = event.map(|change| {
            let event_type = change.event_type();
            let data = MessageUpdated { message_id: row.id.clone(), message: row.record(), change };
            Envelope::new(event_type, row.account_id.clone(), Some(row.chat_id.clone()), update.at, data)
        });
        results.push(Written { outcome, events: event.into_iter().collect() });
    }
    let changed: Vec<&MessageRow> = dirty.iter().map(|id| &rows[id]).collect();
    write_back(tx, &changed).await?;
    update_previews(tx, &previews).await?;
    for chat in lower_unread(tx, &reads_in).await? {
        let (_, result) = reads_in[&chat.id];
        results[result].events.push(chats::chat_read(chat));
    }
    Ok(results)
}

/// Applies one change to the row in memory; returns the outcome and, for a change
/// clients hear about, what changed.
fn change(row: &mut MessageRow, update: &MessageUpdate) -> (Outcome, Option<Changed>) {
    let at = update.at;
    match &update.change {
        Change::Read if row.seen => (Outcome::Duplicate, None),
        Change::Read => {
            row.seen = true;
            row.seen_at = Some(at);
            (Outcome::Accepted, Some(Changed::Read { seen_at: at }))
        }
        Change::Delivered if row.delivered_at.is_some() => (Outcome::Duplicate, None),
        Change::Delivered => {
            row.delivered_at = Some(at);
            (Outcome::Accepted, None)
        }
        Change::Reaction { value, by } => {
            let mut reactions = row.reactions();
            let theirs = reactions.iter().position(|r| r.sender_id.as_deref() == by.key());
            let current = theirs.map(|i| &reactions[i]);
            if current.map(|r| Some(&r.value)) == Some(value.as_ref())
                || (current.is_none() && value.is_none())
            {
                return (Outcome::Duplicate, None);
            }
            if current.is_some_and(|r| r.reacted_at > at) {
                return (Outcome::Ignored, None);
            }
            let reaction = Reaction {
                value: value.clone().unwrap_or_default(),
                sender_id: by.key().map(str::to_owned),
                sender: by.clone(),
                reacted_at: at,
            };
            match (theirs, value) {
                (Some(i), None) => {
                    reactions.remove(i);
                }
                (Some(i), Some(_)) => reactions[i] = reaction.clone(),
                (None, _) => reactions.push(reaction.clone()),
            }
            row.reactions = sqlx::types::Json(json!(reactions));
            let shown = ShownReaction {
                value: value.clone(),
                sender_id: reaction.sender_id,
                sender: reaction.sender,
                reacted_at: reaction.reacted_at,
            };
            (
                Outcome::Accepted,
                Some(Changed::Reaction { reaction: shown, removed: value.is_none(), reactions }),
            )
        }
        Change::Edited { .. } if row.deleted_at.is_some() => (Outcome::Ignored, None),
        Change::Edited { .. } if row.edited_at.is_some_and(|e| e > at) => (Outcome::Ignored, None),
        // Same text: a repeated delivery. (A placeholder's text is not the message's yet.)
        Change::Edited { text } if &row.text == text && (row.edited_at.is_some() || !row.placeholder) => {
            (Outcome::Duplicate, None)
        }
        Change::Edited { text } => {
            row.text = text.clone();
            row.edited_at = Some(at);
            // The new text is in the `message` every update event carries: not twice.
            (Outcome::Accepted, Some(Changed::Edited { edited_at: at }))
        }
        Change::Deleted if row.deleted_at.is_some() => (Outcome::Duplicate, None),
        Change::Deleted => {
            row.deleted_at = Some(at);
            (Outcome::Accepted, Some(Changed::Deleted { deleted_at: at }))
        }
    }
}

/// The chat list's preview of a message after an edit or deletion.
fn preview(row: &MessageRow) -> Option<String> {
    let record = row.record();
    match &record.text {
        _ if record.deleted => Some("[deleted]".to_owned()),
        Some(text) if !text.trim().is_empty() => Some(text.chars().take(PREVIEW_CHARS).collect()),
        _ if !record.attachments.is_empty() => Some("[attachment]".to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::envelope::SenderView;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn row() -> MessageRow {
        MessageRow {
            id: "m1".into(),
            chat_id: "c1".into(),
            account_id: "a1".into(),
            account_type: None,
            text: Some("original".into()),
            sender: sqlx::types::Json(json!(SenderView::default())),
            is_sender: false,
            sent_at: at("2026-11-28T16:00:00Z"),
            attachments: sqlx::types::Json(json!([])),
            quoted: None,
            seen: false,
            seen_at: None,
            delivered_at: None,
            reactions: sqlx::types::Json(json!([])),
            edited_at: None,
            deleted_at: None,
            placeholder: false,
            state: None,
            client_id: None,
            relay_id: None,
            failure_reason: None,
        }
    }

    fn update(change: Change, when: &str) -> MessageUpdate {
        let event: MessagingEvent = serde_json::from_value(json!({
            "event": "message_read", "account_id": "a1", "chat_id": "c1", "message_id": "m1"
        }))
        .unwrap();
        let mut u = MessageUpdate::from_webhook(&event, at(when)).unwrap();
        u.change = change;
        u
    }

    fn person(id: &str) -> Person {
        Person { provider_id: Some(id.into()), ..Person::default() }
    }

    #[test]
    fn a_second_read_receipt_changes_nothing() {
        let mut r = row();
        assert_eq!(change(&mut r, &update(Change::Read, "2026-11-28T16:01:00Z")).0, Outcome::Accepted);
        assert_eq!(change(&mut r, &update(Change::Read, "2026-11-28T16:02:00Z")).0, Outcome::Duplicate);
        assert_eq!(r.seen_at, Some(at("2026-11-28T16:01:00Z")));
    }

    #[test]
    fn an_older_edit_never_overwrites_a_newer_one() {
        let mut r = row();
        let newer = Change::Edited { text: Some("newer".into()) };
        let older = Change::Edited { text: Some("older".into()) };
        assert_eq!(change(&mut r, &update(newer, "2026-11-28T16:05:00Z")).0, Outcome::Accepted);
        assert_eq!(change(&mut r, &update(older, "2026-11-28T16:04:00Z")).0, Outcome::Ignored);
        assert_eq!(r.text.as_deref(), Some("newer"));
    }

    #[test]
    fn a_repeated_edit_is_a_duplicate() {
        let mut r = row();
        let edit = || Change::Edited { text: Some("fixed".into()) };
        assert_eq!(change(&mut r, &update(edit(), "2026-11-28T16:05:00Z")).0, Outcome::Accepted);
        assert_eq!(change(&mut r, &update(edit(), "2026-11-28T16:05:00Z")).0, Outcome::Duplicate);
    }

    #[test]
    fn a_deleted_message_takes_no_edit() {
        let mut r = row();
        assert_eq!(change(&mut r, &update(Change::Deleted, "2026-11-28T16:05:00Z")).0, Outcome::Accepted);
        let edit = Change::Edited { text: Some("late".into()) };
        assert_eq!(change(&mut r, &update(edit, "2026-11-28T16:06:00Z")).0, Outcome::Ignored);
        assert_eq!(change(&mut r, &update(Change::Deleted, "2026-11-28T16:07:00Z")).0, Outcome::Duplicate);
    }

    #[test]
    fn each_person_has_one_reaction_that_a_new_one_replaces_and_an_empty_one_removes() {
        let mut r = row();
        let react =
            |v: Option<&str>, who: &str| Change::Reaction { value: v.map(str::to_owned), by: person(who) };
        assert_eq!(
            change(&mut r, &update(react(Some("👍"), "p1"), "2026-11-28T16:01:00Z")).0,
            Outcome::Accepted
        );
        assert_eq!(
            change(&mut r, &update(react(Some("❤️"), "p2"), "2026-11-28T16:01:00Z")).0,
            Outcome::Accepted
        );
        assert_eq!(
            change(&mut r, &update(react(Some("👍"), "p1"), "2026-11-28T16:01:00Z")).0,
            Outcome::Duplicate
        );
        assert_eq!(
            change(&mut r, &update(react(Some("😂"), "p1"), "2026-11-28T16:02:00Z")).0,
            Outcome::Accepted
        );
        let values: Vec<String> = r.reactions().into_iter().map(|x| x.value).collect();
        assert_eq!(values, ["😂", "❤️"]);
        assert_eq!(
            change(&mut r, &update(react(Some("👍"), "p1"), "2026-11-28T16:01:30Z")).0,
            Outcome::Ignored
        );
        assert_eq!(change(&mut r, &update(react(None, "p2"), "2026-11-28T16:03:00Z")).0, Outcome::Accepted);
        assert_eq!(change(&mut r, &update(react(None, "p2"), "2026-11-28T16:03:00Z")).0, Outcome::Duplicate);
        assert_eq!(r.reactions().len(), 1);
    }

    #[test]
    fn an_edit_that_creates_a_placeholder_applies_to_it() {
        let event: MessagingEvent = serde_json::from_value(json!({
            "event": "message_edited", "account_id": "a1", "chat_id": "c1", "message_id": "m1",
            "message": "new text", "timestamp": "2026-11-28T16:05:00Z"
        }))
        .unwrap();
        let u = MessageUpdate::from_webhook(&event, Utc::now()).unwrap();
        assert_eq!(u.message.text, None, "the placeholder starts without the new text");
        let mut r = row();
        r.placeholder = true;
        r.text = None;
        assert_eq!(change(&mut r, &u).0, Outcome::Accepted);
        assert_eq!(r.text.as_deref(), Some("new text"));
    }
}
