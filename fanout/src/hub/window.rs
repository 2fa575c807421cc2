//! The window of recent events, and the catch-up a resuming connection does from it.
//!
//! The hub keeps every event with a sequence in `(window_base, head]`, up to
//! [`Hub::window_capacity`] of them. A connection that registers with `since` starts in
//! catch-up mode: it gets the events after `since` from here when the window reaches
//! back that far (else `resume` reads them from JetStream), while live events queue
//! behind them. If its queue fills meanwhile it is marked `lagged` and rearms.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::{ConnShared, Hub, Inner, Scope, SharedEvent};

impl Hub {
    /// Before the first start: the follower fills the window from `base + 1` on (the
    /// newest events already in the stream) while nobody can register yet.
    pub fn prefill_from(&self, base: u64) {
        let mut inner = self.lock();
        if !inner.started {
            inner.head = base;
            inner.window_base = base;
            inner.window.clear();
            inner.window_bytes = 0;
        }
    }

    /// Most events the window holds.
    pub fn window_capacity(&self) -> usize {
        self.window_capacity
    }

    /// The events in `(since, head]` the scope allows, when the window holds them all.
    pub fn backlog(&self, since: u64, scope: &Scope) -> Option<Vec<SharedEvent>> {
        self.lock().window_after(since, scope)
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
}

impl Inner {
    /// Moves `head` to a new event and keeps it in the window, dropping the oldest
    /// beyond `capacity` events or `max_bytes` bytes.
    pub(super) fn advance(&mut self, event: &SharedEvent, capacity: usize, max_bytes: usize) {
        if !self.started && self.window.is_empty() {
            // Prefilling: the window starts at the first event the stream still had.
            self.window_base = event.seq - 1;
        }
        self.head = event.seq;
        if capacity > 0 {
            self.window.push_back(event.clone());
            self.window_bytes += event.text.len();
            while self.window.len() > capacity || self.window_bytes > max_bytes {
                let Some(old) = self.window.pop_front() else { break };
                self.window_bytes -= old.text.len();
                self.window_base = old.seq;
            }
        } else {
            self.window_base = event.seq;
        }
    }

    /// Events in `(since, head]` the scope allows, if the window holds all of them.
    pub(super) fn window_after(&self, since: u64, scope: &Scope) -> Option<Vec<SharedEvent>> {
        if since < self.window_base || since > self.head {
            return None;
        }
        let start = self.window.partition_point(|e| e.seq <= since);
        Some(self.window.range(start..).filter(|e| scope.allows(&e.account_id)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::hub::tests::event;
    use crate::hub::{Hub, Registration, Scope};

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
    fn the_window_also_stops_at_its_byte_budget() {
        // Each test event is `{"seq":NN}`: 10 bytes for two-digit sequences.
        let hub = Hub::with_window_bytes(8, 100, 25);
        hub.prefill_from(10);
        hub.start();
        for seq in 11..=15 {
            hub.publish(event(seq, "a"));
        }
        let seqs = |reg: Registration| reg.backlog.map(|b| b.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(
            seqs(hub.register(Scope::All, Some(13)).unwrap()),
            Some(vec![14, 15]),
            "two fit in 25 bytes"
        );
        assert_eq!(seqs(hub.register(Scope::All, Some(12)).unwrap()), None, "13 was dropped for its bytes");
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
}
