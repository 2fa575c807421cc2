//! `/healthz` (the process answers), `/readyz` (it can do its job), `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|State(state): State<AppState>| async move { state.metrics.render() }))
}

/// Ready when the database answers and NATS is connected. Webhooks are still taken
/// while NATS is away (they wait in the outbox), but a load balancer should prefer a
/// replica that can publish.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database =
        tokio::time::timeout(Duration::from_secs(2), sqlx::query("select 1").execute(&state.webhook_db))
            .await
            .is_ok_and(|r| r.is_ok());
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if database && nats { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"database": word(database), "nats": word(nats)})))
}
