//! Authenticated deliveries the relay could not use, kept with the reason.
//!
//! Unipile retries anything but a 200, so an unusable body is stored here and answered
//! 200: nothing is lost, and an operator can inspect or replay it.

use sqlx::PgPool;

/// Stores one unusable delivery.
#[tracing::instrument(skip_all, fields(endpoint, reason), err)]
pub async fn insert(
    pool: &PgPool,
    endpoint: &str,
    reason: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("insert into dead_letters (endpoint, reason, content_type, body) values ($1, $2, $3, $4)")
        .bind(endpoint)
        .bind(reason)
        .bind(content_type)
        .bind(body)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes the dead letters received before `before`; returns how many.
pub async fn prune(pool: &PgPool, before: chrono::DateTime<chrono::Utc>) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("delete from dead_letters where created_at < $1").bind(before).execute(pool).await?;
    Ok(done.rows_affected())
}
