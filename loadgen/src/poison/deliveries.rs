//! What the run sends: which deliveries are poisoned and how, their ids, and their
//! bodies.

use serde_json::json;

use crate::webhooks::{PROVIDERS, Received};

/// Bytes of a `long_id` delivery's message id.
pub const LONG_ID_BYTES: usize = 3_000;
/// Bytes of text in each of a `huge_edit`'s two deliveries.
pub const HUGE_TEXT_BYTES: usize = 900_000;

/// What a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Clean,
    Nul,
    LongId,
    HugeEdit,
}

impl Kind {
    /// The poisoned kinds, in the order they take turns.
    pub const POISONED: [Kind; 3] = [Kind::Nul, Kind::LongId, Kind::HugeEdit];

    pub fn name(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Nul => "nul",
            Self::LongId => "long_id",
            Self::HugeEdit => "huge_edit",
        }
    }

    /// The kind of the `n`-th delivery when a `share` of them is poisoned: the poisoned
    /// ones are spread evenly (one where `n × share` crosses a whole number) and take
    /// the kinds in turn.
    pub fn of(n: u64, share: f64) -> Self {
        let share = share.clamp(0.0, 1.0);
        let before = (n as f64 * share).floor();
        if ((n + 1) as f64 * share).floor() > before {
            Self::POISONED[(before as u64 % Self::POISONED.len() as u64) as usize]
        } else {
            Self::Clean
        }
    }
}

/// One run's ids and the deliveries it sends.
#[derive(Debug, Clone)]
pub struct Run {
    /// Unique per run: in every account and message id.
    pub id: String,
    accounts: usize,
    chats: usize,
}

impl Run {
    pub fn new(accounts: usize, chats: usize) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Self { id, accounts: accounts.max(1), chats: chats.max(1) }
    }

    pub fn account_id(&self, account: usize) -> String {
        format!("pz{}a{account:02}", self.id)
    }

    /// Every account of the run: what the clients' token allows.
    pub fn account_ids(&self) -> Vec<String> {
        (0..self.accounts).map(|a| self.account_id(a)).collect()
    }

    /// The message id of the `n`-th delivery (padded to [`LONG_ID_BYTES`] for a
    /// `long_id`).
    pub fn message_id(&self, n: u64, kind: Kind) -> String {
        let id = format!("pz{}n{n}", self.id);
        match kind {
            Kind::LongId => {
                format!("{id}x{}", "0123456789".repeat(LONG_ID_BYTES / 10))[..LONG_ID_BYTES].to_owned()
            }
            _ => id,
        }
    }

    /// The bodies of the `n`-th delivery, in the order they are posted: one, or two
    /// (message, then its edit) for a `huge_edit`.
    pub fn deliveries(&self, n: u64, kind: Kind) -> Vec<String> {
        let account = n as usize % self.accounts;
        let chat = (n as usize / self.accounts) % self.chats;
        let account_id = self.account_id(account);
        let message_id = self.message_id(n, kind);
        let text = match kind {
            Kind::Nul => format!("Poison {n}: nul\u{0}here, are we still on for Thursday?"),
            Kind::HugeEdit => huge_text(&format!("Poison {n}: a very long message. "), HUGE_TEXT_BYTES),
            Kind::Clean | Kind::LongId => format!("Poison run message {n}: are we still on for Thursday?"),
        };
        let mut body = Received {
            account_id: &account_id,
            provider: PROVIDERS[account % PROVIDERS.len()],
            chat_id: &format!("{account_id}c{chat:03}"),
            chat,
            message_id: &message_id,
            text: &text,
            is_sender: n.is_multiple_of(5),
            n,
        }
        .to_json();
        match kind {
            Kind::Clean | Kind::LongId => vec![body.to_string()],
            Kind::Nul => {
                body["sender"]["attendee_name"] = format!("Contact\u{0}{chat}").into();
                body["attachments"] = json!([{
                    "id": format!("att{n}"),
                    "type": "file",
                    "mimetype": "application/pdf",
                    "file_name": "deck\u{0}final.pdf",
                    "size": {"height": "720", "width": "1280"},
                    "url": format!("att://{message_id}/file"),
                }]);
                vec![body.to_string()]
            }
            Kind::HugeEdit => {
                let received = body.to_string();
                body["event"] = "message_edited".into();
                body["message"] =
                    huge_text("Edited: a different very long message. ", HUGE_TEXT_BYTES).into();
                body["timestamp"] =
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into();
                vec![received, body.to_string()]
            }
        }
    }
}

/// `phrase` repeated to exactly `bytes` bytes (the phrase is ASCII).
fn huge_text(phrase: &str, bytes: usize) -> String {
    let mut text = phrase.repeat(bytes / phrase.len() + 1);
    text.truncate(bytes);
    text
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn poisoned_deliveries_are_spread_evenly_and_take_turns() {
        let kinds: Vec<Kind> = (0..1000).map(|n| Kind::of(n, 0.01)).collect();
        let poisoned: Vec<(usize, Kind)> =
            kinds.iter().copied().enumerate().filter(|(_, k)| *k != Kind::Clean).collect();
        assert_eq!(poisoned.len(), 10);
        assert_eq!(poisoned[0], (99, Kind::Nul));
        assert_eq!(poisoned[1], (199, Kind::LongId));
        assert_eq!(poisoned[2], (299, Kind::HugeEdit));
        assert_eq!(poisoned[3], (399, Kind::Nul));
        assert!((0..1000).all(|n| Kind::of(n, 0.0) == Kind::Clean));
        assert!((0..30).all(|n| Kind::of(n, 1.0) != Kind::Clean));
    }

    #[test]
    fn a_clean_delivery_has_a_unique_id_of_the_run() {
        let run = Run::new(5, 20);
        let body = parse(&run.deliveries(7, Kind::Clean)[0]);
        assert_eq!(body["event"], "message_received");
        assert_eq!(body["message_id"], run.message_id(7, Kind::Clean));
        assert!(body["message_id"].as_str().unwrap().contains(&run.id));
        assert_ne!(run.message_id(7, Kind::Clean), run.message_id(8, Kind::Clean));
        assert_eq!(body["account_id"], run.account_id(2));
        assert!(run.account_ids().contains(&body["account_id"].as_str().unwrap().to_owned()));
        assert!(!body.to_string().contains("\\u0000"));
    }

    #[test]
    fn the_nul_delivery_has_nul_in_text_sender_name_and_attachment_name() {
        let run = Run::new(5, 20);
        let bodies = run.deliveries(3, Kind::Nul);
        assert_eq!(bodies.len(), 1);
        let text = &bodies[0];
        assert_eq!(text.matches("\\u0000").count(), 3, "{text}");
        assert!(!text.contains('\0'), "escaped, not raw");
        let body = parse(text);
        assert!(body["message"].as_str().unwrap().contains('\0'));
        assert!(body["sender"]["attendee_name"].as_str().unwrap().contains('\0'));
        assert!(body["attachments"][0]["file_name"].as_str().unwrap().contains('\0'));
        assert_eq!(body["message_id"], run.message_id(3, Kind::Nul));
    }

    #[test]
    fn the_long_id_is_3000_bytes_and_still_of_the_run() {
        let run = Run::new(5, 20);
        let id = run.message_id(12, Kind::LongId);
        assert_eq!(id.len(), LONG_ID_BYTES);
        assert_eq!(id.len(), 3_000);
        assert!(id.starts_with(&run.message_id(12, Kind::Clean)));
        let body = parse(&run.deliveries(12, Kind::LongId)[0]);
        assert_eq!(body["message_id"].as_str().unwrap().len(), 3_000);
        assert_eq!(body["event"], "message_received");
    }

    #[test]
    fn the_huge_edit_is_two_900_kb_deliveries_of_the_same_message() {
        let run = Run::new(5, 20);
        let bodies = run.deliveries(5, Kind::HugeEdit);
        assert_eq!(bodies.len(), 2);
        let (received, edited) = (parse(&bodies[0]), parse(&bodies[1]));
        assert_eq!(received["event"], "message_received");
        assert_eq!(edited["event"], "message_edited");
        assert_eq!(received["message_id"], edited["message_id"]);
        assert_eq!(received["message_id"], run.message_id(5, Kind::HugeEdit));
        assert_eq!(received["chat_id"], edited["chat_id"]);
        assert_eq!(received["account_id"], edited["account_id"]);
        let (a, b) = (received["message"].as_str().unwrap(), edited["message"].as_str().unwrap());
        assert_eq!((a.len(), b.len()), (900_000, 900_000));
        assert_ne!(a, b);
        // Under ingest's default 1 MiB body limit.
        assert!(bodies.iter().all(|b| b.len() > 900_000 && b.len() < 1024 * 1024));
    }
}
