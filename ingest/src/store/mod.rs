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
pub mod messages;
pub mod updates;
pub mod views;

pub use batcher::Batcher;
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
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the writers' queue is full")]
    Saturated,
    #[error("the writers have stopped")]
    Stopped,
}

/// Whether a database error is worth retrying the whole transaction for.
pub(crate) fn is_retryable(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "40P01" || code == "40001")
}
