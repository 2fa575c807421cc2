//! Probes, metrics, limits and shutdown.

use std::time::Duration;

use serde_json::json;
use shared::stream::{StreamSpec, ensure_stream};

use crate::helpers::{
    Events, Frame, SECRET, config, nats_url, spawn, spawn_app, spawn_app_with, token, wait_until,
};

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
async fn one_subject_beyond_its_connection_limit_is_refused_with_429_and_others_are_not() {
    let app = spawn_app_with(|c| c.max_connections_per_sub = 2).await;
    let as_sub =
        |sub: &str| crate::helpers::keys().issue(sub, vec!["*".into()], std::time::Duration::from_secs(600));
    let (_a1, _) = app.connect_hello(&as_sub("alice"), None).await;
    let (a2, _) = app.connect_hello(&as_sub("alice"), None).await;
    assert_eq!(app.try_connect(&app.ws_url(Some(&as_sub("alice")), None)).await.err(), Some(429));
    let (_b, _) = app.connect_hello(&as_sub("bob"), None).await;
    assert!(app.counter("fanout_refused_total{reason=\"per_sub\"}").await >= 1);
    drop(a2);
    crate::helpers::wait_until("alice's slot to free up", || async {
        app.try_connect(&app.ws_url(Some(&as_sub("alice")), None)).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn one_subject_beyond_its_resume_rate_is_refused_with_429_and_may_still_connect_fresh() {
    let app = spawn_app_with(|c| c.max_resumes_per_minute_per_sub = 2).await;
    let as_sub =
        |sub: &str| crate::helpers::keys().issue(sub, vec!["*".into()], std::time::Duration::from_secs(600));
    for _ in 0..2 {
        app.connect_hello(&as_sub("alice"), Some(0)).await;
    }
    assert_eq!(app.try_connect(&app.ws_url(Some(&as_sub("alice")), Some(0))).await.err(), Some(429));
    let refused = reqwest::Client::new()
        .get(app.url("/ws/messages?since=0"))
        .bearer_auth(as_sub("alice"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(refused.json::<serde_json::Value>().await.unwrap()["error"]["code"], "too_many_resumes");
    app.connect_hello(&as_sub("alice"), None).await;
    app.connect_hello(&as_sub("bob"), Some(0)).await;
    assert!(app.counter("fanout_refused_total{reason=\"resume_rate\"}").await >= 2);
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

#[tokio::test]
async fn the_binary_raises_a_low_soft_open_file_limit_and_sizes_its_connection_limit_to_the_hard_one() {
    let events = Events::new(&nats_url()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // What a container often starts with: a soft limit of a few hundred files (1024 in
    // Docker) under a higher hard one. Here: soft 256, hard 600.
    let mut fanout = tokio::process::Command::new("bash")
        .args(["-c", r#"ulimit -Sn 256 && ulimit -Hn 600 && exec "$0" "$@""#, env!("CARGO_BIN_EXE_fanout")])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--jwt-secret={SECRET}"))
        .arg(format!("--nats-url={}", nats_url()))
        .arg(format!("--stream-name={}", events.stream_name))
        .arg(format!("--subject-prefix={}", events.subjects.prefix()))
        .arg("--max-connections=1000")
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs fanout");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    wait_until("the binary to be ready", || async {
        reqwest::get(&readyz).await.is_ok_and(|response| response.status() == 200)
    })
    .await;
    let body: serde_json::Value = reqwest::get(&readyz).await.unwrap().json().await.unwrap();
    // 600 files, 256 kept for the listener, NATS and requests not upgraded yet.
    assert_eq!(body["max_connections"], 344, "{body}");
    let pid = fanout.id().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(files.split_whitespace().skip(3).take(2).collect::<Vec<_>>(), ["600", "600"], "{files}");
    fanout.kill().await.unwrap();
}

#[tokio::test]
async fn events_read_to_fill_the_window_at_start_do_not_count_as_events_in() {
    let url = nats_url();
    let events = Events::new(&url).await;
    events.publish_many(5, |_| json!({})).await;
    let app = spawn(config(&url, &events), events).await;
    assert_eq!(app.counter("fanout_events_in_total").await, 0, "5 events filled the window");
    app.events.publish("acc_a", Some("c"), json!({})).await;
    wait_until("the live event counts", || async { app.counter("fanout_events_in_total").await == 1 }).await;
}

#[tokio::test]
async fn fanout_started_before_the_stream_exists_waits_for_ingest_to_create_it() {
    let url = nats_url();
    let events = Events::new(&url).await;
    events.js.delete_stream(&events.stream_name).await.expect("start with no stream");
    let server = testkit::service::fanout_with(config(&url, &events)).await;
    let addr = server.url("/readyz");
    let readyz = || async { reqwest::get(&addr).await.map(|r| r.status().as_u16()).unwrap_or(0) };

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(readyz().await, 503, "not ready without the stream");
    assert!(events.js.get_stream(&events.stream_name).await.is_err(), "fanout did not create the stream");

    // ingest creates it, with its own settings.
    let spec = StreamSpec {
        duplicate_window: Duration::from_secs(42),
        ..StreamSpec::with_defaults(events.stream_name.clone(), events.subjects.clone())
    };
    ensure_stream(&events.js, &spec).await.unwrap();
    wait_until("ready once the stream exists", || async { readyz().await == 200 }).await;
    let mut stream = events.stream().await;
    assert_eq!(stream.info().await.unwrap().config.duplicate_window, Duration::from_secs(42));
}

/// In a container fanout is PID 1: `docker stop` (SIGTERM) must stop it, promptly.
#[test]
fn the_binary_stops_within_a_second_on_sigterm_as_pid_1() {
    let took = testkit::pid1::time_to_stop_on_sigterm(
        std::path::Path::new(env!("CARGO_BIN_EXE_fanout")),
        &["serve"],
        &[("JWT_SECRET", SECRET), ("NATS_URL", &nats_url()), ("FANOUT_LISTEN", "127.0.0.1:0")],
        std::time::Duration::from_millis(800),
        std::time::Duration::from_secs(1),
    );
    assert!(took.is_some(), "fanout ignored SIGTERM as PID 1");
}
