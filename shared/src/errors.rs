//! The error body both services answer with: `{"error": {"code": "...", "message": "..."}}`.
//!
//! `code` is stable, for programs (`unauthorized`, `not_found`, `bad_request`,
//! `payload_too_large`, `unavailable`, `too_many_connections`, `not_ready`, ...);
//! `message` is for people and may change.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, for programs: `unauthorized`, `not_found`, `bad_request`,
    /// `payload_too_large`, `unavailable`, `internal`, `too_many_connections`,
    /// `not_ready`, `not_a_websocket_upgrade`.
    pub code: String,
    /// For people; may change.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code: code.into(), message: message.into() } }
    }

    /// The answer: `status` with this body.
    pub fn respond(self, status: StatusCode) -> Response {
        (status, Json(self)).into_response()
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive,
/// as RFC 9110 says); `None` for another scheme or an empty token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_contract_shape() {
        let body = serde_json::to_value(ErrorBody::new("not_found", "no such chat")).unwrap();
        assert_eq!(body, serde_json::json!({"error": {"code": "not_found", "message": "no such chat"}}));
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_refused() {
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
