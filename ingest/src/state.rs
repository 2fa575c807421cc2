//! The state every handler shares.

use async_nats::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;
use shared::claims::JwtKeys;
use sqlx::PgPool;

use std::sync::Arc;

use crate::api::attachments::AttachmentSettings;
use crate::store::Batcher;
use crate::unipile::UnipileClient;

#[derive(Clone)]
pub struct AppState {
    /// Reads for the REST API, dead letters and readiness checks.
    pub db: PgPool,
    /// Where webhook writes go to be group-committed.
    pub batcher: Batcher,
    /// Compared in constant time with each webhook's `Unipile-Auth` header.
    pub webhook_secret: SecretString,
    /// Checks the client tokens of the REST API.
    pub jwt: JwtKeys,
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
}
