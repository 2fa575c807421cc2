//! `loadgen resume`: a reconnect storm. Many clients that missed the same events
//! reconnect to one fanout replica at once with `?since=`, as they do when another
//! replica stops (close 1012) or a network blip drops them all.
//!
//! It publishes `--missed` events to the stream first, then opens every connection
//! with `since` set just before them and reads each until it has them all. In two
//! steps, to storm a replica started after the events: `--publish-only` publishes and
//! prints the `--since` to give the second run. It reports
//! how long clients took to catch up (from opening the connection to the last missed
//! event), `hello.recovered`, closes by code, whether every client got exactly the
//! missed events in order, fanout's resume outcomes from its `/metrics` (`memory` or
//! `stream`, i.e. served from its window or read from JetStream) and, with `--pid`,
//! its CPU per resume. Run it against a freshly started replica to see a restart's
//! storm. Bounded: 100,000 connections, 100,000 missed events, loopback targets only.
//!
//! ```text
//! loadgen resume --url ws://127.0.0.1:8001/ws/messages --connections 5000 --missed 200
//! loadgen resume --publish-only --missed 200      # then restart the replica, and:
//! loadgen resume --connections 5000 --missed 200 --since <printed>
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::idle::{Target, Tokens, Ws, loopback_target, open_with_hello, source_address};
use crate::publish::{CHAT, PublishArgs, Publisher};
use crate::report::{self, CpuTime};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    publish: PublishArgs,
    /// Events every client missed: published before the clients reconnect.
    #[arg(long, default_value_t = 100)]
    missed: u64,
    /// Only publish the missed events and print the `since` to resume from, so that a
    /// replica can be (re)started after them before the storm.
    #[arg(long, conflicts_with = "since")]
    publish_only: bool,
    /// Resume from here instead of publishing first: the `--missed` events after it
    /// are the ones a `--publish-only` run published.
    #[arg(long)]
    since: Option<u64>,
    /// fanout's process id, to report its CPU time per resume.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to wait for every client to catch up (at most 600).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// How one client's resume went.
#[derive(Debug)]
enum Outcome {
    /// Got every missed event; `in_order` is false on a gap, duplicate or reordering.
    CaughtUp { took: Duration, recovered: bool, in_order: bool, ws: Box<Ws> },
    /// The server closed the connection first (with this code, 0 for none).
    Closed { code: u16, recovered: bool },
    /// No connection, no hello, or the deadline passed.
    Failed(String),
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.target.connections > 100_000 || args.missed > 100_000 {
        bail!("--connections and --missed are capped at 100000");
    }
    let addr = loopback_target(&args.target.url).await?;
    let seqs = match args.since {
        Some(since) => (since + 1..=since + args.missed.max(1)).collect(),
        None => publish(&args).await?,
    };
    let since = seqs[0] - 1;
    if args.publish_only {
        println!("published {} events; resume with --since {since} --missed {}", seqs.len(), seqs.len());
        return Ok(());
    }
    let expected = Arc::new(seqs);

    let metrics_url = format!("http://{addr}/metrics");
    let resumes_before = resume_outcomes(&metrics_url).await;
    let cpu_before = args.pid.map(|pid| CpuTime::of(&pid.to_string())).transpose()?;
    let tokens = Tokens::new(&args.target);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout.min(600));
    let gate = Arc::new(Semaphore::new(args.target.concurrency.max(1)));
    let missed = expected.len();
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..args.target.connections {
        let permit = gate.clone().acquire_owned().await.expect("semaphore is never closed");
        let url = format!("{}&since={since}", tokens.url(i));
        let (source, expected) = (source_address(&args.target, i), expected.clone());
        clients.spawn(async move {
            let opened = Instant::now();
            let hello = tokio::time::timeout_at(deadline, open_with_hello(&url, source, addr)).await;
            drop(permit);
            let (ws, hello) = match hello {
                Ok(Ok(opened)) => opened,
                Ok(Err(e)) => return Outcome::Failed(format!("{e:#}")),
                Err(_) => return Outcome::Failed("timed out opening".into()),
            };
            let recovered = hello.contains("\"recovered\":true");
            match tokio::time::timeout_at(deadline, catch_up(ws, expected, recovered, opened)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed("timed out catching up".into()),
            }
        });
    }
    let mut took = report::latency_histogram();
    let (mut recovered, mut not_recovered, mut out_of_order) = (0u64, 0u64, 0u64);
    let mut closes: BTreeMap<u16, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut held = Vec::new();
    while let Some(outcome) = clients.join_next().await {
        match outcome.context("client task")? {
            Outcome::CaughtUp { took: t, recovered: r, in_order, ws } => {
                report::record(&mut took, t);
                if r {
                    recovered += 1
                } else {
                    not_recovered += 1
                }
                out_of_order += u64::from(!in_order);
                held.push(ws);
            }
            Outcome::Closed { code, recovered: r } => {
                *closes.entry(code).or_default() += 1;
                if r { recovered += 1 } else { not_recovered += 1 }
            }
            Outcome::Failed(why) => *failures.entry(why).or_default() += 1,
        }
    }
    let storm = started.elapsed();
    let cpu = match (args.pid, cpu_before) {
        (Some(pid), Some(before)) => Some((CpuTime::of(&pid.to_string())?, before)),
        _ => None,
    };
    let resumes_after = resume_outcomes(&metrics_url).await;

    println!(
        "resume storm: {} of {} clients caught up on {missed} missed events in {:.2}s",
        held.len(),
        args.target.connections,
        storm.as_secs_f64()
    );
    println!("time to catch up (open to last missed event): {}", report::percentiles(&took));
    println!("hello.recovered: {recovered} true, {not_recovered} false");
    println!(
        "every caught-up client got exactly the missed events in order: {}",
        if out_of_order == 0 { "yes".to_owned() } else { format!("NO ({out_of_order} clients)") }
    );
    if !closes.is_empty() {
        println!("closed by the server before catching up, by code: {closes:?}");
    }
    for (why, count) in &failures {
        println!("failed: {count} × {why}");
    }
    match (resumes_before, resumes_after) {
        (Some(before), Some(after)) => {
            let delta: BTreeMap<_, _> = after
                .iter()
                .map(|(outcome, n)| (outcome.as_str(), n - before.get(outcome).copied().unwrap_or(0.0)))
                .filter(|(_, n)| *n > 0.0)
                .collect();
            println!("fanout resumes by outcome (from its /metrics): {delta:?}");
        }
        _ => println!("fanout resumes by outcome: {metrics_url} not readable"),
    }
    if let Some((after, before)) = cpu {
        println!("fanout: {}", after.per_item_since(before, args.target.connections as u64, "resume"));
    }
    drop(held);
    Ok(())
}

/// Publishes the missed events; returns their sequences (one after another unless
/// something else publishes to the stream meanwhile).
async fn publish(args: &Args) -> anyhow::Result<Vec<u64>> {
    let publisher = Publisher::connect(&args.publish).await?;
    let mut seqs = Vec::with_capacity(args.missed as usize);
    for i in 0..args.missed.max(1) {
        let ack = publisher.publish(json!({ "i": i })).await?;
        seqs.push(ack.await.context("publish acknowledged")?.sequence);
    }
    if seqs.windows(2).any(|pair| pair[1] != pair[0] + 1) {
        bail!("something else published to the stream meanwhile; its events would interleave with these");
    }
    println!("published {} events (seq {}..={})", seqs.len(), seqs[0], seqs[seqs.len() - 1]);
    Ok(seqs)
}

/// Reads events after `hello` until the client has every missed one (`expected`, in
/// order); other accounts' events in between are skipped.
async fn catch_up(mut ws: Ws, expected: Arc<Vec<u64>>, recovered: bool, opened: Instant) -> Outcome {
    let (mut got, mut in_order) = (0usize, true);
    let last = *expected.last().expect("at least one event");
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let text = text.as_str();
                let Some(seq) = seq_of(text) else { continue };
                if text.contains(CHAT) {
                    in_order &= expected.get(got) == Some(&seq);
                    got += 1;
                }
                if seq >= last {
                    in_order &= got == expected.len();
                    return Outcome::CaughtUp {
                        took: opened.elapsed(),
                        recovered,
                        in_order,
                        ws: Box::new(ws),
                    };
                }
            }
            Ok(Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(0);
                return Outcome::Closed { code, recovered };
            }
            Err(e) => return Outcome::Failed(format!("reading: {e}")),
            Ok(_) => {}
        }
    }
    Outcome::Closed { code: 0, recovered }
}

/// The `seq` of an event frame.
fn seq_of(text: &str) -> Option<u64> {
    let start = text.find("\"seq\":")? + "\"seq\":".len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// `fanout_resumes_total` by outcome, from a Prometheus text page.
async fn resume_outcomes(url: &str) -> Option<BTreeMap<String, f64>> {
    Some(parse_resume_outcomes(&report::scrape(url).await?))
}

fn parse_resume_outcomes(body: &str) -> BTreeMap<String, f64> {
    report::samples(body, "fanout_resumes_total")
        .iter()
        .filter_map(|s| Some((s.label("outcome")?.to_owned(), s.value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_outcomes_are_read_from_prometheus_text() {
        let body = "# TYPE fanout_resumes_total counter\n\
                    fanout_resumes_total{outcome=\"memory\"} 12\n\
                    fanout_resumes_total{outcome=\"stream\"} 3\n\
                    fanout_frames_out_total 99\n";
        let outcomes = parse_resume_outcomes(body);
        assert_eq!(outcomes.get("memory"), Some(&12.0));
        assert_eq!(outcomes.get("stream"), Some(&3.0));
        assert_eq!(outcomes.len(), 2);
    }

    #[test]
    fn the_seq_is_read_from_an_event_frame() {
        assert_eq!(seq_of(r#"{"id":"e","seq":42,"type":"message:new"}"#), Some(42));
        assert_eq!(seq_of(r#"{"type":"pong"}"#), None);
    }
}
