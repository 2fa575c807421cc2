//! What one token may cost everyone else: its REST calls are rate-limited per `sub`,
//! and the REST API has its own database pool, so webhooks never wait behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Options, TestApp, message_received, spawn_app_with};

fn token(app: &TestApp, sub: &str) -> String {
    app.jwt.issue(sub, vec!["*".to_owned()], Duration::from_secs(600))
}

async fn get_chats(app: &TestApp, token: &str) -> reqwest::Response {
    app.client.get(app.url("/api/chats")).bearer_auth(token).send().await.expect("ingest answers")
}

#[tokio::test]
async fn a_token_over_its_rate_is_told_when_to_retry_and_other_tokens_are_untouched() {
    let app = spawn_app_with(Options {
        extra_args: vec!["--rest-requests-per-sec-per-sub=5".to_owned()],
        ..Options::default()
    })
    .await;
    let (ana, bob) = (token(&app, "ana"), token(&app, "bob"));
    for _ in 0..5 {
        assert_eq!(get_chats(&app, &ana).await.status(), StatusCode::OK);
    }
    let refused = get_chats(&app, &ana).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    assert_eq!(get_chats(&app, &bob).await.status(), StatusCode::OK, "bob has his own allowance");
    // A second later ana may call again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_chats(&app, &ana).await.status(), StatusCode::OK);

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"rest_refused_total{reason="rate_limited"} 1"#), "{metrics}");
}

/// Sends `count` webhooks at `per_second`, each on its own task; returns every
/// answer's status and time.
async fn webhooks_at(app: &Arc<TestApp>, count: usize, per_second: u64) -> Vec<(u16, Duration)> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    let mut sends = Vec::with_capacity(count);
    for i in 0..count {
        tick.tick().await;
        let app = app.clone();
        sends.push(tokio::spawn(async move {
            let body = message_received(&format!("acc_{}", i % 10), &format!("chat_{}", i % 50), false);
            let started = Instant::now();
            let (status, _) = app.post_message(&body).await;
            (status, started.elapsed())
        }));
    }
    let mut answers = Vec::with_capacity(count);
    for send in sends {
        answers.push(send.await.unwrap());
    }
    answers
}

fn p99(answers: &[(u16, Duration)]) -> Duration {
    let mut times: Vec<Duration> = answers.iter().map(|(_, t)| *t).collect();
    times.sort();
    times[times.len() * 99 / 100]
}

/// Low enough that the flood is refused even when the machine is busy and a debug
/// build answers slowly.
const RATE: u64 = 10;

#[tokio::test]
async fn one_token_flooding_rest_costs_the_webhooks_nothing() {
    let app = Arc::new(
        spawn_app_with(Options {
            extra_args: vec![format!("--rest-requests-per-sec-per-sub={RATE}")],
            ..Options::default()
        })
        .await,
    );
    let quiet = webhooks_at(&app, 1000, 500).await;

    // One token, as fast as it can on 8 connections, for as long as the webhooks run.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flooder = token(&app, "flooder");
    let mut floods = Vec::new();
    for _ in 0..8 {
        let (app, stop, ok, limited, flooder) =
            (app.clone(), stop.clone(), ok.clone(), limited.clone(), flooder.clone());
        floods.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match get_chats(&app, &flooder).await.status() {
                    StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    StatusCode::TOO_MANY_REQUESTS => limited.fetch_add(1, Ordering::Relaxed),
                    other => panic!("the flooder got {other}"),
                };
            }
        }));
    }
    let started = Instant::now();
    let flooded = webhooks_at(&app, 1000, 500).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for flood in floods {
        flood.await.unwrap();
    }

    for (status, _) in quiet.iter().chain(&flooded) {
        assert_eq!(*status, 200, "every webhook is accepted");
    }
    let (ok, limited) = (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    // RATE a second plus the first burst of as many.
    let allowed = RATE * took.as_secs_f64().ceil() as u64 + RATE;
    assert!(ok <= allowed, "{ok} calls served in {took:?}, at most {allowed} allowed");
    assert!(limited > ok, "the flood was mostly refused: {ok} served, {limited} refused");
    let (quiet, flooded) = (p99(&quiet), p99(&flooded));
    println!(
        "webhook ack p99: quiet {quiet:?}, during the flood {flooded:?}; flood: {ok} served, {limited} refused"
    );
    assert!(
        flooded <= quiet * 2 + Duration::from_millis(10),
        "webhook ack p99 went from {quiet:?} to {flooded:?} during the flood"
    );
}

#[tokio::test]
async fn a_client_request_id_is_echoed_only_when_short_and_plain() {
    let app = spawn_app_with(Options::default()).await;
    let id_of = |sent: String| {
        let request = app.client.get(app.url("/healthz")).header("x-request-id", sent);
        async move {
            let response = request.send().await.unwrap();
            response.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(id_of("req-42.a:b_c".to_owned()).await, "req-42.a:b_c");
    for unfit in ["x".repeat(65), "a b".to_owned(), "<script>".to_owned(), "x".repeat(10_000)] {
        let answered = id_of(unfit.clone()).await;
        assert_ne!(answered, unfit);
        assert!(uuid::Uuid::parse_str(&answered).is_ok(), "a fresh UUID instead: {answered}");
    }
}
