//! The contract the two halves of the Unipile realtime relay speak.
//!
//! `ingest` turns Unipile webhooks into [`envelope::Envelope`]s and publishes them on
//! the JetStream [`stream`] under the [`subjects`] scheme; `fanout` follows the stream
//! and pushes the same bytes to WebSocket clients whose [`claims::Claims`] allow them.
//! Both answer errors with [`errors::ErrorBody`].
//!
//! Types with the unit tests that pin their quirks; the only I/O is
//! [`stream::ensure_stream`], the stream's owner's way to create it. What the services
//! run on (configuration, HTTP loop, telemetry) is the `runtime` crate.

pub mod claims;
pub mod envelope;
pub mod errors;
pub mod stream;
pub mod subjects;
