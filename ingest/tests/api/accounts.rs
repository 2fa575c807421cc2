//! `GET /api/accounts`, the accounts' status from webhooks and from Unipile's list, and
//! the backfill an account gets by itself when it comes back.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{method, path};

use crate::helpers::{Options, TestApp, message_received, spawn_app, spawn_app_with};
use crate::unipile_fake::{ACCOUNT_ID, API_KEY, CHAT_ID, FakeUnipile};

const OTHER_ACCOUNT: &str = "Lk2jH4gF6dS8aQ1wE3rT5y";

fn token(app: &TestApp, accounts: &[&str]) -> String {
    app.jwt.issue("agent-1", accounts.iter().map(|a| a.to_string()).collect(), Duration::from_secs(600))
}

async fn accounts(app: &TestApp, token: &str, query: &str) -> (u16, Value) {
    let response =
        app.client.get(app.url(&format!("/api/accounts{query}"))).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn post_status(app: &TestApp, account_id: &str, account_type: &str, status: &str) -> Value {
    let body =
        json!({"AccountStatus": {"account_id": account_id, "account_type": account_type, "message": status}});
    let response =
        app.post_raw("/api/webhooks/unipile/account-status", "application/json", body.to_string()).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn ids(page: &Value) -> Vec<&str> {
    page["items"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn accounts_list_the_tokens_accounts_with_provider_and_status_from_webhooks() {
    let app = spawn_app().await;
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "OK").await;
    post_status(&app, OTHER_ACCOUNT, "LINKEDIN", "OK").await;
    post_status(&app, OTHER_ACCOUNT, "LINKEDIN", "CREDENTIALS").await;

    let (status, page) = accounts(&app, &token(&app, &[OTHER_ACCOUNT]), "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), [OTHER_ACCOUNT], "only the token's account: {page}");
    let account = &page["items"][0];
    assert_eq!(account["account_type"], "LINKEDIN");
    assert_eq!(account["status"], "CREDENTIALS", "the latest status: {page}");
    assert!(account["status_changed_at"].is_string(), "{page}");
    assert_eq!(page["next_cursor"], Value::Null);

    let (_, all) = accounts(&app, &token(&app, &["*"]), "?limit=1").await;
    assert_eq!(ids(&all), [OTHER_ACCOUNT], "ids in order, one per page: {all}");
    let cursor = all["next_cursor"].as_str().expect("a second page");
    let (_, rest) = accounts(&app, &token(&app, &["*"]), &format!("?limit=1&cursor={cursor}")).await;
    assert_eq!(ids(&rest), [ACCOUNT_ID], "{rest}");
    assert_eq!(rest["next_cursor"], Value::Null);

    let (status, _) = accounts(&app, "not-a-token", "").await;
    assert_eq!(status, 401);
    let (status, none) = accounts(&app, &token(&app, &["acc_nobody"]), "").await;
    assert_eq!((status, ids(&none).len()), (200, 0), "{none}");
}

#[tokio::test]
async fn accounts_take_name_and_status_from_unipiles_list_and_a_change_is_an_event() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let app = spawn_app().await;
    // The relay heard of the account by webhook while it was disconnected.
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "CREDENTIALS").await;
    let before = app.stream_events(1, Duration::from_secs(5)).await.len();

    let listed = ingest::unipile::sync::known_accounts(&fake.client(), &app.db, &app.subjects).await.unwrap();
    assert_eq!(listed.len(), 1);

    let (_, page) = accounts(&app, &token(&app, &[ACCOUNT_ID]), "").await;
    let account = &page["items"][0];
    assert_eq!(account["name"], "+14155550123", "the name Unipile lists: {page}");
    assert_eq!(account["status"], "OK", "the status Unipile lists: {page}");
    let events = app.stream_events(before + 1, Duration::from_secs(5)).await;
    let last = &events.last().unwrap().1;
    assert_eq!(last.event_type.as_str(), "account:status");
    assert_eq!(last.data["account"]["status"], "OK");
    assert_eq!(last.data["account"]["name"], "+14155550123");

    // The same list again changes nothing and says nothing.
    ingest::unipile::sync::known_accounts(&fake.client(), &app.db, &app.subjects).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.read_stream().await.len(), events.len(), "no second event");
    let backfills = app.count("select count(*) from accounts where backfill_requested_at is not null").await;
    assert_eq!(backfills, 0, "a sync is the backfill itself: no request is left behind");
}

/// An app whose Unipile is `fake`, so returned accounts are backfilled.
async fn app_with_unipile(fake: &FakeUnipile) -> TestApp {
    let extra_args = vec![format!("--unipile-dsn={}", fake.dsn()), format!("--unipile-api-key={API_KEY}")];
    spawn_app_with(Options { extra_args, ..Options::default() }).await
}

async fn stored(app: &TestApp, message_id: &str) -> bool {
    app.count(&format!("select count(*) from messages where id = '{message_id}'")).await == 1
}

async fn chat_list_calls(fake: &FakeUnipile) -> usize {
    let requests = fake.server.received_requests().await.unwrap_or_default();
    requests.iter().filter(|r| r.method.as_str() == "GET" && r.url.path() == "/api/v1/chats").count()
}

#[tokio::test]
async fn an_account_that_comes_back_is_backfilled_since_its_last_stored_message_once() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let app = app_with_unipile(&fake).await;
    // Before the disconnect: one live message at 16:03. Unipile's history of the chat
    // holds one message before it (16:02:11) and one after (16:04:30).
    let mut live = message_received(ACCOUNT_ID, CHAT_ID, false);
    live["timestamp"] = "2026-11-28T16:03:00.000Z".into();
    app.post_message_expect(&live, "accepted").await;
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "OK").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(chat_list_calls(&fake).await, 0, "a first status is no return: nothing is fetched");

    post_status(&app, ACCOUNT_ID, "WHATSAPP", "CREDENTIALS").await;
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "OK").await;

    let missed = "Se1Nt2By3Me4Xx5Yy6Zz7A";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !stored(&app, missed).await {
        assert!(tokio::time::Instant::now() < deadline, "the message missed while away is never backfilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.count("select count(*) from accounts where backfill_requested_at is not null").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the request is never cleared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !stored(&app, "m1Qw2Er3Ty4Ui5Op6As7Dd").await,
        "messages older than the last stored one are not fetched again"
    );
    let (_, page) = accounts(&app, &token(&app, &[ACCOUNT_ID]), "").await;
    assert_eq!(page["items"][0]["status"], "OK");
    let calls = chat_list_calls(&fake).await;
    assert!(calls >= 1, "the chat list was read");

    // OK again is no change: no second backfill.
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "OK").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(chat_list_calls(&fake).await, calls, "no backfill without a return");
}

#[tokio::test]
async fn a_return_while_unipile_fails_is_backfilled_once_unipile_answers() {
    let fake = FakeUnipile::start().await;
    let app = app_with_unipile(&fake).await;
    let mut live = message_received(ACCOUNT_ID, CHAT_ID, false);
    live["timestamp"] = "2026-11-28T16:03:00.000Z".into();
    app.post_message_expect(&live, "accepted").await;
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "STOPPED").await;
    // Unipile answers 500 to the chat list at first.
    let failing = wiremock::Mock::given(method("GET"))
        .and(path("/api/v1/chats"))
        .respond_with(wiremock::ResponseTemplate::new(500))
        .mount_as_scoped(&fake.server)
        .await;
    post_status(&app, ACCOUNT_ID, "WHATSAPP", "RECONNECTED").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while chat_list_calls(&fake).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the backfill is never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pending = app.count("select count(*) from accounts where backfill_requested_at is not null").await;
    assert_eq!(pending, 1, "a failed backfill stays requested");
    drop(failing);
    fake.serve_history().await;
    // Retried after the retry pause (30 s); the row's lease is cut short here so the test
    // does not wait it out, as time passing would.
    sqlx::query("update accounts set backfill_lease_until = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !stored(&app, "Se1Nt2By3Me4Xx5Yy6Zz7A").await {
        assert!(tokio::time::Instant::now() < deadline, "never backfilled after Unipile came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
