//! Nothing acknowledged is lost when NATS or the database go away.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{DbProxy, NatsServer, Options, admin_database_url, message_received, spawn_app_with};

#[tokio::test]
async fn webhooks_taken_while_nats_is_down_reach_jetstream_when_it_returns() {
    let mut nats = NatsServer::start().await;
    let app = spawn_app_with(Options { nats_url: nats.url(), ..Options::default() }).await;
    app.post_message_expect(&message_received("acc_out", "chat_out", false), "accepted").await;
    assert_eq!(
        app.stream_events(1, Duration::from_secs(10)).await.len(),
        1,
        "stream is up before the outage"
    );

    nats.stop();
    let during: Vec<Value> =
        (0..20).map(|i| message_received("acc_out", &format!("chat_out{}", i % 3), false)).collect();
    for delivery in &during {
        app.post_message_expect(delivery, "accepted").await;
    }
    assert_eq!(
        app.count("select count(*) from outbox where published_at is null").await,
        20,
        "events wait in the outbox while NATS is down"
    );

    // Stay down for a few sweeper rounds, so the relay really fails and backs off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart().await;
    let events = app.stream_events(21, Duration::from_secs(60)).await;
    let published: HashSet<String> =
        events.iter().map(|(_, e)| e.data["message"]["id"].as_str().unwrap().to_owned()).collect();
    for delivery in &during {
        assert!(
            published.contains(delivery["message_id"].as_str().unwrap()),
            "{} missing",
            delivery["message_id"]
        );
    }
    assert_eq!(events.len(), 21, "each event exactly once");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.count("select count(*) from outbox where published_at is null").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "outbox rows are marked published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn with_the_database_unreachable_webhooks_get_503_and_nothing_is_half_written() {
    let target = reqwest::Url::parse(&admin_database_url()).unwrap();
    let proxy =
        DbProxy::start(&format!("{}:{}", target.host_str().unwrap(), target.port().unwrap_or(5432))).await;
    let app = spawn_app_with(Options { database_port: Some(proxy.port), ..Options::default() }).await;
    app.post_message_expect(&message_received("acc_db", "chat_db_before", false), "accepted").await;

    proxy.cut();
    let lost = message_received("acc_db", "chat_db_during", false);
    for _ in 0..3 {
        let (status, body) = app.post_message(&lost).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(!message.contains("database") && !message.contains("pool"), "no internals: {message}");
    }
    // The answer names the request, for the logs.
    let response = app.post_raw("/api/webhooks/unipile/messages", "application/json", lost.to_string()).await;
    assert_eq!(response.status(), 503);
    let id = response.headers().get("x-request-id").expect("a request id").to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let id = lost["message_id"].as_str().unwrap();
    let message_rows: i64 = sqlx::query_scalar("select count(*) from messages where id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(message_rows, 0);
    assert_eq!(app.count("select count(*) from chats where id = 'chat_db_during'").await, 0);
    assert_eq!(
        app.count("select count(*) from outbox").await,
        1,
        "only the event committed before the outage"
    );
}
