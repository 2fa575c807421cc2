//! History backfill from a fake Unipile into a fresh database.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ingest::unipile::registration::BackgroundBackoff;
use ingest::unipile::sync::{self, AccountRef, SyncReport};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{TestDatabase, create_database};
use crate::unipile_fake::{ACCOUNT_ID, CHAT_ID, FakeUnipile, GROUP_CHAT_ID};

/// A migrated test database and a pool on it; the database lives as long as the guard.
async fn migrated_database() -> (PgPool, TestDatabase) {
    let database = create_database("ingest").await;
    let pool = PgPool::connect(&database.url).await.expect("connect to the test database");
    ingest::db::MIGRATOR.run(&pool).await.expect("migrations apply");
    (pool, database)
}

/// Every row of the tables a backfill may touch, `updated_at` included.
async fn snapshot(pool: &PgPool) -> Vec<Value> {
    let mut tables = Vec::new();
    for table in ["accounts", "chats", "messages", "outbox"] {
        let rows: Value = sqlx::query_scalar(&format!(
            "select coalesce(jsonb_agg(to_jsonb(t) order by t.id), '[]'::jsonb) from {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        tables.push(rows);
    }
    tables
}

fn subjects() -> shared::subjects::Subjects {
    shared::subjects::Subjects::new("relay.events").unwrap()
}

fn account() -> AccountRef {
    AccountRef { id: ACCOUNT_ID.into(), account_type: None }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

#[tokio::test]
async fn unipile_sync_twice_gives_the_same_rows() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    let client = fake.client();

    let first = sync::sync_accounts(&client, &pool, &[account()], None).await.unwrap();
    assert_eq!(
        first,
        SyncReport { accounts: 1, chats: 2, chats_skipped: 0, messages_fetched: 3, messages_stored: 3 }
    );
    let after_first = snapshot(&pool).await;
    let second = sync::sync_accounts(&client, &pool, &[account()], None).await.unwrap();
    assert_eq!(second.messages_stored, 0);
    assert_eq!(snapshot(&pool).await, after_first, "a second backfill changes no row");
}

#[tokio::test]
async fn unipile_sync_takes_unread_counts_from_unipile_and_emits_no_events() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    sync::sync_accounts(&fake.client(), &pool, &[account()], None).await.unwrap();

    type ChatRow = (String, i64, bool, Option<String>, Option<DateTime<Utc>>, Option<String>);
    let chats: Vec<ChatRow> = sqlx::query_as(
        "select id, unread_count, is_group, name, last_message_at, last_message_preview from chats order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        chats,
        [
            (
                CHAT_ID.into(),
                1,
                false,
                Some("Dana Reyes".into()),
                Some(at("2026-11-28T16:04:30Z")),
                Some("Yes, 3pm works.".into())
            ),
            (
                GROUP_CHAT_ID.into(),
                0,
                true,
                Some("Thursday planning".into()),
                Some(at("2026-11-20T08:30:00Z")),
                Some("[attachment]".into())
            ),
        ],
        "unread counts are Unipile's (1 and 0), not the number of incoming messages"
    );
    let outbox: i64 = sqlx::query_scalar("select count(*) from outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(outbox, 0, "history does not go out as message:new events");

    let (sender, is_sender, attachments, raw): (Value, bool, Value, Value) = sqlx::query_as(
        "select sender, is_sender, attachments, raw from messages where id = 'm1Qw2Er3Ty4Ui5Op6As7Dd'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!is_sender);
    assert_eq!(sender["name"], "Dana Reyes");
    assert_eq!(sender["provider_id"], "15105550199@s.whatsapp.net");
    assert_eq!(sender["id"], "Hn3bV5cX7zL9kJ2gF4dS6a");
    assert_eq!(attachments, serde_json::json!([]));
    assert_eq!(raw["object"], "Message", "the API item is kept as sent");
    let (seen, reactions): (bool, Value) =
        sqlx::query_as("select seen, reactions from messages where id = 'm1Qw2Er3Ty4Ui5Op6As7Dd'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(seen, "the API's seen flag is kept");
    assert_eq!(reactions.as_array().map(Vec::len), Some(1), "{reactions}");
    assert_eq!(reactions[0]["value"], "👍");
    assert_eq!(reactions[0]["sender_id"], "14155550123@s.whatsapp.net");
    let group_attachments: Value =
        sqlx::query_scalar("select attachments from messages where id = 'gM1sG2rO3uP4mE5sS6aG7e'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(group_attachments[0]["id"], "att_1", "a single attachment object becomes a list");
}

#[tokio::test]
async fn unipile_sync_since_skips_older_chats_and_messages() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    let report = sync::sync_accounts(&fake.client(), &pool, &[account()], Some(at("2026-11-28T16:03:00Z")))
        .await
        .unwrap();
    assert_eq!(
        report,
        SyncReport { accounts: 1, chats: 1, chats_skipped: 1, messages_fetched: 1, messages_stored: 1 }
    );
    let ids: Vec<String> = sqlx::query_scalar("select id from messages").fetch_all(&pool).await.unwrap();
    assert_eq!(ids, ["Se1Nt2By3Me4Xx5Yy6Zz7A"]);
}

/// The relay as it was before a restart: the oldest message of [`CHAT_ID`] stored.
async fn seed_one_stored_message(pool: &PgPool) {
    sqlx::query("insert into accounts (id, account_type) values ($1, 'WHATSAPP')")
        .bind(ACCOUNT_ID)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("insert into chats (id, account_id, unread_count) values ($1, $2, 5)")
        .bind(CHAT_ID)
        .bind(ACCOUNT_ID)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "insert into messages (id, chat_id, account_id, is_sender, sent_at)
         values ('m1Qw2Er3Ty4Ui5Op6As7Dd', $1, $2, false, '2026-11-28T16:02:11Z')",
    )
    .bind(CHAT_ID)
    .bind(ACCOUNT_ID)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn unipile_catch_up_fetches_what_arrived_since_the_newest_stored_message() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    seed_one_stored_message(&pool).await;

    let report = sync::catch_up(&fake.client(), &pool, &subjects()).await.unwrap();
    assert_eq!((report.chats, report.chats_skipped, report.messages_stored), (1, 1, 1));
    let ids: Vec<String> =
        sqlx::query_scalar("select id from messages order by sent_at").fetch_all(&pool).await.unwrap();
    assert_eq!(ids, ["m1Qw2Er3Ty4Ui5Op6As7Dd", "Se1Nt2By3Me4Xx5Yy6Zz7A"]);
    let unread: i64 = sqlx::query_scalar("select unread_count from chats where id = $1")
        .bind(CHAT_ID)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unread, 1, "the unread count is brought in line with Unipile's");
}

#[tokio::test]
async fn unipile_known_accounts_are_the_database_ones_and_unipiles() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    sqlx::query("insert into accounts (id, account_type) values ('Lk2jH4gF6dS8aQ1wE3rT5y', 'LINKEDIN')")
        .execute(&pool)
        .await
        .unwrap();
    let accounts = sync::known_accounts(&fake.client(), &pool, &subjects()).await.unwrap();
    assert_eq!(
        accounts,
        [
            AccountRef { id: "Lk2jH4gF6dS8aQ1wE3rT5y".into(), account_type: Some("LINKEDIN".into()) },
            AccountRef { id: ACCOUNT_ID.into(), account_type: Some("WHATSAPP".into()) },
        ]
    );
}

#[tokio::test]
async fn unipile_start_up_catch_up_runs_on_one_replica_at_a_time() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let (pool, _database) = migrated_database().await;
    seed_one_stored_message(&pool).await;
    let backoff = BackgroundBackoff { first: Duration::from_millis(20), max: Duration::from_millis(50) };
    let count = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from messages").fetch_one(&pool).await.unwrap()
    };

    let mut other_replica = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(sync::CATCH_UP_LOCK_KEY)
        .execute(&mut *other_replica)
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        sync::run_catch_up(fake.client(), pool.clone(), subjects(), backoff.clone()),
    )
    .await
    .expect("a replica that finds the catch-up taken does not wait for it");
    assert_eq!(count().await, 1, "skipped while another replica runs it");
    other_replica.rollback().await.unwrap();

    tokio::time::timeout(
        Duration::from_secs(10),
        sync::run_catch_up(fake.client(), pool.clone(), subjects(), backoff),
    )
    .await
    .expect("the catch-up finishes");
    assert_eq!(count().await, 2);
}
