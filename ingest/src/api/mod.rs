//! The REST read API: a user's inbox as it stands, for page loads and after a resume
//! that came too late (`"recovered": false`).
//!
//! - `GET /api/chats?account_id=&limit=&cursor=`: chats, newest activity first.
//! - `GET /api/chats/{chat_id}/messages?limit=&before=`: a chat's messages, newest first.
//! - `POST /api/chats/{chat_id}/read`: unread count to 0; emits `chat:read`.
//! - `POST /api/chats/{chat_id}/messages`: a reply through Unipile ([`replies`]).
//! - `POST /api/chats`: a new chat through Unipile ([`replies`]).
//! - `GET /api/messages/{message_id}/attachments/{attachment_id}`: a file, streamed from
//!   Unipile; `POST .../url`: a short-lived signed URL for it ([`attachments`]).
//! - `GET /api/accounts`: the token's accounts with provider, name and status ([`accounts`]).
//! - `GET /api/openapi.json`: the OpenAPI description of these and the webhooks.
//!
//! Every call but the last needs the fanout token ([`auth`]) and sees only its accounts.
//! Lists page with keyset cursors ([`cursor`]): a page never repeats or skips an item
//! because of messages that arrive meanwhile. Errors have the one shape of
//! [`crate::error::ApiError`].

pub mod accounts;
pub mod attachments;
pub mod auth;
pub mod chats;
pub mod cursor;
pub mod messages;
pub mod openapi;
pub mod replies;
pub mod signing;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{get, post};

use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::state::AppState;

/// Items per page when the client does not say.
pub const DEFAULT_LIMIT: i64 = 50;
/// Most items per page; a larger `limit` is cut to this.
pub const MAX_LIMIT: i64 = 200;

/// The API's routes; `reply_max_body_bytes` bounds the bodies of the two sending routes.
pub fn router(reply_max_body_bytes: usize) -> Router<AppState> {
    let sending = DefaultBodyLimit::max(reply_max_body_bytes);
    Router::new()
        .route("/api/chats", get(chats::list).post(replies::start_chat).layer(sending))
        .route("/api/chats/{chat_id}/messages", get(messages::list).post(replies::send).layer(sending))
        .route("/api/chats/{chat_id}/read", post(chats::mark_read))
        .route("/api/openapi.json", get(openapi::serve))
        // media: attachments and accounts
        .route("/api/messages/{message_id}/attachments/{attachment_id}", get(attachments::download))
        .route("/api/messages/{message_id}/attachments/{attachment_id}/url", post(attachments::signed_url))
        .route("/api/accounts", get(accounts::list))
}

/// CORS for the browser origins allowed to call the REST API (none when the list is
/// empty). Origins that are not valid header values are left out with a warning.
pub fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(3600));
    if origins.iter().any(|o| o.trim() == "*") {
        // Any origin: safe only because the API takes bearer tokens, never cookies, so a
        // page can call it only with a token it was given.
        return layer.allow_origin(AllowOrigin::any());
    }
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .filter_map(|o| match HeaderValue::from_str(o) {
            Ok(value) => Some(value),
            Err(_) => {
                tracing::warn!(origin = o, "ignoring a CORS origin that is not a valid header value");
                None
            }
        })
        .collect();
    layer.allow_origin(AllowOrigin::list(allowed))
}

/// The page size asked for: default 50, at most 200, at least 1.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if n < 1 => Err(ApiError::BadRequest("limit must be at least 1".into())),
        Some(n) => Ok(n.min(MAX_LIMIT)),
    }
}

/// Ends a keyset page read with `limit + 1` rows: cuts `items` to `limit` and, when
/// there was more, returns the next page's cursor made from the last item kept.
pub fn next_page<T>(
    items: &mut Vec<T>,
    limit: i64,
    cursor: impl FnOnce(&T) -> cursor::Cursor,
) -> Option<String> {
    if items.len() as i64 <= limit {
        return None;
    }
    items.truncate(limit as usize);
    items.last().map(|last| cursor(last).encode())
}

/// The error body every failing call of both services answers with.
pub use shared::errors::{ErrorBody, ErrorDetail};

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    #[test]
    fn limits_default_to_50_are_capped_at_200_and_must_be_positive() {
        assert_eq!(page_limit(None).unwrap(), 50);
        assert_eq!(page_limit(Some(7)).unwrap(), 7);
        assert_eq!(page_limit(Some(5000)).unwrap(), 200);
        assert!(matches!(page_limit(Some(0)), Err(ApiError::BadRequest(_))));
    }

    #[tokio::test]
    async fn a_wildcard_cors_origin_allows_any_origin_instead_of_panicking() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/x", axum::routing::get(|| async { "ok" }))
            .layer(cors(&["https://a.example".into(), "*".into()]));
        let request = axum::http::Request::get("/x")
            .header("origin", "https://anywhere.example")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
    }

    #[tokio::test]
    async fn a_503_names_no_database_detail() {
        let response =
            ApiError::Unavailable("database error: password authentication failed".into()).into_response();
        assert_eq!(response.status(), 503);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body.error.code, "unavailable");
        assert!(!body.error.message.contains("password"), "{}", body.error.message);
    }

    #[tokio::test]
    async fn the_documented_error_body_is_what_errors_answer() {
        let response = ApiError::NotFound.into_response();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: ErrorBody = serde_json::from_slice(&bytes).expect("matches ErrorBody");
        assert_eq!(body.error.code, "not_found");
    }
}
