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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::idle::{Target, Ws, loopback_target, open_with_hello, source_address, url_with_token};
use crate::report::{self, now_us};
use crate::webhooks::{self, Answer, Ingest, PROVIDERS, Received, tally};

/// Bytes of a `long_id` delivery's message id.
pub const LONG_ID_BYTES: usize = 3_000;
/// Bytes of text in each of a `huge_edit`'s two deliveries.
pub const HUGE_TEXT_BYTES: usize = 900_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    ingest: Ingest,
    /// WebSocket URL of one fanout replica; only loopback hosts are accepted.
    #[arg(long, default_value = "ws://127.0.0.1:8001/ws/messages")]
    ws_url: String,
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

/// What a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Clean,
    Nul,
    LongId,
    HugeEdit,
}

impl Kind {
    /// The poisoned kinds, in the order they take turns.
    pub const POISONED: [Kind; 3] = [Kind::Nul, Kind::LongId, Kind::HugeEdit];

    pub fn name(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Nul => "nul",
            Self::LongId => "long_id",
            Self::HugeEdit => "huge_edit",
        }
    }

    /// The kind of the `n`-th delivery when a `share` of them is poisoned: the poisoned
    /// ones are spread evenly (one where `n × share` crosses a whole number) and take
    /// the kinds in turn.
    pub fn of(n: u64, share: f64) -> Self {
        let share = share.clamp(0.0, 1.0);
        let before = (n as f64 * share).floor();
        if ((n + 1) as f64 * share).floor() > before {
            Self::POISONED[(before as u64 % Self::POISONED.len() as u64) as usize]
        } else {
            Self::Clean
        }
    }
}

/// One run's ids and the deliveries it sends.
#[derive(Debug, Clone)]
pub struct Run {
    /// Unique per run: in every account and message id.
    pub id: String,
    accounts: usize,
    chats: usize,
}

impl Run {
    pub fn new(accounts: usize, chats: usize) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Self { id, accounts: accounts.max(1), chats: chats.max(1) }
    }

    pub fn account_id(&self, account: usize) -> String {
        format!("pz{}a{account:02}", self.id)
    }

    /// Every account of the run: what the clients' token allows.
    pub fn account_ids(&self) -> Vec<String> {
        (0..self.accounts).map(|a| self.account_id(a)).collect()
    }

    /// The message id of the `n`-th delivery (padded to [`LONG_ID_BYTES`] for a
    /// `long_id`).
    pub fn message_id(&self, n: u64, kind: Kind) -> String {
        let id = format!("pz{}n{n}", self.id);
        match kind {
            Kind::LongId => {
                format!("{id}x{}", "0123456789".repeat(LONG_ID_BYTES / 10))[..LONG_ID_BYTES].to_owned()
            }
            _ => id,
        }
    }

    /// The bodies of the `n`-th delivery, in the order they are posted: one, or two
    /// (message, then its edit) for a `huge_edit`.
    pub fn deliveries(&self, n: u64, kind: Kind) -> Vec<String> {
        let account = n as usize % self.accounts;
        let chat = (n as usize / self.accounts) % self.chats;
        let account_id = self.account_id(account);
        let message_id = self.message_id(n, kind);
        let text = match kind {
            Kind::Nul => format!("Poison {n}: nul\u{0}here, are we still on for Thursday?"),
            Kind::HugeEdit => huge_text(&format!("Poison {n}: a very long message. "), HUGE_TEXT_BYTES),
            Kind::Clean | Kind::LongId => format!("Poison run message {n}: are we still on for Thursday?"),
        };
        let mut body = Received {
            account_id: &account_id,
            provider: PROVIDERS[account % PROVIDERS.len()],
            chat_id: &format!("{account_id}c{chat:03}"),
            chat,
            message_id: &message_id,
            text: &text,
            is_sender: n.is_multiple_of(5),
            n,
        }
        .to_json();
        match kind {
            Kind::Clean | Kind::LongId => vec![body.to_string()],
            Kind::Nul => {
                body["sender"]["attendee_name"] = format!("Contact\u{0}{chat}").into();
                body["attachments"] = json!([{
                    "id": format!("att{n}"),
                    "type": "file",
                    "mimetype": "application/pdf",
                    "file_name": "deck\u{0}final.pdf",
                    "size": {"height": "720", "width": "1280"},
                    "url": format!("att://{message_id}/file"),
                }]);
                vec![body.to_string()]
            }
            Kind::HugeEdit => {
                let received = body.to_string();
                body["event"] = "message_edited".into();
                body["message"] =
                    huge_text("Edited: a different very long message. ", HUGE_TEXT_BYTES).into();
                body["timestamp"] =
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into();
                vec![received, body.to_string()]
            }
        }
    }
}

/// `phrase` repeated to exactly `bytes` bytes (the phrase is ASCII).
fn huge_text(phrase: &str, bytes: usize) -> String {
    let mut text = phrase.repeat(bytes / phrase.len() + 1);
    text.truncate(bytes);
    text
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

/// What one client saw of an event.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at_us: u64,
    truncated: bool,
}

/// Everything one client received.
#[derive(Debug, Default)]
struct ClientLog {
    event_ids: HashSet<String>,
    /// Events whose id this client had already received.
    duplicates: u64,
    /// `message:new` by message id (first arrival).
    new: HashMap<String, Seen>,
    /// `message:edited` by message id (first arrival).
    edited: HashMap<String, Seen>,
    other_events: u64,
    unreadable: u64,
    /// The last event's `seq` (or the first `hello`'s): where a reconnection resumes.
    last_seq: Option<u64>,
    /// Why its connections ended, for the ones that did before the end of the run.
    ends: BTreeMap<String, u64>,
}

/// The fields of an event frame the check needs; the rest is skipped unread.
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    seq: Option<u64>,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    data: FrameData,
}

#[derive(Debug, Default, Deserialize)]
struct FrameData {
    /// `message:new`: the message, whose `id` is the message id.
    message: Option<MessageRef>,
    /// `message:edited` (and other updates): the message id.
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageRef {
    id: Option<String>,
}

impl ClientLog {
    fn hello(&mut self, hello: &str) {
        if self.last_seq.is_none() {
            self.last_seq = serde_json::from_str::<Frame>(hello).ok().and_then(|f| f.seq);
        }
    }

    fn record(&mut self, frame: Option<Frame>, at_us: u64) {
        let Some(frame) = frame else {
            self.unreadable += 1;
            return;
        };
        let Some(id) = frame.id else { return };
        if let Some(seq) = frame.seq {
            self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        }
        if !self.event_ids.insert(id) {
            self.duplicates += 1;
            return;
        }
        let seen = Seen { at_us, truncated: frame.truncated };
        let entry = match (frame.kind.as_str(), frame.data) {
            ("message:new", FrameData { message: Some(MessageRef { id: Some(id) }), .. }) => {
                self.new.entry(id)
            }
            ("message:edited", FrameData { message_id: Some(id), .. }) => self.edited.entry(id),
            _ => {
                self.other_events += 1;
                return;
            }
        };
        entry.or_insert(seen);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one connection's events into `log` until it ends; returns why it ended.
async fn read_events(ws: &mut Ws, log: &Mutex<ClientLog>) -> String {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let at_us = now_us();
                let frame = serde_json::from_str::<Frame>(text.as_str()).ok();
                lock(log).record(frame, at_us);
            }
            Ok(Message::Close(frame)) => {
                return format!("closed {}", frame.map(|f| u16::from(f.code)).unwrap_or(0));
            }
            Err(e) => return format!("read error: {e}"),
            Ok(_) => {}
        }
    }
    "ended".into()
}

/// A client for the whole run: reads events, and when its connection ends reconnects
/// with `?since=` its last sequence, as a browser would. Runs until aborted.
async fn follow(mut ws: Ws, url: String, source: SocketAddr, addr: SocketAddr, log: Arc<Mutex<ClientLog>>) {
    loop {
        let why = read_events(&mut ws, &log).await;
        *lock(&log).ends.entry(why).or_default() += 1;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let since = lock(&log).last_seq.unwrap_or(0);
            match open_with_hello(&format!("{url}&since={since}"), source, addr).await {
                Ok((opened, _)) => {
                    ws = opened;
                    break;
                }
                Err(e) => *lock(&log).ends.entry(format!("reconnect failed: {e:#}")).or_default() += 1,
            }
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 || args.rate > 20_000 || args.duration > 600 || args.clients > 1000 {
        bail!("--rate must be 1..=20000, --duration at most 600, --clients at most 1000");
    }
    if !(0.0..=1.0).contains(&args.poison) {
        bail!("--poison is a share, 0..=1");
    }
    let run = Arc::new(Run::new(args.accounts, args.chats));
    let target = Target {
        url: args.ws_url.clone(),
        jwt_secret: args.jwt_secret.clone(),
        accounts: run.account_ids(),
        connections: args.clients,
        source_ips: 1,
        first_source: 1,
        concurrency: args.clients,
    };
    let addr = loopback_target(&target.url).await?;
    let url = url_with_token(&target);
    let mut logs = Vec::with_capacity(args.clients);
    let mut readers = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let source = source_address(&target, i);
        let (ws, hello) = tokio::time::timeout(Duration::from_secs(10), open_with_hello(&url, source, addr))
            .await
            .context("timed out opening a WebSocket client")?
            .with_context(|| format!("opening WebSocket client {i} to {}", args.ws_url))?;
        let log = Arc::new(Mutex::new(ClientLog::default()));
        lock(&log).hello(&hello);
        readers.push(tokio::spawn(follow(ws, url.clone(), source, addr, log.clone())));
        logs.push(log);
    }

    let poster = args.ingest.poster(args.max_in_flight)?;
    let metrics_url = args.ingest.metrics_url();
    let metrics_before = report::scrape(&metrics_url).await;
    let total = args.rate * args.duration;
    let sent = Arc::new(Mutex::new(Vec::<Sent>::with_capacity(total as usize)));
    println!(
        "loadgen poison: run {}, {total} deliveries at {}/s to {} ({:.2}% poisoned), {} clients on {}",
        run.id,
        args.rate,
        poster.endpoint,
        args.poison * 100.0,
        args.clients,
        args.ws_url
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
    if !problems.is_empty() {
        bail!("check failed: {}", problems.join("; "));
    }
    println!("check: passed");
    Ok(())
}

/// What the clients saw of one message.
#[derive(Debug, Default, Clone, Copy)]
struct Reach {
    /// Clients that got its `message:new`, and how many of those were truncated.
    new: usize,
    new_truncated: usize,
    /// Clients that got its `message:edited`, and how many of those were truncated.
    edited: usize,
    edited_truncated: usize,
}

impl Reach {
    fn of(message_id: &str, logs: &[ClientLog]) -> Self {
        let mut reach = Self::default();
        for log in logs {
            if let Some(seen) = log.new.get(message_id) {
                reach.new += 1;
                reach.new_truncated += usize::from(seen.truncated);
            }
            if let Some(seen) = log.edited.get(message_id) {
                reach.edited += 1;
                reach.edited_truncated += usize::from(seen.truncated);
            }
        }
        reach
    }
}

/// The end-of-run report, computed from what was sent and what the clients got.
struct Report<'a> {
    sent: &'a [Sent],
    logs: &'a [ClientLog],
}

impl<'a> Report<'a> {
    fn new(sent: &'a [Sent], logs: &'a [ClientLog]) -> Self {
        Self { sent, logs }
    }

    /// Prints the report; returns what fails the check: clean deliveries answered other
    /// than 200 or lost, duplicates.
    fn print(&self) -> Vec<String> {
        let clients = self.logs.len();
        let of_kind = |kind: Kind| self.sent.iter().filter(move |s| s.kind == kind);

        // Clean deliveries: answers, losses, latency.
        let mut answers = BTreeMap::<String, u64>::new();
        let mut failed = BTreeMap::<String, u64>::new();
        let (mut clean, mut ok, mut accepted, mut lost, mut lost_everywhere, mut stray) = (0, 0, 0, 0, 0, 0);
        let mut ack = report::latency_histogram();
        let mut every = report::latency_histogram();
        let mut last = report::latency_histogram();
        for s in of_kind(Kind::Clean) {
            clean += 1;
            let answer = &s.answers[0];
            *answers.entry(answer.to_string()).or_default() += 1;
            report::record(&mut ack, Duration::from_micros(s.answered_us.saturating_sub(s.scheduled_us)));
            if answer.status() == Some(200) {
                ok += 1;
            } else {
                *failed.entry(answer.code()).or_default() += 1;
            }
            let reach = Reach::of(&s.message_id, self.logs);
            if !answer.is("accepted") {
                stray += u64::from(reach.new > 0);
                continue;
            }
            accepted += 1;
            if reach.new < clients {
                lost += 1;
                lost_everywhere += u64::from(reach.new == 0);
            }
            let mut slowest = 0;
            for seen in self.logs.iter().filter_map(|log| log.new.get(&s.message_id)) {
                let latency = seen.at_us.saturating_sub(s.scheduled_us);
                slowest = slowest.max(latency);
                report::record(&mut every, Duration::from_micros(latency));
            }
            if reach.new == clients && slowest > 0 {
                report::record(&mut last, Duration::from_micros(slowest));
            }
        }
        println!(
            "clean deliveries sent: {clean}; answered 200: {ok}; answered other than 200: {}",
            clean - ok
        );
        println!("  clean answers: {}", tally(&answers));
        if !failed.is_empty() {
            println!("  clean answered other than 200, by status: {}", tally(&failed));
        }
        println!("  clean ack latency (scheduled send to answer): {}", report::percentiles(&ack));
        if stray > 0 {
            println!(
                "  clean deliveries not acknowledged `accepted` whose message:new arrived anyway: {stray}"
            );
        }

        // Poisoned deliveries, by kind.
        for kind in Kind::POISONED {
            let count = of_kind(kind).count();
            if count == 0 {
                continue;
            }
            let tally_of = |i: usize| {
                let mut t = BTreeMap::<String, u64>::new();
                for s in of_kind(kind) {
                    if let Some(a) = s.answers.get(i) {
                        *t.entry(a.to_string()).or_default() += 1;
                    }
                }
                tally(&t)
            };
            let reaches: Vec<Reach> = of_kind(kind).map(|s| Reach::of(&s.message_id, self.logs)).collect();
            let all =
                |f: fn(&Reach) -> usize| reaches.iter().filter(|r| f(r) >= clients && clients > 0).count();
            let some = |f: fn(&Reach) -> usize| reaches.iter().filter(|r| f(r) > 0 && f(r) < clients).count();
            let sum = |f: fn(&Reach) -> usize| reaches.iter().map(f).sum::<usize>();
            match kind {
                Kind::Nul => println!(
                    "poisoned nul: {count} sent; answers: {}; message:new at every client for {}, at some for {}",
                    tally_of(0),
                    all(|r| r.new),
                    some(|r| r.new)
                ),
                Kind::LongId => println!(
                    "poisoned long_id: {count} sent; answers: {}; message:new at every client for {}, at some \
                     for {} (expected none)",
                    tally_of(0),
                    all(|r| r.new),
                    some(|r| r.new)
                ),
                Kind::HugeEdit => {
                    let unsent = of_kind(kind).filter(|s| s.answers.len() < 2).count();
                    println!(
                        "poisoned huge_edit: {count} sent; message answers: {}; edit answers: {} \
                         (edit not sent after a non-200: {unsent})",
                        tally_of(0),
                        tally_of(1)
                    );
                    println!(
                        "  message:new at every client for {}, at some for {} ({} frames truncated); \
                         message:edited at every client for {}, at some for {} ({} frames truncated)",
                        all(|r| r.new),
                        some(|r| r.new),
                        sum(|r| r.new_truncated),
                        all(|r| r.edited),
                        some(|r| r.edited),
                        sum(|r| r.edited_truncated)
                    );
                }
                Kind::Clean => {}
            }
        }

        // What the clients saw.
        let duplicates: u64 = self.logs.iter().map(|l| l.duplicates).sum();
        let unreadable: u64 = self.logs.iter().map(|l| l.unreadable).sum();
        let other: u64 = self.logs.iter().map(|l| l.other_events).sum();
        let mut ends = BTreeMap::<String, u64>::new();
        for log in self.logs {
            for (why, n) in &log.ends {
                *ends.entry(why.clone()).or_default() += n;
            }
        }
        println!(
            "lost: {lost} of {accepted} clean deliveries acknowledged `accepted` did not reach all {clients} \
             clients ({lost_everywhere} reached none)"
        );
        println!("duplicates: {duplicates} events received more than once by the same client");
        println!(
            "end-to-end latency, scheduled send to message:new at a client: {}",
            report::percentiles(&every)
        );
        println!("  until the last client had it: {}", report::percentiles(&last));
        if other > 0 || unreadable > 0 {
            println!("other events: {other}; unreadable frames: {unreadable}");
        }
        if !ends.is_empty() {
            println!("client connections ended during the run (each reconnected with since): {ends:?}");
        }

        let mut problems = Vec::new();
        if clean > ok {
            problems.push(format!(
                "{} clean deliveries answered other than 200 ({})",
                clean - ok,
                tally(&failed)
            ));
        }
        if lost > 0 {
            problems.push(format!("{lost} clean deliveries lost"));
        }
        if duplicates > 0 {
            problems.push(format!("{duplicates} duplicate events"));
        }
        if accepted == 0 && clean > 0 {
            problems.push("no clean delivery was accepted".into());
        }
        problems
    }
}

/// Prints the p99 of ingest's `outbox_publish_lag_seconds` over the run: from the
/// histogram's bucket deltas between the two scrapes, or a summary's own p99.
fn print_outbox_lag(before: Option<&str>, after: Option<&str>, url: &str) {
    const METRIC: &str = "outbox_publish_lag_seconds";
    let Some(after) = after else {
        println!("outbox publish lag: {url} not readable");
        return;
    };
    let after_buckets = report::buckets(after, METRIC);
    if !after_buckets.is_empty() {
        let before_buckets = before.map(|b| report::buckets(b, METRIC)).unwrap_or_default();
        let total = |page: Option<&str>, suffix: &str| {
            page.and_then(|p| report::samples(p, &format!("{METRIC}{suffix}")).first().map(|s| s.value))
                .unwrap_or(0.0)
        };
        let count = total(Some(after), "_count") - total(before, "_count");
        let sum = total(Some(after), "_sum") - total(before, "_sum");
        match report::quantile_between(&before_buckets, &after_buckets, 0.99) {
            Some((p99, bucket)) => println!(
                "outbox publish lag (ingest's {METRIC}, over the run): p99 ≈ {:.1}ms (bucket ≤ {}), \
                 mean {:.1}ms, over {count} events published",
                p99 * 1000.0,
                if bucket.is_infinite() { "+Inf".to_owned() } else { format!("{}ms", bucket * 1000.0) },
                sum / count.max(1.0) * 1000.0
            ),
            None => println!("outbox publish lag: nothing published during the run"),
        }
        return;
    }
    let p99 = report::samples(after, METRIC).into_iter().find(|s| s.label("quantile") == Some("0.99"));
    match p99 {
        Some(sample) => {
            println!("outbox publish lag (ingest's summary, p99): {:.1}ms", sample.value * 1000.0)
        }
        None => println!("outbox publish lag: no {METRIC} in {url}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn poisoned_deliveries_are_spread_evenly_and_take_turns() {
        let kinds: Vec<Kind> = (0..1000).map(|n| Kind::of(n, 0.01)).collect();
        let poisoned: Vec<(usize, Kind)> =
            kinds.iter().copied().enumerate().filter(|(_, k)| *k != Kind::Clean).collect();
        assert_eq!(poisoned.len(), 10);
        assert_eq!(poisoned[0], (99, Kind::Nul));
        assert_eq!(poisoned[1], (199, Kind::LongId));
        assert_eq!(poisoned[2], (299, Kind::HugeEdit));
        assert_eq!(poisoned[3], (399, Kind::Nul));
        assert!((0..1000).all(|n| Kind::of(n, 0.0) == Kind::Clean));
        assert!((0..30).all(|n| Kind::of(n, 1.0) != Kind::Clean));
    }

    #[test]
    fn a_clean_delivery_has_a_unique_id_of_the_run() {
        let run = Run::new(5, 20);
        let body = parse(&run.deliveries(7, Kind::Clean)[0]);
        assert_eq!(body["event"], "message_received");
        assert_eq!(body["message_id"], run.message_id(7, Kind::Clean));
        assert!(body["message_id"].as_str().unwrap().contains(&run.id));
        assert_ne!(run.message_id(7, Kind::Clean), run.message_id(8, Kind::Clean));
        assert_eq!(body["account_id"], run.account_id(2));
        assert!(run.account_ids().contains(&body["account_id"].as_str().unwrap().to_owned()));
        assert!(!body.to_string().contains("\\u0000"));
    }

    #[test]
    fn the_nul_delivery_has_nul_in_text_sender_name_and_attachment_name() {
        let run = Run::new(5, 20);
        let bodies = run.deliveries(3, Kind::Nul);
        assert_eq!(bodies.len(), 1);
        let text = &bodies[0];
        assert_eq!(text.matches("\\u0000").count(), 3, "{text}");
        assert!(!text.contains('\0'), "escaped, not raw");
        let body = parse(text);
        assert!(body["message"].as_str().unwrap().contains('\0'));
        assert!(body["sender"]["attendee_name"].as_str().unwrap().contains('\0'));
        assert!(body["attachments"][0]["file_name"].as_str().unwrap().contains('\0'));
        assert_eq!(body["message_id"], run.message_id(3, Kind::Nul));
    }

    #[test]
    fn the_long_id_is_3000_bytes_and_still_of_the_run() {
        let run = Run::new(5, 20);
        let id = run.message_id(12, Kind::LongId);
        assert_eq!(id.len(), LONG_ID_BYTES);
        assert_eq!(id.len(), 3_000);
        assert!(id.starts_with(&run.message_id(12, Kind::Clean)));
        let body = parse(&run.deliveries(12, Kind::LongId)[0]);
        assert_eq!(body["message_id"].as_str().unwrap().len(), 3_000);
        assert_eq!(body["event"], "message_received");
    }

    #[test]
    fn the_huge_edit_is_two_900_kb_deliveries_of_the_same_message() {
        let run = Run::new(5, 20);
        let bodies = run.deliveries(5, Kind::HugeEdit);
        assert_eq!(bodies.len(), 2);
        let (received, edited) = (parse(&bodies[0]), parse(&bodies[1]));
        assert_eq!(received["event"], "message_received");
        assert_eq!(edited["event"], "message_edited");
        assert_eq!(received["message_id"], edited["message_id"]);
        assert_eq!(received["message_id"], run.message_id(5, Kind::HugeEdit));
        assert_eq!(received["chat_id"], edited["chat_id"]);
        assert_eq!(received["account_id"], edited["account_id"]);
        let (a, b) = (received["message"].as_str().unwrap(), edited["message"].as_str().unwrap());
        assert_eq!((a.len(), b.len()), (900_000, 900_000));
        assert_ne!(a, b);
        // Under ingest's default 1 MiB body limit.
        assert!(bodies.iter().all(|b| b.len() > 900_000 && b.len() < 1024 * 1024));
    }

    fn frame(text: &str) -> Option<Frame> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn a_client_log_matches_events_to_messages_and_counts_duplicates() {
        let mut log = ClientLog::default();
        log.hello(r#"{"type":"hello","connection_id":"c","seq":40,"heartbeat_s":30}"#);
        assert_eq!(log.last_seq, Some(40));
        let new = r#"{"type":"message:new","id":"e1","seq":41,"account_id":"a","chat_id":"c",
                      "occurred_at":"t","data":{"message":{"id":"m1","text":"hi"},"chat":{"id":"c"}}}"#;
        let edited = r#"{"type":"message:edited","id":"e2","seq":42,"truncated":true,
                         "data":{"message_id":"m1","text":"x"}}"#;
        log.record(frame(new), 100);
        log.record(frame(edited), 200);
        log.record(frame(new), 300);
        log.record(frame(r#"{"type":"pong"}"#), 400);
        log.record(frame("not json"), 500);
        assert_eq!(log.duplicates, 1);
        assert_eq!(log.new["m1"].at_us, 100);
        assert!(!log.new["m1"].truncated);
        assert!(log.edited["m1"].truncated);
        assert_eq!(log.last_seq, Some(42));
        assert_eq!(log.unreadable, 1);
        // A later hello (a resumed connection) does not move the resume point.
        log.hello(r#"{"type":"hello","seq":99}"#);
        assert_eq!(log.last_seq, Some(42));
    }
}
