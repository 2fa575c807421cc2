//! Probes, metrics, limits and shutdown.

use serde_json::json;

use crate::helpers::{Frame, spawn_app, spawn_app_with, token};

#[tokio::test]
async fn health_and_readiness_answer_and_metrics_name_the_series() {
    let app = spawn_app().await;
    assert_eq!(reqwest::get(app.url("/healthz")).await.unwrap().status(), 200);
    assert_eq!(app.readyz().await, 200);
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    app.events.publish("acc_a", Some("c"), json!({})).await;
    client.event().await;
    let metrics = reqwest::get(app.url("/metrics")).await.unwrap().text().await.unwrap();
    for series in [
        "fanout_connections",
        "fanout_events_in_total",
        "fanout_frames_out_total",
        "fanout_delivery_lag_seconds_bucket",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics:\n{metrics}");
    }
}

#[tokio::test]
async fn connections_beyond_the_replica_limit_are_refused_with_503() {
    let app = spawn_app_with(|c| c.max_connections = 2).await;
    let (_a, _) = app.connect_hello(&token(&["*"]), None).await;
    let (b, _) = app.connect_hello(&token(&["*"]), None).await;
    assert_eq!(app.try_connect(&app.ws_url(Some(&token(&["*"])), None)).await.err(), Some(503));
    drop(b);
    crate::helpers::wait_until("a slot to free up", || async {
        app.try_connect(&app.ws_url(Some(&token(&["*"])), None)).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1012() {
    let mut app = spawn_app().await;
    let (mut a, _) = app.connect_hello(&token(&["*"]), None).await;
    let (mut b, _) = app.connect_hello(&token(&["acc_a"]), Some(0)).await;
    app.stop().await;
    for client in [&mut a, &mut b] {
        match client.frame().await {
            Frame::Close(code, _) => assert_eq!(code, 1012),
            other => panic!("expected close 1012, got {other:?}"),
        }
    }
}
