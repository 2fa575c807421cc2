//! What a stranger can put in a delivery gets a defined outcome and costs no other
//! delivery: U+0000, over-long ids, impossible timestamps, numbers out of range, broken
//! encodings, events larger than NATS accepts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use ingest::outbox::Sizer;
use ingest::store::{Batcher, NewMessage, Outcome, StoreError, Write};
use serde_json::{Value, json};
use shared::envelope::EventType;
use uuid::Uuid;

use crate::helpers::{Options, TestApp, fixture, message_received, spawn_app, spawn_app_with};

const MESSAGES: &str = "/api/webhooks/unipile/messages";

fn fresh_id(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

async fn text_of(app: &TestApp, message_id: &str) -> Option<String> {
    sqlx::query_scalar("select text from messages where id = $1")
        .bind(message_id)
        .fetch_one(&app.db)
        .await
        .expect("the message is stored")
}

/// The events of the stream by type, once it holds `n`.
async fn events(app: &TestApp, n: usize) -> Vec<shared::envelope::Envelope> {
    app.stream_events(n, Duration::from_secs(10)).await.into_iter().map(|(_, e)| e).collect()
}

#[tokio::test]
async fn u0000_in_text_sender_name_attachment_name_and_a_key_is_stored_and_delivered() {
    let app = spawn_app().await;
    let mut body = message_received("acc_nul", &fresh_id("chat"), false);
    let id = body["message_id"].as_str().unwrap().to_owned();
    body["message"] = json!("before\u{0}after");
    body["sender"]["attendee_name"] = json!("Dana\u{0}Reyes");
    body["attachments"] = json!([{"id": "att_1", "file_name": "report\u{0}.pdf", "type": "file"}]);
    body["provider_specifics"] = json!({"weird\u{0}key": "value"});
    assert!(body.to_string().contains("\\u0000"), "the body carries U+0000 escapes");

    app.post_message_expect(&body, "accepted").await;

    assert_eq!(text_of(&app, &id).await.as_deref(), Some("before\u{fffd}after"));
    let raw: Value = sqlx::query_scalar("select raw from messages where id = $1")
        .bind(&id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(raw["provider_specifics"]["weird\u{fffd}key"], "value", "keys are scrubbed too");
    let events = events(&app, 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let message = &events[0].data["message"];
    assert_eq!(message["text"], "before\u{fffd}after");
    assert_eq!(message["sender"]["name"], "Dana\u{fffd}Reyes");
    assert_eq!(message["attachments"][0]["file_name"], "report\u{fffd}.pdf");
    assert_eq!(app.count("select count(*) from dead_letters").await, 0);
}

#[tokio::test]
async fn ids_over_255_bytes_are_dead_lettered_with_a_named_reason_and_the_raw_body() {
    let app = spawn_app().await;
    let mut body = message_received("acc_long", "chat_long", false);
    body["message_id"] = json!("m".repeat(3000));
    let bytes = body.to_string();
    let response = app.post_raw(MESSAGES, "application/json", bytes.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "dead_lettered");
    let (reason, stored): (String, Vec<u8>) =
        sqlx::query_as("select reason, body from dead_letters").fetch_one(&app.db).await.unwrap();
    assert!(reason.contains("id_too_long"), "{reason}");
    assert_eq!(stored, bytes.as_bytes(), "the body is kept byte for byte");

    // At the limit it is stored.
    let mut body = message_received("acc_long", "chat_long", false);
    body["message_id"] = json!("m".repeat(255));
    app.post_message_expect(&body, "accepted").await;
}

#[tokio::test]
async fn timestamps_outside_1970_to_9999_take_the_time_of_receipt() {
    let app = spawn_app().await;
    for timestamp in [json!("+300000-01-01T00:00:00Z"), json!(8_000_000_000_000_000i64), json!(-5)] {
        let mut body = message_received("acc_time", &fresh_id("chat"), false);
        body["timestamp"] = timestamp.clone();
        let before = Utc::now() - chrono::Duration::seconds(1);
        app.post_message_expect(&body, "accepted").await;
        let sent_at: chrono::DateTime<Utc> = sqlx::query_scalar("select sent_at from messages where id = $1")
            .bind(body["message_id"].as_str().unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert!(sent_at >= before && sent_at <= Utc::now(), "{timestamp} stored as {sent_at}");
    }
}

#[tokio::test]
async fn numbers_out_of_range_lone_surrogates_and_invalid_utf8_are_repaired_and_stored() {
    let app = spawn_app().await;
    let mut body = message_received("acc_repair", &fresh_id("chat"), false);
    body["message"] = json!("TEXT");
    body["reaction_count"] = json!("NUMBER");
    let template = body.to_string();
    let bytes = template
        .replacen("\"TEXT\"", "\"caf\\ud800\u{e9} \\udfff\"", 1)
        .replacen("\"NUMBER\"", "1e400", 1)
        .into_bytes();
    let mut bytes = bytes;
    let at = bytes.windows(4).position(|w| w == b"caf\\").unwrap();
    bytes.insert(at, 0xff); // one byte that is not UTF-8, just before the text
    assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "a strict parser refuses this body");

    let response = app.post_raw(MESSAGES, "application/json", bytes).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "accepted");
    let id = body["message_id"].as_str().unwrap();
    assert_eq!(text_of(&app, id).await.as_deref(), Some("\u{fffd}caf\u{fffd}\u{e9} \u{fffd}"));
    let raw: Value = sqlx::query_scalar("select raw from messages where id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(raw["reaction_count"], "1e400", "the number's literal is kept as text");
}

#[tokio::test]
async fn rest_ids_and_cursors_postgres_cannot_hold_are_answered_4xx() {
    let app = spawn_app().await;
    let token = app.jwt.issue("user-1", vec!["*".to_owned()], Duration::from_secs(600));
    let get = |path: String| app.client.get(app.url(&path)).bearer_auth(&token).send();
    assert_eq!(get("/api/chats/a%00b/messages".into()).await.unwrap().status(), 404);
    let long = "c".repeat(3000);
    assert_eq!(get(format!("/api/chats/{long}/messages")).await.unwrap().status(), 404);
    let read = app.client.post(app.url("/api/chats/a%00b/read")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(read.status(), 404);
}

/// A batcher of the test's own over the test database, to submit writes that skip the
/// webhook's checks: the database itself must refuse them.
async fn batcher(app: &TestApp) -> (Batcher, tokio::task::JoinSet<anyhow::Result<()>>) {
    let nats = async_nats::connect(app.nats_url.as_str()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    let args = ingest::config::BatchArgs {
        batch_max_size: 256,
        batch_workers: 1,
        // A wide window so the whole burst lands in one batch.
        batch_window_us: 200_000,
        batch_queue: 1024,
    };
    let sizer = Sizer { text_max_bytes: 64 * 1024, nats };
    let batcher = Batcher::spawn(
        app.db.clone(),
        app.subjects.clone(),
        sizer,
        &args,
        ingest::store::AfterCommit::WakeRelay(Arc::new(Default::default())),
        &mut tasks,
    );
    (batcher, tasks)
}

fn random_id(len: usize) -> String {
    std::iter::repeat_with(|| Uuid::new_v4().simple().to_string())
        .flat_map(|s| s.into_bytes())
        .take(len)
        .map(char::from)
        .collect()
}

fn new_message(chat_id: &str, message_id: &str, text: &str) -> NewMessage {
    let event = serde_json::from_value(message_received("acc_batch", chat_id, false)).unwrap();
    let mut message = NewMessage::from_webhook(&event, Value::Null, Utc::now());
    message.message_id = message_id.to_owned();
    message.text = Some(text.to_owned());
    message.raw = None;
    message
}

#[tokio::test]
async fn a_write_the_database_refuses_is_rejected_alone_and_its_batch_neighbours_commit() {
    let app = spawn_app().await;
    let (batcher, _tasks) = batcher(&app).await;
    // 40 writes at once: one text PostgreSQL refuses (U+0000 past every check), one id
    // too long for the primary key's index (random, so compression cannot save it), 38
    // clean ones spread over a few chats.
    let mut writes = Vec::new();
    for i in 0..40 {
        let chat = format!("chat_{}", i % 5);
        let message = match i {
            13 => new_message(&chat, "poison_nul", "bad\u{0}text"),
            27 => new_message(&chat, &random_id(8000), "long id"),
            _ => new_message(&chat, &format!("clean_{i:02}"), "fine"),
        };
        writes.push(Write::Message(message));
    }
    let answers = futures::future::join_all(writes.into_iter().map(|w| {
        let batcher = batcher.clone();
        async move { batcher.submit(w).await }
    }))
    .await;

    for (i, answer) in answers.iter().enumerate() {
        match i {
            13 | 27 => assert!(matches!(answer, Err(StoreError::Rejected { .. })), "write {i}: {answer:?}"),
            _ => assert!(matches!(answer, Ok(Outcome::Accepted)), "write {i}: {answer:?}"),
        }
    }
    let Err(StoreError::Rejected { reason }) = &answers[13] else { unreachable!() };
    assert!(reason.contains("22021") || reason.to_lowercase().contains("0x00"), "{reason}");
    assert_eq!(app.count("select count(*) from messages where id like 'clean_%'").await, 38);
    assert_eq!(app.count("select count(*) from messages where id not like 'clean_%'").await, 0);
    // Their events kept the order of the queue.
    let outbox: Vec<String> = sqlx::query_scalar(
        "select convert_from(payload, 'UTF8')::jsonb #>> '{data,message,id}' from outbox order by id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let expected: Vec<String> =
        (0..40).filter(|i| *i != 13 && *i != 27).map(|i| format!("clean_{i:02}")).collect();
    assert_eq!(outbox, expected);
}

#[tokio::test]
async fn a_refused_delivery_through_the_webhook_is_dead_lettered_and_its_neighbours_accepted() {
    let app = spawn_app().await;
    // 40 deliveries at once, two of them poisoned as the issue measured: U+0000 in the
    // text and a 3,000-byte id.
    let mut bodies = Vec::new();
    for i in 0..40 {
        let mut body = message_received("acc_burst", &format!("chat_{}", i % 4), false);
        match i {
            7 => body["message"] = json!("nul \u{0} inside"),
            21 => body["message_id"] = json!("y".repeat(3000)),
            _ => {}
        }
        bodies.push(body);
    }
    let answers = futures::future::join_all(bodies.iter().map(|b| app.post_message(b))).await;
    for (i, (status, answer)) in answers.iter().enumerate() {
        let expected = if i == 21 { "dead_lettered" } else { "accepted" };
        assert_eq!((*status, answer["status"].as_str()), (200, Some(expected)), "delivery {i}: {answer}");
    }
    assert_eq!(app.count("select count(*) from messages").await, 39);
    assert_eq!(app.count("select count(*) from dead_letters").await, 1);
}

fn huge(c: char, bytes: usize) -> String {
    std::iter::repeat_n(c, bytes).collect()
}

#[tokio::test]
async fn a_900_kb_message_and_its_edit_are_delivered_truncated_and_nothing_after_them_waits() {
    let app = spawn_app().await;
    let chat = fresh_id("chat");
    let mut message = message_received("acc_big", &chat, false);
    let id = message["message_id"].as_str().unwrap().to_owned();
    let text = huge('a', 900 * 1024);
    message["message"] = json!(text);
    message["timestamp"] = json!("2026-12-01T10:00:00.000Z");
    app.post_message_expect(&message, "accepted").await;

    let mut edit = fixture("message_edited.json");
    edit["account_id"] = json!("acc_big");
    edit["chat_id"] = json!(chat);
    edit["message_id"] = json!(id);
    edit["timestamp"] = json!("2026-12-01T10:05:00.000Z");
    let edited_text = format!("{}é", huge('b', 900 * 1024));
    edit["message"] = json!(edited_text);
    app.post_message_expect(&edit, "accepted").await;

    // A normal delivery right after reaches the stream within a second.
    let subscriber = async_nats::connect(app.nats_url.as_str()).await.unwrap();
    let mut live = subscriber.subscribe(app.subjects.all()).await.unwrap();
    subscriber.flush().await.unwrap();
    let normal = message_received("acc_big", &chat, false);
    let normal_id = normal["message_id"].as_str().unwrap().to_owned();
    let sent = tokio::time::Instant::now();
    app.post_message_expect(&normal, "accepted").await;
    let arrived = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(m) = live.next().await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["data"]["message"]["id"] == normal_id.as_str() {
                return;
            }
        }
    })
    .await;
    assert!(arrived.is_ok(), "the normal delivery did not arrive within 1 s ({:?})", sent.elapsed());

    let events = events(&app, 3).await;
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, [EventType::MessageNew, EventType::MessageEdited, EventType::MessageNew]);
    let mut seen = HashMap::new();
    for event in &events {
        *seen.entry(event.id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "no event twice");
    let (new, edited) = (&events[0], &events[1]);
    assert!(new.truncated && edited.truncated, "both say they were cut");
    assert!(!events[2].truncated);
    let cut = new.data["message"]["text"].as_str().unwrap();
    assert_eq!(cut.len(), 64 * 1024, "cut at the default cap");
    assert!(text.starts_with(cut));
    assert!(edited.data["message"]["text"].as_str().unwrap().starts_with("bbbb"));
    assert_eq!(edited.data.get("text"), None, "the edit carries its text once");
    // PostgreSQL keeps the whole text, for REST.
    assert_eq!(text_of(&app, &id).await.map(|t| t.len()), Some(edited_text.len()));
    assert_eq!(app.count("select count(*) from outbox where parked_at is not null").await, 0);
}

#[tokio::test]
async fn an_event_too_large_for_the_server_is_parked_and_the_rows_after_it_are_published() {
    let app = spawn_app().await;
    // An outbox row written under a larger max_payload (another server, older settings):
    // between two ordinary events, it must not hold them up or break the connection.
    app.post_message_expect(&message_received("acc_park", "chat_park", false), "accepted").await;
    events(&app, 1).await;
    let oversized = json!({"type": "message:new", "id": Uuid::now_v7(), "account_id": "acc_park",
        "chat_id": "chat_park", "occurred_at": "2026-12-01T10:00:00.000Z",
        "data": {"message": {"text": huge('z', 2 * 1024 * 1024)}}});
    let subject = app.subjects.event("acc_park", Some("chat_park"), EventType::MessageNew);
    sqlx::query("insert into outbox (event_id, subject, payload) values ($1, $2, $3)")
        .bind(Uuid::parse_str(oversized["id"].as_str().unwrap()).unwrap())
        .bind(&subject)
        .bind(oversized.to_string().into_bytes())
        .execute(&app.db)
        .await
        .unwrap();
    app.post_message_expect(&message_received("acc_park", "chat_park", false), "accepted").await;

    let events = events(&app, 2).await;
    assert_eq!(events.len(), 2, "the two ordinary events, once each");
    // The relay records a round's parked rows when the round ends, which may be just
    // after the events of that round reached the stream.
    let mut reason: Option<String> = None;
    for _ in 0..50 {
        reason = sqlx::query_scalar("select park_reason from outbox where parked_at is not null")
            .fetch_optional(&app.db)
            .await
            .unwrap();
        if reason.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reason.as_deref().is_some_and(|r| r.starts_with("too_large")), "{reason:?}");
    // And the connection stayed up: later deliveries flow as before.
    app.post_message_expect(&message_received("acc_park", "chat_park", false), "accepted").await;
    assert_eq!(app.stream_events(3, Duration::from_secs(5)).await.len(), 3);
}

#[tokio::test]
async fn rows_acked_in_a_round_whose_other_acks_never_come_are_not_published_again() {
    // A round in which one row's ack never comes (the connection stalls, or nobody
    // answers): the rows JetStream did ack are marked published, and are not sent again
    // once the duplicate window (1 s here) has passed.
    let app = spawn_app_with(Options {
        extra_args: vec![
            "--stream-duplicate-window-secs=1".into(),
            "--outbox-ack-timeout-ms=500".into(),
            "--outbox-batch=64".into(),
        ],
        ..Options::default()
    })
    .await;
    app.post_message_expect(&message_received("acc_stall", "chat_stall", false), "accepted").await;
    events(&app, 1).await;
    // A subject outside the stream with a subscriber that never answers: the publish
    // is taken, and its ack never arrives.
    let nats = async_nats::connect(app.nats_url.as_str()).await.unwrap();
    let silent = format!("{}_silent.x", app.subjects.all().trim_end_matches(".>"));
    let _listener = nats.subscribe(silent.clone()).await.unwrap();
    nats.flush().await.unwrap();
    sqlx::query("insert into outbox (event_id, subject, payload) values ($1, $2, '{}')")
        .bind(Uuid::now_v7())
        .bind(&silent)
        .execute(&app.db)
        .await
        .unwrap();
    for _ in 0..20 {
        app.post_message(&message_received("acc_stall", "chat_stall", false)).await;
    }
    // Several failed rounds, each past the duplicate window.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = app.read_stream().await;
    assert_eq!(events.len(), 21, "each event once: {}", events.len());
    let attempts: i32 = sqlx::query_scalar("select attempts from outbox where subject = $1")
        .bind(&silent)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(attempts >= 2, "the stalled row was tried again ({attempts})");
}
