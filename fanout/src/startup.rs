//! Building and running the server: [`Application::build`] binds the listener and
//! wires the state; [`Application::run_until_stopped`] runs the HTTP server, the
//! follower, presence and metrics upkeep until the shutdown future resolves or one of them dies.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use shared::claims::JwtKeys;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::config::Config;
use crate::follower::{Follower, FollowerStatus};
use crate::history::History;
use crate::hub::Hub;
use crate::presence::{Presence, PresenceTask, Settings};
use crate::state::{AppState, ConnectionContext, Limits, Slots, SubSlots};
use crate::{health, page, presence, ws};

/// Pending connections the listener queues while the server accepts.
const LISTEN_BACKLOG: u32 = 4096;
/// Open files kept for everything but WebSocket connections: the listener, NATS,
/// requests that have not upgraded yet, probes, logs.
const FILES_RESERVED: u64 = 256;

/// A built, not yet running, fanout server.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    follower: Follower,
    presence: PresenceTask,
    shutdown_grace: Duration,
    /// Rendered into the inbox page.
    page_api_origins: Vec<String>,
}

impl Application {
    /// Binds the listener (port 0 picks a free one) and connects to NATS (in the
    /// background if it is not up yet: readiness stays false until following).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Install the recorder before any metric handle is created.
        let _ = runtime::telemetry::metrics_handle();
        let max_connections =
            connection_limit(config.max_connections, runtime::http::raise_open_files_limit());
        if max_connections < config.max_connections {
            tracing::warn!(
                configured = config.max_connections,
                serving = max_connections,
                "FANOUT_MAX_CONNECTIONS is more than this process's open-file limit allows; \
                 raise the hard limit (ulimit -Hn, or `ulimits` in compose) to serve more"
            );
        }
        anyhow::ensure!(
            !config.presence.presence_prefix.overlaps(&config.nats.subject_prefix),
            "FANOUT_PRESENCE_PREFIX ({}) overlaps SUBJECT_PREFIX ({}): the stream would store presence",
            config.presence.presence_prefix.prefix(),
            config.nats.subject_prefix.prefix()
        );
        let listener = bind(config.listen)?;
        let client = config.nats.connect("fanout").await?;
        let js = async_nats::jetstream::new(client.clone());
        let hub = Hub::with_window_bytes(config.queue_capacity, config.replay_window, config.window_bytes);
        let status = Arc::new(FollowerStatus::default());
        // The follower's JetStream requests (stream info, consumer create) take
        // milliseconds on a healthy cluster and hang until the timeout while one elects a
        // new leader: a short timeout lets it retry as soon as the cluster is back.
        let mut follower_js = js.clone();
        follower_js.set_timeout(crate::follower::REQUEST_TIMEOUT);
        let follower = Follower {
            client: client.clone(),
            js: follower_js,
            stream_name: config.nats.stream_name.clone(),
            subjects: config.nats.subject_prefix.clone(),
            hub: hub.clone(),
            status: status.clone(),
            heartbeat: config.follow_heartbeat(),
        };
        let (presence, presence_task) = Presence::new(
            Settings::from_args(&config.presence),
            config.presence.presence_prefix.clone(),
            client.clone(),
        );
        let ctx = ConnectionContext {
            hub,
            history: History::new(
                js,
                config.nats.stream_name.clone(),
                config.nats.subject_prefix.clone(),
                config.max_resume_gap,
            ),
            limits: Limits {
                heartbeat: config.heartbeat(),
                write_timeout: config.write_timeout(),
                max_client_message: config.max_client_message,
                hard_client_message: config.max_client_message.saturating_mul(16).max(1024),
            },
            shutdown: CancellationToken::new(),
            presence,
        };
        let resumes = runtime::limits::PerKeyLimit::per_minute(config.max_resumes_per_minute_per_sub);
        if let Some(limit) = &resumes {
            limit.spawn_upkeep(Duration::from_secs(60));
        }
        let state = AppState {
            keys: Arc::new(JwtKeys::new(&config.jwt_secret).with_issuer_and_audience(
                config.jwt_claims.jwt_issuer.clone(),
                config.jwt_claims.jwt_audience.clone(),
            )),
            ctx: Arc::new(ctx),
            slots: Slots::new(max_connections),
            per_sub: SubSlots::new(config.max_connections_per_sub.max(1)),
            resumes,
            tracker: TaskTracker::new(),
            follower: status,
            nats: client,
        };
        let shutdown_grace = config.shutdown_grace();
        Ok(Self {
            listener,
            state,
            follower,
            presence: presence_task,
            shutdown_grace,
            page_api_origins: config.page_api_origins,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then closes every socket with 1012 and waits
    /// (up to the grace period) for the close frames to go out. Returns an error if the
    /// server, the follower or metrics upkeep stops on its own.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self { listener, state, follower, presence, shutdown_grace, page_api_origins } = self;
        let app = router(state.clone(), &page_api_origins);
        let cancel = state.ctx.shutdown.clone();
        let stop = cancel.clone();
        let server = tokio::spawn(
            async move {
                // Frames are small and latency matters more than packet count: no Nagle.
                let options = runtime::http::ServeOptions { nodelay: true, ..Default::default() };
                runtime::http::serve(listener, app, options, async move {
                    tokio::select! {
                        _ = shutdown => {},
                        _ = stop.cancelled() => {},
                    }
                    stop.cancel();
                })
                .await
                .context("HTTP server failed")
            }
            .instrument(tracing::info_span!("http_server")),
        );
        let mut follower = tokio::spawn(follower.run().instrument(tracing::info_span!("follower")));
        let mut presence = tokio::spawn(presence.run().instrument(tracing::info_span!("presence")));
        let mut upkeep = tokio::spawn(
            runtime::telemetry::metrics_upkeep().instrument(tracing::info_span!("metrics_upkeep")),
        );

        let outcome = tokio::select! {
            result = server => match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(join) => Err(anyhow::anyhow!("HTTP server task died: {join}")),
            },
            result = &mut follower => Err(anyhow::anyhow!("follower task stopped: {:?}", result.map(|r| r.err()))),
            result = &mut upkeep => Err(anyhow::anyhow!("metrics upkeep task stopped: {result:?}")),
            result = &mut presence => Err(anyhow::anyhow!("presence task stopped: {:?}", result.map(|r| r.err()))),
        };
        // A stopped replica follows nothing: in a test process (or any embedder) the
        // follower would otherwise go on, and recreate a stream deleted after it.
        follower.abort();
        upkeep.abort();
        if let Err(error) = &outcome {
            tracing::error!(error = format!("{error:#}"), "a long-lived task died; stopping");
        }
        // Sockets close with 1012 so clients reconnect to another replica.
        cancel.cancel();
        state.tracker.close();
        if tokio::time::timeout(shutdown_grace, state.tracker.wait()).await.is_err() {
            tracing::warn!(open = state.slots.used(), "connections still open after the grace period");
        }
        // The closed sockets' `left` go out before the task stops (best effort: whatever
        // does not, expires at the other replicas).
        state.ctx.presence.wait_sent(Duration::from_secs(1)).await;
        presence.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), state.nats.flush()).await;
        tracing::info!("fanout stopped");
        outcome
    }
}

fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("binding {addr}"))?;
    socket.listen(LISTEN_BACKLOG).with_context(|| format!("listening on {addr}"))
}

/// Every route with tracing.
pub fn router(state: AppState, page_api_origins: &[String]) -> Router {
    Router::new()
        .merge(ws::router())
        .merge(presence::api::router())
        .merge(health::router())
        .merge(page::router(page_api_origins))
        // Spans name the path only: the query may carry a client token.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::extract::Request| {
            tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

/// Connections a replica takes: the configured number, but never so many that
/// accepting runs out of files (a clean 503 beats stalled accepts).
fn connection_limit(configured: usize, open_files: u64) -> usize {
    let for_sockets = open_files.saturating_sub(FILES_RESERVED).max(open_files / 2);
    configured.min(usize::try_from(for_sockets).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::connection_limit;

    #[test]
    fn the_connection_limit_leaves_room_for_other_files() {
        assert_eq!(connection_limit(20_000, 1_048_576), 20_000);
        assert_eq!(connection_limit(20_000, 20_000), 19_744);
        assert_eq!(connection_limit(20_000, 1024), 768);
        assert_eq!(connection_limit(20_000, 300), 150, "at least half for tiny limits");
        assert_eq!(connection_limit(10, 1024), 10);
    }
}
