//! Typing and viewing between agents across replicas: what each agent's client sees,
//! who sees nothing, how fast, and what happens when a replica dies or a client floods.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// What the issue asks of presence between two replicas on one machine.
const WITHIN: Duration = Duration::from_millis(100);

fn agent(sub: &str, name: &str, accounts: &[&str]) -> String {
    keys().issue_named(
        sub,
        Some(name),
        accounts.iter().map(|a| a.to_string()).collect(),
        Duration::from_secs(600),
    )
}

fn viewing(chat: &str) -> Value {
    json!({"type": "viewing", "account_id": "acc_a", "chat_id": chat})
}

fn typing(chat: &str) -> Value {
    json!({"type": "typing", "account_id": "acc_a", "chat_id": chat})
}

/// The next frame matching `want` within `within`, skipping others; `None` if none came.
async fn frame_where(
    client: &mut WsClient,
    within: Duration,
    want: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.frame_within(left).await? {
            Frame::Json(value) if want(&value) => return Some(value),
            Frame::Json(_) => continue,
            other => panic!("connection ended while waiting: {other:?}"),
        }
    }
}

fn is(kind: &'static str, sub: &'static str, chat: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == kind && v["sub"] == sub && v["chat_id"] == chat
}

fn viewing_is(sub: &'static str, chat: &'static str, open: bool) -> impl Fn(&Value) -> bool {
    move |v| {
        v["type"] == "presence:viewing" && v["sub"] == sub && v["chat_id"] == chat && v["viewing"] == open
    }
}

/// Sends `frame` and returns what `to` saw matching `want`, with the time it took.
async fn sent_and_seen(
    from: &mut WsClient,
    frame: Value,
    to: &mut WsClient,
    want: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let started = Instant::now();
    from.send_json(frame.clone()).await;
    let seen = frame_where(to, WAIT, want).await.unwrap_or_else(|| panic!("nothing seen of {frame}"));
    (seen, started.elapsed())
}

/// Every frame before the pong that answers a ping: what the client was sent so far.
async fn until_pong(client: &mut WsClient) -> Vec<Value> {
    client.send_json(json!({"type": "ping"})).await;
    let mut seen = Vec::new();
    loop {
        let frame = client.json().await;
        if frame["type"] == "pong" {
            return seen;
        }
        seen.push(frame);
    }
}

fn presence_frames(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|f| f["type"].as_str().is_some_and(|t| t.starts_with("presence:"))).collect()
}

/// Waits until both replicas hear each other: `from`'s viewing of a warm-up chat
/// reaches `to`, then closes it again.
async fn warm_up(from: &mut WsClient, to: &mut WsClient, sub: &'static str) {
    from.send_json(viewing("warm-up")).await;
    frame_where(to, WAIT, viewing_is(sub, "warm-up", true)).await.expect("presence flows between replicas");
    from.send_json(json!({"type": "viewing", "chat_id": null})).await;
    frame_where(to, WAIT, viewing_is(sub, "warm-up", false)).await.expect("closing flows too");
}

#[tokio::test]
async fn two_agents_on_two_replicas_see_each_others_typing_and_viewing_within_100_ms() {
    let one = spawn_app().await;
    let two = one.replica(|_| {}).await;
    let (mut ana, _) = one.connect_hello(&agent("ana", "Ana", &["acc_a"]), None).await;
    let (mut ben, _) = two.connect_hello(&agent("ben", "Ben", &["acc_a", "acc_c"]), None).await;
    // Ana's second tab and a colleague on Ana's replica, who sees whatever Ana's
    // replica hands out.
    let (mut ana_tab, _) = two.connect_hello(&agent("ana", "Ana", &["acc_a"]), None).await;
    let (mut carl, _) = one.connect_hello(&agent("carl", "Carl", &["acc_a"]), None).await;
    warm_up(&mut ana, &mut ben, "ana").await;

    let (seen, took) = sent_and_seen(&mut ana, viewing("c1"), &mut ben, viewing_is("ana", "c1", true)).await;
    assert!(took < WITHIN, "Ben saw Ana open the chat after {took:?}");
    assert_eq!(
        seen,
        json!({"type": "presence:viewing", "account_id": "acc_a", "chat_id": "c1", "sub": "ana", "name": "Ana", "viewing": true}),
        "no seq, no id: presence is not an event"
    );
    let answer = frame_where(&mut ana, WAIT, |v| v["type"] == "presence:viewers").await.unwrap();
    assert_eq!(answer["viewers"], json!([]), "nobody else had c1 open: {answer}");

    let (seen, took) =
        sent_and_seen(&mut ben, typing("c1"), &mut ana, is("presence:typing", "ben", "c1")).await;
    assert!(took < WITHIN, "Ana saw Ben typing after {took:?}");
    assert_eq!(seen["name"], "Ben");
    assert_eq!(seen["expires_in_ms"], 5000);
    assert!(seen.get("seq").is_none());

    let (_, took) = sent_and_seen(&mut ben, viewing("c1"), &mut ana, viewing_is("ben", "c1", true)).await;
    assert!(took < WITHIN, "Ana saw Ben open the chat after {took:?}");
    let answer = frame_where(&mut ben, WAIT, |v| v["type"] == "presence:viewers").await.unwrap();
    assert_eq!(answer["viewers"], json!([{"sub": "ana", "name": "Ana"}]), "{answer}");

    let (_, took) = sent_and_seen(&mut ana, typing("c1"), &mut ben, is("presence:typing", "ana", "c1")).await;
    assert!(took < WITHIN, "Ben saw Ana typing after {took:?}");

    // Carl has seen all of it, so Ana's replica handed it out: Ana got none of her own,
    // nor did her other tab.
    frame_where(&mut carl, WAIT, is("presence:typing", "ana", "c1")).await.expect("Carl sees Ana typing");
    let own = |frames: Vec<Value>| {
        presence_frames(&frames).into_iter().filter(|f| f["sub"] == "ana").cloned().collect::<Vec<_>>()
    };
    assert_eq!(own(until_pong(&mut ana).await), Vec::<Value>::new(), "Ana never receives her own");
    assert_eq!(own(until_pong(&mut ana_tab).await), Vec::<Value>::new(), "nor does her other tab");
}

#[tokio::test]
async fn a_client_of_another_account_sees_nothing_and_cannot_announce_into_it() {
    let one = spawn_app().await;
    let two = one.replica(|_| {}).await;
    let (mut ana, _) = one.connect_hello(&agent("ana", "Ana", &["acc_a"]), None).await;
    let (mut ben, _) = two.connect_hello(&agent("ben", "Ben", &["acc_a"]), None).await;
    let dora_token = agent("dora", "Dora", &["acc_b"]);
    let (mut dora, _) = two.connect_hello(&dora_token, None).await;
    warm_up(&mut ana, &mut ben, "ana").await;

    ana.send_json(viewing("c1")).await;
    ana.send_json(typing("c1")).await;
    frame_where(&mut ben, WAIT, is("presence:typing", "ana", "c1")).await.expect("Ben sees Ana");
    assert_eq!(presence_frames(&until_pong(&mut dora).await), Vec::<&Value>::new(), "Dora sees nothing");

    // Dora's token does not list acc_a: her frames for it are refused, and reach nobody.
    dora.send_json(viewing("c1")).await;
    let error = dora.json().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("not_allowed")),
        "{error}"
    );
    dora.send_json(typing("c1")).await;
    assert_eq!(dora.json().await["code"], "not_allowed");
    dora.send_json(json!({"type": "typing", "chat_id": "c1"})).await;
    assert_eq!(dora.json().await["code"], "invalid_message", "the account is required");
    ben.send_json(typing("c1")).await;
    frame_where(&mut ana, WAIT, is("presence:typing", "ben", "c1")).await.expect("Ana sees Ben");
    let seen = until_pong(&mut ana).await;
    assert!(presence_frames(&seen).iter().all(|f| f["sub"] != "dora"), "{seen:?}");

    // The same over REST, on either replica.
    let http = reqwest::Client::new();
    let get = |app: &TestApp, token: Option<&str>, query: &str| {
        let mut request = http.get(app.url(&format!("/api/chats/c1/presence{query}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let ben_token = agent("ben", "Ben", &["acc_a"]);
    let listed: Value = get(&two, Some(&ben_token), "?account_id=acc_a").await.unwrap().json().await.unwrap();
    assert_eq!(
        listed,
        json!({"type": "presence:viewers", "account_id": "acc_a", "chat_id": "c1", "viewers": [{"sub": "ana", "name": "Ana"}]})
    );
    assert_eq!(get(&two, Some(&dora_token), "?account_id=acc_a").await.unwrap().status(), 404);
    assert_eq!(get(&one, None, "?account_id=acc_a").await.unwrap().status(), 401);
    assert_eq!(get(&one, Some(&ben_token), "").await.unwrap().status(), 400);
}

#[tokio::test]
async fn closing_the_chat_another_chat_or_the_socket_clears_viewing_at_once() {
    // Expiry far beyond the test's patience: only the explicit clearing can pass.
    let one = spawn_app_with(|c| c.presence.presence_expiry_ms = 120_000).await;
    let two = one.replica(|c| c.presence.presence_expiry_ms = 120_000).await;
    let (mut ana, _) = one.connect_hello(&agent("ana", "Ana", &["acc_a"]), None).await;
    let (mut ben, _) = two.connect_hello(&agent("ben", "Ben", &["acc_a"]), None).await;
    warm_up(&mut ana, &mut ben, "ana").await;

    sent_and_seen(&mut ana, viewing("c1"), &mut ben, viewing_is("ana", "c1", true)).await;
    sent_and_seen(&mut ana, viewing("c2"), &mut ben, viewing_is("ana", "c1", false)).await;
    frame_where(&mut ben, WAIT, viewing_is("ana", "c2", true)).await.expect("another viewing opens c2");
    let closed = json!({"type": "viewing", "chat_id": null});
    sent_and_seen(&mut ana, closed, &mut ben, viewing_is("ana", "c2", false)).await;
    sent_and_seen(&mut ana, viewing("c3"), &mut ben, viewing_is("ana", "c3", true)).await;
    drop(ana);
    frame_where(&mut ben, WAIT, viewing_is("ana", "c3", false))
        .await
        .expect("a closed socket leaves at once");
}

#[tokio::test]
async fn killing_a_replica_clears_its_clients_viewing_within_the_expiry_bound() {
    const HEARTBEAT_MS: u64 = 200;
    const EXPIRY_MS: u64 = 1000;
    let one = spawn_app_with(|c| {
        c.presence.presence_heartbeat_ms = HEARTBEAT_MS;
        c.presence.presence_expiry_ms = EXPIRY_MS;
    })
    .await;
    let events = &one.events;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut doomed = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--jwt-secret={SECRET}"))
        .arg(format!("--nats-url={}", nats_url()))
        .arg(format!("--stream-name={}", events.stream_name))
        .arg(format!("--subject-prefix={}", events.subjects.prefix()))
        .arg(format!("--presence-prefix={}", events.presence_subjects().prefix()))
        .arg(format!("--presence-heartbeat-ms={HEARTBEAT_MS}"))
        .arg(format!("--presence-expiry-ms={EXPIRY_MS}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("fanout runs");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    wait_until("the second replica to be ready", || async {
        reqwest::get(&readyz).await.is_ok_and(|response| response.status() == 200)
    })
    .await;
    let url = format!("ws://127.0.0.1:{port}/ws/messages?token={}", agent("ana", "Ana", &["acc_a"]));
    let mut ana = try_connect_request(url.as_str()).await.expect("upgrade accepted");
    ana.hello().await;
    let (mut ben, _) = one.connect_hello(&agent("ben", "Ben", &["acc_a"]), None).await;
    warm_up(&mut ana, &mut ben, "ana").await;
    sent_and_seen(&mut ana, viewing("c1"), &mut ben, viewing_is("ana", "c1", true)).await;

    // Alive, Ana stays, well past the expiry: her replica re-announces her.
    let left_early =
        frame_where(&mut ben, Duration::from_millis(3 * EXPIRY_MS), viewing_is("ana", "c1", false)).await;
    assert_eq!(left_early, None, "a live replica's viewer never expires");

    doomed.kill().await.expect("kill -9 the replica");
    let killed = Instant::now();
    frame_where(&mut ben, WAIT, viewing_is("ana", "c1", false)).await.expect("Ana's viewing is cleared");
    let took = killed.elapsed();
    // The bound: the expiry plus one sweep (a tenth of it); 100 ms more for scheduling.
    let bound = Duration::from_millis(EXPIRY_MS + EXPIRY_MS / 10 + 100);
    assert!(took <= bound, "cleared {took:?} after the kill; the bound is {bound:?}");
    let ben_token = agent("ben", "Ben", &["acc_a"]);
    let listed: Value = reqwest::Client::new()
        .get(one.url("/api/chats/c1/presence?account_id=acc_a"))
        .bearer_auth(ben_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["viewers"], json!([]), "{listed}");
}

#[tokio::test]
async fn a_client_sending_a_thousand_typing_frames_a_second_is_limited_and_others_are_not_held_up() {
    let one = spawn_app().await;
    let two = one.replica(|_| {}).await;
    let (mut flood, _) = one.connect_hello(&agent("flood", "Flood", &["acc_a"]), None).await;
    let (mut ben, _) = two.connect_hello(&agent("ben", "Ben", &["acc_a"]), None).await;
    let (mut carl, _) = one.connect_hello(&agent("carl", "Carl", &["acc_a"]), None).await;
    warm_up(&mut carl, &mut ben, "carl").await;

    let flooding = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..1000u32 {
            flood.send_json(typing("c")).await;
            tokio::time::sleep_until((started + Duration::from_millis(u64::from(i))).into()).await;
        }
        flood
    });
    // Meanwhile: events on the stream and another agent's typing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seqs = one.events.publish_many(20, |i| json!({"i": i})).await;
    let started = Instant::now();
    carl.send_json(typing("c")).await;
    let (mut got, mut flood_typing, mut carl_took) = (Vec::new(), 0u32, None);
    while got.len() < seqs.len() || carl_took.is_none() {
        let frame = ben.json().await;
        match frame["type"].as_str() {
            Some("message:new") => got.push(frame["seq"].as_u64().unwrap()),
            Some("presence:typing") if frame["sub"] == "flood" => flood_typing += 1,
            Some("presence:typing") if frame["sub"] == "carl" => carl_took = Some(started.elapsed()),
            _ => {}
        }
    }
    let carl_took = carl_took.unwrap();
    assert!(carl_took < WITHIN, "Carl's typing reached Ben after {carl_took:?} during the flood");
    let mut flood = flooding.await.unwrap();
    assert_eq!(got, seqs, "every event, in order");
    for frame in until_pong(&mut ben).await {
        flood_typing += u32::from(frame["type"] == "presence:typing" && frame["sub"] == "flood");
    }
    assert!((1..=2).contains(&flood_typing), "Ben saw the flooder typing {flood_typing} times");

    // The flooder was told, once a second at most, and is still connected.
    let told = until_pong(&mut flood).await;
    let limited = told.iter().filter(|f| f["code"] == "rate_limited").count();
    assert!((1..=3).contains(&limited), "{limited} rate_limited frames: {told:?}");
    let dropped = one.counter("fanout_presence_frames_total{outcome=\"rate_limited\"}").await;
    assert!(dropped >= 900, "{dropped} frames dropped of 1000");
}

#[tokio::test]
async fn a_replica_started_later_lists_the_current_viewers_without_waiting_for_a_heartbeat() {
    // Heartbeats far beyond the test's patience: only the start-up sync can tell it.
    let one = spawn_app_with(|c| c.presence.presence_heartbeat_ms = 60_000).await;
    let (mut ana, _) = one.connect_hello(&agent("ana", "Ana", &["acc_a"]), None).await;
    let (mut carl, _) = one.connect_hello(&agent("carl", "Carl", &["acc_a"]), None).await;
    sent_and_seen(&mut ana, viewing("c1"), &mut carl, viewing_is("ana", "c1", true)).await;

    let later = one.replica(|c| c.presence.presence_heartbeat_ms = 60_000).await;
    let ben_token = agent("ben", "Ben", &["acc_a"]);
    let listed = || async {
        let response = reqwest::Client::new()
            .get(later.url("/api/chats/c1/presence?account_id=acc_a"))
            .bearer_auth(&ben_token)
            .send()
            .await
            .unwrap();
        response.json::<Value>().await.unwrap()["viewers"].clone()
    };
    wait_until("the new replica to list Ana", || async {
        listed().await == json!([{"sub": "ana", "name": "Ana"}])
    })
    .await;
}
