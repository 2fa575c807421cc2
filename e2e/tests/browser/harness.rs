//! The pieces a browser test stands on: real ingest and fanout in this process (fresh
//! database, private stream and subject prefix), and headless Chromium driven through
//! chromedriver with fantoccini.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use secrecy::SecretString;
use serde_json::{Value, json};
use shared::claims::JwtKeys;
use uuid::Uuid;

pub use testkit::nats_url;
use testkit::service::Service;
use testkit::{StreamGuard, TestDatabase, create_database};

pub const WEBHOOK_SECRET: &str = "e2e-webhook-secret-0123456789abcdef0123";
pub const JWT_SECRET: &str = "e2e-jwt-secret-0123456789abcdef01234567";

/// Chromium's flags for a headless run on a shared CI machine.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
];

/// ingest and fanout, wired to one private stream.
pub struct Relay {
    pub ingest_url: String,
    pub fanout_port: u16,
    pub jwt: JwtKeys,
    pub stream_name: String,
    pub prefix: String,
    /// Dropped with the relay (also when a test panics), which drops the database.
    _database: TestDatabase,
    /// Likewise for the stream.
    _stream: StreamGuard,
    ingest: Service,
    fanout: Service,
    client: reqwest::Client,
}

impl Relay {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With more flags for ingest (e.g. `--unipile-dsn` of a fake Unipile).
    pub async fn start_with(ingest_flags: &[String]) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let stream_name = format!("E2E_{id}");
        let prefix = format!("e2e{id}.events");
        // Each names the other: ingest's CORS allows the page's origin, and the page may
        // send its token to ingest's. ingest's port is picked first, fanout started first.
        let ingest_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ingest_url = format!("http://127.0.0.1:{ingest_port}");
        let (fanout, fanout_port) = start_fanout(0, &stream_name, &prefix, &ingest_url, &[]).await;
        let database = create_database("e2e").await;
        let database_url = &database.url;
        let args = [
            format!("--webhook-secret={WEBHOOK_SECRET}"),
            format!("--jwt-secret={JWT_SECRET}"),
            format!("--database-url={database_url}"),
            format!("--nats-url={}", nats_url()),
            format!("--stream-name={stream_name}"),
            format!("--subject-prefix={prefix}"),
            format!("--cors-origins=http://127.0.0.1:{fanout_port}"),
            format!("--listen=127.0.0.1:{ingest_port}"),
            "--outbox-sweep-ms=200".to_owned(),
        ];
        let args: Vec<String> = args.into_iter().chain(ingest_flags.iter().cloned()).collect();
        let ingest = testkit::service::ingest(&args).await;
        let relay = Self {
            ingest_url,
            fanout_port,
            jwt: JwtKeys::new(&SecretString::from(JWT_SECRET)),
            stream_name: stream_name.clone(),
            prefix,
            _database: database,
            _stream: StreamGuard::new(nats_url(), stream_name.clone()),
            ingest,
            fanout,
            client: reqwest::Client::new(),
        };
        relay.wait_ready(&format!("{}/readyz", relay.ingest_url)).await;
        relay.wait_ready(&format!("{}/readyz", relay.fanout_url())).await;
        relay
    }

    pub fn fanout_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.fanout_port)
    }

    pub fn token(&self) -> String {
        self.jwt.issue("e2e", vec!["*".into()], Duration::from_secs(600))
    }

    /// A token of one agent, with a display name, for these accounts.
    pub fn agent_token(&self, sub: &str, name: &str, accounts: &[&str]) -> String {
        let accounts = accounts.iter().map(|a| a.to_string()).collect();
        self.jwt.issue_named(sub, Some(name), accounts, Duration::from_secs(600))
    }

    async fn wait_ready(&self, url: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{url} not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops fanout: every socket is closed (1012) and nothing listens on its port.
    pub async fn stop_fanout(&mut self) {
        self.fanout.stop(Duration::from_secs(15)).await;
    }

    /// Starts a new fanout on the same port, as a restarted replica would be.
    pub async fn restart_fanout(&mut self) {
        self.restart_fanout_with(&[]).await;
    }

    /// Same, with more flags for the new replica.
    pub async fn restart_fanout_with(&mut self, flags: &[&str]) {
        let (fanout, port) =
            start_fanout(self.fanout_port, &self.stream_name, &self.prefix, &self.ingest_url, flags).await;
        assert_eq!(port, self.fanout_port);
        self.fanout = fanout;
        self.wait_ready(&format!("{}/readyz", self.fanout_url())).await;
    }

    /// Posts a `message_received` webhook; asserts ingest accepted it.
    pub async fn post_message(&self, account: &str, chat: &str, text: &str) {
        let id = format!("msg{}", Uuid::new_v4().simple());
        let answer = self.post_messaging(account, chat, text, &id, false).await;
        assert_eq!(answer, "accepted");
    }

    /// Posts a `message_received` webhook (`is_sender` for the echo of the account's own
    /// message); returns ingest's `status` answer.
    pub async fn post_messaging(
        &self,
        account: &str,
        chat: &str,
        text: &str,
        id: &str,
        is_sender: bool,
    ) -> String {
        self.post_delivery("messages", &messaging_body(account, chat, text, id, is_sender)).await
    }

    /// Posts a webhook delivery to `/api/webhooks/unipile/{endpoint}` (`messages` or
    /// `account-status`); asserts a 200 and returns ingest's `status` answer.
    pub async fn post_delivery(&self, endpoint: &str, body: &Value) -> String {
        let response = self
            .client
            .post(format!("{}/api/webhooks/unipile/{endpoint}", self.ingest_url))
            .header("Unipile-Auth", WEBHOOK_SECRET)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("ingest answers");
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status.as_u16(), 200, "{answer}");
        answer["status"].as_str().unwrap_or_default().to_owned()
    }

    /// Publishes the stream's newest event again, under a new seq: what ingest does
    /// when it recovers from a crash after JetStream's duplicate window has passed.
    pub async fn republish_last_event(&self) {
        let js = async_nats::jetstream::new(async_nats_connect().await.expect("NATS is up"));
        let mut stream = js.get_stream(&self.stream_name).await.expect("the stream exists");
        let last = stream.info().await.expect("stream info").state.last_sequence;
        let message = stream.get_raw_message(last).await.expect("the newest event");
        js.publish(message.subject, message.payload)
            .await
            .expect("published")
            .await
            .expect("JetStream stores it (no Nats-Msg-Id, so no dedupe)");
    }

    pub async fn shutdown(mut self) {
        self.fanout.stop(Duration::from_secs(15)).await;
        self.ingest.stop(Duration::from_secs(15)).await;
    }
}

async fn async_nats_connect() -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::connect(nats_url()).await
}

/// A `message_received` delivery as Unipile sends it (`is_sender` for the echo of the
/// account's own message), without attachments.
pub fn messaging_body(account: &str, chat: &str, text: &str, id: &str, is_sender: bool) -> Value {
    json!({
        "event": "message_received",
        "account_id": account,
        "account_type": "WHATSAPP",
        "account_info": {"type": "WHATSAPP", "phone_number": "+14155550123"},
        "webhook_name": "relay-messaging",
        "chat_id": chat,
        "attendees": [{"attendee_id": format!("{chat}-att"), "attendee_name": format!("Contact {chat}"),
                       "attendee_provider_id": "15105550199@s.whatsapp.net", "attendee_profile_url": null}],
        "sender": {"attendee_id": format!("{chat}-att"), "attendee_name": format!("Contact {chat}"),
                   "attendee_provider_id": "15105550199@s.whatsapp.net", "attendee_profile_url": null},
        "message": text,
        "message_id": id,
        "timestamp": chrono_now(),
        "attachments": [],
        "is_sender": is_sender,
        "is_group": false,
    })
}

fn chrono_now() -> String {
    // RFC 3339 with milliseconds, like Unipile.
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn start_fanout(
    port: u16,
    stream_name: &str,
    prefix: &str,
    ingest_url: &str,
    flags: &[&str],
) -> (Service, u16) {
    let args = [
        format!("--page-api-origins={ingest_url}"),
        format!("--listen=127.0.0.1:{port}"),
        format!("--jwt-secret={JWT_SECRET}"),
        format!("--nats-url={}", nats_url()),
        format!("--stream-name={stream_name}"),
        format!("--subject-prefix={prefix}"),
        // Presence of this test's own, beside its stream's subjects.
        format!("--presence-prefix={}", prefix.replacen(".events", ".presence", 1)),
        "--shutdown-grace-secs=1".to_owned(),
    ];
    let args: Vec<String> = args.into_iter().chain(flags.iter().map(|flag| flag.to_string())).collect();
    // Not ready until ingest has created the stream: the caller waits.
    let service = testkit::service::fanout_unready(&args).await;
    let port = service.port;
    (service, port)
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
    })
}

/// chromedriver on a free port, with headless Chromium behind it.
pub struct Browser {
    pub client: Client,
    _driver: Driver,
    profile: PathBuf,
}

/// The chromedriver process, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Browser {
    pub async fn start() -> Self {
        let chromium = std::env::var_os("CHROMIUM_BIN")
            .map(PathBuf::from)
            .or_else(|| find_program(&["chromium", "chromium-browser", "google-chrome"]));
        let chromium = chromium.unwrap_or_else(|| {
            panic!(
                "Chromium is not installed: the browser test needs it. \
                 Install it with `apt-get install -y chromium chromium-driver` (or set CHROMIUM_BIN)."
            )
        });
        let chromedriver = std::env::var_os("CHROMEDRIVER_BIN")
            .map(PathBuf::from)
            .or_else(|| find_program(&["chromedriver"]));
        let chromedriver = chromedriver.unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: the browser test needs it. \
                 Install it with `apt-get install -y chromium-driver` (or set CHROMEDRIVER_BIN)."
            )
        });
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromedriver.display()));
        // Killed on drop, also when the session below cannot be created.
        let driver = Driver(driver);
        let profile = std::env::temp_dir().join(format!("e2e-chromium-{}", Uuid::new_v4().simple()));
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium.display().to_string(), "args": args}),
        );
        // chromedriver speaks plain HTTP on loopback: no TLS stack needed.
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            match builder.connect(&webdriver).await {
                Ok(client) => break client,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no Chromium session through {} ({}): {error}",
                        chromedriver.display(),
                        chromium.display()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self { client, _driver: driver, profile }
    }

    /// Evaluates `expression` in the page until it is truthy; fails with what the page
    /// shows after `timeout`.
    pub async fn wait_until(&self, what: &str, expression: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let script = format!("return Boolean({expression});");
        loop {
            let ok = self.client.execute(&script, vec![]).await.map(|v| v == Value::Bool(true));
            if matches!(ok, Ok(true)) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self.text().await;
                self.screenshot("failure").await;
                panic!("timed out waiting until {what} ({expression}); page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates an expression and returns its value.
    pub async fn eval(&self, expression: &str) -> Value {
        self.client.execute(&format!("return ({expression});"), vec![]).await.expect("script runs")
    }

    pub async fn text(&self) -> String {
        let status = self.eval("document.getElementById('status')?.textContent").await;
        let body = self.eval("document.body ? document.body.innerText : ''").await;
        format!("status: {status}\n{}", body.as_str().unwrap_or_default())
    }

    /// Saves a screenshot beside the build output, for whoever debugs a failure.
    pub async fn screenshot(&self, name: &str) -> Option<PathBuf> {
        let png = self.client.screenshot().await.ok()?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e");
        std::fs::create_dir_all(&dir).ok()?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).ok()?;
        Some(path)
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// After a failed assertion the session is never closed and Chromium (a child of
    /// chromedriver, not of this process) would outlive the test: end every process
    /// started with this test's own profile directory.
    fn drop(&mut self) {
        let profile = format!("--user-data-dir={}", self.profile.display());
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            if cmdline.split(|b| *b == 0).any(|arg| arg == profile.as_bytes()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
