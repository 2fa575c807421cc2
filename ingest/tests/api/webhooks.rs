//! What Unipile and a subscriber see when deliveries come in.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use shared::envelope::EventType;

use crate::helpers::{WEBHOOK_SECRET, fixture, message_received, spawn_app};

const MESSAGES: &str = "/api/webhooks/unipile/messages";
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_delivery_becomes_one_row_and_one_contract_envelope_on_jetstream() {
    let app = spawn_app().await;
    let delivery = fixture("message_received_whatsapp.json");
    app.post_message_expect(&delivery, "accepted").await;

    assert_eq!(app.count("select count(*) from messages where id = 'm1Qw2Er3Ty4Ui5Op6As7Dd'").await, 1);
    let events = app.stream_events(1, WAIT).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let (_, event) = &events[0];
    assert_eq!(event.event_type, EventType::MessageNew);
    assert_eq!(event.account_id, "Wq7hT2mXRbK9vLpA3sDfGh");
    assert_eq!(event.chat_id.as_deref(), Some("c4Rt8YuIoP1aSdFgHjKlZx"));
    assert_eq!(event.seq, None, "seq is set by fanout, not on NATS");
    let message = &event.data["message"];
    assert_eq!(message["id"], "m1Qw2Er3Ty4Ui5Op6As7Dd");
    assert_eq!(message["text"], "Are we still on for Thursday?");
    assert_eq!(message["account_type"], "WHATSAPP");
    assert_eq!(message["sender"]["name"], "Dana Reyes");
    assert_eq!(message["sender"]["provider_id"], "15105550199@s.whatsapp.net");
    assert_eq!(message["is_sender"], false);
    assert_eq!(message["timestamp"], "2026-11-28T16:02:11.000Z");
    assert_eq!(event.data["chat"]["unread_count"], 1);
    assert_eq!(event.data["chat"]["last_message_at"], "2026-11-28T16:02:11.000Z");

    // The subject carries the account and chat as their own tokens.
    let subject =
        app.subjects.event("Wq7hT2mXRbK9vLpA3sDfGh", Some("c4Rt8YuIoP1aSdFgHjKlZx"), EventType::MessageNew);
    let stream = app.js.get_stream(&app.stream_name).await.unwrap();
    let stored = stream.get_last_raw_message_by_subject(&subject).await.expect("event is on its subject");
    assert_eq!(
        stored.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.to_string()),
        Some(event.id.to_string()),
        "{:?}",
        stored.headers
    );
}

#[tokio::test]
async fn the_same_delivery_twice_is_one_row_and_one_event() {
    let app = spawn_app().await;
    let delivery = message_received("acc_dup", "chat_dup", false);
    app.post_message_expect(&delivery, "accepted").await;
    app.post_message_expect(&delivery, "duplicate").await;

    assert_eq!(app.count("select count(*) from messages").await, 1);
    assert_eq!(app.count("select unread_count from chats where id = 'chat_dup'").await, 1);
    // Wait long enough for a second event to have been published, then count.
    let events = app.stream_events(2, Duration::from_secs(2)).await;
    assert_eq!(events.len(), 1);
}

#[tokio::test]
async fn a_missing_or_wrong_secret_is_401_and_nothing_is_stored() {
    let app = spawn_app().await;
    let body = message_received("acc_auth", "chat_auth", false).to_string();
    for secret in [None, Some("wrong"), Some(""), Some(&WEBHOOK_SECRET[..WEBHOOK_SECRET.len() - 1])] {
        let mut request = app.client.post(app.url(MESSAGES)).body(body.clone());
        if let Some(secret) = secret {
            request = request.header("Unipile-Auth", secret);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "secret {secret:?}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "unauthorized");
    }
    assert_eq!(app.count("select count(*) from messages").await, 0);
    assert_eq!(app.count("select count(*) from dead_letters").await, 0);
    assert_eq!(app.count("select count(*) from outbox").await, 0);
}

#[tokio::test]
async fn json_labelled_as_form_data_is_accepted() {
    let app = spawn_app().await;
    let delivery = message_received("acc_form", "chat_form", false);
    let response = app.post_raw(MESSAGES, "application/x-www-form-urlencoded", delivery.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "accepted");
    assert_eq!(app.count("select count(*) from messages").await, 1);
}

#[tokio::test]
async fn every_payload_quirk_is_accepted_and_normalised() {
    let app = spawn_app().await;
    // A bare attachment object with string numbers (LinkedIn).
    app.post_message_expect(&fixture("message_received_linkedin.json"), "accepted").await;
    let attachments: Value =
        sqlx::query_scalar("select attachments from messages where id = 'Pq1Wo2Ei3Ru4Ty5Yt6Ur7I'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(attachments.as_array().map(Vec::len), Some(1));
    assert_eq!(attachments[0]["file_name"], "partnership-deck.pdf");

    // Booleans as strings, a null message, an unknown field, a numeric timestamp.
    let mut odd = message_received("acc_quirk", "chat_quirk", false);
    odd["is_sender"] = json!("true");
    odd["message"] = Value::Null;
    odd["brand_new_field"] = json!({"nested": [1, 2]});
    odd["timestamp"] = json!(1764345731000_i64);
    odd["attachments"] = json!({"id": "att1", "size": {"width": "10"}});
    app.post_message_expect(&odd, "accepted").await;
    let (is_sender, text, raw): (bool, Option<String>, Value) =
        sqlx::query_as("select is_sender, text, raw from messages where chat_id = 'chat_quirk'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(is_sender, "\"true\" reads as true");
    assert_eq!(text, None);
    assert_eq!(raw["brand_new_field"]["nested"][1], 2, "the raw payload is kept whole");
    assert_eq!(app.count("select unread_count from chats where id = 'chat_quirk'").await, 0);

    // Ids as numbers.
    let mut numeric = message_received("acc_quirk", "chat_quirk", false);
    numeric["message_id"] = json!(123456789);
    app.post_message_expect(&numeric, "accepted").await;
    assert_eq!(app.count("select count(*) from messages where id = '123456789'").await, 1);
}

#[tokio::test]
async fn unusable_bodies_are_dead_lettered_with_a_reason_and_answered_200() {
    let app = spawn_app().await;
    let mut missing_chat = message_received("acc_dl", "chat_dl", false);
    missing_chat.as_object_mut().unwrap().remove("chat_id");
    let mut unknown_event = message_received("acc_dl", "chat_dl", false);
    unknown_event["event"] = json!("message_teleported");
    let cases: [(&str, String); 4] = [
        ("not JSON", "this is { not json".to_owned()),
        ("not an object", "[1,2,3]".to_owned()),
        ("chat_id", missing_chat.to_string()),
        ("message_teleported", unknown_event.to_string()),
    ];
    for (reason_part, body) in &cases {
        let response = app.post_raw(MESSAGES, "application/json", body.clone()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap()["status"], "dead_lettered");
        let (reason, stored): (String, Vec<u8>) =
            sqlx::query_as("select reason, body from dead_letters order by id desc limit 1")
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert!(reason.contains(reason_part), "reason {reason:?} should mention {reason_part:?}");
        assert_eq!(&stored, body.as_bytes(), "the body is kept byte for byte");
    }
    assert_eq!(app.count("select count(*) from messages").await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let mut big = message_received("acc_big", "chat_big", false);
    big["message"] = "x".repeat(1024 * 1024 + 1).into();
    let response = app.post_raw(MESSAGES, "application/json", big.to_string()).await;
    assert_eq!(response.status(), 413);
    assert_eq!(app.count("select count(*) from messages").await, 0);
}

/// A client that keeps sending after the 413 (a raw socket, not an HTTP library that
/// stops at the first answer) reads it. A server that closes a socket with unread input
/// makes its kernel answer with a reset, and a reset lets the client's stack throw away
/// what it had received and not yet read (RFC 9293 §3.10.7.4: Windows does, and so does
/// any stack when the reset overtakes the answer): the client sees ECONNRESET or EOF and
/// no status line. So the server must close lingering (RFC 9112 §9.6): answer, stop
/// writing, read and discard for a bounded while, and only then close. The client sees
/// the 413, no reset while it sends the rest of what it declared, and a clean end.
#[tokio::test]
async fn a_client_still_sending_an_oversized_body_reads_the_413_and_is_not_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app().await;
    let length: usize = 1_150_000;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let head = format!(
        "POST {MESSAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nUnipile-Auth: {WEBHOOK_SECRET}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // Past the 1 MiB limit at once (the server answers 413 there), then the rest of the
    // declared body in small pieces with pauses, as a client on a slower link would.
    let first = 1024 * 1024 + 16 * 1024;
    tcp.write_all(&vec![b'x'; first]).await.unwrap();
    let mut sent = first;
    let mut reset = None;
    while sent < length {
        let piece = (length - sent).min(4096);
        if let Err(error) = tcp.write_all(&vec![b'x'; piece]).await {
            reset = Some(error);
            break;
        }
        sent += piece;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await.expect("the server closes");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        reset.is_none(),
        "reset while still sending, after {sent} of {length} bytes ({reset:?}); read {answer:?}"
    );
    assert!(read.is_ok(), "the connection ends cleanly after the answer, not with {read:?}; read {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert_eq!(app.count("select count(*) from messages").await, 0);
}

#[tokio::test]
async fn unread_counts_only_messages_from_others() {
    let app = spawn_app().await;
    for is_sender in [false, true, false, true, false] {
        app.post_message_expect(&message_received("acc_unread", "chat_unread", is_sender), "accepted").await;
    }
    assert_eq!(app.count("select unread_count from chats where id = 'chat_unread'").await, 3);
    let events = app.stream_events(5, WAIT).await;
    let counts: Vec<i64> =
        events.iter().map(|(_, e)| e.data["chat"]["unread_count"].as_i64().unwrap()).collect();
    assert_eq!(counts, vec![1, 1, 2, 2, 3], "each event carries the count after its message");
}

#[tokio::test]
async fn ids_with_subject_special_characters_stay_in_their_own_subject() {
    let app = spawn_app().await;
    // An account id that would be a wildcard and extra tokens if written raw.
    let tricky = "acc.*.> x";
    // A watcher of the plain account `acc`: it must never see the tricky account's event.
    let nats = async_nats::connect(app.nats_url.as_str()).await.unwrap();
    let mut watcher = nats.subscribe(app.subjects.account("acc")).await.unwrap();
    let mut everything = nats.subscribe(app.subjects.all()).await.unwrap();
    nats.flush().await.unwrap();

    app.post_message_expect(&message_received(tricky, "chat.with dots", false), "accepted").await;
    let stored: String =
        sqlx::query_scalar("select account_id from messages").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, tricky);

    let seen = tokio::time::timeout(WAIT, everything.next()).await.expect("event published").unwrap();
    let parts = app.subjects.parse(&seen.subject).expect("subject follows the scheme");
    assert_eq!(parts.account_id, tricky);
    assert_eq!(parts.chat_id.as_deref(), Some("chat.with dots"));
    assert_eq!(seen.subject.split('.').count(), app.subjects.prefix().split('.').count() + 3);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watcher.next()).await.is_err(),
        "account `acc` must not receive another account's event"
    );
}

#[tokio::test]
async fn concurrent_deliveries_are_each_answered_after_commit() {
    let app = spawn_app().await;
    // New chats shared by deliveries in a scrambled order, so concurrent batches create
    // and update the same chats in different orders: they must not deadlock.
    let deliveries: Vec<Value> = (0..400)
        .map(|i| message_received(&format!("acc{}", i % 3), &format!("chat{}", (i * 7919) % 61), i % 4 == 0))
        .collect();
    let answers = futures::future::join_all(deliveries.iter().map(|d| app.post_message(d))).await;
    assert!(answers.iter().all(|(code, body)| *code == 200 && body["status"] == "accepted"), "{answers:?}");
    assert_eq!(app.count("select count(*) from messages").await, 400);
    assert_eq!(app.count("select sum(unread_count)::bigint from chats").await, 300);
    let events = app.stream_events(400, WAIT).await;
    assert_eq!(events.len(), 400);
    let mut ids: Vec<String> =
        events.iter().map(|(_, e)| e.data["message"]["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400, "one event per message");
}
