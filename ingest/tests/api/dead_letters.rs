//! `ingest dead-letters list | replay | prune`, run as an operator would, against the
//! test's database and a running ingest.

use serde_json::{Value, json};

use crate::helpers::{WEBHOOK_SECRET, message_received, spawn_app};

/// Runs the command without blocking the runtime the in-process ingest serves on.
async fn dead_letters(database_url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
        .env_clear()
        .arg("dead-letters")
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .output()
        .await
        .expect("ingest runs")
}

fn stdout(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_once_usable_and_pruned() {
    let app = spawn_app().await;
    let mut too_long = message_received("acc_dl", "chat_dl", false);
    too_long["message_id"] = json!("x".repeat(300));
    app.post_message_expect(&too_long, "dead_lettered").await;
    let response = app.post_raw("/api/webhooks/unipile/messages", "application/json", "not json").await;
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "dead_lettered");

    let listed: Value =
        serde_json::from_str(&stdout(&dead_letters(app.database_url(), &["list", "--json"]).await)).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().any(|l| l["reason"].as_str().unwrap().contains("id_too_long")));

    // The sender's id is fixed at the source: the stored body becomes usable.
    let fixed = message_received("acc_dl", "chat_dl", false);
    sqlx::query("update dead_letters set body = $1 where reason like '%id_too_long%'")
        .bind(fixed.to_string().into_bytes())
        .execute(&app.db)
        .await
        .unwrap();
    let out = stdout(&dead_letters(app.database_url(), &["replay", "--url", &app.address]).await);
    assert!(out.contains("1 taken and deleted, 1 dead-lettered again"), "{out}");
    let stored: i64 = sqlx::query_scalar("select count(*) from messages where id = $1")
        .bind(fixed["message_id"].as_str().unwrap())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the replayed delivery is a message now");
    // The one still unusable was dead-lettered again; the first copy stays until pruned.
    assert_eq!(app.count("select count(*) from dead_letters").await, 2);

    let out = stdout(&dead_letters(app.database_url(), &["prune", "--before", "0s"]).await);
    assert!(out.contains("deleted 2"), "{out}");
    assert_eq!(app.count("select count(*) from dead_letters").await, 0);
}
