//! `GET /api/chats` and `POST /api/chats/{chat_id}/read`.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::cursor::Cursor;
use super::{ErrorBody, next_page, page_limit};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Write;
use crate::store::chats::MarkRead;
use crate::store::views::{CHAT_COLUMNS, ChatRecord};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChatsQuery {
    /// Only this account's chats (it must be one of the token's accounts).
    pub account_id: Option<String>,
    /// Chats per page: default 50, at most 200.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of chats, newest activity first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatPage {
    pub items: Vec<ChatRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The caller's chats, newest activity first (chats without messages last).
///
/// Keyset-paginated on `(last_message_at, id)`. A chat whose activity moves while a
/// client pages (a new message) moves to the top; the client hears of it by WebSocket.
#[utoipa::path(
    get,
    path = "/api/chats",
    tag = "inbox",
    params(ChatsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of chats", body = ChatPage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "`account_id` is not one of the token's accounts", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub), err(level = "debug"))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ChatsQuery>, QueryRejection>,
) -> Result<Json<ChatPage>, ApiError> {
    let Query(query) = query?;
    let limit = page_limit(query.limit)?;
    let after = query.cursor.as_deref().map(Cursor::decode).transpose()?;
    if query.account_id.as_deref().is_some_and(|account| !caller.allows(account)) {
        return Err(ApiError::NotFound);
    }
    let mut items: Vec<ChatRecord> = sqlx::query_as(&format!(
        "select {CHAT_COLUMNS} from chats c
         where ($1::text[] is null or c.account_id = any($1))
           and ($2::text is null or c.account_id = $2)
           and ($3::text is null
                or ($4::timestamptz is not null
                    and ((c.last_message_at, c.id) < ($4, $3) or c.last_message_at is null))
                or ($4::timestamptz is null and c.last_message_at is null and c.id < $3))
         order by c.last_message_at desc nulls last, c.id desc
         limit $5"
    ))
    .bind(caller.accounts())
    .bind(&query.account_id)
    .bind(after.as_ref().map(|c| &c.id))
    .bind(after.as_ref().and_then(|c| c.at))
    .bind(limit + 1)
    .fetch_all(&state.db)
    .await?;
    let next_cursor =
        next_page(&mut items, limit, |last| Cursor { at: last.last_message_at, id: last.id.clone() });
    Ok(Json(ChatPage { items, next_cursor }))
}

/// Marks a chat read: its unread count goes to 0 and `chat:read` tells the user's other
/// tabs (committed with the change). Marking a chat that has nothing unread changes
/// nothing and emits nothing. Answers the chat as it is now.
#[utoipa::path(
    post,
    path = "/api/chats/{chat_id}/read",
    tag = "inbox",
    params(("chat_id" = String, Path, description = "Unipile chat id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat, read", body = ChatRecord),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "No such chat among the token's accounts", body = ErrorBody),
        (status = 503, description = "The relay cannot save right now; retry", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub, chat_id = %chat_id), err(level = "debug"))]
pub async fn mark_read(
    State(state): State<AppState>,
    caller: Caller,
    Path(chat_id): Path<String>,
) -> Result<Json<ChatRecord>, ApiError> {
    visible_chat(&state.db, &caller, &chat_id).await?;
    state.batcher.submit(Write::MarkRead(MarkRead { chat_id: chat_id.clone() })).await?;
    visible_chat(&state.db, &caller, &chat_id).await.map(Json)
}

/// The chat, if it exists and the caller may see it; otherwise 404 (never its data).
pub async fn visible_chat(db: &PgPool, caller: &Caller, chat_id: &str) -> Result<ChatRecord, ApiError> {
    if chat_id.len() > crate::payload::lenient::MAX_ID_BYTES || chat_id.contains('\0') {
        // No chat is stored under such an id.
        return Err(ApiError::NotFound);
    }
    let chat: Option<ChatRecord> =
        sqlx::query_as(&format!("select {CHAT_COLUMNS} from chats c where c.id = $1"))
            .bind(chat_id)
            .fetch_optional(db)
            .await?;
    chat.filter(|c| caller.allows(&c.account_id)).ok_or(ApiError::NotFound)
}
