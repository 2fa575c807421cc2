//! `loadgen resume` end to end: the real binary against a real fanout replica on the
//! machine's NATS, in both of its steps (publish only, then the storm with `--since`).

use serde_json::json;
use shared::envelope::{Envelope, EventType};
use shared::stream::{StreamSpec, ensure_stream};
use shared::subjects::Subjects;
use testkit::service::Service;
use testkit::{StreamGuard, nats_url};

const SECRET: &str = "loadgen-resume-test-secret-0123456789abcdef";

/// A fanout replica on a free port; stops when dropped.
async fn start_fanout(stream: &str, prefix: &str, window: usize) -> Service {
    testkit::service::fanout(&[
        format!("--jwt-secret={SECRET}"),
        format!("--nats-url={}", nats_url()),
        format!("--stream-name={stream}"),
        format!("--subject-prefix={prefix}"),
        format!("--replay-window={window}"),
    ])
    .await
}

async fn loadgen(port: u16, stream: &str, prefix: &str, extra: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["resume", "--url", &format!("ws://127.0.0.1:{port}/ws/messages")])
        .args(["--jwt-secret", SECRET, "--nats-url", &nats_url(), "--subject-prefix", prefix])
        .args(["--stream-name", stream])
        .args(extra)
        .output()
        .await
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "loadgen failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// A fresh stream (created as ingest would) and subject prefix, deleted when the guard
/// drops.
async fn test_stream() -> (String, String, StreamGuard) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (stream, prefix) = (format!("LOADGEN_TEST_{id}"), format!("loadgentest.{id}"));
    let guard = StreamGuard::new(nats_url(), stream.as_str());
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let spec = StreamSpec::with_defaults(stream.clone(), Subjects::new(prefix.clone()).unwrap());
    ensure_stream(&js, &spec).await.expect("creating the stream");
    (stream, prefix, guard)
}

/// `loadgen resume --publish-only`: publishes `missed` events, returns the `--since` it prints.
async fn publish_only(port: u16, stream: &str, prefix: &str, missed: u64) -> u64 {
    let out = loadgen(port, stream, prefix, &["--publish-only", "--missed", &missed.to_string()]).await;
    out.split("--since ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|since| since.parse().ok())
        .unwrap_or_else(|| panic!("no --since in: {out}"))
}

#[tokio::test]
async fn a_storm_on_a_replica_started_after_the_events_is_served_exactly_and_from_memory() {
    let (stream, prefix, _guard) = test_stream().await;
    // A replica that stops before the events.
    let fanout = start_fanout(&stream, &prefix, 0).await;
    let since = publish_only(fanout.port, &stream, &prefix, 7).await.to_string();
    drop(fanout);

    // With a window, a replica started now holds the events in memory...
    let fanout = start_fanout(&stream, &prefix, 100).await;
    let port = fanout.port;
    let storm = ["--since", &since, "--missed", "7", "--connections", "30"];
    let out = loadgen(port, &stream, &prefix, &storm).await;
    assert!(out.contains("30 of 30 clients caught up on 7 missed events"), "{out}");
    assert!(out.contains("hello.recovered: 30 true, 0 false"), "{out}");
    assert!(out.contains("exactly the missed events in order: yes"), "{out}");
    assert!(out.contains(r#"{"memory": 30.0}"#), "{out}");

    // ...and without one, every client reads JetStream, with the same result.
    let fanout = start_fanout(&stream, &prefix, 0).await;
    let out = loadgen(fanout.port, &stream, &prefix, &storm).await;
    assert!(out.contains("30 of 30 clients caught up on 7 missed events"), "{out}");
    assert!(out.contains("exactly the missed events in order: yes"), "{out}");
    assert!(out.contains(r#"{"stream": 30.0}"#), "{out}");
}

#[tokio::test]
async fn clients_that_did_not_get_exactly_the_expected_events_are_reported() {
    let (stream, prefix, _guard) = test_stream().await;
    let fanout = start_fanout(&stream, &prefix, 100).await;
    let port = fanout.port;
    let since = publish_only(port, &stream, &prefix, 2).await;
    // An event of another chat right after them: a run told to expect three loadgen
    // events after `since` gets two, then this one.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let subject = Subjects::new(prefix.clone()).unwrap().event(
        "acc_loadgen",
        Some("chat_other"),
        EventType::MessageNew,
    );
    let envelope = Envelope::new(
        EventType::MessageNew,
        "acc_loadgen",
        Some("chat_other".into()),
        chrono::Utc::now(),
        json!({}),
    );
    js.publish(subject, envelope.to_bytes().into()).await.unwrap().await.unwrap();
    let out = loadgen(
        port,
        &stream,
        &prefix,
        &["--since", &since.to_string(), "--missed", "3", "--connections", "5"],
    )
    .await;
    assert!(out.contains("exactly the missed events in order: NO (5 clients)"), "{out}");
}
