//! Sending one call: the request with its key, the JSON answer decoded leniently, and
//! retries with exponential backoff and jitter (or Unipile's `Retry-After`) on rate
//! limiting, server errors and unreachability; every attempt's outcome is counted in
//! `unipile_requests_total`, and a failure becomes a [`UnipileError`] naming the call.

use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Call, UnipileClient, UnipileError};

impl UnipileClient {
    /// Sends one call with retries and decodes its JSON answer.
    pub(super) async fn send<T: DeserializeOwned>(
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

pub(super) fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or_default())
}

/// An error with its causes, e.g. `error sending request: connection refused`.
pub(super) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
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

pub(super) fn truncate(mut body: String) -> String {
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
    fn retry_after_reads_seconds_and_http_dates() {
        let now = "2026-11-29T10:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
