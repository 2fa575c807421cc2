//! What a connected client receives, and the small client protocol.

use fanout::frames::ServerFrame;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Frame, spawn_app, token};

#[tokio::test]
async fn hello_comes_first_with_the_latest_sequence() {
    let app = spawn_app().await;
    let seq = app.events.publish("acc_a", Some("chat_1"), json!({})).await;
    // The event may reach the replica just after we connect; ping until it has.
    let mut client = app.connect(&token(&["*"]), None).await;
    let hello = client.hello().await;
    assert_eq!(hello["heartbeat_s"], 30);
    assert!(hello["connection_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(hello.get("recovered").is_none(), "no since, no recovered: {hello}");
    let head = hello["seq"].as_u64().unwrap();
    assert!(head == seq || head == seq - 1, "hello seq {head} vs published {seq}");
}

#[tokio::test]
async fn an_event_arrives_with_its_stream_sequence_and_the_envelope_fields() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["acc_a"]), None).await;
    let seq = app.events.publish("acc_a", Some("chat_1"), json!({"text": "hi"})).await;
    let event = client.event().await;
    assert_eq!(event["seq"], seq);
    assert_eq!(event["type"], "message:new");
    assert_eq!(event["account_id"], "acc_a");
    assert_eq!(event["chat_id"], "chat_1");
    assert_eq!(event["data"]["text"], "hi");
    assert!(event["occurred_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn a_client_sees_only_its_accounts_and_the_wildcard_sees_all() {
    let app = spawn_app().await;
    let (mut only_a, _) = app.connect_hello(&token(&["acc_a"]), None).await;
    let (mut a_and_c, _) = app.connect_hello(&token(&["acc_a", "acc_c"]), None).await;
    let (mut all, _) = app.connect_hello(&token(&["*"]), None).await;
    let b = app.events.publish("acc_b", Some("chat_b"), json!({})).await;
    let a = app.events.publish("acc_a", Some("chat_a"), json!({})).await;
    let c = app.events.publish("acc_c", None, json!({})).await;
    // Events arrive in stream order, so an A client's first event being A's means it
    // never got B's, which came before.
    assert_eq!(only_a.seqs(1).await, vec![a]);
    assert_eq!(only_a.ping().await, ServerFrame::Pong, "nothing else queued for A");
    assert_eq!(a_and_c.seqs(2).await, vec![a, c]);
    assert_eq!(all.seqs(3).await, vec![b, a, c]);
}

#[tokio::test]
async fn ping_gets_pong() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    assert_eq!(client.ping().await, ServerFrame::Pong);
}

#[tokio::test]
async fn subscribe_narrows_to_the_chats_listed_and_an_empty_list_widens_again() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["acc_a"]), None).await;
    client.send_json(json!({"type": "subscribe", "chat_ids": ["chat_1"]})).await;
    assert_eq!(client.json().await, json!({"type": "subscribed", "chat_ids": ["chat_1"]}));
    app.events.publish("acc_a", Some("chat_2"), json!({})).await;
    let wanted = app.events.publish("acc_a", Some("chat_1"), json!({})).await;
    let account_event = app.events.publish("acc_a", None, json!({})).await;
    assert_eq!(client.seqs(2).await, vec![wanted, account_event], "chat_2 filtered out, account events pass");
    client.send_json(json!({"type": "subscribe", "chat_ids": []})).await;
    assert_eq!(client.json().await["type"], "subscribed");
    let other = app.events.publish("acc_a", Some("chat_2"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![other]);
}

#[tokio::test]
async fn unknown_and_malformed_messages_get_an_error_frame_and_the_socket_stays_open() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    client.send_json(json!({"type": "dance"})).await;
    assert_eq!(client.json().await["code"], "unknown_type");
    client.send(Message::text("not json")).await;
    assert_eq!(client.json().await["code"], "invalid_message");
    client.send_json(json!({"type": "subscribe", "chat_ids": "nope"})).await;
    assert_eq!(client.json().await["code"], "invalid_message");
    client.send(Message::binary(vec![1, 2, 3])).await;
    let error = client.json().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("binary_not_supported"))
    );
    client.send(Message::text(format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(5000)))).await;
    assert_eq!(client.json().await["code"], "too_large");
    assert_eq!(client.ping().await, ServerFrame::Pong, "still open and working");
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    client.send(Message::text("x".repeat(4096 * 16 + 1))).await;
    let (code, _, _) = client.until_close().await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn a_flood_of_invalid_messages_closes_with_1008() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    for _ in 0..25 {
        client.send_json(json!({"type": "nonsense"})).await;
    }
    let (code, reason, errors) = client.until_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert_eq!(errors.len(), 20, "one error frame per invalid message until the limit");
}

#[tokio::test]
async fn the_server_pings_and_drops_a_peer_that_never_answers() {
    let app = crate::helpers::spawn_app_with(|c| c.heartbeat_secs = 1).await;
    let mut client = app.connect(&token(&["*"]), None).await;
    client.hello().await;
    // From here the client reads nothing: tungstenite answers pings only while
    // reading, so to the server this peer is dead and gets dropped.
    crate::helpers::wait_until("the server to drop the silent peer", || async {
        let ready: serde_json::Value = reqwest::get(app.url("/readyz")).await.unwrap().json().await.unwrap();
        ready["connections"] == 0
    })
    .await;
    match client.frame().await {
        Frame::Ended | Frame::Close(..) => {}
        Frame::Json(v) => panic!("expected the connection to be gone, got {v}"),
    }
}
