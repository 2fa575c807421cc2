//! Publishing right after commit: events reach JetStream without a relay round, once
//! each, in the order their transactions committed.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use uuid::Uuid;

use crate::helpers::{Options, message_received, spawn_app_with};

#[tokio::test]
async fn events_reach_jetstream_by_the_handoff_with_the_relay_asleep_and_are_marked_published() {
    // The relay sweeps once at start-up and then not for an hour: whatever reaches the
    // stream came through the handoff.
    let app = spawn_app_with(Options {
        extra_args: vec!["--outbox-sweep-ms=3600000".into()],
        ..Options::default()
    })
    .await;
    let deliveries: Vec<_> =
        (0..40).map(|i| message_received("acc_hand", &format!("chat_hand{}", i % 4), false)).collect();
    let answers = join_all(deliveries.iter().map(|d| app.post_message(d))).await;
    assert!(answers.iter().all(|(code, a)| *code == 200 && a["status"] == "accepted"), "{answers:?}");

    let events = app.stream_events(40, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 40, "every event, once");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.count("select count(*) from outbox where published_at is null").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the handoff marks its rows published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let published: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"outbox_handoff_total{outcome="published"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(published >= 40.0, "counted as published by the handoff: {published}");
}

#[tokio::test]
async fn concurrent_deliveries_to_one_chat_reach_the_stream_in_commit_order_once_each() {
    // Four writers commit overlapping batches; the chat's lock orders them, and the
    // stream must hold the chat's events in that order (the outbox ids'), none twice.
    let app = spawn_app_with(Options::default()).await;
    for round in 0..10 {
        let deliveries: Vec<_> =
            (0..20).map(|_| message_received("acc_order", "chat_order", false)).collect();
        let answers = join_all(deliveries.iter().map(|d| app.post_message(d))).await;
        assert!(answers.iter().all(|(code, _)| *code == 200), "round {round}: {answers:?}");
    }
    let events = app.stream_events(200, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 200, "each event once");
    let committed: Vec<Uuid> =
        sqlx::query_scalar("select event_id from outbox order by id").fetch_all(&app.db).await.unwrap();
    let streamed: Vec<Uuid> = events.iter().map(|(_, e)| e.id).collect();
    assert_eq!(streamed, committed, "stream order is commit order");
    let mut seen = HashMap::new();
    for id in &streamed {
        *seen.entry(id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1));
}

#[tokio::test]
async fn with_the_handoff_off_the_relay_publishes_everything() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--outbox-publish-after-commit=false".into()],
        ..Options::default()
    })
    .await;
    for i in 0..10 {
        app.post_message_expect(
            &message_received("acc_relay", &format!("chat_relay{}", i % 2), false),
            "accepted",
        )
        .await;
    }
    assert_eq!(app.stream_events(10, Duration::from_secs(5)).await.len(), 10);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("outbox_published_total"), "{metrics}");
}
