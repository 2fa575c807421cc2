//! Integration tests of ingest against the real PostgreSQL and NATS.
//!
//! They need PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres)
//! and NATS with JetStream (NATS_URL, default nats://127.0.0.1:4222); `.ci/run` makes
//! sure both are up. A test fails with a clear message when one is missing.

mod accounts;
mod attachments;
mod dead_letters;
mod events;
#[allow(dead_code)] // each test module uses a different part of the harness
mod helpers;
mod hostile;
mod hostile_props;
mod limits;
mod outage;
mod outbox;
mod replies;
mod rest;
mod startup;
mod unipile_client;
mod unipile_commands;
mod unipile_fake;
mod unipile_sync;
mod unipile_webhooks;
mod webhooks;
