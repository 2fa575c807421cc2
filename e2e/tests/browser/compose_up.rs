//! `docker compose up` for real, as a user runs it: the images built from the
//! Dockerfile, the services of docker-compose.yml with fanout scaled to 3, and
//! everything reached through the gateway alone (one origin, the only published port).
//! Only Unipile is faked (wiremock on the host, which the ingest container reaches).
//!
//! It starts what it needs: `scripts/docker-engine.sh` installs Docker's engine and
//! Compose when missing, starts dockerd when it does not answer, and stands in the base
//! images when Docker Hub cannot be reached (`scripts/offline-images.sh`). It then runs,
//! under its own compose project (its own network and volumes, a free gateway port):
//!
//! - `up -d --build --scale fanout=3`, until every container is healthy;
//! - 1,000 Unipile-shaped webhooks at 250/s into the gateway while 100 WebSocket clients
//!   on it are spread over the 3 replicas; one replica is `docker kill`ed mid-stream and
//!   its clients resume on the others: `loadgen poison --poison 0` checks that every
//!   acknowledged message reached every client once (0 lost, 0 duplicates);
//! - the inbox page, through the gateway in headless Chromium, shows a message live;
//! - `fanout tail --subjects` in a container prints the events' subjects;
//! - `down` then `up`: the chats are still there (the volume), and the two webhooks are
//!   registered with Unipile once in all (reused, not created again).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio::process::Command;
use uuid::Uuid;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::harness::Browser;

const WAIT: Duration = Duration::from_secs(30);
const API_KEY: &str = "compose-unipile-key-0123456789abcdef0123";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// One compose project; `down -v` when dropped, however the test ends.
struct Project {
    name: String,
    env: Vec<(String, String)>,
    override_file: PathBuf,
    gateway: u16,
}

impl Project {
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.args(args).current_dir(repo()).envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn compose(&self, args: &[&str]) -> Command {
        let base = ["-p", &self.name, "-f", "docker-compose.yml", "-f", self.override_file.to_str().unwrap()];
        let all: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
        let mut command = self.command("docker-compose", &all);
        // The classic builder: BuildKit would fetch its frontend from Docker Hub.
        command.env("DOCKER_BUILDKIT", "0").env("COMPOSE_DOCKER_CLI_BUILD", "0");
        command
    }

    async fn run(&self, args: &[&str]) -> String {
        let output = self.compose(args).output().await.expect("docker-compose runs");
        assert!(output.status.success(), "docker-compose {args:?} failed:\n{}", text(&output));
        text(&output)
    }

    /// Ids of the running containers of `service`.
    async fn containers(&self, service: &str) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.name);
        let service = format!("label=com.docker.compose.service={service}");
        let output = self
            .command("docker", &["ps", "-q", "--filter", &project, "--filter", &service])
            .output()
            .await
            .expect("docker ps");
        String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
    }

    /// Waits until ingest, the `fanouts` fanout replicas and the gateway are healthy.
    async fn wait_healthy(&self, fanouts: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        loop {
            let mut ids = Vec::new();
            for service in ["postgres", "nats", "ingest", "fanout", "gateway"] {
                ids.extend(self.containers(service).await);
            }
            let mut states = Vec::new();
            for id in &ids {
                let output = self
                    .command("docker", &["inspect", "--format", "{{.Name}} {{.State.Health.Status}}", id])
                    .output()
                    .await
                    .expect("docker inspect");
                states.push(String::from_utf8_lossy(&output.stdout).trim().to_owned());
            }
            let healthy = states.iter().filter(|s| s.ends_with(" healthy")).count();
            if ids.len() == 4 + fanouts && healthy == ids.len() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let logs = self.compose(&["logs", "--tail", "30"]).output().await.map(|o| text(&o));
                panic!("not healthy within 240 s: {states:?}\n{}", logs.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway)
    }

    /// Live WebSocket connections per fanout container, from each one's /metrics.
    async fn connections_per_replica(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        for id in self.containers("fanout").await {
            let output = self
                .command("docker", &["exec", &id, "curl", "-fsS", "http://127.0.0.1:8001/metrics"])
                .output()
                .await
                .expect("docker exec");
            let metrics = String::from_utf8_lossy(&output.stdout).into_owned();
            let gauge = metrics
                .lines()
                .find(|l| l.starts_with("fanout_connections "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            counts.push(gauge as u64);
        }
        counts
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker-compose")
            .args(["-p", &self.name, "-f", "docker-compose.yml", "-f", self.override_file.to_str().unwrap()])
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .current_dir(repo())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output();
        let _ = std::fs::remove_file(&self.override_file);
    }
}

/// Unipile's webhook endpoints with state: what is created is listed until deleted.
#[derive(Clone, Default)]
struct Webhooks {
    listed: Arc<Mutex<Vec<Value>>>,
    creates: Arc<Mutex<usize>>,
}

impl Respond for Webhooks {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut listed = self.listed.lock().unwrap();
        match request.method.as_str() {
            "GET" => ResponseTemplate::new(200)
                .set_body_json(json!({"object": "WebhookList", "items": *listed, "cursor": null})),
            "POST" => {
                let mut webhook: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                let id = format!("wh{}", Uuid::new_v4().simple());
                webhook["id"] = id.clone().into();
                webhook["enabled"] = true.into();
                listed.push(webhook);
                *self.creates.lock().unwrap() += 1;
                ResponseTemplate::new(201)
                    .set_body_json(json!({"object": "WebhookCreated", "webhook_id": id}))
            }
            "DELETE" => {
                let id = request.url.path().rsplit('/').next().unwrap_or_default().to_owned();
                listed.retain(|w| w["id"] != id.as_str());
                ResponseTemplate::new(200).set_body_json(json!({"object": "WebhookDeleted"}))
            }
            _ => ResponseTemplate::new(405),
        }
    }
}

fn secret() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_up_serves_the_relay_through_the_gateway_and_a_killed_replica_loses_nothing() {
    let engine =
        Command::new(repo().join("scripts/docker-engine.sh")).output().await.expect("the script runs");
    assert!(engine.status.success(), "scripts/docker-engine.sh failed:\n{}", text(&engine));

    // Unipile, on the host, reached from the ingest container through the host gateway.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let unipile = MockServer::builder().listener(listener).start().await;
    let webhooks = Webhooks::default();
    Mock::given(wiremock::matchers::path_regex(r"^/api/v1/webhooks(/[^/]+)?$"))
        .respond_with(webhooks.clone())
        .mount(&unipile)
        .await;
    let unipile_port = unipile.address().port();

    let id = Uuid::new_v4().simple().to_string();
    let name = format!("relaye2e{}", &id[..12]);
    let override_file = std::env::temp_dir().join(format!("{name}.override.yml"));
    std::fs::write(
        &override_file,
        format!(
            "services:\n  ingest:\n    environment:\n      UNIPILE_DSN: http://host.docker.internal:{unipile_port}\n      \
             UNIPILE_API_KEY: {API_KEY}\n      WEBHOOK_BASE_URL: https://relay.example.com\n    \
             extra_hosts:\n      - \"host.docker.internal:host-gateway\"\n"
        ),
    )
    .unwrap();
    let (webhook_secret, jwt_secret) = (secret(), secret());
    let gateway = free_port();
    let project = Project {
        name,
        env: vec![
            ("WEBHOOK_SECRET".into(), webhook_secret.clone()),
            ("JWT_SECRET".into(), jwt_secret.clone()),
            ("NATS_PASSWORD".into(), secret()),
            ("POSTGRES_PASSWORD".into(), secret()),
            ("GATEWAY_PORT".into(), gateway.to_string()),
        ],
        override_file,
        gateway,
    };

    project.run(&["build"]).await;
    project.run(&["up", "-d", "--scale", "fanout=3"]).await;
    project.wait_healthy(3).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while *webhooks.creates.lock().unwrap() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "ingest never registered its two webhooks");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1,000 webhooks at 250/s, 100 clients; one replica killed once all are connected.
    let ws = format!("ws://127.0.0.1:{gateway}/ws/messages");
    let gateway_url = project.url("");
    let cli = loadgen::Cli::try_parse_from([
        "loadgen",
        "poison",
        "--url",
        &gateway_url,
        "--ws-url",
        &ws,
        "--secret",
        &webhook_secret,
        "--jwt-secret",
        &jwt_secret,
        "--rate",
        "250",
        "--duration",
        "4",
        "--poison",
        "0",
        "--clients",
        "100",
        "--grace",
        "15",
    ])
    .expect("loadgen's arguments");
    let run = tokio::spawn(loadgen::run(cli));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let spread = loop {
        let counts = project.connections_per_replica().await;
        if counts.iter().sum::<u64>() >= 100 {
            break counts;
        }
        assert!(tokio::time::Instant::now() < deadline, "the 100 clients never connected: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(spread.len(), 3);
    assert!(spread.iter().all(|&n| n > 0), "the gateway spreads the clients over the 3 replicas: {spread:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = project.containers("fanout").await.remove(0);
    let killed = project.command("docker", &["kill", &victim]).output().await.expect("docker kill");
    assert!(killed.status.success(), "{}", text(&killed));
    let outcome =
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("loadgen ends").expect("joined");
    outcome.expect(
        "loadgen poison: every acknowledged message reached every client once (0 lost, 0 duplicates)",
    );

    // The inbox page through the gateway shows a message live.
    let token = shared::claims::JwtKeys::new(&secrecy::SecretString::from(jwt_secret.clone())).issue(
        "compose-e2e",
        vec!["*".into()],
        Duration::from_secs(900),
    );
    let browser = Browser::start().await;
    browser.client.goto(&project.url(&format!("/?token={token}"))).await.expect("the page loads");
    browser.wait_until("the page is live", "document.body.dataset.hellos === '1'", WAIT).await;
    let live = format!("Live through the gateway {id}");
    let mut body =
        crate::harness::messaging_body("accCompose", "chatCompose", &live, &format!("msg{id}"), false);
    body["account_info"] = json!({"type": "WHATSAPP"});
    let client = reqwest::Client::new();
    let answer = client
        .post(project.url("/api/webhooks/unipile/messages"))
        .header("Unipile-Auth", &webhook_secret)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(answer.status(), 200);
    browser
        .wait_until(
            "the page shows the message live",
            &format!("document.getElementById('chats').innerText.includes({live:?})"),
            WAIT,
        )
        .await;
    browser.screenshot("compose-page").await;
    browser.close().await;

    // The events' subjects, from a container of the project's own image.
    let tail = project
        .run(&[
            "run",
            "--rm",
            "--no-deps",
            "-T",
            "fanout",
            "sh",
            "-c",
            // tail follows until stopped: `timeout` ends it (status 124: success here).
            "timeout 5 fanout tail --since 0 --subjects || [ $? -eq 124 ]",
        ])
        .await;
    assert!(
        tail.contains("relay.events.accCompose.chatCompose.message_new"),
        "tail prints subjects:\n{tail}"
    );

    // down, then up: the data is in the volume, the webhooks are not registered again.
    project.run(&["down"]).await;
    project.run(&["up", "-d"]).await;
    project.wait_healthy(3).await;
    let chats: Value = client
        .get(project.url("/api/chats?limit=200"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("JSON");
    assert!(
        chats["items"].as_array().unwrap().iter().any(|c| c["id"] == "chatCompose"),
        "data kept: {chats}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(*webhooks.creates.lock().unwrap(), 2, "the webhooks are reused, not registered twice");
    assert_eq!(webhooks.listed.lock().unwrap().len(), 2);
}
