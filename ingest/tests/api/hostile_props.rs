//! Property: whatever an authenticated sender posts, the webhook answers 200 (stored or
//! dead-lettered) or the contract's 4xx, never 5xx while PostgreSQL and NATS are up,
//! and every 200 is found in `messages` or `dead_letters`.

use ingest::payload::MessagingEvent;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::helpers::{TestApp, message_received, spawn_app};

const MESSAGES: &str = "/api/webhooks/unipile/messages";

/// Strings with what strangers type and broken clients send: any character, U+0000,
/// other control characters, replacement characters.
fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<char>().prop_map(String::from),
            1 => Just("\0".to_owned()),
            1 => (0u8..0x20).prop_map(|b| char::from(b).to_string()),
            1 => "[a-z]{1,8}",
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec((hostile_string(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Fragments that only exist as JSON text (a `Value` cannot hold them).
fn raw_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u32..2000).prop_map(|e| format!("1e{}", 300 + e)),
        Just("-9e999".to_owned()),
        "[0-9]{30,400}",
        prop::collection::vec(0xD800u16..0xE000, 1..4).prop_map(|units| format!(
            "\"{}\"",
            units.iter().map(|u| format!("\\u{u:04x}")).collect::<String>()
        )),
        (1usize..200).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
    ]
}

const FIELDS: [&str; 10] = [
    "message",
    "message_id",
    "chat_id",
    "account_id",
    "timestamp",
    "sender",
    "attachments",
    "is_sender",
    "event",
    "provider_specifics",
];

/// One delivery's bytes.
fn delivery() -> impl Strategy<Value = Vec<u8>> {
    let base = || message_received("acc_prop", "chat_prop", false);
    prop_oneof![
        // A real delivery with some fields set to anything.
        prop::collection::vec((prop::sample::select(FIELDS.as_slice()), any_json()), 1..4).prop_map(
            move |fields| {
                let mut body = base();
                for (field, value) in fields {
                    body[field] = value;
                }
                body.to_string().into_bytes()
            }
        ),
        // A real delivery with a field holding JSON text no `Value` can.
        (prop::sample::select(FIELDS.as_slice()), raw_fragment()).prop_map(move |(field, fragment)| {
            let mut body = base();
            body[field] = json!("@@FRAGMENT@@");
            body.to_string().replacen("\"@@FRAGMENT@@\"", &fragment, 1).into_bytes()
        }),
        // Stray bytes (invalid UTF-8 included) inside the text.
        prop::collection::vec(any::<u8>(), 0..32).prop_map(move |bytes| {
            let mut body = base();
            body["message"] = json!("@@BYTES@@");
            let text = body.to_string();
            let (before, after) = text.split_once("@@BYTES@@").unwrap();
            let clean = bytes.into_iter().filter(|b| *b != b'"' && *b != b'\\');
            before.bytes().chain(clean).chain(after.bytes()).collect()
        }),
        // Any JSON at all, and bytes that are not JSON.
        any_json().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// Posts one delivery and checks the property for it.
async fn check(app: &TestApp, body: Vec<u8>) -> Result<(), TestCaseError> {
    let response = app.post_raw(MESSAGES, "application/json", body.clone()).await;
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    prop_assert!(status == 200 || (400..500).contains(&status), "answered {status} {answer}");
    if status != 200 {
        return Ok(());
    }
    match answer["status"].as_str() {
        Some("dead_lettered") => {
            let kept: i64 = sqlx::query_scalar("select count(*) from dead_letters where body = $1")
                .bind(&body)
                .fetch_one(&app.db)
                .await
                .unwrap();
            prop_assert!(kept >= 1, "dead-lettered but not in dead_letters");
        }
        Some("accepted" | "duplicate") => {
            let (value, _) = ingest::sanitize::parse(&body).expect("a stored body parses");
            let event = MessagingEvent::deserialize(&value).expect("a stored body is an event");
            let kept: i64 = sqlx::query_scalar("select count(*) from messages where id = $1")
                .bind(&event.message_id)
                .fetch_one(&app.db)
                .await
                .unwrap();
            prop_assert!(kept == 1, "{:?} answered {answer} but not in messages", event.message_id);
        }
        Some("ignored") => {}
        other => prop_assert!(false, "unexpected answer {other:?}"),
    }
    Ok(())
}

#[test]
fn any_delivery_is_answered_200_or_4xx_and_every_200_is_kept() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = runtime.block_on(spawn_app());
    let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
    let result = runner.run(&delivery(), |body| runtime.block_on(check(&app, body)));
    runtime.block_on(async move { drop(app) });
    if let Err(e) = result {
        panic!("{e}");
    }
}
