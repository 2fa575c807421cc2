//! Who views which chat, everywhere: every replica keeps the same table, built from
//! the announcements on NATS (its own included), each entry with an expiry.
//!
//! Entries are per connection; clients see agents (`sub`): an agent with two tabs on
//! the same chat appears once, and leaves when its last tab does. The table is
//! bounded: [`MAX_VIEWERS_PER_CHAT`] connections per chat and a total the operator
//! sets (`FANOUT_PRESENCE_MAX_ENTRIES`); announcements beyond them are refused.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::wire::Viewer;

/// Most connections one chat lists: nobody needs more, and one account cannot fill
/// the table through a single chat.
pub const MAX_VIEWERS_PER_CHAT: usize = 256;

#[derive(Debug, Clone)]
struct Entry {
    sub: Arc<str>,
    name: Option<Arc<str>>,
    expires: Instant,
}

/// What an announcement changed for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The agent was not viewing the chat before: tell the others.
    Appeared,
    /// Already known; only its expiry moved.
    Refreshed,
    /// The table or the chat is full: ignored.
    Refused,
}

/// An agent that stopped viewing a chat (its last connection there left or expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    pub account_id: String,
    pub chat_id: String,
    pub viewer: Viewer,
}

/// See the module docs.
#[derive(Debug)]
pub struct Table {
    /// account → chat → connection → entry.
    accounts: HashMap<String, HashMap<String, HashMap<String, Entry>>>,
    entries: usize,
    max_entries: usize,
}

impl Table {
    pub fn new(max_entries: usize) -> Self {
        Self { accounts: HashMap::new(), entries: 0, max_entries }
    }

    /// Connections listed, all chats together.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Records that `conn` (of agent `sub`) views the chat until `expires`.
    pub fn upsert(
        &mut self,
        account_id: &str,
        chat_id: &str,
        conn: &str,
        viewer: &Viewer,
        expires: Instant,
    ) -> Change {
        let chat = self.accounts.get(account_id).and_then(|chats| chats.get(chat_id));
        if let Some(entry) = chat.and_then(|conns| conns.get(conn))
            && *entry.sub == *viewer.sub
        {
            let entry = self.entry_mut(account_id, chat_id, conn).expect("just seen");
            entry.expires = entry.expires.max(expires);
            return Change::Refreshed;
        }
        let listed = chat.is_some_and(|conns| conns.contains_key(conn));
        let full = chat.is_some_and(|conns| conns.len() >= MAX_VIEWERS_PER_CHAT);
        if !listed && (self.entries >= self.max_entries || full) {
            return Change::Refused;
        }
        let already = chat.is_some_and(|conns| conns.values().any(|e| *e.sub == *viewer.sub));
        let conns =
            self.accounts.entry(account_id.to_owned()).or_default().entry(chat_id.to_owned()).or_default();
        let entry =
            Entry { sub: viewer.sub.as_str().into(), name: viewer.name.as_deref().map(Into::into), expires };
        if conns.insert(conn.to_owned(), entry).is_none() {
            self.entries += 1;
        }
        if already { Change::Refreshed } else { Change::Appeared }
    }

    fn entry_mut(&mut self, account_id: &str, chat_id: &str, conn: &str) -> Option<&mut Entry> {
        self.accounts.get_mut(account_id)?.get_mut(chat_id)?.get_mut(conn)
    }

    /// `conn` left the chat; the agent, when that was its last connection there.
    pub fn remove(&mut self, account_id: &str, chat_id: &str, conn: &str) -> Option<Gone> {
        let chats = self.accounts.get_mut(account_id)?;
        let conns = chats.get_mut(chat_id)?;
        let entry = conns.remove(conn)?;
        self.entries -= 1;
        let still = conns.values().any(|e| e.sub == entry.sub);
        if conns.is_empty() {
            chats.remove(chat_id);
            if chats.is_empty() {
                self.accounts.remove(account_id);
            }
        }
        (!still).then(|| gone(account_id, chat_id, &entry))
    }

    /// Drops every entry expired at `now`; the agents no longer viewing a chat.
    pub fn expire(&mut self, now: Instant) -> Vec<Gone> {
        let mut gone_agents = Vec::new();
        let mut removed = 0;
        self.accounts.retain(|account_id, chats| {
            chats.retain(|chat_id, conns| {
                let mut expired: Vec<Entry> = Vec::new();
                conns.retain(|_, entry| {
                    let keep = entry.expires > now;
                    if !keep {
                        expired.push(entry.clone());
                    }
                    keep
                });
                removed += expired.len();
                let mut told: Vec<&Arc<str>> = Vec::new();
                for entry in &expired {
                    if !told.contains(&&entry.sub) && !conns.values().any(|e| e.sub == entry.sub) {
                        told.push(&entry.sub);
                        gone_agents.push(gone(account_id, chat_id, entry));
                    }
                }
                !conns.is_empty()
            });
            !chats.is_empty()
        });
        self.entries -= removed;
        gone_agents
    }

    /// The agents viewing a chat, each once, but `except` (the asker).
    pub fn viewers(&self, account_id: &str, chat_id: &str, except: &str) -> Vec<Viewer> {
        let mut viewers: Vec<Viewer> = Vec::new();
        let conns = self.accounts.get(account_id).and_then(|chats| chats.get(chat_id));
        for entry in conns.into_iter().flat_map(HashMap::values) {
            if *entry.sub != *except && !viewers.iter().any(|v| *v.sub == *entry.sub) {
                viewers
                    .push(Viewer { sub: entry.sub.to_string(), name: entry.name.as_deref().map(Into::into) });
            }
        }
        viewers.sort_by(|a, b| a.sub.cmp(&b.sub));
        viewers
    }
}

fn gone(account_id: &str, chat_id: &str, entry: &Entry) -> Gone {
    Gone {
        account_id: account_id.to_owned(),
        chat_id: chat_id.to_owned(),
        viewer: Viewer { sub: entry.sub.to_string(), name: entry.name.as_deref().map(Into::into) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn viewer(sub: &str) -> Viewer {
        Viewer { sub: sub.into(), name: None }
    }

    #[test]
    fn an_agent_with_two_tabs_appears_once_and_leaves_with_its_last_tab() {
        let mut table = Table::new(100);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(table.upsert("a", "c", "r/1", &viewer("ana"), later), Change::Appeared);
        assert_eq!(table.upsert("a", "c", "r/2", &viewer("ana"), later), Change::Refreshed);
        assert_eq!(table.upsert("a", "c", "r/1", &viewer("ana"), later), Change::Refreshed);
        assert_eq!(table.viewers("a", "c", "ben"), vec![viewer("ana")]);
        assert_eq!(table.viewers("a", "c", "ana"), vec![], "the asker is not listed");
        assert_eq!(table.remove("a", "c", "r/1"), None, "still there in the other tab");
        assert_eq!(table.remove("a", "c", "r/2").unwrap().viewer, viewer("ana"));
        assert!(table.is_empty());
    }

    #[test]
    fn entries_not_refreshed_expire_and_their_agents_are_reported_once() {
        let mut table = Table::new(100);
        let now = Instant::now();
        table.upsert("a", "c", "r/1", &viewer("ana"), now + Duration::from_secs(1));
        table.upsert("a", "c", "r/2", &viewer("ana"), now + Duration::from_secs(1));
        table.upsert("a", "c", "q/1", &viewer("ben"), now + Duration::from_secs(10));
        assert!(table.expire(now).is_empty());
        let gone = table.expire(now + Duration::from_secs(2));
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert_eq!(gone[0].viewer, viewer("ana"));
        assert_eq!(table.len(), 1);
        assert_eq!(table.viewers("a", "c", ""), vec![viewer("ben")]);
    }

    #[test]
    fn the_table_and_each_chat_are_bounded() {
        let later = Instant::now() + Duration::from_secs(60);
        let mut table = Table::new(2);
        table.upsert("a", "c", "1", &viewer("u1"), later);
        table.upsert("b", "d", "2", &viewer("u2"), later);
        assert_eq!(table.upsert("a", "c", "3", &viewer("u3"), later), Change::Refused);
        assert_eq!(
            table.upsert("a", "c", "1", &viewer("u1"), later),
            Change::Refreshed,
            "known ones refresh"
        );
        let mut table = Table::new(10_000);
        for i in 0..MAX_VIEWERS_PER_CHAT {
            table.upsert("a", "c", &i.to_string(), &viewer(&i.to_string()), later);
        }
        assert_eq!(table.upsert("a", "c", "x", &viewer("x"), later), Change::Refused);
        assert_eq!(table.upsert("a", "other", "x", &viewer("x"), later), Change::Appeared);
    }
}
