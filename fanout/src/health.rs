//! `/healthz` (the process answers), `/readyz` (following the stream over a live NATS
//! connection, and not stopping) and `/metrics` (Prometheus text).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    let following = state.follower.is_ready();
    let stopping = state.ctx.shutdown.is_cancelled();
    let ready = nats && following && !stopping;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "nats_connected": nats,
        "following": following,
        "stopping": stopping,
        "connections": state.slots.used(),
        "max_connections": state.slots.max(),
        "seq": state.ctx.hub.head(),
    });
    (status, Json(body))
}

async fn metrics() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        runtime::telemetry::metrics_handle().render(),
    )
}
