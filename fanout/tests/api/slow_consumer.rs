//! A client that does not read is closed; nobody else waits for it.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;

use crate::helpers::{WsClient, spawn_app_with, token};

const EVENTS: usize = 800;

#[tokio::test]
async fn a_client_that_never_reads_is_closed_with_4000_while_a_reading_client_keeps_up() {
    let app = spawn_app_with(|c| {
        c.queue_capacity = 8;
        c.write_timeout_secs = 60;
    })
    .await;
    let (mut reader, _) = app.connect_hello(&token(&["*"]), None).await;

    // A client with a tiny receive buffer that stops reading after hello.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let url = app.ws_url(Some(&token(&["*"])), None);
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.unwrap();
    let mut sleeper = WsClient { ws };
    sleeper.hello().await;

    let padding = "x".repeat(16 * 1024);
    let publisher = {
        let events = app.events.clone();
        tokio::spawn(async move {
            let mut published_at = Vec::with_capacity(EVENTS);
            for i in 0..EVENTS {
                let seq = events.publish("acc_a", Some("chat_1"), json!({"i": i, "pad": padding})).await;
                published_at.push((seq, Instant::now()));
            }
            published_at
        })
    };
    let mut received_at = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        let event = reader.event().await;
        received_at.push((event["seq"].as_u64().unwrap(), Instant::now()));
    }
    let published_at = publisher.await.unwrap();
    let mut lags: Vec<Duration> = published_at
        .iter()
        .zip(&received_at)
        .map(|((sent_seq, sent), (got_seq, got))| {
            assert_eq!(sent_seq, got_seq, "the reader gets every event in order");
            got.saturating_duration_since(*sent)
        })
        .collect();
    lags.sort();
    let p99 = lags[lags.len() * 99 / 100];
    assert!(p99 < Duration::from_millis(250), "reader p99 latency {p99:?} while another client stalls");

    let (code, reason, seen) = sleeper.until_close().await;
    assert_eq!(code, 4000, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
    assert!(seen.len() < EVENTS, "closed before getting everything ({} events)", seen.len());
}
