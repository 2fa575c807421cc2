//! `loadgen broadcast`: events published straight to NATS, fanned out by one fanout
//! replica to many WebSocket clients; reports events/s in, frames/s out and delivery
//! latency percentiles across all clients.
//!
//! Each event carries its publish time in microseconds (`data.t_us`); every client
//! records `receive time - t_us` in one shared HDR histogram. Beside them: the same
//! latency for a plain NATS subscriber (how much is NATS's), loadgen's own CPU per
//! frame, and with `--pid` fanout's. `loadgen floor` is the baseline to compare with.
//! Bounded: at most 600 seconds of publishing, 100,000 connections, loopback targets
//! only.
//!
//! ```text
//! loadgen broadcast --connections 10000 --rate 10 --duration 30 \
//!   --nats-url nats://127.0.0.1:4222 --subject-prefix relay.events
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::idle::{Counters, Target, connect_many};
use crate::publish::{PublishArgs, Publisher};
use crate::report::{self, CpuTime, now_us};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    publish: PublishArgs,
    /// Events published per second.
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Seconds of publishing (at most 600).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// fanout's process id, to report its CPU time per frame out.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to wait before publishing, once every connection is open.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds to wait for the last deliveries after publishing ends.
    #[arg(long, default_value_t = 10)]
    drain: u64,
}

/// A number field of an event frame, found without parsing the whole frame.
pub(crate) fn number_field(text: &str, field: &str) -> Option<u64> {
    let start = text.find(field)? + field.len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// The publish time an event frame carries.
pub(crate) fn sent_us(text: &str) -> Option<u64> {
    number_field(text, "\"t_us\":")
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let duration = args.duration.min(600);
    let rate = args.rate.clamp(1, 100_000);
    let total = rate * duration;
    let publisher = Publisher::connect(&args.publish).await?;
    let latencies = Arc::new(Mutex::new(report::latency_histogram()));
    let counters = Arc::new(Counters::default());
    let last_frame = Arc::new(AtomicU64::new(0));
    // Per event: the latency of its slowest delivery, i.e. when the last client got it.
    let slowest: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let on_text = {
        let (latencies, last_frame, slowest) = (latencies.clone(), last_frame.clone(), slowest.clone());
        move |text: &str| {
            if let Some(sent) = sent_us(text) {
                let now = now_us();
                last_frame.fetch_max(now, Ordering::Relaxed);
                if let Some(slot) = number_field(text, "\"i\":").and_then(|i| slowest.get(i as usize)) {
                    slot.fetch_max(now.saturating_sub(sent), Ordering::Relaxed);
                }
                let mut h = latencies.lock().unwrap_or_else(|p| p.into_inner());
                report::record(&mut h, Duration::from_micros(now.saturating_sub(sent)));
            }
        }
    };
    let started = Instant::now();
    let (opened, failures) = connect_many(&args.target, counters.clone(), on_text).await?;
    println!(
        "loadgen broadcast: {} connections open ({} failed) in {:.1}s",
        opened.len(),
        failures,
        started.elapsed().as_secs_f64()
    );

    let subject = publisher.subject.clone();
    // A plain NATS subscriber beside the clients: how much of the latency is NATS's.
    let nats_hop = Arc::new(Mutex::new(report::latency_histogram()));
    let mut hop_subscriber =
        publisher.client.subscribe(subject.clone()).await.context("subscribing to the subject")?;
    let hop_reader = tokio::spawn({
        let nats_hop = nats_hop.clone();
        async move {
            while let Some(message) = futures::StreamExt::next(&mut hop_subscriber).await {
                if let Some(sent) = std::str::from_utf8(&message.payload).ok().and_then(sent_us) {
                    let latency = Duration::from_micros(now_us().saturating_sub(sent));
                    report::record(&mut nats_hop.lock().unwrap_or_else(|p| p.into_inner()), latency);
                }
            }
        }
    });
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let failed_publishes = Arc::new(AtomicU64::new(0));
    let mut acks = tokio::task::JoinSet::new();
    // Let both sides settle after the connection wave, so the first event measures
    // fan-out, not the tail of the handshakes.
    tokio::time::sleep(Duration::from_secs(args.warmup.min(60))).await;
    let frames_before = counters.frames.load(Ordering::Relaxed);
    let fanout_pid = args.pid.map(|pid| pid.to_string());
    let fanout_cpu_before = fanout_pid.as_deref().map(CpuTime::of).transpose()?;
    let own_cpu_before = CpuTime::of("self")?;
    println!("publishing {total} events at {rate}/s to {subject}");
    let start = Instant::now();
    let start_us = now_us();
    for i in 0..total {
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        match publisher.publish(json!({"t_us": now_us(), "i": i})).await {
            Ok(ack) => {
                let failed = failed_publishes.clone();
                acks.spawn(async move {
                    if ack.await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Err(_) => {
                failed_publishes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let publish_time = start.elapsed();
    while acks.join_next().await.is_some() {}

    let expected = total * opened.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(args.drain);
    while counters.frames.load(Ordering::Relaxed) - frames_before < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let frames = counters.frames.load(Ordering::Relaxed) - frames_before;
    let own_cpu = CpuTime::of("self")?.per_item_since(own_cpu_before, frames, "frame");
    let fanout_cpu = match (fanout_pid.as_deref(), fanout_cpu_before) {
        (Some(pid), Some(before)) => Some(CpuTime::of(pid)?.per_item_since(before, frames, "frame")),
        _ => None,
    };
    let span =
        Duration::from_micros(last_frame.load(Ordering::Relaxed).saturating_sub(start_us)).max(publish_time);
    let h = latencies.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "events in: {total} in {:.2}s ({:.0}/s), {} publish failures",
        publish_time.as_secs_f64(),
        total as f64 / publish_time.as_secs_f64().max(1e-9),
        failed_publishes.load(Ordering::Relaxed)
    );
    println!(
        "frames out: {frames}/{expected} ({:.3}% delivered) in {:.2}s = {:.0} frames/s",
        100.0 * frames as f64 / expected.max(1) as f64,
        span.as_secs_f64(),
        frames as f64 / span.as_secs_f64().max(1e-9)
    );
    println!("delivery latency (every frame): {}", report::percentiles(&h));
    hop_reader.abort();
    println!(
        "publish to a plain NATS subscriber: {}",
        report::percentiles(&nats_hop.lock().unwrap_or_else(|p| p.into_inner()))
    );
    let mut complete = report::latency_histogram();
    for slot in slowest.iter() {
        let us = slot.load(Ordering::Relaxed);
        if us > 0 {
            report::record(&mut complete, Duration::from_micros(us));
        }
    }
    println!("time until the last client had an event: {}", report::percentiles(&complete));
    if let Some(fanout_cpu) = fanout_cpu {
        println!("fanout: {fanout_cpu}");
    }
    println!("loadgen itself (clients and publisher): {own_cpu}");
    println!("connections closed by the server: {}", counters.closed.load(Ordering::Relaxed));
    for conn in &opened {
        conn.reader.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_time_is_read_from_the_frame() {
        assert_eq!(sent_us(r#"{"seq":1,"data":{"t_us":1234,"i":0}}"#), Some(1234));
        assert_eq!(sent_us(r#"{"type":"pong"}"#), None);
        assert_eq!(number_field(r#"{"data":{"t_us":1,"i":42}}"#, "\"i\":"), Some(42));
    }
}
