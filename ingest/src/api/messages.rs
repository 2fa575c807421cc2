//! `GET /api/chats/{chat_id}/messages`.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::chats::visible_chat;
use super::cursor::Cursor;
use super::{ErrorBody, page_limit};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::views::{MESSAGE_COLUMNS, MessageRecord, MessageRow};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Messages per page: default 50, at most 200.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page: the page holds older messages.
    pub before: Option<String>,
}

/// One page of a chat's messages, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub items: Vec<MessageRecord>,
    /// Pass as `before` for the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A chat's messages, newest first, with read state, reactions, edits and tombstones of
/// deleted messages.
///
/// Keyset-paginated on `(timestamp, id)`: messages that arrive while a client pages are
/// newer than its cursor and never shift the pages it has yet to read.
#[utoipa::path(
    get,
    path = "/api/chats/{chat_id}/messages",
    tag = "inbox",
    params(("chat_id" = String, Path, description = "Unipile chat id"), MessagesQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "No such chat among the token's accounts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub, chat_id = %chat_id), err(level = "debug"))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(chat_id): Path<String>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(query) = query?;
    let limit = page_limit(query.limit)?;
    let before = query.before.as_deref().map(Cursor::decode).transpose()?;
    if before.as_ref().is_some_and(|c| c.at.is_none()) {
        return Err(ApiError::BadRequest("invalid cursor: pass back a next_cursor this API returned".into()));
    }
    visible_chat(&state.db, &caller, &chat_id).await?;
    let rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "select {MESSAGE_COLUMNS} from messages m join chats c on c.id = m.chat_id
         where m.chat_id = $1 and not m.placeholder
           and ($2::timestamptz is null or (m.sent_at, m.id) < ($2, $3))
         order by m.sent_at desc, m.id desc
         limit $4"
    ))
    .bind(&chat_id)
    .bind(before.as_ref().and_then(|c| c.at))
    .bind(before.as_ref().map(|c| &c.id))
    .bind(limit + 1)
    .fetch_all(&state.db)
    .await?;
    let mut items: Vec<MessageRecord> = rows.iter().map(MessageRow::record).collect();
    let now = chrono::Utc::now();
    for item in &mut items {
        super::attachments::add_signed_urls(&state.attachments.signer, &item.id, &mut item.attachments, now);
    }
    let next_cursor = (items.len() as i64 > limit).then(|| {
        items.truncate(limit as usize);
        let last = &rows[limit as usize - 1];
        Cursor { at: Some(last.sent_at), id: last.id.clone() }.encode()
    });
    Ok(Json(MessagePage { items, next_cursor }))
}
