//! The follower survives what kills naive followers, and says so in `/readyz`.

use futures::StreamExt;
use serde_json::json;

use crate::helpers::{Events, config, spawn, spawn_app, token};
use testkit::NatsServer;

#[tokio::test]
async fn after_nats_restarts_live_events_flow_again_to_clients_still_connected() {
    let mut nats = NatsServer::start().await;
    let events = Events::new(&nats.url()).await;
    let app = spawn(config(&nats.url(), &events), events).await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    let before = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![before]);

    nats.stop();
    app.wait_ready(false).await;
    nats.restart().await;
    app.wait_ready(true).await;

    let after = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![after], "same socket, no reconnect");
}

#[tokio::test]
async fn deleting_the_followers_consumer_does_not_stop_delivery() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    let stream = app.events.stream().await;
    let names: Vec<String> = stream.consumer_names().map(|n| n.expect("consumer name")).collect().await;
    assert!(!names.is_empty(), "the follower has a consumer");
    for name in names {
        stream.delete_consumer(&name).await.expect("delete consumer");
    }
    let seq = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![seq]);
}

#[tokio::test]
async fn a_recreated_stream_closes_clients_with_4001_and_new_clients_get_its_events() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    for _ in 0..3 {
        app.events.publish("acc_a", Some("c"), json!({})).await;
    }
    assert_eq!(client.seqs(3).await.len(), 3);

    let mut stream = app.events.stream().await;
    let config = stream.info().await.unwrap().config.clone();
    app.events.js.delete_stream(&app.events.stream_name).await.expect("delete stream");
    app.events.js.create_stream(config).await.expect("recreate stream");

    let (code, reason, _) = client.until_close().await;
    assert_eq!(code, 4001, "{reason}");
    app.wait_ready(true).await;
    let (mut client, _) = app.connect_hello(&token(&["*"]), None).await;
    let seq = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(seq, 1, "the new stream starts over");
    assert_eq!(client.seqs(1).await, vec![1]);
}
