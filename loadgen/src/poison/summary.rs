//! The end-of-run report: clean deliveries lost, duplicated or refused (what fails the
//! check), what the clients saw of the poisoned ones, latency, and ingest's outbox
//! publish lag.

use std::collections::BTreeMap;
use std::time::Duration;

use super::clients::ClientLog;
use super::{Kind, Sent};
use crate::report;
use crate::webhooks::tally;

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
pub(super) struct Report<'a> {
    sent: &'a [Sent],
    logs: &'a [ClientLog],
}

impl<'a> Report<'a> {
    pub(super) fn new(sent: &'a [Sent], logs: &'a [ClientLog]) -> Self {
        Self { sent, logs }
    }

    /// Prints the report; returns what fails the check: clean deliveries answered other
    /// than 200 or lost, duplicates.
    pub(super) fn print(&self) -> Vec<String> {
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
pub(super) fn print_outbox_lag(before: Option<&str>, after: Option<&str>, url: &str) {
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

/// `http://host:port/metrics` of the fanout replica at a `ws://host:port/...` URL.
pub(super) fn fanout_metrics_url(ws_url: &str) -> String {
    let rest = ws_url.strip_prefix("ws://").unwrap_or(ws_url);
    format!("http://{}/metrics", rest.split('/').next().unwrap_or_default())
}

/// Every page that could be read, in order.
pub(super) async fn scrape_all(urls: &[String]) -> Vec<String> {
    let mut pages = Vec::with_capacity(urls.len());
    for url in urls {
        if let Some(page) = report::scrape(url).await {
            pages.push(page);
        }
    }
    pages
}

/// Where the end-to-end time goes, stage by stage, from the services' own histograms
/// over the run (bucket deltas between the scrapes before and after; fanout's summed
/// over the replicas).
pub(super) fn print_stages(ingest: (Option<&str>, Option<&str>), fanout: (&[String], &[String])) {
    println!("per stage, from the services' histograms over the run (p50/p99 interpolated in buckets):");
    let (ingest_before, ingest_after): (Vec<&str>, Vec<&str>) =
        (ingest.0.into_iter().collect(), ingest.1.into_iter().collect());
    let fanout_before: Vec<&str> = fanout.0.iter().map(String::as_str).collect();
    let fanout_after: Vec<&str> = fanout.1.iter().map(String::as_str).collect();
    let stages: [(&str, &str, &[&str], &[&str]); 5] = [
        ("ack (ingest: request in to 200 out)", "webhook_ack_seconds", &ingest_before, &ingest_after),
        ("commit (ingest: one group commit)", "ingest_batch_commit_seconds", &ingest_before, &ingest_after),
        (
            "publish (ingest: transaction start to JetStream ack)",
            "outbox_publish_lag_seconds",
            &ingest_before,
            &ingest_after,
        ),
        (
            "stream (fanout: stored in JetStream to taken by the follower)",
            "fanout_stream_lag_seconds",
            &fanout_before,
            &fanout_after,
        ),
        (
            "fanout write (fanout: taken to flushed to a client's socket)",
            "fanout_write_seconds",
            &fanout_before,
            &fanout_after,
        ),
    ];
    for (name, metric, before, after) in stages {
        match report::stage_between(before, after, metric) {
            Some(line) => println!("  {name}: {line}"),
            None => println!("  {name}: nothing counted ({metric} not read)"),
        }
    }
}
