//! What the hub and a connection share: the queue's other end, the catch-up flags, why
//! the hub dropped it, and the membership that unregisters it when dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::{Notify, mpsc};

use super::{Hub, Scope, SharedEvent};
use crate::metrics;

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
    pub(super) catching_up: AtomicBool,
    /// Some live events were not queued while catching up.
    pub(super) lagged: AtomicBool,
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

    pub(super) fn kick(&self, why: Kick) {
        self.kick.store(why as u8, Ordering::Release);
        self.kicked.notify_one();
    }
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
    pub(super) hub: Arc<Hub>,
    pub(super) id: u64,
    pub(super) scope: Scope,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.remove(self.id, &self.scope);
        metrics::connection_closed();
    }
}
