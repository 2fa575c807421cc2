//! The hub: who is connected, what they may see, and the latest events.
//!
//! The follower hands every event to [`Hub::publish`], which offers the same
//! `Arc<Event>` to each connection allowed to see it with `try_send` into that
//! connection's bounded queue. Dispatch never waits for a socket: a connection whose
//! queue is full is dropped from the hub and told to close as a slow consumer, unless
//! it is still catching up on history, in which case it is only marked `lagged` and
//! catches up again (see `resume`).
//!
//! The hub also keeps a window of recent events and the sequence of the newest one
//! (`head`). A connection registers and reads `head` under the same lock dispatch
//! holds, so everything after `head` reaches its queue and everything up to `head`
//! comes from the window or JetStream: that is what makes resume gap-free. Before the
//! follower opens the hub, it prefills the window with the newest events the stream
//! already holds (see `follower`).
//!
//! This module holds the registry of connections and dispatch; `scope` is what a
//! connection may see, `connection` what it shares with the hub, and `window` the
//! recent events and the catch-up that reads them.

mod connection;
mod scope;
mod window;

pub use connection::{ConnShared, Kick, Membership, Registration};
pub use scope::Scope;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::event::Event;
use crate::metrics;

/// An event shared by every queue it sits in.
pub type SharedEvent = Arc<Event>;

#[derive(Clone)]
struct Entry {
    tx: mpsc::Sender<SharedEvent>,
    shared: Arc<ConnShared>,
}

struct Inner {
    /// Whether the follower has found its starting point yet.
    started: bool,
    /// Sequence of the newest event seen.
    head: u64,
    /// Every event with a sequence in `(window_base, head]`, oldest first.
    window: VecDeque<SharedEvent>,
    window_base: u64,
    /// Bytes of the events in the window.
    window_bytes: usize,
    /// Connections that see every account.
    all: HashMap<u64, Entry>,
    /// Connections by account they may see.
    by_account: HashMap<String, HashMap<u64, Entry>>,
}

/// See the module docs.
pub struct Hub {
    inner: Mutex<Inner>,
    queue_capacity: usize,
    window_capacity: usize,
    /// Most bytes of events the window holds (events are up to NATS's max_payload).
    window_max_bytes: usize,
    next_id: AtomicU64,
}

impl Hub {
    /// A hub whose window holds at most `window_capacity` events, whatever their size.
    pub fn new(queue_capacity: usize, window_capacity: usize) -> Arc<Self> {
        Self::with_window_bytes(queue_capacity, window_capacity, usize::MAX)
    }

    /// A hub whose window holds at most `window_capacity` events and `window_max_bytes`
    /// bytes of them, whichever is reached first.
    pub fn with_window_bytes(
        queue_capacity: usize,
        window_capacity: usize,
        window_max_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                started: false,
                head: 0,
                window: VecDeque::new(),
                window_base: 0,
                window_bytes: 0,
                all: HashMap::new(),
                by_account: HashMap::new(),
            }),
            queue_capacity: queue_capacity.max(1),
            window_capacity,
            window_max_bytes,
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something did, the data is still
        // consistent enough to keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens the hub to connections once the follower has caught up: from here on
    /// every event is new to them. Starting again changes nothing.
    pub fn start(&self) {
        self.lock().started = true;
    }

    /// Whether connections may register yet.
    pub fn is_started(&self) -> bool {
        self.lock().started
    }

    /// Newest sequence seen, or `None` before the follower found the stream.
    pub fn head(&self) -> Option<u64> {
        let inner = self.lock();
        inner.started.then_some(inner.head)
    }

    /// Registrations held: one per connection and account it may see (tests use it).
    pub fn entries(&self) -> usize {
        let inner = self.lock();
        inner.all.len() + inner.by_account.values().map(HashMap::len).sum::<usize>()
    }

    /// Registers a connection. With `since`, it starts in catch-up mode and gets the
    /// events after `since` from the window when the window reaches back that far.
    /// `None` when the follower has not started yet.
    pub fn register(self: &Arc<Self>, scope: Scope, since: Option<u64>) -> Option<Registration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let shared = Arc::new(ConnShared::default());
        shared.catching_up.store(since.is_some(), Ordering::Release);
        let entry = Entry { tx, shared: shared.clone() };
        let mut inner = self.lock();
        if !inner.started {
            return None;
        }
        match &scope {
            Scope::All => {
                inner.all.insert(id, entry);
            }
            Scope::Accounts(accounts) => {
                for account in accounts {
                    inner.by_account.entry(account.clone()).or_default().insert(id, entry.clone());
                }
            }
        }
        let head = inner.head;
        let backlog = since.and_then(|since| inner.window_after(since, &scope));
        drop(inner);
        metrics::connection_opened();
        let membership = Membership { hub: self.clone(), id, scope };
        Some(Registration { id, rx, shared, head, backlog, membership })
    }

    /// Offers an event to every connection allowed to see it, and keeps it in the
    /// window. Never waits.
    pub fn publish(&self, event: SharedEvent) {
        let mut inner = self.lock();
        if event.seq <= inner.head {
            return;
        }
        inner.advance(&event, self.window_capacity, self.window_max_bytes);
        if inner.started {
            // Not the events read to fill the window before the replica opens.
            metrics::event_in();
        }
        let mut dropped: Vec<u64> = Vec::new();
        let targets = inner.all.iter().chain(inner.by_account.get(&event.account_id).into_iter().flatten());
        for (id, entry) in targets {
            match entry.tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if entry.shared.catching_up.load(Ordering::Acquire) {
                        entry.shared.lagged.store(true, Ordering::Release);
                    } else {
                        entry.shared.kick(Kick::SlowConsumer);
                        dropped.push(*id);
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => dropped.push(*id),
            }
        }
        for id in dropped {
            inner.all.remove(&id);
            if let Some(conns) = inner.by_account.get_mut(&event.account_id) {
                conns.remove(&id);
            }
        }
    }

    /// The stream was recreated: every connection is told to start over and the
    /// window is emptied. `head` is where the new stream is followed from.
    pub fn reset(&self, head: u64) {
        let mut inner = self.lock();
        for entry in inner.all.values() {
            entry.shared.kick(Kick::StreamReset);
        }
        for conns in inner.by_account.values() {
            for entry in conns.values() {
                entry.shared.kick(Kick::StreamReset);
            }
        }
        inner.all.clear();
        inner.by_account.clear();
        inner.window.clear();
        inner.window_bytes = 0;
        inner.started = true;
        inner.head = head;
        inner.window_base = head;
    }

    fn remove(&self, id: u64, scope: &Scope) {
        let mut inner = self.lock();
        match scope {
            Scope::All => {
                inner.all.remove(&id);
            }
            Scope::Accounts(accounts) => {
                for account in accounts {
                    if let Some(conns) = inner.by_account.get_mut(account) {
                        conns.remove(&id);
                        if conns.is_empty() {
                            inner.by_account.remove(account);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    pub(super) fn event(seq: u64, account: &str) -> SharedEvent {
        Arc::new(Event {
            seq,
            account_id: account.into(),
            chat_id: None,
            occurred_at_ms: None,
            text: Utf8Bytes::from(format!("{{\"seq\":{seq}}}")),
            received: std::time::Instant::now(),
        })
    }

    fn accounts(list: &[&str]) -> Scope {
        Scope::Accounts(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn nobody_registers_before_the_follower_starts() {
        let hub = Hub::new(4, 10);
        assert!(hub.register(Scope::All, None).is_none());
        hub.prefill_from(7);
        hub.start();
        assert_eq!(hub.register(Scope::All, None).unwrap().head, 7);
    }

    #[test]
    fn events_reach_only_connections_of_their_account() {
        let hub = Hub::new(4, 10);
        hub.start();
        let mut a = hub.register(accounts(&["a"]), None).unwrap();
        let mut all = hub.register(Scope::All, None).unwrap();
        hub.publish(event(1, "b"));
        hub.publish(event(2, "a"));
        assert_eq!(a.rx.try_recv().unwrap().seq, 2);
        assert!(a.rx.try_recv().is_err());
        assert_eq!(all.rx.try_recv().unwrap().seq, 1);
        assert_eq!(all.rx.try_recv().unwrap().seq, 2);
    }

    #[test]
    fn a_full_queue_kicks_a_live_connection_but_only_marks_one_catching_up() {
        let hub = Hub::new(1, 10);
        hub.start();
        let live = hub.register(Scope::All, None).unwrap();
        let resuming = hub.register(Scope::All, Some(0)).unwrap();
        hub.publish(event(1, "a"));
        hub.publish(event(2, "a"));
        assert_eq!(live.shared.kick_reason(), Some(Kick::SlowConsumer));
        assert_eq!(resuming.shared.kick_reason(), None);
        assert!(resuming.shared.is_lagged());
        assert!(!hub.finish_catch_up(&resuming.shared));
        assert_eq!(hub.entries(), 1);
    }

    #[test]
    fn dropping_a_registration_unregisters_it() {
        let hub = Hub::new(8, 2);
        hub.start();
        let reg = hub.register(accounts(&["a", "b"]), None).unwrap();
        assert_eq!(hub.entries(), 2, "one entry per account");
        drop(reg);
        assert_eq!(hub.entries(), 0);
    }

    #[test]
    fn reset_kicks_everyone_and_starts_over() {
        let hub = Hub::new(8, 2);
        hub.start();
        hub.publish(event(5, "a"));
        let reg = hub.register(Scope::All, None).unwrap();
        hub.reset(0);
        assert_eq!(reg.shared.kick_reason(), Some(Kick::StreamReset));
        assert_eq!(hub.head(), Some(0));
    }
}
