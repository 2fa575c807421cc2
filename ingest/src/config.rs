//! Command line and environment configuration of `ingest`.
//!
//! Every option is a flag with an environment fallback; `ingest --help` and
//! `ingest serve --help` list them, and `.env.example` shows a working set.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use runtime::config::{NatsArgs, TelemetryArgs, parse_secret, parse_strong_secret};
use secrecy::SecretString;

/// `ingest serve` option for the start-up catch-up.
#[derive(Debug, Clone, Args)]
pub struct CatchUpArgs {
    /// At start-up, backfill in the background what Unipile holds since the newest
    /// message the relay stored, for every account it knows (quietly, as `ingest sync`).
    /// Needs UNIPILE_DSN and UNIPILE_API_KEY.
    #[arg(long = "catch-up-on-start", env = "SYNC_ON_START")]
    pub catch_up_on_start: bool,
}

/// Where PostgreSQL is and how many connections to hold.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,
    /// Most connections in the pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// How long a request waits for a database connection before answering 503.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 3000)]
    pub database_acquire_timeout_ms: u64,
}

/// How the relay reaches Unipile's API.
#[derive(Debug, Clone, Args)]
pub struct UnipileArgs {
    /// Unipile API host as Unipile shows it (`apiN.unipile.com:PORT`, https assumed) or a
    /// full base URL with scheme (`http://127.0.0.1:9000`).
    #[arg(long, env = "UNIPILE_DSN")]
    pub unipile_dsn: Option<String>,
    /// Unipile API key, sent as X-API-KEY.
    #[arg(long, env = "UNIPILE_API_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub unipile_api_key: Option<SecretString>,
}

/// Replies and new chats sent through Unipile (`POST /api/chats/{chat_id}/messages`,
/// `POST /api/chats`).
#[derive(Debug, Clone, Args)]
pub struct ReplyArgs {
    /// How long a send waits for Unipile's answer, in seconds; then the reply is marked
    /// failed (`timeout`) and answered 504. Sends are never retried (Unipile's send is not
    /// idempotent). Keep it under INGEST_REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "REPLY_SEND_TIMEOUT_SECS", default_value_t = 15)]
    pub reply_send_timeout_secs: u64,
    /// Largest reply request in bytes (JSON, or multipart with its files); larger gets 413.
    #[arg(long, env = "REPLY_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub reply_max_body_bytes: usize,
    /// A reply still pending this many seconds after it was stored (the process sending it
    /// died before Unipile answered) is marked failed (`interrupted`) with its
    /// message:status; never less than the send timeout. Checked every quarter of it (at
    /// most every 30 s).
    #[arg(long, env = "REPLY_PENDING_TIMEOUT_SECS", default_value_t = 120)]
    pub reply_pending_timeout_secs: u64,
}

impl ReplyArgs {
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.reply_send_timeout_secs.max(1))
    }

    /// How old a pending reply must be to count as interrupted.
    pub fn pending_timeout(&self) -> Duration {
        Duration::from_secs(self.reply_pending_timeout_secs).max(self.send_timeout())
    }
}

/// Attachments streamed from Unipile (`GET /api/messages/{id}/attachments/{id}`) and the
/// signed URLs that let `<img>` and `<audio>` fetch them without a token.
#[derive(Debug, Clone, Args)]
pub struct AttachmentArgs {
    /// Largest attachment passed through, in bytes: a larger announced length is
    /// refused (502 `attachment_too_large`), and a stream that grows past it is cut.
    #[arg(long, env = "ATTACHMENT_MAX_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub attachment_max_bytes: u64,
    /// How long Unipile may take to connect and answer with its headers, in seconds;
    /// beyond it the call answers 504.
    #[arg(long, env = "ATTACHMENT_FIRST_BYTE_TIMEOUT_SECS", default_value_t = 10)]
    pub attachment_first_byte_timeout_secs: u64,
    /// Longest pause between two chunks of the file, in seconds; beyond it the
    /// download is cut.
    #[arg(long, env = "ATTACHMENT_IDLE_TIMEOUT_SECS", default_value_t = 20)]
    pub attachment_idle_timeout_secs: u64,
    /// Longest a whole download may take, in seconds; beyond it the download is cut.
    #[arg(long, env = "ATTACHMENT_TOTAL_TIMEOUT_SECS", default_value_t = 300)]
    pub attachment_total_timeout_secs: u64,
    /// How long a signed attachment URL stays valid, in seconds (the key is derived
    /// from JWT_SECRET).
    #[arg(long, env = "ATTACHMENT_URL_TTL_SECS", default_value_t = 300)]
    pub attachment_url_ttl_secs: u64,
}

/// Group commit of webhook writes.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Most deliveries committed in one transaction.
    #[arg(long, env = "BATCH_MAX_SIZE", default_value_t = 256)]
    pub batch_max_size: usize,
    /// Writers committing batches in parallel.
    #[arg(long, env = "BATCH_WORKERS", default_value_t = 4)]
    pub batch_workers: usize,
    /// How long a writer waits for more deliveries after the first one, in
    /// microseconds. 0 = commit what is queued at once; batches still form under load
    /// because deliveries queue while the previous commit runs.
    #[arg(long, env = "BATCH_WINDOW_US", default_value_t = 0)]
    pub batch_window_us: u64,
    /// Deliveries waiting for a writer; beyond it, webhooks get 503.
    #[arg(long, env = "BATCH_QUEUE", default_value_t = 4096)]
    pub batch_queue: usize,
}

impl BatchArgs {
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.batch_window_us)
    }
}

/// The outbox relay and the JetStream stream it publishes to.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// Publish each commit's events right after it, in process (the outbox stays the
    /// recovery path). `false`: the relay reads every event back from the outbox, one
    /// replica at a time in id order (strict per-chat order across several replicas
    /// committing the same chat within milliseconds, at a few ms more per event).
    #[arg(long, env = "OUTBOX_PUBLISH_AFTER_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub outbox_publish_after_commit: bool,
    /// How often the sweeper looks for events a crash or an outage left unpublished.
    #[arg(long, env = "OUTBOX_SWEEP_MS", default_value_t = 1000)]
    pub outbox_sweep_ms: u64,
    /// Most events published per round trip.
    #[arg(long, env = "OUTBOX_BATCH", default_value_t = 512)]
    pub outbox_batch: i64,
    /// How long a publish waits for JetStream's ack before the round is retried.
    #[arg(long, env = "OUTBOX_ACK_TIMEOUT_MS", default_value_t = 5000)]
    pub outbox_ack_timeout_ms: u64,
    /// Strings in an event longer than this many bytes (a message's text, say) are cut
    /// in the event, which then says `"truncated": true`; PostgreSQL and REST keep them
    /// whole. Events are also kept under the NATS server's max_payload.
    #[arg(long, env = "EVENT_TEXT_MAX_BYTES", default_value_t = 64 * 1024)]
    pub event_text_max_bytes: usize,
    /// How long published rows stay in the outbox table before they are pruned.
    #[arg(long, env = "OUTBOX_RETENTION_SECS", default_value_t = 3600)]
    pub outbox_retention_secs: u64,
    /// How long the stream keeps events (resume reaches back this far).
    #[arg(long, env = "STREAM_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub stream_max_age_secs: u64,
    /// JetStream's duplicate window: a republish with the same event id within it is dropped.
    #[arg(long, env = "STREAM_DUPLICATE_WINDOW_SECS", default_value_t = 300)]
    pub stream_duplicate_window_secs: u64,
    /// Copies JetStream keeps of the stream (1 to 5): 1 on a single NATS server, 3 in a
    /// cluster of three, where the stream survives the loss of any one server. An
    /// existing stream with another count is rescaled, or the refusal logged.
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,
}

/// `ingest serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "INGEST_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// Expected value of the `Unipile-Auth` header on webhooks. Required.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, value_parser = parse_strong_secret)]
    pub webhook_secret: SecretString,
    /// HS256 secret of client tokens (the same as fanout's). Required.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = parse_strong_secret)]
    pub jwt_secret: SecretString,
    #[command(flatten)]
    pub jwt_claims: runtime::config::JwtClaimsArgs,
    /// Public base URL Unipile calls, e.g. https://relay.example.com. Unset: no webhook
    /// registration at start-up.
    #[arg(long, env = "WEBHOOK_BASE_URL")]
    pub webhook_base_url: Option<String>,
    /// Longest a request may take before it is answered 408. Unipile gives up on a
    /// webhook after 30 s, so the default answers before that.
    #[arg(long, env = "INGEST_REQUEST_TIMEOUT_SECS", default_value_t = 25)]
    pub request_timeout_secs: u64,
    /// Dead letters older than this many days are deleted, hourly (0: kept forever).
    #[arg(long, env = "DEAD_LETTER_RETENTION_DAYS", default_value_t = 30)]
    pub dead_letter_retention_days: u64,
    /// Largest webhook body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub webhook_max_body_bytes: usize,
    /// Browser origins allowed to call the REST API (comma-separated; empty: none).
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// REST calls one token's `sub` may make per second (a burst of as many); more are
    /// answered 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "REST_REQUESTS_PER_SEC_PER_SUB", default_value_t = 50)]
    pub rest_requests_per_sec_per_sub: u32,
    /// Database connections the REST API may hold, apart from the webhook writers' own
    /// (`DATABASE_MAX_CONNECTIONS`), so REST traffic never makes a webhook wait.
    #[arg(long, env = "DATABASE_API_MAX_CONNECTIONS", default_value_t = 4)]
    pub database_api_max_connections: u32,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub unipile: UnipileArgs,
    #[command(flatten)]
    pub catch_up: CatchUpArgs,
    #[command(flatten)]
    pub reply: ReplyArgs,
    #[command(flatten)]
    pub attachments: AttachmentArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}
