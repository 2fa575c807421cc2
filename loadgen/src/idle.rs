//! `loadgen idle`: many idle WebSocket connections to one fanout replica, to measure
//! what a connection costs it.
//!
//! Connections are spread over several loopback source addresses (127.0.0.1, .2, ..)
//! so their number is not capped by one source address's ~28k ephemeral ports. With
//! `--pid` it reads the fanout process's resident memory (`VmRSS` in
//! `/proc/<pid>/status`) before and after and prints the growth per connection. One
//! process may hold at most ~20,000 open files here; run several loadgen processes
//! (each with its own `--first-source`) for more connections than that.
//!
//! ```text
//! loadgen idle --url ws://127.0.0.1:8001/ws/messages --connections 15000 --pid $(pgrep -n fanout)
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use secrecy::SecretString;
use shared::claims::JwtKeys;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where to connect and as whom; shared by `idle` and `broadcast`.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// WebSocket URL of one fanout replica; only loopback hosts are accepted.
    #[arg(long, default_value = "ws://127.0.0.1:8001/ws/messages")]
    pub url: String,
    /// JWT_SECRET of the relay, to sign the clients' token.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Accounts in the token, comma-separated (`*` for all).
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub accounts: Vec<String>,
    /// Connections to open (at most 100,000).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Loopback source addresses to spread connections over (127.0.0.N, N from
    /// --first-source); each gives ~28k ephemeral ports.
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// Last octet of the first source address.
    #[arg(long, default_value_t = 1)]
    pub first_source: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// fanout's process id, to report its memory per connection.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to hold the connections open after they are all up (at most 3600).
    #[arg(long, default_value_t = 10)]
    hold: u64,
}

/// One open client connection whose frames a background task reads (answering pings).
pub struct Opened {
    pub reader: tokio::task::JoinHandle<()>,
}

/// Counters the reader tasks update.
#[derive(Debug, Default)]
pub struct Counters {
    pub frames: AtomicU64,
    pub closed: AtomicU64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let target = args.target;
    let hold = Duration::from_secs(args.hold.min(3600));
    let rss_before = args.pid.map(rss_kib).transpose()?;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let (opened, failures) = connect_many(&target, counters.clone(), |_| {}).await?;
    let connect_time = started.elapsed();
    println!(
        "loadgen idle: {} connections open ({} failed) in {:.1}s",
        opened.len(),
        failures,
        connect_time.as_secs_f64()
    );
    // Let the server settle (upgrade tasks, first reads) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(pid), Some(before)) = (args.pid, rss_before) {
        let after = rss_kib(pid)?;
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / opened.len().max(1) as f64;
        println!(
            "fanout pid {pid}: VmRSS {before} KiB -> {after} KiB; {:.0} bytes ({:.2} KiB) per connection",
            per,
            per / 1024.0
        );
    }
    tokio::time::sleep(hold).await;
    let closed = counters.closed.load(Ordering::Relaxed);
    println!("held {}s; {} connections closed by the server meanwhile", hold.as_secs(), closed);
    for conn in &opened {
        conn.reader.abort();
    }
    Ok(())
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// Host and port of a `ws://host:port/path` URL, refusing anything but loopback.
pub async fn loopback_target(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("ws://").context("only ws:// URLs are supported")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host(authority).await.with_context(|| format!("resolving {authority}"))?.collect();
    match addrs.iter().find(|a| a.is_ipv4()) {
        Some(addr) if addr.ip().is_loopback() => Ok(*addr),
        _ => bail!("{url} is not an IPv4 loopback address; loadgen only targets this machine"),
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `target.connections` connections, each read by its own task, which calls
/// `on_text` for every text frame after `hello`. Returns the connections and how many
/// failed to open.
pub async fn connect_many<F>(
    target: &Target,
    counters: Arc<Counters>,
    on_text: F,
) -> anyhow::Result<(Vec<Opened>, usize)>
where
    F: Fn(&str) + Clone + Send + Sync + 'static,
{
    if target.connections > 100_000 {
        bail!("--connections is capped at 100000");
    }
    let addr = loopback_target(&target.url).await?;
    let tokens = Tokens::new(target);
    let gate = Arc::new(Semaphore::new(target.concurrency.max(1)));
    let mut handshakes = tokio::task::JoinSet::new();
    for i in 0..target.connections {
        let source = source_address(target, i);
        let permit = gate.clone().acquire_owned().await.expect("semaphore is never closed");
        let url = tokens.url(i);
        handshakes.spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(30), open(&url, source, addr)).await;
            drop(permit);
            match result {
                Ok(Ok(ws)) => Ok(ws),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(anyhow::anyhow!("handshake timed out")),
            }
        });
    }
    let mut opened = Vec::with_capacity(target.connections);
    let mut failures = 0;
    let mut first_error = None;
    while let Some(result) = handshakes.join_next().await {
        match result.expect("handshake task") {
            Ok(ws) => {
                let counters = counters.clone();
                let on_text = on_text.clone();
                opened.push(Opened { reader: tokio::spawn(read_all(ws, counters, on_text)) });
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("first connection error: {e:#}");
    }
    Ok((opened, failures))
}

async fn open(url: &str, source: SocketAddr, addr: SocketAddr) -> anyhow::Result<Ws> {
    open_with_hello(url, source, addr).await.map(|(ws, _)| ws)
}

/// Signs the tokens of a run's clients: one subject per client, as real users have,
/// so fanout's per-subject connection cap sees many users, not one.
pub struct Tokens {
    keys: JwtKeys,
    accounts: Vec<String>,
    url: String,
}

impl Tokens {
    pub fn new(target: &Target) -> Self {
        let keys = JwtKeys::new(&SecretString::from(target.jwt_secret.clone()));
        Self { keys, accounts: target.accounts.clone(), url: target.url.clone() }
    }

    /// `target.url` with the `i`-th client's token (subject `loadgen-{i}`) appended.
    pub fn url(&self, i: usize) -> String {
        let token =
            self.keys.issue(&format!("loadgen-{i}"), self.accounts.clone(), Duration::from_secs(24 * 3600));
        format!("{}{}token={token}", self.url, if self.url.contains('?') { '&' } else { '?' })
    }
}

/// The loopback source address of the `i`-th connection.
pub fn source_address(target: &Target, i: usize) -> SocketAddr {
    let octet = target.first_source.wrapping_add((i % target.source_ips.max(1) as usize) as u8);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet.max(1))), 0)
}

/// A WebSocket client connection from `source` to `addr`, handshake done, with small
/// buffers.
pub async fn handshake(url: &str, source: SocketAddr, addr: SocketAddr) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(source).with_context(|| format!("binding {source}"))?;
    let stream = socket.connect(addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
    // tungstenite's default 128 KiB read and write buffers, zeroed on first use, cost
    // 10k connections over a gigabyte of page faults: the frames here are small.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(stream), Some(config))
            .await
            .context("WebSocket handshake")?;
    Ok(ws)
}

/// Opens one client connection and reads its `hello`, which it returns as well.
pub async fn open_with_hello(
    url: &str,
    source: SocketAddr,
    addr: SocketAddr,
) -> anyhow::Result<(Ws, String)> {
    let mut ws = handshake(url, source, addr).await?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.contains("\"hello\"") => Ok((ws, text.as_str().to_owned())),
        other => bail!("expected hello, got {other:?}"),
    }
}

async fn read_all<F>(mut ws: Ws, counters: Arc<Counters>, on_text: F)
where
    F: Fn(&str),
{
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                counters.frames.fetch_add(1, Ordering::Relaxed);
                on_text(text.as_str());
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    counters.closed.fetch_add(1, Ordering::Relaxed);
}
