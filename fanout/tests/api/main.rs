//! Integration tests of fanout: real servers on free ports, the real NATS, one
//! stream and subject prefix per test.

mod auth;
mod delivery;
mod helpers;
mod lifecycle;
mod presence;
mod resilience;
mod resume;
mod slow_consumer;
