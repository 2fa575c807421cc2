//! A typed client for the part of Unipile's REST API the relay uses.
//!
//! Every call goes to `{base}/api/v1/...` with the `X-API-KEY` header, times out, and is
//! retried with exponential backoff and jitter when Unipile is rate limiting (429, with
//! its `Retry-After` honoured), failing (5xx) or unreachable. Errors name the call that
//! failed and why. The key lives in a sensitive header value and never appears in
//! `Debug` output or logs.
//!
//! List endpoints page with a `cursor`; [`UnipileClient::webhooks`],
//! [`UnipileClient::chats`] and [`UnipileClient::messages`] return a [`Stream`] of items
//! that follows the cursor until it is null.
//!
//! Retrying a `POST /webhooks` whose answer was lost may create the webhook twice;
//! [`super::registration::ensure`] removes such duplicates, so the client does not need
//! to tell the cases apart.
//!
//! The configuration (the DSN's base URL, timeouts, the retry policy) is in the private
//! `config` submodule and re-exported here; sending one call, with its retries, is in the
//! private `send` submodule. Sending a message or starting a chat (`outgoing`) is not
//! idempotent upstream and is never retried.

mod config;
mod download;
mod outgoing;
mod send;

pub use config::{ClientConfig, RetryPolicy, base_url};
pub use outgoing::{OutgoingFile, SendError};

use std::fmt;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use reqwest::Url;
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;

use super::types::{Account, Chat, Message, NewWebhook, Page, Webhook, WebhookCreated, WithRaw};
use send::error_chain;

/// Why a Unipile call failed.
#[derive(Debug, thiserror::Error)]
pub enum UnipileError {
    #[error("UNIPILE_DSN {dsn:?} is neither host[:port] nor an http(s) URL: {reason}")]
    InvalidDsn { dsn: String, reason: String },
    #[error("UNIPILE_API_KEY cannot be sent as an HTTP header (it holds control characters)")]
    InvalidApiKey,
    #[error("Unipile {call}: could not reach the API after {attempts} attempt(s): {reason}")]
    Transport { call: String, attempts: u32, reason: String },
    #[error("Unipile {call}: HTTP {status} after {attempts} attempt(s): {body}")]
    Status { call: String, status: u16, attempts: u32, body: String },
    #[error("Unipile {call}: the response is not what the relay expects: {reason}")]
    Decode { call: String, reason: String },
    #[error("Unipile {call}: no answer within {after:?}")]
    Timeout { call: String, after: std::time::Duration },
    #[error("Unipile {call}: the cursor {cursor:?} came back twice; stopping rather than looping")]
    CursorLoop { call: String, cursor: String },
}

impl UnipileError {
    /// The HTTP status Unipile answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A cheap-to-clone handle on Unipile's API.
#[derive(Clone)]
pub struct UnipileClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base_url: Url,
    /// Marked sensitive, so `Debug` of a request or header map never shows it.
    api_key: HeaderValue,
    retry: RetryPolicy,
    page_size: u32,
}

impl fmt::Debug for UnipileClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnipileClient")
            .field("base_url", &self.inner.base_url.as_str())
            .finish_non_exhaustive()
    }
}

/// A call as errors, logs and the `call` label of `unipile_requests_total` name it.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// Stable metric label, e.g. `webhooks.list`.
    name: &'static str,
    method: &'static str,
}

impl UnipileClient {
    pub fn new(config: ClientConfig) -> Result<Self, UnipileError> {
        let mut api_key =
            HeaderValue::from_str(config.api_key.expose_secret()).map_err(|_| UnipileError::InvalidApiKey)?;
        api_key.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("unipile-relay-ingest/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UnipileError::Transport {
                call: "client set-up".into(),
                attempts: 0,
                reason: error_chain(&e),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base_url: config.base_url,
                api_key,
                retry: config.retry,
                page_size: config.page_size.max(1),
            }),
        })
    }

    /// The API base this client calls, e.g. `https://api8.unipile.com:13851/api/v1`.
    pub fn base_url(&self) -> &Url {
        &self.inner.base_url
    }

    /// `POST /webhooks`: registers a webhook and returns its id.
    #[tracing::instrument(skip_all, fields(source = %webhook.source, request_url = %webhook.request_url), err)]
    pub async fn create_webhook(&self, webhook: &NewWebhook) -> Result<String, UnipileError> {
        let call = Call { name: "webhooks.create", method: "POST" };
        let created: WebhookCreated = self.send(call, &["webhooks"], &[], Some(webhook)).await?;
        Ok(created.webhook_id)
    }

    /// `DELETE /webhooks/{id}`.
    #[tracing::instrument(skip(self), err)]
    pub async fn delete_webhook(&self, id: &str) -> Result<(), UnipileError> {
        let call = Call { name: "webhooks.delete", method: "DELETE" };
        let _: serde_json::Value = self.send(call, &["webhooks", id], &[], None::<&()>).await?;
        Ok(())
    }

    /// `GET /webhooks`, every page.
    pub fn webhooks(&self) -> impl Stream<Item = Result<Webhook, UnipileError>> + Send + 'static {
        let call = Call { name: "webhooks.list", method: "GET" };
        self.paginate(call, vec!["webhooks".into()], Vec::new())
    }

    /// All webhooks, collected from every page.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, UnipileError> {
        self.webhooks().try_collect().await
    }

    /// `GET /accounts`, every page: the accounts connected under this API key.
    pub fn accounts(&self) -> impl Stream<Item = Result<Account, UnipileError>> + Send + 'static {
        let call = Call { name: "accounts.list", method: "GET" };
        self.paginate(call, vec!["accounts".into()], Vec::new())
    }

    /// `GET /chats?account_id=`, every page, most recent activity first.
    pub fn chats(&self, account_id: &str) -> impl Stream<Item = Result<Chat, UnipileError>> + Send + 'static {
        let call = Call { name: "chats.list", method: "GET" };
        self.paginate(call, vec!["chats".into()], vec![("account_id", account_id.to_owned())])
    }

    /// `GET /chats/{chat_id}/messages`, every page, newest first, each message with
    /// the JSON it came as. Stop polling the stream to stop fetching pages.
    pub fn messages(
        &self,
        chat_id: &str,
    ) -> impl Stream<Item = Result<(Message, serde_json::Value), UnipileError>> + Send + 'static {
        let call = Call { name: "messages.list", method: "GET" };
        self.paginate::<WithRaw<Message>>(
            call,
            vec!["chats".into(), chat_id.to_owned(), "messages".into()],
            Vec::new(),
        )
        .map_ok(|m| (m.item, m.raw))
    }

    /// Items of a list endpoint, page after page until the cursor is null. A page is
    /// fetched only when the previous one has been consumed.
    fn paginate<T>(
        &self,
        call: Call,
        segments: Vec<String>,
        query: Vec<(&'static str, String)>,
    ) -> impl Stream<Item = Result<T, UnipileError>> + Send + 'static
    where
        T: DeserializeOwned + Send + 'static,
    {
        struct State {
            next: Option<Option<String>>,
            seen: std::collections::HashSet<String>,
        }
        let client = self.clone();
        let start = State { next: Some(None), seen: Default::default() };
        stream::try_unfold(start, move |mut state| {
            let client = client.clone();
            let segments = segments.clone();
            let mut query = query.clone();
            async move {
                let Some(cursor) = state.next.take() else {
                    return Ok(None);
                };
                query.push(("limit", client.inner.page_size.to_string()));
                if let Some(cursor) = cursor {
                    query.push(("cursor", cursor));
                }
                let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
                let page: Page<T> = client.send(call, &segments, &query, None::<&()>).await?;
                if let Some(next) = page.cursor.filter(|c| !c.is_empty()) {
                    if !state.seen.insert(next.clone()) {
                        return Err(UnipileError::CursorLoop { call: call.to_string(), cursor: next });
                    }
                    state.next = Some(Some(next));
                }
                Ok(Some((stream::iter(page.items.into_iter().map(Ok)), state)))
            }
        })
        .try_flatten()
        .boxed()
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn the_api_key_does_not_show_in_debug_output() {
        let config =
            ClientConfig::new("api1.unipile.com:1", SecretString::from("k3y-v4lue".to_owned())).unwrap();
        let client = UnipileClient::new(config.clone()).unwrap();
        assert!(!format!("{config:?}").contains("k3y-v4lue"));
        assert!(!format!("{client:?}").contains("k3y-v4lue"));
    }
}
