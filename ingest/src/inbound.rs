//! The webhook endpoints Unipile calls.
//!
//! - `POST /api/webhooks/unipile/messages`: messaging events.
//! - `POST /api/webhooks/unipile/account-status`: account status changes.
//!
//! Answers, per the contract: 401 for a missing or wrong `Unipile-Auth` (checked in
//! constant time, before the body is read); 413 over the body limit; 200 with
//! `{"status": "accepted" | "duplicate" | "ignored" | "dead_lettered"}` once the
//! delivery is committed (or kept as a dead letter when it cannot be used); 503 when
//! the relay cannot save, so Unipile retries. The body is parsed as JSON whatever the
//! `Content-Type` says: Unipile sometimes labels JSON as form data.
//!
//! Hostile input has a defined outcome and costs no other delivery: bodies are repaired
//! and scrubbed of U+0000 before use ([`sanitize`]); ids over 255 bytes are
//! dead-lettered (`id_too_long`); a delivery the database still refuses for its data is
//! retried alone by the batcher and, refused again, dead-lettered with its raw body and
//! answered 200, since a retry could never succeed.

use std::time::Instant;

use crate::payload::{AccountStatusDelivery, MessagingEvent, MessagingEventKind};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::sanitize;
use crate::state::AppState;
use crate::store::accounts::StatusChange;
use crate::store::updates::MessageUpdate;
use crate::store::{NewMessage, Outcome, StoreError, Write, dead_letters};

pub const MESSAGES_PATH: &str = "/api/webhooks/unipile/messages";
pub const ACCOUNT_STATUS_PATH: &str = "/api/webhooks/unipile/account-status";
/// The header Unipile sends our secret in (we register it with the webhook).
pub const AUTH_HEADER: &str = "Unipile-Auth";

pub fn router(state: AppState, max_body_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(MESSAGES_PATH, post(messages))
        .route(ACCOUNT_STATUS_PATH, post(account_status))
        .route_layer(middleware::from_fn_with_state(state, require_secret))
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// The body of every 200 answer.
#[derive(Debug, Serialize)]
pub struct Ack {
    pub status: AckStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Accepted,
    Duplicate,
    Ignored,
    DeadLettered,
}

impl AckStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

impl From<Outcome> for AckStatus {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Accepted => Self::Accepted,
            Outcome::Duplicate => Self::Duplicate,
            Outcome::Ignored => Self::Ignored,
        }
    }
}

/// Rejects a request whose `Unipile-Auth` is missing or wrong, before its body is read.
async fn require_secret(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let expected = state.webhook_secret.expose_secret().as_bytes();
    let given = request.headers().get(AUTH_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if bool::from(given.ct_eq(expected)) {
        next.run(request).await
    } else {
        crate::metrics::webhook_answered(request.uri().path(), "unauthorized", None);
        axum::response::IntoResponse::into_response(ApiError::Unauthorized)
    }
}

async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    answer(&state, MESSAGES_PATH, &headers, body, handle_messaging).await
}

async fn account_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Ack>, ApiError> {
    answer(&state, ACCOUNT_STATUS_PATH, &headers, body, handle_account_status).await
}

/// What a handler decided about a parsed body.
enum Decision {
    Stored(Outcome),
    DeadLetter(String),
}

/// Shared by both endpoints: size check, JSON parse, the endpoint's own handling,
/// dead-lettering, metrics.
async fn answer<F, Fut>(
    state: &AppState,
    endpoint: &'static str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    handle: F,
) -> Result<Json<Ack>, ApiError>
where
    F: FnOnce(AppState, Value) -> Fut,
    Fut: Future<Output = Result<Decision, StoreError>>,
{
    let started = Instant::now();
    let result = async {
        let body = body?;
        let decision = match sanitize::parse(&body) {
            Ok((value, repaired)) => {
                if repaired {
                    crate::metrics::webhook_body_repaired(endpoint);
                }
                match handle(state.clone(), value).await {
                    Ok(decision) => decision,
                    // Refused alone for its data: a retry would be refused again.
                    Err(StoreError::Rejected { reason }) => Decision::DeadLetter(reason),
                    // Transient: 503, so Unipile retries.
                    Err(e) => return Err(ApiError::Unavailable(e.to_string())),
                }
            }
            Err(e) => Decision::DeadLetter(format!("body is not JSON: {e}")),
        };
        match decision {
            Decision::Stored(outcome) => Ok(AckStatus::from(outcome)),
            Decision::DeadLetter(reason) => {
                // The reason may quote the stranger's input; the body is kept as bytes.
                let reason = sanitize::scrubbed(&reason);
                let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                tracing::warn!(endpoint, reason = %reason, "dead-lettering a delivery");
                dead_letters::insert(&state.webhook_db, endpoint, &reason, content_type, &body).await?;
                Ok(AckStatus::DeadLettered)
            }
        }
    }
    .await;
    let outcome = match &result {
        Ok(status) => status.as_str(),
        Err(ApiError::PayloadTooLarge) => "too_large",
        Err(ApiError::BadRequest(_)) => "bad_request",
        Err(_) => "unavailable",
    };
    crate::metrics::webhook_answered(endpoint, outcome, Some(started.elapsed()));
    result.map(|status| Json(Ack { status }))
}

async fn handle_messaging(state: AppState, value: Value) -> Result<Decision, StoreError> {
    let event = match parse_messaging(&value) {
        Ok(event) => event,
        Err(reason) => return Ok(Decision::DeadLetter(reason)),
    };
    let write = match &event.event {
        MessagingEventKind::MessageReceived => {
            Write::Message(NewMessage::from_webhook(&event, value, Utc::now()))
        }
        MessagingEventKind::Other(name) => {
            return Ok(Decision::DeadLetter(format!("unknown event {name:?}")));
        }
        known => match MessageUpdate::from_webhook(&event, Utc::now()) {
            Some(update) => Write::Update(update),
            None => return Ok(Decision::DeadLetter(format!("event {:?} is not handled", known.as_str()))),
        },
    };
    state.batcher.submit(write).await.map(Decision::Stored)
}

async fn handle_account_status(state: AppState, value: Value) -> Result<Decision, StoreError> {
    let delivery = match AccountStatusDelivery::deserialize(&value) {
        Ok(delivery) => delivery,
        Err(e) => return Ok(Decision::DeadLetter(format!("unusable account status: {e}"))),
    };
    let write = Write::AccountStatus(StatusChange::from_webhook(&delivery, Utc::now()));
    let stored = state.batcher.submit(write).await?;
    // A return may have asked for a backfill: let this replica's worker look now.
    state.backfill_wake.notify_one();
    Ok(Decision::Stored(stored))
}

/// Reads a messaging delivery, or says why it cannot be used.
fn parse_messaging(value: &Value) -> Result<MessagingEvent, String> {
    if !value.is_object() {
        return Err("body is JSON but not an object".to_owned());
    }
    MessagingEvent::deserialize(value).map_err(|e| format!("unusable messaging event: {e}"))
}
