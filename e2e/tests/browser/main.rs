//! The live inbox page in headless Chromium against real ingest and fanout.
//!
//! Needs PostgreSQL and NATS (like every integration test here) and Chromium with
//! chromedriver (`apt-get install -y chromium chromium-driver`); without them the test
//! fails and says what is missing. Screenshots land in `target/e2e/`. The `tail` module
//! checks `fanout tail` against the same in-process relay.

mod compose_up;
mod harness;
mod media;
mod presence;
mod replies;
mod tail;

use std::time::Duration;

use harness::{Browser, Relay};

const WAIT: Duration = Duration::from_secs(20);

fn chat_selector(chat: &str) -> String {
    format!("document.querySelector('#chats li[data-chat-id=\"{chat}\"]')")
}

fn badge(chat: &str) -> String {
    format!("{}?.querySelector('.badge')?.textContent", chat_selector(chat))
}

fn messages_show(text: &str) -> String {
    format!("document.getElementById('messages').innerText.includes({text:?})")
}

/// Stops fanout and waits until the page has noticed its socket is gone.
async fn stop_fanout_under(relay: &mut Relay, browser: &Browser) {
    relay.stop_fanout().await;
    let reconnecting = "document.getElementById('status').dataset.state === 'reconnecting'";
    browser.wait_until("the page notices and reconnects", reconnecting, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_page_shows_messages_live_and_resumes_after_losing_its_socket() {
    let mut relay = Relay::start().await;
    let (account, chat_a, chat_b) = ("accE2e", "chatA", "chatB");
    relay.post_message(account, chat_a, "Hi, are we still on for Thursday?").await;
    relay.post_message(account, chat_b, "Sharing the deck here").await;

    let browser = Browser::start().await;
    let page =
        format!("{}/?api={}&token={}&chat={chat_a}", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");

    // History through the REST API, the list with unread badges, the socket open.
    browser
        .wait_until("the socket is open", "document.getElementById('status').dataset.state === 'open'", WAIT)
        .await;
    browser
        .wait_until("chat A's history shows", &messages_show("Hi, are we still on for Thursday?"), WAIT)
        .await;
    browser.wait_until("chat A has one unread", &format!("{} === '1'", badge(chat_a)), WAIT).await;
    browser.wait_until("chat B is listed", &format!("{} === '1'", badge(chat_b)), WAIT).await;

    // A webhook arrives: the open chat appends it and its badge counts it.
    relay.post_message(account, chat_a, "Running 5 minutes late").await;
    browser.wait_until("the new message appears live", &messages_show("Running 5 minutes late"), WAIT).await;
    browser.wait_until("chat A's badge goes to 2", &format!("{} === '2'", badge(chat_a)), WAIT).await;
    // The most recently active chat is listed first.
    browser
        .wait_until(
            "chat A moves to the top",
            &format!("document.querySelector('#chats li')?.dataset.chatId === '{chat_a}'"),
            WAIT,
        )
        .await;
    relay.post_message(account, chat_b, "Any news?").await;
    browser.wait_until("chat B's badge goes to 2", &format!("{} === '2'", badge(chat_b)), WAIT).await;
    browser
        .wait_until(
            "chat B moves to the top",
            &format!("document.querySelector('#chats li')?.dataset.chatId === '{chat_b}'"),
            WAIT,
        )
        .await;
    assert!(
        !browser.eval(&messages_show("Any news?")).await.as_bool().unwrap_or(true),
        "chat B's message must not show in chat A"
    );
    browser.screenshot("live").await;

    // The socket dies (fanout restarts); a message arrives meanwhile; the page resumes
    // with `since` and shows it without reloading.
    stop_fanout_under(&mut relay, &browser).await;
    relay.post_message(account, chat_a, "Sent while you were away").await;
    relay.restart_fanout().await;
    browser.wait_until("the page is live again", "document.body.dataset.hellos === '2'", WAIT).await;
    browser.wait_until("the resume was gap-free", "document.body.dataset.recovered === 'true'", WAIT).await;
    browser.wait_until("the missed message shows", &messages_show("Sent while you were away"), WAIT).await;
    browser.wait_until("chat A's badge counts it", &format!("{} === '3'", badge(chat_a)), WAIT).await;
    let shown = browser
        .eval("[...document.querySelectorAll('#messages .msg')].map(m => m.dataset.messageId).length")
        .await;
    assert_eq!(shown, 3, "every message of chat A shows exactly once");

    // Mark as read: the badge goes away (the REST call, then chat:read).
    browser.client.execute("document.getElementById('read').click(); return null;", vec![]).await.unwrap();
    browser.wait_until("chat A's badge clears", &format!("{} === '0'", badge(chat_a)), WAIT).await;
    browser.screenshot("resumed").await;

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_the_replica_will_not_replay_reloads_the_page_by_rest_and_loses_nothing() {
    let mut relay = Relay::start().await;
    let (account, chat) = ("accE2e", "chatA");
    relay.post_message(account, chat, "Before the outage").await;
    let browser = Browser::start().await;
    let page =
        format!("{}/?api={}&token={}&chat={chat}", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser.wait_until("the page is live", "document.body.dataset.hellos === '1'", WAIT).await;
    browser.wait_until("the history shows", &messages_show("Before the outage"), WAIT).await;

    // While the page has no socket, more happens than the new replica will replay: it
    // keeps no window and reaches back one stream sequence at most.
    stop_fanout_under(&mut relay, &browser).await;
    let missed = ["Missed one", "Missed two", "Missed three"];
    for text in missed {
        relay.post_message(account, chat, text).await;
    }
    relay.restart_fanout_with(&["--replay-window=0", "--max-resume-gap=1"]).await;
    browser.wait_until("the page is live again", "document.body.dataset.hellos === '2'", WAIT).await;
    browser
        .wait_until("told the history is not replayed", "document.body.dataset.recovered === 'false'", WAIT)
        .await;
    // `reload`: the page fetches the chat list and the open chat again by REST.
    for text in missed {
        browser.wait_until(&format!("{text:?} shows after the reload"), &messages_show(text), WAIT).await;
    }
    browser.wait_until("the badge counts all four", &format!("{} === '4'", badge(chat)), WAIT).await;
    relay.post_message(account, chat, "Live again").await;
    browser.wait_until("live events follow the reload", &messages_show("Live again"), WAIT).await;
    let shown = browser
        .eval("[...document.querySelectorAll('#messages .msg')].map(m => m.dataset.messageId).length")
        .await;
    assert_eq!(shown, 5, "every message shows exactly once");
    browser.screenshot("reloaded").await;

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_hands_an_event_the_stream_holds_twice_to_handlers_once() {
    let relay = Relay::start().await;
    let browser = Browser::start().await;
    // Any page of fanout's origin will do: the test imports client.js itself.
    browser.client.goto(&format!("{}/client.js", relay.fanout_url())).await.expect("client.js loads");
    let ws_url = format!("{}/ws/messages", relay.fanout_url().replacen("http", "ws", 1));
    browser
        .client
        .execute_async(
            "const [url, token, done] = arguments;
             import('/client.js').then(({ RelayClient }) => {
               window.seen = [];
               window.relay = new RelayClient({ url, token });
               window.relay.on('event', (e) => window.seen.push({ id: e.id, seq: e.seq }));
               window.relay.on('hello', () => { window.opened = true; });
               window.relay.connect();
               done(null);
             });",
            vec![ws_url.into(), relay.token().into()],
        )
        .await
        .expect("client.js imports and connects");
    browser.wait_until("the client is connected", "window.opened === true", WAIT).await;

    relay.post_message("accDup", "chatDup", "First").await;
    browser.wait_until("the first event arrives", "window.seen.length === 1", WAIT).await;
    relay.republish_last_event().await;
    relay.post_message("accDup", "chatDup", "Second").await;
    browser.wait_until("the second event arrives", "window.seen.length >= 2", WAIT).await;
    // The copy came between them: had it been handed over, it would be second.
    let seen = browser.eval("window.seen").await;
    let seen = seen.as_array().expect("a list");
    assert_eq!(seen.len(), 2, "the copy is dropped: {seen:?}");
    assert_ne!(seen[0]["id"], seen[1]["id"], "{seen:?}");
    assert_eq!(
        browser.eval("window.relay.lastSeq").await.as_u64(),
        seen[1]["seq"].as_u64(),
        "the copy's seq is covered too, so a resume does not ask for it"
    );
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs[1], seqs[0] + 2, "the copy sits between them in the stream: {seqs:?}");

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_older_messages_and_more_chats_past_the_first_hundred() {
    let relay = Relay::start().await;
    let account = "accPages";
    for i in 0..101 {
        relay.post_message(account, "chatLong", &format!("Long {i:03}")).await;
    }
    // 100 chats with newer activity push chatLong onto the list's second page.
    for i in 0..100 {
        relay.post_message(account, &format!("chat{i:03}"), "Hello").await;
    }

    let browser = Browser::start().await;
    let page =
        format!("{}/?api={}&token={}&chat=chatLong", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    let shown_messages = "document.querySelectorAll('#messages .msg').length";
    let listed_chats = "document.querySelectorAll('#chats li[data-chat-id]').length";

    browser.wait_until("the newest 100 messages show", &format!("{shown_messages} === 100"), WAIT).await;
    assert!(browser.eval(&messages_show("Long 100")).await.as_bool().unwrap());
    assert!(!browser.eval(&messages_show("Long 000")).await.as_bool().unwrap());
    browser.client.execute("document.getElementById('older').click(); return null;", vec![]).await.unwrap();
    browser.wait_until("the oldest message shows", &messages_show("Long 000"), WAIT).await;
    browser.wait_until("all 101 messages show", &format!("{shown_messages} === 101"), WAIT).await;
    assert!(
        browser.eval("document.getElementById('older') === null").await.as_bool().unwrap(),
        "nothing older is left to load"
    );

    browser.wait_until("the newest 100 chats are listed", &format!("{listed_chats} === 100"), WAIT).await;
    assert!(browser.eval(&format!("{} === null", chat_selector("chatLong"))).await.as_bool().unwrap());
    browser
        .client
        .execute("document.getElementById('more-chats').click(); return null;", vec![])
        .await
        .unwrap();
    browser
        .wait_until("the oldest chat is listed", &format!("{} !== null", chat_selector("chatLong")), WAIT)
        .await;
    browser.wait_until("all 101 chats are listed", &format!("{listed_chats} === 101"), WAIT).await;
    assert!(
        browser.eval("document.getElementById('more-chats') === null").await.as_bool().unwrap(),
        "no more chats to load"
    );
    browser.screenshot("pages").await;

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_link_sends_no_request_and_no_token_to_another_origin() {
    let relay = Relay::start().await;
    relay.post_message("accLink", "chatLink", "Only for the right eyes").await;
    // The attacker's host: a listener that counts every connection made to it.
    let evil = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    evil.set_nonblocking(true).unwrap();
    let evil_url = format!("http://127.0.0.1:{}", evil.local_addr().unwrap().port());

    let browser = Browser::start().await;
    let page = format!("{}/?api={evil_url}&ws={}&token={}", relay.fanout_url(), evil_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser
        .wait_until(
            "the socket opens on the page's own origin",
            "document.getElementById('status').dataset.state === 'open'",
            WAIT,
        )
        .await;
    // Typing the attacker's origin into the API field is refused too.
    browser.eval(&format!("(document.getElementById('api').value = {evil_url:?}, document.getElementById('save').click(), 1)")).await;
    let refused = "document.getElementById('status').textContent.includes('not allowed')";
    browser.wait_until("the page refuses the typed origin", refused, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut connections = 0;
    while evil.accept().is_ok() {
        connections += 1;
    }
    assert_eq!(connections, 0, "the page connected to the link's origin");
    let stored = browser.eval("localStorage.getItem('relay.api') ?? ''").await;
    assert!(
        !stored.as_str().unwrap_or_default().contains(&evil_url),
        "the link's origin was stored: {stored}"
    );

    // The operator's own listed origin (ingest's, in this harness) still works.
    let page =
        format!("{}/?api={}&token={}&chat=chatLink", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser
        .wait_until("history through the listed API", &messages_show("Only for the right eyes"), WAIT)
        .await;

    browser.close().await;
    relay.shutdown().await;
}

/// A hung replica (`docker pause`): its kernel still takes the TCP connection, nothing
/// answers the upgrade, and nginx cannot tell. client.js gives an upgrade 2 s
/// (`openTimeoutMs`) and tries again, which a round-robin gateway hands to the next
/// replica: here the next try goes to a live fanout, as the gateway would send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_js_gives_up_an_upgrade_nobody_answers_after_two_seconds_and_tries_again() {
    let relay = Relay::start().await;
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // listens, never accepts
    let hung_url = format!("ws://127.0.0.1:{}/ws/messages", hung.local_addr().unwrap().port());
    let live_url = format!("{}/ws/messages", relay.fanout_url().replacen("http", "ws", 1));
    let browser = Browser::start().await;
    browser.client.goto(&format!("{}/client.js", relay.fanout_url())).await.expect("client.js loads");
    browser
        .client
        .execute_async(
            "const [hung, live, token, done] = arguments;
             import('/client.js').then(({ RelayClient }) => {
               window.log = [];
               const started = performance.now();
               window.relay = new RelayClient({ url: hung, token });
               window.relay.on('error', (e) => {
                 window.log.push({ what: e.code, at: performance.now() - started });
                 window.relay.options.url = live; // the gateway's next replica
               });
               window.relay.on('hello', () => window.log.push({ what: 'hello', at: performance.now() - started }));
               window.relay.connect();
               done(null);
             });",
            vec![hung_url.into(), live_url.into(), relay.token().into()],
        )
        .await
        .expect("client.js imports and connects");
    browser
        .wait_until(
            "the client is live on the other replica",
            "window.log.some((e) => e.what === 'hello')",
            WAIT,
        )
        .await;
    let log = browser.eval("window.log").await;
    let log = log.as_array().unwrap();
    assert_eq!(log[0]["what"], "open_timeout", "{log:?}");
    let gave_up = log[0]["at"].as_f64().unwrap();
    assert!((1900.0..3000.0).contains(&gave_up), "gave up the hung upgrade after {gave_up} ms");
    let live = log.iter().find(|e| e["what"] == "hello").unwrap()["at"].as_f64().unwrap();
    assert!(live < 4000.0, "live on another replica {live} ms after connect()");
    drop(hung);
    browser.close().await;
    relay.shutdown().await;
}
