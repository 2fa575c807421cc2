//! The one HTTP error type of ingest, and its JSON shape.
//!
//! Every error answer is `{"error": {"code": "...", "message": "..."}}`. Database and
//! unexpected failures are logged here and answered without detail.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::errors::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong credentials")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is over the size limit")]
    PayloadTooLarge,
    /// The request is well-formed but its content cannot be used (an empty text, say).
    #[error("{0}")]
    Unprocessable(String),
    /// A reply with more files than it may carry.
    #[error("a reply carries at most {0} files")]
    TooManyFiles(usize),
    /// The request conflicts with an earlier one (an idempotency key reused).
    #[error("{0}")]
    Conflict(String),
    /// A feature this deployment has not configured (sending without UNIPILE_DSN).
    #[error("{0}")]
    NotConfigured(String),
    /// Unipile refused, failed or did not answer a send: the status says which
    /// (429 rate limited, with `Retry-After`; 502; 504).
    #[error("{message}")]
    Upstream { status: StatusCode, code: &'static str, message: String, retry_after: Option<u64> },
    /// One token's `sub` called more often than it may; retry after the given time.
    #[error("too many requests for this token; retry later")]
    TooManyRequests { retry_after: std::time::Duration },
    /// The relay cannot save right now (database down, writers saturated): retry later.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// A signed URL that is tampered with or expired.
    #[error("{0}")]
    Forbidden(String),
    /// A file larger than `ATTACHMENT_MAX_BYTES`.
    #[error("the attachment is larger than the relay passes on ({limit} bytes)")]
    AttachmentTooLarge { limit: u64 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<crate::store::StoreError> for ApiError {
    /// A write refused for its data is the request's fault (400); anything else is the
    /// relay's, for now (503: retry).
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::Rejected { reason } => Self::BadRequest(reason),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            _ => Self::BadRequest(rejection.body_text()),
        }
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooManyFiles(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::NotConfigured(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_configured"),
            Self::Upstream { status, code, .. } => (*status, code),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::AttachmentTooLarge { .. } => (StatusCode::BAD_GATEWAY, "attachment_too_large"),
            // Refused for what the request carried (a U+0000 in a cursor, say): the
            // same request would be refused again.
            Self::Database(e) if crate::store::is_data_error(e) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Database(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Database(e) if crate::store::is_data_error(e) => {
                tracing::info!(error = %e, "the database refused the request's data");
                "the request holds a value the relay cannot store or look up".to_owned()
            }
            Self::Database(e) => {
                tracing::error!(error = %e, "database error");
                "the service cannot reach its database; retry later".to_owned()
            }
            Self::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error".to_owned()
            }
            Self::Unavailable(reason) => {
                // The reason may name database internals: logged, never answered.
                tracing::warn!(reason = %reason, "answering 503");
                "temporarily unavailable; retry later".to_owned()
            }
            other => other.to_string(),
        };
        let retry_after = match &self {
            Self::Upstream { retry_after, .. } => *retry_after,
            Self::TooManyRequests { retry_after } => Some(retry_after.as_secs()),
            Self::NotConfigured(_) => None,
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(5),
            _ => None,
        };
        let mut response = ErrorBody::new(code, message).respond(status);
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}
