//! Test harness: a real ingest on a free port, a fresh database, an isolated stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::Value;
use shared::claims::JwtKeys;
use shared::envelope::Envelope;
use shared::subjects::Subjects;
use sqlx::PgPool;
use uuid::Uuid;

pub use testkit::{NatsServer, StreamGuard, TestDatabase, admin_database_url, create_database, nats_url};

pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef01";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef012345";

/// The server under test and handles on what it writes to.
pub struct TestApp {
    /// First, so that it is told to stop before the database and stream are removed.
    service: testkit::service::Service,
    pub address: String,
    pub port: u16,
    /// A direct connection pool to the test's own database.
    pub db: PgPool,
    /// Drops the database when the app is dropped, after the server was told to stop.
    database: TestDatabase,
    /// Likewise the stream.
    _stream: StreamGuard,
    pub nats_url: String,
    pub js: jetstream::Context,
    pub stream_name: String,
    pub subjects: Subjects,
    pub client: reqwest::Client,
    pub jwt: JwtKeys,
}

/// Settings a test may change before the app starts.
pub struct Options {
    /// Connect ingest's pool to the test database through this port (a [`DbProxy`])
    /// instead of directly.
    pub database_port: Option<u16>,
    pub nats_url: String,
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self { database_port: None, nats_url: nats_url(), extra_args: Vec::new() }
    }
}

fn with_port(url: &str, port: Option<u16>) -> String {
    let Some(port) = port else {
        return url.to_owned();
    };
    let mut url = reqwest::Url::parse(url).expect("DATABASE_URL is a URL");
    url.set_port(Some(port)).expect("DATABASE_URL has a host");
    url.to_string()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let database = create_database("ingest").await;
    let database_url = database.url.as_str();
    let id = Uuid::new_v4().simple().to_string();
    let stream_name = format!("TEST_{id}");
    let prefix = format!("test{id}.events");
    let mut args = vec![
        format!("--webhook-secret={WEBHOOK_SECRET}"),
        format!("--jwt-secret={JWT_SECRET}"),
        format!("--database-url={}", with_port(database_url, options.database_port)),
        format!("--nats-url={}", options.nats_url),
        format!("--stream-name={stream_name}"),
        format!("--subject-prefix={prefix}"),
        "--database-acquire-timeout-ms=1500".to_owned(),
    ];
    if !options.extra_args.iter().any(|a| a.starts_with("--outbox-sweep-ms")) {
        args.push("--outbox-sweep-ms=200".to_owned());
    }
    args.extend(options.extra_args);
    let service = testkit::service::ingest(&args).await;
    let port = service.port;

    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(options.nats_url.as_str())
        .await
        .expect("NATS must be running (set NATS_URL)");
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        db: PgPool::connect(database_url).await.expect("connect to test database"),
        database,
        _stream: StreamGuard::new(options.nats_url.as_str(), stream_name.as_str()),
        nats_url: options.nats_url,
        js: jetstream::new(nats),
        stream_name,
        subjects: Subjects::new(prefix).unwrap(),
        client: reqwest::Client::new(),
        jwt: JwtKeys::new(&SecretString::from(JWT_SECRET)),
        service,
    }
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/../fixtures/unipile/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A `message_received` delivery with fresh ids, shaped like the WhatsApp fixture.
pub fn message_received(account_id: &str, chat_id: &str, is_sender: bool) -> Value {
    let mut v = fixture("message_received_whatsapp.json");
    v["account_id"] = account_id.into();
    v["chat_id"] = chat_id.into();
    v["message_id"] = format!("msg_{}", Uuid::new_v4().simple()).into();
    v["is_sender"] = is_sender.into();
    v
}

impl TestApp {
    /// The test database's URL, for commands run against it.
    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Posts raw bytes to a webhook endpoint with the right secret.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Unipile-Auth", WEBHOOK_SECRET)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("ingest answers")
    }

    /// Posts a messaging delivery; returns the HTTP status and the JSON body.
    pub async fn post_message(&self, body: &Value) -> (u16, Value) {
        let response =
            self.post_raw("/api/webhooks/unipile/messages", "application/json", body.to_string()).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts a messaging delivery and asserts it was answered 200 with `status`.
    pub async fn post_message_expect(&self, body: &Value, status: &str) {
        let (code, answer) = self.post_message(body).await;
        assert_eq!((code, answer["status"].as_str()), (200, Some(status)), "answer: {answer}");
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.expect(sql)
    }

    /// Waits until the stream holds at least `n` events (or `timeout`), then returns
    /// every event in it, in stream order.
    pub async fn stream_events(&self, n: usize, timeout: Duration) -> Vec<(u64, Envelope)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let held = match self.js.get_stream(&self.stream_name).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            };
            if held as usize >= n || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.read_stream().await
    }

    /// Every event in the stream right now.
    pub async fn read_stream(&self) -> Vec<(u64, Envelope)> {
        let Ok(mut stream) = self.js.get_stream(&self.stream_name).await else {
            return Vec::new();
        };
        let held = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
        if held == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("consume");
        let mut events = Vec::new();
        while (events.len() as u64) < held {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .expect("stream delivers what it holds")
                .expect("stream open")
                .expect("message");
            let seq = message.info().expect("jetstream message").stream_sequence;
            let envelope: Envelope =
                serde_json::from_slice(&message.payload).expect("payload is an envelope");
            events.push((seq, envelope));
        }
        events
    }

    /// Stops the server gracefully; `true` when it finished within `within`, cleanly.
    pub async fn stop(&mut self, within: Duration) -> bool {
        self.service.stop(within).await
    }
}

/// A TCP forwarder in front of PostgreSQL that a test can cut, to play a database outage.
pub struct DbProxy {
    pub port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl DbProxy {
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio_util::sync::CancellationToken::new();
        let (target, token) = (target.to_owned(), cut.clone());
        tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        let target = target.clone();
                        links.spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                }
            }
            // Dropping the listener refuses new connections; aborting the links kills
            // the open ones.
            links.abort_all();
        });
        Self { port, cut }
    }

    pub fn cut(&self) {
        self.cut.cancel();
    }
}
