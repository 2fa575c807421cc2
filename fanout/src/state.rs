//! The state every handler and connection shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shared::claims::JwtKeys;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::follower::FollowerStatus;
use crate::history::History;
use crate::hub::Hub;
use crate::presence::Presence;

#[derive(Clone)]
pub struct AppState {
    /// Verifies client tokens on upgrade.
    pub keys: Arc<JwtKeys>,
    /// What connection tasks use (hub, history, limits, shutdown).
    pub ctx: Arc<ConnectionContext>,
    /// Connection slots of this replica, so one replica never takes more than it can hold.
    pub slots: Arc<Slots>,
    /// The same, per token subject.
    pub per_sub: Arc<SubSlots>,
    /// Resumes per token subject and minute (`None`: no limit).
    pub resumes: Option<Arc<runtime::limits::PerKeyLimit>>,
    /// Counts connection tasks so shutdown waits for their close frames.
    pub tracker: TaskTracker,
    /// Whether the follower is following, for `/readyz`.
    pub follower: Arc<FollowerStatus>,
    /// The NATS connection, for `/readyz`.
    pub nats: async_nats::Client,
}

/// What every connection task needs, behind one `Arc` so that each of thousands of
/// idle connections holds a pointer rather than copies.
pub struct ConnectionContext {
    /// Who is connected and the latest events; the follower feeds it.
    pub hub: Arc<Hub>,
    /// Reads JetStream for resumes reaching past the hub's window.
    pub history: History,
    /// Per-connection socket and protocol limits.
    pub limits: Limits,
    /// Cancelled on shutdown: every socket closes with 1012.
    pub shutdown: CancellationToken,
    /// Typing and viewing between agents (core NATS, apart from the hub and stream).
    pub presence: Arc<Presence>,
}

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Server ping interval, announced in `hello` as `heartbeat_s`.
    pub heartbeat: Duration,
    /// Longest a single write to a client may take.
    pub write_timeout: Duration,
    /// Client messages up to this size get an `error` frame when not understood.
    pub max_client_message: usize,
    /// Client messages over this size close the connection with 1009.
    pub hard_client_message: usize,
}

/// A counter of open connections with a ceiling.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

/// One taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), max })
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used < self.max).then_some(used + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open connections per token subject, each up to a ceiling.
#[derive(Debug)]
pub struct SubSlots {
    used: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    max: usize,
}

/// One subject's taken slot, given back when dropped.
#[derive(Debug)]
pub struct SubSlot(Arc<SubSlots>, String);

impl SubSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { used: Default::default(), max })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn try_acquire(self: &Arc<Self>, sub: &str) -> Option<SubSlot> {
        let mut used = self.lock();
        let count = used.entry(sub.to_owned()).or_insert(0);
        (*count < self.max).then(|| {
            *count += 1;
            SubSlot(self.clone(), sub.to_owned())
        })
    }
}

impl Drop for SubSlot {
    fn drop(&mut self) {
        let mut used = self.0.lock();
        if let Some(count) = used.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                used.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_subject_has_its_own_ceiling() {
        let slots = SubSlots::new(2);
        let a1 = slots.try_acquire("a").unwrap();
        let _a2 = slots.try_acquire("a").unwrap();
        assert!(slots.try_acquire("a").is_none());
        assert!(slots.try_acquire("b").is_some(), "another subject is not affected");
        drop(a1);
        assert!(slots.try_acquire("a").is_some());
    }

    #[test]
    fn slots_run_out_at_the_limit_and_come_back_when_dropped() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().unwrap();
        let _b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert!(slots.try_acquire().is_some());
    }
}
