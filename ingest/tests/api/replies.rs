//! Replies and new chats through a fake Unipile (wiremock at the HTTP level): what the
//! caller gets, what Unipile receives (exactly once, never retried), what is stored, and
//! the events every client sees; the echo webhook in either order; idempotency.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::envelope::{Envelope, EventType};
use uuid::Uuid;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{Options, TestApp, message_received, spawn_app_with};

const API_KEY: &str = "test-unipile-key-for-replies-0123456789";
const WAIT: Duration = Duration::from_secs(10);

/// ingest wired to a fake Unipile, with a chat of `account` that has one incoming message.
struct Setup {
    app: TestApp,
    unipile: MockServer,
    account: String,
    chat: String,
    token: String,
}

async fn setup_with(extra: &[&str]) -> Setup {
    let unipile = MockServer::start().await;
    let mut extra_args =
        vec![format!("--unipile-dsn={}", unipile.uri()), format!("--unipile-api-key={API_KEY}")];
    extra_args.extend(extra.iter().map(|a| a.to_string()));
    let app = spawn_app_with(Options { extra_args, ..Options::default() }).await;
    let account = format!("acc_{}", Uuid::new_v4().simple());
    let chat = format!("chat_{}", Uuid::new_v4().simple());
    app.post_message_expect(&message_received(&account, &chat, false), "accepted").await;
    let token = app.jwt.issue("agent-1", vec![account.clone()], Duration::from_secs(600));
    Setup { app, unipile, account, chat, token }
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

impl Setup {
    fn send_path(&self) -> String {
        format!("/api/v1/chats/{}/messages", self.chat)
    }

    /// Unipile answers sends in this chat with `response`.
    async fn unipile_answers(&self, response: ResponseTemplate) {
        Mock::given(method("POST"))
            .and(path(self.send_path()))
            .and(header("X-API-KEY", API_KEY))
            .respond_with(response)
            .mount(&self.unipile)
            .await;
    }

    async fn reply(&self, body: Value) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        self.reply_as(&self.token, &self.chat, body).await
    }

    async fn reply_as(
        &self,
        token: &str,
        chat: &str,
        body: Value,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let response = self
            .app
            .client
            .post(self.app.url(&format!("/api/chats/{chat}/messages")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("ingest answers");
        let status = response.status();
        let headers = response.headers().clone();
        (status, response.json().await.unwrap_or(Value::Null), headers)
    }

    /// The texts of the sends Unipile received, in order.
    async fn sends(&self) -> Vec<String> {
        let requests = self.unipile.received_requests().await.unwrap_or_default();
        requests
            .iter()
            .filter(|r| r.method.as_str() == "POST" && r.url.path() == self.send_path())
            .map(|r| {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                assert!(
                    r.headers
                        .get("content-type")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .starts_with("multipart/form-data"),
                    "Unipile's send is multipart"
                );
                multipart_field(&body, "text").unwrap_or_else(|| panic!("no text field in {body}"))
            })
            .collect()
    }

    /// The chat's messages as the REST API lists them, oldest first.
    async fn listed(&self) -> Vec<Value> {
        let response = self
            .app
            .client
            .get(self.app.url(&format!("/api/chats/{}/messages", self.chat)))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.unwrap();
        let mut items = page["items"].as_array().unwrap().clone();
        items.reverse();
        items
    }

    /// The echo webhook Unipile sends for a message the account sent.
    fn echo(&self, message_id: &str, text: &str) -> Value {
        let mut echo = message_received(&self.account, &self.chat, true);
        echo["message_id"] = message_id.into();
        echo["message"] = text.into();
        echo
    }

    /// Events of the chat of these types, in stream order, once `n` of any type are there.
    async fn events(&self, n: usize, types: &[EventType]) -> Vec<Envelope> {
        self.app
            .stream_events(n, WAIT)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| types.contains(&e.event_type) && e.chat_id.as_deref() == Some(self.chat.as_str()))
            .collect()
    }
}

/// A text field's value in a multipart body.
fn multipart_field(body: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\"\r\n\r\n");
    let start = body.find(&marker)? + marker.len();
    let end = body[start..].find("\r\n--")?;
    Some(body[start..start + end].to_owned())
}

fn sent(message_id: Option<&str>) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({"object": "MessageSent", "message_id": message_id}))
}

#[tokio::test]
async fn a_reply_goes_to_unipile_once_and_every_client_sees_it_pending_then_sent() {
    let s = setup().await;
    s.unipile_answers(sent(Some("uni_msg_1"))).await;
    let (status, body, _) = s.reply(json!({"text": "On my way", "client_id": "c-1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], "uni_msg_1");
    assert_eq!(body["state"], "sent");
    assert_eq!(body["is_sender"], true);
    assert_eq!(body["client_id"], "c-1");
    assert!(body["relay_id"].as_str().unwrap().starts_with("rl_"), "{body}");
    assert_eq!(s.sends().await, ["On my way"]);

    let events = s.events(3, &[EventType::MessageNew, EventType::MessageStatus]).await;
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, [EventType::MessageNew, EventType::MessageNew, EventType::MessageStatus]);
    let pending = &events[1].data["message"];
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["client_id"], "c-1");
    assert_eq!(pending["id"], body["relay_id"], "the pending bubble's id is the relay id");
    let status_event = &events[2].data;
    assert_eq!(status_event["state"], "sent");
    assert_eq!(status_event["relay_id"], body["relay_id"]);
    assert_eq!(status_event["message_id"], "uni_msg_1");
    assert_eq!(status_event["client_id"], "c-1");
    assert_eq!(status_event["message"]["text"], "On my way");

    let listed = s.listed().await;
    assert_eq!(listed.len(), 2);
    assert_eq!((listed[1]["id"].as_str(), listed[1]["state"].as_str()), (Some("uni_msg_1"), Some("sent")));
    assert!(listed[0].get("state").is_none(), "an incoming message has no state: {}", listed[0]);
}

#[tokio::test]
async fn the_echo_after_the_answer_adds_no_second_message_and_no_event() {
    let s = setup().await;
    s.unipile_answers(sent(Some("uni_msg_2"))).await;
    let (status, _, _) = s.reply(json!({"text": "See you", "client_id": "c-2"})).await;
    assert_eq!(status, StatusCode::CREATED);
    s.events(3, &[]).await;
    s.app.post_message_expect(&s.echo("uni_msg_2", "See you"), "duplicate").await;
    s.app.post_message_expect(&s.echo("uni_msg_2", "See you"), "duplicate").await;

    let listed = s.listed().await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[1]["state"], "sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let news = s.events(3, &[EventType::MessageNew]).await;
    assert_eq!(news.len(), 2, "the incoming message and the reply, nothing for the echo");
}

#[tokio::test]
async fn the_echo_before_the_answer_is_merged_into_one_message() {
    let s = setup().await;
    s.unipile_answers(sent(Some("uni_msg_3")).set_delay(Duration::from_secs(4))).await;
    let request = tokio::spawn({
        let (client, url, token) =
            (s.app.client.clone(), s.app.url(&format!("/api/chats/{}/messages", s.chat)), s.token.clone());
        async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"text": "Echo first", "client_id": "c-3"}))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    });
    // The reply is pending (Unipile has not answered) when its echo arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.app.count("select count(*) from messages where state = 'pending'").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the reply is never stored pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.app.post_message_expect(&s.echo("uni_msg_3", "Echo first"), "accepted").await;
    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!((body["id"].as_str(), body["state"].as_str()), (Some("uni_msg_3"), Some("sent")));

    let listed = s.listed().await;
    assert_eq!(listed.len(), 2, "one row for the reply: {listed:?}");
    assert_eq!(listed[1]["id"], "uni_msg_3");
    assert_eq!(listed[1]["client_id"], "c-3");
    let statuses = s.events(4, &[EventType::MessageStatus]).await;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].data["relay_id"], body["relay_id"], "clients drop the pending bubble by it");
    assert_eq!(statuses[0].data["message_id"], "uni_msg_3");
    assert_eq!(
        s.app.count("select count(*) from chats where last_message_id like 'rl_%'").await,
        0,
        "the chat's last message is the kept row"
    );
}

#[tokio::test]
async fn a_reply_sent_without_an_id_takes_its_echo_by_chat_and_text() {
    let s = setup().await;
    s.unipile_answers(sent(None)).await;
    let (status, body, _) = s.reply(json!({"text": "No id for me", "client_id": "c-4"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], "sent");
    assert_eq!(body["id"], body["relay_id"], "no Unipile id yet");
    // An echo of another text is another message; the matching one takes the reply.
    s.app.post_message_expect(&s.echo("uni_other", "Something else"), "accepted").await;
    s.app.post_message_expect(&s.echo("uni_msg_4", "No id for me"), "accepted").await;
    s.app.post_message_expect(&s.echo("uni_msg_4", "No id for me"), "duplicate").await;

    let listed = s.listed().await;
    let ids: Vec<&str> = listed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 3, "{ids:?}");
    assert!(ids.contains(&"uni_msg_4") && !ids.iter().any(|id| id.starts_with("rl_")), "{ids:?}");
    let reply = listed.iter().find(|m| m["id"] == "uni_msg_4").unwrap();
    assert_eq!((reply["state"].as_str(), reply["client_id"].as_str()), (Some("sent"), Some("c-4")));
    let statuses = s.events(5, &[EventType::MessageStatus]).await;
    assert_eq!(statuses.len(), 2, "sent, then the id");
    assert_eq!(statuses[1].data["message_id"], "uni_msg_4");
    assert_eq!(statuses[1].data["relay_id"], body["relay_id"]);
}

#[tokio::test]
async fn a_reply_answered_without_an_id_after_its_echo_merges_with_the_echo() {
    let s = setup().await;
    s.unipile_answers(sent(None).set_delay(Duration::from_secs(4))).await;
    let request = tokio::spawn({
        let (client, url, token) =
            (s.app.client.clone(), s.app.url(&format!("/api/chats/{}/messages", s.chat)), s.token.clone());
        async move {
            let response =
                client.post(url).bearer_auth(token).json(&json!({"text": "Late null"})).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.app.count("select count(*) from messages where state = 'pending'").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the reply is never stored pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.app.post_message_expect(&s.echo("uni_msg_5", "Late null"), "accepted").await;
    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], "uni_msg_5");
    assert_eq!(s.listed().await.len(), 2);
}

#[tokio::test]
async fn a_repeated_client_id_sends_once_and_answers_the_first_result() {
    let s = setup().await;
    s.unipile_answers(sent(Some("uni_msg_6")).set_delay(Duration::from_millis(700))).await;
    let body = json!({"text": "Only once", "client_id": "c-6"});
    // Ten identical requests at once (a client retrying on a flaky network, several tabs).
    let answers = futures::future::join_all((0..10).map(|_| s.reply(body.clone()))).await;
    let first = &answers[0];
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    for other in &answers[1..] {
        assert_eq!((other.0, &other.1), (first.0, &first.1), "the same status and body");
    }
    let (third_status, third, _) = s.reply(body).await;
    assert_eq!((third_status, &third), (first.0, &first.1));
    assert_eq!(s.sends().await, ["Only once"], "Unipile received it exactly once");
    assert_eq!(s.listed().await.len(), 2);

    // The key in a header works the same; reusing a key for another text is refused.
    let response = s
        .app
        .client
        .post(s.app.url(&format!("/api/chats/{}/messages", s.chat)))
        .bearer_auth(&s.token)
        .header("Idempotency-Key", "c-6")
        .json(&json!({"text": "Something else"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(s.sends().await.len(), 1);
}

#[tokio::test]
async fn unipile_429_is_passed_back_with_retry_after_and_the_reply_fails_unretried() {
    let s = setup().await;
    s.unipile_answers(
        ResponseTemplate::new(429).insert_header("Retry-After", "7").set_body_json(json!({"status": 429})),
    )
    .await;
    let (status, body, headers) = s.reply(json!({"text": "Too fast", "client_id": "c-7"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "7");
    assert_eq!(body["error"]["code"], "unipile_rate_limited");
    assert_eq!(body["message"]["state"], "failed");
    assert_eq!(body["message"]["failure_reason"], "rate_limited");
    assert_eq!(s.sends().await.len(), 1, "a 429 is not retried by the relay");
    let statuses = s.events(3, &[EventType::MessageStatus]).await;
    assert_eq!(statuses[0].data["state"], "failed");
    // A retry of the same request answers the same, still without sending.
    let (again, again_body, again_headers) = s.reply(json!({"text": "Too fast", "client_id": "c-7"})).await;
    assert_eq!((again, &again_body), (status, &body));
    assert_eq!(again_headers.get("retry-after").unwrap(), "7");
    assert_eq!(s.sends().await.len(), 1);
}

#[tokio::test]
async fn unipile_500_fails_the_reply_with_502_and_is_not_retried() {
    let s = setup().await;
    s.unipile_answers(ResponseTemplate::new(500).set_body_string("upstream exploded")).await;
    let (status, body, _) = s.reply(json!({"text": "Will fail", "client_id": "c-8"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "unipile_error");
    assert_eq!(body["message"]["state"], "failed");
    assert!(body["message"]["failure_reason"].as_str().unwrap().contains("500"), "{body}");
    assert_eq!(s.sends().await.len(), 1, "a 5xx is not retried: the send may have gone out");
    let listed = s.listed().await;
    assert_eq!((listed.len(), listed[1]["state"].as_str()), (2, Some("failed")));
    let statuses = s.events(3, &[EventType::MessageStatus]).await;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].data["state"], "failed");
}

#[tokio::test]
async fn a_send_that_times_out_fails_with_504_and_is_not_retried() {
    let s = setup_with(&["--reply-send-timeout-secs=1"]).await;
    s.unipile_answers(sent(Some("too_late")).set_delay(Duration::from_secs(20))).await;
    let started = std::time::Instant::now();
    let (status, body, _) = s.reply(json!({"text": "Slow", "client_id": "c-9"})).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10), "answered after the send timeout, not Unipile");
    assert_eq!(body["error"]["code"], "unipile_timeout");
    assert_eq!(
        (body["message"]["state"].as_str(), body["message"]["failure_reason"].as_str()),
        (Some("failed"), Some("timeout"))
    );
    // The client's retry policy would have retried within a second or two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.sends().await.len(), 1, "a timeout is not retried");
}

#[tokio::test]
async fn a_chat_the_token_may_not_see_is_404_and_nothing_is_sent() {
    let s = setup().await;
    s.unipile_answers(sent(Some("never"))).await;
    let other = s.app.jwt.issue("agent-2", vec!["acc_other".into()], Duration::from_secs(600));
    let (status, body, _) = s.reply_as(&other, &s.chat, json!({"text": "Hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, _) = s.reply_as(&s.token, "chat_that_does_not_exist", json!({"text": "Hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = s
        .app
        .client
        .post(s.app.url(&format!("/api/chats/{}/messages", s.chat)))
        .json(&json!({"text": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(s.sends().await.is_empty());
}

#[tokio::test]
async fn empty_blank_and_overlong_texts_are_422_with_a_clear_message() {
    let s = setup().await;
    s.unipile_answers(sent(Some("never"))).await;
    for (body, says) in [
        (json!({}), "empty"),
        (json!({"text": ""}), "empty"),
        (json!({"text": "   \n "}), "empty"),
        (json!({"text": "x".repeat(10_001)}), "at most 10000"),
        (json!({"text": "ok", "client_id": "k".repeat(129)}), "client_id"),
        (json!({"text": 5}), "JSON"),
    ] {
        let (status, answer, _) = s.reply(body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    assert!(s.sends().await.is_empty());
    assert_eq!(s.listed().await.len(), 1, "nothing stored");
}

#[tokio::test]
async fn sending_without_unipile_configured_answers_503_saying_so() {
    let app = spawn_app_with(Options::default()).await;
    let (account, chat) =
        (format!("acc_{}", Uuid::new_v4().simple()), format!("chat_{}", Uuid::new_v4().simple()));
    app.post_message_expect(&message_received(&account, &chat, false), "accepted").await;
    let token = app.jwt.issue("agent", vec![account], Duration::from_secs(600));
    let response = app
        .client
        .post(app.url(&format!("/api/chats/{chat}/messages")))
        .bearer_auth(token)
        .json(&json!({"text": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_configured");
    assert!(body["error"]["message"].as_str().unwrap().contains("UNIPILE_DSN"));
}

#[tokio::test]
async fn a_new_chat_is_started_through_unipile_once() {
    let s = setup().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/chats"))
        .and(header("X-API-KEY", API_KEY))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"object": "ChatStarted", "chat_id": "new_chat_1", "message_id": null})),
        )
        .mount(&s.unipile)
        .await;
    let start = |token: String, body: Value| {
        let (client, url) = (s.app.client.clone(), s.app.url("/api/chats"));
        async move {
            let response = client.post(url).bearer_auth(token).json(&body).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let body =
        json!({"account_id": s.account, "attendees_ids": ["ACoAAB1", "ACoAAB2"], "text": "Hello both"});
    let (status, answer) = start(s.token.clone(), body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["chat_id"], "new_chat_1");
    let requests = s.unipile.received_requests().await.unwrap();
    let starts: Vec<String> = requests
        .iter()
        .filter(|r| r.url.path() == "/api/v1/chats")
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(starts.len(), 1);
    assert_eq!(multipart_field(&starts[0], "account_id").as_deref(), Some(s.account.as_str()));
    assert_eq!(multipart_field(&starts[0], "text").as_deref(), Some("Hello both"));
    assert_eq!(starts[0].matches("name=\"attendees_ids\"").count(), 2);

    let other = s.app.jwt.issue("agent-2", vec!["acc_other".into()], Duration::from_secs(600));
    assert_eq!(start(other, body).await.0, StatusCode::NOT_FOUND);
    let none = json!({"account_id": s.account, "attendees_ids": [], "text": "Hi"});
    assert_eq!(start(s.token.clone(), none).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(s.unipile.received_requests().await.unwrap().len(), 1, "nothing else was sent");
}

impl Setup {
    async fn reply_form(&self, form: reqwest::multipart::Form) -> (StatusCode, Value) {
        let response = self
            .app
            .client
            .post(self.app.url(&format!("/api/chats/{}/messages", self.chat)))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .expect("ingest answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn file(name: &str, mime: &str, bytes: Vec<u8>) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()).mime_str(mime).unwrap()
}

#[tokio::test]
async fn a_reply_with_files_goes_to_unipile_as_multipart_with_the_files() {
    let s = setup().await;
    s.unipile_answers(sent(Some("uni_files"))).await;
    let form = reqwest::multipart::Form::new()
        .text("text", "Here are the documents")
        .text("client_id", "c-files")
        .part("attachments", file("quote.pdf", "application/pdf", b"%PDF-1.4 not really".to_vec()))
        .part("attachments", file("photo.png", "image/png", vec![0x89, b'P', b'N', b'G', 0, 1, 2]));
    let (status, body) = s.reply_form(form).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], "sent");
    let names: Vec<&str> =
        body["attachments"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["quote.pdf", "photo.png"]);
    assert_eq!(body["attachments"][1]["size"], 7);

    assert_eq!(s.sends().await, ["Here are the documents"]);
    let request = &s.unipile.received_requests().await.unwrap()[0];
    let raw = &request.body;
    let find = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"name=\"attachments\"; filename=\"quote.pdf\""), "the first file is sent on");
    assert!(find(b"%PDF-1.4 not really"));
    assert!(find(b"filename=\"photo.png\"") && find(&[0x89, b'P', b'N', b'G', 0, 1, 2]), "bytes unchanged");
    assert!(find(b"Content-Type: image/png"));
}

#[tokio::test]
async fn too_many_files_or_too_many_bytes_are_413_and_nothing_is_sent_or_stored() {
    let s = setup_with(&["--reply-max-body-bytes=4096"]).await;
    s.unipile_answers(sent(Some("never"))).await;
    let mut form = reqwest::multipart::Form::new().text("text", "Eleven files");
    for i in 0..11 {
        form = form.part("attachments", file(&format!("f{i}.txt"), "text/plain", b"x".to_vec()));
    }
    let (status, body) = s.reply_form(form).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("10 files"), "{body}");

    let form = reqwest::multipart::Form::new()
        .text("text", "One big file")
        .part("attachments", file("big.bin", "application/octet-stream", vec![7; 8000]));
    let (status, body) = s.reply_form(form).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    let form = reqwest::multipart::Form::new().text("text", "Hi").text("surprise", "field");
    assert_eq!(s.reply_form(form).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(s.sends().await.is_empty());
    assert_eq!(s.listed().await.len(), 1, "nothing stored");
}

#[tokio::test]
async fn a_reply_left_pending_by_a_process_that_died_is_marked_failed_and_announced() {
    let s = setup_with(&["--reply-send-timeout-secs=1", "--reply-pending-timeout-secs=1"]).await;
    // What a process that died between storing a reply and Unipile's answer leaves behind.
    sqlx::query(
        "insert into messages (id, chat_id, account_id, text, is_sender, sent_at, state, client_id, relay_id, created_at)
         values ('rl_dead', $1, $2, 'Lost in flight', true, now() - interval '1 minute', 'pending', 'c-dead',
                 'rl_dead', now() - interval '1 minute')",
    )
    .bind(&s.chat)
    .bind(&s.account)
    .execute(&s.app.db)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let reply = loop {
        let listed = s.listed().await;
        let reply = listed.iter().find(|m| m["id"] == "rl_dead").cloned().expect("the reply is listed");
        if reply["state"] != "pending" || tokio::time::Instant::now() >= deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply["state"], "failed", "{reply}");
    assert!(reply["failure_reason"].as_str().unwrap().starts_with("interrupted"), "{reply}");
    let statuses = s.events(2, &[EventType::MessageStatus]).await;
    assert_eq!(statuses.len(), 1);
    assert_eq!(
        (statuses[0].data["relay_id"].as_str(), statuses[0].data["state"].as_str()),
        (Some("rl_dead"), Some("failed"))
    );
    assert!(s.sends().await.is_empty(), "nothing is sent again");
}
