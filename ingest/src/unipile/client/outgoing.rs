//! Sending through Unipile: a reply in a chat, a new chat. Unlike every other call these
//! are not idempotent upstream (a retried send may reach the recipient twice), so they
//! are sent once, with their own timeout, and never retried: a failure says what
//! happened ([`SendError`]) and the caller decides.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use reqwest::multipart::{Form, Part};
use serde::de::DeserializeOwned;

use super::super::types::{ChatStarted, MessageSent};
use super::send::{error_chain, parse_retry_after, truncate};
use super::{Call, UnipileClient};

/// A file sent with a reply.
#[derive(Debug, Clone)]
pub struct OutgoingFile {
    pub name: String,
    pub content_type: Option<String>,
    pub bytes: bytes::Bytes,
}

/// Why a send did not go through. Nothing was retried.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// 429: Unipile asks to wait (`Retry-After`, when it said).
    #[error("Unipile is rate limiting sends")]
    RateLimited { retry_after: Option<Duration> },
    /// No answer within the send timeout: the message may or may not have gone out.
    #[error("Unipile did not answer within {0:?}")]
    Timeout(Duration),
    /// Unipile answered an error status.
    #[error("Unipile answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// Unipile could not be reached (connection refused, TLS, reset).
    #[error("Unipile could not be reached: {0}")]
    Transport(String),
    /// A success whose body is not what Unipile documents.
    #[error("Unipile's answer is not what the relay expects: {0}")]
    Decode(String),
}

impl SendError {
    /// The short reason stored on a failed reply.
    pub fn reason(&self) -> String {
        match self {
            Self::RateLimited { .. } => "rate_limited".to_owned(),
            Self::Timeout(_) => "timeout".to_owned(),
            Self::Status { status, body } => format!("unipile_error: HTTP {status}: {body}"),
            Self::Transport(reason) => format!("unreachable: {reason}"),
            Self::Decode(reason) => format!("bad_answer: {reason}"),
        }
    }
}

impl UnipileClient {
    /// `POST /chats/{chat_id}/messages` (multipart: `text`, and `attachments` files), once.
    #[tracing::instrument(skip_all, fields(chat_id = %chat_id, files = files.len()), err(level = "info"))]
    pub async fn send_message(
        &self,
        chat_id: &str,
        text: &str,
        files: Vec<OutgoingFile>,
        timeout: Duration,
    ) -> Result<MessageSent, SendError> {
        let mut form = Form::new().text("text", text.to_owned());
        for file in files {
            let mut part = Part::stream(file.bytes).file_name(file.name);
            if let Some(content_type) = file.content_type {
                part = part.mime_str(&content_type).map_err(|e| SendError::Decode(e.to_string()))?;
            }
            form = form.part("attachments", part);
        }
        let call = Call { name: "messages.send", method: "POST" };
        self.send_once(call, &["chats", chat_id, "messages"], form, timeout).await
    }

    /// `POST /chats` (multipart: `account_id`, one `attendees_ids` per attendee, `text`), once.
    #[tracing::instrument(skip_all, fields(account_id = %account_id), err(level = "info"))]
    pub async fn start_chat(
        &self,
        account_id: &str,
        attendees_ids: &[String],
        text: &str,
        timeout: Duration,
    ) -> Result<ChatStarted, SendError> {
        let mut form = Form::new().text("account_id", account_id.to_owned()).text("text", text.to_owned());
        for attendee in attendees_ids {
            form = form.text("attendees_ids", attendee.clone());
        }
        let call = Call { name: "chats.start", method: "POST" };
        self.send_once(call, &["chats"], form, timeout).await
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        call: Call,
        segments: &[&str],
        form: Form,
        timeout: Duration,
    ) -> Result<T, SendError> {
        let mut url = self.inner.base_url.clone();
        url.path_segments_mut().expect("an http(s) URL has path segments").pop_if_empty().extend(segments);
        let sent = self
            .inner
            .http
            .post(url)
            .header("X-API-KEY", self.inner.api_key.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .multipart(form)
            .timeout(timeout)
            .send()
            .await;
        let record = |outcome| crate::metrics::unipile_request(call.name, outcome);
        // The request failed on the way, sending or reading the answer: counted and told
        // apart the same way in both places.
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                record("timeout");
                SendError::Timeout(timeout)
            } else {
                record("transport_error");
                SendError::Transport(error_chain(&e))
            }
        };
        let response = sent.map_err(failed)?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            record("rate_limited");
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
            return Err(SendError::RateLimited { retry_after });
        }
        let body = response.bytes().await.map_err(failed)?;
        if !status.is_success() {
            record(if status.is_server_error() { "server_error" } else { "client_error" });
            let text = truncate(crate::sanitize::scrubbed(&String::from_utf8_lossy(&body)).into_owned());
            return Err(SendError::Status { status: status.as_u16(), body: text });
        }
        crate::sanitize::parse(&body)
            .and_then(|(value, _)| serde_json::from_value(value))
            .map_err(|e| {
                record("decode_error");
                SendError::Decode(e.to_string())
            })
            .inspect(|_| record("ok"))
    }
}
