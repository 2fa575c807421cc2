//! The database: the one pool builder and the migrations, for the service and the
//! commands alike.

use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseArgs;

/// Migrations, embedded at compile time and applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A pool of at most `max_connections` to `url`, waiting up to `acquire_timeout` for a
/// free one.
pub async fn pool(
    url: &SecretString,
    max_connections: u32,
    acquire_timeout: Duration,
) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect(url.expose_secret())
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")
}

/// The pool `args` describe (capped at `max_connections`), with the migrations applied.
pub async fn connect_and_migrate(args: &DatabaseArgs, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = pool(
        &args.database_url,
        args.database_max_connections.clamp(1, max_connections.max(1)),
        Duration::from_millis(args.database_acquire_timeout_ms),
    )
    .await?;
    MIGRATOR.run(&pool).await.context("applying database migrations")?;
    Ok(pool)
}
