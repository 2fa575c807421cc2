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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use rand::Rng;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::types::{Account, Chat, Message, NewWebhook, Page, Webhook, WebhookCreated, WithRaw};

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

/// How often and how patiently a call is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each further one.
    pub base_delay: Duration,
    /// Ceiling of the computed delay.
    pub max_delay: Duration,
    /// Ceiling of a `Retry-After` that Unipile asks for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based): half of the exponential step
    /// plus a random share of the other half, so replicas do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let step =
            self.base_delay.saturating_mul(2u32.saturating_pow(retry.saturating_sub(1))).min(self.max_delay);
        let half = step / 2;
        half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
    }
}

/// Where Unipile is, how to authenticate, and how long to wait.
#[derive(Clone)]
pub struct ClientConfig {
    /// `{scheme}://{host}[:port]/api/v1`, see [`base_url`].
    pub base_url: Url,
    pub api_key: SecretString,
    /// Whole-request timeout, connection included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    /// Items asked for per page of a list endpoint.
    pub page_size: u32,
}

impl ClientConfig {
    /// Defaults for a DSN as Unipile shows it, or a full base URL.
    pub fn new(dsn: &str, api_key: SecretString) -> Result<Self, UnipileError> {
        Ok(Self {
            base_url: base_url(dsn)?,
            api_key,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            page_size: 100,
        })
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// The API base for a DSN: `apiN.unipile.com:PORT` becomes
/// `https://apiN.unipile.com:PORT/api/v1`; a URL with a scheme (`http://127.0.0.1:9000`)
/// gets `/api/v1` appended unless it already ends with it.
pub fn base_url(dsn: &str) -> Result<Url, UnipileError> {
    let invalid = |reason: &str| UnipileError::InvalidDsn { dsn: dsn.to_owned(), reason: reason.to_owned() };
    let has_scheme = dsn.contains("://");
    let trimmed = dsn.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let with_scheme = if has_scheme { trimmed.to_owned() } else { format!("https://{trimmed}") };
    let mut url = Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("it must not carry a query or fragment"));
    }
    if !url.path().trim_end_matches('/').ends_with("/api/v1") {
        let path = format!("{}/api/v1", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url)
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

    /// Sends one call with retries and decodes its JSON answer.
    async fn send<T: DeserializeOwned>(
        &self,
        call: Call,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
    ) -> Result<T, UnipileError> {
        let mut url = self.inner.base_url.clone();
        url.path_segments_mut().expect("an http(s) URL has path segments").pop_if_empty().extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let method = Method::from_bytes(call.method.as_bytes()).expect("a static method name");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .header("X-API-KEY", self.inner.api_key.clone())
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some(body) = body {
                request = request.json(body);
            }
            let failure = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let status = response.status();
                    let bytes = response.bytes().await.map_err(|e| {
                        record(call, "transport_error");
                        UnipileError::Transport {
                            call: call.to_string(),
                            attempts: attempt,
                            reason: error_chain(&e),
                        }
                    })?;
                    let text: &[u8] =
                        if bytes.is_empty() && status == StatusCode::NO_CONTENT { b"null" } else { &bytes };
                    // The same repairs and U+0000 scrubbing as webhooks: history holds
                    // what strangers wrote too.
                    return crate::sanitize::parse(text)
                        .and_then(|(value, _)| serde_json::from_value(value))
                        .map_err(|e| {
                            record(call, "decode_error");
                            UnipileError::Decode { call: call.to_string(), reason: e.to_string() }
                        })
                        .inspect(|_| record(call, "ok"));
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(&response);
                    let body = truncate(response.text().await.unwrap_or_default());
                    let error = UnipileError::Status {
                        call: call.to_string(),
                        status: status.as_u16(),
                        attempts: attempt,
                        body,
                    };
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        record(call, "rate_limited");
                        Retryable::Yes(error, retry_after)
                    } else if status.is_server_error() {
                        record(call, "server_error");
                        Retryable::Yes(error, retry_after)
                    } else {
                        record(call, "client_error");
                        Retryable::No(error)
                    }
                }
                Err(e) => {
                    record(call, "transport_error");
                    let error = UnipileError::Transport {
                        call: call.to_string(),
                        attempts: attempt,
                        reason: error_chain(&e),
                    };
                    if e.is_connect() || e.is_timeout() || e.is_request() {
                        Retryable::Yes(error, None)
                    } else {
                        Retryable::No(error)
                    }
                }
            };
            match failure {
                Retryable::No(error) => return Err(error),
                Retryable::Yes(error, _) if attempt >= self.inner.retry.max_attempts => {
                    return Err(error);
                }
                Retryable::Yes(error, retry_after) => {
                    let delay = retry_after
                        .map(|d| d.min(self.inner.retry.max_retry_after))
                        .unwrap_or_else(|| self.inner.retry.backoff(attempt));
                    tracing::warn!(
                        call = call.name,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        error = %error,
                        "unipile call failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.method)
    }
}

enum Retryable {
    Yes(UnipileError, Option<Duration>),
    No(UnipileError),
}

fn record(call: Call, outcome: &'static str) {
    crate::metrics::unipile_request(call.name, outcome);
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, chrono::Utc::now())
}

fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or_default())
}

/// An error with its causes, e.g. `error sending request: connection refused`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn truncate(mut body: String) -> String {
    const MAX: usize = 500;
    if body.len() > MAX {
        let mut end = MAX;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        body.truncate(end);
        body.push('…');
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_without_scheme_means_https() {
        assert_eq!(
            base_url("api8.unipile.com:13851").unwrap().as_str(),
            "https://api8.unipile.com:13851/api/v1"
        );
    }

    #[test]
    fn dsn_with_scheme_is_kept_and_gets_the_api_path() {
        assert_eq!(base_url("http://127.0.0.1:9000").unwrap().as_str(), "http://127.0.0.1:9000/api/v1");
        assert_eq!(base_url("http://127.0.0.1:9000/").unwrap().as_str(), "http://127.0.0.1:9000/api/v1");
        assert_eq!(
            base_url("https://proxy.example.com/unipile/api/v1/").unwrap().as_str(),
            "https://proxy.example.com/unipile/api/v1"
        );
    }

    #[test]
    fn unusable_dsns_are_rejected_with_a_reason() {
        for dsn in ["", "  ", "ftp://x.example.com", "http://", "https://h.example.com/?a=1"] {
            let error = base_url(dsn).unwrap_err();
            assert!(error.to_string().contains("UNIPILE_DSN"), "{dsn}: {error}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = "2026-11-29T10:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_and_stays_under_the_ceiling() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = policy.backoff(9);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn the_api_key_does_not_show_in_debug_output() {
        let config =
            ClientConfig::new("api1.unipile.com:1", SecretString::from("k3y-v4lue".to_owned())).unwrap();
        let client = UnipileClient::new(config.clone()).unwrap();
        assert!(!format!("{config:?}").contains("k3y-v4lue"));
        assert!(!format!("{client:?}").contains("k3y-v4lue"));
    }
}
