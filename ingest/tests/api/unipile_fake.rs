//! A fake Unipile API on wiremock, fed from the fixtures in `fixtures/unipile/`.
//!
//! Webhooks are modelled with state (a list behind a mutex) so that create, list and
//! delete see each other, also when several ensure runs race. History endpoints
//! (accounts, chats, messages) answer from fixture files.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ingest::unipile::{ClientConfig, RetryPolicy, UnipileClient};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::fixture;

pub const API_KEY: &str = "test-unipile-key";
pub const ACCOUNT_ID: &str = "Wq7hT2mXRbK9vLpA3sDfGh";
pub const CHAT_ID: &str = "c4Rt8YuIoP1aSdFgHjKlZx";
pub const GROUP_CHAT_ID: &str = "gR0upCh4tXy7Zq2Wm9Lk3a";
/// How many webhooks one page of the fake's `GET /webhooks` holds, so listing pages.
const WEBHOOK_PAGE: usize = 2;

#[derive(Default)]
struct State {
    webhooks: Vec<Value>,
    creates: usize,
    deletes: usize,
    /// Requests still to be answered 503, to play an unreachable Unipile.
    failures_left: usize,
}

pub struct FakeUnipile {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
}

impl FakeUnipile {
    /// A fake with no webhooks.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(path_regex(r"^/api/v1/webhooks(/[^/]+)?$"))
            .respond_with(Webhooks { state: state.clone() })
            .mount(&server)
            .await;
        Self { server, state }
    }

    /// What `UNIPILE_DSN` is set to: the fake's base URL with its scheme.
    pub fn dsn(&self) -> String {
        self.server.uri()
    }

    /// A client with fast retries, as tests want it.
    pub fn client(&self) -> UnipileClient {
        let mut config = ClientConfig::new(&self.dsn(), SecretString::from(API_KEY)).unwrap();
        config.retry = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            max_retry_after: Duration::from_secs(2),
        };
        UnipileClient::new(config).unwrap()
    }

    /// Adds webhooks as if registered earlier.
    pub fn seed(&self, webhooks: impl IntoIterator<Item = Value>) {
        self.state.lock().unwrap().webhooks.extend(webhooks);
    }

    /// The webhooks the fake holds now.
    pub fn webhooks(&self) -> Vec<Value> {
        self.state.lock().unwrap().webhooks.clone()
    }

    pub fn creates(&self) -> usize {
        self.state.lock().unwrap().creates
    }

    pub fn deletes(&self) -> usize {
        self.state.lock().unwrap().deletes
    }

    /// Makes the next `n` webhook requests fail with 503.
    pub fn fail_next(&self, n: usize) {
        self.state.lock().unwrap().failures_left = n;
    }

    /// Serves `GET /accounts`, the chat list of [`ACCOUNT_ID`] in two pages, and the
    /// messages of both chats, from fixtures.
    pub async fn serve_history(&self) {
        Mock::given(method("GET"))
            .and(path("/api/v1/accounts"))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_account_list.json")))
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v1/chats"))
            .and(query_param("account_id", ACCOUNT_ID))
            .and(query_param_is_missing("cursor"))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_chat_list.json")))
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v1/chats"))
            .and(query_param("account_id", ACCOUNT_ID))
            .and(query_param("cursor", "eyJvZmZzZXQiOjF9"))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_chat_list_page2.json")))
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v1/chats/{CHAT_ID}/messages")))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_message_list.json")))
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v1/chats/{GROUP_CHAT_ID}/messages")))
            .respond_with(ResponseTemplate::new(200).set_body_json(fixture("api_message_list_group.json")))
            .mount(&self.server)
            .await;
    }
}

/// The fixture's messaging webhook, pointed at `base_url` with `secret`.
pub fn listed_webhook(id: &str, source: &str, base_url: &str, secret: &str) -> Value {
    let mut webhook = fixture("api_webhook_list.json")["items"][0].clone();
    let endpoint = if source == "messaging" { "messages" } else { "account-status" };
    webhook["id"] = id.into();
    webhook["source"] = source.into();
    webhook["request_url"] = format!("{base_url}/api/webhooks/unipile/{endpoint}").into();
    webhook["headers"] = json!([
        {"key": "Content-Type", "value": "application/json"},
        {"key": "Unipile-Auth", "value": secret}
    ]);
    if source != "messaging" {
        webhook["events"] = json!([]);
    }
    webhook
}

/// `GET /webhooks` (paged), `POST /webhooks`, `DELETE /webhooks/{id}` over shared state.
struct Webhooks {
    state: Arc<Mutex<State>>,
}

impl Respond for Webhooks {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let delay = Duration::from_millis(15);
        if request.headers.get("X-API-KEY").and_then(|v| v.to_str().ok()) != Some(API_KEY) {
            return ResponseTemplate::new(401)
                .set_body_json(json!({"status": 401, "type": "errors/missing_credentials"}));
        }
        let mut state = self.state.lock().unwrap();
        if state.failures_left > 0 {
            state.failures_left -= 1;
            return ResponseTemplate::new(503).set_body_string("upstream unavailable");
        }
        let id = request.url.path().strip_prefix("/api/v1/webhooks/").map(str::to_owned);
        match (request.method.as_str(), id) {
            ("GET", None) => {
                let offset: usize = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "cursor")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let items: Vec<Value> =
                    state.webhooks.iter().skip(offset).take(WEBHOOK_PAGE).cloned().collect();
                let next = offset + items.len();
                let cursor = (next < state.webhooks.len()).then(|| next.to_string());
                ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "WebhookList", "items": items, "cursor": cursor}))
                    .set_delay(delay)
            }
            ("POST", None) => {
                let Ok(mut body) = request.body_json::<Value>() else {
                    return ResponseTemplate::new(400).set_body_string("body is not JSON");
                };
                let id = Uuid::new_v4().simple().to_string();
                body["object"] = "Webhook".into();
                body["id"] = id.clone().into();
                body["enabled"] = true.into();
                body["type"] = "AUTO".into();
                if body.get("events").is_none() {
                    body["events"] = json!([]);
                }
                state.webhooks.push(body);
                state.creates += 1;
                let mut created = fixture("api_webhook_created.json");
                created["webhook_id"] = id.into();
                ResponseTemplate::new(201).set_body_json(created).set_delay(delay)
            }
            ("DELETE", Some(id)) => {
                let before = state.webhooks.len();
                state.webhooks.retain(|w| w["id"] != id.as_str());
                if state.webhooks.len() == before {
                    return ResponseTemplate::new(404)
                        .set_body_json(json!({"status": 404, "type": "errors/resource_not_found"}));
                }
                state.deletes += 1;
                ResponseTemplate::new(200).set_body_json(fixture("api_webhook_deleted.json")).set_delay(delay)
            }
            _ => ResponseTemplate::new(405),
        }
    }
}
