//! Ensuring the relay's webhooks against a stateful fake Unipile.

use std::time::Duration;

use ingest::config::UnipileArgs;
use ingest::unipile::registration::{
    self as webhooks, Action, BackgroundBackoff, Registration, SkipReason, WebhookSettings,
};
use secrecy::SecretString;
use sqlx::PgPool;

use crate::helpers::{self, create_database};
use crate::unipile_fake::{API_KEY, FakeUnipile, listed_webhook};

const BASE: &str = "https://relay.example.com";

fn settings(secret: &str) -> WebhookSettings {
    WebhookSettings::new(BASE, SecretString::from(secret)).unwrap()
}

/// `(source, request_url, Unipile-Auth)` of every webhook the fake holds, sorted.
fn summary(fake: &FakeUnipile) -> Vec<(String, String, String)> {
    let mut all: Vec<_> = fake
        .webhooks()
        .iter()
        .map(|w| {
            let secret = w["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["key"] == "Unipile-Auth")
                .map(|h| h["value"].as_str().unwrap().to_owned())
                .unwrap_or_default();
            (w["source"].as_str().unwrap().to_owned(), w["request_url"].as_str().unwrap().to_owned(), secret)
        })
        .collect();
    all.sort();
    all
}

fn expected(secret: &str) -> Vec<(String, String, String)> {
    vec![
        ("account_status".into(), format!("{BASE}/api/webhooks/unipile/account-status"), secret.into()),
        ("messaging".into(), format!("{BASE}/api/webhooks/unipile/messages"), secret.into()),
    ]
}

#[tokio::test]
async fn unipile_ensure_creates_both_webhooks_when_none_exist() {
    let fake = FakeUnipile::start().await;
    let done = webhooks::ensure(&fake.client(), &settings("s3cr3t"), None).await.unwrap();
    assert_eq!(done.iter().map(|e| e.action).collect::<Vec<_>>(), [Action::Created, Action::Created]);
    assert_eq!(summary(&fake), expected("s3cr3t"));

    let messaging = fake.webhooks().into_iter().find(|w| w["source"] == "messaging").unwrap();
    assert_eq!(messaging["format"], "json");
    assert_eq!(messaging["name"], "relay-messaging");
    assert_eq!(
        messaging["events"],
        serde_json::json!([
            "message_received",
            "message_read",
            "message_reaction",
            "message_edited",
            "message_deleted"
        ])
    );
    assert!(
        messaging["headers"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"key": "Content-Type", "value": "application/json"}))
    );
    let status = fake.webhooks().into_iter().find(|w| w["source"] == "account_status").unwrap();
    assert_eq!(status["events"], serde_json::json!([]), "account_status takes no events");
}

#[tokio::test]
async fn unipile_ensure_reuses_webhooks_that_are_up_to_date() {
    let fake = FakeUnipile::start().await;
    let others = helpers::fixture("api_webhook_list.json")["items"][1].clone();
    fake.seed([
        listed_webhook("wh_msg", "messaging", BASE, "s3cr3t"),
        others.clone(),
        listed_webhook("wh_status", "account_status", BASE, "s3cr3t"),
    ]);
    let done = webhooks::ensure(&fake.client(), &settings("s3cr3t"), None).await.unwrap();
    assert_eq!(
        done.iter().map(|e| (e.id.as_str(), e.action)).collect::<Vec<_>>(),
        [("wh_msg", Action::Reused), ("wh_status", Action::Reused)]
    );
    assert_eq!((fake.creates(), fake.deletes()), (0, 0));
    assert!(fake.webhooks().contains(&others), "someone else's webhook is left alone");
}

#[tokio::test]
async fn unipile_ensure_replaces_a_webhook_whose_secret_is_stale() {
    let fake = FakeUnipile::start().await;
    fake.seed([
        listed_webhook("wh_old", "messaging", BASE, "old-secret"),
        listed_webhook("wh_status", "account_status", BASE, "rotated"),
    ]);
    let done = webhooks::ensure(&fake.client(), &settings("rotated"), None).await.unwrap();
    assert_eq!(done[0].action, Action::Replaced);
    assert_eq!(done[0].deleted, ["wh_old"]);
    assert_ne!(done[0].id, "wh_old");
    assert_eq!(done[1].action, Action::Reused);
    assert_eq!(summary(&fake), expected("rotated"));
}

#[tokio::test]
async fn unipile_ensure_removes_duplicates_left_by_earlier_runs() {
    let fake = FakeUnipile::start().await;
    fake.seed([
        listed_webhook("wh_b", "messaging", BASE, "s"),
        listed_webhook("wh_a", "messaging", BASE, "s"),
        listed_webhook("wh_c", "messaging", BASE, "s"),
    ]);
    let done = webhooks::ensure(&fake.client(), &settings("s"), None).await.unwrap();
    assert_eq!((done[0].id.as_str(), done[0].action), ("wh_a", Action::Reused));
    assert_eq!(done[0].deleted, ["wh_b", "wh_c"]);
    assert_eq!(summary(&fake), expected("s"));
}

#[tokio::test]
async fn unipile_repeated_starts_create_nothing_more() {
    let fake = FakeUnipile::start().await;
    for _ in 0..3 {
        webhooks::ensure(&fake.client(), &settings("s"), None).await.unwrap();
    }
    assert_eq!(fake.creates(), 2);
    assert_eq!(summary(&fake), expected("s"));
}

async fn replica_pool(database_url: &str) -> PgPool {
    PgPool::connect(database_url).await.expect("connect to the test database")
}

#[tokio::test]
async fn unipile_concurrent_replicas_with_the_lock_end_with_one_of_each() {
    let fake = FakeUnipile::start().await;
    let database = create_database("ingest").await;
    let mut replicas = Vec::new();
    for _ in 0..6 {
        let client = fake.client();
        let pool = replica_pool(&database.url).await;
        replicas
            .push(tokio::spawn(async move { webhooks::ensure(&client, &settings("s"), Some(&pool)).await }));
    }
    for replica in replicas {
        replica.await.unwrap().expect("every replica's ensure succeeds");
    }
    assert_eq!(fake.creates(), 2, "the lock lets only the first replica create");
    assert_eq!(summary(&fake), expected("s"));
}

#[tokio::test]
async fn unipile_concurrent_runs_without_a_lock_still_converge() {
    let fake = FakeUnipile::start().await;
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let client = fake.client();
            tokio::spawn(async move { webhooks::ensure(&client, &settings("s"), None).await })
        })
        .collect();
    let mut kept = Vec::new();
    for run in runs {
        kept.push(run.await.unwrap().expect("every run succeeds")[0].id.clone());
    }
    assert_eq!(summary(&fake), expected("s"));
    let survivor = fake.webhooks().into_iter().find(|w| w["source"] == "messaging").unwrap();
    assert_eq!(kept.last().map(String::as_str), survivor["id"].as_str());
}

fn unipile_args(dsn: Option<String>, key: Option<&str>) -> UnipileArgs {
    UnipileArgs { unipile_dsn: dsn, unipile_api_key: key.map(SecretString::from) }
}

#[tokio::test]
async fn unipile_registration_keeps_retrying_until_unipile_answers() {
    let fake = FakeUnipile::start().await;
    // The client gives up after 5 attempts; 12 failures outlast two rounds.
    fake.fail_next(12);
    let secret = SecretString::from("s");
    let registration =
        Registration::decide(Some(BASE), &secret, &unipile_args(Some(fake.dsn()), Some(API_KEY)));
    assert!(matches!(registration, Registration::Enabled { .. }));
    let database = create_database("ingest").await;
    let pool = replica_pool(&database.url).await;
    let backoff = BackgroundBackoff { first: Duration::from_millis(20), max: Duration::from_millis(50) };
    let task = webhooks::spawn_registration(registration, pool, backoff);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("registration succeeds once Unipile answers")
        .unwrap();
    assert_eq!(summary(&fake), expected("s"));
}

#[tokio::test]
async fn unipile_registration_without_settings_is_skipped_and_calls_nothing() {
    let fake = FakeUnipile::start().await;
    let secret = SecretString::from("s");
    let registration = Registration::decide(None, &secret, &unipile_args(Some(fake.dsn()), None));
    let Registration::Skipped { reason } = &registration else { panic!("must be skipped") };
    assert_eq!(reason, &SkipReason::Missing(vec!["WEBHOOK_BASE_URL", "UNIPILE_API_KEY"]));
    assert_eq!(reason.to_string(), "WEBHOOK_BASE_URL and UNIPILE_API_KEY are not set");
    let database = create_database("ingest").await;
    let pool = replica_pool(&database.url).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        webhooks::spawn_registration(registration, pool, BackgroundBackoff::default()),
    )
    .await
    .expect("a skipped registration ends at once")
    .unwrap();
    assert!(fake.server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn unipile_ingest_registers_its_webhooks_at_start_up() {
    let fake = FakeUnipile::start().await;
    let app = helpers::spawn_app_with(helpers::Options {
        extra_args: vec![
            format!("--webhook-base-url={BASE}"),
            format!("--unipile-dsn={}", fake.dsn()),
            format!("--unipile-api-key={API_KEY}"),
        ],
        ..Default::default()
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while summary(&fake).len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(summary(&fake), expected(helpers::WEBHOOK_SECRET));
    let mut metrics = String::new();
    while !metrics.contains("unipile_webhooks_registered 1") && tokio::time::Instant::now() < deadline {
        metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metrics.contains("unipile_webhooks_registered 1"), "{metrics}");
    assert!(
        metrics.contains(r#"unipile_requests_total{call="webhooks.create",outcome="ok"} 2"#),
        "{metrics}"
    );
}
