//! Rate limits per key (a token's `sub`): one user or one leaked token cannot take
//! what every other user shares (REST calls, WebSocket resumes).
//!
//! A thin layer over `governor`'s keyed GCRA limiter: a steady rate with a burst of the
//! same size, an answer that says how long to wait, and an upkeep task that forgets
//! keys that have been quiet, so the map stays as small as the set of active users.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// `n` requests per `period` for each key, with a burst of `n`.
pub struct PerKeyLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl PerKeyLimit {
    /// `None` when `n` is 0: no limit.
    pub fn new(n: u32, period: Duration) -> Option<Arc<Self>> {
        let n = NonZeroU32::new(n)?;
        let quota = Quota::with_period(period / n.get())?.allow_burst(n);
        Some(Arc::new(Self { limiter: governor::RateLimiter::keyed(quota), clock: DefaultClock::default() }))
    }

    /// `n` per second for each key.
    pub fn per_second(n: u32) -> Option<Arc<Self>> {
        Self::new(n, Duration::from_secs(1))
    }

    /// `n` per minute for each key.
    pub fn per_minute(n: u32) -> Option<Arc<Self>> {
        Self::new(n, Duration::from_secs(60))
    }

    /// Takes one from `key`'s allowance, or says how long until one is free again
    /// (rounded up to whole seconds, at least 1, as `Retry-After` wants it).
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                .max(Duration::from_secs(1))
        })
    }

    /// Keys tracked now (for tests and the upkeep log).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Forgets every key whose allowance is full again: they carry no state worth
    /// keeping. Run it now and then (see [`PerKeyLimit::spawn_upkeep`]).
    pub fn forget_quiet_keys(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Calls [`PerKeyLimit::forget_quiet_keys`] every `every` while the process runs.
    pub fn spawn_upkeep(self: &Arc<Self>, every: Duration) {
        let limit = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match limit.upgrade() {
                    Some(limit) => limit.forget_quiet_keys(),
                    None => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit() {
        assert!(PerKeyLimit::per_second(0).is_none());
    }

    #[test]
    fn a_key_gets_its_burst_then_is_told_to_wait_while_others_are_untouched() {
        let limit = PerKeyLimit::per_minute(3).unwrap();
        for _ in 0..3 {
            limit.check("ana").unwrap();
        }
        let wait = limit.check("ana").unwrap_err();
        assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_secs(20), "{wait:?}");
        limit.check("bob").expect("another key has its own allowance");
    }

    #[test]
    fn quiet_keys_are_forgotten() {
        let limit = PerKeyLimit::new(1000, Duration::from_millis(1)).unwrap();
        limit.check("ana").unwrap();
        assert_eq!(limit.len(), 1);
        std::thread::sleep(Duration::from_millis(5));
        limit.forget_quiet_keys();
        assert!(limit.is_empty());
    }
}
