//! Who calls the REST API: the same JWT as fanout's WebSocket, in `Authorization: Bearer`.
//!
//! A missing, expired or badly signed token is a 401 with the usual error body. The
//! token's `accounts` scope every answer: a chat of another account is a 404, the same as
//! a chat that does not exist, so ids of other tenants cannot be probed. Each token's
//! `sub` may make `REST_REQUESTS_PER_SEC_PER_SUB` calls a second; beyond that it is
//! answered 429 with `Retry-After`, before any database work.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use shared::claims::Claims;

use crate::error::ApiError;
use crate::state::AppState;

/// The verified claims of the caller's token. Taking it as an argument makes a handler
/// authenticated.
#[derive(Debug, Clone)]
pub struct Caller(pub Claims);

impl Caller {
    /// Whether the caller may see this account's chats.
    pub fn allows(&self, account_id: &str) -> bool {
        self.0.allows(account_id)
    }

    /// The accounts to filter on, `None` for a token that sees all of them.
    pub fn accounts(&self) -> Option<&[String]> {
        (!self.0.sees_all()).then_some(self.0.accounts.as_slice())
    }
}

impl Caller {
    /// The caller named by `Authorization: Bearer`, for handlers that take other
    /// credentials too (a signed attachment URL).
    pub fn from_headers(headers: &axum::http::HeaderMap, state: &AppState) -> Result<Self, ApiError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(shared::errors::bearer_token)
            .ok_or(ApiError::Unauthorized)?;
        let claims = state.jwt.verify(token).map_err(|e| {
            tracing::debug!(error = %e, "refusing a REST token");
            ApiError::Unauthorized
        })?;
        if let Some(limit) = &state.rest_limit
            && let Err(retry_after) = limit.check(&claims.sub)
        {
            crate::metrics::rest_refused("rate_limited");
            return Err(ApiError::TooManyRequests { retry_after });
        }
        Ok(Caller(claims))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers, state)
    }
}
