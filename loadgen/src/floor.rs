//! `loadgen floor`: what this machine's kernel alone costs to put one small message on
//! many loopback TCP connections, with no WebSocket, no NATS and no async runtime.
//!
//! It is the floor under `loadgen broadcast`: fanout cannot deliver one event to N
//! clients faster than a bare loop of `write` calls to N sockets read by a bare epoll
//! loop on the same machine. Run both with the same `--connections` and compare.
//!
//! The writing side is this process: `--senders` threads, each writing every message to
//! its share of the sockets with blocking `write` calls. The reading side is a child
//! process (the same binary), one thread in an epoll loop, because the two sides
//! together would need twice the open files one process may hold here. Each message
//! starts with its send time; the reader records `receive time - send time`.
//!
//! ```text
//! loadgen floor --connections 10000 --senders 2 --events 10
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use mio::{Events, Interest, Poll, Token};

use crate::report::{self, CpuTime, now_us};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Connections to write to (at most 19,000: one process may hold 20,000 files).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Threads writing, each to its share of the connections (fanout has one runtime
    /// worker per core).
    #[arg(long, default_value_t = 2)]
    senders: usize,
    /// Messages each connection gets, one round at a time.
    #[arg(long, default_value_t = 10)]
    events: usize,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Bytes per message (a broadcast event frame is about 420).
    #[arg(long, default_value_t = 420)]
    payload_bytes: usize,
    /// Internal: run as the reading side, connecting to this address.
    #[arg(long, hide = true)]
    reader_of: Option<SocketAddr>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.connections == 0 || args.connections > 19_000 {
        bail!("--connections must be between 1 and 19000");
    }
    let payload_bytes = args.payload_bytes.clamp(8, 64 * 1024);
    if let Some(addr) = args.reader_of {
        return read_side(addr, args.connections, args.events, payload_bytes);
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut reader = spawn_reader(&args, addr, payload_bytes)?;
    let mut sockets = Vec::with_capacity(args.connections);
    // Accepts without blocking so that a reader that dies is noticed, not waited for.
    listener.set_nonblocking(true)?;
    while sockets.len() < args.connections {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(false)?;
                socket.set_nodelay(true)?;
                sockets.push(socket);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(status) = reader.try_wait()? {
                    bail!("the reader exited before connecting: {status}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting the reader's connections"),
        }
    }
    // The reader sends one byte on the first connection once it is polling them all.
    let mut ready = [0u8; 1];
    sockets[0].read_exact(&mut ready).context("waiting for the reader")?;
    println!(
        "loadgen floor: {} loopback TCP connections, {} sender thread(s), {} messages of {} bytes each",
        args.connections, args.senders, args.events, payload_bytes
    );
    let senders = args.senders.clamp(1, 64);
    let share = args.connections.div_ceil(senders);
    let mut message = vec![b'x'; payload_bytes];
    let cpu_before = CpuTime::of("self")?;
    for _ in 0..args.events {
        std::thread::sleep(Duration::from_millis(args.interval_ms));
        message[..8].copy_from_slice(&now_us().to_le_bytes());
        let message = &message;
        std::thread::scope(|scope| {
            for part in sockets.chunks_mut(share) {
                scope.spawn(move || {
                    for socket in part {
                        // A failed write shows up as a missing delivery in the report.
                        let _ = socket.write_all(message);
                    }
                });
            }
        });
    }
    let writes = (args.connections * args.events) as u64;
    println!("writing side: {}", CpuTime::of("self")?.per_item_since(cpu_before, writes, "message"));
    let status = reader.wait().context("waiting for the reader")?;
    anyhow::ensure!(status.success(), "the reader failed: {status}");
    Ok(())
}

fn spawn_reader(args: &Args, addr: SocketAddr, payload_bytes: usize) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe().context("finding loadgen's own binary")?)
        .args(["floor", "--reader-of", &addr.to_string()])
        .args(["--connections", &args.connections.to_string()])
        .args(["--events", &args.events.to_string()])
        .args(["--payload-bytes", &payload_bytes.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the reading side")
}

/// The child: connects, then reads every message and reports the latencies.
fn read_side(
    addr: SocketAddr,
    connections: usize,
    events: usize,
    payload_bytes: usize,
) -> anyhow::Result<()> {
    let mut poll = Poll::new()?;
    let mut sockets = Vec::with_capacity(connections);
    for i in 0..connections {
        let socket = TcpStream::connect(addr).context("connecting to the writing side")?;
        socket.set_nonblocking(true)?;
        let mut socket = mio::net::TcpStream::from_std(socket);
        poll.registry().register(&mut socket, Token(i), Interest::READABLE)?;
        sockets.push(socket);
    }
    // Bytes of the current message each socket has so far.
    let mut partial = vec![Vec::<u8>::with_capacity(payload_bytes); connections];
    anyhow::ensure!(sockets[0].write(b"r")? == 1, "could not signal readiness");
    let expected = connections * events;
    let cpu_before = CpuTime::of("self")?;
    let mut every = report::latency_histogram();
    // Per message round: the slowest delivery, i.e. when the last connection had it.
    let mut slowest = vec![0u64; events];
    // Messages each socket has had: its next one belongs to that round.
    let mut rounds = vec![0usize; connections];
    let mut received = 0;
    let mut poll_events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(60 + events as u64 * 10);
    while received < expected {
        if std::time::Instant::now() > deadline {
            bail!("only {received} of {expected} messages arrived");
        }
        poll.poll(&mut poll_events, Some(Duration::from_secs(1)))?;
        for event in poll_events.iter() {
            let i = event.token().0;
            loop {
                let n = match sockets[i].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading"),
                };
                let now = now_us();
                let mut bytes = &buf[..n];
                while !bytes.is_empty() {
                    let take = (payload_bytes - partial[i].len()).min(bytes.len());
                    partial[i].extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if partial[i].len() == payload_bytes {
                        let sent = u64::from_le_bytes(partial[i][..8].try_into().expect("8 bytes"));
                        partial[i].clear();
                        let latency = now.saturating_sub(sent);
                        report::record(&mut every, Duration::from_micros(latency));
                        if let Some(slot) = slowest.get_mut(rounds[i]) {
                            *slot = (*slot).max(latency);
                        }
                        rounds[i] += 1;
                        received += 1;
                    }
                }
            }
        }
    }
    let mut complete = report::latency_histogram();
    for us in slowest {
        report::record(&mut complete, Duration::from_micros(us));
    }
    println!("reading side: {}", CpuTime::of("self")?.per_item_since(cpu_before, expected as u64, "message"));
    println!("delivery latency (every message): {}", report::percentiles(&every));
    println!("time until the last connection had a message: {}", report::percentiles(&complete));
    Ok(())
}
