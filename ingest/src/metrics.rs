//! The Prometheus series ingest exports, named in one place (served at `/metrics`).
//!
//! Webhooks:
//! - `webhooks_total{endpoint, outcome}` (counter): every answer, by outcome
//!   (`accepted`, `duplicate`, `ignored`, `dead_lettered`, `unauthorized`, `too_large`,
//!   `bad_request`, `unavailable`).
//! - `webhook_ack_seconds{endpoint}` (histogram): time to answer.
//! - `webhook_bodies_repaired_total{endpoint}` (counter): bodies that needed a repair
//!   or held U+0000 (see [`crate::sanitize`]).
//!
//! Writes:
//! - `ingest_batch_size`, `ingest_batch_commit_seconds` (histograms): group commits.
//! - `ingest_batch_splits_total` (counter): batches split because the database refused
//!   one of their writes; `ingest_writes_rejected_total`: writes refused alone (then
//!   dead-lettered).
//!
//! Outbox:
//! - `outbox_published_total` (counter), `outbox_publish_lag_seconds` (histogram,
//!   the start of the transaction that wrote the event to JetStream's ack),
//!   `outbox_publish_errors_total` (counter: failed rounds).
//! - `outbox_handoff_total{outcome}` (counter): rows handed over in process at commit
//!   (`published`; `left_to_relay`: not published by the handoff, the relay does it;
//!   `queue_full`: batches not handed over).
//! - `outbox_depth`, `outbox_parked` (gauges): rows waiting, rows set aside.
//! - `outbox_parked_total{reason}` (counter): rows parked (`too_large`, `refused`).
//! - `outbox_events_truncated_total` (counter): events cut to fit on NATS.
//!
//! REST API:
//! - `rest_refused_total{reason}` (counter): calls refused before any work
//!   (`rate_limited`: the token's `sub` is over `REST_REQUESTS_PER_SEC_PER_SUB`).
//!
//! Unipile:
//! - `unipile_requests_total{call, outcome}` (counter); `unipile_webhooks_registered`
//!   (gauge: 1 once the relay's webhooks are registered).
//!
//! Attachments and accounts:
//! - `attachment_downloads_total{outcome}` (counter): `ok`, `not_found`, `forbidden`,
//!   `too_large` (refused up front), `cut` (cut while streaming), `upstream_error`.
//! - `attachment_bytes_total` (counter): bytes of downloads passed on whole.
//! - `account_backfills_total{outcome}` (counter): backfills after a reconnection
//!   (`done`, `failed`, `skipped`).

use std::time::Duration;

use ::metrics::{counter, gauge, histogram};

pub fn webhook_answered(endpoint: &str, outcome: &'static str, took: Option<Duration>) {
    counter!("webhooks_total", "endpoint" => endpoint.to_owned(), "outcome" => outcome).increment(1);
    if let Some(took) = took {
        histogram!("webhook_ack_seconds", "endpoint" => endpoint.to_owned()).record(took.as_secs_f64());
    }
}

pub fn rest_refused(reason: &'static str) {
    counter!("rest_refused_total", "reason" => reason).increment(1);
}

pub fn webhook_body_repaired(endpoint: &'static str) {
    counter!("webhook_bodies_repaired_total", "endpoint" => endpoint).increment(1);
}

pub fn batch_committed(size: usize, took: Duration) {
    histogram!("ingest_batch_size").record(size as f64);
    histogram!("ingest_batch_commit_seconds").record(took.as_secs_f64());
}

pub fn batch_split() {
    counter!("ingest_batch_splits_total").increment(1);
}

pub fn write_rejected() {
    counter!("ingest_writes_rejected_total").increment(1);
}

pub fn events_truncated(n: usize) {
    counter!("outbox_events_truncated_total").increment(n as u64);
}

pub fn publish_round_failed() {
    counter!("outbox_publish_errors_total").increment(1);
}

pub fn published(lags: impl Iterator<Item = Duration>) {
    let lag = histogram!("outbox_publish_lag_seconds");
    let mut n = 0;
    for l in lags {
        lag.record(l.as_secs_f64());
        n += 1;
    }
    counter!("outbox_published_total").increment(n);
}

pub fn handoff(outcome: &'static str, rows: usize) {
    if rows > 0 {
        counter!("outbox_handoff_total", "outcome" => outcome).increment(rows as u64);
    }
}

pub fn parked(reason: String) {
    counter!("outbox_parked_total", "reason" => reason).increment(1);
}

pub fn outbox_rows(waiting: i64, parked: i64) {
    gauge!("outbox_depth").set(waiting as f64);
    gauge!("outbox_parked").set(parked as f64);
}

pub fn unipile_request(call: &'static str, outcome: &'static str) {
    counter!("unipile_requests_total", "call" => call, "outcome" => outcome).increment(1);
}

pub fn webhooks_registered(registered: bool) {
    gauge!("unipile_webhooks_registered").set(if registered { 1.0 } else { 0.0 });
}

pub fn attachment_download(outcome: &'static str) {
    counter!("attachment_downloads_total", "outcome" => outcome).increment(1);
}

pub fn attachment_bytes(n: u64) {
    counter!("attachment_bytes_total").increment(n);
}

pub fn account_backfill(outcome: &'static str) {
    counter!("account_backfills_total", "outcome" => outcome).increment(1);
}
