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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use shared::claims::Claims;
use tokio::sync::{Notify, mpsc};

use crate::event::Event;
use crate::metrics;

/// An event shared by every queue it sits in.
pub type SharedEvent = Arc<Event>;

/// Which accounts a connection may see, from its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Accounts(Vec<String>),
}

impl Scope {
    pub fn from_claims(claims: &Claims) -> Self {
        if claims.sees_all() {
            return Scope::All;
        }
        let mut accounts = claims.accounts.clone();
        accounts.sort();
        accounts.dedup();
        Scope::Accounts(accounts)
    }

    pub fn allows(&self, account_id: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Accounts(accounts) => accounts.iter().any(|a| a == account_id),
        }
    }

    /// The account, when the scope is exactly one (history reads can then filter).
    pub fn single_account(&self) -> Option<&str> {
        match self {
            Scope::Accounts(accounts) if accounts.len() == 1 => Some(&accounts[0]),
            _ => None,
        }
    }
}

/// Why the hub dropped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// Its queue filled up: it does not read fast enough.
    SlowConsumer = 1,
    /// The stream was recreated: sequences start over, so must the client.
    StreamReset = 2,
}

/// State a connection shares with the hub.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// While set, a full queue marks the connection `lagged` instead of dropping it.
    catching_up: AtomicBool,
    /// Some live events were not queued while catching up.
    lagged: AtomicBool,
    kick: AtomicU8,
    kicked: Notify,
}

impl ConnShared {
    /// Why the hub dropped this connection, if it did.
    pub fn kick_reason(&self) -> Option<Kick> {
        match self.kick.load(Ordering::Acquire) {
            1 => Some(Kick::SlowConsumer),
            2 => Some(Kick::StreamReset),
            _ => None,
        }
    }

    /// Resolves once the hub drops this connection.
    pub async fn kicked(&self) -> Kick {
        loop {
            if let Some(kick) = self.kick_reason() {
                return kick;
            }
            self.kicked.notified().await;
        }
    }

    pub fn is_lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }

    fn kick(&self, why: Kick) {
        self.kick.store(why as u8, Ordering::Release);
        self.kicked.notify_one();
    }
}

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
    next_id: AtomicU64,
}

/// A freshly registered connection.
pub struct Registration {
    pub id: u64,
    pub rx: mpsc::Receiver<SharedEvent>,
    pub shared: Arc<ConnShared>,
    /// Newest sequence at registration: later events arrive through `rx`.
    pub head: u64,
    /// Events after `since` up to `head` from memory, when the window reaches back.
    pub backlog: Option<Vec<SharedEvent>>,
    /// Keeps the connection in the hub; dropping it unregisters.
    pub membership: Membership,
}

/// Unregisters a connection when dropped.
pub struct Membership {
    hub: Arc<Hub>,
    id: u64,
    scope: Scope,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.remove(self.id, &self.scope);
        metrics::connection_closed();
    }
}

impl Hub {
    pub fn new(queue_capacity: usize, window_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                started: false,
                head: 0,
                window: VecDeque::new(),
                window_base: 0,
                all: HashMap::new(),
                by_account: HashMap::new(),
            }),
            queue_capacity: queue_capacity.max(1),
            window_capacity,
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something did, the data is still
        // consistent enough to keep serving.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Before the first start: the follower fills the window from `base + 1` on (the
    /// newest events already in the stream) while nobody can register yet.
    pub fn prefill_from(&self, base: u64) {
        let mut inner = self.lock();
        if !inner.started {
            inner.head = base;
            inner.window_base = base;
            inner.window.clear();
        }
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

    /// Most events the window holds.
    pub fn window_capacity(&self) -> usize {
        self.window_capacity
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

    /// Starts another catch-up round after the connection lagged: under the lock,
    /// empties its queue (whatever it held is at or before the new head) and clears
    /// `lagged`. Returns the new head and, when the window reaches back to `covered`,
    /// the events in `(covered, head]`.
    pub fn rearm(
        &self,
        rx: &mut mpsc::Receiver<SharedEvent>,
        shared: &ConnShared,
        scope: &Scope,
        covered: u64,
    ) -> (u64, Option<Vec<SharedEvent>>) {
        let inner = self.lock();
        while rx.try_recv().is_ok() {}
        shared.lagged.store(false, Ordering::Release);
        (inner.head, inner.window_after(covered, scope))
    }

    /// The events in `(since, head]` the scope allows, when the window holds them all.
    pub fn backlog(&self, since: u64, scope: &Scope) -> Option<Vec<SharedEvent>> {
        self.lock().window_after(since, scope)
    }

    /// Ends catch-up mode unless the connection lagged meanwhile (then `false`: it
    /// must rearm and catch up again). From here a full queue means a slow consumer.
    pub fn finish_catch_up(&self, shared: &ConnShared) -> bool {
        let _inner = self.lock();
        if shared.lagged.load(Ordering::Acquire) {
            return false;
        }
        shared.catching_up.store(false, Ordering::Release);
        true
    }

    /// Offers an event to every connection allowed to see it, and keeps it in the
    /// window. Never waits.
    pub fn publish(&self, event: SharedEvent) {
        let mut inner = self.lock();
        if event.seq <= inner.head {
            return;
        }
        if !inner.started && inner.window.is_empty() {
            // Prefilling: the window starts at the first event the stream still had.
            inner.window_base = event.seq - 1;
        }
        inner.head = event.seq;
        if inner.started {
            // Not the events read to fill the window before the replica opens.
            metrics::event_in();
        }
        if self.window_capacity > 0 {
            inner.window.push_back(event.clone());
            while inner.window.len() > self.window_capacity {
                if let Some(old) = inner.window.pop_front() {
                    inner.window_base = old.seq;
                }
            }
        } else {
            inner.window_base = event.seq;
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

    /// Moves `head` past a stream message that is not an event, so the window stays
    /// complete.
    pub fn skip(&self, seq: u64) {
        let mut inner = self.lock();
        if seq > inner.head {
            inner.head = seq;
            if inner.window.is_empty() {
                inner.window_base = seq;
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

impl Inner {
    /// Events in `(since, head]` the scope allows, if the window holds all of them.
    fn window_after(&self, since: u64, scope: &Scope) -> Option<Vec<SharedEvent>> {
        if since < self.window_base || since > self.head {
            return None;
        }
        let start = self.window.partition_point(|e| e.seq <= since);
        Some(self.window.range(start..).filter(|e| scope.allows(&e.account_id)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn event(seq: u64, account: &str) -> SharedEvent {
        Arc::new(Event {
            seq,
            account_id: account.into(),
            chat_id: None,
            occurred_at_ms: None,
            text: Utf8Bytes::from(format!("{{\"seq\":{seq}}}")),
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
    fn the_window_serves_resumes_it_reaches_back_to() {
        let hub = Hub::new(8, 2);
        hub.prefill_from(10);
        hub.start();
        for seq in 11..=13 {
            hub.publish(event(seq, "a"));
        }
        let seqs = |reg: Registration| reg.backlog.map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(seqs(hub.register(Scope::All, Some(11)).unwrap()), Some(vec![12, 13]));
        assert_eq!(seqs(hub.register(Scope::All, Some(13)).unwrap()), Some(vec![]));
        assert_eq!(seqs(hub.register(Scope::All, Some(10)).unwrap()), None, "13 - 2 events back is 11");
        assert_eq!(seqs(hub.register(Scope::All, Some(14)).unwrap()), None, "the future is not in memory");
    }

    #[test]
    fn a_prefilled_window_serves_resumes_from_before_the_start() {
        let hub = Hub::new(8, 3);
        hub.prefill_from(20);
        // The stream had already dropped 21 when the follower read it.
        for seq in 22..=25 {
            hub.publish(event(seq, "a"));
        }
        assert!(hub.register(Scope::All, Some(22)).is_none(), "closed while prefilling");
        hub.start();
        let seqs = |reg: Registration| reg.backlog.map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>());
        let fresh = hub.register(Scope::All, None).unwrap();
        assert_eq!(fresh.head, 25, "a new client starts after the prefilled events");
        assert_eq!(seqs(hub.register(Scope::All, Some(22)).unwrap()), Some(vec![23, 24, 25]));
        assert_eq!(seqs(hub.register(Scope::All, Some(21)).unwrap()), None, "22 fell out of the window");
    }

    #[test]
    fn a_prefill_that_found_nothing_still_starts_where_the_stream_was() {
        let hub = Hub::new(8, 3);
        hub.prefill_from(20);
        // 21..=30 were purged: the first event seen is 31, and 21..=30 are not in memory.
        hub.publish(event(31, "a"));
        hub.start();
        let seqs = |reg: Registration| reg.backlog.map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(seqs(hub.register(Scope::All, Some(30)).unwrap()), Some(vec![31]));
        assert_eq!(seqs(hub.register(Scope::All, Some(25)).unwrap()), None);
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
