//! `loadgen webhooks`: an open-loop webhook driver for ingest.
//!
//! Sends `message_received` deliveries shaped like Unipile's at a fixed rate for a fixed
//! time. Each request has a scheduled start; latency is measured from that schedule,
//! not from when a busy client got round to sending it, so a slow server shows up as
//! latency instead of as a quietly lower rate (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

use crate::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of ingest.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The Unipile-Auth secret ingest expects.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight)
        .timeout(Duration::from_secs(30))
        .build()?;
    let endpoint = format!("{}/api/webhooks/unipile/messages", args.url.trim_end_matches('/'));
    let total = args.rate * args.duration;
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let latencies = Arc::new(Mutex::new(report::latency_histogram()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let in_flight = Arc::new(Semaphore::new(args.max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0u64;

    println!("loadgen webhooks: {} deliveries at {}/s to {endpoint}", total, args.rate);
    let start = Instant::now();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let duplicate = i > 0 && rand::random::<f64>() < args.duplicates;
        let n = if duplicate { rand::random::<u64>() % i } else { i };
        let body = delivery(&run_id, n, args.accounts, args.chats);
        let request = client
            .post(&endpoint)
            .header("Unipile-Auth", &args.secret)
            .header("Content-Type", "application/json")
            .body(body);
        let (latencies, statuses) = (latencies.clone(), statuses.clone());
        tasks.spawn(async move {
            let outcome = match request.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body: serde_json::Value = resp.json().await.unwrap_or_default();
                    match body["status"].as_str() {
                        Some(s) => format!("{status} {s}"),
                        None => status.to_string(),
                    }
                }
                Err(e) if e.is_timeout() => "timeout".to_owned(),
                Err(_) => "connect error".to_owned(),
            };
            report::record(&mut *latencies.lock().await, scheduled.elapsed());
            *statuses.lock().await.entry(outcome).or_default() += 1;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    let send_window = start.elapsed();
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();

    let statuses = statuses.lock().await;
    let accepted: u64 = statuses.iter().filter(|(k, _)| k.starts_with("200")).map(|(_, v)| v).sum();
    println!(
        "sent {} in {:.2}s (target {}/s), all answered after {:.2}s",
        total - skipped,
        send_window.as_secs_f64(),
        args.rate,
        elapsed.as_secs_f64()
    );
    println!("achieved: {:.0} answered 200/s", accepted as f64 / elapsed.as_secs_f64());
    println!("statuses: {}", statuses.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
    if skipped > 0 {
        println!("skipped (over --max-in-flight): {skipped}");
    }
    println!("ack latency: {}", report::percentiles(&*latencies.lock().await));
    anyhow::ensure!(accepted > 0, "no delivery was accepted; is ingest running at {}?", args.url);
    Ok(())
}

/// The n-th delivery of a run: same message id for the same n, so repeats are duplicates.
fn delivery(run_id: &str, n: u64, accounts: usize, chats: usize) -> String {
    let account = n as usize % accounts.max(1);
    let chat = (n as usize / accounts.max(1)) % chats.max(1);
    let is_sender = n.is_multiple_of(5);
    let provider = ["WHATSAPP", "LINKEDIN", "INSTAGRAM", "TELEGRAM"][account % 4];
    json!({
        "event": "message_received",
        "account_id": format!("acc{account:03}"),
        "account_type": provider,
        "account_info": {"type": "WHATSAPP", "phone_number": "+14155550123"},
        "webhook_name": "relay-messaging",
        "chat_id": format!("chat{account:03}x{chat:04}"),
        "message_id": format!("lg{run_id}n{n}"),
        "message": format!("Load message {n}: are we still on for Thursday?"),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "sender": {
            "attendee_id": format!("att{chat}"),
            "attendee_name": format!("Contact {chat}"),
            "attendee_provider_id": format!("1510555{chat:04}@s.whatsapp.net"),
            "attendee_profile_url": null
        },
        "attendees": [],
        "attachments": [],
        "is_sender": is_sender,
        "is_group": false,
        "provider_chat_id": format!("1510555{chat:04}@s.whatsapp.net"),
        "provider_message_id": format!("3EB0{n:016X}"),
        "quoted": null
    })
    .to_string()
}
