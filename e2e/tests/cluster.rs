//! Beyond one machine: a three-server NATS JetStream cluster, started as processes
//! (no Docker; `testkit::NatsCluster`), the stream created by ingest with
//! `STREAM_REPLICAS=3`, ingest and fanout given every server's URL.
//!
//! The fault: webhooks arrive at 500/s with WebSocket clients attached, and the server
//! leading the stream's RAFT group is killed with SIGKILL. The check is what Unipile and
//! a user would see: every webhook acknowledged (200) reaches every client, and no
//! client gets an event twice (a client that is closed resumes with `?since=`, as the
//! page does). The latency during the fault is printed, not asserted: this machine's
//! two cores are shared.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use secrecy::SecretString;
use serde_json::Value;
use shared::claims::JwtKeys;
use shared::stream::{StreamSpec, ensure_stream};
use shared::subjects::Subjects;
use testkit::{NatsCluster, create_database};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const WEBHOOK_SECRET: &str = "cluster-webhook-secret-0123456789abcdef";
const JWT_SECRET: &str = "cluster-jwt-secret-0123456789abcdef0123";
/// Webhooks per second, open loop: each is sent at its time whatever the answers do.
const RATE: u64 = 500;
/// Sending before the kill, and after it.
const BEFORE: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(7);
const CLIENTS: usize = 4;
/// How long after the last answer every acknowledged message may take to reach every
/// client.
const DRAIN: Duration = Duration::from_secs(40);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    /// Event ids seen, to count an event delivered twice.
    events: HashSet<String>,
    duplicates: u64,
    /// `message:new` by message id: when it first arrived.
    arrived: HashMap<String, Instant>,
    /// The last `seq` (or the first hello's), where a reconnection resumes.
    last_seq: Option<u64>,
    reconnects: u64,
}

impl ClientLog {
    fn record(&mut self, frame: &Value, at: Instant) {
        if let Some(seq) = frame["seq"].as_u64() {
            self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        }
        if frame["type"] == "hello" {
            return;
        }
        let Some(id) = frame["id"].as_str() else { return };
        if !self.events.insert(id.to_owned()) {
            self.duplicates += 1;
            return;
        }
        if frame["type"] == "message:new"
            && let Some(message) = frame["data"]["message"]["id"].as_str()
        {
            self.arrived.entry(message.to_owned()).or_insert(at);
        }
    }
}

/// A client for the whole run: reads events; when its socket ends, reconnects with
/// `?since=` its last sequence. Runs until aborted.
async fn follow(url: String, log: Arc<Mutex<ClientLog>>) {
    loop {
        let since = lock(&log).last_seq.map(|seq| format!("&since={seq}")).unwrap_or_default();
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("{url}{since}")).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message
                && let Ok(frame) = serde_json::from_str::<Value>(text.as_str())
            {
                lock(&log).record(&frame, Instant::now());
            }
        }
        lock(&log).reconnects += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One webhook as sent and answered.
struct Sent {
    message_id: String,
    scheduled: Instant,
    answered: Instant,
    status: u16,
}

/// The n-th `message_received` of a run, shaped like the WhatsApp fixture.
fn delivery(fixture: &Value, run: &str, n: u64) -> (String, String) {
    let mut body = fixture.clone();
    let message_id = format!("msg_{run}_{n}");
    body["account_id"] = format!("acc_{}", n % 5).into();
    body["chat_id"] = format!("chat_{}", n % 50).into();
    body["message_id"] = message_id.clone().into();
    (message_id, body.to_string())
}

fn percentile(mut times: Vec<Duration>, p: f64) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    times.sort();
    times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1]
}

/// The stream's leader (a server name), once the stream has three current replicas.
async fn stream_leader(js: &async_nats::jetstream::Context, name: &str) -> Option<(String, usize)> {
    let mut stream = js.get_stream(name).await.ok()?;
    let info = stream.info().await.ok()?;
    let cluster = info.cluster.clone()?;
    let current = cluster.replicas.iter().filter(|p| p.current).count();
    Some((cluster.leader?, info.config.num_replicas.min(current + 1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_under_load_loses_and_repeats_nothing() {
    // The services' logs (RUST_LOG, default info), shown when the test fails.
    runtime::telemetry::init_tracing(runtime::config::LogFormat::Text);
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let database = create_database("cluster").await;
    let id = Uuid::new_v4().simple().to_string();
    let (stream_name, prefix) = (format!("CLUSTER_{id}"), format!("cluster{id}.events"));
    let nats = async_nats::connect(urls.split(',').collect::<Vec<_>>()).await.expect("the cluster answers");
    let js = async_nats::jetstream::new(nats);
    // The stream as a single-server deployment left it, one copy: ingest rescales it.
    let subjects = Subjects::new(prefix.clone()).unwrap();
    ensure_stream(&js, &StreamSpec::with_defaults(stream_name.clone(), subjects.clone())).await.unwrap();
    let ingest = testkit::service::ingest(&[
        format!("--webhook-secret={WEBHOOK_SECRET}"),
        format!("--jwt-secret={JWT_SECRET}"),
        format!("--database-url={}", database.url),
        format!("--nats-url={urls}"),
        format!("--stream-name={stream_name}"),
        format!("--subject-prefix={prefix}"),
        "--stream-replicas=3".to_owned(),
        "--outbox-sweep-ms=200".to_owned(),
    ])
    .await;
    ingest.wait_ready().await;

    // The stream, as ingest left it: three replicas, all current.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        match stream_leader(&js, &stream_name).await {
            Some((leader, 3)) => break leader,
            other => assert!(Instant::now() < deadline, "no stream with 3 current replicas: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let replicas = js.get_stream(&stream_name).await.unwrap().info().await.unwrap().config.num_replicas;
    assert_eq!(replicas, 3, "STREAM_REPLICAS reached the stream");

    let fanout = testkit::service::fanout(&[
        format!("--jwt-secret={JWT_SECRET}"),
        format!("--nats-url={urls}"),
        format!("--stream-name={stream_name}"),
        format!("--subject-prefix={prefix}"),
    ])
    .await;
    let token = JwtKeys::new(&SecretString::from(JWT_SECRET)).issue(
        "cluster",
        vec!["*".into()],
        Duration::from_secs(600),
    );
    let ws_url = format!("ws://127.0.0.1:{}/ws/messages?token={token}", fanout.port);
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = logs.iter().map(|log| tokio::spawn(follow(ws_url.clone(), log.clone()))).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while logs.iter().any(|log| lock(log).last_seq.is_none()) {
        assert!(Instant::now() < deadline, "the clients did not get their hello");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Open loop at RATE; the stream's leader is killed after BEFORE.
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/unipile/message_received_whatsapp.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let http = reqwest::Client::new();
    let endpoint = ingest.url("/api/webhooks/unipile/messages");
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let total = RATE * (BEFORE + AFTER).as_secs();
    let kill_at = RATE * BEFORE.as_secs();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut posts = Vec::with_capacity(total as usize);
    let mut killed = None;
    let mut election = None;
    for n in 0..total {
        tick.tick().await;
        if n == kill_at {
            let leader_now = stream_leader(&js, &stream_name).await.map_or(leader.clone(), |(l, _)| l);
            cluster.kill(&leader_now);
            println!("killed the stream leader {leader_now} (SIGKILL) after {n} webhooks");
            let (js, name, old, at) = (js.clone(), stream_name.clone(), leader_now.clone(), Instant::now());
            election = Some(tokio::spawn(async move {
                // When the cluster names a new leader, and when the stream grows again
                // (ingest's relay publishing): the two halves of the outage.
                let (mut elected, mut growing, mut last) = (None, None, None);
                while at.elapsed() < Duration::from_secs(30) && growing.is_none() {
                    let asked = tokio::time::timeout(Duration::from_secs(1), async {
                        let mut stream = js.get_stream(&name).await.ok()?;
                        stream.info().await.ok().cloned()
                    })
                    .await;
                    if let Ok(Some(info)) = asked {
                        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                        if elected.is_none() && leader.as_ref().is_some_and(|l| *l != old) {
                            elected = Some(at.elapsed());
                        }
                        match last {
                            None => last = Some(info.state.last_sequence),
                            Some(seq) if elected.is_some() && info.state.last_sequence > seq => {
                                growing = Some(at.elapsed());
                            }
                            Some(_) => {}
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (elected, growing)
            }));
            killed = Some((Instant::now(), leader_now));
        }
        let (http, endpoint, sent) = (http.clone(), endpoint.clone(), sent.clone());
        let (message_id, body) = delivery(&fixture, &run, n);
        let scheduled = Instant::now();
        posts.push(tokio::spawn(async move {
            let status = http
                .post(endpoint)
                .header("Unipile-Auth", WEBHOOK_SECRET)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            lock(&sent).push(Sent { message_id, scheduled, answered: Instant::now(), status });
        }));
    }
    for post in posts {
        post.await.unwrap();
    }
    let (killed_at, killed_name) = killed.expect("the leader was killed");
    let sent = std::mem::take(&mut *lock(&sent));
    let acked: Vec<&Sent> = sent.iter().filter(|s| s.status == 200).collect();

    // Every acknowledged message at every client, or DRAIN runs out.
    let deadline = Instant::now() + DRAIN;
    let missing = |logs: &[Arc<Mutex<ClientLog>>]| -> usize {
        logs.iter()
            .map(|log| {
                let log = lock(log);
                acked.iter().filter(|s| !log.arrived.contains_key(&s.message_id)).count()
            })
            .sum()
    };
    while missing(&logs) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in &clients {
        client.abort();
    }
    let new_leader = stream_leader(&js, &stream_name).await.map(|(l, _)| l);
    let elected = election.expect("watched").await.unwrap();
    let metrics = reqwest::get(ingest.url("/metrics")).await.unwrap().text().await.unwrap();
    let publish_errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outbox_publish_errors_total "))
        .unwrap_or("0")
        .to_owned();

    // Latencies: the answer, and the message at the last client, from its scheduled time.
    let everywhere = |s: &Sent| -> Option<Duration> {
        let mut last = None;
        for log in &logs {
            let at = *lock(log).arrived.get(&s.message_id)?;
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        last.map(|at| at.saturating_duration_since(s.scheduled))
    };
    let (before, during): (Vec<&Sent>, Vec<&Sent>) = acked.iter().partition(|s| s.scheduled < killed_at);
    let acks = |set: &[&Sent]| set.iter().map(|s| s.answered - s.scheduled).collect::<Vec<_>>();
    let e2e = |set: &[&Sent]| set.iter().filter_map(|s| everywhere(s)).collect::<Vec<_>>();
    let show = |times: Vec<Duration>| {
        let max = times.iter().max().copied().unwrap_or_default();
        format!("p50 {:?}, p99 {:?}, max {max:?}", percentile(times.clone(), 0.5), percentile(times, 0.99))
    };
    // The longest a client went without a new message after the kill: the outage as
    // a user saw it.
    let pause = {
        let log = lock(&logs[0]);
        let mut arrivals: Vec<Instant> =
            log.arrived.values().copied().filter(|at| *at >= killed_at).collect();
        arrivals.push(killed_at);
        arrivals.sort();
        arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    };
    let lost = missing(&logs);
    let duplicates: u64 = logs.iter().map(|log| lock(log).duplicates).sum();
    let reconnects: u64 = logs.iter().map(|log| lock(log).reconnects).sum();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for s in &sent {
        *statuses.entry(s.status).or_default() += 1;
    }
    println!(
        "cluster fault run: {total} webhooks at {RATE}/s to ingest, {CLIENTS} clients on fanout, \
         3 NATS servers, stream R3; killed {killed_name} after {BEFORE:?}, new leader {new_leader:?}"
    );
    println!(
        "answers: {statuses:?}; failed publish rounds: {publish_errors}; client reconnects (resumes): {reconnects}"
    );
    println!("before the kill ({} acked): ack {}", before.len(), show(acks(&before)));
    println!("                 webhook to every client {}", show(e2e(&before)));
    println!("from the kill on ({} acked): ack {}", during.len(), show(acks(&during)));
    println!("                 webhook to every client {}", show(e2e(&during)));
    println!(
        "after the kill: a new stream leader reported after {:?}, the stream growing again after {:?}; \
         longest pause in deliveries at a client: {pause:?}",
        elected.0, elected.1
    );
    println!("acknowledged but missing at a client: {lost}; duplicates seen: {duplicates}");

    if lost > 0 {
        // Where the missing events stopped: the outbox (ingest), or between the stream
        // and the clients (fanout).
        let held = match js.get_stream(&stream_name).await {
            Ok(mut stream) => {
                stream.info().await.map(|i| i.state.last_sequence.to_string()).unwrap_or_default()
            }
            Err(e) => e.to_string(),
        };
        let scrape = |url: String, prefix: &'static str| async move {
            let text = reqwest::get(url).await.map(|r| r.text());
            let text = match text {
                Ok(text) => text.await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            text.lines()
                .filter(|l| l.starts_with(prefix) && !l.contains("bucket"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        panic!(
            "{lost} acknowledged webhooks missing at clients (counted per client); the stream holds {held} \
             events for {} acknowledged; ingest: {}; fanout: {}",
            acked.len(),
            scrape(ingest.url("/metrics"), "outbox_").await,
            scrape(fanout.url("/metrics"), "fanout_follower").await,
        );
    }
    assert_eq!(duplicates, 0, "events a client got twice");
    assert!(
        acked.len() as u64 * 100 >= total * 95,
        "ingest answers webhooks without NATS on the way: {statuses:?}"
    );
    assert!(new_leader.is_some_and(|l| l != killed_name), "the stream elected a new leader");

    // More replicas than the cluster has servers: JetStream refuses, the stream keeps
    // its three copies, and the other settings still change.
    let five = StreamSpec {
        replicas: 5,
        duplicate_window: Duration::from_secs(42),
        ..StreamSpec::with_defaults(stream_name.clone(), subjects)
    };
    ensure_stream(&js, &five).await.expect("the other settings are applied");
    let config = js.get_stream(&stream_name).await.unwrap().info().await.unwrap().config.clone();
    assert_eq!((config.num_replicas, config.duplicate_window), (3, Duration::from_secs(42)));
}
