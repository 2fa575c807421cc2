//! Start-up as an operator sees it: required settings, health endpoints.

use std::process::Command;

use crate::helpers::spawn_app;

/// A secret long enough to be accepted.
const STRONG: &str = "startup-test-secret-0123456789abcdef0123";

fn ingest_without(missing: &str) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .env("WEBHOOK_SECRET", STRONG)
        .env("JWT_SECRET", STRONG)
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .env_remove(missing);
    command.output().expect("ingest runs")
}

#[test]
fn ingest_refuses_to_start_without_its_secrets_and_names_them() {
    for variable in ["WEBHOOK_SECRET", "JWT_SECRET"] {
        let output = ingest_without(variable);
        assert!(!output.status.success(), "started without {variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "error for missing {variable} should name it: {stderr}");
    }
}

#[test]
fn short_or_documented_secrets_are_refused_with_how_to_make_one() {
    for (secret, says) in [("short", "at least 32 bytes"), ("change-me-webhook-secret", "documented example")]
    {
        let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
            .env_clear()
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
            .env("WEBHOOK_SECRET", secret)
            .env("JWT_SECRET", STRONG)
            .output()
            .unwrap();
        assert!(!output.status.success(), "started with WEBHOOK_SECRET={secret}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("WEBHOOK_SECRET") && stderr.contains(says), "{stderr}");
        assert!(stderr.contains("openssl rand -hex 32"), "{stderr}");
    }
}

#[test]
fn an_empty_secret_is_refused_too() {
    let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .env("WEBHOOK_SECRET", "  ")
        .env("JWT_SECRET", STRONG)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("WEBHOOK_SECRET"));
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // NATS connects in the background after start-up: readiness turns true shortly.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let ready = loop {
        let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
        if ready.status() == 200 || tokio::time::Instant::now() >= deadline {
            break ready;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status(), 200);
    let body = ready.json::<serde_json::Value>().await.unwrap();
    assert_eq!((&body["database"], &body["nats"]), (&"ok".into(), &"ok".into()));
    app.post_message_expect(&crate::helpers::message_received("acc_m", "chat_m", false), "accepted").await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("webhooks_total"), "{metrics}");
    assert!(metrics.contains("webhook_ack_seconds"), "{metrics}");
}

#[tokio::test]
async fn a_graceful_stop_finishes_promptly_after_answering_what_it_took() {
    let mut app = spawn_app().await;
    app.post_message_expect(&crate::helpers::message_received("acc_stop", "chat_stop", false), "accepted")
        .await;
    assert!(app.stop(std::time::Duration::from_secs(5)).await, "ingest did not stop within 5 s");
    assert_eq!(app.count("select count(*) from messages").await, 1);
}

#[tokio::test]
async fn a_request_that_stalls_is_answered_408_at_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn_app_with(crate::helpers::Options {
        extra_args: vec!["--request-timeout-secs=1".to_owned()],
        ..Default::default()
    })
    .await;
    // Headers promise 100 bytes of body; only 10 come.
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let head = format!(
        "POST /api/webhooks/unipile/messages HTTP/1.1\r\nHost: x\r\nUnipile-Auth: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event\":",
        crate::helpers::WEBHOOK_SECRET
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered before the client gave up")
        .unwrap();
    let status_line = String::from_utf8_lossy(&answer[..read]);
    assert!(status_line.starts_with("HTTP/1.1 408"), "{status_line}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "not before the timeout");
    assert_eq!(app.count("select count(*) from dead_letters").await, 0);
}

/// NATS that asks for a user and password: both services connect with
/// `NATS_USER`/`NATS_PASSWORD` and a message goes through; with the wrong password
/// ingest never becomes ready and says why in its log, not in a panic.
#[tokio::test]
async fn both_services_reach_a_nats_that_requires_a_user_and_password() {
    use std::time::Duration;

    const PASSWORD: &str = "nats-test-password-0123456789abcdef0123";
    let nats = testkit::NatsServer::start_with_auth("relay", PASSWORD).await;
    let database = testkit::create_database("ingest").await;
    let args = |password: &str| {
        vec![
            format!("--webhook-secret={}", crate::helpers::WEBHOOK_SECRET),
            format!("--jwt-secret={}", crate::helpers::JWT_SECRET),
            format!("--database-url={}", database.url),
            format!("--nats-url={}", nats.url()),
            "--nats-user=relay".to_owned(),
            format!("--nats-password={password}"),
        ]
    };

    let mut refused = testkit::service::ingest(&args("not-the-password-0123456789abcdef0123")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let readyz = reqwest::get(refused.url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503, "ready without NATS: {}", readyz.text().await.unwrap());
    refused.stop(Duration::from_secs(10)).await;

    let ingest = testkit::service::ingest(&args(PASSWORD)).await;
    ingest.wait_ready().await;
    let fanout_args = [
        format!("--jwt-secret={}", crate::helpers::JWT_SECRET),
        format!("--nats-url={}", nats.url()),
        "--nats-user=relay".to_owned(),
        format!("--nats-password={PASSWORD}"),
    ];
    let fanout = testkit::service::fanout(&fanout_args).await;
    let token = shared::claims::JwtKeys::new(&secrecy::SecretString::from(crate::helpers::JWT_SECRET)).issue(
        "ana",
        vec!["*".to_owned()],
        Duration::from_secs(60),
    );
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws/messages?token={token}", fanout.port))
            .await
            .expect("fanout accepts the socket");
    let hello = futures::StreamExt::next(&mut socket).await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"), "{hello:?}");

    let body = crate::helpers::message_received("acc_auth", "chat_auth", false);
    let answer = reqwest::Client::new()
        .post(ingest.url("/api/webhooks/unipile/messages"))
        .header("Unipile-Auth", crate::helpers::WEBHOOK_SECRET)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let event = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut socket))
        .await
        .expect("the event arrives through the authenticated NATS")
        .unwrap()
        .unwrap();
    assert!(event.to_text().unwrap().contains(body["message_id"].as_str().unwrap()), "{event:?}");
}

/// In a container ingest is PID 1: `docker stop` (SIGTERM) must stop it, promptly.
#[tokio::test]
async fn the_binary_stops_within_a_second_on_sigterm_as_pid_1() {
    let database = testkit::create_database("ingest").await;
    let url = database.url.clone();
    let took = tokio::task::spawn_blocking(move || {
        testkit::pid1::time_to_stop_on_sigterm(
            std::path::Path::new(env!("CARGO_BIN_EXE_ingest")),
            &["serve"],
            &[
                ("DATABASE_URL", url.as_str()),
                ("NATS_URL", &testkit::nats_url()),
                ("WEBHOOK_SECRET", STRONG),
                ("JWT_SECRET", STRONG),
                ("INGEST_LISTEN", "127.0.0.1:0"),
            ],
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(1),
        )
    })
    .await
    .unwrap();
    assert!(took.is_some(), "ingest ignored SIGTERM as PID 1");
}

/// A 404 is the client's business: the binary logs it at debug (the request's trace
/// line), never as a warning or an error, for an unknown path and an unknown chat alike.
#[tokio::test]
async fn a_404_is_logged_at_debug_never_as_a_warning_or_an_error() {
    use std::process::Stdio;
    use std::time::Duration;

    let database = testkit::create_database("ingest").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let _stream = testkit::StreamGuard::new(testkit::nats_url(), format!("TEST_{id}"));
    let child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .env("RUST_LOG", "info,tower_http=debug")
        .env("LOG_FORMAT", "json")
        .args([
            "serve".to_owned(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--webhook-secret={}", crate::helpers::WEBHOOK_SECRET),
            format!("--jwt-secret={}", crate::helpers::JWT_SECRET),
            format!("--database-url={}", database.url),
            format!("--nats-url={}", testkit::nats_url()),
            format!("--stream-name=TEST_{id}"),
            format!("--subject-prefix=test{id}.events"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ingest runs");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("{base}/readyz")).await.is_ok_and(|r| r.status().is_success()) {
        assert!(tokio::time::Instant::now() < deadline, "ingest not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = shared::claims::JwtKeys::new(&secrecy::SecretString::from(crate::helpers::JWT_SECRET)).issue(
        "ana",
        vec!["*".to_owned()],
        Duration::from_secs(60),
    );
    let client = reqwest::Client::new();
    for path in ["/no-such-page", "/api/chats/chat_unknown/messages"] {
        let answer = client.get(format!("{base}{path}")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(answer.status(), 404, "{path}");
    }
    let mut child = child;
    // Give the trace lines a moment to be written, then stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let about_404: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.to_string().contains("404") || l["status"] == 404).collect();
    assert!(about_404.len() >= 2, "each 404 has its debug line: {log}");
    for line in about_404 {
        assert_eq!(line["level"], "DEBUG", "a 404 logged above debug: {line}");
    }
    let in_a_request = |line: &&serde_json::Value| {
        line["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s["name"] == "request"))
    };
    let requests: Vec<&serde_json::Value> = lines.iter().filter(in_a_request).collect();
    assert!(!requests.is_empty(), "request spans are logged: {log}");
    for line in requests {
        let level = line["level"].as_str().unwrap_or("");
        assert!(!["WARN", "ERROR"].contains(&level), "a warning or error while answering 404s: {line}");
    }
}
