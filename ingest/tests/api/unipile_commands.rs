//! `ingest webhooks ...` and `ingest sync` run as a user would: the built binary, its
//! settings in the environment, Unipile faked.

use std::process::Output;

use serde_json::Value;
use tokio::process::Command;

use crate::helpers::{self, create_database};
use crate::unipile_fake::{ACCOUNT_ID, API_KEY, FakeUnipile, listed_webhook};

const BASE: &str = "https://relay.example.com";

/// The binary with an empty environment plus `env`: nothing else leaks in.
async fn ingest(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("the ingest binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

#[tokio::test]
async fn unipile_command_webhooks_list_prints_a_table_without_secrets() {
    let fake = FakeUnipile::start().await;
    fake.seed(helpers::fixture("api_webhook_list.json")["items"].as_array().unwrap().clone());
    let dsn = fake.dsn();
    let output = ingest(&["webhooks", "list"], &[("UNIPILE_DSN", &dsn), ("UNIPILE_API_KEY", API_KEY)]).await;
    assert_success(&output);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("SOURCE") && lines[0].contains("REQUEST_URL"),
        "{text}"
    );
    assert!(lines[1].starts_with("Hk5Jd7Ls9Qa1Ws3Ed5Rf7T") && lines[1].contains("messaging"), "{text}");
    assert!(lines[1].contains("https://relay.example.com/api/webhooks/unipile/messages"), "{text}");
    assert!(lines[2].starts_with("Zz0Yy9Xx8Ww7Vv6Uu5Tt4S") && lines[2].contains("account_status"), "{text}");
    assert!(!text.contains("s3cr3t-value"), "header values are never printed: {text}");
}

#[tokio::test]
async fn unipile_command_webhooks_list_json_is_for_scripts() {
    let fake = FakeUnipile::start().await;
    fake.seed([listed_webhook("wh_1", "messaging", BASE, "hidden-secret")]);
    let dsn = fake.dsn();
    let output =
        ingest(&["webhooks", "list", "--json"], &[("UNIPILE_DSN", &dsn), ("UNIPILE_API_KEY", API_KEY)]).await;
    assert_success(&output);
    let listed: Value = serde_json::from_str(&stdout(&output)).expect("stdout is JSON");
    assert_eq!(listed[0]["id"], "wh_1");
    assert_eq!(listed[0]["source"], "messaging");
    assert_eq!(listed[0]["header_names"], serde_json::json!(["Content-Type", "Unipile-Auth"]));
    assert!(!stdout(&output).contains("hidden-secret"));
}

#[tokio::test]
async fn unipile_command_webhooks_ensure_creates_then_reuses() {
    let fake = FakeUnipile::start().await;
    let dsn = fake.dsn();
    let env = [
        ("UNIPILE_DSN", dsn.as_str()),
        ("UNIPILE_API_KEY", API_KEY),
        ("WEBHOOK_BASE_URL", BASE),
        ("WEBHOOK_SECRET", "cli-secret-0123456789abcdef0123456789ab"),
    ];
    let first = ingest(&["webhooks", "ensure", "--json"], &env).await;
    assert_success(&first);
    let done: Value = serde_json::from_str(&stdout(&first)).expect("stdout is JSON");
    assert_eq!(done[0]["source"], "messaging");
    assert_eq!(done[0]["action"], "created");
    assert_eq!(done[1]["source"], "account_status");
    assert_eq!(done[1]["action"], "created");

    let second = ingest(&["webhooks", "ensure"], &env).await;
    assert_success(&second);
    let text = stdout(&second);
    assert!(text.lines().next().unwrap().starts_with("SOURCE"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains(" reused ")).count(), 2, "{text}");
    assert_eq!(fake.creates(), 2);
}

#[tokio::test]
async fn unipile_command_webhooks_ensure_takes_the_lock_when_given_a_database() {
    let fake = FakeUnipile::start().await;
    let dsn = fake.dsn();
    let database = create_database("ingest").await;
    let env = [
        ("UNIPILE_DSN", dsn.as_str()),
        ("UNIPILE_API_KEY", API_KEY),
        ("WEBHOOK_BASE_URL", BASE),
        ("WEBHOOK_SECRET", "cli-secret-0123456789abcdef0123456789ab"),
        ("DATABASE_URL", database.url.as_str()),
    ];
    let (a, b) = tokio::join!(ingest(&["webhooks", "ensure"], &env), ingest(&["webhooks", "ensure"], &env));
    assert_success(&a);
    assert_success(&b);
    assert_eq!(fake.creates(), 2, "two runs at once create each webhook once");
    assert_eq!(fake.webhooks().len(), 2);
}

#[tokio::test]
async fn unipile_command_webhooks_delete_removes_one() {
    let fake = FakeUnipile::start().await;
    fake.seed([
        listed_webhook("wh_gone", "messaging", BASE, "s"),
        listed_webhook("wh_kept", "account_status", BASE, "s"),
    ]);
    let dsn = fake.dsn();
    let output =
        ingest(&["webhooks", "delete", "wh_gone"], &[("UNIPILE_DSN", &dsn), ("UNIPILE_API_KEY", API_KEY)])
            .await;
    assert_success(&output);
    assert_eq!(stdout(&output), "deleted webhook wh_gone\n");
    let left: Vec<Value> = fake.webhooks().iter().map(|w| w["id"].clone()).collect();
    assert_eq!(left, [Value::from("wh_kept")]);

    let again =
        ingest(&["webhooks", "delete", "wh_gone"], &[("UNIPILE_DSN", &dsn), ("UNIPILE_API_KEY", API_KEY)])
            .await;
    assert!(!again.status.success());
    assert!(stderr(&again).contains("HTTP 404"), "{}", stderr(&again));
}

#[tokio::test]
async fn unipile_command_without_credentials_says_which_setting_is_missing() {
    let output = ingest(&["webhooks", "list"], &[("UNIPILE_API_KEY", API_KEY)]).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("UNIPILE_DSN is not set"), "{}", stderr(&output));

    let output = ingest(
        &["webhooks", "ensure"],
        &[("UNIPILE_DSN", "http://127.0.0.1:9"), ("UNIPILE_API_KEY", API_KEY)],
    )
    .await;
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(error.contains("--webhook-base-url") && error.contains("--webhook-secret"), "{error}");
}

#[tokio::test]
async fn unipile_command_help_explains_the_commands() {
    let top = ingest(&["--help"], &[]).await;
    assert!(stdout(&top).contains("webhooks") && stdout(&top).contains("sync"), "{}", stdout(&top));

    let webhooks = ingest(&["webhooks", "--help"], &[]).await;
    assert_success(&webhooks);
    let text = stdout(&webhooks);
    for needle in ["list", "ensure", "delete"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    let list = stdout(&ingest(&["webhooks", "list", "--help"], &[]).await);
    for needle in ["--json", "UNIPILE_DSN", "UNIPILE_API_KEY"] {
        assert!(list.contains(needle), "{needle} missing from:\n{list}");
    }
    assert!(!list.contains("JWT_SECRET") && !list.contains("DATABASE_URL"), "{list}");

    let sync = stdout(&ingest(&["sync", "--help"], &[]).await);
    for needle in ["--account", "--since", "DATABASE_URL", "unread", "twice"] {
        assert!(sync.contains(needle), "{needle} missing from:\n{sync}");
    }
}

#[tokio::test]
async fn unipile_command_sync_backfills_and_a_rerun_stores_nothing() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let dsn = fake.dsn();
    let database = create_database("ingest").await;
    let env = [
        ("UNIPILE_DSN", dsn.as_str()),
        ("UNIPILE_API_KEY", API_KEY),
        ("DATABASE_URL", database.url.as_str()),
    ];

    let first = ingest(&["sync", "--json"], &env).await;
    assert_success(&first);
    let report: Value = serde_json::from_str(&stdout(&first)).expect("stdout is JSON");
    assert_eq!(report["accounts"], 1, "the account comes from GET /accounts");
    assert_eq!(report["messages_stored"], 3);

    let second = ingest(&["sync", "--account", ACCOUNT_ID, "--since", "2026-11-01"], &env).await;
    assert_success(&second);
    let text = stdout(&second);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ACCOUNTS"), "{text}");
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(values, ["1", "2", "0", "3", "0"], "{text}");
}

#[tokio::test]
async fn unipile_command_sync_logs_progress_and_a_summary_when_not_on_a_terminal() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let dsn = fake.dsn();
    let database = create_database("ingest").await;
    let output = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(["sync"])
        .env_clear()
        .envs([
            ("UNIPILE_DSN", dsn.as_str()),
            ("UNIPILE_API_KEY", API_KEY),
            ("DATABASE_URL", database.url.as_str()),
            ("SYNC_PROGRESS_EVERY_SECS", "0"),
            ("RUST_LOG", "info"),
        ])
        .output()
        .await
        .expect("the ingest binary runs");
    assert_success(&output);
    let log = stderr(&output);
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("backfill progress")).collect();
    assert!(progress.len() >= 2, "a line as the work goes:\n{log}");
    assert!(progress.last().unwrap().contains("chats=2"), "chats counted:\n{log}");
    let done =
        log.lines().find(|l| l.contains("backfill done")).unwrap_or_else(|| panic!("a summary:\n{log}"));
    assert!(done.contains("messages_stored=3") && done.contains("took_s="), "{done}");
    assert!(!log.contains('\u{1b}'), "no bar drawn into a log:\n{log}");
}

#[tokio::test]
async fn unipile_command_sync_draws_a_progress_bar_on_a_terminal() {
    let fake = FakeUnipile::start().await;
    fake.serve_history().await;
    let dsn = fake.dsn();
    let database = create_database("ingest").await;
    // `script` runs the command on a pseudo-terminal, as a person's shell would.
    let command = format!("{} sync", env!("CARGO_BIN_EXE_ingest"));
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_clear()
        .envs([
            ("UNIPILE_DSN", dsn.as_str()),
            ("UNIPILE_API_KEY", API_KEY),
            ("DATABASE_URL", database.url.as_str()),
            ("RUST_LOG", "warn"),
            ("PATH", "/usr/bin:/bin"),
            ("TERM", "xterm"),
        ])
        .output()
        .await
        .expect("script (util-linux) runs");
    assert_success(&output);
    let screen = stdout(&output);
    assert!(screen.contains("1/1 accounts"), "the bar counts accounts:\n{screen}");
    assert!(
        screen.contains("2 chats (0 skipped), 3 messages fetched, 3 new in"),
        "the bar's last words:\n{screen}"
    );
    assert!(screen.contains("MESSAGES_STORED"), "then the summary table:\n{screen}");
}
