//! Sending through Unipile: `POST /api/chats/{chat_id}/messages` (a reply) and
//! `POST /api/chats` (a new chat).
//!
//! A reply is stored before it is sent (`pending`, with its `message:new`), sent once
//! with Unipile's `POST /chats/{chat_id}/messages`, and then marked `sent` (201) or
//! `failed` (`message:status`), see [`crate::store::replies`]. Sending is not idempotent
//! upstream, so nothing is retried here: a 5xx, an unreachable Unipile or a timeout marks
//! the reply failed and answers 502 or 504; Unipile's 429 marks it failed
//! (`rate_limited`) and answers 429 with its `Retry-After`. The failed reply stays
//! visible, and the caller decides (a retry is a new `client_id`).
//!
//! Idempotency: the `client_id` of the body (or an `Idempotency-Key` header) is unique per
//! account. The first request with a key claims it (`on conflict do nothing`, so two
//! concurrent requests cannot both send) and records its answer; a repeated one answers
//! that same status and body, waiting for it while the first is still sending.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::ErrorBody;
use super::auth::Caller;
use super::chats::visible_chat;
use crate::error::ApiError;
use crate::payload::lenient::MAX_ID_BYTES;
use crate::state::AppState;
use crate::store::replies::{self, NewReply, ReplyDone, Sent};
use crate::store::views::MessageRecord;
use crate::store::{Outcome, Write};
use crate::unipile::{OutgoingFile, SendError, UnipileClient};

/// Longest text a reply or a new chat may carry, in characters.
pub const MAX_TEXT_CHARS: usize = 10_000;
/// Longest `client_id` (or `Idempotency-Key`), in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Most attendees of a new chat.
pub const MAX_ATTENDEES: usize = 50;
/// Most files one reply may carry (more: 413). Their bytes count in REPLY_MAX_BODY_BYTES.
pub const MAX_FILES: usize = 10;
/// How much longer than the send timeout a repeated request waits for the first one's answer.
const REPEAT_GRACE: Duration = Duration::from_secs(5);

/// A reply.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ReplyRequest {
    /// The text, 1 to 10,000 characters (not only spaces).
    pub text: Option<String>,
    /// The idempotency key (1 to 128 bytes, printable): a repeated request with the same
    /// key answers the first one's result and sends nothing. The `Idempotency-Key`
    /// header may carry it instead. Without either, every request sends.
    pub client_id: Option<String>,
}

/// A reply with files (`multipart/form-data`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // documents the form; the handler reads it with multer
pub struct ReplyForm {
    /// As in the JSON body.
    pub text: String,
    /// As in the JSON body.
    pub client_id: Option<String>,
    /// Up to 10 files (more: 413), sent on to Unipile; the whole body within
    /// REPLY_MAX_BODY_BYTES (more: 413).
    #[schema(value_type = Vec<String>, format = Binary)]
    pub attachments: Vec<Vec<u8>>,
}

/// A new chat.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StartChatRequest {
    /// One of the token's accounts.
    pub account_id: String,
    /// Unipile attendee (provider) ids of the people to write to: 1 to 50.
    pub attendees_ids: Vec<String>,
    /// The first message, 1 to 10,000 characters.
    pub text: Option<String>,
}

/// Unipile's answer to a new chat.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatStartedAnswer {
    /// The new chat's id (`null` when Unipile did not say). Its messages arrive by webhook.
    pub chat_id: Option<String>,
    pub message_id: Option<String>,
}

/// A send that did not go through: the error and the reply as stored (`failed`).
#[derive(Debug, Serialize, ToSchema)]
pub struct FailedReply {
    pub error: shared::errors::ErrorDetail,
    pub message: MessageRecord,
}

/// Sends a reply in a chat through Unipile.
///
/// The reply is stored and announced (`message:new`, `state: "pending"`) before Unipile
/// is asked, then `message:status` tells every client `sent` or `failed`. The answer is
/// the stored reply: 201 when Unipile took it; 429, 502 or 504 (with the failed reply
/// beside the error) when it did not. Never retried upstream.
#[utoipa::path(
    post,
    path = "/api/chats/{chat_id}/messages",
    tag = "inbox",
    params(
        ("chat_id" = String, Path, description = "Unipile chat id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Instead of `client_id` in the body"),
    ),
    request_body(content(
        (ReplyRequest = "application/json"),
        (ReplyForm = "multipart/form-data"),
    )),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Sent: the reply, `state: \"sent\"`; `id` is Unipile's message id when it gave one", body = MessageRecord),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "No such chat among the token's accounts", body = ErrorBody),
        (status = 409, description = "The `client_id` was used for another reply, or its first request is still sending", body = ErrorBody),
        (status = 413, description = "Body over REPLY_MAX_BODY_BYTES, or more than 10 files", body = ErrorBody),
        (status = 422, description = "No text, only spaces, over 10,000 characters, or a bad `client_id`", body = ErrorBody),
        (status = 429, description = "Unipile is rate limiting: the reply is failed (`rate_limited`); `Retry-After` is Unipile's", body = FailedReply),
        (status = 502, description = "Unipile failed, refused or was unreachable: the reply is failed, not retried", body = FailedReply),
        (status = 503, description = "Sending is not configured (UNIPILE_DSN), or the relay cannot save", body = ErrorBody),
        (status = 504, description = "Unipile did not answer in time: the reply is failed (`timeout`); it may still arrive", body = FailedReply),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub, chat_id = %chat_id), err(level = "debug"))]
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let chat = visible_chat(&state.db, &caller, &chat_id).await?;
    let body = body?;
    let (request, files) = if is_multipart(&headers) {
        parse_multipart(&headers, body).await?
    } else {
        (parse_json::<ReplyRequest>(&body)?, Vec::new())
    };
    let text = valid_text(request.text.as_deref())?;
    let client_id = client_id(request.client_id.as_deref(), &headers)?;
    let unipile = sending_client(&state)?;
    let (client_id, keyed) = match client_id {
        Some(id) => (id, true),
        None => (uuid::Uuid::new_v4().to_string(), false),
    };
    let reply = NewReply {
        relay_id: NewReply::relay_id(),
        client_id: client_id.clone(),
        account_id: chat.account_id.clone(),
        account_type: chat.account_type.clone(),
        chat_id: chat_id.clone(),
        text: text.clone(),
        attachments: files
            .iter()
            .map(|f| json!({"name": f.name, "size": f.bytes.len(), "mimetype": f.content_type}))
            .collect(),
        at: Utc::now(),
    };
    let relay_id = reply.relay_id.clone();
    if state.batcher.submit(Write::Reply(reply)).await? == Outcome::Duplicate {
        debug_assert!(keyed, "a generated client_id is new");
        return repeated(&state, &chat.account_id, &client_id, &chat_id, &text).await;
    }

    let sent = unipile.send_message(&chat_id, &text, files, state.send_timeout).await;
    let (result, failure) = match sent {
        Ok(sent) => (Sent::Sent { message_id: sent.message_id.filter(|id| usable_id(id)) }, None),
        // A 2xx went out, whatever its body says: sent, without an id.
        Err(SendError::Decode(reason)) => {
            tracing::warn!(reason = %reason, "Unipile's answer to a send is not what it documents");
            (Sent::Sent { message_id: None }, None)
        }
        Err(error) => (Sent::Failed { reason: error.reason() }, Some(error)),
    };
    let done = ReplyDone { relay_id: relay_id.clone(), chat_id: chat_id.clone(), result };
    state.batcher.submit(Write::ReplyDone(done)).await?;
    let record = replies::read(&state.db, &relay_id).await?.ok_or(ApiError::NotFound)?;
    let (status, body, retry_after) = answer(record, failure.as_ref());
    sqlx::query(
        "update replies set answer_status = $3, answer_body = $4, updated_at = now()
         where account_id = $1 and client_id = $2",
    )
    .bind(&chat.account_id)
    .bind(&client_id)
    .bind(status.as_u16() as i16)
    .bind(&body)
    .execute(&state.db)
    .await?;
    Ok(respond(status, body, retry_after))
}

/// The answer to a reply: 201 with the reply, or the error with the failed reply beside it.
fn answer(record: MessageRecord, failure: Option<&SendError>) -> (StatusCode, Value, Option<u64>) {
    let message = serde_json::to_value(&record).expect("a record serializes");
    let Some(failure) = failure else {
        return (StatusCode::CREATED, message, None);
    };
    let (status, code, retry_after) = upstream_status(failure);
    let mut error = json!({"code": code, "message": failure.to_string()});
    if let Some(seconds) = retry_after {
        error["retry_after_secs"] = seconds.into();
    }
    (status, json!({"error": error, "message": message}), retry_after)
}

/// The status and code a failed send answers with, and the `Retry-After` to pass back.
fn upstream_status(failure: &SendError) -> (StatusCode, &'static str, Option<u64>) {
    match failure {
        SendError::RateLimited { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            "unipile_rate_limited",
            Some(retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1)),
        ),
        SendError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "unipile_timeout", None),
        SendError::Status { status, .. } if *status >= 500 => {
            (StatusCode::BAD_GATEWAY, "unipile_error", None)
        }
        SendError::Status { .. } => (StatusCode::BAD_GATEWAY, "unipile_refused", None),
        SendError::Transport(_) => (StatusCode::BAD_GATEWAY, "unipile_unreachable", None),
        SendError::Decode(_) => (StatusCode::BAD_GATEWAY, "unipile_bad_answer", None),
    }
}

fn respond(status: StatusCode, body: Value, retry_after: Option<u64>) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

/// The first request's answer to a repeated key: once it is recorded (waiting up to the
/// send timeout and a little more while the first request is still sending).
async fn repeated(
    state: &AppState,
    account_id: &str,
    client_id: &str,
    chat_id: &str,
    text: &str,
) -> Result<Response, ApiError> {
    #[derive(sqlx::FromRow)]
    struct First {
        relay_id: String,
        chat_id: String,
        text: String,
        answer_status: Option<i16>,
        answer_body: Option<Value>,
    }
    let deadline = tokio::time::Instant::now() + state.send_timeout + REPEAT_GRACE;
    loop {
        let first: First = sqlx::query_as(
            "select relay_id, chat_id, text, answer_status, answer_body from replies
             where account_id = $1 and client_id = $2",
        )
        .bind(account_id)
        .bind(client_id)
        .fetch_one(&state.db)
        .await?;
        if first.chat_id != chat_id || first.text != text {
            return Err(ApiError::Conflict(
                "this client_id was used for another reply; use a new client_id for a new message".into(),
            ));
        }
        if let (Some(status), Some(body)) = (first.answer_status, first.answer_body) {
            let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
            let retry_after = body["error"]["retry_after_secs"].as_u64();
            return Ok(respond(status, body, retry_after));
        }
        if tokio::time::Instant::now() >= deadline {
            // The first request died between sending and recording (a crash): the stored
            // reply says what is known.
            return match replies::read(&state.db, &first.relay_id).await? {
                Some(record) if record.state != Some(crate::store::views::ReplyState::Pending) => {
                    let status = if record.state == Some(crate::store::views::ReplyState::Sent) {
                        StatusCode::CREATED
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    Ok(respond(status, serde_json::to_value(&record).expect("serializes"), None))
                }
                _ => Err(ApiError::Conflict(
                    "the first request with this client_id is still being sent; retry later".into(),
                )),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a chat through Unipile (`POST /chats`): sent once, never retried. Nothing is
/// stored here: the chat and its first message arrive by webhook like any other.
#[utoipa::path(
    post,
    path = "/api/chats",
    tag = "inbox",
    request_body(content = StartChatRequest, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Unipile started the chat", body = ChatStartedAnswer),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "`account_id` is not one of the token's accounts", body = ErrorBody),
        (status = 422, description = "No text, no attendees, too many, or an unusable id", body = ErrorBody),
        (status = 429, description = "Unipile is rate limiting; `Retry-After` is Unipile's", body = ErrorBody),
        (status = 502, description = "Unipile failed, refused or was unreachable; not retried", body = ErrorBody),
        (status = 503, description = "Sending is not configured (UNIPILE_DSN)", body = ErrorBody),
        (status = 504, description = "Unipile did not answer in time; the chat may still be started", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub), err(level = "debug"))]
pub async fn start_chat(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: StartChatRequest = parse_json(&body?)?;
    if !caller.allows(&request.account_id) {
        return Err(ApiError::NotFound);
    }
    let text = valid_text(request.text.as_deref())?;
    if request.attendees_ids.is_empty() || request.attendees_ids.len() > MAX_ATTENDEES {
        return Err(ApiError::Unprocessable(format!("attendees_ids must hold 1 to {MAX_ATTENDEES} ids")));
    }
    if request.attendees_ids.iter().any(|id| !usable_id(id)) {
        return Err(ApiError::Unprocessable(format!(
            "every attendee id must be 1 to {MAX_ID_BYTES} bytes with no control characters"
        )));
    }
    let unipile = sending_client(&state)?;
    match unipile.start_chat(&request.account_id, &request.attendees_ids, &text, state.send_timeout).await {
        Ok(started) => Ok((
            StatusCode::CREATED,
            Json(ChatStartedAnswer { chat_id: started.chat_id, message_id: started.message_id }),
        )
            .into_response()),
        Err(SendError::Decode(reason)) => {
            tracing::warn!(reason = %reason, "Unipile's answer to a new chat is not what it documents");
            Ok((StatusCode::CREATED, Json(ChatStartedAnswer { chat_id: None, message_id: None }))
                .into_response())
        }
        Err(error) => {
            let (status, code, retry_after) = upstream_status(&error);
            Err(ApiError::Upstream { status, code, message: error.to_string(), retry_after })
        }
    }
}

fn sending_client(state: &AppState) -> Result<UnipileClient, ApiError> {
    state.unipile.clone().ok_or_else(|| {
        ApiError::NotConfigured(
            "sending through Unipile is off: UNIPILE_DSN and UNIPILE_API_KEY are not set".into(),
        )
    })
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// A reply with files: `multipart/form-data` with the fields `text` and `client_id` and
/// up to [`MAX_FILES`] files in `attachments` (the whole body within
/// REPLY_MAX_BODY_BYTES, already enforced). More files: 413; a malformed body: 422.
async fn parse_multipart(
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(ReplyRequest, Vec<OutgoingFile>), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::Unprocessable(format!("multipart body without a usable boundary: {e}")))?;
    let stream = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let bad = |e: multer::Error| ApiError::Unprocessable(format!("the multipart body is malformed: {e}"));
    let mut request = ReplyRequest { text: None, client_id: None };
    let mut files = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "text" => request.text = Some(field.text().await.map_err(bad)?),
            "client_id" => request.client_id = Some(field.text().await.map_err(bad)?),
            "attachments" | "attachments[]" | "files" => {
                if files.len() == MAX_FILES {
                    return Err(ApiError::TooManyFiles(MAX_FILES));
                }
                let name = field
                    .file_name()
                    .map(|n| n.chars().filter(|c| !c.is_control()).take(255).collect::<String>())
                    .filter(|n| !n.trim().is_empty())
                    .unwrap_or_else(|| format!("attachment-{}", files.len() + 1));
                let content_type = field.content_type().map(|m| m.essence_str().to_owned());
                let bytes = field.bytes().await.map_err(bad)?;
                files.push(OutgoingFile { name, content_type, bytes });
            }
            other => {
                return Err(ApiError::Unprocessable(format!(
                    "unknown field {:?}: send text, client_id and files in attachments",
                    crate::sanitize::scrubbed(other)
                )));
            }
        }
    }
    Ok((request, files))
}

/// The body as JSON, or a 422 saying why.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Unprocessable(format!("the body is not the JSON expected: {e}")))
}

/// The text to send: present, not only white space, at most [`MAX_TEXT_CHARS`]
/// characters, no U+0000 (PostgreSQL cannot store it, and no messenger shows it).
pub fn valid_text(text: Option<&str>) -> Result<String, ApiError> {
    let text = text.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(ApiError::Unprocessable("text is empty: write something to send".into()));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(ApiError::Unprocessable(format!(
            "text is {chars} characters long; at most {MAX_TEXT_CHARS} can be sent"
        )));
    }
    if text.contains('\0') {
        return Err(ApiError::Unprocessable("text holds U+0000, which cannot be sent".into()));
    }
    Ok(text.to_owned())
}

/// The idempotency key from the body or the `Idempotency-Key` header (they must agree).
pub fn client_id(body: Option<&str>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let header = match headers.get("idempotency-key") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::Unprocessable("Idempotency-Key must be printable ASCII".into()))?,
        ),
        None => None,
    };
    let key = match (body, header) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::Unprocessable("client_id and Idempotency-Key differ; send one".into()));
        }
        (Some(key), _) | (None, Some(key)) => key,
        (None, None) => return Ok(None),
    };
    if key.is_empty() || key.len() > MAX_CLIENT_ID_BYTES || key.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(format!(
            "client_id must be 1 to {MAX_CLIENT_ID_BYTES} bytes with no control characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// Whether an id (Unipile's message id, an attendee id) can be stored and looked up.
fn usable_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_blank_text_is_refused_with_a_clear_message() {
        for text in [None, Some(""), Some("  \n\t ")] {
            let Err(ApiError::Unprocessable(message)) = valid_text(text) else { panic!("{text:?} accepted") };
            assert!(message.contains("empty"), "{message}");
        }
    }

    #[test]
    fn a_text_over_the_maximum_is_refused_and_the_maximum_is_accepted() {
        assert!(valid_text(Some(&"é".repeat(MAX_TEXT_CHARS))).is_ok());
        let Err(ApiError::Unprocessable(message)) = valid_text(Some(&"a".repeat(MAX_TEXT_CHARS + 1))) else {
            panic!("accepted")
        };
        assert!(message.contains("10000") || message.contains("10,000"), "{message}");
    }

    #[test]
    fn client_id_comes_from_the_body_or_the_header_and_is_bounded() {
        let mut headers = HeaderMap::new();
        assert_eq!(client_id(None, &headers).unwrap(), None);
        assert_eq!(client_id(Some("k1"), &headers).unwrap().as_deref(), Some("k1"));
        headers.insert("idempotency-key", "k2".parse().unwrap());
        assert_eq!(client_id(None, &headers).unwrap().as_deref(), Some("k2"));
        assert!(client_id(Some("k1"), &headers).is_err(), "two different keys");
        assert!(client_id(Some(&"x".repeat(MAX_CLIENT_ID_BYTES + 1)), &HeaderMap::new()).is_err());
        assert!(client_id(Some(""), &HeaderMap::new()).is_err());
        assert!(client_id(Some("a\u{1}b"), &HeaderMap::new()).is_err());
    }
}
