//! Building and running the service: connect, migrate, start the background tasks,
//! bind, serve until told to stop.
//!
//! `build` and `run_until_stopped` are split so tests can start a real server on port
//! 0 and learn its port before it runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use runtime::limits::PerKeyLimit;
use shared::claims::JwtKeys;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::util::MapRequestLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::ServeConfig;
use crate::outbox::handoff::Publisher;
use crate::outbox::{Relay, Sizer};
use crate::state::AppState;
use crate::store::{AfterCommit, Batcher};
use crate::{api, health, inbound};
use shared::stream::StreamSpec;

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    /// Batch writers and the outbox relay.
    tasks: JoinSet<anyhow::Result<()>>,
    /// Stops the relay (and metrics upkeep) after the HTTP server has drained.
    stop_background: CancellationToken,
}

impl Application {
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let open_files = runtime::http::raise_open_files_limit();
        tracing::debug!(open_files, "open-file limit");
        let db = crate::db::connect_and_migrate(&config.database, u32::MAX).await?;
        let nats = config.nats.connect("ingest").await?;

        let mut tasks = JoinSet::new();
        let stop_background = CancellationToken::new();
        let stop_upkeep = stop_background.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = runtime::telemetry::metrics_upkeep() => {},
                _ = stop_upkeep.cancelled() => {},
            }
            Ok(())
        });
        let wake_relay = Arc::new(Notify::new());
        let subjects = config.nats.subject_prefix.clone();
        let sizer = Sizer { text_max_bytes: config.outbox.event_text_max_bytes, nats: nats.clone() };
        tracing::info!(limits = ?sizer.limits(), "event size limits");
        let stream = StreamSpec {
            name: config.nats.stream_name.clone(),
            subjects: subjects.clone(),
            max_age: Duration::from_secs(config.outbox.stream_max_age_secs),
            duplicate_window: Duration::from_secs(config.outbox.stream_duplicate_window_secs),
            replicas: usize::from(config.outbox.stream_replicas),
        };
        let relay =
            Arc::new(Relay::new(db.clone(), nats.clone(), stream, config.outbox.clone(), wake_relay.clone()));
        let after_commit = if config.outbox.outbox_publish_after_commit {
            let ack_timeout = Duration::from_millis(config.outbox.outbox_ack_timeout_ms);
            let (handoff, publisher, marker) =
                Publisher::new(db.clone(), nats.clone(), relay.clone(), ack_timeout);
            tasks.spawn(publisher.run(stop_background.clone()));
            tasks.spawn(marker.run(stop_background.clone()));
            AfterCommit::Handoff(handoff)
        } else {
            AfterCommit::WakeRelay(wake_relay)
        };
        let batcher =
            Batcher::spawn(db.clone(), subjects.clone(), sizer, &config.batch, after_commit, &mut tasks);
        tasks.spawn(relay.run(stop_background.clone()));
        if config.dead_letter_retention_days > 0 {
            let (db, days) = (db.clone(), config.dead_letter_retention_days.min(100_000) as i64);
            let stop = stop_background.clone();
            tasks.spawn(async move {
                let mut hourly = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        _ = hourly.tick() => {},
                        _ = stop.cancelled() => return Ok(()),
                    }
                    let before = chrono::Utc::now() - chrono::Duration::days(days);
                    match crate::store::dead_letters::prune(&db, before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, days, "pruned old dead letters"),
                        Err(e) => tracing::warn!(error = %e, "pruning dead letters failed"),
                    }
                }
            });
        }
        // Replies left pending by a process that died mid-send become failed.
        {
            let (db, batcher, stop) = (db.clone(), batcher.clone(), stop_background.clone());
            let older_than = config.reply.pending_timeout();
            let every = (older_than / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
            tasks.spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {},
                        _ = stop.cancelled() => return Ok(()),
                    }
                    match crate::store::replies::fail_interrupted(&db, &batcher, older_than).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(replies = n, "marked interrupted replies failed"),
                        Err(e) => tracing::warn!(error = %e, "sweeping interrupted replies failed"),
                    }
                }
            });
        }
        // Accounts that come back get what they missed, by the first replica free.
        let backfill_wake = Arc::new(Notify::new());
        let unipile = sending_client(&config);
        if let Some(client) = unipile.clone() {
            let (db, wake, stop) = (db.clone(), backfill_wake.clone(), stop_background.clone());
            tasks.spawn(async move {
                crate::unipile::reconnect::run(client, db, wake, stop).await;
                Ok(())
            });
        }
        // Webhook registration and the optional history catch-up: they retry while
        // Unipile is away and end when done, so they run beside the supervised tasks.
        crate::unipile::spawn_start_up_tasks(&config, db.clone());

        let api_db = crate::db::pool(
            &config.database.database_url,
            config.database_api_max_connections.max(1),
            Duration::from_millis(config.database.database_acquire_timeout_ms),
        )
        .await?;
        let rest_limit = PerKeyLimit::per_second(config.rest_requests_per_sec_per_sub);
        if let Some(limit) = &rest_limit {
            limit.spawn_upkeep(Duration::from_secs(60));
        }
        let state = AppState {
            db: api_db,
            webhook_db: db,
            batcher,
            webhook_secret: config.webhook_secret.clone(),
            jwt: JwtKeys::new(&config.jwt_secret).with_issuer_and_audience(
                config.jwt_claims.jwt_issuer.clone(),
                config.jwt_claims.jwt_audience.clone(),
            ),
            rest_limit,
            nats,
            metrics: runtime::telemetry::metrics_handle(),
            unipile,
            send_timeout: config.reply.send_timeout(),
            attachments: Arc::new(api::attachments::AttachmentSettings::new(
                &config.attachments,
                &config.jwt_secret,
            )),
            backfill_wake,
        };
        let router = router(state.clone(), &config);
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        Ok(Self { listener, router, state, tasks, stop_background })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests, lets the
    /// writers finish and gives the relay one last round. Returns an error at once if
    /// a background task dies.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self { listener, router, state, mut tasks, stop_background } = self;
        let server = runtime::http::serve(listener, router, Default::default(), shutdown);
        tokio::select! {
            served = server => served.context("HTTP server failed")?,
            died = tasks.join_next() => {
                let reason = match died {
                    Some(Ok(Ok(()))) => "ended".to_owned(),
                    Some(Ok(Err(e))) => format!("{e:#}"),
                    Some(Err(e)) => e.to_string(),
                    None => "no tasks".to_owned(),
                };
                anyhow::bail!("a background task stopped unexpectedly: {reason}");
            }
        }
        // The server has stopped: no new writes. Dropping the last batcher handle
        // lets the writers finish the queue and exit; then the relay publishes.
        drop(state);
        stop_background.cancel();
        match tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(e)) = done {
                    tracing::warn!(error = format!("{e:#}"), "background task failed while stopping");
                }
            }
        })
        .await
        {
            Ok(()) => tracing::info!("ingest stopped"),
            Err(_) => tracing::warn!("background tasks did not stop in time"),
        }
        Ok(())
    }
}

/// The client replies are sent with, when Unipile is configured.
fn sending_client(config: &ServeConfig) -> Option<crate::unipile::UnipileClient> {
    if config.unipile.unipile_dsn.is_none() && config.unipile.unipile_api_key.is_none() {
        tracing::info!(
            "UNIPILE_DSN and UNIPILE_API_KEY unset: sending replies and attachments are off (503)"
        );
        return None;
    }
    crate::unipile::cli::client_from(&config.unipile)
        .inspect_err(|e| {
            tracing::warn!(error = format!("{e:#}"), "sending replies and attachments are off (503)")
        })
        .ok()
}

fn router(state: AppState, config: &ServeConfig) -> Router {
    Router::new()
        .merge(inbound::router(state.clone(), config.webhook_max_body_bytes))
        .merge(health::router())
        .merge(api::router(config.reply.reply_max_body_bytes).layer(api::cors(&config.cors_origins)))
        // An unknown path (also one a client normalised, `../`) gets the usual error body.
        .fallback(|| async { crate::error::ApiError::NotFound })
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(config.request_timeout_secs),
        ))
        // Every answer carries `x-request-id` (the client's, or a new UUID), and every log
        // line of the request names it: a 5xx body says nothing of the cause, the id
        // finds it in the logs.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::extract::Request| {
            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(MapRequestLayer::new(drop_unfit_request_id))
        .with_state(state)
}

/// Longest client `x-request-id` kept; a UUID is 36.
const MAX_REQUEST_ID: usize = 64;

/// A client's `x-request-id` goes into every log line of its request and back in the
/// answer: one that is long or holds anything but `[A-Za-z0-9._:-]` is dropped, so a
/// new UUID is made in its place.
fn drop_unfit_request_id<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    let fit = |v: &axum::http::HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
    };
    let mut ids = request.headers().get_all("x-request-id").iter();
    let unfit = match (ids.next(), ids.next()) {
        (Some(id), None) => !fit(id),
        (None, _) => false,
        (Some(_), Some(_)) => true,
    };
    if unfit {
        request.headers_mut().remove("x-request-id");
    }
    request
}
