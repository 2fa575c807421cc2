//! The Unipile client against a wiremock Unipile: paging, retries, errors.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ingest::unipile::types::NewWebhook;
use ingest::unipile::{ClientConfig, RetryPolicy, UnipileClient, UnipileError};
use secrecy::SecretString;
use serde_json::json;
use wiremock::matchers::{body_partial_json, header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::fixture;
use crate::unipile_fake::API_KEY;

fn client(dsn: &str, max_attempts: u32) -> UnipileClient {
    let mut config = ClientConfig::new(dsn, SecretString::from(API_KEY)).unwrap();
    config.retry = RetryPolicy {
        max_attempts,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        max_retry_after: Duration::from_secs(5),
    };
    config.timeout = Duration::from_secs(5);
    UnipileClient::new(config).unwrap()
}

fn webhook_page(id: &str, cursor: Option<&str>) -> serde_json::Value {
    let mut page = fixture("api_webhook_list.json");
    let mut item = page["items"][0].clone();
    item["id"] = id.into();
    page["items"] = json!([item]);
    page["cursor"] = cursor.into();
    page
}

#[tokio::test]
async fn unipile_list_follows_the_cursor_across_three_pages() {
    let server = MockServer::start().await;
    for (cursor, id, next) in
        [(None, "wh_1", Some("p2")), (Some("p2"), "wh_2", Some("p3")), (Some("p3"), "wh_3", None)]
    {
        let mock = Mock::given(method("GET")).and(path("/api/v1/webhooks")).and(header("X-API-KEY", API_KEY));
        let mock = match cursor {
            Some(c) => mock.and(query_param("cursor", c)),
            None => mock.and(query_param_is_missing("cursor")),
        };
        mock.respond_with(ResponseTemplate::new(200).set_body_json(webhook_page(id, next)))
            .expect(1)
            .mount(&server)
            .await;
    }
    let ids: Vec<String> = client(&server.uri(), 1)
        .list_webhooks()
        .await
        .expect("three pages list")
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["wh_1", "wh_2", "wh_3"]);
}

#[tokio::test]
async fn unipile_stream_fetches_a_page_only_when_it_is_needed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/webhooks"))
        .and(query_param_is_missing("cursor"))
        .respond_with(ResponseTemplate::new(200).set_body_json(webhook_page("wh_1", Some("p2"))))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/webhooks"))
        .and(query_param("cursor", "p2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(webhook_page("wh_2", None)))
        .expect(0)
        .mount(&server)
        .await;
    let first = Box::pin(client(&server.uri(), 1).webhooks()).try_next().await.unwrap();
    assert_eq!(first.unwrap().id, "wh_1");
}

#[tokio::test]
async fn unipile_rate_limited_call_waits_for_retry_after_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/webhooks"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/webhooks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_webhook_list.json")))
        .expect(1)
        .mount(&server)
        .await;
    let started = Instant::now();
    let webhooks = client(&server.uri(), 3).list_webhooks().await.expect("succeeds after the 429");
    assert_eq!(webhooks.len(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the retry came after {:?}, before the 1 s Unipile asked for",
        started.elapsed()
    );
}

#[tokio::test]
async fn unipile_server_errors_are_retried_then_reported_with_the_call() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/webhooks"))
        .respond_with(ResponseTemplate::new(503).set_body_string("maintenance"))
        .expect(3)
        .mount(&server)
        .await;
    let error = client(&server.uri(), 3).list_webhooks().await.unwrap_err();
    assert_eq!(error.status(), Some(503));
    assert_eq!(error.to_string(), "Unipile webhooks.list (GET): HTTP 503 after 3 attempt(s): maintenance");
}

#[tokio::test]
async fn unipile_client_errors_are_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v1/webhooks/nope"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"type": "errors/invalid_credentials"})))
        .expect(1)
        .mount(&server)
        .await;
    let error = client(&server.uri(), 5).delete_webhook("nope").await.unwrap_err();
    let text = error.to_string();
    assert!(text.starts_with("Unipile webhooks.delete (DELETE): HTTP 401 after 1 attempt(s)"), "{text}");
    assert!(text.contains("invalid_credentials"), "{text}");
    assert!(!text.contains(API_KEY), "the key never shows in errors");
}

#[tokio::test]
async fn unipile_unreachable_is_a_transport_error_naming_the_call() {
    let error = client("http://127.0.0.1:9", 2).list_webhooks().await.unwrap_err();
    assert!(matches!(error, UnipileError::Transport { attempts: 2, .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("Unipile webhooks.list (GET): could not reach the API after 2 attempt(s)"),
        "{error}"
    );
}

#[tokio::test]
async fn unipile_create_posts_the_body_and_returns_the_new_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/webhooks"))
        .and(header("X-API-KEY", API_KEY))
        .and(body_partial_json(json!({
            "source": "account_status",
            "request_url": "https://relay.example.com/api/webhooks/unipile/account-status",
            "format": "json",
            "headers": [{"key": "Unipile-Auth", "value": "s"}]
        })))
        .respond_with(ResponseTemplate::new(201).set_body_json(fixture("api_webhook_created.json")))
        .expect(1)
        .mount(&server)
        .await;
    let id = client(&server.uri(), 1)
        .create_webhook(&NewWebhook {
            source: "account_status".into(),
            request_url: "https://relay.example.com/api/webhooks/unipile/account-status".into(),
            name: "relay-account-status".into(),
            format: "json".into(),
            events: vec![],
            headers: vec![ingest::unipile::types::WebhookHeader {
                key: "Unipile-Auth".into(),
                value: "s".into(),
            }],
        })
        .await
        .unwrap();
    assert_eq!(id, "Hk5Jd7Ls9Qa1Ws3Ed5Rf7T");
}

#[tokio::test]
async fn unipile_delete_calls_the_webhook_path() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE"))
        .and(path("/api/v1/webhooks/Hk5Jd7Ls9Qa1Ws3Ed5Rf7T"))
        .and(header("X-API-KEY", API_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_webhook_deleted.json")))
        .expect(1)
        .mount(&server)
        .await;
    client(&server.uri(), 1).delete_webhook("Hk5Jd7Ls9Qa1Ws3Ed5Rf7T").await.unwrap();
}

#[tokio::test]
async fn unipile_message_pages_come_with_their_raw_json() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/chats/c4Rt8YuIoP1aSdFgHjKlZx/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_message_list.json")))
        .mount(&server)
        .await;
    let messages: Vec<_> =
        client(&server.uri(), 1).messages("c4Rt8YuIoP1aSdFgHjKlZx").try_collect().await.unwrap();
    assert_eq!(messages.len(), 2);
    let (newest, raw) = &messages[0];
    assert_eq!(newest.text.as_deref(), Some("Yes, 3pm works."));
    assert_eq!(raw["delivered"], 1);
}
