//! What both services run on, beside the contract in `shared`: the configuration pieces
//! they share ([`config`]), the HTTP server loop with its deadlines ([`http`]), per-token
//! rate limits ([`limits`]), and the logging and Prometheus set-up done once per process
//! ([`telemetry`]).

pub mod config;
pub mod http;
pub mod limits;
pub mod telemetry;
