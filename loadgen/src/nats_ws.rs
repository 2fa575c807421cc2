//! `loadgen nats-ws`: the peer to compare fanout with, nats-server's own WebSocket
//! listener, measured the way `idle` and `broadcast` measure fanout.
//!
//! Each client opens a WebSocket to the listener and speaks the NATS protocol over it
//! (`CONNECT`, `SUB`, `PING`/`PONG`, `MSG`), subscribed to one subject. With `--pid`
//! (nats-server's) it reports the server's resident memory per connection once all are
//! open; then it publishes `--events` events at `--rate` per second on that subject
//! with a plain NATS client (each carrying its publish time), and reports delivery
//! latency over every frame and until the last client had each event. Nothing here
//! checks tokens, scopes accounts, stores or resumes: it is the bare server.
//!
//! ```text
//! nats-server -c ws.conf      # websocket { listen: "127.0.0.1:18090", no_tls: true }
//! loadgen nats-ws --url ws://127.0.0.1:18090 --connections 10000 --rate 1 --events 15 \
//!   --pid $(pgrep -f 'nats-server -c ws.conf')
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::idle::{Ws, handshake, loopback_target, rss_kib};
use crate::publish::nats_is_loopback;
use crate::report::{self, now_us};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// nats-server's WebSocket listener (`websocket { listen: .., no_tls: true }`).
    #[arg(long, default_value = "ws://127.0.0.1:18090")]
    url: String,
    /// The same server's NATS port, where the events are published.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Subject every client subscribes to.
    #[arg(long, default_value = "bench.peers")]
    subject: String,
    /// Connections to open (at most 100,000).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1 and up).
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Events to publish once all are open (0: only the memory figure).
    #[arg(long, default_value_t = 15)]
    events: u64,
    /// Events per second.
    #[arg(long, default_value_t = 1)]
    rate: u64,
    /// Padding in each event, in bytes (loadgen broadcast's default is 200).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// nats-server's process id, for its memory per connection.
    #[arg(long)]
    pid: Option<u32>,
}

/// What every reader records.
struct Shared {
    frames: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
    /// Per event, its slowest delivery (microseconds).
    slowest: Vec<AtomicU64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.connections > 100_000 {
        bail!("--connections is capped at 100000");
    }
    let events = args.events.min(100_000);
    let addr = loopback_target(&args.url).await?;
    nats_is_loopback(&args.nats_url).await?;
    let rss_before = args.pid.map(rss_kib).transpose()?;
    let shared = Arc::new(Shared {
        frames: AtomicU64::new(0),
        latencies: Mutex::new(report::latency_histogram()),
        slowest: (0..events).map(|_| AtomicU64::new(0)).collect(),
    });
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut handshakes = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let octet = 1 + (i % args.source_ips.max(1) as usize) as u8;
        let source = SocketAddr::from(([127, 0, 0, octet], 0));
        let permit = gate.clone().acquire_owned().await.expect("semaphore is never closed");
        let (url, subject) = (args.url.clone(), args.subject.clone());
        handshakes.spawn(async move {
            let opened =
                tokio::time::timeout(Duration::from_secs(30), open(&url, source, addr, &subject)).await;
            drop(permit);
            opened.unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out")))
        });
    }
    let mut readers = Vec::with_capacity(args.connections);
    let (mut failures, mut first_error) = (0, None);
    while let Some(result) = handshakes.join_next().await {
        match result.expect("handshake task") {
            Ok((ws, rest)) => readers.push(tokio::spawn(read(ws, rest, shared.clone()))),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("first connection error: {e:#}");
    }
    println!(
        "loadgen nats-ws: {} connections open ({failures} failed) in {:.1}s to {}",
        readers.len(),
        started.elapsed().as_secs_f64(),
        args.url
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(pid), Some(before)) = (args.pid, rss_before) {
        let after = rss_kib(pid)?;
        let per = after.saturating_sub(before) as f64 * 1024.0 / readers.len().max(1) as f64;
        println!(
            "nats-server pid {pid}: VmRSS {before} KiB -> {after} KiB; {per:.0} bytes ({:.2} KiB) per connection",
            per / 1024.0
        );
    }
    if events > 0 {
        let client = async_nats::connect(args.nats_url.as_str())
            .await
            .with_context(|| format!("connecting to {}", args.nats_url))?;
        let padding = "x".repeat(args.payload_bytes);
        let interval = Duration::from_secs_f64(1.0 / args.rate.clamp(1, 100_000) as f64);
        let frames_before = shared.frames.load(Ordering::Relaxed);
        println!("publishing {events} events at {}/s to {}", args.rate, args.subject);
        let start = Instant::now();
        for i in 0..events {
            tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
            let body = format!(r#"{{"t_us":{},"i":{i},"pad":"{padding}"}}"#, now_us());
            client.publish(args.subject.clone(), body.into()).await.context("publishing")?;
        }
        client.flush().await.context("flushing")?;
        let expected = events * readers.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.frames.load(Ordering::Relaxed) - frames_before < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let frames = shared.frames.load(Ordering::Relaxed) - frames_before;
        println!("frames out: {frames}/{expected}");
        let every = shared.latencies.lock().unwrap_or_else(|p| p.into_inner());
        println!("delivery latency (every frame): {}", report::percentiles(&every));
        let mut last = report::latency_histogram();
        for slot in &shared.slowest {
            let us = slot.load(Ordering::Relaxed);
            if us > 0 {
                report::record(&mut last, Duration::from_micros(us));
            }
        }
        println!("time until the last client had an event: {}", report::percentiles(&last));
    }
    for reader in &readers {
        reader.abort();
    }
    Ok(())
}

/// Opens one client: WebSocket handshake, the server's INFO, then CONNECT, SUB and a
/// PING answered by PONG (so the subscription is in place). Returns what was read past
/// the PONG.
async fn open(
    url: &str,
    source: SocketAddr,
    addr: SocketAddr,
    subject: &str,
) -> anyhow::Result<(Ws, Vec<u8>)> {
    let mut ws = handshake(url, source, addr).await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"name\":\"loadgen\"}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    ws.send(Message::Binary(hello.into_bytes().into())).await.context("sending CONNECT")?;
    let mut buffer = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(bytes))) => buffer.extend_from_slice(&bytes),
            Some(Ok(Message::Text(text))) => buffer.extend_from_slice(text.as_bytes()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading the handshake"),
            None => bail!("closed during the handshake"),
        }
        if let Some(at) = find(&buffer, b"PONG\r\n") {
            let rest = buffer.split_off(at + 6);
            return Ok((ws, rest));
        }
        if let Some(at) = find(&buffer, b"-ERR") {
            bail!("server refused: {}", String::from_utf8_lossy(&buffer[at..]));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads the NATS protocol off the socket: records each `MSG`'s latency, answers the
/// server's `PING`s.
async fn read(mut ws: Ws, mut buffer: Vec<u8>, shared: Arc<Shared>) {
    loop {
        while let Some(step) = parse(&buffer) {
            match step {
                Parsed::Msg { payload, used } => {
                    let text = std::str::from_utf8(&buffer[payload]).unwrap_or_default();
                    record(text, &shared);
                    buffer.drain(..used);
                }
                Parsed::Ping { used } => {
                    buffer.drain(..used);
                    if ws.send(Message::Binary(b"PONG\r\n".to_vec().into())).await.is_err() {
                        return;
                    }
                }
                Parsed::Other { used } => {
                    buffer.drain(..used);
                }
            }
        }
        match ws.next().await {
            Some(Ok(Message::Binary(bytes))) => buffer.extend_from_slice(&bytes),
            Some(Ok(Message::Text(text))) => buffer.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            Some(Ok(_)) => {}
        }
    }
}

fn record(text: &str, shared: &Shared) {
    let field = |name: &str| -> Option<u64> {
        let start = text.find(name)? + name.len();
        let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
        text[start..start + digits].parse().ok()
    };
    let (Some(sent), Some(i)) = (field("\"t_us\":"), field("\"i\":")) else { return };
    let latency = now_us().saturating_sub(sent);
    shared.frames.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = shared.slowest.get(i as usize) {
        slot.fetch_max(latency, Ordering::Relaxed);
    }
    let mut h = shared.latencies.lock().unwrap_or_else(|p| p.into_inner());
    report::record(&mut h, Duration::from_micros(latency));
}

/// One protocol operation at the start of the buffer.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// `MSG <subject> <sid> [reply] <bytes>\r\n<payload>\r\n`.
    Msg {
        payload: std::ops::Range<usize>,
        used: usize,
    },
    Ping {
        used: usize,
    },
    /// `PONG`, `+OK`, `INFO ..`, `-ERR ..`: a line to skip.
    Other {
        used: usize,
    },
}

/// The first complete operation in `buffer`, or `None` until more arrives.
fn parse(buffer: &[u8]) -> Option<Parsed> {
    let line_end = find(buffer, b"\r\n")?;
    let line = &buffer[..line_end];
    if line.starts_with(b"MSG ") {
        let size: usize = std::str::from_utf8(line).ok()?.rsplit(' ').next()?.parse().ok()?;
        let start = line_end + 2;
        let used = start + size + 2;
        return (buffer.len() >= used).then_some(Parsed::Msg { payload: start..start + size, used });
    }
    if line == b"PING" {
        return Some(Parsed::Ping { used: line_end + 2 });
    }
    Some(Parsed::Other { used: line_end + 2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_split_across_frames_is_parsed_once_whole() {
        let whole = b"MSG bench.peers 1 10\r\n{\"t_us\":1}\r\nPING\r\n";
        assert_eq!(parse(&whole[..20]), None);
        assert_eq!(parse(&whole[..30]), None);
        assert_eq!(parse(whole), Some(Parsed::Msg { payload: 22..32, used: 34 }));
        assert_eq!(parse(&whole[34..]), Some(Parsed::Ping { used: 6 }));
        assert_eq!(parse(b"+OK\r\n"), Some(Parsed::Other { used: 5 }));
    }
}
