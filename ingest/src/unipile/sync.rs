//! History backfill: chats and messages pulled through Unipile's API and stored like
//! webhook deliveries, but quietly.
//!
//! Each message becomes the same [`NewMessage`] a `message_received` webhook would
//! (same ids, sender, attachments, chat), marked `live = false` and saved with the
//! store's bulk insert ([`crate::store::messages::insert`]): a message id already
//! stored is left alone, unread counts are not raised, and no `message:new` event is
//! written. Instead each chat's `unread_count` is set to what Unipile reports, and
//! `last_message_at`/preview move forward only if the history holds something newer.
//! No event is emitted at all: clients see the history on their next REST load. So
//! running a backfill twice changes nothing, and live clients are never flooded.
//!
//! What the message list says happened to a message since (`seen`, `reactions`,
//! `deleted`) goes through the store's update rules ([`crate::store::updates::apply`]),
//! the same a read, reaction or deletion webhook follows, and its events are dropped
//! as well. Those rules are idempotent too; the time of such a change is not in the
//! history, so the message's own time stands in for it.
//!
//! `since` bounds the work: messages older than it are not fetched (the message list is
//! newest first, so paging stops there) and chats whose latest activity is older are
//! skipped. [`catch_up`] uses it to fetch what arrived while the relay was away.

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use shared::envelope::SenderView;
use shared::subjects::Subjects;
use sqlx::PgPool;

use super::client::{UnipileClient, UnipileError};
use super::types::{Account, Chat, Message};
use crate::outbox::{self, EventLimits};
use crate::store::accounts::{self, StatusChange};
use crate::store::messages;
use crate::store::updates::{self, Change, MessageUpdate};
use crate::store::views::Person;
use crate::store::{NewMessage, Outcome};

/// Messages saved per transaction.
const CHUNK: usize = 200;

/// Why a backfill stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Unipile(#[from] UnipileError),
    #[error("backfill database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a backfill did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub accounts: usize,
    /// Chats looked at (their row created or refreshed).
    pub chats: usize,
    /// Chats left alone because their latest activity is older than `since`.
    pub chats_skipped: usize,
    /// Messages fetched from Unipile.
    pub messages_fetched: usize,
    /// Messages that were new to the relay.
    pub messages_stored: usize,
}

impl SyncReport {
    fn add(&mut self, other: &SyncReport) {
        self.accounts += other.accounts;
        self.chats += other.chats;
        self.chats_skipped += other.chats_skipped;
        self.messages_fetched += other.messages_fetched;
        self.messages_stored += other.messages_stored;
    }
}

/// An account to backfill, with its provider when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRef {
    pub id: String,
    pub account_type: Option<String>,
}

/// The accounts a backfill without `--account` covers: those in the relay's `accounts`
/// table and those Unipile lists under the API key. What the list says of each (name,
/// provider, status) is recorded on the way ([`record_accounts`]).
#[tracing::instrument(skip_all, err)]
pub async fn known_accounts(
    client: &UnipileClient,
    pool: &PgPool,
    subjects: &Subjects,
) -> Result<Vec<AccountRef>, SyncError> {
    let listed: Vec<Account> = client.accounts().try_collect().await?;
    record_accounts(pool, subjects, &listed).await?;
    let accounts: Vec<AccountRef> =
        sqlx::query_as::<_, (String, Option<String>)>("select id, account_type from accounts order by id")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(id, account_type)| AccountRef { id, account_type })
            .collect();
    Ok(accounts)
}

/// Records what Unipile's account list says: each account's name and provider
/// (quietly), and its status through the rules an account-status webhook follows, so a
/// change is an `account:status` event (committed with it, published by the outbox
/// relay of any running ingest). No backfill is requested for an account found back:
/// the caller is backfilling. Returns how many statuses changed.
pub async fn record_accounts(
    pool: &PgPool,
    subjects: &Subjects,
    listed: &[Account],
) -> Result<usize, sqlx::Error> {
    if listed.is_empty() {
        return Ok(0);
    }
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    let mut sorted: Vec<&Account> = listed.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.dedup_by(|a, b| a.id == b.id);
    for account in &sorted {
        sqlx::query(
            "insert into accounts (id, account_type, name) values ($1, $2, $3)
             on conflict (id) do update set
                 name = coalesce(excluded.name, accounts.name),
                 account_type = coalesce(accounts.account_type, excluded.account_type),
                 updated_at = now()
             where accounts.name is distinct from coalesce(excluded.name, accounts.name)
                or (accounts.account_type is null and excluded.account_type is not null)",
        )
        .bind(&account.id)
        .bind(&account.account_type)
        .bind(&account.name)
        .execute(&mut *tx)
        .await?;
    }
    let changes: Vec<StatusChange> = sorted
        .iter()
        .filter_map(|account| {
            account.status().map(|status| StatusChange {
                account_id: account.id.clone(),
                account_type: account.account_type.clone(),
                status: status.to_owned(),
                at: now,
                backfill_on_return: false,
            })
        })
        .collect();
    let written = accounts::apply(&mut tx, &changes.iter().collect::<Vec<_>>()).await?;
    let mut events: Vec<_> = written.into_iter().flat_map(|w| w.events).collect();
    let changed = events.len();
    outbox::enqueue(&mut tx, subjects, &EventLimits::default(), &mut events).await?;
    tx.commit().await?;
    Ok(changed)
}

/// Told how a backfill goes, chat after chat ([`sync_accounts_with`]).
pub trait Progress: Send + Sync {
    /// `account` is next.
    fn account_started(&self, _account: &AccountRef) {}
    /// A chat is done: `fetched` messages read from Unipile, `stored` of them new.
    fn chat_done(&self, _fetched: usize, _stored: usize) {}
    /// A chat was skipped (no activity since `since`).
    fn chat_skipped(&self) {}
}

/// Tells nobody.
pub struct Quiet;

impl Progress for Quiet {}

/// Backfills every chat of each account.
pub async fn sync_accounts(
    client: &UnipileClient,
    pool: &PgPool,
    accounts: &[AccountRef],
    since: Option<DateTime<Utc>>,
) -> Result<SyncReport, SyncError> {
    sync_accounts_with(client, pool, accounts, since, &Quiet).await
}

/// [`sync_accounts`], telling `progress` as it goes.
pub async fn sync_accounts_with(
    client: &UnipileClient,
    pool: &PgPool,
    accounts: &[AccountRef],
    since: Option<DateTime<Utc>>,
    progress: &dyn Progress,
) -> Result<SyncReport, SyncError> {
    let mut total = SyncReport::default();
    for account in accounts {
        progress.account_started(account);
        total.add(&sync_account(client, pool, account, since, progress).await?);
    }
    Ok(total)
}

/// Backfills one account's chats and their messages back to `since` (all of them
/// when `None`).
#[tracing::instrument(skip_all, fields(account_id = %account.id, since = ?since), err)]
pub async fn sync_account(
    client: &UnipileClient,
    pool: &PgPool,
    account: &AccountRef,
    since: Option<DateTime<Utc>>,
    progress: &dyn Progress,
) -> Result<SyncReport, SyncError> {
    sqlx::query(
        "insert into accounts (id, account_type) values ($1, $2)
         on conflict (id) do update set account_type = excluded.account_type, updated_at = now()
         where accounts.account_type is null and excluded.account_type is not null",
    )
    .bind(&account.id)
    .bind(&account.account_type)
    .execute(pool)
    .await?;
    let mut report = SyncReport { accounts: 1, ..Default::default() };
    let mut chats = client.chats(&account.id);
    while let Some(chat) = chats.try_next().await? {
        if chat.account_id != account.id {
            tracing::warn!(chat_id = %chat.id, chat_account_id = %chat.account_id, "unipile listed a chat of another account; skipped");
            continue;
        }
        if since.zip(chat.timestamp).is_some_and(|(since, active)| active < since) {
            report.chats_skipped += 1;
            progress.chat_skipped();
            continue;
        }
        let (fetched, stored) = sync_chat(client, pool, &chat, account, since).await?;
        report.chats += 1;
        report.messages_fetched += fetched;
        report.messages_stored += stored;
        progress.chat_done(fetched, stored);
    }
    tracing::info!(
        chats = report.chats,
        chats_skipped = report.chats_skipped,
        messages_fetched = report.messages_fetched,
        messages_stored = report.messages_stored,
        "account backfilled"
    );
    Ok(report)
}

/// One chat: its row, its messages newer than `since`, its unread count.
#[tracing::instrument(skip_all, fields(chat_id = %chat.id), err)]
async fn sync_chat(
    client: &UnipileClient,
    pool: &PgPool,
    chat: &Chat,
    account: &AccountRef,
    since: Option<DateTime<Utc>>,
) -> Result<(usize, usize), SyncError> {
    let account_type = chat.account_type.clone().or_else(|| account.account_type.clone());
    sqlx::query(
        "insert into chats (id, account_id, account_type, provider_chat_id, name, is_group, unread_count)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (id) do nothing",
    )
    .bind(&chat.id)
    .bind(&chat.account_id)
    .bind(&account_type)
    .bind(&chat.provider_id)
    .bind(&chat.name)
    .bind(chat.is_group())
    .bind(chat.unread_count.unwrap_or(0).max(0))
    .execute(pool)
    .await?;

    let mut fetched = 0;
    let mut stored = 0;
    let mut pending = Vec::with_capacity(CHUNK);
    let mut messages = client.messages(&chat.id).boxed();
    while let Some((message, raw)) = messages.try_next().await? {
        let Some(sent_at) = message.timestamp.or(chat.timestamp) else {
            tracing::warn!(message_id = %message.id, "history message without a timestamp; skipped");
            continue;
        };
        if since.is_some_and(|since| sent_at < since) {
            break;
        }
        fetched += 1;
        let new = to_new_message(chat, account_type.as_deref(), &message, raw, sent_at);
        pending.push((history_changes(&message), new));
        if pending.len() >= CHUNK {
            stored += save(pool, &pending).await?;
            pending.clear();
        }
    }
    drop(messages);
    stored += save(pool, &pending).await?;

    if let Some(unread) = chat.unread_count {
        sqlx::query(
            "update chats set unread_count = $2, name = coalesce($3, name), updated_at = now()
             where id = $1 and (unread_count <> $2 or name is distinct from coalesce($3, name))",
        )
        .bind(&chat.id)
        .bind(unread.max(0))
        .bind(&chat.name)
        .execute(pool)
        .await?;
    }
    Ok((fetched, stored))
}

/// Saves quietly (`live = false`, events of updates dropped); returns how many
/// messages were new.
async fn save(pool: &PgPool, batch: &[(Vec<Change>, NewMessage)]) -> Result<usize, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    let new: Vec<&NewMessage> = batch.iter().map(|(_, m)| m).collect();
    let history: Vec<MessageUpdate> = batch
        .iter()
        .flat_map(|(changes, m)| {
            changes.iter().map(|change| MessageUpdate {
                message: m.clone(),
                change: change.clone(),
                at: m.sent_at,
            })
        })
        .collect();
    let mut tx = pool.begin().await?;
    crate::store::batcher::lock_chat_ids(&mut tx, new.iter().map(|m| m.chat_id.as_str())).await?;
    let inserted = messages::insert(&mut tx, &new).await?;
    updates::apply(&mut tx, &history.iter().collect::<Vec<_>>()).await?;
    tx.commit().await?;
    Ok(inserted.iter().filter(|r| r.outcome == Outcome::Accepted).count())
}

/// What the message list says happened to a message after it was sent.
pub fn history_changes(message: &Message) -> Vec<Change> {
    let mut changes = Vec::new();
    if message.seen {
        changes.push(Change::Read);
    }
    for reaction in &message.reactions {
        let value = reaction.get("value").and_then(|v| v.as_str()).filter(|v| !v.trim().is_empty());
        let sender_id = reaction.get("sender_id").and_then(|v| v.as_str());
        if let (Some(value), Some(sender_id)) = (value, sender_id) {
            let by = Person { provider_id: Some(sender_id.to_owned()), ..Person::default() };
            changes.push(Change::Reaction { value: Some(value.to_owned()), by });
        }
    }
    if message.deleted {
        changes.push(Change::Deleted);
    }
    changes
}

/// A history message as the store takes it: the same fields a webhook fills.
pub fn to_new_message(
    chat: &Chat,
    account_type: Option<&str>,
    message: &Message,
    raw: serde_json::Value,
    sent_at: DateTime<Utc>,
) -> NewMessage {
    // The history API gives no sender name; in a one-to-one chat the other person is
    // the chat's name.
    let sender_name = (!message.is_sender && !chat.is_group()).then(|| chat.name.clone()).flatten();
    NewMessage {
        account_id: chat.account_id.clone(),
        account_type: account_type.map(str::to_owned),
        chat_id: chat.id.clone(),
        provider_chat_id: chat.provider_id.clone(),
        chat_name: chat.name.clone(),
        is_group: chat.is_group(),
        message_id: message.id.clone(),
        provider_message_id: message.provider_id.clone(),
        text: message.text.clone(),
        sender: SenderView {
            id: message.sender_attendee_id.clone(),
            name: sender_name,
            provider_id: message.sender_id.clone(),
            profile_url: None,
        },
        is_sender: message.is_sender,
        sent_at,
        attachments: message.attachments.clone(),
        quoted: message.quoted.clone().filter(|q| !q.is_null()),
        raw: Some(raw),
        live: false,
    }
}

/// Records Unipile's account list ([`record_accounts`]), then backfills, for every
/// account the relay has messages of, what arrived since the newest message it holds
/// (messages at that very instant are fetched again and recognised as duplicates).
/// Accounts without messages are left to `ingest sync`.
#[tracing::instrument(skip_all, err)]
pub async fn catch_up(
    client: &UnipileClient,
    pool: &PgPool,
    subjects: &Subjects,
) -> Result<SyncReport, SyncError> {
    let listed: Vec<Account> = client.accounts().try_collect().await?;
    record_accounts(pool, subjects, &listed).await?;
    let latest: Vec<(String, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "select a.id, a.account_type, max(m.sent_at)
         from accounts a join messages m on m.account_id = a.id
         group by a.id, a.account_type
         order by a.id",
    )
    .fetch_all(pool)
    .await?;
    let mut total = SyncReport::default();
    for (id, account_type, since) in latest {
        let account = AccountRef { id, account_type };
        total.add(&sync_account(client, pool, &account, Some(since), &Quiet).await?);
    }
    Ok(total)
}

/// Key of the advisory lock that lets one replica at a time run the start-up catch-up
/// (the bytes of "unipilesy").
pub const CATCH_UP_LOCK_KEY: i64 = 0x756e_6970_696c_6573;

/// [`catch_up`] until it succeeds, pausing longer after each failure. When replicas
/// start together, the one that takes the lock does it and the others skip it: the
/// history is the same for all.
pub async fn run_catch_up(
    client: UnipileClient,
    pool: PgPool,
    subjects: Subjects,
    backoff: super::registration::BackgroundBackoff,
) {
    let mut pause = backoff.first;
    loop {
        match catch_up_once(&client, &pool, &subjects).await {
            Ok(Some(report)) => {
                tracing::info!(
                    accounts = report.accounts,
                    chats = report.chats,
                    messages_stored = report.messages_stored,
                    "start-up catch-up done"
                );
                return;
            }
            Ok(None) => {
                tracing::info!("another replica is running the start-up catch-up; skipped here");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_s = pause.as_secs(), "start-up catch-up failed; retrying in the background");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(backoff.max);
            }
        }
    }
}

/// [`catch_up`] under [`CATCH_UP_LOCK_KEY`]; `None` when another replica holds it.
async fn catch_up_once(
    client: &UnipileClient,
    pool: &PgPool,
    subjects: &Subjects,
) -> Result<Option<SyncReport>, SyncError> {
    let mut lock = pool.begin().await?;
    let acquired: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(CATCH_UP_LOCK_KEY)
        .fetch_one(&mut *lock)
        .await?;
    if !acquired {
        return Ok(None);
    }
    let report = catch_up(client, pool, subjects).await?;
    lock.commit().await?;
    Ok(Some(report))
}
