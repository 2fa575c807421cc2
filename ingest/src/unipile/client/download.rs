//! `GET /messages/{message_id}/attachments/{attachment_id}`: a file, answered as a
//! response whose body the caller streams on.
//!
//! Unlike the JSON calls this one is never retried (a stream half passed on cannot be
//! started again) and its deadlines are the caller's: how long to wait for the headers,
//! and how long the whole download may take. The ids are percent-encoded as path
//! segments, so no id can change the path that is called.

use std::time::Duration;

use super::send::error_chain;
use super::{UnipileClient, UnipileError};

const CALL: &str = "attachments.get (GET)";

impl UnipileClient {
    /// Asks Unipile for an attachment and returns its response once the headers have
    /// arrived, whatever its status; the body is not read. `first_byte` bounds the wait
    /// for the headers ([`UnipileError::Timeout`]), `total` the whole download (the
    /// body stream fails when it passes).
    #[tracing::instrument(skip(self), err(level = "debug"))]
    pub async fn attachment(
        &self,
        message_id: &str,
        attachment_id: &str,
        first_byte: Duration,
        total: Duration,
    ) -> Result<reqwest::Response, UnipileError> {
        let mut url = self.inner.base_url.clone();
        url.path_segments_mut().expect("an http(s) URL has path segments").pop_if_empty().extend([
            "messages",
            message_id,
            "attachments",
            attachment_id,
        ]);
        let request =
            self.inner.http.get(url).header("X-API-KEY", self.inner.api_key.clone()).timeout(total).send();
        let record = |outcome| crate::metrics::unipile_request("attachments.get", outcome);
        match tokio::time::timeout(first_byte, request).await {
            Err(_) => {
                record("timeout");
                Err(UnipileError::Timeout { call: CALL.to_owned(), after: first_byte })
            }
            Ok(Err(e)) => {
                record(if e.is_timeout() { "timeout" } else { "transport_error" });
                if e.is_timeout() {
                    return Err(UnipileError::Timeout { call: CALL.to_owned(), after: first_byte });
                }
                Err(UnipileError::Transport { call: CALL.to_owned(), attempts: 1, reason: error_chain(&e) })
            }
            Ok(Ok(response)) => {
                let status = response.status();
                record(if status.is_success() {
                    "ok"
                } else if status.as_u16() == 429 {
                    "rate_limited"
                } else if status.is_server_error() {
                    "server_error"
                } else {
                    "client_error"
                });
                Ok(response)
            }
        }
    }
}
