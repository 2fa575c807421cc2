//! The `ingest webhooks ...` and `ingest sync` commands.
//!
//! They need only what they use: Unipile's DSN and key for every command, plus the
//! public URL and secret for `webhooks ensure`, plus the database for `sync`. Results
//! go to stdout as a table, or as JSON with `--json`; logs go to stderr.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use runtime::config::{parse_prefix, parse_strong_secret};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use shared::subjects::Subjects;
use sqlx::PgPool;

use super::client::{ClientConfig, UnipileClient};
use super::registration::{self, Ensured, WebhookSettings};
use super::sync::{self, AccountRef, SyncReport};
use super::types::Webhook;
use crate::config::{DatabaseArgs, UnipileArgs};

/// `ingest webhooks`: inspect and manage the webhooks registered with Unipile.
#[derive(Debug, Args)]
pub struct WebhooksCommand {
    #[command(subcommand)]
    pub action: WebhooksAction,
}

#[derive(Debug, Subcommand)]
pub enum WebhooksAction {
    /// List every webhook registered under the API key (header values are not shown).
    List(ListArgs),
    /// Put exactly one up-to-date messaging and one account_status webhook in place.
    ///
    /// Webhooks with the relay's request URL and the current secret are reused; missing
    /// ones are created; ones with a stale secret, other events or disabled are
    /// replaced; duplicates are deleted. Webhooks pointing elsewhere are left alone.
    /// This is the step `ingest serve` runs at start-up.
    Ensure(EnsureArgs),
    /// Delete one webhook by its id (see `ingest webhooks list`).
    Delete(DeleteArgs),
}

/// Output format of a command.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print JSON on stdout instead of a table, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub unipile: UnipileArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct EnsureArgs {
    /// Public base URL Unipile calls, e.g. https://relay.example.com; the webhooks
    /// point at {this}/api/webhooks/unipile/messages and .../account-status.
    #[arg(long, env = "WEBHOOK_BASE_URL")]
    pub webhook_base_url: String,
    /// Secret Unipile sends back in the `Unipile-Auth` header; the same value ingest
    /// serve checks.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, value_parser = parse_strong_secret)]
    pub webhook_secret: SecretString,
    /// Optional PostgreSQL URL: when set, takes the same lock as starting replicas so
    /// the command never races them.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,
    #[command(flatten)]
    pub unipile: UnipileArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Id of the webhook to delete.
    pub id: String,
    #[command(flatten)]
    pub unipile: UnipileArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `ingest sync`: backfill chats and messages from Unipile's API.
#[derive(Debug, Args)]
pub struct SyncCommand {
    /// Account to backfill (repeatable). Default: all known accounts.
    #[arg(long = "account", value_name = "ACCOUNT_ID")]
    pub accounts: Vec<String>,
    /// Only messages at or after this time: RFC 3339 (2026-11-01T00:00:00Z), a date
    /// (2026-11-01, UTC) or an age (90m, 12h, 7d, 2w). Default: the whole history.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Subject prefix of the `account:status` events a status change found in Unipile's
    /// account list becomes (the one `ingest serve` publishes under).
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "relay.events", value_parser = parse_prefix)]
    pub subject_prefix: Subjects,
    /// When stderr is not a terminal, a progress log line at most this often (seconds);
    /// on a terminal a progress bar is drawn instead.
    #[arg(long, env = "SYNC_PROGRESS_EVERY_SECS", default_value_t = 10)]
    pub progress_every_secs: u64,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub unipile: UnipileArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Parses `--since`: RFC 3339, a UTC date, or an age such as `12h` or `7d`.
pub fn parse_since(value: &str) -> Result<DateTime<Utc>, String> {
    let value = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if seconds > 0 => Ok(Utc::now() - Duration::from_secs(n.saturating_mul(seconds))),
        _ => {
            Err("expected RFC 3339 (2026-11-01T00:00:00Z), a date (2026-11-01) or an age (12h, 7d)"
                .to_owned())
        }
    }
}

/// Builds a client from `UNIPILE_DSN` and `UNIPILE_API_KEY`, naming what is missing.
pub fn client_from(args: &UnipileArgs) -> anyhow::Result<UnipileClient> {
    let dsn = args.unipile_dsn.as_deref().filter(|d| !d.trim().is_empty());
    let key = args.unipile_api_key.as_ref().filter(|k| !k.expose_secret().trim().is_empty());
    let (dsn, key) = match (dsn, key) {
        (Some(dsn), Some(key)) => (dsn, key),
        (None, None) => anyhow::bail!(
            "UNIPILE_DSN and UNIPILE_API_KEY are not set (or pass --unipile-dsn and --unipile-api-key)"
        ),
        (None, _) => anyhow::bail!("UNIPILE_DSN is not set (or pass --unipile-dsn)"),
        (_, None) => anyhow::bail!("UNIPILE_API_KEY is not set (or pass --unipile-api-key)"),
    };
    Ok(UnipileClient::new(ClientConfig::new(dsn, key.clone())?)?)
}

/// Runs `ingest webhooks ...`.
pub async fn run_webhooks(command: WebhooksCommand) -> anyhow::Result<()> {
    match command.action {
        WebhooksAction::List(args) => {
            let client = client_from(&args.unipile)?;
            let webhooks = client.list_webhooks().await?;
            let views: Vec<WebhookView> = webhooks.iter().map(WebhookView::from).collect();
            if args.output.json {
                print_json(&views)?;
            } else if views.is_empty() {
                println!("no webhooks registered");
            } else {
                print_table(
                    &["ID", "SOURCE", "ENABLED", "NAME", "EVENTS", "REQUEST_URL"],
                    views.iter().map(|w| {
                        vec![
                            w.id.clone(),
                            w.source.clone(),
                            if w.enabled { "yes" } else { "no" }.to_owned(),
                            w.name.clone().unwrap_or_default(),
                            if w.events.is_empty() { "-".to_owned() } else { w.events.join(",") },
                            w.request_url.clone(),
                        ]
                    }),
                );
            }
        }
        WebhooksAction::Ensure(args) => {
            let client = client_from(&args.unipile)?;
            let settings = WebhookSettings::new(&args.webhook_base_url, args.webhook_secret.clone())
                .map_err(|reason| anyhow::anyhow!("WEBHOOK_BASE_URL is unusable: {reason}"))?;
            let pool = match &args.database_url {
                Some(url) => Some(
                    crate::db::pool(url, 1, Duration::from_secs(10))
                        .await
                        .context("for the registration lock")?,
                ),
                None => None,
            };
            let done = registration::ensure(&client, &settings, pool.as_ref()).await?;
            if args.output.json {
                print_json(&done)?;
            } else {
                print_ensured(&done);
            }
        }
        WebhooksAction::Delete(args) => {
            let client = client_from(&args.unipile)?;
            client.delete_webhook(&args.id).await?;
            if args.output.json {
                print_json(&serde_json::json!({ "deleted": args.id }))?;
            } else {
                println!("deleted webhook {}", args.id);
            }
        }
    }
    Ok(())
}

/// Runs `ingest sync`.
pub async fn run_sync(command: SyncCommand) -> anyhow::Result<()> {
    let client = client_from(&command.unipile)?;
    let pool = connect(&command.database).await?;
    let accounts = if command.accounts.is_empty() {
        sync::known_accounts(&client, &pool, &command.subject_prefix).await?
    } else {
        command.accounts.iter().map(|id| AccountRef { id: id.clone(), account_type: None }).collect()
    };
    if accounts.is_empty() {
        tracing::warn!("no accounts known to the relay or to Unipile; nothing to backfill");
    }
    let progress = SyncProgress::new(accounts.len(), Duration::from_secs(command.progress_every_secs));
    let report = sync::sync_accounts_with(&client, &pool, &accounts, command.since, &progress).await;
    let report = progress.finish(report)?;
    if command.output.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(())
}

/// What `ingest sync` shows while it works: a bar on a terminal (stderr), otherwise a
/// log line at most every `every`; then a summary line with the time taken.
struct SyncProgress {
    bar: Option<ProgressBar>,
    accounts: usize,
    every: Duration,
    started: Instant,
    done: Mutex<Done>,
}

/// Counts so far, and when the last log line went out.
#[derive(Default)]
struct Done {
    accounts_started: usize,
    chats: usize,
    chats_skipped: usize,
    fetched: usize,
    stored: usize,
    logged: Option<Instant>,
}

impl Done {
    fn summary(&self) -> String {
        format!(
            "{} chats ({} skipped), {} messages fetched, {} new",
            self.chats, self.chats_skipped, self.fetched, self.stored
        )
    }
}

impl SyncProgress {
    fn new(accounts: usize, every: Duration) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(accounts as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} accounts · {msg}",
                )
                .expect("the template is valid"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar, accounts, every, started: Instant::now(), done: Mutex::new(Done::default()) }
    }

    /// Updates the bar, or logs when the last line is `every` old.
    fn show(&self, done: &mut Done) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done.accounts_started.saturating_sub(1) as u64);
                bar.set_message(done.summary());
            }
            None if done.logged.is_none_or(|at| at.elapsed() >= self.every) => {
                done.logged = Some(Instant::now());
                tracing::info!(
                    accounts = format!("{}/{}", done.accounts_started, self.accounts),
                    chats = done.chats,
                    chats_skipped = done.chats_skipped,
                    messages_fetched = done.fetched,
                    messages_stored = done.stored,
                    "backfill progress"
                );
            }
            None => {}
        }
    }

    /// Ends the bar and says how it went, the report or the error passed through.
    fn finish(&self, report: Result<SyncReport, sync::SyncError>) -> Result<SyncReport, sync::SyncError> {
        let done = self.done.lock().expect("progress lock");
        let took = self.started.elapsed();
        if let Some(bar) = &self.bar {
            match &report {
                Ok(_) => {
                    bar.set_position(self.accounts as u64);
                    bar.finish_with_message(format!("{} in {:.1} s", done.summary(), took.as_secs_f64()));
                }
                Err(_) => bar.abandon_with_message(format!("stopped after {}", done.summary())),
            }
        }
        match &report {
            Ok(r) => tracing::info!(
                accounts = r.accounts,
                chats = r.chats,
                chats_skipped = r.chats_skipped,
                messages_fetched = r.messages_fetched,
                messages_stored = r.messages_stored,
                took_s = format!("{:.1}", took.as_secs_f64()),
                "backfill done"
            ),
            Err(error) => tracing::error!(%error, done = done.summary(), "backfill stopped"),
        }
        report
    }
}

impl sync::Progress for SyncProgress {
    fn account_started(&self, _account: &AccountRef) {
        let mut done = self.done.lock().expect("progress lock");
        done.accounts_started += 1;
        self.show(&mut done);
    }

    fn chat_done(&self, fetched: usize, stored: usize) {
        let mut done = self.done.lock().expect("progress lock");
        done.chats += 1;
        done.fetched += fetched;
        done.stored += stored;
        self.show(&mut done);
    }

    fn chat_skipped(&self) {
        let mut done = self.done.lock().expect("progress lock");
        done.chats_skipped += 1;
        self.show(&mut done);
    }
}

async fn connect(database: &DatabaseArgs) -> anyhow::Result<PgPool> {
    crate::db::connect_and_migrate(database, 4).await
}

/// A webhook as the commands show it: header names only, never their values.
#[derive(Debug, Serialize)]
struct WebhookView {
    id: String,
    name: Option<String>,
    source: String,
    enabled: bool,
    format: Option<String>,
    request_url: String,
    events: Vec<String>,
    header_names: Vec<String>,
}

impl From<&Webhook> for WebhookView {
    fn from(w: &Webhook) -> Self {
        Self {
            id: w.id.clone(),
            name: w.name.clone(),
            source: w.source.clone(),
            enabled: w.enabled,
            format: w.format.clone(),
            request_url: w.request_url.clone(),
            events: w.events.clone(),
            header_names: w.headers.iter().map(|h| h.key.clone()).collect(),
        }
    }
}

fn print_ensured(done: &[Ensured]) {
    print_table(
        &["SOURCE", "ACTION", "ID", "DELETED", "REQUEST_URL"],
        done.iter().map(|e| {
            vec![
                e.source.clone(),
                serde_json::to_value(e.action)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                e.id.clone(),
                if e.deleted.is_empty() { "-".to_owned() } else { e.deleted.join(",") },
                e.request_url.clone(),
            ]
        }),
    );
}

fn print_report(report: &SyncReport) {
    print_table(
        &["ACCOUNTS", "CHATS", "CHATS_SKIPPED", "MESSAGES_FETCHED", "MESSAGES_STORED"],
        std::iter::once(vec![
            report.accounts.to_string(),
            report.chats.to_string(),
            report.chats_skipped.to_string(),
            report.messages_fetched.to_string(),
            report.messages_stored.to_string(),
        ]),
    );
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Left-aligned columns, two spaces apart.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    print!("{}", table(header, rows));
}

fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> =
        std::iter::once(header.iter().map(|h| (*h).to_owned()).collect()).chain(rows).collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_rfc3339_dates_and_ages() {
        assert_eq!(parse_since("2026-11-01T10:00:00Z").unwrap().to_rfc3339(), "2026-11-01T10:00:00+00:00");
        assert_eq!(parse_since("2026-11-01").unwrap().to_rfc3339(), "2026-11-01T00:00:00+00:00");
        let age = Utc::now() - parse_since("7d").unwrap();
        assert!((age.num_seconds() - 7 * 86_400).abs() < 5);
        for bad in ["yesterday", "7y", "", "d"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_columns_line_up() {
        let text = table(
            &["ID", "NAME"],
            vec![vec!["a".into(), "x".into()], vec!["long-id".into(), "y".into()]].into_iter(),
        );
        assert_eq!(text, "ID       NAME\na        x\nlong-id  y\n");
    }

    #[test]
    fn missing_credentials_are_named() {
        let args = UnipileArgs { unipile_dsn: Some("api1.unipile.com:1".into()), unipile_api_key: None };
        assert_eq!(
            client_from(&args).unwrap_err().to_string(),
            "UNIPILE_API_KEY is not set (or pass --unipile-api-key)"
        );
    }
}
