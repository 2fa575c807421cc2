//! The REST read API as a browser sees it: tokens, scoping, pages, mark-read, CORS and
//! the OpenAPI document.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use shared::envelope::EventType;
use uuid::Uuid;

use crate::helpers::{Options, TestApp, fixture, spawn_app, spawn_app_with};

const WAIT: Duration = Duration::from_secs(10);

fn token(app: &TestApp, accounts: &[&str]) -> String {
    app.jwt.issue("user-1", accounts.iter().map(|a| a.to_string()).collect(), Duration::from_secs(600))
}

/// A received message with a fresh id, in `chat` of `account`, sent at `at`.
fn message(account: &str, chat: &str, at: &str, text: &str) -> (String, Value) {
    let id = format!("msg_{}", Uuid::new_v4().simple());
    let mut v = fixture("message_received_whatsapp.json");
    v["account_id"] = account.into();
    v["chat_id"] = chat.into();
    v["message_id"] = id.clone().into();
    v["timestamp"] = at.into();
    v["message"] = text.into();
    (id, v)
}

/// `2026-11-28T16:00:00Z` plus `seconds`.
fn at(seconds: i64) -> String {
    let base = chrono::DateTime::parse_from_rfc3339("2026-11-28T16:00:00Z").unwrap();
    (base + chrono::Duration::seconds(seconds)).to_rfc3339()
}

async fn get(app: &TestApp, token: Option<&str>, path: &str) -> (StatusCode, Value) {
    let mut request = app.client.get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("ingest answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(app: &TestApp, token: &str, path: &str) -> (StatusCode, Value) {
    let response = app.client.post(app.url(path)).bearer_auth(token).send().await.expect("ingest answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Follows `next_cursor` through every page of a list; returns the item ids in order.
async fn all_pages(app: &TestApp, token: &str, first: &str, cursor_param: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut path = first.to_owned();
    loop {
        let (status, page) = get(app, Some(token), &path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        ids.extend(page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("{first}&{cursor_param}={cursor}"),
            None => return ids,
        }
        assert!(ids.len() < 10_000, "pagination does not end");
    }
}

#[tokio::test]
async fn calls_without_a_valid_token_get_401_with_the_error_body() {
    let app = spawn_app().await;
    let expired = app.jwt.sign(&shared::claims::Claims {
        sub: "u".into(),
        exp: chrono::Utc::now().timestamp() - 10,
        accounts: vec!["*".into()],
        iss: None,
        aud: None,
        name: None,
    });
    let foreign = shared::claims::JwtKeys::new(&"another-secret".to_owned().into()).issue(
        "u",
        vec!["*".into()],
        Duration::from_secs(60),
    );
    for token in [None, Some("not-a-jwt"), Some(expired.as_str()), Some(foreign.as_str())] {
        for path in ["/api/chats", "/api/chats/any/messages"] {
            let (status, body) = get(&app, token, path).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
            assert!(body["error"]["message"].is_string());
        }
    }
    let response = app.client.post(app.url("/api/chats/any/read")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_token_sees_only_its_accounts_and_another_accounts_chat_is_404() {
    let app = spawn_app().await;
    app.post_message_expect(&message("acc_a", "chat_a", &at(1), "for A").1, "accepted").await;
    let (b_message, b) = message("acc_b", "chat_b", &at(2), "secret of B");
    app.post_message_expect(&b, "accepted").await;
    let token_a = token(&app, &["acc_a"]);

    let (status, page) = get(&app, Some(&token_a), "/api/chats").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["chat_a"]);

    for (status, body) in [
        get(&app, Some(&token_a), "/api/chats/chat_b/messages").await,
        get(&app, Some(&token_a), "/api/chats?account_id=acc_b").await,
        post(&app, &token_a, "/api/chats/chat_b/read").await,
        get(&app, Some(&token_a), "/api/chats/no_such_chat/messages").await,
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert!(!body.to_string().contains("secret of B") && !body.to_string().contains(&b_message));
    }
    assert_eq!(
        app.count("select unread_count from chats where id = 'chat_b'").await,
        1,
        "B's chat untouched"
    );

    let all = token(&app, &["*"]);
    let (_, page) = get(&app, Some(&all), "/api/chats").await;
    let ids: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["chat_b", "chat_a"], "newest activity first");
    let (_, page) = get(&app, Some(&all), "/api/chats?account_id=acc_a").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn chats_list_newest_first_with_unread_preview_and_pages_through_cursors() {
    let app = spawn_app().await;
    for i in 0..7 {
        let chat = format!("chat_{i}");
        app.post_message_expect(&message("acc_1", &chat, &at(i), &format!("hello {i}")).1, "accepted").await;
        if i % 2 == 0 {
            app.post_message_expect(&message("acc_1", &chat, &at(i), "again").1, "accepted").await;
        }
    }
    let token = token(&app, &["acc_1"]);
    let (status, page) = get(&app, Some(&token), "/api/chats?limit=3").await;
    assert_eq!(status, StatusCode::OK);
    let first = &page["items"][0];
    assert_eq!(first["id"], "chat_6");
    assert_eq!(first["account_id"], "acc_1");
    assert_eq!(first["account_type"], "WHATSAPP");
    assert_eq!(first["name"], "Dana Reyes");
    assert_eq!(first["unread_count"], 2);
    assert_eq!(first["last_message_preview"], "again");
    assert_eq!(first["last_message_at"], "2026-11-28T16:00:06.000Z");
    assert_eq!(page["items"][1]["unread_count"], 1);
    assert!(page["next_cursor"].is_string());

    let ids = all_pages(&app, &token, "/api/chats?limit=3", "cursor").await;
    let expected: Vec<String> = (0..7).rev().map(|i| format!("chat_{i}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn message_pages_skip_and_repeat_nothing_while_messages_keep_arriving() {
    let app = spawn_app().await;
    // Pairs share a timestamp, so the id breaks ties.
    let mut existing = Vec::new();
    for i in 0..40 {
        let (id, body) = message("acc_1", "chat_1", &at(i / 2), &format!("old {i}"));
        app.post_message_expect(&body, "accepted").await;
        existing.push(id);
    }
    let token = token(&app, &["acc_1"]);

    // Between every two pages, more messages arrive (newer, as live ones are).
    let mut seen: Vec<String> = Vec::new();
    let mut path = "/api/chats/chat_1/messages?limit=3".to_owned();
    for page_number in 0.. {
        let (status, page) = get(&app, Some(&token), &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        let Some(cursor) = page["next_cursor"].as_str() else { break };
        path = format!("/api/chats/chat_1/messages?limit=3&before={cursor}");
        for k in 0..3 {
            let body = message("acc_1", "chat_1", &at(100 + page_number * 3 + k), "new").1;
            app.post_message_expect(&body, "accepted").await;
        }
        assert!(page_number < 100, "pagination does not end");
    }

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no message appears twice");
    for id in &existing {
        assert!(unique.contains(id), "{id} was skipped");
    }
    // Pages are newest first: the old ones come out in reverse order of sending.
    let old_in_order: Vec<&String> = seen.iter().filter(|id| existing.contains(id)).collect();
    let mut expected: Vec<&String> = existing.iter().collect();
    expected.sort_by_key(|id| std::cmp::Reverse((existing.iter().position(|e| e == *id).unwrap() / 2, *id)));
    assert_eq!(old_in_order, expected);
}

#[tokio::test]
async fn messages_show_read_reactions_edits_and_tombstones_but_not_placeholders() {
    let app = spawn_app().await;
    let (id, body) = message("acc_1", "chat_1", &at(1), "first");
    app.post_message_expect(&body, "accepted").await;
    let (deleted_id, body) = message("acc_1", "chat_1", &at(2), "second");
    app.post_message_expect(&body, "accepted").await;
    let with = |name: &str, message_id: &str| {
        let mut v = fixture(name);
        v["account_id"] = "acc_1".into();
        v["chat_id"] = "chat_1".into();
        v["message_id"] = message_id.into();
        v
    };
    app.post_message_expect(&with("message_read.json", &id), "accepted").await;
    app.post_message_expect(&with("message_reaction.json", &id), "accepted").await;
    let mut edited = with("message_edited.json", &id);
    edited["timestamp"] = "2026-11-28T16:30:00.000Z".into();
    app.post_message_expect(&edited, "accepted").await;
    app.post_message_expect(&with("message_deleted.json", &deleted_id), "accepted").await;
    app.post_message_expect(&with("message_read.json", "msg_not_arrived"), "accepted").await;

    let (status, page) = get(&app, Some(&token(&app, &["acc_1"])), "/api/chats/chat_1/messages").await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [deleted_id.as_str(), id.as_str()], "the placeholder is not listed");
    assert_eq!(page["next_cursor"], Value::Null);

    let tombstone = &items[0];
    assert_eq!(tombstone["deleted"], true);
    assert_eq!(tombstone["deleted_at"], "2026-11-28T16:10:00.000Z");
    assert_eq!(tombstone["text"], Value::Null);

    let m = &items[1];
    assert_eq!(m["text"], "Are we still on for Thursday at 3?");
    assert_eq!(m["edited"], true);
    assert_eq!(m["edited_at"], "2026-11-28T16:30:00.000Z");
    assert_eq!(m["seen"], true);
    assert_eq!(m["reactions"][0]["value"], "👍");
    assert_eq!(m["reactions"][0]["sender"]["name"], "Sam Okafor");
    assert_eq!(m["sender"]["name"], "Dana Reyes");
    assert_eq!(m["timestamp"], "2026-11-28T16:00:01.000Z");
    assert_eq!(m["deleted"], false);
}

#[tokio::test]
async fn marking_a_chat_read_zeroes_unread_and_tells_other_tabs_once() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.post_message_expect(&message("acc_1", "chat_1", &at(i), "hi").1, "accepted").await;
    }
    let token = token(&app, &["acc_1"]);
    let (status, chat) = post(&app, &token, "/api/chats/chat_1/read").await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(chat["id"], "chat_1");
    assert_eq!(chat["unread_count"], 0);
    assert_eq!(app.count("select unread_count from chats where id = 'chat_1'").await, 0);
    let (_, page) = get(&app, Some(&token), "/api/chats").await;
    assert_eq!(page["items"][0]["unread_count"], 0);

    let events = app.stream_events(4, WAIT).await;
    let reads: Vec<_> =
        events.iter().map(|(_, e)| e).filter(|e| e.event_type == EventType::ChatRead).collect();
    assert_eq!(reads.len(), 1, "{events:?}");
    assert_eq!(reads[0].account_id, "acc_1");
    assert_eq!(reads[0].chat_id.as_deref(), Some("chat_1"));
    assert_eq!(reads[0].data["chat"]["unread_count"], 0);
    assert_eq!(reads[0].data["chat"]["last_message_at"], "2026-11-28T16:00:02.000Z");

    let outbox = app.count("select count(*) from outbox").await;
    let (status, chat) = post(&app, &token, "/api/chats/chat_1/read").await;
    assert_eq!((status, chat["unread_count"].as_i64()), (StatusCode::OK, Some(0)));
    assert_eq!(app.count("select count(*) from outbox").await, outbox, "nothing new to tell");
}

#[tokio::test]
async fn bad_limits_and_cursors_are_400_with_the_error_body() {
    let app = spawn_app().await;
    app.post_message_expect(&message("acc_1", "chat_1", &at(1), "hi").1, "accepted").await;
    let token = token(&app, &["*"]);
    for path in [
        "/api/chats?cursor=garbage",
        "/api/chats?limit=0",
        "/api/chats?limit=ten",
        "/api/chats/chat_1/messages?before=eyJub3QiOiJhIGN1cnNvciJ9",
        "/api/chats/chat_1/messages?limit=-1",
    ] {
        let (status, body) = get(&app, Some(&token), path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}");
    }
    let (status, page) = get(&app, Some(&token), "/api/chats?limit=100000").await;
    assert_eq!(
        (status, page["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "a big limit is capped"
    );
}

#[tokio::test]
async fn browsers_from_configured_origins_may_call_the_api() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--cors-origins=https://inbox.example.com,https://admin.example.com".into()],
        ..Options::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/chats"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
    };
    let allowed = preflight("https://admin.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://admin.example.com");
    let allowed_headers =
        allowed.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed_headers.contains("authorization"), "{allowed_headers}");

    let other = preflight("https://evil.example.net").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let response = app
        .client
        .get(app.url("/api/chats"))
        .header("Origin", "https://inbox.example.com")
        .bearer_auth(token(&app, &["*"]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], "https://inbox.example.com");
}

#[tokio::test]
async fn the_openapi_document_describes_the_rest_and_webhook_endpoints() {
    let app = spawn_app().await;
    let (status, doc) = get(&app, None, "/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/chats",
        "/api/chats/{chat_id}/messages",
        "/api/chats/{chat_id}/read",
        "/api/webhooks/unipile/messages",
        "/api/webhooks/unipile/account-status",
    ] {
        assert!(paths.contains_key(path), "{path} missing");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in
        ["ChatPage", "MessagePage", "MessageRecord", "ChatRecord", "Reaction", "ErrorBody", "WebhookAck"]
    {
        assert!(schemas.contains_key(schema), "{schema} missing");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}
