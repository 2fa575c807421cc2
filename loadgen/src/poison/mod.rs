//! `loadgen poison`: clean webhooks with a share of poisoned ones among them, checked
//! end to end, webhook in to WebSocket out.
//!
//! It opens `--clients` WebSocket connections to fanout (a token for exactly the run's
//! accounts, signed with `JWT_SECRET`), then posts `message_received` deliveries to
//! ingest at `--rate` for `--duration` seconds, open loop like `webhooks` (each has a
//! scheduled start, slow answers never delay the schedule). A `--poison` share of them,
//! spread evenly, are poisoned, in turn:
//!
//! - `nul`: U+0000 (`\u0000` in the JSON) in the text, the sender's name and an
//!   attachment's file name. PostgreSQL's `text` and `jsonb` refuse it; a relay that
//!   replaces it stores the message and delivers its `message:new` like a clean one.
//! - `long_id`: a 3,000-byte message id; expected `200 dead_lettered` and no event.
//! - `huge_edit`: a delivery with ~900 KB of text and, right after its 200, an edit of
//!   the same message with another ~900 KB; expected 200 for both and both events
//!   delivered (truncated, with `"truncated": true` on the envelope).
//!
//! Every clean delivery has its own message id (with the run's id in it). Each client
//! records every event it gets, and reconnects with `?since=` if fanout closes it (as a
//! real client would). After the last answer and `--grace` seconds for stragglers it
//! reports: clean deliveries and their answers; poisoned ones by kind, their answers
//! and what the clients saw of them; clean deliveries acknowledged `accepted` whose
//! `message:new` did not reach every client (lost); events a client got twice
//! (duplicates); end-to-end latency (scheduled send to `message:new` at a client) of
//! clean deliveries; and ingest's outbox publish lag over the run, from the
//! `outbox_publish_lag_seconds` buckets of its `/metrics` before and after.
//!
//! It fails (exit status 1) if a clean delivery was answered anything but 200, one was
//! lost, or a client saw a duplicate, so it serves as a check. `--poison 0` is the
//! control run.
//!
//! ```text
//! WEBHOOK_SECRET=... JWT_SECRET=... loadgen poison --url http://127.0.0.1:8000 \
//!   --ws-url ws://127.0.0.1:8001/ws/messages --rate 1000 --duration 20 --poison 0.01
//! ```
//!
//! Here: the options and the run; `deliveries` builds what is sent, `clients` records
//! what the WebSocket clients get, and `summary` prints the report and the check.

mod clients;
mod deliveries;
mod summary;

pub use deliveries::{HUGE_TEXT_BYTES, Kind, LONG_ID_BYTES, Run};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::idle::{Target, Tokens, loopback_target, open_with_hello, source_address};
use crate::report::{self, now_us};
use crate::webhooks::{self, Answer, Ingest};
use clients::{ClientLog, follow, lock};
use summary::{Report, fanout_metrics_url, print_outbox_lag, print_stages, scrape_all};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    ingest: Ingest,
    /// WebSocket URL of each fanout replica, comma-separated (clients take them in
    /// turn); only loopback hosts are accepted. Each replica's `/metrics` is read for
    /// the per-stage breakdown.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8001/ws/messages")]
    ws_url: Vec<String>,
    /// JWT_SECRET of the relay, to sign the clients' token.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Target deliveries per second (at most 20,000).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send, in seconds (at most 600).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Share of deliveries poisoned, 0..=1, spread evenly and taking the kinds in turn
    /// (nul, long_id, huge_edit). 0 is the control run.
    #[arg(long, default_value_t = 0.01)]
    poison: f64,
    /// WebSocket clients that must each receive every clean message (at most 1,000).
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Seconds to wait after the last answer for events still on their way.
    #[arg(long, default_value_t = 5)]
    grace: u64,
    /// Distinct accounts the messages belong to (the clients' token lists them all).
    #[arg(long, default_value_t = 5)]
    accounts: usize,
    /// Distinct chats per account.
    #[arg(long, default_value_t = 20)]
    chats: usize,
    /// Most requests in flight; a request due while this many are pending is skipped.
    #[arg(long, default_value_t = 5000)]
    max_in_flight: usize,
}

/// One delivery as sent, and how ingest answered.
#[derive(Debug)]
struct Sent {
    kind: Kind,
    message_id: String,
    /// When it was due, in wall-clock microseconds.
    scheduled_us: u64,
    /// When its (first) answer came.
    answered_us: u64,
    /// One per body posted; a `huge_edit`'s edit is posted only after a 200.
    answers: Vec<Answer>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.rate > 20_000 || args.duration > 600 || args.clients > 1000 {
        bail!("--rate must be 1..=20000, --duration at most 600, --clients at most 1000");
    }
    if !(0.0..=1.0).contains(&args.poison) {
        bail!("--poison is a share, 0..=1");
    }
    if args.ws_url.is_empty() {
        bail!("--ws-url names at least one fanout replica");
    }
    let run = Arc::new(Run::new(args.accounts, args.chats));
    let mut replicas = Vec::with_capacity(args.ws_url.len());
    for url in &args.ws_url {
        let target = Target {
            url: url.clone(),
            jwt_secret: args.jwt_secret.clone(),
            accounts: run.account_ids(),
            connections: args.clients,
            source_ips: 1,
            first_source: 1,
            concurrency: args.clients,
        };
        let addr = loopback_target(&target.url).await?;
        replicas.push((Tokens::new(&target), target, addr));
    }
    let fanout_metrics: Vec<String> = args.ws_url.iter().map(|url| fanout_metrics_url(url)).collect();
    let mut logs = Vec::with_capacity(args.clients);
    let mut readers = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let (tokens, target, addr) = &replicas[i % replicas.len()];
        let (source, addr) = (source_address(target, i), *addr);
        let url = tokens.url(i);
        let (ws, hello) = tokio::time::timeout(Duration::from_secs(10), open_with_hello(&url, source, addr))
            .await
            .context("timed out opening a WebSocket client")?
            .with_context(|| format!("opening WebSocket client {i} to {}", target.url))?;
        let log = Arc::new(Mutex::new(ClientLog::default()));
        lock(&log).hello(&hello);
        readers.push(tokio::spawn(follow(ws, url, source, addr, log.clone())));
        logs.push(log);
    }

    let poster = args.ingest.poster(args.max_in_flight)?;
    let metrics_url = args.ingest.metrics_url();
    let metrics_before = report::scrape(&metrics_url).await;
    let fanout_before = scrape_all(&fanout_metrics).await;
    let total = args.rate * args.duration;
    let sent = Arc::new(Mutex::new(Vec::<Sent>::with_capacity(total as usize)));
    println!(
        "loadgen poison: run {}, {total} deliveries at {}/s to {} ({:.2}% poisoned), {} clients on {}",
        run.id,
        args.rate,
        poster.endpoint,
        args.poison * 100.0,
        args.clients,
        args.ws_url.join(", ")
    );
    let outcome = webhooks::open_loop(args.rate, total, args.max_in_flight, |n, scheduled| {
        // The wall-clock time it was due: the clients stamp arrivals with the same clock.
        let scheduled_us = now_us().saturating_sub(scheduled.elapsed().as_micros() as u64);
        let kind = Kind::of(n, args.poison);
        let (run, poster, sent) = (run.clone(), poster.clone(), sent.clone());
        async move {
            let mut answers = Vec::with_capacity(2);
            let mut answered_us = 0;
            for body in run.deliveries(n, kind) {
                let answer = poster.post(body).await;
                if answers.is_empty() {
                    answered_us = now_us();
                }
                let ok = answer.status() == Some(200);
                answers.push(answer);
                if !ok {
                    break;
                }
            }
            let message_id = run.message_id(n, kind);
            lock(&sent).push(Sent { kind, message_id, scheduled_us, answered_us, answers });
        }
    })
    .await;
    println!(
        "sent {} in {:.2}s, all answered after {:.2}s; waiting {}s for stragglers",
        outcome.sent,
        outcome.send_window.as_secs_f64(),
        outcome.elapsed.as_secs_f64(),
        args.grace
    );
    tokio::time::sleep(Duration::from_secs(args.grace)).await;
    let metrics_after = report::scrape(&metrics_url).await;
    let fanout_after = scrape_all(&fanout_metrics).await;
    for reader in &readers {
        reader.abort();
    }
    let logs: Vec<ClientLog> = logs.iter().map(|log| std::mem::take(&mut *lock(log))).collect();
    let sent = std::mem::take(&mut *lock(&sent));

    let problems = Report::new(&sent, &logs).print();
    if outcome.skipped > 0 {
        println!("skipped (over --max-in-flight): {}", outcome.skipped);
    }
    print_outbox_lag(metrics_before.as_deref(), metrics_after.as_deref(), &metrics_url);
    print_stages((metrics_before.as_deref(), metrics_after.as_deref()), (&fanout_before, &fanout_after));
    if !problems.is_empty() {
        bail!("check failed: {}", problems.join("; "));
    }
    println!("check: passed");
    Ok(())
}
