//! Account status changes (`{"AccountStatus": {..}}` deliveries).
//!
//! The account is upserted with its new status and the time the relay learnt it; a
//! delivery that repeats the current status changes nothing (`duplicate`, no event).
//! Unipile's deliveries carry no time of their own, so arrival order decides.

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
}

impl StatusChange {
    pub fn from_webhook(delivery: &AccountStatusDelivery, received_at: DateTime<Utc>) -> Self {
        let status = &delivery.account_status;
        Self {
            account_id: status.account_id.clone(),
            account_type: status.account_type.clone(),
            status: status.message.as_str().to_owned(),
            at: received_at,
        }
    }
}

/// An account as `account:status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, ToSchema)]
pub struct AccountRecord {
    pub id: String,
    /// The provider: `WHATSAPP`, `LINKEDIN`, ...
    pub account_type: Option<String>,
    pub status: Option<String>,
    /// When the relay learnt the current status.
    #[serde(with = "millis::option")]
    pub status_changed_at: Option<DateTime<Utc>>,
}

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
        let updated: Option<AccountRecord> = sqlx::query_as(
            "insert into accounts (id, account_type, status, status_changed_at)
             values ($1, $2, $3, $4)
             on conflict (id) do update set
                 status = excluded.status,
                 status_changed_at = excluded.status_changed_at,
                 account_type = coalesce(excluded.account_type, accounts.account_type),
                 updated_at = now()
             where accounts.status is distinct from excluded.status
             returning id, account_type, status, status_changed_at",
        )
        .bind(&change.account_id)
        .bind(&change.account_type)
        .bind(&change.status)
        .bind(change.at)
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
