//! The state every handler shares.

use std::sync::Arc;

use async_nats::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use runtime::limits::PerKeyLimit;
use secrecy::SecretString;
use shared::claims::JwtKeys;
use sqlx::PgPool;

use crate::api::attachments::AttachmentSettings;
use crate::store::Batcher;
use crate::unipile::UnipileClient;

#[derive(Clone)]
pub struct AppState {
    /// The REST API's own pool (`DATABASE_API_MAX_CONNECTIONS`): however hard one
    /// client calls the API, webhooks never wait for a connection behind it.
    pub db: PgPool,
    /// The webhooks' pool, shared with the writers: dead letters and readiness.
    pub webhook_db: PgPool,
    /// Where webhook writes go to be group-committed.
    pub batcher: Batcher,
    /// Compared in constant time with each webhook's `Unipile-Auth` header.
    pub webhook_secret: SecretString,
    /// Checks the client tokens of the REST API.
    pub jwt: JwtKeys,
    /// REST calls per token `sub` (`None`: no limit).
    pub rest_limit: Option<Arc<PerKeyLimit>>,
    /// For readiness: whether NATS is connected.
    pub nats: Client,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Sends replies and starts chats, fetches attachments, backfills reconnected
    /// accounts; `None` without UNIPILE_DSN and UNIPILE_API_KEY (then those calls answer
    /// 503 `not_configured`).
    pub unipile: Option<UnipileClient>,
    /// How long a send waits for Unipile (never retried).
    pub send_timeout: std::time::Duration,
    /// Download limits and the signer of attachment URLs.
    pub attachments: Arc<AttachmentSettings>,
    /// Wakes the backfill of returned accounts ([`crate::unipile::reconnect`]) when an
    /// account status was stored.
    pub backfill_wake: Arc<tokio::sync::Notify>,
}
