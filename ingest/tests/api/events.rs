//! Read receipts, reactions, edits, deletions and account status: what is stored and
//! what a subscriber receives on JetStream.

use std::time::Duration;

use serde_json::{Value, json};
use shared::envelope::{Envelope, EventType};
use uuid::Uuid;

use ingest::payload::MessagingEvent;
use ingest::store::batcher::commit;
use ingest::store::updates::MessageUpdate;
use ingest::store::{Outcome, Write};

use crate::helpers::{TestApp, fixture, spawn_app};

const WAIT: Duration = Duration::from_secs(10);
const ACCOUNT: &str = "Wq7hT2mXRbK9vLpA3sDfGh";
const CHAT: &str = "c4Rt8YuIoP1aSdFgHjKlZx";

/// A `message_received` with a fresh id in the fixture's chat, sent at `at`.
fn received(at: &str) -> (String, Value) {
    let id = format!("msg_{}", Uuid::new_v4().simple());
    let mut v = fixture("message_received_whatsapp.json");
    v["message_id"] = id.clone().into();
    v["timestamp"] = at.into();
    (id, v)
}

/// An update fixture (`message_read.json`, ...) about `message_id`.
fn update(fixture_name: &str, message_id: &str) -> Value {
    let mut v = fixture(fixture_name);
    v["message_id"] = message_id.into();
    v
}

fn reaction(message_id: &str, emoji: &str, reactor: &str, at: &str) -> Value {
    let mut v = update("message_reaction.json", message_id);
    v["reaction"] = emoji.into();
    v["reaction_sender"]["attendee_provider_id"] = reactor.into();
    v["reaction_sender"]["attendee_name"] = format!("Person {reactor}").into();
    v["timestamp"] = at.into();
    v
}

fn edit(message_id: &str, text: &str, at: &str) -> Value {
    let mut v = update("message_edited.json", message_id);
    v["message"] = text.into();
    v["timestamp"] = at.into();
    v
}

async fn events_of(app: &TestApp, n: usize, kind: EventType) -> Vec<Envelope> {
    app.stream_events(n, WAIT).await.into_iter().map(|(_, e)| e).filter(|e| e.event_type == kind).collect()
}

async fn message_row(app: &TestApp, id: &str) -> Value {
    sqlx::query_scalar(
        "select json_build_object('text', text, 'seen', seen, 'seen_at', seen_at, 'reactions', reactions,
                'edited_at', edited_at, 'deleted_at', deleted_at, 'placeholder', placeholder)
         from messages where id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap_or_else(|e| panic!("message {id}: {e}"))
}

async fn outbox_rows(app: &TestApp) -> i64 {
    app.count("select count(*) from outbox").await
}

#[tokio::test]
async fn a_read_receipt_marks_the_message_seen_once_and_emits_message_read() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:04:30.000Z");
    app.post_message_expect(&message, "accepted").await;
    let read = update("message_read.json", &id);
    app.post_message_expect(&read, "accepted").await;

    let row = message_row(&app, &id).await;
    assert_eq!(row["seen"], true);
    assert!(row["seen_at"].as_str().unwrap().starts_with("2026-11-28T16:04:30"), "{row}");

    let reads = events_of(&app, 2, EventType::MessageRead).await;
    assert_eq!(reads.len(), 1, "{reads:?}");
    let event = &reads[0];
    assert_eq!((event.account_id.as_str(), event.chat_id.as_deref()), (ACCOUNT, Some(CHAT)));
    assert_eq!(event.data["message_id"], id.as_str());
    assert_eq!(event.data["seen_at"], "2026-11-28T16:04:30.000Z");
    assert_eq!(event.data["message"]["id"], id.as_str());
    assert_eq!(event.data["message"]["seen"], true);
    assert_eq!(event.data["message"]["text"], "Are we still on for Thursday?");

    let before = outbox_rows(&app).await;
    app.post_message_expect(&read, "duplicate").await;
    assert_eq!(outbox_rows(&app).await, before, "a repeated receipt emits nothing");
}

#[tokio::test]
async fn reading_an_incoming_message_elsewhere_lowers_the_unread_count_and_emits_chat_read() {
    let app = spawn_app().await;
    let query = format!("select unread_count from chats where id = '{CHAT}'");
    let unread = || app.count(&query);
    let mut ids = Vec::new();
    for at in ["2026-11-28T16:01:00.000Z", "2026-11-28T16:02:00.000Z", "2026-11-28T16:03:00.000Z"] {
        let (id, message) = received(at);
        app.post_message_expect(&message, "accepted").await;
        ids.push(id);
    }
    assert_eq!(unread().await, 3);

    // Read up to the second on the phone: the third is still unread.
    app.post_message_expect(&update("message_read.json", &ids[1]), "accepted").await;
    assert_eq!(unread().await, 1);
    let events = app.stream_events(5, WAIT).await;
    let kinds: Vec<EventType> = events.iter().map(|(_, e)| e.event_type).collect();
    assert_eq!(kinds[3..], [EventType::MessageRead, EventType::ChatRead]);
    let chat_read = &events[4].1;
    assert_eq!((chat_read.account_id.as_str(), chat_read.chat_id.as_deref()), (ACCOUNT, Some(CHAT)));
    assert_eq!(chat_read.data["chat"]["unread_count"], 1);

    // An older message read later never raises the count back.
    app.post_message_expect(&update("message_read.json", &ids[0]), "accepted").await;
    assert_eq!(unread().await, 1);
    app.post_message_expect(&update("message_read.json", &ids[2]), "accepted").await;
    assert_eq!(unread().await, 0);
    let kinds: Vec<EventType> = app.stream_events(8, WAIT).await.iter().map(|(_, e)| e.event_type).collect();
    assert_eq!(
        kinds[5..],
        [EventType::MessageRead, EventType::MessageRead, EventType::ChatRead],
        "no chat:read when the count did not change"
    );

    // The user's own message being read (a receipt from the other side) is not theirs to read.
    let mut own = received("2026-11-28T16:04:00.000Z");
    own.1["is_sender"] = true.into();
    app.post_message_expect(&own.1, "accepted").await;
    let (latest, message) = received("2026-11-28T16:05:00.000Z");
    app.post_message_expect(&message, "accepted").await;
    assert_eq!(unread().await, 1);
    app.post_message_expect(&update("message_read.json", &own.0), "accepted").await;
    assert_eq!(unread().await, 1, "a receipt for an outgoing message leaves the count");
    app.post_message_expect(&update("message_read.json", &latest), "accepted").await;
    assert_eq!(unread().await, 0);
}

#[tokio::test]
async fn receipts_for_several_chats_in_one_batch_lower_each_chat_once() {
    let app = spawn_app().await;
    let (in_first, first) = received("2026-11-28T16:01:00.000Z");
    let (in_second, mut second) = received("2026-11-28T16:01:00.000Z");
    second["chat_id"] = "chat_second".into();
    app.post_message_expect(&first, "accepted").await;
    app.post_message_expect(&second, "accepted").await;

    let read = |id: &str, chat: &str| {
        let mut v = update("message_read.json", id);
        v["chat_id"] = chat.into();
        let event: MessagingEvent = serde_json::from_value(v).expect("a messaging event");
        Write::Update(MessageUpdate::from_webhook(&event, chrono::Utc::now()).expect("an update"))
    };
    let writes = [read(&in_first, CHAT), read(&in_second, "chat_second")];
    let (outcomes, events) =
        commit(&app.db, &app.subjects, &Default::default(), None, &writes.iter().collect::<Vec<_>>())
            .await
            .expect("the batch commits");
    assert_eq!(outcomes, [Outcome::Accepted, Outcome::Accepted]);
    assert_eq!(events, 4, "a message:read and a chat:read per chat");
    for chat in [CHAT, "chat_second"] {
        assert_eq!(app.count(&format!("select unread_count from chats where id = '{chat}'")).await, 0);
    }
}

#[tokio::test]
async fn reactions_are_kept_per_person_replaced_and_removed_with_one_event_each() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&message, "accepted").await;

    app.post_message_expect(&reaction(&id, "👍", "sam", "2026-11-28T16:03:00Z"), "accepted").await;
    app.post_message_expect(&reaction(&id, "❤️", "dana", "2026-11-28T16:03:10Z"), "accepted").await;
    app.post_message_expect(&reaction(&id, "👍", "sam", "2026-11-28T16:03:00Z"), "duplicate").await;
    app.post_message_expect(&reaction(&id, "😂", "sam", "2026-11-28T16:04:00Z"), "accepted").await;
    // Older than Sam's current reaction: stale.
    app.post_message_expect(&reaction(&id, "👎", "sam", "2026-11-28T16:03:30Z"), "ignored").await;
    app.post_message_expect(&reaction(&id, "", "dana", "2026-11-28T16:05:00Z"), "accepted").await;

    let stored = message_row(&app, &id).await["reactions"].clone();
    assert_eq!(stored.as_array().unwrap().len(), 1, "{stored}");
    assert_eq!(stored[0]["value"], "😂");
    assert_eq!(stored[0]["sender_id"], "sam");
    assert_eq!(stored[0]["sender"]["name"], "Person sam");

    let events = events_of(&app, 5, EventType::MessageReaction).await;
    assert_eq!(events.len(), 4, "one per change: {events:?}");
    let first = &events[0].data;
    assert_eq!(first["message_id"], id.as_str());
    assert_eq!(first["reaction"]["value"], "👍");
    assert_eq!(first["reaction"]["sender"]["provider_id"], "sam");
    assert_eq!(first["removed"], false);
    assert_eq!(first["reactions"].as_array().unwrap().len(), 1);
    let replaced = &events[2].data;
    assert_eq!(replaced["reaction"]["value"], "😂");
    let values: Vec<&str> =
        replaced["reactions"].as_array().unwrap().iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["😂", "❤️"]);
    let removed = &events[3].data;
    assert_eq!(removed["removed"], true);
    assert_eq!(removed["reaction"]["value"], Value::Null);
    assert_eq!(removed["reaction"]["sender_id"], "dana");
    assert_eq!(removed["message"]["reactions"], stored);
}

#[tokio::test]
async fn an_edit_replaces_the_text_and_a_stale_or_repeated_edit_changes_nothing() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&message, "accepted").await;

    app.post_message_expect(&edit(&id, "Thursday at 3?", "2026-11-28T16:06:00Z"), "accepted").await;
    app.post_message_expect(&edit(&id, "Thursday at 3?", "2026-11-28T16:06:00Z"), "duplicate").await;
    app.post_message_expect(&edit(&id, "an older draft", "2026-11-28T16:05:00Z"), "ignored").await;

    let row = message_row(&app, &id).await;
    assert_eq!(row["text"], "Thursday at 3?");
    assert!(row["edited_at"].as_str().unwrap().starts_with("2026-11-28T16:06:00"), "{row}");
    let preview: String = sqlx::query_scalar("select last_message_preview from chats where id = $1")
        .bind(CHAT)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(preview, "Thursday at 3?", "the chat list shows the edited text");

    let events = events_of(&app, 2, EventType::MessageEdited).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let data = &events[0].data;
    assert_eq!(data["message_id"], id.as_str());
    assert_eq!(data.get("text"), None, "the text is carried once, in the message");
    assert_eq!(data["edited_at"], "2026-11-28T16:06:00.000Z");
    assert_eq!(data["message"]["text"], "Thursday at 3?");
    assert_eq!(data["message"]["edited"], true);
}

#[tokio::test]
async fn a_deletion_leaves_a_tombstone_that_takes_no_more_edits() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&message, "accepted").await;
    let deletion = update("message_deleted.json", &id);
    app.post_message_expect(&deletion, "accepted").await;
    app.post_message_expect(&deletion, "duplicate").await;
    app.post_message_expect(&edit(&id, "too late", "2026-11-28T16:20:00Z"), "ignored").await;

    assert_eq!(
        app.count(&format!("select count(*) from messages where id = '{id}'")).await,
        1,
        "the row stays"
    );
    let row = message_row(&app, &id).await;
    assert!(row["deleted_at"].as_str().unwrap().starts_with("2026-11-28T16:10:00"), "{row}");
    let preview: String = sqlx::query_scalar("select last_message_preview from chats where id = $1")
        .bind(CHAT)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(preview, "[deleted]");

    let events = events_of(&app, 2, EventType::MessageDeleted).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let data = &events[0].data;
    assert_eq!(data["message_id"], id.as_str());
    assert_eq!(data["deleted_at"], "2026-11-28T16:10:00.000Z");
    assert_eq!(data["message"]["deleted"], true);
    assert_eq!(data["message"]["text"], Value::Null, "a tombstone shows no text");
    assert_eq!(data["message"]["id"], id.as_str());
}

#[tokio::test]
async fn updates_that_overtake_their_message_are_kept_and_the_message_fills_them_in() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");

    app.post_message_expect(&reaction(&id, "👍", "sam", "2026-11-28T16:03:00Z"), "accepted").await;
    app.post_message_expect(&update("message_read.json", &id), "accepted").await;
    app.post_message_expect(&edit(&id, "edited before it arrived", "2026-11-28T16:06:00Z"), "accepted").await;
    let row = message_row(&app, &id).await;
    assert_eq!(row["placeholder"], true, "{row}");
    assert_eq!(
        app.count(&format!("select unread_count from chats where id = '{CHAT}'")).await,
        0,
        "a placeholder is not an unread message"
    );

    app.post_message_expect(&message, "accepted").await;
    app.post_message_expect(&message, "duplicate").await;

    let row = message_row(&app, &id).await;
    assert_eq!(row["placeholder"], false);
    assert_eq!(row["seen"], true);
    assert_eq!(row["reactions"][0]["value"], "👍");
    assert_eq!(row["text"], "edited before it arrived", "the newer edit is kept");
    assert_eq!(
        app.count(&format!("select unread_count from chats where id = '{CHAT}'")).await,
        0,
        "its read receipt came first: the user read it elsewhere already"
    );

    let events: Vec<Envelope> = app.stream_events(4, WAIT).await.into_iter().map(|(_, e)| e).collect();
    let kinds: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(
        kinds,
        [EventType::MessageReaction, EventType::MessageRead, EventType::MessageEdited, EventType::MessageNew]
    );
    assert_eq!(events[0].data["message"]["placeholder"], true);
    assert_eq!(events[3].data["message"]["id"], id.as_str());
    assert_eq!(
        events[3].data["message"]["text"], "edited before it arrived",
        "message:new shows what is stored"
    );
    assert_eq!(events[3].data["chat"]["unread_count"], 0);
}

#[tokio::test]
async fn a_message_overtaken_only_by_a_reaction_still_counts_as_unread() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&reaction(&id, "👍", "sam", "2026-11-28T16:03:00Z"), "accepted").await;
    app.post_message_expect(&message, "accepted").await;
    assert_eq!(app.count(&format!("select unread_count from chats where id = '{CHAT}'")).await, 1);
}

#[tokio::test]
async fn an_update_for_an_unknown_chat_creates_account_chat_and_placeholder() {
    let app = spawn_app().await;
    let mut read = update("message_read.json", "msg_never_seen");
    read["account_id"] = "acc_unknown".into();
    read["chat_id"] = "chat_unknown".into();
    app.post_message_expect(&read, "accepted").await;

    assert_eq!(app.count("select count(*) from accounts where id = 'acc_unknown'").await, 1);
    assert_eq!(app.count("select count(*) from chats where id = 'chat_unknown'").await, 1);
    let row = message_row(&app, "msg_never_seen").await;
    assert_eq!((row["placeholder"].clone(), row["seen"].clone()), (json!(true), json!(true)));
    let reads = events_of(&app, 1, EventType::MessageRead).await;
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].chat_id.as_deref(), Some("chat_unknown"));
}

#[tokio::test]
async fn concurrent_reactions_on_one_message_are_all_kept() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&message, "accepted").await;

    let people: Vec<String> = (0..24).map(|i| format!("person{i:02}")).collect();
    let posts = people.iter().map(|p| {
        let body = reaction(&id, "👍", p, "2026-11-28T16:03:00Z");
        let app = &app;
        async move { app.post_message(&body).await }
    });
    for (status, answer) in futures::future::join_all(posts).await {
        assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")), "{answer}");
    }
    let stored = message_row(&app, &id).await["reactions"].clone();
    let mut reactors: Vec<&str> =
        stored.as_array().unwrap().iter().map(|r| r["sender_id"].as_str().unwrap()).collect();
    reactors.sort();
    assert_eq!(reactors, people.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(events_of(&app, 25, EventType::MessageReaction).await.len(), 24);
}

#[tokio::test]
async fn an_account_status_change_updates_the_account_and_emits_account_status() {
    let app = spawn_app().await;
    let post = |body: Value| {
        let app = &app;
        async move {
            let response = app
                .post_raw("/api/webhooks/unipile/account-status", "application/json", body.to_string())
                .await;
            assert_eq!(response.status().as_u16(), 200);
            response.json::<Value>().await.unwrap()["status"].as_str().unwrap().to_owned()
        }
    };
    let credentials = fixture("account_status.json");
    assert_eq!(post(credentials.clone()).await, "accepted", "an unknown account is created");
    assert_eq!(post(credentials.clone()).await, "duplicate");
    let mut ok = credentials.clone();
    ok["AccountStatus"]["message"] = "OK".into();
    assert_eq!(post(ok).await, "accepted");

    let (status, account_type, changed): (String, String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("select status, account_type, status_changed_at from accounts where id = 'Lk2jH4gF6dS8aQ1wE3rT5y'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((status.as_str(), account_type.as_str()), ("OK", "LINKEDIN"));
    assert!(changed.is_some());

    let events = events_of(&app, 2, EventType::AccountStatus).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].account_id, "Lk2jH4gF6dS8aQ1wE3rT5y");
    assert_eq!(events[0].chat_id, None);
    assert_eq!(events[0].data["account"]["status"], "CREDENTIALS");
    assert_eq!(events[0].data["account"]["account_type"], "LINKEDIN");
    assert_eq!(events[1].data["account"]["status"], "OK");
    let subject = app.subjects.event("Lk2jH4gF6dS8aQ1wE3rT5y", None, EventType::AccountStatus);
    let stream = app.js.get_stream(&app.stream_name).await.unwrap();
    stream.get_last_raw_message_by_subject(&subject).await.expect("account events have no chat token");
}

#[tokio::test]
async fn an_unusable_account_status_is_dead_lettered() {
    let app = spawn_app().await;
    let response = app
        .post_raw(
            "/api/webhooks/unipile/account-status",
            "application/json",
            json!({"AccountStatus": {}}).to_string(),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "dead_lettered");
    assert_eq!(
        app.count("select count(*) from dead_letters where reason like 'unusable account status%'").await,
        1
    );
}

#[tokio::test]
async fn a_delivery_receipt_is_stored_once_without_an_event() {
    let app = spawn_app().await;
    let (id, message) = received("2026-11-28T16:02:11.000Z");
    app.post_message_expect(&message, "accepted").await;
    let mut delivered = update("message_read.json", &id);
    delivered["event"] = "message_delivered".into();
    app.post_message_expect(&delivered, "accepted").await;
    app.post_message_expect(&delivered, "duplicate").await;

    let delivered_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select delivered_at from messages where id = $1")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(delivered_at.is_some());
    assert_eq!(outbox_rows(&app).await, 1, "only message:new: the contract has no delivery event");
}
