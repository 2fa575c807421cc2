//! `GET /api/accounts`: the token's accounts, with provider, name and status.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::cursor::Cursor;
use super::{ErrorBody, next_page, page_limit};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::accounts::{ACCOUNT_COLUMNS, AccountRecord};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AccountsQuery {
    /// Accounts per page: default 50, at most 200.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of accounts, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountPage {
    pub items: Vec<AccountRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The caller's accounts as the relay knows them: from account-status webhooks (the
/// status, when it changed) and from Unipile's account list, read by `ingest sync` and
/// the start-up catch-up (name, provider, status). An account the relay has only seen
/// messages of has no status yet (`null`). Changes arrive live as `account:status`.
#[utoipa::path(
    get,
    path = "/api/accounts",
    tag = "accounts",
    params(AccountsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of accounts", body = AccountPage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub), err(level = "debug"))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AccountsQuery>, QueryRejection>,
) -> Result<Json<AccountPage>, ApiError> {
    let Query(query) = query?;
    let limit = page_limit(query.limit)?;
    let after = query.cursor.as_deref().map(Cursor::decode).transpose()?;
    let mut items: Vec<AccountRecord> = sqlx::query_as(&format!(
        "select {ACCOUNT_COLUMNS} from accounts
         where ($1::text[] is null or id = any($1)) and ($2::text is null or id > $2)
         order by id
         limit $3"
    ))
    .bind(caller.accounts())
    .bind(after.as_ref().map(|c| &c.id))
    .bind(limit + 1)
    .fetch_all(&state.db)
    .await?;
    let next_cursor = next_page(&mut items, limit, |last| Cursor { at: None, id: last.id.clone() });
    Ok(Json(AccountPage { items, next_cursor }))
}
