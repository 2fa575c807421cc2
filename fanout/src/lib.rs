//! `fanout`: follows the JetStream event stream and pushes each event to the WebSocket
//! clients allowed to see it.
//!
//! How it fits: `ingest` publishes envelopes (without `seq`) on
//! `{prefix}.{account}.{chat}.{type}`. The [`follower`] reads the stream in order,
//! turns each message into an [`event::Event`] (the bytes stamped with `seq` once) and
//! hands it to the [`hub`], which offers the same bytes to every connection allowed to
//! see them through bounded queues. [`ws`] serves `GET /ws/messages`, [`resume`] makes
//! reconnects gap-free from the hub's window or the [`history`] it reads from
//! JetStream, [`health`] answers probes and `/metrics`. [`presence`] (typing, viewing)
//! travels between replicas on core NATS, apart from the stream.
//!
//! Run it: `JWT_SECRET=... NATS_URL=nats://127.0.0.1:4222 fanout` (see `fanout --help`).

pub mod auth;
pub mod config;
pub mod error;
pub mod event;
pub mod follower;
pub mod frames;
pub mod health;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod page;
pub mod presence;
pub mod resume;
pub mod startup;
pub mod state;
pub mod tail;
pub mod ws;

pub use config::Config;
pub use startup::Application;
