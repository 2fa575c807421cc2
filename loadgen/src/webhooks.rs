//! `loadgen webhooks`: an open-loop webhook driver for ingest.
//!
//! Sends `message_received` deliveries shaped like Unipile's at a fixed rate for a fixed
//! time. Each request has a scheduled start; latency is measured from that schedule,
//! not from when a busy client got round to sending it, so a slow server shows up as
//! latency instead of as a quietly lower rate (no coordinated omission).
//!
//! The pieces `poison` drives ingest with live here too: [`Ingest`] (where and with
//! which secret), [`Poster`] and its [`Answer`]s, [`open_loop`] (the schedule) and
//! [`Received`] (a delivery's body).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

use crate::report;

/// Which ingest to post to, and its webhook secret.
#[derive(Debug, clap::Args)]
pub struct Ingest {
    /// Base URL of ingest.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The Unipile-Auth secret ingest expects.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
}

impl Ingest {
    /// A client for up to `max_in_flight` requests at once to the messaging webhook.
    pub fn poster(&self, max_in_flight: usize) -> anyhow::Result<Poster> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(max_in_flight)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Poster {
            client,
            endpoint: format!("{}/api/webhooks/unipile/messages", self.url.trim_end_matches('/')),
            secret: self.secret.clone(),
        })
    }

    /// ingest's Prometheus page.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.url.trim_end_matches('/'))
    }
}

/// Posts deliveries to ingest's messaging webhook; cheap to clone.
#[derive(Debug, Clone)]
pub struct Poster {
    client: reqwest::Client,
    pub endpoint: String,
    secret: String,
}

impl Poster {
    /// Posts one delivery and reads the answer.
    pub async fn post(&self, body: String) -> Answer {
        let request = self
            .client
            .post(&self.endpoint)
            .header("Unipile-Auth", &self.secret)
            .header("Content-Type", "application/json")
            .body(body);
        match request.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or_default();
                Answer::Http { status, ack: body["status"].as_str().map(str::to_owned) }
            }
            Err(e) if e.is_timeout() => Answer::Timeout,
            Err(_) => Answer::ConnectError,
        }
    }
}

/// How ingest answered a delivery: `200 accepted`, `503`, `timeout`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP answer, with the `status` of its JSON body if it had one.
    Http {
        status: u16,
        ack: Option<String>,
    },
    Timeout,
    ConnectError,
}

impl Answer {
    /// The HTTP status, if there was an answer at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 200 with this ack status.
    pub fn is(&self, ack: &str) -> bool {
        matches!(self, Self::Http { status: 200, ack: Some(a) } if a == ack)
    }

    /// The status code alone (`503`), or `timeout` / `connect error`.
    pub fn code(&self) -> String {
        match self.status() {
            Some(status) => status.to_string(),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http { status, ack: Some(ack) } => write!(f, "{status} {ack}"),
            Self::Http { status, ack: None } => write!(f, "{status}"),
            Self::Timeout => f.write_str("timeout"),
            Self::ConnectError => f.write_str("connect error"),
        }
    }
}

/// `200 accepted=12 503=1` for counts by answer.
pub fn tally(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// What [`open_loop`] did.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// Requests started.
    pub sent: u64,
    /// Requests due while `max_in_flight` were pending: never started.
    pub skipped: u64,
    /// From the first scheduled start to the last.
    pub send_window: Duration,
    /// From the first scheduled start until every request had finished.
    pub elapsed: Duration,
}

/// Starts `request(i, scheduled)` for `i` in `0..total`, `rate` per second, open loop:
/// each start has its scheduled time and never waits for earlier answers; one due while
/// `max_in_flight` are pending is skipped (counted, not queued). Returns once every
/// started request has finished.
pub async fn open_loop<F, Fut>(rate: u64, total: u64, max_in_flight: usize, mut request: F) -> OpenLoop
where
    F: FnMut(u64, Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0u64;
    let start = Instant::now();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let task = request(i, scheduled);
        tasks.spawn(async move {
            task.await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    let send_window = start.elapsed();
    while tasks.join_next().await.is_some() {}
    OpenLoop { sent: total - skipped, skipped, send_window, elapsed: start.elapsed() }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    ingest: Ingest,
    /// Target deliveries per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Distinct accounts the messages belong to.
    #[arg(long, default_value_t = 20)]
    accounts: usize,
    /// Distinct chats per account.
    #[arg(long, default_value_t = 50)]
    chats: usize,
    /// Share of deliveries that repeat an earlier message id (Unipile retries), 0..1.
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Most requests in flight; a request due while this many are pending is counted
    /// as `skipped` instead of being queued.
    #[arg(long, default_value_t = 5000)]
    max_in_flight: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let poster = args.ingest.poster(args.max_in_flight)?;
    let total = args.rate * args.duration;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let latencies = Arc::new(Mutex::new(report::latency_histogram()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));

    println!("loadgen webhooks: {} deliveries at {}/s to {}", total, args.rate, poster.endpoint);
    let outcome = open_loop(args.rate, total, args.max_in_flight, |i, scheduled| {
        let duplicate = i > 0 && rand::random::<f64>() < args.duplicates;
        let n = if duplicate { rand::random::<u64>() % i } else { i };
        let body = delivery(&run_id, n, args.accounts, args.chats);
        let (poster, latencies, statuses) = (poster.clone(), latencies.clone(), statuses.clone());
        async move {
            let answer = poster.post(body).await;
            report::record(&mut *latencies.lock().await, scheduled.elapsed());
            *statuses.lock().await.entry(answer.to_string()).or_default() += 1;
        }
    })
    .await;
    let elapsed = outcome.elapsed;

    let statuses = statuses.lock().await;
    let accepted: u64 = statuses.iter().filter(|(k, _)| k.starts_with("200")).map(|(_, v)| v).sum();
    println!(
        "sent {} in {:.2}s (target {}/s), all answered after {:.2}s",
        outcome.sent,
        outcome.send_window.as_secs_f64(),
        args.rate,
        elapsed.as_secs_f64()
    );
    println!("achieved: {:.0} answered 200/s", accepted as f64 / elapsed.as_secs_f64());
    println!("statuses: {}", tally(&statuses));
    if outcome.skipped > 0 {
        println!("skipped (over --max-in-flight): {}", outcome.skipped);
    }
    println!("ack latency: {}", report::percentiles(&*latencies.lock().await));
    anyhow::ensure!(accepted > 0, "no delivery was accepted; is ingest running at {}?", args.ingest.url);
    Ok(())
}

/// The n-th delivery of a run: same message id for the same n, so repeats are duplicates.
fn delivery(run_id: &str, n: u64, accounts: usize, chats: usize) -> String {
    let account = n as usize % accounts.max(1);
    let chat = (n as usize / accounts.max(1)) % chats.max(1);
    Received {
        account_id: &format!("acc{account:03}"),
        provider: PROVIDERS[account % PROVIDERS.len()],
        chat_id: &format!("chat{account:03}x{chat:04}"),
        chat,
        message_id: &format!("lg{run_id}n{n}"),
        text: &format!("Load message {n}: are we still on for Thursday?"),
        is_sender: n.is_multiple_of(5),
        n,
    }
    .to_json()
    .to_string()
}

/// The providers deliveries are spread over, by account.
pub const PROVIDERS: [&str; 4] = ["WHATSAPP", "LINKEDIN", "INSTAGRAM", "TELEGRAM"];

/// The parts of a `message_received` delivery that vary; [`Received::to_json`] gives
/// the whole delivery, shaped like `fixtures/unipile/message_received_whatsapp.json`.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub account_id: &'a str,
    pub provider: &'a str,
    pub chat_id: &'a str,
    /// The chat's number: names its contact.
    pub chat: usize,
    pub message_id: &'a str,
    pub text: &'a str,
    pub is_sender: bool,
    /// The delivery's number: makes its provider message id.
    pub n: u64,
}

impl Received<'_> {
    pub fn to_json(&self) -> Value {
        let chat = self.chat;
        json!({
            "event": "message_received",
            "account_id": self.account_id,
            "account_type": self.provider,
            "account_info": {"type": "WHATSAPP", "phone_number": "+14155550123"},
            "webhook_name": "relay-messaging",
            "chat_id": self.chat_id,
            "message_id": self.message_id,
            "message": self.text,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "sender": {
                "attendee_id": format!("att{chat}"),
                "attendee_name": format!("Contact {chat}"),
                "attendee_provider_id": format!("1510555{chat:04}@s.whatsapp.net"),
                "attendee_profile_url": null
            },
            "attendees": [],
            "attachments": [],
            "is_sender": self.is_sender,
            "is_group": false,
            "provider_chat_id": format!("1510555{chat:04}@s.whatsapp.net"),
            "provider_message_id": format!("3EB0{:016X}", self.n),
            "quoted": null
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_keeps_the_shape_it_had() {
        let body: Value = serde_json::from_str(&delivery("r1", 25, 20, 50)).unwrap();
        assert_eq!(body["event"], "message_received");
        assert_eq!(body["account_id"], "acc005");
        assert_eq!(body["account_type"], "LINKEDIN");
        assert_eq!(body["chat_id"], "chat005x0001");
        assert_eq!(body["message_id"], "lgr1n25");
        assert_eq!(body["is_sender"], true);
        assert_eq!(body["sender"]["attendee_name"], "Contact 1");
        assert_eq!(body["provider_message_id"], "3EB00000000000000019");
    }

    #[test]
    fn answers_read_as_before() {
        let accepted = Answer::Http { status: 200, ack: Some("accepted".into()) };
        assert_eq!(accepted.to_string(), "200 accepted");
        assert!(accepted.is("accepted") && !accepted.is("duplicate"));
        assert_eq!(Answer::Http { status: 503, ack: None }.code(), "503");
        assert_eq!(Answer::Timeout.code(), "timeout");
    }
}
