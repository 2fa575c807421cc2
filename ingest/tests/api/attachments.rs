//! `GET /api/messages/{m}/attachments/{a}` and its signed URLs, against a fake Unipile.
//!
//! Scope, 404s and upstream errors use wiremock. The large-file tests use a small
//! streaming server of their own (wiremock holds every body in memory), which makes
//! its bytes as they are read, so the only place a whole file could pile up is ingest.

use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderValue;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{Options, TestApp, message_received, spawn_app_with};
use crate::unipile_fake::API_KEY;

const ACCOUNT: &str = "accMedia";
const CHAT: &str = "chatMedia";
const IMAGE: &str = "att_img_1";
/// A PNG's first bytes, enough for the checks here.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0000IHDR-fake-image-bytes";

async fn app_with_unipile(dsn: &str, extra: &[&str]) -> TestApp {
    let mut extra_args = vec![format!("--unipile-dsn={dsn}"), format!("--unipile-api-key={API_KEY}")];
    extra_args.extend(extra.iter().map(|a| a.to_string()));
    spawn_app_with(Options { extra_args, ..Options::default() }).await
}

fn token(app: &TestApp, accounts: &[&str]) -> String {
    app.jwt.issue("user-1", accounts.iter().map(|a| a.to_string()).collect(), Duration::from_secs(600))
}

/// Stores a message with one image and one PDF; returns its id.
async fn message_with_attachments(app: &TestApp, account: &str) -> String {
    let mut body = message_received(account, CHAT, false);
    body["attachments"] = json!([
        {"id": IMAGE, "type": "img", "mimetype": "image/png", "size": {"width": "10", "height": "10"}},
        {"id": "att_doc/../1", "type": "file", "mimetype": "application/pdf", "file_name": "deck.pdf"}
    ]);
    app.post_message_expect(&body, "accepted").await;
    body["message_id"].as_str().unwrap().to_owned()
}

fn attachment_url(app: &TestApp, message: &str, attachment: &str) -> String {
    app.url(&ingest::api::signing::attachment_path(message, attachment))
}

async fn get(app: &TestApp, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("ingest answers")
}

/// Requests the fake received for attachments.
async fn attachment_calls(fake: &MockServer) -> Vec<String> {
    fake.received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.url.path().to_owned())
        .filter(|p| p.contains("/attachments/"))
        .collect()
}

#[tokio::test]
async fn an_attachment_streams_with_its_type_and_length_and_the_api_key_stays_behind() {
    let fake = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex(format!("^/api/v1/messages/[^/]+/attachments/{IMAGE}$")))
        .and(header("X-API-KEY", API_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_raw(PNG.to_vec(), "image/png"))
        .expect(1)
        .mount(&fake)
        .await;
    let app = app_with_unipile(&fake.uri(), &[]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;

    let response = get(&app, &attachment_url(&app, &message, IMAGE), Some(&token(&app, &[ACCOUNT]))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.headers()["content-length"], PNG.len().to_string().as_str());
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert!(response.headers().get("x-api-key").is_none());
    assert_eq!(response.bytes().await.unwrap().as_ref(), PNG);
}

#[tokio::test]
async fn unknown_unseen_and_hostile_ids_are_one_404_and_unipile_is_never_called() {
    let fake = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(PNG.to_vec(), "image/png"))
        .mount(&fake)
        .await;
    let app = app_with_unipile(&fake.uri(), &[]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;
    let mine = token(&app, &[ACCOUNT]);
    let theirs = token(&app, &["anotherAccount"]);

    let long = "x".repeat(5000);
    let cases: Vec<(String, &str)> = vec![
        // A message that does not exist, an attachment the message does not list.
        (attachment_url(&app, "msg_unknown", IMAGE), &mine),
        (attachment_url(&app, &message, "att_unknown"), &mine),
        // A message of an account the token may not see.
        (attachment_url(&app, &message, IMAGE), &theirs),
        // Hostile ids: a path that climbs, a NUL, an encoded slash, a very long id.
        (app.url(&format!("/api/messages/{message}/attachments/..")), &mine),
        (app.url(&format!("/api/messages/{message}/attachments/%2E%2E")), &mine),
        (app.url(&format!("/api/messages/{message}/attachments/att%00img")), &mine),
        (app.url(&format!("/api/messages/{message}/attachments/..%2F..%2Fwebhooks")), &mine),
        (app.url(&format!("/api/messages/{long}/attachments/{IMAGE}")), &mine),
        (app.url(&format!("/api/messages/{message}/attachments/%FF%FE")), &mine),
    ];
    let mut bodies = Vec::new();
    for (url, token) in &cases {
        let response = get(&app, url, Some(token)).await;
        assert_eq!(response.status(), 404, "{url}");
        bodies.push(response.json::<Value>().await.expect("the error body"));
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one body for every 404: {bodies:?}");
    assert_eq!(bodies[0]["error"]["code"], "not_found");
    assert_eq!(attachment_calls(&fake).await, Vec::<String>::new(), "Unipile is not asked");

    // An id with a slash and dots that the message does list is asked for, encoded.
    let listed = get(&app, &attachment_url(&app, &message, "att_doc/../1"), Some(&mine)).await;
    assert_eq!(listed.status(), 200);
    assert_eq!(
        attachment_calls(&fake).await,
        [format!("/api/v1/messages/{message}/attachments/att_doc%2F..%2F1")]
    );
}

#[tokio::test]
async fn unipile_404_429_500_and_silence_become_404_429_502_and_504() {
    let fake = MockServer::start().await;
    let app = app_with_unipile(&fake.uri(), &["--attachment-first-byte-timeout-secs=1"]).await;
    let me = token(&app, &[ACCOUNT]);
    let answers = [
        (ResponseTemplate::new(404), 404, "not_found"),
        (ResponseTemplate::new(429).insert_header("Retry-After", "17"), 429, "rate_limited"),
        (ResponseTemplate::new(500), 502, "bad_gateway"),
        (ResponseTemplate::new(200).set_delay(Duration::from_secs(5)), 504, "gateway_timeout"),
    ];
    for (answer, status, code) in answers {
        let message = message_with_attachments(&app, ACCOUNT).await;
        Mock::given(method("GET"))
            .and(path_regex(format!("^/api/v1/messages/{message}/attachments/")))
            .respond_with(answer)
            .mount(&fake)
            .await;
        let response = get(&app, &attachment_url(&app, &message, IMAGE), Some(&me)).await;
        assert_eq!(response.status(), status, "{code}");
        if status == 429 {
            assert_eq!(response.headers()["retry-after"], "17");
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
    }
}

#[tokio::test]
async fn a_signed_url_works_without_a_token_and_fails_when_tampered_or_expired() {
    let fake = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(PNG.to_vec(), "image/png"))
        .mount(&fake)
        .await;
    let app = app_with_unipile(&fake.uri(), &["--attachment-url-ttl-secs=2"]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;
    let me = token(&app, &[ACCOUNT]);

    // No token and no signature.
    assert_eq!(get(&app, &attachment_url(&app, &message, IMAGE), None).await.status(), 401);
    // Only a token that may see the message gets a URL.
    let url_of = |t: String| {
        let request =
            app.client.post(format!("{}/url", attachment_url(&app, &message, IMAGE))).bearer_auth(t);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(url_of(token(&app, &["anotherAccount"])).await.status(), 404);
    let signed: Value = url_of(me.clone()).await.json().await.unwrap();
    let url = signed["url"].as_str().expect("a url");
    assert!(url.starts_with('/'), "{url}");

    let response = get(&app, &app.url(url), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), PNG);

    // The message list hands out the same kind of URL.
    let page: Value = app
        .client
        .get(app.url(&format!("/api/chats/{CHAT}/messages")))
        .bearer_auth(&me)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = page["items"][0]["attachments"][0]["signed_url"].as_str().expect("a signed_url");
    assert_eq!(get(&app, &app.url(listed), None).await.status(), 200);

    // Another attachment's path with this signature, a changed expiry, a changed sig.
    let other = url.replace(IMAGE, "att_doc%2F..%2F1");
    let expires: i64 = url.split("expires=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
    let later = url.replace(&format!("expires={expires}"), &format!("expires={}", expires + 3600));
    let sig = url.split("sig=").nth(1).unwrap();
    for tampered in [other, later] {
        let response = get(&app, &app.url(&tampered), None).await;
        assert_eq!(response.status(), 403, "{tampered}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let mut bytes: Vec<u8> = sig.bytes().collect();
    bytes[0] = if bytes[0] == b'A' { b'B' } else { b'A' };
    let flipped = url.replace(sig, std::str::from_utf8(&bytes).unwrap());
    assert_eq!(get(&app, &app.url(&flipped), None).await.status(), 403);

    // Past its two seconds the URL no longer works.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let response = get(&app, &app.url(url), None).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
}

/// Resident memory of this process (nextest runs each test in a process of its own).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A fake Unipile that answers every attachment with `size` zero bytes made as they are
/// read, in 64 KiB chunks, with a content-length or (chunked) without.
async fn streaming_fake(size: u64, with_length: bool) -> String {
    let app = axum::Router::new().route(
        "/api/v1/messages/{m}/attachments/{a}",
        axum::routing::get(move || async move {
            const CHUNK: u64 = 64 * 1024;
            let chunk = Bytes::from(vec![0u8; CHUNK as usize]);
            let chunks = (0..size.div_ceil(CHUNK)).map(move |i| {
                let n = CHUNK.min(size - i * CHUNK) as usize;
                Ok::<_, std::io::Error>(chunk.slice(..n))
            });
            let mut response =
                axum::response::Response::new(Body::from_stream(futures::stream::iter(chunks)));
            response.headers_mut().insert("content-type", HeaderValue::from_static("audio/ogg"));
            if with_length {
                response.headers_mut().insert("content-length", HeaderValue::from(size));
            }
            response
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_four_times_the_memory_budget_streams_through_and_memory_stays_flat() {
    const SIZE: u64 = 128 * 1024 * 1024;
    /// How much resident memory may grow while the file passes: a quarter of it.
    const BUDGET: u64 = 32 * 1024 * 1024;
    let dsn = streaming_fake(SIZE, true).await;
    let app = app_with_unipile(&dsn, &[&format!("--attachment-max-bytes={}", SIZE * 2)]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;
    let me = token(&app, &[ACCOUNT]);
    // Warm up the connection pools and allocator with a first small read.
    let warm = get(&app, &attachment_url(&app, &message, IMAGE), Some(&me)).await;
    let mut warm = warm.bytes_stream();
    let _ = warm.next().await;
    drop(warm);

    let before = rss_bytes();
    let response = get(&app, &attachment_url(&app, &message, IMAGE), Some(&me)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], SIZE.to_string().as_str());
    assert_eq!(response.headers()["content-type"], "audio/ogg");
    let mut body = response.bytes_stream();
    let (mut received, mut peak, mut chunks) = (0u64, before, 0u64);
    while let Some(chunk) = body.next().await {
        received += chunk.expect("the body streams whole").len() as u64;
        chunks += 1;
        if chunks % 64 == 0 {
            peak = peak.max(rss_bytes());
        }
    }
    peak = peak.max(rss_bytes());
    assert_eq!(received, SIZE);
    let grew = peak.saturating_sub(before);
    println!("{SIZE} bytes in {chunks} chunks; resident memory {before} -> peak {peak} (+{grew})");
    assert!(grew < BUDGET, "memory grew by {grew} bytes while a {SIZE}-byte file passed");
}

#[tokio::test]
async fn a_file_over_the_cap_is_refused_up_front_or_cut_at_the_cap() {
    const CAP: u64 = 1024 * 1024;
    // With a content-length over the cap: refused before a byte is sent.
    let dsn = streaming_fake(CAP * 4, true).await;
    let app = app_with_unipile(&dsn, &[&format!("--attachment-max-bytes={CAP}")]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;
    let me = token(&app, &[ACCOUNT]);
    let response = get(&app, &attachment_url(&app, &message, IMAGE), Some(&me)).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "attachment_too_large");

    // Without a length (chunked): the stream is cut once it passes the cap.
    let dsn = streaming_fake(CAP * 4, false).await;
    let app = app_with_unipile(&dsn, &[&format!("--attachment-max-bytes={CAP}")]).await;
    let message = message_with_attachments(&app, ACCOUNT).await;
    let response = get(&app, &attachment_url(&app, &message, IMAGE), Some(&token(&app, &[ACCOUNT]))).await;
    assert_eq!(response.status(), 200, "the headers left before the size was known");
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => received += chunk.len() as u64,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the client sees an incomplete body, not a complete short file");
    assert!(received <= CAP, "at most the cap passes: {received}");
}
