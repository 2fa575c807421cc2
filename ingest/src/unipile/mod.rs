//! Everything the relay asks of Unipile's REST API.
//!
//! - [`client`]: a typed client with timeouts, retries and cursor pagination.
//! - [`types`]: the request and response bodies of its REST API, read leniently.
//! - [`registration`]: keeping the relay's two webhooks registered (at start-up and with
//!   `ingest webhooks ensure`).
//! - [`sync`]: history backfill (`ingest sync`, and the catch-up at start-up).
//! - [`reconnect`]: the backfill of an account that came back after a disconnect.
//! - [`cli`]: the `ingest webhooks ...` and `ingest sync` commands.

pub mod cli;
pub mod client;
pub mod reconnect;
pub mod registration;
pub mod sync;
pub mod types;

pub use client::{ClientConfig, OutgoingFile, RetryPolicy, SendError, UnipileClient, UnipileError};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::ServeConfig;
use registration::{BackgroundBackoff, Registration};

/// Starts what `ingest serve` does with Unipile's API in the background: registering
/// the webhooks and, with `--catch-up-on-start`, backfilling what arrived while the
/// relay was away. Neither delays start-up; both retry while Unipile is unreachable
/// and end once done, so they are not among the tasks whose end stops the process.
pub fn spawn_start_up_tasks(config: &ServeConfig, pool: PgPool) -> Vec<JoinHandle<()>> {
    let registration =
        Registration::decide(config.webhook_base_url.as_deref(), &config.webhook_secret, &config.unipile);
    let mut tasks =
        vec![registration::spawn_registration(registration, pool.clone(), BackgroundBackoff::default())];
    if config.catch_up.catch_up_on_start {
        match cli::client_from(&config.unipile) {
            Ok(client) => tasks.push(tokio::spawn(
                sync::run_catch_up(
                    client,
                    pool,
                    config.nats.subject_prefix.clone(),
                    BackgroundBackoff::default(),
                )
                .instrument(tracing::info_span!("unipile_catch_up")),
            )),
            Err(reason) => tracing::warn!(
                reason = %reason,
                "start-up catch-up (SYNC_ON_START) skipped: {reason}"
            ),
        }
    }
    tasks
}
