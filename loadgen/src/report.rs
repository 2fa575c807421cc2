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
    fn this_process_has_a_cpu_time() {
        assert!(CpuTime::of("self").is_ok());
    }
}
