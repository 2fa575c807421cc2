//! `loadgen presence`: what presence costs. Agents in teams (a team shares one account,
//! as agents share one Unipile inbox) connect to fanout; events go through the message
//! path at a steady rate the whole time. First phase: presence off (agents connected,
//! silent). Second phase: presence on (every agent has a chat of its team open and
//! moves to another every `--view-secs`, a share of them typing, sending `typing` every
//! `--typing-every-ms` as `client.js` does); `--rounds` alternates the two. Reports, per phase, the event delivery
//! latency across all agents and the presence traffic on core NATS (a plain subscriber
//! on the presence prefix counts messages and bytes: what each fanout replica
//! receives), scaled to 1,000 agents, and the presence frames the agents received.
//!
//! ```text
//! loadgen --threads 1 presence --url ws://127.0.0.1:18001/ws/messages --agents 1000 --rounds 4 \
//!   --subject-prefix loadtest.fanout --stream-name LOADTEST_FANOUT --presence-prefix relay.presence
//! ```
//!
//! Bounded: at most 10,000 agents and 300 seconds per phase; loopback targets only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use secrecy::SecretString;
use serde_json::json;
use shared::claims::JwtKeys;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::broadcast::sent_us;
use crate::idle::{loopback_target, open_with_hello};
use crate::publish::{PublishArgs, Publisher};
use crate::report::{self, CpuTime, now_us};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// fanout's WebSocket URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8001/ws/messages")]
    url: String,
    /// The HS256 secret fanout checks tokens with.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    #[command(flatten)]
    publish: PublishArgs,
    /// Agents connected, each with a `sub` (and a display name) of its own.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Agents per team; a team's agents share one account and its chats.
    #[arg(long, default_value_t = 10)]
    team: usize,
    /// Chats each team works on; an agent opens them in turn.
    #[arg(long, default_value_t = 5)]
    chats_per_team: usize,
    /// Share of agents typing the whole presence phase.
    #[arg(long, default_value_t = 0.3)]
    typing_share: f64,
    /// How often a typing agent sends `typing` (client.js: at most every 2 s per chat).
    #[arg(long, default_value_t = 2000)]
    typing_every_ms: u64,
    /// Seconds an agent keeps a chat open before opening the next.
    #[arg(long, default_value_t = 20)]
    view_secs: u64,
    /// fanout's FANOUT_PRESENCE_PREFIX.
    #[arg(long, default_value = "relay.presence")]
    presence_prefix: String,
    /// Events per second on the message path, in both phases.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Off-then-on rounds; more rounds interleave the two phases, so a machine whose
    /// background load drifts weighs on both alike.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// fanout's process id, to report its CPU use in each phase.
    #[arg(long)]
    pid: Option<u32>,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, ...).
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
}

/// Where the run is; agents record into the phase's histogram and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Off,
    On,
    Done,
}

/// What one phase measured.
struct Measured {
    latency: Mutex<Histogram<u64>>,
    presence_frames: AtomicU64,
    nats_messages: AtomicU64,
    nats_bytes: AtomicU64,
}

impl Measured {
    fn new() -> Self {
        Self {
            latency: Mutex::new(report::latency_histogram()),
            presence_frames: AtomicU64::new(0),
            nats_messages: AtomicU64::new(0),
            nats_bytes: AtomicU64::new(0),
        }
    }
}

struct Shared {
    off: Measured,
    on: Measured,
    closed: AtomicU64,
}

impl Shared {
    fn of(&self, phase: Phase) -> Option<&Measured> {
        match phase {
            Phase::Off => Some(&self.off),
            Phase::On => Some(&self.on),
            _ => None,
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.agents > 10_000 {
        bail!("--agents is capped at 10000");
    }
    let duration = Duration::from_secs(args.duration.clamp(1, 300));
    let rate = args.rate.clamp(1, 10_000);
    let team = args.team.max(1);
    let addr = loopback_target(&args.url).await?;
    let publisher = Publisher::connect(&args.publish).await?;
    let keys = JwtKeys::new(&SecretString::from(args.jwt_secret.clone()));
    let shared = Arc::new(Shared { off: Measured::new(), on: Measured::new(), closed: AtomicU64::new(0) });
    let (phase_tx, phase_rx) = watch::channel(Phase::Warmup);

    // Presence on NATS, as every replica receives it.
    let mut presence_sub = publisher
        .client
        .subscribe(format!("{}.>", args.presence_prefix))
        .await
        .context("subscribing to presence")?;
    let counter = tokio::spawn({
        let (shared, phase) = (shared.clone(), phase_rx.clone());
        async move {
            while let Some(message) = presence_sub.next().await {
                if let Some(measured) = shared.of(*phase.borrow()) {
                    measured.nats_messages.fetch_add(1, Ordering::Relaxed);
                    let bytes = message.payload.len() + message.subject.len();
                    measured.nats_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                }
            }
        }
    });

    let started = Instant::now();
    let mut agents = Vec::with_capacity(args.agents);
    let typing_every = Duration::from_millis(args.typing_every_ms.max(100));
    let view_for = Duration::from_secs(args.view_secs.max(1));
    for i in 0..args.agents {
        let team_id = i / team;
        let account = format!("team-{team_id}");
        let accounts = vec![account.clone(), args.publish.account.clone()];
        let name = format!("Agent {i}");
        let token = keys.issue_named(&format!("agent-{i}"), Some(&name), accounts, Duration::from_secs(3600));
        let url = format!("{}?token={token}", args.url);
        let source = crate::idle::source_address(&source_target(args.source_ips), i);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(30), open_with_hello(&url, source, addr))
            .await
            .context("handshake timed out")??;
        let behaviour = Agent {
            account,
            chats: (0..args.chats_per_team.max(1)).map(|k| format!("team-{team_id}-chat-{k}")).collect(),
            first_chat: i,
            typing: spread(i) < args.typing_share,
            typing_every,
            view_for,
        };
        agents.push(tokio::spawn(agent(ws, behaviour, shared.clone(), phase_rx.clone())));
    }
    println!(
        "loadgen presence: {} agents in teams of {team} connected in {:.1}s",
        agents.len(),
        started.elapsed().as_secs_f64()
    );

    // Events the whole time: the last second of warm-up, then every phase with a second
    // between phases (not recorded) for the switch to settle.
    let rounds = args.rounds.clamp(1, 20);
    let publishing = tokio::spawn({
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let total = rate * (rounds * 2 * (duration.as_secs() + 1) + 1);
        async move {
            let start = Instant::now();
            let mut failed = 0u64;
            for i in 0..total {
                tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                match publisher.publish(json!({"t_us": now_us(), "i": i})).await {
                    Ok(ack) => drop(tokio::spawn(async move { ack.await.is_ok() })),
                    Err(_) => failed += 1,
                }
            }
            failed
        }
    });
    let pid = args.pid.map(|pid| pid.to_string());
    let cpu = |pid: &Option<String>| -> anyhow::Result<Duration> {
        Ok(match pid {
            Some(pid) => {
                let t = CpuTime::of(pid)?;
                t.user + t.system
            }
            None => Duration::ZERO,
        })
    };
    let mut cpu_used = [Duration::ZERO; 2];
    for _ in 0..rounds {
        for (i, phase) in [Phase::Off, Phase::On].into_iter().enumerate() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = cpu(&pid)?;
            phase_tx.send_replace(phase);
            tokio::time::sleep(duration).await;
            phase_tx.send_replace(Phase::Warmup);
            cpu_used[i] += cpu(&pid)?.saturating_sub(before);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase_tx.send_replace(Phase::Done);
    let failed = publishing.await.unwrap_or(0);
    counter.abort();
    for agent in &agents {
        agent.abort();
    }

    let seconds = duration.as_secs_f64() * rounds as f64;
    let per_thousand = 1000.0 / args.agents.max(1) as f64;
    println!(
        "events: {rate}/s to every agent ({failed} publish failures); {rounds} round(s) of {}s off, {}s on",
        duration.as_secs(),
        duration.as_secs()
    );
    for (i, (label, measured)) in
        [("presence off", &shared.off), ("presence on ", &shared.on)].into_iter().enumerate()
    {
        if pid.is_some() {
            println!("{label}: fanout CPU {:.1}% of one core", 100.0 * cpu_used[i].as_secs_f64() / seconds);
        }
        let latency = measured.latency.lock().unwrap_or_else(|p| p.into_inner());
        let messages = measured.nats_messages.load(Ordering::Relaxed) as f64 / seconds;
        let bytes = measured.nats_bytes.load(Ordering::Relaxed) as f64 / seconds;
        let frames = measured.presence_frames.load(Ordering::Relaxed) as f64 / seconds;
        println!("{label}: event delivery {}", report::percentiles(&latency));
        println!(
            "{label}: presence on NATS {messages:.0} msgs/s, {:.1} KB/s (per 1,000 agents: {:.0} msgs/s, \
             {:.1} KB/s, received by every replica); presence frames to agents {frames:.0}/s",
            bytes / 1000.0,
            messages * per_thousand,
            bytes * per_thousand / 1000.0,
        );
    }
    println!("connections closed by the server: {}", shared.closed.load(Ordering::Relaxed));
    Ok(())
}

/// An even spread of agents over [0, 1), so a share picks agents of every team.
fn spread(i: usize) -> f64 {
    ((i as u64).wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0
}

fn source_target(source_ips: u8) -> crate::idle::Target {
    crate::idle::Target {
        url: String::new(),
        jwt_secret: String::new(),
        accounts: Vec::new(),
        connections: 0,
        source_ips,
        first_source: 1,
        concurrency: 1,
    }
}

struct Agent {
    account: String,
    chats: Vec<String>,
    first_chat: usize,
    typing: bool,
    typing_every: Duration,
    view_for: Duration,
}

async fn agent(ws: crate::idle::Ws, agent: Agent, shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let (mut sink, mut stream) = ws.split();
    let reader = {
        let (shared, phase) = (shared.clone(), phase.clone());
        async move {
            while let Some(message) = stream.next().await {
                let text = match message {
                    Ok(Message::Text(text)) => text,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Some(measured) = shared.of(*phase.borrow()) else { continue };
                if text.starts_with("{\"type\":\"presence:") {
                    measured.presence_frames.fetch_add(1, Ordering::Relaxed);
                } else if let Some(sent) = sent_us(text.as_str()) {
                    let latency = Duration::from_micros(now_us().saturating_sub(sent));
                    report::record(&mut measured.latency.lock().unwrap_or_else(|p| p.into_inner()), latency);
                }
            }
            shared.closed.fetch_add(1, Ordering::Relaxed);
        }
    };
    let writer = async move {
        let viewing = |k: usize| {
            let chat = &agent.chats[k % agent.chats.len()];
            Message::text(
                json!({"type": "viewing", "account_id": agent.account, "chat_id": chat}).to_string(),
            )
        };
        let mut k = agent.first_chat;
        loop {
            // Silent until presence is on.
            while *phase.borrow_and_update() != Phase::On {
                if *phase.borrow() == Phase::Done || phase.changed().await.is_err() {
                    return;
                }
            }
            // Agents do not all start at the same instant.
            tokio::time::sleep(Duration::from_millis(agent.first_chat as u64 * 7 % 1000)).await;
            if sink.send(viewing(k)).await.is_err() {
                return;
            }
            let mut opened_at = Instant::now();
            let mut typing = tokio::time::interval(agent.typing_every);
            while *phase.borrow() == Phase::On {
                tokio::select! {
                    _ = typing.tick() => {}
                    changed = phase.changed() => if changed.is_err() { return } else { continue },
                }
                if opened_at.elapsed() >= agent.view_for {
                    k += 1;
                    opened_at = Instant::now();
                    if sink.send(viewing(k)).await.is_err() {
                        return;
                    }
                }
                if agent.typing {
                    let chat = &agent.chats[k % agent.chats.len()];
                    let frame = json!({"type": "typing", "account_id": agent.account, "chat_id": chat});
                    if sink.send(Message::text(frame.to_string())).await.is_err() {
                        return;
                    }
                }
            }
            // Presence off again: close the chat.
            let close = json!({"type": "viewing", "chat_id": null}).to_string();
            if sink.send(Message::text(close)).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
