//! Attachments and accounts on the inbox page, in real Chromium, with Unipile faked
//! (wiremock): an image shows inline and a file as a link, both through signed URLs;
//! a disconnected account gets a banner, live and on load, gone once it is back.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::harness::{Browser, Relay, messaging_body};

const WAIT: Duration = Duration::from_secs(20);
const API_KEY: &str = "e2e-unipile-key-0123456789abcdef0123456";

/// A 2×2 red PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00,
    0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd, 0xd4, 0x9a, 0x73, 0x00,
    0x00, 0x00, 0x10, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00, 0x44, 0x0c, 0x10,
    0x0a, 0x00, 0x1f, 0xee, 0x03, 0xfd, 0x8b, 0x5f, 0x14, 0xd4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_attachment_renders_inline_and_a_file_is_a_link() {
    let unipile = MockServer::start().await;
    let (account, chat, message) = ("accMedia", "chatMedia", "msgMedia1");
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/messages/{message}/attachments/attImg")))
        .and(header("x-api-key", API_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_raw(PNG.to_vec(), "image/png"))
        .mount(&unipile)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/messages/{message}/attachments/attPdf")))
        .respond_with(ResponseTemplate::new(200).set_body_raw(b"%PDF-1.4 deck".to_vec(), "application/pdf"))
        .mount(&unipile)
        .await;
    let relay = Relay::start_with(&[
        format!("--unipile-dsn={}", unipile.uri()),
        format!("--unipile-api-key={API_KEY}"),
    ])
    .await;
    let mut body = messaging_body(account, chat, "Here are the photo and the deck", message, false);
    body["attachments"] = json!([
        {"id": "attImg", "type": "img", "mimetype": "image/png", "file_name": "photo.png"},
        {"id": "attPdf", "type": "file", "mimetype": "application/pdf", "file_name": "deck.pdf"},
    ]);
    assert_eq!(relay.post_delivery("messages", &body).await, "accepted");

    let browser = Browser::start().await;
    let page =
        format!("{}/?api={}&token={}&chat={chat}", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    let image = "document.querySelector('#messages img.attachment.image[data-attachment-id=\"attImg\"]')";
    browser
        .wait_until(
            "the image is shown, decoded",
            &format!("{image}?.complete && {image}.naturalWidth === 2 && {image}.naturalHeight === 2"),
            WAIT,
        )
        .await;
    let src = browser.eval(&format!("{image}.src")).await;
    let src = src.as_str().unwrap();
    assert!(src.contains("sig=") && !src.contains("token="), "a signed URL, no token: {src}");
    let link = "document.querySelector('#messages a.attachment.file[data-attachment-id=\"attPdf\"]')";
    browser.wait_until("the file is a link", &format!("!!{link}?.href"), WAIT).await;
    assert!(browser.eval(&format!("{link}.textContent")).await.as_str().unwrap().contains("deck.pdf"));
    let href = browser.eval(&format!("{link}.href")).await;
    let file = reqwest::get(href.as_str().unwrap()).await.expect("the link answers");
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "application/pdf");
    assert_eq!(file.bytes().await.unwrap().as_ref(), b"%PDF-1.4 deck", "the link downloads the file");
    browser.screenshot("attachments").await;

    browser.close().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_account_gets_a_banner_live_and_on_load_until_it_is_back() {
    let relay = Relay::start().await;
    let account = "accBanner";
    relay.post_message(account, "chatBanner", "Before the disconnect").await;
    let status = |word: &str| json!({"AccountStatus": {"account_id": account, "account_type": "LINKEDIN", "message": word}});
    assert_eq!(relay.post_delivery("account-status", &status("OK")).await, "accepted");

    let browser = Browser::start().await;
    let page = format!("{}/?api={}&token={}", relay.fanout_url(), relay.ingest_url, relay.token());
    browser.client.goto(&page).await.expect("the page loads");
    browser.wait_until("the page is live", "document.body.dataset.hellos === '1'", WAIT).await;
    browser
        .wait_until(
            "the chat list is loaded",
            "document.getElementById('chats').innerText.includes('Before the disconnect')",
            WAIT,
        )
        .await;
    assert_eq!(browser.eval("document.getElementById('accounts').hidden").await, true, "no banner while OK");

    let banner = format!("document.querySelector('#accounts .account-down[data-account-id=\"{account}\"]')");
    assert_eq!(relay.post_delivery("account-status", &status("CREDENTIALS")).await, "accepted");
    browser
        .wait_until(
            "the banner appears live",
            &format!("!document.getElementById('accounts').hidden && {banner}?.textContent.includes('disconnected (CREDENTIALS)')"),
            WAIT,
        )
        .await;
    browser.screenshot("account-banner").await;

    // A page opened while the account is down shows it too (from GET /api/accounts).
    browser.client.refresh().await.expect("reloads");
    browser.wait_until("the banner is there on load", &format!("!!{banner}"), WAIT).await;

    assert_eq!(relay.post_delivery("account-status", &status("RECONNECTED")).await, "accepted");
    browser
        .wait_until(
            "the banner goes once the account is back",
            "document.getElementById('accounts').hidden",
            WAIT,
        )
        .await;

    browser.close().await;
    relay.shutdown().await;
}
