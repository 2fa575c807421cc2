//! `ingest dead-letters list | replay | prune`: what an operator does with the
//! deliveries the relay kept but could not use.
//!
//! - `list` shows the newest (id, time, endpoint, reason, size).
//! - `replay` posts stored bodies to a running ingest, as Unipile would (with the
//!   secret), and deletes each one ingest now takes (`accepted`, `duplicate`, `ignored`);
//!   one dead-lettered again stays, under its new reason too.
//! - `prune` deletes those older than an age; `ingest serve` does the same on its own
//!   after `DEAD_LETTER_RETENTION_DAYS`.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use runtime::config::parse_strong_secret;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::PgPool;

use crate::config::DatabaseArgs;
use crate::inbound::AUTH_HEADER;
use crate::unipile::cli::{OutputArgs, parse_since};

#[derive(Debug, Args)]
pub struct DeadLettersCommand {
    #[command(subcommand)]
    pub action: DeadLettersAction,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// Show the newest dead letters (id, time, endpoint, reason, body size).
    List(ListArgs),
    /// Post dead letters to a running ingest again; delete each one it now takes.
    Replay(ReplayArgs),
    /// Delete dead letters older than an age.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// How many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Base URL of a running ingest, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "INGEST_URL")]
    pub url: String,
    /// The secret that ingest expects in `Unipile-Auth`.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, value_parser = parse_strong_secret)]
    pub webhook_secret: SecretString,
    /// The dead letters to replay, by id; none: all of them, oldest first.
    pub ids: Vec<i64>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Delete those received before this: RFC 3339, a date, or an age such as `30d`.
    #[arg(long, value_parser = parse_since)]
    pub before: DateTime<Utc>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Listed {
    id: i64,
    created_at: DateTime<Utc>,
    endpoint: String,
    reason: String,
    bytes: i32,
}

pub async fn run(command: DeadLettersCommand) -> anyhow::Result<()> {
    match command.action {
        DeadLettersAction::List(args) => {
            let pool = crate::db::connect_and_migrate(&args.database, 2).await?;
            let rows: Vec<Listed> = sqlx::query_as(
                "select id, created_at, endpoint, reason, length(body) as bytes
                 from dead_letters order by created_at desc, id desc limit $1",
            )
            .bind(args.limit.clamp(1, 10_000))
            .fetch_all(&pool)
            .await?;
            if args.output.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in &rows {
                    let reason: String = r.reason.chars().take(100).collect();
                    println!(
                        "{:>8}  {}  {:<40}  {:>8} B  {reason}",
                        r.id,
                        r.created_at.to_rfc3339(),
                        r.endpoint,
                        r.bytes
                    );
                }
            }
        }
        DeadLettersAction::Replay(args) => {
            let pool = crate::db::connect_and_migrate(&args.database, 2).await?;
            let (taken, kept) = replay(&pool, &args.url, &args.webhook_secret, &args.ids).await?;
            println!("replayed {}: {taken} taken and deleted, {kept} dead-lettered again", taken + kept);
        }
        DeadLettersAction::Prune(args) => {
            let pool = crate::db::connect_and_migrate(&args.database, 2).await?;
            let deleted = crate::store::dead_letters::prune(&pool, args.before).await?;
            println!("deleted {deleted} dead letters received before {}", args.before.to_rfc3339());
        }
    }
    Ok(())
}

/// Posts the dead letters `ids` (all when empty), oldest first, to ingest at `url`;
/// deletes each one it takes. Returns (taken, dead-lettered again). Stops at the first
/// answer that is not a 200: ingest is not taking deliveries now.
pub async fn replay(
    pool: &PgPool,
    url: &str,
    secret: &SecretString,
    ids: &[i64],
) -> anyhow::Result<(u64, u64)> {
    #[derive(sqlx::FromRow)]
    struct Stored {
        id: i64,
        endpoint: String,
        content_type: Option<String>,
        body: Vec<u8>,
    }
    let rows: Vec<Stored> = sqlx::query_as(
        "select id, endpoint, content_type, body from dead_letters
         where cardinality($1::bigint[]) = 0 or id = any($1) order by id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let (mut taken, mut kept) = (0, 0);
    for row in rows {
        let response = client
            .post(format!("{}{}", url.trim_end_matches('/'), row.endpoint))
            .header(AUTH_HEADER, secret.expose_secret())
            .header("Content-Type", row.content_type.as_deref().unwrap_or("application/json"))
            .body(row.body)
            .send()
            .await
            .with_context(|| format!("posting dead letter {} to {url}", row.id))?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "dead letter {}: ingest answered {status} {answer}", row.id);
        if answer["status"] == "dead_lettered" {
            kept += 1;
            continue;
        }
        sqlx::query("delete from dead_letters where id = $1").bind(row.id).execute(pool).await?;
        taken += 1;
    }
    Ok((taken, kept))
}
