//! `ingest`: the webhook side of the Unipile realtime relay.
//!
//! Unipile POSTs every messaging event and account status change to this service. A
//! delivery is checked ([`inbound`]), normalised, and committed to PostgreSQL together
//! with an outbox row ([`store`]); deliveries that arrive together share one
//! transaction. After the commit the [`outbox`] relay publishes the event to NATS
//! JetStream, and a sweeper republishes whatever a crash or an outage left behind, so
//! every acknowledged webhook reaches the stream at least once. The [`api`] module
//! serves the REST read API (chats, messages, mark-read) and its OpenAPI description.
//!
//! Run it with `ingest serve` (the default); `ingest --help` lists the configuration.

pub mod api;
pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod health;
pub mod inbound;
pub mod metrics;
pub mod outbox;
pub mod payload;
pub mod sanitize;
pub mod startup;
pub mod state;
pub mod store;
pub mod unipile;
