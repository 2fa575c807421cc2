//! Command line and environment configuration of the `fanout` binary.
//!
//! Every field is a flag with an environment fallback (clap `env`), so `fanout --help`
//! documents the whole surface. `JWT_SECRET` has no default: the process refuses to
//! start without it and says which variable is missing.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use runtime::config::{NatsArgs, TelemetryArgs, parse_strong_secret};
use secrecy::SecretString;
use shared::subjects::Subjects;

/// `fanout` with no subcommand serves; `fanout token` mints a token for trying it out.
#[derive(Debug, Parser)]
#[command(name = "fanout", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the arguments, reading a missing subcommand as `serve`, so plain
    /// `fanout` (or `fanout --listen ..`) serves. Exits with clap's message on error.
    pub fn parse_with_default<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::parse_from(with_default_subcommand(args))
    }

    /// Like [`Cli::parse_with_default`], returning the error instead of exiting.
    pub fn try_parse_with_default<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::try_parse_from(with_default_subcommand(args))
    }
}

fn with_default_subcommand<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let explicit = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        matches!(a, "serve" | "token" | "tail" | "help" | "-h" | "--help" | "-V" | "--version")
    });
    if !explicit {
        args.insert(1.min(args.len()), OsString::from("serve"));
    }
    args
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Follow the stream and serve WebSocket clients (the default).
    Serve(Box<Config>),
    /// Print a client token signed with JWT_SECRET (for development and load tests).
    Token(TokenArgs),
    /// Print events from the JetStream stream as readable lines (or JSON with --json).
    Tail(crate::tail::TailArgs),
}

/// Everything the server needs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// HS256 secret that signs client tokens (the same one ingest uses). Required.
    #[arg(long, env = "JWT_SECRET", value_parser = parse_strong_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,
    #[command(flatten)]
    pub jwt_claims: runtime::config::JwtClaimsArgs,
    /// Address the HTTP and WebSocket server listens on.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "0.0.0.0:8001")]
    pub listen: SocketAddr,
    /// Most WebSocket connections this replica holds; more are refused with 503.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Most WebSocket connections one token subject (`sub`) holds on this replica; more
    /// are refused with 429, so one user or one leaked token cannot take every slot.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_SUB", default_value_t = 100)]
    pub max_connections_per_sub: usize,
    /// Resumes (`?since=`) one token subject may start per minute on this replica (a
    /// burst of as many); more are refused with 429 and `Retry-After`, since each
    /// may read history from JetStream. 0: no limit.
    #[arg(long, env = "FANOUT_MAX_RESUMES_PER_MINUTE_PER_SUB", default_value_t = 120)]
    pub max_resumes_per_minute_per_sub: u32,
    /// Events queued per connection before the client counts as too slow and is closed
    /// (code 4000), so one slow reader never holds anybody else up.
    #[arg(long, env = "FANOUT_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Seconds between server pings; a peer silent for two intervals is dropped.
    #[arg(long, env = "FANOUT_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,
    /// Seconds one write to a client may take before the client counts as too slow.
    #[arg(long, env = "FANOUT_WRITE_TIMEOUT_SECS", default_value_t = 10)]
    pub write_timeout_secs: u64,
    /// Origins the inbox page may send its token to for the REST API, besides its own
    /// (ingest on another port in development, say), comma-separated. A link's `?api=`
    /// naming any other origin is ignored: a crafted link cannot send the token away.
    #[arg(long, env = "FANOUT_PAGE_API_ORIGINS", value_delimiter = ',')]
    pub page_api_origins: Vec<String>,
    /// Recent events kept in memory to serve resumes without reading JetStream.
    #[arg(long, env = "FANOUT_REPLAY_WINDOW", default_value_t = 10_000)]
    pub replay_window: usize,
    /// Most bytes of events that window holds (events may be up to NATS's max_payload
    /// each): whichever of the two limits is reached first drops the oldest events.
    #[arg(long, env = "FANOUT_WINDOW_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub window_bytes: usize,
    /// Most stream sequences a resume may reach back through JetStream: a `since`
    /// further behind than this (and older than the window) gets `recovered: false`,
    /// and the client reloads by REST.
    #[arg(long, env = "FANOUT_MAX_RESUME_GAP", default_value_t = 100_000)]
    pub max_resume_gap: u64,
    /// Largest client message answered with an `error` frame when it is not understood;
    /// anything over 16 times this closes the connection with 1009.
    #[arg(long, env = "FANOUT_MAX_CLIENT_MESSAGE", default_value_t = 4096)]
    pub max_client_message: usize,
    /// Idle heartbeat asked of JetStream, in milliseconds; the follower recreates its
    /// consumer when two are missed and re-checks the stream at this interval.
    #[arg(long, env = "FANOUT_FOLLOW_HEARTBEAT_MS", default_value_t = 5_000)]
    pub follow_heartbeat_ms: u64,
    /// Seconds to wait for sockets to close on shutdown.
    #[arg(long, env = "FANOUT_SHUTDOWN_GRACE_SECS", default_value_t = 5)]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub presence: PresenceArgs,
}

/// Typing and viewing between agents: on core NATS, never the stream or the database.
#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// Core NATS subject prefix presence travels under (`{prefix}.{account}.{chat}`);
    /// must not overlap SUBJECT_PREFIX, which the stream stores.
    #[arg(long, env = "FANOUT_PRESENCE_PREFIX", default_value = "relay.presence", value_parser = parse_subjects)]
    pub presence_prefix: Subjects,
    /// Milliseconds "is typing" lasts without a repeated `typing` frame.
    #[arg(long, env = "FANOUT_TYPING_EXPIRY_MS", default_value_t = 5_000)]
    pub typing_expiry_ms: u64,
    /// Milliseconds between re-announcements of what this replica's clients are viewing.
    #[arg(long, env = "FANOUT_PRESENCE_HEARTBEAT_MS", default_value_t = 5_000)]
    pub presence_heartbeat_ms: u64,
    /// Milliseconds after which a viewer not re-announced is gone: the bound within which
    /// a dead replica's clients disappear (at least twice the heartbeat).
    #[arg(long, env = "FANOUT_PRESENCE_EXPIRY_MS", default_value_t = 15_000)]
    pub presence_expiry_ms: u64,
    /// `typing` and `viewing` frames one connection may send per second (twice as many in
    /// a burst); more are dropped with a `rate_limited` error frame (at most one a second).
    #[arg(long, env = "FANOUT_PRESENCE_FRAMES_PER_SEC", default_value_t = 10)]
    pub presence_frames_per_sec: u32,
    /// Most viewers this replica keeps in its presence table (all accounts together);
    /// announcements beyond it are ignored and counted.
    #[arg(long, env = "FANOUT_PRESENCE_MAX_ENTRIES", default_value_t = 100_000)]
    pub presence_max_entries: usize,
}

impl Default for PresenceArgs {
    fn default() -> Self {
        Self {
            presence_prefix: Subjects::new("relay.presence").expect("a valid prefix"),
            typing_expiry_ms: 5_000,
            presence_heartbeat_ms: 5_000,
            presence_expiry_ms: 15_000,
            presence_frames_per_sec: 10,
            presence_max_entries: 100_000,
        }
    }
}

impl PresenceArgs {
    pub fn typing_expiry(&self) -> Duration {
        Duration::from_millis(self.typing_expiry_ms.clamp(100, 60_000))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.presence_heartbeat_ms.clamp(50, 60_000))
    }

    /// Never less than two heartbeats, so one lost announcement does not drop a viewer.
    pub fn expiry(&self) -> Duration {
        Duration::from_millis(self.presence_expiry_ms.clamp(100, 300_000)).max(self.heartbeat() * 2)
    }
}

fn parse_subjects(value: &str) -> Result<Subjects, String> {
    Subjects::new(value).map_err(|e| e.to_string())
}

impl Config {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs.max(1))
    }

    pub fn follow_heartbeat(&self) -> Duration {
        Duration::from_millis(self.follow_heartbeat_ms.max(100))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Options of `fanout token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// HS256 secret that signs client tokens. Required.
    #[arg(long, env = "JWT_SECRET", value_parser = parse_strong_secret, hide_env_values = true)]
    pub jwt_secret: SecretString,
    #[command(flatten)]
    pub jwt_claims: runtime::config::JwtClaimsArgs,
    /// Subject (`sub` claim) of the token.
    #[arg(long, default_value = "dev")]
    pub sub: String,
    /// Display name (`name` claim) other agents see in presence events.
    #[arg(long)]
    pub name: Option<String>,
    /// Accounts the token may see, comma-separated; `*` for all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub accounts: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fanout_with_flags_means_serve() {
        let cli = Cli::try_parse_with_default([
            "fanout",
            "--jwt-secret",
            "a-fanout-unit-test-secret-of-32-bytes",
            "--listen",
            "127.0.0.1:9",
        ])
        .unwrap();
        let Command::Serve(config) = cli.command else { panic!("expected serve") };
        assert_eq!(config.listen.port(), 9);
    }

    #[test]
    fn the_token_subcommand_is_not_mistaken_for_serve() {
        let cli = Cli::try_parse_with_default([
            "fanout",
            "token",
            "--jwt-secret",
            "a-fanout-unit-test-secret-of-32-bytes",
            "--accounts",
            "a,b",
        ])
        .unwrap();
        let Command::Token(args) = cli.command else { panic!("expected token") };
        assert_eq!(args.accounts, vec!["a", "b"]);
    }

    #[test]
    fn an_empty_jwt_secret_is_refused_naming_the_variable() {
        let err = Cli::try_parse_with_default(["fanout", "serve", "--jwt-secret", " "]).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
    }
}
