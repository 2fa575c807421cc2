//! The `ingest` command line: `serve` (the default), `webhooks ...`, `sync` and
//! `dead-letters ...`.
//!
//! It sits on top of everything else: the service's configuration lives in
//! [`crate::config`], the Unipile commands' in [`crate::unipile::cli`].

use clap::{Parser, Subcommand};

use crate::config::ServeConfig;
use crate::unipile;

#[derive(Debug, Parser)]
#[command(
    name = "ingest",
    version,
    about = "Unipile webhooks in, PostgreSQL + outbox, events out on NATS JetStream; REST read API.",
    long_about = "Unipile webhooks in, PostgreSQL + outbox, events out on NATS JetStream; REST read API.\n\n\
                  Without a subcommand, `ingest` runs `serve`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses the process arguments, treating a bare `ingest [flags]` as `ingest serve [flags]`.
    pub fn parse_with_default() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let has_subcommand = args.get(1).is_some_and(|a| !a.starts_with('-'));
        let asks_top_level =
            args.iter().skip(1).any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"));
        if has_subcommand || asks_top_level {
            Self::parse()
        } else {
            let mut with_serve = vec![args[0].clone(), "serve".to_owned()];
            with_serve.extend(args.into_iter().skip(1));
            Self::parse_from(with_serve)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service: webhooks, outbox relay, REST API (the default).
    Serve(Box<ServeConfig>),
    /// List, ensure or delete the webhooks registered with Unipile.
    Webhooks(unipile::cli::WebhooksCommand),
    /// Backfill chats and messages from Unipile's API (quietly: no events, no unread bumps).
    ///
    /// Messages are stored like webhook deliveries, under the same ids, so running it
    /// twice changes nothing. They are stored quietly: no message:new events, no unread
    /// increments; each chat's unread count is set to what Unipile reports. Without
    /// --account, every account in the database and every account Unipile lists under
    /// the API key is backfilled.
    Sync(Box<unipile::cli::SyncCommand>),
    /// List, replay or prune the deliveries the relay kept but could not use.
    DeadLetters(crate::dead_letters::DeadLettersCommand),
}
