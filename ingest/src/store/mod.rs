//! Writes to PostgreSQL: what a delivery becomes, and the group commit that saves it.
//!
//! Webhook handlers turn a delivery into a [`Write`] and hand it to the [`Batcher`]. The
//! batcher's writers take whatever deliveries are queued, commit them in one
//! transaction (accounts, chats, messages, unread counts, outbox rows; a few statements
//! per batch, not per delivery) and answer each handler only after that commit.

pub mod accounts;
pub mod batcher;
pub mod chats;
pub mod dead_letters;
pub mod events;
pub mod messages;
pub mod replies;
pub mod updates;
pub mod views;

pub use batcher::{AfterCommit, Batcher};
pub use messages::NewMessage;

/// What became of one delivery; the webhook answers with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stored, and its event is in the outbox.
    Accepted,
    /// Already stored before; nothing changed.
    Duplicate,
    /// Understood, but nothing to store (e.g. an event kind the relay does not keep).
    Ignored,
}

/// What one write of a batch did, and the events it emits (in order) for the outbox.
#[derive(Debug)]
pub struct Written {
    pub outcome: Outcome,
    pub events: Vec<shared::envelope::Envelope>,
}

/// One delivery's worth of writes.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new message (live from a webhook, or historical from a backfill).
    Message(NewMessage),
    /// A read receipt, reaction, edit, deletion or delivery of a message.
    Update(updates::MessageUpdate),
    /// An account's new status.
    AccountStatus(accounts::StatusChange),
    /// A chat marked read through the REST API.
    MarkRead(chats::MarkRead),
    /// A reply about to be sent through Unipile (stored `pending`).
    Reply(replies::NewReply),
    /// Unipile's answer to a reply (`sent` or `failed`).
    ReplyDone(replies::ReplyDone),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be used (connection lost, timeout, pool exhausted...):
    /// the same write may succeed later.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database refused this write for its data, alone in its transaction: it can
    /// never succeed, so retrying is pointless.
    #[error("the database refused the write: {reason}")]
    Rejected { reason: String },
    #[error("the writers' queue is full")]
    Saturated,
    #[error("the writers have stopped")]
    Stopped,
}

/// Whether a database error is worth retrying the whole transaction for.
pub(crate) fn is_retryable(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == "40P01" || code == "40001")
}

/// Whether the database refused a statement for the data it was given, so that the same
/// data will always be refused: SQLSTATE class 22 (data exception: U+0000, a time out of
/// range...), 23 (integrity constraint) except 23505 (a unique conflict is a race with
/// another writer and resolves on retry) and 54 (program limit: an index row too large).
pub fn is_data_error(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| {
        code.starts_with("22") || code.starts_with("54") || (code.starts_with("23") && code != "23505")
    })
}

fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    error.as_database_error().and_then(|e| e.code())
}
