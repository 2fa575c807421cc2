//! `GET /api/chats/{chat_id}/presence?account_id=..`: who has the chat open now, for a
//! client that just connected (the same list a `viewing` frame is answered with).
//!
//! Bearer token (or `?token=`) as the WebSocket takes it; the account must be one of
//! the token's, else 404 as ingest answers a chat the token may not see. The caller's
//! own agent (`sub`) is not listed. Served by fanout, which holds presence: the
//! gateway routes this one path under `/api/` to fanout.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::wire::PresenceFrame;
use crate::auth;
use crate::error::ApiError;
use crate::hub::Scope;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/chats/{chat_id}/presence", get(viewers))
}

#[derive(Debug, Deserialize)]
pub struct PresenceQuery {
    account_id: Option<String>,
    token: Option<String>,
}

#[tracing::instrument(skip_all)]
async fn viewers(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
    Query(query): Query<PresenceQuery>,
    headers: HeaderMap,
) -> Result<Json<PresenceFrame>, ApiError> {
    let claims = auth::authenticate(&state.keys, &headers, query.token.as_deref())?;
    let account_id = query.account_id.filter(|a| !a.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("account_id is required: the account the chat belongs to".into())
    })?;
    if !Scope::from_claims(&claims).allows(&account_id) {
        return Err(ApiError::NotFound);
    }
    let viewers = state.ctx.presence.viewers(&account_id, &chat_id, &claims.sub);
    Ok(Json(PresenceFrame::Viewers { account_id, chat_id, viewers }))
}
