//! Presence between agents: who is typing in a chat and who has it open.
//!
//! Ephemeral by design: nothing goes to the database or the JetStream stream.
//! A connection's `typing` and `viewing` frames (see [`member`]) become
//! [`wire::Announcement`]s that this replica publishes on core NATS,
//! `{presence_prefix}.{account}.{chat}`. Every replica subscribes to the whole prefix
//! (its own announcements included, so there is one path), keeps the [`table::Table`]
//! of viewers, and hands [`wire::PresenceFrame`]s to its own connections of the
//! account, never to connections of the announcing agent (`sub`).
//!
//! Replica death: viewing is re-announced every heartbeat
//! (`FANOUT_PRESENCE_HEARTBEAT_MS`) by the replica holding the connection, and every
//! table drops what was not re-announced within `FANOUT_PRESENCE_EXPIRY_MS`, checked by
//! a sweep every tenth of that (at most a second). What a dead replica's clients
//! announced thus disappears within expiry + one sweep; a closed socket or chat is
//! announced as `left` at once. Typing is never stored: each `presence:typing` says
//! how long to show it (`expires_in_ms`). A starting replica asks the others to
//! re-announce at once (`{presence_prefix}.sync`) so its table is complete within a
//! round trip rather than a heartbeat.
//!
//! Delivery to connections goes through a small queue of each connection's own,
//! apart from the event queue: a full one drops presence (counted), it never closes
//! the connection nor delays an event.

pub mod api;
pub mod member;
pub mod table;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use shared::subjects::Subjects;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::PresenceArgs;
use crate::hub::Scope;
use crate::metrics;
pub use member::{Member, Reply};
use table::{Change, Gone, Table};
use wire::{Announcement, Op, PresenceFrame, Viewer};

/// Presence frames queued per connection; more are dropped (presence is ephemeral).
const CONNECTION_QUEUE: usize = 32;
/// Announcements waiting for the publisher; more are dropped and counted.
const OUTBOX: usize = 8192;

/// A presence frame on its way to local connections.
#[derive(Debug)]
pub struct Delivery {
    /// For connections narrowed to some chats with `subscribe`.
    pub chat_id: String,
    pub text: Utf8Bytes,
}

/// Timing and limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub typing_expiry: Duration,
    pub heartbeat: Duration,
    pub expiry: Duration,
    pub frames_per_sec: u32,
    pub max_entries: usize,
}

impl Settings {
    pub fn from_args(args: &PresenceArgs) -> Self {
        Self {
            typing_expiry: args.typing_expiry(),
            heartbeat: args.heartbeat(),
            expiry: args.expiry(),
            frames_per_sec: args.presence_frames_per_sec.max(1),
            max_entries: args.presence_max_entries,
        }
    }

    /// How often expired viewers are looked for.
    pub fn sweep(&self) -> Duration {
        (self.expiry / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

struct Sink {
    sub: Arc<str>,
    tx: mpsc::Sender<Arc<Delivery>>,
}

#[derive(Default)]
struct Sinks {
    all: HashMap<u64, Sink>,
    by_account: HashMap<String, HashMap<u64, Sink>>,
}

/// See the module docs.
pub struct Presence {
    settings: Settings,
    subjects: Subjects,
    /// This replica's id, in connection keys and `sync`.
    replica: String,
    outbox: mpsc::Sender<Announcement>,
    table: Mutex<Table>,
    /// What this replica's connections view, by connection key: re-announced every
    /// heartbeat.
    local: Mutex<HashMap<String, Announcement>>,
    sinks: Mutex<Sinks>,
    next_id: AtomicU64,
}

/// The presence task's side: publish what connections announce, apply what NATS brings.
pub struct PresenceTask {
    presence: Arc<Presence>,
    client: async_nats::Client,
    outbox: mpsc::Receiver<Announcement>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Presence {
    pub fn new(
        settings: Settings,
        subjects: Subjects,
        client: async_nats::Client,
    ) -> (Arc<Self>, PresenceTask) {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let presence = Arc::new(Self {
            settings,
            subjects,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            outbox: tx,
            table: Mutex::new(Table::new(settings.max_entries)),
            local: Mutex::new(HashMap::new()),
            sinks: Mutex::new(Sinks::default()),
            next_id: AtomicU64::new(1),
        });
        (presence.clone(), PresenceTask { presence, client, outbox: rx })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Adds a connection: it receives the presence of its accounts (but its own agent's).
    pub fn join(
        self: &Arc<Self>,
        scope: Scope,
        sub: &str,
        name: Option<&str>,
    ) -> (Member, mpsc::Receiver<Arc<Delivery>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CONNECTION_QUEUE);
        let sub: Arc<str> = sub.into();
        {
            let mut sinks = lock(&self.sinks);
            match &scope {
                Scope::All => {
                    sinks.all.insert(id, Sink { sub: sub.clone(), tx });
                }
                Scope::Accounts(accounts) => {
                    for account in accounts {
                        let sink = Sink { sub: sub.clone(), tx: tx.clone() };
                        sinks.by_account.entry(account.clone()).or_default().insert(id, sink);
                    }
                }
            }
        }
        let conn = format!("{}/{id}", self.replica);
        (Member::new(self.clone(), id, conn, scope, sub, wire::display_name(name)), rx)
    }

    fn leave(&self, id: u64, scope: &Scope) {
        let mut sinks = lock(&self.sinks);
        match scope {
            Scope::All => {
                sinks.all.remove(&id);
            }
            Scope::Accounts(accounts) => {
                for account in accounts {
                    if let Some(conns) = sinks.by_account.get_mut(account) {
                        conns.remove(&id);
                        if conns.is_empty() {
                            sinks.by_account.remove(account);
                        }
                    }
                }
            }
        }
    }

    /// Waits (up to `within`) until the publisher has taken every queued announcement.
    pub async fn wait_sent(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.outbox.capacity() < self.outbox.max_capacity() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// Queues an announcement for NATS; never waits.
    fn announce(&self, announcement: Announcement) {
        if self.outbox.try_send(announcement).is_err() {
            metrics::presence_dropped("outbox_full");
        }
    }

    /// This replica's connection `conn` views a chat (`Some`) or none (`None`).
    fn set_local(&self, conn: &str, viewing: Option<Announcement>) {
        let mut local = lock(&self.local);
        match viewing {
            Some(announcement) => local.insert(conn.to_owned(), announcement),
            None => local.remove(conn),
        };
    }

    /// The agents viewing a chat now, but `except`.
    pub fn viewers(&self, account_id: &str, chat_id: &str, except: &str) -> Vec<Viewer> {
        lock(&self.table).viewers(account_id, chat_id, except)
    }

    /// Hands a frame to every local connection of the account, but those of `sub`.
    fn deliver(&self, account_id: &str, chat_id: &str, sub: &str, frame: &PresenceFrame) {
        let delivery =
            Arc::new(Delivery { chat_id: chat_id.to_owned(), text: Utf8Bytes::from(frame.to_text()) });
        let sinks = lock(&self.sinks);
        let targets =
            sinks.all.values().chain(sinks.by_account.get(account_id).into_iter().flat_map(HashMap::values));
        let (mut sent, mut dropped) = (0u64, 0u64);
        for sink in targets {
            if *sink.sub == *sub {
                continue;
            }
            match sink.tx.try_send(delivery.clone()) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(sinks);
        metrics::presence_delivered(sent);
        if dropped > 0 {
            metrics::presence_dropped_n("queue_full", dropped);
        }
    }

    /// Applies one announcement from NATS.
    fn apply(&self, announcement: Announcement) {
        let Announcement { op, conn, sub, name, account_id, chat_id, ttl_ms } = announcement;
        let ttl = Duration::from_millis(ttl_ms.min(wire::MAX_TTL_MS));
        let name = wire::display_name(name.as_deref());
        match op {
            Op::Typing => {
                let frame = PresenceFrame::Typing {
                    account_id: account_id.clone(),
                    chat_id: chat_id.clone(),
                    sub: sub.clone(),
                    name,
                    expires_in_ms: ttl.as_millis() as u64,
                };
                self.deliver(&account_id, &chat_id, &sub, &frame);
            }
            Op::Viewing => {
                let viewer = Viewer { sub, name };
                let change = {
                    let mut table = lock(&self.table);
                    let change = table.upsert(&account_id, &chat_id, &conn, &viewer, Instant::now() + ttl);
                    metrics::presence_viewers(table.len());
                    change
                };
                match change {
                    Change::Appeared => self.tell_viewing(&account_id, &chat_id, viewer, true),
                    Change::Refreshed => {}
                    Change::Refused => metrics::presence_dropped("table_full"),
                }
            }
            Op::Left => {
                let gone = {
                    let mut table = lock(&self.table);
                    let gone = table.remove(&account_id, &chat_id, &conn);
                    metrics::presence_viewers(table.len());
                    gone
                };
                if let Some(Gone { account_id, chat_id, viewer }) = gone {
                    self.tell_viewing(&account_id, &chat_id, viewer, false);
                }
            }
        }
    }

    fn tell_viewing(&self, account_id: &str, chat_id: &str, viewer: Viewer, viewing: bool) {
        let frame = PresenceFrame::Viewing {
            account_id: account_id.to_owned(),
            chat_id: chat_id.to_owned(),
            sub: viewer.sub.clone(),
            name: viewer.name,
            viewing,
        };
        self.deliver(account_id, chat_id, &viewer.sub, &frame);
    }

    /// Drops viewers not re-announced in time and tells the others.
    fn sweep(&self) {
        let gone = {
            let mut table = lock(&self.table);
            let gone = table.expire(Instant::now());
            metrics::presence_viewers(table.len());
            gone
        };
        for Gone { account_id, chat_id, viewer } in gone {
            metrics::presence_expired();
            self.tell_viewing(&account_id, &chat_id, viewer, false);
        }
    }

    /// Every local viewing, with a fresh expiry, for the heartbeat.
    fn local_viewing(&self) -> Vec<Announcement> {
        let ttl_ms = self.settings.expiry.as_millis() as u64;
        lock(&self.local).values().map(|a| Announcement { ttl_ms, ..a.clone() }).collect()
    }
}

impl PresenceTask {
    /// Subscribes, asks the others to re-announce, then publishes, applies, sweeps and
    /// re-announces until the process stops. Returns only on a NATS failure.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let presence = self.presence.clone();
        let subjects = &presence.subjects;
        let mut incoming = self
            .client
            .subscribe(format!("{}.>", subjects.prefix()))
            .await
            .context("subscribing to presence")?;
        let sync = wire::Sync { replica: presence.replica.clone() };
        let sync_bytes = serde_json::to_vec(&sync).expect("serializes");
        if let Err(error) = self.client.publish(subjects.presence_sync(), sync_bytes.into()).await {
            tracing::warn!(error = %error, "asking the other replicas for their presence failed");
        }
        let mut heartbeat = tokio::time::interval(presence.settings.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(presence.settings.sweep());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sync_subject = subjects.presence_sync();
        // A burst of starting replicas gets one re-announcement per half heartbeat.
        let mut last_resync = Instant::now() - presence.settings.heartbeat;
        loop {
            tokio::select! {
                announcement = self.outbox.recv() => {
                    let Some(announcement) = announcement else { return Ok(()) };
                    self.publish(&announcement).await?;
                }
                message = incoming.next() => {
                    let Some(message) = message else { anyhow::bail!("the presence subscription ended") };
                    metrics::presence_received();
                    if message.subject.as_str() == sync_subject {
                        let from_other = serde_json::from_slice::<wire::Sync>(&message.payload)
                            .is_ok_and(|s| s.replica != presence.replica);
                        if from_other && last_resync.elapsed() >= presence.settings.heartbeat / 2 {
                            last_resync = Instant::now();
                            for announcement in presence.local_viewing() {
                                self.publish(&announcement).await?;
                            }
                        }
                        continue;
                    }
                    match serde_json::from_slice::<Announcement>(&message.payload) {
                        Ok(announcement) if announcement.is_sound() => presence.apply(announcement),
                        _ => metrics::presence_dropped("malformed"),
                    }
                }
                _ = heartbeat.tick() => {
                    for announcement in presence.local_viewing() {
                        self.publish(&announcement).await?;
                    }
                }
                _ = sweep.tick() => presence.sweep(),
            }
        }
    }

    /// Publishes one announcement. A failure is counted, not fatal: presence is
    /// ephemeral, and the next heartbeat says it again.
    async fn publish(&self, announcement: &Announcement) -> anyhow::Result<()> {
        let subject = self.presence.subjects.presence(&announcement.account_id, &announcement.chat_id);
        let payload = serde_json::to_vec(announcement).expect("an announcement serializes");
        let bytes = payload.len();
        match self.client.publish(subject, payload.into()).await {
            Ok(()) => metrics::presence_published(bytes),
            Err(error) => {
                tracing::debug!(error = %error, "publishing presence failed");
                metrics::presence_dropped("publish_failed");
            }
        }
        Ok(())
    }
}
