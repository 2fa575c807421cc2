//! Latency recording and the summary lines every mode prints.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Wall-clock microseconds since the epoch: what a sender stamps into a message and a
/// receiver subtracts from (both on this machine, so the clocks agree).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
    h.record(micros).expect("value is clamped into bounds");
}

/// `p50=1.20ms p90=... p99=... max=...` for a histogram of microseconds.
pub fn percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms (n={})",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// Fetches a Prometheus text page (`/metrics`); `None` if it cannot be read.
pub async fn scrape(url: &str) -> Option<String> {
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().ok()?;
    client.get(url).send().await.ok()?.error_for_status().ok()?.text().await.ok()
}

/// One sample of a metric in a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub labels: Vec<(&'a str, &'a str)>,
    pub value: f64,
}

impl<'a> Sample<'a> {
    pub fn label(&self, name: &str) -> Option<&'a str> {
        self.labels.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

/// The samples of `metric` (exactly that name) in a Prometheus text page. Label values
/// are taken as written (escapes are not undone).
pub fn samples<'a>(page: &'a str, metric: &str) -> Vec<Sample<'a>> {
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (mut labels_text, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let mut labels = Vec::new();
            while let Some((key, rest)) = labels_text.split_once("=\"") {
                let (value, rest) = rest.split_once('"')?;
                labels.push((key.trim_start_matches(',').trim(), value));
                labels_text = rest;
            }
            Some(Sample { labels, value: value.split_whitespace().next()?.parse().ok()? })
        })
        .collect()
}

/// A histogram's cumulative bucket counts by upper bound (`le`), from a Prometheus page.
pub fn buckets(page: &str, histogram: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = samples(page, &format!("{histogram}_bucket"))
        .iter()
        .filter_map(|s| Some((s.label("le")?.parse().ok()?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of what a histogram counted between two scrapes, from their
/// cumulative buckets, interpolated inside its bucket as Prometheus'
/// `histogram_quantile` does. Returns the estimate and the bucket's upper bound;
/// `None` if nothing was counted in between.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<(f64, f64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let earlier = before.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, n)| *n);
            (le, n - earlier)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some((lower, le));
            }
            let share = if count > below { (rank - below) / (count - below) } else { 1.0 };
            return Some((lower + (le - lower) * share, le));
        }
        (lower, below) = (le, count);
    }
    None
}

/// A histogram's cumulative buckets summed over all its label sets and over several
/// pages (one per replica), by upper bound.
pub fn summed_buckets(pages: &[&str], histogram: &str) -> Vec<(f64, f64)> {
    let mut summed: Vec<(f64, f64)> = Vec::new();
    for page in pages {
        for sample in samples(page, &format!("{histogram}_bucket")) {
            let Some(le) = sample.label("le").and_then(|le| le.parse::<f64>().ok()) else { continue };
            match summed.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += sample.value,
                None => summed.push((le, sample.value)),
            }
        }
    }
    summed.sort_by(|a, b| a.0.total_cmp(&b.0));
    summed
}

/// A histogram's `_sum` and `_count` summed over label sets and pages.
fn summed_total(pages: &[&str], histogram: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        pages.iter().flat_map(|p| samples(p, &format!("{histogram}{suffix}"))).map(|s| s.value).sum()
    };
    (total("_sum"), total("_count"))
}

/// `mean 1.2ms, p50 ≈ 0.9ms, p99 ≈ 4.1ms (n=1000)` for what a histogram (in seconds)
/// counted between two sets of scrapes; percentiles are interpolated inside the
/// buckets, so approximate. `None` when nothing was counted.
pub fn stage_between(before: &[&str], after: &[&str], histogram: &str) -> Option<String> {
    let (b, a) = (summed_buckets(before, histogram), summed_buckets(after, histogram));
    let (sum_b, count_b) = summed_total(before, histogram);
    let (sum_a, count_a) = summed_total(after, histogram);
    let count = count_a - count_b;
    if count <= 0.0 {
        return None;
    }
    let ms = |q: f64| {
        quantile_between(&b, &a, q).map_or("?".to_owned(), |(v, le)| {
            if le.is_infinite() { format!("> {:.1}ms", v * 1000.0) } else { format!("{:.1}ms", v * 1000.0) }
        })
    };
    Some(format!(
        "mean {:.2}ms, p50 ≈ {}, p99 ≈ {} (n={count})",
        (sum_a - sum_b) / count * 1000.0,
        ms(0.5),
        ms(0.99)
    ))
}

/// CPU time a process has used so far, user and system, from `/proc/<pid>/stat`
/// (`self` for this process).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn of(pid: &str) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        Self::parse(&stat).ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat format"))
    }

    /// Fields 14 and 15 (utime, stime) in clock ticks, counted after the `)` that ends
    /// the command name (which may itself hold spaces). Linux reports them in USER_HZ,
    /// which is 100 on every architecture it runs on.
    fn parse(stat: &str) -> Option<Self> {
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
        let ticks = |t: &str| t.parse::<u64>().ok().map(|t| Duration::from_millis(t * 10));
        Some(Self { user: ticks(fields.next()?)?, system: ticks(fields.next()?)? })
    }

    /// `12.3 µs of CPU per frame (user 4.1, system 8.2)` for the time since `before`.
    pub fn per_item_since(&self, before: CpuTime, items: u64, item: &str) -> String {
        let items = items.max(1) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / items;
        let (user, system) =
            (self.user.saturating_sub(before.user), self.system.saturating_sub(before.system));
        format!(
            "{:.1} µs of CPU per {item} (user {:.1}, system {:.1})",
            us(user + system),
            us(user),
            us(system)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 0 0";
        let cpu = CpuTime::parse(stat).unwrap();
        assert_eq!(cpu.user, Duration::from_millis(2500));
        assert_eq!(cpu.system, Duration::from_millis(750));
        let later = CpuTime { user: Duration::from_millis(3500), system: Duration::from_millis(1750) };
        assert_eq!(
            later.per_item_since(cpu, 1000, "frame"),
            "2000.0 µs of CPU per frame (user 1000.0, system 1000.0)"
        );
    }

    #[test]
    fn samples_are_read_with_their_labels() {
        let page = "# TYPE x_total counter\n\
                    x_total{outcome=\"memory\",replica=\"a\"} 12\n\
                    x_total_more 5\n\
                    x_total 3\n";
        let found = samples(page, "x_total");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].label("outcome"), Some("memory"));
        assert_eq!(found[0].label("replica"), Some("a"));
        assert_eq!(found[0].value, 12.0);
        assert_eq!(found[1], Sample { labels: vec![], value: 3.0 });
    }

    #[test]
    fn a_quantile_comes_from_the_bucket_deltas_between_two_scrapes() {
        let page = |a: u32, b: u32, c: u32| {
            format!(
                "lag_seconds_bucket{{le=\"0.01\"}} {a}\nlag_seconds_bucket{{le=\"0.1\"}} {b}\n\
                 lag_seconds_bucket{{le=\"+Inf\"}} {c}\nlag_seconds_sum 1\nlag_seconds_count {c}\n"
            )
        };
        let before = buckets(&page(1000, 1000, 1000), "lag_seconds");
        assert_eq!(before, vec![(0.01, 1000.0), (0.1, 1000.0), (f64::INFINITY, 1000.0)]);
        // 100 new samples: 50 under 10 ms, 50 between 10 and 100 ms.
        let after = buckets(&page(1050, 1100, 1100), "lag_seconds");
        let (p99, bucket) = quantile_between(&before, &after, 0.99).unwrap();
        assert!((p99 - 0.0982).abs() < 1e-9, "{p99}");
        assert_eq!(bucket, 0.1);
        let (p50, _) = quantile_between(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        assert_eq!(quantile_between(&after, &after, 0.99), None);
        // Past the last finite bucket: its bound, as Prometheus answers.
        let slow = buckets(&page(1050, 1050, 1100), "lag_seconds");
        assert_eq!(quantile_between(&before, &slow, 0.99), Some((0.1, f64::INFINITY)));
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        assert!(CpuTime::of("self").is_ok());
    }
}
