//! Code shared by the two halves of the Unipile realtime relay.
//!
//! `ingest` turns Unipile webhooks into [`envelope::Envelope`]s and publishes them on
//! JetStream under the [`subjects`] scheme; `fanout` follows the stream and pushes the
//! same bytes to WebSocket clients whose [`claims::Claims`] allow them. Both read their
//! configuration through the [`config`] pieces and log through [`telemetry`].
//!
//! Nothing here does I/O on its own except [`telemetry`], [`http::serve`] and
//! [`config::NatsArgs::connect`]:
//! the crate is mostly types with the unit tests that pin their quirks.

pub mod claims;
pub mod config;
pub mod envelope;
pub mod errors;
pub mod http;
pub mod stream;
pub mod subjects;
pub mod telemetry;
