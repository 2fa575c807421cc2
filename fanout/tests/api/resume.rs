//! `?since=` gives exactly the missed events, then live, on any replica.

use fanout::frames::ServerFrame;
use fanout::history::CHUNK;
use serde_json::json;

use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;

use crate::helpers::{Frame, TestApp, WsClient, spawn_app, spawn_app_with, token};

#[tokio::test]
async fn resuming_on_the_same_replica_delivers_exactly_the_missed_events_then_live() {
    let app = spawn_app().await;
    let (mut client, _) = app.connect_hello(&token(&["acc_a"]), None).await;
    let first = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![first]);
    drop(client);

    let mut missed = Vec::new();
    for i in 0..5 {
        app.events.publish("acc_b", Some("c"), json!({})).await;
        missed.push(app.events.publish("acc_a", Some("c"), json!({"i": i})).await);
    }
    let (mut client, hello) = app.connect_hello(&token(&["acc_a"]), Some(first)).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(client.seqs(missed.len()).await, missed);
    let live = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![live], "no duplicate, no gap");
}

/// A client of `first` that saw one event, then `first` stops (1012) and `missed`
/// events for its account (and as many for another) go by while it is away.
async fn client_left_behind(first: &mut TestApp, missed: usize) -> (u64, Vec<u64>) {
    let (mut client, _) = first.connect_hello(&token(&["acc_a"]), None).await;
    let seen = first.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![seen]);
    first.stop().await;
    match client.frame().await {
        Frame::Close(code, _) => assert_eq!(code, 1012, "shutdown closes with 1012"),
        other => panic!("expected a close, got {other:?}"),
    }
    let mut events = Vec::new();
    for i in 0..missed {
        events.push(first.events.publish("acc_a", Some("c"), json!({"i": i})).await);
        first.events.publish("acc_other", Some("c"), json!({})).await;
    }
    (seen, events)
}

#[tokio::test]
async fn a_replica_started_after_the_missed_events_resumes_them_from_its_prefilled_window() {
    let mut first = spawn_app().await;
    let (seen, missed) = client_left_behind(&mut first, 4).await;
    // Started after the events: it reads the newest of them into memory before it
    // opens, so the storm of clients coming from the stopped replica need no JetStream.
    let second = first.replica(|_| {}).await;
    let (mut client, hello) = second.connect_hello(&token(&["acc_a"]), Some(seen)).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(client.seqs(missed.len()).await, missed);
    let live = second.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![live]);
    assert_eq!(second.resume_outcomes().await, vec![("memory".to_owned(), 1)]);

    // A new client starts at new messages, not at the prefilled ones.
    let (mut fresh, hello) = second.connect_hello(&token(&["acc_a"]), None).await;
    assert_eq!(hello["seq"], live);
    let next = second.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(fresh.seqs(1).await, vec![next]);
}

#[tokio::test]
async fn a_replica_opens_only_once_its_window_is_full_and_new_clients_start_after_it() {
    let mut first = spawn_app().await;
    first.stop().await;
    // Enough history that filling the window takes the follower many pulls.
    let mut last = 0;
    for i in 0..3000 {
        last = first
            .events
            .publish(if i % 2 == 0 { "acc_a" } else { "acc_b" }, Some("c"), json!({"i": i}))
            .await;
    }
    let second = first.replica(|c| c.replay_window = 3000).await;
    // Ready means caught up: a client connecting at once starts after the last event,
    // and gets no history as if it were live.
    let (mut client, hello) = second.connect_hello(&token(&["*"]), None).await;
    assert_eq!(hello["seq"], last, "ready before the window was filled");
    let live = second.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![live]);
    // And the whole window serves a resume from its start.
    let (mut resumed, hello) = second.connect_hello(&token(&["acc_a"]), Some(last - 10)).await;
    assert_eq!(hello["recovered"], true);
    let expected: Vec<u64> =
        (last - 9..=last).filter(|s| (s - (last - 2999)) % 2 == 0).chain([live]).collect();
    assert_eq!(resumed.seqs(expected.len()).await, expected);
    assert_eq!(second.resume_outcomes().await, vec![("memory".to_owned(), 1)]);
}

#[tokio::test]
async fn a_resume_older_than_the_window_is_read_from_jetstream_on_a_replica_that_never_saw_the_client() {
    let mut first = spawn_app().await;
    let (seen, missed) = client_left_behind(&mut first, 4).await;
    // Its window holds the newest 2 of the 8 events since `seen`: JetStream must serve.
    let second = first.replica(|c| c.replay_window = 2).await;
    let (mut client, hello) = second.connect_hello(&token(&["acc_a"]), Some(seen)).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(client.seqs(missed.len()).await, missed);
    let live = second.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![live]);
    assert_eq!(second.resume_outcomes().await, vec![("stream".to_owned(), 1)]);
}

#[tokio::test]
async fn a_multi_account_resume_from_jetstream_filters_to_the_tokens_accounts() {
    let app = spawn_app_with(|c| c.replay_window = 0).await;
    let since = app.events.publish("acc_a", Some("c"), json!({})).await;
    let mut expected = Vec::new();
    for _ in 0..3 {
        expected.push(app.events.publish("acc_a", Some("c"), json!({})).await);
        app.events.publish("acc_b", Some("c"), json!({})).await;
        expected.push(app.events.publish("acc_c", None, json!({})).await);
    }
    let (mut client, hello) = app.connect_hello(&token(&["acc_a", "acc_c"]), Some(since)).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(client.seqs(expected.len()).await, expected);
    assert_eq!(client.ping().await, ServerFrame::Pong, "nothing more than the missed events");
}

#[tokio::test]
async fn a_long_resume_under_live_traffic_has_no_gap_and_no_duplicate() {
    // No memory window and a small queue; the client holds back reading while live
    // events arrive, so its queue overflows during catch-up and the server has to
    // catch up again from JetStream before going live.
    let app = spawn_app_with(|c| {
        c.replay_window = 0;
        c.queue_capacity = 16;
        c.write_timeout_secs = 60;
    })
    .await;
    let since = app.events.publish("acc_a", Some("c"), json!({})).await;
    let padding = "x".repeat(16 * 1024);
    let mut expected = app.events.publish_many(600, |i| json!({"i": i, "pad": padding})).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let url = app.ws_url(Some(&token(&["acc_a"])), Some(since));
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.unwrap();
    let mut client = WsClient { ws };
    assert_eq!(client.hello().await["recovered"], true);
    expected.extend(app.events.publish_many(100, |i| json!({"live": i})).await);
    assert_eq!(client.seqs(expected.len()).await, expected);
    let last = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![last], "live after catching up");
}

/// Publishes `n` events, turn by turn for `acc_a`, `acc_b` and `acc_c`; returns the
/// sequences each of those tokens may see.
async fn publish_mixed(app: &TestApp, n: usize) -> [Vec<u64>; 3] {
    let mut seen: [Vec<u64>; 3] = Default::default();
    for i in 0..n {
        let account = ["acc_a", "acc_b", "acc_c"][i % 3];
        seen[i % 3].push(app.events.publish(account, Some("c"), json!({"i": i})).await);
    }
    seen
}

#[tokio::test]
async fn a_reconnect_storm_past_the_window_reads_each_stretch_of_history_once() {
    // No window: the last stretch, past two whole chunks, each client reads alone.
    reconnect_storm(0).await;
}

#[tokio::test]
async fn a_resume_from_history_chunks_hands_over_to_the_window_once_it_reaches_back() {
    // The window holds the last 150 events: from the end of the second chunk on.
    reconnect_storm(150).await;
}

/// Four clients resume at once from before two whole chunks and a stretch more.
async fn reconnect_storm(replay_window: usize) {
    let app = spawn_app_with(|c| c.replay_window = replay_window).await;
    let since = app.events.publish("acc_a", Some("c"), json!({})).await;
    let [a, b, _] = publish_mixed(&app, 2 * CHUNK as usize + 100).await;
    let clients = [(["acc_a"], &a), (["acc_b"], &b), (["acc_a"], &a), (["acc_a"], &a)];
    let resumes = clients.map(|(accounts, expected)| {
        let app = &app;
        async move {
            let (mut client, hello) = app.connect_hello(&token(&accounts), Some(since)).await;
            assert_eq!(hello["recovered"], true, "{hello}");
            assert_eq!(&client.seqs(expected.len()).await, expected, "{accounts:?}");
            client
        }
    });
    let mut clients = futures::future::join_all(resumes).await;
    let read = app.counter(r#"fanout_history_chunks_read_total{outcome="shared"}"#).await;
    assert_eq!(read, 2, "each whole chunk read once");
    let live = app.events.publish("acc_a", Some("c"), json!({})).await;
    for (i, client) in clients.iter_mut().enumerate() {
        if i == 1 {
            assert_eq!(client.ping().await, ServerFrame::Pong, "acc_b saw nothing more");
        } else {
            assert_eq!(client.seqs(1).await, vec![live], "live right after the history");
        }
    }
}

#[tokio::test]
async fn a_chunk_too_big_to_keep_is_streamed_by_each_client_in_order() {
    let app = spawn_app_with(|c| c.replay_window = 0).await;
    let since = app.events.publish("acc_a", Some("c"), json!({})).await;
    // 1,100 events of 10 KiB: the first chunk alone would take 10 MiB.
    let padding = "x".repeat(10 * 1024);
    let missed = app.events.publish_many(CHUNK as usize + 76, |i| json!({"i": i, "pad": padding})).await;
    for _ in 0..2 {
        let (mut client, hello) = app.connect_hello(&token(&["acc_a"]), Some(since)).await;
        assert_eq!(hello["recovered"], true, "{hello}");
        assert_eq!(client.seqs(missed.len()).await, missed);
        assert_eq!(client.ping().await, ServerFrame::Pong, "nothing more");
    }
    let read = app.counter(r#"fanout_history_chunks_read_total{outcome="too_big"}"#).await;
    assert_eq!(read, 1, "found too big once, then not read again");
}

#[tokio::test]
async fn a_chunk_the_stream_has_partly_dropped_still_serves_what_it_holds() {
    let app = spawn_app_with(|c| c.replay_window = 0).await;
    let mut stream = app.events.stream().await;
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_messages = CHUNK as i64;
    app.events.js.update_stream(config).await.expect("limit the stream");
    let [a, _, _] = publish_mixed(&app, CHUNK as usize + 300).await;
    // The stream now starts 300 sequences into the first chunk.
    let first = stream.info().await.unwrap().state.first_sequence;
    assert_eq!(first, 301);
    let since = a.iter().copied().find(|&seq| seq > first).unwrap();
    let missed: Vec<u64> = a.iter().copied().filter(|&seq| seq > since).collect();
    let (mut client, hello) = app.connect_hello(&token(&["acc_a"]), Some(since)).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(client.seqs(missed.len()).await, missed);
    let (_, hello) = app.connect_hello(&token(&["acc_a"]), Some(first - 2)).await;
    assert_eq!(hello["recovered"], false, "before the stream's start: {hello}");
}

#[tokio::test]
async fn recovered_is_false_when_the_stream_no_longer_reaches_back() {
    // Without a memory window: a replica that still holds the events in memory would
    // (rightly) deliver them.
    let app = spawn_app_with(|c| c.replay_window = 0).await;
    let old = app.events.publish("acc_a", Some("c"), json!({})).await;
    app.events.publish("acc_a", Some("c"), json!({})).await;
    app.events.stream().await.purge().await.expect("purge");
    let (mut client, hello) = app.connect_hello(&token(&["acc_a"]), Some(old)).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    let live = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(client.seqs(1).await, vec![live], "live events follow from now");
}

#[tokio::test]
async fn recovered_is_false_with_a_limited_stream_that_dropped_the_history() {
    let app = spawn_app_with(|c| c.replay_window = 0).await;
    let mut stream = app.events.stream().await;
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_messages = 3;
    app.events.js.update_stream(config).await.expect("limit the stream");
    let old = app.events.publish("acc_a", Some("c"), json!({})).await;
    for _ in 0..5 {
        app.events.publish("acc_a", Some("c"), json!({})).await;
    }
    let (_client, hello) = app.connect_hello(&token(&["acc_a"]), Some(old)).await;
    assert_eq!(hello["recovered"], false);
}

#[tokio::test]
async fn a_resume_further_back_than_the_gap_limit_is_not_recovered_but_one_within_it_is() {
    let app = spawn_app_with(|c| {
        c.replay_window = 0;
        c.max_resume_gap = 3;
    })
    .await;
    let far = app.events.publish("acc_a", Some("c"), json!({})).await;
    let near = app.events.publish("acc_a", Some("c"), json!({})).await;
    let missed = app.events.publish_many(3, |_| json!({})).await;
    // `far` is 4 behind the head: the stream still has everything, but the limit says no.
    let (mut refused, hello) = app.connect_hello(&token(&["acc_a"]), Some(far)).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    // `near` is 3 behind: exactly the limit, read from JetStream.
    let (mut resumed, hello) = app.connect_hello(&token(&["acc_a"]), Some(near)).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(resumed.seqs(missed.len()).await, missed);
    let live = app.events.publish("acc_a", Some("c"), json!({})).await;
    assert_eq!(refused.seqs(1).await, vec![live], "live events follow from now");
    assert_eq!(resumed.seqs(1).await, vec![live]);
    let mut outcomes = app.resume_outcomes().await;
    outcomes.sort();
    assert_eq!(outcomes, vec![("stream".to_owned(), 1), ("too_far".to_owned(), 1)], "{outcomes:?}");
}

#[tokio::test]
async fn the_gap_limit_does_not_refuse_what_the_window_holds() {
    let app = spawn_app_with(|c| c.max_resume_gap = 1).await;
    let since = app.events.publish("acc_a", Some("c"), json!({})).await;
    let missed = app.events.publish_many(3, |_| json!({})).await;
    let (mut client, hello) = app.connect_hello(&token(&["acc_a"]), Some(since)).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(client.seqs(missed.len()).await, missed);
    assert_eq!(app.resume_outcomes().await, vec![("memory".to_owned(), 1)]);
}

#[tokio::test]
async fn a_sequence_the_stream_never_had_is_not_recovered() {
    let app = spawn_app().await;
    let head = app.events.publish("acc_a", Some("c"), json!({})).await;
    let (_client, hello) = app.connect_hello(&token(&["acc_a"]), Some(head + 1000)).await;
    assert_eq!(hello["recovered"], false);
}
