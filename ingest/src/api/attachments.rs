//! Attachments, streamed from Unipile.
//!
//! - `GET /api/messages/{message_id}/attachments/{attachment_id}`: the file, with a
//!   bearer token or a signed URL ([`super::signing`]).
//! - `POST /api/messages/{message_id}/attachments/{attachment_id}/url`: a signed URL
//!   for it, valid a few minutes, for `<img>` and `<audio>`.
//!
//! Scope: the message must be stored, not deleted, of one of the token's accounts, and
//! the attachment id one of that message's stored attachments; anything else is the
//! same 404, so ids cannot be probed, and Unipile is not called. Ids that cannot be
//! stored ids (empty, over 1 KiB, control characters, `.`/`..`) are 404 too; the ids
//! that are called go out percent-encoded.
//!
//! The file is never held whole: Unipile's body is passed on chunk by chunk with its
//! `content-type` and `content-length`. A length over `ATTACHMENT_MAX_BYTES` is refused
//! before a byte is sent (502 `attachment_too_large`); a body that grows past the cap
//! anyway, pauses longer than the idle timeout or outlasts the total timeout is cut (the
//! client sees an incomplete body). Unipile's 404 is a 404, its 429 a 429 with its
//! `Retry-After`, its other errors a 502, no answer in time a 504.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ErrorBody;
use super::auth::Caller;
use super::signing::UrlSigner;
use crate::config::AttachmentArgs;
use crate::error::ApiError;
use crate::state::AppState;
use crate::unipile::UnipileError;

/// Longest id accepted in the path; stored ids are far shorter.
const MAX_ID_BYTES: usize = 1024;

/// The limits and the signer of attachment downloads.
#[derive(Debug, Clone)]
pub struct AttachmentSettings {
    pub max_bytes: u64,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub signer: UrlSigner,
}

impl AttachmentSettings {
    pub fn new(args: &AttachmentArgs, jwt_secret: &secrecy::SecretString) -> Self {
        Self {
            max_bytes: args.attachment_max_bytes,
            first_byte_timeout: Duration::from_secs(args.attachment_first_byte_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(args.attachment_idle_timeout_secs.max(1)),
            total_timeout: Duration::from_secs(args.attachment_total_timeout_secs.max(1)),
            signer: UrlSigner::new(jwt_secret, Duration::from_secs(args.attachment_url_ttl_secs.max(1))),
        }
    }
}

/// The proof a signed URL carries instead of a token.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SignedQuery {
    /// Unix time (seconds) the signed URL stops working.
    pub expires: Option<i64>,
    /// The URL's signature, as handed out.
    pub sig: Option<String>,
}

/// A signed URL for one attachment.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttachmentUrl {
    /// Path and query, e.g. `/api/messages/m/attachments/a?expires=..&sig=..`: put the
    /// API's origin in front. Works without a token until `expires_at`.
    pub url: String,
    #[serde(with = "shared::envelope::millis")]
    pub expires_at: DateTime<Utc>,
}

/// An attachment file, streamed from Unipile.
///
/// Needs a bearer token that may see the message, or the `expires` and `sig` of a
/// signed URL (`POST .../url`, or `signed_url` in a message's attachments).
#[utoipa::path(
    get,
    path = "/api/messages/{message_id}/attachments/{attachment_id}",
    tag = "attachments",
    params(
        ("message_id" = String, Path, description = "Unipile message id"),
        ("attachment_id" = String, Path, description = "The attachment's `id`, as the message lists it"),
        SignedQuery,
    ),
    security(("bearer" = []), ()),
    responses(
        (status = 200, description = "The file, with Unipile's content-type and content-length", content_type = "application/octet-stream"),
        (status = 401, description = "Neither a valid token nor a signature", body = ErrorBody),
        (status = 403, description = "A signed URL that is tampered with or expired", body = ErrorBody),
        (status = 404, description = "No such attachment of a message the caller may see", body = ErrorBody),
        (status = 429, description = "Unipile is rate limiting; see Retry-After", body = ErrorBody),
        (status = 502, description = "Unipile failed, or the file is over ATTACHMENT_MAX_BYTES (`attachment_too_large`)", body = ErrorBody),
        (status = 503, description = "The relay has no Unipile credentials", body = ErrorBody),
        (status = 504, description = "Unipile did not answer in time", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(message_id = tracing::field::Empty), err(level = "debug"))]
pub async fn download(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<SignedQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((message_id, attachment_id)) = path.map_err(|_| ApiError::NotFound)?;
    let Query(query) = query?;
    tracing::Span::current().record("message_id", message_id.as_str());
    let caller = match &query.sig {
        Some(sig) => {
            let expires =
                query.expires.ok_or_else(|| ApiError::Forbidden("a signed URL needs expires".into()))?;
            state.attachments.signer.verify(&message_id, &attachment_id, expires, sig, Utc::now()).map_err(
                |e| {
                    crate::metrics::attachment_download("forbidden");
                    ApiError::Forbidden(e.to_string())
                },
            )?;
            // The scope was checked when the URL was signed.
            None
        }
        None => Some(Caller::from_headers(&headers, &state)?),
    };
    visible_attachment(&state, caller.as_ref(), &message_id, &attachment_id).await.inspect_err(|e| {
        if matches!(e, ApiError::NotFound) {
            crate::metrics::attachment_download("not_found");
        }
    })?;
    let unipile = state.unipile.as_ref().ok_or_else(|| {
        ApiError::NotConfigured(
            "attachments need Unipile: UNIPILE_DSN and UNIPILE_API_KEY are not set".into(),
        )
    })?;
    let settings = &state.attachments;
    let response = unipile
        .attachment(&message_id, &attachment_id, settings.first_byte_timeout, settings.total_timeout)
        .await
        .map_err(|e| {
            crate::metrics::attachment_download("upstream_error");
            match e {
                UnipileError::Timeout { .. } => {
                    upstream(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout", None)
                }
                other => {
                    tracing::warn!(error = %other, "an attachment could not be fetched from Unipile");
                    upstream(StatusCode::BAD_GATEWAY, "bad_gateway", None)
                }
            }
        })?;
    let status = response.status();
    if !status.is_success() {
        crate::metrics::attachment_download("upstream_error");
        return Err(match status.as_u16() {
            404 | 410 => ApiError::NotFound,
            429 => upstream(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok()),
            ),
            _ => {
                tracing::warn!(%status, "Unipile answered an attachment with an error");
                upstream(StatusCode::BAD_GATEWAY, "bad_gateway", None)
            }
        });
    }
    let upstream = response;
    let length = upstream.content_length();
    if length.is_some_and(|n| n > settings.max_bytes) {
        crate::metrics::attachment_download("too_large");
        return Err(ApiError::AttachmentTooLarge { limit: settings.max_bytes });
    }
    let content_type = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let inline = content_type.to_str().map(|t| t.to_ascii_lowercase()).is_ok_and(|t| {
        (t.starts_with("image/") && !t.contains("svg")) || t.starts_with("audio/") || t.starts_with("video/")
    });
    let body = capped(upstream.bytes_stream(), settings.max_bytes, settings.idle_timeout);
    crate::metrics::attachment_download("ok");
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    // What a stranger sent is never run as a page of the relay's origin.
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static(if inline { "inline" } else { "attachment" }),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
    Ok(response)
}

/// A signed URL for an attachment, valid `ATTACHMENT_URL_TTL_SECS` (default 300 s).
#[utoipa::path(
    post,
    path = "/api/messages/{message_id}/attachments/{attachment_id}/url",
    tag = "attachments",
    params(
        ("message_id" = String, Path, description = "Unipile message id"),
        ("attachment_id" = String, Path, description = "The attachment's `id`, as the message lists it"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A URL that works without a token until it expires", body = AttachmentUrl),
        (status = 401, description = "Missing, expired or badly signed token", body = ErrorBody),
        (status = 404, description = "No such attachment of a message the token may see", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(sub = %caller.0.sub), err(level = "debug"))]
pub async fn signed_url(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<AttachmentUrl>, ApiError> {
    let Path((message_id, attachment_id)) = path.map_err(|_| ApiError::NotFound)?;
    visible_attachment(&state, Some(&caller), &message_id, &attachment_id).await?;
    let signed = state.attachments.signer.sign(&message_id, &attachment_id, Utc::now());
    Ok(Json(AttachmentUrl { url: signed.url, expires_at: signed.expires_at }))
}

/// An error of Unipile's passed on; the message names no detail of Unipile's answer.
fn upstream(status: StatusCode, code: &'static str, retry_after: Option<u64>) -> ApiError {
    let message = match code {
        "rate_limited" => "Unipile is rate limiting the relay; retry later",
        "gateway_timeout" => "Unipile did not answer in time",
        _ => "Unipile could not serve the attachment",
    };
    ApiError::Upstream { status, code, message: message.to_owned(), retry_after }
}

/// Whether an id could be a stored one; anything else is answered like an unknown id.
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && id != "." && id != ".." && !id.chars().any(char::is_control)
}

/// Ok when the message is stored, not deleted, of an account `caller` may see (any,
/// for a signed URL: `None`), and lists an attachment with this id.
async fn visible_attachment(
    state: &AppState,
    caller: Option<&Caller>,
    message_id: &str,
    attachment_id: &str,
) -> Result<(), ApiError> {
    if !plausible_id(message_id) || !plausible_id(attachment_id) {
        return Err(ApiError::NotFound);
    }
    let row: Option<(String, sqlx::types::Json<Value>)> = sqlx::query_as(
        "select account_id, attachments from messages
         where id = $1 and not placeholder and deleted_at is null",
    )
    .bind(message_id)
    .fetch_optional(&state.db)
    .await?;
    let Some((account_id, attachments)) = row else {
        return Err(ApiError::NotFound);
    };
    if caller.is_some_and(|c| !c.allows(&account_id)) {
        return Err(ApiError::NotFound);
    }
    if !attachment_ids(&attachments.0).any(|id| id == attachment_id) {
        return Err(ApiError::NotFound);
    }
    Ok(())
}

/// The ids of a stored `attachments` value (a list, or one bare object).
fn attachment_ids(attachments: &Value) -> impl Iterator<Item = &str> {
    let items: &[Value] = match attachments {
        Value::Array(items) => items,
        other @ Value::Object(_) => std::slice::from_ref(other),
        _ => &[],
    };
    items.iter().filter_map(|a| a.get("id").and_then(Value::as_str))
}

/// Adds a `signed_url` to each attachment of a message the caller may see, for pages
/// that show it with `<img>` or `<audio>`. (Unipile's own `url`, an `att://` reference,
/// is left as it is.)
pub fn add_signed_urls(signer: &UrlSigner, message_id: &str, attachments: &mut [Value], now: DateTime<Utc>) {
    for attachment in attachments {
        let Some(id) = attachment.get("id").and_then(Value::as_str).filter(|id| plausible_id(id)) else {
            continue;
        };
        let signed = signer.sign(message_id, id, now);
        if let Value::Object(fields) = attachment {
            fields.insert("signed_url".into(), Value::String(signed.url));
        }
    }
}

/// Why a passed-on body was cut.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the attachment grew past {0} bytes")]
    TooLarge(u64),
    #[error("Unipile paused longer than {0:?}")]
    Idle(Duration),
    #[error("Unipile's stream failed: {0}")]
    Upstream(String),
}

/// `upstream` passed on chunk by chunk, ending with an error (so the client sees an
/// incomplete body) once more than `cap` bytes came or a chunk took longer than `idle`.
fn capped(
    upstream: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    cap: u64,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, Cut>> + Send + 'static {
    struct State<S> {
        upstream: std::pin::Pin<Box<S>>,
        sent: u64,
        done: bool,
    }
    let start = State { upstream: Box::pin(upstream), sent: 0, done: false };
    stream::unfold(start, move |mut state| async move {
        if state.done {
            return None;
        }
        let cut = |mut state: State<_>, why: Cut| {
            crate::metrics::attachment_download("cut");
            tracing::warn!(reason = %why, sent = state.sent, "cutting an attachment download");
            state.done = true;
            Some((Err(why), state))
        };
        match tokio::time::timeout(idle, state.upstream.next()).await {
            Err(_) => cut(state, Cut::Idle(idle)),
            Ok(None) => {
                crate::metrics::attachment_bytes(state.sent);
                None
            }
            Ok(Some(Err(e))) => cut(state, Cut::Upstream(e.to_string())),
            Ok(Some(Ok(chunk))) => {
                state.sent += chunk.len() as u64;
                if state.sent > cap {
                    return cut(state, Cut::TooLarge(cap));
                }
                Some((Ok(chunk), state))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_that_cannot_be_stored_ids_are_not_plausible() {
        for id in ["", ".", "..", "a\u{0}b", "line\nbreak", &"x".repeat(MAX_ID_BYTES + 1)] {
            assert!(!plausible_id(id), "{id:?}");
        }
        for id in ["att_1", "2-MTcwMDAwMDAwMDAwMGI6ZmlsZQ", "a/b", "../x", "é"] {
            assert!(plausible_id(id), "{id:?}");
        }
    }

    #[test]
    fn attachment_ids_read_a_list_or_one_object() {
        let list = json!([{"id": "a"}, {"type": "img"}, {"id": 7}, {"id": "b"}]);
        assert_eq!(attachment_ids(&list).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(attachment_ids(&json!({"id": "c"})).collect::<Vec<_>>(), ["c"]);
        assert_eq!(attachment_ids(&Value::Null).count(), 0);
    }

    #[tokio::test]
    async fn a_stream_past_the_cap_ends_with_an_error_after_at_most_the_cap() {
        let chunks = (0..10).map(|_| Ok(Bytes::from(vec![0u8; 100])));
        let results: Vec<_> = capped(stream::iter(chunks), 450, Duration::from_secs(1)).collect().await;
        let passed: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(Bytes::len).sum();
        assert_eq!(passed, 400);
        assert!(matches!(results.last(), Some(Err(Cut::TooLarge(450)))));
    }

    #[tokio::test]
    async fn a_stream_that_pauses_past_the_idle_timeout_is_cut() {
        let slow = stream::iter([Ok(Bytes::from_static(b"abc"))]).chain(stream::once(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(Bytes::from_static(b"late"))
        }));
        let results: Vec<_> = capped(slow, 1000, Duration::from_millis(50)).collect().await;
        assert_eq!(results.len(), 2);
        assert!(matches!(results[1], Err(Cut::Idle(_))));
    }
}
