//! `GET /ws/messages`: the WebSocket clients connect to.
//!
//! Upgrade: the token (query `token` or `Authorization: Bearer`) is checked first
//! (401), then readiness and the replica's connection limit (503). After the upgrade
//! the server sends `hello`, catches up from `since` when asked (see `resume`), then
//! streams live events from the connection's bounded queue.
//!
//! Server frames: `hello`, events (the envelope with `seq`), `pong`, `subscribed`,
//! `error`, and presence (`presence:typing`, `presence:viewing`, `presence:viewers`,
//! without `seq`). Client frames: `{"type":"ping"}`, `{"type":"subscribe","chat_ids":[..]}`
//! (an empty list means every chat again; account events without a chat always pass),
//! `typing` and `viewing` (see [`crate::presence::member`]).
//!
//! Close codes the server sends (see [`Close`]): 1008 too many invalid messages, 1009
//! message too big, 1011 resume failed, 1012 server restarting, 1013 not ready, 4000
//! slow consumer, 4001 stream reset, 4002 token expired.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use shared::claims::Claims;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth;
use crate::error::ApiError;
use crate::frames::{ClientFrame, ServerFrame};
use crate::hub::{ConnShared, Kick, Registration, Scope, SharedEvent};
use crate::metrics;
use crate::presence::{Delivery, Member, Reply};
use crate::state::{AppState, ConnectionContext};

/// Most events written per flush.
const BATCH: usize = 64;
/// Invalid client messages tolerated before closing with 1008.
const MAX_INVALID_MESSAGES: u32 = 20;
/// Most chats one `subscribe` may list.
const MAX_SUBSCRIBED_CHATS: usize = 1000;
/// How long a close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn router() -> Router<AppState> {
    Router::new().route("/ws/messages", get(upgrade))
}

#[derive(Debug, Deserialize)]
pub struct WsParams {
    token: Option<String>,
    /// Last sequence the client has; resume after it.
    since: Option<u64>,
}

#[tracing::instrument(skip_all)]
async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<WsParams>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let claims = auth::authenticate(&state.keys, &headers, params.token.as_deref())?;
    let ws = ws?;
    let ctx = state.ctx.clone();
    if ctx.hub.head().is_none() || ctx.shutdown.is_cancelled() {
        return Err(ApiError::NotReady);
    }
    let Some(sub_slot) = state.per_sub.try_acquire(&claims.sub) else {
        metrics::refused("per_sub");
        return Err(ApiError::TooManyForSubject);
    };
    if params.since.is_some()
        && let Some(resumes) = &state.resumes
        && let Err(retry_after) = resumes.check(&claims.sub)
    {
        metrics::refused("resume_rate");
        return Err(ApiError::TooManyResumes { retry_after });
    }
    let slot = state.slots.try_acquire().ok_or(ApiError::TooManyConnections)?;
    let task = state.tracker.token();
    let limits = ctx.limits;
    let since = params.since;
    Ok(ws
        .protocols([auth::PROTOCOL])
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(limits.hard_client_message)
        .max_frame_size(limits.hard_client_message)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            let _sub_slot = sub_slot;
            let _task = task;
            serve(ctx, socket, claims, since).await;
        }))
}

/// A close the server initiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
    /// Label of `fanout_closes_total`.
    pub label: &'static str,
}

impl Close {
    pub const POLICY: Close = Close { code: 1008, reason: "too many invalid messages", label: "policy" };
    pub const TOO_BIG: Close = Close { code: 1009, reason: "message too big", label: "too_big" };
    pub const RESUME_FAILED: Close =
        Close { code: 1011, reason: "resume failed; retry", label: "resume_failed" };
    pub const SHUTDOWN: Close = Close { code: 1012, reason: "service restart; reconnect", label: "shutdown" };
    pub const NOT_READY: Close = Close { code: 1013, reason: "not ready; retry", label: "not_ready" };
    pub const SLOW_CONSUMER: Close =
        Close { code: 4000, reason: "slow consumer; resume with since", label: "slow_consumer" };
    pub const STREAM_RESET: Close = Close {
        code: 4001,
        reason: "stream reset; reload and reconnect without since",
        label: "stream_reset",
    };
    pub const TOKEN_EXPIRED: Close = Close { code: 4002, reason: "token expired", label: "token_expired" };
}

impl From<Kick> for Close {
    fn from(kick: Kick) -> Self {
        match kick {
            Kick::SlowConsumer => Close::SLOW_CONSUMER,
            Kick::StreamReset => Close::STREAM_RESET,
        }
    }
}

/// How a connection ends.
#[derive(Debug)]
pub enum End {
    /// The server closes with this code.
    Close(Close),
    /// The peer closed, vanished or broke the protocol: nothing more to say.
    Gone(&'static str),
}

/// One WebSocket connection after the upgrade.
pub struct Connection {
    /// Shared by every connection: one pointer each.
    pub(crate) ctx: Arc<ConnectionContext>,
    pub(crate) socket: WebSocket,
    pub(crate) shared: Arc<ConnShared>,
    pub(crate) scope: Scope,
    /// Chats the client narrowed to with `subscribe`; `None` means all.
    chats: Option<HashSet<String>>,
    /// Every event up to this sequence was sent or is not for this client.
    pub(crate) covered: u64,
    invalid_messages: u32,
    last_heard: Instant,
    /// This connection's typing and viewing; dropping it clears its viewing.
    presence: Member,
}

async fn serve(ctx: Arc<ConnectionContext>, socket: WebSocket, claims: Claims, since: Option<u64>) {
    let scope = Scope::from_claims(&claims);
    let Some(registration) = ctx.hub.register(scope.clone(), since) else {
        let mut socket = socket;
        let _ = send_close(&mut socket, Close::NOT_READY).await;
        return;
    };
    let expires_at = Instant::now()
        + Duration::from_secs(u64::try_from(claims.exp - chrono::Utc::now().timestamp()).unwrap_or(0));
    let (presence, presence_rx) = ctx.presence.join(scope.clone(), &claims.sub, claims.name.as_deref());
    let mut conn = Connection {
        ctx,
        socket,
        shared: registration.shared.clone(),
        scope,
        chats: None,
        covered: 0,
        invalid_messages: 0,
        last_heard: Instant::now(),
        presence,
    };
    let sub = claims.sub;
    let end = conn.run(registration, presence_rx, since, expires_at).await;
    match end {
        End::Close(close) => {
            tracing::debug!(%sub, code = close.code, reason = close.reason, "closing connection");
            metrics::closed(close.label);
            let _ = Box::pin(send_close(&mut conn.socket, close)).await;
        }
        End::Gone(why) => {
            tracing::debug!(%sub, why, "connection gone");
            metrics::closed(why);
        }
    }
}

async fn send_close(socket: &mut WebSocket, close: Close) -> Result<(), ()> {
    let frame = CloseFrame { code: close.code, reason: Utf8Bytes::from_static(close.reason) };
    match tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

impl Connection {
    async fn run(
        &mut self,
        registration: Registration,
        mut presence_rx: mpsc::Receiver<Arc<Delivery>>,
        since: Option<u64>,
        expires_at: Instant,
    ) -> End {
        let Registration { id, mut rx, head, backlog, membership, .. } = registration;
        let _membership = membership;
        let caught_up = match since {
            None => {
                self.covered = head;
                Box::pin(self.send_frame(&ServerFrame::hello(head, self.ctx.limits.heartbeat, None))).await
            }
            // Boxed: the resume future is large and only lives during catch-up.
            Some(since) => Box::pin(self.resume(since, head, backlog, &mut rx)).await,
        };
        if let Err(end) = caught_up {
            return end;
        }
        let heartbeat = self.ctx.limits.heartbeat;
        // Spread first pings over one interval: connections opened together (a
        // reconnect wave) must not all be pinged in the same instant forever after.
        let jitter = heartbeat.mul_f64((id % 1024) as f64 / 1024.0);
        let mut ping = tokio::time::interval_at(Instant::now() + heartbeat + jitter, heartbeat);
        let expiry = tokio::time::sleep_until(expires_at);
        tokio::pin!(expiry);
        let mut batch: Vec<SharedEvent> = Vec::new();
        let mut presence_batch: Vec<Arc<Delivery>> = Vec::new();
        let mut presence_open = true;
        // Created once, not per wake-up: every connection waits on the same shutdown
        // token, and re-registering with it on each event would contend on its lock.
        let (token, shared) = (self.ctx.shutdown.clone(), self.shared.clone());
        let shutdown = token.cancelled();
        let kicked = shared.kicked();
        tokio::pin!(shutdown, kicked);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return End::Close(Close::SHUTDOWN),
                kick = &mut kicked => return End::Close(kick.into()),
                received = rx.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        let kick = self.shared.kick_reason().unwrap_or(Kick::SlowConsumer);
                        return End::Close(kick.into());
                    }
                    // Boxed, like every write below: the connection future stays small
                    // while idle, which is what 15k idle connections cost.
                    let result = Box::pin(self.send_events(&batch)).await;
                    batch.clear();
                    if let Err(end) = result {
                        return end;
                    }
                }
                // After events (biased): presence never delays one.
                received = presence_rx.recv_many(&mut presence_batch, BATCH), if presence_open => {
                    // 0: closed (a token listing no account has nobody to hear from).
                    presence_open = received > 0;
                    let result = Box::pin(self.send_presence(&presence_batch)).await;
                    presence_batch.clear();
                    if let Err(end) = result {
                        return end;
                    }
                }
                message = self.socket.next() => {
                    self.last_heard = Instant::now();
                    if let Err(end) = Box::pin(self.on_client_message(message)).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if self.last_heard.elapsed() > heartbeat * 2 {
                        return End::Gone("dead_peer");
                    }
                    let ping = self.socket.send(Message::Ping(Default::default()));
                    let write = guarded_with(self.ctx.limits.write_timeout, &self.shared, &self.ctx.shutdown, ping);
                    if let Err(end) = Box::pin(write).await {
                        return end;
                    }
                }
                _ = &mut expiry => return End::Close(Close::TOKEN_EXPIRED),
            }
        }
    }

    pub(crate) async fn send_frame(&mut self, frame: &ServerFrame) -> Result<(), End> {
        let write = self.socket.send(Message::Text(Utf8Bytes::from(frame.to_text())));
        guarded_with(self.ctx.limits.write_timeout, &self.shared, &self.ctx.shutdown, write).await
    }

    /// Writes the events this client wants that are newer than `covered`, in one flush.
    pub(crate) async fn send_events(&mut self, events: &[SharedEvent]) -> Result<(), End> {
        let chats = &self.chats;
        let covered = &mut self.covered;
        let socket = &mut self.socket;
        let write = async {
            let mut frames = 0u64;
            let mut sent = Vec::new();
            let now_ms = chrono::Utc::now().timestamp_millis();
            for event in events {
                if event.seq <= *covered {
                    continue;
                }
                *covered = event.seq;
                let wanted = match (chats, &event.chat_id) {
                    (Some(chats), Some(chat)) => chats.contains(chat),
                    _ => true,
                };
                if wanted {
                    socket.feed(Message::Text(event.text.clone())).await?;
                    sent.push(event.received);
                    frames += 1;
                    if let Some(lag) = event.lag_seconds(now_ms) {
                        metrics::delivery_lag(lag);
                    }
                }
            }
            if frames > 0 {
                socket.flush().await?;
                metrics::frames_out(frames);
                metrics::written(sent.iter().map(|received| received.elapsed()));
            }
            Ok(())
        };
        guarded_with(self.ctx.limits.write_timeout, &self.shared, &self.ctx.shutdown, write).await
    }

    /// Writes presence frames for the chats this client wants, in one flush.
    async fn send_presence(&mut self, deliveries: &[Arc<Delivery>]) -> Result<(), End> {
        let chats = &self.chats;
        let socket = &mut self.socket;
        let write = async {
            let mut frames = 0;
            for delivery in deliveries {
                if chats.as_ref().is_none_or(|chats| chats.contains(&delivery.chat_id)) {
                    socket.feed(Message::Text(delivery.text.clone())).await?;
                    frames += 1;
                }
            }
            if frames > 0 {
                socket.flush().await?;
            }
            Ok(())
        };
        guarded_with(self.ctx.limits.write_timeout, &self.shared, &self.ctx.shutdown, write).await
    }

    async fn on_presence_reply(&mut self, reply: Reply) -> Result<(), End> {
        match reply {
            Reply::Nothing => Ok(()),
            Reply::Error { code, message, counts: true } => self.reject(code, message).await,
            Reply::Error { code, message, counts: false } => {
                self.send_frame(&ServerFrame::error(code, message)).await
            }
            Reply::Frame(text) => {
                let write = self.socket.send(Message::Text(Utf8Bytes::from(text)));
                guarded_with(self.ctx.limits.write_timeout, &self.shared, &self.ctx.shutdown, write).await
            }
        }
    }

    async fn on_client_message(&mut self, message: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        let message = match message {
            None => return Err(End::Gone("peer_closed")),
            Some(Err(error)) => {
                // tungstenite refuses messages over `max_message_size` with a capacity
                // error; its text is the only stable handle axum gives us on it.
                let text = error.to_string();
                if text.contains("too long") || text.contains("Space limit") {
                    return Err(End::Close(Close::TOO_BIG));
                }
                return Err(End::Gone("read_error"));
            }
            Some(Ok(message)) => message,
        };
        match message {
            Message::Text(text) => {
                if text.len() > self.ctx.limits.max_client_message {
                    return self.reject("too_large", "message over the size limit").await;
                }
                match serde_json::from_str::<ClientFrame>(text.as_str()) {
                    Ok(ClientFrame::Ping) => self.send_frame(&ServerFrame::Pong).await,
                    Ok(ClientFrame::Subscribe { chat_ids }) => self.subscribe(chat_ids).await,
                    Ok(ClientFrame::Typing { account_id, chat_id }) => {
                        let reply = self.presence.typing(&account_id, &chat_id);
                        self.on_presence_reply(reply).await
                    }
                    Ok(ClientFrame::Viewing { account_id, chat_id }) => {
                        let reply = self.presence.viewing(account_id.as_deref(), chat_id.as_deref());
                        self.on_presence_reply(reply).await
                    }
                    Err(_) => {
                        let kind = serde_json::from_str::<serde_json::Value>(text.as_str())
                            .ok()
                            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
                        match kind {
                            Some(kind) if ClientFrame::TYPES.contains(&kind.as_str()) => {
                                self.reject("invalid_message", "malformed fields for this type").await
                            }
                            Some(_) => self.reject("unknown_type", "unknown message type").await,
                            None => {
                                self.reject("invalid_message", "expected a JSON object with a type").await
                            }
                        }
                    }
                }
            }
            Message::Binary(_) => self.reject("binary_not_supported", "send JSON text frames").await,
            Message::Close(_) => Err(End::Gone("peer_closed")),
            Message::Ping(_) | Message::Pong(_) => Ok(()),
        }
    }

    async fn subscribe(&mut self, chat_ids: Vec<String>) -> Result<(), End> {
        if chat_ids.len() > MAX_SUBSCRIBED_CHATS {
            return self.reject("too_many_chats", "at most 1000 chats per subscribe").await;
        }
        self.chats = (!chat_ids.is_empty()).then(|| chat_ids.iter().cloned().collect());
        self.send_frame(&ServerFrame::Subscribed { chat_ids }).await
    }

    async fn reject(&mut self, code: &'static str, message: &'static str) -> Result<(), End> {
        self.invalid_messages += 1;
        if self.invalid_messages > MAX_INVALID_MESSAGES {
            return Err(End::Close(Close::POLICY));
        }
        self.send_frame(&ServerFrame::error(code, message)).await
    }
}

/// Runs a write with the write timeout, giving up early when the hub drops the
/// connection or the server shuts down.
pub(crate) async fn guarded_with<T>(
    timeout: Duration,
    shared: &ConnShared,
    shutdown: &tokio_util::sync::CancellationToken,
    write: impl Future<Output = Result<T, axum::Error>>,
) -> Result<T, End> {
    // Write first: a write that completes at once never registers the other two.
    tokio::select! {
        biased;
        result = tokio::time::timeout(timeout, write) => match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(End::Gone("write_error")),
            Err(_) => Err(End::Close(Close::SLOW_CONSUMER)),
        },
        kick = shared.kicked() => Err(End::Close(kick.into())),
        _ = shutdown.cancelled() => Err(End::Close(Close::SHUTDOWN)),
    }
}
