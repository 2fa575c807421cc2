//! The backfill of an account that came back.
//!
//! While an account is disconnected (`CREDENTIALS`, `ERROR`, `STOPPED`, ...) Unipile
//! sends none of its messages, and it does not resend them all once the account is
//! back. So the transaction that stores the return (`OK`/`RECONNECTED` after another
//! status, [`crate::store::accounts`]) also records a backfill request, bounded below by
//! the newest activity the relay then held for the account. This worker, one in every
//! ingest replica, serves those requests:
//!
//! - it claims one due request with a lease ([`LEASE`]), so replicas never run the same
//!   account at once and a replica that dies mid-way leaves it to another once the
//!   lease runs out;
//! - it backfills the account since that bound, quietly, as `ingest sync` does (a
//!   message already stored is left alone, so running it twice changes nothing);
//! - on success it clears the request, unless a newer return came meanwhile (then the
//!   account is run again); on failure (Unipile away, 429) it retries after
//!   [`RETRY_AFTER`].
//!
//! It wakes when an account-status webhook was stored here, and polls every
//! [`POLL`] for requests stored by other replicas or left by a dead one.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::UnipileClient;
use super::sync::{self, AccountRef, Quiet};

/// How long a claimed backfill is this replica's before another may take it over.
pub const LEASE: Duration = Duration::from_secs(600);
/// How soon a failed backfill is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often due requests are looked for without a wake-up.
pub const POLL: Duration = Duration::from_secs(5);

/// A request this replica holds the lease of.
#[derive(Debug, sqlx::FromRow)]
struct Claimed {
    id: String,
    account_type: Option<String>,
    backfill_requested_at: DateTime<Utc>,
    backfill_since: Option<DateTime<Utc>>,
}

/// Serves backfill requests until `stop`; never ends on its own (errors are logged and
/// retried).
pub async fn run(client: UnipileClient, pool: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        loop {
            match run_one(&client, &pool).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(error) => {
                    tracing::warn!(%error, "looking for account backfills failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = wake.notified() => {},
            _ = tokio::time::sleep(POLL) => {},
            _ = stop.cancelled() => return,
        }
    }
}

/// Claims and serves one due request; `false` when none is due.
pub async fn run_one(client: &UnipileClient, pool: &PgPool) -> Result<bool, sqlx::Error> {
    let claimed: Option<Claimed> = sqlx::query_as(
        "update accounts set backfill_lease_until = now() + make_interval(secs => $1)
         where id = (
             select id from accounts
             where backfill_requested_at is not null
               and (backfill_lease_until is null or backfill_lease_until < now())
             order by backfill_requested_at
             limit 1
             for update skip locked)
         returning id, account_type, backfill_requested_at, backfill_since",
    )
    .bind(LEASE.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let Some(claimed) = claimed else { return Ok(false) };
    let account = AccountRef { id: claimed.id.clone(), account_type: claimed.account_type.clone() };
    let span =
        tracing::info_span!("account_backfill", account_id = %claimed.id, since = ?claimed.backfill_since);
    let result = tracing::Instrument::instrument(
        sync::sync_accounts_with(
            client,
            pool,
            std::slice::from_ref(&account),
            claimed.backfill_since,
            &Quiet,
        ),
        span,
    )
    .await;
    match result {
        Ok(report) => {
            tracing::info!(
                account_id = %claimed.id,
                chats = report.chats,
                messages_stored = report.messages_stored,
                "account back: backfilled what it missed"
            );
            // Cleared only if no newer return was recorded meanwhile; otherwise the
            // lease goes and the next round runs the account again.
            sqlx::query(
                "update accounts set
                     backfill_lease_until = null,
                     backfill_since = case when backfill_requested_at = $2 then null else backfill_since end,
                     backfill_requested_at = case when backfill_requested_at = $2 then null
                                                  else backfill_requested_at end
                 where id = $1",
            )
            .bind(&claimed.id)
            .bind(claimed.backfill_requested_at)
            .execute(pool)
            .await?;
        }
        Err(error) => {
            tracing::warn!(
                account_id = %claimed.id,
                %error,
                retry_in_s = RETRY_AFTER.as_secs(),
                "backfilling a returned account failed; retrying later"
            );
            sqlx::query(
                "update accounts set backfill_lease_until = now() + make_interval(secs => $2) where id = $1",
            )
            .bind(&claimed.id)
            .bind(RETRY_AFTER.as_secs_f64())
            .execute(pool)
            .await?;
        }
    }
    Ok(true)
}
