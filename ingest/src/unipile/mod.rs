//! Everything the relay asks of Unipile's REST API.
//!
//! - [`client`]: a typed client with timeouts, retries and cursor pagination.
//! - [`types`]: the request and response bodies, read leniently.
//! - [`webhooks`]: keeping the relay's two webhooks registered (at start-up and with
//!   `ingest webhooks ensure`).
//! - [`sync`]: history backfill (`ingest sync`, and the catch-up at start-up).
//! - [`cli`]: the `ingest webhooks ...` and `ingest sync` commands.

pub mod cli;
pub mod client;
pub mod sync;
pub mod types;
pub mod webhooks;

pub use client::{ClientConfig, RetryPolicy, UnipileClient, UnipileError};
