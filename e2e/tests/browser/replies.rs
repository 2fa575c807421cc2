//! Replying from the inbox page through a fake Unipile (wiremock), in real Chromium: the
//! reply goes out once, its echo adds no bubble, a second tab sees it live, a failed send
//! shows a retry button; and the page says what is wrong when the API fails.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::json;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::harness::{Browser, Relay};

const WAIT: Duration = Duration::from_secs(20);
const API_KEY: &str = "e2e-unipile-key-0123456789abcdef0123456";

/// Bubbles of the open chat whose text is `text`.
fn bubbles(text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#messages .msg')].filter(m => m.querySelector('.text')?.textContent === {text:?})"
    )
}

/// The texts Unipile received in sends to `chat`, in order.
async fn sends(unipile: &MockServer, chat: &str) -> Vec<String> {
    let wanted = format!("/api/v1/chats/{chat}/messages");
    unipile
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == wanted)
        .map(|r| {
            let body = String::from_utf8_lossy(&r.body).into_owned();
            let start =
                body.find("name=\"text\"\r\n\r\n").expect("a text field") + "name=\"text\"\r\n\r\n".len();
            let end = body[start..].find("\r\n--").expect("the field ends");
            body[start..start + end].to_owned()
        })
        .collect()
}

async fn type_reply(browser: &Browser, text: &str) {
    let field = browser.client.find(Locator::Id("reply-text")).await.expect("the reply box");
    field.send_keys(text).await.expect("typed");
    browser.client.find(Locator::Id("send")).await.expect("the send button").click().await.expect("clicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_typed_in_one_tab_is_sent_once_not_duplicated_by_its_echo_and_shown_live_in_another() {
    let unipile = MockServer::start().await;
    let (account, chat) = ("accReply", "chatReply");
    let send_path = format!("/api/v1/chats/{chat}/messages");
    // The first send of "Will fail once" gets a 500; every other send a 201.
    Mock::given(method("POST"))
        .and(path(send_path.clone()))
        .and(body_string_contains("Will fail once"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream exploded"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&unipile)
        .await;
    Mock::given(method("POST"))
        .and(path(send_path.clone()))
        .and(body_string_contains("Will fail once"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"object": "MessageSent", "message_id": "uniRetry"})),
        )
        .with_priority(2)
        .mount(&unipile)
        .await;
    Mock::given(method("POST"))
        .and(path(send_path))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"object": "MessageSent", "message_id": "uniReply1"}))
                .set_delay(Duration::from_millis(300)),
        )
        .with_priority(3)
        .mount(&unipile)
        .await;
    let relay = Relay::start_with(&[
        format!("--unipile-dsn={}", unipile.uri()),
        format!("--unipile-api-key={API_KEY}"),
    ])
    .await;
    relay.post_message(account, chat, "Can you confirm the time?").await;

    let browser = Browser::start().await;
    let page =
        format!("{}/?api={}&token={}&chat={chat}", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser.wait_until("tab 1 is live", "document.body.dataset.hellos === '1'", WAIT).await;
    browser
        .wait_until(
            "tab 1 shows the chat",
            &format!("{}.length === 1", bubbles("Can you confirm the time?")),
            WAIT,
        )
        .await;
    let first_tab = browser.client.window().await.unwrap();

    // Tab 2: the same inbox, the same chat (the token is in the profile's storage).
    let second_tab = browser.client.new_window(true).await.expect("a second tab").handle;
    browser.client.switch_to_window(second_tab.clone()).await.unwrap();
    let page = format!("{}/?api={}&chat={chat}", relay.fanout_url(), relay.ingest_url);
    browser.client.goto(&page).await.expect("the page loads in tab 2");
    browser.wait_until("tab 2 is live", "document.body.dataset.hellos === '1'", WAIT).await;
    browser
        .wait_until(
            "tab 2 shows the chat",
            &format!("{}.length === 1", bubbles("Can you confirm the time?")),
            WAIT,
        )
        .await;

    // Typed in tab 1: one bubble, pending then sent; Unipile got it once.
    browser.client.switch_to_window(first_tab.clone()).await.unwrap();
    let text = "Yes, 3 pm works";
    type_reply(&browser, text).await;
    browser
        .wait_until(
            "tab 1 shows the reply sent",
            &format!("{}.map(m => m.dataset.state).join() === 'sent'", bubbles(text)),
            WAIT,
        )
        .await;
    assert_eq!(sends(&unipile, chat).await, [text], "Unipile received the reply exactly once");
    assert_eq!(
        browser.eval(&format!("{}[0].dataset.messageId", bubbles(text))).await,
        "uniReply1",
        "the bubble took Unipile's id"
    );

    // Unipile's echo of it: no second message, no second bubble anywhere.
    assert_eq!(relay.post_messaging(account, chat, text, "uniReply1", true).await, "duplicate");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(browser.eval(&format!("{}.length", bubbles(text))).await, 1, "tab 1: one bubble");
    browser.client.switch_to_window(second_tab.clone()).await.unwrap();
    browser
        .wait_until(
            "tab 2 shows the reply live, sent",
            &format!("{}.map(m => m.dataset.state).join() === 'sent'", bubbles(text)),
            WAIT,
        )
        .await;
    assert_eq!(browser.eval(&format!("{}.length", bubbles(text))).await, 1, "tab 2: one bubble");
    browser.screenshot("reply-second-tab").await;

    // A send Unipile fails: the bubble says failed with a retry; the retry is sent anew.
    browser.client.switch_to_window(first_tab).await.unwrap();
    let failing = "Will fail once";
    type_reply(&browser, failing).await;
    browser
        .wait_until(
            "the failed reply shows",
            &format!("{}.some(m => m.dataset.state === 'failed')", bubbles(failing)),
            WAIT,
        )
        .await;
    browser
        .wait_until(
            "the page says why",
            "document.getElementById('reply-error').textContent.includes('502')",
            WAIT,
        )
        .await;
    browser.screenshot("reply-failed").await;
    browser
        .client
        .execute(
            &format!(
                "{}.find(m => m.dataset.state === 'failed').querySelector('.retry').click(); return null;",
                bubbles(failing)
            ),
            vec![],
        )
        .await
        .expect("retry clicked");
    browser
        .wait_until(
            "the retry is sent",
            &format!("{}.map(m => m.dataset.state).sort().join() === 'failed,sent'", bubbles(failing)),
            WAIT,
        )
        .await;
    assert_eq!(
        sends(&unipile, chat).await,
        [text, failing, failing],
        "the retry is one more send, nothing else"
    );
    browser.client.switch_to_window(second_tab).await.unwrap();
    browser
        .wait_until(
            "tab 2 sees the failed one and the retry",
            &format!("{}.map(m => m.dataset.state).sort().join() === 'failed,sent'", bubbles(failing)),
            WAIT,
        )
        .await;

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_why_when_the_api_refuses_the_token_or_cannot_be_reached() {
    let mut relay = Relay::start().await;
    relay.post_message("accErr", "chatErr", "Hidden behind a bad token").await;
    let browser = Browser::start().await;

    // A token signed with another secret: the API answers 401 and the page says so.
    let forged = shared::claims::JwtKeys::new(&secrecy::SecretString::from(
        "another-secret-0123456789abcdef0123456789",
    ))
    .issue("e2e", vec!["*".into()], Duration::from_secs(600));
    let page = format!("{}/?api={}&token={forged}", relay.fanout_url(), relay.ingest_url);
    browser.client.goto(&page).await.expect("the page loads");
    browser
        .wait_until(
            "the page names the 401",
            "document.getElementById('error').textContent.includes('401')",
            WAIT,
        )
        .await;
    assert!(
        browser
            .eval("document.getElementById('chats').innerText.includes('Could not load')")
            .await
            .as_bool()
            .unwrap()
    );
    browser.screenshot("error-401").await;

    // An allowed API origin where nothing listens: network (or CORS) failure, said so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    relay.stop_fanout().await;
    relay.restart_fanout_with(&[&format!("--page-api-origins={nowhere}")]).await;
    let page = format!("{}/?api={nowhere}&token={}", relay.fanout_url(), relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser
        .wait_until(
            "the page says the API cannot be reached",
            "document.getElementById('error').textContent.includes('Cannot reach the API')",
            WAIT,
        )
        .await;
    assert!(
        browser
            .eval("document.getElementById('error').textContent.includes('CORS')")
            .await
            .as_bool()
            .unwrap()
    );
    browser.screenshot("error-network").await;

    browser.close().await;
    relay.shutdown().await;
}
