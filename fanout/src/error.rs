//! HTTP errors of fanout, turned into responses in one place.
//!
//! Body shape, as ingest's: `{"error": {"code": "<code>", "message": "<human text>"}}`
//! ([`shared::errors::ErrorBody`]).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::errors::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, a badly signed one or an expired one.
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("invalid query: {0}")]
    BadRequest(String),
    /// A chat of an account the token does not list (the same as one that does not exist).
    #[error("not found")]
    NotFound,
    /// The connection limit of this replica is reached.
    #[error("too many connections on this replica")]
    TooManyConnections,
    /// The token's subject holds as many connections as it may.
    #[error("too many connections for this token's subject")]
    TooManyForSubject,
    /// The token's subject started as many resumes this minute as it may.
    #[error("too many resumes for this token's subject; retry later")]
    TooManyResumes { retry_after: std::time::Duration },
    /// The follower has not found the stream yet, or the server is stopping.
    #[error("not ready, try another replica")]
    NotReady,
    #[error(transparent)]
    Upgrade(#[from] WebSocketUpgradeRejection),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TooManyConnections => (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections"),
            ApiError::TooManyForSubject => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections_for_token"),
            ApiError::TooManyResumes { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_resumes"),
            ApiError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Upgrade(rejection) => (rejection.status(), "not_a_websocket_upgrade"),
        };
        let mut response = ErrorBody::new(code, self.to_string()).respond(status);
        if let ApiError::TooManyResumes { retry_after } = &self {
            response.headers_mut().insert("retry-after", retry_after.as_secs().into());
        }
        response
    }
}
