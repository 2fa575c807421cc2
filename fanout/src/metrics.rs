//! The Prometheus series fanout exports, named in one place.
//!
//! - `fanout_connections` (gauge): open WebSocket connections.
//! - `fanout_events_in_total` (counter): events taken from the stream once the replica
//!   is open (not those read to fill its window at start);
//!   `fanout_events_skipped_total{reason}`: stream messages that were not events.
//! - `fanout_frames_out_total` (counter): event frames written to clients.
//! - `fanout_slow_consumer_closes_total` (counter): clients closed for not reading.
//! - `fanout_closes_total{reason}` (counter): every server-initiated close by reason.
//! - `fanout_refused_total{reason}` (counter): upgrades refused before they began
//!   (`per_sub`: the token's subject holds as many connections as it may;
//!   `resume_rate`: it started as many resumes this minute as it may).
//! - `fanout_resumes_total{outcome}`: `memory`, `stream`, `gone` (recovered false:
//!   the stream no longer holds it), `too_far` (recovered false: further back than
//!   `FANOUT_MAX_RESUME_GAP`), `failed`.
//! - `fanout_history_chunks_read_total{outcome}` (counter): stretches of history read
//!   from JetStream for resumes past the window: `shared` by every resume that needs
//!   it, or `too_big` to keep (each such resume streams it itself).
//! - `fanout_history_waiting` (gauge): resumes waiting for a turn to read JetStream
//!   (a reconnect storm reaching past the window queues here).
//! - `fanout_delivery_lag_seconds` (histogram): write time minus `occurred_at`.
//! - `fanout_stream_lag_seconds` (histogram): JetStream's stored time of an event to
//!   the follower taking it (the stream stage of the end-to-end time).
//! - `fanout_write_seconds` (histogram): the follower taking an event to its frame
//!   flushed to a client's socket, one sample per frame (the fan-out stage).
//! - `fanout_follower_restarts_total{reason}`: consumer recreations.
//! - `fanout_follower_ready` (gauge): 1 while following the stream.
//! - `fanout_presence_frames_total{outcome}` (counter): client `typing`/`viewing`
//!   frames: `accepted`, `rate_limited`, `not_allowed`, `invalid`.
//! - `fanout_presence_published_total`, `fanout_presence_published_bytes_total`,
//!   `fanout_presence_received_total` (counters): announcements on core NATS.
//! - `fanout_presence_frames_out_total` (counter): presence frames queued to clients.
//! - `fanout_presence_dropped_total{reason}` (counter): `queue_full` (a client's
//!   presence queue), `outbox_full`, `table_full`, `malformed`, `publish_failed`.
//! - `fanout_presence_expired_total` (counter): viewers dropped for not being
//!   re-announced (their replica died or lost NATS).
//! - `fanout_presence_viewers` (gauge): connections in the presence table.

use std::sync::OnceLock;

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

struct Handles {
    connections: Gauge,
    events_in: Counter,
    frames_out: Counter,
    lag: Histogram,
    stream_lag: Histogram,
    write: Histogram,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        connections: gauge!("fanout_connections"),
        events_in: counter!("fanout_events_in_total"),
        frames_out: counter!("fanout_frames_out_total"),
        lag: histogram!("fanout_delivery_lag_seconds"),
        stream_lag: histogram!("fanout_stream_lag_seconds"),
        write: histogram!("fanout_write_seconds"),
    })
}

pub fn connection_opened() {
    handles().connections.increment(1.0);
}

pub fn connection_closed() {
    handles().connections.decrement(1.0);
}

pub fn event_in() {
    handles().events_in.increment(1);
}

pub fn event_skipped(reason: &'static str) {
    counter!("fanout_events_skipped_total", "reason" => reason).increment(1);
}

pub fn frames_out(n: u64) {
    handles().frames_out.increment(n);
}

pub fn delivery_lag(seconds: f64) {
    handles().lag.record(seconds);
}

pub fn stream_lag(seconds: f64) {
    handles().stream_lag.record(seconds);
}

/// Frames flushed `took` after the follower took their events.
pub fn written(took: impl Iterator<Item = std::time::Duration>) {
    let write = &handles().write;
    for took in took {
        write.record(took.as_secs_f64());
    }
}

/// An upgrade refused before it began (`fanout_refused_total{reason}`).
pub fn refused(reason: &'static str) {
    counter!("fanout_refused_total", "reason" => reason).increment(1);
}

pub fn closed(reason: &'static str) {
    counter!("fanout_closes_total", "reason" => reason).increment(1);
    if reason == "slow_consumer" {
        counter!("fanout_slow_consumer_closes_total").increment(1);
    }
}

pub fn resume(outcome: &'static str) {
    counter!("fanout_resumes_total", "outcome" => outcome).increment(1);
}

/// A chunk of history read from JetStream: `shared` (kept for every resume that needs
/// it) or `too_big` (each such resume streams that stretch itself).
pub fn history_chunk_read(outcome: &'static str) {
    counter!("fanout_history_chunks_read_total", "outcome" => outcome).increment(1);
}

/// One more (`1.0`) or one fewer (`-1.0`) resume waiting to read JetStream.
pub fn history_waiting(delta: f64) {
    gauge!("fanout_history_waiting").increment(delta);
}

pub fn follower_restart(reason: &'static str) {
    counter!("fanout_follower_restarts_total", "reason" => reason).increment(1);
}

pub fn follower_ready(ready: bool) {
    gauge!("fanout_follower_ready").set(if ready { 1.0 } else { 0.0 });
}

pub fn presence_frame(outcome: &'static str) {
    counter!("fanout_presence_frames_total", "outcome" => outcome).increment(1);
}

pub fn presence_published(bytes: usize) {
    counter!("fanout_presence_published_total").increment(1);
    counter!("fanout_presence_published_bytes_total").increment(bytes as u64);
}

pub fn presence_received() {
    counter!("fanout_presence_received_total").increment(1);
}

pub fn presence_delivered(n: u64) {
    counter!("fanout_presence_frames_out_total").increment(n);
}

pub fn presence_dropped(reason: &'static str) {
    presence_dropped_n(reason, 1);
}

pub fn presence_dropped_n(reason: &'static str, n: u64) {
    counter!("fanout_presence_dropped_total", "reason" => reason).increment(n);
}

pub fn presence_expired() {
    counter!("fanout_presence_expired_total").increment(1);
}

pub fn presence_viewers(n: usize) {
    gauge!("fanout_presence_viewers").set(n as f64);
}
