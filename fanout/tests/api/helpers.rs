//! Test harness: real fanout servers on free ports against the real NATS, a unique
//! stream and subject prefix per test, and a small WebSocket client that asserts what
//! a user would see.

use std::net::SocketAddr;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use fanout::Config;
use fanout::frames::ServerFrame;
use futures::{SinkExt, StreamExt};
use runtime::config::{LogFormat, NatsArgs, TelemetryArgs};
use secrecy::SecretString;
use serde_json::{Value, json};
use shared::claims::{Claims, JwtKeys};
use shared::envelope::{Envelope, EventType};
use shared::stream::{StreamSpec, ensure_stream};
use shared::subjects::Subjects;
use testkit::StreamGuard;
pub use testkit::nats_url;
use testkit::service::Service;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "fanout-test-secret-0123456789abcdef0123";
/// How long any single expectation may take.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn keys() -> JwtKeys {
    JwtKeys::new(&SecretString::from(SECRET))
}

/// A valid token for these accounts (`"*"` for all).
pub fn token(accounts: &[&str]) -> String {
    keys().issue("user-1", accounts.iter().map(|a| a.to_string()).collect(), Duration::from_secs(600))
}

/// A test's stream, subjects and a JetStream client to publish with; the stream is
/// deleted when the last clone drops.
#[derive(Clone)]
pub struct Events {
    pub js: jetstream::Context,
    pub stream_name: String,
    pub subjects: Subjects,
    _guard: Arc<StreamGuard>,
}

impl Events {
    pub async fn new(url: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach NATS at {url} (set NATS_URL): {e}"));
        let stream_name = format!("FANOUT_TEST_{id}");
        let subjects = Subjects::new(format!("fanouttest.{id}")).unwrap();
        let js = jetstream::new(client);
        let guard = Arc::new(StreamGuard::new(url, stream_name.clone()));
        // Created as ingest creates it: fanout only follows it.
        let spec = StreamSpec::with_defaults(stream_name.clone(), subjects.clone());
        ensure_stream(&js, &spec).await.expect("creating the test's stream");
        Self { js, stream_name, subjects, _guard: guard }
    }

    /// Publishes one event as ingest would and returns its stream sequence.
    pub async fn publish(&self, account: &str, chat: Option<&str>, data: Value) -> u64 {
        let kind = if chat.is_some() { EventType::MessageNew } else { EventType::AccountStatus };
        let envelope = Envelope::new(kind, account, chat.map(str::to_owned), chrono::Utc::now(), data);
        let subject = self.subjects.event(account, chat, kind);
        let ack = self
            .js
            .publish(subject, envelope.to_bytes().into())
            .await
            .expect("publishing")
            .await
            .expect("publish acknowledged");
        ack.sequence
    }

    /// Publishes `n` events to `acc_a`'s chat `c`, the i-th with `data(i)`; returns their
    /// sequences.
    pub async fn publish_many(&self, n: usize, data: impl Fn(usize) -> Value) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        for i in 0..n {
            seqs.push(self.publish("acc_a", Some("c"), data(i)).await);
        }
        seqs
    }

    /// The test's own presence prefix, beside its stream's subjects.
    pub fn presence_subjects(&self) -> Subjects {
        Subjects::new(self.subjects.prefix().replacen("fanouttest.", "fanoutpresence.", 1)).unwrap()
    }

    pub async fn stream(&self) -> jetstream::stream::Stream {
        self.js.get_stream(&self.stream_name).await.expect("stream exists")
    }
}

/// A configuration for a test server on a free port.
pub fn config(url: &str, events: &Events) -> Config {
    Config {
        nats: NatsArgs {
            nats_url: url.to_owned(),
            stream_name: events.stream_name.clone(),
            subject_prefix: events.subjects.clone(),
            nats_user: None,
            nats_password: None,
        },
        telemetry: TelemetryArgs { log_format: LogFormat::Text },
        jwt_secret: SecretString::from(SECRET),
        jwt_claims: Default::default(),
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 1000,
        max_connections_per_sub: 100,
        max_resumes_per_minute_per_sub: 120,
        queue_capacity: 256,
        heartbeat_secs: 30,
        write_timeout_secs: 10,
        page_api_origins: Vec::new(),
        replay_window: 10_000,
        window_bytes: 64 << 20,
        max_resume_gap: 100_000,
        max_client_message: 4096,
        follow_heartbeat_ms: 500,
        shutdown_grace_secs: 5,
        presence: fanout::config::PresenceArgs {
            presence_prefix: events.presence_subjects(),
            ..Default::default()
        },
    }
}

/// A running fanout server.
pub struct TestApp {
    /// First, so that it is told to stop before the stream is removed.
    service: Service,
    pub addr: SocketAddr,
    pub events: Events,
}

/// A server on a fresh stream against the machine's NATS.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Same, with the configuration adjusted first.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let url = nats_url();
    let events = Events::new(&url).await;
    let mut config = config(&url, &events);
    adjust(&mut config);
    spawn(config, events).await
}

/// Starts a server with this configuration and waits until it is ready.
pub async fn spawn(config: Config, events: Events) -> TestApp {
    runtime::telemetry::init_tracing(LogFormat::Text);
    let service = testkit::service::fanout_with(config).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", service.port).parse().unwrap();
    let app = TestApp { service, addr, events };
    app.wait_ready(true).await;
    app
}

impl TestApp {
    /// Another replica on the same stream.
    pub async fn replica(&self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = config(&nats_url(), &self.events);
        adjust(&mut config);
        spawn(config, self.events.clone()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn readyz(&self) -> reqwest::StatusCode {
        match reqwest::get(self.url("/readyz")).await {
            Ok(response) => response.status(),
            Err(_) => reqwest::StatusCode::BAD_GATEWAY,
        }
    }

    /// `fanout_resumes_total` by outcome, as `/metrics` shows it.
    pub async fn resume_outcomes(&self) -> Vec<(String, u64)> {
        let metrics = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        metrics
            .lines()
            .filter_map(|line| line.strip_prefix("fanout_resumes_total{outcome=\""))
            .filter_map(|rest| rest.split_once("\"} "))
            .map(|(outcome, n)| (outcome.to_owned(), n.trim().parse().unwrap()))
            .collect()
    }

    /// One series, name and labels as `/metrics` shows them (0 before its first count).
    pub async fn counter(&self, series: &str) -> u64 {
        let metrics = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        let value = metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' '));
        value.map_or(0, |n| n.trim().parse().unwrap())
    }

    /// Waits until `/readyz` says `ready`.
    pub async fn wait_ready(&self, ready: bool) {
        let want = if ready { reqwest::StatusCode::OK } else { reqwest::StatusCode::SERVICE_UNAVAILABLE };
        wait_until(&format!("readyz to be {want}"), || async { self.readyz().await == want }).await;
    }

    /// Stops the server (SIGTERM equivalent) and waits for it to finish.
    pub async fn stop(&mut self) {
        assert!(self.service.stop(WAIT).await, "server stops cleanly, in time");
    }

    /// Opens a WebSocket; panics unless the upgrade succeeds.
    pub async fn connect(&self, token: &str, since: Option<u64>) -> WsClient {
        self.try_connect(&self.ws_url(Some(token), since)).await.expect("upgrade accepted")
    }

    /// Connects and reads `hello`.
    pub async fn connect_hello(&self, token: &str, since: Option<u64>) -> (WsClient, Value) {
        let mut client = self.connect(token, since).await;
        let hello = client.hello().await;
        (client, hello)
    }

    pub fn ws_url(&self, token: Option<&str>, since: Option<u64>) -> String {
        let mut url = format!("ws://{}/ws/messages", self.addr);
        let mut sep = '?';
        if let Some(token) = token {
            url.push_str(&format!("{sep}token={token}"));
            sep = '&';
        }
        if let Some(since) = since {
            url.push_str(&format!("{sep}since={since}"));
        }
        url
    }

    /// Opens a WebSocket or returns the HTTP status the upgrade was refused with.
    pub async fn try_connect(&self, url: &str) -> Result<WsClient, u16> {
        try_connect_request(url).await
    }
}

pub async fn try_connect_request<R>(request: R) -> Result<WsClient, u16>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(WsClient { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("connecting: {other}"),
    }
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the server sent next.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended,
}

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// The next text frame or close, skipping pings and pongs.
    pub async fn frame(&mut self) -> Frame {
        self.frame_within(WAIT).await.expect("a frame in time")
    }

    pub async fn frame_within(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            return Some(match next {
                Some(Ok(Message::Text(text))) => {
                    Frame::Json(serde_json::from_str(text.as_str()).expect("JSON frame"))
                }
                Some(Ok(Message::Close(Some(close)))) => {
                    Frame::Close(u16::from(close.code), close.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => Frame::Close(u16::from(CloseCode::Status), String::new()),
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Frame::Ended,
            });
        }
    }

    /// The next JSON frame; panics on a close.
    pub async fn json(&mut self) -> Value {
        match self.frame().await {
            Frame::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    pub async fn hello(&mut self) -> Value {
        let hello = self.json().await;
        let frame: ServerFrame = serde_json::from_value(hello.clone()).expect("a server frame");
        assert!(matches!(frame, ServerFrame::Hello { .. }), "first frame is hello: {hello}");
        hello
    }

    /// The next frame that is not an event, as the server's own type.
    pub async fn server_frame(&mut self) -> ServerFrame {
        let value = self.json().await;
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("not a server frame ({e}): {value}"))
    }

    /// The next event; panics on anything else.
    pub async fn event(&mut self) -> Value {
        let event = self.json().await;
        assert!(
            event.get("seq").is_some() && event.get("account_id").is_some(),
            "expected an event: {event}"
        );
        event
    }

    /// The sequences of the next `n` events.
    pub async fn seqs(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        for _ in 0..n {
            seqs.push(self.event().await["seq"].as_u64().unwrap());
        }
        seqs
    }

    /// Reads until the server closes; returns the code, the reason and the events seen.
    pub async fn until_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            match self.frame().await {
                Frame::Json(value) => seen.push(value),
                Frame::Close(code, reason) => return (code, reason, seen),
                Frame::Ended => panic!("connection ended without a close frame after {} frames", seen.len()),
            }
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws.send(Message::text(value.to_string())).await.expect("sending");
    }

    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.expect("sending");
    }

    /// Asks for a pong: once it arrives, every event dispatched before has arrived too.
    pub async fn ping(&mut self) -> ServerFrame {
        self.send_json(json!({"type": "ping"})).await;
        self.server_frame().await
    }
}

/// A token that expired a minute ago.
pub fn expired_token() -> String {
    keys().sign(&Claims {
        sub: "u".into(),
        exp: chrono::Utc::now().timestamp() - 60,
        accounts: vec!["*".into()],
        iss: None,
        aud: None,
        name: None,
    })
}
