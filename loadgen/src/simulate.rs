//! `loadgen simulate`: believable inbox traffic for demos and manual testing.
//!
//! A few accounts on different providers (WhatsApp, LinkedIn, Instagram, Telegram), each
//! with named one-to-one chats and a group, exchange messages at a gentle rate (default
//! one delivery a second): people write, the user replies (`is_sender`), messages get
//! reactions, edits, deletions and read receipts. Every delivery is shaped like
//! Unipile's webhooks (see `fixtures/unipile/message_*.json`) and posted to ingest's
//! webhook endpoint with the `Unipile-Auth` secret. Runs for `--duration` seconds or
//! until Ctrl-C or SIGTERM.
//!
//! Account and chat ids are stable between runs, so a restarted simulator keeps adding
//! to the same chats; message ids are fresh every time.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of ingest.
    #[arg(long, env = "INGEST_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The Unipile-Auth secret ingest expects.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
    /// Deliveries per second (fractions allowed: 0.2 = one every five seconds).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Stop after this many seconds. Default: run until Ctrl-C.
    #[arg(long)]
    duration: Option<u64>,
    /// Accounts to simulate, spread over WhatsApp, LinkedIn, Instagram and Telegram.
    #[arg(long, default_value_t = 4)]
    accounts: usize,
    /// Print nothing per delivery (only failures and the final count).
    #[arg(long)]
    quiet: bool,
}

const PROVIDERS: [&str; 4] = ["WHATSAPP", "LINKEDIN", "INSTAGRAM", "TELEGRAM"];
const OWNERS: [&str; 4] = ["Sam Okafor", "Alex Martin", "Jordan Lee", "Riley Chen"];
const CONTACTS: [&str; 16] = [
    "Dana Reyes",
    "Priya Natarajan",
    "Marco Bianchi",
    "Léa Dubois",
    "Tomás Ortega",
    "Aiko Tanaka",
    "Fatima Zahra",
    "Noah Williams",
    "Elena Petrova",
    "Kwame Mensah",
    "Sofia Rossi",
    "Lukas Becker",
    "Maya Cohen",
    "Arjun Mehta",
    "Chloé Martin",
    "Ben Carter",
];
const GROUPS: [&str; 4] = ["Product launch 🚀", "Team offsite", "Book club", "Family"];
const INCOMING: [&str; 20] = [
    "Are we still on for Thursday?",
    "Thanks for connecting! Sharing the deck here.",
    "Can you send me the latest numbers?",
    "Just landed, will call you in 10",
    "Loved the demo yesterday 👏",
    "Quick question about the contract",
    "Running 5 minutes late, sorry!",
    "Did you see the feedback from the client?",
    "Lunch tomorrow?",
    "Here's the link I mentioned",
    "Happy Friday! Any plans for the weekend?",
    "I'll review the PR tonight",
    "Can we move the meeting to 3pm?",
    "The invoice is attached",
    "Congrats on the new role!",
    "Is the offer still open?",
    "What time works for you next week?",
    "Great, talk soon",
    "Sending the photos now 📸",
    "Let me check with the team and get back to you",
];
const REPLIES: [&str; 14] = [
    "Yes, 3pm works.",
    "Sure, sending it over now",
    "Thanks! 🙏",
    "On my way",
    "Let's do it",
    "Sounds good to me",
    "I'll get back to you by EOD",
    "Perfect, see you then",
    "No worries at all",
    "Can you share more details?",
    "Just sent the invite",
    "Haha yes 😄",
    "Agreed",
    "Will do!",
];
const REACTIONS: [&str; 6] = ["👍", "❤️", "😂", "🎉", "😮", "🙏"];

struct Person {
    id: String,
    name: String,
    provider_id: String,
}

struct Sent {
    id: String,
    text: String,
    is_sender: bool,
    sender: usize,
}

struct Chat {
    id: String,
    /// Indexes into the account's contacts.
    members: Vec<usize>,
    group: Option<&'static str>,
    recent: VecDeque<Sent>,
}

struct Account {
    id: String,
    provider: &'static str,
    owner: Person,
    contacts: Vec<Person>,
    chats: Vec<Chat>,
}

fn provider_id(provider: &str, n: usize) -> String {
    match provider {
        "WHATSAPP" => format!("1510555{n:04}@s.whatsapp.net"),
        "LINKEDIN" => format!("ACoAAC{n:06}sim"),
        "INSTAGRAM" => format!("17841400{n:06}"),
        _ => format!("{}", 500_000_000 + n),
    }
}

fn account_info(account: &Account) -> Value {
    match account.provider {
        "WHATSAPP" => json!({"type": "WHATSAPP", "phone_number": "+14155550123"}),
        "LINKEDIN" => json!({"type": "LINKEDIN", "feature": "classic", "user_id": account.owner.provider_id}),
        other => json!({"type": other, "user_id": account.owner.provider_id}),
    }
}

fn world(accounts: usize) -> Vec<Account> {
    (0..accounts)
        .map(|i| {
            let provider = PROVIDERS[i % PROVIDERS.len()];
            let id = format!("Sim{}{}{:02}", &provider[..1], provider[1..].to_lowercase(), i + 1);
            let contacts: Vec<Person> = (0..5)
                .map(|c| {
                    let n = (i * 5 + c) % CONTACTS.len();
                    Person {
                        id: format!("{id}Att{c}"),
                        name: CONTACTS[n].to_owned(),
                        provider_id: provider_id(provider, i * 100 + c),
                    }
                })
                .collect();
            let mut chats: Vec<Chat> = (0..4)
                .map(|c| Chat {
                    id: format!("{id}Chat{c}"),
                    members: vec![c],
                    group: None,
                    recent: VecDeque::new(),
                })
                .collect();
            chats.push(Chat {
                id: format!("{id}Group"),
                members: vec![0, 2, 4],
                group: Some(GROUPS[i % GROUPS.len()]),
                recent: VecDeque::new(),
            });
            Account {
                owner: Person {
                    id: format!("{id}Owner"),
                    name: OWNERS[i % OWNERS.len()].to_owned(),
                    provider_id: provider_id(provider, 9000 + i),
                },
                id,
                provider,
                contacts,
                chats,
            }
        })
        .collect()
}

fn attendee(person: &Person) -> Value {
    json!({
        "attendee_id": person.id,
        "attendee_name": person.name,
        "attendee_provider_id": person.provider_id,
        "attendee_profile_url": null,
    })
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..22].to_owned()
}

/// What one tick does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Incoming,
    Reply,
    Reaction,
    Edit,
    Delete,
    Read,
}

fn pick_action(rng: &mut impl Rng) -> Action {
    match rng.gen_range(0..100) {
        0..55 => Action::Incoming,
        55..77 => Action::Reply,
        77..87 => Action::Reaction,
        87..92 => Action::Edit,
        92..95 => Action::Delete,
        _ => Action::Read,
    }
}

/// Builds one delivery, updating the world; returns it with a one-line description.
fn next_delivery(world: &mut [Account], rng: &mut impl Rng) -> (Value, String) {
    let a = rng.gen_range(0..world.len());
    let account = &mut world[a];
    let c = rng.gen_range(0..account.chats.len());
    let mut action = pick_action(rng);
    if account.chats[c].recent.is_empty() {
        action = Action::Incoming;
    }
    if action == Action::Read && !account.chats[c].recent.iter().any(|m| m.is_sender) {
        action = Action::Reply;
    }
    let info = account_info(account);
    let (account_id, provider) = (account.id.clone(), account.provider);
    let chat = &account.chats[c];
    let attendees: Vec<Value> = chat.members.iter().map(|&m| attendee(&account.contacts[m])).collect();
    let title =
        chat.group.map(str::to_owned).unwrap_or_else(|| account.contacts[chat.members[0]].name.clone());
    let base = json!({
        "account_id": account_id,
        "account_type": provider,
        "account_info": info,
        "webhook_name": "relay-messaging",
        "chat_id": chat.id,
        "attendees": attendees,
        "subject": chat.group,
        "is_group": chat.group.is_some(),
        "attachments": [],
        "folder": ["INBOX"],
        "quoted": null,
    });
    let label = format!("{:<9} {:<22}", provider.to_lowercase(), title);
    match action {
        Action::Incoming | Action::Reply => {
            let is_sender = action == Action::Reply;
            let sender = *chat.members.choose(rng).expect("a chat has members");
            let text = if is_sender { REPLIES.choose(rng) } else { INCOMING.choose(rng) }
                .expect("non-empty")
                .to_string();
            let person = if is_sender { &account.owner } else { &account.contacts[sender] };
            let id = new_id();
            let mut body = base;
            body["event"] = "message_received".into();
            body["message_id"] = id.clone().into();
            body["provider_message_id"] = format!("prov{id}").into();
            body["provider_chat_id"] = format!("prov{}", chat.id).into();
            body["message"] = text.clone().into();
            body["timestamp"] = now().into();
            body["sender"] = attendee(person);
            body["is_sender"] = is_sender.into();
            let line = format!("{label} {}: {text}", if is_sender { "you" } else { person.name.as_str() });
            let chat = &mut account.chats[c];
            chat.recent.push_back(Sent { id, text, is_sender, sender });
            if chat.recent.len() > 8 {
                chat.recent.pop_front();
            }
            (body, line)
        }
        Action::Reaction | Action::Edit | Action::Delete | Action::Read => {
            let candidates: Vec<usize> = (0..chat.recent.len())
                .filter(|&i| match action {
                    Action::Read => chat.recent[i].is_sender,
                    _ => true,
                })
                .collect();
            let index = *candidates.choose(rng).expect("checked above");
            let target = &chat.recent[index];
            let author = if target.is_sender { &account.owner } else { &account.contacts[target.sender] };
            let mut body = base;
            body["message_id"] = target.id.clone().into();
            body["sender"] = attendee(author);
            body["is_sender"] = target.is_sender.into();
            body["timestamp"] = now().into();
            let line = match action {
                Action::Reaction => {
                    let emoji = *REACTIONS.choose(rng).expect("non-empty");
                    // The other side reacts to the user's messages, the user to theirs.
                    let reactor =
                        if target.is_sender { &account.contacts[chat.members[0]] } else { &account.owner };
                    body["event"] = "message_reaction".into();
                    body["message"] = target.text.clone().into();
                    body["reaction"] = emoji.into();
                    body["reaction_sender"] = attendee(reactor);
                    format!("{label} {} reacted {emoji} to \"{}\"", reactor.name, target.text)
                }
                Action::Edit => {
                    let text = format!("{} (edited)", target.text.trim_end_matches(" (edited)"));
                    body["event"] = "message_edited".into();
                    body["message"] = text.clone().into();
                    let line = format!("{label} edit: {text}");
                    account.chats[c].recent[index].text = text;
                    line
                }
                Action::Delete => {
                    body["event"] = "message_deleted".into();
                    body["message"] = Value::Null;
                    let line = format!("{label} deleted \"{}\"", target.text);
                    account.chats[c].recent.remove(index);
                    line
                }
                _ => {
                    body["event"] = "message_read".into();
                    body["message"] = target.text.clone().into();
                    format!("{label} seen: \"{}\"", target.text)
                }
            };
            (body, line)
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0 && args.rate <= 1000.0, "--rate must be in (0, 1000]");
    anyhow::ensure!(args.accounts > 0, "--accounts must be at least 1");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let endpoint = format!("{}/api/webhooks/unipile/messages", args.url.trim_end_matches('/'));
    let mut world = world(args.accounts);
    let mut rng = rand::rngs::StdRng::from_entropy();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let deadline = args.duration.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    println!(
        "loadgen simulate: {} accounts, ~{}/s to {endpoint}{}",
        args.accounts,
        args.rate,
        args.duration.map(|s| format!(" for {s}s")).unwrap_or_else(|| " until Ctrl-C".into())
    );
    let (mut sent, mut failed) = (0u64, 0u64);
    // Ctrl-C or SIGTERM: as PID 1 in a container a process that installs no SIGTERM
    // handler is never stopped by `docker stop`, only killed after its grace period.
    let stop = runtime::telemetry::shutdown_signal();
    tokio::pin!(stop);
    loop {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        let (body, line) = next_delivery(&mut world, &mut rng);
        let answer = client
            .post(&endpoint)
            .header("Unipile-Auth", &args.secret)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => {
                sent += 1;
                if !args.quiet {
                    println!("{} {line}", chrono::Local::now().format("%H:%M:%S"));
                }
            }
            Ok(response) => {
                failed += 1;
                eprintln!("ingest answered {}: {line}", response.status());
            }
            Err(error) => {
                failed += 1;
                eprintln!("ingest unreachable ({error}); retrying at the next tick");
            }
        }
        // A little jitter so the traffic does not tick like a metronome.
        let pause = interval.mul_f64(rng.gen_range(0.5..1.5));
        let pause = match deadline {
            Some(d) => pause.min(d.saturating_duration_since(tokio::time::Instant::now())),
            None => pause,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut stop => break,
        }
    }
    println!("loadgen simulate: {sent} deliveries accepted, {failed} failed");
    if sent == 0 && failed > 0 {
        return Err(anyhow::anyhow!("no delivery was accepted")).context(endpoint);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delivery_has_the_ids_ingest_needs_and_a_known_event() {
        let mut world = world(4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut events = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let (body, _) = next_delivery(&mut world, &mut rng);
            for key in ["account_id", "chat_id", "message_id", "event", "account_type"] {
                assert!(body[key].is_string(), "{key} missing in {body}");
            }
            events.insert(body["event"].as_str().unwrap().to_owned());
        }
        let expected =
            ["message_deleted", "message_edited", "message_reaction", "message_read", "message_received"];
        assert_eq!(events.into_iter().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn accounts_cover_the_four_providers() {
        let providers: Vec<&str> = world(4).iter().map(|a| a.provider).collect();
        assert_eq!(providers, PROVIDERS);
    }
}
