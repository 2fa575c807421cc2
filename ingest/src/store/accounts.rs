//! Account status changes (`{"AccountStatus": {..}}` deliveries).
//!
//! The account is upserted with its new status and the time the relay learnt it; a
//! delivery that repeats the current status changes nothing (`duplicate`, no event).
//! Unipile's deliveries carry no time of their own, so arrival order decides.
//!
//! An account that comes back (a connected status after another one, see
//! [`CONNECTED`]) gets a backfill request in the same transaction, bounded below by
//! the newest activity the relay holds for it; [`crate::unipile::reconnect`] serves it.

use crate::payload::AccountStatusDelivery;
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::envelope::{Envelope, EventType, millis};
use sqlx::{Postgres, Transaction};
use utoipa::ToSchema;

use super::{Outcome, Written, events};

/// One account's new status.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    pub account_id: String,
    pub account_type: Option<String>,
    /// As Unipile words it: `OK`, `CREDENTIALS`, `STOPPED`, ...
    pub status: String,
    pub at: DateTime<Utc>,
    /// Ask for a backfill when this change brings the account back; `ingest sync`,
    /// which is such a backfill itself, does not.
    pub backfill_on_return: bool,
}

impl StatusChange {
    pub fn from_webhook(delivery: &AccountStatusDelivery, received_at: DateTime<Utc>) -> Self {
        let status = &delivery.account_status;
        Self {
            account_id: status.account_id.clone(),
            account_type: status.account_type.clone(),
            status: status.message.as_str().to_owned(),
            at: received_at,
            backfill_on_return: true,
        }
    }
}

/// An account as `account:status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, ToSchema)]
pub struct AccountRecord {
    pub id: String,
    /// The provider: `WHATSAPP`, `LINKEDIN`, ...
    pub account_type: Option<String>,
    /// The account's name at Unipile (often a phone number or a person's name); known
    /// once `ingest sync` or the start-up catch-up has read Unipile's account list.
    pub name: Option<String>,
    /// As Unipile words it: `OK`, `CREDENTIALS`, ...; `null` until one is known.
    pub status: Option<String>,
    /// When the relay learnt the current status.
    #[serde(with = "millis::option")]
    pub status_changed_at: Option<DateTime<Utc>>,
}

/// The statuses of a working account; any other (`CREDENTIALS`, `ERROR`, `STOPPED`,
/// `CONNECTING`, ...) means it is not receiving, and a connected status after one of
/// those is a return.
pub const CONNECTED: [&str; 4] = ["OK", "RECONNECTED", "CREATION_SUCCESS", "SYNC_SUCCESS"];

/// Whether `status` is one of [`CONNECTED`].
pub fn is_connected(status: &str) -> bool {
    CONNECTED.iter().any(|s| s.eq_ignore_ascii_case(status.trim()))
}

/// The columns of [`AccountRecord`].
pub const ACCOUNT_COLUMNS: &str = "id, account_type, name, status, status_changed_at";

/// Applies `changes` in the caller's transaction; one result per change, in order.
///
/// Accounts are locked in id order (and one account's changes kept in arrival order).
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[&StatusChange],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by(|&a, &b| changes[a].account_id.cmp(&changes[b].account_id));
    let mut results: Vec<Option<Written>> = (0..changes.len()).map(|_| None).collect();
    for i in order {
        let change = changes[i];
        // On a return the request keeps the lowest bound of any request still open;
        // a null bound (nothing held) means the whole history.
        let returned = "$6 and accounts.status is not null
                        and not (upper(trim(accounts.status)) = any($5))
                        and upper(trim(excluded.status)) = any($5)";
        let newest = "(select max(last_message_at) from chats where account_id = excluded.id)";
        let updated: Option<AccountRecord> = sqlx::query_as(&format!(
            "insert into accounts (id, account_type, status, status_changed_at)
             values ($1, $2, $3, $4)
             on conflict (id) do update set
                 status = excluded.status,
                 status_changed_at = excluded.status_changed_at,
                 account_type = coalesce(excluded.account_type, accounts.account_type),
                 backfill_since = case
                     when not ({returned}) then accounts.backfill_since
                     when accounts.backfill_requested_at is null then {newest}
                     when accounts.backfill_since is null or {newest} is null then null
                     else least(accounts.backfill_since, {newest}) end,
                 backfill_requested_at = case
                     when {returned} then now() else accounts.backfill_requested_at end,
                 updated_at = now()
             where accounts.status is distinct from excluded.status
             returning {ACCOUNT_COLUMNS}"
        ))
        .bind(&change.account_id)
        .bind(&change.account_type)
        .bind(&change.status)
        .bind(change.at)
        .bind(CONNECTED.as_slice())
        .bind(change.backfill_on_return)
        .fetch_optional(&mut **tx)
        .await?;
        results[i] = Some(match updated {
            Some(account) => Written {
                outcome: Outcome::Accepted,
                events: vec![Envelope::new(
                    EventType::AccountStatus,
                    account.id.clone(),
                    None,
                    change.at,
                    events::AccountStatus { account },
                )],
            },
            None => Written { outcome: Outcome::Duplicate, events: Vec::new() },
        });
    }
    Ok(results.into_iter().map(|r| r.expect("every change was applied")).collect())
}
